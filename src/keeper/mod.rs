//! `s3csi keeper`: holds a duplicate of every staged volume's `/dev/fuse` descriptor and runs the
//! volume's `s3csi mount` process as its child, so a mount outlives the process serving it (see
//! `docs/recovery.md`). It has no S3 code.
//!
//! - [`protocol`]: the messages on `<state-dir>/keeper.sock` (mode 0600).
//! - [`policy`]: restart, backoff and hand-over ownership decisions.
//! - [`server`]: the keeper itself.
//! - [`client`]: what the node service talks to it with ([`crate::mount::runner::MountRunner`]).
//!
//! A keeper starting while another answers on the socket takes every volume over from it and
//! then replaces the socket. A keeper that handed over records its identity (`--keeper-id`, in
//! Kubernetes the pod's UID) in `<state-dir>/keeper-handed-over/`, so a restart of it in the old
//! pod stays idle instead of pulling the volumes back.
//!
//! SIGTERM: a keeper that owns no volume exits at once (the normal end of a rolling update: the
//! newer keeper took everything). One that still owns volumes refuses new starts and keeps serving
//! them until the node service has stopped them all or the process is killed: exiting would end
//! every mount process in its container with it. It never unmounts anything.

pub mod client;
pub mod policy;
pub mod protocol;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use client::KeeperClient;
use protocol::ErrorKind;
pub use server::{Keeper, MountTable, SystemMountTable};

use crate::mount::supervisor::SpawnError;

/// File name of the keeper's socket in the state directory.
pub const SOCKET_NAME: &str = "keeper.sock";
/// Directory (in the state directory) of identities of keepers that handed their volumes over.
const HANDED_OVER_DIR: &str = "keeper-handed-over";
/// How often a draining keeper checks whether it still owns volumes.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// Everything `s3csi keeper` needs.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// The `s3csi` binary to run for mounts.
    pub exe: PathBuf,
    /// The FUSE device to open per volume (`/dev/fuse`).
    pub fuse_device: PathBuf,
    /// This keeper's identity across restarts of its process (the pod UID), if any.
    pub keeper_id: Option<String>,
    /// How long a mount process gets to report ready.
    pub ready_timeout: Duration,
    /// Created once this keeper serves the socket (after taking every volume over from an
    /// older keeper); a readiness probe checks it, so an update deletes the older pod only then.
    pub ready_file: Option<PathBuf>,
}

impl KeeperConfig {
    /// The defaults for a state directory: socket `<dir>/keeper.sock`, `/dev/fuse`, the current
    /// executable's mount processes with the supervisor's ready timeout.
    pub fn new(state_dir: PathBuf, exe: PathBuf) -> Self {
        KeeperConfig {
            socket: state_dir.join(SOCKET_NAME),
            state_dir,
            exe,
            fuse_device: PathBuf::from("/dev/fuse"),
            keeper_id: None,
            ready_timeout: crate::mount::supervisor::DEFAULT_READY_TIMEOUT,
            ready_file: None,
        }
    }
}

/// The keeper's failures, on its side and in its client.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot open {path}: {source}; the keeper needs the FUSE device (privileged, with /dev/fuse mounted)")]
    FuseDevice { path: PathBuf, source: std::io::Error },
    #[error("cannot create the recovery directory {path} of volume {volume}: {source}")]
    RecoveryDir { volume: String, path: PathBuf, source: std::io::Error },
    #[error("cannot use the state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("{source}")]
    Spawn { volume: String, source: SpawnError },
    #[error("volume {volume} already runs at {mountpoint} with other mount arguments; stop it first")]
    Conflict { volume: String, mountpoint: String },
    #[error("another request for volume {volume} is still in progress in the keeper; retry")]
    Busy { volume: String },
    #[error("the keeper is handing its volumes over to a newer keeper; retry volume {volume} shortly")]
    HandingOver { volume: String },
    #[error("the keeper is shutting down; volume {volume} cannot be started until the next keeper runs")]
    Draining { volume: String },
    #[error("cannot serve the keeper socket {socket}: {source}")]
    Bind { socket: PathBuf, source: std::io::Error },
    #[error("cannot reach the keeper at {socket}: {source}; check that `s3csi keeper` runs (container `keeper`)")]
    Unreachable { socket: PathBuf, source: std::io::Error },
    #[error("the keeper at {socket} did not answer properly: {source}; see the keeper's log")]
    Protocol { socket: PathBuf, source: std::io::Error },
    #[error("cannot start a keeper ({exe}): {source}")]
    Launch { exe: PathBuf, source: std::io::Error },
    #[error("the keeper started by this node service did not answer on {socket} within {waited:?}; see {log}")]
    LaunchTimeout { socket: PathBuf, waited: Duration, log: PathBuf },
    /// An error the keeper reported.
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

