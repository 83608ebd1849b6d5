//! Mounted-filesystem tests: the real `s3csi` binary mounts a bucket of a real S3 server on
//! 127.0.0.1 with a real FUSE mount, and the tests use plain file syscalls on it.
//!
//! Each test makes its own bucket (and usually its own server), so tests run in parallel.
//! Big-data tests use the fast server (s3s-fs); the semantics s3s-fs cannot store (directory
//! markers, `x` next to `x/y`, odd keys) run on the faithful one (moto).

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    Backend, Mount, MountCommand, S3Server, assert_same_bytes, dir_size, free_port, is_fuse_mount, is_mounted,
    list_dir, processes_with_arg, random_bytes, raw_readdir, read_at_most, server_for, sha256, sha256_file,
    wait_no_daemon, wait_timeout, wait_until,
};
use rand::{Rng, SeedableRng};
use test_case::test_case;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// The binary's block size: reads crossing these boundaries join two blocks.
const BLOCK: usize = MIB;
/// `--metadata-ttl` when not given.
const DEFAULT_METADATA_TTL: Duration = Duration::from_secs(1);
/// Slack on top of a TTL before expecting the change (timer granularity, slow CI).
const TTL_SLACK: Duration = Duration::from_millis(700);

fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

// --- Reading data ---

#[test]
fn large_object_reads_back_with_the_same_sha256() {
    const SIZE: usize = 256 * MIB;
    let server = S3Server::start();
    let bucket = server.unique_bucket("large");
    let data = random_bytes(1, SIZE);
    let want = sha256(&data);
    server.put(&bucket, "big.bin", &data);
    drop(data);
    let mount = Mount::new(&server, &bucket, &[]);

    let path = mount.join("big.bin");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE as u64);
    let started = Instant::now();
    let (got, n) = sha256_file(&path, MIB).unwrap();
    eprintln!("read 256 MiB through the mount in {:?}", started.elapsed());
    assert_eq!(n, SIZE as u64, "bytes read");
    assert_eq!(got, want, "sha256 of big.bin read through the mount");
}

#[test]
fn random_preads_match_the_object() {
    const SIZE: usize = 9 * MIB + 12_345;
    let size = SIZE as u64;
    let server = S3Server::start();
    let bucket = server.unique_bucket("pread");
    let data = random_bytes(2, SIZE);
    server.put(&bucket, "odd.bin", &data);
    let mount = Mount::new(&server, &bucket, &[]);
    let file = File::open(mount.join("odd.bin")).unwrap();

    let check = |offset: u64, len: usize| {
        let got = read_at_most(&file, offset, len).unwrap_or_else(|e| panic!("pread(offset {offset}, len {len}): {e}"));
        let start = offset.min(size) as usize;
        let end = (offset + len as u64).min(size) as usize;
        assert_same_bytes(&got, &data[start..end], &format!("pread(offset {offset}, len {len})"));
    };
    let b = BLOCK as u64;
    let fixed: &[(u64, usize)] = &[
        (0, 1),
        (b - 1, 2),              // straddles the first block boundary
        (b - 7, BLOCK + 14),     // covers a whole block plus both neighbours' edges
        (3 * b + 1, 3 * BLOCK),  // spans four blocks
        (5 * b, BLOCK),          // exactly one block
        (size - 1, 1),           // last byte
        (size - 100, 100),       // ends exactly at EOF
        (size - 100, 1000),      // crosses EOF: short read
        (size, 1),               // at EOF: nothing
        (size, BLOCK),           // at EOF: nothing
        (size + 1, 10),          // past EOF: nothing
        (size + 5 * b, 4 * KIB), // far past EOF: nothing
        (0, SIZE + 4 * KIB),     // the whole file in one call
    ];
    for &(offset, len) in fixed {
        check(offset, len);
    }
    // Random offsets in random order (defeating sequential readahead), odd sizes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..150 {
        let offset = rng.random_range(0..size + b);
        let len = rng.random_range(1..3 * BLOCK);
        check(offset, len);
    }
    // The same handle from several threads at once.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let check = &check;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(100 + t);
                for _ in 0..40 {
                    check(rng.random_range(0..size + 1), rng.random_range(1..2 * BLOCK));
                }
            });
        }
    });
}

