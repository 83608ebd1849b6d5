//! File times and attributes as the tools people run depend on them: rsync, tar, cp -p, Python's
//! shutil and vim, on a real mount against a real S3 server (moto, which stores directory
//! markers), compared with a local directory, checked in S3, and again after a remount.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Mount, S3Server, find_program, run_with_timeout};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a shell command in `dir`; panics with its output unless it succeeds.
fn sh(dir: &Path, script: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir).env("LC_ALL", "C").env("TZ", "UTC");
    let out = run_with_timeout(cmd, TOOL_TIMEOUT);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "`{script}` in {} failed ({:?}):\n{text}", dir.display(), out.status);
    text
}

/// `name mode mtime(ns)` for every entry under `root` (sorted; the root itself as `.`), the
/// view rsync, tar and cp -p are meant to preserve.
fn tree(root: &Path) -> Vec<String> {
    let out = sh(root, "find . -printf '%p %M %T@\\n' | sort");
    out.lines().map(str::to_owned).collect()
}

/// A source tree with files, a subdirectory, a symlink and deliberate times and modes.
fn make_source(dir: &Path) {
    sh(
        dir,
        "mkdir -p sub/deeper && echo one > a.txt && echo two > sub/b.txt && echo three > sub/deeper/c.txt \
         && ln -s a.txt link && chmod 640 a.txt && chmod 750 sub \
         && touch -h -d '2001-02-03 04:05:06.123456789' a.txt sub/b.txt sub/deeper/c.txt link \
         && touch -d '2002-03-04 05:06:07' sub/deeper sub . ",
    );
}

fn server_and_bucket(hint: &str) -> (S3Server, String) {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket(hint);
    (server, bucket)
}

#[test]
fn a_stored_mtime_survives_chmod_chown_and_a_remount() {
    let (server, bucket) = server_and_bucket("times");
    let m = Mount::new(&server, &bucket, &[]);
    sh(m.path(), "echo hi > f && touch -d '2001-02-03 04:05:06' f && chmod 600 f && chown 7:8 f");
    let want = "2001-02-03 04:05:06.000000000 +0000 600 7 8\n";
    assert_eq!(sh(m.path(), "stat -c '%y %a %u %g' f"), want);
    // Past the metadata TTL the attributes come from S3 again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sh(m.path(), "stat -c '%y %a %u %g' f"), want);
    let meta = server.user_metadata(&bucket, "f");
    assert_eq!(meta.get("s3csi-mtime").map(String::as_str), Some("981173106.000000000"), "{meta:?}");
    m.unmount();
    let m = Mount::new(&server, &bucket, &[]);
    assert_eq!(sh(m.path(), "stat -c '%y %a %u %g' f"), want, "after a remount");
    // Nanoseconds are kept, and chmod alone does not move the mtime.
    sh(m.path(), "touch -d '@1000000000.123456789' f && chmod 644 f");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sh(m.path(), "stat -c '%.9Y'  f"), "1000000000.123456789\n");
}

#[test]
fn one_file_shows_one_mtime_and_directories_keep_theirs() {
    let (server, bucket) = server_and_bucket("stable");
    server.put(&bucket, "implied/x", b"x");
    let m = Mount::new(&server, &bucket, &[]);
    sh(m.path(), "echo data > new && mkdir made");
    let first = sh(m.path(), "stat -c '%.9Y %n' new made implied .");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sh(m.path(), "stat -c '%.9Y %n' new made implied ."), first, "no change by itself");
    m.unmount();
    let m = Mount::new(&server, &bucket, &[]);
    let again = sh(m.path(), "stat -c '%.9Y %n' new made");
    assert_eq!(again, first.lines().take(2).map(|l| format!("{l}\n")).collect::<String>(), "after a remount");
}

