//! The write path: one state machine per file open for writing.
//!
//! A file open for writing has one [`OpenState`], shared by every handle on it (and by readers
//! that open or read it meanwhile). It holds the file's size (the only copy while the file is
//! open: the inode and the kernel are told from here), its mtime, and an [`OpenFile`] whose
//! `body` is:
//! - **Streaming**: a new or truncated file written strictly sequentially. Full parts go up as a
//!   [`multipart::Multipart`] upload while the program writes, each holding permits of the write
//!   budget (`--write-buffer-size`), so memory stays bounded; a small file is one PUT.
//! - **Staged**: everything else (random writes, appends to an existing object, truncation).
//!   Written ranges live in a sparse file under the staging directory ([`staging`]), charged
//!   against `--max-staging-size` (ENOSPC when full); unchanged ranges stay in S3 and are read
//!   through the block cache, or copied server side with UploadPartCopy when the file is
//!   committed.
//!
//! and whose `status` is:
//!
//! ```text
//!   Clean ──write/truncate/attrs──▶ Dirty ──commit ok──▶ Clean
//!                                     │
//!                                     └──commit or part upload fails──▶ Failed
//!   Failed ──truncate to 0──▶ Dirty        (every other write and commit: EIO)
//! ```
//!
//! Commit (on `flush`/`fsync`/last `release`) makes S3 hold exactly the bytes written: a PUT or
//! a completed multipart upload. On failure the upload is aborted (one policy, in
//! [`multipart`]), nothing partial becomes visible, and the error reaches `close`/`fsync` as EIO.
//!
//! A streaming file that sees a non-sequential write, a truncate or a read continues staged:
//! below one part its buffer moves to a staging file and nothing is committed; once a part has
//! been uploaded, the bytes written so far are committed first (S3 cannot read back the parts of
//! an unfinished upload).
//!
//! Resources follow ownership: a state lives while the inode or any handle holds it; dropping
//! it refunds its staged bytes, removes its staging file and aborts an unfinished upload.
//!
//! Times: the file's mtime is the time of its last data change (write, truncate) or the time a
//! `utimes` set, whichever came last. Every upload stores the mtime the file has when the upload
//! begins, and after a commit the file reports exactly the stored value, so its mtime never
//! changes by itself afterwards. (A streamed multipart upload begins with its first part: the
//! stored mtime is that moment, and the file reports it from then on, also while it is still
//! being written; a `utimes` that comes later is stored too.)

pub mod multipart;
pub mod staging;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use multipart::Multipart;
pub use multipart::Uploads;
use staging::Staged;
pub use staging::{RangeSet, Source, Staging};

use super::FsError;
use super::attrs::StoredAttrs;
use super::prefetch::Fetcher;
use crate::s3::{Copied, ObjectId, ObjectStore};

const MIB: u64 = 1 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// S3's minimum size of every part but the last.
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest object (5 TiB): a file may not grow past it (`EFBIG`).
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
/// Parts per size step when streaming: after every 1,000 parts the part size doubles, so a
/// stream of unknown length never reaches 10,000 parts (8 MiB parts reach ~8 TiB).
const PARTS_PER_STEP: i32 = 1000;
/// First capacity of a streaming part's buffer: small files stay small.
const PART_BUFFER_START: usize = 64 << 10;
/// Concurrent part uploads or copies while committing a staged file.
const COMMIT_CONCURRENCY: usize = 8;

/// The file's current S3 key, asked for once the file's lock is held: a rename holds the lock
/// while it moves the file, so an operation that waited for it uses the new key.
pub type Key<'a> = &'a (dyn Fn() -> String + Send + Sync);

/// What a commit wrote: the object and the attributes stored with it.
pub type Committed = (ObjectId, StoredAttrs);

/// Write-path settings.
#[derive(Debug, Clone)]
pub struct WriteConfig {
    pub part_size: u64,
    pub buffer_bytes: u64,
    pub staging_dir: std::path::PathBuf,
    pub staging_bytes: u64,
}

/// Everything the write path needs from the filesystem.
pub struct WriteCtx<S> {
    pub store: Arc<S>,
    pub uploads: Arc<Uploads>,
    pub fetcher: Arc<Fetcher<S>>,
    pub config: WriteConfig,
    pub budget: Arc<Semaphore>,
    pub staging: Arc<Staging>,
}