// --- Listing ---

#[test]
fn ten_thousand_objects_list_fully_with_sizes() {
    const N: usize = 10_000;
    let server = S3Server::start();
    let bucket = server.unique_bucket("many");
    let expected: BTreeMap<String, u64> = (0..N).map(|i| (format!("obj-{i:05}"), (i * 7 % 1001) as u64)).collect();
    let objects = expected.iter().map(|(name, &len)| (format!("many/{name}"), vec![b'x'; len as usize])).collect();
    let started = Instant::now();
    server.put_many(&bucket, objects, 32);
    server.put(&bucket, "top.txt", b"top\n");
    eprintln!("uploaded {N} objects in {:?}", started.elapsed());
    // A long TTL lets the stats below be answered from the listing: with the default 1 s, every
    // stat after the first second is its own S3 request (minutes for 10,000 entries).
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "300"]);

    assert_eq!(list_dir(mount.path()), ["many", "top.txt"]);
    let started = Instant::now();
    let mut got = BTreeMap::new();
    for entry in std::fs::read_dir(mount.join("many")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let meta = entry.metadata().unwrap_or_else(|e| panic!("stat many/{name}: {e}"));
        assert!(meta.is_file(), "many/{name} is not a regular file");
        assert!(got.insert(name.clone(), meta.len()).is_none(), "many/{name} listed twice");
    }
    eprintln!("listed and stat'ed {N} entries in {:?}", started.elapsed());
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "listed {} of {N}; missing e.g. {missing:?}, extra e.g. {extra:?}",
        got.len()
    );
    let wrong: Vec<_> = expected.iter().filter(|(k, v)| got[*k] != **v).take(5).collect();
    assert!(wrong.is_empty(), "wrong sizes, e.g. {wrong:?}");
}

#[test]
fn nested_implicit_directories() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("nested");
    let files: &[(&str, &[u8])] = &[
        ("top.txt", b"top"),
        ("a/file-a", b"in a"),
        ("a/b/file-b", b"in a/b"),
        ("a/b/c/file-c", b"in a/b/c"),
        ("a/b/c/d/e/deep.txt", b"five levels down"),
        ("a/b2/x", b"sibling"),
    ];
    for (key, body) in files {
        server.put(&bucket, key, body);
    }
    let mount = Mount::new(&server, &bucket, &[]);

    let dirs: &[(&str, &[&str])] = &[
        ("", &["a", "top.txt"]),
        ("a", &["b", "b2", "file-a"]),
        ("a/b", &["c", "file-b"]),
        ("a/b/c", &["d", "file-c"]),
        ("a/b/c/d", &["e"]),
        ("a/b/c/d/e", &["deep.txt"]),
        ("a/b2", &["x"]),
    ];
    for (dir, want) in dirs {
        let path = mount.join(dir);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("stat {dir:?}: {e}"));
        assert!(meta.is_dir(), "{dir:?} is not a directory");
        assert_eq!(list_dir(&path), *want, "entries of {dir:?}");
    }
    for (key, body) in files {
        let path = mount.join(key);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("stat {key}: {e}"));
        assert!(meta.is_file(), "{key} is not a regular file");
        assert_eq!(meta.len(), body.len() as u64, "size of {key}");
        assert_eq!(std::fs::read(&path).unwrap(), *body, "content of {key}");
    }
    assert_eq!(errno(std::fs::metadata(mount.join("a/nope"))), Some(libc::ENOENT));
    assert_eq!(errno(std::fs::metadata(mount.join("a/b/c/d/e/deep"))), Some(libc::ENOENT));
}

