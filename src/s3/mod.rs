//! The S3 layer: a bucket-scoped [`ObjectStore`] trait and the types it speaks.
//!
//! The filesystem and cache only see this trait, so they run unchanged against AWS S3, any
//! S3-compatible server ([`aws::AwsStore`]) or the in-memory [`fake::FakeStore`] used by unit tests.
//! Every error is an [`S3Error`] variant; callers branch on the variant, never on message text.

pub mod admin;
pub mod aws;
pub mod fake;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// Metadata of one object, from HEAD or from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Some servers omit ETags from listings; HEAD always tries to fill it.
    pub etag: Option<String>,
    pub last_modified: SystemTime,
    /// User metadata (`x-amz-meta-*`), known from HEAD only; `None` when from a listing.
    pub user_metadata: Option<UserMetadata>,
}

/// User metadata of an object, lower-case names without the `x-amz-meta-` prefix.
pub type UserMetadata = BTreeMap<String, String>;

/// The object a CopyObject made. A copy of a single-part object keeps its ETag (the MD5 of the
/// bytes), so only `last_modified` tells a metadata change apart in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub etag: String,
    pub last_modified: Option<SystemTime>,
}

/// One completed part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    pub number: i32,
    pub etag: String,
}

/// One page of a `ListObjectsV2` call.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub common_prefixes: Vec<String>,
    pub next_token: Option<String>,
}

/// One version of one object: the unit the block cache is keyed on.
///
/// `version` is the ETag when the server gives one; otherwise it is derived from size and
/// modification time, which is weaker but still changes when the object is overwritten.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub key: String,
    pub version: String,
    /// Whether `version` is a real ETag that can be sent as `If-Match`.
    pub has_etag: bool,
}

impl ObjectId {
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        match &meta.etag {
            Some(etag) => ObjectId { key: meta.key.clone(), version: etag.clone(), has_etag: true },
            None => {
                let nanos =
                    meta.last_modified.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
                ObjectId {
                    key: meta.key.clone(),
                    version: format!("size={};mtime={nanos}", meta.size),
                    has_etag: false,
                }
            }
        }
    }

    /// The `If-Match` value to send with a GET, when there is a real ETag.
    pub fn if_match(&self) -> Option<&str> {
        self.has_etag.then_some(self.version.as_str())
    }
}

/// The body of a ranged GET, delivered in chunks as it arrives.
pub struct GetObject {
    pub etag: Option<String>,
    pub body: BoxStream<'static, Result<Bytes, S3Error>>,
}

impl fmt::Debug for GetObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetObject").field("etag", &self.etag).finish_non_exhaustive()
    }
}

/// What [`ObjectStore::get_object_start`] returns.
#[derive(Debug, Clone)]
pub struct ObjectStart {
    pub meta: ObjectMeta,
    pub data: Bytes,
}

/// Everything that can go wrong talking to S3, after the client's own retries.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum S3Error {
    #[error("bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("no object at key {0:?}")]
    NotFound(String),
    #[error("access denied ({0}); check the credentials and the bucket policy")]
    AccessDenied(String),
    #[error("object {0:?} changed on the server (ETag no longer matches)")]
    PreconditionFailed(String),
    #[error("requested range is not satisfiable for {0:?}")]
    InvalidRange(String),
    #[error("cannot reach the S3 endpoint: {0}")]
    Unreachable(String),
    #[error("S3 {operation} failed with HTTP {status} {code}: {message}")]
    Service { operation: &'static str, status: u16, code: String, message: String },
    #[error("S3 response body for {0:?} broke off: {1}")]
    Body(String, String),
}

impl S3Error {
    /// Transient errors that a caller may retry on its own (the SDK already retried the request).
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Body(..) | S3Error::Unreachable(_) => true,
            S3Error::Service { status, .. } => *status >= 500 || *status == 429,
            S3Error::NoSuchBucket(_)
            | S3Error::NotFound(_)
            | S3Error::AccessDenied(_)
            | S3Error::PreconditionFailed(_)
            | S3Error::InvalidRange(_) => false,
        }
    }
}

/// A bucket (optionally confined to a prefix by the caller) as the filesystem sees it.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// The bucket this store talks to, for messages.
    fn bucket(&self) -> &str;

    /// Checks that the bucket exists and the credentials can list it.
    async fn check_access(&self, prefix: &str) -> Result<(), S3Error>;

    async fn head_object(&self, key: &str) -> Result<ObjectMeta, S3Error>;

    /// One page of `ListObjectsV2`.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error>;

    /// A ranged GET of `range` (end exclusive, non-empty). When `object.has_etag`, the request
    /// carries `If-Match` and a changed object fails with [`S3Error::PreconditionFailed`].
    async fn get_range(&self, object: &ObjectId, range: Range<u64>) -> Result<GetObject, S3Error>;

    /// The first `len` bytes (fewer if the object is shorter) of the current object at `key`
    /// together with its metadata, in one GET: what a HEAD and a first GET would say, in one
    /// round trip. `meta.size` is the size of the whole object.
    async fn get_object_start(&self, key: &str, len: u64) -> Result<ObjectStart, S3Error>;

    /// Uploads a whole object in one request; returns its ETag.
    async fn put_object(&self, key: &str, body: Bytes, metadata: &UserMetadata) -> Result<String, S3Error>;

    /// Starts a multipart upload; returns the upload id.
    async fn create_multipart_upload(&self, key: &str, metadata: &UserMetadata) -> Result<String, S3Error>;

    /// Uploads part `number` (1-based) of an upload; returns the part's ETag.
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<String, S3Error>;

    /// Copies `range` of `source` server-side as part `number`; the source must still have the
    /// given version (`x-amz-copy-source-if-match`).
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &ObjectId,
        range: Range<u64>,
    ) -> Result<String, S3Error>;

    /// Commits an upload; returns the new object's ETag.
    async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<String, S3Error>;

    /// Abandons an upload so none of its parts become visible or billable.
    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error>;

    /// Server-side copy of a whole object up to 5 GiB. With `metadata`, the copy gets that
    /// metadata instead of the source's.
    async fn copy_object(
        &self,
        source: &ObjectId,
        dest_key: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<Copied, S3Error>;

    /// Deletes one object; deleting a missing key succeeds (as in S3).
    async fn delete_object(&self, key: &str) -> Result<(), S3Error>;
}
