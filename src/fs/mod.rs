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
//!
//! Layout: `namespace` (lookup, listing, mkdir, symlink, unlink, rmdir, rename), `handles`
//! (open files: one enum for what a handle reads, the writer lifecycle), `setattr` (attribute
//! changes), [`attrs`] (the attribute codec), [`write`] (the write state machine), [`prefetch`]
//! (reads from S3), [`inode`] (inode numbers and keys), [`records`] (directory attribute records).
//!
//! Lock order (locks further down the list are taken while holding ones above, never the other
//! way round):
//! 1. `OpenState::file` (a tokio mutex, the only lock held across an `await`: it serializes a
//!    file's writes, truncates and commits). A rename or an unlink holds it (`OpenState::hold`)
//!    for every file it moves or removes, taken in inode order, across its S3 calls, and takes
//!    the locks below meanwhile; everything else holds one at a time and takes only the state's
//!    own `mtime`/`committed` locks under it.
//! 2. `S3Fs::files`, then a handle's `source`, then the inode's `open` slot (a new write state
//!    reaches the file's readers; a read picks up the file's current write state).
//! 3. `InodeTable::tables`, then an inode's `loc`, `lookups` or `open` (forget, key, rename).
//! 4. Leaves, taken alone and released at once: an inode's `stat`, `S3Fs::dirs`,
//!    `FileHandle::pattern`, `OpenState`'s `mtime`.
//!
//! Every std mutex is released before any `await`.

pub mod attrs;
pub mod connection;
pub mod error;
pub mod fuse;
mod handles;
pub mod inode;
mod namespace;
pub mod prefetch;
pub mod records;
pub mod recovery;
mod setattr;
pub mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use error::FsError;
use handles::FileHandle;
pub use handles::ReadPlan;
use inode::{Inode, InodeTable, Kind, Stat};
use namespace::DirHandle;
pub use namespace::{RESERVED_NAME, valid_name};
use prefetch::Fetcher;
use records::{RecordEntry, Records, dir_entry_name};
use recovery::RecoveryDir;
use write::WriteCtx;

use crate::cache::BlockCache;
use crate::config::FsConfig;
use crate::s3::{ObjectStore, UserMetadata};

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

/// Handle numbers keep the generation of the process that made them from this bit up.
pub const FH_GENERATION_SHIFT: u32 = 40;