#[test_case("a/b" ; "without trailing slash")]
#[test_case("a/b/" ; "with trailing slash")]
fn prefix_mount_shows_only_keys_under_the_prefix(prefix: &str) {
    let server = S3Server::start();
    let bucket = server.unique_bucket("prefix");
    for (key, body) in [
        ("a/b/x.txt", "x"),
        ("a/b/sub/y.txt", "y"),
        ("a/b/sub/deeper/w.txt", "w"),
        ("a/bc/z.txt", "shares the string prefix a/b but is not under a/b/"),
        ("a/other.txt", "o"),
        ("top.txt", "t"),
    ] {
        server.put(&bucket, key, body.as_bytes());
    }
    let mount = Mount::new(&server, &bucket, &["--prefix", prefix]);

    assert_eq!(list_dir(mount.path()), ["sub", "x.txt"]);
    assert_eq!(list_dir(&mount.join("sub")), ["deeper", "y.txt"]);
    assert_eq!(list_dir(&mount.join("sub/deeper")), ["w.txt"]);
    assert_eq!(std::fs::read(mount.join("x.txt")).unwrap(), b"x");
    assert_eq!(std::fs::read(mount.join("sub/deeper/w.txt")).unwrap(), b"w");
    for outside in ["z.txt", "bc", "other.txt", "top.txt", "a", "b"] {
        assert_eq!(
            errno(std::fs::metadata(mount.join(outside))),
            Some(libc::ENOENT),
            "{outside} is outside the prefix"
        );
    }
}

// --- Changes made by other clients ---

#[test]
fn overwritten_object_is_read_new_after_reopen_with_ttl_zero() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("ttl0");
    server.put(&bucket, "f.txt", b"old content\n");
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "0"]);
    let path = mount.join("f.txt");
    assert_eq!(std::fs::read(&path).unwrap(), b"old content\n");

    let longer = b"new content, longer than the old one\n";
    server.put(&bucket, "f.txt", longer);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), longer.len() as u64, "size after overwrite");
    assert_eq!(std::fs::read(&path).unwrap(), longer, "content after overwrite");

    server.put(&bucket, "f.txt", b"short");
    assert_eq!(std::fs::read(&path).unwrap(), b"short", "content after shrinking overwrite");

    // Several blocks: nothing of the old object may survive in the cache.
    let big_old = random_bytes(30, 3 * MIB + 11);
    let big_new = random_bytes(31, 3 * MIB + 11);
    server.put(&bucket, "big.bin", &big_old);
    assert_same_bytes(&std::fs::read(mount.join("big.bin")).unwrap(), &big_old, "big.bin before overwrite");
    server.put(&bucket, "big.bin", &big_new);
    assert_same_bytes(&std::fs::read(mount.join("big.bin")).unwrap(), &big_new, "big.bin after overwrite");
}

#[test_case(None ; "default ttl")]
#[test_case(Some(2) ; "two second ttl")]
fn overwritten_object_is_read_new_after_the_ttl(ttl_secs: Option<u64>) {
    let server = S3Server::start();
    let bucket = server.unique_bucket("ttl");
    let old = random_bytes(40, MIB + 3);
    let new = random_bytes(41, 2 * MIB + 5);
    server.put(&bucket, "f.bin", &old);
    let ttl_arg = ttl_secs.map(|s| s.to_string());
    let args: Vec<&str> = ttl_arg.iter().flat_map(|s| ["--metadata-ttl", s.as_str()]).collect();
    let ttl = ttl_secs.map_or(DEFAULT_METADATA_TTL, Duration::from_secs);
    let mount = Mount::new(&server, &bucket, &args);
    let path = mount.join("f.bin");
    assert_same_bytes(&std::fs::read(&path).unwrap(), &old, "before overwrite");

    server.put(&bucket, "f.bin", &new);
    let changed_at = Instant::now();
    // Within the TTL a reopen may still see the old object, but only ever one whole object.
    let early = std::fs::read(&path).unwrap();
    assert!(early == old || early == new, "read right after overwrite mixes old and new ({} bytes)", early.len());

    std::thread::sleep((ttl + TTL_SLACK).saturating_sub(changed_at.elapsed()));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), new.len() as u64, "size {ttl:?} after overwrite");
    assert_same_bytes(&std::fs::read(&path).unwrap(), &new, &format!("content {ttl:?} after overwrite"));
}

