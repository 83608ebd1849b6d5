//! The write path: per-file dirty state, streaming multipart uploads, local staging, commit.
//!
//! A file open for writing has one [`OpenState`], shared by every handle on it. Its body is:
//! - **Streaming**: a new or truncated file written strictly sequentially. Full parts go up as
//!   a multipart upload while the program writes, concurrently, each holding permits of the
//!   write budget (`--write-buffer-size`), so memory stays bounded; a small file is one PUT.
//! - **Staged**: everything else (random writes, appends to an existing object, truncation).
//!   Written ranges live in a sparse file under the staging directory, charged against
//!   `--max-staging-size` (ENOSPC when full); unchanged ranges stay in S3 and are read through
//!   the block cache, or copied server side with UploadPartCopy when the file is committed.
//!
//! Commit (on `flush`/`fsync`/last `release`) makes S3 hold exactly the bytes written: a PUT or a
//! completed multipart upload. On failure the upload is aborted, nothing partial becomes
//! visible, and the error reaches `close`/`fsync` as EIO.
//!
//! A streaming file that sees a non-sequential write, a truncate or a read first commits what it
//! has (the bytes written so far become visible to other clients), then continues staged.
//!
//! Times: the file's mtime is the time of its last data change (write, truncate) or the time a
//! `utimes` set, whichever came last. Every upload stores the mtime the file has when the upload
//! begins, and after a commit the file reports exactly the stored value, so its mtime never
//! changes by itself afterwards. (A streamed multipart upload begins with its first part: the
//! stored mtime is that moment, and the file reports it from then on, also while it is still
//! being written; a `utimes` that comes later is stored too.)

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::FsError;
use super::attrs::StoredAttrs;
use super::prefetch::{Access, Fetcher};
use crate::s3::{CompletedPart, ObjectId, ObjectStore, S3Error};

const MIB: u64 = 1 << 20;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// S3's minimum size of every part but the last.
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// Parts per size step when streaming: after every 1,000 parts the part size doubles, so a
/// stream of unknown length never reaches 10,000 parts (8 MiB parts reach ~8 TiB).
const PARTS_PER_STEP: i32 = 1000;
/// Background retries of an abort that failed (S3 unreachable): about half an hour in all.
const ABORT_RETRIES: u32 = 60;
/// First capacity of a streaming part's buffer: small files stay small.
const PART_BUFFER_START: usize = 64 << 10;
/// How long `close` waits for the first attempt to abort a failed upload.
const ABORT_INLINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const ABORT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const ABORT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Concurrent part uploads or copies while committing a staged file.
const COMMIT_CONCURRENCY: usize = 8;

/// Write-path settings.
#[derive(Debug, Clone)]
pub struct WriteConfig {
    pub part_size: u64,
    pub buffer_bytes: u64,
    pub staging_dir: PathBuf,
    pub staging_bytes: u64,
}

/// Non-overlapping, merged byte ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        let overlapping: Vec<(u64, u64)> =
            self.0.range(..=end).filter(|(_, e)| **e >= start).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Drops everything at or beyond `n`.
    pub fn truncate(&mut self, n: u64) {
        let beyond: Vec<u64> = self.0.range(n..).map(|(s, _)| *s).collect();
        for s in beyond {
            self.0.remove(&s);
        }
        if let Some((_, e)) = self.0.range_mut(..n).next_back()
            && *e > n
        {
            *e = n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Bytes of `r` already covered.
    pub fn covered(&self, r: &Range<u64>) -> u64 {
        self.0.range(..r.end).map(|(s, e)| e.min(&r.end).saturating_sub(*s.max(&r.start))).sum()
    }

    /// Splits `r` into maximal pieces that are all inside (true) or all outside (false) the set.
    pub fn split(&self, r: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        let mut pos = r.start;
        for (&s, &e) in self.0.range(..r.end) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos..s.min(r.end), false));
            }
            let from = s.max(pos);
            let to = e.min(r.end);
            if from < to {
                out.push((from..to, true));
            }
            pos = to;
        }
        if pos < r.end {
            out.push((pos..r.end, false));
        }
        out
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// The staging area: sparse files under one directory, bounded by bytes written locally.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    cap_bytes: u64,
    used: AtomicU64,
    next: AtomicU64,
}

