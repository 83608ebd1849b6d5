//! The one implementation of a multipart upload (create, upload or copy parts, complete, abort)
//! and the one abort policy, used by streaming writes, staged commits and large copies.
//!
//! Abort policy: a failed or abandoned upload is aborted at once; `close` waits for the first
//! attempt at most [`ABORT_INLINE_WAIT`], then the abort is retried in the background with
//! backoff. Every upload being aborted is tracked by id in [`Uploads`], so none is lost track
//! of: at unmount [`Uploads::finish`] waits for pending aborts and logs the key and upload id of
//! any it could not finish (a bucket lifecycle rule for incomplete uploads removes those parts).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;

use crate::fs::recovery::{Journal, UploadRecord};
use crate::s3::{CompletedPart, ObjectId, ObjectStore, S3Error, UserMetadata};

/// How long a caller waits for the first attempt to abort a failed upload: a healthy server
/// has nothing left over when `close` returns; an unresponsive one must not hold it up longer.
pub const ABORT_INLINE_WAIT: Duration = Duration::from_secs(2);
/// Background retries of an abort that failed (S3 unreachable): about half an hour in all.
const ABORT_RETRIES: u32 = 60;
const ABORT_RETRY_FIRST: Duration = Duration::from_secs(1);
const ABORT_RETRY_MAX: Duration = Duration::from_secs(30);

/// The multipart uploads of one mount: the store, and the aborts still pending.
pub struct Uploads {
    store: Arc<dyn ObjectStore>,
    /// Upload id -> key of every upload whose abort has not succeeded yet.
    aborting: Mutex<BTreeMap<String, String>>,
    /// Signalled whenever an abort finishes (for [`Uploads::finish`]).
    settled: tokio::sync::Notify,
    /// Where uploads in flight are recorded, so a process taking over after a crash aborts
    /// them (`--recovery-dir`).
    journal: Mutex<Option<Journal>>,
}