impl<S: ObjectStore> WriteCtx<S> {
    pub fn new(store: Arc<S>, fetcher: Arc<Fetcher<S>>, config: WriteConfig) -> std::io::Result<Self> {
        let permits = (config.buffer_bytes / MIB).max(config.part_size.div_ceil(MIB)) as usize;
        let staging = Arc::new(Staging::new(config.staging_dir.clone(), config.staging_bytes)?);
        let uploads = Uploads::new(Arc::clone(&store) as Arc<dyn ObjectStore>);
        Ok(WriteCtx { store, uploads, fetcher, budget: Arc::new(Semaphore::new(permits)), staging, config })
    }

    /// Write-budget permits (MiB) for a part of `len` bytes; capped so one part always fits.
    async fn hold_budget(&self, len: u64) -> OwnedSemaphorePermit {
        let total = (self.config.buffer_bytes / MIB).max(self.config.part_size.div_ceil(MIB));
        let permits = len.div_ceil(MIB).clamp(1, total) as u32;
        Arc::clone(&self.budget).acquire_many_owned(permits).await.expect("write budget semaphore is never closed")
    }

    /// Part size for a staged commit of `size` bytes: the configured size, grown (in whole MiB)
    /// so the upload needs at most 10,000 parts.
    pub fn commit_part_size(&self, size: u64) -> u64 {
        let min = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
        self.config.part_size.max(min).max(MIN_PART_SIZE)
    }

    /// Part size of streaming part `number` (1-based).
    pub fn stream_part_size(&self, number: i32) -> u64 {
        let step = ((number - 1) / PARTS_PER_STEP).min(20) as u32;
        self.config.part_size.saturating_mul(1u64 << step)
    }
}

/// A streaming body: the part being filled and the upload the full ones went to.
#[derive(Default)]
struct Streamer {
    buf: BytesMut,
    upload: Option<Multipart>,
    /// The attributes (with mtime) stored when the multipart upload began.
    sent: Option<StoredAttrs>,
}

enum Body {
    Streaming(Streamer),
    Staged(Staged),
}

/// Where the file stands against S3.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    /// S3 holds exactly this content and these attributes.
    Clean,
    /// Changed here since the last commit.
    Dirty,
    /// An upload failed: every later write and commit fails until the file is truncated to
    /// zero, so a failed file is never replaced by a partial or empty object.
    Failed(String),
}

/// What is shared without waiting for an upload in progress.
struct Shared {
    /// The file's size: the only copy while the file is open.
    size: AtomicU64,
    /// The modification time the mount reports for the file.
    mtime: Mutex<SystemTime>,
    writers: AtomicU64,
    /// Never committed to S3 yet (a file created here): listings must show it from memory.
    pending: AtomicBool,
    unlinked: AtomicBool,
    /// The last commit not yet reported to the filesystem (one made on the way, by a read or an
    /// out-of-order write of a streamed file, is reported after that operation).
    committed: Mutex<Option<Committed>>,
}

impl Shared {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }
}

/// The dirty state of one file, behind the state's lock.
pub struct OpenFile {
    status: Status,
    /// Attributes to store with the next commit (mode, owner, symlink marker, other metadata);
    /// the mtime stored is `mtime`.
    attrs: StoredAttrs,
    mtime: SystemTime,
    /// `mtime` was set by `utimes` after the last data change.
    mtime_explicit: bool,
    body: Body,
}

/// Shared per-inode write state.
pub struct OpenState {
    shared: Shared,
    file: tokio::sync::Mutex<OpenFile>,
}

impl std::fmt::Debug for OpenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenState")
            .field("size", &self.size())
            .field("writers", &self.writers())
            .finish_non_exhaustive()
    }
}

fn too_big(end: u64) -> Result<(), FsError> {
    if end > MAX_OBJECT_SIZE { Err(FsError::TooBig) } else { Ok(()) }
}