impl Staging {
    pub fn new(dir: PathBuf, cap_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Staging { dir, cap_bytes, used: AtomicU64::new(0), next: AtomicU64::new(0) })
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, n: u64, key: &str) -> Result<(), FsError> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.cap_bytes {
                tracing::error!(
                    key,
                    used_bytes = cur,
                    cap_bytes = self.cap_bytes,
                    dir = %self.dir.display(),
                    "staging area full: close or fsync other files, or raise --max-staging-size"
                );
                return Err(FsError::NoSpace);
            }
            match self.used.compare_exchange(cur, cur + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    fn refund(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    fn create(&self) -> Result<(File, PathBuf), FsError> {
        let path = self.dir.join(format!("stage-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| FsError::Local(format!("cannot create staging file {}: {e}", path.display())))?;
        Ok((file, path))
    }
}

/// Everything the write path needs from the filesystem.
pub struct WriteCtx<S> {
    pub store: Arc<S>,
    pub fetcher: Arc<Fetcher<S>>,
    pub config: WriteConfig,
    pub budget: Arc<Semaphore>,
    pub staging: Staging,
}

impl<S: ObjectStore> WriteCtx<S> {
    pub fn new(store: Arc<S>, fetcher: Arc<Fetcher<S>>, config: WriteConfig) -> std::io::Result<Self> {
        let permits = (config.buffer_bytes / MIB).max(config.part_size.div_ceil(MIB)) as usize;
        let staging = Staging::new(config.staging_dir.clone(), config.staging_bytes)?;
        Ok(WriteCtx { store, fetcher, budget: Arc::new(Semaphore::new(permits)), staging, config })
    }

    /// Permits (MiB) a part of `len` bytes holds while uploading; capped so one part always fits.
    fn permits_for(&self, len: u64) -> u32 {
        let total = (self.config.buffer_bytes / MIB).max(self.config.part_size.div_ceil(MIB));
        len.div_ceil(MIB).clamp(1, total) as u32
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

struct Streamer {
    buf: BytesMut,
    upload_id: Option<String>,
    /// The attributes (with mtime) stored when the multipart upload began.
    sent: Option<StoredAttrs>,
    next_part: i32,
    tasks: JoinSet<Result<CompletedPart, S3Error>>,
    done: Vec<CompletedPart>,
}

struct Staged {
    file: Option<(File, PathBuf)>,
    local: RangeSet,
    /// The S3 version unchanged ranges come from: object, its full size, and how much of it
    /// still belongs to the file (less after a truncate).
    source: Option<(Arc<ObjectId>, u64, u64)>,
    charged: u64,
}

enum Body {
    Streaming(Streamer),
    Staged(Staged),
}

/// The dirty state of one file.
pub struct OpenFile {
    size: u64,
    dirty: bool,
    /// Attributes to store with the next commit (mode, owner, symlink marker, other metadata);
    /// the mtime stored is `mtime`.
    attrs: StoredAttrs,
    /// The modification time the mount reports for this file.
    mtime: SystemTime,
    /// `mtime` was set by `utimes` after the last data change.
    mtime_explicit: bool,
    body: Body,
    /// Set when an upload failed: every later write and commit fails until the file is
    /// truncated to zero, so a failed file is never replaced by a partial or empty object.
    failed: Option<String>,
}

/// Shared per-inode write state. `size` is readable without waiting for an upload in progress.
pub struct OpenState {
    size: AtomicU64,
    writers: AtomicU64,
    /// Never committed to S3 yet (a file created here): listings must show it from memory.
    pending: AtomicBool,
    unlinked: AtomicBool,
    pub file: tokio::sync::Mutex<OpenFile>,
    last_error: Mutex<Option<String>>,
    /// `OpenFile::mtime`, readable without waiting for an upload in progress.
    mtime: Mutex<SystemTime>,
}

impl std::fmt::Debug for OpenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenState")
            .field("size", &self.size())
            .field("writers", &self.writers())
            .finish_non_exhaustive()
    }
}

impl OpenState {
    /// A new, empty file (create, or open with O_TRUNC); its mtime is now.
    pub fn new_empty(attrs: StoredAttrs, pending: bool) -> Arc<Self> {
        let mtime = SystemTime::now();
        Arc::new(OpenState {
            size: AtomicU64::new(0),
            writers: AtomicU64::new(0),
            pending: AtomicBool::new(pending),
            unlinked: AtomicBool::new(false),
            file: tokio::sync::Mutex::new(OpenFile {
                size: 0,
                dirty: true,
                attrs,
                mtime,
                mtime_explicit: false,
                body: Body::Streaming(Streamer::new()),
                failed: None,
            }),
            last_error: Mutex::new(None),
            mtime: Mutex::new(mtime),
        })
    }

    /// An existing object opened for writing without truncation, with its stored attributes and
    /// the mtime the mount reports for it.
    pub fn from_object(object: Arc<ObjectId>, size: u64, attrs: StoredAttrs, mtime: SystemTime) -> Arc<Self> {
        Arc::new(OpenState {
            size: AtomicU64::new(size),
            writers: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            unlinked: AtomicBool::new(false),
            file: tokio::sync::Mutex::new(OpenFile {
                size,
                dirty: false,
                attrs,
                mtime,
                mtime_explicit: false,
                body: Body::Staged(Staged {
                    file: None,
                    local: RangeSet::default(),
                    source: Some((object, size, size)),
                    charged: 0,
                }),
                failed: None,
            }),
            last_error: Mutex::new(None),
            mtime: Mutex::new(mtime),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed) && !self.unlinked.load(Ordering::Relaxed)
    }

    pub fn mark_unlinked(&self) {
        self.unlinked.store(true, Ordering::Relaxed);
    }

    pub fn is_unlinked(&self) -> bool {
        self.unlinked.load(Ordering::Relaxed)
    }

    pub fn add_writer(&self) {
        self.writers.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops one writer; true when it was the last.
    pub fn remove_writer(&self) -> bool {
        self.writers.fetch_sub(1, Ordering::Relaxed) == 1
    }

    pub fn writers(&self) -> u64 {
        self.writers.load(Ordering::Relaxed)
    }

    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap() = e;
    }

    pub fn write_failed(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }

    /// The modification time the mount reports for the file.
    pub fn mtime(&self) -> SystemTime {
        *self.mtime.lock().unwrap()
    }

    fn publish(&self, f: &OpenFile) {
        self.size.store(f.size, Ordering::Relaxed);
        *self.mtime.lock().unwrap() = f.mtime;
    }

    /// Writes `data` at `offset`.
    pub async fn write<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FsError> {
        let mut f = self.file.lock().await;
        if let Some(e) = &f.failed {
            return Err(FsError::UploadFailed(e.clone()));
        }
        let streaming_append = matches!(f.body, Body::Streaming(_)) && offset == f.size;
        if !streaming_append {
            f.ensure_staged(ctx, key).await.inspect_err(|_| self.publish(&f))?;
        }
        let result = f.write(ctx, key, offset, data).await;
        self.publish(&f);
        result
    }

    pub async fn read<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, FsError> {
        let mut f = self.file.lock().await;
        if matches!(f.body, Body::Streaming(_)) {
            f.ensure_staged(ctx, key).await?;
            self.pending.store(false, Ordering::Relaxed);
        }
        f.read_staged(ctx, offset, len).await
    }

    pub async fn truncate<S: ObjectStore>(&self, ctx: &WriteCtx<S>, key: &str, size: u64) -> Result<(), FsError> {
        let mut f = self.file.lock().await;
        f.touch();
        if size == f.size && !matches!(f.body, Body::Staged(_)) {
            self.publish(&f);
            f.dirty = true;
            return Ok(());
        }
        if size == 0 {
            f.reset_empty(ctx).await;
            self.publish(&f);
            return Ok(());
        }
        f.ensure_staged(ctx, key).await?;
        self.pending.store(false, Ordering::Relaxed);
        let r = f.truncate(ctx, size);
        self.publish(&f);
        r
    }

    /// Points unchanged ranges at `object`, a copy of the current source under a new key (after
    /// a rename).
    pub async fn rebase(&self, object: ObjectId) {
        let mut f = self.file.lock().await;
        if let Body::Staged(sg) = &mut f.body
            && let Some((obj, _, _)) = &mut sg.source
        {
            *obj = Arc::new(object);
        }
    }

    /// Changes attributes (and, with `mtime`, sets the modification time as `utimes` does);
    /// they are stored with the next commit.
    pub async fn update_attrs(&self, change: impl FnOnce(&mut StoredAttrs), mtime: Option<SystemTime>) {
        let mut file = self.file.lock().await;
        change(&mut file.attrs);
        if let Some(t) = mtime {
            file.mtime = t;
            file.mtime_explicit = true;
        }
        file.dirty = true;
        self.publish(&file);
    }

    /// The attributes as they will be stored, with the file's current mtime.
    pub async fn attrs(&self) -> StoredAttrs {
        self.file.lock().await.upload_attrs()
    }

    /// Commits the file to S3 if it changed. Returns the new object and the attributes stored
    /// with it (its `mtime` is what the file reports from now on) when one was written.
    pub async fn commit<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: &str,
    ) -> Result<Option<(ObjectId, StoredAttrs)>, FsError> {
        let mut f = self.file.lock().await;
        if self.is_unlinked() || (!f.dirty && f.failed.is_none()) {
            return Ok(None);
        }
        let result = f.commit(ctx, key).await.map(|object| (object, f.upload_attrs()));
        match &result {
            Ok(_) => {
                self.pending.store(false, Ordering::Relaxed);
                self.set_error(None);
            }
            Err(e) => {
                tracing::error!(key, error = %e, "upload failed; the object in S3 is unchanged and the \
                    written data was not saved");
                self.set_error(Some(e.to_string()));
            }
        }
        self.publish(&f);
        result.map(Some)
    }

    /// Frees local resources (staging file, budget) of a state nobody writes any more.
    /// Only a file left dirty (its commit failed) holds any: a committed file's staged data was
    /// already released, and readers still holding the state keep seeing its content.
    pub async fn discard<S: ObjectStore>(&self, ctx: &WriteCtx<S>) {
        let mut f = self.file.lock().await;
        if f.dirty || f.failed.is_some() {
            f.reset_empty(ctx).await;
            f.dirty = false;
        }
    }
}

impl Streamer {
    fn new() -> Self {
        Streamer {
            buf: BytesMut::new(),
            upload_id: None,
            sent: None,
            next_part: 1,
            tasks: JoinSet::new(),
            done: Vec::new(),
        }
    }

    /// Starts uploading `part` as the next part; waits for write-budget permits first.
    async fn start_part<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        attrs: &StoredAttrs,
        part: Bytes,
    ) -> Result<(), S3Error> {
        // Surface failures of earlier parts as early as possible.
        while let Some(done) = self.tasks.try_join_next() {
            self.done.push(flatten(done, key)?);
        }
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = ctx.store.create_multipart_upload(key, &attrs.encode()).await?;
                self.upload_id = Some(id.clone());
                self.sent = Some(attrs.clone());
                id
            }
        };
        let permit = Arc::clone(&ctx.budget)
            .acquire_many_owned(ctx.permits_for(part.len() as u64))
            .await
            .expect("write budget semaphore is never closed");
        let number = self.next_part;
        self.next_part += 1;
        let store = Arc::clone(&ctx.store);
        let key = key.to_owned();
        self.tasks.spawn(async move {
            let etag = store.upload_part(&key, &upload_id, number, part).await?;
            drop(permit);
            Ok(CompletedPart { number, etag })
        });
        Ok(())
    }

    /// Waits for every part; returns them in order.
    async fn join_all(&mut self, key: &str) -> Result<Vec<CompletedPart>, S3Error> {
        let mut parts = std::mem::take(&mut self.done);
        let mut first_err = None;
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(Ok(p)) => parts.push(p),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(S3Error::Body(key.to_owned(), format!("part upload task failed: {e}")));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Stops in-flight parts and aborts the upload (best effort; logged).
    async fn abort<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        if let Some(id) = self.upload_id.take() {
            abort_upload(ctx, key, id).await;
        }
        self.sent = None;
        self.buf.clear();
        self.done.clear();
        self.next_part = 1;
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

    async fn write<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FsError> {
        self.dirty = true;
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
                self.size += data.len() as u64;
                let mut data = data;
                while !data.is_empty() {
                    // A part's buffer grows by doubling (the first part's from 64 KiB) but never
                    // past the part size, so a part holds no more memory than the write budget
                    // charges it and a small file no more than about twice its size.
                    let part_size = ctx.stream_part_size(st.next_part) as usize;
                    let take = (part_size - st.buf.len()).min(data.len());
                    if st.buf.capacity() < st.buf.len() + take {
                        // After a full part the file is evidently large: take whole parts at once.
                        let start = if st.next_part > 1 { part_size } else { PART_BUFFER_START };
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
                    if let Err(e) = st.start_part(ctx, key, &attrs, part).await {
                        st.abort(ctx, key).await;
                        self.failed = Some(e.to_string());
                        return Err(e.into());
                    }
                }
                Ok(())
            }
            Body::Staged(sg) => {
                let end = offset + data.len() as u64;
                let new_bytes = data.len() as u64 - sg.local.covered(&(offset..end));
                ctx.staging.charge(new_bytes, key)?;
                sg.charged += new_bytes;
                if sg.file.is_none() {
                    sg.file = Some(ctx.staging.create()?);
                }
                let (file, path) = sg.file.as_ref().expect("just created");
                file.write_all_at(data, offset)
                    .map_err(|e| FsError::Local(format!("cannot write staging file {}: {e}", path.display())))?;
                sg.local.insert(offset..end);
                self.size = self.size.max(end);
                Ok(())
            }
        }
    }

    /// Back to an empty streaming file (truncate to 0), dropping uploads and staged data.
    async fn reset_empty<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>) {
        match &mut self.body {
            Body::Streaming(st) => st.abort(ctx, "").await,
            Body::Staged(sg) => {
                ctx.staging.refund(sg.charged);
                if let Some((_, path)) = sg.file.take() {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        self.body = Body::Streaming(Streamer::new());
        self.size = 0;
        self.dirty = true;
        self.failed = None;
    }

    /// Converts a streaming body to a staged one: commits what has been streamed if a multipart
    /// upload is under way, or moves the in-memory buffer to a staging file.
    async fn ensure_staged<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) -> Result<(), FsError> {
        let Body::Streaming(st) = &mut self.body else { return Ok(()) };
        if st.upload_id.is_none() {
            let buf = std::mem::take(&mut st.buf);
            self.body = Body::Staged(Staged { file: None, local: RangeSet::default(), source: None, charged: 0 });
            if !buf.is_empty() {
                let size = self.size;
                self.size = 0;
                self.write(ctx, key, 0, &buf).await?;
                self.size = size;
            }
            return Ok(());
        }
        let object = self.commit(ctx, key).await?;
        let size = self.size;
        self.body = Body::Staged(Staged {
            file: None,
            local: RangeSet::default(),
            source: Some((Arc::new(object), size, size)),
            charged: 0,
        });
        Ok(())
    }

    fn truncate<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, size: u64) -> Result<(), FsError> {
        let Body::Staged(sg) = &mut self.body else { unreachable!("ensure_staged ran first") };
        let before = sg.local.total();
        sg.local.truncate(size);
        let dropped = before - sg.local.total();
        ctx.staging.refund(dropped);
        sg.charged -= dropped;
        if let Some((_, _, remote)) = &mut sg.source {
            *remote = (*remote).min(size);
        }
        if let Some((file, path)) = &sg.file {
            file.set_len(size).map_err(|e| FsError::Local(format!("cannot truncate {}: {e}", path.display())))?;
        }
        self.size = size;
        self.dirty = true;
        Ok(())
    }

    async fn read_staged<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, FsError> {
        let Body::Staged(sg) = &self.body else { unreachable!("callers stage first") };
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (piece, local) in sg.local.split(offset..end) {
            if local {
                let (file, path) = sg.file.as_ref().expect("local ranges imply a staging file");
                let mut buf = vec![0u8; (piece.end - piece.start) as usize];
                file.read_exact_at(&mut buf, piece.start)
                    .map_err(|e| FsError::Local(format!("cannot read staging file {}: {e}", path.display())))?;
                out.push(Bytes::from(buf));
                continue;
            }
            // Not written locally: from the source object while it covers it, zeros beyond.
            let remote_end = sg.source.as_ref().map_or(0, |(_, _, r)| *r);
            if piece.start < remote_end {
                let (obj, full, _) = sg.source.as_ref().expect("remote_end > 0 implies a source");
                let to = piece.end.min(remote_end);
                out.extend(ctx.fetcher.read(obj, *full, piece.start..to, Access::Sequential { prefetch: 0 }).await?);
                if to < piece.end {
                    out.push(Bytes::from(vec![0u8; (piece.end - to) as usize]));
                }
            } else {
                out.push(Bytes::from(vec![0u8; (piece.end - piece.start) as usize]));
            }
        }
        Ok(out)
    }

    /// Uploads the current content; on success the object in S3 is exactly the file.
    async fn commit<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) -> Result<ObjectId, FsError> {
        if let Some(e) = &self.failed {
            return Err(FsError::UploadFailed(e.clone()));
        }
        let result = self.try_commit(ctx, key).await;
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    async fn try_commit<S: ObjectStore>(&mut self, ctx: &WriteCtx<S>, key: &str) -> Result<ObjectId, FsError> {
        let attrs = self.upload_attrs();
        let (etag, stored) = match &mut self.body {
            Body::Streaming(st) => {
                let result = Self::commit_streaming(st, ctx, key, &attrs).await;
                if result.is_err() {
                    st.abort(ctx, key).await;
                }
                result?
            }
            Body::Staged(_) => (self.commit_staged(ctx, key, &attrs).await?, attrs.clone()),
        };
        let mut object = resolve_etag(ctx, key, etag, self.size).await?;
        // A multipart upload stores the attributes it began with. Attributes changed since (a
        // chmod or utimes while streaming) are stored by copying the object onto itself; a
        // later write only moved the mtime, so the file reports the stored one.
        let explicit_mtime = self.mtime_explicit && stored.mtime != attrs.mtime;
        let changed = !stored.same_except_times(&attrs) || explicit_mtime || stored.atime != attrs.atime;
        if changed && self.size <= super::COPY_OBJECT_MAX {
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
        if let Body::Staged(sg) = &mut self.body {
            ctx.staging.refund(sg.charged);
            sg.charged = 0;
            sg.local.clear();
            if let Some((_, path)) = sg.file.take() {
                let _ = std::fs::remove_file(path);
            }
            sg.source = Some((Arc::new(object.clone()), self.size, self.size));
        } else {
            self.body = Body::Staged(Staged {
                file: None,
                local: RangeSet::default(),
                source: Some((Arc::new(object.clone()), self.size, self.size)),
                charged: 0,
            });
        }
        self.dirty = false;
        Ok(object)
    }

    /// Completes a streaming upload; returns the ETag and the attributes stored with it.
    async fn commit_streaming<S: ObjectStore>(
        st: &mut Streamer,
        ctx: &WriteCtx<S>,
        key: &str,
        attrs: &StoredAttrs,
    ) -> Result<(String, StoredAttrs), FsError> {
        if st.upload_id.is_none() {
            let body = std::mem::take(&mut st.buf).freeze();
            return Ok((ctx.store.put_object(key, body, &attrs.encode()).await?, attrs.clone()));
        }
        if !st.buf.is_empty() {
            let last = std::mem::take(&mut st.buf).freeze();
            st.start_part(ctx, key, attrs, last).await?;
        }
        let parts = st.join_all(key).await?;
        let id = st.upload_id.take().expect("checked above");
        let stored = st.sent.take().unwrap_or_else(|| attrs.clone());
        match complete_upload(ctx.store.as_ref(), key, &id, parts).await {
            Ok(etag) => Ok((etag, stored)),
            Err(e) => {
                st.upload_id = Some(id);
                st.sent = Some(stored);
                Err(e.into())
            }
        }
    }

    async fn commit_staged<S: ObjectStore>(
        &mut self,
        ctx: &WriteCtx<S>,
        key: &str,
        attrs: &StoredAttrs,
    ) -> Result<String, FsError> {
        let size = self.size;
        let part_size = ctx.commit_part_size(size);
        let metadata = attrs.encode();
        if size <= part_size {
            let body: Vec<u8> = self.read_staged(ctx, 0, size).await?.concat();
            return Ok(ctx.store.put_object(key, body.into(), &metadata).await?);
        }
        let upload_id = ctx.store.create_multipart_upload(key, &metadata).await?;
        let result = self.upload_staged_parts(ctx, key, &upload_id, part_size).await;
        let result = match result {
            Ok(parts) => complete_upload(ctx.store.as_ref(), key, &upload_id, parts).await.map_err(FsError::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            abort_upload(ctx, key, upload_id).await;
        }
        result
    }

    async fn upload_staged_parts<S: ObjectStore>(
        &self,
        ctx: &WriteCtx<S>,
        key: &str,
        upload_id: &str,
        part_size: u64,
    ) -> Result<Vec<CompletedPart>, FsError> {
        let Body::Staged(sg) = &self.body else { unreachable!() };
        let size = self.size;
        let parallel = Arc::new(Semaphore::new(COMMIT_CONCURRENCY));
        let mut tasks: JoinSet<Result<CompletedPart, S3Error>> = JoinSet::new();
        let mut number = 0;
        let mut start = 0;
        let mut first_err: Option<FsError> = None;
        let mut parts = Vec::new();
        while start < size && first_err.is_none() {
            number += 1;
            let range = start..(start + part_size).min(size);
            start = range.end;
            let copyable = sg
                .source
                .as_ref()
                .filter(|(obj, _, remote)| obj.has_etag && range.end <= *remote && sg.local.covered(&range) == 0);
            let gate = Arc::clone(&parallel).acquire_owned().await.expect("never closed");
            let store = Arc::clone(&ctx.store);
            let (part_key, upload_id) = (key.to_owned(), upload_id.to_owned());
            if let Some((obj, _, _)) = copyable {
                let obj = Arc::clone(obj);
                tasks.spawn(async move {
                    let etag = store.upload_part_copy(&part_key, &upload_id, number, &obj, range).await?;
                    drop(gate);
                    Ok(CompletedPart { number, etag })
                });
            } else {
                let permit = Arc::clone(&ctx.budget)
                    .acquire_many_owned(ctx.permits_for(range.end - range.start))
                    .await
                    .expect("never closed");
                match self.read_staged(ctx, range.start, range.end - range.start).await {
                    Ok(parts) => {
                        let body = Bytes::from(parts.concat());
                        tasks.spawn(async move {
                            let etag = store.upload_part(&part_key, &upload_id, number, body).await?;
                            drop((gate, permit));
                            Ok(CompletedPart { number, etag })
                        });
                    }
                    Err(e) => first_err = Some(e),
                }
            }
            while let Some(done) = tasks.try_join_next() {
                match flatten(done, key) {
                    Ok(p) => parts.push(p),
                    Err(e) => {
                        first_err.get_or_insert(e.into());
                    }
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            match flatten(done, key) {
                Ok(p) => parts.push(p),
                Err(e) => {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }
}

/// Aborts an upload; when S3 cannot be reached, keeps retrying in the background so no parts are
/// left behind once it is back.
async fn abort_upload<S: ObjectStore>(ctx: &WriteCtx<S>, key: &str, upload_id: String) {
    // Waited for briefly, so a healthy server has nothing left over when close returns; an
    // unresponsive one must not hold close up any longer.
    match tokio::time::timeout(ABORT_INLINE_WAIT, ctx.store.abort_multipart_upload(key, &upload_id)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => {
            tracing::warn!(key, upload_id, error = %e, "cannot abort multipart upload yet; retrying in the background")
        }
        Err(_) => {
            tracing::warn!(key, upload_id, "no answer to aborting a multipart upload yet; retrying in the background")
        }
    }
    let store = Arc::clone(&ctx.store);
    let key = key.to_owned();
    tokio::spawn(async move {
        let mut delay = ABORT_RETRY_FIRST;
        for _ in 0..ABORT_RETRIES {
            tokio::time::sleep(delay).await;
            match store.abort_multipart_upload(&key, &upload_id).await {
                Ok(()) => {
                    tracing::info!(key, upload_id, "aborted multipart upload");
                    return;
                }
                Err(e) => tracing::debug!(key, upload_id, error = %e, "abort retry failed"),
            }
            delay = (delay * 2).min(ABORT_RETRY_MAX);
        }
        tracing::error!(
            key,
            upload_id,
            "giving up aborting a multipart upload; its parts stay until a bucket \
            lifecycle rule for incomplete uploads removes them"
        );
    });
}

fn flatten(
    done: Result<Result<CompletedPart, S3Error>, tokio::task::JoinError>,
    key: &str,
) -> Result<CompletedPart, S3Error> {
    done.map_err(|e| S3Error::Body(key.to_owned(), format!("part upload task failed: {e}")))?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rangeset_merges_and_splits() {
        let mut r = RangeSet::default();
        r.insert(10..20);
        r.insert(30..40);
        r.insert(15..32);
        assert_eq!(r.total(), 30);
        assert_eq!(r.split(0..50), vec![(0..10, false), (10..40, true), (40..50, false)]);
        r.truncate(25);
        assert_eq!(r.split(0..30), vec![(0..10, false), (10..25, true), (25..30, false)]);
        assert_eq!(r.covered(&(0..12)), 2);
    }

    proptest::proptest! {
        #[test]
        fn rangeset_matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..50, proptest::bool::ANY), 1..60)) {
            let mut set = RangeSet::default();
            let mut bits = vec![false; 300];
            for (start, len, truncate) in ops {
                if truncate {
                    set.truncate(start);
                    for b in bits.iter_mut().skip(start as usize) { *b = false; }
                } else {
                    set.insert(start..start + len);
                    for b in bits.iter_mut().skip(start as usize).take(len as usize) { *b = true; }
                }
                proptest::prop_assert_eq!(set.total(), bits.iter().filter(|b| **b).count() as u64);
                for (piece, inside) in set.split(0..300) {
                    for i in piece { proptest::prop_assert_eq!(bits[i as usize], inside); }
                }
                proptest::prop_assert_eq!(set.covered(&(20..120)), bits[20..120].iter().filter(|b| **b).count() as u64);
            }
        }
    }
}

/// The ETag S3 gives an object completed from `parts`: the MD5 of the parts' binary MD5s, then
/// `-<count>`. `None` when a part ETag is not a plain MD5 (SSE-KMS, other servers' schemes).
pub(crate) fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    use md5::{Digest, Md5};
    let mut md5 = Md5::new();
    for p in parts {
        let hex_etag = p.etag.trim_matches('"');
        let raw = hex::decode(hex_etag).ok().filter(|r| r.len() == 16)?;
        md5.update(raw);
    }
    Some(format!("{}-{}", hex::encode(md5.finalize()), parts.len()))
}

/// Completes a multipart upload. When the reply is lost or unreadable (the connection dropped,
/// a proxy timed out, a server answered in a form the SDK rejects) S3 may still have committed
/// the object; a HEAD then tells: if the key now has exactly the ETag these parts produce, the
/// upload is complete and the data is in S3. Anything else stays an error.
pub(crate) async fn complete_upload<S: ObjectStore + ?Sized>(
    store: &S,
    key: &str,
    upload_id: &str,
    parts: Vec<CompletedPart>,
) -> Result<String, S3Error> {
    let expected = multipart_etag(&parts);
    let err = match store.complete_multipart_upload(key, upload_id, parts).await {
        Ok(etag) => return Ok(etag),
        Err(e @ (S3Error::PreconditionFailed(_) | S3Error::AccessDenied(_) | S3Error::NoSuchBucket(_))) => {
            return Err(e);
        }
        Err(e) => e,
    };
    let Some(expected) = expected else { return Err(err) };
    match store.head_object(key).await {
        Ok(meta) if meta.etag.as_deref().map(|e| e.trim_matches('"')) == Some(expected.as_str()) => {
            tracing::warn!(
                key,
                error = %err,
                "CompleteMultipartUpload reported an error, but the object has exactly the uploaded parts; \
                 treating the upload as complete"
            );
            Ok(meta.etag.unwrap_or_default())
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod etag_tests {
    use super::*;

    #[test]
    fn multipart_etags_follow_the_s3_scheme() {
        // Two parts whose MD5s are known: md5("a") and md5("b").
        let parts = vec![
            CompletedPart { number: 1, etag: "\"0cc175b9c0f1b6a831c399e269772661\"".into() },
            CompletedPart { number: 2, etag: "\"92eb5ffee6ae2fec3ad71c777531578f\"".into() },
        ];
        assert_eq!(multipart_etag(&parts).unwrap(), "96e024ba2074fe77e8e965ba43a704be-2");
        let weird = vec![CompletedPart { number: 1, etag: "\"not-an-md5\"".into() }];
        assert_eq!(multipart_etag(&weird), None);
    }
}
