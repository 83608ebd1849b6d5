//! A mount whose S3 server stops answering: a TCP proxy between the mount and a real server on
//! 127.0.0.1 black-holes every connection (accepts, never answers) mid-read, mid-upload and
//! during a listing. Each operation must fail with `EIO` within the documented bound
//! (`--s3-timeout`), nothing half-written may become visible in S3, and once the proxy forwards
//! again the same operations work and return the right bytes. A slow but working link must not
//! trip the limit.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{Mount, MountCommand, S3Server, random_bytes, sha256, sha256_file, wait_until};

const MIB: usize = 1 << 20;
/// The stall limit the tests mount with (`--s3-timeout`), short to keep them quick.
const STALL_SECS: u64 = 6;
/// Scheduling slack on top of a bound.
const SLACK: Duration = Duration::from_secs(4);

/// Mounts `bucket` through `proxy` with the test's stall limit (and `extra` options).
fn mount_through(server: &S3Server, proxy: &FaultProxy, bucket: &str, extra: &[&str]) -> Mount {
    let dir = tempfile::Builder::new().prefix("s3csi-mnt-").tempdir().unwrap();
    let mountpoint: PathBuf = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let stall = STALL_SECS.to_string();
    let mut args = vec!["--s3-timeout", &stall];
    args.extend_from_slice(extra);
    let mut cmd = MountCommand::new(server, bucket, &mountpoint, &args);
    cmd.endpoint = proxy.endpoint();
    Mount::try_with(cmd, Some(dir)).unwrap_or_else(|out| panic!("mount failed: {out:?}"))
}

/// `close(2)` of `file`, returning its errno on failure (dropping a `File` ignores it).
fn close(file: File) -> Result<(), i32> {
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just released by `File` and is closed exactly once here.
    let rc = unsafe { libc::close(fd) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) }
}

/// Waits (bounded) until `cond` holds, failing the test with `what` otherwise.
fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    assert!(wait_until(Duration::from_secs(60), cond), "timed out waiting for {what}");
}

#[test]
fn a_read_from_a_server_that_stops_answering_fails_with_eio_in_bound_then_recovers() {
    const SIZE: usize = 48 * MIB;
    let server = S3Server::start();
    let bucket = server.unique_bucket("hung-read");
    let data = random_bytes(7, SIZE);
    server.put(&bucket, "big", &data);
    let proxy = FaultProxy::start(server.endpoint());
    let mount = mount_through(&server, &proxy, &bucket, &[]);
    let path = mount.join("big");

    // Read sequentially; black-hole the server once some of the object has arrived.
    let mut f = File::open(&path).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut got = 0usize;
    let before = proxy.bytes_down();
    while proxy.bytes_down() < before + 4 * MIB as u64 {
        let n = f.read(&mut buf).unwrap();
        assert!(n > 0, "object ended before the fault");
        assert_eq!(buf[..n], data[got..got + n], "bytes at {got}");
        got += n;
    }
    proxy.blackhole();
    let hung_at = Instant::now();
    let err = loop {
        match f.read(&mut buf) {
            Ok(0) => panic!("read the whole object although the server stopped answering"),
            Ok(n) => {
                assert_eq!(buf[..n], data[got..got + n], "bytes at {got}");
                got += n;
            }
            Err(e) => break e,
        }
    };
    let waited = hung_at.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The stall limit, plus a third of it for the kernel retrying its failed read-ahead.
    let bound = Duration::from_secs(STALL_SECS + STALL_SECS / 3) + SLACK;
    assert!(waited <= bound, "EIO came after {waited:?}");
    eprintln!("read failed with EIO {waited:?} after the server stopped answering, at byte {got}");
    drop(f);

    // A listing while the server is still gone fails the same way.
    let started = Instant::now();
    let err = std::fs::read_dir(mount.join("never-listed")).map(|_| ()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() <= Duration::from_secs(STALL_SECS) + SLACK, "listing took {:?}", started.elapsed());

    // Back to normal: a fresh read returns every byte.
    proxy.resume();
    let (sum, n) = sha256_file(&path, MIB).unwrap();
    assert_eq!(n, SIZE as u64);
    assert_eq!(sum, sha256(&data), "re-read after recovery");
    mount.unmount();
}

