//! Mounted-filesystem write tests: the real `s3csi` binary mounts a bucket of a real S3 server on
//! 127.0.0.1, the tests write through the mount with plain syscalls, and a separate SDK client
//! checks what S3 holds.
//!
//! - Every test makes its own bucket (most their own server), so tests run in parallel.
//! - `close` is checked explicitly ([`close_checked`]): dropping a `std::fs::File` ignores the
//!   error, and on this filesystem `close` is where the data is committed.
//! - Big-data tests use the fast server (s3s-fs). Tests that need directory markers run on the
//!   faithful one (moto), because of these s3s-fs limitations: a marker `a/` becomes an on-disk
//!   directory that no listing shows (and HEAD `a` on it answers 500); deleting the last object
//!   under a prefix leaves the on-disk directory behind; there is no ListMultipartUploads (pending
//!   uploads are `.upload-<id>.json` files in its root, which the failure test reads directly);
//!   HEAD ignores `partNumber`, so multipart part counts come from the `-N` ETag suffix.
//! - moto 5.2 answers CompleteMultipartUpload with a `CompleteMultipartUploadResponse` root
//!   element that the Rust SDK rejects; s3csi then verifies the commit by the object's ETag
//!   (see the last test), but the heavy multipart tests stay on s3s-fs.
//! - Tests that check what is *not* committed yet run in their own process ([`isolated`]): a
//!   fork + exec in another test thread closes copies of this test's descriptors, and every
//!   close sends FUSE FLUSH, which commits.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::IntoRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use common::{
    Backend, DaemonLog, Mount, MountCommand, S3Server, assert_same_bytes, dir_size, find_program, free_port, list_dir,
    processes_with_arg, random_bytes, read_at_most, server_for, sha256, wait_until,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use test_case::test_case;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn errno<T>(r: &std::io::Result<T>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

/// Closes `f` and returns what `close(2)` returned (the commit result on this filesystem).
fn close_checked(f: File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by its `File`, so it is open and is closed exactly once here.
    if unsafe { libc::close(fd) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Creates (truncating) `path` with `data` and checks every step, including `close`.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    close_checked(f)
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check_rc(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// `truncate(2)` by path.
fn truncate_path(p: &Path, len: u64) -> std::io::Result<()> {
    let c = c_path(p);
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    check_rc(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) })
}

/// `renameat2(.., RENAME_NOREPLACE)`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let (a, b) = (c_path(from), c_path(to));
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    check_rc(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_NOREPLACE) })
}

/// Sets the mtime (and atime) of `p` to `secs.nsecs`.
fn set_mtime(p: &Path, secs: i64, nsecs: i64) -> std::io::Result<()> {
    let c = c_path(p);
    let t = libc::timespec { tv_sec: secs, tv_nsec: nsecs };
    let times = [t, t];
    // SAFETY: `c` is a valid path and `times` two valid timespecs, both outliving the call.
    check_rc(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) })
}

/// Peak resident memory (VmHWM) of `pid`, in bytes.
fn vm_hwm_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value");
    kib * 1024
}

/// The one daemon serving `mountpoint`.
fn daemon_pid(mountpoint: &Path) -> u32 {
    let pids = processes_with_arg(mountpoint);
    assert_eq!(pids.len(), 1, "expected one s3csi daemon for {}, found {pids:?}", mountpoint.display());
    pids[0]
}

/// Direct access to one bucket, bypassing the mount.
struct Store<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a Client,
    bucket: &'a str,
}

/// The HTTP status of a failed SDK call, when the server answered.
fn http_status<E>(e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl<'a> Store<'a> {
    fn of(server: &'a S3Server, bucket: &'a str) -> Store<'a> {
        Store { rt: server.runtime(), client: server.client(), bucket }
    }

    /// The object's bytes, or `None` when the key does not exist.
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(async {
            match self.client.get_object().bucket(self.bucket).key(key).send().await {
                Ok(out) => Some(out.body.collect().await.expect("GetObject body").into_bytes().to_vec()),
                Err(e) if http_status(&e) == Some(404) => None,
                Err(e) => panic!("GetObject {}/{key}: {}", self.bucket, DisplayErrorContext(e)),
            }
        })
    }

    /// SHA-256 and length of the object, streamed (never held in memory whole).
    fn sha256_streamed(&self, key: &str) -> (String, u64) {
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(self.bucket)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GetObject {}/{key}: {}", self.bucket, DisplayErrorContext(e)));
            let mut body = out.body;
            let mut hasher = Sha256::new();
            let mut n = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.unwrap_or_else(|e| panic!("GetObject {}/{key} body: {e}", self.bucket));
                hasher.update(&chunk);
                n += chunk.len() as u64;
            }
            (hex::encode(hasher.finalize()), n)
        })
    }

    fn head(&self, key: &str) -> Option<HeadObjectOutput> {
        self.rt.block_on(async {
            match self.client.head_object().bucket(self.bucket).key(key).send().await {
                Ok(out) => Some(out),
                Err(e) if http_status(&e) == Some(404) => None,
                Err(e) => panic!("HeadObject {}/{key}: {}", self.bucket, DisplayErrorContext(e)),
            }
        })
    }

    /// Every key under `prefix` with its ETag, in listing order.
    fn keys_with_etags(&self, prefix: &str) -> Vec<(String, String)> {
        self.rt.block_on(async {
            let mut keys = Vec::new();
            let mut token = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(self.bucket)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("ListObjectsV2 {}: {}", self.bucket, DisplayErrorContext(e)));
                for o in out.contents() {
                    keys.push((o.key().unwrap_or_default().to_owned(), o.e_tag().unwrap_or_default().to_owned()));
                }
                token = out.next_continuation_token().map(str::to_owned);
                if !out.is_truncated().unwrap_or(false) || token.is_none() {
                    return keys;
                }
            }
        })
    }

    /// Every data key under `prefix`: the mount's directory attribute records
    /// (`<dir>/.s3csi-attrs`) are left out.
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.keys_with_etags(prefix).into_iter().map(|(k, _)| k).filter(|k| !is_record(k)).collect()
    }
}

/// Whether `key` is a directory attribute record (s3csi's, not data).
fn is_record(key: &str) -> bool {
    key.rsplit('/').next() == Some(s3csi::fs::records::RECORD_NAME)
}

/// Set in the child process that [`isolated`] starts.
const ISOLATED_ENV: &str = "S3CSI_FS_WRITE_ISOLATED";

