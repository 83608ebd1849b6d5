//! Running one mount: preflight checks, the FUSE session, readiness and clean shutdown.
//!
//! `s3csi mount` without `--foreground` re-executes itself with `--foreground` in a new session
//! and waits: the child prints [`READY_LINE`] on stdout once the kernel mount exists, and the
//! parent exits 0; if the child exits first, the parent prints the child's error line and exits
//! non-zero. All checks (mountpoint, bucket, credentials) run before anything is mounted, so a
//! failure leaves nothing half-mounted behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail};
use fuser::MountOption;

use crate::cache::{BlockCache, DiskTier};
use crate::config::MountConfig;
use crate::fs::S3Fs;
use crate::fs::connection::{self, Connection, Resent, SessionProbe};
use crate::fs::fuse::FuseAdapter;
use crate::fs::recovery::RecoveryDir;
use crate::s3::aws::{AwsStore, build_client};
use crate::s3::{ObjectStore, S3Error};

/// What the detached child prints on stdout when the mount is live.
pub const READY_LINE: &str = "s3csi-mount-ready";
/// Environment variable telling a `--foreground` child that a parent waits for readiness.
pub const NOTIFY_ENV: &str = "S3CSI_NOTIFY_READY";
/// Prefix of the one-line error a failing mount prints on stderr.
pub const ERROR_PREFIX: &str = "s3csi: error:";

/// Checks that `path` is an existing directory that is not already a mount point.
pub fn check_mountpoint(path: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("mountpoint {} does not exist; create it first", path.display())
        }
        std::io::ErrorKind::NotConnected => anyhow::anyhow!(
            "mountpoint {} is a dead FUSE mount (transport endpoint is not connected); run `umount {}` first",
            path.display(),
            path.display()
        ),
        _ => anyhow::anyhow!("cannot access mountpoint {}: {e}", path.display()),
    })?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    let canonical = path.canonicalize().with_context(|| format!("cannot resolve mountpoint {}", path.display()))?;
    if is_mount_point(&canonical)? {
        bail!("mountpoint {} is busy: something is already mounted there; unmount it first", canonical.display());
    }
    Ok(canonical)
}

/// Whether `path` (canonical) appears as a mount point in /proc/self/mountinfo.
pub fn is_mount_point(path: &Path) -> anyhow::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    Ok(info.lines().any(|l| l.split(' ').nth(4).is_some_and(|mp| unescape_mountinfo(mp) == want)))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Turns an S3 error from the access check into the message a user can act on.
pub fn describe_access_error(e: &S3Error, bucket: &str, endpoint: Option<&str>) -> String {
    let at = endpoint.map(|u| format!(" at {u}")).unwrap_or_default();
    match e {
        S3Error::NoSuchBucket(_) => {
            format!("bucket {bucket:?} does not exist{at}; create it or check the name")
        }
        S3Error::AccessDenied(why) => format!(
            "access denied to bucket {bucket:?}{at} ({why}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY \
             (or the profile in use) and the bucket policy"
        ),
        S3Error::Unreachable(why) => {
            format!("cannot reach the S3 endpoint{at}: {why}; check --endpoint-url and the network")
        }
        other => format!("cannot list bucket {bucket:?}{at}: {other}"),
    }
}

/// The parent side of a background mount: spawn the foreground child and wait for readiness.
pub fn spawn_background(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the s3csi executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).arg("--foreground").env(NOTIFY_ENV, "1");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory; it detaches the daemon from the
    // caller's terminal and process group so Ctrl-C in the shell does not kill the mount.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the mount process")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let errors = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = stderr.read_to_string(&mut buf);
        buf
    });
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == READY_LINE {
        return Ok(());
    }
    let status = child.wait().context("cannot wait for the mount process")?;
    let log = errors.join().unwrap_or_default();
    let message = log
        .lines()
        .filter_map(|l| l.strip_prefix(ERROR_PREFIX))
        .next_back()
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| format!("mount process exited with {status} before the mount was ready: {}", log.trim()));
    bail!("{message}")
}

