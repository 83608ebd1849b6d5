//! Throughput benchmark: raw S3 figures and the same work through the mount, from the same
//! local server in the same run, each with a ratio of the raw figure.
//!
//! Run with `cargo bench --bench throughput`. Uses the test harness to start s3s-fs on
//! 127.0.0.1 (or `S3CSI_TEST_ENDPOINT`). `S3CSI_BENCH_RUNS` (default 3) sets the repetitions;
//! every figure is the median over them, and every ratio is taken within one run before the
//! median. `S3CSI_BENCH=read` or `=write` runs one half; `=sequential` only the cold
//! sequential read and its raw baseline. `S3CSI_BENCH_CPUS=split` gives the server one CPU
//! and everything else the other.
//!
//! Every read workload runs on a fresh mount with a metrics endpoint: the table shows the bytes
//! the daemon fetched from S3 per byte the workload read (its `s3_read_bytes` counter) and the
//! daemon's peak RSS (`VmHWM`) next to the memory budgets the mount ran with.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
/// 1 MiB `pread`s at random (unaligned) offsets over the big object.
const RANDOM_LARGE: RandomReads =
    RandomReads { name: "random 1 MiB pread x256", count: 256, len: MIB, align: 1, unit: Unit::MibPerSec };
/// 4 KiB `pread`s at random 4 KiB-aligned offsets over the big object.
const RANDOM_SMALL: RandomReads =
    RandomReads { name: "random 4 KiB pread x1000", count: 1000, len: 4096, align: 4096, unit: Unit::OpsPerSec };
/// Small objects (read half: under `SMALL_PREFIX`; write half: created through the mount).
const SMALL_FILES: usize = 1000;
const SMALL_FILE_BYTES: usize = 4096;
const SMALL_PREFIX: &str = "small/";
/// Memory cache large enough to hold the 1 GiB object, so the warm re-read hits the block cache.
/// Only that workload gets it; every other mount runs with the default budgets.
const WARM_CACHE_MIB: u64 = 2048;
/// How long a daemon may take to show up in /proc after its mount command returned.
const DAEMON_FIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at a mount whose metrics port was taken between picking and binding it.
const METRICS_PORT_ATTEMPTS: usize = 5;

/// xorshift64: fast, reproducible, incompressible enough for a storage benchmark.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_bytes(n: u64, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as u64) < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
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

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Drops the kernel's page cache, the server's files included: the mount workloads drop it on a
/// fresh mount, and the raw baselines before they start, so both read the server cold.
fn drop_page_cache() {
    // Only our block cache should serve warm reads; ignore failure when not root.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

/// Memory budgets of a mount, in MiB.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Budgets {
    memory_cache: u64,
    write_buffer: u64,
}

impl std::fmt::Display for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}+{} = {} MiB", self.memory_cache, self.write_buffer, self.memory_cache + self.write_buffer)
    }
}

/// The budgets of a mount given no budget options, as `s3csi mount --help` states them.
fn default_budgets() -> Budgets {
    static DEFAULTS: OnceLock<Budgets> = OnceLock::new();
    *DEFAULTS.get_or_init(|| {
        let out = std::process::Command::new(common::S3CSI_BIN)
            .args(["mount", "--help"])
            .output()
            .expect("run s3csi mount --help");
        let help = String::from_utf8_lossy(&out.stdout);
        let default_of = |flag: &str| {
            let value = help
                .lines()
                .find(|l| l.trim_start().starts_with(flag))
                .and_then(|l| l.split("[default: ").nth(1)?.split(']').next())
                .unwrap_or_else(|| panic!("`s3csi mount --help` states no default for {flag}:\n{help}"));
            size_mib(value)
        };
        Budgets { memory_cache: default_of("--memory-cache-size"), write_buffer: default_of("--write-buffer-size") }
    })
}

/// `256MiB`, `2GiB` in MiB.
fn size_mib(size: &str) -> u64 {
    let digits = size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len());
    let n: u64 = size[..digits].parse().unwrap_or_else(|_| panic!("not a size: {size}"));
    match &size[digits..] {
        "MiB" => n,
        "GiB" => n * 1024,
        unit => panic!("unexpected unit {unit:?} in {size}"),
    }
}