/// Runs `body` in a child process running only this test, on one thread.
///
/// The kernel sends FUSE FLUSH, which commits, on *every* close of a file descriptor, and a
/// fork + exec duplicates all of them and closes the copies: any other test thread that starts
/// a process (a mount, a server) commits the files this test has open. Tests that check what
/// is *not* committed yet, or how much is staged, run alone in their own process instead.
fn isolated(test_name: &str, body: fn()) {
    if std::env::var_os(ISOLATED_ENV).is_some() {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    let out = Command::new(exe)
        .args([test_name, "--exact", "--test-threads=1", "--nocapture"])
        .env(ISOLATED_ENV, "1")
        .stdin(Stdio::null())
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- isolated run of {test_name} ---\n{stderr}");
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "isolated run of {test_name} failed ({})\n--- stdout ---\n{stdout}",
        out.status
    );
}

// --- 2. A large sequential write ---

#[test]
fn one_gib_sequential_write_streams_parts_with_bounded_memory() {
    isolated(
        "one_gib_sequential_write_streams_parts_with_bounded_memory",
        one_gib_sequential_write_streams_parts_with_bounded_memory_body,
    );
}

fn one_gib_sequential_write_streams_parts_with_bounded_memory_body() {
    const SIZE: u64 = (1 << 30) + 123_457;
    const PART: u64 = 8 << 20;
    const WRITE_BUFFER: u64 = 64 << 20;
    const MEMORY_CACHE: u64 = 64 << 20;
    /// Runtime, SDK, FUSE buffers and the part being filled, on top of the two bounds.
    const SLACK: u64 = 200 << 20;
    let server = S3Server::start();
    let bucket = server.unique_bucket("one-gib");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(
        &server,
        &bucket,
        &[
            "--part-size",
            "8MiB",
            "--write-buffer-size",
            "64MiB",
            "--memory-cache-size",
            "64MiB",
            "--log-file",
            log.arg(),
        ],
    );
    let pid = daemon_pid(mount.path());
    let path = mount.join("big.bin");
    let started = Instant::now();
    let mut f = File::create(&path).expect("create big.bin");
    let mut rng = StdRng::seed_from_u64(0x1_61b);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB];
    let mut written = 0u64;
    while written < SIZE {
        let n = (SIZE - written).min(MIB as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write at offset {written}: {e}"));
        written += n as u64;
        if written == 512 << 20 {
            // Visible (with its current size) in the mount while being written; not yet in S3.
            assert_eq!(std::fs::metadata(&path).expect("stat while writing").len(), written, "size while writing");
            assert!(list_dir(mount.path()).contains(&"big.bin".to_owned()), "big.bin listed while writing");
            assert!(store.head("big.bin").is_none(), "big.bin must not be in S3 before close");
        }
    }
    close_checked(f).expect("close of the 1 GiB file");
    let elapsed = started.elapsed();
    let want = hex::encode(hasher.finalize());
    let hwm = vm_hwm_bytes(pid);
    eprintln!(
        "wrote {SIZE} bytes in {elapsed:?} ({:.0} MiB/s); daemon VmHWM {} MiB",
        SIZE as f64 / MIB as f64 / elapsed.as_secs_f64(),
        hwm >> 20
    );
    assert_eq!(std::fs::metadata(&path).expect("stat after close").len(), SIZE, "size after close");
    mount.unmount();

    let (got, n) = store.sha256_streamed("big.bin");
    assert_eq!(n, SIZE, "object size in S3");
    assert_eq!(got, want, "sha256 of the object in S3");

    let head = store
        .rt
        .block_on(async { store.client.head_object().bucket(&bucket).key("big.bin").part_number(1).send().await });
    let want_parts = SIZE.div_ceil(PART);
    let parts = match head.ok().and_then(|h| h.parts_count()) {
        Some(n) => u64::try_from(n).expect("positive part count"),
        None => {
            // s3s-fs ignores partNumber: the multipart ETag ends in `-<parts>`.
            let etag = store.head("big.bin").and_then(|h| h.e_tag().map(str::to_owned)).expect("ETag of big.bin");
            let suffix = etag.trim_matches('"').rsplit_once('-').map(|(_, n)| n.to_owned());
            suffix.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("ETag {etag} is not a multipart ETag"))
        }
    };
    assert_eq!(parts, want_parts, "parts of a {SIZE}-byte object written with --part-size 8MiB");
    let bound = WRITE_BUFFER + MEMORY_CACHE + SLACK;
    assert!(
        hwm < bound,
        "daemon peak RSS {} MiB exceeds write buffer + memory cache + slack = {} MiB",
        hwm >> 20,
        bound >> 20
    );
}

// --- 3. The server dies during a large write ---

/// An s3s-fs child on a fixed port and data root, so it can be killed and started again.
struct OwnS3sFs {
    exe: PathBuf,
    root: PathBuf,
    port: u16,
    access_key: String,
    secret_key: String,
    log: PathBuf,
    child: Option<Child>,
}

impl OwnS3sFs {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self, rt: &tokio::runtime::Runtime, client: &Client) {
        assert!(self.child.is_none(), "already running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = OpenOptions::new().create(true).append(true).open(&self.log).expect("server log");
            let mut cmd = Command::new(&self.exe);
            cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()]);
            cmd.args(["--access-key", &self.access_key, "--secret-key", &self.secret_key]);
            cmd.arg(&self.root);
            cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log).process_group(0);
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent; the server
            // dies with the test thread even if Drop never runs.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", self.exe.display()));
            let ready = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || rt.block_on(async { client.list_buckets().send().await.is_ok() })
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            // The old listener's port may still be held for a moment after a kill.
            if Instant::now() > deadline {
                panic!(
                    "s3s-fs on port {} did not become ready\n--- server log ---\n{}",
                    self.port,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain syscall on a child we spawned and have not reaped yet.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Multipart uploads created and neither completed nor aborted: s3s-fs has no
    /// ListMultipartUploads, and keeps each upload as `.upload-<id>.json` in its root.
    fn pending_uploads(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .expect("read s3s-fs root")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(".upload-")?.strip_suffix(".json").map(str::to_owned)
            })
            .collect();
        ids.sort();
        ids
    }
}

impl Drop for OwnS3sFs {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sdk_client(endpoint: &str, access_key: &str, secret_key: &str) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(access_key, secret_key, None, None, "s3csi-write-test"))
        .force_path_style(true)
        .http_client(http)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        // Fail fast while the server is down: this client only checks state.
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

#[test]
fn server_dying_during_a_large_write_fails_with_eio_and_leaves_no_object() {
    isolated(
        "server_dying_during_a_large_write_fails_with_eio_and_leaves_no_object",
        server_dying_during_a_large_write_fails_with_eio_and_leaves_no_object_body,
    );
}