impl OpenState {
    fn with(size: u64, pending: bool, file: OpenFile) -> Arc<Self> {
        Arc::new(OpenState {
            shared: Shared {
                size: AtomicU64::new(size),
                mtime: Mutex::new(file.mtime),
                writers: AtomicU64::new(0),
                pending: AtomicBool::new(pending),
                unlinked: AtomicBool::new(false),
                committed: Mutex::new(None),
            },
            file: tokio::sync::Mutex::new(file),
        })
    }

    /// A new, empty file (create, or open with O_TRUNC); its mtime is now.
    pub fn new_empty(attrs: StoredAttrs, pending: bool) -> Arc<Self> {
        let file = OpenFile {
            status: Status::Dirty,
            attrs,
            mtime: SystemTime::now(),
            mtime_explicit: false,
            body: Body::Streaming(Streamer::default()),
        };
        Self::with(0, pending, file)
    }

    /// An existing object opened for writing without truncation, with its stored attributes and
    /// the mtime the mount reports for it.
    pub fn from_object<S>(
        ctx: &WriteCtx<S>,
        object: Arc<ObjectId>,
        size: u64,
        attrs: StoredAttrs,
        mtime: SystemTime,
    ) -> Arc<Self> {
        let body = Body::Staged(Staged::over(&ctx.staging, Some(Source::whole(object, size))));
        Self::with(size, false, OpenFile { status: Status::Clean, attrs, mtime, mtime_explicit: false, body })
    }

    pub fn size(&self) -> u64 {
        self.shared.size()
    }

    /// The modification time the mount reports for the file.
    pub fn mtime(&self) -> SystemTime {
        *self.shared.mtime.lock().unwrap()
    }

    pub fn is_pending(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) && !self.is_unlinked()
    }

    pub fn mark_unlinked(&self) {
        self.shared.unlinked.store(true, Ordering::Relaxed);
    }

    /// Holds the file's lock (so no write, truncate or commit of it runs) while a rename or an
    /// unlink moves or removes its object; see [`Held`].
    pub async fn hold(&self) -> Held<'_> {
        Held { state: self, file: self.file.lock().await }
    }

    /// The last commit not yet reported (see [`Shared::committed`]).
    pub fn take_committed(&self) -> Option<Committed> {
        self.shared.committed.lock().unwrap().take()
    }

    pub fn is_unlinked(&self) -> bool {
        self.shared.unlinked.load(Ordering::Relaxed)
    }

    pub fn add_writer(&self) {
        self.shared.writers.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops one writer; true when it was the last.
    pub fn remove_writer(&self) -> bool {
        self.shared.writers.fetch_sub(1, Ordering::Relaxed) == 1
    }

    pub fn writers(&self) -> u64 {
        self.shared.writers.load(Ordering::Relaxed)
    }

    fn publish_mtime(&self, f: &OpenFile) {
        *self.shared.mtime.lock().unwrap() = f.mtime;
    }

    /// Writes `data` at `offset`.
    pub async fn write<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: Key<'_>,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FsError> {
        too_big(offset.saturating_add(data.len() as u64))?;
        let mut f = self.file.lock().await;
        let key = &key();
        if let Status::Failed(e) = &f.status {
            return Err(FsError::UploadFailed(e.clone()));
        }
        // An empty file (one committed empty by the FLUSH of a `dup2`-then-`close`, as shells
        // and `dd` do before writing) streams again: nothing of it needs keeping.
        if self.size() == 0
            && let Body::Staged(sg) = &f.body
            && sg.holds_nothing()
        {
            f.body = Body::Streaming(Streamer::default());
        }
        let streaming_append = matches!(f.body, Body::Streaming(_)) && offset == self.size();
        let result = async {
            if !streaming_append {
                f.ensure_staged(ctx, key, &self.shared).await?;
            }
            f.write(ctx, key, offset, data, &self.shared).await
        }
        .await;
        self.publish_mtime(&f);
        result
    }

    /// Reads what the file holds now (written here or not), without committing it.
    pub async fn read<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: Key<'_>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, FsError> {
        let mut f = self.file.lock().await;
        let key = &key();
        f.ensure_staged(ctx, key, &self.shared).await?;
        self.publish_mtime(&f);
        let Body::Staged(sg) = &f.body else { unreachable!("ensure_staged ran") };
        sg.read(&ctx.fetcher, self.size(), offset, len).await
    }

    pub async fn truncate<S: ObjectStore>(&self, ctx: &WriteCtx<S>, key: Key<'_>, size: u64) -> Result<(), FsError> {
        too_big(size)?;
        let mut f = self.file.lock().await;
        let key = &key();
        f.touch();
        let result = async {
            if size == 0 {
                f.reset_empty(&self.shared).await;
                return Ok(());
            }
            if let Status::Failed(e) = &f.status {
                return Err(FsError::UploadFailed(e.clone()));
            }
            f.status = Status::Dirty;
            if size == self.size() && matches!(f.body, Body::Streaming(_)) {
                return Ok(());
            }
            f.ensure_staged(ctx, key, &self.shared).await?;
            let Body::Staged(sg) = &mut f.body else { unreachable!("ensure_staged ran") };
            sg.truncate(size).await?;
            self.shared.set_size(size);
            Ok(())
        }
        .await;
        self.publish_mtime(&f);
        result
    }

    /// Changes attributes (and, with `mtime`, sets the modification time as `utimes` does);
    /// they are stored with the next commit.
    pub async fn update_attrs(&self, change: impl FnOnce(&mut StoredAttrs), mtime: Option<SystemTime>) {
        let mut f = self.file.lock().await;
        change(&mut f.attrs);
        if let Some(t) = mtime {
            f.mtime = t;
            f.mtime_explicit = true;
        }
        if f.status == Status::Clean {
            f.status = Status::Dirty;
        }
        self.publish_mtime(&f);
    }

    /// The attributes as they will be stored, with the file's current mtime.
    pub async fn attrs(&self) -> StoredAttrs {
        self.file.lock().await.upload_attrs()
    }

    /// Commits the file to S3 if it changed. Returns the new object and the attributes stored
    /// with it (its `mtime` is what the file reports from now on) when one was written.
    pub async fn commit<S: ObjectStore>(&self, ctx: &WriteCtx<S>, key: Key<'_>) -> Result<Option<Committed>, FsError> {
        let mut held = self.hold().await;
        let key = key();
        held.commit(ctx, &key).await
    }
}

