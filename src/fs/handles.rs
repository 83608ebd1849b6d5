//! Open files: handles (one enum for what a handle reads), opening, reading, writing, and the
//! writer lifecycle (`begin_writing` .. `end_writing`) around the file's write state.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use super::attrs::stat_from_meta;
use super::inode::{Inode, Kind, Stat};
use super::prefetch::{self, Access, ReadPattern};
use super::recovery::HandoverHandle;
use super::write::{self, OpenState};
use super::{Attr, Caller, FH_GENERATION_SHIFT, FsError, S3Fs};
use crate::cache::BlockKey;
use crate::s3::{ObjectId, ObjectMeta, ObjectStore, S3Error};

/// What an open file handle reads from.
pub(super) enum HandleSource {
    /// One object version (a read-only open while nobody here was writing the file).
    Object(Arc<ObjectId>, u64),
    /// The file's write state: a writer's own, or one a reader shares.
    State(Arc<OpenState>),
}

pub(super) struct FileHandle {
    ino: u64,
    writable: bool,
    source: Mutex<HandleSource>,
    pattern: Mutex<ReadPattern>,
}

impl FileHandle {
    pub(super) fn new(ino: u64, writable: bool, source: HandleSource) -> Self {
        FileHandle { ino, writable, source: Mutex::new(source), pattern: Mutex::new(ReadPattern::new()) }
    }

    /// The write state a read goes through, as on a local filesystem: the file's current one
    /// (so a reader sees what this mount wrote, and a read never shrinks the size the kernel
    /// believes), else the one this handle shares; `None` to read the handle's object.
    pub(super) fn read_state(&self, inode: &Inode) -> Option<Arc<OpenState>> {
        let mut source = self.source.lock().unwrap();
        if let HandleSource::State(own) = &*source
            && (own.is_unlinked() || self.writable)
        {
            // The file it opened is gone (or replaced): it keeps reading that one.
            return Some(Arc::clone(own));
        }
        match (inode.open_state(), &*source) {
            (Some(current), _) => {
                *source = HandleSource::State(Arc::clone(&current));
                Some(current)
            }
            (None, HandleSource::State(own)) => Some(Arc::clone(own)),
            (None, HandleSource::Object(..)) => None,
        }
    }

    /// The write state of a writable handle.
    pub(super) fn write_state(&self) -> Option<Arc<OpenState>> {
        match &*self.source.lock().unwrap() {
            HandleSource::State(s) if self.writable => Some(Arc::clone(s)),
            _ => None,
        }
    }

    pub(super) fn object(&self) -> Option<(Arc<ObjectId>, u64)> {
        match &*self.source.lock().unwrap() {
            HandleSource::Object(o, size) => Some((Arc::clone(o), *size)),
            HandleSource::State(_) => None,
        }
    }
}

/// How one read will be served, decided in kernel order (see [`S3Fs::plan_read`]): the handle
/// it was planned with and, for a read of an object, how to fetch it.
pub struct ReadPlan {
    handle: Option<Arc<FileHandle>>,
    access: Option<Access>,
}

impl<S: ObjectStore> S3Fs<S> {
    /// A new handle number: this process's generation in the high bits, a counter, and whether
    /// the handle writes in the low bit (so a successor knows what a lost handle was).
    pub(super) fn handle_number(&self, writable: bool) -> u64 {
        let n = self.next_fh.fetch_add(1, Ordering::Relaxed);
        (self.generation << FH_GENERATION_SHIFT) | (n << 1) | u64::from(writable)
    }

    /// Whether `fh` was handed out by an earlier process serving this connection.
    pub(super) fn is_foreign(&self, fh: u64) -> bool {
        self.generation > 1 && (fh >> FH_GENERATION_SHIFT) < self.generation
    }

