//! The disk tier: one file per block under `<cache-dir>/s3csi-blocks/`, LRU-bounded by bytes.
//!
//! Each file is `MAGIC | length (u64 LE) | crc32 (u32 LE) | data`; a file whose length or
//! checksum does not match is treated as a miss and removed. Writes happen on one background
//! thread fed by a bounded queue; when the queue is full a block is simply not cached, so a slow
//! disk never slows reads down. The directory is locked with `flock` so two mounts cannot share
//! it, and emptied at start (its contents are only ever ours).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};

use super::{BlockKey, CacheError, CacheStats};

const MAGIC: &[u8; 8] = b"S3CSIBK1";
const HEADER_LEN: u64 = 8 + 8 + 4;
/// Blocks queued for writing; beyond this, evicted blocks are dropped instead of cached, so
/// memory held by the queue stays bounded (64 x block size).
const WRITE_QUEUE: usize = 64;
const SUBDIR: &str = "s3csi-blocks";

enum Job {
    Write(BlockKey, Bytes),
    Flush(tokio::sync::oneshot::Sender<()>),
}

struct Index {
    lru: LruCache<BlockKey, u64>,
    used_bytes: u64,
}

struct Shared {
    dir: PathBuf,
    cap_bytes: u64,
    index: Mutex<Index>,
    used: AtomicU64,
    evictions: AtomicU64,
    _lock: File,
}

/// Disk tier of the block cache.
pub struct DiskTier {
    shared: Arc<Shared>,
    queue: SyncSender<Job>,
}

impl DiskTier {
    /// Prepares `<dir>/s3csi-blocks`, failing if another mount holds it.
    pub fn new(dir: &Path, cap_bytes: u64) -> Result<Self, CacheError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| CacheError::Io { path, source }
        };
        let blocks = dir.join(SUBDIR);
        fs::create_dir_all(&blocks).map_err(io(&blocks))?;
        let lock_path = blocks.join(".lock");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(CacheError::Io {
                path: blocks.display().to_string(),
                source: std::io::Error::other(
                    "cache directory is in use by another s3csi mount; give each mount its own --cache-dir",
                ),
            });
        }
        for entry in fs::read_dir(&blocks).map_err(io(&blocks))? {
            let entry = entry.map_err(io(&blocks))?;
            if entry.file_name() != ".lock" {
                let p = entry.path();
                fs::remove_file(&p).map_err(io(&p))?;
            }
        }
        let shared = Arc::new(Shared {
            dir: blocks,
            cap_bytes,
            index: Mutex::new(Index { lru: LruCache::unbounded(), used_bytes: 0 }),
            used: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            _lock: lock,
        });
        let (tx, rx) = sync_channel::<Job>(WRITE_QUEUE);
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("s3csi-cache-writer".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Write(key, data) => {
                            if let Err(e) = worker.write(&key, &data) {
                                tracing::warn!(error = %e, "disk cache write failed; block not cached");
                            }
                        }
                        Job::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(io(dir))?;
        Ok(DiskTier { shared, queue: tx })
    }

    pub fn used_bytes(&self) -> u64 {
        self.shared.used.load(Ordering::Relaxed)
    }

    pub fn evictions(&self) -> u64 {
        self.shared.evictions.load(Ordering::Relaxed)
    }

    pub(super) fn contains(&self, key: &BlockKey) -> bool {
        self.shared.index.lock().unwrap().lru.contains(key)
    }

    /// Queues a block for writing; drops it if the queue is full.
    pub(super) fn insert_async(&self, key: BlockKey, data: Bytes, _stats: &CacheStats) {
        if data.len() as u64 + HEADER_LEN > self.shared.cap_bytes {
            return;
        }
        if self.shared.index.lock().unwrap().lru.contains(&key) {
            return;
        }
        match self.queue.try_send(Job::Write(key, data)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!("disk cache write queue full; block not cached")
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("disk cache writer stopped; block not cached")
            }
        }
    }

    pub(super) async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.queue.send(Job::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Reads a block; `Ok(None)` on a miss. A corrupt file is removed and reported.
    pub(super) async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, CacheError> {
        if self.shared.index.lock().unwrap().lru.get(key).is_none() {
            return Ok(None);
        }
        let shared = Arc::clone(&self.shared);
        let key = key.clone();
        tokio::task::spawn_blocking(move || shared.read(&key))
            .await
            .unwrap_or_else(|e| Err(CacheError::Corrupt { path: "?".into(), why: format!("reader task failed: {e}") }))
    }
}

impl Shared {
    fn path(&self, key: &BlockKey) -> PathBuf {
        let mut h = Sha256::new();
        h.update(key.object.key.as_bytes());
        h.update([0]);
        h.update(key.object.version.as_bytes());
        h.update([0]);
        h.update(key.index.to_le_bytes());
        self.dir.join(hex::encode(h.finalize()))
    }