impl Uploads {
    pub fn new(store: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Uploads {
            store,
            aborting: Mutex::new(BTreeMap::new()),
            settled: tokio::sync::Notify::new(),
            journal: Mutex::new(None),
        })
    }

    /// Records every upload started from now on in `journal` until it completes or is aborted.
    pub fn attach_journal(&self, journal: Journal) {
        *self.journal.lock().unwrap() = Some(journal);
    }

    fn record(&self, record: UploadRecord) {
        if let Some(j) = self.journal.lock().unwrap().as_mut() {
            j.append(&record);
        }
    }

    /// Aborts uploads an earlier process started and never finished (it crashed), so nothing it
    /// was writing becomes visible and no parts are left. Returns how many were aborted.
    pub async fn abort_orphans(self: &Arc<Self>, orphans: Vec<(String, String)>) -> usize {
        let n = orphans.len();
        for (key, id) in orphans {
            tracing::info!(key, upload_id = id, "aborting a multipart upload left by the previous mount process");
            self.record(UploadRecord::Start(key.clone(), id.clone()));
            self.abort(&key, &id).await;
        }
        n
    }

    /// Starts a multipart upload of `key` with `metadata`.
    pub async fn begin(self: &Arc<Self>, key: &str, metadata: &UserMetadata) -> Result<Multipart, S3Error> {
        let id = self.store.create_multipart_upload(key, metadata).await?;
        self.record(UploadRecord::Start(key.to_owned(), id.clone()));
        Ok(Multipart {
            uploads: Arc::clone(self),
            key: key.to_owned(),
            id,
            next: 1,
            tasks: JoinSet::new(),
            done: Vec::new(),
            open: true,
        })
    }

    /// Aborts an upload: waits for the first attempt at most [`ABORT_INLINE_WAIT`], then keeps
    /// retrying in the background until S3 answers (or the retries run out, logged).
    pub async fn abort(self: &Arc<Self>, key: &str, upload_id: &str) {
        self.aborting.lock().unwrap().insert(upload_id.to_owned(), key.to_owned());
        match tokio::time::timeout(ABORT_INLINE_WAIT, self.store.abort_multipart_upload(key, upload_id)).await {
            // Already gone (completed after all, or aborted before): nothing is left behind.
            Ok(Ok(())) => return self.aborted(upload_id),
            Ok(Err(e)) if already_gone(&e) => return self.aborted(upload_id),
            Ok(Err(e)) => {
                tracing::warn!(key, upload_id, error = %e, "cannot abort multipart upload yet; retrying in the background")
            }
            Err(_) => {
                tracing::warn!(
                    key,
                    upload_id,
                    "no answer to aborting a multipart upload yet; retrying in the background"
                )
            }
        }
        self.abort_in_background(key, upload_id);
    }

    /// Aborts without waiting (from a drop, where nobody can wait).
    pub fn abort_in_background(self: &Arc<Self>, key: &str, upload_id: &str) {
        self.aborting.lock().unwrap().insert(upload_id.to_owned(), key.to_owned());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                key,
                upload_id,
                "cannot abort a multipart upload: no runtime; its parts stay until a \
                bucket lifecycle rule for incomplete uploads removes them"
            );
            return;
        };
        let this = Arc::clone(self);
        let (key, upload_id) = (key.to_owned(), upload_id.to_owned());
        runtime.spawn(async move {
            let mut delay = ABORT_RETRY_FIRST;
            for attempt in 0..ABORT_RETRIES {
                if attempt > 0 {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(ABORT_RETRY_MAX);
                }
                match this.store.abort_multipart_upload(&key, &upload_id).await {
                    Err(e) if already_gone(&e) => return this.aborted(&upload_id),
                    Ok(()) => {
                        tracing::info!(key, upload_id, "aborted multipart upload");
                        return this.aborted(&upload_id);
                    }
                    Err(e) => tracing::debug!(key, upload_id, error = %e, "abort attempt failed"),
                }
            }
            tracing::error!(
                key,
                upload_id,
                "giving up aborting a multipart upload; its parts stay until a bucket \
                lifecycle rule for incomplete uploads removes them"
            );
            this.settle(&upload_id);
        });
    }

    /// The upload is gone from S3: settled, and no longer in the journal.
    fn aborted(&self, upload_id: &str) {
        self.record(UploadRecord::End(upload_id.to_owned()));
        self.settle(upload_id);
    }

    fn settle(&self, upload_id: &str) {
        self.aborting.lock().unwrap().remove(upload_id);
        self.settled.notify_waiters();
    }

    /// At unmount: waits up to `limit` for pending aborts, then logs every one left, by key and
    /// upload id. Returns how many were left.
    pub async fn finish(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let waiting = self.settled.notified();
            if self.aborting.lock().unwrap().is_empty() {
                return 0;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                break;
            }
        }
        let left = self.aborting.lock().unwrap().clone();
        for (upload_id, key) in &left {
            tracing::error!(
                key,
                upload_id,
                "multipart upload not aborted before unmount; abort it with `aws s3api abort-multipart-upload`, \
                or let a bucket lifecycle rule for incomplete uploads remove it"
            );
        }
        left.len()
    }
}

/// One multipart upload in progress. Parts upload concurrently in tasks; dropping it before
/// [`Multipart::complete`] or [`Multipart::abort`] aborts it in the background.
pub struct Multipart {
    uploads: Arc<Uploads>,
    key: String,
    id: String,
    next: i32,
    tasks: JoinSet<Result<CompletedPart, S3Error>>,
    done: Vec<CompletedPart>,
    /// Neither completed nor aborted yet.
    open: bool,
}

impl Multipart {
    /// The number the next part gets (1-based).
    pub fn next_number(&self) -> i32 {
        self.next
    }

    /// Collects parts that finished; the first failure among them, if any.
    pub fn check(&mut self) -> Result<(), S3Error> {
        while let Some(done) = self.tasks.try_join_next() {
            self.done.push(flatten(done, &self.key)?);
        }
        Ok(())
    }