fn server_dying_during_a_large_write_fails_with_eio_and_leaves_no_object_body() {
    const TOTAL: usize = 100 * MIB;
    const KILL_AT: usize = 40 * MIB;
    /// Retries (6 attempts with backoff) of the parts in flight and of the abort, with room.
    const FAIL_WITHIN: Duration = Duration::from_secs(120);
    let exe = find_program("s3s-fs").expect("s3s-fs is not installed; see tests/common/mod.rs");
    let dir = tempfile::Builder::new().prefix("s3csi-dying-").tempdir().expect("tempdir");
    let root = dir.path().join("data");
    let bucket = format!("s3csi-dying-{}", std::process::id());
    std::fs::create_dir_all(root.join(&bucket)).expect("bucket directory");
    let mut server = OwnS3sFs {
        exe,
        root: root.clone(),
        port: free_port(),
        access_key: "s3csi-dying-ak".to_owned(),
        secret_key: "s3csi-dying-secret-key".to_owned(),
        log: dir.path().join("server.log"),
        child: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = sdk_client(&server.endpoint(), &server.access_key, &server.secret_key);
    server.start(&rt, &client);
    let store = Store { rt: &rt, client: &client, bucket: &bucket };

    let log = DaemonLog::new();
    let mnt_dir = tempfile::Builder::new().prefix("s3csi-mnt-").tempdir().expect("tempdir for the mountpoint");
    let mountpoint = mnt_dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).expect("mountpoint");
    let cmd = MountCommand {
        bucket: bucket.clone(),
        mountpoint: mountpoint.canonicalize().expect("canonical mountpoint"),
        endpoint: server.endpoint(),
        region: "us-east-1".to_owned(),
        env: vec![
            ("AWS_ACCESS_KEY_ID".to_owned(), server.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), server.secret_key.clone()),
            ("AWS_REGION".to_owned(), "us-east-1".to_owned()),
        ],
        args: ["--part-size", "8MiB", "--log-file", log.arg()].iter().map(|s| s.to_string()).collect(),
    };
    let mount = Mount::try_with(cmd, Some(mnt_dir))
        .unwrap_or_else(|out| panic!("mount failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr)));

    // The writer pauses after KILL_AT bytes until the server is gone, writes the rest, fsyncs,
    // waits until the server is back, fsyncs again and closes: the file must stay failed.
    let (reached_tx, reached_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (synced_tx, synced_rx) = mpsc::channel();
    let (back_tx, back_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let path = mount.join("big.bin");
    let data = random_bytes(3, MIB);
    std::thread::spawn(move || {
        let mut f = File::create(&path).expect("create big.bin");
        let mut written = 0;
        let mut write_err = None;
        while written < TOTAL {
            if written == KILL_AT {
                let _ = reached_tx.send(());
                let _ = go_rx.recv();
            }
            if let Err(e) = f.write_all(&data) {
                write_err = Some(e);
                break;
            }
            written += MIB;
        }
        let fsync = f.sync_all();
        let _ = synced_tx.send((written, write_err, fsync, Instant::now()));
        let _ = back_rx.recv();
        let fsync_again = f.sync_all();
        let _ = done_tx.send((fsync_again, close_checked(f)));
    });
    reached_rx.recv_timeout(Duration::from_secs(120)).expect("writer reached 40 MiB");
    server.kill();
    let killed_at = Instant::now();
    go_tx.send(()).expect("writer waiting");
    let (written, write_err, fsync, failed_at) = synced_rx
        .recv_timeout(FAIL_WITHIN)
        .unwrap_or_else(|_| panic!("write + fsync did not return within {FAIL_WITHIN:?} after the server died"));
    eprintln!(
        "after the kill: wrote up to {} MiB, write error {:?}, fsync {:?}, {:?} after the kill",
        written >> 20,
        write_err.as_ref().map(|e| e.to_string()),
        fsync.as_ref().map_err(|e| e.to_string()),
        failed_at - killed_at
    );
    if let Some(e) = &write_err {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "a failing write reports EIO, got {e}");
    }
    assert_eq!(errno(&fsync), Some(libc::EIO), "fsync must fail with EIO: the object cannot hold the bytes written");

    server.start(&rt, &client);
    back_tx.send(()).expect("writer waiting for the restart");
    let (fsync_again, close) = done_rx.recv_timeout(FAIL_WITHIN).expect("second fsync and close return");
    assert_eq!(errno(&fsync_again), Some(libc::EIO), "the file stays failed: fsync once the server is back");
    assert_eq!(errno(&close), Some(libc::EIO), "the file stays failed: close once the server is back");
    assert!(store.head("big.bin").is_none(), "no partial object after the failed upload");
    assert_eq!(store.keys(""), Vec::<String>::new(), "bucket stays empty");
    // The mount keeps working once the server is back.
    write_file(&mount.join("after.txt"), b"server is back").expect("write after the server restarted");
    assert_eq!(store.get("after.txt").as_deref(), Some(&b"server is back"[..]));
    // The aborts ran while the server was down; give a later retry a moment (and the unmount)
    // before judging.
    wait_until(Duration::from_secs(15), || server.pending_uploads().is_empty());
    mount.unmount();
    let pending = server.pending_uploads();
    let leftover_parts: Vec<String> = std::fs::read_dir(&root)
        .expect("read s3s-fs root")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    assert!(
        pending.is_empty(),
        "multipart uploads left pending after the failed write (the abort was sent while the server was \
         down and never retried): {pending:?}; {} part files remain in the s3s-fs root",
        leftover_parts.len()
    );
}

// --- 4. Many small files ---

/// s3s-fs cannot store markers: each directory gets its files right after `mkdir`, while the
/// mount still knows it from memory (a marker-only directory would answer HEAD with 500 there).
#[test]
fn thousand_small_files_in_nested_directories_survive_a_remount() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("small-files");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let content = |i: usize, j: usize, k: usize| random_bytes((i * 100 + j * 10 + k) as u64, 4 * KIB);
    let started = Instant::now();
    for i in 0..10 {
        for j in 0..10 {
            let leaf = mount.join(format!("d{i}/d{j}"));
            std::fs::create_dir_all(&leaf).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", leaf.display()));
            for k in 0..10 {
                let p = leaf.join(format!("f{k}"));
                write_file(&p, &content(i, j, k)).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
            }
        }
    }
    eprintln!("wrote 1000 files of 4 KiB in {:?}", started.elapsed());
    mount.unmount();
    let files: Vec<String> = store.keys("").into_iter().filter(|k| !k.ends_with('/')).collect();
    assert_eq!(files.len(), 1000, "objects in S3");

    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let want_dirs: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
    assert_eq!(list_dir(mount.path()), want_dirs, "top-level directories after remount");
    for i in 0..10 {
        assert_eq!(list_dir(&mount.join(format!("d{i}"))), want_dirs, "directories in d{i}");
        for j in 0..10 {
            let leaf = mount.join(format!("d{i}/d{j}"));
            let want_files: Vec<String> = (0..10).map(|k| format!("f{k}")).collect();
            assert_eq!(list_dir(&leaf), want_files, "files in d{i}/d{j}");
            for k in 0..10 {
                let p = leaf.join(format!("f{k}"));
                let got = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                assert_same_bytes(&got, &content(i, j, k), &format!("d{i}/d{j}/f{k} after remount"));
            }
        }
    }
    mount.unmount();
}

// --- 5. Renames and rmdir ---

#[test]
fn directory_rename_moves_every_key_of_a_thousand_file_tree() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("rename-tree");
    let store = Store::of(&server, &bucket);
    let mut objects = vec![("src/".to_owned(), Vec::new()), ("src/sub3/".to_owned(), Vec::new())];
    for i in 0..10 {
        for k in 0..100 {
            objects.push((format!("src/sub{i}/file{k:03}"), random_bytes((i * 1000 + k) as u64, 100 + k)));
        }
    }
    objects.push(("other/keep.txt".to_owned(), b"not moved".to_vec()));
    server.put_many(&bucket, objects.clone(), 16);
    let before: BTreeMap<String, String> = store.keys_with_etags("src/").into_iter().collect();
    assert_eq!(before.len(), 1002, "seeded keys under src/");

    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let started = Instant::now();
    std::fs::rename(mount.join("src"), mount.join("dst")).expect("rename src -> dst");
    eprintln!("renamed a 1000-file tree in {:?}", started.elapsed());

    assert_eq!(store.keys("src/"), Vec::<String>::new(), "keys left under the old prefix");
    let after: BTreeMap<String, String> = store.keys_with_etags("dst/").into_iter().collect();
    let want: BTreeMap<String, String> =
        before.iter().map(|(k, etag)| (format!("dst/{}", &k["src/".len()..]), etag.clone())).collect();
    assert_eq!(after.len(), want.len(), "keys under the new prefix");
    for (key, etag) in &want {
        assert_eq!(after.get(key), Some(etag), "{key} after the rename (ETag = MD5 of the content)");
    }
    assert_eq!(store.get("other/keep.txt").as_deref(), Some(&b"not moved"[..]), "unrelated key untouched");
    for (key, data) in objects.iter().filter(|(k, _)| k.ends_with("7")) {
        let new = format!("dst/{}", &key["src/".len()..]);
        let got = std::fs::read(mount.join(&new)).unwrap_or_else(|e| panic!("read {new} through the mount: {e}"));
        assert_same_bytes(&got, data, &format!("{new} through the mount"));
    }
    assert_eq!(errno(&std::fs::metadata(mount.join("src"))), Some(libc::ENOENT), "old name is gone");
    assert_eq!(list_dir(mount.path()), ["dst", "other"], "root after the rename");
    let subs: Vec<String> = (0..10).map(|i| format!("sub{i}")).collect();
    assert_eq!(list_dir(&mount.join("dst")), subs, "dst lists every subdirectory");
    assert_eq!(list_dir(&mount.join("dst/sub3")).len(), 100, "dst/sub3 lists its files");
    mount.unmount();
}

