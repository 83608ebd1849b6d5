//! [`FakeStore`]: an in-memory [`ObjectStore`] for unit tests of the cache and filesystem core.
//!
//! It follows S3's listing rules (lexicographic order, delimiter grouping, pagination) and
//! `If-Match`, counts requests, and can be told to fail calls, so logic can be tested without a
//! server. Integration tests never use it: they run against a real S3 server.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    CompletedPart, Copied, GetObject, ListPage, ObjectId, ObjectMeta, ObjectStart, ObjectStore, S3Error, UserMetadata,
};

const DEFAULT_MAX_KEYS: usize = 1000;
/// GET bodies are cut into chunks of this size, like a network stream.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct FakeObject {
    data: Bytes,
    etag: String,
    last_modified: SystemTime,
    metadata: UserMetadata,
}

#[derive(Debug, Default)]
struct FakeUpload {
    key: String,
    metadata: UserMetadata,
    parts: BTreeMap<i32, Bytes>,
}

/// In-memory bucket.
#[derive(Debug, Default)]
pub struct FakeStore {
    bucket: String,
    objects: Mutex<BTreeMap<String, FakeObject>>,
    uploads: Mutex<HashMap<String, FakeUpload>>,
    next_etag: AtomicU64,
    /// Number of GET requests served.
    pub gets: AtomicUsize,
    /// Bytes returned by GETs.
    pub bytes_served: AtomicU64,
    /// Number of HEAD requests served.
    pub heads: AtomicUsize,
    /// Number of list requests served.
    pub lists: AtomicUsize,
    /// The next this-many GETs fail with a 503.
    pub fail_gets: AtomicUsize,
    /// The next this-many uploads (PUT, part, complete) fail with a 503.
    pub fail_puts: AtomicUsize,
    /// Keys whose next HEAD fails with a 503 (each entry serves once).
    pub fail_heads_of: Mutex<Vec<String>>,
    /// PUTs wait this many milliseconds before storing (to widen races in tests).
    pub put_delay_ms: AtomicU64,
    /// CopyObject waits this many milliseconds before copying (to widen races in tests).
    pub copy_delay_ms: AtomicU64,
    /// Parts uploaded (by data or by copy).
    pub parts_uploaded: AtomicUsize,
    /// Parts copied server-side.
    pub parts_copied: AtomicUsize,
    omit_list_etags: bool,
}

impl FakeStore {
    pub fn new(bucket: &str) -> Self {
        FakeStore { bucket: bucket.to_owned(), ..Default::default() }
    }

    /// A store whose listings carry no ETags, like some S3-compatible servers.
    pub fn without_list_etags(bucket: &str) -> Self {
        FakeStore { bucket: bucket.to_owned(), omit_list_etags: true, ..Default::default() }
    }

    pub fn put(&self, key: &str, data: impl Into<Bytes>) {
        self.store(key, data.into(), UserMetadata::new());
    }

    /// Rewrites an object with the same bytes and new metadata, as another client's PUT of
    /// identical content does on S3: the ETag (the MD5 of the bytes) stays, the time moves.
    pub fn rewrite_same_bytes(&self, key: &str, metadata: UserMetadata) {
        let mut objects = self.objects.lock().unwrap();
        if let Some(o) = objects.get_mut(key) {
            o.metadata = metadata;
            o.last_modified = SystemTime::now();
        }
    }

    /// Stores an object with user metadata, as another S3 client would.
    pub fn put_with_metadata(&self, key: &str, data: impl Into<Bytes>, metadata: UserMetadata) {
        self.store(key, data.into(), metadata);
    }

    fn store(&self, key: &str, data: Bytes, metadata: UserMetadata) -> String {
        let n = self.next_etag.fetch_add(1, Ordering::Relaxed);
        let etag = format!("\"etag-{n}\"");
        let obj = FakeObject { data, etag: etag.clone(), last_modified: SystemTime::now(), metadata };
        self.objects.lock().unwrap().insert(key.to_owned(), obj);
        etag
    }

    /// The current bytes of an object, if any.
    pub fn data(&self, key: &str) -> Option<Bytes> {
        self.objects.lock().unwrap().get(key).map(|o| o.data.clone())
    }

    /// User metadata of an object, if any.
    pub fn metadata(&self, key: &str) -> Option<UserMetadata> {
        self.objects.lock().unwrap().get(key).map(|o| o.metadata.clone())
    }

    /// All keys, in order.
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn pending_uploads(&self) -> usize {
        self.uploads.lock().unwrap().len()
    }

    fn injected_put_failure(&self, operation: &'static str) -> Result<(), S3Error> {
        if self.fail_puts.load(Ordering::Relaxed) > 0 {
            self.fail_puts.fetch_sub(1, Ordering::Relaxed);
            return Err(S3Error::Service {
                operation,
                status: 503,
                code: "SlowDown".into(),
                message: "injected failure".into(),
            });
        }
        Ok(())
    }

