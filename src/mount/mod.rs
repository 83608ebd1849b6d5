//! Kernel mounts for the CSI node: bind mounts into pods, unmounting, and telling a live mount
//! from a dead one. The FUSE processes themselves are run by [`supervisor::MountSupervisor`].
//!
//! Everything here is a thin wrapper over `mount(2)`, `umount2(2)` and `/proc/self/mountinfo`
//! behind the [`Mounter`] trait, so the node service's decisions stay separate from syscalls.

pub mod runner;
pub mod supervisor;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// One mount as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount source (`s3csi:<bucket>` for our FUSE mounts).
    pub source: String,
    /// The filesystem type (`fuse.s3csi` for ours, also for bind mounts of ours).
    pub fstype: String,
    /// `major:minor` of the mounted filesystem: equal for a mount and its bind mounts.
    pub device: String,
}

/// What is at a path, as far as mounts go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    /// Nothing is mounted at exactly this path (also: the path is a symbolic link, which is never
    /// followed, or does not exist).
    NotMounted,
    /// A mount that answers.
    Healthy(MountEntry),
    /// A FUSE mount whose server does not answer: its process is gone ("transport endpoint is
    /// not connected") or hung past [`LIVENESS_TIMEOUT`].
    Dead(MountEntry),
}

impl MountState {
    /// The mountinfo entry, mounted alive or dead.
    pub fn entry(&self) -> Option<&MountEntry> {
        match self {
            MountState::NotMounted => None,
            MountState::Healthy(e) | MountState::Dead(e) => Some(e),
        }
    }
}

/// How long a FUSE server gets to answer `statfs` before its mount counts as dead. Our mount
/// processes answer `statfs` from memory, so only a dead or wedged process takes this long.
pub const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// The path as mountinfo shows it: the parent directory resolved (symbolic links in the parent
/// are followed, as the kernel does), the last component kept as is. `None` for a path that is
/// not absolute or has no last component.
fn mountinfo_path(path: &Path) -> Option<std::path::PathBuf> {
    let name = path.file_name()?;
    let parent = path.parent()?;
    if !path.is_absolute() {
        return None;
    }
    let parent = parent.canonicalize().unwrap_or_else(|_| parent.to_path_buf());
    Some(parent.join(name))
}

/// The topmost mount at exactly `path` (already resolved), from /proc/self/mountinfo.
pub fn mount_entry(path: &Path) -> Option<MountEntry> {
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
        let device = fields.get(2).copied().unwrap_or_default();
        // Later lines are mounted on top of earlier ones.
        found = Some(MountEntry { source: unescape(source), fstype: fstype.to_owned(), device: device.to_owned() });
    }
    found
}

/// `statvfs` of a path, bounded by [`LIVENESS_TIMEOUT`] (a hung FUSE server never answers).
pub fn statvfs_bounded(path: &Path) -> Result<libc::statvfs, io::Error> {
    let c = cpath(path)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("s3csi-statvfs".into()).spawn(move || {
        // SAFETY: statvfs writes only into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        let _ = tx.send(if rc == 0 { Ok(st) } else { Err(io::Error::last_os_error()) });
    })?;
    match rx.recv_timeout(LIVENESS_TIMEOUT) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the filesystem did not answer statfs")),
    }
}

/// Whether the FUSE server behind the mount at `path` answers right now. `statfs` is never
/// answered from the kernel's attribute cache (unlike `stat`), so a dead server shows at once;
/// [`statvfs_bounded`] runs it on its own thread, since a wedged server would block it for good.
pub fn fuse_answers(path: &Path) -> Result<(), io::Error> {
    statvfs_bounded(path).map(drop)
}

/// Opens `path` as a directory without following a symbolic link in its last component, for
/// mounting onto it through `/proc/self/fd/N`.
fn open_dir_nofollow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
}

impl Mounter for SystemMounter {
    fn state(&self, path: &Path) -> MountState {
        // Only mountinfo and a bounded statfs: any other syscall on a mount point (even lstat)
        // waits for its FUSE server, which may be hung. A path mountinfo lists is a mount
        // point, never a symbolic link (mount(2) resolves links before it mounts).
        let Some(resolved) = mountinfo_path(path) else { return MountState::NotMounted };
        let Some(entry) = mount_entry(&resolved) else {
            return MountState::NotMounted;
        };
        if !entry.fstype.starts_with("fuse") {
            return MountState::Healthy(entry);
        }
        match fuse_answers(&resolved) {
            Ok(()) => MountState::Healthy(entry),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "FUSE mount does not answer");
                MountState::Dead(entry)
            }
        }
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
        let src = open_dir_nofollow(source).map_err(|e| MountError::sys("bind-mount", source, e))?;
        let dst = open_dir_nofollow(target).map_err(|e| MountError::sys("bind-mount onto", target, e))?;
        // Mount through the descriptors, so a symbolic link swapped in after the checks is never
        // followed.
        let src_path = cpath(Path::new(&format!("/proc/self/fd/{}", src.as_raw_fd())))
            .map_err(|e| MountError::sys("bind-mount", source, e))?;
        let dst_path = cpath(Path::new(&format!("/proc/self/fd/{}", dst.as_raw_fd())))
            .map_err(|e| MountError::sys("bind-mount onto", target, e))?;
        // SAFETY: valid NUL-terminated paths; a bind mount ignores fstype and data.
        let rc = unsafe {
            libc::mount(src_path.as_ptr(), dst_path.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
        };
        if rc != 0 {
            return Err(MountError::sys("bind-mount onto", target, io::Error::last_os_error()));
        }
        if read_only {
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
            // The target is now a mount point, which cannot be renamed or replaced by a link;
            // open it again without following one, and remount through that descriptor.
            let remount = open_dir_nofollow(target).and_then(|root| {
                let root_path = cpath(Path::new(&format!("/proc/self/fd/{}", root.as_raw_fd())))?;
                // SAFETY: valid NUL-terminated path; remounting the bind we just made.
                let rc = unsafe {
                    libc::mount(std::ptr::null(), root_path.as_ptr(), std::ptr::null(), flags, std::ptr::null())
                };
                if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            if let Err(err) = remount {
                let target_c = cpath(target).map_err(|e| MountError::sys("remount read-only", target, e))?;
                // SAFETY: valid path; undo the writable bind so no pod ever sees it.
                unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
                return Err(MountError::sys("remount read-only", target, err));
            }
        }
        Ok(())
    }

    fn unmount(&self, path: &Path) -> Result<(), MountError> {
        let p = cpath(path).map_err(|e| MountError::sys("unmount", path, e))?;
        // SAFETY: valid NUL-terminated path; a symbolic link at `path` is never followed.
        if unsafe { libc::umount2(p.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) => Ok(()), // not a mount point (any more)
            Some(libc::EBUSY) | Some(libc::ENOTCONN) => {
                tracing::warn!(path = %path.display(), error = %err, "mount busy or dead; detaching it lazily");
                // SAFETY: valid NUL-terminated path.
                if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
                    Ok(())
                } else {
                    Err(MountError::sys("unmount", path, io::Error::last_os_error()))
                }
            }
            _ => Err(MountError::sys("unmount", path, err)),
        }
    }
}
