//! [`FuseAdapter`]: the thin edge between fuser and [`S3Fs`].
//!
//! Each callback opens a span, hands the request to a tokio task (fuser calls us on its own
//! thread; the task owns the `Reply*`, so slow S3 calls never block other requests), and replies
//! with data or an errno. No filesystem logic lives here.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use tokio::runtime::Handle;
use tracing::Instrument;

use super::connection::{BARRIER_INO, FUSE_UNIQUE_RESEND, SessionProbe};
use super::inode::Kind;
use super::{Attr, Caller, FsError, REPORTED_BLOCK_SIZE, S3Fs, SetAttr};
use crate::s3::ObjectStore;

/// Largest read/write the kernel sends us (needs FUSE_MAX_PAGES): 1 MiB, one cache block.
const MAX_IO_BYTES: u32 = 1 << 20;
/// Kernel readahead per file; the prefetcher does the real read-ahead, so this only needs to
/// be large enough for the kernel to send full-size requests.
const MAX_READAHEAD_BYTES: u32 = 1 << 20;
/// Outstanding background (read-ahead) requests the kernel may queue. Each holds a reply
/// buffer of up to 1 MiB, counted in the read budget; the prefetcher, not the kernel, keeps
/// many GETs in flight, so 16 is plenty.
const MAX_BACKGROUND: u16 = 16;

/// Work to run once the kernel has taken our `INIT` reply (see [`FuseAdapter::after_init`]).
type AfterInit = Box<dyn FnOnce() + Send>;

pub struct FuseAdapter<S> {
    fs: Arc<S3Fs<S>>,
    rt: Handle,
    after_init: Option<AfterInit>,
    probe: Arc<SessionProbe>,
}

impl<S: ObjectStore> FuseAdapter<S> {
    pub fn new(fs: Arc<S3Fs<S>>, rt: Handle) -> Self {
        FuseAdapter { fs, rt, after_init: None, probe: Arc::default() }
    }

    /// Reports requests in flight and barriers to `probe` (for resuming and hand-over).
    pub fn with_probe(mut self, probe: Arc<SessionProbe>) -> Self {
        self.probe = probe;
        self
    }

    /// Runs `f` on the session thread with the first request after `INIT` that goes to a task
    /// (any lookup, getattr or open does): by then the kernel has applied the `INIT` reply, so
    /// connection settings changed from outside (sysfs) stick.
    pub fn after_init(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.after_init = Some(Box::new(f));
        self
    }