#[test_case(Backend::Fast ; "fast server")]
#[test_case(Backend::Faithful ; "faithful server")]
fn long_open_handle_never_mixes_old_and_new_content(backend: Backend) {
    const SIZE: usize = 24 * MIB + 5;
    let server = server_for(backend);
    let bucket = server.unique_bucket("replace");
    let old = random_bytes(50, SIZE);
    let new = random_bytes(51, SIZE);
    server.put(&bucket, "f.bin", &old);
    // The smallest memory cache, so later blocks must come from S3 after the overwrite.
    let mount = Mount::new(&server, &bucket, &["--memory-cache-size", "1MiB"]);
    let file = File::open(mount.join("f.bin")).unwrap();
    let head = read_at_most(&file, 0, 256 * KIB).unwrap();
    assert_same_bytes(&head, &old[..256 * KIB], "head before overwrite");

    server.put(&bucket, "f.bin", &new);
    // Read the rest backwards in odd-sized pieces, so readahead cannot have fetched it all.
    let mut got = vec![0u8; SIZE];
    got[..head.len()].copy_from_slice(&head);
    let piece = MIB + 4099;
    let mut end = SIZE;
    let mut stale_at = None;
    while end > head.len() {
        let start = end.saturating_sub(piece).max(head.len());
        match read_at_most(&file, start as u64, end - start) {
            Ok(buf) => {
                assert_eq!(buf.len(), end - start, "short read at {start} of an open file");
                got[start..end].copy_from_slice(&buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                stale_at = Some(start);
                break;
            }
            Err(e) => panic!("read at {start} after the object was replaced: {e} (want old data or ESTALE)"),
        }
        end = start;
    }
    match stale_at {
        Some(at) => eprintln!("open handle got ESTALE at offset {at} after the object changed"),
        None => {
            if let Some(at) = got.iter().zip(&old).position(|(a, b)| a != b) {
                let from_new = got[at..].iter().zip(&new[at..]).take(4096).all(|(a, b)| a == b);
                panic!(
                    "open handle returned a mix: differs from the old object at offset {at} (bytes there {} the new \
                     object)",
                    if from_new { "match" } else { "do not match" }
                );
            }
        }
    }
    drop(file);
    assert_same_bytes(&std::fs::read(mount.join("f.bin")).unwrap(), &new, "reopen after overwrite");
}

// --- Cache bound ---

#[test]
fn disk_cache_stays_within_its_bound() {
    const BOUND: u64 = 8 * MIB as u64;
    const SIZE: usize = 20 * MIB + 17;
    let server = S3Server::start();
    let bucket = server.unique_bucket("cache");
    let mut want = Vec::new();
    for i in 0..3u64 {
        let data = random_bytes(60 + i, SIZE);
        want.push(sha256(&data));
        server.put(&bucket, &format!("obj-{i}.bin"), &data);
    }
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("cache");
    std::fs::create_dir(&cache_dir).unwrap();
    let mount = Mount::new(
        &server,
        &bucket,
        &["--cache-dir", cache_dir.to_str().unwrap(), "--max-cache-size", "8MiB", "--memory-cache-size", "1MiB"],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let monitor = {
        let (stop, max_seen, dir) = (stop.clone(), max_seen.clone(), cache_dir.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                max_seen.fetch_max(dir_size(&dir), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    for round in 0..2 {
        for (i, sha) in want.iter().enumerate() {
            let (got, n) = sha256_file(&mount.join(format!("obj-{i}.bin")), 256 * KIB).unwrap();
            assert_eq!((got.as_str(), n), (sha.as_str(), SIZE as u64), "obj-{i}.bin in round {round}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    monitor.join().unwrap();
    let max_seen = max_seen.load(Ordering::Relaxed).max(dir_size(&cache_dir));
    assert!(max_seen <= BOUND, "disk cache reached {max_seen} bytes, bound is {BOUND}");
    assert!(max_seen > 0, "nothing was ever written to --cache-dir {}", cache_dir.display());
}

// --- Options ---

#[test]
fn read_only_mount_refuses_changes_with_erofs() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("ro");
    server.put(&bucket, "file.txt", b"keep me");
    server.put(&bucket, "dir/inner.txt", b"inner");
    let mount = Mount::new(&server, &bucket, &["--read-only"]);
    let file = mount.join("file.txt");

    let attempts: Vec<(&str, Option<i32>)> = vec![
        ("create", errno(File::create(mount.join("new.txt")))),
        ("open existing for write", errno(OpenOptions::new().write(true).open(&file))),
        ("open existing for append", errno(OpenOptions::new().append(true).open(&file))),
        ("open with truncate", errno(OpenOptions::new().write(true).truncate(true).open(&file))),
        ("mkdir", errno(std::fs::create_dir(mount.join("newdir")))),
        ("unlink", errno(std::fs::remove_file(&file))),
        ("rmdir", errno(std::fs::remove_dir(mount.join("dir")))),
        ("rename", errno(std::fs::rename(&file, mount.join("renamed.txt")))),
        ("rename into dir", errno(std::fs::rename(&file, mount.join("dir/moved.txt")))),
    ];
    for (what, got) in attempts {
        assert_eq!(got, Some(libc::EROFS), "{what} on a --read-only mount");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(server.list_keys(&bucket, ""), ["dir/inner.txt", "file.txt"]);
    assert_eq!(server.get(&bucket, "file.txt"), b"keep me");
}

#[test]
fn ownership_and_mode_options_show_in_stat() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("owner");
    server.put(&bucket, "file.txt", b"f");
    server.put(&bucket, "dir/inner.txt", b"i");
    let mount =
        Mount::new(&server, &bucket, &["--uid", "1234", "--gid", "4321", "--file-mode", "0640", "--dir-mode", "0750"]);
    for (rel, is_dir, mode) in
        [("", true, 0o750), ("dir", true, 0o750), ("file.txt", false, 0o640), ("dir/inner.txt", false, 0o640)]
    {
        let meta = std::fs::metadata(mount.join(rel)).unwrap();
        assert_eq!(meta.is_dir(), is_dir, "{rel:?} type");
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321), "{rel:?} owner");
        assert_eq!(meta.mode() & 0o7777, mode, "{rel:?} mode {:o}", meta.mode());
    }
}

#[test]
fn default_ownership_is_the_mounting_user() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("owner-default");
    server.put(&bucket, "dir/file.txt", b"f");
    let mount = Mount::new(&server, &bucket, &[]);
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    for (rel, mode) in [("", 0o755), ("dir", 0o755), ("dir/file.txt", 0o644)] {
        let meta = std::fs::metadata(mount.join(rel)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{rel:?} owner");
        assert_eq!(meta.mode() & 0o7777, mode, "{rel:?} mode {:o}", meta.mode());
    }
}

#[test]
fn statfs_reports_large_nonzero_values() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("statfs");
    let mount = Mount::new(&server, &bucket, &[]);
    let path = std::ffi::CString::new(mount.path().to_str().unwrap()).unwrap();
    // SAFETY: `path` is NUL-terminated and `st` is a valid out-pointer for the call.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0, "statvfs: {}", std::io::Error::last_os_error());
        st
    };
    let frsize = if st.f_frsize > 0 { st.f_frsize } else { st.f_bsize };
    assert!(st.f_bsize > 0 && frsize > 0, "block sizes {} / {}", st.f_bsize, st.f_frsize);
    const TIB: u128 = 1 << 40;
    for (name, blocks) in [("f_blocks", st.f_blocks), ("f_bfree", st.f_bfree), ("f_bavail", st.f_bavail)] {
        let bytes = blocks as u128 * frsize as u128;
        assert!(bytes >= TIB, "{name} = {blocks} blocks of {frsize} bytes: want at least 1 TiB");
    }
    assert!(st.f_files >= 1 << 20 && st.f_ffree >= 1 << 20, "f_files {} f_ffree {}", st.f_files, st.f_ffree);
    assert!(st.f_namemax >= 255, "f_namemax {}", st.f_namemax);
}

// --- Lifecycle ---

#[test]
fn umount_stops_the_daemon_and_leaves_an_empty_directory() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("umount");
    server.put(&bucket, "f.txt", b"hello");
    let mount = Mount::new(&server, &bucket, &[]);
    let mp = mount.path().to_owned();
    assert_eq!(std::fs::read(mount.join("f.txt")).unwrap(), b"hello");
    assert!(!processes_with_arg(&mp).is_empty(), "no daemon has {} on its command line", mp.display());

    let out = std::process::Command::new("umount").arg(&mp).output().unwrap();
    assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
    wait_no_daemon(&mp, common::DAEMON_EXIT_TIMEOUT).unwrap();
    assert!(!is_mounted(&mp), "{} still mounted", mp.display());
    assert!(list_dir(&mp).is_empty(), "mountpoint not empty after unmount: {:?}", list_dir(&mp));
    mount.unmount(); // nothing left to do, but must not fail
}

/// Kills and unmounts a foreground mount if the test fails half-way.
struct ForegroundGuard {
    child: Child,
    mountpoint: std::path::PathBuf,
}

impl Drop for ForegroundGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

#[test]
fn sigterm_to_a_foreground_mount_unmounts_cleanly() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("sigterm");
    server.put(&bucket, "f.txt", b"hello");
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    let log_path = dir.path().join("foreground.log");
    let log = File::create(&log_path).unwrap();
    let mut cmd = MountCommand::new(&server, &bucket, &mp, &[]).command(true);
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    let mut guard = ForegroundGuard { child: cmd.spawn().unwrap(), mountpoint: mp.clone() };
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let up =
        wait_until(Duration::from_secs(60), || is_fuse_mount(&mp) || guard.child.try_wait().ok().flatten().is_some());
    assert!(up && is_fuse_mount(&mp), "foreground mount did not come up\n--- log ---\n{}", log());
    assert_eq!(std::fs::read(mp.join("f.txt")).unwrap(), b"hello");

    // SAFETY: plain syscall on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(guard.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = wait_timeout(&mut guard.child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("foreground mount still running 30s after SIGTERM\n--- log ---\n{}", log()));
    assert!(status.success(), "after SIGTERM: {}\n--- log ---\n{}", common::describe_status(status), log());
    assert!(!is_mounted(&mp), "{} still mounted after SIGTERM", mp.display());
    assert!(list_dir(&mp).is_empty(), "mountpoint not empty after SIGTERM");
    wait_no_daemon(&mp, common::DAEMON_EXIT_TIMEOUT).unwrap();
}

// --- Mount errors ---

/// A failed mount: non-zero exit, one error line naming the problem, no secrets, nothing left
/// mounted or running.
fn assert_clean_failure(out: &Output, mountpoint: &Path, secrets: &[&str], keywords: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context =
        format!("exit: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}", common::describe_status(out.status));
    assert!(out.status.code().is_some_and(|c| c != 0), "want a non-zero exit code; {context}");
    // clap adds its standard hint after the error line; that hint is not a second error.
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information, try"))
        .collect();
    assert_eq!(lines.len(), 1, "want exactly one error line on stderr; {context}");
    let line = lines[0].to_lowercase();
    assert!(
        keywords.iter().any(|k| line.contains(&k.to_lowercase())),
        "error line should mention one of {keywords:?}; {context}"
    );
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "output leaks a credential; {context}");
    }
    assert!(!is_mounted(mountpoint), "failed mount left {} mounted", mountpoint.display());
    wait_no_daemon(mountpoint, Duration::from_secs(10)).unwrap();
}