/// A file's lock, held by a rename or an unlink across its S3 calls (see [`OpenState::hold`]).
pub struct Held<'a> {
    state: &'a OpenState,
    file: tokio::sync::MutexGuard<'a, OpenFile>,
}

impl Held<'_> {
    /// Commits the file under `key` if it changed (see [`OpenState::commit`]).
    pub async fn commit<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) -> Result<Option<Committed>, FsError> {
        let sh = &self.state.shared;
        if self.state.is_unlinked() || self.file.status == Status::Clean {
            return Ok(self.state.take_committed());
        }
        let result = self.file.commit(ctx, key, sh).await;
        self.state.publish_mtime(&self.file);
        match result {
            Ok(_) => Ok(self.state.take_committed()),
            Err(e) => {
                tracing::error!(key, error = %e, "upload failed; the object in S3 is unchanged and the \
                    written data was not saved");
                Err(e)
            }
        }
    }

    /// The S3 object unchanged ranges come from, if any (its key moves with a rename).
    pub fn source_key(&self) -> Option<String> {
        match &self.file.body {
            Body::Staged(sg) => sg.source.as_ref().map(|s| s.object.key.clone()),
            Body::Streaming(_) => None,
        }
    }

    /// Points unchanged ranges at `object`, a copy of the current source under a new key (after
    /// a rename).
    pub fn rebase(&mut self, object: ObjectId) {
        if let Body::Staged(sg) = &mut self.file.body
            && let Some(source) = &mut sg.source
        {
            source.object = Arc::new(object);
        }
    }

    /// Before the object is deleted (an unlink, or a rename over the file): copies what still
    /// lives only in S3 to the staging area, so the descriptors open on the file keep reading
    /// it, as on a local filesystem (within the staging budget; otherwise those reads fail with
    /// `ESTALE`, logged).
    pub async fn keep_bytes<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) {
        let size = self.state.size();
        if let Body::Staged(sg) = &mut self.file.body
            && let Err(e) = sg.localize(&ctx.fetcher, size, key).await
        {
            tracing::warn!(key, error = %e, "cannot keep the bytes of a file unlinked while open; \
                reads through its open descriptors will fail");
        }
    }

    /// The object is gone: nothing commits the file any more. Call once the delete succeeded.
    pub fn mark_unlinked(&self) {
        self.state.mark_unlinked();
    }
}

