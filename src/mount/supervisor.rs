//! Runs one `s3csi mount` process per staged volume and stops it again.
//!
//! Each FUSE filesystem is its own process in its own session, so a crash takes down one volume
//! only, and the processes outlive a restart of `s3csi csi` (the next instance finds them by the
//! pid in its state directory). The supervisor reaps the children it started and logs how they
//! ended; children of an earlier instance are reaped by init.
//!
//! Starting a mount is bounded: a child that has not reported its mount ready within the ready
//! timeout ([`DEFAULT_READY_TIMEOUT`]) is killed with its whole session and reaped before
//! [`MountSupervisor::start`] returns, so a caller holding a volume's lock never waits longer.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::daemon::{ERROR_PREFIX, NOTIFY_ENV, READY_LINE};

/// The descriptor number a mount process finds its `/dev/fuse` connection on (`--fuse-fd 3`).
pub const CHILD_FUSE_FD: i32 = 3;
/// How long a stopped mount process gets to exit after its unmount before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a new mount process gets to report its mount ready. Longer than the default S3
/// stall limit (`--s3-timeout`, 60 s), so a mount that cannot reach S3 fails with its own
/// message first; shorter than kubelet's 2-minute deadline for NodeStageVolume, so the failure
/// reaches kubelet as an error rather than a timeout of its own.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a child gets to exit after SIGKILL before it is left to the reaper thread (a process
/// in an uninterruptible kernel call dies only when the call returns).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the rest of a dead child's stderr (a grandchild may still hold it).
const STDERR_GRACE: Duration = Duration::from_secs(1);
/// Bytes of a child's stderr kept for its error message.
const STDERR_TAIL_BYTES: usize = 16 << 10;
/// Lines of stderr quoted in an error message.
const STDERR_TAIL_LINES: usize = 5;
/// Poll interval while waiting for a child to exit with a deadline.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Why a mount process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {exe}: {source}")]
    Exec { exe: String, source: std::io::Error },
    /// The process exited before the mount was ready; `message` is its error line.
    #[error("{message}")]
    Failed { message: String },
    /// The process did not report the mount ready in time and was killed. It may have got as far
    /// as mounting: the caller removes what it left at the mountpoint.
    #[error(
        "mount process {pid} did not report the mount ready within {}s and was killed{}; {}",
        waited.as_secs_f64(),
        if *exited { "" } else { " (it has not exited yet)" },
        describe_tail(stderr_tail)
    )]
    NotReady { pid: u32, waited: Duration, exited: bool, stderr_tail: String },
}

fn describe_tail(tail: &str) -> String {
    if tail.is_empty() {
        "it wrote nothing on stderr (a mount starts by listing the bucket: check that the S3 endpoint answers)"
            .to_owned()
    } else {
        format!("its last output on stderr: {tail}")
    }
}

/// What to run for one volume.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Arguments after `s3csi` (starting with `mount`).
    pub args: Vec<String>,
    /// Environment additions (credentials); never logged.
    pub env: HashMap<String, String>,
    /// Environment variables to remove (so the node's own credentials do not leak in).
    pub env_remove: Vec<String>,
}

/// Starts, watches and stops mount processes.
#[derive(Debug, Clone)]
pub struct MountSupervisor {
    exe: PathBuf,
    ready_timeout: Duration,
}

impl MountSupervisor {
    /// `exe` is the `s3csi` binary to run (normally the current executable); mounts get
    /// [`DEFAULT_READY_TIMEOUT`] to become ready.
    pub fn new(exe: PathBuf) -> Self {
        MountSupervisor { exe, ready_timeout: DEFAULT_READY_TIMEOUT }
    }

    /// The same supervisor with another ready timeout.
    pub fn with_ready_timeout(self, ready_timeout: Duration) -> Self {
        MountSupervisor { ready_timeout, ..self }
    }

