//! [`AwsStore`]: the [`ObjectStore`] backed by `aws-sdk-s3`, for AWS S3 and compatible servers.
//!
//! Connections are pooled by the SDK's hyper client, which sets `TCP_NODELAY` on every socket
//! (on loopback, Nagle plus delayed ACK otherwise adds ~40 ms to small requests). The SDK's
//! standard retry strategy retries 5xx, throttling and connection errors with jittered backoff.
//! Checksums are only computed where the API requires them, because several S3-compatible
//! servers reject or ignore the newer flexible-checksum headers.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, MetadataDirective};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{
    CompletedPart, Copied, GetObject, ListPage, ObjectId, ObjectMeta, ObjectStart, ObjectStore, S3Error, UserMetadata,
};
use crate::config::{S3Config, Timeouts};

/// Attempts per request, including the first. With the SDK's exponential backoff this rides
/// out a server restart of a few seconds without surfacing an error.
const MAX_ATTEMPTS: u32 = 6;
/// Initial retry backoff; doubled per attempt by the SDK, with jitter.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// A closed port or a black-holed address should fail fast enough to be a clear mount error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Region used when neither the flag, the environment nor a profile names one; custom
/// endpoints (MinIO and friends) accept any region.
const FALLBACK_REGION: &str = "us-east-1";

/// Builds an S3 client from our config plus the standard AWS environment (credentials chain,
/// `AWS_ENDPOINT_URL`, `AWS_REGION`).
pub async fn build_client(cfg: &S3Config) -> Result<Client, S3ClientError> {
    let mut trust = TrustStore::default();
    if let Some(path) = &cfg.ca_bundle {
        let pem = read_ca_bundle(path)?;
        trust = trust.with_pem_certificate(pem);
    }
    let tls_ctx = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| S3ClientError(format!("cannot build TLS settings: {e}")))?;
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(tls_ctx)
        .build_https();

    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .region(region_chain(cfg.region.as_deref()))
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS).with_initial_backoff(INITIAL_BACKOFF))
        .timeout_config(timeout_config(&cfg.timeouts, 0));
    if let Some(url) = &cfg.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(c) = &cfg.credentials {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            &c.access_key_id,
            &c.secret_access_key,
            c.session_token.clone(),
            None,
            "s3csi-secret",
        ));
    }
    let sdk = loader.load().await;
    check_credentials(&sdk).await?;
    let s3cfg = aws_sdk_s3::config::Builder::from(&sdk)
        .interceptor(MetricsInterceptor)
        .force_path_style(cfg.force_path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Ok(Client::from_conf(s3cfg))
}

/// The region: `--region`, else `AWS_REGION`/`AWS_DEFAULT_REGION`, else the profile's, else
/// [`FALLBACK_REGION`]. Instance metadata is not asked: off EC2 it only delays the mount, and
/// custom endpoints accept any region.
fn region_chain(flag: Option<&str>) -> RegionProviderChain {
    RegionProviderChain::first_try(flag.map(|r| Region::new(r.to_owned())))
        .or_else(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new())
        .or_else(Region::new(FALLBACK_REGION))
}

/// SDK time limits for a request with a body of `body_bytes` (see [`Timeouts`]): each attempt
/// must begin answering within a third of the stall limit, the whole request (retries included)
/// must finish within the stall limit, both plus the body's time at the slowest assumed rate.
fn timeout_config(t: &Timeouts, body_bytes: u64) -> TimeoutConfig {
    let body = Timeouts::for_body(body_bytes);
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(t.attempt() + body)
        .operation_timeout(t.stall + 2 * body)
        .build()
}

/// Resolves credentials once, so a missing or broken credential source is reported as such
/// instead of as a failed request.
async fn check_credentials(sdk: &aws_config::SdkConfig) -> Result<(), S3ClientError> {
    use aws_sdk_s3::config::ProvideCredentials;
    let Some(provider) = sdk.credentials_provider() else {
        return Err(S3ClientError("no AWS credentials provider is configured".into()));
    };
    provider.provide_credentials().await.map(|_| ()).map_err(|e| {
        S3ClientError(format!(
            "no usable AWS credentials ({}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
             AWS_PROFILE, or a web identity token",
            error_chain(&e)
        ))
    })
}

