//! Local staging of written ranges: sparse files under one directory, bounded by the bytes
//! written locally (`--max-staging-size`), and the staged body of a file: the ranges written
//! here, plus the S3 object the unchanged ranges come from.
//!
//! Staging-file I/O runs on blocking threads (`spawn_blocking`), never on the async workers that
//! serve other FUSE requests.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::fs::FsError;
use crate::fs::prefetch::{Access, Fetcher};
use crate::s3::{ObjectId, ObjectStore};

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

/// Bytes copied per step when a body's remote ranges move to the staging file.
const LOCALIZE_CHUNK: u64 = 8 << 20;

/// The staging area: sparse files under one directory, bounded by bytes written locally.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    cap_bytes: u64,
    used: AtomicU64,
    next: AtomicU64,
}

impl Staging {
    /// Opens the staging directory: created with mode 0700 (files in it are 0600), so written
    /// data is readable by the mount's user only; emptied of files a previous mount left. A
    /// path that is a symbolic link, or a directory another user owns, is refused.
    pub fn new(dir: PathBuf, cap_bytes: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(&dir)?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me {
            return Err(std::io::Error::other(format!(
                "staging directory {} is not a directory owned by this user; remove it or choose another --cache-dir",
                dir.display()
            )));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
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

    async fn create(&self) -> Result<Arc<StageFile>, FsError> {
        let path = self.dir.join(format!("stage-{}", self.next.fetch_add(1, Ordering::Relaxed)));
        blocking(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| FsError::Local(format!("cannot create staging file {}: {e}", path.display())))?;
            Ok(Arc::new(StageFile { file, path }))
        })
        .await
    }
}

impl Drop for Staging {
    /// At unmount (the filesystem dropped): the directory goes too, if nothing is left in it.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs local file I/O on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FsError> + Send + 'static) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| FsError::Local(format!("staging I/O task failed: {e}")))?
}

/// One staging file; removed when dropped.
#[derive(Debug)]
struct StageFile {
    file: File,
    path: PathBuf,
}

impl Drop for StageFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl StageFile {
    async fn write_at(self: &Arc<Self>, data: Vec<u8>, offset: u64) -> Result<(), FsError> {
        let this = Arc::clone(self);
        blocking(move || {
            this.file
                .write_all_at(&data, offset)
                .map_err(|e| FsError::Local(format!("cannot write staging file {}: {e}", this.path.display())))
        })
        .await
    }

