//! The `s3csi` command line: parse, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc rather than glibc malloc: the mount allocates and frees 1 MiB blocks and multi-MiB
/// parts from several threads, which glibc's per-thread arenas keep resident long after they
/// are freed (about 80 MiB over the budgets when reading and writing at once).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options. One arena for every thread: with one arena per worker, memory
/// freed by one worker stayed resident in its arena while another worker allocated afresh, and
/// 16 writers on 8 workers peaked about 40 MiB over the budgets (one arena: within them).
/// jemalloc reads this C string (`const char *`) once, at its first allocation.
// SAFETY: the symbol is the `malloc_conf` jemalloc looks up (with this build's `_rjem_`
// prefix); it is defined nowhere else, and the value is a static NUL-terminated string.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 10] = b"narenas:1\0";

use clap::{Args, Parser, Subcommand};
use s3csi::config::{
    BucketName, ByteSize, CacheConfig, FsConfig, MemoryCacheSize, MetadataTtl, Mode, MountConfig, Ownership, PartSize,
    Prefix, S3Config, StallLimit, Timeouts, WorkerThreads,
};
use s3csi::csi::{CsiConfig, ServiceMode};
use s3csi::daemon;
use s3csi::fs::prefetch::ReadBudget;
use s3csi::fs::write::WriteConfig;
use s3csi::metrics::MetricsAddress;
use tracing_subscriber::EnvFilter;

/// Default memory tier of the block cache.
const DEFAULT_MEMORY_CACHE: &str = "256MiB";
/// Default bound of the disk tier when `--cache-dir` is given without `--max-cache-size`.
const DEFAULT_DISK_CACHE: &str = "1GiB";

/// `--s3-timeout`'s default, as clap takes it.
const DEFAULT_S3_TIMEOUT_SECS: &str = "60";

#[derive(Parser, Debug)]
#[command(name = "s3csi", version, about = "Mount S3 buckets with FUSE; Kubernetes CSI driver for S3")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: human-readable text, or one JSON object per line (for clusters).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount a bucket (or a prefix of it) at a directory.
    Mount(MountArgs),
    /// Serve the CSI Identity, Controller and Node services on a Unix socket.
    Csi(CsiArgs),
    /// Hold every staged volume's FUSE connection and run its mount process, restarting it on
    /// the same connection when it dies (the node service talks to it over a Unix socket).
    Keeper(KeeperArgs),
}

