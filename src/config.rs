//! Typed configuration for `s3csi mount`.
//!
//! `main.rs` owns the clap definitions; everything else sees only the validated types here.
//! Every value is parsed once into a newtype, so a bad bucket name, prefix, size or mode is
//! rejected before anything touches S3 or the kernel. The newtypes carry each option's limits
//! (such as [`PartSize`]), and the CSI driver checks StorageClass parameters and mount options
//! with them, so a value CreateVolume accepts is one `s3csi mount` accepts.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A configuration value that failed validation. The message names the value and the rule.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// An S3 bucket name (the general-purpose rules: 3-63 chars, lowercase letters, digits, `.`, `-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketName(String);

impl BucketName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BucketName {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| Err(ConfigError(format!("invalid bucket name {s:?}: {why}")));
        if s.len() < 3 || s.len() > 63 {
            return bad("must be 3 to 63 characters long");
        }
        if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_') {
            return bad("only lowercase letters, digits, '.', '-' and '_' are allowed");
        }
        let first = s.as_bytes()[0];
        let last = s.as_bytes()[s.len() - 1];
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return bad("must start and end with a letter or digit");
        }
        if s.contains("..") {
            return bad("must not contain '..'");
        }
        Ok(BucketName(s.to_owned()))
    }
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key prefix that a mount is confined to. Empty, or non-empty and ending in `/`.
///
/// `--prefix data` and `--prefix data/` both mean the directory `data/`; a leading `/` is
/// rejected because S3 keys rarely start with one and it is almost always a mistake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for Prefix {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Prefix::default());
        }
        if s.starts_with('/') {
            return Err(ConfigError(format!("invalid prefix {s:?}: must not start with '/'")));
        }
        let trimmed = s.trim_end_matches('/');
        if trimmed.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
            return Err(ConfigError(format!("invalid prefix {s:?}: segments must not be empty, '.' or '..'")));
        }
        if s.len() > 512 {
            return Err(ConfigError(format!("invalid prefix {s:?}: longer than 512 bytes")));
        }
        Ok(Prefix(format!("{trimmed}/")))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes, written as plain bytes or with a binary/decimal suffix (`512MiB`, `10GiB`, `64k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || ConfigError(format!("invalid size {s:?}: expected e.g. 1048576, 512MiB, 10GiB"));
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" | "ki" => 1 << 10,
            "m" | "mib" | "mi" => 1 << 20,
            "g" | "gib" | "gi" => 1 << 30,
            "t" | "tib" | "ti" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

/// A multipart part size (`--part-size`, `partSize`): a [`ByteSize`] within S3's limits on every
/// part but the last, 5 MiB to 5 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartSize(pub u64);

impl PartSize {
    pub const MIN: u64 = crate::fs::write::MIN_PART_SIZE;
    pub const MAX: u64 = 5 << 30;
}

impl FromStr for PartSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ByteSize(n) = s.parse()?;
        if (Self::MIN..=Self::MAX).contains(&n) {
            Ok(PartSize(n))
        } else {
            Err(ConfigError(format!("invalid part size {s:?}: expected 5MiB to 5GiB (S3's multipart limits)")))
        }
    }
}

/// The memory for reading (`--memory-cache-size`, `memoryCacheSize`): a [`ByteSize`] of at least
/// one 1 MiB cache block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemoryCacheSize(pub u64);

impl MemoryCacheSize {
    pub const MIN: u64 = 1 << 20;
}

impl FromStr for MemoryCacheSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ByteSize(n) = s.parse()?;
        if n >= Self::MIN {
            Ok(MemoryCacheSize(n))
        } else {
            Err(ConfigError(format!("invalid memory cache size {s:?}: expected at least 1MiB (one cache block)")))
        }
    }
}

/// How long metadata is cached (`--metadata-ttl`, `metadataTtl`): seconds, fractions allowed,
/// from 0 to below 10^9 (so it always fits a `Duration`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetadataTtl(pub Duration);

impl MetadataTtl {
    pub const MAX_SECS: f64 = 1e9;
}

impl FromStr for MetadataTtl {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<f64>() {
            Ok(secs) if secs.is_finite() && (0.0..Self::MAX_SECS).contains(&secs) => {
                Ok(MetadataTtl(Duration::from_secs_f64(secs)))
            }
            _ => Err(ConfigError(format!(
                "invalid metadata TTL {s:?}: expected seconds from 0 to below 1000000000, such as 1 or 0.5"
            ))),
        }
    }
}

/// The S3 stall limit (`--s3-timeout`, `s3Timeout`, see [`Timeouts`]): whole seconds from 3 to
/// 86400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallLimit(pub Duration);

impl StallLimit {
    pub const SECS: std::ops::RangeInclusive<u64> = 3..=86_400;
}

impl FromStr for StallLimit {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<u64>() {
            Ok(secs) if Self::SECS.contains(&secs) => Ok(StallLimit(Duration::from_secs(secs))),
            _ => Err(ConfigError(format!("invalid S3 timeout {s:?}: expected whole seconds from 3 to 86400"))),
        }
    }
}

/// Threads serving one mount's FUSE requests and S3 transfers (`--worker-threads`,
/// `workerThreads`): 1 to 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerThreads(pub usize);

impl WorkerThreads {
    pub const RANGE: std::ops::RangeInclusive<usize> = 1..=64;

    /// Half the CPUs this process may use (its affinity and cgroup quota), from 1 to 8. The
    /// programs reading through the mount, and often the S3 server, run on the same node: on two
    /// cores a second worker took CPU from a local S3 server and cost 7% of sequential read
    /// throughput, and gained nothing on writes. Eight keep a node with many volumes from
    /// running dozens of threads per mount.
    pub fn for_this_machine() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        WorkerThreads((cpus / 2).clamp(1, 8))
    }
}

impl FromStr for WorkerThreads {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<usize>() {
            Ok(n) if Self::RANGE.contains(&n) => Ok(WorkerThreads(n)),
            _ => Err(ConfigError(format!("invalid worker thread count {s:?}: expected a number from 1 to 64"))),
        }
    }
}

/// Permission bits for files or directories, parsed from octal (`644`, `0755`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u16);

impl FromStr for Mode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u16::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o7777 => Ok(Mode(m)),
            _ => Err(ConfigError(format!("invalid mode {s:?}: expected octal permission bits such as 0644"))),
        }
    }
}

/// Where and how to reach S3. Credentials normally come from the AWS chain; the CSI controller
/// sets `credentials` from a volume's Secret.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub ca_bundle: Option<PathBuf>,
    pub credentials: Option<StaticCredentials>,
    pub timeouts: Timeouts,
}

/// Default for `--s3-timeout`.
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(60);

/// How long S3 may keep us waiting. One number, `--s3-timeout` (the *stall limit*), from which
/// the rest follow:
/// - an S3 request (retries included) that gets no answer for the stall limit fails; a read
///   whose GETs receive no byte for the stall limit fails with `EIO`;
/// - each attempt must start answering within a third of it, and a response body may pause
///   for at most a third of it, so a hung connection is retried twice before the limit;
/// - uploads get extra time for their body at [`Timeouts::MIN_UPLOAD_RATE`], so a slow but
///   working link is never cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { stall: DEFAULT_S3_TIMEOUT }
    }
}

impl Timeouts {
    /// Slowest upload rate assumed for a request body: 1 MiB/s.
    pub const MIN_UPLOAD_RATE: u64 = 1 << 20;

    /// Longest wait for one attempt's response to begin (or one body chunk to arrive).
    pub fn attempt(&self) -> Duration {
        self.stall / 3
    }

    /// Time a request body of `bytes` may take at the slowest assumed rate.
    pub fn for_body(bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / Self::MIN_UPLOAD_RATE as f64)
    }
}

/// An access key pair (and optional session token) given explicitly. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Ownership and permission bits reported for every inode.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// The group was set explicitly (`--gid`, a pod's fsGroup): new entries take `gid` rather
    /// than the creating process's group.
    pub group_forced: bool,
}

/// Block cache sizing.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The memory tier: `--memory-cache-size` less the buffers of reads in flight
    /// (`fs::prefetch::ReadBudget`).
    pub memory_bytes: u64,
    pub disk_dir: Option<PathBuf>,
    pub disk_bytes: u64,
}

/// Filesystem behaviour.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub prefix: Prefix,
    pub read_only: bool,
    pub ownership: Ownership,
    pub metadata_ttl: Duration,
    /// A read whose GETs receive nothing for this long fails with `EIO` (`--s3-timeout`).
    pub stall_limit: Duration,
    /// GETs in flight at most (see `fs::prefetch::ReadBudget`).
    pub max_gets: usize,
    pub write: crate::fs::write::WriteConfig,
}

/// Everything `s3csi mount` needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub bucket: BucketName,
    pub mountpoint: PathBuf,
    pub s3: S3Config,
    pub fs: FsConfig,
    pub cache: CacheConfig,
    pub allow_other: bool,
    pub foreground: bool,
    /// Where a background mount writes its log once detached (otherwise discarded).
    pub log_file: Option<PathBuf>,
    /// Where to serve Prometheus metrics (off when `None`).
    pub metrics_address: Option<crate::metrics::MetricsAddress>,
    /// An inherited `/dev/fuse` descriptor to serve (see `docs/recovery.md`).
    pub fuse_fd: Option<i32>,
    /// The connection behind `fuse_fd` is already mounted and initialised.
    pub takeover: bool,
    /// What a successor process needs is kept here.
    pub recovery_dir: Option<PathBuf>,
    /// Threads of the async runtime that serves the mount.
    pub worker_threads: WorkerThreads,
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test]
    fn worker_threads_default_to_half_the_cpus_and_parse_within_range() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(WorkerThreads::for_this_machine().0, (cpus / 2).clamp(1, 8));
        assert_eq!("1".parse::<WorkerThreads>().unwrap(), WorkerThreads(1));
        assert_eq!("64".parse::<WorkerThreads>().unwrap(), WorkerThreads(64));
        for bad in ["0", "65", "", "two", "-1"] {
            let err = bad.parse::<WorkerThreads>().unwrap_err().0;
            assert!(err.contains("from 1 to 64"), "{bad}: {err}");
        }
    }

    #[test_case("512MiB", 512 << 20)]
    #[test_case("10GiB", 10 << 30)]
    #[test_case("4096", 4096)]
    #[test_case("64k", 64 << 10)]
    #[test_case("1GB", 1_000_000_000)]
    #[test_case(" 2 MiB", 2 << 20)]
    fn sizes_parse(input: &str, want: u64) {
        assert_eq!(input.parse::<ByteSize>().unwrap(), ByteSize(want));
    }

    #[test_case("")]
    #[test_case("MiB")]
    #[test_case("12 parsecs")]
    #[test_case("-1")]
    #[test_case("99999999999999999999GiB")]
    fn bad_sizes_fail(input: &str) {
        assert!(input.parse::<ByteSize>().is_err());
    }

    #[test_case("data", "data/")]
    #[test_case("data/", "data/")]
    #[test_case("a/b/c", "a/b/c/")]
    #[test_case("", "")]
    fn prefixes_normalise(input: &str, want: &str) {
        assert_eq!(input.parse::<Prefix>().unwrap().as_str(), want);
    }

    #[test_case("/data")]
    #[test_case("a//b")]
    #[test_case("a/../b")]
    #[test_case("./a")]
    fn bad_prefixes_fail(input: &str) {
        assert!(input.parse::<Prefix>().is_err());
    }

    #[test_case("my-bucket", true)]
    #[test_case("ab", false)]
    #[test_case("My-Bucket", false)]
    #[test_case("-bucket", false)]
    #[test_case("a..b", false)]
    #[test_case("bucket.with.dots", true)]
    fn bucket_names(input: &str, ok: bool) {
        assert_eq!(input.parse::<BucketName>().is_ok(), ok);
    }

    #[test_case("644", 0o644)]
    #[test_case("0755", 0o755)]
    #[test_case("0o600", 0o600)]
    fn modes_parse(input: &str, want: u16) {
        assert_eq!(input.parse::<Mode>().unwrap(), Mode(want));
    }

    #[test_case("5MiB", true)]
    #[test_case("5242879", false)]
    #[test_case("1MiB", false)]
    #[test_case("5GiB", true)]
    #[test_case("5368709121", false)]
    #[test_case("8 MiB", true)]
    #[test_case("big", false)]
    fn part_sizes(input: &str, ok: bool) {
        assert_eq!(input.parse::<PartSize>().is_ok(), ok, "{input}");
    }

    #[test_case("1MiB", true)]
    #[test_case("1048575", false)]
    #[test_case("0", false)]
    #[test_case("lots", false)]
    fn memory_cache_sizes(input: &str, ok: bool) {
        assert_eq!(input.parse::<MemoryCacheSize>().is_ok(), ok, "{input}");
    }

    #[test_case("0", true)]
    #[test_case("0.5", true)]
    #[test_case("999999999", true)]
    #[test_case("1e9", false)]
    #[test_case("-1", false)]
    #[test_case("inf", false)]
    #[test_case("NaN", false)]
    #[test_case("one", false)]
    fn metadata_ttls(input: &str, ok: bool) {
        assert_eq!(input.parse::<MetadataTtl>().is_ok(), ok, "{input}");
    }

    #[test_case("3", true)]
    #[test_case("86400", true)]
    #[test_case("2", false)]
    #[test_case("86401", false)]
    #[test_case("1.5", false)]
    #[test_case("-3", false)]
    fn stall_limits(input: &str, ok: bool) {
        assert_eq!(input.parse::<StallLimit>().is_ok(), ok, "{input}");
    }

    #[test]
    fn limit_errors_name_the_value_and_the_range() {
        let e = "1MiB".parse::<PartSize>().unwrap_err().0;
        assert!(e.contains("\"1MiB\"") && e.contains("5MiB to 5GiB"), "{e}");
        let e = "512KiB".parse::<MemoryCacheSize>().unwrap_err().0;
        assert!(e.contains("\"512KiB\"") && e.contains("at least 1MiB"), "{e}");
        let e = "abc".parse::<PartSize>().unwrap_err().0;
        assert!(e.contains("\"abc\"") && e.contains("512MiB"), "a syntax error says what a size looks like: {e}");
    }

    #[test]
    fn bad_modes_fail() {
        assert!("999".parse::<Mode>().is_err());
        assert!("rw-r--r--".parse::<Mode>().is_err());
        assert!("77777".parse::<Mode>().is_err());
    }
}