    /// Runs one operation as a task, counting it and its latency under `op`.
    fn spawn<F>(&mut self, op: &'static str, span: tracing::Span, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(f) = self.after_init.take() {
            f();
        }
        let start = std::time::Instant::now();
        let probe = Arc::clone(&self.probe);
        probe.started();
        self.rt.spawn(
            async move {
                fut.await;
                probe.finished();
                crate::metrics::metrics().fuse_op(op, start);
            }
            .instrument(span),
        );
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.size.div_ceil(u64::from(REPORTED_BLOCK_SIZE)) * u64::from(REPORTED_BLOCK_SIZE / 512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: REPORTED_BLOCK_SIZE,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

/// Logs an error once, at the edge, counts it, and returns its errno.
fn errno(op: &'static str, e: &FsError) -> i32 {
    crate::metrics::metrics().fuse_errors.get_or_create(&crate::metrics::OperationLabels { operation: op }).inc();
    if e.is_expected() {
        tracing::debug!(op, error = %e, "operation failed");
    } else {
        tracing::warn!(op, error = %e, "operation failed");
    }
    e.errno()
}

/// Whether the kernel re-sent this request after the process that first read it died
/// (`FUSE_NOTIFY_RESEND`): its effect may already be there.
fn is_resent(req: &Request<'_>) -> bool {
    req.unique() & FUSE_UNIQUE_RESEND != 0
}

/// Answers a re-sent `mkdir`/`symlink` whose entry the previous process already made.
async fn reply_made_before<S: ObjectStore>(fs: &S3Fs<S>, parent: u64, name: &str, kind: Kind, reply: ReplyEntry) {
    match fs.lookup(parent, name).await {
        Ok(a) if a.kind == kind => reply.entry(&fs.ttl(), &file_attr(&a), 0),
        Ok(_) => reply.error(libc::EEXIST),
        Err(e) => reply.error(errno("lookup", &e)),
    }
}

fn reply_dir(entries: Result<Vec<(u64, super::DirEntry)>, FsError>, mut reply: ReplyDirectory) {
    match entries {
        Ok(entries) => {
            for (next, e) in entries {
                if reply.add(e.ino, next as i64, file_type(e.kind), &e.name) {
                    break;
                }
            }
            reply.ok();
        }
        Err(e) => reply.error(errno("readdir", &e)),
    }
}

fn time_or_now(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn caller(req: &Request<'_>) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn name_str(name: &OsStr) -> Option<String> {
    name.to_str().map(str::to_owned)
}

impl<S: ObjectStore> Filesystem for FuseAdapter<S> {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(MAX_READAHEAD_BYTES);
        let _ = config.set_max_write(MAX_IO_BYTES);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let Some(name) = name_str(name) else {
            return reply.error(libc::ENOENT);
        };
        let span = tracing::debug_span!("lookup", ino = parent, name = %name);
        self.spawn("lookup", span, async move {
            match fs.lookup(parent, &name).await {
                Ok(a) => reply.entry(&fs.ttl(), &file_attr(&a), 0),
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        if ino == BARRIER_INO {
            return self.probe.barrier();
        }
        self.fs.forget(ino, nlookup);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let fs = Arc::clone(&self.fs);
        self.spawn("getattr", tracing::debug_span!("getattr", ino), async move {
            match fs.getattr(ino).await {
                Ok(a) => reply.attr(&fs.ttl(), &file_attr(&a)),
                Err(e) => reply.error(errno("getattr", &e)),
            }
        });
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.spawn("open", tracing::debug_span!("open", ino, pid = req.pid()), async move {
            match fs.open(ino, flags).await {
                Ok(fh) => reply.opened(fh, 0),
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let fs = Arc::clone(&self.fs);
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        if fs.needs_adoption(fh) {
            // A descriptor opened before this process took the connection over.
            return self.spawn("read", tracing::debug_span!("read", ino, fh, offset, size), async move {
                let read = match fs.adopt_handle(ino, fh).await {
                    Ok(()) => fs.read(fh, offset, size).await,
                    Err(e) => Err(e),
                };
                match read {
                    Ok(parts) => reply.data(&parts.concat()),
                    Err(e) => reply.error(errno("read", &e)),
                }
            });
        }
        // Planned here, on the FUSE thread, so the access pattern sees reads in kernel order.
        let plan = self.fs.plan_read(fh, offset, size);
        self.spawn("read", tracing::trace_span!("read", ino, fh, offset, size), async move {
            match fs.read_planned(fh, offset, size, plan).await {
                Ok(parts) if parts.len() == 1 => reply.data(&parts[0]),
                Ok(parts) => reply.data(&parts.concat()),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        self.spawn("release", tracing::debug_span!("release", fh), async move {
            match fs.release(fh).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let fs = Arc::clone(&self.fs);
        self.spawn("opendir", tracing::debug_span!("opendir", ino), async move {
            match fs.opendir(ino).await {
                Ok(fh) => reply.opened(fh, 0),
                Err(e) => reply.error(errno("opendir", &e)),
            }
        });
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, fh: u64, offset: i64, reply: ReplyDirectory) {
        let offset = offset.max(0) as u64;
        if self.fs.dir_needs_adoption(fh) {
            // A directory opened before this process took the connection over.
            let fs = Arc::clone(&self.fs);
            return self.spawn("readdir", tracing::debug_span!("readdir", ino, fh, offset), async move {
                match fs.adopt_dir(ino, fh).await {
                    Ok(()) => reply_dir(fs.readdir(ino, fh, offset), reply),
                    Err(e) => reply.error(errno("readdir", &e)),
                }
            });
        }
        let _span = tracing::debug_span!("readdir", ino, fh, offset).entered();
        reply_dir(self.fs.readdir(ino, fh, offset), reply);
    }

    fn releasedir(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _flags: i32, reply: ReplyEmpty) {
        self.fs.releasedir(fh);
        reply.ok();
    }

    fn getxattr(&mut self, _req: &Request<'_>, _ino: u64, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        // No extended attributes: ENOTSUP makes the kernel stop asking (e.g. security.capability
        // on every write).
        reply.error(libc::ENOTSUP);
    }

    fn listxattr(&mut self, _req: &Request<'_>, _ino: u64, _size: u32, reply: ReplyXattr) {
        reply.error(libc::ENOTSUP);
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize);
    }

    // --- Changes to the namespace or data. ---

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let fs = Arc::clone(&self.fs);
        let caller = caller(req);
        let changes = SetAttr {
            size,
            mode: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            mtime: mtime.map(time_or_now),
            atime: atime.map(time_or_now),
        };
        self.spawn("setattr", tracing::debug_span!("setattr", ino), async move {
            match fs.setattr(caller, ino, fh, changes).await {
                Ok(a) => reply.attr(&fs.ttl(), &file_attr(&a)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mknod", &self.fs.refuse("device nodes and FIFOs")));
    }

    fn mkdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let caller = caller(req);
        let resent = is_resent(req);
        let Some(name) = name_str(name) else { return reply.error(libc::EINVAL) };
        self.spawn("mkdir", tracing::debug_span!("mkdir", ino = parent, name = %name), async move {
            match fs.mkdir(caller, parent, &name, (mode & !umask & 0o7777) as u16).await {
                Ok(a) => reply.entry(&fs.ttl(), &file_attr(&a), 0),
                Err(FsError::Exists) if resent => reply_made_before(&fs, parent, &name, Kind::Dir, reply).await,
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let resent = is_resent(req);
        let Some(name) = name_str(name) else { return reply.error(libc::ENOENT) };
        self.spawn("unlink", tracing::debug_span!("unlink", ino = parent, name = %name), async move {
            match fs.unlink(parent, &name).await {
                Ok(()) => reply.ok(),
                // The previous process removed it and died before it could answer.
                Err(FsError::NotFound) if resent => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        let resent = is_resent(req);
        let Some(name) = name_str(name) else { return reply.error(libc::ENOENT) };
        self.spawn("rmdir", tracing::debug_span!("rmdir", ino = parent, name = %name), async move {
            match fs.rmdir(parent, &name).await {
                Ok(()) => reply.ok(),
                Err(FsError::NotFound) if resent => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn symlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let fs = Arc::clone(&self.fs);
        let caller = caller(req);
        let resent = is_resent(req);
        let (Some(name), Some(target)) = (name_str(name), target.to_str().map(str::to_owned)) else {
            return reply.error(libc::EINVAL);
        };
        self.spawn("symlink", tracing::debug_span!("symlink", ino = parent, name = %name), async move {
            match fs.symlink(caller, parent, &name, &target).await {
                Ok(a) => reply.entry(&fs.ttl(), &file_attr(&a), 0),
                Err(FsError::Exists) if resent => reply_made_before(&fs, parent, &name, Kind::Symlink, reply).await,
                Err(e) => reply.error(errno("symlink", &e)),
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let fs = Arc::clone(&self.fs);
        self.spawn("readlink", tracing::debug_span!("readlink", ino), async move {
            match fs.readlink(ino).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno("readlink", &e)),
            }
        });
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let fs = Arc::clone(&self.fs);
        let (Some(name), Some(newname)) = (name_str(name), name_str(newname)) else {
            return reply.error(libc::EINVAL);
        };
        let resent = is_resent(req);
        let span = tracing::debug_span!("rename", ino = parent, name = %name, newparent, newname = %newname);
        self.spawn("rename", span, async move {
            let renamed = if resent {
                fs.rename_resumed(parent, &name, newparent, &newname, flags).await
            } else {
                fs.rename(parent, &name, newparent, &newname, flags).await
            };
            match renamed {
                Ok(()) => reply.ok(),
                // The previous process renamed it and died before it could answer.
                Err(FsError::NotFound) if resent && fs.lookup(newparent, &newname).await.is_ok() => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    /// No ioctl applies to these files: `ENOTTY`, as a regular file on a local disk answers the
    /// terminal checks (`TCGETS`) that Python and others make on every open.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: u32,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        tracing::debug!(cmd, "ioctl not supported");
        reply.error(libc::ENOTTY);
    }

    fn link(&mut self, _req: &Request<'_>, _ino: u64, _newparent: u64, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(errno("link", &self.fs.refuse("hard links")));
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let fs = Arc::clone(&self.fs);
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        let data = data.to_vec();
        self.spawn("write", tracing::trace_span!("write", ino, fh, offset, len = data.len()), async move {
            match fs.write(fh, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, ino: u64, fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("flush", tracing::debug_span!("flush", ino, fh), async move {
            match fs.flush(fh).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.spawn("fsync", tracing::debug_span!("fsync", ino, fh), async move {
            match fs.flush(fh).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            }
        });
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = Arc::clone(&self.fs);
        let caller = caller(req);
        let Some(name) = name_str(name) else { return reply.error(libc::EINVAL) };
        self.spawn("create", tracing::debug_span!("create", ino = parent, name = %name), async move {
            match fs.create(caller, parent, &name, (mode & !umask & 0o7777) as u16, flags).await {
                Ok((a, fh)) => reply.created(&fs.ttl(), &file_attr(&a), 0, fh, 0),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }
}
