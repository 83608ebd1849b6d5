//! Faults found by longer randomized runs and reviews, each reduced to a few syscalls on a real
//! mount of a real S3 server and checked against what a local filesystem does.
//!
//! Every test makes its own bucket, so they run in parallel. `close` is checked explicitly
//! ([`close_checked`]): on this filesystem `close` is where the data is committed.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{Backend, Mount, S3Server, assert_same_bytes, list_dir, random_bytes, read_at_most, server_for};

const MIB: usize = 1 << 20;

fn close_checked(f: File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by its `File`, so it is open and is closed exactly once here.
    if unsafe { libc::close(fd) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn errno<T>(r: &std::io::Result<T>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

fn put_with_metadata(server: &S3Server, bucket: &str, key: &str, body: &[u8], meta: &[(&str, &str)]) {
    let mut req = server.client().put_object().bucket(bucket).key(key).body(body.to_vec().into());
    for (k, v) in meta {
        req = req.metadata(*k, *v);
    }
    server.block_on(req.send()).unwrap_or_else(|e| panic!("PutObject {key}: {e:?}"));
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Out-of-range values in our metadata keys are input, not a reason to fail: the entry shows
/// the mount defaults and reads normally.
#[test]
fn metadata_out_of_range_falls_back_to_defaults() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("bad-meta");
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("mtime-max", &[("s3csi-mtime", "18446744073709551615.0")]),
        ("mtime-i64", &[("s3csi-mtime", "9223372036854775807.999999999")]),
        ("mtime-neg", &[("s3csi-mtime", "-9223372036854775808.0")]),
        ("mode-big", &[("s3csi-mode", "177777")]),
        ("uid-neg", &[("s3csi-uid", "-1"), ("s3csi-gid", "-5")]),
        ("type-odd", &[("s3csi-type", "fifo")]),
        ("atime-junk", &[("s3csi-atime", "1e400")]),
    ];
    for (name, meta) in cases {
        put_with_metadata(&server, &bucket, name, b"data", meta);
    }
    let mount = Mount::new(&server, &bucket, &["--uid", "0", "--gid", "0"]);
    let mut names = list_dir(mount.path());
    names.sort();
    let mut want: Vec<String> = cases.iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
    for (name, meta) in cases {
        let md = std::fs::symlink_metadata(mount.join(name)).unwrap_or_else(|e| panic!("stat {name} {meta:?}: {e}"));
        assert!(md.is_file(), "{name}: a regular file");
        assert_eq!(md.len(), 4, "{name}: size");
        if meta.iter().any(|(k, _)| *k == "s3csi-mode") {
            assert_eq!(md.mode() & 0o7777, 0o644, "{name}: default mode");
        }
        if meta.iter().any(|(k, _)| *k == "s3csi-uid") {
            assert_eq!((md.uid(), md.gid()), (0, 0), "{name}: default owner");
        }
        assert_eq!(read(&mount.join(name)), b"data", "{name}: contents");
    }
}

/// A size S3 cannot hold (over 5 TiB) is `EFBIG`, as on a filesystem with a size limit, and
/// the mount keeps working.
#[test]
fn sizes_past_the_s3_object_limit_are_efbig() {
    let server = server_for(Backend::Fast);
    let bucket = server.unique_bucket("efbig");
    let mount = Mount::new(&server, &bucket, &[]);
    let path = mount.join("f");
    std::fs::write(&path, b"hello").unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(errno(&f.set_len(1 << 50)), Some(libc::EFBIG), "ftruncate to 1 PiB");
    assert_eq!(errno(&f.write_at(b"x", 5 << 40)), Some(libc::EFBIG), "pwrite at 5 TiB");
    close_checked(f).expect("close after refused sizes");
    let g = OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(errno(&g.set_len((5 << 40) + 1)), Some(libc::EFBIG), "ftruncate to 5 TiB + 1");
    close_checked(g).unwrap();
    assert_eq!(read(&path), b"hello");
    assert_eq!(server.get(&bucket, "f"), b"hello");
}

/// A new file stays listed while it is open, whatever is done to it before its first close.
#[test]
fn a_new_file_read_or_truncated_before_close_stays_listed() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("pending-list");
    let mount = Mount::new(&server, &bucket, &["--part-size", "5MiB"]);
    // Small: read back before close.
    let mut a = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(mount.join("a")).unwrap();
    a.write_all(b"abc").unwrap();
    assert_eq!(read_at_most(&a, 0, 10).unwrap(), b"abc");
    // Small: truncated before close.
    let mut b = File::create(mount.join("b")).unwrap();
    b.write_all(b"abcdef").unwrap();
    b.set_len(2).unwrap();
    // Empty, truncated longer.
    let c = File::create(mount.join("c")).unwrap();
    c.set_len(10).unwrap();
    assert_eq!(list_dir(mount.path()), ["a", "b", "c"], "listing with three files open");
    assert_eq!(std::fs::metadata(mount.join("b")).unwrap().len(), 2);
    assert_eq!(std::fs::metadata(mount.join("c")).unwrap().len(), 10);
    close_checked(a).unwrap();
    close_checked(b).unwrap();
    close_checked(c).unwrap();
    assert_eq!(list_dir(mount.path()), ["a", "b", "c"]);
    assert_eq!(server.get(&bucket, "b"), b"ab");
    assert_eq!(server.get(&bucket, "c"), vec![0u8; 10]);
}

/// Renaming a directory while a file in it is open for writing: the file keeps its bytes and
/// the close commits under the new name (appending to an existing object, and a new file that
/// has already streamed a part).
#[test]
fn renaming_a_directory_keeps_its_open_files() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("rename-open-dir");
    let old = random_bytes(1, 100_000);
    server.put(&bucket, "d/f", &old);
    let mount = Mount::new(&server, &bucket, &["--part-size", "5MiB"]);
    let mut a = OpenOptions::new().append(true).open(mount.join("d/f")).unwrap();
    a.write_all(b"0123456789").unwrap();
    let big = random_bytes(2, 9 * MIB);
    let mut g = File::create(mount.join("d/g")).unwrap();
    g.write_all(&big).unwrap();
    std::fs::rename(mount.join("d"), mount.join("e")).unwrap();
    close_checked(a).expect("close of the appended file after its directory moved");
    close_checked(g).expect("close of the new file after its directory moved");
    let mut want_f = old.clone();
    want_f.extend_from_slice(b"0123456789");
    assert_same_bytes(&read(&mount.join("e/f")), &want_f, "e/f through the mount");
    assert_same_bytes(&read(&mount.join("e/g")), &big, "e/g through the mount");
    assert!(!mount.join("d").exists(), "the old directory is gone");
    mount.unmount();
    assert_same_bytes(&server.get(&bucket, "e/f"), &want_f, "e/f in S3");
    assert_same_bytes(&server.get(&bucket, "e/g"), &big, "e/g in S3");
    let keys = server.list_keys(&bucket, "d/");
    assert!(keys.is_empty(), "nothing left under d/: {keys:?}");
}

