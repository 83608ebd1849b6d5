//! Bucket-level S3 operations for the CSI controller: create and delete buckets, read and write
//! the small volume marker object, and purge everything under a prefix (objects, versions,
//! delete markers and pending multipart uploads).
//!
//! Servers differ in what they implement. Listing versions or pending uploads may answer
//! `NotImplemented`; the purge then falls back to plain listings and logs once what it could
//! not check, instead of failing the deletion of an otherwise empty bucket.

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration, Delete, ObjectIdentifier};
use bytes::Bytes;

use super::S3Error;
use super::aws::map_sdk_error;

/// Most keys a single `DeleteObjects` request may name (an S3 limit).
pub const DELETE_BATCH: usize = 1000;

/// Result of asking for a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The bucket was created by this call.
    Created,
    /// The bucket already existed and belongs to the caller.
    AlreadyOwned,
}

/// One object version (or the only version, on servers without versioning) to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRef {
    pub key: String,
    pub version_id: Option<String>,
}

/// What a purge removed, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeStats {
    pub objects: u64,
    pub uploads: u64,
    /// Whether the server could list versions; false means only current objects were seen.
    pub versions_listed: bool,
}

/// Bucket administration through one client (one set of credentials and one endpoint).
#[derive(Clone, Debug)]
pub struct BucketAdmin {
    client: Client,
}

fn is_not_implemented(e: &S3Error) -> bool {
    matches!(e, S3Error::Service { status, code, .. } if *status == 501 || code == "NotImplemented")
}

impl BucketAdmin {
    pub fn new(client: Client) -> Self {
        BucketAdmin { client }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the bucket exists (and the credentials may see it).
    pub async fn bucket_exists(&self, bucket: &str) -> Result<bool, S3Error> {
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(true),
            Err(e) => match map_sdk_error("HeadBucket", bucket, "", e) {
                S3Error::NoSuchBucket(_) | S3Error::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Creates a bucket in the client's region; a bucket the caller already owns is fine.
    pub async fn create_bucket(&self, bucket: &str) -> Result<CreateOutcome, S3Error> {
        let region = self.client.config().region().map(|r| r.as_ref().to_owned());
        let mut req = self.client.create_bucket().bucket(bucket);
        if let Some(region) = region.filter(|r| r != "us-east-1") {
            req = req.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region.as_str()))
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(e) => match map_sdk_error("CreateBucket", bucket, "", e) {
                S3Error::Service { code, .. } if code == "BucketAlreadyOwnedByYou" => Ok(CreateOutcome::AlreadyOwned),
                other => Err(other),
            },
        }
    }

    pub async fn delete_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        match self.client.delete_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match map_sdk_error("DeleteBucket", bucket, "", e) {
                S3Error::NoSuchBucket(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Names of all buckets the credentials can see, in the server's (lexicographic) order.
    pub async fn list_buckets(&self) -> Result<Vec<String>, S3Error> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_buckets()
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map_sdk_error("ListBuckets", "", "", e))?;
            names.extend(out.buckets().iter().filter_map(|b| b.name().map(str::to_owned)));
            match out.continuation_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(names)
    }

    /// Reads a small object whole; `None` when it does not exist.
    pub async fn get_small(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, S3Error> {
        let out = match self.client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) => {
                return match map_sdk_error("GetObject", bucket, key, e) {
                    S3Error::NotFound(_) => Ok(None),
                    other => Err(other),
                };
            }
        };
        let body = out.body.collect().await.map_err(|e| S3Error::Body(key.to_owned(), e.to_string()))?;
        Ok(Some(body.into_bytes()))
    }