    /// Starts `s3csi <args> --foreground` detached, waits until the mount is live, and returns
    /// its pid. Waits at most the ready timeout: a child not ready by then is killed (with its
    /// session) and reaped, and the error carries the tail of its stderr. Blocking: call from
    /// `spawn_blocking`.
    pub fn start(&self, volume: &str, spec: &MountSpec) -> Result<u32, SpawnError> {
        let child = self.start_child(volume, spec, &[], None)?;
        let pid = child.id();
        // The mount is live either way; without a reaper its exit is only not logged.
        if let Err(e) = spawn_reaper(child, volume) {
            tracing::warn!(volume, pid, error = %e, "cannot start a thread to reap the mount process");
        }
        Ok(pid)
    }

    /// Like [`MountSupervisor::start`], but appends `extra_args` after `--foreground`, passes
    /// `fuse_fd` (when given) to the child as its fd 3, and returns the ready child for the
    /// caller to wait on.
    pub fn start_child(
        &self,
        volume: &str,
        spec: &MountSpec,
        extra_args: &[String],
        fuse_fd: Option<BorrowedFd<'_>>,
    ) -> Result<Child, SpawnError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&spec.args).arg("--foreground").args(extra_args).env(NOTIFY_ENV, "1");
        for k in &spec.env_remove {
            cmd.env_remove(k);
        }
        cmd.envs(&spec.env);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let fuse_fd = fuse_fd.map(|fd| fd.as_raw_fd());
        // SAFETY: setsid, dup2 and fcntl are async-signal-safe and touch no memory of ours. The
        // mount gets its own session so signals aimed at our process group do not reach it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = fuse_fd {
                    if fd == CHILD_FUSE_FD {
                        // dup2 onto itself keeps close-on-exec: clear it by hand.
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, CHILD_FUSE_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let deadline = Instant::now() + self.ready_timeout;
        let mut child =
            cmd.spawn().map_err(|source| SpawnError::Exec { exe: self.exe.display().to_string(), source })?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = StderrTail::collect(child.stderr.take().expect("stderr is piped"));
        let (line_tx, line_rx) = mpsc::channel();
        let reader = std::thread::Builder::new().name("s3csi-ready".into()).spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        if let Err(source) = reader {
            kill_and_reap(child, volume);
            return Err(SpawnError::Exec { exe: "readiness reader thread".into(), source });
        }
        let line = line_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        if matches!(&line, Ok(l) if l.trim() == READY_LINE) {
            return Ok(child);
        }
        // Without the ready line, stdout closes when the child exits; it still gets until the
        // deadline to do so.
        let status = match line {
            Err(RecvTimeoutError::Timeout) => None,
            Ok(_) | Err(RecvTimeoutError::Disconnected) => wait_until(&mut child, deadline),
        };
        let Some(status) = status else {
            let exited = kill_and_reap(child, volume);
            return Err(SpawnError::NotReady {
                pid,
                waited: self.ready_timeout,
                exited,
                stderr_tail: stderr.tail(STDERR_GRACE),
            });
        };
        let log = stderr.text(STDERR_GRACE);
        let message = log
            .lines()
            .filter_map(|l| l.strip_prefix(ERROR_PREFIX))
            .next_back()
            .map(|m| m.trim().to_owned())
            .unwrap_or_else(|| {
                format!("mount process exited ({status}) before the mount was ready: {}", last_lines(&log))
            });
        Err(SpawnError::Failed { message })
    }

    /// Waits for a mount process to exit after its mount was removed; SIGTERM and finally
    /// SIGKILL if it lingers. Only signals `pid` if it still is an s3csi mount of `mountpoint`
    /// (pids are reused). Blocking.
    pub fn stop(&self, pid: u32, mountpoint: &Path) {
        let deadline = Instant::now() + STOP_GRACE;
        let mut termed = false;
        while is_mount_process(pid, mountpoint) {
            if Instant::now() >= deadline {
                tracing::warn!(pid, mountpoint = %mountpoint.display(), "mount process did not exit; killing it");
                signal(pid, libc::SIGKILL);
                return;
            }
            if !termed && Instant::now() + STOP_GRACE / 2 >= deadline {
                signal(pid, libc::SIGTERM);
                termed = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reaps `child` whenever it ends and says how, so a crashed mount is visible.
pub(crate) fn spawn_reaper(mut child: Child, volume: &str) -> std::io::Result<()> {
    let (volume, pid) = (volume.to_owned(), child.id());
    std::thread::Builder::new()
        .name("s3csi-reaper".into())
        .spawn(move || match child.wait() {
            Ok(s) if s.success() => tracing::info!(volume, pid, "mount process exited"),
            Ok(s) => tracing::warn!(volume, pid, status = %s, "mount process ended abnormally"),
            Err(e) => tracing::warn!(volume, pid, error = %e, "cannot wait for mount process"),
        })
        .map(drop)
}

/// Waits for `child` to exit until `deadline`; `None` if it is still running.
fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(pid = child.id(), error = %e, "cannot wait for mount process");
                return None;
            }
        }
    }
}