/// An older read-only descriptor sees what this mount wrote through another one, so a read
/// through it never shrinks the size the kernel believes, and appends land at the end.
#[test]
fn appends_land_at_the_end_after_a_read_through_an_older_descriptor() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("append-offset");
    let old = random_bytes(3, 150_000);
    server.put(&bucket, "f", &old);
    let mount = Mount::new(&server, &bucket, &[]);
    let path = mount.join("f");
    let mut r = File::open(&path).unwrap();
    let mut a = OpenOptions::new().append(true).open(&path).unwrap();
    let add = random_bytes(4, 40_000);
    a.write_all(&add).unwrap();
    let mut want = old.clone();
    want.extend_from_slice(&add);
    let got = read_at_most(&r, 100_000, 100_000).unwrap();
    assert_same_bytes(&got, &want[100_000..], "pread through the older descriptor");
    a.write_all(b"0123456789").unwrap();
    want.extend_from_slice(b"0123456789");
    assert_eq!(r.seek(SeekFrom::End(0)).unwrap(), want.len() as u64, "SEEK_END through the reader");
    close_checked(a).unwrap();
    close_checked(r).unwrap();
    assert_same_bytes(&read(&path), &want, "through the mount");
    assert_same_bytes(&server.get(&bucket, "f"), &want, "in S3");
}

