//! [`S3Fs`]: the filesystem core. Async, no fuser types: it takes inode numbers and names and
//! returns plain structs or an [`FsError`], so tests drive it directly against a fake store.
//!
//! Namespace rules (documented in the README "Semantics" section):
//! - Directories come from `ListObjectsV2` with delimiter `/`: common prefixes, marker objects
//!   (`dir/`) and implicit parents of deeper keys all make directories.
//! - When `x` and `x/...` both exist, the directory wins and the object `x` is hidden.
//! - Names that cannot be files are skipped in listings and are ENOENT on lookup: empty
//!   segments (`a//b`), `.`, `..`, names longer than 255 bytes, names containing NUL.
//! - Metadata is cached for `metadata_ttl`; `open` always asks S3 for the current object.

pub mod attrs;
pub mod error;
pub mod fuse;
pub mod inode;
pub mod prefetch;
pub mod records;
pub mod write;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Semaphore;

pub use error::FsError;
use inode::{Inode, InodeTable, Kind, ROOT_INO, Stat};
use prefetch::{Access, Fetcher, ReadPattern};
use records::{DirRecord, RecordEntry, Records, dir_entry_name};
use write::{OpenState, WriteCtx};

use crate::cache::{BlockCache, BlockKey};
use crate::config::FsConfig;
use crate::s3::{ObjectId, ObjectMeta, ObjectStore, S3Error, UserMetadata};

/// Longest file name Linux accepts.
const NAME_MAX: usize = 255;
/// Longest S3 key.
const KEY_MAX: usize = 1024;
/// Block size reported by `stat`/`statfs`; only used to compute `st_blocks`.
pub const REPORTED_BLOCK_SIZE: u32 = 4096;
/// `statfs` totals: S3 has no capacity, so report a very large, obviously synthetic size
/// (4 PiB of 4 KiB blocks) rather than zeros, which make tools like `df` and installers refuse.
const STATFS_BLOCKS: u64 = 1 << 40;
const STATFS_FILES: u64 = 1 << 32;
/// Largest object CopyObject accepts; bigger ones are copied as a multipart upload.
pub const COPY_OBJECT_MAX: u64 = 5 << 30;
/// Part size for multipart copies: large parts keep the part count low for huge objects.
const COPY_PART_SIZE: u64 = 512 << 20;
/// Objects copied or deleted at once when renaming a directory.
const RENAME_CONCURRENCY: usize = 16;

use attrs::TYPE_SYMLINK;
pub use attrs::{META_ATIME, META_GID, META_MODE, META_MTIME, META_TYPE, META_UID, StoredAttrs};

/// Attributes of one inode, as reported to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
}

/// One directory entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// Filesystem totals for `statfs`.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// The process making a request, as the kernel reports it (FUSE `uid`/`gid` of the caller).
///
/// New entries belong to the caller, as on a local filesystem; `setattr` checks it against the
/// owner (the kernel checks too, with `default_permissions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    /// root: may change any attribute.
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };

    fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Set-group-ID bit: on a directory, new entries take the directory's group (and new
/// directories the bit itself), as Linux does.
const S_ISGID: u16 = 0o2000;

/// Attribute changes from `setattr`.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
}

/// What an open file handle reads from.
enum HandleSource {
    /// One object version (a read-only open while nobody here was writing the file).
    Object(Arc<ObjectId>, u64),
    /// The file's write state: a writer's own, or one a reader shares.
    State(Arc<OpenState>),
}

struct FileHandle {
    ino: u64,
    writable: bool,
    source: Mutex<HandleSource>,
    pattern: Mutex<ReadPattern>,
}

impl FileHandle {
    fn new(ino: u64, writable: bool, source: HandleSource) -> Self {
        FileHandle { ino, writable, source: Mutex::new(source), pattern: Mutex::new(ReadPattern::new()) }
    }