fn read_ca_bundle(path: &Path) -> Result<Vec<u8>, S3ClientError> {
    let pem =
        std::fs::read(path).map_err(|e| S3ClientError(format!("cannot read --ca-bundle {}: {e}", path.display())))?;
    if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err(S3ClientError(format!("--ca-bundle {} holds no PEM certificate", path.display())));
    }
    Ok(pem)
}

/// Counts a PUT or UploadPart as in flight while it lives; [`UploadGuard::sent`] counts its
/// body bytes once S3 accepted them.
struct UploadGuard(usize);

impl UploadGuard {
    fn new(len: usize) -> Self {
        crate::metrics::metrics().uploads_in_flight.inc();
        UploadGuard(len)
    }

    fn sent(self) {
        crate::metrics::metrics().s3_bytes_written.inc_by(self.0 as u64);
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        crate::metrics::metrics().uploads_in_flight.dec();
    }
}

/// When an operation started, kept in the request's config bag.
#[derive(Debug, Clone)]
struct OperationStart(std::time::Instant);

impl aws_smithy_types::config_bag::Storable for OperationStart {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

/// Records every S3 operation (after the SDK's retries) by name, outcome and latency.
#[derive(Debug)]
struct MetricsInterceptor;

impl aws_smithy_runtime_api::client::interceptors::Intercept for MetricsInterceptor {
    fn name(&self) -> &'static str {
        "s3csi-metrics"
    }

    fn read_before_execution(
        &self,
        _context: &aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        cfg.interceptor_state().store_put(OperationStart(std::time::Instant::now()));
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef<'_>,
        _runtime_components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let Some(start) = cfg.load::<OperationStart>().map(|s| s.0) else { return Ok(()) };
        let operation = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| operation_name(m.name()))
            .unwrap_or("unknown");
        let outcome = match context.response().map(|r| r.status().as_u16()) {
            None => "unreachable",
            Some(200..=299) => "ok",
            Some(304) => "not_modified",
            Some(403) => "access_denied",
            Some(404) => "not_found",
            Some(412) => "precondition_failed",
            Some(416) => "invalid_range",
            Some(429 | 503) => "throttled",
            Some(500..=599) => "server_error",
            Some(_) => "client_error",
        };
        crate::metrics::metrics().s3_request(operation, outcome, start);
        Ok(())
    }
}

/// The operation names we use, as `&'static str` labels.
fn operation_name(name: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "HeadObject",
        "GetObject",
        "PutObject",
        "ListObjectsV2",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPartCopy",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
        "CopyObject",
        "DeleteObject",
        "DeleteObjects",
        "HeadBucket",
        "CreateBucket",
        "DeleteBucket",
        "ListBuckets",
        "ListObjectVersions",
        "ListMultipartUploads",
    ];
    KNOWN.iter().find(|k| **k == name).copied().unwrap_or("other")
}

/// The client could not be configured (bad CA bundle, bad TLS settings).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct S3ClientError(pub String);

/// A bucket reached through `aws-sdk-s3`.
#[derive(Clone, Debug)]
pub struct AwsStore {
    client: Client,
    bucket: String,
    timeouts: Timeouts,
}

impl AwsStore {
    /// `timeouts` must be the ones the client was built with (`S3Config::timeouts`).
    pub fn new(client: Client, bucket: impl Into<String>, timeouts: Timeouts) -> Self {
        AwsStore { client, bucket: bucket.into(), timeouts }
    }

