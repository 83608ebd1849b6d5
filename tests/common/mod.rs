//! Test harness for the real-S3, real-FUSE tiers: an S3 server on 127.0.0.1 started per test, an
//! SDK client to seed and inspect buckets, and [`Mount`], which runs the `s3csi` binary.
//!
//! Invariants:
//! - Every server child is killed when its [`S3Server`] drops (and, as a safety net, when the
//!   test thread that started it dies); its log stays in its tempdir until then.
//! - Every [`Mount`] is unmounted when dropped, and the drop waits (bounded) until no process
//!   has the mountpoint on its command line, so FUSE daemons never leak between tests.
//! - Credentials reach the `s3csi` child only through its environment, never its argv.
//! - Readiness is always polled with a deadline; nothing sleeps a fixed time to "let it start".
//!
//! `S3CSI_TEST_ENDPOINT` (+ `S3CSI_TEST_ACCESS_KEY`, `S3CSI_TEST_SECRET_KEY`, `S3CSI_TEST_REGION`)
//! points every test at an existing endpoint (MinIO, AWS) instead of a local server.
//!
//! Self-contained on purpose: benches include it with `#[path = "../tests/common/mod.rs"]`.

#![allow(dead_code)]

pub mod driver;
pub mod proxy;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration, Delete,
    ObjectIdentifier,
};
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// Path of the binary under test.
pub const S3CSI_BIN: &str = env!("CARGO_BIN_EXE_s3csi");

/// Objects at least this big are uploaded with multipart upload (S3 caps PutObject at 5 GiB,
/// and one huge request is slow and fragile on the local servers).
pub const MULTIPART_THRESHOLD: usize = 64 << 20;
/// Part size of multipart uploads: well above S3's 5 MiB minimum, small enough to run several
/// at once without much memory.
pub const MULTIPART_PART_SIZE: usize = 16 << 20;
/// Parts uploaded at the same time.
const MULTIPART_CONCURRENCY: usize = 4;

/// How long a local server may take to answer ListBuckets (moto imports a lot of Python).
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a `s3csi mount` (background mode) may take to exit; it retries S3 for a few seconds
/// before giving up on an unreachable endpoint.
pub const MOUNT_COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a daemon may take to exit after its mount is gone.
pub const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of every readiness/exit poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

const INSTALL_S3S_FS: &str = "cargo install s3s-fs --version 0.14.1 --features binary --locked";
const INSTALL_MOTO: &str = "pip install 'moto[server]'";

/// Which server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// s3s-fs: fast; cannot store `a/` markers nor `x` next to `x/y`; ignores If-Match.
    Fast,
    /// moto: faithful S3 semantics, slow (~28 MiB/s GET); accepts any credentials.
    Faithful,
    /// `S3CSI_TEST_ENDPOINT`: MinIO, AWS, ...; assumed faithful and signature-checking.
    External,
}

/// An S3 endpoint for tests, with a client to seed and inspect it.
pub struct S3Server {
    backend: Backend,
    endpoint: String,
    access_key: String,
    secret_key: String,
    region: String,
    child: Option<Child>,
    /// Data root and server log of a local server.
    dir: Option<TempDir>,
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// Buckets created through [`S3Server::unique_bucket`], emptied and removed on drop when the
    /// endpoint is external (a local server's data dies with its tempdir).
    created: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("backend", &self.backend)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

impl S3Server {
    /// The fast local server (s3s-fs), or `S3CSI_TEST_ENDPOINT` when set. It checks SigV4, so
    /// wrong credentials get 403.
    pub fn start() -> S3Server {
        Self::external().unwrap_or_else(|| Self::start_local(Backend::Fast))
    }

    /// The faithful local server (moto), or `S3CSI_TEST_ENDPOINT` when set. moto does not check
    /// signatures: run bad-credential tests on [`S3Server::start`].
    pub fn start_faithful() -> S3Server {
        Self::external().unwrap_or_else(|| Self::start_local(Backend::Faithful))
    }

