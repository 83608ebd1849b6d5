//! The node service's side of the keeper socket: one connection per request. With a launcher
//! (`s3csi csi --spawn-keeper`, outside Kubernetes) a keeper that does not answer is started,
//! detached in its own session, and waited for.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::KeeperError;
use super::protocol::{Conn, ErrorKind, Request, Response, VolumeInfo, VolumeSpec};
use crate::mount::runner::{MountRunner, RunError};

/// How long a launched keeper gets to answer on its socket.
const LAUNCH_WAIT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a launched keeper.
const LAUNCH_POLL: Duration = Duration::from_millis(20);
/// Added to the mount ready timeout for a start request's answer; stops wait up to the keeper's
/// grace periods (SIGTERM, then SIGKILL).
const ANSWER_MARGIN: Duration = Duration::from_secs(30);

/// How to start a keeper when none answers.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `s3csi` binary.
    pub exe: PathBuf,
    pub state_dir: PathBuf,
}

/// Talks to the keeper at one socket.
#[derive(Debug)]
pub struct KeeperClient {
    socket: PathBuf,
    launcher: Option<Launcher>,
    /// How long a start may take on the keeper's side (its mount ready timeout).
    ready_timeout: Duration,
    launching: Mutex<()>,
}

impl KeeperClient {
    pub fn new(socket: PathBuf, launcher: Option<Launcher>) -> Self {
        KeeperClient {
            socket,
            launcher,
            ready_timeout: crate::mount::supervisor::DEFAULT_READY_TIMEOUT,
            launching: Mutex::new(()),
        }
    }

    /// Whether a keeper answers on the socket.
    pub fn answers(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// Starts a keeper if none answers and a launcher is configured. Blocking.
    pub fn ensure_running(&self) -> Result<(), KeeperError> {
        if self.answers() {
            return Ok(());
        }
        let Some(launcher) = &self.launcher else {
            return Err(KeeperError::Unreachable {
                socket: self.socket.clone(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            });
        };
        let _one = self.launching.lock().unwrap_or_else(|e| e.into_inner());
        if self.answers() {
            return Ok(());
        }
        launch(launcher, &self.socket)
    }

    fn connect(&self) -> Result<UnixStream, KeeperError> {
        match UnixStream::connect(&self.socket) {
            Ok(s) => Ok(s),
            Err(source) if self.launcher.is_none() => {
                Err(KeeperError::Unreachable { socket: self.socket.clone(), source })
            }
            Err(_) => {
                self.ensure_running()?;
                UnixStream::connect(&self.socket)
                    .map_err(|source| KeeperError::Unreachable { socket: self.socket.clone(), source })
            }
        }
    }

    /// Sends one request and reads its answer. Blocking.
    pub fn request(&self, request: &Request, timeout: Duration) -> Result<Response, KeeperError> {
        let protocol = |source| KeeperError::Protocol { socket: self.socket.clone(), source };
        let stream = self.connect()?;
        stream.set_read_timeout(Some(timeout)).map_err(protocol)?;
        let mut conn = Conn::new(stream);
        conn.send(request, None).map_err(protocol)?;
        match conn.recv::<Response>().map_err(protocol)? {
            Some(Response::Error { kind, message }) => Err(KeeperError::Remote { kind, message }),
            Some(r) => Ok(r),
            None => Err(protocol(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"))),
        }
    }

    /// Every volume the keeper owns.
    pub fn list(&self) -> Result<Vec<VolumeInfo>, KeeperError> {
        match self.request(&Request::List, ANSWER_MARGIN)? {
            Response::Volumes { volumes } => Ok(volumes),
            other => Err(unexpected(&self.socket, &other)),
        }
    }
}

fn unexpected(socket: &Path, answer: &Response) -> KeeperError {
    KeeperError::Protocol {
        socket: socket.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected answer {answer:?}")),
    }
}

impl From<KeeperError> for RunError {
    fn from(e: KeeperError) -> RunError {
        let message = e.to_string();
        match e.kind() {
            ErrorKind::Exec => RunError::Exec(message),
            ErrorKind::Failed => RunError::Failed(message),
            ErrorKind::NotReady => RunError::NotReady(message),
            ErrorKind::Refused => RunError::Refused(message),
            ErrorKind::Internal => RunError::Unavailable(message),
        }
    }
}

impl MountRunner for KeeperClient {
    fn start(&self, spec: &VolumeSpec) -> Result<u32, RunError> {
        let answer = self.request(&Request::Start { spec: spec.clone() }, self.ready_timeout + ANSWER_MARGIN)?;
        match answer {
            Response::Started { pid } => Ok(pid),
            other => Err(unexpected(&self.socket, &other).into()),
        }
    }

    fn stop(&self, volume: &str, _mountpoint: &Path) -> Result<(), RunError> {
        match self.request(&Request::Stop { volume: volume.to_owned() }, ANSWER_MARGIN)? {
            Response::Stopped => Ok(()),
            other => Err(unexpected(&self.socket, &other).into()),
        }
    }
}

/// Starts `s3csi keeper` detached (own session, log in the state directory) and waits until it
/// answers on `socket`.
fn launch(launcher: &Launcher, socket: &Path) -> Result<(), KeeperError> {
    let log = launcher.state_dir.join("keeper.log");
    let launch_err = |source| KeeperError::Launch { exe: launcher.exe.clone(), source };
    std::fs::create_dir_all(&launcher.state_dir).map_err(launch_err)?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).map_err(launch_err)?;
    let err = out.try_clone().map_err(launch_err)?;
    let mut cmd = Command::new(&launcher.exe);
    cmd.arg("keeper").arg("--state-dir").arg(&launcher.state_dir).arg("--socket").arg(socket);
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory; the keeper gets its own session
    // so signals aimed at the node service's process group do not reach it or its mounts.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(launch_err)?;
    let pid = child.id();
    tracing::info!(pid, socket = %socket.display(), log = %log.display(), "started a keeper");
    // Reap it whenever it ends, so it never lingers as a zombie of ours.
    let reaped = std::thread::Builder::new().name("s3csi-keeper-reaper".into()).spawn(move || match child.wait() {
        Ok(status) => tracing::warn!(pid, %status, "the keeper started by this node service exited"),
        Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the keeper"),
    });
    if let Err(e) = reaped {
        tracing::warn!(pid, error = %e, "cannot start a thread to reap the keeper");
    }
    let deadline = Instant::now() + LAUNCH_WAIT;
    while Instant::now() < deadline {
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(LAUNCH_POLL);
    }
    Err(KeeperError::LaunchTimeout { socket: socket.to_owned(), waited: LAUNCH_WAIT, log })
}
