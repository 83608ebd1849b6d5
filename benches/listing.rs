//! Listing benchmark: how long listing one large directory takes through the mount, next to the
//! raw S3 requests the same listing could cost, all against the same local server in one run.
//!
//! Run with `cargo bench --bench listing`. Uses the test harness to start s3s-fs on 127.0.0.1
//! (or `S3CSI_TEST_ENDPOINT`), seeds one directory of `S3CSI_BENCH_OBJECTS` (default 10,000)
//! small objects, then measures, `S3CSI_BENCH_RUNS` (default 3) times:
//!
//! - raw LIST: ListObjectsV2 of the directory with delimiter `/`, every page (SDK, no FUSE);
//! - raw HEAD of every object, one at a time, and with 64 in flight;
//! - `ls -f` (readdir only) and `ls -l` (readdir + stat of every entry) on a fresh mount each
//!   run, default options (so the default `--metadata-ttl`); the mount itself is not timed.
//!
//! Every figure is the median over the runs, in seconds and as a ratio over the raw LIST time
//! taken in the same run (2.00x = twice as long as one full LIST). `S3CSI_BENCH_SERVER=moto`
//! also runs everything against moto (after s3s-fs, never at the same time).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

use futures::StreamExt;

use common::{Backend, Mount, S3Server};

/// Default number of objects in the listed directory: ten pages of ListObjectsV2.
const DEFAULT_OBJECTS: usize = 10_000;
/// Size of every object: small, so the figures are about requests, not bytes.
const OBJECT_BYTES: usize = 256;
/// Directory (key prefix) holding the objects.
const DIR: &str = "dir";
/// Uploads in flight while seeding; seeding is not measured.
const SEED_CONCURRENCY: usize = 64;
/// HEADs in flight for the concurrent raw HEAD figure: a generous client-side fan-out.
const HEAD_CONCURRENCY: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

fn key(i: usize) -> String {
    format!("{DIR}/obj-{i:06}")
}

/// ListObjectsV2 of `DIR/` with delimiter `/`, every page. Returns (seconds, pages).
fn raw_list(server: &S3Server, bucket: &str, objects: usize) -> (f64, usize) {
    let client = server.client().clone();
    let prefix = format!("{DIR}/");
    let start = Instant::now();
    let (entries, pages) = server.block_on(async {
        let (mut entries, mut pages, mut token) = (0, 0, None);
        loop {
            let out = client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(&prefix)
                .delimiter("/")
                .set_continuation_token(token)
                .send()
                .await
                .expect("raw ListObjectsV2");
            pages += 1;
            entries += out.contents().len() + out.common_prefixes().len();
            token = out.next_continuation_token().map(str::to_owned);
            if !out.is_truncated().unwrap_or(false) || token.is_none() {
                return (entries, pages);
            }
        }
    });
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(entries, objects, "raw LIST of {prefix} returned {entries} entries");
    (secs, pages)
}

/// HeadObject of every object with at most `concurrency` in flight (1: strictly sequential).
fn raw_head_all(server: &S3Server, bucket: &str, objects: usize, concurrency: usize) -> f64 {
    let client = server.client().clone();
    let start = Instant::now();
    server.block_on(async {
        let mut heads = futures::stream::iter(0..objects)
            .map(|i| {
                let client = client.clone();
                async move { (i, client.head_object().bucket(bucket).key(key(i)).send().await) }
            })
            .buffer_unordered(concurrency);
        while let Some((i, out)) = heads.next().await {
            let out = out.unwrap_or_else(|e| panic!("raw HEAD {}: {e}", key(i)));
            assert_eq!(out.content_length(), Some(OBJECT_BYTES as i64), "size of {}", key(i));
        }
    });
    start.elapsed().as_secs_f64()
}

/// Runs `ls <flag> <mount>/DIR` on a fresh mount; returns (seconds, lines printed).
fn ls_fresh_mount(server: &S3Server, bucket: &str, flag: &str) -> (f64, Vec<String>) {
    let mount = Mount::new(server, bucket, &[]);
    let dir = mount.join(DIR);
    let start = Instant::now();
    // C locale: `ls -l` sorts, and locale-aware collation would be part of the figure.
    let out = Command::new("ls").arg(flag).arg(&dir).env("LC_ALL", "C").output().expect("run ls");
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ls {flag} {} failed: {}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    mount.unmount();
    let lines = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    (secs, lines)
}

