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

pub mod error;
pub mod fuse;
pub mod inode;
pub mod prefetch;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

pub use error::FsError;
use inode::{Inode, InodeTable, Kind, ROOT_INO, Stat};
use prefetch::{Fetcher, Window};

use crate::cache::BlockCache;
use crate::config::FsConfig;
use crate::s3::{ObjectId, ObjectMeta, ObjectStore, S3Error};

/// Longest file name Linux accepts.
const NAME_MAX: usize = 255;
/// Block size reported by `stat`/`statfs`; only used to compute `st_blocks`.
pub const REPORTED_BLOCK_SIZE: u32 = 4096;
/// `statfs` totals: S3 has no capacity, so report a very large, obviously synthetic size
/// (4 PiB of 4 KiB blocks) rather than zeros, which make tools like `df` and installers refuse.
const STATFS_BLOCKS: u64 = 1 << 40;
const STATFS_FILES: u64 = 1 << 32;

/// Attributes of one inode, as reported to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
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

struct FileHandle {
    ino: u64,
    object: Arc<ObjectId>,
    size: u64,
    window: Mutex<Window>,
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
    files: Mutex<HashMap<u64, Arc<FileHandle>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    max_window: u64,
}

/// Whether `name` can be a file name; keys whose segment fails this are not shown.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= NAME_MAX
        && !name.contains(['/', '\0'])
}