    /// Uploads `body` as the next part, in a task; `hold` (write-budget permits, a concurrency
    /// gate) is released when the part is sent.
    pub fn upload(&mut self, body: Bytes, hold: Vec<OwnedSemaphorePermit>) {
        let number = self.take_number();
        let (store, key, id) = (Arc::clone(&self.uploads.store), self.key.clone(), self.id.clone());
        self.tasks.spawn(async move {
            let etag = store.upload_part(&key, &id, number, body).await?;
            drop(hold);
            Ok(CompletedPart { number, etag })
        });
    }

    /// Copies `range` of `source` server side as the next part, in a task.
    pub fn copy(&mut self, source: Arc<ObjectId>, range: Range<u64>, hold: Vec<OwnedSemaphorePermit>) {
        let number = self.take_number();
        let (store, key, id) = (Arc::clone(&self.uploads.store), self.key.clone(), self.id.clone());
        self.tasks.spawn(async move {
            let etag = store.upload_part_copy(&key, &id, number, &source, range).await?;
            drop(hold);
            Ok(CompletedPart { number, etag })
        });
    }

    fn take_number(&mut self) -> i32 {
        let n = self.next;
        self.next += 1;
        n
    }

    /// Waits for every part and completes the upload; returns the new object's ETag. On any
    /// failure the upload is aborted (see the module's abort policy) and nothing is visible.
    pub async fn complete(mut self) -> Result<String, S3Error> {
        let result = self.join_parts().await;
        let result = match result {
            Ok(parts) => complete_upload(self.uploads.store.as_ref(), &self.key, &self.id, parts).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(etag) => {
                self.open = false;
                self.uploads.record(UploadRecord::End(self.id.clone()));
                Ok(etag)
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Stops parts in flight and aborts the upload.
    pub async fn abort(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.open = false;
        self.uploads.abort(&self.key, &self.id).await;
    }

    async fn join_parts(&mut self) -> Result<Vec<CompletedPart>, S3Error> {
        let mut parts = std::mem::take(&mut self.done);
        let mut first_err = None;
        while let Some(done) = self.tasks.join_next().await {
            match flatten(done, &self.key) {
                Ok(p) => parts.push(p),
                Err(e) => {
                    first_err.get_or_insert(e);
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

impl Drop for Multipart {
    fn drop(&mut self) {
        if self.open {
            self.tasks.abort_all();
            self.uploads.abort_in_background(&self.key, &self.id);
        }
    }
}

/// An abort answered "no such upload": it was completed or aborted before; nothing is left.
fn already_gone(e: &S3Error) -> bool {
    matches!(e, S3Error::NotFound(_)) || matches!(e, S3Error::Service { code, .. } if code == "NoSuchUpload")
}

fn flatten(
    done: Result<Result<CompletedPart, S3Error>, tokio::task::JoinError>,
    key: &str,
) -> Result<CompletedPart, S3Error> {
    done.map_err(|e| S3Error::Body(key.to_owned(), format!("part upload task failed: {e}")))?
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
            if matches!(err, S3Error::Service { status: 200, .. }) {
                // A success the SDK cannot read (moto, for one, names the reply's root element
                // `CompleteMultipartUploadResponse`). Said once: it is how the server answers.
                static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        key,
                        error = %err,
                        "the S3 server answers CompleteMultipartUpload with HTTP 200 in a form the S3 SDK does \
                         not accept; every multipart upload is checked with a HEAD instead (said once)"
                    );
                } else {
                    tracing::debug!(
                        key,
                        "CompleteMultipartUpload answer unreadable; the HEAD shows the upload complete"
                    );
                }
            } else {
                tracing::warn!(
                    key,
                    error = %err,
                    "CompleteMultipartUpload reported an error, but the object has exactly the uploaded parts; \
                     treating the upload as complete"
                );
            }
            Ok(meta.etag.unwrap_or_default())
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
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