/// Runs `s3csi mount` against `server` at a fresh mountpoint, expecting it to fail.
fn mount_expecting_failure(
    cmd_for: impl FnOnce(&Path) -> MountCommand,
) -> (Output, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = mp.canonicalize().unwrap();
    let cmd = cmd_for(&mp);
    let mp = cmd.mountpoint.clone();
    match Mount::try_with(cmd, None) {
        Ok(mount) => {
            drop(mount);
            panic!("mount at {} unexpectedly succeeded", mp.display());
        }
        Err(out) => (out, dir, mp),
    }
}

#[test]
fn missing_bucket_fails_clearly() {
    let server = S3Server::start();
    let bucket = format!("s3csi-missing-{}", std::process::id());
    let (out, _dir, mp) = mount_expecting_failure(|mp| MountCommand::new(&server, &bucket, mp, &[]));
    assert_clean_failure(
        &out,
        &mp,
        &[server.secret_key(), server.access_key()],
        &["does not exist", "no such bucket", "not found"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&bucket), "error should name the bucket");
}

#[test]
fn bad_credentials_fail_clearly_without_leaking_them() {
    // moto accepts any signature; s3s-fs (or an external endpoint) checks it.
    let server = S3Server::start();
    let bucket = server.unique_bucket("badcreds");
    let wrong_secret = format!("wrong-secret-{}", std::process::id());
    let (out, _dir, mp) = mount_expecting_failure(|mp| {
        let mut cmd = MountCommand::new(&server, &bucket, mp, &[]);
        cmd.env.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
        cmd.env.push(("AWS_SECRET_ACCESS_KEY".into(), wrong_secret.clone()));
        cmd
    });
    assert_clean_failure(
        &out,
        &mp,
        &[&wrong_secret, server.secret_key(), server.access_key()],
        &["denied", "credential", "signature", "forbidden", "403"],
    );
}