impl OpenFile {
    /// A data change: the mtime becomes now, replacing an earlier `utimes` value.
    fn touch(&mut self) {
        self.mtime = SystemTime::now();
        self.mtime_explicit = false;
    }

    /// The attributes to store, with the current mtime.
    fn upload_attrs(&self) -> StoredAttrs {
        StoredAttrs { mtime: Some(self.mtime), ..self.attrs.clone() }
    }

    fn fail(&mut self, e: &FsError) {
        self.status = Status::Failed(e.to_string());
    }

    async fn write<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        offset: u64,
        data: &[u8],
        sh: &Shared,
    ) -> Result<(), FsError> {
        self.status = Status::Dirty;
        self.touch();
        // A multipart upload stores the mtime it began with: from then on the file reports
        // that one, so its mtime does not jump back at commit.
        if let Body::Streaming(st) = &self.body
            && let Some(began) = st.sent.as_ref().and_then(|a| a.mtime)
        {
            self.mtime = began;
        }
        let (mtime, base) = (self.mtime, &self.attrs);
        match &mut self.body {
            Body::Streaming(st) => {
                sh.set_size(sh.size() + data.len() as u64);
                let mut data = data;
                while !data.is_empty() {
                    let number = st.upload.as_ref().map_or(1, Multipart::next_number);
                    // A part's buffer grows by doubling (the first part's from 64 KiB) but never
                    // past the part size, so a part holds no more memory than the write budget
                    // charges it and a small file no more than about twice its size.
                    let part_size = ctx.stream_part_size(number) as usize;
                    let take = (part_size - st.buf.len()).min(data.len());
                    if st.buf.capacity() < st.buf.len() + take {
                        // After a full part the file is evidently large: take whole parts at once.
                        let start = if number > 1 { part_size } else { PART_BUFFER_START };
                        let want = (st.buf.capacity() * 2).max(st.buf.len() + take).max(start);
                        let mut grown = BytesMut::with_capacity(want.min(part_size));
                        grown.extend_from_slice(&st.buf);
                        st.buf = grown;
                    }
                    st.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if st.buf.len() < part_size {
                        break;
                    }
                    let part = std::mem::take(&mut st.buf).freeze();
                    // Stored only when this part begins the upload; built per part, not per write.
                    let attrs = StoredAttrs { mtime: Some(mtime), ..base.clone() };
                    if let Err(e) = st.send_part(ctx, key, &attrs, part).await {
                        if let Some(upload) = st.upload.take() {
                            upload.abort().await;
                        }
                        let e = FsError::from(e);
                        self.fail(&e);
                        return Err(e);
                    }
                }
                Ok(())
            }
            Body::Staged(sg) => {
                sg.write(key, offset, data).await?;
                sh.set_size(sh.size().max(offset + data.len() as u64));
                Ok(())
            }
        }
    }

    /// Back to an empty streaming file (truncate to 0), dropping uploads and staged data.
    async fn reset_empty(&mut self, sh: &Shared) {
        let old = std::mem::replace(&mut self.body, Body::Streaming(Streamer::default()));
        if let Body::Streaming(Streamer { upload: Some(upload), .. }) = old {
            upload.abort().await;
        }
        sh.set_size(0);
        self.status = Status::Dirty;
    }

    /// Converts a streaming body to a staged one. Below one part the buffer moves to a staging
    /// file; once a part went up, what was streamed is committed first.
    async fn ensure_staged<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        sh: &Shared,
    ) -> Result<(), FsError> {
        let Body::Streaming(st) = &mut self.body else { return Ok(()) };
        if st.upload.is_none() {
            // The buffer stays until the staging file holds it (it may be full: ENOSPC).
            let mut staged = Staged::over(&ctx.staging, None);
            if !st.buf.is_empty() {
                staged.write(key, 0, &st.buf).await?;
            }
            self.body = Body::Staged(staged);
            return Ok(());
        }
        if sh.unlinked.load(Ordering::Relaxed) {
            // Committing would bring an unlinked file back; its streamed parts cannot be read.
            return Err(FsError::Local(format!(
                "{key} was unlinked after parts of it were uploaded; they cannot be read back"
            )));
        }
        self.commit(ctx, key, sh).await?;
        Ok(())
    }

    /// Uploads the current content; on success the object in S3 is exactly the file.
    async fn commit<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str, sh: &Shared) -> Result<ObjectId, FsError> {
        if let Status::Failed(e) = &self.status {
            return Err(FsError::UploadFailed(e.clone()));
        }
        let result = self.try_commit(ctx, key, sh).await;
        match &result {
            Ok(object) => {
                self.status = Status::Clean;
                sh.pending.store(false, Ordering::Relaxed);
                *sh.committed.lock().unwrap() = Some((object.clone(), self.upload_attrs()));
            }
            Err(e) => self.fail(e),
        }
        result
    }

    async fn try_commit<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        sh: &Shared,
    ) -> Result<ObjectId, FsError> {
        let attrs = self.upload_attrs();
        let size = sh.size();
        let (etag, stored) = match &mut self.body {
            Body::Streaming(st) => st.finish(ctx, key, &attrs).await?,
            Body::Staged(sg) => (commit_staged(ctx, sg, key, &attrs, size).await?, attrs.clone()),
        };
        let mut object = resolve_etag(ctx, key, etag, size).await?;
        // A multipart upload stores the attributes it began with. Attributes changed since (a
        // chmod or utimes while streaming) are stored by copying the object onto itself; a
        // later write only moved the mtime, so the file reports the stored one.
        let explicit_mtime = self.mtime_explicit && stored.mtime != attrs.mtime;
        let changed = !stored.same_except_times(&attrs) || explicit_mtime || stored.atime != attrs.atime;
        if changed && size <= super::COPY_OBJECT_MAX {
            let copied = ctx.store.copy_object(&object, key, Some(&attrs.encode())).await.map_err(FsError::from)?;
            object = ObjectId { key: key.to_owned(), version: copied.etag, has_etag: true };
        } else {
            if changed {
                tracing::warn!(
                    key,
                    "attributes changed while this file over 5 GiB was streaming are not stored; \
                    set them again after close"
                );
                self.attrs = StoredAttrs { mtime: None, ..stored.clone() };
            }
            if let Some(t) = stored.mtime {
                self.mtime = t;
            }
        }
        // The committed object is now the source; local data can go.
        let source = Some(Source::whole(Arc::new(object.clone()), size));
        match &mut self.body {
            Body::Staged(sg) => sg.settle(source),
            Body::Streaming(_) => self.body = Body::Staged(Staged::over(&ctx.staging, source)),
        }
        Ok(object)
    }
}