#[test]
fn vim_writes_the_same_file_twice() {
    let Some(vim) = find_program("vim") else {
        panic!("vim is needed (Debian: apt-get install vim; .ci/run installs it)");
    };
    let (server, bucket) = server_and_bucket("vim");
    let m = Mount::new(&server, &bucket, &[]);
    // Write, wait past the metadata TTL, write again: vim refuses the second write when the
    // file's mtime changed on its own ("file has been changed since reading it").
    let script = format!(
        "{} -es -u NONE -i NONE -c 'call setline(1, \"first\")' -c 'w notes.txt' -c 'sleep 1500m' \
         -c 'call setline(1, \"second\")' -c 'w' -c 'q' </dev/null",
        vim.display()
    );
    sh(m.path(), &script);
    assert_eq!(std::fs::read_to_string(m.join("notes.txt")).unwrap(), "second\n");
    assert_eq!(server.get(&bucket, "notes.txt"), b"second\n");
}

/// Runs `script` (with `{dest}` standing for a fresh destination directory, created first
/// unless `create` is false) from `src` twice: into a local directory and into the mount.
/// Returns the two destinations.
fn both(
    src: &Path,
    local: &Path,
    mount: &Path,
    name: &str,
    create: bool,
    script: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (l, m) = (local.join(name), mount.join(name));
    for dest in [&l, &m] {
        if create {
            std::fs::create_dir(dest).unwrap();
        }
        sh(src, &script.replace("{dest}", &dest.display().to_string()));
    }
    (l, m)
}

#[test]
fn rsync_tar_cp_and_shutil_keep_times_and_modes() {
    let (server, bucket) = server_and_bucket("tools");
    let mount = Mount::new(&server, &bucket, &[]);
    let src = tempfile::tempdir().unwrap();
    make_source(src.path());
    let local = tempfile::tempdir().unwrap();
    let (s, l, m) = (src.path(), local.path(), mount.path());
    let rsync = find_program("rsync").expect("rsync is needed (Debian: apt-get install rsync; .ci/run installs it)");
    let archive = l.join("archive.tar");
    sh(s, &format!("tar -cf {} .", archive.display()));
    let py = "import shutil, sys; shutil.copy2('a.txt', sys.argv[1] + '/copy2.txt'); \
              shutil.copytree('.', sys.argv[1] + '/copytree', symlinks=True)";
    let runs = [
        ("rsync", true, format!("{} -a ./ {{dest}}/", rsync.display())),
        ("tar", true, format!("cd {{dest}} && tar -xpf {}", archive.display())),
        ("cp-a", false, "cp -a . {dest}".to_owned()),
        ("cp-p", true, "cp -p a.txt sub/b.txt {dest}/".to_owned()),
        ("shutil", true, format!("python3 -c \"{py}\" {{dest}}")),
    ];
    let mut pairs = Vec::new();
    for (name, create, script) in &runs {
        // A destination the test made itself has its own time; a tool that copies "." sets it.
        let compare_root = !*create || *name == "rsync" || *name == "tar";
        pairs.push((*name, compare_root, both(s, l, m, name, *create, script)));
    }
    // rsync -a into the mount root itself sets the root's times and mode (kept in memory).
    sh(s, &format!("{} -a ./ {}/", rsync.display(), m.display()));
    // tar -xp of an archive of "." into the mount root (the "./" entry included).
    sh(m, &format!("tar -xpf {}", archive.display()));

    std::thread::sleep(Duration::from_millis(1500));
    let view = |p: &Path, root: bool| tree(p).into_iter().filter(|l| root || !l.starts_with(". ")).collect::<Vec<_>>();
    for (name, root, (lp, mp)) in &pairs {
        assert_eq!(view(mp, *root), view(lp, *root), "{name}: the mount differs from a local directory");
    }
    // A second rsync -a finds nothing to do.
    let again = sh(s, &format!("{} -ai ./ {}/", rsync.display(), m.join("rsync").display()));
    assert_eq!(again, "", "a second rsync -a finds nothing to do");
    let a = std::fs::metadata(s.join("a.txt")).unwrap();
    let c = std::fs::metadata(m.join("shutil/copy2.txt")).unwrap();
    assert_eq!((c.mtime(), c.mtime_nsec(), c.mode() & 0o7777), (a.mtime(), a.mtime_nsec(), 0o640), "copy2");

    // Everything again after a remount: it was stored, not just cached.
    mount.unmount();
    let mount = Mount::new(&server, &bucket, &[]);
    for (name, root, (lp, _)) in &pairs {
        assert_eq!(view(&mount.join(name), *root), view(lp, *root), "{name} after a remount");
    }
    let meta = server.user_metadata(&bucket, "rsync/sub/b.txt");
    assert_eq!(meta.get("s3csi-mtime").map(String::as_str), Some("981173106.123456789"), "{meta:?}");
}

