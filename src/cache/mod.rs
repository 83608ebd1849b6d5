//! The block cache: `(object key, version, block index) -> bytes`, in two bounded tiers.
//!
//! Invariants:
//! - A key names one version of one object (the ETag, see [`ObjectId`]), so an overwritten
//!   object can never be served from blocks of the old version.
//! - The memory tier holds at most `memory_bytes` of block data (LRU by bytes).
//! - The disk tier, when configured, holds at most `disk_bytes` on disk, headers included
//!   (LRU by bytes). Blocks reach it when the memory tier evicts them.
//! - Cache failures never fail a read: they are logged at `warn` and the caller goes to S3.

mod disk;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use lru::LruCache;

pub use disk::DiskTier;

use crate::s3::ObjectId;

/// One cached block of one object version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub object: Arc<ObjectId>,
    pub index: u64,
}

/// Errors from the disk tier. Never surfaced to readers; logged and skipped.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("cache block {path} is corrupt: {why}")]
    Corrupt { path: String, why: String },
}

/// Counters for the cache, read by tests and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits_memory: AtomicU64,
    pub hits_disk: AtomicU64,
    pub misses: AtomicU64,
    pub evictions_memory: AtomicU64,
    pub evictions_disk: AtomicU64,
}

struct MemTier {
    lru: LruCache<BlockKey, Bytes>,
    used_bytes: u64,
    cap_bytes: u64,
}

/// Two-tier LRU block cache. Cheap to share (`Arc`).
pub struct BlockCache {
    mem: Mutex<MemTier>,
    disk: Option<DiskTier>,
    pub stats: CacheStats,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCache").field("memory_bytes", &self.memory_used_bytes()).finish_non_exhaustive()
    }
}

impl BlockCache {
    pub fn new(memory_bytes: u64, disk: Option<DiskTier>) -> Self {
        BlockCache {
            mem: Mutex::new(MemTier { lru: LruCache::unbounded(), used_bytes: 0, cap_bytes: memory_bytes }),
            disk,
            stats: CacheStats::default(),
        }
    }

    pub fn memory_capacity_bytes(&self) -> u64 {
        self.mem.lock().unwrap().cap_bytes
    }

    pub fn memory_used_bytes(&self) -> u64 {
        self.mem.lock().unwrap().used_bytes
    }