    fn forget(&self, key: &BlockKey) {
        let mut idx = self.index.lock().unwrap();
        if let Some(size) = idx.lru.pop(key) {
            idx.used_bytes -= size;
            self.used.store(idx.used_bytes, Ordering::Relaxed);
        }
    }

    fn read(&self, key: &BlockKey) -> Result<Option<Bytes>, CacheError> {
        let path = self.path(key);
        let shown = || path.display().to_string();
        let mut file = match File::open(&path) {
            Ok(f) => f,
            // Evicted between the index lookup and the open: a plain miss.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io { path: shown(), source });
            }
        };
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|source| CacheError::Io { path: shown(), source })?;
        match decode(&buf) {
            Ok(data) => Ok(Some(Bytes::copy_from_slice(data))),
            Err(why) => {
                self.forget(key);
                let _ = fs::remove_file(&path);
                Err(CacheError::Corrupt { path: shown(), why })
            }
        }
    }

    fn write(&self, key: &BlockKey, data: &[u8]) -> Result<(), CacheError> {
        let size = data.len() as u64 + HEADER_LEN;
        // Reserve space first so the directory never holds more than the bound.
        let victims = {
            let mut idx = self.index.lock().unwrap();
            if idx.lru.contains(key) {
                return Ok(());
            }
            let mut victims = Vec::new();
            while idx.used_bytes + size > self.cap_bytes {
                let Some((k, s)) = idx.lru.pop_lru() else {
                    break;
                };
                idx.used_bytes -= s;
                victims.push(k);
            }
            idx.used_bytes += size;
            self.used.store(idx.used_bytes, Ordering::Relaxed);
            victims
        };
        self.evictions.fetch_add(victims.len() as u64, Ordering::Relaxed);
        for v in &victims {
            let p = self.path(v);
            if let Err(e) = fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove evicted cache block");
            }
        }
        let path = self.path(key);
        let result = File::create(&path).and_then(|mut f| {
            f.write_all(&encode_header(data))?;
            f.write_all(data)
        });
        match result {
            Ok(()) => {
                let mut idx = self.index.lock().unwrap();
                idx.lru.put(key.clone(), size);
                Ok(())
            }
            Err(source) => {
                let _ = fs::remove_file(&path);
                let mut idx = self.index.lock().unwrap();
                idx.used_bytes -= size;
                self.used.store(idx.used_bytes, Ordering::Relaxed);
                Err(CacheError::Io { path: path.display().to_string(), source })
            }
        }
    }
}

fn encode_header(data: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(data.len() as u64).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    h
}

fn decode(buf: &[u8]) -> Result<&[u8], String> {
    if buf.len() < HEADER_LEN as usize || &buf[..8] != MAGIC {
        return Err("bad header".into());
    }
    let len = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(buf[16..20].try_into().expect("4 bytes"));
    let data = &buf[HEADER_LEN as usize..];
    if data.len() as u64 != len {
        return Err(format!("length {} but header says {len}", data.len()));
    }
    if crc32fast::hash(data) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::ObjectId;

    fn key(index: u64) -> BlockKey {
        BlockKey { object: Arc::new(ObjectId { key: "k".into(), version: "v".into(), has_etag: true }), index }
    }

    fn dir_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    }

    #[tokio::test]
    async fn stays_within_bound_and_evicts_lru() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 3 * (100 + HEADER_LEN);
        let tier = DiskTier::new(dir.path(), cap).unwrap();
        let stats = CacheStats::default();
        for i in 0..10 {
            tier.insert_async(key(i), Bytes::from(vec![i as u8; 100]), &stats);
            tier.flush().await;
            assert!(dir_bytes(&dir.path().join(SUBDIR)) <= cap);
        }
        assert_eq!(tier.used_bytes(), cap);
        assert!(tier.get(&key(0)).await.unwrap().is_none());
        assert_eq!(&tier.get(&key(9)).await.unwrap().unwrap()[..], &[9u8; 100]);
        assert_eq!(tier.evictions(), 7);
    }

    #[tokio::test]
    async fn corrupt_block_is_a_reported_miss() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::new(dir.path(), 1 << 20).unwrap();
        tier.insert_async(key(1), Bytes::from(vec![1; 100]), &CacheStats::default());
        tier.flush().await;
        let path = tier.shared.path(&key(1));
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(50);
        fs::write(&path, bytes).unwrap();
        assert!(tier.get(&key(1)).await.is_err());
        assert!(tier.get(&key(1)).await.unwrap().is_none());
        assert_eq!(tier.used_bytes(), 0);
    }

    #[test]
    fn second_mount_cannot_share_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DiskTier::new(dir.path(), 1 << 20).unwrap();
        assert!(DiskTier::new(dir.path(), 1 << 20).is_err());
    }

    #[test]
    fn start_empties_stale_blocks() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(SUBDIR)).unwrap();
        fs::write(dir.path().join(SUBDIR).join("stale"), b"x").unwrap();
        let _tier = DiskTier::new(dir.path(), 1 << 20).unwrap();
        assert!(!dir.path().join(SUBDIR).join("stale").exists());
    }
}