#[derive(Args, Debug)]
struct KeeperArgs {
    /// The node's state directory (as given to `s3csi csi --state-dir`).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Socket to serve on (default: <state-dir>/keeper.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// This keeper's identity across restarts of its process, e.g. the pod UID: a keeper that
    /// handed its volumes over to a newer one stays idle when restarted.
    #[arg(long, value_name = "ID", env = "POD_UID")]
    keeper_id: Option<String>,
    /// Create this file once the keeper serves its socket, i.e. after it took every volume
    /// over from an older keeper (for a readiness probe).
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct CsiArgs {
    /// Socket to serve on.
    #[arg(long, value_name = "URL", default_value = "unix:///csi/csi.sock")]
    csi_endpoint: String,
    /// This node's id, as reported by NodeGetInfo (the Kubernetes node name).
    #[arg(long, value_name = "ID")]
    node_id: String,
    /// Which services to serve: controller and node in one process, or one of them.
    #[arg(long, value_enum, default_value = "all")]
    mode: ServiceMode,
    /// CSI driver name (must match the CSIDriver object and StorageClass provisioner).
    #[arg(long, value_name = "NAME", default_value = s3csi::csi::volume::DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Default S3 endpoint (default: AWS_ENDPOINT_URL or AWS S3); a volume's Secret may override it.
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Default region (default: AWS_REGION, the profile, or us-east-1).
    #[arg(long, value_name = "R")]
    region: Option<String>,
    /// Use path-style addressing; most S3-compatible servers need it.
    #[arg(long)]
    force_path_style: bool,
    /// Where the node records staged volumes (keep it on the host so it survives restarts).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/s3csi")]
    state_dir: PathBuf,
    /// Serve Prometheus metrics on host:port (GET /metrics), including every mount on this node.
    #[arg(long, value_name = "ADDR")]
    metrics_address: Option<std::net::SocketAddr>,
    /// The keeper's socket, which runs the mount processes (default: <state-dir>/keeper.sock).
    #[arg(long, value_name = "PATH")]
    keeper_socket: Option<PathBuf>,
    /// Start `s3csi keeper` when none answers on the keeper socket. Off in Kubernetes, where the
    /// keeper runs in its own container.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    spawn_keeper: bool,
}

#[derive(Args, Debug)]
struct MountArgs {
    /// Bucket to mount.
    bucket: BucketName,
    /// Existing empty directory to mount at.
    mountpoint: PathBuf,
    /// Mount only the keys under this prefix (a trailing `/` is implied).
    #[arg(long, value_name = "P")]
    prefix: Option<Prefix>,
    /// S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS_ENDPOINT_URL or AWS S3).
    #[arg(long, value_name = "URL")]
    endpoint_url: Option<String>,
    /// Region (default: AWS_REGION, the profile, or us-east-1).
    #[arg(long, value_name = "R")]
    region: Option<String>,
    /// Use path-style addressing (http://host/bucket/key); most S3-compatible servers need it.
    #[arg(long)]
    force_path_style: bool,
    /// PEM file with extra CA certificates to trust for the endpoint.
    #[arg(long, value_name = "PEM")]
    ca_bundle: Option<PathBuf>,
    /// Refuse every change with EROFS.
    #[arg(long)]
    read_only: bool,
    /// Let users other than the mounting user access the mount.
    #[arg(long)]
    allow_other: bool,
    /// Owner of objects that carry no owner of their own (default: the mounting user). Entries
    /// created through the mount belong to the process that creates them.
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// Group of objects that carry no group of their own (default: the mounting user's group).
    /// When given, entries created through the mount take this group too (as with fsGroup).
    #[arg(long, value_name = "N")]
    gid: Option<u32>,
    /// Permission bits of objects that carry no mode of their own, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0644")]
    file_mode: Mode,
    /// Permission bits of directories that carry no mode of their own, in octal (`2775` makes
    /// new entries inherit the directory's group).
    #[arg(long, value_name = "OCTAL", default_value = "0755")]
    dir_mode: Mode,
    /// Directory for the on-disk block cache (off when not given). Must not be shared by mounts.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Upper bound of the on-disk cache, e.g. 10GiB.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_DISK_CACHE)]
    max_cache_size: ByteSize,
    /// Upper bound of the in-memory block cache, e.g. 512MiB.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEMORY_CACHE)]
    memory_cache_size: MemoryCacheSize,
    /// How long file and directory metadata is cached; opening a file always checks S3.
    #[arg(long, value_name = "SECONDS", default_value = "1")]
    metadata_ttl: MetadataTtl,
    /// Multipart part size for uploads (at least 5MiB); grows automatically for huge files.
    #[arg(long, value_name = "SIZE", default_value = "8MiB")]
    part_size: PartSize,
    /// Memory for part uploads in flight, across all files being written.
    #[arg(long, value_name = "SIZE", default_value = "64MiB")]
    write_buffer_size: ByteSize,
    /// Bound of the local staging area for files modified in place (random writes, appends,
    /// truncates). Lives under --cache-dir, or a temporary directory without one.
    #[arg(long, value_name = "SIZE", default_value = "4GiB")]
    max_staging_size: ByteSize,
    /// Stall limit for S3, in seconds: a read whose GETs receive nothing for this long, and any
    /// S3 request unanswered this long (retries included), fails with EIO. Each attempt may
    /// wait a third of it; uploads get extra time for their body.
    #[arg(long, value_name = "SECONDS", default_value = DEFAULT_S3_TIMEOUT_SECS)]
    s3_timeout: StallLimit,
    /// Stay in the foreground (logs go to stderr; SIGTERM/SIGINT unmount).
    #[arg(long)]
    foreground: bool,
    /// Where a background mount writes its log after detaching (default: discarded).
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Serve Prometheus metrics: host:port for HTTP GET /metrics, or unix:/path (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_address: Option<MetricsAddress>,
    /// Serve the FUSE connection of this inherited `/dev/fuse` descriptor (how the keeper starts
    /// mounts). Without --takeover the process mounts it at MOUNTPOINT itself.
    #[arg(long, value_name = "FD")]
    fuse_fd: Option<i32>,
    /// The connection behind --fuse-fd is mounted and was served by an earlier process: restore
    /// what that process left in --recovery-dir and serve it (no new mount).
    #[arg(long, requires_all = ["fuse_fd", "recovery_dir"])]
    takeover: bool,
    /// Where the process keeps what a successor needs to take the mount over after a crash or
    /// at a hand-over (SIGUSR2). Private to one mount.
    #[arg(long, value_name = "DIR", requires = "fuse_fd")]
    recovery_dir: Option<PathBuf>,
    /// Threads serving FUSE requests and S3 transfers, from 1 to 64 (default: half the CPUs this
    /// process may use, from 1 to 8).
    #[arg(long, value_name = "N")]
    worker_threads: Option<WorkerThreads>,
}

impl MountArgs {
    fn into_config(self) -> anyhow::Result<MountConfig> {
        // Value ranges are checked while parsing, by the same types the CSI driver checks
        // StorageClass parameters with.
        let staging_dir = match (&self.cache_dir, &self.recovery_dir) {
            (Some(dir), _) => dir.join("s3csi-staging"),
            // Cleared by the next process serving the mount, should this one crash.
            (None, Some(dir)) => dir.join("staging"),
            // An unpredictable name, so no other local user can plant a path there first.
            (None, None) => {
                std::env::temp_dir().join(format!("s3csi-staging-{}-{:016x}", std::process::id(), random_u64()))
            }
        };
        // --memory-cache-size covers reads in flight too; the block cache gets the rest.
        let read_budget = ReadBudget::split(self.memory_cache_size.0);
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ok(MountConfig {
            bucket: self.bucket,
            mountpoint: self.mountpoint,
            s3: S3Config {
                endpoint_url: self.endpoint_url,
                region: self.region,
                force_path_style: self.force_path_style,
                ca_bundle: self.ca_bundle,
                credentials: None,
                timeouts: Timeouts { stall: self.s3_timeout.0 },
            },
            fs: FsConfig {
                prefix: self.prefix.unwrap_or_default(),
                read_only: self.read_only,
                ownership: Ownership {
                    uid: self.uid.unwrap_or(uid),
                    gid: self.gid.unwrap_or(gid),
                    file_mode: self.file_mode.0,
                    dir_mode: self.dir_mode.0,
                    group_forced: self.gid.is_some(),
                },
                metadata_ttl: self.metadata_ttl.0,
                stall_limit: self.s3_timeout.0,
                max_gets: read_budget.max_gets,
                write: WriteConfig {
                    part_size: self.part_size.0,
                    buffer_bytes: self.write_buffer_size.0.max(self.part_size.0),
                    staging_dir,
                    staging_bytes: self.max_staging_size.0,
                },
            },
            cache: CacheConfig {
                memory_bytes: read_budget.cache_bytes,
                disk_dir: self.cache_dir,
                disk_bytes: self.max_cache_size.0,
            },
            allow_other: self.allow_other,
            foreground: self.foreground,
            log_file: self.log_file,
            metrics_address: self.metrics_address,
            fuse_fd: self.fuse_fd,
            takeover: self.takeover,
            recovery_dir: self.recovery_dir,
            worker_threads: self.worker_threads.unwrap_or_else(WorkerThreads::for_this_machine),
        })
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,s3csi=info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Mount(args) => run_mount(args),
        Command::Csi(args) => run_csi(args),
        Command::Keeper(args) => run_keeper(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{} {e:#}", daemon::ERROR_PREFIX);
            ExitCode::FAILURE
        }
    }
}

fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    if config.foreground {
        let notify = std::env::var_os(daemon::NOTIFY_ENV).is_some();
        return daemon::run_foreground(config, notify);
    }
    // Validate locally before detaching, so typos fail fast with a clear message.
    daemon::check_mountpoint(&config.mountpoint)?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    daemon::spawn_background(args)
}

fn run_csi(args: CsiArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    if args.node_id.trim().is_empty() {
        anyhow::bail!("--node-id must not be empty");
    }
    if !valid_driver_name(&args.driver_name) {
        anyhow::bail!(
            "invalid --driver-name {:?}: use at most 63 lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit (e.g. s3.csi.example.com)",
            args.driver_name
        );
    }
    let config = CsiConfig {
        socket: s3csi::csi::socket_path(&args.csi_endpoint).map_err(anyhow::Error::msg)?,
        node_id: args.node_id,
        mode: args.mode,
        driver_name: args.driver_name,
        s3: S3Config {
            endpoint_url: args.endpoint_url,
            region: args.region,
            force_path_style: args.force_path_style,
            ca_bundle: None,
            credentials: None,
            timeouts: Timeouts::default(),
        },
        keeper_socket: args.keeper_socket.unwrap_or_else(|| args.state_dir.join(s3csi::keeper::SOCKET_NAME)),
        spawn_keeper: args.spawn_keeper,
        state_dir: args.state_dir,
        metrics_address: args.metrics_address,
        mount_exe: std::env::current_exe().context("cannot find the s3csi executable")?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("s3csi-csi")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(s3csi::csi::serve(config, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; stopping (mounts keep running)"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping (mounts keep running)"),
        }
    }))
}

fn run_keeper(args: KeeperArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("cannot find the s3csi executable")?;
    let mut config = s3csi::keeper::KeeperConfig::new(args.state_dir, exe);
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    config.keeper_id = args.keeper_id.filter(|id| !id.trim().is_empty());
    config.ready_file = args.ready_file;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("s3csi-keeper")
        .build()
        .context("cannot start the async runtime")?;
    let table = std::sync::Arc::new(s3csi::keeper::SystemMountTable);
    rt.block_on(s3csi::keeper::run(config, table, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }))
}

/// CSI driver names: a DNS-style name of at most 63 characters.
fn valid_driver_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A random number from the standard library's randomly seeded hasher (not for cryptography).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_s3_timeout_default_is_the_library_default() {
        let parsed: StallLimit = DEFAULT_S3_TIMEOUT_SECS.parse().unwrap();
        assert_eq!(parsed.0, s3csi::config::DEFAULT_S3_TIMEOUT);
    }
}