    /// The write state a read goes through, as on a local filesystem: the file's current one
    /// (so a reader sees what this mount wrote, and a read never shrinks the size the kernel
    /// believes), else the one this handle shares; `None` to read the handle's object.
    fn read_state(&self, inode: &Inode) -> Option<Arc<OpenState>> {
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
    fn write_state(&self) -> Option<Arc<OpenState>> {
        match &*self.source.lock().unwrap() {
            HandleSource::State(s) if self.writable => Some(Arc::clone(s)),
            _ => None,
        }
    }

    fn object(&self) -> Option<(Arc<ObjectId>, u64)> {
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

struct DirHandle {
    entries: Vec<DirEntry>,
}

/// The filesystem over one bucket (or prefix).
pub struct S3Fs<S> {
    store: Arc<S>,
    config: FsConfig,
    inodes: InodeTable,
    fetcher: Arc<Fetcher<S>>,
    writes: WriteCtx<S>,
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    copy_object_max: u64,
    /// When the mount started: the stable mtime of directories without stored attributes.
    started: SystemTime,
    /// Whether the server stores directory marker objects (`dir/`); see
    /// [`S3Fs::check_directory_markers`].
    markers: std::sync::atomic::AtomicBool,
    /// Directory attribute records (see [`records`]).
    records: Arc<Records<S>>,
    /// The task writing queued record changes; stopped when the filesystem is dropped.
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<S> Drop for S3Fs<S> {
    fn drop(&mut self) {
        if let Some(task) = self.flusher.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// Name of the marker object the CSI controller writes at the root of each volume it creates
/// (see `csi::volume`). It is hidden from every listing and cannot be looked up or created.
pub const RESERVED_NAME: &str = ".s3csi-volume";

/// A random number for probe object names (not security relevant).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Whether `name` can be a file name; keys whose segment fails this are not shown.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != RESERVED_NAME
        && name != records::RECORD_NAME
        && name.len() <= NAME_MAX
        && !name.contains(['/', '\0'])
}

/// What S3 says about an object: from a HEAD (with metadata) or a listing (without). The mtime
/// is the stored one when there is one, else S3's Last-Modified.
fn stat_from_meta(meta: &ObjectMeta) -> Stat {
    let mut stat = Stat::new(meta.size, meta.last_modified);
    stat.etag = meta.etag.clone();
    if let Some(m) = &meta.user_metadata {
        stat.from_head = true;
        stat.attrs = StoredAttrs::decode(m);
        if let Some(t) = stat.attrs.mtime {
            stat.mtime = t;
        }
    }
    stat
}

fn kind_from_meta(meta: &ObjectMeta) -> Kind {
    match meta.user_metadata.as_ref().and_then(|m| m.get(META_TYPE)) {
        Some(t) if t == TYPE_SYMLINK => Kind::Symlink,
        _ => Kind::File,
    }
}

impl<S: ObjectStore> S3Fs<S> {
    pub fn new(store: Arc<S>, cache: Arc<BlockCache>, config: FsConfig) -> std::io::Result<Self> {
        let inodes = InodeTable::new(config.prefix.as_str());
        let fetcher = Fetcher::with_limits(Arc::clone(&store), cache, config.max_gets, config.stall_limit);
        let writes = WriteCtx::new(Arc::clone(&store), Arc::clone(&fetcher), config.write.clone())?;
        let records = Arc::new(Records::new(Arc::clone(&store)));
        Ok(S3Fs {
            fetcher,
            writes,
            store,
            config,
            inodes,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            copy_object_max: COPY_OBJECT_MAX,
            started: SystemTime::now(),
            markers: std::sync::atomic::AtomicBool::new(true),
            records,
            flusher: Mutex::new(None),
        })
    }

    /// Checks once, at mount time, that the server keeps an empty directory marker object: it
    /// writes `<root>.s3csi-probe-<random>/`, lists it back and deletes it. A server that does
    /// not (s3s-fs stores keys as files) gets one clear warning, and `mkdir` then makes
    /// directories that live in this mount only, instead of markers the server cannot serve.
    /// Returns whether markers work. Writable mounts only.
    pub async fn check_directory_markers(&self) -> bool {
        let key = format!("{}.s3csi-probe-{:016x}/", self.config.prefix.as_str(), rand_u64());
        let stored = match self.store.put_object(&key, Bytes::new(), &UserMetadata::new()).await {
            Ok(_) => match self.store.list_page(&key, None, None, Some(1)).await {
                Ok(page) => page.objects.iter().any(|o| o.key == key),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the directory marker probe");
                    false
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot write the directory marker probe");
                false
            }
        };
        if let Err(e) = self.store.delete_object(&key).await {
            tracing::warn!(key, error = %e, "cannot delete the directory marker probe; delete it by hand");
        }
        if !stored {
            tracing::warn!(
                "this S3 server does not keep empty directory marker objects (a PUT of {key:?} is not listed \
                 back): directories made with mkdir exist only in this mount until files are written in them; \
                 use a server that stores markers (AWS S3, MinIO, moto) to keep empty directories"
            );
        }
        self.markers.store(stored, Ordering::Relaxed);
        stored
    }

    /// Starts writing queued directory record changes every [`records::FLUSH_INTERVAL`]. Call
    /// from within the runtime; the task stops when the filesystem is dropped.
    pub fn start_record_flusher(&self) {
        let records = Arc::clone(&self.records);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(records::FLUSH_INTERVAL).await;
                records.flush().await;
            }
        });
        *self.flusher.lock().unwrap() = Some(task);
    }

    /// Writes queued directory record changes now (at unmount).
    pub async fn flush_records(&self) {
        self.records.flush().await;
    }

    /// At unmount: waits up to `limit` for aborts of failed uploads still retrying, and logs
    /// (key and upload id) any that could not be finished. Returns how many were left.
    pub async fn finish_uploads(&self, limit: Duration) -> usize {
        self.writes.uploads.finish(limit).await
    }

    /// Queues the record entry of `inode` in its parent directory's record (None: removed).
    fn note_entry(&self, parent: u64, name: &str, kind: Kind, entry: Option<RecordEntry>) {
        let Some(dir) = self.inodes.get(parent) else { return };
        let name = if kind == Kind::Dir { dir_entry_name(name) } else { name.to_owned() };
        self.records.note(&self.inodes.key(&dir), &name, entry);
    }

    /// The record entry for an object with `etag`, `size`, stored attributes and, when known,
    /// its Last-Modified.
    fn file_entry(etag: &str, size: u64, attrs: &StoredAttrs, modified: Option<SystemTime>) -> Option<RecordEntry> {
        Some(RecordEntry {
            etag: Some(etag.to_owned()),
            size: Some(size),
            last_modified: modified.and_then(records::unix_secs),
            meta: attrs.ours().encode(),
        })
    }

    fn dir_entry(attrs: &StoredAttrs) -> Option<RecordEntry> {
        Some(RecordEntry { etag: None, size: None, last_modified: None, meta: attrs.ours().encode() })
    }

    pub fn ttl(&self) -> Duration {
        self.config.metadata_ttl
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        self.fetcher.cache()
    }

    pub fn staging_used_bytes(&self) -> u64 {
        self.writes.staging.used_bytes()
    }

    fn fresh(&self, stat: &Stat) -> bool {
        stat.validated_at.elapsed() < self.config.metadata_ttl
    }

    fn attr(&self, inode: &Inode) -> Attr {
        let stat = inode.stat();
        let own = &self.config.ownership;
        let (size, mtime) = match (inode.kind, inode.open_state()) {
            (Kind::Dir, _) => (0, stat.mtime),
            (_, Some(state)) => (state.size(), state.mtime()),
            (_, None) => (stat.size, stat.mtime),
        };
        let (default_perm, nlink) = match inode.kind {
            Kind::Dir => (own.dir_mode, 2),
            Kind::File => (own.file_mode, 1),
            Kind::Symlink => (0o777, 1),
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            size,
            mtime,
            atime: stat.attrs.atime.unwrap_or(mtime),
            perm: stat.attrs.mode.unwrap_or(default_perm),
            uid: stat.attrs.uid.unwrap_or(own.uid),
            gid: stat.attrs.gid.unwrap_or(own.gid),
            nlink,
        }
    }

    fn inode(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        self.inodes.get(ino).ok_or(FsError::NotFound)
    }

    fn dir_inode(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(inode)
    }

    fn check_writable(&self) -> Result<(), FsError> {
        if self.config.read_only { Err(FsError::ReadOnly) } else { Ok(()) }
    }

    fn check_new_name(&self, dir: &Inode, name: &str) -> Result<String, FsError> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if !valid_name(name) {
            return Err(FsError::Invalid(
                "names must not be empty, '.', '..', the reserved .s3csi-volume, or contain '/'",
            ));
        }
        let key = format!("{}{name}/", self.inodes.key(dir));
        if key.len() > KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        Ok(key[..key.len() - 1].to_owned())
    }

    /// A directory without stored attributes (implied by keys under it, or a marker written by
    /// another client): its mtime is the mount's start time, stable for the life of the mount.
    fn dir_stat(&self) -> Stat {
        Stat::new(0, self.started)
    }

    /// Asks S3 what `dir_key + name` is: a directory (wins), a file or symlink, or nothing.
    async fn probe(&self, dir_key: &str, name: &str) -> Result<Option<(Kind, Stat)>, FsError> {
        let file_key = format!("{dir_key}{name}");
        let dir_prefix = format!("{file_key}/");
        // Both requests run at once; when the listing shows a directory, the HEAD is not awaited
        // (some servers answer HEAD on a "directory" key slowly or with a retried 5xx).
        let head_fut = self.store.head_object(&file_key);
        let list_fut = self.store.list_page(&dir_prefix, Some("/"), None, Some(1));
        tokio::pin!(head_fut, list_fut);
        let mut head_early = None;
        let list = loop {
            tokio::select! {
                l = &mut list_fut => break l?,
                h = &mut head_fut, if head_early.is_none() => head_early = Some(h),
            }
        };
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            let mut stat = self.dir_stat();
            // S3 has been asked: what it said about the attributes is settled for the TTL.
            stat.from_head = true;
            if let Some(marker) = list.objects.iter().find(|o| o.key == dir_prefix)
                && let Ok(meta) = self.store.head_object(&marker.key).await
            {
                // A marker's Last-Modified is as stable as a stored mtime.
                let m = stat_from_meta(&meta);
                (stat.attrs, stat.mtime) = (m.attrs, m.mtime);
            }
            return Ok(Some((Kind::Dir, stat)));
        }
        let head = match head_early {
            Some(h) => h,
            None => head_fut.await,
        };
        match head {
            Ok(meta) => Ok(Some((kind_from_meta(&meta), stat_from_meta(&meta)))),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds `parent/name`: from memory when fresh (or being written), otherwise from S3.
    async fn resolve(&self, dir: &Arc<Inode>, name: &str, lookup: bool) -> Result<Arc<Inode>, FsError> {
        if !valid_name(name) {
            return Err(FsError::NotFound);
        }
        let existing = self.inodes.child(dir.ino, name);
        if let Some(child) = &existing {
            let stat = child.stat();
            let pending = child.open_state().is_some_and(|s| s.is_pending());
            let local = child.local_dir.load(Ordering::Relaxed);
            if pending || local || (self.fresh(&stat) && stat.from_head) {
                return Ok(self.inodes.upsert(dir, name, child.kind, stat, lookup));
            }
            if self.fresh(&stat) && child.kind == Kind::File {
                // Known from a listing: one HEAD for the metadata kept in the object.
                if let Ok(meta) = self.store.head_object(&self.inodes.key(child)).await {
                    let fresh = stat_from_meta(&meta);
                    // Not in the directory's record: add it, so the next listing needs no HEAD.
                    if let Some(etag) = &fresh.etag {
                        self.records.note(
                            &self.inodes.key(dir),
                            name,
                            Self::file_entry(etag, fresh.size, &fresh.attrs, None),
                        );
                    }
                    return Ok(self.inodes.upsert(dir, name, kind_from_meta(&meta), fresh, lookup));
                }
            }
        }
        let known_dir = existing.filter(|c| c.kind == Kind::Dir).map(|c| c.stat());
        // A directory listed in a directory whose record lacks it: record what the probe finds.
        let unrecorded_dir = known_dir.as_ref().is_some_and(|stat| self.fresh(stat) && !stat.from_head);
        match self.probe(&self.inodes.key(dir), name).await? {
            Some((kind, mut stat)) => {
                // A directory without a marker (a server that cannot keep one) keeps what the
                // record said of it, instead of falling back to the defaults.
                if let Some(known) = known_dir.filter(|_| kind == Kind::Dir && stat.attrs == StoredAttrs::default()) {
                    (stat.attrs, stat.mtime) = (known.attrs, known.mtime);
                }
                if unrecorded_dir && kind == Kind::Dir {
                    self.records.note(&self.inodes.key(dir), &dir_entry_name(name), Self::dir_entry(&stat.attrs));
                }
                Ok(self.inodes.upsert(dir, name, kind, stat, lookup))
            }
            None => {
                self.inodes.unlink_name(dir.ino, name);
                Err(FsError::NotFound)
            }
        }
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let dir = self.dir_inode(parent)?;
        let inode = self.resolve(&dir, name, true).await?;
        Ok(self.attr(&inode))
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Dir && inode.open_state().is_none() && !self.fresh(&inode.stat()) {
            match self.store.head_object(&self.inodes.key(&inode)).await {
                Ok(meta) => self.refresh(&inode, &meta),
                Err(S3Error::NotFound(_)) => {
                    self.inodes.unlink_name(inode.parent(), &inode.name());
                    return Err(FsError::NotFound);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.attr(&inode))
    }

    fn new_handle(&self, handle: FileHandle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().unwrap().insert(fh, Arc::new(handle));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<FileHandle>, FsError> {
        self.files.lock().unwrap().get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// HEADs the object behind `inode`, refreshing its stat.
    async fn head(&self, inode: &Inode) -> Result<ObjectMeta, FsError> {
        match self.store.head_object(&self.inodes.key(inode)).await {
            Ok(meta) => {
                self.refresh(inode, &meta);
                Ok(meta)
            }
            Err(S3Error::NotFound(_)) => {
                self.inodes.unlink_name(inode.parent(), &inode.name());
                Err(FsError::NotFound)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The current object behind `inode`, for a read-only open. An object small enough to be
    /// one cache block (by the size known so far) is fetched whole by a GET that also returns
    /// its metadata: one round trip instead of a HEAD and a GET, and the read that follows is a
    /// cache hit. Larger ones, whose reads may never touch the start, get a HEAD.
    async fn fetch_for_open(&self, inode: &Inode) -> Result<ObjectMeta, FsError> {
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

    /// Takes what a HEAD said about `inode`. When the attributes believed so far (from a
    /// listing and its directory record) turn out wrong for the same object, the record was
    /// stale (identical bytes rewritten by another client, or a lost record update): correct it,
    /// with the object's Last-Modified so the entry is checked strictly from now on.
    fn refresh(&self, inode: &Inode, meta: &ObjectMeta) {
        let fresh = stat_from_meta(meta);
        let old = inode.stat();
        if old.from_head
            && old.etag == fresh.etag
            && old.attrs.ours() != fresh.attrs.ours()
            && let Some(etag) = &fresh.etag
        {
            tracing::debug!(key = %meta.key, "directory record was stale for this object; correcting it");
            let entry = Self::file_entry(etag, fresh.size, &fresh.attrs, Some(meta.last_modified));
            self.note_entry(inode.parent(), &inode.name(), inode.kind, entry);
        }
        inode.set_stat(fresh);
    }

    /// The write state of a file, creating it from S3 (or empty, for `truncate`) when needed.
    async fn open_state(&self, inode: &Inode, truncate: bool) -> Result<Arc<OpenState>, FsError> {
        if let Some(state) = inode.open_state() {
            if truncate {
                state.truncate(&self.writes, &self.inodes.key(inode), 0).await?;
            }
            return Ok(state);
        }
        let state = if truncate {
            OpenState::new_empty(inode.stat().attrs, false)
        } else {
            let meta = self.head(inode).await?;
            let stat = stat_from_meta(&meta);
            OpenState::from_object(
                &self.writes,
                Arc::new(ObjectId::from_meta(&meta)),
                meta.size,
                stat.attrs,
                stat.mtime,
            )
        };
        let mut slot = inode.open.lock().unwrap();
        Ok(Arc::clone(slot.get_or_insert(state)))
    }

    /// Owner, group and mode of a new entry, as a local filesystem sets them: the caller owns
    /// it; its group is the parent's when the parent is set-group-ID, else the volume's group
    /// when one is forced (`--gid`, a pod's fsGroup), else the caller's; its mode is the
    /// requested mode (the kernel's umask already applied), and a new directory inherits the
    /// parent's set-group-ID bit. All three are stored with the object.
    fn set_new_owner(&self, stat: &mut Stat, caller: Caller, parent: &Inode, kind: Kind, mode: u16) {
        let own = &self.config.ownership;
        let parent = self.attr(parent);
        let gid = if parent.perm & S_ISGID != 0 {
            parent.gid
        } else if own.group_forced {
            own.gid
        } else {
            caller.gid
        };
        let mut mode = mode & 0o7777;
        if kind == Kind::Dir && parent.perm & S_ISGID != 0 {
            mode |= S_ISGID;
        }
        stat.attrs.uid = Some(caller.uid);
        stat.attrs.gid = Some(gid);
        stat.attrs.mode = Some(mode);
        stat.attrs.symlink = kind == Kind::Symlink;
        // Stored with the object, so the mtime never changes by itself (S3's Last-Modified has
        // whole seconds and is the upload's time, not the mount's).
        stat.attrs.mtime = Some(stat.mtime);
    }

    /// Opens a file. Read-only opens always ask S3 for the current object, so a reopened file
    /// never serves an old version; opens for writing share the file's write state.
    pub async fn open(&self, ino: u64, flags: i32) -> Result<u64, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags & libc::O_TRUNC != 0;
        if !writable && !truncate {
            if let Some(state) = inode.open_state() {
                return Ok(self.new_handle(FileHandle::new(ino, false, HandleSource::State(state))));
            }
            let meta = self.fetch_for_open(&inode).await?;
            let object = HandleSource::Object(Arc::new(ObjectId::from_meta(&meta)), meta.size);
            return Ok(self.new_handle(FileHandle::new(ino, false, object)));
        }
        self.check_writable()?;
        if !writable {
            // O_RDONLY|O_TRUNC: truncates like a writer that closes at once.
            let state = self.begin_writing(&inode, true).await?;
            self.end_writing(&inode, &state).await?;
            return Ok(self.new_handle(FileHandle::new(ino, false, HandleSource::State(state))));
        }
        let state = self.begin_writing(&inode, truncate).await?;
        Ok(self.new_handle(FileHandle::new(ino, true, HandleSource::State(state))))
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
        let dir = self.dir_inode(parent)?;
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
            return state.read(&self.writes, &self.inodes.key(&inode), offset, u64::from(size)).await;
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
        Ok(self.fetcher.read(&object, obj_size, offset..end, access).await?)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let handle = self.handle(fh)?;
        let state = handle.write_state().ok_or(FsError::BadHandle)?;
        let inode = self.inode(handle.ino)?;
        state.write(&self.writes, &self.inodes.key(&inode), offset, data).await?;
        Ok(data.len() as u32)
    }

    /// Commits the file behind `fh` (close and fsync both call this).
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let handle = self.handle(fh)?;
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

    async fn commit(&self, inode: &Inode, state: &OpenState) -> Result<(), FsError> {
        let key = self.inodes.key(inode);
        if let Some((object, attrs)) = state.commit(&self.writes, &key).await? {
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
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> Result<(), FsError> {
        let Some(handle) = self.files.lock().unwrap().remove(&fh) else { return Ok(()) };
        let Some(state) = handle.write_state() else { return Ok(()) };
        let inode = self.inode(handle.ino)?;
        self.end_writing(&inode, &state).await
    }

    /// The file's write state, created (from S3, or empty to truncate) when needed, with one
    /// more writer. Every writer ends with [`S3Fs::end_writing`].
    async fn begin_writing(&self, inode: &Inode, truncate: bool) -> Result<Arc<OpenState>, FsError> {
        let state = self.open_state(inode, truncate).await?;
        state.add_writer();
        if truncate && state.size() != 0 {
            // Another writer's state was picked up after the truncate (a race with its open).
            if let Err(e) = state.truncate(&self.writes, &self.inodes.key(inode), 0).await {
                self.end_writing(inode, &state).await?;
                return Err(e);
            }
        }
        Ok(state)
    }

    /// One writer is done: the last commits the file and detaches the state from the inode.
    /// Readers still holding the state keep reading it; its resources go with the last of them.
    async fn end_writing(&self, inode: &Inode, state: &Arc<OpenState>) -> Result<(), FsError> {
        if !state.remove_writer() {
            return Ok(());
        }
        let result = self.commit(inode, state).await;
        if state.writers() == 0 {
            let mut slot = inode.open.lock().unwrap();
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, state)) {
                *slot = None;
                if state.is_unlinked() {
                    // Never committed; readers still holding it see its size from here.
                    let mut stat = inode.stat();
                    (stat.size, stat.mtime) = (state.size(), state.mtime());
                    inode.set_stat(stat);
                }
            }
        }
        result
    }

    pub async fn setattr(&self, caller: Caller, ino: u64, fh: Option<u64>, changes: SetAttr) -> Result<Attr, FsError> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        self.check_attr_change(caller, &inode, &changes)?;
        if let Some(size) = changes.size {
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if size > write::MAX_OBJECT_SIZE {
                return Err(FsError::TooBig);
            }
            let from_handle = fh.and_then(|fh| self.handle(fh).ok()).and_then(|h| h.write_state());
            let existing = from_handle.or_else(|| inode.open_state());
            let key = self.inodes.key(&inode);
            match existing {
                Some(state) => state.truncate(&self.writes, &key, size).await?,
                None => {
                    // No open file: a writer that truncates and closes (commits) at once.
                    let state = self.begin_writing(&inode, false).await?;
                    let truncated = state.truncate(&self.writes, &key, size).await;
                    let closed = self.end_writing(&inode, &state).await;
                    truncated.and(closed)?;
                }
            }
        }
        let attrs_change =
            changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() || changes.mtime.is_some();
        if attrs_change || changes.atime.is_some() {
            self.store_attrs(&inode, &changes).await?;
        }
        Ok(self.attr(&inode))
    }

    /// Applies `chmod`/`chown`/`utimes` and stores the result, starting from everything stored,
    /// so no other attribute changes: mode and owner changes keep the mtime; only `utimes`
    /// sets it. The root's attributes live in memory (it has no object of its own); an open
    /// file stores them with its next commit; a directory in its marker object; any other
    /// object by copying it onto itself with the new metadata.
    async fn store_attrs(&self, inode: &Inode, changes: &SetAttr) -> Result<(), FsError> {
        let apply = |a: &mut StoredAttrs| {
            if let Some(mode) = changes.mode {
                a.mode = Some(mode & 0o7777);
            }
            a.uid = changes.uid.or(a.uid);
            a.gid = changes.gid.or(a.gid);
            a.atime = changes.atime.or(a.atime);
        };
        if inode.ino == ROOT_INO {
            let mut stat = inode.stat();
            apply(&mut stat.attrs);
            stat.mtime = changes.mtime.unwrap_or(stat.mtime);
            inode.set_stat(stat);
            return Ok(());
        }
        if let Some(state) = inode.open_state() {
            state.update_attrs(apply, changes.mtime).await;
            let mut stat = inode.stat();
            stat.attrs = state.attrs().await;
            inode.set_stat(stat);
            return Ok(());
        }
        let key = self.inodes.key(inode);
        let (mut stat, source) = if inode.kind == Kind::Dir {
            (inode.stat(), None)
        } else {
            // The current object: its metadata is the base, its ETag the copy source.
            let meta = self.head(inode).await?;
            (stat_from_meta(&meta), Some((ObjectId::from_meta(&meta), meta.size)))
        };
        apply(&mut stat.attrs);
        stat.mtime = changes.mtime.unwrap_or(stat.mtime);
        // Pin the mtime: the rewrite gives the object a new Last-Modified.
        stat.attrs.mtime = Some(stat.mtime);
        let metadata = stat.attrs.encode();
        let entry = match source {
            None => {
                self.store.put_object(&key, Bytes::new(), &metadata).await?;
                Self::dir_entry(&stat.attrs)
            }
            Some((object, size)) => {
                let copied = self.copy_any(&object, size, &key, Some(&metadata)).await?;
                stat.etag = Some(copied.etag.clone());
                Self::file_entry(&copied.etag, size, &stat.attrs, copied.last_modified)
            }
        };
        self.note_entry(inode.parent(), &inode.name(), inode.kind, entry);
        stat.from_head = true;
        stat.validated_at = Instant::now();
        inode.set_stat(stat);
        Ok(())
    }

    /// POSIX rules for `chmod`/`chown`/`utimes` (the kernel enforces them as well, since the
    /// mount uses `default_permissions`): only root gives a file away; the owner (or root) may
    /// change the mode, the group and set explicit times.
    fn check_attr_change(&self, caller: Caller, inode: &Inode, changes: &SetAttr) -> Result<(), FsError> {
        if caller.is_root() {
            return Ok(());
        }
        let current = self.attr(inode);
        let owner = caller.uid == current.uid;
        if changes.uid.is_some_and(|uid| uid != current.uid) {
            return Err(FsError::NotPermitted("only root may change a file's owner"));
        }
        // The kernel clears set-user-ID/set-group-ID on a write by another user (killpriv).
        let only_clears_privs = changes.mode.is_some_and(|m| m == current.perm & !0o6000);
        let mode_change = changes.mode.is_some() && !only_clears_privs;
        if !owner && (mode_change || changes.gid.is_some_and(|g| g != current.gid)) {
            return Err(FsError::NotPermitted("only the owner or root may change mode or group"));
        }
        Ok(())
    }

    /// Server-side copy of any size: CopyObject up to 5 GiB, a multipart copy above.
    async fn copy_any(
        &self,
        src: &ObjectId,
        size: u64,
        dest: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<crate::s3::Copied, FsError> {
        write::copy_any(&self.writes, src, size, dest, metadata, self.copy_object_max, COPY_PART_SIZE).await
    }

    pub async fn mkdir(&self, caller: Caller, parent: u64, name: &str, mode: u16) -> Result<Attr, FsError> {
        self.check_writable()?;
        let dir = self.dir_inode(parent)?;
        let key = self.check_new_name(&dir, name)?;
        if self.resolve(&dir, name, false).await.is_ok() {
            return Err(FsError::Exists);
        }
        let mut stat = Stat::new(0, SystemTime::now());
        stat.from_head = true;
        self.set_new_owner(&mut stat, caller, &dir, Kind::Dir, mode);
        let metadata = stat.attrs.encode();
        let markers = self.markers.load(Ordering::Relaxed);
        if markers {
            self.store.put_object(&format!("{key}/"), Bytes::new(), &metadata).await?;
        }
        if markers {
            self.note_entry(dir.ino, name, Kind::Dir, Self::dir_entry(&stat.attrs));
        }
        let inode = self.inodes.upsert(&dir, name, Kind::Dir, stat, true);
        inode.local_dir.store(!markers, Ordering::Relaxed);
        Ok(self.attr(&inode))
    }

    pub async fn symlink(&self, caller: Caller, parent: u64, name: &str, target: &str) -> Result<Attr, FsError> {
        self.check_writable()?;
        let dir = self.dir_inode(parent)?;
        let key = self.check_new_name(&dir, name)?;
        if self.resolve(&dir, name, false).await.is_ok() {
            return Err(FsError::Exists);
        }
        let mut stat = Stat::new(target.len() as u64, SystemTime::now());
        stat.from_head = true;
        self.set_new_owner(&mut stat, caller, &dir, Kind::Symlink, 0o777);
        let metadata = stat.attrs.encode();
        let etag = self.store.put_object(&key, Bytes::copy_from_slice(target.as_bytes()), &metadata).await?;
        self.note_entry(dir.ino, name, Kind::Symlink, Self::file_entry(&etag, stat.size, &stat.attrs, None));
        stat.etag = Some(etag);
        let inode = self.inodes.upsert(&dir, name, Kind::Symlink, stat, true);
        Ok(self.attr(&inode))
    }

    pub async fn readlink(&self, ino: u64) -> Result<Bytes, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symbolic link"));
        }
        // A fresh stat names the exact object (ETag, size): read it without another HEAD. A
        // target that changed since fails the ETag check and is asked for again.
        let stat = inode.stat();
        let key = self.inodes.key(&inode);
        if let Some(etag) = stat.etag.as_ref().filter(|_| self.fresh(&stat) && stat.size > 0) {
            let object = Arc::new(ObjectId { key, version: etag.clone(), has_etag: true });
            match self.fetcher.read(&object, stat.size, 0..stat.size, Access::Random).await {
                Ok(parts) => return Ok(parts.concat().into()),
                Err(e) => tracing::debug!(error = %e, "symlink target changed; reading it again"),
            }
        }
        let meta = self.head(&inode).await?;
        let object = Arc::new(ObjectId::from_meta(&meta));
        Ok(self.fetcher.read(&object, meta.size, 0..meta.size, Access::Random).await?.concat().into())
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        let dir = self.dir_inode(parent)?;
        let inode = self.resolve(&dir, name, false).await?;
        if inode.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if let Some(state) = inode.open_state() {
            state.mark_unlinked();
        }
        self.store.delete_object(&self.inodes.key(&inode)).await?;
        self.note_entry(parent, name, inode.kind, None);
        self.inodes.unlink_name(parent, name);
        Ok(())
    }

    /// Whether a directory has any entry (in S3 or being written here).
    async fn dir_has_entries(&self, dir: &Inode) -> Result<bool, FsError> {
        if !self.inodes.pending_children(dir.ino).is_empty() {
            return Ok(true);
        }
        let key = self.inodes.key(dir);
        let record = format!("{key}{}", records::RECORD_NAME);
        // The marker and the record are not entries; a third key is.
        let page = self.store.list_page(&key, Some("/"), None, Some(3)).await?;
        Ok(!page.common_prefixes.is_empty() || page.objects.iter().any(|o| o.key != key && o.key != record))
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        let dir = self.dir_inode(parent)?;
        let inode = self.resolve(&dir, name, false).await?;
        if inode.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if self.dir_has_entries(&inode).await? {
            return Err(FsError::NotEmpty);
        }
        let key = self.inodes.key(&inode);
        self.records.delete(&key).await?;
        self.store.delete_object(&key).await?;
        self.note_entry(parent, name, Kind::Dir, None);
        self.inodes.unlink_name(parent, name);
        Ok(())
    }

    /// Renames a file (copy, then delete) or a directory (every key under it; not atomic).
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
    ) -> Result<(), FsError> {
        self.check_writable()?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::NotSupported("RENAME_EXCHANGE"));
        }
        let dir = self.dir_inode(parent)?;
        let newdir = self.dir_inode(newparent)?;
        let new_key_base = self.check_new_name(&newdir, newname)?;
        let src = self.resolve(&dir, name, false).await?;
        let target = match self.resolve(&newdir, newname, false).await {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = &target {
            if t.ino == src.ino {
                return Ok(());
            }
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(FsError::Exists);
            }
            match (src.kind == Kind::Dir, t.kind == Kind::Dir) {
                (false, true) => return Err(FsError::IsDir),
                (true, false) => return Err(FsError::NotDir),
                (true, true) if self.dir_has_entries(t).await? => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        if src.kind == Kind::Dir {
            let new_prefix = format!("{new_key_base}/");
            let old_prefix = self.inodes.key(&src);
            if new_prefix.starts_with(&old_prefix) {
                return Err(FsError::Invalid("cannot move a directory into itself"));
            }
            if let Some(t) = &target {
                let key = self.inodes.key(t);
                self.records.delete(&key).await?;
                self.store.delete_object(&key).await?;
            }
            // Files open for writing under it commit first (as a file rename does), so the
            // copies carry what they hold; afterwards they write on under the new keys.
            let open = self.open_files_under(&old_prefix);
            for (inode, state) in &open {
                self.commit(inode, state).await?;
            }
            let moved = {
                let _no_flush = self.records.exclusive().await;
                self.records.forget_dir(&old_prefix);
                self.rename_dir(&old_prefix, &new_prefix).await?
            };
            for (_, state) in &open {
                let Some(old_key) = state.source_key().await else { continue };
                if let Some(copy) = moved.get(&old_key) {
                    state.rebase(copy.clone()).await;
                }
            }
            self.note_entry(parent, name, Kind::Dir, None);
            self.note_entry(newparent, newname, Kind::Dir, Self::dir_entry(&src.stat().attrs));
        } else {
            let state = src.open_state();
            if let Some(state) = &state {
                self.commit(&src, state).await?;
            }
            let meta = self.head(&src).await?;
            let copied = self.copy_any(&ObjectId::from_meta(&meta), meta.size, &new_key_base, None).await?;
            self.store.delete_object(&meta.key).await?;
            let attrs = stat_from_meta(&meta).attrs;
            self.note_entry(parent, name, src.kind, None);
            let entry = Self::file_entry(&copied.etag, meta.size, &attrs, copied.last_modified);
            self.note_entry(newparent, newname, src.kind, entry);
            if let Some(state) = &state {
                // Open handles keep writing under the new name; unchanged bytes now live there.
                let copied = self.store.head_object(&new_key_base).await?;
                state.rebase(ObjectId::from_meta(&copied)).await;
            }
        }
        if let Some(t) = &target {
            self.inodes.unlink_name(newparent, newname);
            if let Some(state) = t.open_state() {
                state.mark_unlinked();
            }
        }
        self.inodes.rename(&src, newparent, newname);
        Ok(())
    }

    /// Copies every key under `old` to `new`, then deletes the originals; bounded concurrency.
    /// A crash in the middle leaves both trees, each complete up to the failure, never a lost key.
    /// Files under the directory key `prefix` with write state not unlinked.
    fn open_files_under(&self, prefix: &str) -> Vec<(Arc<Inode>, Arc<OpenState>)> {
        let mut open = self.inodes.with_open_state();
        open.retain(|(inode, state)| !state.is_unlinked() && self.inodes.key(inode).starts_with(prefix));
        open
    }

    async fn rename_dir(&self, old: &str, new: &str) -> Result<write::Moved, FsError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self.store.list_page(old, None, token, None).await?;
            keys.extend(page.objects);
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let this = self;
        let gate = Arc::new(Semaphore::new(RENAME_CONCURRENCY));
        let mut copies = futures::stream::FuturesUnordered::new();
        for meta in &keys {
            let gate = Arc::clone(&gate);
            let dest = format!("{new}{}", &meta.key[old.len()..]);
            copies.push(async move {
                let _permit = gate.acquire().await.expect("never closed");
                let copied = this.copy_any(&ObjectId::from_meta(meta), meta.size, &dest, None).await?;
                let id = if copied.etag.is_empty() {
                    ObjectId::from_meta(&this.store.head_object(&dest).await?)
                } else {
                    ObjectId { key: dest, version: copied.etag, has_etag: true }
                };
                Ok::<_, FsError>((meta.key.clone(), id))
            });
        }
        use futures::StreamExt;
        let mut moved = write::Moved::new();
        while let Some(r) = copies.next().await {
            let (old_key, id) = r?;
            moved.insert(old_key, id);
        }
        drop(copies);
        let mut deletes = futures::stream::FuturesUnordered::new();
        for meta in &keys {
            let gate = Arc::clone(&gate);
            deletes.push(async move {
                let _permit = gate.acquire().await.expect("never closed");
                this.store.delete_object(&meta.key).await
            });
        }
        while let Some(r) = deletes.next().await {
            r?;
        }
        Ok(moved)
    }

    /// Lists a directory completely (all pages) and snapshots it for `readdir`.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let dir = self.dir_inode(ino)?;
        let entries = self.list_dir(&dir).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().unwrap().insert(fh, Arc::new(DirHandle { entries }));
        Ok(fh)
    }

    async fn list_dir(&self, dir: &Arc<Inode>) -> Result<Vec<DirEntry>, FsError> {
        let dir_key = self.inodes.key(dir);
        // The record (one GET) comes beside the LIST pages.
        let (record, names) = tokio::join!(self.records.load(&dir_key), self.list_names(&dir_key));
        let mut names = names?;
        // Every entry counts as seen now, when the whole listing is known: with thousands of
        // entries the first pages are seconds old by the last one, and `ls -l` looks them up
        // only after reading the whole directory.
        let listed_at = Instant::now();
        for (name, (kind, stat)) in names.iter_mut() {
            let Some(stat) = stat else { continue };
            stat.validated_at = listed_at;
            self.apply_record(record.as_ref(), name, kind, stat);
        }
        for child in self.inodes.pending_children(dir.ino) {
            names.entry(child.name()).or_insert((child.kind, None));
        }
        let mut entries = Vec::with_capacity(names.len());
        for (name, (kind, stat)) in names {
            let existing = self.inodes.child(dir.ino, &name);
            let inode = match (existing, stat) {
                // Being written here, or known at least as well (fresh, from S3, same object).
                (Some(ex), _) if ex.open_state().is_some() || ex.local_dir.load(Ordering::Relaxed) => ex,
                (Some(ex), Some(stat)) if ex.kind == kind && self.known_as_well(&ex.stat(), &stat) => ex,
                (_, Some(stat)) => self.inodes.upsert(dir, &name, kind, stat, false),
                (Some(ex), None) => ex,
                (None, None) => continue,
            };
            entries.push(DirEntry { ino: inode.ino, name, kind: inode.kind });
        }
        Ok(entries)
    }

    /// Whether `known` (in memory) is as good as `listed` (from a listing and the record).
    fn known_as_well(&self, known: &Stat, listed: &Stat) -> bool {
        self.fresh(known) && known.from_head && known.etag == listed.etag && known.size == listed.size
    }

    /// Every name directly under `dir_key`: directories (common prefixes; they win over an
    /// object of the same name) and objects with what the listing says of them.
    async fn list_names(&self, dir_key: &str) -> Result<BTreeMap<String, (Kind, Option<Stat>)>, FsError> {
        let mut names: BTreeMap<String, (Kind, Option<Stat>)> = BTreeMap::new();
        let mut token = None;
        loop {
            let page = self.store.list_page(dir_key, Some("/"), token, None).await?;
            for p in &page.common_prefixes {
                let name = p[dir_key.len()..].trim_end_matches('/');
                if valid_name(name) && p.ends_with('/') && !name.contains('/') {
                    names.insert(name.to_owned(), (Kind::Dir, Some(self.dir_stat())));
                } else {
                    tracing::debug!(prefix = %p, "skipping prefix that cannot be a directory name");
                }
            }
            for o in &page.objects {
                let Some(name) = o.key.strip_prefix(dir_key) else { continue };
                if name.is_empty() {
                    continue; // the directory's own marker object
                }
                if !valid_name(name) {
                    if name != records::RECORD_NAME && name != RESERVED_NAME {
                        tracing::debug!(key = %o.key, "skipping key that cannot be a file name");
                    }
                    continue;
                }
                // A directory of the same name wins (it may come on a later page).
                names.entry(name.to_owned()).or_insert_with(|| (Kind::File, Some(stat_from_meta(o))));
            }
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok(names)
    }

    /// What a directory's record says about a listed entry (see [`records`]): with no record,
    /// nothing there carries s3csi attributes (mount defaults, no HEAD); an entry the record
    /// vouches for (same ETag and size) gets its attributes and kind; anything else is left for
    /// a HEAD at lookup.
    fn apply_record(&self, record: Option<&DirRecord>, name: &str, kind: &mut Kind, stat: &mut Stat) {
        let Some(record) = record else {
            stat.from_head = true;
            return;
        };
        let entry = match kind {
            Kind::Dir => record.dir(name),
            _ => record.file(name, stat.etag.as_deref(), stat.size, stat.mtime),
        };
        let Some(entry) = entry else {
            stat.from_head = false;
            return;
        };
        stat.attrs = StoredAttrs::decode(&entry.meta);
        if let Some(t) = stat.attrs.mtime {
            stat.mtime = t;
        }
        if *kind != Kind::Dir && stat.attrs.symlink {
            *kind = Kind::Symlink;
        }
        stat.from_head = true;
    }

    /// Entries of an open directory from `offset` (0 = start; `.` and `..` come first).
    pub fn readdir(&self, ino: u64, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        let dir = self.dir_inode(ino)?;
        let handle = self.dirs.lock().unwrap().get(&fh).cloned().ok_or(FsError::BadHandle)?;
        let dots = [
            DirEntry { ino: dir.ino, name: ".".into(), kind: Kind::Dir },
            DirEntry { ino: dir.parent(), name: "..".into(), kind: Kind::Dir },
        ];
        let all = dots.into_iter().chain(handle.entries.iter().cloned());
        Ok(all.enumerate().skip(offset as usize).map(|(i, e)| (i as u64 + 1, e)).collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().unwrap().remove(&fh);
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: STATFS_BLOCKS,
            bfree: STATFS_BLOCKS,
            bavail: STATFS_BLOCKS,
            files: STATFS_FILES,
            ffree: STATFS_FILES,
            bsize: REPORTED_BLOCK_SIZE,
            namelen: NAME_MAX as u32,
        }
    }

    /// Refuses an operation S3 cannot represent (hard links, device nodes).
    pub fn refuse(&self, what: &'static str) -> FsError {
        if self.config.read_only { FsError::ReadOnly } else { FsError::NotSupported(what) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Ownership, Prefix};
    use crate::s3::fake::FakeStore;

    const ROOT: Caller = Caller::ROOT;

    fn fs_with(store: Arc<FakeStore>, prefix: &str, ttl: Duration) -> S3Fs<FakeStore> {
        let own = Ownership { uid: 7, gid: 8, file_mode: 0o640, dir_mode: 0o750, group_forced: false };
        fs_owned(store, prefix, ttl, own)
    }

    fn fs_owned(store: Arc<FakeStore>, prefix: &str, ttl: Duration, own: Ownership) -> S3Fs<FakeStore> {
        let config = FsConfig {
            prefix: prefix.parse::<Prefix>().unwrap(),
            read_only: false,
            ownership: own,
            metadata_ttl: ttl,
            stall_limit: crate::config::DEFAULT_S3_TIMEOUT,
            max_gets: prefetch::MAX_CONCURRENT_GETS,
            write: test_write_config(),
        };
        S3Fs::new(store, Arc::new(BlockCache::new(64 << 20, None)), config).unwrap()
    }

    fn test_write_config() -> crate::fs::write::WriteConfig {
        let dir = tempfile::tempdir().unwrap().keep();
        crate::fs::write::WriteConfig {
            part_size: 5 << 20,
            buffer_bytes: 32 << 20,
            staging_dir: dir,
            staging_bytes: 1 << 30,
        }
    }

    async fn names(fs: &S3Fs<FakeStore>, ino: u64) -> Vec<String> {
        let fh = fs.opendir(ino).await.unwrap();
        let v = fs.readdir(ino, fh, 2).unwrap().into_iter().map(|(_, e)| e.name).collect();
        fs.releasedir(fh);
        v
    }

    async fn read_all(fs: &S3Fs<FakeStore>, ino: u64) -> Vec<u8> {
        let fh = fs.open(ino, libc::O_RDONLY).await.unwrap();
        let mut out = Vec::new();
        loop {
            let chunk = fs.read(fh, out.len() as u64, 131072).await.unwrap().concat();
            if chunk.is_empty() {
                break;
            }
            out.extend(chunk);
        }
        fs.release(fh).await.unwrap();
        out
    }

    #[tokio::test]
    async fn implicit_dirs_markers_and_conflicts() {
        let store = Arc::new(FakeStore::new("b"));
        for k in ["a/b/c.txt", "empty/", "x", "x/y", "top.txt", "odd//name", "./dot", "a/b/"] {
            store.put(k, "data");
        }
        store.put(&format!("long/{}", "n".repeat(300)), "z");
        let fs = fs_with(store, "", Duration::from_secs(60));
        assert_eq!(names(&fs, ROOT_INO).await, ["a", "empty", "long", "odd", "top.txt", "x"]);
        let x = fs.lookup(ROOT_INO, "x").await.unwrap();
        assert_eq!(x.kind, Kind::Dir, "directory wins over file of the same name");
        let a = fs.lookup(ROOT_INO, "a").await.unwrap();
        let b = fs.lookup(a.ino, "b").await.unwrap();
        assert_eq!(names(&fs, b.ino).await, ["c.txt"], "marker a/b/ itself is not an entry");
        let empty = fs.lookup(ROOT_INO, "empty").await.unwrap();
        assert!(names(&fs, empty.ino).await.is_empty());
        let odd = fs.lookup(ROOT_INO, "odd").await.unwrap();
        assert!(names(&fs, odd.ino).await.is_empty(), "empty segment is skipped");
        let long = fs.lookup(ROOT_INO, "long").await.unwrap();
        assert!(names(&fs, long.ino).await.is_empty(), "300-byte name is skipped");
        assert!(matches!(fs.lookup(ROOT_INO, "..").await, Err(FsError::NotFound)));
        assert!(matches!(fs.lookup(ROOT_INO, "nope").await, Err(FsError::NotFound)));
    }

    #[tokio::test]
    async fn attrs_come_from_config_and_s3() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", vec![1u8; 1234]);
        let fs = fs_with(store, "", Duration::from_secs(60));
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!((f.size, f.perm, f.uid, f.gid, f.kind), (1234, 0o640, 7, 8, Kind::File));
        let root = fs.getattr(ROOT_INO).await.unwrap();
        assert_eq!((root.perm, root.kind), (0o750, Kind::Dir));
    }

    #[tokio::test]
    async fn prefix_confines_the_view() {
        let store = Arc::new(FakeStore::new("b"));
        for k in ["p/q/in.txt", "p/other.txt", "outside.txt"] {
            store.put(k, "data");
        }
        let fs = fs_with(store, "p/q", Duration::from_secs(60));
        assert_eq!(names(&fs, ROOT_INO).await, ["in.txt"]);
    }

    #[tokio::test]
    async fn reopen_sees_new_content_and_old_handle_never_mixes() {
        let store = Arc::new(FakeStore::new("b"));
        let old = vec![1u8; 3 << 20];
        store.put("f", old.clone());
        let fs = fs_with(Arc::clone(&store), "", Duration::ZERO);
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        let fh = fs.open(f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(fs.read(fh, 0, 10).await.unwrap().concat(), vec![1u8; 10]);
        store.put("f", vec![2u8; 2 << 20]);
        // The old handle reads the old version or fails; never new bytes.
        match fs.read(fh, 2 << 20, 10).await {
            Ok(d) => assert!(d.concat().iter().all(|b| *b == 1)),
            Err(e) => assert_eq!(e.errno(), libc::ESTALE),
        }
        fs.release(fh).await.unwrap();
        assert_eq!(read_all(&fs, f.ino).await, vec![2u8; 2 << 20]);
    }

    #[tokio::test]
    async fn metadata_ttl_is_honoured() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", "short");
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(3600));
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        store.put("f", "much longer");
        assert_eq!(fs.getattr(f.ino).await.unwrap().size, 5, "cached within TTL");
        let fs0 = fs_with(Arc::clone(&store), "", Duration::ZERO);
        let f0 = fs0.lookup(ROOT_INO, "f").await.unwrap();
        store.delete("f");
        assert!(matches!(fs0.getattr(f0.ino).await, Err(FsError::NotFound)));
    }

    #[tokio::test]
    async fn paginated_listing_is_complete() {
        let store = Arc::new(FakeStore::new("b"));
        for i in 0..2500 {
            store.put(&format!("d/f{i:05}"), vec![0u8; i % 7]);
        }
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        assert_eq!(names(&fs, d.ino).await.len(), 2500);
        assert!(store.lists.load(Ordering::Relaxed) >= 3);
    }

    #[tokio::test]
    async fn listings_without_etags_still_read_correctly() {
        let store = Arc::new(FakeStore::without_list_etags("b"));
        store.put("f", vec![5u8; 100]);
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        names(&fs, ROOT_INO).await;
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!(read_all(&fs, f.ino).await, vec![5u8; 100]);
    }

    #[tokio::test]
    async fn writes_are_refused_clearly() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", "x");
        let mut fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        fs.config.read_only = true;
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!(fs.open(f.ino, libc::O_WRONLY).await.err().unwrap().errno(), libc::EROFS);
        assert_eq!(fs.mkdir(ROOT, ROOT_INO, "d", 0o755).await.err().unwrap().errno(), libc::EROFS);
    }

    #[test]
    fn statfs_is_large() {
        let fs = fs_with(Arc::new(FakeStore::new("b")), "", Duration::ZERO);
        let s = fs.statfs();
        assert!(s.blocks > 1 << 30 && s.bavail > 0 && s.files > 0);
    }

    /// Compares large buffers without printing them.
    fn same(got: &[u8], want: &[u8]) {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        assert!(
            got.len() == want.len() && first.is_none(),
            "len {} vs {}, first difference at {first:?}",
            got.len(),
            want.len()
        );
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    async fn write_file(fs: &S3Fs<FakeStore>, name: &str, data: &[u8], chunk: usize) -> u64 {
        let (attr, fh) = fs.create(ROOT, ROOT_INO, name, 0o644, libc::O_WRONLY).await.unwrap();
        for (i, c) in data.chunks(chunk).enumerate() {
            fs.write(fh, (i * chunk) as u64, c).await.unwrap();
        }
        fs.flush(fh).await.unwrap();
        fs.release(fh).await.unwrap();
        attr.ino
    }

    #[tokio::test]
    async fn streaming_write_uses_multipart_and_commits_exact_bytes() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let data = pattern(23 << 20, 1);
        write_file(&fs, "big", &data, 1 << 20).await;
        same(&store.data("big").unwrap(), &data);
        assert_eq!(store.parts_uploaded.load(Ordering::Relaxed), 5, "23 MiB in 5 MiB parts");
        assert_eq!(store.pending_uploads(), 0);
        write_file(&fs, "small", b"hello", 4096).await;
        assert_eq!(store.data("small").unwrap(), &b"hello"[..]);
    }

    #[tokio::test]
    async fn failed_upload_is_an_error_and_leaves_nothing() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (_, fh) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        store.fail_puts.store(1000, Ordering::Relaxed);
        let data = pattern(12 << 20, 2);
        let mut failed = false;
        for (i, c) in data.chunks(1 << 20).enumerate() {
            failed |= fs.write(fh, (i << 20) as u64, c).await.is_err();
        }
        failed |= fs.flush(fh).await.is_err();
        assert!(failed, "the failure must reach write or close");
        assert_eq!(fs.flush(fh).await.unwrap_err().errno(), libc::EIO, "stays failed");
        assert!(fs.release(fh).await.is_err());
        store.fail_puts.store(0, Ordering::Relaxed);
        assert!(store.data("f").is_none(), "no partial or empty object");
        assert_eq!(store.pending_uploads(), 0, "multipart upload aborted");
    }

    #[tokio::test]
    async fn random_writes_append_and_truncate_on_existing_objects() {
        let store = Arc::new(FakeStore::new("b"));
        let mut model = pattern(20 << 20, 3);
        store.put("f", model.clone());
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        let fh = fs.open(f.ino, libc::O_RDWR).await.unwrap();
        fs.write(fh, 7 << 20, b"middle").await.unwrap();
        model[(7 << 20)..(7 << 20) + 6].copy_from_slice(b"middle");
        let len = model.len() as u64;
        fs.write(fh, len, b"appended").await.unwrap();
        model.extend_from_slice(b"appended");
        assert_eq!(fs.read(fh, (7 << 20) - 2, 10).await.unwrap().concat(), model[(7 << 20) - 2..(7 << 20) + 8]);
        fs.flush(fh).await.unwrap();
        same(&store.data("f").unwrap(), &model);
        assert!(store.parts_copied.load(Ordering::Relaxed) >= 2, "unchanged parts copied server side");
        assert!(fs.staging_used_bytes() == 0, "staging freed after commit");
        fs.setattr(ROOT, f.ino, Some(fh), SetAttr { size: Some(100), ..Default::default() }).await.unwrap();
        fs.write(fh, 200, b"hole").await.unwrap();
        model.truncate(100);
        model.resize(200, 0);
        model.extend_from_slice(b"hole");
        fs.release(fh).await.unwrap();
        same(&store.data("f").unwrap(), &model);
        assert_eq!(fs.getattr(f.ino).await.unwrap().size, 204);
    }

    #[tokio::test]
    async fn staging_budget_gives_enospc() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", pattern(100, 0));
        let mut fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        fs.writes.staging = write::Staging::new(tempfile::tempdir().unwrap().keep(), 1000).unwrap().into();
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        let fh = fs.open(f.ino, libc::O_RDWR).await.unwrap();
        fs.write(fh, 0, &[1; 900]).await.unwrap();
        assert_eq!(fs.write(fh, 2000, &[1; 200]).await.unwrap_err().errno(), libc::ENOSPC);
        fs.release(fh).await.unwrap();
    }

    #[tokio::test]
    async fn namespace_operations() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let d = fs.mkdir(ROOT, ROOT_INO, "d", 0o700).await.unwrap();
        assert!(store.data("d/").is_some(), "marker object");
        assert_eq!(fs.mkdir(ROOT, ROOT_INO, "d", 0o755).await.unwrap_err().errno(), libc::EEXIST);
        let (_, fh) = fs.create(ROOT, d.ino, "f", 0o644, libc::O_WRONLY).await.unwrap();
        assert_eq!(names(&fs, d.ino).await, ["f"], "uncommitted file is listed");
        fs.write(fh, 0, b"x").await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!(fs.rmdir(ROOT_INO, "d").await.unwrap_err().errno(), libc::ENOTEMPTY);
        fs.rename(ROOT_INO, "d", ROOT_INO, "e", 0).await.unwrap();
        assert_eq!(store.keys(), ["e/", "e/f"]);
        assert_eq!(fs.getattr(d.ino).await.unwrap().perm, 0o700);
        let e = fs.lookup(ROOT_INO, "e").await.unwrap();
        write_file(&fs, "g", b"gg", 10).await;
        fs.rename(ROOT_INO, "g", e.ino, "f", 0).await.unwrap();
        assert_eq!(store.data("e/f").unwrap(), &b"gg"[..]);
        assert!(store.data("g").is_none());
        fs.unlink(e.ino, "f").await.unwrap();
        fs.rmdir(ROOT_INO, "e").await.unwrap();
        assert!(store.keys().is_empty());
    }