    fn external() -> Option<S3Server> {
        let endpoint = std::env::var("S3CSI_TEST_ENDPOINT").ok().filter(|e| !e.is_empty())?;
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        let access_key = var("S3CSI_TEST_ACCESS_KEY", "");
        let secret_key = var("S3CSI_TEST_SECRET_KEY", "");
        assert!(
            !access_key.is_empty() && !secret_key.is_empty(),
            "S3CSI_TEST_ENDPOINT is set: also set S3CSI_TEST_ACCESS_KEY and S3CSI_TEST_SECRET_KEY"
        );
        let region = var("S3CSI_TEST_REGION", "us-east-1");
        let server = Self::with_parts(Backend::External, endpoint, access_key, secret_key, region, None, None);
        if let Err(e) = server.list_buckets() {
            panic!("S3CSI_TEST_ENDPOINT {} does not answer ListBuckets: {e}", server.endpoint);
        }
        Some(server)
    }

    fn start_local(backend: Backend) -> S3Server {
        let (program, install) = match backend {
            Backend::Fast => ("s3s-fs", INSTALL_S3S_FS),
            Backend::Faithful => ("moto_server", INSTALL_MOTO),
            Backend::External => unreachable!("external endpoints are not started"),
        };
        let Some(exe) = find_program(program) else {
            panic!("`{program}` is not installed (not on PATH nor in ~/.cargo/bin); install it with: {install}");
        };
        // Picking a free port and handing it to the child can race with another test; a child
        // that dies at startup is retried on a fresh port.
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let dir = tempfile::Builder::new().prefix("s3csi-s3-").tempdir().expect("tempdir for the S3 server");
            let root = dir.path().join("data");
            std::fs::create_dir(&root).expect("server data dir");
            let log_path = dir.path().join("server.log");
            let log = File::create(&log_path).expect("server log file");
            let port = free_port();
            let access_key = format!("s3csi-test-ak-{}", random_hex(6));
            let secret_key = format!("s3csi-test-sk-{}", random_hex(12));
            let mut cmd = Command::new(&exe);
            match backend {
                Backend::Fast => {
                    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()]);
                    cmd.args(["--access-key", &access_key, "--secret-key", &secret_key]);
                    cmd.arg(&root);
                }
                _ => {
                    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
                    cmd.current_dir(&root);
                }
            }
            cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log).process_group(0);
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the test
            // thread dies without running Drop (abort, SIGKILL), the server dies with it.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    panic!("`{program}` is not installed; install it with: {install}")
                }
                Err(e) => panic!("cannot start {}: {e}", exe.display()),
            };
            let endpoint = format!("http://127.0.0.1:{port}");
            let region = "us-east-1".to_owned();
            let mut server =
                Self::with_parts(backend, endpoint, access_key, secret_key, region, Some(child), Some(dir));
            match server.wait_ready(port) {
                Ok(()) => return server,
                Err(why) => {
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    let exited = server.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                    if !exited {
                        panic!("{program} on port {port} not ready: {why}\n--- server log ---\n{last_log}");
                    }
                }
            }
        }
        panic!("{program} kept exiting at startup\n--- last server log ---\n{last_log}");
    }

    fn with_parts(
        backend: Backend,
        endpoint: String,
        access_key: String,
        secret_key: String,
        region: String,
        child: Option<Child>,
        dir: Option<TempDir>,
    ) -> S3Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime for the test S3 client");
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .region(Region::new(region.clone()))
            .credentials_provider(Credentials::new(&access_key, &secret_key, None, None, "s3csi-test"))
            .force_path_style(true)
            .http_client(http_client)
            // Local servers reject or mishandle the newer flexible-checksum headers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let client = Client::from_conf(config);
        S3Server {
            backend,
            endpoint,
            access_key,
            secret_key,
            region,
            child,
            dir,
            runtime,
            client,
            created: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn wait_ready(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("server exited at startup with {status}"));
            }
            let connected = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            let last = if connected {
                match self.list_buckets() {
                    Ok(_) => return Ok(()),
                    Err(e) => e,
                }
            } else {
                "port not open yet".to_owned()
            };
            if Instant::now() > deadline {
                return Err(format!("not ready after {SERVER_READY_TIMEOUT:?}: {last}"));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Runs a future on the harness runtime (for ad-hoc SDK calls in tests).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The server log of a local server (empty for an external endpoint).
    pub fn log(&self) -> String {
        self.dir.as_ref().and_then(|d| std::fs::read_to_string(d.path().join("server.log")).ok()).unwrap_or_default()
    }

    /// Credential variables for a child process talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".to_owned(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), self.secret_key.clone()),
            ("AWS_REGION".to_owned(), self.region.clone()),
        ]
    }

    pub fn list_buckets(&self) -> Result<Vec<String>, String> {
        self.runtime.block_on(async {
            let out = self.client.list_buckets().send().await.map_err(|e| DisplayErrorContext(e).to_string())?;
            Ok(out.buckets().iter().filter_map(|b| b.name().map(str::to_owned)).collect())
        })
    }

    /// Creates a new bucket with a unique, valid name containing (a cleaned-up) `hint`.
    pub fn unique_bucket(&self, hint: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut clean: String =
            hint.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
        clean.truncate(30);
        let clean = clean.trim_matches('-');
        let name = format!("s3csi-{clean}-{}-{n}-{}", std::process::id(), random_hex(3));
        let name = name.replace("--", "-");
        assert!(name.len() <= 63, "bucket name too long: {name}");
        self.create_bucket(&name);
        name
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.runtime.block_on(async {
            let mut req = self.client.create_bucket().bucket(bucket);
            if self.region != "us-east-1" {
                req = req.create_bucket_configuration(
                    CreateBucketConfiguration::builder()
                        .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                        .build(),
                );
            }
            req.send().await.unwrap_or_else(|e| panic!("CreateBucket {bucket}: {}", DisplayErrorContext(e)));
        });
        self.created.lock().unwrap().push(bucket.to_owned());
    }

    /// Uploads `data` as `bucket/key`, with multipart upload from [`MULTIPART_THRESHOLD`] on.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let data = Bytes::copy_from_slice(data);
        self.runtime.block_on(put_object(self.client.clone(), bucket.to_owned(), key.to_owned(), data));
    }

    /// Uploads the contents of a local file.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        self.put(bucket, key, &data);
    }

    /// Uploads many objects with at most `concurrency` requests in flight.
    pub fn put_many(&self, bucket: &str, objects: Vec<(String, Vec<u8>)>, concurrency: usize) {
        let client = self.client.clone();
        let bucket = bucket.to_owned();
        self.runtime.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            for (key, data) in objects {
                let permit = sem.clone().acquire_owned().await.expect("semaphore open");
                let (client, bucket) = (client.clone(), bucket.clone());
                tasks.spawn(async move {
                    put_object(client, bucket, key, Bytes::from(data)).await;
                    drop(permit);
                });
            }
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        });
    }

    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.runtime.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GetObject {bucket}/{key}: {}", DisplayErrorContext(e)));
            let body = out.body.collect().await.unwrap_or_else(|e| panic!("GetObject {bucket}/{key} body: {e}"));
            body.into_bytes().to_vec()
        })
    }

    /// The user metadata of an object (`x-amz-meta-*`, names without the prefix).
    pub fn user_metadata(&self, bucket: &str, key: &str) -> std::collections::HashMap<String, String> {
        self.runtime.block_on(async {
            let out = self
                .client
                .head_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("HeadObject {bucket}/{key}: {}", DisplayErrorContext(e)));
            out.metadata.unwrap_or_default()
        })
    }

    pub fn delete(&self, bucket: &str, key: &str) {
        self.runtime.block_on(async {
            self.client
                .delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("DeleteObject {bucket}/{key}: {}", DisplayErrorContext(e)));
        });
    }

    /// Multipart uploads started in `bucket` and neither completed nor aborted: (key, upload id).
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<(String, String)> {
        self.runtime.block_on(async {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(bucket)
                .send()
                .await
                .unwrap_or_else(|e| panic!("ListMultipartUploads {bucket}: {}", DisplayErrorContext(e)));
            out.uploads()
                .iter()
                .map(|u| (u.key().unwrap_or_default().to_owned(), u.upload_id().unwrap_or_default().to_owned()))
                .collect()
        })
    }

    /// Pid of a local server's process (none for an external endpoint), to pause it with SIGSTOP.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every key in `bucket` (under `prefix`), in listing order.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("ListObjectsV2 {bucket}: {}", DisplayErrorContext(e)));
                keys.extend(out.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
                token = out.next_continuation_token().map(str::to_owned);
                if !out.is_truncated().unwrap_or(false) || token.is_none() {
                    return keys;
                }
            }
        })
    }

    /// Empties and deletes a bucket (best effort).
    pub fn remove_bucket(&self, bucket: &str) -> Result<(), String> {
        let keys = self.list_keys(bucket, "");
        self.runtime.block_on(async {
            for chunk in keys.chunks(1000) {
                let ids = chunk
                    .iter()
                    .map(|k| ObjectIdentifier::builder().key(k).build().map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                let delete = Delete::builder().set_objects(Some(ids)).quiet(true).build().map_err(|e| e.to_string())?;
                self.client
                    .delete_objects()
                    .bucket(bucket)
                    .delete(delete)
                    .send()
                    .await
                    .map_err(|e| DisplayErrorContext(e).to_string())?;
            }
            self.client.delete_bucket().bucket(bucket).send().await.map_err(|e| DisplayErrorContext(e).to_string())?;
            Ok(())
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if self.backend == Backend::External {
            let buckets = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
            for b in buckets {
                if let Err(e) = self.remove_bucket(&b) {
                    eprintln!("warning: cannot remove test bucket {b}: {e}");
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            // The child leads its own process group: take down anything it forked too.
            // SAFETY: plain syscall on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn put_object(client: Client, bucket: String, key: String, data: Bytes) {
    if data.len() < MULTIPART_THRESHOLD {
        client
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(ByteStream::from(data))
            .send()
            .await
            .unwrap_or_else(|e| panic!("PutObject {bucket}/{key}: {}", DisplayErrorContext(e)));
        return;
    }
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateMultipartUpload {bucket}/{key}: {}", DisplayErrorContext(e)));
    let upload_id = upload.upload_id().expect("upload id").to_owned();
    let sem = Arc::new(tokio::sync::Semaphore::new(MULTIPART_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, start) in (0..data.len()).step_by(MULTIPART_PART_SIZE).enumerate() {
        let part = data.slice(start..(start + MULTIPART_PART_SIZE).min(data.len()));
        let part_number = i as i32 + 1;
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let (client, bucket, key, upload_id) = (client.clone(), bucket.clone(), key.clone(), upload_id.clone());
        tasks.spawn(async move {
            let out = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(upload_id)
                .part_number(part_number)
                .body(ByteStream::from(part))
                .send()
                .await
                .unwrap_or_else(|e| panic!("UploadPart {part_number} of {bucket}/{key}: {}", DisplayErrorContext(e)));
            drop(permit);
            CompletedPart::builder().part_number(part_number).set_e_tag(out.e_tag().map(str::to_owned)).build()
        });
    }
    let mut parts = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(p) => parts.push(p),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    parts.sort_by_key(|p| p.part_number());
    client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key(&key)
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .unwrap_or_else(|e| panic!("CompleteMultipartUpload {bucket}/{key}: {}", DisplayErrorContext(e)));
}

/// The arguments and environment of one `s3csi mount` invocation.
#[derive(Clone, Debug)]
pub struct MountCommand {
    pub bucket: String,
    pub mountpoint: PathBuf,
    pub endpoint: String,
    pub region: String,
    /// Environment of the child (credentials); never put on argv.
    pub env: Vec<(String, String)>,
    /// Extra options after the standard endpoint/region/path-style ones.
    pub args: Vec<String>,
}

impl MountCommand {
    pub fn new(server: &S3Server, bucket: &str, mountpoint: &Path, extra_args: &[&str]) -> MountCommand {
        MountCommand {
            bucket: bucket.to_owned(),
            mountpoint: mountpoint.to_owned(),
            endpoint: server.endpoint().to_owned(),
            region: server.region().to_owned(),
            env: server.env(),
            args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The process to run; `foreground` adds `--foreground`.
    pub fn command(&self, foreground: bool) -> Command {
        let mut cmd = Command::new(S3CSI_BIN);
        cmd.arg("mount").arg(&self.bucket).arg(&self.mountpoint);
        cmd.args(["--endpoint-url", &self.endpoint, "--force-path-style", "--region", &self.region]);
        cmd.args(&self.args);
        if foreground {
            cmd.arg("--foreground");
        }
        // Only the credentials given here: nothing from the developer's own AWS setup.
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs the background mount command to completion (bounded) and returns its output.
    /// stdout/stderr go to anonymous files, not pipes: a daemon that inherits them must not
    /// keep this call waiting for EOF.
    pub fn run(&self) -> Output {
        run_with_timeout(self.command(false), MOUNT_COMMAND_TIMEOUT)
    }
}

/// A live `s3csi` mount; unmounted (and its daemon waited for) on drop.
#[derive(Debug)]
pub struct Mount {
    mountpoint: PathBuf,
    /// Owns the mountpoint's parent when the harness made it.
    dir: Option<TempDir>,
    mounted: bool,
}

impl Mount {
    /// Mounts `bucket` at a fresh temporary directory; panics unless the command exits 0 with
    /// the FUSE mount live.
    pub fn new(server: &S3Server, bucket: &str, extra_args: &[&str]) -> Mount {
        match Self::try_new(server, bucket, extra_args) {
            Ok(m) => m,
            Err(out) => panic!(
                "s3csi mount {bucket} {extra_args:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Mounts at a fresh temporary directory; `Err` carries the command's output when it exits
    /// non-zero. Panics when it exits 0 without a FUSE mount in place.
    pub fn try_new(server: &S3Server, bucket: &str, extra_args: &[&str]) -> Result<Mount, Output> {
        let dir = tempfile::Builder::new().prefix("s3csi-mnt-").tempdir().expect("tempdir for the mountpoint");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("create mountpoint");
        let mountpoint = mountpoint.canonicalize().expect("canonical mountpoint");
        Self::try_with(MountCommand::new(server, bucket, &mountpoint, extra_args), Some(dir))
    }

    /// Runs `cmd`; `dir` (if any) is kept alive as long as the mount.
    pub fn try_with(cmd: MountCommand, dir: Option<TempDir>) -> Result<Mount, Output> {
        let out = cmd.run();
        if !out.status.success() {
            return Err(out);
        }
        let mount = Mount { mountpoint: cmd.mountpoint.clone(), dir, mounted: true };
        assert!(
            is_fuse_mount(&cmd.mountpoint),
            "s3csi mount exited 0 but {} is not a FUSE mount\n--- stderr ---\n{}",
            cmd.mountpoint.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(mount)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `path()/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// Unmounts, waits for the daemon to exit, and panics if either fails.
    pub fn unmount(mut self) {
        if let Err(e) = self.unmount_inner(false) {
            panic!("{e}");
        }
    }

    fn unmount_inner(&mut self, last_resort: bool) -> Result<(), String> {
        if !self.mounted {
            return Ok(());
        }
        self.mounted = false;
        let mp = self.mountpoint.clone();
        let mut errors = Vec::new();
        if is_mounted(&mp) {
            // `umount` may briefly see the mount busy while the kernel drops its last references.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match run_quiet(Command::new("umount").arg(&mp)) {
                    Ok(()) => break,
                    Err(e) if Instant::now() < deadline && is_mounted(&mp) => {
                        errors.push(e);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        errors.push(e);
                        break;
                    }
                }
            }
            if is_mounted(&mp)
                && let Err(e) = run_quiet(Command::new("fusermount3").arg("-u").arg(&mp))
            {
                errors.push(e);
            }
            if last_resort && is_mounted(&mp) {
                // Never leave a mount behind a test, even one holding files open.
                let _ = run_quiet(Command::new("umount").arg("-l").arg(&mp));
            }
            if is_mounted(&mp) {
                if let Some(dir) = self.dir.take() {
                    // Removing a tempdir that still has a mount inside would walk into it.
                    let _ = dir.keep();
                }
                return Err(format!("cannot unmount {}: {}", mp.display(), errors.join("; ")));
            }
        }
        wait_no_daemon(&mp, DAEMON_EXIT_TIMEOUT)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner(true) {
            if std::thread::panicking() {
                eprintln!("warning: {e}");
            } else {
                panic!("{e}");
            }
        }
    }
}

/// Runs `cmd` with stdout/stderr captured in anonymous files, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut out = tempfile::tempfile().expect("stdout capture file");
    let mut err = tempfile::tempfile().expect("stderr capture file");
    cmd.stdout(out.try_clone().expect("dup")).stderr(err.try_clone().expect("dup"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not exit within {timeout:?}");
    });
    let read_all = |f: &mut File| {
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("rewind capture");
        f.read_to_end(&mut buf).expect("read capture");
        buf
    };
    Output { status, stdout: read_all(&mut out), stderr: read_all(&mut err) }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `cond` until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}: {}", describe_status(out.status), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{status}"),
    }
}

/// Mount entries of this process: (mount point, filesystem type).
pub fn mounts() -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .filter_map(|line| {
            let mountpoint = line.split(' ').nth(4)?;
            let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
            Some((unescape_mountinfo(mountpoint), fstype.to_owned()))
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    // The kernel writes space, tab, newline and backslash as three-digit octal escapes.
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], escape) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(mp, _)| mp == path)
}

/// Whether a FUSE filesystem is mounted at `path`.
pub fn is_fuse_mount(path: &Path) -> bool {
    mounts().iter().any(|(mp, fstype)| mp == path && (fstype == "fuse" || fstype.starts_with("fuse.")))
}

/// Pids of live processes with `mountpoint` as one of their arguments (the FUSE daemons).
pub fn processes_with_arg(mountpoint: &Path) -> Vec<u32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            // Zombies have an empty cmdline, so an unreaped daemon does not count.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|&b| b == 0).any(|arg| arg == want))
        })
        .collect()
}

/// Polls until no process has `mountpoint` on its command line.
pub fn wait_no_daemon(mountpoint: &Path, timeout: Duration) -> Result<(), String> {
    if wait_until(timeout, || processes_with_arg(mountpoint).is_empty()) {
        Ok(())
    } else {
        Err(format!(
            "processes {:?} for {} still run {timeout:?} after unmount",
            processes_with_arg(mountpoint),
            mountpoint.display()
        ))
    }
}

/// Total size of the regular files under `dir`, recursively; files vanishing meanwhile count 0.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local addr").port()
}

/// `len` pseudo-random bytes, reproducible from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 of a file read sequentially in `chunk`-byte reads, and the number of bytes read.
pub fn sha256_file(path: &Path, chunk: usize) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(hasher.finalize()), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Reads up to `len` bytes at `offset`, retrying short reads until `len` or EOF.
pub fn read_at_most(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Entry names of a directory exactly as the kernel returns them (including `.` and `..`,
/// which `std::fs::read_dir` hides).
pub fn raw_readdir(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: `c` is a valid NUL-terminated path; the DIR pointer is used only below and closed
    // exactly once; each dirent is read before the next readdir call invalidates it.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        if d.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let mut names = Vec::new();
        loop {
            *libc::__errno_location() = 0;
            let ent = libc::readdir(d);
            if ent.is_null() {
                let errno = *libc::__errno_location();
                libc::closedir(d);
                if errno != 0 {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
                return Ok(names);
            }
            names.push(std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes().to_vec());
        }
    }
}

/// Entry names of a directory (without `.` and `..`), sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Searches PATH, then cargo's bin directories, for an executable.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The local server of `backend` (or `S3CSI_TEST_ENDPOINT`).
pub fn server_for(backend: Backend) -> S3Server {
    match backend {
        Backend::Faithful => S3Server::start_faithful(),
        _ => S3Server::start(),
    }
}

/// Asserts `got == want` without printing megabytes: names the first differing offset.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!("{what}: got {} bytes, want {} bytes; first difference at offset {first:?}", got.len(), want.len());
}

/// `GET /metrics` from a metrics endpoint on 127.0.0.1:`port`; the body.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::Write;
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send request");
    let mut response = String::new();
    conn.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "metrics endpoint answered {head}");
    body.to_owned()
}

/// Sum of the samples of `name` whose labels contain every `label="value"` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Failure injection around any `ObjectStore`, for tests of the filesystem core.
pub mod faulty;

/// A `--log-file` for a mount; its tail is printed when the test fails.
pub struct DaemonLog {
    _dir: TempDir,
    path: PathBuf,
}

impl DaemonLog {
    pub fn new() -> DaemonLog {
        let dir = tempfile::Builder::new().prefix("s3csi-log-").tempdir().expect("tempdir for the daemon log");
        let path = dir.path().join("s3csi.log");
        DaemonLog { _dir: dir, path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }

    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for DaemonLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last lines of the s3csi log {} ---\n{}", self.path.display(), self.tail(80));
        }
    }
}