#[test]
fn rename_rmdir_unlink_and_mkdir_follow_posix() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("namespace");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let m = |p: &str| mount.join(p);

    // mkdir makes a marker; a second mkdir is EEXIST.
    std::fs::create_dir(m("d")).expect("mkdir d");
    assert!(store.head("d/").is_some(), "mkdir stores the marker d/");
    assert_eq!(errno(&std::fs::create_dir(m("d"))), Some(libc::EEXIST), "mkdir of an existing directory");

    // rmdir: ENOTEMPTY while it has an entry; then success, and the marker is gone.
    write_file(&m("d/f"), b"f").expect("write d/f");
    assert_eq!(errno(&std::fs::remove_dir(m("d"))), Some(libc::ENOTEMPTY), "rmdir of a non-empty directory");
    assert_eq!(errno(&std::fs::remove_file(m("d"))), Some(libc::EISDIR), "unlink of a directory");
    std::fs::remove_file(m("d/f")).expect("unlink d/f");
    assert!(store.head("d/f").is_none(), "unlink deletes the object");
    assert_eq!(list_dir(&m("d")), Vec::<String>::new(), "d is empty but still there (its marker)");
    std::fs::remove_dir(m("d")).expect("rmdir of the emptied directory");
    assert!(store.head("d/").is_none(), "rmdir removes the marker");
    assert_eq!(errno(&std::fs::metadata(m("d"))), Some(libc::ENOENT), "d after rmdir");
    assert_eq!(errno(&std::fs::remove_file(m("d"))), Some(libc::ENOENT), "unlink of a missing name");
    assert_eq!(errno(&std::fs::remove_dir(m("nothing"))), Some(libc::ENOENT), "rmdir of a missing name");

    // A file renamed over an existing file replaces it.
    write_file(&m("x"), b"content of x").expect("write x");
    write_file(&m("y"), b"content of y").expect("write y");
    std::fs::rename(m("x"), m("y")).expect("rename x over y");
    assert_eq!(store.get("y").as_deref(), Some(&b"content of x"[..]), "y holds x's bytes");
    assert!(store.head("x").is_none(), "x is gone from S3");
    assert_eq!(std::fs::read(m("y")).expect("read y"), b"content of x");
    assert_eq!(errno(&std::fs::metadata(m("x"))), Some(libc::ENOENT), "x after the rename");

    // RENAME_NOREPLACE: EEXIST with a target, a plain rename without one.
    write_file(&m("z"), b"content of z").expect("write z");
    assert_eq!(errno(&rename_noreplace(&m("z"), &m("y"))), Some(libc::EEXIST), "RENAME_NOREPLACE onto y");
    assert_eq!(store.get("y").as_deref(), Some(&b"content of x"[..]), "y untouched by RENAME_NOREPLACE");
    assert_eq!(store.get("z").as_deref(), Some(&b"content of z"[..]), "z untouched by RENAME_NOREPLACE");
    rename_noreplace(&m("z"), &m("z2")).expect("RENAME_NOREPLACE onto a free name");
    assert_eq!(store.get("z2").as_deref(), Some(&b"content of z"[..]));
    assert!(store.head("z").is_none(), "z is gone");

    // Files and directories do not replace each other.
    std::fs::create_dir(m("full")).expect("mkdir full");
    write_file(&m("full/inner"), b"inner").expect("write full/inner");
    std::fs::create_dir(m("empty")).expect("mkdir empty");
    assert_eq!(errno(&std::fs::rename(m("y"), m("full"))), Some(libc::EISDIR), "file over a directory");
    assert_eq!(errno(&std::fs::rename(m("y"), m("empty"))), Some(libc::EISDIR), "file over an empty directory");
    assert_eq!(errno(&std::fs::rename(m("full"), m("y"))), Some(libc::ENOTDIR), "directory over a file");
    std::fs::create_dir(m("other")).expect("mkdir other");
    write_file(&m("other/o"), b"o").expect("write other/o");
    assert_eq!(errno(&std::fs::rename(m("other"), m("full"))), Some(libc::ENOTEMPTY), "dir over a non-empty dir");
    assert_eq!(errno(&std::fs::rename(m("full"), m("full/sub"))), Some(libc::EINVAL), "dir into itself");
    assert_eq!(store.get("y").as_deref(), Some(&b"content of x"[..]), "y survives the refused renames");
    assert_eq!(store.get("full/inner").as_deref(), Some(&b"inner"[..]), "full/inner survives");

    // A directory replaces an empty directory; an empty directory moves as its marker.
    std::fs::rename(m("full"), m("empty")).expect("rename full over the empty directory");
    assert_eq!(store.keys(""), ["empty/", "empty/inner", "other/", "other/o", "y", "z2"], "keys after dir rename");
    std::fs::create_dir(m("lonely")).expect("mkdir lonely");
    std::fs::rename(m("lonely"), m("moved")).expect("rename an empty directory");
    assert!(store.head("moved/").is_some() && store.head("lonely/").is_none(), "the marker moved");
    assert_eq!(list_dir(mount.path()), ["empty", "moved", "other", "y", "z2"], "root listing");
    mount.unmount();

    // Everything above is what a fresh mount sees.
    let mount = Mount::new(&server, &bucket, &[]);
    assert_eq!(list_dir(mount.path()), ["empty", "moved", "other", "y", "z2"], "root listing after remount");
    assert!(std::fs::metadata(mount.join("moved")).expect("moved").is_dir(), "moved is a directory");
    assert_eq!(std::fs::read(mount.join("empty/inner")).expect("read empty/inner"), b"inner");
    mount.unmount();
}