    const POD: Caller = Caller { uid: 1000, gid: 3000 };
    const OTHER: Caller = Caller { uid: 1001, gid: 3000 };

    fn meta_of(store: &FakeStore, key: &str) -> UserMetadata {
        store.metadata(key).unwrap_or_else(|| panic!("{key} is in the store"))
    }

    #[tokio::test]
    async fn new_entries_belong_to_the_caller_and_persist() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (f, fh) = fs.create(POD, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(fh, 0, b"x").await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!((f.uid, f.gid, f.perm), (1000, 3000, 0o644));
        let d = fs.mkdir(POD, ROOT_INO, "d", 0o700).await.unwrap();
        assert_eq!((d.uid, d.gid, d.perm), (1000, 3000, 0o700));
        let l = fs.symlink(POD, ROOT_INO, "l", "f").await.unwrap();
        assert_eq!((l.uid, l.gid, l.perm), (1000, 3000, 0o777));
        for (key, mode) in [("f", "644"), ("d/", "700"), ("l", "777")] {
            let m = meta_of(&store, key);
            assert_eq!(m.get(META_UID).map(String::as_str), Some("1000"), "{key}");
            assert_eq!(m.get(META_GID).map(String::as_str), Some("3000"), "{key}");
            assert_eq!(m.get(META_MODE).map(String::as_str), Some(mode), "{key}");
        }
        // A fresh mount sees the same owners; objects from other clients keep the defaults.
        store.put("foreign", b"y".to_vec());
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        for name in ["f", "d", "l"] {
            let a = fs2.lookup(ROOT_INO, name).await.unwrap();
            assert_eq!((a.uid, a.gid), (1000, 3000), "{name}");
        }
        let a = fs2.lookup(ROOT_INO, "foreign").await.unwrap();
        assert_eq!((a.uid, a.gid, a.perm), (7, 8, 0o640));
    }

