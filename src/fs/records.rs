//! Directory attribute records: what lets a LIST vouch for attributes, so `ls -l` costs no
//! request per entry.
//!
//! S3's LIST returns key, size and ETag, but no user metadata. Each directory s3csi writes in
//! gets one hidden object, `<dir>/.s3csi-attrs`, mapping entry names to the attributes s3csi
//! stored with them (the same encoded keys as the object's own metadata). A listing reads it with
//! one GET beside the LIST pages:
//! - a file entry applies only while the listed ETag and size still match: an object another
//!   client replaced is never described by an old record;
//! - a name missing from an existing record is looked up with a HEAD, as without records;
//! - a directory without any record holds no s3csi attributes at all (written by other clients):
//!   its entries take the mount defaults with no request.
//!
//! The objects' own metadata stays the source of truth (every HEAD and every open reads it).
//! Records are written behind: changes are queued per directory and merged into the stored record
//! (read, merge, write) at most once per [`FLUSH_INTERVAL`], and at unmount; a failed read or write
//! keeps the changes queued for the next flush. A record update lost to a crash or to two mounts
//! writing the same record at once only costs HEADs later. A directory entry cannot be checked
//! against a listing (a delimited LIST shows no marker), so a lookup that finds the marker gone
//! drops the entry on servers that keep markers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::s3::{ObjectId, ObjectStore, S3Error, UserMetadata};

/// Name of the record object in each directory; hidden from listings, cannot be created.
pub const RECORD_NAME: &str = ".s3csi-attrs";
/// How often queued record changes are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Largest record read (a 16 MiB record describes well over 100,000 entries); a larger or
/// unreadable one is ignored, which only costs HEADs.
const MAX_RECORD_BYTES: u64 = 16 << 20;
/// Flushes in a row that may fail for one directory before its queued changes are dropped.
const MAX_FLUSH_ATTEMPTS: u32 = 5;

/// What the record says about one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    /// ETag and size of the object it describes (absent for a directory, `name/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The object's Last-Modified in whole seconds, when known (a CopyObject reports it; a PUT
    /// does not). A metadata-only change (chmod through another mount, or by another client)
    /// keeps the ETag of a single-part object but not its Last-Modified.
    #[serde(default, rename = "lm", skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<i64>,
    /// The object's s3csi metadata (`s3csi-mode`, `-uid`, `-gid`, `-mtime`, `-type`, ...).
    pub meta: UserMetadata,
}

/// One directory's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirRecord {
    pub entries: BTreeMap<String, RecordEntry>,
}

impl DirRecord {
    /// The attributes for a listed file (ETag, size and Last-Modified from the listing), if
    /// the record vouches for this exact object.
    pub fn file(&self, name: &str, etag: Option<&str>, size: u64, listed: SystemTime) -> Option<&RecordEntry> {
        self.entries.get(name).filter(|e| {
            e.size == Some(size)
                && e.etag.is_some()
                && e.etag.as_deref() == etag
                && e.last_modified.is_none_or(|lm| Some(lm) == unix_secs(listed))
        })
    }

    /// The attributes recorded for a subdirectory `name`.
    pub fn dir(&self, name: &str) -> Option<&RecordEntry> {
        self.entries.get(&format!("{name}/"))
    }
}

/// Whole seconds since the epoch (listings and copies report Last-Modified to the second or
/// the millisecond; whole seconds compare alike).
pub fn unix_secs(t: SystemTime) -> Option<i64> {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok(),
        Err(e) => i64::try_from(e.duration().as_secs_f64().ceil() as u64).ok().map(|s| -s),
    }
}

/// Record key for a subdirectory entry.
pub fn dir_entry_name(name: &str) -> String {
    format!("{name}/")
}

/// Queued changes: directory key -> entry name -> new entry (None: removed).
type Pending = HashMap<String, BTreeMap<String, Option<RecordEntry>>>;

/// Reads records and writes queued changes behind.
pub struct Records<S> {
    store: Arc<S>,
    pending: Mutex<Pending>,
    /// Serializes flushes, so two never merge into the same record at once.
    flushing: tokio::sync::Mutex<()>,
    /// Directories whose last flushes failed, with how many in a row.
    failures: Mutex<HashMap<String, u32>>,
}