// --- 6. fsync and what others see ---

#[test]
fn fsync_makes_bytes_durable_before_close_and_others_see_the_old_object_until_commit() {
    isolated(
        "fsync_makes_bytes_durable_before_close_and_others_see_the_old_object_until_commit",
        fsync_makes_bytes_durable_before_close_and_others_see_the_old_object_until_commit_body,
    );
}

fn fsync_makes_bytes_durable_before_close_and_others_see_the_old_object_until_commit_body() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("fsync");
    let store = Store::of(&server, &bucket);
    server.put(&bucket, "doc.txt", b"old content\n");
    let log = DaemonLog::new();
    let a = Mount::new(&server, &bucket, &["--part-size", "5MiB", "--log-file", log.arg()]);
    // A second client that asks S3 on every lookup and open.
    let b = Mount::new(&server, &bucket, &["--metadata-ttl", "0"]);

    // An existing object rewritten with O_TRUNC.
    let mut f = OpenOptions::new().write(true).truncate(true).open(a.join("doc.txt")).expect("open doc.txt");
    f.write_all(b"first half, ").expect("write");
    assert_eq!(store.get("doc.txt").as_deref(), Some(&b"old content\n"[..]), "S3 before fsync: the old object");
    assert_eq!(std::fs::read(b.join("doc.txt")).expect("read via b"), b"old content\n", "b before fsync");
    f.sync_all().expect("fsync");
    assert_eq!(store.get("doc.txt").as_deref(), Some(&b"first half, "[..]), "S3 right after fsync");
    assert_eq!(std::fs::read(b.join("doc.txt")).expect("read via b"), b"first half, ", "b after fsync");
    f.write_all(b"second half\n").expect("write after fsync");
    assert_eq!(store.get("doc.txt").as_deref(), Some(&b"first half, "[..]), "S3 between fsync and close");
    assert_eq!(std::fs::read(b.join("doc.txt")).expect("read via b"), b"first half, ", "b before close");
    close_checked(f).expect("close doc.txt");
    assert_eq!(store.get("doc.txt").as_deref(), Some(&b"first half, second half\n"[..]), "S3 after close");
    assert_eq!(std::fs::read(b.join("doc.txt")).expect("read via b"), b"first half, second half\n", "b after close");

    // A new file large enough to stream as a multipart upload.
    let data = random_bytes(6, 13 * MIB);
    let mut f = File::create(a.join("new.bin")).expect("create new.bin");
    f.write_all(&data[..11 * MIB]).expect("write 11 MiB");
    assert!(store.head("new.bin").is_none(), "no object before the first commit");
    assert_eq!(errno(&std::fs::metadata(b.join("new.bin"))), Some(libc::ENOENT), "b before the first commit");
    assert!(list_dir(a.path()).contains(&"new.bin".to_owned()), "listed in its own mount while written");
    assert_eq!(std::fs::metadata(a.join("new.bin")).expect("stat").len(), (11 * MIB) as u64, "size while written");
    f.sync_all().expect("fsync new.bin");
    let durable = store.get("new.bin").expect("object after fsync");
    assert_same_bytes(&durable, &data[..11 * MIB], "new.bin in S3 right after fsync");
    assert_same_bytes(&std::fs::read(b.join("new.bin")).expect("read via b"), &data[..11 * MIB], "b after fsync");
    f.write_all(&data[11 * MIB..]).expect("write the rest");
    assert_same_bytes(&store.get("new.bin").expect("object"), &data[..11 * MIB], "S3 between fsync and close");
    close_checked(f).expect("close new.bin");
    assert_same_bytes(&store.get("new.bin").expect("object"), &data, "new.bin in S3 after close");
    assert_same_bytes(&std::fs::read(b.join("new.bin")).expect("read via b"), &data, "b after close");

    // A new file that is read back is committed at that moment: one that already streams
    // parts ... The kernel may answer reads of bytes just written from its page cache without
    // asking the daemon, so the reads here use a second descriptor with O_DIRECT.
    let direct = |path: &Path| {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).expect("open with O_DIRECT")
    };
    let big = random_bytes(7, 12 * MIB);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("peek.bin"))
        .expect("create peek.bin");
    f.write_all(&big[..11 * MIB]).expect("write 11 MiB");
    assert!(store.head("peek.bin").is_none(), "peek.bin before the read");
    let r = direct(&a.join("peek.bin"));
    assert_same_bytes(&read_at_most(&r, 0, MIB).expect("pread"), &big[..MIB], "peek.bin read back");
    assert_same_bytes(&store.get("peek.bin").unwrap_or_default(), &big[..11 * MIB], "S3 after reading peek.bin");
    drop(r);
    f.write_all(&big[11 * MIB..]).expect("write the rest");
    close_checked(f).expect("close peek.bin");
    assert_same_bytes(&store.get("peek.bin").unwrap_or_default(), &big, "peek.bin after close");
    // ... and one smaller than a part.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("peek.txt"))
        .expect("create peek.txt");
    f.write_all(b"written so far").expect("write");
    assert!(store.head("peek.txt").is_none(), "peek.txt before the read");
    let r = direct(&a.join("peek.txt"));
    assert_eq!(read_at_most(&r, 0, 4096).expect("pread"), b"written so far", "peek.txt read back");
    // Smaller than one part: nothing was uploaded yet, so the read stages it locally instead.
    assert!(store.head("peek.txt").is_none(), "a read of a file under one part commits nothing");
    drop(r);
    f.write_all(b", and more").expect("write after the read");
    close_checked(f).expect("close peek.txt");
    assert_eq!(store.get("peek.txt").as_deref(), Some(&b"written so far, and more"[..]), "peek.txt after close");
    b.unmount();
    a.unmount();
}