/// Pid of the `s3csi mount` daemon serving `mountpoint`: the one process with the mountpoint
/// on its command line (the mount command that started it has exited by now).
fn daemon_pid(mountpoint: &Path) -> u32 {
    let is_mount_daemon = |pid: &u32| {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        let mut args = cmdline.split(|&b| b == 0);
        let exe = args.next().unwrap_or_default();
        exe.ends_with(b"s3csi") && args.next() == Some(b"mount")
    };
    let mut pids = Vec::new();
    common::wait_until(DAEMON_FIND_TIMEOUT, || {
        pids = common::processes_with_arg(mountpoint).into_iter().filter(is_mount_daemon).collect();
        !pids.is_empty()
    });
    assert_eq!(pids.len(), 1, "want exactly one s3csi mount daemon for {}, found {pids:?}", mountpoint.display());
    pids[0]
}

/// Peak resident set size of `pid` so far (`VmHWM`), in MiB.
fn vmhwm_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"));
    kib as f64 / 1024.0
}

/// The fields of `/proc/<pid>/stat` after the command name, from field 3 (state) on.
fn proc_stat_fields(pid: u32) -> Vec<String> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    rest.split_whitespace().map(str::to_owned).collect()
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15.
    let ticks: f64 = proc_stat_fields(pid)[11..13].iter().map(|f| f.parse::<f64>().expect("clock ticks")).sum();
    // SAFETY: sysconf only reads a configuration value.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU seconds used by the processes in `pids` (the S3 server, the mount, this benchmark)
/// while `work` runs, per GiB of `bytes`.
fn cpu_per_gib(pids: &[u32], bytes: u64, work: impl FnOnce()) -> Vec<f64> {
    let before: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    work();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    pids.iter().zip(before).map(|(&p, b)| (cpu_secs(p) - b) / gib).collect()
}