    async fn read_at(self: &Arc<Self>, len: usize, offset: u64) -> Result<Bytes, FsError> {
        let this = Arc::clone(self);
        blocking(move || {
            let mut buf = vec![0u8; len];
            this.file
                .read_exact_at(&mut buf, offset)
                .map_err(|e| FsError::Local(format!("cannot read staging file {}: {e}", this.path.display())))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn set_len(self: &Arc<Self>, size: u64) -> Result<(), FsError> {
        let this = Arc::clone(self);
        blocking(move || {
            this.file
                .set_len(size)
                .map_err(|e| FsError::Local(format!("cannot truncate staging file {}: {e}", this.path.display())))
        })
        .await
    }
}

/// The S3 version unchanged ranges come from: the object, its full size, and how much of it
/// still belongs to the file (less after a truncate).
#[derive(Debug, Clone)]
pub struct Source {
    pub object: Arc<ObjectId>,
    pub full: u64,
    pub remote: u64,
}

impl Source {
    pub fn whole(object: Arc<ObjectId>, size: u64) -> Self {
        Source { object, full: size, remote: size }
    }
}

/// A file's body when written out of order: local ranges over an optional S3 source.
#[derive(Debug)]
pub struct Staged {
    staging: Arc<Staging>,
    file: Option<Arc<StageFile>>,
    local: RangeSet,
    pub source: Option<Source>,
    charged: u64,
}

impl Staged {
    pub fn over(staging: &Arc<Staging>, source: Option<Source>) -> Self {
        Staged { staging: Arc::clone(staging), file: None, local: RangeSet::default(), source, charged: 0 }
    }

    /// No local bytes and nothing read from S3: an empty file.
    pub fn holds_nothing(&self) -> bool {
        self.local.total() == 0 && self.source.as_ref().is_none_or(|s| s.remote == 0)
    }

    /// Bytes of `r` written locally.
    pub fn covered(&self, r: &Range<u64>) -> u64 {
        self.local.covered(r)
    }

    /// Writes `data` at `offset`, charging new bytes to the staging budget.
    pub async fn write(&mut self, key: &str, offset: u64, data: &[u8]) -> Result<(), FsError> {
        let staging = Arc::clone(&self.staging);
        let end = offset + data.len() as u64;
        let new_bytes = data.len() as u64 - self.local.covered(&(offset..end));
        staging.charge(new_bytes, key)?;
        self.charged += new_bytes;
        let file = match &self.file {
            Some(f) => Arc::clone(f),
            None => {
                let f = staging.create().await?;
                self.file = Some(Arc::clone(&f));
                f
            }
        };
        file.write_at(data.to_vec(), offset).await?;
        self.local.insert(offset..end);
        Ok(())
    }

    /// Cuts the body at `size`, refunding dropped local bytes.
    pub async fn truncate(&mut self, size: u64) -> Result<(), FsError> {
        let before = self.local.total();
        self.local.truncate(size);
        let dropped = before - self.local.total();
        self.staging.refund(dropped);
        self.charged -= dropped;
        if let Some(source) = &mut self.source {
            source.remote = source.remote.min(size);
        }
        if let Some(file) = &self.file {
            file.set_len(size).await?;
        }
        Ok(())
    }

    /// Reads `offset..offset+len` of a file of `size` bytes: local ranges from the staging
    /// file, the rest from the source object while it covers it, zeros beyond.
    pub async fn read<S: ObjectStore>(
        &self,
        fetcher: &Arc<Fetcher<S>>,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Bytes>, FsError> {
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (piece, local) in self.local.split(offset..end) {
            if local {
                let file = self.file.as_ref().expect("local ranges imply a staging file");
                out.push(file.read_at((piece.end - piece.start) as usize, piece.start).await?);
                continue;
            }
            let remote_end = self.source.as_ref().map_or(0, |s| s.remote);
            if piece.start < remote_end {
                let source = self.source.as_ref().expect("remote_end > 0 implies a source");
                let to = piece.end.min(remote_end);
                let access = Access::Sequential { prefetch: 0 };
                // The version this body was based on is gone (deleted or replaced elsewhere).
                let read = fetcher.read(&source.object, source.full, piece.start..to, access).await;
                out.extend(read.map_err(|e| match e {
                    crate::s3::S3Error::NotFound(_) => FsError::ObjectChanged,
                    e => e.into(),
                })?);
                if to < piece.end {
                    out.push(Bytes::from(vec![0u8; (piece.end - to) as usize]));
                }
            } else {
                out.push(Bytes::from(vec![0u8; (piece.end - piece.start) as usize]));
            }
        }
        Ok(out)
    }

    /// Copies every byte still read from the source object into the staging file, so the body
    /// no longer needs the source (which is about to be deleted).
    pub async fn localize<S: ObjectStore>(
        &mut self,
        fetcher: &Arc<Fetcher<S>>,
        size: u64,
        key: &str,
    ) -> Result<(), FsError> {
        let Some(source) = self.source.clone() else { return Ok(()) };
        let remote_end = source.remote.min(size);
        let missing: Vec<Range<u64>> =
            self.local.split(0..remote_end).into_iter().filter(|(_, local)| !local).map(|(r, _)| r).collect();
        for piece in missing {
            let mut pos = piece.start;
            while pos < piece.end {
                let to = (pos + LOCALIZE_CHUNK).min(piece.end);
                let access = Access::Sequential { prefetch: 0 };
                let data = fetcher.read(&source.object, source.full, pos..to, access).await?.concat();
                self.write(key, pos, &data).await?;
                pos = to;
            }
        }
        self.source = None;
        Ok(())
    }

    /// Drops the local data (after a commit, or when the body is replaced); `source` becomes
    /// the base from now on.
    pub fn settle(&mut self, source: Option<Source>) {
        self.staging.refund(self.charged);
        self.charged = 0;
        self.local.clear();
        self.file = None;
        self.source = source;
    }
}

impl Drop for Staged {
    /// Whatever way the body goes (committed, truncated to nothing, the file closed after an
    /// unlink or a failure), its staged bytes go back to the budget and its file is removed.
    fn drop(&mut self) {
        self.staging.refund(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_data_is_private_to_the_mount_user() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("staging");
        let staging = Arc::new(Staging::new(dir.clone(), 1 << 20).unwrap());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let mut body = Staged::over(&staging, None);
        body.write("k", 0, b"secret").await.unwrap();
        let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        drop(body);
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "the file goes with its body");
        assert_eq!(staging.used_bytes(), 0, "its bytes go back to the budget");
        // A planted symbolic link is refused, not followed.
        let planted = parent.path().join("planted");
        std::os::unix::fs::symlink(parent.path(), &planted).unwrap();
        assert!(Staging::new(planted, 1 << 20).is_err());
    }

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