/// Kernel read-ahead wanted for the mount. Above the 1 MiB request size: the kernel treats a
/// read larger than its read-ahead as the start of a scan and reads ahead of it, so with exactly
/// 1 MiB an unaligned 1 MiB `pread` (257 pages) would fetch 2 MiB more than asked.
const KERNEL_READAHEAD_KB: u32 = 2048;

/// Raises the kernel's read-ahead for this mount from its 128 KiB default, which FUSE cannot
/// raise at `INIT` (it only lowers it). With 128 KiB, a 1 MiB `pread` reaches us as eight
/// requests served one after another; now it is one 1 MiB request, and so one GET. Needs
/// write access to `/sys/class/bdi` (root, or a privileged container); without it reads still
/// work, only large random reads are slower, so this is only logged.
fn raise_kernel_readahead(mountpoint: &Path) {
    // The device comes from mountinfo: a syscall on the mountpoint would wait for this very
    // session thread.
    let Some(entry) = crate::mount::mount_entry(mountpoint) else {
        tracing::info!(mountpoint = %mountpoint.display(), "mount not in mountinfo; kernel read-ahead left at its default");
        return;
    };
    let path = format!("/sys/class/bdi/{}/read_ahead_kb", entry.device);
    match std::fs::write(&path, KERNEL_READAHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!(path, kb = KERNEL_READAHEAD_KB, "kernel read-ahead raised"),
        Err(e) => tracing::info!(path, error = %e,
            "cannot raise the kernel read-ahead (needs root and a writable /sys); large random reads will be slower"),
    }
}

/// The mount source shown in mountinfo for a bucket and prefix (`p/` or empty).
pub fn mount_source(bucket: &str, prefix: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() { format!("s3csi:{bucket}") } else { format!("s3csi:{bucket}/{prefix}") }
}

/// How this process reads its FUSE connection.
enum Served {
    /// `fuser` mounted it (a mount made by hand).
    Mounted(fuser::SessionUnmounter),
    /// An inherited descriptor (`--fuse-fd`): we mount and unmount it ourselves, and can hand
    /// it over.
    Descriptor(Connection),
}

/// Why the mount process stops.
enum Stop {
    /// The kernel ended the session (unmounted from outside).
    Ended,
    /// SIGTERM or SIGINT: unmount.
    Unmount,
    /// SIGUSR2: hand the connection over to a successor and leave it mounted.
    HandOver,
}