/// One read never returns a mix of old and new bytes: a reader opened before a write through
/// another descriptor sees the new content whole.
#[test]
fn a_read_never_mixes_old_and_new_bytes() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("no-mix");
    let old = random_bytes(5, 12_288);
    server.put(&bucket, "f", &old);
    let mount = Mount::new(&server, &bucket, &[]);
    let path = mount.join("f");
    let r = File::open(&path).unwrap();
    let w = OpenOptions::new().write(true).open(&path).unwrap();
    let new = random_bytes(6, 8192);
    w.write_all_at(&new, 2048).unwrap();
    let mut want = old.clone();
    want[2048..2048 + 8192].copy_from_slice(&new);
    assert_same_bytes(&read_at_most(&r, 0, 12_288).unwrap(), &want, "pread of the whole file");
    close_checked(w).unwrap();
    assert_same_bytes(&read_at_most(&r, 0, 12_288).unwrap(), &want, "pread after the writer closed");
    close_checked(r).unwrap();
    assert_same_bytes(&server.get(&bucket, "f"), &want, "in S3");
}

/// `chmod` and `utimes` on a file that has already streamed a multipart part are stored at
/// close, as they are for a small file.
#[test]
fn attribute_changes_while_streaming_are_stored() {
    let server = server_for(Backend::Fast);
    let bucket = server.unique_bucket("attrs-streaming");
    let mount = Mount::new(&server, &bucket, &["--part-size", "5MiB"]);
    let path = mount.join("f");
    let data = random_bytes(7, 12 * MIB);
    let mut f = File::create(&path).unwrap();
    f.write_all(&data[..6 * MIB]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.write_all(&data[6 * MIB..]).unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    f.set_times(std::fs::FileTimes::new().set_modified(when).set_accessed(when)).unwrap();
    close_checked(f).unwrap();
    let check = |md: std::fs::Metadata, what: &str| {
        assert_eq!(md.mode() & 0o7777, 0o600, "{what}: mode");
        assert_eq!(md.modified().unwrap(), when, "{what}: mtime");
        assert_eq!(md.len(), data.len() as u64, "{what}: size");
    };
    check(std::fs::metadata(&path).unwrap(), "after close");
    mount.unmount();
    let mount = Mount::new(&server, &bucket, &[]);
    check(std::fs::metadata(mount.join("f")).unwrap(), "after remount");
    assert_same_bytes(&read(&mount.join("f")), &data, "contents after remount");
}

/// A reader that opened the file while a writer had it open keeps reading the bytes after the
/// file is unlinked (or replaced) and the writer closes, as on a local filesystem.
#[test]
fn a_reader_keeps_the_bytes_of_an_unlinked_or_replaced_file() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("unlinked-reader");
    // No metadata caching: the kernel's attribute checks before each read reach the mount.
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "0"]);
    for replace in [false, true] {
        let path = mount.join("f");
        let data = random_bytes(8, 50_000);
        let mut w = File::create(&path).unwrap();
        w.write_all(&data).unwrap();
        let r = File::open(&path).unwrap();
        if replace {
            std::fs::write(mount.join("g"), b"other").unwrap();
            std::fs::rename(mount.join("g"), &path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        close_checked(w).unwrap();
        assert_same_bytes(&read_at_most(&r, 0, 60_000).unwrap(), &data, &format!("reader (replace={replace})"));
        close_checked(r).unwrap();
        if replace {
            assert_eq!(read(&path), b"other");
            std::fs::remove_file(&path).unwrap();
        } else {
            assert!(!path.exists());
        }
    }
    mount.unmount();
    assert!(server.list_keys(&bucket, "").iter().all(|k| k.starts_with(".s3csi")), "nothing left in S3");
}

/// A directory's stored mode shows as soon as it is listed after a remount, not the default
/// until the metadata TTL passes.
#[test]
fn directory_modes_survive_a_remount_and_a_listing() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("dir-modes");
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "300"]);
    std::fs::create_dir_all(mount.join("p")).unwrap();
    // `mkdir -m 700`, and a `chmod` after a plain `mkdir`.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(mount.join("p/d")).unwrap();
    for (name, mode) in [("p/e", 0o750), ("top", 0o711)] {
        std::fs::create_dir(mount.join(name)).unwrap();
        std::fs::set_permissions(mount.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    mount.unmount();
    let mount = Mount::new(&server, &bucket, &["--metadata-ttl", "300"]);
    assert_eq!(list_dir(mount.path()), ["p", "top"]);
    assert_eq!(list_dir(&mount.join("p")), ["d", "e"]);
    for (name, mode) in [("p/d", 0o700), ("p/e", 0o750), ("top", 0o711)] {
        let md = std::fs::metadata(mount.join(name)).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{name} after remount and listing");
    }
}

/// Files another client wrote have no s3csi metadata: their mtime is the object's
/// Last-Modified, which the copy behind a rename renews. `mv` of such a file, and of a
/// directory holding some, keeps each mtime, now and after a remount (rsync and make rely on
/// it). An implied directory moved over an empty directory made here keeps what it showed.
#[test]
fn mv_keeps_the_times_of_files_written_by_other_clients() {
    let server = server_for(Backend::Faithful);
    let bucket = server.unique_bucket("mv-times");
    for key in ["f", "d/g", "d/sub/h", "implied/x"] {
        server.put(&bucket, key, b"from another client");
    }
    std::thread::sleep(Duration::from_millis(1100)); // Last-Modified has whole seconds
    let mount = Mount::new(&server, &bucket, &[]);
    let mtime = |rel: &str| std::fs::metadata(mount.join(rel)).unwrap().modified().unwrap();
    let before = [mtime("f"), mtime("d/g"), mtime("d/sub/h")];
    std::fs::create_dir(mount.join("target")).unwrap();
    let implied = std::fs::metadata(mount.join("implied")).unwrap();
    let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(std::process::Command::new("mv").arg(mount.join("f")).arg(mount.join("f2")));
    ok(std::process::Command::new("mv").arg(mount.join("d")).arg(mount.join("e")));
    ok(std::process::Command::new("mv").arg("-T").arg(mount.join("implied")).arg(mount.join("target")));
    let after = [mtime("f2"), mtime("e/g"), mtime("e/sub/h")];
    assert_eq!(after, before, "mtimes after mv");
    let target = std::fs::metadata(mount.join("target")).unwrap();
    mount.unmount();
    let mount = Mount::new(&server, &bucket, &[]);
    let mtime = |rel: &str| std::fs::metadata(mount.join(rel)).unwrap().modified().unwrap();
    assert_eq!([mtime("f2"), mtime("e/g"), mtime("e/sub/h")], before, "mtimes after mv and a remount");
    let remounted = std::fs::metadata(mount.join("target")).unwrap();
    assert_eq!(
        (remounted.mode(), remounted.modified().unwrap()),
        (target.mode(), target.modified().unwrap()),
        "the moved implied directory after a remount"
    );
    assert_eq!(remounted.mode() & 0o7777, implied.mode() & 0o7777, "the source directory's mode");
    assert_eq!(read(&mount.join("target/x")), b"from another client");
}