/// Gives the S3 server CPU 0 and this benchmark (with the mounts it starts, and the raw
/// client) CPU 1, so the mount competes with the raw client, not with the server: the ratio
/// then shows whether the mount keeps up with what the server can send.
fn split_cpus(server: &S3Server) {
    let pin = |cpu: &str, pid: u32| {
        let out = std::process::Command::new("taskset")
            .args(["-a", "-c", "-p", cpu, &pid.to_string()])
            .output()
            .expect("run taskset (util-linux)");
        assert!(out.status.success(), "taskset -p {cpu} {pid}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let server_pid = server.pid().expect("S3CSI_BENCH_CPUS=split needs the local server");
    pin("0", server_pid);
    pin("1", std::process::id());
    println!("S3 server pinned to CPU 0; the benchmark, its mounts and the raw client to CPU 1");
}

/// Minor page faults process `pid` has taken so far (field 10 of its stat).
fn minor_faults(pid: u32) -> u64 {
    proc_stat_fields(pid)[7].parse().expect("minflt in /proc/<pid>/stat")
}

/// Bytes fetched from S3 according to a metrics scrape: every series of `s3_read_bytes`.
fn s3_read_bytes(metrics: &str) -> u64 {
    assert!(metrics.contains("s3csi_s3_read_bytes"), "no s3_read_bytes counter in the metrics:\n{metrics}");
    let total = common::metric_sum(metrics, "s3csi_s3_read_bytes_total", &[])
        + common::metric_sum(metrics, "s3csi_s3_read_bytes", &[]);
    total as u64
}

/// A fresh mount with a metrics endpoint, its daemon's pid, and the budgets it runs with.
struct Probe {
    mount: Mount,
    metrics_port: u16,
    pid: u32,
    budgets: Budgets,
}

/// What one workload did on a [`Probe`]'s mount.
struct Observed {
    secs: f64,
    fetched_per_read: f64,
    peak_rss_mib: f64,
}

impl Probe {
    /// Mounts `bucket` afresh with the default budgets, or with a `memory_cache_mib` memory
    /// cache, then drops the page cache.
    fn new(server: &S3Server, bucket: &str, memory_cache_mib: Option<u64>) -> Probe {
        let mut budgets = default_budgets();
        let mut args = Vec::new();
        if let Some(mib) = memory_cache_mib {
            budgets.memory_cache = mib;
            args.extend(["--memory-cache-size".to_owned(), format!("{mib}MiB")]);
        }
        for _ in 0..METRICS_PORT_ATTEMPTS {
            let metrics_port = common::free_port();
            let address = format!("127.0.0.1:{metrics_port}");
            let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
            all.extend(["--metrics-address", &address]);
            match Mount::try_new(server, bucket, &all) {
                Ok(mount) => {
                    let pid = daemon_pid(mount.path());
                    drop_page_cache();
                    return Probe { mount, metrics_port, pid, budgets };
                }
                // Someone took the port between picking and binding it: pick another.
                Err(out) if String::from_utf8_lossy(&out.stderr).contains("cannot serve metrics") => {}
                Err(out) => panic!(
                    "s3csi mount {bucket} {all:?} failed with {}\n--- stderr ---\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        panic!("no free metrics port after {METRICS_PORT_ATTEMPTS} attempts");
    }

    fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount.join(rel)
    }

    fn fetched(&self) -> u64 {
        s3_read_bytes(&common::scrape_metrics(self.metrics_port))
    }

    /// Runs `work`, which returns the bytes it read through the mount; then reads the daemon's
    /// peak RSS so far.
    fn observe(&self, work: impl FnOnce() -> u64) -> Observed {
        let before = self.fetched();
        let start = Instant::now();
        let read = work();
        let secs = start.elapsed().as_secs_f64();
        let fetched = self.fetched() - before;
        Observed { secs, fetched_per_read: fetched as f64 / read as f64, peak_rss_mib: vmhwm_mib(self.pid) }
    }

    fn unmount(self) {
        self.mount.unmount();
    }
}

/// Reads a whole file through the mount in 1 MiB `read` calls; the bytes read.
fn read_file(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {} through the mount: {e}", path.display()));
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

/// Writes `bytes` of fresh data to a new file in 1 MiB `write` calls, then closes it, checking
/// the close (which returns once the object is committed).
fn write_file(path: &Path, bytes: u64, seed: u64) {
    use std::os::fd::IntoRawFd;
    let mut chunk = random_bytes(MIB, seed);
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {} through the mount: {e}", path.display()));
    for i in 0..bytes / MIB {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&chunk).expect("write through mount");
    }
    // SAFETY: the descriptor comes from `into_raw_fd`, so this is its only owner and close.
    let rc = unsafe { libc::close(f.into_raw_fd()) };
    assert_eq!(rc, 0, "close of {} failed: {}", path.display(), std::io::Error::last_os_error());
}

/// Parallel ranged GETs of the whole object straight from S3 (no FUSE, no cache); MiB/s.
fn raw_get(server: &S3Server, bucket: &str, key: &str, size: u64) -> f64 {
    drop_page_cache();
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
                assert_eq!(get(&client, &bucket, &key, Some((off, end - off))).await, end - off);
            });
            off = end;
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
    mibps(size, start.elapsed().as_secs_f64())
}

/// One GET (of `range` = (offset, length) when given) with its body drained chunk by chunk;
/// the body's length.
async fn get(client: &aws_sdk_s3::Client, bucket: &str, key: &str, range: Option<(u64, u64)>) -> u64 {
    let range = range.map(|(off, len)| format!("bytes={off}-{}", off + len - 1));
    let out = client.get_object().bucket(bucket).key(key).set_range(range).send().await.expect("raw GET");
    let mut body = out.body;
    let mut n = 0;
    while let Some(chunk) = body.try_next().await.expect("raw GET body") {
        n += chunk.len() as u64;
    }
    n
}

/// The given ranges of `key` fetched with one ranged GET each, one at a time, in order;
/// total seconds and each request's latency in ms.
fn raw_ranges(server: &S3Server, bucket: &str, key: &str, offsets: &[u64], len: u64) -> (f64, Vec<f64>) {
    drop_page_cache();
    let client = server.client();
    let start = Instant::now();
    let latencies = server.block_on(async {
        let mut latencies = Vec::with_capacity(offsets.len());
        for &off in offsets {
            let t = Instant::now();
            assert_eq!(get(client, bucket, key, Some((off, len))).await, len);
            latencies.push(millis(t.elapsed()));
        }
        latencies
    });
    (start.elapsed().as_secs_f64(), latencies)
}

/// Plain whole-object GETs of `keys`, all at once (one stream each); MiB/s over all bytes.
fn raw_concurrent_gets(server: &S3Server, bucket: &str, keys: &[String]) -> f64 {
    drop_page_cache();
    let start = Instant::now();
    let total: u64 = server.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for key in keys {
            let (client, bucket, key) = (server.client().clone(), bucket.to_owned(), key.clone());
            tasks.spawn(async move { get(&client, &bucket, &key, None).await });
        }
        tasks.join_all().await.into_iter().sum()
    });
    mibps(total, start.elapsed().as_secs_f64())
}