/// Runs a mount in this process until it is unmounted, receives SIGTERM/SIGINT (unmount), or
/// SIGUSR2 (hand the connection over, with `--fuse-fd` and `--recovery-dir`).
pub fn run_foreground(config: MountConfig, notify_ready: bool) -> anyhow::Result<()> {
    // Checked first (and owned, so a failure below still closes it when the process exits). A
    // fresh mount needs a newly opened /dev/fuse: mounting a descriptor of a live connection
    // would mount that connection a second time, with this process reading its requests.
    let device = match config.fuse_fd {
        Some(fd) => {
            let device = connection::inherited(fd).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => {
                    anyhow::anyhow!("--fuse-fd {fd}: {e}; pass an open descriptor of /dev/fuse")
                }
                _ => anyhow::anyhow!("--fuse-fd {fd} is not an open descriptor: {e}"),
            })?;
            let attached = connection::is_attached(&device).context("cannot poll --fuse-fd")?;
            if attached && !config.takeover {
                bail!(
                    "--fuse-fd {fd} belongs to a connection that is already mounted; a new mount needs a newly \
                     opened /dev/fuse (to serve that connection, start with --takeover and the --recovery-dir of \
                     the process that served it)"
                );
            }
            if !attached && config.takeover {
                bail!("--takeover: --fuse-fd {fd} is a /dev/fuse descriptor of no mounted connection");
            }
            Some(device)
        }
        None => None,
    };
    let mountpoint = if config.takeover {
        let path = config
            .mountpoint
            .canonicalize()
            .with_context(|| format!("cannot resolve mountpoint {}", config.mountpoint.display()))?;
        if !is_mount_point(&path)? {
            bail!("--takeover: nothing is mounted at {}; start without --takeover to mount", path.display());
        }
        path
    } else {
        check_mountpoint(&config.mountpoint)?
    };
    // Locked before anything is written to it: a second process must never serve the same
    // connection (two processes answering one kernel connection corrupt its namespace), and a
    // successor must start from the journals of the process it succeeds.
    let locked_dir = match &config.recovery_dir {
        Some(path) => {
            let opened = if config.takeover {
                RecoveryDir::open_used(path)
            } else {
                RecoveryDir::open(path).map_err(Into::into)
            };
            let locked = opened.and_then(|dir| Ok((dir.lock(RECOVERY_LOCK_WAIT)?, dir)));
            Some(locked.map_err(|e| anyhow::anyhow!("cannot use --recovery-dir {}: {e}", path.display()))?)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads.0)
        .enable_all()
        .thread_name("s3csi-worker")
        .build()
        .context("cannot start the async runtime")?;
    let volume = format!("{}/{}", config.bucket, config.fs.prefix);
    let metrics = crate::metrics::init(Some(volume.trim_end_matches('/').to_owned()));
    match &config.metrics_address {
        Some(addr @ crate::metrics::MetricsAddress::Http(a)) => {
            rt.block_on(crate::metrics::serve(addr, None))
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {a}: {e}; choose another --metrics-address"))?;
        }
        // The socket the CSI node collects from: losing metrics must not fail the mount.
        Some(addr @ crate::metrics::MetricsAddress::Unix(path)) => {
            if let Err(e) = rt.block_on(crate::metrics::serve(addr, None)) {
                tracing::warn!(socket = %path.display(), error = %e, "cannot serve metrics; continuing without");
            }
        }
        None => {}
    }
    let store = rt.block_on(async {
        let client = build_client(&config.s3).await?;
        let store = AwsStore::new(client, config.bucket.as_str(), config.s3.timeouts);
        store.check_access(config.fs.prefix.as_str()).await.map_err(|e| {
            anyhow::anyhow!(describe_access_error(&e, config.bucket.as_str(), config.s3.endpoint_url.as_deref()))
        })?;
        anyhow::Ok(store)
    })?;
    let disk = match &config.cache.disk_dir {
        Some(dir) => Some(
            DiskTier::new(dir, config.cache.disk_bytes)
                .map_err(|e| anyhow::anyhow!("cannot use --cache-dir {}: {e}", dir.display()))?,
        ),
        None => None,
    };
    let cache = Arc::new(BlockCache::new(config.cache.memory_bytes, disk));
    let watched = Arc::clone(&cache);
    metrics.add_refresher(move |m| watched.export(m));
    let mut fs = S3Fs::new(Arc::new(store), cache, config.fs.clone()).map_err(|e| {
        anyhow::anyhow!("cannot prepare the staging directory {}: {e}", config.fs.write.staging_dir.display())
    })?;
    let (recovery, _serving_lock) = match locked_dir {
        Some((lock, dir)) => {
            let found = fs
                .attach_recovery(&dir, config.takeover)
                .map_err(|e| anyhow::anyhow!("cannot read or write --recovery-dir {}: {e}", dir.root().display()))?;
            (Some((dir, found)), Some(lock))
        }
        None => (None, None),
    };
    let fs = Arc::new(fs);
    {
        let _in_runtime = rt.enter();
        fs.start_record_flusher();
    }
    let records_owner = Arc::clone(&fs);
    let probe = Arc::new(SessionProbe::default());
    let mut adapter = FuseAdapter::new(fs, rt.handle().clone()).with_probe(Arc::clone(&probe));
    if !config.takeover {
        let readahead_mountpoint = mountpoint.clone();
        adapter = adapter.after_init(move || raise_kernel_readahead(&readahead_mountpoint));
    }
    let source = mount_source(config.bucket.as_str(), config.fs.prefix.as_str());

    let mut resume = None;
    let (session, served) = match device {
        None => {
            let mut options = vec![
                // `s3csi:<bucket>` or `s3csi:<bucket>/<prefix>`: the CSI node tells its volumes'
                // mounts apart by it, also for volumes sharing a bucket.
                MountOption::FSName(source),
                MountOption::Subtype("s3csi".into()),
                MountOption::DefaultPermissions,
                MountOption::NoDev,
                MountOption::NoSuid,
                MountOption::NoAtime,
            ];
            if config.fs.read_only {
                options.push(MountOption::RO);
            }
            if config.allow_other {
                options.push(MountOption::AllowOther);
            }
            let mut session = fuser::Session::new(adapter, &mountpoint, &options)
                .map_err(|e| anyhow::anyhow!("cannot mount at {}: {e}", mountpoint.display()))?;
            let unmounter = session.unmount_callable();
            (session, Served::Mounted(unmounter))
        }
        Some(device) => {
            let acl = if config.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
            if config.takeover {
                let (conn, fd, rest) = Connection::resume(device, Arc::clone(&probe))
                    .context("cannot prepare to resume the FUSE connection")?;
                resume = Some(rest);
                (fuser::Session::from_fd(adapter, fd, acl), Served::Descriptor(conn))
            } else {
                connection::mount(&device, &mountpoint, &source, config.fs.read_only, config.allow_other)
                    .map_err(|e| anyhow::anyhow!("cannot mount at {}: {e}", mountpoint.display()))?;
                let (conn, fd) = Connection::fresh(device, Arc::clone(&probe)).context("cannot duplicate --fuse-fd")?;
                (fuser::Session::from_fd(adapter, fd, acl), Served::Descriptor(conn))
            }
        }
    };

    // A successor first settles what its predecessor left: uploads it never finished are
    // aborted, and files it handed over open for writing are opened again, before any request
    // for them is read.
    // Logged once the log goes to its file (after the ready line), so it stays in the volume's log.
    let mut taken_over = None;
    let mut recovery_dir = None;
    if let Some((dir, found)) = recovery {
        let (generation, inodes) = (found.generation, found.inodes);
        let (aborted, reopened) = rt.block_on(records_owner.finish_recovery(found));
        taken_over = Some((generation, inodes, aborted, reopened));
        recovery_dir = Some(dir);
    }
    if !config.takeover {
        tracing::info!(bucket = %config.bucket, prefix = %config.fs.prefix, mountpoint = %mountpoint.display(), "mounted");
    }
    // After the output is where it stays (the log file of a background mount), so the warning
    // is seen; before the session runs, so no mkdir comes first.
    if notify_ready && resume.is_none() {
        announce_ready(config.log_file.as_deref());
    }
    if !config.fs.read_only {
        rt.block_on(records_owner.check_directory_markers());
    }

    let mut session = session;
    let session_thread = std::thread::Builder::new()
        .name("s3csi-fuse".into())
        .spawn(move || session.run())
        .context("cannot start the FUSE session thread")?;
    let loop_thread = {
        use std::os::unix::thread::JoinHandleExt;
        session_thread.as_pthread_t()
    };
    if let (Some(rest), Served::Descriptor(conn)) = (resume.take(), &served) {
        let resent = rest.complete(conn).context("cannot resume the FUSE connection")?;
        if notify_ready {
            announce_ready(config.log_file.as_deref());
        }
        if let Some((generation, inodes, aborted, reopened)) = taken_over {
            tracing::info!(
                generation,
                inodes,
                aborted_uploads = aborted,
                reopened_files = reopened,
                "took the mounted connection over"
            );
        }
        match resent {
            Resent::Yes => {}
            Resent::Unsupported => tracing::warn!(
                "this kernel cannot re-send FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9): system calls \
                 that were waiting on the previous process stay blocked until the volume is unmounted"
            ),
        }
        tracing::info!(mountpoint = %mountpoint.display(), "serving the mount again");
    }

    if let Some(dir) = &recovery_dir
        && let Err(e) = dir.write_pid(std::process::id())
    {
        tracing::warn!(path = %dir.root().display(), error = %e, "cannot record this process's pid in the recovery directory");
    }

    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = std::thread::spawn(move || {
        let r = session_thread.join();
        let _ = done_tx.send(());
        r
    });
    let can_hand_over = matches!(served, Served::Descriptor(_)) && config.recovery_dir.is_some();
    let stop = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler can be installed");
        let mut usr2 = signal(SignalKind::user_defined2()).expect("SIGUSR2 handler can be installed");
        loop {
            tokio::select! {
                _ = &mut done_rx => { tracing::info!("unmounted; exiting"); return Stop::Ended }
                _ = term.recv() => { tracing::info!("SIGTERM received; unmounting"); return Stop::Unmount }
                _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received; unmounting"); return Stop::Unmount }
                _ = usr2.recv() => {
                    if can_hand_over {
                        tracing::info!("SIGUSR2 received; handing the connection over");
                        return Stop::HandOver;
                    }
                    tracing::warn!("SIGUSR2 ignored: only a mount started with --fuse-fd and --recovery-dir can hand over");
                }
            }
        }
    });
    if let (Stop::HandOver, Served::Descriptor(conn), Some(dir)) = (&stop, &served, &config.recovery_dir) {
        return hand_over(&rt, conn, loop_thread, &records_owner, dir);
    }
    if matches!(stop, Stop::Unmount) && is_mount_point(&mountpoint).unwrap_or(false) {
        let unmounted = match served {
            Served::Mounted(mut unmounter) => unmounter.unmount(),
            Served::Descriptor(_) => unmount(&mountpoint),
        };
        if let Err(e) = unmounted {
            tracing::warn!(error = %e, "unmount failed (busy?); detaching lazily");
            let c = std::ffi::CString::new(mountpoint.to_string_lossy().as_bytes()).expect("path has no NUL");
            // SAFETY: umount2 with a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let ended = waiter.join();
    // Directory attribute records queued since the last flush.
    rt.block_on(records_owner.flush_records());
    // Aborts of failed uploads still retrying get a last chance; any left are logged by id.
    rt.block_on(records_owner.finish_uploads(UPLOADS_AT_EXIT));
    match ended {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(anyhow::anyhow!("FUSE session failed: {e}")),
        _ => Err(anyhow::anyhow!("FUSE session thread panicked")),
    }
}

/// How long a process starting with `--recovery-dir` waits for the lock of one that is exiting.
const RECOVERY_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a hand-over waits for the requests being served to be answered; the successor's
/// resend covers any still open.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Stops serving, saves what is open for writing, and leaves the connection mounted for the
/// successor (see `docs/recovery.md`).
fn hand_over<S: ObjectStore>(
    rt: &tokio::runtime::Runtime,
    conn: &Connection,
    loop_thread: libc::pthread_t,
    fs: &S3Fs<S>,
    dir: &Path,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let left = conn.quiesce(loop_thread, HANDOVER_WAIT).context("cannot stop the FUSE session for the hand-over")?;
    if left > 0 {
        tracing::warn!(
            requests = left,
            "requests still unanswered at the hand-over; the successor is asked to re-send them"
        );
    }
    let handles = rt.block_on(fs.hand_over());
    rt.block_on(fs.flush_records());
    rt.block_on(fs.finish_uploads(UPLOADS_AT_EXIT));
    let dir = RecoveryDir::open(dir).with_context(|| format!("cannot open --recovery-dir {}", dir.display()))?;
    dir.write_handover(&handles).context("cannot record the files open for writing")?;
    tracing::info!(
        files_open_for_writing = handles.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "handed the connection over; exiting without unmounting"
    );
    Ok(())
}

/// Unmounts a mount made with [`connection::mount`].
fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.to_string_lossy().as_bytes()).expect("path has no NUL");
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Prints the ready line for the waiting parent, then stops writing to its pipes.
fn announce_ready(log_file: Option<&Path>) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY_LINE}");
    let _ = out.flush();
    detach_stdio(log_file);
}

/// How long unmount waits for aborts of failed multipart uploads still being retried.
const UPLOADS_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(10);

/// After readiness, stop writing to the parent's pipes: stdout goes to /dev/null, stderr (the
/// log) to `log_file` if given, otherwise /dev/null.
fn detach_stdio(log_file: Option<&Path>) {
    let open = |p: &Path, append: bool| std::fs::OpenOptions::new().write(true).append(append).create(append).open(p);
    let devnull = open(Path::new("/dev/null"), false);
    let log = log_file.and_then(|p| open(p, true).ok());
    if let Ok(null) = devnull {
        use std::os::fd::AsRawFd;
        let err_target = log.as_ref().map_or(null.as_raw_fd(), |f| f.as_raw_fd());
        // SAFETY: dup2 onto the standard descriptors with fds we own for the duration of the call.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(err_target, 2);
        }
    }
}
