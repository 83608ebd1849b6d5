//! Runs one `s3csi mount` process per staged volume and stops it again.
//!
//! Each FUSE filesystem is its own process in its own session, so a crash takes down one volume
//! only, and the processes outlive a restart of `s3csi csi` (the next instance finds them by the
//! pid in its state directory). The supervisor reaps the children it started and logs how they
//! ended; children of an earlier instance are reaped by init.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{ERROR_PREFIX, NOTIFY_ENV, READY_LINE};

/// How long a stopped mount process gets to exit after its unmount before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a mount process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {exe}: {source}")]
    Exec { exe: String, source: std::io::Error },
    /// The process exited before the mount was ready; `message` is its error line.
    #[error("{message}")]
    Failed { message: String },
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
}

impl MountSupervisor {
    /// `exe` is the `s3csi` binary to run (normally the current executable).
    pub fn new(exe: PathBuf) -> Self {
        MountSupervisor { exe }
    }

    /// Starts `s3csi <args> --foreground` detached, waits until the mount is live, and returns
    /// its pid. Blocking: call from `spawn_blocking`.
    pub fn start(&self, volume: &str, spec: &MountSpec) -> Result<u32, SpawnError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&spec.args).arg("--foreground").env(NOTIFY_ENV, "1");
        for k in &spec.env_remove {
            cmd.env_remove(k);
        }
        cmd.envs(&spec.env);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe; the mount gets its own session so signals aimed at
        // the CSI server's process group do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().map_err(|source| SpawnError::Exec { exe: self.exe.display().to_string(), source })?;
        let pid = child.id();
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
            let volume = volume.to_owned();
            // Reap the child whenever it ends and say how, so a crashed mount is visible.
            std::thread::Builder::new()
                .name("s3csi-reaper".into())
                .spawn(move || match child.wait() {
                    Ok(s) if s.success() => tracing::info!(volume, pid, "mount process exited"),
                    Ok(s) => tracing::warn!(volume, pid, status = %s, "mount process ended abnormally"),
                    Err(e) => tracing::warn!(volume, pid, error = %e, "cannot wait for mount process"),
                })
                .map_err(|source| SpawnError::Exec { exe: "reaper thread".into(), source })?;
            return Ok(pid);
        }
        let status = child.wait();
        let log = errors.join().unwrap_or_default();
        let message = log
            .lines()
            .filter_map(|l| l.strip_prefix(ERROR_PREFIX))
            .next_back()
            .map(|m| m.trim().to_owned())
            .unwrap_or_else(|| {
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                format!(
                    "mount process exited ({}) before the mount was ready: {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )
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

fn signal(pid: u32, sig: i32) {
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