impl<S: ObjectStore> S3Fs<S> {
    pub fn new(store: Arc<S>, cache: Arc<BlockCache>, config: FsConfig) -> Self {
        let max_window = cache.memory_capacity_bytes() / 4;
        let inodes = InodeTable::new(config.prefix.as_str());
        S3Fs {
            fetcher: Fetcher::new(Arc::clone(&store), cache),
            store,
            config,
            inodes,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            max_window,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.config.metadata_ttl
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        self.fetcher.cache()
    }

    fn fresh(&self, stat: &Stat) -> bool {
        stat.validated_at.elapsed() < self.config.metadata_ttl
    }

    fn attr(&self, inode: &Inode) -> Attr {
        let stat = inode.stat();
        let own = &self.config.ownership;
        match inode.kind {
            Kind::File => Attr {
                ino: inode.ino,
                kind: Kind::File,
                size: stat.size,
                mtime: stat.mtime,
                perm: own.file_mode,
                uid: own.uid,
                gid: own.gid,
                nlink: 1,
            },
            Kind::Dir => Attr {
                ino: inode.ino,
                kind: Kind::Dir,
                size: 0,
                mtime: stat.mtime,
                perm: own.dir_mode,
                uid: own.uid,
                gid: own.gid,
                nlink: 2,
            },
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

    fn dir_stat() -> Stat {
        Stat {
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
            validated_at: Instant::now(),
        }
    }

    fn file_stat(meta: &ObjectMeta) -> Stat {
        Stat {
            size: meta.size,
            mtime: meta.last_modified,
            etag: meta.etag.clone(),
            validated_at: Instant::now(),
        }
    }

    /// Asks S3 what `dir_key + name` is: a directory (wins), a file, or nothing.
    async fn probe(&self, dir_key: &str, name: &str) -> Result<Option<(Kind, Stat)>, FsError> {
        let file_key = format!("{dir_key}{name}");
        let dir_prefix = format!("{file_key}/");
        let (head, list) = tokio::join!(
            self.store.head_object(&file_key),
            self.store.list_page(&dir_prefix, Some("/"), None, Some(1))
        );
        let list = list?;
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            return Ok(Some((Kind::Dir, Self::dir_stat())));
        }
        match head {
            Ok(meta) => Ok(Some((Kind::File, Self::file_stat(&meta)))),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let dir = self.dir_inode(parent)?;
        if !valid_name(name) {
            return Err(FsError::NotFound);
        }
        if let Some(child) = self.inodes.child(parent, name)
            && self.fresh(&child.stat())
        {
            let inode = self
                .inodes
                .upsert(&dir, name, child.kind, child.stat(), true);
            return Ok(self.attr(&inode));
        }
        match self.probe(&dir.key, name).await? {
            Some((kind, stat)) => {
                let inode = self.inodes.upsert(&dir, name, kind, stat, true);
                Ok(self.attr(&inode))
            }
            None => {
                self.inodes.unlink_name(parent, name);
                Err(FsError::NotFound)
            }
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::File && !self.fresh(&inode.stat()) {
            match self.store.head_object(&inode.key).await {
                Ok(meta) => inode.set_stat(Self::file_stat(&meta)),
                Err(S3Error::NotFound(_)) => {
                    self.inodes.unlink_name(inode.parent, &inode.name);
                    return Err(FsError::NotFound);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.attr(&inode))
    }

    /// Opens a file for reading. Always asks S3 for the current object, so a reopened file
    /// never serves an old version. Write access is refused until writes land.
    pub async fn open(&self, ino: u64, flags: i32) -> Result<u64, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let wants_write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if wants_write {
            return Err(if self.config.read_only {
                FsError::ReadOnly
            } else {
                FsError::NotSupported("writing")
            });
        }
        let meta = match self.store.head_object(&inode.key).await {
            Ok(meta) => meta,
            Err(S3Error::NotFound(_)) => {
                self.inodes.unlink_name(inode.parent, &inode.name);
                return Err(FsError::NotFound);
            }
            Err(e) => return Err(e.into()),
        };
        inode.set_stat(Self::file_stat(&meta));
        let handle = FileHandle {
            ino,
            object: Arc::new(ObjectId::from_meta(&meta)),
            size: meta.size,
            window: Mutex::new(Window::new(self.max_window)),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().unwrap().insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// Reads up to `size` bytes at `offset`; short at end of file. Returns block slices.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<Bytes>, FsError> {
        let handle = self
            .files
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let end = offset.saturating_add(u64::from(size)).min(handle.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let prefetch = handle.window.lock().unwrap().on_read(offset, end - offset);
        let range: Range<u64> = offset..end;
        let data = self
            .fetcher
            .read(&handle.object, handle.size, range, prefetch)
            .await?;
        Ok(data)
    }

    pub fn release(&self, fh: u64) {
        if let Some(h) = self.files.lock().unwrap().remove(&fh) {
            tracing::trace!(ino = h.ino, "released");
        }
    }

    /// Lists a directory completely (all pages) and snapshots it for `readdir`.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let dir = self.dir_inode(ino)?;
        let entries = self.list_dir(&dir).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap()
            .insert(fh, Arc::new(DirHandle { entries }));
        Ok(fh)
    }

    async fn list_dir(&self, dir: &Arc<Inode>) -> Result<Vec<DirEntry>, FsError> {
        let mut names: BTreeMap<String, (Kind, Stat)> = BTreeMap::new();
        let mut token = None;
        let mut saw_anything = false;
        loop {
            let page = self
                .store
                .list_page(&dir.key, Some("/"), token, None)
                .await?;
            saw_anything |= !page.objects.is_empty() || !page.common_prefixes.is_empty();
            for p in &page.common_prefixes {
                let name = p[dir.key.len()..].trim_end_matches('/');
                if valid_name(name) && p.ends_with('/') && !name.contains('/') {
                    names.insert(name.to_owned(), (Kind::Dir, Self::dir_stat()));
                } else {
                    tracing::debug!(prefix = %p, "skipping prefix that cannot be a directory name");
                }
            }
            for o in &page.objects {
                let Some(name) = o.key.strip_prefix(dir.key.as_str()) else {
                    continue;
                };
                if name.is_empty() {
                    continue; // the directory's own marker object
                }
                if !valid_name(name) {
                    tracing::debug!(key = %o.key, "skipping key that cannot be a file name");
                    continue;
                }
                // A directory of the same name wins (it may come on a later page).
                names
                    .entry(name.to_owned())
                    .or_insert_with(|| (Kind::File, Self::file_stat(o)));
            }
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        // Listing pages can put `x` before `x/`; re-apply "directory wins" now all pages are in.
        let dir_names: Vec<String> = names
            .iter()
            .filter(|(_, (k, _))| *k == Kind::Dir)
            .map(|(n, _)| n.clone())
            .collect();
        for n in dir_names {
            names.insert(n, (Kind::Dir, Self::dir_stat()));
        }
        if !saw_anything && dir.ino != ROOT_INO {
            // The directory vanished (all its keys were deleted elsewhere).
            tracing::debug!(key = %dir.key, "directory listing is empty");
        }
        let mut entries = Vec::with_capacity(names.len());
        for (name, (kind, stat)) in names {
            let inode = self.inodes.upsert(dir, &name, kind, stat, false);
            entries.push(DirEntry {
                ino: inode.ino,
                name,
                kind,
            });
        }
        Ok(entries)
    }

    /// Entries of an open directory from `offset` (0 = start; `.` and `..` come first).
    pub fn readdir(&self, ino: u64, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        let dir = self.dir_inode(ino)?;
        let handle = self
            .dirs
            .lock()
            .unwrap()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let dots = [
            DirEntry {
                ino: dir.ino,
                name: ".".into(),
                kind: Kind::Dir,
            },
            DirEntry {
                ino: dir.parent,
                name: "..".into(),
                kind: Kind::Dir,
            },
        ];
        let all = dots.into_iter().chain(handle.entries.iter().cloned());
        Ok(all
            .enumerate()
            .skip(offset as usize)
            .map(|(i, e)| (i as u64 + 1, e))
            .collect())
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

    /// Refuses a namespace or data change: EROFS on read-only mounts.
    pub fn refuse_write(&self, what: &'static str) -> FsError {
        if self.config.read_only {
            FsError::ReadOnly
        } else {
            FsError::NotSupported(what)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Ownership, Prefix};
    use crate::s3::fake::FakeStore;

    fn fs_with(store: Arc<FakeStore>, prefix: &str, ttl: Duration) -> S3Fs<FakeStore> {
        let config = FsConfig {
            prefix: prefix.parse::<Prefix>().unwrap(),
            read_only: false,
            ownership: Ownership {
                uid: 7,
                gid: 8,
                file_mode: 0o640,
                dir_mode: 0o750,
            },
            metadata_ttl: ttl,
        };
        S3Fs::new(store, Arc::new(BlockCache::new(64 << 20, None)), config)
    }

    async fn names(fs: &S3Fs<FakeStore>, ino: u64) -> Vec<String> {
        let fh = fs.opendir(ino).await.unwrap();
        let v = fs
            .readdir(ino, fh, 2)
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.name)
            .collect();
        fs.releasedir(fh);
        v
    }

    async fn read_all(fs: &S3Fs<FakeStore>, ino: u64) -> Vec<u8> {
        let fh = fs.open(ino, libc::O_RDONLY).await.unwrap();
        let mut out = Vec::new();
        loop {
            let chunk = fs
                .read(fh, out.len() as u64, 131072)
                .await
                .unwrap()
                .concat();
            if chunk.is_empty() {
                break;
            }
            out.extend(chunk);
        }
        fs.release(fh);
        out
    }

    #[tokio::test]
    async fn implicit_dirs_markers_and_conflicts() {
        let store = Arc::new(FakeStore::new("b"));
        for k in [
            "a/b/c.txt",
            "empty/",
            "x",
            "x/y",
            "top.txt",
            "odd//name",
            "./dot",
            "a/b/",
        ] {
            store.put(k, "data");
        }
        store.put(&format!("long/{}", "n".repeat(300)), "z");
        let fs = fs_with(store, "", Duration::from_secs(60));
        assert_eq!(
            names(&fs, ROOT_INO).await,
            ["a", "empty", "long", "odd", "top.txt", "x"]
        );
        let x = fs.lookup(ROOT_INO, "x").await.unwrap();
        assert_eq!(
            x.kind,
            Kind::Dir,
            "directory wins over file of the same name"
        );
        let a = fs.lookup(ROOT_INO, "a").await.unwrap();
        let b = fs.lookup(a.ino, "b").await.unwrap();
        assert_eq!(
            names(&fs, b.ino).await,
            ["c.txt"],
            "marker a/b/ itself is not an entry"
        );
        let empty = fs.lookup(ROOT_INO, "empty").await.unwrap();
        assert!(names(&fs, empty.ino).await.is_empty());
        let odd = fs.lookup(ROOT_INO, "odd").await.unwrap();
        assert!(
            names(&fs, odd.ino).await.is_empty(),
            "empty segment is skipped"
        );
        let long = fs.lookup(ROOT_INO, "long").await.unwrap();
        assert!(
            names(&fs, long.ino).await.is_empty(),
            "300-byte name is skipped"
        );
        assert!(matches!(
            fs.lookup(ROOT_INO, "..").await,
            Err(FsError::NotFound)
        ));
        assert!(matches!(
            fs.lookup(ROOT_INO, "nope").await,
            Err(FsError::NotFound)
        ));
    }

    #[tokio::test]
    async fn attrs_come_from_config_and_s3() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", vec![1u8; 1234]);
        let fs = fs_with(store, "", Duration::from_secs(60));
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!(
            (f.size, f.perm, f.uid, f.gid, f.kind),
            (1234, 0o640, 7, 8, Kind::File)
        );
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
        fs.release(fh);
        assert_eq!(read_all(&fs, f.ino).await, vec![2u8; 2 << 20]);
    }

    #[tokio::test]
    async fn metadata_ttl_is_honoured() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("f", "short");
        let fs = fs_with(Arc::clone(&store), "", Duration::from_secs(3600));
        let f = fs.lookup(ROOT_INO, "f").await.unwrap();
        store.put("f", "much longer");
        assert_eq!(
            fs.getattr(f.ino).await.unwrap().size,
            5,
            "cached within TTL"
        );
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
        assert_eq!(
            fs.open(f.ino, libc::O_WRONLY).await.err().unwrap().errno(),
            libc::EROFS
        );
        assert_eq!(fs.refuse_write("mkdir").errno(), libc::EROFS);
    }

    #[test]
    fn statfs_is_large() {
        let fs = fs_with(Arc::new(FakeStore::new("b")), "", Duration::ZERO);
        let s = fs.statfs();
        assert!(s.blocks > 1 << 30 && s.bavail > 0 && s.files > 0);
    }
}