/// Plain GETs of `keys`, one at a time; seconds.
fn raw_sequential_gets(server: &S3Server, bucket: &str, keys: &[String]) -> f64 {
    drop_page_cache();
    let start = Instant::now();
    server.block_on(async {
        for key in keys {
            get(server.client(), bucket, key, None).await;
        }
    });
    start.elapsed().as_secs_f64()
}

/// How a row's figures are shown.
#[derive(Clone, Copy)]
enum Unit {
    MibPerSec,
    OpsPerSec,
    FilesPerSec,
    Millis,
    Seconds,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::MibPerSec => format!("{v:.0} MiB/s"),
            Unit::OpsPerSec => format!("{v:.0} ops/s"),
            Unit::FilesPerSec => format!("{v:.0} files/s"),
            Unit::Millis => format!("{v:.2} ms"),
            Unit::Seconds => format!("{v:.1} s"),
        }
    }
}

/// One row's figures from one run.
#[derive(Clone, Copy)]
struct Sample {
    mount: f64,
    raw: Option<f64>,
    fetched_per_read: Option<f64>,
    peak_rss_mib: Option<f64>,
}

impl Sample {
    /// A workload's main row: its figure, the raw one, and what its mount observed.
    fn of(mount: f64, raw: Option<f64>, seen: &Observed) -> Sample {
        Sample { mount, raw, fetched_per_read: Some(seen.fetched_per_read), peak_rss_mib: Some(seen.peak_rss_mib) }
    }

    /// A secondary row of the same workload (a latency, one side of a mixed workload).
    fn detail(mount: f64, raw: Option<f64>) -> Sample {
        Sample { mount, raw, fetched_per_read: None, peak_rss_mib: None }
    }
}

struct Row {
    name: String,
    unit: Unit,
    budgets: Option<Budgets>,
    samples: Vec<Sample>,
}