#[test]
fn unreachable_endpoint_fails_clearly() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("unreachable");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let (out, _dir, mp) = mount_expecting_failure(|mp| {
        let mut cmd = MountCommand::new(&server, &bucket, mp, &[]);
        cmd.endpoint = closed.clone();
        cmd
    });
    assert_clean_failure(&out, &mp, &[server.secret_key()], &["reach", "connect", "refused", "unreachable"]);
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?} to give up", started.elapsed());
}

#[test]
fn missing_mountpoint_fails_clearly() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("nomnt");
    let (out, _dir, mp) =
        mount_expecting_failure(|mp| MountCommand::new(&server, &bucket, &mp.join("does-not-exist"), &[]));
    assert_clean_failure(&out, &mp, &[server.secret_key()], &["does not exist", "no such", "not found", "missing"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist"), "error should name the mountpoint");
}

#[test]
fn busy_mountpoint_fails_clearly_and_keeps_the_first_mount() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("busy");
    server.put(&bucket, "f.txt", b"first");
    let mount = Mount::new(&server, &bucket, &[]);
    let out = MountCommand::new(&server, &bucket, mount.path(), &[]).run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code().is_some_and(|c| c != 0), "second mount: {} {stderr}", out.status);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line: {stderr}");
    assert!(["busy", "already mounted"].iter().any(|k| lines[0].contains(k)), "error line: {stderr}");
    let stacked = common::mounts().iter().filter(|(p, _)| p == mount.path()).count();
    assert_eq!(stacked, 1, "mounts at {}", mount.path().display());
    assert!(
        wait_until(Duration::from_secs(10), || processes_with_arg(mount.path()).len() == 1),
        "daemons for the mountpoint: {:?}",
        processes_with_arg(mount.path())
    );
    assert_eq!(std::fs::read(mount.join("f.txt")).unwrap(), b"first");
}