    #[tokio::test]
    async fn a_forced_group_or_a_setgid_parent_sets_the_group() {
        let store = Arc::new(FakeStore::new("b"));
        // fsGroup 2000: the volume's group, set-group-ID directories (what kubelet prepares).
        let own = Ownership { uid: 0, gid: 2000, file_mode: 0o664, dir_mode: 0o2775, group_forced: true };
        let fs = fs_owned(Arc::clone(&store), "", Duration::from_secs(60), own);
        let (f, fh) = fs.create(POD, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!((f.uid, f.gid, f.perm), (1000, 2000, 0o644));
        let d = fs.mkdir(POD, ROOT_INO, "d", 0o755).await.unwrap();
        assert_eq!((d.uid, d.gid, d.perm), (1000, 2000, 0o2755), "new directories inherit set-group-ID");
        let (g, fh) = fs.create(OTHER, d.ino, "g", 0o600, libc::O_WRONLY).await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!((g.uid, g.gid, g.perm), (1001, 2000, 0o600));

        // No forced group: the caller's group, unless the parent is set-group-ID.
        let own = Ownership { uid: 0, gid: 0, file_mode: 0o644, dir_mode: 0o777, group_forced: false };
        let fs = fs_owned(Arc::clone(&store), "", Duration::from_secs(60), own);
        let plain = fs.mkdir(POD, ROOT_INO, "plain", 0o775).await.unwrap();
        assert_eq!((plain.gid, plain.perm), (3000, 0o775));
        fs.setattr(POD, plain.ino, None, SetAttr { mode: Some(0o2775), ..Default::default() }).await.unwrap();
        let sub = fs.mkdir(OTHER, plain.ino, "sub", 0o700).await.unwrap();
        assert_eq!((sub.uid, sub.gid, sub.perm), (1001, 3000, 0o2700));
    }

    #[tokio::test]
    async fn only_the_owner_changes_modes_and_only_root_gives_files_away() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (f, fh) = fs.create(POD, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.release(fh).await.unwrap();
        let chmod = |m| SetAttr { mode: Some(m), ..Default::default() };
        let err = fs.setattr(OTHER, f.ino, None, chmod(0o600)).await.unwrap_err();
        assert_eq!(err.errno(), libc::EPERM);
        assert_eq!(fs.setattr(POD, f.ino, None, chmod(0o600)).await.unwrap().perm, 0o600);
        let chown = SetAttr { uid: Some(1001), ..Default::default() };
        assert_eq!(fs.setattr(POD, f.ino, None, chown.clone()).await.unwrap_err().errno(), libc::EPERM);
        assert_eq!(fs.setattr(ROOT, f.ino, None, chown).await.unwrap().uid, 1001);
        let m = meta_of(&store, "f");
        assert_eq!((m.get(META_UID).unwrap().as_str(), m.get(META_MODE).unwrap().as_str()), ("1001", "600"));
    }

    #[tokio::test]
    async fn chmod_and_chown_keep_the_mtime_and_everything_else_stored() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        // An object from another client with its own metadata, and no stored mtime.
        store.put_with_metadata("f", b"data".to_vec(), [("team".to_owned(), "a".to_owned())].into());
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        let uploaded = f.mtime;
        std::thread::sleep(Duration::from_millis(20));
        let a = fs.setattr(ROOT, f.ino, None, SetAttr { mode: Some(0o600), ..Default::default() }).await.unwrap();
        assert_eq!(a.mtime, uploaded, "chmod does not move mtime");
        let t = SystemTime::UNIX_EPOCH + Duration::new(981_173_106, 42);
        fs.setattr(ROOT, f.ino, None, SetAttr { mtime: Some(t), atime: Some(t), ..Default::default() }).await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let a =
            fs.setattr(ROOT, f.ino, None, SetAttr { uid: Some(5), gid: Some(6), ..Default::default() }).await.unwrap();
        assert_eq!((a.mtime, a.atime, a.perm, a.uid, a.gid), (t, t, 0o600, 5, 6));
        let m = meta_of(&store, "f");
        assert_eq!(m.get(META_MTIME).map(String::as_str), Some("981173106.000000042"));
        assert_eq!(m.get("team").map(String::as_str), Some("a"), "other tools' metadata survives");
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let again = fs2.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!((again.mtime, again.perm, again.uid, again.gid), (t, 0o600, 5, 6));
    }

