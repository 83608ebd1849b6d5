//! [`FakeStore`]: an in-memory [`ObjectStore`] for unit tests of the cache and filesystem core.
//!
//! It follows S3's listing rules (lexicographic order, delimiter grouping, pagination) and
//! `If-Match`, counts requests, and can be told to fail calls, so logic can be tested without a
//! server. Integration tests never use it: they run against a real S3 server.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{GetObject, ListPage, ObjectId, ObjectMeta, ObjectStore, S3Error};

const DEFAULT_MAX_KEYS: usize = 1000;
/// GET bodies are cut into chunks of this size, like a network stream.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct FakeObject {
    data: Bytes,
    etag: String,
    last_modified: SystemTime,
}

/// In-memory bucket.
#[derive(Debug, Default)]
pub struct FakeStore {
    bucket: String,
    objects: Mutex<BTreeMap<String, FakeObject>>,
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
    omit_list_etags: bool,
}

impl FakeStore {
    pub fn new(bucket: &str) -> Self {
        FakeStore {
            bucket: bucket.to_owned(),
            ..Default::default()
        }
    }

    /// A store whose listings carry no ETags, like some S3-compatible servers.
    pub fn without_list_etags(bucket: &str) -> Self {
        FakeStore {
            bucket: bucket.to_owned(),
            omit_list_etags: true,
            ..Default::default()
        }
    }

    pub fn put(&self, key: &str, data: impl Into<Bytes>) {
        let n = self.next_etag.fetch_add(1, Ordering::Relaxed);
        let obj = FakeObject {
            data: data.into(),
            etag: format!("\"etag-{n}\""),
            last_modified: SystemTime::now(),
        };
        self.objects.lock().unwrap().insert(key.to_owned(), obj);
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
        let objects = self.objects.lock().unwrap();
        objects
            .get(key)
            .map(|o| meta(key, o))
            .ok_or_else(|| S3Error::NotFound(key.to_owned()))
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let max = max_keys
            .map(|m| m.max(0) as usize)
            .unwrap_or(DEFAULT_MAX_KEYS);
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
                    entries.insert(key.clone(), Some(m));
                }
            }
        }
        let mut page = ListPage::default();
        let after = token.unwrap_or_default();
        let mut taken = 0;
        let mut iter = entries
            .into_iter()
            .filter(|(k, _)| after.is_empty() || k.as_str() > after.as_str())
            .peekable();
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
            objects
                .get(&object.key)
                .cloned()
                .ok_or_else(|| S3Error::NotFound(object.key.clone()))?
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
        self.bytes_served
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let chunks: Vec<Result<Bytes, S3Error>> = (0..data.len())
            .step_by(CHUNK)
            .map(|i| Ok(data.slice(i..(i + CHUNK).min(data.len()))))
            .collect();
        Ok(GetObject {
            etag: Some(obj.etag),
            body: futures::stream::iter(chunks).boxed(),
        })
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
        assert_eq!(
            p.objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        let p = s
            .list_page("a/", Some("/"), p.next_token, Some(2))
            .await
            .unwrap();
        assert_eq!(p.common_prefixes, ["a/d/", "a/e/"]);
        assert!(p.next_token.is_none());
    }
}