    /// Time limits for a request that sends `bytes` of body.
    fn with_body(&self, bytes: u64) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(timeout_config(&self.timeouts, bytes))
    }

    /// Time limits for work the server does on data it already has (CopyObject, UploadPartCopy,
    /// CompleteMultipartUpload), which can take minutes for large objects: S3 sends its headers
    /// early and keeps the connection alive with whitespace, other servers answer only when
    /// done. Each attempt may wait the whole stall limit for its first byte, and the request
    /// (retries included) three limits.
    fn server_side(&self) -> aws_sdk_s3::config::Builder {
        let t = &self.timeouts;
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(t.stall)
                .operation_timeout(3 * t.stall)
                .build(),
        )
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Converts an SDK error into our error, once, naming the operation, bucket and key.
pub(crate) fn map_sdk_error<E>(op: &'static str, bucket: &str, key: &str, err: SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (status, code, message) = match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            return S3Error::Unreachable(format!("{op} s3://{bucket}/{key}: {}", error_chain(&err)));
        }
        SdkError::ServiceError(se) => {
            let message = match se.err().message() {
                Some(m) => m.to_owned(),
                // No S3 error body (a reply the SDK could not read): say what it found instead.
                None if se.err().code().is_none() => error_chain(&err),
                None => String::new(),
            };
            (se.raw().status().as_u16(), se.err().code().unwrap_or_default().to_owned(), message)
        }
        SdkError::ResponseError(re) => {
            (re.raw().status().as_u16(), String::new(), DisplayErrorContext(&err).to_string())
        }
        _ => (0, String::new(), DisplayErrorContext(&err).to_string()),
    };
    match (status, code.as_str()) {
        (_, "NoSuchBucket") => S3Error::NoSuchBucket(bucket.to_owned()),
        (404, _) if key.is_empty() => S3Error::NoSuchBucket(bucket.to_owned()),
        (404, _) | (_, "NoSuchKey") => S3Error::NotFound(key.to_owned()),
        (403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
            let what = if code.is_empty() { "HTTP 403".to_owned() } else { code.clone() };
            S3Error::AccessDenied(format!("{op} on s3://{bucket}/{key}: {what}"))
        }
        (412, _) | (_, "PreconditionFailed") => S3Error::PreconditionFailed(key.to_owned()),
        (416, _) | (_, "InvalidRange") => S3Error::InvalidRange(key.to_owned()),
        (301, _) => S3Error::Service {
            operation: op,
            status,
            code,
            message: format!("bucket {bucket} is in another region; pass --region {message}"),
        },
        _ => S3Error::Service { operation: op, status, code, message },
    }
}

/// `a: b: c` from an error and its sources, skipping repeats (Display only, never Debug).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    // One line: some sources span several.
    parts.join(": ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Characters escaped in `x-amz-copy-source`: everything but unreserved characters and `/`.
const COPY_SOURCE_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'/');

fn copy_source(bucket: &str, key: &str) -> String {
    format!("{bucket}/{}", percent_encoding::utf8_percent_encode(key, COPY_SOURCE_ESCAPES))
}

fn metadata_map(m: &UserMetadata) -> Option<std::collections::HashMap<String, String>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn lower_case_metadata(m: Option<&std::collections::HashMap<String, String>>) -> UserMetadata {
    m.map(|m| m.iter().map(|(k, v)| (k.to_lowercase(), v.clone())).collect()).unwrap_or_default()
}

/// A GET body as our stream: counts the bytes, and fails (as a transient [`S3Error::Body`])
/// when no byte arrives for `idle`, so a server that stops sending mid-body is retried or
/// reported instead of waited on forever.
fn body_stream(body: ByteStream, key: String, idle: Duration) -> BoxStream<'static, Result<Bytes, S3Error>> {
    futures::stream::unfold(Some((body, key)), move |state| async move {
        let (mut body, key) = state?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(None) => None,
            Ok(Some(Ok(bytes))) => {
                crate::metrics::metrics().s3_bytes_read.inc_by(bytes.len() as u64);
                Some((Ok(bytes), Some((body, key))))
            }
            Ok(Some(Err(e))) => {
                let err = S3Error::Body(key.clone(), DisplayErrorContext(&e).to_string());
                Some((Err(err), None))
            }
            Err(_) => {
                let err = S3Error::Body(
                    key.clone(),
                    format!("no data for {:.1} s (a third of --s3-timeout)", idle.as_secs_f64()),
                );
                Some((Err(err), None))
            }
        }
    })
    .boxed()
}