#[test_case("--max-cache-size", "12parsecs")]
#[test_case("--memory-cache-size", "lots")]
#[test_case("--file-mode", "0999")]
#[test_case("--uid", "nobody-at-all")]
fn bad_option_fails_clearly(option: &str, value: &str) {
    let server = S3Server::start();
    let bucket = server.unique_bucket("badopt");
    let (out, _dir, mp) = mount_expecting_failure(|mp| MountCommand::new(&server, &bucket, mp, &[option, value]));
    assert_clean_failure(&out, &mp, &[server.secret_key()], &[value, option]);
}

// --- S3 shapes only the faithful server can store ---

#[test]
fn directory_markers_make_empty_directories() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("markers");
    for (key, body) in
        [("empty/", ""), ("p/q/", ""), ("p/file", "pf"), ("full/", ""), ("full/f.txt", "ff"), ("top.txt", "t")]
    {
        server.put(&bucket, key, body.as_bytes());
    }
    let mount = Mount::new(&server, &bucket, &[]);
    assert_eq!(list_dir(mount.path()), ["empty", "full", "p", "top.txt"]);
    for dir in ["empty", "p", "p/q", "full"] {
        assert!(std::fs::metadata(mount.join(dir)).unwrap().is_dir(), "{dir} is not a directory");
    }
    assert_eq!(list_dir(&mount.join("empty")), Vec::<String>::new());
    let mut raw = raw_readdir(&mount.join("empty")).unwrap();
    raw.sort();
    assert_eq!(raw, [b".".to_vec(), b"..".to_vec()], "raw entries of an empty marker directory");
    assert_eq!(list_dir(&mount.join("p")), ["file", "q"]);
    assert_eq!(list_dir(&mount.join("p/q")), Vec::<String>::new());
    assert_eq!(list_dir(&mount.join("full")), ["f.txt"]);
    assert_eq!(std::fs::read(mount.join("full/f.txt")).unwrap(), b"ff");
}