    #[tokio::test]
    async fn a_written_file_keeps_one_mtime_to_the_nanosecond() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_millis(1));
        let ino = write_file(&fs, "f", b"content", 3).await;
        let first = fs.getattr(ino).await.unwrap().mtime;
        std::thread::sleep(Duration::from_millis(10));
        // After the TTL the attributes come from S3 again: the same instant.
        assert_eq!(fs.getattr(ino).await.unwrap().mtime, first);
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        assert_eq!(fs2.lookup(ROOT_INO, "f").await.unwrap().mtime, first);
        // New data moves it; a utimes while open is kept, a later write replaces it.
        let fh = fs.open(ino, libc::O_WRONLY).await.unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_000, 1);
        fs.setattr(ROOT, ino, Some(fh), SetAttr { mtime: Some(t), ..Default::default() }).await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!(fs2.getattr(fs2.lookup(ROOT_INO, "f").await.unwrap().ino).await.unwrap().mtime, first, "cached");
        let fs3 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        assert_eq!(fs3.lookup(ROOT_INO, "f").await.unwrap().mtime, t);
        let fh = fs.open(ino, libc::O_WRONLY).await.unwrap();
        fs.write(fh, 0, b"C").await.unwrap();
        fs.release(fh).await.unwrap();
        let after = fs.getattr(ino).await.unwrap().mtime;
        assert!(after > first, "a write sets mtime to now");
        let fs4 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        assert_eq!(fs4.lookup(ROOT_INO, "f").await.unwrap().mtime, after);
    }

    #[tokio::test]
    async fn directories_have_stable_times_and_the_root_accepts_attribute_changes() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("implied/x", b"x".to_vec());
        let fs = fs_with(Arc::clone(&store), "", Duration::from_millis(1));
        let a = fs.lookup(ROOT_INO, "implied").await.unwrap();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(fs.lookup(ROOT_INO, "implied").await.unwrap().mtime, a.mtime);
        let d = fs.mkdir(ROOT, ROOT_INO, "made", 0o755).await.unwrap();
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(fs.lookup(ROOT_INO, "made").await.unwrap().mtime, d.mtime, "the marker stores it");
        // The root (no object of its own) keeps mode, owner and times in memory.
        let t = SystemTime::UNIX_EPOCH + Duration::new(7, 7);
        let changes = SetAttr { mode: Some(0o700), uid: Some(3), gid: Some(4), mtime: Some(t), ..Default::default() };
        let r = fs.setattr(ROOT, ROOT_INO, None, changes).await.unwrap();
        assert_eq!((r.perm, r.uid, r.gid, r.mtime), (0o700, 3, 4, t));
        assert_eq!(fs.getattr(ROOT_INO).await.unwrap().mtime, t);
    }

    #[tokio::test]
    async fn listings_vouch_for_attributes_through_the_directory_record() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (_, fh) = fs.create(POD, ROOT_INO, "mine", 0o600, libc::O_WRONLY).await.unwrap();
        fs.write(fh, 0, b"x").await.unwrap();
        fs.release(fh).await.unwrap();
        fs.symlink(POD, ROOT_INO, "link", "mine").await.unwrap();
        fs.mkdir(POD, ROOT_INO, "dir", 0o700).await.unwrap();
        store.put("foreign", b"y".to_vec());
        store.put("plain/inside", b"z".to_vec());
        fs.flush_records().await;
        assert!(store.keys().contains(&".s3csi-attrs".to_owned()), "{:?}", store.keys());

        // A fresh mount: one listing (LIST + record GET), then no HEAD for any entry.
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let heads = || store.heads.load(Ordering::Relaxed);
        assert_eq!(names(&fs2, ROOT_INO).await, ["dir", "foreign", "link", "mine", "plain"], "the record is hidden");
        let before = heads();
        let mine = fs2.lookup(ROOT_INO, "mine").await.unwrap();
        assert_eq!((mine.uid, mine.gid, mine.perm), (1000, 3000, 0o600));
        assert_eq!(fs2.lookup(ROOT_INO, "link").await.unwrap().kind, Kind::Symlink);
        let d = fs2.lookup(ROOT_INO, "dir").await.unwrap();
        assert_eq!((d.uid, d.perm), (1000, 0o700));
        assert_eq!(heads(), before, "no HEAD for entries the record vouches for");
        // Not in the record: one HEAD, then recorded for next time.
        let f = fs2.lookup(ROOT_INO, "foreign").await.unwrap();
        assert_eq!((f.uid, f.perm), (7, 0o640));
        assert_eq!(heads(), before + 1);

        // Another client replaces a recorded object: the record no longer vouches (ETag).
        store.put_with_metadata("mine", b"replaced".to_vec(), UserMetadata::new());
        let fs3 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        names(&fs3, ROOT_INO).await;
        let mine = fs3.lookup(ROOT_INO, "mine").await.unwrap();
        assert_eq!((mine.uid, mine.perm, mine.size), (7, 0o640, 8), "the replaced object's own attributes");

        // A directory nobody wrote a record in costs no HEAD: its entries are the defaults.
        let plain = fs3.lookup(ROOT_INO, "plain").await.unwrap();
        let before = heads();
        assert_eq!(names(&fs3, plain.ino).await, ["inside"]);
        let inside = fs3.lookup(plain.ino, "inside").await.unwrap();
        assert_eq!((inside.uid, inside.perm), (7, 0o640));
        assert_eq!(heads(), before);

        // Removed entries leave the record; an emptied record is deleted.
        for name in ["mine", "link", "foreign"] {
            fs3.unlink(ROOT_INO, name).await.unwrap();
        }
        fs3.rmdir(ROOT_INO, "dir").await.unwrap();
        fs2.flush_records().await;
        fs3.flush_records().await;
        let record = fs3.records.load("").await.unwrap();
        assert_eq!(record.entries.keys().collect::<Vec<_>>(), ["plain/"], "only what still exists");
        fs3.rmdir(ROOT_INO, "plain").await.unwrap_err();
        fs3.unlink(plain.ino, "inside").await.unwrap();
        fs3.note_entry(ROOT_INO, "plain", Kind::Dir, None);
        fs3.flush_records().await;
        assert!(store.keys().is_empty(), "{:?}", store.keys());
    }

    #[tokio::test]
    async fn a_record_never_outvotes_a_later_attribute_change() {
        // Two mounts chmod one file; their record updates land in the wrong order. A copy keeps
        // the ETag (as S3 does) but not Last-Modified, so the listing sees the record is old.
        let store = Arc::new(FakeStore::new("b"));
        let a = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let b = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        write_file(&a, "f", b"x", 1).await;
        a.flush_records().await;
        let fb = b.lookup(ROOT_INO, "f").await.unwrap();
        b.setattr(ROOT, fb.ino, None, SetAttr { mode: Some(0o600), ..Default::default() }).await.unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        let fa = a.lookup(ROOT_INO, "f").await.unwrap();
        a.setattr(ROOT, fa.ino, None, SetAttr { mode: Some(0o700), ..Default::default() }).await.unwrap();
        a.flush_records().await;
        b.flush_records().await; // the older change is written last
        let c = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        names(&c, ROOT_INO).await;
        assert_eq!(c.lookup(ROOT_INO, "f").await.unwrap().perm, 0o700, "the object's own mode wins");

        // Another client rewrites the same bytes without attributes (same ETag; a PUT through
        // the mount recorded no Last-Modified): a listing believes the record, but the first
        // open reads the object's own metadata and corrects the record for every mount.
        write_file(&a, "g", b"same", 1).await; // stored mode 0644, recorded without a time
        a.flush_records().await;
        store.rewrite_same_bytes("g", UserMetadata::new());
        let d = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        names(&d, ROOT_INO).await;
        let g = d.lookup(ROOT_INO, "g").await.unwrap();
        assert_eq!(g.perm, 0o644, "the listing believes the record (same ETag, size)");
        let fh = d.open(g.ino, libc::O_RDONLY).await.unwrap();
        d.release(fh).await.unwrap();
        assert_eq!(d.getattr(g.ino).await.unwrap().perm, 0o640, "after open: the object's own (none)");
        d.flush_records().await;
        let e = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        names(&e, ROOT_INO).await;
        assert_eq!(e.lookup(ROOT_INO, "g").await.unwrap().perm, 0o640, "the record was corrected");
    }

    #[tokio::test]
    async fn attributes_and_symlinks_persist_in_metadata() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let ino = write_file(&fs, "f", b"data", 10).await;
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_000_000, 5);
        let changes = SetAttr { mode: Some(0o600), uid: Some(42), mtime: Some(t), ..Default::default() };
        fs.setattr(ROOT, ino, None, changes).await.unwrap();
        fs.symlink(ROOT, ROOT_INO, "l", "f").await.unwrap();
        // A fresh mount sees the same attributes.
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let f = fs2.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!((f.perm, f.uid, f.gid, f.mtime), (0o600, 42, 0, t), "created by root: root's group");
        let l = fs2.lookup(ROOT_INO, "l").await.unwrap();
        assert_eq!(l.kind, Kind::Symlink);
        assert_eq!(&fs2.readlink(l.ino).await.unwrap()[..], b"f");
    }

    #[tokio::test]
    async fn large_copies_use_multipart_copy() {
        let store = Arc::new(FakeStore::new("b"));
        let data = pattern(12 << 20, 9);
        store.put("a", data.clone());
        let mut fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        fs.copy_object_max = 5 << 20;
        fs.lookup(ROOT_INO, "a").await.unwrap();
        fs.rename(ROOT_INO, "a", ROOT_INO, "b", 0).await.unwrap();
        same(&store.data("b").unwrap(), &data);
        assert_eq!(store.parts_copied.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn rename_while_open_keeps_writing_under_the_new_name() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (attr, fh) = fs.create(ROOT, ROOT_INO, "a", 0o644, libc::O_RDWR).await.unwrap();
        fs.write(fh, 0, b"hello world").await.unwrap();
        fs.rename(ROOT_INO, "a", ROOT_INO, "b", 0).await.unwrap();
        fs.write(fh, 6, b"there").await.unwrap();
        assert_eq!(fs.read(fh, 0, 100).await.unwrap().concat(), b"hello there");
        fs.release(fh).await.unwrap();
        assert_eq!(store.keys(), ["b"]);
        assert_eq!(&store.data("b").unwrap()[..], b"hello there");
        assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 11);
    }

    /// A truncate by path (no handle) on a closed file, and a writer opening the file while
    /// that truncate commits, share one write state: the truncate must neither detach the
    /// writer's state from the inode nor drop what the writer wrote.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncate_by_path_and_a_concurrent_writer_share_one_state() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", &b"0123456789"[..]);
        let fs = Arc::new(fs_with(Arc::clone(&store), "", Duration::from_secs(60)));
        let ino = fs.lookup(ROOT_INO, "f").await.unwrap().ino;
        store.put_delay_ms.store(300, Ordering::Relaxed);
        let truncating = {
            let fs = Arc::clone(&fs);
            tokio::spawn(
                async move { fs.setattr(ROOT, ino, None, SetAttr { size: Some(4), ..Default::default() }).await },
            )
        };
        // The truncate is committing (its PUT takes 300 ms) when the writer opens and writes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w = fs.open(ino, libc::O_WRONLY).await.unwrap();
        fs.write(w, 4, b"XY").await.unwrap();
        truncating.await.unwrap().unwrap();
        store.put_delay_ms.store(0, Ordering::Relaxed);
        // A second writer while the first is open: the same state, so it sees the first's bytes.
        let a = fs.open(ino, libc::O_WRONLY | libc::O_APPEND).await.unwrap();
        assert_eq!(fs.getattr(ino).await.unwrap().size, 6);
        fs.write(a, 6, b"Z").await.unwrap();
        fs.release(w).await.unwrap();
        fs.release(a).await.unwrap();
        assert_eq!(&store.data("f").unwrap()[..], b"0123XYZ");
        assert!(fs.inode(ino).unwrap().open_state().is_none(), "no state left after the last writer");
    }
}