    pub async fn put_small(&self, bucket: &str, key: &str, body: Bytes, content_type: &str) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error("PutObject", bucket, key, e))
    }

    /// Up to `max` current keys under `prefix` (a quick emptiness or existence check).
    pub async fn first_keys(&self, bucket: &str, prefix: &str, max: i32) -> Result<Vec<String>, S3Error> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .max_keys(max)
            .send()
            .await
            .map_err(|e| map_sdk_error("ListObjectsV2", bucket, prefix, e))?;
        Ok(out.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect())
    }

    /// The common prefixes (`a/`, `b/`) directly under the bucket root.
    pub async fn top_level_prefixes(&self, bucket: &str) -> Result<Vec<String>, S3Error> {
        let mut prefixes = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map_sdk_error("ListObjectsV2", bucket, "", e))?;
            prefixes.extend(out.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_owned)));
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        Ok(prefixes)
    }

    /// One page of versions and delete markers under `prefix`, or `None` if the server does not
    /// implement `ListObjectVersions`.
    async fn version_page(&self, bucket: &str, prefix: &str) -> Result<Option<Vec<VersionRef>>, S3Error> {
        let out = match self.client.list_object_versions().bucket(bucket).prefix(prefix).send().await {
            Ok(out) => out,
            Err(e) => {
                let e = map_sdk_error("ListObjectVersions", bucket, prefix, e);
                return if is_not_implemented(&e) { Ok(None) } else { Err(e) };
            }
        };
        let mut page: Vec<VersionRef> = out
            .versions()
            .iter()
            .filter_map(|v| {
                v.key().map(|k| VersionRef { key: k.to_owned(), version_id: v.version_id().map(str::to_owned) })
            })
            .collect();
        page.extend(out.delete_markers().iter().filter_map(|m| {
            m.key().map(|k| VersionRef { key: k.to_owned(), version_id: m.version_id().map(str::to_owned) })
        }));
        Ok(Some(page))
    }

    /// One page of current keys under `prefix`.
    async fn object_page(&self, bucket: &str, prefix: &str) -> Result<Vec<VersionRef>, S3Error> {
        let keys = self.first_keys(bucket, prefix, DELETE_BATCH as i32).await?;
        Ok(keys.into_iter().map(|key| VersionRef { key, version_id: None }).collect())
    }

    /// Deletes up to [`DELETE_BATCH`] versions in one request.
    pub async fn delete_batch(&self, bucket: &str, batch: &[VersionRef]) -> Result<(), S3Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let objects = batch
            .iter()
            .map(|v| ObjectIdentifier::builder().key(&v.key).set_version_id(v.version_id.clone()).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| S3Error::Service {
                operation: "DeleteObjects",
                status: 0,
                code: String::new(),
                message: e.to_string(),
            })?;
        let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().map_err(|e| {
            S3Error::Service { operation: "DeleteObjects", status: 0, code: String::new(), message: e.to_string() }
        })?;
        let out = self
            .client
            .delete_objects()
            .bucket(bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| map_sdk_error("DeleteObjects", bucket, &batch[0].key, e))?;
        if let Some(err) = out.errors().first() {
            return Err(S3Error::Service {
                operation: "DeleteObjects",
                status: 0,
                code: err.code().unwrap_or_default().to_owned(),
                message: format!(
                    "{} of {} keys not deleted, first {:?}: {}",
                    out.errors().len(),
                    batch.len(),
                    err.key().unwrap_or_default(),
                    err.message().unwrap_or_default()
                ),
            });
        }
        Ok(())
    }

    /// Aborts every pending multipart upload under `prefix`; returns how many, or `None` when
    /// the server cannot list uploads.
    pub async fn abort_uploads(&self, bucket: &str, prefix: &str) -> Result<Option<u64>, S3Error> {
        let mut aborted = 0;
        loop {
            let out = match self.client.list_multipart_uploads().bucket(bucket).prefix(prefix).send().await {
                Ok(out) => out,
                Err(e) => {
                    let e = map_sdk_error("ListMultipartUploads", bucket, prefix, e);
                    return if is_not_implemented(&e) { Ok(None) } else { Err(e) };
                }
            };
            let uploads = out.uploads();
            if uploads.is_empty() {
                return Ok(Some(aborted));
            }
            for upload in uploads {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else { continue };
                match self.client.abort_multipart_upload().bucket(bucket).key(key).upload_id(id).send().await {
                    Ok(_) => aborted += 1,
                    Err(e) => match map_sdk_error("AbortMultipartUpload", bucket, key, e) {
                        // Completed or aborted meanwhile.
                        S3Error::NotFound(_) => {}
                        S3Error::Service { code, .. } if code == "NoSuchUpload" => {}
                        other => return Err(other),
                    },
                }
            }
        }
    }

    /// Deletes everything under `prefix` except the key `keep_last`, which is deleted at the
    /// very end so an interrupted purge can be retried (the marker says whose data this is).
    /// Logs progress after every batch.
    pub async fn purge(&self, bucket: &str, prefix: &str, keep_last: &str) -> Result<PurgeStats, S3Error> {
        let mut stats = PurgeStats { versions_listed: true, ..PurgeStats::default() };
        match self.abort_uploads(bucket, prefix).await? {
            Some(n) => stats.uploads = n,
            None => tracing::warn!(
                bucket,
                prefix,
                "the S3 server does not implement ListMultipartUploads; pending uploads (if any) were not aborted"
            ),
        }
        let mut last = false;
        loop {
            let page = if stats.versions_listed {
                match self.version_page(bucket, prefix).await? {
                    Some(page) => page,
                    None => {
                        tracing::warn!(
                            bucket,
                            prefix,
                            "the S3 server does not implement ListObjectVersions; deleting current objects only"
                        );
                        stats.versions_listed = false;
                        continue;
                    }
                }
            } else {
                self.object_page(bucket, prefix).await?
            };
            let (marker, rest): (Vec<_>, Vec<_>) = page.into_iter().partition(|v| v.key == keep_last);
            let batch = if rest.is_empty() {
                if marker.is_empty() || last {
                    break;
                }
                last = true;
                marker
            } else {
                rest
            };
            for chunk in batch.chunks(DELETE_BATCH) {
                self.delete_batch(bucket, chunk).await?;
                stats.objects += chunk.len() as u64;
            }
            tracing::info!(bucket, prefix, deleted = stats.objects, "purging");
        }
        Ok(stats)
    }
}