impl<S: ObjectStore> Records<S> {
    pub fn new(store: Arc<S>) -> Self {
        Records {
            store,
            pending: Mutex::new(HashMap::new()),
            flushing: tokio::sync::Mutex::new(()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn key(dir_key: &str) -> String {
        format!("{dir_key}{RECORD_NAME}")
    }

    /// The record of a directory as stored, with the changes still queued here applied.
    /// `None` when the directory has none. A record S3 could not return counts as an empty one:
    /// it vouches for nothing, so every entry is looked up with a HEAD (taking "no record" would
    /// show every entry with the mount defaults).
    pub async fn load(&self, dir_key: &str) -> Option<DirRecord> {
        let stored = self.fetch(dir_key).await.unwrap_or_else(|e| {
            tracing::debug!(dir_key, error = %e, "cannot read the directory attribute record; using HEADs");
            Some(DirRecord::default())
        });
        let pending = self.pending.lock().unwrap().get(dir_key).cloned();
        match (stored, pending) {
            (stored, None) => stored,
            (stored, Some(changes)) => {
                let mut r = stored.unwrap_or_default();
                apply(&mut r, changes);
                Some(r)
            }
        }
    }

    /// The stored record: `Ok(None)` when there is none or it is unreadable (it is rewritten
    /// whole with the next change), an error when S3 could not say.
    async fn fetch(&self, dir_key: &str) -> Result<Option<DirRecord>, S3Error> {
        let key = Self::key(dir_key);
        let object = ObjectId { key: key.clone(), version: String::new(), has_etag: false };
        let get = match self.store.get_range(&object, 0..MAX_RECORD_BYTES).await {
            Ok(g) => g,
            Err(S3Error::NotFound(_)) | Err(S3Error::InvalidRange(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        use futures::StreamExt;
        let mut body = get.body;
        let mut data = Vec::new();
        while let Some(chunk) = body.next().await {
            data.extend_from_slice(&chunk?);
        }
        match serde_json::from_slice::<DirRecord>(&data) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring an unreadable directory attribute record; it is rewritten \
                    with the next change in that directory");
                Ok(None)
            }
        }
    }

    /// Queues a change of entry `name` in the directory with key `dir_key`.
    pub fn note(&self, dir_key: &str, name: &str, entry: Option<RecordEntry>) {
        self.pending.lock().unwrap().entry(dir_key.to_owned()).or_default().insert(name.to_owned(), entry);
    }

    /// Holds off flushes while a directory's keys move or go: a flush that read the queue
    /// before must not write a record back into a directory removed or renamed meanwhile.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flushing.lock().await
    }

    /// Forgets queued changes of a directory that is gone (removed or renamed away), and of
    /// everything under it. Call while holding [`Records::exclusive`].
    pub fn forget_dir(&self, dir_key: &str) {
        self.pending.lock().unwrap().retain(|k, _| !k.starts_with(dir_key));
        self.failures.lock().unwrap().retain(|k, _| !k.starts_with(dir_key));
    }

    /// Moves queued changes of a directory renamed from `old` to `new` (and of everything under
    /// it) to the new keys: the stored records move with the rename's copies, the queued ones
    /// here. Call while holding [`Records::exclusive`].
    pub fn move_dir(&self, old: &str, new: &str) {
        let mut pending = self.pending.lock().unwrap();
        let moving: Vec<String> = pending.keys().filter(|k| k.starts_with(old)).cloned().collect();
        for key in moving {
            if let Some(changes) = pending.remove(&key) {
                pending.insert(format!("{new}{}", &key[old.len()..]), changes);
            }
        }
    }

    /// Deletes a directory's record object (the directory is being removed).
    pub async fn delete(&self, dir_key: &str) -> Result<(), S3Error> {
        let _no_flush = self.exclusive().await;
        self.forget_dir(dir_key);
        self.store.delete_object(&Self::key(dir_key)).await
    }

    /// Reads a directory's stored record, applies `changes` and writes it back (or deletes it
    /// when it became empty).
    async fn merge_into_stored(
        &self,
        dir_key: &str,
        changes: &BTreeMap<String, Option<RecordEntry>>,
    ) -> Result<(), S3Error> {
        let mut record = self.fetch(dir_key).await?.unwrap_or_default();
        apply(&mut record, changes.clone());
        let key = Self::key(dir_key);
        if record.entries.is_empty() {
            self.store.delete_object(&key).await
        } else {
            let body = Bytes::from(serde_json::to_vec(&record).expect("a record always serializes"));
            self.store.put_object(&key, body, &UserMetadata::new()).await.map(|_| ())
        }
    }

    /// Writes every queued change: per directory, read the stored record, merge, write it (or
    /// delete it when it became empty). A directory whose record cannot be read or written keeps
    /// its changes queued for the next flush (a record merged into an unread one would drop the
    /// other entries); after [`MAX_FLUSH_ATTEMPTS`] failures in a row they are dropped with a
    /// warning, which only costs HEADs later (and directory attributes shown from the record
    /// until a lookup finds its marker).
    pub async fn flush(&self) {
        let _one = self.flushing.lock().await;
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for (dir_key, changes) in pending {
            let key = Self::key(&dir_key);
            let Err(e) = self.merge_into_stored(&dir_key, &changes).await else {
                self.failures.lock().unwrap().remove(&dir_key);
                continue;
            };
            let attempts = {
                let mut failures = self.failures.lock().unwrap();
                let attempts = failures.entry(dir_key.clone()).or_default();
                *attempts += 1;
                let attempts = *attempts;
                if attempts >= MAX_FLUSH_ATTEMPTS {
                    failures.remove(&dir_key);
                }
                attempts
            };
            if attempts >= MAX_FLUSH_ATTEMPTS {
                tracing::warn!(key, error = %e, attempts, "giving up on updating the directory attribute record; \
                    listings there use HEADs until the next change");
                continue;
            }
            tracing::debug!(key, error = %e, "cannot update the directory attribute record; retrying");
            // Changes queued since this flush began are newer: they win.
            let mut pending = self.pending.lock().unwrap();
            let queued = pending.entry(dir_key).or_default();
            for (name, entry) in changes {
                queued.entry(name).or_insert(entry);
            }
        }
    }
}

fn apply(record: &mut DirRecord, changes: BTreeMap<String, Option<RecordEntry>>) {
    for (name, entry) in changes {
        match entry {
            Some(e) => {
                record.entries.insert(name, e);
            }
            None => {
                record.entries.remove(&name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::fake::FakeStore;
    use std::sync::atomic::Ordering;

    fn entry(etag: &str, size: u64, uid: &str) -> RecordEntry {
        RecordEntry {
            etag: Some(etag.into()),
            size: Some(size),
            last_modified: None,
            meta: [("s3csi-uid".to_owned(), uid.to_owned())].into(),
        }
    }

    #[tokio::test]
    async fn changes_merge_into_the_stored_record_and_an_empty_one_is_deleted() {
        let store = Arc::new(FakeStore::new("b"));
        let a = Records::new(Arc::clone(&store));
        let b = Records::new(Arc::clone(&store));
        a.note("d/", "x", Some(entry("e1", 1, "1000")));
        assert_eq!(
            a.load("d/").await.unwrap().file("x", Some("e1"), 1, SystemTime::UNIX_EPOCH).unwrap().meta["s3csi-uid"],
            "1000"
        );
        assert!(b.load("d/").await.is_none(), "not written yet");
        a.flush().await;
        // Another mount adds its own entry without losing ours.
        b.note("d/", "y", Some(entry("e2", 2, "1001")));
        b.flush().await;
        let r = a.load("d/").await.unwrap();
        assert!(
            r.file("x", Some("e1"), 1, SystemTime::UNIX_EPOCH).is_some()
                && r.file("y", Some("e2"), 2, SystemTime::UNIX_EPOCH).is_some()
        );
        // A replaced object (other ETag or size) is not vouched for.
        assert!(
            r.file("x", Some("e9"), 1, SystemTime::UNIX_EPOCH).is_none()
                && r.file("x", Some("e1"), 5, SystemTime::UNIX_EPOCH).is_none()
        );
        a.note("d/", "x", None);
        a.note("d/", "y", None);
        a.flush().await;
        assert!(store.keys().is_empty(), "{:?}", store.keys());
    }

    #[tokio::test]
    async fn failed_flushes_keep_changes_queued_and_never_clobber_the_stored_record() {
        let store = Arc::new(FakeStore::new("b"));
        let r = Records::new(Arc::clone(&store));
        r.note("d/", "x", Some(entry("e1", 1, "1")));
        r.flush().await;
        // The read fails: nothing is written (an empty merge would drop "x"), the change waits.
        r.note("d/", "y", Some(entry("e2", 2, "2")));
        store.fail_gets.store(1, Ordering::Relaxed);
        r.flush().await;
        let stored = Records::new(Arc::clone(&store)).load("d/").await.unwrap();
        assert_eq!(stored.entries.keys().collect::<Vec<_>>(), ["x"]);
        // The write fails: still queued; a change noted meanwhile wins over the retried one.
        store.fail_puts.store(1, Ordering::Relaxed);
        r.flush().await;
        r.note("d/", "y", Some(entry("e3", 3, "3")));
        r.flush().await;
        let stored = Records::new(Arc::clone(&store)).load("d/").await.unwrap();
        assert_eq!(stored.entries.keys().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(stored.entries["y"].etag.as_deref(), Some("e3"));
        // A store that keeps failing: the changes are dropped after the last attempt.
        r.note("d/", "z", Some(entry("e4", 4, "4")));
        store.fail_puts.store(MAX_FLUSH_ATTEMPTS as usize, Ordering::Relaxed);
        for _ in 0..MAX_FLUSH_ATTEMPTS {
            r.flush().await;
        }
        assert!(r.pending.lock().unwrap().is_empty());
        assert!(r.failures.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_record_s3_cannot_return_vouches_for_nothing() {
        let store = Arc::new(FakeStore::new("b"));
        let r = Records::new(Arc::clone(&store));
        r.note("d/", "x", Some(entry("e", 1, "7")));
        r.flush().await;
        store.fail_gets.store(1, std::sync::atomic::Ordering::Relaxed);
        let record = r.load("d/").await.expect("not taken for a directory without a record");
        assert!(record.entries.is_empty(), "{record:?}");
        assert!(r.load("d/").await.unwrap().file("x", Some("e"), 1, SystemTime::UNIX_EPOCH).is_some());
    }

    #[tokio::test]
    async fn an_unreadable_record_is_ignored() {
        let store = Arc::new(FakeStore::new("b"));
        store.put("d/.s3csi-attrs", b"{not json".to_vec());
        let r = Records::new(Arc::clone(&store));
        assert!(r.load("d/").await.is_none());
        r.note("d/", "x", Some(entry("e", 1, "7")));
        r.flush().await;
        assert!(
            r.load("d/").await.unwrap().file("x", Some("e"), 1, SystemTime::UNIX_EPOCH).is_some(),
            "rewritten whole"
        );
    }
}