impl KeeperError {
    /// The kind sent on the wire.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KeeperError::Spawn { source: SpawnError::Exec { .. }, .. } => ErrorKind::Exec,
            KeeperError::Spawn { source: SpawnError::Failed { .. }, .. } => ErrorKind::Failed,
            KeeperError::Spawn { source: SpawnError::NotReady { .. }, .. } => ErrorKind::NotReady,
            KeeperError::Conflict { .. }
            | KeeperError::Busy { .. }
            | KeeperError::HandingOver { .. }
            | KeeperError::Draining { .. } => ErrorKind::Refused,
            KeeperError::Remote { kind, .. } => *kind,
            KeeperError::FuseDevice { .. }
            | KeeperError::RecoveryDir { .. }
            | KeeperError::StateDir { .. }
            | KeeperError::Bind { .. }
            | KeeperError::Unreachable { .. }
            | KeeperError::Protocol { .. }
            | KeeperError::Launch { .. }
            | KeeperError::LaunchTimeout { .. } => ErrorKind::Internal,
        }
    }
}

fn handed_over_file(state_dir: &Path, keeper_id: &str) -> PathBuf {
    // The id is a pod UID; anything else is reduced to a safe file name.
    let name: String =
        keeper_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    state_dir.join(HANDED_OVER_DIR).join(name)
}

/// Records that the keeper `keeper_id` handed its volumes over.
fn record_handed_over(state_dir: &Path, keeper_id: &str) -> std::io::Result<()> {
    let path = handed_over_file(state_dir, keeper_id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, b"")
}

/// Whether the keeper `keeper_id` handed its volumes over earlier.
fn handed_over(state_dir: &Path, keeper_id: &str) -> bool {
    handed_over_file(state_dir, keeper_id).exists()
}

/// Metric names (without the `s3csi_` prefix; counters get `_total`).
pub const MOUNT_RESTARTS: &str = "mount_restarts";
pub const MOUNT_TAKEOVERS: &str = "mount_takeovers";
/// The keeper's metrics socket in `<state-dir>/volumes/`, collected by the node service with the
/// mount processes' sockets.
pub const METRICS_SOCKET: &str = "keeper.metrics.sock";

/// Runs the keeper until `shutdown` resolves and it owns no volume (see the module comment).
pub async fn run(
    config: KeeperConfig,
    table: Arc<dyn MountTable>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let metrics_socket = config.state_dir.join("volumes").join(METRICS_SOCKET);
    let ready_file = config.ready_file.clone();
    if let Some(path) = &ready_file {
        // A file left by an earlier run of this container must not vouch for this one.
        let _ = std::fs::remove_file(path);
    }
    let keeper = tokio::task::spawn_blocking(move || Keeper::start(config, table))
        .await
        .context("the keeper's start-up task failed")??;
    let keeper = Arc::new(keeper);
    // An idle keeper (it handed over) leaves the socket to the one serving.
    if keeper.serving() {
        let watched = Arc::clone(&keeper);
        let metrics = crate::metrics::init(None);
        metrics.add_refresher(move |m| m.export_mounts(&watched.list()));
        if let Some(dir) = metrics_socket.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let addr = crate::metrics::MetricsAddress::Unix(metrics_socket.clone());
        if let Err(e) = crate::metrics::serve(&addr, None).await {
            tracing::warn!(socket = %metrics_socket.display(), error = %e, "cannot serve the keeper's metrics; continuing without");
        }
        if let Some(path) = &ready_file {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write the ready file {}", path.display()))?;
        }
    }
    shutdown.await;
    let mut warned = false;
    while !keeper.drain() {
        if !warned {
            let volumes: Vec<String> = keeper.list().into_iter().map(|v| v.volume_id).collect();
            tracing::warn!(
                ?volumes,
                "asked to stop while owning volumes; serving them until they are unstaged or this process is killed"
            );
            warned = true;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    tracing::info!("keeper stopped");
    Ok(())
}
