//! Read-throughput benchmark: prints raw S3 GET throughput and FUSE read throughput from the
//! same local server in the same run, each as MiB/s and as a ratio of the raw figure.
//!
//! Run with `cargo bench --bench throughput`. Uses the test harness to start s3s-fs on
//! 127.0.0.1 (or `S3CSI_TEST_ENDPOINT`). `S3CSI_BENCH_RUNS` (default 3) sets the repetitions;
//! every figure is the median over them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use common::{Mount, S3Server};

const MIB: u64 = 1 << 20;
/// Size of the main object: large enough that the server, not request setup, dominates.
const BIG_BYTES: u64 = 1 << 30;
/// Objects read by the concurrent-readers case.
const READERS: usize = 4;
const READER_OBJECT_BYTES: u64 = 256 * MIB;
/// Ranged GET size and parallelism of the raw baseline; the same shape the mount uses.
const RAW_RANGE_BYTES: u64 = 8 * MIB;
const RAW_PARALLEL: usize = 16;
/// Random reads of 1 MiB at random offsets.
const RANDOM_READS: usize = 200;
/// Memory cache large enough to hold the 1 GiB object, so the warm re-read hits the block cache.
const MOUNT_ARGS: &[&str] = &["--memory-cache-size", "2GiB"];

fn random_bytes(n: u64, seed: u64) -> Vec<u8> {
    // xorshift: fast, incompressible enough for a storage benchmark.
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n as usize);
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mibps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn drop_page_cache() {
    // Only our block cache should serve warm reads; ignore failure when not root.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

/// Parallel ranged GETs of the whole object straight from S3 (no FUSE, no cache).
fn raw_get(server: &S3Server, bucket: &str, key: &str, size: u64) -> f64 {
    let client = server.client().clone();
    let start = Instant::now();
    server.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(RAW_PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        let mut off = 0;
        while off < size {
            let end = (off + RAW_RANGE_BYTES).min(size);
            let (client, sem, bucket, key) = (client.clone(), sem.clone(), bucket.to_owned(), key.to_owned());
            tasks.spawn(async move {
                let _p = sem.acquire_owned().await.unwrap();
                let out = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .range(format!("bytes={off}-{}", end - 1))
                    .send()
                    .await
                    .expect("raw GET");
                let body = out.body.collect().await.expect("raw GET body").into_bytes();
                assert_eq!(body.len() as u64, end - off);
            });
            off = end;
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
    mibps(size, start.elapsed().as_secs_f64())
}

fn read_file(path: &std::path::Path) -> u64 {
    let mut f = File::open(path).expect("open through mount");
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).expect("read through mount");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

struct Figures {
    raw: f64,
    cold: f64,
    warm: f64,
    concurrent: f64,
    random: f64,
}

fn one_run(server: &S3Server, bucket: &str, seed: u64) -> Figures {
    let raw = raw_get(server, bucket, "big", BIG_BYTES);

    let mount = Mount::new(server, bucket, MOUNT_ARGS);
    drop_page_cache();
    let t = Instant::now();
    assert_eq!(read_file(&mount.join("big")), BIG_BYTES);
    let cold = mibps(BIG_BYTES, t.elapsed().as_secs_f64());
    drop_page_cache();
    let t = Instant::now();
    assert_eq!(read_file(&mount.join("big")), BIG_BYTES);
    let warm = mibps(BIG_BYTES, t.elapsed().as_secs_f64());
    mount.unmount();

    let mount = Mount::new(server, bucket, MOUNT_ARGS);
    let t = Instant::now();
    std::thread::scope(|s| {
        for i in 0..READERS {
            let path = mount.join(format!("reader-{i}"));
            s.spawn(move || assert_eq!(read_file(&path), READER_OBJECT_BYTES));
        }
    });
    let concurrent = mibps(READERS as u64 * READER_OBJECT_BYTES, t.elapsed().as_secs_f64());
    mount.unmount();

    let mount = Mount::new(server, bucket, MOUNT_ARGS);
    let f = File::open(mount.join("big")).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut x = seed | 1;
    let t = Instant::now();
    for _ in 0..RANDOM_READS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % (BIG_BYTES - MIB);
        f.read_exact_at(&mut buf, off).expect("random read");
    }
    let random = mibps(RANDOM_READS as u64 * MIB, t.elapsed().as_secs_f64());
    drop(f);
    mount.unmount();

    Figures { raw, cold, warm, concurrent, random }
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput benchmark: run with `cargo bench --bench throughput`");
        return;
    }
    let runs: usize = std::env::var("S3CSI_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let server = S3Server::start();
    let bucket = server.unique_bucket("bench");
    println!(
        "uploading {} MiB of test data to {} ...",
        (BIG_BYTES + READERS as u64 * READER_OBJECT_BYTES) / MIB,
        server.endpoint()
    );
    server.put(&bucket, "big", &random_bytes(BIG_BYTES, 1));
    for i in 0..READERS {
        server.put(&bucket, &format!("reader-{i}"), &random_bytes(READER_OBJECT_BYTES, 10 + i as u64));
    }

    let mut all = Vec::new();
    for run in 0..runs {
        let f = one_run(&server, &bucket, 99 + run as u64);
        println!(
            "run {}: raw {:.0}  cold {:.0}  warm {:.0}  4 readers {:.0}  random 1MiB {:.0} (MiB/s)",
            run + 1,
            f.raw,
            f.cold,
            f.warm,
            f.concurrent,
            f.random
        );
        all.push(f);
    }
    let raw = median(all.iter().map(|f| f.raw).collect());
    let row = |name: &str, v: f64| println!("{name:<44} {v:>9.0} MiB/s  {:>5.2}x raw", v / raw);
    println!("\nmedians over {runs} run(s), s3s-fs on {}:", server.endpoint());
    row("raw S3 GET, 1 GiB, 16 parallel 8 MiB ranges", raw);
    row("cold sequential read through the mount", median(all.iter().map(|f| f.cold).collect()));
    row("warm re-read (block cache)", median(all.iter().map(|f| f.warm).collect()));
    row("4 concurrent readers of 4 objects (total)", median(all.iter().map(|f| f.concurrent).collect()));
    row("random 1 MiB reads", median(all.iter().map(|f| f.random).collect()));
}