fn to_system_time(dt: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    dt.and_then(|d| SystemTime::try_from(*d).ok()).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn non_negative(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

#[async_trait]
impl ObjectStore for AwsStore {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    async fn check_access(&self, prefix: &str) -> Result<(), S3Error> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .max_keys(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error("ListObjectsV2", &self.bucket, "", e))
    }

    async fn head_object(&self, key: &str) -> Result<ObjectMeta, S3Error> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_sdk_error("HeadObject", &self.bucket, key, e))?;
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: non_negative(out.content_length()),
            etag: out.e_tag().map(str::to_owned),
            last_modified: to_system_time(out.last_modified()),
            user_metadata: Some(lower_case_metadata(out.metadata())),
        })
    }

    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListPage, S3Error> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(delimiter.map(str::to_owned))
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| map_sdk_error("ListObjectsV2", &self.bucket, prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: o.key()?.to_owned(),
                    size: non_negative(o.size()),
                    etag: o.e_tag().map(str::to_owned),
                    last_modified: to_system_time(o.last_modified()),
                    user_metadata: None,
                })
            })
            .collect();
        let common_prefixes = out.common_prefixes().iter().filter_map(|p| p.prefix().map(str::to_owned)).collect();
        let next_token =
            if out.is_truncated().unwrap_or(false) { out.next_continuation_token().map(str::to_owned) } else { None };
        Ok(ListPage { objects, common_prefixes, next_token })
    }

    async fn get_range(&self, object: &ObjectId, range: Range<u64>) -> Result<GetObject, S3Error> {
        debug_assert!(range.start < range.end);
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object.key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(object.if_match().map(str::to_owned))
            .send()
            .await
            .map_err(|e| map_sdk_error("GetObject", &self.bucket, &object.key, e))?;
        // A server (or proxy) that ignored the Range would send the object from byte 0.
        // (The end may be less than asked: a range past the end of the object is cut short.)
        let expected = format!("bytes {}-", range.start);
        let honoured = match out.content_range() {
            Some(r) => r.starts_with(&expected),
            // A range covering the whole object may be answered with the whole object (200).
            None => range.start == 0 && non_negative(out.content_length()) <= range.end - range.start,
        };
        if !honoured {
            return Err(S3Error::Service {
                operation: "GetObject",
                status: 200,
                code: String::new(),
                message: format!(
                    "asked for bytes {}-{} of {:?} but the server answered Content-Range {:?}; \
                     the endpoint (or a proxy before it) does not support ranged GETs",
                    range.start,
                    range.end - 1,
                    object.key,
                    out.content_range()
                ),
            });
        }
        let etag = out.e_tag().map(str::to_owned);
        // Some servers ignore If-Match; compare the ETag they return as well.
        if object.has_etag && etag.as_deref().is_some_and(|e| e != object.version) {
            return Err(S3Error::PreconditionFailed(object.key.clone()));
        }
        Ok(GetObject { etag, body: body_stream(out.body, object.key.clone(), self.timeouts.attempt()) })
    }

    async fn get_object_start(&self, key: &str, len: u64) -> Result<ObjectStart, S3Error> {
        debug_assert!(len > 0);
        let sent = self.client.get_object().bucket(&self.bucket).key(key).range(format!("bytes=0-{}", len - 1)).send();
        let out = match sent.await.map_err(|e| map_sdk_error("GetObject", &self.bucket, key, e)) {
            Ok(out) => out,
            // An empty object has no byte 0: S3 refuses the range. Its HEAD says everything.
            Err(S3Error::InvalidRange(_)) => {
                return Ok(ObjectStart { meta: self.head_object(key).await?, data: Bytes::new() });
            }
            Err(e) => return Err(e),
        };
        // `Content-Range: bytes 0-N/TOTAL` gives the whole size. Without one the server sent
        // the whole object, unless it sent exactly `len` bytes (it may have cut it short):
        // then only a HEAD can say.
        let total = out.content_range().map(|r| r.rsplit_once('/').and_then(|(_, t)| t.parse::<u64>().ok()));
        let size = match total {
            Some(Some(total)) => total,
            None if non_negative(out.content_length()) < len => non_negative(out.content_length()),
            _ => {
                return Ok(ObjectStart { meta: self.head_object(key).await?, data: Bytes::new() });
            }
        };
        let meta = ObjectMeta {
            key: key.to_owned(),
            size,
            etag: out.e_tag().map(str::to_owned),
            last_modified: to_system_time(out.last_modified()),
            user_metadata: Some(lower_case_metadata(out.metadata())),
        };
        let want = len.min(size) as usize;
        let mut body = body_stream(out.body, key.to_owned(), self.timeouts.attempt());
        let mut data = bytes::BytesMut::with_capacity(want);
        while data.len() < want {
            match body.next().await {
                Some(chunk) => data.extend_from_slice(&chunk?),
                None => break,
            }
        }
        if data.len() < want {
            return Err(S3Error::Body(key.to_owned(), format!("response ended after {} of {want} bytes", data.len())));
        }
        data.truncate(want);
        Ok(ObjectStart { meta, data: data.freeze() })
    }

    async fn put_object(&self, key: &str, body: Bytes, metadata: &UserMetadata) -> Result<String, S3Error> {
        let len = body.len() as u64;
        let upload = UploadGuard::new(body.len());
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(metadata_map(metadata))
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.with_body(len))
            .send()
            .await
            .map_err(|e| map_sdk_error("PutObject", &self.bucket, key, e))?;
        upload.sent();
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn create_multipart_upload(&self, key: &str, metadata: &UserMetadata) -> Result<String, S3Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(metadata_map(metadata))
            .send()
            .await
            .map_err(|e| map_sdk_error("CreateMultipartUpload", &self.bucket, key, e))?;
        out.upload_id().map(str::to_owned).ok_or_else(|| S3Error::Service {
            operation: "CreateMultipartUpload",
            status: 200,
            code: String::new(),
            message: format!("no upload id returned for {key:?}"),
        })
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Bytes) -> Result<String, S3Error> {
        let len = body.len() as u64;
        let upload = UploadGuard::new(body.len());
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .customize()
            .config_override(self.with_body(len))
            .send()
            .await
            .map_err(|e| map_sdk_error("UploadPart", &self.bucket, key, e))?;
        upload.sent();
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &ObjectId,
        range: Range<u64>,
    ) -> Result<String, S3Error> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(copy_source(&self.bucket, &source.key))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(source.if_match().map(str::to_owned))
            .customize()
            .config_override(self.server_side())
            .send()
            .await
            .map_err(|e| map_sdk_error("UploadPartCopy", &self.bucket, key, e))?;
        Ok(out.copy_part_result().and_then(|r| r.e_tag()).unwrap_or_default().to_owned())
    }

    async fn complete_multipart_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<String, S3Error> {
        let parts = parts
            .into_iter()
            .map(|p| aws_sdk_s3::types::CompletedPart::builder().part_number(p.number).e_tag(p.etag).build())
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .customize()
            .config_override(self.server_side())
            .send()
            .await
            .map_err(|e| map_sdk_error("CompleteMultipartUpload", &self.bucket, key, e))?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        match self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id).send().await {
            Ok(_) => Ok(()),
            Err(e) => match map_sdk_error("AbortMultipartUpload", &self.bucket, key, e) {
                S3Error::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn copy_object(
        &self,
        source: &ObjectId,
        dest_key: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<Copied, S3Error> {
        let mut req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(dest_key)
            .copy_source(copy_source(&self.bucket, &source.key))
            .set_copy_source_if_match(source.if_match().map(str::to_owned));
        if let Some(m) = metadata {
            req = req.metadata_directive(MetadataDirective::Replace).set_metadata(metadata_map(m));
        }
        let out = req
            .customize()
            .config_override(self.server_side())
            .send()
            .await
            .map_err(|e| map_sdk_error("CopyObject", &self.bucket, &source.key, e))?;
        let result = out.copy_object_result();
        Ok(Copied {
            etag: result.and_then(|r| r.e_tag()).unwrap_or_default().to_owned(),
            last_modified: result.and_then(|r| r.last_modified()).and_then(|t| SystemTime::try_from(*t).ok()),
        })
    }

    async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(e) => match map_sdk_error("DeleteObject", &self.bucket, key, e) {
                S3Error::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_region_flag_wins_and_building_the_chain_needs_no_http_client() {
        let region = region_chain(Some("eu-west-3")).region().await;
        assert_eq!(region.as_ref().map(Region::as_ref), Some("eu-west-3"));
        // Without the flag something is always found (at worst the fallback), with no request.
        assert!(region_chain(None).region().await.is_some());
    }
}
