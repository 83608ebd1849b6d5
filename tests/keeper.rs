//! The keeper with real processes and real Unix sockets: stub mount processes (shell scripts that
//! report ready and record their arguments and the file behind their fd 3), keepers served in this
//! process on a socket in a tempdir, descriptors passed with SCM_RIGHTS. The "FUSE device" is a
//! regular file, so the inode behind a process's fd 3 shows which connection it serves.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3csi::daemon::READY_LINE;
use s3csi::keeper::protocol::{Conn, Request, Response, VolumeSpec, VolumeState};
use s3csi::keeper::{Keeper, KeeperClient, KeeperConfig, MountTable};
use s3csi::mount::runner::MountRunner;

/// Every mountpoint counts as mounted while it holds this file.
const FAKE_MOUNT: &str = ".fake-mount";

/// While a mountpoint holds this file, its stub mount processes wait before reporting ready.
const SLOW_START: &str = ".slow-start";

struct FakeTable;

impl MountTable for FakeTable {
    fn is_mounted(&self, path: &Path) -> bool {
        path.join(FAKE_MOUNT).exists()
    }
}

struct Setup {
    dir: tempfile::TempDir,
    exe: PathBuf,
    device: PathBuf,
    log: PathBuf,
}

/// One line per mount process: `<pid> <inode of fd 3> <args...>`. SIGUSR2 and SIGTERM end it
/// with status 0, as a real mount process handing over or stopping; so does the removal of its
/// mountpoint with the test's directory, so no stub outlives its test.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let device = dir.path().join("fuse-device");
    std::fs::write(&device, b"").unwrap();
    let exe = dir.path().join("s3csi-stub");
    let body = format!(
        "#!/bin/sh\ntouch \"$3/{FAKE_MOUNT}\"\necho \"$$ $(stat -L -c %i /proc/$$/fd/3) $*\" >> {}\n\
         while [ -e \"$3/{SLOW_START}\" ]; do sleep 0.05; done\n\
         echo {READY_LINE}\nwhile [ -d \"$3\" ]; do sleep 0.2; done &\n\
         trap 'kill $! 2>/dev/null; exit 0' USR2 TERM\nwait $!\n",
        log.display()
    );
    // Written by another process: an open write descriptor here could leak into a child forked by
    // a parallel test and make running the script fail with ETXTBSY.
    let status = Command::new("/bin/sh")
        .args(["-c", r#"printf '%s' "$1" > "$2" && chmod +x "$2""#, "sh"])
        .arg(body)
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success());
    Setup { dir, exe, device, log }
}

impl Setup {
    fn config(&self, id: Option<&str>) -> KeeperConfig {
        let mut c = KeeperConfig::new(self.dir.path().join("state"), self.exe.clone());
        c.fuse_device = self.device.clone();
        c.ready_timeout = Duration::from_secs(5);
        c.keeper_id = id.map(str::to_owned);
        c
    }

    fn keeper(&self, id: Option<&str>) -> Keeper {
        Keeper::start(self.config(id), Arc::new(FakeTable)).unwrap()
    }

    fn client(&self) -> KeeperClient {
        KeeperClient::new(self.config(None).socket, None)
    }

    fn spec(&self, name: &str) -> VolumeSpec {
        let mountpoint = self.dir.path().join(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        VolumeSpec {
            volume: name.into(),
            volume_id: format!("bucket-{name}"),
            mountpoint: mountpoint.clone(),
            args: vec!["mount".into(), format!("bucket-{name}"), mountpoint.display().to_string()],
            env: BTreeMap::from([("AWS_SECRET_ACCESS_KEY".to_owned(), "s3cr3t".to_owned())]),
            env_remove: vec![],
            recovery_dir: self.dir.path().join("state/volumes").join(format!("{name}.recovery")),
        }
    }

    /// The processes started so far: (pid, inode of fd 3, arguments).
    fn processes(&self) -> Vec<(u32, u64, Vec<String>)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut parts = l.split(' ');
                let pid = parts.next().unwrap().parse().unwrap();
                let ino = parts.next().unwrap().parse().unwrap();
                (pid, ino, parts.map(str::to_owned).collect())
            })
            .collect()
    }

    fn device_ino(&self) -> u64 {
        std::fs::metadata(&self.device).unwrap().ino()
    }
}

fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()) != Some('Z'))
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; the pid is a live stub started by the test's keeper.
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn a_crashed_mount_process_gets_a_successor_on_the_same_descriptor_at_once() {
    let s = setup();
    let _keeper = s.keeper(None);
    let client = s.client();
    let spec = s.spec("a");
    let pid = client.start(&spec).unwrap();
    assert_eq!(client.start(&spec).unwrap(), pid, "a repeated start answers with the running process");
    let first = s.processes();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, pid);
    assert_eq!(first[0].1, s.device_ino(), "fd 3 is the device the keeper opened");
    assert!(!first[0].2.contains(&"--takeover".to_owned()));

    let killed = Instant::now();
    kill(pid, libc::SIGKILL);
    eventually("a successor starts", || s.processes().len() == 2);
    assert!(killed.elapsed() < Duration::from_secs(1), "within a second: {:?}", killed.elapsed());
    let (succ, ino, args) = s.processes()[1].clone();
    assert_eq!(ino, s.device_ino());
    assert_eq!(args.last().map(String::as_str), Some("--takeover"));
    eventually("the list shows it", || client.list().unwrap()[0].pid == Some(succ));
    let v = &client.list().unwrap()[0];
    assert_eq!((v.restarts, v.takeovers, v.state), (1, 0, VolumeState::Running));

    // Status 0 while still mounted is a crash too (only the keeper holds the connection).
    kill(succ, libc::SIGTERM);
    eventually("another successor starts", || s.processes().len() == 3);

    // Unmounted from outside: the volume is dropped, no successor.
    let third = s.processes()[2].0;
    std::fs::remove_file(spec.mountpoint.join(FAKE_MOUNT)).unwrap();
    kill(third, libc::SIGKILL);
    eventually("the volume is dropped", || client.list().unwrap().is_empty());
    assert!(!spec.recovery_dir.exists(), "with its journal");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.processes().len(), 3);
}

#[test]
fn a_successor_that_dies_before_it_serves_counts_as_a_restart() {
    let s = setup();
    let _keeper = s.keeper(None);
    let client = s.client();
    let spec = s.spec("a");
    let pid = client.start(&spec).unwrap();
    std::fs::write(spec.mountpoint.join(SLOW_START), b"").unwrap();
    kill(pid, libc::SIGKILL);
    eventually("a successor starts", || s.processes().len() == 2);
    let starting = s.processes()[1].0;
    assert_eq!(client.list().unwrap()[0].state, VolumeState::Restarting);
    kill(starting, libc::SIGKILL);
    std::fs::remove_file(spec.mountpoint.join(SLOW_START)).unwrap();
    eventually("the next successor serves", || {
        client.list().unwrap()[0].pid.is_some_and(|p| p != pid && p != starting)
    });
    let v = &client.list().unwrap()[0];
    assert_eq!((v.restarts, v.state), (2, VolumeState::Running), "both successors count: {v:?}");
}

#[test]
fn stop_ends_the_process_and_removes_the_recovery_dir() {
    let s = setup();
    let _keeper = s.keeper(None);
    let client = s.client();
    let spec = s.spec("b");
    let pid = client.start(&spec).unwrap();
    assert!(spec.recovery_dir.is_dir());
    let mut other = spec.clone();
    other.args.push("--read-only".into());
    let err = client.start(&other).unwrap_err();
    assert!(err.to_string().contains("already runs at"), "{err}");
    client.stop("b", &spec.mountpoint).unwrap();
    assert!(!alive(pid));
    assert!(!spec.recovery_dir.exists());
    assert!(client.list().unwrap().is_empty());
    client.stop("b", &spec.mountpoint).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.processes().len(), 1, "no successor after a stop");
}