impl Streamer {
    /// Sends `part` as the next part, starting the upload with the first; waits for
    /// write-budget permits first.
    async fn send_part<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        attrs: &StoredAttrs,
        part: Bytes,
    ) -> Result<(), crate::s3::S3Error> {
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => {
                let upload = ctx.uploads.begin(key, &attrs.encode()).await?;
                self.sent = Some(attrs.clone());
                self.upload.insert(upload)
            }
        };
        // Surface failures of earlier parts as early as possible.
        upload.check()?;
        let permit = ctx.hold_budget(part.len() as u64).await;
        upload.upload(part, vec![permit]);
        Ok(())
    }

    /// Completes the stream (one PUT below a part); returns the ETag and the attributes stored.
    async fn finish<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        attrs: &StoredAttrs,
    ) -> Result<(String, StoredAttrs), FsError> {
        if self.upload.is_none() {
            let body = std::mem::take(&mut self.buf).freeze();
            return Ok((ctx.store.put_object(key, body, &attrs.encode()).await?, attrs.clone()));
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf).freeze();
            if let Err(e) = self.send_part(ctx, key, attrs, last).await {
                if let Some(upload) = self.upload.take() {
                    upload.abort().await;
                }
                return Err(e.into());
            }
        }
        let upload = self.upload.take().expect("checked above");
        let stored = self.sent.take().unwrap_or_else(|| attrs.clone());
        Ok((upload.complete().await?, stored))
    }
}

