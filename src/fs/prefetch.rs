//! The read path below the filesystem: block math, the per-handle access-pattern detector, and
//! the fetcher that turns reads into ranged GETs.
//!
//! Invariants:
//! - A block is fetched at most once at a time: concurrent readers of the same block wait on
//!   the same in-flight GET (`inflight`).
//! - Every GET carries the object's version (`If-Match`), and blocks are cached under it, so a
//!   read never mixes two versions of an object.
//! - Random reads cost one ranged GET of exactly the bytes asked; only a stream that has read
//!   [`SEQUENTIAL_EVIDENCE`] bytes in order prefetches, and never more than it has already read.
//! - Memory: at most `max_gets` requests are in flight, each buffering at most one block;
//!   complete blocks go straight into the bounded memory cache ([`ReadBudget`]). The prefetch windows of
//!   all sequential streams together stay within half of the memory cache, so prefetched blocks
//!   are not evicted before they are read.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};

use crate::cache::{BlockCache, BlockKey};
use crate::s3::{ObjectId, ObjectStore, S3Error};

/// Cache block size. 1 MiB matches the largest FUSE read (256 pages), so a kernel read touches
/// at most two blocks.
pub const BLOCK_SIZE: u64 = 1 << 20;
/// Largest GET of a prefetch. 16 MiB requests: fewer, larger streams cost the server (and us)
/// less CPU per byte; against a CPU-bound local server 16 MiB beat 4 and 8 MiB by 30-50%.
pub const REQUEST_BLOCKS: u64 = 16;
/// Largest prefetch window of one stream: eight 16 MiB requests in flight keep a fast server busy.
pub const MAX_WINDOW: u64 = 128 * BLOCK_SIZE;
/// Bytes a stream must read in order before it prefetches. Several large application reads:
/// a 1 MiB `pread` can reach us as nine contiguous pieces (eight 128 KiB requests plus kernel
/// read-ahead, when the read-ahead is not raised), and two random reads that happen to land
/// next to each other must not look like a scan either.
pub const SEQUENTIAL_EVIDENCE: u64 = 4 * BLOCK_SIZE;
/// A read continues a stream when it starts at most this far past the stream's end: pages the
/// kernel found in its page cache are skipped, leaving gaps, and requests of one read-ahead
/// batch can be handled out of order.
pub const STREAM_GAP: u64 = 4 * BLOCK_SIZE;
/// ...or at most this far before it: the kernel's read-ahead requests can arrive out of order.
pub const STREAM_BACKTRACK: u64 = 2 * BLOCK_SIZE;
/// Streams tracked per handle, so threads sharing one descriptor keep separate patterns.
const STREAMS_PER_HANDLE: usize = 4;
/// Concurrent GETs per mount at most. Bounds memory and sockets; 16 saturates a local server
/// on 2 cores.
pub const MAX_CONCURRENT_GETS: usize = 16;
/// Largest share of the read budget kept for buffers in flight rather than cached blocks.
const MAX_READ_BUFFERS: u64 = 64 * BLOCK_SIZE;

/// How the read memory budget (`--memory-cache-size`) is spent. Cached blocks get most of it;
/// the rest (a quarter, at most 64 MiB) covers what is in flight: the block each GET is
/// filling (one per concurrent GET: one GET per 4 MiB of this share, at most 16), the SDK's
/// receive buffers, blocks of a request still referenced by its waiters, and the reply buffers
/// of FUSE reads (one per read the kernel has outstanding, bounded by its background limit).
/// Measured on a 1 GiB scan, all of these together peak at about 45 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBudget {
    pub cache_bytes: u64,
    pub max_gets: usize,
}

impl ReadBudget {
    pub fn split(memory_bytes: u64) -> Self {
        let buffers = (memory_bytes / 4).min(MAX_READ_BUFFERS);
        let max_gets = ((buffers / 4 / BLOCK_SIZE) as usize).clamp(1, MAX_CONCURRENT_GETS);
        // The cache always holds at least one block (tiny budgets are for tests of the disk tier).
        let cache_bytes = (memory_bytes - buffers).max(memory_bytes.min(BLOCK_SIZE));
        ReadBudget { cache_bytes, max_gets }
    }
}
/// Extra attempts for a GET whose body breaks off mid-way (the SDK only retries until headers).
const BODY_RETRIES: u32 = 3;
const BODY_RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// Block indexes covering `range` (end exclusive), clamped to `size`.
pub fn blocks_for(range: Range<u64>, size: u64) -> Range<u64> {
    let end = range.end.min(size);
    if range.start >= end {
        return 0..0;
    }
    range.start / BLOCK_SIZE..end.div_ceil(BLOCK_SIZE)
}

/// Byte length of block `index` in an object of `size` bytes.
pub fn block_len(index: u64, size: u64) -> u64 {
    size.saturating_sub(index * BLOCK_SIZE).min(BLOCK_SIZE)
}

/// How the fetcher should serve one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No evidence of a scan: fetch exactly the bytes asked (unless they are cached).
    Random,
    /// Whole blocks through the cache, prefetching `prefetch` bytes past the read.
    Sequential { prefetch: u64 },
}

/// One run of in-order reads on a handle.
#[derive(Debug, Clone)]
struct Stream {
    /// Where the stream began.
    start: u64,
    /// Where the next in-order read would start.
    next: u64,
    /// Bytes read in order so far.
    run: u64,
    /// Logical time of the last read, to replace the stalest stream.
    used: u64,
    /// Counted among the fetcher's sequential streams.
    counted: bool,
    /// Began at offset 0.
    from_start: bool,
}