#[test]
fn open_files_follow_unlink_and_rename() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("open-unlink");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let m = |p: &str| mount.join(p);

    // Unlinked before its first commit: never created.
    let mut f = File::create(m("new-gone")).expect("create new-gone");
    f.write_all(b"abc").expect("write");
    std::fs::remove_file(m("new-gone")).expect("unlink while open");
    f.write_all(b"def").expect("write after unlink");
    close_checked(f).expect("close after unlink");
    assert!(store.head("new-gone").is_none(), "a file unlinked while open is not re-created at close");
    assert_eq!(errno(&std::fs::metadata(m("new-gone"))), Some(libc::ENOENT), "new-gone after close");

    // Unlinked after an fsync: the object goes, and close does not bring it back.
    let mut f = File::create(m("synced-gone")).expect("create synced-gone");
    f.write_all(b"abc").expect("write");
    f.sync_all().expect("fsync");
    assert_eq!(store.get("synced-gone").as_deref(), Some(&b"abc"[..]), "after fsync");
    std::fs::remove_file(m("synced-gone")).expect("unlink while open");
    assert!(store.head("synced-gone").is_none(), "unlink deletes the committed object");
    f.write_all(b"def").expect("write after unlink");
    close_checked(f).expect("close after unlink");
    assert!(store.head("synced-gone").is_none(), "close after unlink does not re-create synced-gone");

    // Renamed while open: the rest of the writes land under the new name.
    let mut f = File::create(m("old-name")).expect("create old-name");
    f.write_all(b"first, ").expect("write");
    std::fs::rename(m("old-name"), m("new-name")).expect("rename while open");
    f.write_all(b"second").expect("write after rename");
    close_checked(f).expect("close after rename");
    assert_eq!(store.get("new-name").as_deref(), Some(&b"first, second"[..]), "new-name after close");
    assert!(store.head("old-name").is_none(), "old-name is not re-created");
    assert_eq!(store.keys(""), ["new-name"], "keys at the end");
    mount.unmount();
}

// --- 7. Attributes and symlinks ---

const MTIME_SECS: i64 = 981_173_106; // 2001-02-03 04:05:06 UTC
const MTIME_NSECS: i64 = 123_456_789;

/// Faithful only: directory attributes live in the marker, which s3s-fs cannot store.
#[test_case(Backend::Fast; "s3s_fs")]
#[test_case(Backend::Faithful; "moto")]
fn attributes_and_symlinks_persist_across_a_remount(backend: Backend) {
    let server = server_for(backend);
    let bucket = server.unique_bucket("attrs");
    let store = Store::of(&server, &bucket);
    server.put(&bucket, "plain.txt", b"plain");
    let log = DaemonLog::new();
    let args = ["--uid", "4321", "--gid", "8765", "--file-mode", "0640", "--dir-mode", "0750", "--log-file", log.arg()];
    let with_dirs = backend != Backend::Fast;

    let mount = Mount::new(&server, &bucket, &args);
    write_file(&mount.join("f.txt"), b"hello").expect("write f.txt");
    // Each change shows at once (the kernel keeps the attributes the daemon replies with) and
    // keeps the earlier ones.
    let f_attrs = |what: &str| {
        let m = std::fs::symlink_metadata(mount.join("f.txt")).unwrap_or_else(|e| panic!("stat f.txt {what}: {e}"));
        (m.mode() & 0o7777, m.uid(), m.gid())
    };
    std::fs::set_permissions(mount.join("f.txt"), std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    assert_eq!(f_attrs("after chmod").0, 0o600, "mode of f.txt right after chmod 600");
    std::os::unix::fs::chown(mount.join("f.txt"), Some(1234), Some(5678)).expect("chown 1234:5678");
    assert_eq!(f_attrs("after chown"), (0o600, 1234, 5678), "(mode, uid, gid) of f.txt right after chown");
    set_mtime(&mount.join("f.txt"), MTIME_SECS, MTIME_NSECS).expect("utimensat");
    assert_eq!(f_attrs("after utimes"), (0o600, 1234, 5678), "(mode, uid, gid) of f.txt right after utimes");
    std::os::unix::fs::symlink("f.txt", mount.join("link")).expect("symlink link -> f.txt");
    std::os::unix::fs::symlink("missing/target", mount.join("dangling")).expect("dangling symlink");
    if with_dirs {
        std::fs::create_dir(mount.join("d")).expect("mkdir d");
        std::fs::set_permissions(mount.join("d"), std::fs::Permissions::from_mode(0o700)).expect("chmod d");
        std::os::unix::fs::chown(mount.join("d"), Some(42), Some(43)).expect("chown d");
    }
    let check = |mount: &Mount, when: &str| {
        let m = std::fs::symlink_metadata(mount.join("f.txt")).expect("stat f.txt");
        assert_eq!(m.mode() & 0o7777, 0o600, "mode of f.txt {when}");
        assert!(m.is_file(), "f.txt is a regular file {when}");
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "owner of f.txt {when}");
        assert_eq!((m.mtime(), m.mtime_nsec()), (MTIME_SECS, MTIME_NSECS), "mtime of f.txt {when}");
        assert_eq!(std::fs::read(mount.join("f.txt")).expect("read f.txt"), b"hello", "f.txt {when}");
        let l = std::fs::symlink_metadata(mount.join("link")).expect("lstat link");
        assert!(l.file_type().is_symlink(), "link is a symlink {when}");
        assert_eq!(std::fs::read_link(mount.join("link")).expect("readlink"), Path::new("f.txt"), "link {when}");
        assert_eq!(std::fs::read(mount.join("link")).expect("read through link"), b"hello", "through link {when}");
        assert_eq!(
            std::fs::read_link(mount.join("dangling")).expect("readlink dangling"),
            Path::new("missing/target"),
            "dangling {when}"
        );
        let p = std::fs::metadata(mount.join("plain.txt")).expect("stat plain.txt");
        assert_eq!((p.mode() & 0o7777, p.uid(), p.gid()), (0o640, 4321, 8765), "plain.txt has the defaults {when}");
        if with_dirs {
            let d = std::fs::metadata(mount.join("d")).expect("stat d");
            assert!(d.is_dir(), "d is a directory {when}");
            assert_eq!((d.mode() & 0o7777, d.uid(), d.gid()), (0o700, 42, 43), "attributes of d {when}");
        }
    };
    check(&mount, "before unmount");
    mount.unmount();

    let meta = |key: &str| store.head(key).and_then(|h| h.metadata().cloned()).unwrap_or_default();
    let f = meta("f.txt");
    assert_eq!(f.get("s3csi-mode").map(String::as_str), Some("600"), "x-amz-meta-s3csi-mode of f.txt: {f:?}");
    assert_eq!(f.get("s3csi-uid").map(String::as_str), Some("1234"), "x-amz-meta-s3csi-uid: {f:?}");
    assert_eq!(f.get("s3csi-gid").map(String::as_str), Some("5678"), "x-amz-meta-s3csi-gid: {f:?}");
    assert!(f.contains_key("s3csi-mtime"), "x-amz-meta-s3csi-mtime: {f:?}");
    let l = meta("link");
    assert_eq!(l.get("s3csi-type").map(String::as_str), Some("symlink"), "x-amz-meta-s3csi-type of link: {l:?}");
    assert_eq!(store.get("link").as_deref(), Some(&b"f.txt"[..]), "a symlink object holds its target");
    assert!(meta("plain.txt").keys().all(|k| !k.starts_with("s3csi-")), "plain.txt gained no attributes");

    let mount = Mount::new(&server, &bucket, &args);
    check(&mount, "after remount");
    mount.unmount();
}