#[test]
fn directory_wins_over_a_file_of_the_same_name() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("conflict");
    for (key, body) in [("x", "the file x"), ("x/y", "inner"), ("m", "the file m"), ("m/", "")] {
        server.put(&bucket, key, body.as_bytes());
    }
    let mount = Mount::new(&server, &bucket, &[]);
    assert_eq!(list_dir(mount.path()), ["m", "x"], "each name listed once");
    assert!(std::fs::metadata(mount.join("x")).unwrap().is_dir(), "x should be a directory");
    assert!(std::fs::metadata(mount.join("m")).unwrap().is_dir(), "m should be a directory");
    assert_eq!(list_dir(&mount.join("x")), ["y"]);
    assert_eq!(list_dir(&mount.join("m")), Vec::<String>::new());
    assert_eq!(std::fs::read(mount.join("x/y")).unwrap(), b"inner");
    assert_eq!(std::fs::read(mount.join("x")).map_err(|e| e.kind()).unwrap_err(), ErrorKind::IsADirectory);
}

#[test]
fn odd_keys_are_skipped_and_do_not_break_listing() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("odd");
    let long = "z".repeat(300);
    let long_in_dir = format!("dir/{}", "w".repeat(300));
    let keys: Vec<&str> =
        vec!["a//b", "./c", "../d", "e/./f", "g/../h", &long, &long_in_dir, "dir//double", "dir/ok2.txt", "ok.txt"];
    for key in &keys {
        server.put(&bucket, key, b"odd");
    }
    let mount = Mount::new(&server, &bucket, &[]);

    // Walk everything: every listed name is valid, listed once, and can be looked up.
    let mut seen = Vec::new();
    let mut stack = vec![mount.path().to_owned()];
    while let Some(dir) = stack.pop() {
        let names = raw_readdir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        assert_eq!(names.iter().filter(|n| n.as_slice() == b".").count(), 1, "'.' entries in {}", dir.display());
        assert_eq!(names.iter().filter(|n| n.as_slice() == b"..").count(), 1, "'..' entries in {}", dir.display());
        for name in names.iter().filter(|n| n.as_slice() != b"." && n.as_slice() != b"..") {
            let shown = String::from_utf8_lossy(name);
            assert!(
                !name.is_empty() && name.len() <= 255 && !name.contains(&b'/'),
                "bad name {shown:?} in {}",
                dir.display()
            );
            let path = dir.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name));
            let meta =
                std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat listed {}: {e}", path.display()));
            let rel = path.strip_prefix(mount.path()).unwrap().to_string_lossy().into_owned();
            assert!(!seen.contains(&rel), "{rel} listed twice");
            seen.push(rel);
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    for want in ["ok.txt", "dir", "dir/ok2.txt"] {
        assert!(seen.iter().any(|s| s == want), "{want} missing from the walk: {seen:?}");
    }
    assert!(!seen.iter().any(|s| s.contains(&long) || s.contains("www")), "300-byte name listed: {seen:?}");
    assert_eq!(std::fs::read(mount.join("ok.txt")).unwrap(), b"odd");
    assert_eq!(std::fs::read(mount.join("dir/ok2.txt")).unwrap(), b"odd");
    assert!(std::fs::metadata(mount.path()).unwrap().is_dir(), "mount still answers");
}

#[test]
fn missing_names_are_enoent() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("enoent");
    server.put(&bucket, "file.txt", b"f");
    server.put(&bucket, "d/inner.txt", b"i");
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "0"]);
    for rel in ["nope", "fil", "file.tx", "FILE.TXT", "d/nope", "d/inner", "nope/deeper"] {
        assert_eq!(errno(std::fs::metadata(mount.join(rel))), Some(libc::ENOENT), "stat {rel}");
        assert_eq!(errno(File::open(mount.join(rel))), Some(libc::ENOENT), "open {rel}");
    }
    assert_eq!(errno(std::fs::metadata(mount.join("file.txt/child"))), Some(libc::ENOTDIR));
    let mut buf = Vec::new();
    File::open(mount.join("file.txt")).unwrap().read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"f");
    server.delete(&bucket, "file.txt");
    assert_eq!(errno(std::fs::metadata(mount.join("file.txt"))), Some(libc::ENOENT), "stat after delete");
    assert_eq!(errno(File::open(mount.join("file.txt"))), Some(libc::ENOENT), "open after delete");
    assert_eq!(list_dir(mount.path()), ["d"]);
}