/// Per-handle access-pattern detector: up to [`STREAMS_PER_HANDLE`] in-order streams.
///
/// A stream prefetches once it has read [`SEQUENTIAL_EVIDENCE`] bytes in order, and then as
/// many bytes as it has read so far (up to the cap the fetcher allows): the window starts small,
/// doubles as the stream proves itself, and a scan that stops wastes at most what it had read.
/// Each sequential stream is counted with the fetcher while it is tracked, so all of a mount's
/// scans share the prefetch budget.
#[derive(Debug)]
pub struct ReadPattern {
    streams: Vec<Stream>,
    clock: u64,
    /// The fetcher's count of sequential streams, once this handle has had one.
    sequential: Option<Arc<AtomicUsize>>,
}

impl ReadPattern {
    pub fn new() -> Self {
        ReadPattern { streams: Vec::with_capacity(STREAMS_PER_HANDLE), clock: 0, sequential: None }
    }

    /// Records a read of `len` bytes at `offset` and says how to serve it.
    pub fn on_read<S>(&mut self, offset: u64, len: u64, fetcher: &Fetcher<S>) -> Access {
        if self.sequential.is_none() {
            self.sequential = Some(Arc::clone(&fetcher.sequential_streams));
        }
        let counter = &fetcher.sequential_streams;
        let stream = self.note(offset, len, counter);
        // A scan reads most of what it passes over; reads strided across gaps (64 KiB every
        // 2 MiB, say) are not one, however many there are.
        let dense = stream.run.saturating_mul(2) >= stream.next - stream.start;
        if stream.run < SEQUENTIAL_EVIDENCE || !dense {
            // A file read in order from its start (cat, cp, a whole-file read) is the common
            // case: whole blocks, so they are cached for the next reader, but no prefetch yet.
            return if stream.from_start { Access::Sequential { prefetch: 0 } } else { Access::Random };
        }
        if !stream.counted {
            stream.counted = true;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Access::Sequential { prefetch: stream.run.min(fetcher.window_cap()) }
    }

    /// Adds the read to the stream it continues (or starts one) and returns that stream.
    /// Streams it drops are uncounted from `counter`.
    fn note(&mut self, offset: u64, len: u64, counter: &AtomicUsize) -> &mut Stream {
        self.clock += 1;
        let end = offset.saturating_add(len);
        let continues = |s: &Stream| {
            offset.saturating_add(STREAM_BACKTRACK) >= s.next && offset <= s.next.saturating_add(STREAM_GAP)
        };
        let uncount = |s: &Stream| {
            if s.counted {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        };
        // The longest run this read continues; shorter ones near it are the same scan's stray
        // pieces and are dropped.
        let longest =
            self.streams.iter().enumerate().filter(|(_, s)| continues(s)).max_by_key(|(_, s)| s.run).map(|(i, _)| i);
        let index = match longest {
            Some(keep) => {
                let mut i = 0;
                self.streams.retain(|s| {
                    let stay = i == keep || !continues(s);
                    if !stay {
                        uncount(s);
                    }
                    i += 1;
                    stay
                });
                // Only the kept stream continues now.
                let index = self.streams.iter().position(continues).expect("the kept stream continues");
                let s = &mut self.streams[index];
                if end > s.next {
                    s.run += end - s.next.max(offset);
                    s.next = end;
                }
                index
            }
            None => {
                let fresh =
                    Stream { start: offset, next: end, run: len, used: 0, counted: false, from_start: offset == 0 };
                if self.streams.len() < STREAMS_PER_HANDLE {
                    self.streams.push(fresh);
                    self.streams.len() - 1
                } else {
                    let (index, stalest) =
                        self.streams.iter_mut().enumerate().min_by_key(|(_, s)| s.used).expect("streams is full");
                    uncount(stalest);
                    *stalest = fresh;
                    index
                }
            }
        };
        let stream = &mut self.streams[index];
        stream.used = self.clock;
        stream
    }
}

impl Default for ReadPattern {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ReadPattern {
    fn drop(&mut self) {
        if let Some(counter) = &self.sequential {
            let counted = self.streams.iter().filter(|s| s.counted).count();
            counter.fetch_sub(counted, Ordering::Relaxed);
        }
    }
}

type BlockResult = Option<Result<Bytes, S3Error>>;

/// Fetches blocks of objects from S3 into the cache, deduplicating concurrent requests.
pub struct Fetcher<S> {
    store: Arc<S>,
    cache: Arc<BlockCache>,
    inflight: Mutex<HashMap<BlockKey, watch::Receiver<BlockResult>>>,
    gets: Semaphore,
    /// Handles currently reading sequentially; they share the prefetch budget.
    sequential_streams: Arc<AtomicUsize>,
    /// A GET that receives nothing for this long fails (`--s3-timeout`).
    stall_limit: Duration,
    /// When a GET last failed for stalling, until a later GET gets an answer: for a third of
    /// the stall limit after that, the server is presumed unresponsive and new GETs get only a
    /// third of the limit. The kernel retries a failed read-ahead at once with a read of its
    /// own, which must not wait the full limit again.
    stalled_at: Mutex<Option<Instant>>,
}

impl<S> Fetcher<S> {
    /// The largest prefetch window one sequential stream may use now: all streams together
    /// stay within half the memory cache, so what is prefetched is still cached when read.
    pub fn window_cap(&self) -> u64 {
        let streams = self.sequential_streams.load(Ordering::Relaxed).max(1) as u64;
        (self.cache.memory_capacity_bytes() / 2 / streams).clamp(BLOCK_SIZE, MAX_WINDOW)
    }
}

impl<S: ObjectStore> Fetcher<S> {
    pub fn new(store: Arc<S>, cache: Arc<BlockCache>) -> Arc<Self> {
        Self::with_limits(store, cache, MAX_CONCURRENT_GETS, crate::config::DEFAULT_S3_TIMEOUT)
    }

    /// A fetcher with at most `max_gets` GETs in flight, whose GETs fail once they receive
    /// nothing for `stall_limit`, retries included.
    pub fn with_limits(store: Arc<S>, cache: Arc<BlockCache>, max_gets: usize, stall_limit: Duration) -> Arc<Self> {
        Arc::new(Fetcher {
            store,
            cache,
            inflight: Mutex::new(HashMap::new()),
            gets: Semaphore::new(max_gets.max(1)),
            sequential_streams: Arc::new(AtomicUsize::new(0)),
            stall_limit,
            stalled_at: Mutex::new(None),
        })
    }

    /// The `progress` a new GET starts from: now, or (while the server is presumed
    /// unresponsive) as if it had waited two thirds of the stall limit already.
    fn start_progress(&self) -> Instant {
        let now = Instant::now();
        match *self.stalled_at.lock().unwrap() {
            Some(at) if now.duration_since(at) < self.stall_limit / 3 => {
                now.checked_sub(self.stall_limit - self.stall_limit / 3).unwrap_or(now)
            }
            _ => now,
        }
    }

    /// Awaits `fut` unless nothing has arrived for the stall limit since `progress`.
    async fn until_stalled<T>(&self, key: &str, progress: Instant, fut: impl Future<Output = T>) -> Result<T, S3Error> {
        let deadline = tokio::time::Instant::from_std(progress + self.stall_limit);
        let started = Instant::now();
        tokio::time::timeout_at(deadline, fut).await.map_err(|_| {
            *self.stalled_at.lock().unwrap() = Some(Instant::now());
            S3Error::Unreachable(format!(
                "S3 stopped answering: no data for {:.1} s while reading {key:?} (--s3-timeout is {} s; \
                 after a stall, new requests wait a third of it)",
                started.elapsed().as_secs_f64(),
                self.stall_limit.as_secs()
            ))
        })
    }

    /// How long to wait before trying a failed GET again, if at all: transient failures are
    /// retried a few times, while the last byte received is less than the stall limit ago.
    fn retry_after(&self, e: &S3Error, attempt: u32, progress: Instant) -> Option<Duration> {
        let backoff = BODY_RETRY_BACKOFF * 2u32.pow(attempt);
        let retry = e.is_transient() && attempt < BODY_RETRIES && progress.elapsed() + backoff < self.stall_limit;
        if !retry && matches!(e, S3Error::Unreachable(_)) {
            // Gave up on an unanswered request (ours or the SDK's timeout): see `stalled_at`.
            *self.stalled_at.lock().unwrap() = Some(Instant::now());
        }
        retry.then_some(backoff)
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    /// Reads `range` of `object` (of `size` bytes) as `access` says. Returns the data as slices,
    /// in order.
    pub async fn read(
        self: &Arc<Self>,
        object: &Arc<ObjectId>,
        size: u64,
        range: Range<u64>,
        access: Access,
    ) -> Result<Vec<Bytes>, S3Error> {
        let needed = blocks_for(range.clone(), size);
        if needed.is_empty() {
            return Ok(Vec::new());
        }
        let prefetch = match access {
            Access::Random => {
                let absent = self.not_at_hand(object, needed.clone());
                if absent > 0 {
                    // Counted as the misses they are, although no block is fetched whole.
                    self.cache.stats.misses.fetch_add(absent, Ordering::Relaxed);
                    return Ok(vec![self.read_exact(object, size, range).await?]);
                }
                0
            }
            Access::Sequential { prefetch } => prefetch,
        };
        // Resolve needed blocks from the cache first (memory, then disk).
        let mut have: Vec<Option<Bytes>> = Vec::with_capacity(needed.clone().count());
        for index in needed.clone() {
            let key = BlockKey { object: Arc::clone(object), index };
            let hit = self.cache.get(&key).await.filter(|b| b.len() as u64 == block_len(index, size));
            have.push(hit);
        }
        // Start GETs for what is missing, needed blocks first, then the prefetch window in
        // requests of about a quarter of the window (several in flight, none tiny).
        let missing: Vec<u64> = needed.clone().zip(&have).filter(|(_, h)| h.is_none()).map(|(i, _)| i).collect();
        let mut waiters = self.start_fetches(object, size, &missing, needed.end - needed.start, false);
        if prefetch > 0 {
            self.prefetch(object, size, range.end, prefetch, needed.end);
        }
        let mut out = Vec::with_capacity(have.len());
        for (index, hit) in needed.clone().zip(have) {
            let block = match hit {
                Some(b) => b,
                None => {
                    let mut rx = match waiters.remove(&index) {
                        Some(rx) => rx,
                        None => self.fetch_one(object, size, index),
                    };
                    let result = rx.wait_for(Option::is_some).await.map(|v| v.clone());
                    match result {
                        Ok(Some(r)) => r?,
                        _ => {
                            return Err(S3Error::Body(object.key.clone(), "block fetch was abandoned".into()));
                        }
                    }
                }
            };
            let block_start = index * BLOCK_SIZE;
            let from = range.start.saturating_sub(block_start) as usize;
            let to = (range.end.min(size) - block_start).min(block.len() as u64) as usize;
            out.push(block.slice(from..to));
            // A scan rarely comes back (and the page cache keeps what it read): let its read
            // blocks go first, before blocks prefetched for it or cached for other readers.
            if prefetch > 0 && block_start + block_len(index, size) <= range.end {
                self.cache.demote(&BlockKey { object: Arc::clone(object), index });
            }
        }
        Ok(out)
    }

    /// Starts GETs for the window of `prefetch` bytes after `from` (blocks before `first` are
    /// the read's own). The window slides by one read at a time, so to keep requests large it
    /// waits until a whole request's worth of blocks (about a quarter of the window) is missing,
    /// or the window reaches the end of the object. Results are not awaited: blocks land in the
    /// cache.
    fn prefetch(self: &Arc<Self>, object: &Arc<ObjectId>, size: u64, from: u64, prefetch: u64, first: u64) {
        let ahead = blocks_for(from..from.saturating_add(prefetch), size);
        let per_request = (prefetch / 4 / BLOCK_SIZE).clamp(1, REQUEST_BLOCKS);
        let missing: Vec<u64> = {
            let inflight = self.inflight.lock().unwrap();
            ahead.clone().filter(|&index| index >= first && !self.at_hand(&inflight, object, index)).collect()
        };
        let reaches_end = ahead.end == blocks_for(0..size, size).end;
        if missing.is_empty() || ((missing.len() as u64) < per_request && !reaches_end) {
            return;
        }
        drop(self.start_fetches(object, size, &missing, per_request, true));
    }

    /// How many blocks of `blocks` are neither cached nor being fetched.
    fn not_at_hand(&self, object: &Arc<ObjectId>, blocks: Range<u64>) -> u64 {
        let inflight = self.inflight.lock().unwrap();
        blocks.filter(|&index| !self.at_hand(&inflight, object, index)).count() as u64
    }

    /// Whether block `index` is cached (memory or disk) or being fetched (`inflight` locked).
    fn at_hand(
        &self,
        inflight: &HashMap<BlockKey, watch::Receiver<BlockResult>>,
        object: &Arc<ObjectId>,
        index: u64,
    ) -> bool {
        let key = BlockKey { object: Arc::clone(object), index };
        inflight.contains_key(&key) || self.cache.contains_in_memory(&key) || self.cache.contains_on_disk(&key)
    }

    /// One ranged GET of exactly `range` (clamped to `size`), retried when the body breaks off.
    /// Whole blocks it happens to cover are cached as well.
    async fn read_exact(&self, object: &Arc<ObjectId>, size: u64, range: Range<u64>) -> Result<Bytes, S3Error> {
        let range = range.start..range.end.min(size);
        let _permit = self.gets.acquire().await.expect("semaphore is never closed");
        let mut progress = self.start_progress();
        let mut attempt = 0;
        let data = loop {
            match self.get_all(object, range.clone(), &mut progress).await {
                Ok(data) => break data,
                Err(e) => match self.retry_after(&e, attempt, progress) {
                    Some(backoff) => {
                        attempt += 1;
                        tracing::debug!(key = %object.key, ?range, attempt, error = %e, "retrying ranged GET");
                        tokio::time::sleep(backoff).await;
                    }
                    None => return Err(e),
                },
            }
        };
        for index in blocks_for(range.clone(), size) {
            let start = index * BLOCK_SIZE;
            let end = start + block_len(index, size);
            if start >= range.start && end <= range.end {
                let mut block = data.slice((start - range.start) as usize..(end - range.start) as usize);
                if block.len() < data.len() {
                    // A slice would keep the whole response alive under a block's charge.
                    block = Bytes::copy_from_slice(&block);
                }
                self.cache.insert(BlockKey { object: Arc::clone(object), index }, block);
            }
        }
        Ok(data)
    }

    async fn get_all(
        &self,
        object: &Arc<ObjectId>,
        range: Range<u64>,
        progress: &mut Instant,
    ) -> Result<Bytes, S3Error> {
        let want = (range.end - range.start) as usize;
        let mut get = self.until_stalled(&object.key, *progress, self.store.get_range(object, range.clone())).await??;
        *self.stalled_at.lock().unwrap() = None;
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            match self.until_stalled(&object.key, *progress, get.body.next()).await? {
                Some(chunk) => {
                    buf.extend_from_slice(&chunk?);
                    *progress = Instant::now();
                }
                None => {
                    return Err(S3Error::Body(
                        object.key.clone(),
                        format!("response ended after {} of {want} bytes of range {range:?}", buf.len()),
                    ));
                }
            }
        }
        buf.truncate(want);
        Ok(buf.freeze())
    }

    /// A waiter for one block, starting a fetch if nobody else is (rare: lost a race).
    fn fetch_one(self: &Arc<Self>, object: &Arc<ObjectId>, size: u64, index: u64) -> watch::Receiver<BlockResult> {
        let mut w = self.start_fetches(object, size, &[index], 1, false);
        w.remove(&index).expect("start_fetches returns a waiter for every requested block")
    }

    /// Registers every block in `indexes` that is not in flight (and, with `skip_cached`, not
    /// cached), groups consecutive ones into GETs of at most `max_blocks`, and returns a waiter
    /// for each block it registered or found in flight.
    fn start_fetches(
        self: &Arc<Self>,
        object: &Arc<ObjectId>,
        size: u64,
        indexes: &[u64],
        max_blocks: u64,
        skip_cached: bool,
    ) -> HashMap<u64, watch::Receiver<BlockResult>> {
        let mut waiters = HashMap::new();
        let mut runs: Vec<(u64, Vec<watch::Sender<BlockResult>>)> = Vec::new();
        {
            let mut inflight = self.inflight.lock().unwrap();
            for &index in indexes {
                let key = BlockKey { object: Arc::clone(object), index };
                if let Some(rx) = inflight.get(&key) {
                    waiters.insert(index, rx.clone());
                    continue;
                }
                if skip_cached && (self.cache.contains_in_memory(&key) || self.cache.contains_on_disk(&key)) {
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(key, rx.clone());
                waiters.insert(index, rx);
                match runs.last_mut() {
                    Some((first, senders))
                        if *first + senders.len() as u64 == index && (senders.len() as u64) < max_blocks.max(1) =>
                    {
                        senders.push(tx)
                    }
                    _ => runs.push((index, vec![tx])),
                }
            }
        }
        for (first, senders) in runs {
            tracing::trace!(key = %object.key, first, blocks = senders.len(), "GET blocks");
            let this = Arc::clone(self);
            let object = Arc::clone(object);
            tokio::spawn(async move { this.fetch_run(object, size, first, senders).await });
        }
        waiters
    }

    /// One GET for blocks `first..first + senders.len()`, publishing each block as it completes.
    async fn fetch_run(&self, object: Arc<ObjectId>, size: u64, first: u64, senders: Vec<watch::Sender<BlockResult>>) {
        let _permit = self.gets.acquire().await.expect("semaphore is never closed");
        let end_block = first + senders.len() as u64;
        let mut next = first; // first block not yet published
        let mut progress = self.start_progress();
        let mut attempt = 0;
        let outcome = loop {
            match self.stream_blocks(&object, size, &mut next, first, &senders, &mut progress).await {
                Ok(()) => break Ok(()),
                Err(e) => match self.retry_after(&e, attempt, progress) {
                    Some(backoff) => {
                        attempt += 1;
                        tracing::debug!(key = %object.key, block = next, attempt, error = %e, "retrying ranged GET");
                        tokio::time::sleep(backoff).await;
                    }
                    None => break Err(e),
                },
            }
        };
        if let Err(e) = outcome {
            for index in next..end_block {
                senders[(index - first) as usize].send_replace(Some(Err(e.clone())));
            }
        }
        let mut inflight = self.inflight.lock().unwrap();
        for index in first..end_block {
            inflight.remove(&BlockKey { object: Arc::clone(&object), index });
        }
    }

    /// Streams blocks `*next..first + senders.len()` from one GET, advancing `*next` past each
    /// block it publishes (so a retry resumes there) and `*progress` at each byte received.
    async fn stream_blocks(
        &self,
        object: &Arc<ObjectId>,
        size: u64,
        next: &mut u64,
        first: u64,
        senders: &[watch::Sender<BlockResult>],
        progress: &mut Instant,
    ) -> Result<(), S3Error> {
        let end_block = first + senders.len() as u64;
        let range = *next * BLOCK_SIZE..(end_block * BLOCK_SIZE).min(size);
        let mut get = self.until_stalled(&object.key, *progress, self.store.get_range(object, range.clone())).await??;
        *self.stalled_at.lock().unwrap() = None;
        // Each block gets an allocation of exactly its size (a chunk straddling two blocks is
        // split, not appended whole), so the cache's byte count is the memory it holds.
        let mut buf = BytesMut::with_capacity(block_len(*next, size) as usize);
        let mut rest = Bytes::new();
        while *next < end_block {
            if rest.is_empty() {
                match self.until_stalled(&object.key, *progress, get.body.next()).await? {
                    Some(chunk) => {
                        rest = chunk?;
                        *progress = Instant::now();
                    }
                    None => {
                        return Err(S3Error::Body(
                            object.key.clone(),
                            format!("response ended early at block {} of range {range:?}", *next),
                        ));
                    }
                }
            }
            let want = block_len(*next, size) as usize;
            let take = (want - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest.split_to(take));
            if buf.len() == want {
                let block = std::mem::take(&mut buf).freeze();
                self.cache.insert(BlockKey { object: Arc::clone(object), index: *next }, block.clone());
                senders[(*next - first) as usize].send_replace(Some(Ok(block)));
                *next += 1;
                if *next < end_block {
                    buf = BytesMut::with_capacity(block_len(*next, size) as usize);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::fake::FakeStore;
    use std::sync::atomic::Ordering;

    /// Whole blocks, no prefetch.
    const SEQ: Access = Access::Sequential { prefetch: 0 };

    #[test]
    fn the_read_budget_keeps_room_for_buffers_in_flight() {
        let b = ReadBudget::split(256 << 20);
        assert_eq!(b, ReadBudget { cache_bytes: 192 << 20, max_gets: 16 });
        let b = ReadBudget::split(8 << 20);
        assert_eq!(b, ReadBudget { cache_bytes: 6 << 20, max_gets: 1 });
        let b = ReadBudget::split(1 << 20);
        assert_eq!(b.cache_bytes, 1 << 20, "at least one block is cached");
        let b = ReadBudget::split(64 << 20);
        assert_eq!((b.cache_bytes, b.max_gets), (48 << 20, 4));
    }

    #[test]
    fn block_math() {
        assert_eq!(blocks_for(0..1, 10), 0..1);
        assert_eq!(blocks_for(0..BLOCK_SIZE, 10 * BLOCK_SIZE), 0..1);
        assert_eq!(blocks_for(BLOCK_SIZE - 1..BLOCK_SIZE + 1, 10 * BLOCK_SIZE), 0..2);
        assert_eq!(blocks_for(5..100, 5), 0..0);
        assert_eq!(blocks_for(0..100, 0), 0..0);
        assert_eq!(block_len(2, 2 * BLOCK_SIZE + 7), 7);
        assert_eq!(block_len(3, 2 * BLOCK_SIZE + 7), 0);
    }

    proptest::proptest! {
        #[test]
        fn blocks_cover_exactly(start in 0u64..50_000_000, len in 1u64..5_000_000, size in 0u64..60_000_000) {
            let b = blocks_for(start..start + len, size);
            let end = (start + len).min(size);
            if start >= end {
                proptest::prop_assert!(b.is_empty());
            } else {
                proptest::prop_assert!(b.start * BLOCK_SIZE <= start);
                proptest::prop_assert!(b.end * BLOCK_SIZE >= end);
                proptest::prop_assert!((b.end - 1) * BLOCK_SIZE < end);
                let total: u64 = b.clone().map(|i| block_len(i, size)).sum();
                proptest::prop_assert!(total >= end - start);
            }
        }
    }

    const KIB: u64 = 1024;

    fn fetcher(cache_bytes: u64) -> Arc<Fetcher<FakeStore>> {
        Fetcher::new(Arc::new(FakeStore::new("b")), Arc::new(BlockCache::new(cache_bytes, None)))
    }

    /// Feeds `reads` (offset, len) to a fresh pattern; returns what each was judged.
    fn judge(f: &Fetcher<FakeStore>, reads: &[(u64, u64)]) -> Vec<Access> {
        let mut p = ReadPattern::new();
        reads.iter().map(|&(o, l)| p.on_read(o, l, f)).collect()
    }

    /// A `pread` of `len` at `offset` as the kernel sends it with its default 128 KiB read-ahead:
    /// 128 KiB pieces, plus one piece of read-ahead past the end.
    fn kernel_pieces(offset: u64, len: u64) -> Vec<(u64, u64)> {
        (0..len / (128 * KIB) + 1).map(|i| (offset + i * 128 * KIB, 128 * KIB)).collect()
    }

    #[test]
    fn random_large_preads_split_by_the_kernel_never_prefetch() {
        let f = fetcher(256 << 20);
        let mut p = ReadPattern::new();
        let mut x = 12345u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let offset = (x % 1000) * BLOCK_SIZE + (x % 7) * 4096;
            for (o, l) in kernel_pieces(offset, BLOCK_SIZE) {
                assert_eq!(p.on_read(o, l, &f), Access::Random, "piece at {o}");
            }
        }
    }

    #[test]
    fn random_small_reads_never_prefetch() {
        let f = fetcher(256 << 20);
        let reads: Vec<(u64, u64)> = (0..500u64).map(|i| ((i * 7919 % 4096) * 256 * KIB, 4 * KIB)).collect();
        let judged = judge(&f, &reads);
        assert!(judged.iter().all(|a| !matches!(a, Access::Sequential { prefetch } if *prefetch > 0)), "{judged:?}");
        assert!(judged[1..].iter().all(|a| *a == Access::Random), "only a read at offset 0 takes whole blocks");
    }

    #[test]
    fn a_scan_prefetches_after_evidence_and_the_window_grows_with_the_run() {
        let f = fetcher(1 << 30);
        // The kernel's read-ahead of a sequential `cat`: 128 KiB, then 512 KiB, then 1 MiB requests.
        let mut reads = vec![(0, 128 * KIB), (128 * KIB, 512 * KIB)];
        let mut off = 640 * KIB;
        for _ in 0..200 {
            reads.push((off, BLOCK_SIZE));
            off += BLOCK_SIZE;
        }
        let got = judge(&f, &reads);
        let first_seq = got.iter().position(|a| *a != Access::Random).unwrap();
        assert!(reads[..first_seq].iter().map(|r| r.1).sum::<u64>() < SEQUENTIAL_EVIDENCE + BLOCK_SIZE);
        let mut last = 0;
        for (i, a) in got.iter().enumerate().skip(first_seq) {
            let Access::Sequential { prefetch } = *a else { panic!("read {i} fell back to random") };
            let read_so_far = reads[i].0 + reads[i].1;
            assert!(prefetch <= read_so_far, "never prefetch more than was read in order");
            assert!(prefetch >= last, "the window never shrinks during a scan");
            last = prefetch;
        }
        assert_eq!(last, MAX_WINDOW, "a long scan reaches the largest window");
    }

    #[test]
    fn strided_reads_are_not_a_scan() {
        let f = fetcher(1 << 30);
        let reads: Vec<(u64, u64)> = (1..200u64).map(|i| (i * 2 * BLOCK_SIZE, 64 * KIB)).collect();
        assert!(judge(&f, &reads).iter().all(|a| *a == Access::Random));
        // Half the pages found in the page cache still leaves a scan.
        let reads: Vec<(u64, u64)> = (1..40u64).map(|i| (i * BLOCK_SIZE, 512 * KIB)).collect();
        assert!(matches!(judge(&f, &reads).last(), Some(Access::Sequential { prefetch }) if *prefetch > 0));
    }

    #[test]
    fn a_file_read_from_its_start_takes_whole_blocks_before_it_prefetches() {
        let f = fetcher(1 << 30);
        let reads = [(0, 32 * KIB), (32 * KIB, 128 * KIB), (160 * KIB, 256 * KIB), (416 * KIB, 512 * KIB)];
        assert!(judge(&f, &reads).iter().all(|a| *a == Access::Sequential { prefetch: 0 }));
    }

    #[test]
    fn reordered_and_cached_pieces_keep_a_scan_going() {
        let f = fetcher(1 << 30);
        // Read-ahead requests arriving out of order, and a gap where the page cache had the data.
        let reads = [
            (0, BLOCK_SIZE),
            (2 * BLOCK_SIZE, BLOCK_SIZE),
            (BLOCK_SIZE, BLOCK_SIZE),
            (3 * BLOCK_SIZE + 512 * KIB, BLOCK_SIZE),
            (4 * BLOCK_SIZE + 512 * KIB, BLOCK_SIZE),
        ];
        let got = judge(&f, &reads);
        assert!(matches!(got[4], Access::Sequential { .. }), "{got:?}");
    }

    #[test]
    fn two_readers_on_one_handle_each_keep_their_scan() {
        let f = fetcher(1 << 30);
        let mut p = ReadPattern::new();
        let (a, b) = (0u64, 500 * BLOCK_SIZE);
        let mut judged = Vec::new();
        for i in 0..20 {
            judged.push(p.on_read(a + i * BLOCK_SIZE, BLOCK_SIZE, &f));
            judged.push(p.on_read(b + i * BLOCK_SIZE, BLOCK_SIZE, &f));
        }
        assert!(judged[10..].iter().all(|a| matches!(a, Access::Sequential { .. })), "{judged:?}");
    }

    #[test]
    fn every_scan_counts_even_on_one_handle_and_leaves_when_replaced() {
        let f = fetcher(256 << 20);
        let mut p = ReadPattern::new();
        for i in 0..10 {
            p.on_read(i * BLOCK_SIZE, BLOCK_SIZE, &f);
            p.on_read(500 * BLOCK_SIZE + i * BLOCK_SIZE, BLOCK_SIZE, &f);
        }
        assert_eq!(f.sequential_streams.load(Ordering::Relaxed), 2, "two scans on one handle");
        // Random reads elsewhere replace the scans one by one.
        for i in 0..8 {
            p.on_read(100 * BLOCK_SIZE + i * 20 * BLOCK_SIZE, 4096, &f);
        }
        assert_eq!(f.sequential_streams.load(Ordering::Relaxed), 0, "replaced scans are uncounted");
        for i in 0..10 {
            p.on_read(300 * BLOCK_SIZE + i * BLOCK_SIZE, BLOCK_SIZE, &f);
        }
        assert_eq!(f.sequential_streams.load(Ordering::Relaxed), 1);
        drop(p);
        assert_eq!(f.sequential_streams.load(Ordering::Relaxed), 0, "a closed handle uncounts its scans");
    }

    #[test]
    fn sequential_streams_share_half_the_memory_cache() {
        let f = fetcher(256 << 20);
        let mut handles: Vec<ReadPattern> = (0..4).map(|_| ReadPattern::new()).collect();
        let mut last = vec![0; 4];
        for i in 0..100 {
            for (h, p) in handles.iter_mut().enumerate() {
                if let Access::Sequential { prefetch } = p.on_read(i * BLOCK_SIZE, BLOCK_SIZE, &f) {
                    last[h] = prefetch;
                }
            }
        }
        assert_eq!(last, vec![32 << 20; 4], "256 MiB / 2 / 4 streams");
        drop(handles);
        assert_eq!(f.window_cap(), MAX_WINDOW, "closed handles give their share back");
    }

    fn object(store: &FakeStore, key: &str) -> Arc<ObjectId> {
        let meta = futures::executor::block_on(store.head_object(key)).unwrap();
        Arc::new(ObjectId::from_meta(&meta))
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn reads_match_and_second_read_is_cached() {
        let store = Arc::new(FakeStore::new("b"));
        let bytes = data(3 * BLOCK_SIZE as usize + 123);
        store.put("k", bytes.clone());
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(64 << 20, None)));
        let obj = object(&store, "k");
        let size = bytes.len() as u64;
        let got: Vec<u8> = f.read(&obj, size, 1000..BLOCK_SIZE * 2 + 5, SEQ).await.unwrap().concat();
        assert_eq!(got, bytes[1000..(BLOCK_SIZE * 2 + 5) as usize]);
        let gets = store.gets.load(Ordering::Relaxed);
        let again: Vec<u8> = f.read(&obj, size, 1000..BLOCK_SIZE * 2 + 5, SEQ).await.unwrap().concat();
        assert_eq!(again, got);
        assert_eq!(store.gets.load(Ordering::Relaxed), gets, "served from cache");
        let tail: Vec<u8> = f.read(&obj, size, size - 10..size + 100, SEQ).await.unwrap().concat();
        assert_eq!(tail, bytes[bytes.len() - 10..]);
    }

    #[tokio::test]
    async fn prefetch_fetches_ahead_in_few_requests() {
        let store = Arc::new(FakeStore::new("b"));
        let bytes = data(32 * BLOCK_SIZE as usize);
        store.put("k", bytes.clone());
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        f.read(&obj, bytes.len() as u64, 0..4096, Access::Sequential { prefetch: 16 * BLOCK_SIZE }).await.unwrap();
        // Wait for the prefetch to land.
        for _ in 0..100 {
            if f.inflight.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let gets = store.gets.load(Ordering::Relaxed);
        assert!(gets <= 1 + 4, "{gets} GETs");
        let got: Vec<u8> = f.read(&obj, bytes.len() as u64, 0..16 * BLOCK_SIZE, SEQ).await.unwrap().concat();
        assert_eq!(got, bytes[..16 * BLOCK_SIZE as usize]);
        assert_eq!(store.gets.load(Ordering::Relaxed), gets, "all prefetched");
    }

    #[tokio::test]
    async fn a_sliding_window_fetches_in_large_requests() {
        let store = Arc::new(FakeStore::new("b"));
        let bytes = data(64 * BLOCK_SIZE as usize + 5);
        store.put("k", bytes.clone());
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        let size = bytes.len() as u64;
        let window = Access::Sequential { prefetch: 16 * BLOCK_SIZE };
        let mut got = Vec::new();
        for i in 0..=64 {
            got.extend(f.read(&obj, size, i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE, window).await.unwrap().concat());
        }
        assert_eq!(got, bytes);
        let gets = store.gets.load(Ordering::Relaxed);
        assert!(gets <= 64 / 4 + 4, "{gets} GETs: the window must not slide one block per request");
        assert_eq!(store.bytes_served.load(Ordering::Relaxed), size, "every byte fetched once");
    }

    #[tokio::test]
    async fn random_reads_fetch_only_what_they_need() {
        let store = Arc::new(FakeStore::new("b"));
        let bytes = data(64 * BLOCK_SIZE as usize);
        store.put("k", bytes.clone());
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        let range = 40 * BLOCK_SIZE + 7..40 * BLOCK_SIZE + 4000;
        let got = f.read(&obj, 64 * BLOCK_SIZE, range.clone(), Access::Random).await.unwrap().concat();
        assert_eq!(got, bytes[range.start as usize..range.end as usize]);
        assert_eq!(store.bytes_served.load(Ordering::Relaxed), 3993, "exactly the bytes asked");
        // An unaligned 1 MiB read is one GET of 1 MiB, not two blocks.
        let range = 3 * BLOCK_SIZE + 4096..4 * BLOCK_SIZE + 4096;
        let got = f.read(&obj, 64 * BLOCK_SIZE, range.clone(), Access::Random).await.unwrap().concat();
        assert_eq!(got, bytes[range.start as usize..range.end as usize]);
        assert_eq!(store.bytes_served.load(Ordering::Relaxed), 3993 + BLOCK_SIZE);
        // An aligned one fills its block, so reading it again costs nothing.
        let range = 9 * BLOCK_SIZE..10 * BLOCK_SIZE;
        f.read(&obj, 64 * BLOCK_SIZE, range.clone(), Access::Random).await.unwrap();
        let gets = store.gets.load(Ordering::Relaxed);
        let again = f.read(&obj, 64 * BLOCK_SIZE, range.clone(), Access::Random).await.unwrap().concat();
        assert_eq!(again, bytes[range.start as usize..range.end as usize]);
        assert_eq!(store.gets.load(Ordering::Relaxed), gets);
    }

    #[tokio::test]
    async fn changed_object_fails_instead_of_mixing() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("k", data(2 * BLOCK_SIZE as usize));
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        f.read(&obj, 2 * BLOCK_SIZE, 0..10, SEQ).await.unwrap();
        store.put("k", vec![0u8; 2 * BLOCK_SIZE as usize]);
        let err = f.read(&obj, 2 * BLOCK_SIZE, BLOCK_SIZE..BLOCK_SIZE + 10, SEQ).await.unwrap_err();
        assert!(matches!(err, S3Error::PreconditionFailed(_)));
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let store = Arc::new(FakeStore::new("b"));
        let bytes = data(BLOCK_SIZE as usize);
        store.put("k", bytes.clone());
        store.fail_gets.store(2, Ordering::Relaxed);
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        let got: Vec<u8> = f.read(&obj, BLOCK_SIZE, 0..BLOCK_SIZE, Access::Random).await.unwrap().concat();
        assert_eq!(got, bytes);
    }

    #[tokio::test]
    async fn persistent_failure_is_an_error() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("k", data(BLOCK_SIZE as usize));
        store.fail_gets.store(100, Ordering::Relaxed);
        let f = Fetcher::new(Arc::clone(&store), Arc::new(BlockCache::new(256 << 20, None)));
        let obj = object(&store, "k");
        assert!(f.read(&obj, BLOCK_SIZE, 0..10, Access::Random).await.is_err());
    }
}