#[test]
fn an_upload_cut_mid_way_fails_close_with_eio_and_leaves_the_old_object_whole() {
    const SIZE: usize = 40 * MIB;
    let server = S3Server::start();
    let bucket = server.unique_bucket("hung-write");
    let old = random_bytes(1, 3 * MIB);
    server.put(&bucket, "file", &old);
    let proxy = FaultProxy::start(server.endpoint());
    let mount = mount_through(&server, &proxy, &bucket, &["--part-size", "5MiB"]);

    let data = random_bytes(2, SIZE);
    let mut f = File::create(mount.join("file")).unwrap();
    let before = proxy.bytes_up();
    let mut written = 0;
    let mut write_error = None;
    let mut hung_at = None;
    while written < SIZE {
        if hung_at.is_none() && proxy.bytes_up() > before + 8 * MIB as u64 {
            proxy.blackhole();
            hung_at = Some(Instant::now());
        }
        match f.write(&data[written..(written + MIB).min(SIZE)]) {
            Ok(n) => written += n,
            Err(e) => {
                write_error = Some(e);
                break;
            }
        }
        if hung_at.is_none() && written >= SIZE {
            panic!("the whole file was written before any part reached the server");
        }
    }
    let hung_at = hung_at.unwrap_or_else(|| {
        proxy.blackhole();
        Instant::now()
    });
    let closed = close(f);
    let waited = hung_at.elapsed();
    if let Some(e) = &write_error {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "write failed with {e}");
    }
    assert_eq!(closed, Err(libc::EIO), "close must report the failed upload");
    // Parts of 5 MiB may each take their body's time at 1 MiB/s on top of the stall limit.
    let bound = Duration::from_secs(STALL_SECS) + Duration::from_secs(10) + SLACK;
    assert!(waited <= bound, "close returned after {waited:?}");
    eprintln!("close failed with EIO {waited:?} after the server stopped answering");

    proxy.resume();
    // Nothing torn: the object is still the old one, whole.
    assert_eq!(sha256(&server.get(&bucket, "file")), sha256(&old), "S3 holds the old object");
    // The mount works again: the same file written now lands whole.
    std::fs::write(mount.join("file"), &data).unwrap();
    wait_for("the rewrite to be visible", || server.get(&bucket, "file").len() == SIZE);
    assert_eq!(sha256(&server.get(&bucket, "file")), sha256(&data));
    mount.unmount();
}

#[test]
fn a_slow_but_working_server_never_trips_the_limit() {
    const SIZE: usize = 12 * MIB;
    let server = S3Server::start();
    let bucket = server.unique_bucket("slow");
    let data = random_bytes(3, SIZE);
    server.put(&bucket, "slow", &data);
    let proxy = FaultProxy::start(server.endpoint());
    let mount = mount_through(&server, &proxy, &bucket, &["--part-size", "5MiB"]);
    // 1 MiB/s per connection: a 1 MiB block takes a second, whole requests much longer than
    // the per-attempt wait (a third of the limit), yet bytes keep coming.
    proxy.throttle(Some(MIB as u64));
    let (sum, n) = sha256_file(&mount.join("slow"), MIB).unwrap();
    assert_eq!(n, SIZE as u64);
    assert_eq!(sum, sha256(&data));
    // Uploads too: a 10 MiB file as two 5 MiB parts at 1 MiB/s.
    let up = random_bytes(4, 10 * MIB);
    let mut f = File::create(mount.join("up")).unwrap();
    f.write_all(&up).unwrap();
    assert_eq!(close(f), Ok(()));
    proxy.throttle(None);
    assert_eq!(sha256(&server.get(&bucket, "up")), sha256(&up));
    mount.unmount();
}