/// Kills `child` and everything in its session with SIGKILL and reaps it. Returns whether it
/// exited within [`KILL_GRACE`]; if not, a reaper thread waits for it.
pub(crate) fn kill_and_reap(mut child: Child, volume: &str) -> bool {
    let pid = child.id();
    // The child called setsid, so its pid is also its process group's id; it is not reaped
    // yet, so neither id can have been reused.
    if let Ok(pgid) = i32::try_from(pid) {
        // SAFETY: kill has no memory effects; the group is our unreaped child's own session.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    // SIGKILL to the group may fail (setsid not reached yet): kill the child itself too.
    let _ = child.kill();
    if wait_until(&mut child, Instant::now() + KILL_GRACE).is_some() {
        return true;
    }
    let _ = spawn_reaper(child, volume);
    false
}

/// The last [`STDERR_TAIL_BYTES`] of a child's stderr, read on a thread of its own.
struct StderrTail {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl StderrTail {
    fn collect(mut stderr: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::clone(&buf);
        let spawned = std::thread::Builder::new().name("s3csi-stderr".into()).spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut chunk) {
                let mut b = shared.lock().unwrap_or_else(|e| e.into_inner());
                b.extend_from_slice(&chunk[..n]);
                let excess = b.len().saturating_sub(STDERR_TAIL_BYTES);
                b.drain(..excess);
            }
            let _ = done_tx.send(());
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot read the mount process's stderr");
        }
        StderrTail { buf, done }
    }

    /// What was read so far, once the stream ended or `grace` passed.
    fn text(&self, grace: Duration) -> String {
        let _ = self.done.recv_timeout(grace);
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The last lines, joined for an error message.
    fn tail(&self, grace: Duration) -> String {
        last_lines(&self.text(grace))
    }
}

/// The last [`STDERR_TAIL_LINES`] non-empty lines of `log`, joined with ` | `.
fn last_lines(log: &str) -> String {
    let mut tail: Vec<&str> =
        log.lines().map(str::trim).filter(|l| !l.is_empty()).rev().take(STDERR_TAIL_LINES).collect();
    tail.reverse();
    tail.join(" | ")
}

pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill has no memory effects; pid was checked to be our mount process.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Whether `pid` is alive (not a zombie) and is an s3csi process mounting `mountpoint`.
pub fn is_mount_process(pid: u32, mountpoint: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state letter follows the parenthesised command name.
    if stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) == Some('Z') {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<OsString> = cmdline.split(|b| *b == 0).map(|a| std::ffi::OsStr::from_bytes(a).to_owned()).collect();
    args.iter().any(|a| a == "mount") && args.iter().any(|a| Path::new(a) == mountpoint)
}

/// Writes an executable shell script standing in for `s3csi`, from a separate process: a write
/// descriptor open in this one could leak into a child forked meanwhile by a parallel test, and
/// running the script would then fail with ETXTBSY.
#[cfg(test)]
pub(crate) fn stub_exe(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("s3csi-stub");
    let status = Command::new("/bin/sh")
        .args(["-c", r#"printf '%s\n' "$1" > "$2" && chmod +x "$2""#, "sh"])
        .arg(format!("#!/bin/sh\n{body}"))
        .arg(&path)
        .status()
        .expect("run /bin/sh");
    assert!(status.success(), "cannot write {}", path.display());
    path
}

/// Whether `pid` is gone: no such process, or a zombie that only its parent can reap.
#[cfg(test)]
pub(crate) fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) == Some('Z'),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MountSpec {
        MountSpec {
            args: vec!["mount".into(), "bucket".into(), "/mnt".into()],
            env: HashMap::new(),
            env_remove: vec![],
        }
    }

    fn read_pid(path: &Path) -> u32 {
        std::fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_child_that_never_gets_ready_is_killed_with_its_session_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let (pid_file, sleeper_file) = (dir.path().join("pid"), dir.path().join("sleeper"));
        let exe = stub_exe(
            dir.path(),
            &format!(
                "echo $$ > {}\necho 'listing bucket \"bucket\"' >&2\nsleep 600 &\necho $! > {}\nwait",
                pid_file.display(),
                sleeper_file.display()
            ),
        );
        let timeout = Duration::from_secs(1);
        let sup = MountSupervisor::new(exe).with_ready_timeout(timeout);
        let started = Instant::now();
        let err = sup.start("bucket", &spec()).unwrap_err();
        assert!(started.elapsed() < timeout + KILL_GRACE, "bounded: {:?}", started.elapsed());
        let SpawnError::NotReady { pid, waited, exited, stderr_tail } = &err else { panic!("{err:?}") };
        assert_eq!((*pid, *waited, *exited), (read_pid(&pid_file), timeout, true));
        assert_eq!(stderr_tail, "listing bucket \"bucket\"");
        let msg = err.to_string();
        assert!(msg.contains(&format!("mount process {pid} did not report the mount ready within 1s")), "{msg}");
        assert!(msg.contains("was killed; its last output on stderr: listing bucket"), "{msg}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the child is reaped");
        let sleeper = read_pid(&sleeper_file);
        eventually("its session's other processes are killed too", || process_gone(sleeper));
    }

    #[test]
    fn a_child_that_closes_stdout_but_keeps_running_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let exe = stub_exe(dir.path(), &format!("echo $$ > {}\nexec >&-\nexec sleep 600", pid_file.display()));
        let sup = MountSupervisor::new(exe).with_ready_timeout(Duration::from_millis(500));
        let err = sup.start("bucket", &spec()).unwrap_err();
        let SpawnError::NotReady { pid, stderr_tail, .. } = &err else { panic!("{err:?}") };
        assert_eq!(*pid, read_pid(&pid_file));
        assert!(stderr_tail.is_empty());
        assert!(err.to_string().contains("it wrote nothing on stderr"), "{err}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the child is reaped");
    }

    #[test]
    fn a_child_that_fails_reports_its_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let exe = stub_exe(
            dir.path(),
            "echo 'starting' >&2\necho 's3csi: error: bucket \"bucket\" does not exist' >&2\nexit 1",
        );
        let err = MountSupervisor::new(exe).start("bucket", &spec()).unwrap_err();
        assert!(
            matches!(&err, SpawnError::Failed { message } if message == "bucket \"bucket\" does not exist"),
            "{err:?}"
        );
        let exe = stub_exe(dir.path(), "echo 'thread main panicked' >&2\nexit 101");
        let err = MountSupervisor::new(exe).start("bucket", &spec()).unwrap_err().to_string();
        assert!(err.contains("exit status: 101") && err.contains("thread main panicked"), "{err}");
    }

    #[test]
    fn a_ready_child_keeps_running_and_is_reaped_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let exe = stub_exe(dir.path(), &format!("echo {READY_LINE}\nexec sleep 600"));
        let pid =
            MountSupervisor::new(exe).with_ready_timeout(Duration::from_secs(10)).start("bucket", &spec()).unwrap();
        assert!(!process_gone(pid), "the mount keeps running");
        signal(pid, libc::SIGKILL);
        eventually("the reaper reaps it", || !Path::new(&format!("/proc/{pid}")).exists());
    }
}