/// Uploads a staged body of `size` bytes: one PUT up to a part, else a multipart upload that
/// copies unchanged whole parts server side and uploads the rest.
async fn commit_staged<S: ObjectStore>(
    ctx: &WriteCtx<S>,
    sg: &Staged,
    key: &str,
    attrs: &StoredAttrs,
    size: u64,
) -> Result<String, FsError> {
    let part_size = ctx.commit_part_size(size);
    let metadata = attrs.encode();
    if size <= part_size {
        let body: Vec<u8> = sg.read(&ctx.fetcher, size, 0, size).await?.concat();
        return Ok(ctx.store.put_object(key, body.into(), &metadata).await?);
    }
    let mut upload = ctx.uploads.begin(key, &metadata).await?;
    let parallel = Arc::new(Semaphore::new(COMMIT_CONCURRENCY));
    let mut start = 0;
    while start < size {
        let range = start..(start + part_size).min(size);
        start = range.end;
        let gate = Arc::clone(&parallel).acquire_owned().await.expect("never closed");
        let copyable =
            sg.source.as_ref().filter(|s| s.object.has_etag && range.end <= s.remote && sg.covered(&range) == 0);
        if let Some(source) = copyable {
            upload.copy(Arc::clone(&source.object), range, vec![gate]);
        } else {
            let permit = ctx.hold_budget(range.end - range.start).await;
            match sg.read(&ctx.fetcher, size, range.start, range.end - range.start).await {
                Ok(parts) => upload.upload(Bytes::from(parts.concat()), vec![gate, permit]),
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            }
        }
        if let Err(e) = upload.check() {
            upload.abort().await;
            return Err(e.into());
        }
    }
    Ok(upload.complete().await?)
}

/// The committed object's id; HEADs when the server returned no ETag.
async fn resolve_etag<S: ObjectStore>(
    ctx: &WriteCtx<S>,
    key: &str,
    etag: String,
    size: u64,
) -> Result<ObjectId, FsError> {
    if !etag.is_empty() {
        return Ok(ObjectId { key: key.to_owned(), version: etag, has_etag: true });
    }
    let meta = ctx.store.head_object(key).await?;
    if meta.size != size {
        tracing::warn!(key, expected = size, got = meta.size, "object size after upload differs");
    }
    Ok(ObjectId::from_meta(&meta))
}

/// Server-side copy of any size: CopyObject up to `copy_object_max` (5 GiB), a multipart copy
/// of `part_size` parts above it. Without `metadata` the copy keeps the source's.
pub async fn copy_any<S: ObjectStore>(
    ctx: &WriteCtx<S>,
    src: &ObjectId,
    size: u64,
    dest: &str,
    metadata: Option<&crate::s3::UserMetadata>,
    copy_object_max: u64,
    part_size: u64,
) -> Result<Copied, FsError> {
    if size <= copy_object_max {
        return Ok(ctx.store.copy_object(src, dest, metadata).await?);
    }
    let metadata = match metadata {
        Some(m) => m.clone(),
        None => ctx.store.head_object(&src.key).await?.user_metadata.unwrap_or_default(),
    };
    let mut upload = ctx.uploads.begin(dest, &metadata).await?;
    let part_size = part_size.min(copy_object_max).max(size.div_ceil(MAX_PARTS));
    let source = Arc::new(src.clone());
    let parallel = Arc::new(Semaphore::new(COMMIT_CONCURRENCY));
    let mut start = 0;
    while start < size {
        let end = (start + part_size).min(size);
        let gate = Arc::clone(&parallel).acquire_owned().await.expect("never closed");
        upload.copy(Arc::clone(&source), start..end, vec![gate]);
        if let Err(e) = upload.check() {
            upload.abort().await;
            return Err(e.into());
        }
        start = end;
    }
    // A multipart copy gets a new ETag of its own; its time is not reported.
    Ok(Copied { etag: upload.complete().await?, last_modified: None })
}

/// Keys of a directory tree before and after a rename: old key -> the copy's id.
pub type Moved = HashMap<String, ObjectId>;