/// The read half's rows, in the order the workloads first record them.
#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn record(&mut self, name: &str, unit: Unit, budgets: Option<Budgets>, sample: Sample) {
        let raw = sample.raw.map(|r| format!("  raw {}  ratio {:.2}x", unit.show(r), sample.mount / r));
        let fetched = sample.fetched_per_read.map(|f| format!("  fetched/read {f:.2}")).unwrap_or_default();
        let rss = sample.peak_rss_mib.map(|r| format!("  peak RSS {r:.0} MiB")).unwrap_or_default();
        println!("  {name}: {}{}{fetched}{rss}", unit.show(sample.mount), raw.unwrap_or_default());
        match self.rows.iter_mut().find(|r| r.name == name) {
            Some(row) => row.samples.push(sample),
            None => self.rows.push(Row { name: name.to_owned(), unit, budgets, samples: vec![sample] }),
        }
    }

    fn print(&self, runs: usize, endpoint: &str) {
        println!("\nread medians over {runs} run(s), s3s-fs on {endpoint}; ratio = mount / raw, taken within each run");
        let rss_header = "peak RSS of the daemon (budgets cache+write)";
        println!("{}", table_line("workload", "mount", "raw", "ratio", "fetched/read", rss_header));
        for row in &self.rows {
            let pick = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = row.samples.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| median(v))
            };
            let dash = || "-".to_owned();
            let mount = row.unit.show(pick(&|s| Some(s.mount)).expect("a sample"));
            let raw = pick(&|s| s.raw).map(|r| row.unit.show(r)).unwrap_or_else(dash);
            let ratio = pick(&|s| Some(s.mount / s.raw?)).map(|r| format!("{r:.2}x")).unwrap_or_else(dash);
            let fetched = pick(&|s| s.fetched_per_read).map(|f| format!("{f:.2}")).unwrap_or_else(dash);
            let rss = match (pick(&|s| s.peak_rss_mib), row.budgets) {
                (Some(rss), Some(b)) => format!("{rss:.0} MiB (budgets {b})"),
                _ => String::new(),
            };
            println!("{}", table_line(&row.name, &mount, &raw, &ratio, &fetched, &rss));
        }
    }
}

/// One line of the final table: workload | mount | raw | ratio | fetched/read | peak RSS.
fn table_line(name: &str, mount: &str, raw: &str, ratio: &str, fetched: &str, rss: &str) -> String {
    let line = format!("{name:<42} {mount:>13} {raw:>13} {ratio:>7} {fetched:>13}  {rss}");
    line.trim_end().to_owned()
}

/// Sequential cold read of the big object on a fresh mount with the default budgets.
fn sequential_cold(server: &S3Server, bucket: &str, raw: f64, table: &mut Table) {
    let probe = Probe::new(server, bucket, None);
    let mut seen = None;
    let faults_before = minor_faults(probe.pid);
    let pids = [server.pid(), Some(probe.pid), Some(std::process::id())];
    let cpu = cpu_per_gib(&pids.iter().flatten().copied().collect::<Vec<_>>(), BIG_BYTES, || {
        seen = Some(probe.observe(|| read_file(&probe.join("big"))));
    });
    let seen = seen.expect("observed");
    if let [server, mount, reader] = cpu[..] {
        println!(
            "  sequential read: CPU seconds per GiB: S3 server {server:.2}, mount process {mount:.2}, reader {reader:.2}; \
             page faults in the mount process: {}",
            minor_faults(probe.pid) - faults_before
        );
    }
    table.record(
        "sequential cold read, 1 GiB",
        Unit::MibPerSec,
        Some(probe.budgets),
        Sample::of(mibps(BIG_BYTES, seen.secs), Some(raw), &seen),
    );
    probe.unmount();
}

/// Re-read of the big object from a memory cache big enough to hold it (filled by a first,
/// untimed read), with the page cache dropped in between.
fn warm_reread(server: &S3Server, bucket: &str, raw: f64, table: &mut Table) {
    let probe = Probe::new(server, bucket, Some(WARM_CACHE_MIB));
    assert_eq!(read_file(&probe.join("big")), BIG_BYTES);
    drop_page_cache();
    let seen = probe.observe(|| read_file(&probe.join("big")));
    table.record(
        "warm re-read (block cache)",
        Unit::MibPerSec,
        Some(probe.budgets),
        Sample::of(mibps(BIG_BYTES, seen.secs), Some(raw), &seen),
    );
    probe.unmount();
}

/// A random `pread` workload over the big object.
struct RandomReads {
    name: &'static str,
    count: usize,
    len: u64,
    /// Offsets are multiples of this.
    align: u64,
    /// MiB/s or ops/s.
    unit: Unit,
}

impl RandomReads {
    fn offsets(&self, seed: u64) -> Vec<u64> {
        let mut rng = XorShift::new(seed);
        let slots = (BIG_BYTES - self.len) / self.align + 1;
        (0..self.count).map(|_| rng.next() % slots * self.align).collect()
    }