    pub fn disk_used_bytes(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskTier::used_bytes)
    }

    /// Looks a block up in memory, then on disk. A disk hit is promoted to memory.
    /// The caller checks the length against what it expects.
    pub async fn get(&self, key: &BlockKey) -> Option<Bytes> {
        if let Some(b) = self.mem.lock().unwrap().lru.get(key) {
            self.stats.hits_memory.fetch_add(1, Ordering::Relaxed);
            return Some(b.clone());
        }
        if let Some(disk) = &self.disk {
            match disk.get(key).await {
                Ok(Some(bytes)) => {
                    self.stats.hits_disk.fetch_add(1, Ordering::Relaxed);
                    self.insert_memory(key.clone(), bytes.clone());
                    return Some(bytes);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, key = %key.object.key, block = key.index,
                    "disk cache read failed; reading from S3 instead"),
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Copies the cache counters and sizes into the metrics.
    pub fn export(&self, m: &crate::metrics::Metrics) {
        use crate::metrics::TierLabels;
        let set = |c: &prometheus_client::metrics::counter::Counter, v: u64| c.inner().store(v, Ordering::Relaxed);
        let (memory, disk) = (TierLabels { tier: "memory" }, TierLabels { tier: "disk" });
        set(&m.cache_hits.get_or_create(&memory), self.stats.hits_memory.load(Ordering::Relaxed));
        set(&m.cache_hits.get_or_create(&disk), self.stats.hits_disk.load(Ordering::Relaxed));
        set(&m.cache_misses, self.stats.misses.load(Ordering::Relaxed));
        set(&m.cache_evictions.get_or_create(&memory), self.stats.evictions_memory.load(Ordering::Relaxed));
        let disk_evictions = self.disk.as_ref().map_or(0, DiskTier::evictions);
        set(&m.cache_evictions.get_or_create(&disk), disk_evictions);
        m.cache_bytes.get_or_create(&memory).set(self.memory_used_bytes() as i64);
        m.cache_bytes.get_or_create(&disk).set(self.disk_used_bytes() as i64);
    }

    /// Whether a block is cached in memory (no promotion, no disk lookup).
    pub fn contains_in_memory(&self, key: &BlockKey) -> bool {
        self.mem.lock().unwrap().lru.contains(key)
    }

    /// Whether a block is on disk (index lookup only).
    pub fn contains_on_disk(&self, key: &BlockKey) -> bool {
        self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// Makes a memory block the first to be evicted (a scan has read it).
    pub fn demote(&self, key: &BlockKey) {
        self.mem.lock().unwrap().lru.demote(key);
    }

    /// Inserts a freshly fetched block.
    pub fn insert(&self, key: BlockKey, bytes: Bytes) {
        self.insert_memory(key, bytes);
    }

    fn insert_memory(&self, key: BlockKey, bytes: Bytes) {
        let mut evicted = Vec::new();
        {
            let mut mem = self.mem.lock().unwrap();
            let len = bytes.len() as u64;
            if len > mem.cap_bytes {
                drop(mem);
                self.spill(vec![(key, bytes)]);
                return;
            }
            if let Some(old) = mem.lru.put(key, bytes) {
                mem.used_bytes -= old.len() as u64;
            }
            mem.used_bytes += len;
            while mem.used_bytes > mem.cap_bytes {
                let Some((k, v)) = mem.lru.pop_lru() else {
                    break;
                };
                mem.used_bytes -= v.len() as u64;
                evicted.push((k, v));
            }
        }
        if !evicted.is_empty() {
            self.stats.evictions_memory.fetch_add(evicted.len() as u64, Ordering::Relaxed);
            self.spill(evicted);
        }
    }

    /// Hands blocks evicted from memory to the disk tier, if any.
    fn spill(&self, blocks: Vec<(BlockKey, Bytes)>) {
        if let Some(disk) = &self.disk {
            for (k, v) in blocks {
                disk.insert_async(k, v, &self.stats);
            }
        }
    }

    /// Waits until queued disk writes are done (tests and benchmarks).
    pub async fn flush(&self) {
        if let Some(disk) = &self.disk {
            disk.flush().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, version: &str, index: u64) -> BlockKey {
        BlockKey { object: Arc::new(ObjectId { key: name.into(), version: version.into(), has_etag: true }), index }
    }

    #[tokio::test]
    async fn memory_tier_is_bounded_by_bytes_and_evicts_lru() {
        let cache = BlockCache::new(10, None);
        cache.insert(key("a", "1", 0), Bytes::from(vec![0; 4]));
        cache.insert(key("a", "1", 1), Bytes::from(vec![1; 4]));
        assert!(cache.get(&key("a", "1", 0)).await.is_some()); // 0 is now most recent
        cache.insert(key("a", "1", 2), Bytes::from(vec![2; 4]));
        assert_eq!(cache.memory_used_bytes(), 8);
        assert!(cache.get(&key("a", "1", 1)).await.is_none(), "LRU block evicted");
        assert!(cache.get(&key("a", "1", 0)).await.is_some());
        assert_eq!(cache.stats.evictions_memory.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn reinsert_does_not_double_count() {
        let cache = BlockCache::new(100, None);
        cache.insert(key("a", "1", 0), Bytes::from(vec![0; 30]));
        cache.insert(key("a", "1", 0), Bytes::from(vec![0; 20]));
        assert_eq!(cache.memory_used_bytes(), 20);
    }

    #[tokio::test]
    async fn versions_never_alias() {
        let cache = BlockCache::new(100, None);
        cache.insert(key("a", "v1", 0), Bytes::from_static(b"old"));
        assert!(cache.get(&key("a", "v2", 0)).await.is_none());
    }

    #[tokio::test]
    async fn oversized_block_is_not_kept_in_memory() {
        let cache = BlockCache::new(4, None);
        cache.insert(key("a", "1", 0), Bytes::from(vec![0; 5]));
        assert_eq!(cache.memory_used_bytes(), 0);
    }

    #[tokio::test]
    async fn evicted_blocks_land_on_disk_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskTier::new(dir.path(), 1 << 20).unwrap();
        let cache = BlockCache::new(8, Some(disk));
        cache.insert(key("a", "1", 0), Bytes::from(vec![7; 8]));
        cache.insert(key("a", "1", 1), Bytes::from(vec![9; 8]));
        cache.flush().await;
        assert!(cache.disk_used_bytes() > 0);
        let got = cache.get(&key("a", "1", 0)).await.expect("disk hit");
        assert_eq!(&got[..], &[7; 8]);
        assert_eq!(cache.stats.hits_disk.load(Ordering::Relaxed), 1);
    }

    proptest::proptest! {
        #[test]
        fn memory_accounting_matches_contents(ops in proptest::collection::vec((0u64..20, 1usize..50), 1..200)) {
            let cache = BlockCache::new(200, None);
            for (idx, len) in ops {
                cache.insert(key("o", "v", idx), Bytes::from(vec![0; len]));
                let mem = cache.mem.lock().unwrap();
                let sum: u64 = mem.lru.iter().map(|(_, v)| v.len() as u64).sum();
                proptest::prop_assert_eq!(sum, mem.used_bytes);
                proptest::prop_assert!(mem.used_bytes <= 200);
            }
        }
    }
}