struct Figures {
    list: f64,
    pages: usize,
    head_seq: f64,
    head_par: f64,
    ls_f: f64,
    ls_l: f64,
}

fn one_run(server: &S3Server, bucket: &str, objects: usize) -> Figures {
    let (list, pages) = raw_list(server, bucket, objects);
    let head_seq = raw_head_all(server, bucket, objects, 1);
    let head_par = raw_head_all(server, bucket, objects, HEAD_CONCURRENCY);

    let (ls_f, lines) = ls_fresh_mount(server, bucket, "-f");
    let names = lines.iter().filter(|l| *l != "." && *l != "..").count();
    assert_eq!(names, objects, "ls -f listed {names} names");

    let (ls_l, lines) = ls_fresh_mount(server, bucket, "-l");
    let files = lines.iter().filter(|l| l.starts_with('-')).count();
    assert_eq!(files, objects, "ls -l listed {files} regular files");

    Figures { list, pages, head_seq, head_par, ls_f, ls_l }
}

fn server_name(server: &S3Server) -> &'static str {
    match server.backend() {
        Backend::Fast => "s3s-fs",
        Backend::Faithful => "moto",
        Backend::External => "S3CSI_TEST_ENDPOINT",
    }
}

fn bench(server: &S3Server, objects: usize, runs: usize) {
    let name = server_name(server);
    let bucket = server.unique_bucket("listing");
    println!("\n{name} on {}: seeding {objects} objects of {OBJECT_BYTES} bytes under {DIR}/ ...", server.endpoint());
    let t = Instant::now();
    let body = vec![b'x'; OBJECT_BYTES];
    server.put_many(&bucket, (0..objects).map(|i| (key(i), body.clone())).collect(), SEED_CONCURRENCY);
    println!("seeded in {:.1} s", t.elapsed().as_secs_f64());

    let mut all = Vec::new();
    for run in 0..runs {
        let f = one_run(server, &bucket, objects);
        println!(
            "run {}: LIST {:.3} s ({} pages)  HEAD seq {:.3} s  HEAD x{HEAD_CONCURRENCY} {:.3} s  ls -f {:.3} s  \
             ls -l {:.3} s",
            run + 1,
            f.list,
            f.pages,
            f.head_seq,
            f.head_par,
            f.ls_f,
            f.ls_l
        );
        all.push(f);
    }

    let pages = all[0].pages;
    println!(
        "\n{objects} objects in one directory, {name} on {}; medians over {runs} run(s), ratios taken within each run:",
        server.endpoint()
    );
    println!("{:<52} {:>10}  {:>12}", "operation", "seconds", "x raw LIST");
    let row = |label: &str, get: &dyn Fn(&Figures) -> f64| {
        let secs = median(all.iter().map(get).collect());
        let ratio = median(all.iter().map(|f| get(f) / f.list).collect());
        println!("{label:<52} {secs:>10.3}  {ratio:>11.2}x");
    };
    row(&format!("raw LIST (ListObjectsV2 + delimiter, {pages} pages)"), &|f| f.list);
    row("raw HEAD of every object, sequential", &|f| f.head_seq);
    row(&format!("raw HEAD of every object, {HEAD_CONCURRENCY} concurrent"), &|f| f.head_par);
    row("ls -f on a fresh mount (readdir)", &|f| f.ls_f);
    row("ls -l on a fresh mount (readdir + stat each)", &|f| f.ls_l);
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent; stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("listing benchmark: run with `cargo bench --bench listing`");
        return;
    }
    let runs = env_usize("S3CSI_BENCH_RUNS", 3).max(1);
    let objects = env_usize("S3CSI_BENCH_OBJECTS", DEFAULT_OBJECTS).max(1);
    let with_moto = match std::env::var("S3CSI_BENCH_SERVER").unwrap_or_default().as_str() {
        "" | "s3s-fs" => false,
        "moto" => true,
        other => panic!("S3CSI_BENCH_SERVER={other}: expected s3s-fs (default) or moto (s3s-fs, then moto)"),
    };

    // One server at a time: each one's figures share the CPU with nothing but the mount.
    let server = S3Server::start();
    let external = server.backend() == Backend::External;
    bench(&server, objects, runs);
    drop(server);
    if with_moto && !external {
        bench(&S3Server::start_faithful(), objects, runs);
    }
}