/// What a process found in its recovery directory (see [`S3Fs::attach_recovery`]).
#[derive(Debug)]
pub struct Recovered {
    pub generation: u64,
    /// Inodes known after the restore (1: only the root).
    pub inodes: usize,
    /// Multipart uploads started and never finished: (key, upload id).
    pub orphans: Vec<(String, String)>,
    /// Files handed over open for writing (a graceful hand-over), or `None` after a crash.
    pub handover: Option<Vec<recovery::HandoverHandle>>,
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
    /// Which process serving this connection this is (1 for the one that mounted it); handle
    /// numbers carry it, see [`FH_GENERATION_SHIFT`].
    generation: u64,
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

/// A random number for probe object names (not security relevant).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
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
            generation: 0,
            copy_object_max: COPY_OBJECT_MAX,
            started: SystemTime::now(),
            markers: std::sync::atomic::AtomicBool::new(true),
            records,
            flusher: Mutex::new(None),
        })
    }

    /// Keeps what a successor process needs in `dir` from now on, and with `takeover` first
    /// restores what the previous process serving this connection left there. Call before the
    /// session starts. [`S3Fs::finish_recovery`] does the S3 part.
    pub fn attach_recovery(&mut self, dir: &RecoveryDir, takeover: bool) -> std::io::Result<Recovered> {
        if !takeover {
            dir.clear()?;
        }
        self.generation = dir.next_generation()?;
        let (records, journal) = dir.inodes()?;
        if takeover {
            self.inodes.restore(records);
        }
        self.inodes.attach_journal(journal);
        let (orphans, uploads) = dir.uploads()?;
        self.writes.uploads.attach_journal(uploads);
        let handover = if takeover { dir.take_handover()? } else { None };
        Ok(Recovered { generation: self.generation, inodes: self.inodes.len(), orphans, handover })
    }

    /// After [`S3Fs::attach_recovery`]: aborts the uploads the previous process left and opens
    /// again the files it handed over. Returns (uploads aborted, handles opened again).
    pub async fn finish_recovery(&self, recovered: Recovered) -> (usize, usize) {
        let aborted = self.writes.uploads.abort_orphans(recovered.orphans).await;
        let resumed = match recovered.handover {
            Some(handles) => self.resume_handles(handles).await,
            None => 0,
        };
        (aborted, resumed)
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
    use crate::fs::inode::ROOT_INO;
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

    /// A filesystem serving a connection after `previous` (None: a fresh mount), as the
    /// daemon builds it from `--recovery-dir`.
    async fn successor(store: &Arc<FakeStore>, dir: &std::path::Path, takeover: bool) -> S3Fs<FakeStore> {
        let mut fs = fs_with(Arc::clone(store), "", Duration::from_secs(60));
        let found = fs.attach_recovery(&RecoveryDir::open(dir).unwrap(), takeover).unwrap();
        fs.finish_recovery(found).await;
        fs
    }

    #[tokio::test]
    async fn a_successor_keeps_inode_numbers_and_read_handles_and_fails_lost_writers() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("d/r.txt", "readable");
        let dir = tempfile::tempdir().unwrap();
        let first = successor(&store, dir.path(), false).await;
        let d = first.lookup(ROOT_INO, "d").await.unwrap();
        let r = first.lookup(d.ino, "r.txt").await.unwrap();
        let reader = first.open(r.ino, libc::O_RDONLY).await.unwrap();
        let (w, writer) = first.create(Caller { uid: 0, gid: 0 }, d.ino, "w.txt", 0o644, libc::O_WRONLY).await.unwrap();
        first.write(writer, 0, b"lost").await.unwrap();
        let dh = first.opendir(d.ino).await.unwrap();
        drop(first); // a crash: nothing is committed or released

        let second = successor(&store, dir.path(), true).await;
        // The kernel's numbers still mean the same files, without a lookup.
        assert_eq!(second.getattr(r.ino).await.unwrap().size, 8);
        assert!(second.needs_adoption(reader));
        second.adopt_handle(r.ino, reader).await.unwrap();
        assert_eq!(second.read(reader, 0, 100).await.unwrap().concat(), b"readable");
        assert!(matches!(second.adopt_handle(w.ino, writer).await, Err(FsError::HandleLost)));
        assert!(matches!(second.write(writer, 4, b"more").await, Err(FsError::HandleLost)));
        assert!(matches!(second.flush(writer).await, Err(FsError::HandleLost)));
        second.release(writer).await.unwrap();
        assert!(store.data("d/w.txt").is_none(), "nothing of the lost file reaches S3");
        second.adopt_dir(d.ino, dh).await.unwrap();
        let listed: Vec<String> = second.readdir(d.ino, dh, 2).unwrap().into_iter().map(|(_, e)| e.name).collect();
        assert_eq!(listed, ["r.txt"]);
        // A read-only descriptor closed without a read since the restart.
        second.flush(reader ^ (1 << 20)).await.unwrap();
        // Its own handles are new numbers, never those of the first process.
        let again = second.open(r.ino, libc::O_RDONLY).await.unwrap();
        assert!(again != reader && !second.needs_adoption(again));
    }

    #[tokio::test]
    async fn a_successor_shows_the_directories_the_kernel_kept_with_their_own_attributes() {
        // A pod's working directory (or an open directory descriptor) is an inode the kernel
        // keeps across the crash; the successor must not show or build on its placeholder.
        let store = Arc::new(FakeStore::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let pod = Caller { uid: 1000, gid: 3000 };
        let first = successor(&store, dir.path(), false).await;
        let u = first.mkdir(Caller::ROOT, ROOT_INO, "u", 0o755).await.unwrap();
        first
            .setattr(Caller::ROOT, u.ino, None, SetAttr { uid: Some(1000), gid: Some(3000), ..Default::default() })
            .await
            .unwrap();
        let s = first.mkdir(pod, u.ino, "shared", 0o2770).await.unwrap();
        let u = first.getattr(u.ino).await.unwrap();
        let s = first.getattr(s.ino).await.unwrap();
        drop(first);

        let second = successor(&store, dir.path(), true).await;
        let seen = second.getattr(u.ino).await.unwrap();
        assert_eq!((seen.uid, seen.gid, seen.perm, seen.mtime), (1000, 3000, 0o755, u.mtime), "cwd after the crash");
        // Creating in a kept directory (no lookup since the crash) takes its set-group-ID.
        let (f, fh) = second.create(pod, s.ino, "f", 0o644, libc::O_WRONLY).await.unwrap();
        second.release(fh).await.unwrap();
        assert_eq!((f.uid, f.gid), (1000, 3000));
        let shared = second.getattr(s.ino).await.unwrap();
        assert_eq!((shared.perm, shared.uid), (s.perm, 1000));
        // A chmod straight on a kept directory builds on its real attributes.
        let third = successor(&store, dir.path(), true).await;
        third.setattr(pod, u.ino, None, SetAttr { mode: Some(0o700), ..Default::default() }).await.unwrap();
        let after = successor(&store, dir.path(), true).await.getattr(u.ino).await.unwrap();
        assert_eq!((after.uid, after.gid, after.perm, after.mtime), (1000, 3000, 0o700, u.mtime));
    }

    #[tokio::test]
    async fn a_hand_over_commits_writers_and_the_successor_keeps_writing() {
        let store = Arc::new(FakeStore::new("b"));
        let dir = tempfile::tempdir().unwrap();
        let first = successor(&store, dir.path(), false).await;
        let (w, fh) = first.create(Caller { uid: 0, gid: 0 }, ROOT_INO, "w.txt", 0o644, libc::O_WRONLY).await.unwrap();
        first.write(fh, 0, b"before ").await.unwrap();
        let handles = first.hand_over().await;
        assert_eq!(handles.len(), 1);
        assert!(handles[0].committed);
        assert_eq!(store.data("w.txt").unwrap(), &b"before "[..], "committed at the hand-over");
        RecoveryDir::open(dir.path()).unwrap().write_handover(&handles).unwrap();
        drop(first);

        let second = successor(&store, dir.path(), true).await;
        assert!(!second.needs_adoption(fh), "the handed-over handle is open again");
        second.write(fh, 7, b"after").await.unwrap();
        second.flush(fh).await.unwrap();
        second.release(fh).await.unwrap();
        assert_eq!(store.data("w.txt").unwrap(), &b"before after"[..]);
        assert_eq!(second.getattr(w.ino).await.unwrap().size, 12);
    }

    #[tokio::test]
    async fn a_resent_directory_rename_completes_what_a_dead_process_left_half_done() {
        let store = Arc::new(FakeStore::new("b"));
        // Cut off while copying: e/ holds copies of some of d/.
        for k in ["d/", "d/1", "d/2", "d/3", "e/", "e/1"] {
            store.put(k, if k.ends_with('/') { "" } else { "x" });
        }
        // Cut off while deleting: g/ is complete, f/ has keys left.
        for k in ["f/", "f/3", "g/", "g/1", "g/2", "g/3"] {
            store.put(k, if k.ends_with('/') { "" } else { "x" });
        }
        // Not a rename of h/: i/ holds a file h/ never had.
        for k in ["h/", "h/1", "i/", "i/other"] {
            store.put(k, if k.ends_with('/') { "" } else { "x" });
        }
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        assert!(
            matches!(fs.rename(ROOT_INO, "d", ROOT_INO, "e", 0).await, Err(FsError::NotEmpty)),
            "only a resend resumes"
        );
        // `mv` asks for RENAME_NOREPLACE first.
        let noreplace = libc::RENAME_NOREPLACE;
        assert!(matches!(fs.rename(ROOT_INO, "d", ROOT_INO, "e", noreplace).await, Err(FsError::Exists)));
        fs.rename_resumed(ROOT_INO, "d", ROOT_INO, "e", noreplace).await.unwrap();
        fs.rename_resumed(ROOT_INO, "f", ROOT_INO, "g", 0).await.unwrap();
        assert!(matches!(fs.rename_resumed(ROOT_INO, "h", ROOT_INO, "i", 0).await, Err(FsError::NotEmpty)));
        assert!(matches!(fs.rename_resumed(ROOT_INO, "h", ROOT_INO, "i", noreplace).await, Err(FsError::Exists)));
        // A file copied and not yet deleted.
        store.put("k", "same");
        store.put("l", "same");
        store.put("m", "other");
        fs.rename_resumed(ROOT_INO, "k", ROOT_INO, "l", noreplace).await.unwrap();
        assert!(matches!(fs.rename_resumed(ROOT_INO, "l", ROOT_INO, "m", noreplace).await, Err(FsError::Exists)));
        let mut keys = store.keys();
        keys.retain(|k| !k.ends_with(crate::fs::records::RECORD_NAME));
        keys.sort();
        assert_eq!(
            keys,
            ["e/", "e/1", "e/2", "e/3", "g/", "g/1", "g/2", "g/3", "h/", "h/1", "i/", "i/other", "l", "m"]
        );
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
        // The emptied directory stays (it got a marker) until it is removed.
        fs3.rmdir(ROOT_INO, "plain").await.unwrap();
        fs3.flush_records().await;
        assert!(store.keys().is_empty(), "{:?}", store.keys());
    }

    #[tokio::test]
    async fn a_directory_whose_marker_is_gone_loses_its_recorded_attributes() {
        // A rename that failed half-way left "d" implied by a key under it, its marker gone and
        // its record entry (mode 0700) behind: S3 holds no attributes for it any more.
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::ZERO);
        let d = fs.mkdir(POD, ROOT_INO, "d", 0o700).await.unwrap();
        let (_, fh) = fs.create(POD, d.ino, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.release(fh).await.unwrap();
        fs.flush_records().await;
        assert_eq!(fs.lookup(ROOT_INO, "d").await.unwrap().perm, 0o700);
        store.delete("d/");
        names(&fs, ROOT_INO).await;
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        assert_eq!((d.perm, d.uid), (0o750, 7), "the mount's defaults, as for any implied directory");
        fs.flush_records().await;
        let record = fs.records.load("").await.unwrap_or_default();
        assert!(record.dir("d").is_none(), "the stale entry is dropped: {record:?}");
        // A failed HEAD of a listed marker is an error, not the defaults.
        fs.mkdir(POD, ROOT_INO, "m", 0o700).await.unwrap();
        names(&fs, ROOT_INO).await;
        store.fail_heads_of.lock().unwrap().push("m/".to_owned());
        assert_eq!(fs.lookup(ROOT_INO, "m").await.unwrap_err().errno(), libc::EIO);
        assert_eq!(fs.lookup(ROOT_INO, "m").await.unwrap().perm, 0o700);
    }

    #[tokio::test]
    async fn an_implied_directory_outlives_its_last_entry() {
        // Directories another client implied by keys under them, emptied here by unlink, rename
        // and rmdir: each stays, as a directory does, through a marker written first.
        let store = Arc::new(FakeStore::new("b"));
        for k in ["u/only", "r/only", "d/sub/x", "deep/a/b/c"] {
            store.put(k, b"x".to_vec());
        }
        let fs = fs_with(Arc::clone(&store), "", Duration::ZERO);
        let u = fs.lookup(ROOT_INO, "u").await.unwrap();
        fs.unlink(u.ino, "only").await.unwrap();
        let r = fs.lookup(ROOT_INO, "r").await.unwrap();
        fs.rename(r.ino, "only", ROOT_INO, "moved", 0).await.unwrap();
        let d = fs.lookup(ROOT_INO, "d").await.unwrap();
        let sub = fs.lookup(d.ino, "sub").await.unwrap();
        fs.unlink(sub.ino, "x").await.unwrap();
        fs.rmdir(d.ino, "sub").await.unwrap();
        for k in ["u/", "r/", "d/"] {
            assert!(store.data(k).is_some(), "marker {k} written: {:?}", store.keys());
        }
        assert_eq!(names(&fs, ROOT_INO).await, ["d", "deep", "moved", "r", "u"]);
        for dir in ["u", "r", "d"] {
            let a = fs.lookup(ROOT_INO, dir).await.unwrap();
            assert_eq!((a.kind, a.perm), (Kind::Dir, 0o750), "{dir}: the defaults it had");
            assert!(names(&fs, a.ino).await.is_empty());
        }
        // A directory known to have its marker (made here, or listed) costs no extra LIST, and a
        // rename within one directory none either.
        let m = fs.mkdir(ROOT, ROOT_INO, "m", 0o755).await.unwrap();
        let (_, fh) = fs.create(ROOT, m.ino, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.release(fh).await.unwrap();
        let lists = store.lists.load(Ordering::Relaxed);
        fs.unlink(m.ino, "f").await.unwrap();
        assert_eq!(store.lists.load(Ordering::Relaxed), lists + 1, "the lookup's LIST only");
        let deep = fs.lookup(ROOT_INO, "deep").await.unwrap();
        let a = fs.lookup(deep.ino, "a").await.unwrap();
        let b = fs.lookup(a.ino, "b").await.unwrap();
        fs.rename(b.ino, "c", b.ino, "c2", 0).await.unwrap();
        assert!(store.data("deep/a/b/").is_none(), "nothing left the implied directory");
    }

    #[tokio::test]
    async fn renames_keep_the_mtime_of_objects_written_elsewhere() {
        // Objects another client wrote carry no s3csi metadata: their mtime is Last-Modified,
        // which a copy renews. A rename pins it, for files and for files under a directory.
        let store = Arc::new(FakeStore::new("b"));
        store.put_with_metadata("keep.txt", b"k".to_vec(), [("note".to_owned(), "x".to_owned())].into());
        for k in ["f", "d/g", "d/sub/h", "src/x"] {
            store.put(k, b"x".to_vec());
        }
        let times: Vec<_> =
            ["f", "d/g", "d/sub/h", "keep.txt"].iter().map(|k| store.last_modified(k).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(20));
        let fs = fs_with(Arc::clone(&store), "", Duration::ZERO);
        fs.rename(ROOT_INO, "f", ROOT_INO, "f2", 0).await.unwrap();
        fs.rename(ROOT_INO, "keep.txt", ROOT_INO, "kept.txt", 0).await.unwrap();
        fs.rename(ROOT_INO, "d", ROOT_INO, "e", 0).await.unwrap();
        let again = fs_with(Arc::clone(&store), "", Duration::ZERO);
        let e = again.lookup(ROOT_INO, "e").await.unwrap();
        let sub = again.lookup(e.ino, "sub").await.unwrap();
        let shown = [
            again.lookup(ROOT_INO, "f2").await.unwrap().mtime,
            again.lookup(e.ino, "g").await.unwrap().mtime,
            again.lookup(sub.ino, "h").await.unwrap().mtime,
            again.lookup(ROOT_INO, "kept.txt").await.unwrap().mtime,
        ];
        assert_eq!(shown.to_vec(), times, "each file shows the time it had before the rename");
        assert_eq!(
            store.metadata("kept.txt").unwrap().get("note").map(String::as_str),
            Some("x"),
            "other metadata kept"
        );
        // Listings agree with lookups.
        let listed = again.lookup(ROOT_INO, "f2").await.unwrap();
        names(&again, ROOT_INO).await;
        assert_eq!(again.lookup(ROOT_INO, "f2").await.unwrap().mtime, listed.mtime);

        // An implied directory renamed over an empty directory made here: the marker that went
        // with the target is replaced, so the renamed directory keeps what it shows.
        let t = fs.mkdir(ROOT, ROOT_INO, "t", 0o700).await.unwrap();
        let src = fs.lookup(ROOT_INO, "src").await.unwrap();
        fs.rename(ROOT_INO, "src", ROOT_INO, "t", 0).await.unwrap();
        assert!(store.data("t/").is_some(), "the renamed directory has a marker: {:?}", store.keys());
        let moved = fs_with(Arc::clone(&store), "", Duration::ZERO).lookup(ROOT_INO, "t").await.unwrap();
        assert_eq!((moved.perm, moved.mtime), (src.perm, src.mtime), "the source's attributes, not {t:?}");
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

    /// A commit in flight (a FLUSH from another descriptor's close) never lands over a file that
    /// a rename or an unlink has replaced or removed meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_in_flight_never_lands_after_a_rename_over_the_file() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = Arc::new(fs_with(Arc::clone(&store), "", Duration::from_secs(60)));
        let (_, w) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(w, 0, b"old contents").await.unwrap();
        let (_, g) = fs.create(ROOT, ROOT_INO, "g", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(g, 0, b"other").await.unwrap();
        fs.release(g).await.unwrap();
        store.put_delay_ms.store(300, Ordering::Relaxed);
        let flushing = {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move { fs.flush(w).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        fs.rename(ROOT_INO, "g", ROOT_INO, "f", 0).await.unwrap();
        flushing.await.unwrap().unwrap();
        store.put_delay_ms.store(0, Ordering::Relaxed);
        fs.release(w).await.unwrap();
        assert_eq!(&store.data("f").unwrap()[..], b"other");
        assert_eq!(store.data("g"), None);
    }

    /// A streaming file whose move to the staging area fails (staging full) keeps its buffer:
    /// the failed write changes nothing, and `close` commits what was written before it.
    #[tokio::test]
    async fn a_full_staging_area_never_loses_a_streamed_buffer() {
        let store = Arc::new(FakeStore::new("b"));
        let mut fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        fs.writes.staging = write::Staging::new(tempfile::tempdir().unwrap().keep(), 10).unwrap().into();
        let (_, fh) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(fh, 0, &pattern(100, 1)).await.unwrap();
        assert!(matches!(fs.write(fh, 0, b"x").await, Err(FsError::NoSpace)));
        fs.release(fh).await.unwrap();
        assert_eq!(store.data("f").unwrap(), pattern(100, 1));
    }

    /// An open with O_TRUNC while the last writer's `close` commits joins that state before
    /// the commit ends, so the state is not detached under it and its write is what S3 holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_during_the_last_close_joins_the_state() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = Arc::new(fs_with(Arc::clone(&store), "", Duration::from_secs(60)));
        let (attr, w1) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(w1, 0, b"hello").await.unwrap();
        store.put_delay_ms.store(300, Ordering::Relaxed);
        let closing = {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move { fs.release(w1).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let w2 = fs.open(attr.ino, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
        fs.write(w2, 0, b"AB").await.unwrap();
        closing.await.unwrap().unwrap();
        let w3 = fs.open(attr.ino, libc::O_WRONLY).await.unwrap();
        assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 2, "the third writer shares the state");
        store.put_delay_ms.store(0, Ordering::Relaxed);
        fs.release(w2).await.unwrap();
        fs.release(w3).await.unwrap();
        assert_eq!(&store.data("f").unwrap()[..], b"AB");
    }

    /// A write and `fsync` during a rename of the file wait for the rename and land under the
    /// new name, never under the old one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_a_rename_lands_under_the_new_name() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("a", &b"abc"[..]);
        let fs = Arc::new(fs_with(Arc::clone(&store), "", Duration::from_secs(60)));
        let ino = fs.lookup(ROOT_INO, "a").await.unwrap().ino;
        let w = fs.open(ino, libc::O_WRONLY).await.unwrap();
        store.copy_delay_ms.store(300, Ordering::Relaxed);
        let renaming = {
            let fs = Arc::clone(&fs);
            tokio::spawn(async move { fs.rename(ROOT_INO, "a", ROOT_INO, "b", 0).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        fs.write(w, 0, b"J").await.unwrap();
        fs.flush(w).await.unwrap();
        renaming.await.unwrap().unwrap();
        store.copy_delay_ms.store(0, Ordering::Relaxed);
        fs.release(w).await.unwrap();
        assert_eq!(&store.data("b").unwrap()[..], b"Jbc");
        assert_eq!(store.data("a"), None);
    }

    /// A read of a file that has streamed a part commits it on the way; the inode learns of that
    /// commit, so the size is right after `close`.
    #[tokio::test]
    async fn a_commit_made_by_a_read_reaches_the_inode() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let (attr, fh) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_RDWR).await.unwrap();
        let data = pattern(6 << 20, 3);
        fs.write(fh, 0, &data).await.unwrap();
        assert_eq!(fs.read(fh, 0, 1).await.unwrap().concat(), data[..1]);
        fs.release(fh).await.unwrap();
        assert_eq!(fs.getattr(attr.ino).await.unwrap().size, data.len() as u64);
        assert_eq!(fs.lookup(ROOT_INO, "f").await.unwrap().size, data.len() as u64);
        assert_eq!(store.data("f").unwrap(), data);
    }

    /// A file committed empty by a FLUSH (a shell's `dup2` then `close`, `dd`) and then written
    /// from its start streams again: it needs no staging space.
    #[tokio::test]
    async fn an_empty_committed_file_streams_again() {
        let store = Arc::new(FakeStore::new("b"));
        let mut fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        fs.writes.staging = write::Staging::new(tempfile::tempdir().unwrap().keep(), 1 << 20).unwrap().into();
        let (_, fh) = fs.create(ROOT, ROOT_INO, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.flush(fh).await.unwrap();
        assert_eq!(store.data("f").unwrap().len(), 0);
        let data = pattern(12 << 20, 4);
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            fs.write(fh, (i << 20) as u64, chunk).await.unwrap();
        }
        fs.release(fh).await.unwrap();
        assert_eq!(store.data("f").unwrap(), data);
        assert!(store.parts_uploaded.load(Ordering::Relaxed) >= 2, "streamed as a multipart upload");
    }

    /// Attribute changes not yet written to a directory's record follow the directory through
    /// a rename, so the renamed directory lists them (after a remount too), not the defaults.
    #[tokio::test]
    async fn a_renamed_directory_keeps_the_attributes_of_its_entries() {
        let store = Arc::new(FakeStore::new("b"));
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let d = fs.mkdir(ROOT, ROOT_INO, "d", 0o755).await.unwrap();
        let (f, fh) = fs.create(ROOT, d.ino, "f", 0o644, libc::O_WRONLY).await.unwrap();
        fs.write(fh, 0, b"secret").await.unwrap();
        fs.release(fh).await.unwrap();
        fs.setattr(ROOT, f.ino, None, SetAttr { mode: Some(0o600), ..Default::default() }).await.unwrap();
        fs.rename(ROOT_INO, "d", ROOT_INO, "e", 0).await.unwrap();
        fs.flush_records().await;
        let fs2 = fs_with(Arc::clone(&store), "", Duration::from_secs(60));
        let e = fs2.lookup(ROOT_INO, "e").await.unwrap();
        let heads = store.heads.load(Ordering::Relaxed);
        assert_eq!(names(&fs2, e.ino).await, ["f"]);
        let f2 = fs2.lookup(e.ino, "f").await.unwrap();
        assert_eq!(f2.perm, 0o600, "the mode stored before the rename");
        assert_eq!(store.heads.load(Ordering::Relaxed), heads, "the record vouches for it: no HEAD");
    }
}