/// POSIX: writing a file sets its mtime to now, even after an explicit `utimes`.
#[test]
fn writing_after_utimes_moves_mtime_to_now_across_a_remount() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("mtime");
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let p = mount.join("t.txt");
    write_file(&p, b"one").expect("write t.txt");
    set_mtime(&p, MTIME_SECS, MTIME_NSECS).expect("utimensat");
    // (What stat shows right after utimes is checked in attributes_and_symlinks_persist_*.)
    let stored = Store::of(&server, &bucket).head("t.txt").and_then(|h| h.metadata().cloned()).unwrap_or_default();
    assert!(stored.contains_key("s3csi-mtime"), "utimes on a closed file is stored at once: {stored:?}");
    let before_write = std::time::SystemTime::now() - Duration::from_secs(2);
    let mut f = OpenOptions::new().append(true).open(&p).expect("open for append");
    f.write_all(b" two").expect("append");
    close_checked(f).expect("close");
    let mtime = std::fs::metadata(&p).expect("stat").modified().expect("mtime");
    assert!(mtime >= before_write, "mtime after the write is {mtime:?}, still the utimes value");
    mount.unmount();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let m = std::fs::metadata(mount.join("t.txt")).expect("stat after remount");
    assert_eq!(std::fs::read(mount.join("t.txt")).expect("read"), b"one two");
    assert!(
        m.modified().expect("mtime") >= before_write,
        "after remount, mtime of a file written after utimes is {}.{:09} (the old utimes value {MTIME_SECS}.{MTIME_NSECS})",
        m.mtime(),
        m.mtime_nsec()
    );
    mount.unmount();
}

// --- 8. Staging space ---

#[test]
fn overwriting_beyond_the_staging_bound_is_enospc() {
    isolated("overwriting_beyond_the_staging_bound_is_enospc", overwriting_beyond_the_staging_bound_is_enospc_body);
}

fn overwriting_beyond_the_staging_bound_is_enospc_body() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("enospc");
    let store = Store::of(&server, &bucket);
    let original = random_bytes(8, 3 * MIB);
    server.put(&bucket, "data.bin", &original);
    let cache = tempfile::Builder::new().prefix("s3csi-cache-").tempdir().expect("cache dir");
    let log = DaemonLog::new();
    let mount = Mount::new(
        &server,
        &bucket,
        &["--max-staging-size", "1MiB", "--cache-dir", cache.path().to_str().expect("utf-8"), "--log-file", log.arg()],
    );
    let staging = cache.path().join("s3csi-staging");

    let f = OpenOptions::new().write(true).open(mount.join("data.bin")).expect("open data.bin for writing");
    let patch = random_bytes(9, 2 * MIB);
    let offset = (MIB / 2) as u64;
    let mut done = 0;
    let err = loop {
        match f.write_at(&patch[done..], offset + done as u64) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => {
                done += n;
                if done == patch.len() {
                    panic!("a 2 MiB overwrite fit in a 1 MiB staging area");
                }
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "overwrite beyond --max-staging-size: {err}");
    assert!(done <= MIB, "{done} bytes accepted with 1 MiB of staging");
    assert!(staging.is_dir(), "staging lives under --cache-dir: {}", staging.display());
    close_checked(f).expect("close after ENOSPC commits the accepted bytes");
    let mut want = original.clone();
    want[MIB / 2..MIB / 2 + done].copy_from_slice(&patch[..done]);
    assert_same_bytes(&store.get("data.bin").expect("data.bin"), &want, "data.bin after the partial overwrite");
    assert_eq!(dir_size(&staging), 0, "staging is empty after close");

    // The space is given back: a smaller overwrite fits now.
    let f = OpenOptions::new().write(true).open(mount.join("data.bin")).expect("reopen");
    f.write_all_at(&patch[..MIB / 2], 0).expect("512 KiB overwrite after the space was freed");
    close_checked(f).expect("close");
    want[..MIB / 2].copy_from_slice(&patch[..MIB / 2]);
    assert_same_bytes(&store.get("data.bin").expect("data.bin"), &want, "data.bin after the second overwrite");
    mount.unmount();
}

// --- 9. Concurrency ---

#[test]
fn concurrent_writers_to_different_files_all_land_intact() {
    const THREADS: usize = 4;
    const SIZE: usize = 20 * MIB;
    let server = S3Server::start();
    let bucket = server.unique_bucket("concurrent");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let path = mount.join(format!("w{t}.bin"));
            s.spawn(move || {
                let data = random_bytes(100 + t as u64, SIZE);
                let mut f = File::create(&path).expect("create");
                // Uneven chunk sizes, different per thread.
                let chunk = 64 * KIB + t * 4099;
                for piece in data.chunks(chunk) {
                    f.write_all(piece).expect("write");
                }
                close_checked(f).unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
            });
        }
    });
    for t in 0..THREADS {
        let want = sha256(&random_bytes(100 + t as u64, SIZE));
        let (got, n) = store.sha256_streamed(&format!("w{t}.bin"));
        assert_eq!((got, n), (want, SIZE as u64), "w{t}.bin in S3");
    }
    mount.unmount();
}