    fn rate(&self, secs: f64) -> f64 {
        match self.unit {
            Unit::MibPerSec => mibps(self.count as u64 * self.len, secs),
            _ => self.count as f64 / secs,
        }
    }
}

/// `spec`'s preads on a fresh mount against the same ranges fetched one ranged GET at a time.
fn random_reads(server: &S3Server, bucket: &str, spec: &RandomReads, seed: u64, table: &mut Table) {
    let offsets = spec.offsets(seed);
    let (raw_secs, raw_latencies) = raw_ranges(server, bucket, "big", &offsets, spec.len);

    let probe = Probe::new(server, bucket, None);
    let file = File::open(probe.join("big")).expect("open through mount");
    let mut buf = vec![0u8; spec.len as usize];
    let mut latencies = Vec::with_capacity(spec.count);
    let seen = probe.observe(|| {
        for &off in &offsets {
            let t = Instant::now();
            file.read_exact_at(&mut buf, off).expect("random read through mount");
            latencies.push(millis(t.elapsed()));
        }
        spec.count as u64 * spec.len
    });
    drop(file);
    let (rate, raw_rate) = (spec.rate(seen.secs), spec.rate(raw_secs));
    table.record(spec.name, spec.unit, Some(probe.budgets), Sample::of(rate, Some(raw_rate), &seen));
    let p50 = Sample::detail(median(latencies), Some(median(raw_latencies)));
    table.record(&format!("  {}: p50 latency", spec.name), Unit::Millis, None, p50);
    probe.unmount();
}

/// One thread per reader object, each reading its own object in 1 MiB `read`s, against plain
/// concurrent whole-object GETs.
fn concurrent_readers(server: &S3Server, bucket: &str, table: &mut Table) {
    let keys: Vec<String> = (0..READERS).map(|i| format!("reader-{i}")).collect();
    let raw = raw_concurrent_gets(server, bucket, &keys);

    let probe = Probe::new(server, bucket, None);
    let paths: Vec<PathBuf> = keys.iter().map(|k| probe.join(k)).collect();
    let seen = probe.observe(|| {
        std::thread::scope(|s| {
            let readers: Vec<_> = paths.iter().map(|p| s.spawn(move || read_file(p))).collect();
            readers.into_iter().map(|r| r.join().expect("reader thread")).sum()
        })
    });
    let total = READERS as u64 * READER_OBJECT_BYTES;
    let sample = Sample::of(mibps(total, seen.secs), Some(raw), &seen);
    table.record("4 readers of 4 x 256 MiB objects (total)", Unit::MibPerSec, Some(probe.budgets), sample);
    probe.unmount();
}

fn small_keys() -> Vec<String> {
    (0..SMALL_FILES).map(|i| format!("{SMALL_PREFIX}f{i:04}")).collect()
}

/// One listing of the small-file directory, then open + read whole + close of each file in
/// one thread, against plain GETs of the same objects one at a time.
fn small_files(server: &S3Server, bucket: &str, table: &mut Table) {
    let raw = SMALL_FILES as f64 / raw_sequential_gets(server, bucket, &small_keys());

    let probe = Probe::new(server, bucket, None);
    let dir = probe.join(SMALL_PREFIX.trim_end_matches('/'));
    let seen = probe.observe(|| {
        let mut names: Vec<_> =
            std::fs::read_dir(&dir).expect("list through mount").map(|e| e.expect("dir entry").file_name()).collect();
        assert_eq!(names.len(), SMALL_FILES);
        names.sort();
        names.iter().map(|n| std::fs::read(dir.join(n)).expect("read small file through mount").len() as u64).sum()
    });
    let sample = Sample::of(SMALL_FILES as f64 / seen.secs, Some(raw), &seen);
    table.record("small files: list, then read 1,000 x 4 KiB", Unit::FilesPerSec, Some(probe.budgets), sample);
    probe.unmount();
}

