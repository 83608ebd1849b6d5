//! Throughput benchmark: raw S3 figures and the same work through the mount, from the same
//! local server in the same run, each as MiB/s (or files/s) and as a ratio of the raw figure.
//!
//! Run with `cargo bench --bench throughput`. Uses the test harness to start s3s-fs on
//! 127.0.0.1 (or `S3CSI_TEST_ENDPOINT`). `S3CSI_BENCH_RUNS` (default 3) sets the repetitions;
//! every figure is the median over them. `S3CSI_BENCH=read` or `=write` runs one half.

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
/// Ranged GET size and parallelism of the raw baseline: the shape the mount's prefetcher uses
/// at full window (eight 16 MiB requests), which is also the fastest shape for the local server.
const RAW_RANGE_BYTES: u64 = 16 * MIB;
const RAW_PARALLEL: usize = 8;
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

/// Parallel parts of the raw multipart-upload baseline: the mount's default budget
/// (64 MiB of 8 MiB parts).
const RAW_UPLOAD_PARALLEL: usize = 8;
const PART_BYTES: u64 = 8 * MIB;
const SMALL_FILES: usize = 1000;
const SMALL_FILE_BYTES: usize = 4096;

/// Multipart upload of `data` straight to S3 (no FUSE).
fn raw_multipart_upload(server: &S3Server, bucket: &str, key: &str, data: &Arc<Vec<u8>>) -> f64 {
    let client = server.client().clone();
    let start = Instant::now();
    server.block_on(async {
        let id = client.create_multipart_upload().bucket(bucket).key(key).send().await.unwrap();
        let id = id.upload_id().unwrap().to_owned();
        let sem = Arc::new(tokio::sync::Semaphore::new(RAW_UPLOAD_PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, off) in (0..data.len() as u64).step_by(PART_BYTES as usize).enumerate() {
            let (client, sem, bucket, key, id, data) =
                (client.clone(), sem.clone(), bucket.to_owned(), key.to_owned(), id.clone(), data.clone());
            tasks.spawn(async move {
                let _p = sem.acquire_owned().await.unwrap();
                let end = (off + PART_BYTES).min(data.len() as u64) as usize;
                let body = bytes::Bytes::copy_from_slice(&data[off as usize..end]);
                let n = i as i32 + 1;
                let out = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(n)
                    .body(body.into())
                    .send()
                    .await
                    .expect("raw UploadPart");
                (n, out.e_tag().unwrap_or_default().to_owned())
            });
        }
        let mut parts = Vec::new();
        while let Some(r) = tasks.join_next().await {
            parts.push(r.unwrap());
        }
        parts.sort();
        let parts = parts
            .into_iter()
            .map(|(n, e)| aws_sdk_s3::types::CompletedPart::builder().part_number(n).e_tag(e).build())
            .collect();
        client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .multipart_upload(aws_sdk_s3::types::CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .expect("raw CompleteMultipartUpload");
    });
    mibps(data.len() as u64, start.elapsed().as_secs_f64())
}

struct WriteFigures {
    raw: f64,
    seq: f64,
    create: f64,
    cp: f64,
}

/// Flushes dirty pages (the server stores objects as files) so one phase's writeback does not
/// slow the next one down.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn write_run(server: &S3Server, bucket: &str, data: &Arc<Vec<u8>>, run: usize) -> WriteFigures {
    let mount = Mount::new(server, bucket, &[]);
    let seq_write = || {
        settle();
        let t = Instant::now();
        {
            let mut f = File::create(mount.join(format!("seq-{run}"))).expect("create through mount");
            for chunk in data.chunks(MIB as usize) {
                std::io::Write::write_all(&mut f, chunk).expect("write through mount");
            }
            // Dropping the file closes it; close returns once the object is committed.
        }
        mibps(data.len() as u64, t.elapsed().as_secs_f64())
    };
    let raw_write = || {
        settle();
        raw_multipart_upload(server, bucket, &format!("raw-{run}"), data)
    };
    // Alternate which goes first: the server's own disk writeback slows whichever runs second.
    let (raw, seq) = if run.is_multiple_of(2) {
        let r = raw_write();
        (r, seq_write())
    } else {
        let s = seq_write();
        (raw_write(), s)
    };

    let small = vec![7u8; SMALL_FILE_BYTES];
    let t = Instant::now();
    for i in 0..SMALL_FILES {
        let dir = mount.join(format!("small-{run}/d{}", i % 10));
        if i < 10 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(dir.join(format!("f{i}")), &small).unwrap();
    }
    let create = SMALL_FILES as f64 / t.elapsed().as_secs_f64();

    let src = tempfile::tempdir().unwrap();
    for i in 0..SMALL_FILES {
        let dir = src.path().join(format!("tree/d{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), &small).unwrap();
    }
    let t = Instant::now();
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(src.path().join("tree"))
        .arg(mount.join(format!("cp-{run}")))
        .status()
        .unwrap();
    assert!(status.success(), "cp -r into the mount failed");
    let cp = SMALL_FILES as f64 / t.elapsed().as_secs_f64();
    mount.unmount();
    WriteFigures { raw, seq, create, cp }
}

fn bench_writes(server: &S3Server, runs: usize) {
    let bucket = server.unique_bucket("benchw");
    let data = Arc::new(random_bytes(BIG_BYTES, 77));
    let mut all = Vec::new();
    for run in 0..runs {
        let f = write_run(server, &bucket, &data, run);
        println!(
            "run {}: raw multipart {:.0} MiB/s  write {:.0} MiB/s  create {:.0} files/s  cp -r {:.0} files/s",
            run + 1,
            f.raw,
            f.seq,
            f.create,
            f.cp
        );
        all.push(f);
    }
    let raw = median(all.iter().map(|f| f.raw).collect());
    let seq = median(all.iter().map(|f| f.seq).collect());
    let ratio = median(all.iter().map(|f| f.seq / f.raw).collect());
    println!("\nwrite medians over {runs} run(s) (ratios taken within each run):");
    println!("{:<44} {raw:>9.0} MiB/s   1.00x raw", "raw multipart upload, 1 GiB, 8 x 8 MiB parts");
    println!("{:<44} {seq:>9.0} MiB/s  {ratio:>5.2}x raw", "sequential write through the mount");
    println!("{:<44} {:>9.0} files/s", "create 1,000 4 KiB files", median(all.iter().map(|f| f.create).collect()));
    println!("{:<44} {:>9.0} files/s", "cp -r of 1,000 4 KiB files", median(all.iter().map(|f| f.cp).collect()));
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput benchmark: run with `cargo bench --bench throughput`");
        return;
    }
    let runs: usize = std::env::var("S3CSI_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let which = std::env::var("S3CSI_BENCH").unwrap_or_default();
    let server = S3Server::start();
    if which != "write" {
        bench_reads(&server, runs);
    }
    if which != "read" {
        bench_writes(&server, runs);
    }
}

fn bench_reads(server: &S3Server, runs: usize) {
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
        let f = one_run(server, &bucket, 99 + run as u64);
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
    // Each ratio is taken within a run (same server state), then the median over runs.
    let row = |name: &str, get: &dyn Fn(&Figures) -> f64| {
        let v = median(all.iter().map(get).collect());
        let ratio = median(all.iter().map(|f| get(f) / f.raw).collect());
        println!("{name:<44} {v:>9.0} MiB/s  {ratio:>5.2}x raw");
    };
    println!("\nmedians over {runs} run(s), s3s-fs on {}:", server.endpoint());
    row("raw S3 GET, 1 GiB, 8 parallel 16 MiB ranges", &|f| f.raw);
    row("cold sequential read through the mount", &|f| f.cold);
    row("warm re-read (block cache)", &|f| f.warm);
    row("4 concurrent readers of 4 objects (total)", &|f| f.concurrent);
    row("random 1 MiB reads", &|f| f.random);
}