// --- Shared state and refusals ---

/// `close` returns when FLUSH (the commit) is done; the kernel sends RELEASE afterwards without
/// waiting, so the next `open` may reach the daemon before that RELEASE. It must still see the
/// bytes just committed.
#[test]
fn reading_right_after_close_sees_the_bytes_just_written() {
    const ROUNDS: usize = 50;
    let server = S3Server::start();
    let bucket = server.unique_bucket("read-after-close");
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let p = mount.join("f.bin");
    let mut want = random_bytes(10, 50 * KIB);
    write_file(&p, &want).expect("write f.bin");
    let mut bad = Vec::new();
    for round in 0..ROUNDS {
        // In place (staged) ...
        let patch = random_bytes(11 + round as u64, KIB);
        let at = (round * 997) % (want.len() - KIB);
        let f = OpenOptions::new().write(true).open(&p).expect("open for writing");
        f.write_all_at(&patch, at as u64).expect("pwrite");
        close_checked(f).expect("close after pwrite");
        want[at..at + KIB].copy_from_slice(&patch);
        let got = std::fs::read(&p).expect("read after pwrite + close");
        if got != want {
            bad.push(format!("round {round} after pwrite: read {} bytes, want {}", got.len(), want.len()));
        }
        // ... and rewritten from scratch (streamed).
        want = random_bytes(1000 + round as u64, 20 * KIB + round);
        write_file(&p, &want).expect("rewrite");
        let got = std::fs::read(&p).expect("read after create + close");
        if got != want {
            bad.push(format!("round {round} after rewrite: read {} bytes, want {}", got.len(), want.len()));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} reads right after close returned other bytes:\n{}",
        bad.len(),
        2 * ROUNDS,
        bad.join("\n")
    );
    mount.unmount();
}

#[test]
fn two_handles_on_one_file_share_its_state_and_the_last_close_wins() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("two-handles");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    let p = mount.join("shared.txt");
    let h1 = OpenOptions::new().write(true).create(true).truncate(true).open(&p).expect("open h1");
    let h2 = OpenOptions::new().read(true).write(true).open(&p).expect("open h2");
    h1.write_all_at(b"AAAAAA", 0).expect("h1 write");
    h2.write_all_at(b"BBBB", 4).expect("h2 write");
    assert_eq!(read_at_most(&h2, 0, 100).expect("read via h2"), b"AAAABBBB", "one state seen by both handles");
    close_checked(h1).expect("close h1");
    assert_eq!(store.get("shared.txt").as_deref(), Some(&b"AAAABBBB"[..]), "S3 after the first close");
    h2.write_all_at(b"CC", 8).expect("h2 write after h1 closed");
    close_checked(h2).expect("close h2");
    assert_eq!(store.get("shared.txt").as_deref(), Some(&b"AAAABBBBCC"[..]), "S3 after the last close");
    let mut got = Vec::new();
    File::open(&p).expect("reopen").read_to_end(&mut got).expect("read");
    assert_eq!(got, b"AAAABBBBCC");
    mount.unmount();
}

#[test]
fn hard_links_and_device_nodes_are_refused() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("refusals");
    let store = Store::of(&server, &bucket);
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--log-file", log.arg()]);
    write_file(&mount.join("a"), b"a").expect("write a");
    let link = std::fs::hard_link(mount.join("a"), mount.join("b"));
    assert!(
        matches!(errno(&link), Some(libc::ENOTSUP) | Some(libc::EPERM)),
        "hard link: {link:?} (want ENOTSUP or EPERM)"
    );
    let fifo = c_path(&mount.join("fifo"));
    // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
    let r = check_rc(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) });
    assert!(matches!(errno(&r), Some(libc::ENOTSUP) | Some(libc::EPERM)), "mkfifo: {r:?} (want ENOTSUP or EPERM)");
    assert_eq!(store.keys(""), ["a"], "nothing but a in the bucket");
    assert!(matches!(std::fs::metadata(mount.join("b")).map_err(|e| e.kind()), Err(ErrorKind::NotFound)));
    mount.unmount();
}

#[test]
fn read_only_mount_refuses_attribute_changes_and_links_with_erofs() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("ro-attrs");
    server.put(&bucket, "file.txt", b"keep me");
    let log = DaemonLog::new();
    let mount = Mount::new(&server, &bucket, &["--read-only", "--log-file", log.arg()]);
    let file = mount.join("file.txt");
    let fifo = c_path(&mount.join("fifo"));
    let attempts: Vec<(&str, Option<i32>)> = vec![
        ("truncate", errno(&truncate_path(&file, 1))),
        ("chmod", errno(&std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)))),
        ("chown", errno(&std::os::unix::fs::chown(&file, Some(1234), Some(5678)))),
        ("utimes", errno(&set_mtime(&file, MTIME_SECS, MTIME_NSECS))),
        ("symlink", errno(&std::os::unix::fs::symlink("file.txt", mount.join("link")))),
        ("hard link", errno(&std::fs::hard_link(&file, mount.join("hard")))),
        // SAFETY: `fifo` is a valid NUL-terminated path that outlives the call.
        ("mkfifo", errno(&check_rc(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }))),
    ];
    for (what, got) in attempts {
        assert_eq!(got, Some(libc::EROFS), "{what} on a --read-only mount");
    }
    let m = std::fs::metadata(&file).expect("stat file.txt");
    assert_eq!((m.len(), m.mode() & 0o7777), (7, 0o644), "file.txt unchanged");
    assert_eq!(Store::of(&server, &bucket).keys(""), ["file.txt"], "no new keys");
    mount.unmount();
}

/// moto's CompleteMultipartUpload reply is one the SDK rejects, although moto did commit the
/// object: the commit is then verified by the object's multipart ETag, and `close` succeeds.
/// The same path covers a reply lost to a dropped connection on any server.
#[test]
fn a_multipart_commit_with_an_unreadable_reply_is_verified_by_its_etag() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("lost-reply");
    let mount = Mount::new(&server, &bucket, &["--part-size", "5MiB"]);
    let data = common::random_bytes(11, (12 << 20) + 123);
    write_file(&mount.join("big.bin"), &data).expect("close reports success");
    let got = server.get(&bucket, "big.bin");
    assert!(got == data, "the object holds exactly what was written ({} bytes)", got.len());
    let etag = server.block_on(async {
        server.client().head_object().bucket(&bucket).key("big.bin").send().await.unwrap().e_tag().unwrap().to_owned()
    });
    assert!(etag.trim_matches('"').ends_with("-3"), "three parts: {etag}");
    mount.unmount();
}
