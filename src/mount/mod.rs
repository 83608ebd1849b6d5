//! Kernel mounts for the CSI node: bind mounts into pods, unmounting, and telling a live mount
//! from a dead one. The FUSE processes themselves are run by [`supervisor::MountSupervisor`].
//!
//! Everything here is a thin wrapper over `mount(2)`, `umount2(2)` and `/proc/self/mountinfo`
//! behind the [`Mounter`] trait, so the node service's decisions stay separate from syscalls.

pub mod supervisor;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What is at a path, as far as mounts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// A mount that answers; `source` and `fstype` as in mountinfo.
    Healthy {
        source: String,
        fstype: String,
    },
    /// A FUSE mount whose process is gone ("transport endpoint is not connected").
    Dead,
}

/// Errors from mount syscalls, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot {op} {path}: {source}")]
    Sys { op: &'static str, path: String, source: io::Error },
}

impl MountError {
    fn sys(op: &'static str, path: &Path, source: io::Error) -> Self {
        MountError::Sys { op, path: path.display().to_string(), source }
    }

    /// The OS error code, when there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            MountError::Sys { source, .. } => source.raw_os_error(),
        }
    }
}

/// Mount operations the node service needs.
pub trait Mounter: Send + Sync + 'static {
    fn state(&self, path: &Path) -> MountState;
    /// Bind-mounts `source` onto `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError>;
    /// Unmounts `path`; a busy mount is detached lazily (pods may still hold files open).
    fn unmount(&self, path: &Path) -> Result<(), MountError>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemMounter;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// `(source, fstype)` of the topmost mount at exactly `path`, from /proc/self/mountinfo.
pub fn mount_entry(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4).is_none_or(|mp| unescape(mp) != want) {
            continue;
        }
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let fstype = fields.get(dash + 1).copied().unwrap_or_default();
        let source = fields.get(dash + 2).copied().unwrap_or_default();
        // Later lines are mounted on top of earlier ones.
        found = Some((unescape(source), fstype.to_owned()));
    }
    found
}

impl Mounter for SystemMounter {
    fn state(&self, path: &Path) -> MountState {
        // A dead FUSE mount fails even to canonicalize; fall back to the path as given.
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        let Some((source, fstype)) = mount_entry(&canonical) else {
            return MountState::NotMounted;
        };
        match std::fs::metadata(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => MountState::Dead,
            _ => MountState::Healthy { source, fstype },
        }
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let src = cpath(source).map_err(|e| MountError::sys("bind-mount", source, e))?;
        let dst = cpath(target).map_err(|e| MountError::sys("bind-mount onto", target, e))?;
        // SAFETY: valid NUL-terminated paths; a bind mount ignores fstype and data.
        let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
        if rc != 0 {
            return Err(MountError::sys("bind-mount onto", target, io::Error::last_os_error()));
        }
        if read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            // SAFETY: as above; remounting the bind we just made read-only.
            let rc = unsafe { libc::mount(std::ptr::null(), dst.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
            if rc != 0 {
                let err = io::Error::last_os_error();
                // SAFETY: valid path; undo the writable bind so no pod ever sees it.
                unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
                return Err(MountError::sys("remount read-only", target, err));
            }
        }
        Ok(())
    }

    fn unmount(&self, path: &Path) -> Result<(), MountError> {
        let p = cpath(path).map_err(|e| MountError::sys("unmount", path, e))?;
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(p.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(()), // not a mount point (any more)
            Some(libc::EBUSY) | Some(libc::ENOTCONN) => {
                tracing::warn!(path = %path.display(), error = %err, "mount busy or dead; detaching it lazily");
                // SAFETY: valid NUL-terminated path.
                if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } == 0 {
                    Ok(())
                } else {
                    Err(MountError::sys("unmount", path, io::Error::last_os_error()))
                }
            }
            _ => Err(MountError::sys("unmount", path, err)),
        }
    }
}