    pub(super) fn new_handle(&self, handle: FileHandle) -> u64 {
        let fh = self.handle_number(handle.writable);
        self.files.lock().unwrap().insert(fh, Arc::new(handle));
        fh
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Arc<FileHandle>, FsError> {
        match self.files.lock().unwrap().get(&fh) {
            Some(h) => Ok(Arc::clone(h)),
            None if self.is_foreign(fh) && fh & 1 == 1 => Err(FsError::HandleLost),
            None => Err(FsError::BadHandle),
        }
    }

    /// Whether a request's handle needs [`S3Fs::adopt_handle`] first.
    pub fn needs_adoption(&self, fh: u64) -> bool {
        self.is_foreign(fh) && !self.files.lock().unwrap().contains_key(&fh)
    }

    /// Opens `ino` again under `fh`, a read-only handle of an earlier process serving this
    /// connection, so a descriptor open across a restart keeps reading. A writable one is lost.
    pub async fn adopt_handle(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        if !self.needs_adoption(fh) {
            return Ok(());
        }
        if fh & 1 == 1 {
            return Err(FsError::HandleLost);
        }
        self.open_as(ino, libc::O_RDONLY, Some(fh)).await.map(|_| ())
    }

    /// At a hand-over: commits every file open for writing and returns their handles, for the
    /// successor to open again ([`S3Fs::resume_handles`]).
    pub async fn hand_over(&self) -> Vec<HandoverHandle> {
        let writable: Vec<(u64, Arc<FileHandle>)> =
            self.files.lock().unwrap().iter().filter(|(_, h)| h.writable).map(|(fh, h)| (*fh, Arc::clone(h))).collect();
        let mut out = Vec::new();
        for (fh, handle) in writable {
            let committed = match self.flush(fh).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(fh, ino = handle.ino, error = %e, "cannot save a file open for writing at the hand-over; its next write fails");
                    false
                }
            };
            out.push(HandoverHandle { fh, ino: handle.ino, flags: libc::O_RDWR, committed });
        }
        out
    }

    /// Opens again the handles an earlier process handed over (committed ones; the others stay
    /// lost and fail with `EIO`).
    pub async fn resume_handles(&self, handles: Vec<HandoverHandle>) -> usize {
        let mut resumed = 0;
        for h in handles.into_iter().filter(|h| h.committed) {
            match self.open_as(h.ino, h.flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL), Some(h.fh)).await {
                Ok(_) => resumed += 1,
                Err(e) => {
                    tracing::warn!(fh = h.fh, ino = h.ino, error = %e, "cannot open a handed-over file again; its next write fails")
                }
            }
        }
        resumed
    }

    /// The current object behind `inode`, for a read-only open. An object small enough to be
    /// one cache block (by the size known so far) is fetched whole by a GET that also returns
    /// its metadata: one round trip instead of a HEAD and a GET, and the read that follows is a
    /// cache hit. Larger ones, whose reads may never touch the start, get a HEAD.
    pub(super) async fn fetch_for_open(&self, inode: &Inode) -> Result<ObjectMeta, FsError> {
        let known = inode.stat().size;
        if known == 0 || known > prefetch::BLOCK_SIZE {
            return self.head(inode).await;
        }
        match self.store.get_object_start(&self.inodes.key(inode), prefetch::BLOCK_SIZE).await {
            Ok(start) => {
                self.refresh(inode, &start.meta);
                if start.data.len() as u64 == prefetch::block_len(0, start.meta.size) && !start.data.is_empty() {
                    let object = Arc::new(ObjectId::from_meta(&start.meta));
                    self.fetcher.cache().insert(BlockKey { object, index: 0 }, start.data);
                }
                Ok(start.meta)
            }
            Err(S3Error::NotFound(_)) => {
                self.inodes.unlink_name(inode.parent(), &inode.name());
                Err(FsError::NotFound)
            }
            // The body broke off or stalled: a HEAD (retried by the SDK) still opens the file,
            // and its read goes through the fetcher, which retries too.
            Err(e) if e.is_transient() => {
                tracing::debug!(key = %self.inodes.key(inode), error = %e, "GET at open failed; opening with a HEAD");
                self.head(inode).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One more writer on the file's write state, if it has one. The writer is added under the
    /// inode's slot lock, so the last writer's `end_writing` cannot detach the state meanwhile.
    pub(super) fn join_writing(&self, inode: &Inode) -> Option<Arc<OpenState>> {
        let slot = inode.open.lock().unwrap();
        slot.as_ref().map(|state| {
            state.add_writer();
            Arc::clone(state)
        })
    }

    /// Points the read-only handles of `ino` at its new write state, so they read what this
    /// mount writes (as on a local filesystem), also after the state is committed and detached.
    /// Handles of a file unlinked or replaced meanwhile keep what they read.
    fn adopt(&self, ino: u64, state: &Arc<OpenState>) {
        for handle in self.files.lock().unwrap().values().filter(|h| h.ino == ino && !h.writable) {
            let mut source = handle.source.lock().unwrap();
            let stale = match &*source {
                HandleSource::Object(..) => true,
                HandleSource::State(own) => !own.is_unlinked() && !Arc::ptr_eq(own, state),
            };
            if stale {
                *source = HandleSource::State(Arc::clone(state));
            }
        }
    }

    /// Opens a file. Read-only opens always ask S3 for the current object, so a reopened file
    /// never serves an old version; opens for writing share the file's write state.
    pub async fn open(&self, ino: u64, flags: i32) -> Result<u64, FsError> {
        self.open_as(ino, flags, None).await
    }

    /// [`S3Fs::open`], under the handle number `at` when given.
    async fn open_as(&self, ino: u64, flags: i32, at: Option<u64>) -> Result<u64, FsError> {
        let new_handle = |handle: FileHandle| match at {
            Some(fh) => {
                self.files.lock().unwrap().insert(fh, Arc::new(handle));
                fh
            }
            None => self.new_handle(handle),
        };
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags & libc::O_TRUNC != 0;
        if !writable && !truncate {
            if let Some(state) = inode.open_state() {
                return Ok(new_handle(FileHandle::new(ino, false, HandleSource::State(state))));
            }
            let meta = self.fetch_for_open(&inode).await?;
            let object = HandleSource::Object(Arc::new(ObjectId::from_meta(&meta)), meta.size);
            return Ok(new_handle(FileHandle::new(ino, false, object)));
        }
        self.check_writable()?;
        if !writable {
            // O_RDONLY|O_TRUNC: truncates like a writer that closes at once.
            let state = self.begin_writing(&inode, true).await?;
            self.end_writing(&inode, &state).await?;
            return Ok(new_handle(FileHandle::new(ino, false, HandleSource::State(state))));
        }
        let state = self.begin_writing(&inode, truncate).await?;
        Ok(new_handle(FileHandle::new(ino, true, HandleSource::State(state))))
    }

    /// Creates and opens a new file; it reaches S3 when first flushed or closed.
    pub async fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &str,
        mode: u16,
        flags: i32,
    ) -> Result<(Attr, u64), FsError> {
        self.check_writable()?;
        let dir = self.settled_dir(parent).await?;
        self.check_new_name(&dir, name)?;
        if flags & libc::O_EXCL != 0 && self.resolve(&dir, name, false).await.is_ok() {
            return Err(FsError::Exists);
        }
        let mut stat = Stat::new(0, SystemTime::now());
        stat.from_head = true;
        self.set_new_owner(&mut stat, caller, &dir, Kind::File, mode);
        let inode = self.inodes.upsert(&dir, name, Kind::File, stat, true);
        let state = OpenState::new_empty(inode.stat().attrs, true);
        state.add_writer();
        if let Some(old) = inode.open.lock().unwrap().replace(Arc::clone(&state)) {
            old.mark_unlinked();
        }
        self.adopt(inode.ino, &state);
        let fh = self.new_handle(FileHandle::new(inode.ino, true, HandleSource::State(state)));
        Ok((self.attr(&inode), fh))
    }

    /// Reads up to `size` bytes at `offset`; short at end of file. Returns block slices.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<Bytes>, FsError> {
        let plan = self.plan_read(fh, offset, size);
        self.read_planned(fh, offset, size, plan).await
    }

    /// Records a read in its handle's access pattern. Called in the order the kernel sent the
    /// reads (on the FUSE thread), so concurrent tasks cannot reorder a sequential scan.
    pub fn plan_read(&self, fh: u64, offset: u64, size: u32) -> ReadPlan {
        let Ok(handle) = self.handle(fh) else { return ReadPlan { handle: None, access: None } };
        let writing = self.inodes.get(handle.ino).is_some_and(|i| i.open_state().is_some());
        let access = match handle.object().filter(|_| !writing) {
            Some((_, obj_size)) => {
                let end = offset.saturating_add(u64::from(size)).min(obj_size);
                (offset < end).then(|| handle.pattern.lock().unwrap().on_read(offset, end - offset, &self.fetcher))
            }
            None => None,
        };
        tracing::trace!(offset, size, ?access, "read");
        ReadPlan { handle: Some(handle), access }
    }

    /// Serves a read planned with [`S3Fs::plan_read`].
    pub async fn read_planned(&self, fh: u64, offset: u64, size: u32, plan: ReadPlan) -> Result<Vec<Bytes>, FsError> {
        let handle = match plan.handle {
            Some(handle) => handle,
            None => self.handle(fh)?,
        };
        let inode = self.inode(handle.ino)?;
        if let Some(state) = handle.read_state(&inode) {
            let key = || self.inodes.key(&inode);
            let read = state.read(&self.writes, &key, offset, u64::from(size)).await;
            self.published(&inode, &state, state.take_committed());
            return read;
        }
        let Some((object, obj_size)) = handle.object() else { return Ok(Vec::new()) };
        let end = offset.saturating_add(u64::from(size)).min(obj_size);
        let access = match plan.access {
            Some(access) => access,
            // Planned while another handle was writing, which has since closed.
            None => Access::Random,
        };
        if offset >= end {
            return Ok(Vec::new());
        }
        match self.fetcher.read(&object, obj_size, offset..end, access).await {
            Ok(parts) => Ok(parts),
            // The version this handle opened was deleted: like a replaced one, it is stale.
            Err(S3Error::NotFound(_)) => Err(FsError::ObjectChanged),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let handle = self.handle(fh)?;
        let state = handle.write_state().ok_or(FsError::BadHandle)?;
        let inode = self.inode(handle.ino)?;
        let key = || self.inodes.key(&inode);
        let written = state.write(&self.writes, &key, offset, data).await;
        self.published(&inode, &state, state.take_committed());
        written?;
        Ok(data.len() as u32)
    }

    /// Commits the file behind `fh` (close and fsync both call this).
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            // A read-only descriptor from before a restart, closed without a read since.
            Err(FsError::BadHandle) if self.is_foreign(fh) => return Ok(()),
            Err(e) => return Err(e),
        };
        let inode = self.inode(handle.ino)?;
        let state = match &*handle.source.lock().unwrap() {
            HandleSource::State(s) => Arc::clone(s),
            HandleSource::Object(..) => match inode.open_state() {
                // Any descriptor's close commits what the file's writers wrote so far.
                Some(s) => s,
                None => return Ok(()),
            },
        };
        self.commit(&inode, &state).await
    }

    pub(super) async fn commit(&self, inode: &Inode, state: &OpenState) -> Result<(), FsError> {
        let key = || self.inodes.key(inode);
        let committed = state.commit(&self.writes, &key).await?;
        self.published(inode, state, committed);
        Ok(())
    }

    /// Takes what a commit wrote into the inode and its directory's record.
    pub(super) fn published(&self, inode: &Inode, state: &OpenState, committed: Option<write::Committed>) {
        if let Some((object, attrs)) = committed {
            let mut stat = inode.stat();
            stat.size = state.size();
            stat.etag = Some(object.version.clone());
            stat.mtime = attrs.mtime.unwrap_or_else(|| state.mtime());
            self.note_entry(
                inode.parent(),
                &inode.name(),
                inode.kind,
                Self::file_entry(&object.version, stat.size, &attrs, None),
            );
            stat.attrs = attrs;
            stat.from_head = true;
            stat.validated_at = Instant::now();
            inode.set_stat(stat);
        }
    }

    pub async fn release(&self, fh: u64) -> Result<(), FsError> {
        let Some(handle) = self.files.lock().unwrap().remove(&fh) else { return Ok(()) };
        let Some(state) = handle.write_state() else { return Ok(()) };
        let inode = self.inode(handle.ino)?;
        self.end_writing(&inode, &state).await
    }

    /// The file's write state, created (from S3, or empty to truncate) when needed, with one
    /// more writer. Every writer ends with [`S3Fs::end_writing`].
    pub(super) async fn begin_writing(&self, inode: &Inode, truncate: bool) -> Result<Arc<OpenState>, FsError> {
        let state = match self.join_writing(inode) {
            Some(state) => state,
            None => {
                let fresh = self.new_state(inode, truncate).await?;
                let state = {
                    let mut slot = inode.open.lock().unwrap();
                    let state = Arc::clone(slot.get_or_insert(fresh));
                    state.add_writer();
                    state
                };
                self.adopt(inode.ino, &state);
                state
            }
        };
        if truncate && state.size() != 0 {
            let key = || self.inodes.key(inode);
            if let Err(e) = state.truncate(&self.writes, &key, 0).await {
                self.end_writing(inode, &state).await?;
                return Err(e);
            }
        }
        Ok(state)
    }

    /// A new write state for `inode`: empty (to truncate) or over its current object.
    async fn new_state(&self, inode: &Inode, truncate: bool) -> Result<Arc<OpenState>, FsError> {
        if truncate {
            // The new content keeps the file's attributes: known from a HEAD (or a record that
            // vouches for them) within the TTL, else asked for now.
            let stat = inode.stat();
            let attrs = if stat.from_head && self.fresh(&stat) {
                stat.attrs
            } else {
                stat_from_meta(&self.head(inode).await?).attrs
            };
            return Ok(OpenState::new_empty(attrs, false));
        }
        let meta = self.head(inode).await?;
        let stat = stat_from_meta(&meta);
        let object = Arc::new(ObjectId::from_meta(&meta));
        Ok(OpenState::from_object(&self.writes, object, meta.size, stat.attrs, stat.mtime))
    }

    /// One writer is done: the last commits the file and detaches the state from the inode.
    /// Readers still holding the state keep reading it; its resources go with the last of them.
    pub(super) async fn end_writing(&self, inode: &Inode, state: &Arc<OpenState>) -> Result<(), FsError> {
        if !state.remove_writer() {
            return Ok(());
        }
        let result = self.commit(inode, state).await;
        let detached = {
            // Writers join under this lock: none can have joined once it shows none.
            let mut slot = inode.open.lock().unwrap();
            let ours = slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, state));
            if ours && state.writers() == 0 {
                *slot = None;
            }
            ours && slot.is_none()
        };
        if detached {
            if state.is_unlinked() {
                // Never committed; readers still holding it see its size from here.
                let mut stat = inode.stat();
                (stat.size, stat.mtime) = (state.size(), state.mtime());
                inode.set_stat(stat);
            }
            // The kernel may have forgotten the inode while it was still being written.
            self.inodes.forget(inode.ino, 0);
        }
        result
    }
}