/// One thread reads the big object sequentially while another writes a new 1 GiB file, on a
/// mount with the default budgets; there is no raw counterpart.
fn read_while_writing(server: &S3Server, bucket: &str, run: usize, table: &mut Table) {
    settle();
    let probe = Probe::new(server, bucket, None);
    let key = format!("mixed-{run}");
    let (mut read_secs, mut write_secs) = (0.0, 0.0);
    let seen = probe.observe(|| {
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let start = Instant::now();
                write_file(&probe.join(&key), BIG_BYTES, 1000 + run as u64);
                start.elapsed().as_secs_f64()
            });
            let start = Instant::now();
            let read = read_file(&probe.join("big"));
            read_secs = start.elapsed().as_secs_f64();
            write_secs = writer.join().expect("writer thread");
            read
        })
    });
    let name = "read 1 GiB while writing 1 GiB (elapsed)";
    table.record(name, Unit::Seconds, Some(probe.budgets), Sample::of(seen.secs, None, &seen));
    table.record("  read side", Unit::MibPerSec, None, Sample::detail(mibps(BIG_BYTES, read_secs), None));
    table.record("  write side", Unit::MibPerSec, None, Sample::detail(mibps(BIG_BYTES, write_secs), None));
    probe.unmount();
    server.delete(bucket, &key);
}

fn read_run(server: &S3Server, bucket: &str, run: usize, only_sequential: bool, table: &mut Table) {
    println!("run {}:", run + 1);
    let seed = 99 + run as u64;
    let mut raw = 0.0;
    let pids = [server.pid(), Some(std::process::id())];
    let cpu = cpu_per_gib(&pids.iter().flatten().copied().collect::<Vec<_>>(), BIG_BYTES, || {
        raw = raw_get(server, bucket, "big", BIG_BYTES);
    });
    if let [server, client] = cpu[..] {
        println!("  raw GETs: {raw:.0} MiB/s; CPU seconds per GiB: S3 server {server:.2}, client {client:.2}");
    }
    sequential_cold(server, bucket, raw, table);
    if only_sequential {
        return;
    }
    warm_reread(server, bucket, raw, table);
    random_reads(server, bucket, &RANDOM_LARGE, seed, table);
    random_reads(server, bucket, &RANDOM_SMALL, seed, table);
    concurrent_readers(server, bucket, table);
    small_files(server, bucket, table);
    read_while_writing(server, bucket, run, table);
}

fn bench_reads(server: &S3Server, runs: usize, only_sequential: bool) {
    let bucket = server.unique_bucket("bench");
    if only_sequential {
        println!("uploading {} MiB of test data to {} ...", BIG_BYTES / MIB, server.endpoint());
    } else {
        println!(
            "uploading {} MiB of test data and {SMALL_FILES} small objects to {} ...",
            (BIG_BYTES + READERS as u64 * READER_OBJECT_BYTES) / MIB,
            server.endpoint()
        );
    }
    server.put(&bucket, "big", &random_bytes(BIG_BYTES, 1));
    for i in 0..READERS {
        if only_sequential {
            break;
        }
        server.put(&bucket, &format!("reader-{i}"), &random_bytes(READER_OBJECT_BYTES, 10 + i as u64));
    }
    if !only_sequential {
        let small = small_keys().into_iter().enumerate();
        server.put_many(
            &bucket,
            small.map(|(i, k)| (k, random_bytes(SMALL_FILE_BYTES as u64, 500 + i as u64))).collect(),
            16,
        );
    }

    let mut table = Table::default();
    for run in 0..runs {
        read_run(server, &bucket, run, only_sequential, &mut table);
    }
    table.print(runs, server.endpoint());
}

/// Parallel parts of the raw multipart-upload baseline: the mount's default budget
/// (64 MiB of 8 MiB parts).
const RAW_UPLOAD_PARALLEL: usize = 8;
const PART_BYTES: u64 = 8 * MIB;

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
    if std::env::var("S3CSI_BENCH_CPUS").is_ok_and(|v| v == "split") {
        split_cpus(&server);
    }
    if which != "write" {
        bench_reads(&server, runs, which == "sequential");
    }
    if which != "read" && which != "sequential" {
        bench_writes(&server, runs);
    }
}