/// `ls -l` on a fresh mount costs no HEAD: entries written through another mount are vouched
/// for by the directory record (with their owners, modes, times and symlink type), and objects
/// written by other clients into a directory without a record show the defaults.
#[test]
fn ls_l_on_a_fresh_mount_needs_no_request_per_entry() {
    let (server, bucket) = server_and_bucket("lsl");
    for i in 0..50 {
        server.put(&bucket, &format!("foreign/o{i:02}"), b"from another client");
    }
    let writer = Mount::new(&server, &bucket, &["--allow-other"]);
    let mine = writer.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(1000), Some(2000)).unwrap();
    let out = pod_sh(
        &mine,
        "for i in $(seq -w 0 49); do echo $i > f$i; done && chmod 600 f00 && mkdir sub && \
         ln -s f01 link && touch -h -d '2001-02-03 04:05:06.5' f02 link",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = sh(&mine, "ls -l --time-style=+%s.%N");
    writer.unmount(); // records are written at the latest at unmount

    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let reader = Mount::new(&server, &bucket, &["--metrics-address", &addr]);
    let heads = || {
        let text = common::scrape_metrics(port);
        common::metric_sum(&text, "s3csi_s3_requests_total", &["operation=\"HeadObject\""])
    };
    // Looking the two directories up by name (no listing of the root) is a probe each.
    sh(reader.path(), "stat mine foreign >/dev/null");
    let before = heads();
    let seen = sh(&reader.join("mine"), "ls -l --time-style=+%s.%N");
    if seen != want {
        // What the reader was given to vouch with, to tell a record never written from a stale one.
        let record = String::from_utf8_lossy(&server.get(&bucket, "mine/.s3csi-attrs")).into_owned();
        panic!("the view from a fresh mount differs\nreader:\n{seen}\nwriter:\n{want}\nrecord:\n{record}");
    }
    assert_eq!(sh(&reader.join("mine"), "find . -type l"), "./link\n", "readdir reports the symlink's type");
    let foreign = sh(&reader.join("foreign"), "ls -ln");
    assert_eq!(foreign.lines().filter(|l| l.starts_with("-rw-r--r-- 1 0 0 19 ")).count(), 50, "{foreign}");
    assert_eq!(heads(), before, "no HEAD for any listed entry");
    // The record is hidden and reserved.
    assert!(!sh(reader.path(), "ls -a mine").contains(".s3csi-attrs"));
    assert!(std::fs::write(reader.join("mine/.s3csi-attrs"), b"x").is_err());
    assert!(server.list_keys(&bucket, "mine/").contains(&"mine/.s3csi-attrs".to_owned()));
}

/// A server that cannot store directory markers (s3s-fs) is named once at mount time, and
/// `mkdir` then makes a directory that lives in the mount (no EIO later).
#[test]
fn a_server_without_directory_markers_is_detected_at_mount_time() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("nomarkers");
    let log = tempfile::NamedTempFile::new().unwrap();
    let m = Mount::new(&server, &bucket, &["--log-file", &log.path().display().to_string()]);
    sh(m.path(), "mkdir d && sleep 1.5 && ls d && echo hi > d/f && cat d/f && ls d");
    assert_eq!(server.get(&bucket, "d/f"), b"hi\n");
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(text.matches("does not keep empty directory marker objects").count(), 1, "{text}");
    assert!(server.list_keys(&bucket, "").iter().all(|k| !k.contains("s3csi-probe")), "the probe is deleted");
}

/// `sh -c` as uid 1000, gid 2000, umask 022, in `dir`.
fn pod_sh(dir: &Path, script: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir).env("LC_ALL", "C");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let groups = [2000];
            if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(2000) != 0 || libc::setuid(1000) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::umask(0o022);
            Ok(())
        });
    }
    run_with_timeout(cmd, TOOL_TIMEOUT)
}
