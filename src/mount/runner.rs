//! The process runner the node service starts and stops mount processes through. The real
//! implementation is the keeper client ([`crate::keeper::KeeperClient`]): the mount processes run
//! as children of `s3csi keeper`, which holds their `/dev/fuse` descriptors, so the node service
//! never holds one and may be restarted at any time.

use std::path::Path;

use crate::keeper::protocol::VolumeSpec;

/// Why a mount could not be started or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The mount process could not be executed at all; nothing was mounted.
    #[error("{0}")]
    Exec(String),
    /// The mount process exited before it was ready; the message is its error line. It may
    /// have mounted before failing.
    #[error("{0}")]
    Failed(String),
    /// The mount process did not report ready in time and was killed. It may have mounted.
    #[error("{0}")]
    NotReady(String),
    /// The runner refused the request (another request for the volume is in progress, the
    /// volume runs with other arguments, or the runner is handing its volumes over).
    #[error("{0}")]
    Refused(String),
    /// The runner cannot be reached or failed on its side.
    #[error("{0}")]
    Unavailable(String),
}

/// Starts and stops the mount process of a volume. Blocking: call from `spawn_blocking`.
pub trait MountRunner: Send + Sync + 'static {
    /// Starts the mount process of `spec.volume` and returns its pid once the mount is live. A
    /// volume already running with the same arguments returns the running process's pid.
    fn start(&self, spec: &VolumeSpec) -> Result<u32, RunError>;
    /// Stops the mount process of `volume` (the caller unmounted `mountpoint` first) and forgets
    /// the volume. Stopping a volume the runner does not know succeeds.
    fn stop(&self, volume: &str, mountpoint: &Path) -> Result<(), RunError>;
}