#[test]
fn a_newer_keeper_takes_every_volume_over_and_the_old_one_stays_idle() {
    let s = setup();
    let old = s.keeper(Some("old-pod"));
    let client = s.client();
    let pids: Vec<u32> = ["c", "d"].iter().map(|n| client.start(&s.spec(n)).unwrap()).collect();

    let new = s.keeper(Some("new-pod"));
    assert!(old.list().is_empty(), "the old keeper holds nothing");
    let volumes = new.list();
    assert_eq!(volumes.len(), 2);
    for v in &volumes {
        assert_eq!((v.takeovers, v.restarts, v.state), (1, 0, VolumeState::Running), "{v:?}");
    }
    for pid in &pids {
        assert!(!alive(*pid), "the old mount process exited");
    }
    let procs = s.processes();
    assert_eq!(procs.len(), 4);
    for (pid, ino, args) in &procs[2..] {
        assert_eq!(*ino, s.device_ino(), "the successor serves the passed descriptor");
        assert_eq!(args.last().map(String::as_str), Some("--takeover"));
        assert!(volumes.iter().any(|v| v.pid == Some(*pid)));
    }
    // The socket is the new keeper's; the old one refuses new volumes.
    assert_eq!(client.list().unwrap().len(), 2);
    assert!(!old.serving());

    // A restart of the old keeper's process (same identity) stays idle and takes nothing back.
    let restarted = s.keeper(Some("old-pod"));
    assert!(!restarted.serving() && restarted.list().is_empty());
    assert_eq!(new.list().len(), 2);

    // The new keeper recovers its volumes' crashes.
    let pid = new.list()[0].pid.unwrap();
    kill(pid, libc::SIGKILL);
    eventually("restarted", || new.list().iter().any(|v| v.restarts == 1 && v.pid.is_some()));
}

/// Acts as a newer keeper that goes away at a chosen step.
fn broken_hand_over(socket: &Path, wait_for_exit: bool) {
    let mut conn = Conn::new(UnixStream::connect(socket).unwrap());
    conn.send(&Request::HandOver { keeper_id: None }, None).unwrap();
    let Some(Response::Offer { spec, .. }) = conn.recv::<Response>().unwrap() else { panic!("an offer first") };
    let fd = conn.take_fd().expect("the offer carries the descriptor");
    drop(fd);
    if wait_for_exit {
        conn.send(&Request::Accept { volume: spec.volume }, None).unwrap();
        let Some(Response::Exited { .. }) = conn.recv::<Response>().unwrap() else { panic!("then the exit") };
    }
}

#[test]
fn a_newer_keeper_lost_after_the_offer_leaves_the_process_serving() {
    let s = setup();
    let old = s.keeper(None);
    let client = s.client();
    let pid = client.start(&s.spec("e")).unwrap();
    broken_hand_over(&s.config(None).socket, false);
    eventually("the old keeper serves again", || old.serving());
    assert!(alive(pid));
    let v = &old.list()[0];
    assert_eq!((v.pid, v.state), (Some(pid), VolumeState::Running));
    assert!(client.start(&s.spec("f")).is_ok(), "starts are accepted again");
}

#[test]
fn a_newer_keeper_lost_after_the_exit_makes_the_old_keeper_start_a_successor() {
    let s = setup();
    let old = s.keeper(None);
    let client = s.client();
    let pid = client.start(&s.spec("g")).unwrap();
    broken_hand_over(&s.config(None).socket, true);
    assert!(!alive(pid), "the process handed over");
    eventually("a successor of the old keeper serves", || old.list().first().is_some_and(|v| v.pid.is_some()));
    let (succ, ino, args) = s.processes().last().cloned().unwrap();
    assert_eq!(old.list()[0].pid, Some(succ));
    assert_eq!(ino, s.device_ino());
    assert_eq!(args.last().map(String::as_str), Some("--takeover"));
}

#[test]
fn the_exit_report_carries_the_counts_as_they_ended() {
    let s = setup();
    let old = s.keeper(None);
    let client = s.client();
    let pid = client.start(&s.spec("h")).unwrap();
    let mut conn = Conn::new(UnixStream::connect(s.config(None).socket).unwrap());
    conn.send(&Request::HandOver { keeper_id: None }, None).unwrap();
    let Some(Response::Offer { spec, restarts: 0, .. }) = conn.recv::<Response>().unwrap() else { panic!("an offer") };
    drop(conn.take_fd());
    // The volume's process crashes after the offer: the old keeper restarts it meanwhile.
    kill(pid, libc::SIGKILL);
    eventually("a successor serves", || old.list()[0].pid.is_some_and(|p| p != pid));
    conn.send(&Request::Accept { volume: spec.volume }, None).unwrap();
    let Some(Response::Exited { counts, .. }) = conn.recv::<Response>().unwrap() else { panic!("then the exit") };
    assert_eq!(counts.map(|c| (c.restarts, c.takeovers)), Some((1, 0)), "the restart after the offer is counted");
}