    fn current(&self, source: &ObjectId) -> Result<FakeObject, S3Error> {
        let objects = self.objects.lock().unwrap();
        let obj = objects.get(&source.key).cloned().ok_or_else(|| S3Error::NotFound(source.key.clone()))?;
        if source.has_etag && source.version != obj.etag {
            return Err(S3Error::PreconditionFailed(source.key.clone()));
        }
        Ok(obj)
    }

    pub fn last_modified(&self, key: &str) -> Option<SystemTime> {
        self.objects.lock().unwrap().get(key).map(|o| o.last_modified)
    }

    pub fn delete(&self, key: &str) {
        self.objects.lock().unwrap().remove(key);
    }
}

fn meta(key: &str, o: &FakeObject) -> ObjectMeta {
    ObjectMeta {
        key: key.to_owned(),
        size: o.data.len() as u64,
        etag: Some(o.etag.clone()),
        last_modified: o.last_modified,
        user_metadata: Some(o.metadata.clone()),
    }
}

#[async_trait]
impl ObjectStore for FakeStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn check_access(&self, _prefix: &str) -> Result<(), S3Error> {
        Ok(())
    }

    async fn head_object(&self, key: &str) -> Result<ObjectMeta, S3Error> {
        self.heads.fetch_add(1, Ordering::Relaxed);
        let mut failing = self.fail_heads_of.lock().unwrap();
        if let Some(i) = failing.iter().position(|k| k == key) {
            failing.remove(i);
            return Err(S3Error::Service {
                operation: "HeadObject",
                status: 503,
                code: "SlowDown".into(),
                message: "injected failure".into(),
            });
        }
        drop(failing);
        let objects = self.objects.lock().unwrap();
        objects.get(key).map(|o| meta(key, o)).ok_or_else(|| S3Error::NotFound(key.to_owned()))
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let max = max_keys.map(|m| m.max(0) as usize).unwrap_or(DEFAULT_MAX_KEYS);
        let objects = self.objects.lock().unwrap();
        // Entries in key order: objects and (deduplicated) common prefixes.
        let mut entries: BTreeMap<String, Option<ObjectMeta>> = BTreeMap::new();
        for (key, obj) in objects.range(prefix.to_owned()..) {
            if !key.starts_with(prefix) {
                break;
            }
            let rest = &key[prefix.len()..];
            match delimiter.and_then(|d| rest.find(d).map(|i| (i, d))) {
                Some((i, d)) => {
                    entries.insert(format!("{prefix}{}", &rest[..i + d.len()]), None);
                }
                None => {
                    let mut m = meta(key, obj);
                    if self.omit_list_etags {
                        m.etag = None;
                    }
                    m.user_metadata = None;
                    entries.insert(key.clone(), Some(m));
                }
            }
        }
        let mut page = ListPage::default();
        let after = token.unwrap_or_default();
        let mut taken = 0;
        let mut iter = entries.into_iter().filter(|(k, _)| after.is_empty() || k.as_str() > after.as_str()).peekable();
        while taken < max {
            let Some((k, m)) = iter.next() else { break };
            taken += 1;
            match m {
                Some(m) => page.objects.push(m),
                None => page.common_prefixes.push(k.clone()),
            }
            if taken == max && iter.peek().is_some() {
                page.next_token = Some(k);
            }
        }
        Ok(page)
    }

    async fn get_range(&self, object: &ObjectId, range: Range<u64>) -> Result<GetObject, S3Error> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        if self.fail_gets.load(Ordering::Relaxed) > 0 {
            self.fail_gets.fetch_sub(1, Ordering::Relaxed);
            return Err(S3Error::Service {
                operation: "GetObject",
                status: 503,
                code: "SlowDown".into(),
                message: "injected failure".into(),
            });
        }
        let obj = {
            let objects = self.objects.lock().unwrap();
            objects.get(&object.key).cloned().ok_or_else(|| S3Error::NotFound(object.key.clone()))?
        };
        if object.has_etag && object.version != obj.etag {
            return Err(S3Error::PreconditionFailed(object.key.clone()));
        }
        let len = obj.data.len() as u64;
        if range.start >= len {
            return Err(S3Error::InvalidRange(object.key.clone()));
        }
        let end = range.end.min(len);
        let data = obj.data.slice(range.start as usize..end as usize);
        self.bytes_served.fetch_add(data.len() as u64, Ordering::Relaxed);
        let chunks: Vec<Result<Bytes, S3Error>> =
            (0..data.len()).step_by(CHUNK).map(|i| Ok(data.slice(i..(i + CHUNK).min(data.len())))).collect();
        Ok(GetObject { etag: Some(obj.etag), body: futures::stream::iter(chunks).boxed() })
    }

    async fn get_object_start(&self, key: &str, len: u64) -> Result<ObjectStart, S3Error> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let objects = self.objects.lock().unwrap();
        let obj = objects.get(key).ok_or_else(|| S3Error::NotFound(key.to_owned()))?;
        let data = obj.data.slice(..(len as usize).min(obj.data.len()));
        self.bytes_served.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(ObjectStart { meta: meta(key, obj), data })
    }

    async fn put_object(&self, key: &str, body: Bytes, metadata: &UserMetadata) -> Result<String, S3Error> {
        self.injected_put_failure("PutObject")?;
        let delay = self.put_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        Ok(self.store(key, body, metadata.clone()))
    }

    async fn create_multipart_upload(&self, key: &str, metadata: &UserMetadata) -> Result<String, S3Error> {
        let id = format!("upload-{}", self.next_etag.fetch_add(1, Ordering::Relaxed));
        let upload = FakeUpload { key: key.to_owned(), metadata: metadata.clone(), parts: BTreeMap::new() };
        self.uploads.lock().unwrap().insert(id.clone(), upload);
        Ok(id)
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<String, S3Error> {
        self.injected_put_failure("UploadPart")?;
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads.get_mut(upload_id).ok_or_else(|| S3Error::NotFound(key.to_owned()))?;
        upload.parts.insert(number, body);
        self.parts_uploaded.fetch_add(1, Ordering::Relaxed);
        Ok(format!("\"part-{number}\""))
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &ObjectId,
        range: Range<u64>,
    ) -> Result<String, S3Error> {
        self.injected_put_failure("UploadPartCopy")?;
        let src = self.current(source)?;
        if range.end > src.data.len() as u64 || range.start >= range.end {
            return Err(S3Error::InvalidRange(source.key.clone()));
        }
        let body = src.data.slice(range.start as usize..range.end as usize);
        let mut uploads = self.uploads.lock().unwrap();
        let upload = uploads.get_mut(upload_id).ok_or_else(|| S3Error::NotFound(key.to_owned()))?;
        upload.parts.insert(number, body);
        self.parts_uploaded.fetch_add(1, Ordering::Relaxed);
        self.parts_copied.fetch_add(1, Ordering::Relaxed);
        Ok(format!("\"part-{number}\""))
    }

    async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<String, S3Error> {
        self.injected_put_failure("CompleteMultipartUpload")?;
        let upload = self.uploads.lock().unwrap().remove(upload_id).ok_or_else(|| S3Error::NotFound(key.to_owned()))?;
        let mut data = Vec::new();
        let last = parts.len().saturating_sub(1);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 && p.number <= parts[i - 1].number {
                return Err(S3Error::Service {
                    operation: "CompleteMultipartUpload",
                    status: 400,
                    code: "InvalidPartOrder".into(),
                    message: "parts must be in ascending order".into(),
                });
            }
            let part = upload.parts.get(&p.number).ok_or_else(|| S3Error::Service {
                operation: "CompleteMultipartUpload",
                status: 400,
                code: "InvalidPart".into(),
                message: format!("part {} was not uploaded", p.number),
            })?;
            if i < last && part.len() < 5 << 20 {
                return Err(S3Error::Service {
                    operation: "CompleteMultipartUpload",
                    status: 400,
                    code: "EntityTooSmall".into(),
                    message: format!("part {} is {} bytes", p.number, part.len()),
                });
            }
            data.extend_from_slice(part);
        }
        Ok(self.store(&upload.key, data.into(), upload.metadata))
    }

    async fn abort_multipart_upload(&self, _key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.uploads.lock().unwrap().remove(upload_id);
        Ok(())
    }

    async fn copy_object(
        &self,
        source: &ObjectId,
        dest_key: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<Copied, S3Error> {
        self.injected_put_failure("CopyObject")?;
        let delay = self.copy_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let src = self.current(source)?;
        let metadata = metadata.cloned().unwrap_or(src.metadata);
        // As S3 does for a single-part object: the copy keeps the ETag, not the time.
        let last_modified = SystemTime::now();
        let obj = FakeObject { data: src.data, etag: src.etag.clone(), last_modified, metadata };
        self.objects.lock().unwrap().insert(dest_key.to_owned(), obj);
        Ok(Copied { etag: src.etag, last_modified: Some(last_modified) })
    }

    async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_groups_and_pages() {
        let s = FakeStore::new("b");
        for k in ["a/1", "a/2", "a/d/x", "a/e/y", "a/e/z", "b"] {
            s.put(k, "x");
        }
        let p = s.list_page("a/", Some("/"), None, Some(2)).await.unwrap();
        assert_eq!(p.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(), ["a/1", "a/2"]);
        let p = s.list_page("a/", Some("/"), p.next_token, Some(2)).await.unwrap();
        assert_eq!(p.common_prefixes, ["a/d/", "a/e/"]);
        assert!(p.next_token.is_none());
    }
}
