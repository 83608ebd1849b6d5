//! What a pod sees while the processes behind its volume die, restart and are upgraded
//! (`docs/recovery.md`), run as a node runs them: the node server and the keeper each in their own
//! "container" (a PID and mount namespace whose init is the program, killed as a whole by killing
//! that init), the FUSE and bind mounts propagating through a shared node root as through
//! kubelet's `Bidirectional` directory, and pod workloads outside, as uid 1000 in their own
//! processes, reaching the volume through a bind mount as a container runtime does.
//!
//! A pod workload ([`Workload`]) creates, writes, closes, re-reads and lists files in a loop, keeps
//! a read descriptor, a directory stream and its working directory in the volume for its whole
//! life, and records every error (op, errno, time) and every operation slower than [`STALL`]. A
//! watchdog kills it when it makes no progress for [`HANG`], so a hang fails the test instead of
//! CI. Every system call the test itself makes on a mount is bounded the same way ([`bounded`]).
//!
//! The rules checked (from `docs/recovery.md`): a crash of a mount process shows no `ENOTCONN`
//! and no hang; read descriptors, directory streams and working directories keep working; only
//! writes, `fsync`s and closes of files open for writing at the crash fail, with `EIO`, and none of
//! their data reaches S3; multipart uploads in flight are aborted. A node server restart and a
//! keeper upgrade show no error at all, and a file open for writing across an upgrade keeps
//! accepting writes.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::driver::{Creds, DRIVER, Driver};
use common::{S3Server, is_fuse_mount, is_mounted, mounts, random_bytes, sha256, wait_until};
use s3csi::csi::proto::{
    NodeGetVolumeStatsRequest, NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, VolumeCapability, volume_capability,
};
use s3csi::csi::volume::MARKER_NAME;
use serde::{Deserialize, Serialize};

/// The pod's user and primary group.
const POD_UID: u32 = 1000;
const POD_GID: u32 = 1000;
/// The pod's `securityContext.fsGroup`: a supplementary group of its processes, and the group
/// the volume is staged for (`volume_mount_group`), so uid 1000 may write.
const FS_GROUP: u32 = 2000;
/// An operation slower than this is a stall.
const STALL: Duration = Duration::from_secs(1);
/// A workload that records nothing for this long is hung and killed (a restart with the keeper's
/// longest back-off stays well below it).
const HANG: Duration = Duration::from_secs(20);
/// How soon after a crash a new mount process must serve (`docs/recovery.md`: about a second).
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);
/// Any single system call of the test on a mount.
const SYSCALL_LIMIT: Duration = Duration::from_secs(30);
/// How long a keeper may take to answer on its socket after starting.
const KEEPER_READY: Duration = Duration::from_secs(30);
/// The environment variable that turns [`workload_child`] into a pod workload process.
const WORKLOAD_ENV: &str = "S3CSI_RECOVERY_WORKLOAD";

// ---------------------------------------------------------------------------------------------
// Bounded calls and processes
// ---------------------------------------------------------------------------------------------

/// Runs `f` on its own thread and panics if it does not return within `limit`: a system call on
/// a mount that hangs fails the test instead of blocking it forever.
fn bounded<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {limit:?}: it hangs"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; the pid was read from /proc a moment ago.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Direct children of `pid` (zombies included).
/// `pid` as the innermost PID namespace it lives in sees it.
fn innermost_pid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let line = status.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid line");
    line.split_whitespace().last().and_then(|p| p.parse().ok()).expect("a pid")
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Descriptors of `pid` open on `/dev/fuse`.
fn fuse_fds(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok()).filter(|l| l == Path::new("/dev/fuse")).count()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The `s3csi mount` processes serving `mountpoint` among the children of `parents` (the
/// keepers). Only our own processes are looked at: reading another process's `/proc` entries can
/// block for as long as that process is stuck on a dead FUSE connection.
fn mount_processes(parents: &[u32], mountpoint: &Path) -> Vec<u32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    parents
        .iter()
        .flat_map(|&p| children_of(p))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.len() > 2 && args[0].ends_with(b"s3csi") && args[1] == b"mount" && args.contains(&want)
            })
        })
        .collect()
}

/// The one process serving the mount at `mountpoint`; panics unless there is exactly one.
fn mount_process(parents: &[u32], mountpoint: &Path) -> u32 {
    let pids = mount_processes(parents, mountpoint);
    assert_eq!(pids.len(), 1, "exactly one mount process serves {}: {pids:?}", mountpoint.display());
    pids[0]
}

/// Waits until a process other than `old` alone serves `mountpoint` and the mount answers;
/// returns its pid and how long that took.
fn wait_successor(parents: &[u32], mountpoint: &Path, old: u32, limit: Duration) -> Option<(u32, Duration)> {
    let started = Instant::now();
    let mut new = None;
    let replaced = wait_until(limit, || {
        let pids = mount_processes(parents, mountpoint);
        new = (pids.len() == 1 && pids[0] != old).then(|| pids[0]);
        new.is_some()
    });
    if !replaced {
        return None;
    }
    let path = mountpoint.to_owned();
    bounded("stat of the mount after the restart", SYSCALL_LIMIT, move || std::fs::metadata(path))
        .unwrap_or_else(|e| panic!("the mount does not answer after the restart: {e}"));
    Some((new.expect("replaced"), started.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// Containers: a PID + mount namespace per program
// ---------------------------------------------------------------------------------------------

/// `cmd` run as the init of a new PID namespace with its own mount namespace and `/proc`, as a
/// container runs its entrypoint. Mount propagation is left as it is, so mounts under a shared
/// mount (the node root) reach the host and the other containers. `--kill-child`: when the
/// `unshare` process dies, the namespace's init is killed, and with it everything inside.
fn contained(cmd: &Command) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child", "--mount", "--propagation", "unchanged", "--"]);
    c.args(["sh", "-c", r#"mount -t proc proc /proc && exec "$0" "$@""#]);
    c.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        c.current_dir(dir);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. A test that dies
    // takes its containers with it.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// Host pids of every process in the PID namespace whose init `unshare` (pid given) forked:
/// the init and its descendants.
fn namespace_pids(unshare: u32) -> Vec<u32> {
    let mut pids = children_of(unshare);
    let mut i = 0;
    while i < pids.len() {
        let kids = children_of(pids[i]);
        pids.extend(kids);
        i += 1;
    }
    pids
}

fn all_gone(pids: &[u32]) -> bool {
    pids.iter().all(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).map_or(true, |c| c.is_empty()))
}

/// A program running in its own namespaces (see [`contained`]); killed with everything in it
/// when dropped.
struct Container {
    name: String,
    unshare: Child,
    log: PathBuf,
}

impl Container {
    fn start(name: &str, cmd: &Command, log: PathBuf) -> Container {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("container log");
        let unshare = contained(cmd)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start container {name}: {e}"));
        let mut c = Container { name: name.to_owned(), unshare, log };
        let started = wait_until(Duration::from_secs(10), || {
            c.init().is_some() || c.unshare.try_wait().is_ok_and(|s| s.is_some())
        });
        assert!(started && c.init().is_some(), "container {name} has no init; its log:\n{}", c.log());
        c
    }

    /// Host pid of the namespace's init: the program itself, once `sh` has exec'd it.
    fn init(&self) -> Option<u32> {
        children_of(self.unshare.id()).first().copied()
    }

    /// Host pids of every process in the namespace.
    fn pids(&self) -> Vec<u32> {
        namespace_pids(self.unshare.id())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the container: SIGKILL to its init takes down every process in the namespace.
    fn kill(&mut self) {
        let pids = self.pids();
        if let Some(init) = self.init() {
            signal(init, libc::SIGKILL);
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        let gone = wait_until(Duration::from_secs(10), || all_gone(&pids));
        assert!(gone, "processes of container {} outlive it: {pids:?}", self.name);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The node: a shared root, the keeper and node server containers, kubelet's calls
// ---------------------------------------------------------------------------------------------

/// A volume as csi-provisioner created it.
struct Pv {
    name: String,
    handle: String,
    context: HashMap<String, String>,
}

/// One node: its root (kubelet's directory and the state directory, a shared mount), a node
/// server and one or more keepers, each in its own container.
struct Node {
    /// The node-stage Secret (credentials reach the mount processes only through it).
    secrets: HashMap<String, String>,
    driver: Option<Driver>,
    keepers: Vec<Container>,
    root: PathBuf,
    state_dir: PathBuf,
}

fn keeper_command(state_dir: &Path) -> Command {
    let mut cmd = Command::new(common::S3CSI_BIN);
    cmd.arg("keeper").arg(format!("--state-dir={}", state_dir.display()));
    cmd.env("RUST_LOG", "info");
    cmd
}

impl Node {
    fn start(server: &S3Server) -> Node {
        let dir = tempfile::Builder::new().prefix("s3csi-node-").tempdir().expect("node root");
        let root = dir.path().to_owned();
        // kubelet's root is shared (`Bidirectional` in the driver's pod): mounts made in one
        // container show up on the host and in the others.
        for args in [vec!["--bind", ".", "."], vec!["--make-shared", "."]] {
            let status = Command::new("mount").args(args).current_dir(&root).status().expect("mount");
            assert!(status.success(), "cannot make {} a shared mount", root.display());
        }
        let state_dir = root.join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let secrets = common::driver::secrets_for(server);
        let mut node = Node { secrets, driver: None, keepers: Vec::new(), root, state_dir };
        node.start_keeper();
        node.driver = Some(node.start_driver(server, dir));
        node
    }

    fn start_driver(&self, server: &S3Server, dir: tempfile::TempDir) -> Driver {
        Driver::start_wrapped(
            server,
            Creds::SecretsOnly,
            dir,
            self.state_dir.clone(),
            &["--spawn-keeper=false"],
            |cmd| contained(&cmd),
        )
    }

    /// Starts a keeper in a new container on the node's state directory and waits until it
    /// answers on `keeper.sock`.
    fn start_keeper(&mut self) -> &Container {
        let n = self.keepers.len() + 1;
        let log = self.root.join(format!("keeper-{n}.log"));
        let mut cmd = keeper_command(&self.state_dir);
        cmd.arg(format!("--ready-file={}", self.ready_file(n).display()));
        let keeper = Container::start(&format!("keeper-{n}"), &cmd, log);
        // A later keeper takes over from the one answering now; the tests wait for that.
        let socket = self.state_dir.join("keeper.sock");
        let mut keeper = keeper;
        let ready = n > 1
            || wait_until(KEEPER_READY, || {
                keeper.unshare.try_wait().is_ok_and(|s| s.is_some())
                    || std::os::unix::net::UnixStream::connect(&socket).is_ok()
            });
        let running = keeper.unshare.try_wait().is_ok_and(|s| s.is_none());
        assert!(ready && running, "keeper-{n} does not answer on {}:\n{}", socket.display(), keeper.log());
        self.keepers.push(keeper);
        self.keepers.last().expect("just pushed")
    }

    /// The `n`th keeper's `--ready-file` (what the DaemonSet's readiness probe checks).
    fn ready_file(&self, n: usize) -> PathBuf {
        self.root.join(format!("keeper-{n}.ready"))
    }

    /// Host pids of the running keepers (the parents of the mount processes).
    fn keeper_pids(&self) -> Vec<u32> {
        self.keepers.iter().filter_map(Container::init).collect()
    }

    fn mount_process(&self, staging: &Path) -> u32 {
        mount_process(&self.keeper_pids(), staging)
    }

    fn mount_processes(&self, staging: &Path) -> Vec<u32> {
        mount_processes(&self.keeper_pids(), staging)
    }

    /// Waits for a new mount process after `old` died; panics with the logs after `limit`.
    fn wait_successor(&self, staging: &Path, old: u32, limit: Duration) -> (u32, Duration) {
        wait_successor(&self.keeper_pids(), staging, old, limit)
            .unwrap_or_else(|| panic!("no new mount process within {limit:?}\n{}", self.logs()))
    }

    fn driver(&self) -> &Driver {
        self.driver.as_ref().expect("a node server runs")
    }

    /// Kills the node server's container, then starts a new one on the same root and state.
    fn restart_driver(&mut self, server: &S3Server) {
        let driver = self.driver.take().expect("a node server runs");
        let pids = namespace_pids(driver.pid().expect("node server runs"));
        assert!(!pids.is_empty(), "the node server's container has processes");
        let (dir, _) = driver.kill();
        assert!(
            wait_until(Duration::from_secs(10), || all_gone(&pids)),
            "the node server's container is gone: {pids:?}"
        );
        self.driver = Some(self.start_driver(server, dir));
    }

    /// The one staged volume's `<recovery dir>/pid` and its mount log.
    fn volume_files(&self) -> (Option<u32>, String) {
        let volumes = self.state_dir.join("volumes");
        let mut pid = None;
        let mut log = String::new();
        for entry in std::fs::read_dir(&volumes).expect("volumes dir").flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "recovery") {
                pid = std::fs::read_to_string(path.join("pid")).ok().and_then(|p| p.trim().parse().ok());
            } else if path.extension().is_some_and(|e| e == "log") {
                log += &std::fs::read_to_string(&path).unwrap_or_default();
            }
        }
        (pid, log)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.driver {
            s += &format!("--- node server ---\n{}\n", d.log());
        }
        for k in &self.keepers {
            s += &format!("--- {} ---\n{}\n", k.name, k.log());
        }
        s
    }

    fn provision(&self, name: &str) -> Pv {
        let pv_name = format!("pvc-{}", &sha256(name.as_bytes())[..16]);
        let vol = self
            .driver()
            .create(&pv_name, &[], &self.secrets)
            .unwrap_or_else(|e| panic!("CreateVolume: {e:?}\n{}", self.logs()));
        Pv { name: pv_name, handle: vol.volume_id, context: vol.volume_context }
    }

    fn staging_path(&self, pv: &Pv) -> PathBuf {
        self.root
            .join("kubelet/plugins/kubernetes.io/csi")
            .join(DRIVER)
            .join(sha256(pv.handle.as_bytes()))
            .join("globalmount")
    }

    fn target_path(&self, pv: &Pv, pod: &str) -> PathBuf {
        self.root.join("kubelet/pods").join(pod).join("volumes/kubernetes.io~csi").join(&pv.name).join("mount")
    }

    /// NodeStageVolume + NodePublishVolume as kubelet sends them for a pod with fsGroup
    /// [`FS_GROUP`]; returns (staging, target).
    fn mount(&self, pv: &Pv, pod: &str) -> (PathBuf, PathBuf) {
        let d = self.driver();
        let (staging, target) = (self.staging_path(pv), self.target_path(pv, pod));
        mkdir_0750(&staging);
        let req = NodeStageVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability()),
            volume_context: pv.context.clone(),
            secrets: self.secrets.clone(),
            ..Default::default()
        };
        rpc(d, d.node().node_stage_volume(req)).unwrap_or_else(|e| panic!("NodeStageVolume: {e:?}\n{}", self.logs()));
        mkdir_0750(target.parent().expect("target has a parent"));
        let mut context = pv.context.clone();
        context.insert("csi.storage.k8s.io/pod.name".into(), pod.into());
        context.insert("csi.storage.k8s.io/pod.namespace".into(), "default".into());
        let req = NodePublishVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability()),
            volume_context: context,
            ..Default::default()
        };
        rpc(d, d.node().node_publish_volume(req))
            .unwrap_or_else(|e| panic!("NodePublishVolume: {e:?}\n{}", self.logs()));
        assert!(is_fuse_mount(&staging) && is_mounted(&target), "staged and published on the host");
        (staging, target)
    }

    /// NodeUnpublishVolume + NodeUnstageVolume; afterwards nothing is mounted and no process
    /// serves the volume.
    fn unmount(&self, pv: &Pv, staging: &Path, target: &Path) {
        let d = self.driver();
        let req =
            NodeUnpublishVolumeRequest { volume_id: pv.handle.clone(), target_path: target.display().to_string() };
        rpc(d, d.node().node_unpublish_volume(req))
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume: {e:?}\n{}", self.logs()));
        let req = NodeUnstageVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: staging.display().to_string(),
        };
        rpc(d, d.node().node_unstage_volume(req))
            .unwrap_or_else(|e| panic!("NodeUnstageVolume: {e:?}\n{}", self.logs()));
        assert!(!is_mounted(target) && !is_mounted(staging), "unmounted on the host");
        let stopped = wait_until(Duration::from_secs(30), || self.mount_processes(staging).is_empty());
        assert!(stopped, "mount processes {:?} outlive the unstage\n{}", self.mount_processes(staging), self.logs());
    }

    fn stats(&self, pv: &Pv, target: &Path) -> Result<(), tonic::Status> {
        let d = self.driver();
        let req = NodeGetVolumeStatsRequest {
            volume_id: pv.handle.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        };
        rpc(d, d.node().node_get_volume_stats(req)).map(|_| ())
    }

    /// `s3csi_mount_<kind>_total` for the volume, from the node server's metrics endpoint.
    fn metric(&self, name: &str, pv: &Pv) -> f64 {
        let text = common::scrape_metrics(self.driver().metrics_port);
        common::metric_sum(&text, name, &[&format!("volume=\"{}\"", pv.handle)])
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // The keepers go first, so nothing restarts what the driver's drop unmounts.
        self.keepers.clear();
        self.driver = None;
        if is_mounted(&self.root) {
            let _ = Command::new("umount").arg("-l").arg(&self.root).status();
        }
    }
}

/// How long a CSI call may take before the test calls it hung.
const RPC_LIMIT: Duration = Duration::from_secs(120);

/// One CSI call, bounded by [`RPC_LIMIT`].
fn rpc<T>(
    d: &Driver,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    d.rt.block_on(async { tokio::time::timeout(RPC_LIMIT, call).await })
        .unwrap_or_else(|_| panic!("a CSI call did not return within {RPC_LIMIT:?}"))
        .map(tonic::Response::into_inner)
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: String::new(),
            mount_flags: Vec::new(),
            volume_mount_group: FS_GROUP.to_string(),
        })),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn mkdir_0750(path: &Path) {
    if !path.is_dir() {
        std::fs::create_dir_all(path).expect("mkdir");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    }
}

/// The published volume bound into a pod's root filesystem (a world-searchable tempdir), as the
/// container runtime does; the pod's processes reach it without searching kubelet's directories.
struct PodView {
    _root: tempfile::TempDir,
    path: PathBuf,
}

impl PodView {
    fn new(target: &Path) -> PodView {
        let root = tempfile::Builder::new().prefix("s3csi-pod-").tempdir().expect("pod root");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = root.path().join("data");
        std::fs::create_dir(&path).expect("mkdir");
        let status = Command::new("mount").arg("--bind").arg(target).arg(&path).status().expect("mount");
        assert!(status.success(), "bind {} into the pod", target.display());
        PodView { _root: root, path }
    }
}

impl Drop for PodView {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

// ---------------------------------------------------------------------------------------------
// The pod workload
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct WorkloadSpec {
    /// The volume as the pod sees it.
    dir: PathBuf,
    /// Its own directory inside the volume.
    name: String,
    events: PathBuf,
    stop: PathBuf,
    max_secs: u64,
    seed: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "ev", rename_all = "lowercase")]
enum Event {
    /// About to run `op` (the last one tells where a hung workload waits).
    At {
        t: u64,
        op: String,
        file: String,
    },
    Err {
        t: u64,
        op: String,
        errno: i32,
        file: String,
        detail: String,
    },
    Stall {
        t: u64,
        op: String,
        ms: u64,
        file: String,
    },
    /// A file written, closed and read back intact.
    File {
        t: u64,
        name: String,
        len: u64,
        sha: String,
    },
    Done {
        t: u64,
        iterations: u64,
    },
}

/// The contents of the workload's `i`th file.
fn workload_data(seed: u64, i: u64) -> Vec<u8> {
    random_bytes(seed.wrapping_mul(1_000_003).wrapping_add(i), 1000 + (i as usize * 7919) % 60_000)
}

const KEEP_LEN: usize = 70_000;

/// Not a test: the pod workload process, when started by [`Workload::start`] (the test binary
/// runs itself with [`WORKLOAD_ENV`] set). Without it, returns at once.
#[test]
fn workload_child() {
    let Ok(spec) = std::env::var(WORKLOAD_ENV) else { return };
    let spec: WorkloadSpec = serde_json::from_str(&spec).expect("workload spec");
    let code = match run_workload(&spec) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("workload setup failed: {e}");
            2
        }
    };
    std::process::exit(code);
}

struct Recorder {
    out: File,
}

impl Recorder {
    fn emit(&mut self, e: &Event) {
        let mut line = serde_json::to_vec(e).expect("event serializes");
        line.push(b'\n');
        let _ = self.out.write_all(&line);
    }

    fn op<T>(&mut self, op: &str, file: &str, f: impl FnOnce() -> std::io::Result<T>) -> Option<T> {
        self.emit(&Event::At { t: now_ms(), op: op.into(), file: file.into() });
        let started = Instant::now();
        let r = f();
        let took = started.elapsed();
        if took > STALL {
            self.emit(&Event::Stall { t: now_ms(), op: op.into(), ms: took.as_millis() as u64, file: file.into() });
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                self.emit(&Event::Err { t: now_ms(), op: op.into(), errno, file: file.into(), detail: e.to_string() });
                None
            }
        }
    }
}

/// A directory stream kept open for the workload's whole life.
struct DirStream(*mut libc::DIR);

impl DirStream {
    fn open(path: &str) -> std::io::Result<DirStream> {
        let c = std::ffi::CString::new(path).expect("no NUL");
        // SAFETY: valid NUL-terminated path; the DIR is owned by the returned value.
        let d = unsafe { libc::opendir(c.as_ptr()) };
        if d.is_null() { Err(std::io::Error::last_os_error()) } else { Ok(DirStream(d)) }
    }

    /// Every name, read again from the start through the same descriptor.
    fn names(&self) -> std::io::Result<Vec<String>> {
        // SAFETY: self.0 is a live DIR; each dirent is copied before the next readdir.
        unsafe {
            libc::rewinddir(self.0);
            let mut names = Vec::new();
            loop {
                *libc::__errno_location() = 0;
                let ent = libc::readdir(self.0);
                if ent.is_null() {
                    let errno = *libc::__errno_location();
                    return if errno == 0 { Ok(names) } else { Err(std::io::Error::from_raw_os_error(errno)) };
                }
                names.push(std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()).to_string_lossy().into_owned());
            }
        }
    }
}

fn differs(what: &str) -> std::io::Error {
    std::io::Error::other(format!("{what}: contents differ"))
}

fn run_workload(spec: &WorkloadSpec) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let out = std::fs::OpenOptions::new().append(true).open(&spec.events)?;
    let mut rec = Recorder { out };
    let work = spec.dir.join(&spec.name);
    std::fs::create_dir(&work)?;
    std::env::set_current_dir(&work)?;
    let keep_data = random_bytes(spec.seed, KEEP_LEN);
    std::fs::write("keep.txt", &keep_data)?;
    let keep = File::open("keep.txt")?;
    let dir = DirStream::open(".")?;
    // The working directory's owner and mode: a successor must show them (not a placeholder
    // that a group-writable volume root would hide), through the path and the descriptor.
    let owned = |md: std::fs::Metadata| (md.uid(), md.gid(), md.mode());
    let cwd_attrs = owned(std::fs::metadata(".")?);
    let deadline = Instant::now() + Duration::from_secs(spec.max_secs);
    let mut i = 0u64;
    while !spec.stop.exists() && Instant::now() < deadline {
        let name = format!("f-{i:04}");
        let data = workload_data(spec.seed, i);
        let closed = write_file(&mut rec, &name, &data);
        if closed {
            let read = rec.op("reread", &name, || {
                let got = std::fs::read(&name)?;
                if got == data { Ok(()) } else { Err(differs(&name)) }
            });
            if read.is_some() {
                let (len, sha) = (data.len() as u64, sha256(&data));
                rec.emit(&Event::File { t: now_ms(), name: name.clone(), len, sha });
            }
        }
        rec.op("list-cwd", &name, || {
            let names: BTreeSet<String> = std::fs::read_dir(".")?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()?;
            if !names.contains("keep.txt") || (closed && !names.contains(&name)) {
                return Err(std::io::Error::other(format!("listing misses keep.txt or {name}")));
            }
            Ok(())
        });
        rec.op("read-keep-fd", "keep.txt", || {
            let mut buf = vec![0u8; KEEP_LEN];
            keep.read_exact_at(&mut buf, 0)?;
            if buf == keep_data { Ok(()) } else { Err(differs("keep.txt")) }
        });
        rec.op("list-dir-fd", "", || {
            let names = dir.names()?;
            if names.iter().any(|n| n == "keep.txt") {
                Ok(())
            } else {
                Err(std::io::Error::other("directory stream misses keep.txt"))
            }
        });
        rec.op("stat-cwd", "", || {
            let now = owned(std::fs::metadata(".")?);
            if now == cwd_attrs {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("cwd {now:?}, was {cwd_attrs:?}")))
            }
        });
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    rec.emit(&Event::Done { t: now_ms(), iterations: i });
    Ok(())
}

/// create, write, close; whether all three succeeded.
fn write_file(rec: &mut Recorder, name: &str, data: &[u8]) -> bool {
    let Some(mut f) = rec.op("create", name, || File::create(name)) else { return false };
    let wrote = rec.op("write", name, || f.write_all(data)).is_some();
    let fd = f.into_raw_fd();
    let closed = rec
        .op("close", name, || {
            // SAFETY: fd was just released by File and is closed exactly once.
            if unsafe { libc::close(fd) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        })
        .is_some();
    wrote && closed
}

/// A running pod workload process (uid [`POD_UID`], groups [`POD_GID`] + [`FS_GROUP`]) with its
/// watchdog.
struct Workload {
    child: Child,
    spec: WorkloadSpec,
    _dir: tempfile::TempDir,
    stopped: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<Option<String>>>,
}

/// What a workload recorded.
struct Report {
    events: Vec<Event>,
    hang: Option<String>,
    status: Option<ExitStatus>,
    stderr: String,
}

impl Workload {
    fn start(volume: &Path, name: &str, seed: u64) -> Workload {
        let dir = tempfile::Builder::new().prefix("s3csi-workload-").tempdir().expect("workload dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let events = dir.path().join("events.jsonl");
        let stderr = dir.path().join("stderr");
        for f in [&events, &stderr] {
            File::create(f).expect("create");
            std::os::unix::fs::chown(f, Some(POD_UID), Some(POD_GID)).expect("chown");
        }
        let spec = WorkloadSpec {
            dir: volume.to_owned(),
            name: name.to_owned(),
            events: events.clone(),
            stop: dir.path().join("stop"),
            max_secs: 300,
            seed,
        };
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["workload_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(WORKLOAD_ENV, serde_json::to_string(&spec).expect("spec serializes"))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().append(true).open(&stderr).expect("stderr"));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let groups = [POD_GID, FS_GROUP];
                if libc::setgroups(2, groups.as_ptr()) != 0 || libc::setgid(POD_GID) != 0 || libc::setuid(POD_UID) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::umask(0o022);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start the workload");
        let stopped = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (pid, stopped, events) = (child.id(), Arc::clone(&stopped), events.clone());
            std::thread::spawn(move || watch(pid, &events, &stopped))
        };
        Workload { child, spec, _dir: dir, stopped, watchdog: Some(watchdog) }
    }

    fn events(&self) -> Vec<Event> {
        parse_events(&self.spec.events)
    }

    fn files_done(&self) -> usize {
        self.events().iter().filter(|e| matches!(e, Event::File { .. })).count()
    }

    /// Waits until the workload has completed `n` more files than now; false if it did not.
    fn progress(&self, n: usize, limit: Duration) -> bool {
        let want = self.files_done() + n;
        wait_until(limit, || self.files_done() >= want)
    }

    /// Waits (at most `limit`) until the workload is about to run one of `ops`.
    fn wait_for_op(&self, ops: &[&str], limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.spec.events).unwrap_or_default();
            let last = text.lines().last().and_then(|l| serde_json::from_str::<Event>(l).ok());
            if matches!(last, Some(Event::At { op, .. }) if ops.contains(&op.as_str())) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    fn stop(mut self) -> Report {
        File::create(&self.spec.stop).expect("stop file");
        let status = common::wait_timeout(&mut self.child, HANG + Duration::from_secs(10));
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stopped.store(true, Ordering::SeqCst);
        let hang = self.watchdog.take().and_then(|w| w.join().ok()).flatten();
        let stderr = std::fs::read_to_string(self._dir.path().join("stderr")).unwrap_or_default();
        Report { events: self.events(), hang, status, stderr }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stopped.store(true, Ordering::SeqCst);
    }
}

fn parse_events(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The last line may be half written.
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Whether the child `pid` has exited (without reaping it).
fn exited(pid: u32) -> bool {
    // SAFETY: waitid writes only into `info`; WNOWAIT leaves the child to its owner.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        r != 0 || info.si_pid() != 0
    }
}

/// The watchdog: kills the workload when its event file stops growing for [`HANG`], and says
/// where it hung.
fn watch(pid: u32, events: &Path, stopped: &AtomicBool) -> Option<String> {
    let mut last_len = 0;
    let mut last_change = Instant::now();
    while !stopped.load(Ordering::SeqCst) {
        if exited(pid) {
            return None;
        }
        let len = std::fs::metadata(events).map(|m| m.len()).unwrap_or(0);
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        } else if last_change.elapsed() > HANG {
            let last = std::fs::read_to_string(events).unwrap_or_default().lines().last().unwrap_or("").to_owned();
            // Bounded: /proc of a process stuck on FUSE may block the reader too.
            let read = |f: &str| {
                let path = format!("/proc/{pid}/{f}");
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || tx.send(std::fs::read_to_string(path).unwrap_or_default()));
                rx.recv_timeout(Duration::from_secs(2)).unwrap_or_else(|_| "<blocked>".into())
            };
            let why = format!(
                "no progress for {HANG:?}; last event {last}; wchan {}; syscall {}; stack:\n{}",
                read("wchan"),
                read("syscall").trim(),
                read("stack")
            );
            signal(pid, libc::SIGKILL);
            return Some(why);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

impl Report {
    fn errors(&self) -> Vec<(&str, i32, &str, &str)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Err { op, errno, file, detail, .. } => {
                    Some((op.as_str(), *errno, file.as_str(), detail.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    fn stalls(&self) -> Vec<(&str, u64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Stall { op, ms, .. } => Some((op.as_str(), *ms)),
                _ => None,
            })
            .collect()
    }

    fn files(&self) -> BTreeMap<String, (u64, String)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::File { name, len, sha, .. } => Some((name.clone(), (*len, sha.clone()))),
                _ => None,
            })
            .collect()
    }

    fn iterations(&self) -> u64 {
        self.events
            .iter()
            .find_map(|e| if let Event::Done { iterations, .. } = e { Some(*iterations) } else { None })
            .unwrap_or(0)
    }

    fn summary(&self) -> String {
        format!(
            "iterations {}, files {}, errors {:?}, stalls {:?}, hang {:?}, exit {:?}, stderr {}",
            self.iterations(),
            self.files().len(),
            self.errors(),
            self.stalls(),
            self.hang,
            self.status,
            self.stderr.trim()
        )
    }

    /// The workload ran to its end: no hang, exited 0, did some work.
    fn assert_ran(&self) {
        assert!(self.hang.is_none(), "the workload hung: {}", self.hang.as_deref().unwrap_or_default());
        assert!(self.status.is_some_and(|s| s.success()), "the workload failed: {}", self.summary());
        assert!(self.iterations() > 0 && !self.files().is_empty(), "the workload did nothing: {}", self.summary());
    }

    /// Nothing failed and nothing stalled longer than `max_stall`.
    fn assert_unaffected(&self, max_stall: Duration) {
        self.assert_ran();
        assert!(self.errors().is_empty(), "the workload saw errors: {}", self.summary());
        let long: Vec<_> = self.stalls().into_iter().filter(|(_, ms)| *ms > max_stall.as_millis() as u64).collect();
        assert!(long.is_empty(), "the workload stalled over {max_stall:?}: {long:?}; {}", self.summary());
    }

    /// The rules after `crashes` crashes: the only errors are `EIO` from writes and closes of
    /// files being written at a crash (at most one file per crash); never `ENOTCONN`; reads,
    /// listings, the kept descriptors and the working directory never fail. Returns the files
    /// that failed.
    fn assert_crash_rules(&self, crashes: usize) -> BTreeSet<String> {
        self.assert_ran();
        let errors = self.errors();
        assert!(
            errors.iter().all(|(_, errno, _, _)| *errno != libc::ENOTCONN),
            "ENOTCONN after a crash: {}",
            self.summary()
        );
        let not_allowed: Vec<_> = errors
            .iter()
            .filter(|(op, errno, _, _)| !(*errno == libc::EIO && matches!(*op, "write" | "close")))
            .collect();
        assert!(not_allowed.is_empty(), "errors the rules do not allow: {not_allowed:?}; {}", self.summary());
        let failed: BTreeSet<String> = errors.iter().map(|(_, _, f, _)| (*f).to_owned()).collect();
        assert!(failed.len() <= crashes, "more files failed than crashes ({crashes}): {}", self.summary());
        failed
    }
}

/// Every file the workload completed is in S3 intact; every file whose write or close failed is
/// absent, empty or complete (never torn).
fn assert_workload_in_s3(
    server: &S3Server,
    bucket: &str,
    dir: &str,
    seed: u64,
    report: &Report,
    failed: &BTreeSet<String>,
) {
    let keys: BTreeSet<String> = server.list_keys(bucket, &format!("{dir}/")).into_iter().collect();
    for (name, (len, sha)) in report.files() {
        let key = format!("{dir}/{name}");
        assert!(keys.contains(&key), "{key} was closed without error but is not in S3");
        let got = server.get(bucket, &key);
        assert_eq!((got.len() as u64, sha256(&got)), (len, sha), "{key} in S3 differs from what was written");
    }
    for name in failed {
        let key = format!("{dir}/{name}");
        if keys.contains(&key) {
            let got = server.get(bucket, &key);
            let i: u64 = name.trim_start_matches("f-").parse().expect("workload file name");
            assert!(
                got.is_empty() || got == workload_data(seed, i),
                "{key}, whose write failed with EIO, is torn in S3 ({} bytes)",
                got.len()
            );
        }
    }
    assert_eq!(server.get(bucket, &format!("{dir}/keep.txt")), random_bytes(seed, KEEP_LEN));
}

fn assert_no_uploads(server: &S3Server, bucket: &str) {
    let uploads = server.multipart_uploads(bucket);
    assert!(uploads.is_empty(), "multipart uploads left in {bucket}: {uploads:?}");
}

/// `write` then `close` on a descriptor, bounded; their errnos (0 = success).
fn write_then_close(file: File, data: Vec<u8>) -> (i32, i32) {
    bounded("write and close of a file held open", SYSCALL_LIMIT, move || {
        let mut f = file;
        let w = f.write_all(&data).err().map_or(0, |e| e.raw_os_error().unwrap_or(-1));
        let fd = f.into_raw_fd();
        // SAFETY: fd was just released by File and is closed exactly once.
        let c = if unsafe { libc::close(fd) } == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        };
        (w, c)
    })
}

fn open_for_writing(path: &Path, data: Vec<u8>) -> File {
    let path = path.to_owned();
    bounded("create and first write", SYSCALL_LIMIT, move || {
        let mut f = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        f.write_all(&data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        f
    })
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// SIGKILL of a volume's mount process while a pod works in it: the keeper starts a successor on
/// the same connection within seconds; the pod sees no ENOTCONN and no hang, its kept read
/// descriptor, directory stream and working directory go on working; a file open for writing
/// across the crash fails with EIO and leaves nothing in S3.
#[test]
fn a_killed_mount_process_is_replaced_and_the_pod_sees_no_enotconn() {
    let server = S3Server::start_faithful();
    let node = Node::start(&server);
    let pv = node.provision("crash");
    let (staging, target) = node.mount(&pv, "pod-crash");
    let view = PodView::new(&target);
    let workload = Workload::start(&view.path, "wl", 11);
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload never got going\n{}", node.logs());

    let held = open_for_writing(&view.path.join("held.bin"), random_bytes(5, 64 << 10));
    let old = node.mount_process(&staging);
    signal(old, libc::SIGKILL);
    let (new, took) = node.wait_successor(&staging, old, RECOVERY_DEADLINE);
    eprintln!("mount process {old} killed; {new} serves after {took:?}");
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload makes no progress after the restart");

    let (w, c) = write_then_close(held, random_bytes(6, 64 << 10));
    assert!(
        (w == libc::EIO || c == libc::EIO) && [0, libc::EIO].contains(&w) && [0, libc::EIO].contains(&c),
        "a file open for writing across the crash: write errno {w}, close errno {c}; want EIO"
    );
    let report = workload.stop();
    eprintln!("workload: {}", report.summary());
    let failed = report.assert_crash_rules(1);

    let keys = server.list_keys(&pv.handle, "");
    assert!(
        !keys.contains(&"held.bin".to_owned()) || server.get(&pv.handle, "held.bin").is_empty(),
        "nothing written to held.bin reaches S3"
    );
    assert_workload_in_s3(&server, &pv.handle, "wl", 11, &report, &failed);
    assert_no_uploads(&server, &pv.handle);
    assert!(node.metric("s3csi_mount_restarts_total", &pv) >= 1.0, "the restart is counted");
    let (recorded, log) = node.volume_files();
    assert_eq!(
        recorded,
        Some(innermost_pid(new)),
        "the recovery directory names the successor (as its keeper sees it)"
    );
    assert!(log.contains("took the mounted connection over"), "the takeover is in the volume's log:\n{log}");
    drop(view);
    node.unmount(&pv, &staging, &target);
}

/// Killing the node server's container touches no mount: the pod sees no error at all, and a
/// new node server on the same state directory serves stats, unpublish and unstage for volumes
/// the old one staged.
#[test]
fn a_node_server_restart_is_invisible_to_pods() {
    let server = S3Server::start_faithful();
    let mut node = Node::start(&server);
    let pv = node.provision("node-restart");
    let (staging, target) = node.mount(&pv, "pod-node");
    let view = PodView::new(&target);
    let workload = Workload::start(&view.path, "wl", 21);
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload never got going\n{}", node.logs());
    let mount_pid = node.mount_process(&staging);

    node.restart_driver(&server);
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload makes no progress");
    assert_eq!(node.mount_process(&staging), mount_pid, "the mount process outlives the node server");
    node.stats(&pv, &target).unwrap_or_else(|e| panic!("NodeGetVolumeStats after the restart: {e:?}\n{}", node.logs()));

    let report = workload.stop();
    eprintln!("workload: {}", report.summary());
    report.assert_unaffected(Duration::from_secs(2));
    assert_workload_in_s3(&server, &pv.handle, "wl", 21, &report, &BTreeSet::new());
    drop(view);
    node.unmount(&pv, &staging, &target);
    assert_no_uploads(&server, &pv.handle);
}

/// A second keeper on the same state directory takes every volume over (hand-over, new mount
/// processes); killing the first keeper's container afterwards changes nothing. The pod sees no
/// error and no stall over 2 s; a file open for writing across the upgrade keeps accepting
/// writes and is complete in S3 after close.
#[test]
fn a_keeper_upgrade_hands_every_volume_over_without_errors() {
    let server = S3Server::start_faithful();
    let mut node = Node::start(&server);
    let a = node.provision("upgrade-a");
    let b = node.provision("upgrade-b");
    let (staging_a, target_a) = node.mount(&a, "pod-upgrade-a");
    let (staging_b, target_b) = node.mount(&b, "pod-upgrade-b");
    let view = PodView::new(&target_a);
    let workload = Workload::start(&view.path, "wl", 31);
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload never got going\n{}", node.logs());
    let (first, second) = (random_bytes(7, 300 << 10), random_bytes(8, 200 << 10));
    let held = open_for_writing(&view.path.join("held.bin"), first.clone());
    let old_a = node.mount_process(&staging_a);
    let old_b = node.mount_process(&staging_b);

    let old_keeper = node.keepers[0].init().expect("old keeper runs");
    let new_keeper = node.start_keeper().init().expect("keeper runs");
    // Ready (so Kubernetes would delete the old pod) only once every volume is the new keeper's.
    let ready = node.ready_file(2);
    assert!(wait_until(Duration::from_secs(60), || ready.exists()), "the new keeper never gets ready\n{}", node.logs());
    for s in [&staging_a, &staging_b] {
        assert!(
            mount_processes(&[old_keeper], s).is_empty() && mount_processes(&[new_keeper], s).len() == 1,
            "ready while the old keeper still runs {}\n{}",
            s.display(),
            node.logs()
        );
    }
    assert!(node.ready_file(1).exists(), "the first keeper was ready too");
    let handed_over = wait_until(Duration::from_secs(60), || {
        [&staging_a, &staging_b]
            .iter()
            .all(|s| mount_processes(&[new_keeper], s).len() == 1 && mount_processes(&[old_keeper], s).is_empty())
    });
    assert!(handed_over, "the new keeper does not run every volume's mount process\n{}", node.logs());
    // Confirmed: the old keeper closed its descriptors (before that, its end is a crash).
    let confirmed = wait_until(Duration::from_secs(30), || fuse_fds(old_keeper) == 0 && fuse_fds(new_keeper) == 2);
    assert!(
        confirmed,
        "the hand-over is never confirmed: /dev/fuse descriptors: old keeper {}, new keeper {}\n{}",
        fuse_fds(old_keeper),
        fuse_fds(new_keeper),
        node.logs()
    );
    let (new_a, new_b) = (node.mount_process(&staging_a), node.mount_process(&staging_b));
    assert!(new_a != old_a && new_b != old_b, "successors are new processes");
    node.keepers[0].kill();
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload makes no progress after the upgrade");
    assert_eq!(
        (node.mount_process(&staging_a), node.mount_process(&staging_b)),
        (new_a, new_b),
        "the old keeper's end changes nothing"
    );

    let (w, c) = write_then_close(held, second.clone());
    assert_eq!((w, c), (0, 0), "a file open for writing across the upgrade keeps working");
    let report = workload.stop();
    eprintln!("workload: {}", report.summary());
    report.assert_unaffected(Duration::from_secs(2));
    let mut want = first;
    want.extend_from_slice(&second);
    common::assert_same_bytes(&server.get(&a.handle, "held.bin"), &want, "held.bin after the upgrade");
    assert_workload_in_s3(&server, &a.handle, "wl", 31, &report, &BTreeSet::new());
    // Volume B, idle during the upgrade, serves under the new keeper.
    let path = target_b.join("after-upgrade");
    bounded("write to volume B", SYSCALL_LIMIT, move || std::fs::write(path, b"b")).expect("write to volume B");
    assert_eq!(server.get(&b.handle, "after-upgrade"), b"b");
    assert!(node.metric("s3csi_mount_takeovers_total", &a) >= 1.0, "the takeover is counted");
    drop(view);
    node.unmount(&a, &staging_a, &target_a);
    node.unmount(&b, &staging_b, &target_b);
    assert_no_uploads(&server, &a.handle);
}

/// The mount process killed while a directory of files is being renamed, with the S3 server
/// paused mid-way: afterwards every file is in exactly one place, old or new, intact, in the
/// mount and in S3 alike.
#[test]
fn a_crash_during_a_directory_rename_leaves_every_file_in_one_place() {
    const FILES: usize = 30;
    let server = S3Server::start_faithful();
    let node = Node::start(&server);
    let pv = node.provision("rename");
    let (staging, target) = node.mount(&pv, "pod-rename");
    let contents: Vec<Vec<u8>> = (0..FILES).map(|i| random_bytes(100 + i as u64, 2000 + i * 100)).collect();
    {
        let (dir, contents) = (target.join("tree"), contents.clone());
        bounded("writing the tree", Duration::from_secs(120), move || {
            std::fs::create_dir(&dir)?;
            for (i, data) in contents.iter().enumerate() {
                std::fs::write(dir.join(format!("f-{i:02}")), data)?;
            }
            std::io::Result::Ok(())
        })
        .expect("write the tree");
    }
    let server_pid = server.pid().expect("a local S3 server");
    let log_before = server.log().len();
    let (from, to) = (target.join("tree"), target.join("moved"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::rename(from, to));
    });
    // Pause S3 as soon as the rename has written its first object at the new path.
    let midway = wait_until(Duration::from_secs(60), || server.log()[log_before..].contains("/moved/"));
    signal(server_pid, libc::SIGSTOP);
    let old = node.mount_process(&staging);
    signal(old, libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(10), || !node.mount_processes(&staging).contains(&old)));
    signal(server_pid, libc::SIGCONT);
    assert!(midway, "the rename never reached S3\n{}", server.log());
    node.wait_successor(&staging, old, RECOVERY_DEADLINE);
    let renamed = rx.recv_timeout(SYSCALL_LIMIT).expect("the rename in flight at the crash returns");
    eprintln!("rename across the crash: {renamed:?}");

    let in_mount = |dir: &str| -> BTreeMap<String, Vec<u8>> {
        let path = target.join(dir);
        bounded("reading the tree", SYSCALL_LIMIT, move || {
            let Ok(entries) = std::fs::read_dir(&path) else { return BTreeMap::new() };
            entries
                .map(|e| {
                    let e = e.expect("entry");
                    (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))
                })
                .collect()
        })
    };
    // The documented contract (README, "Namespace changes"): a directory rename cut by a crash
    // leaves the old tree complete and the new one partly copied, and running it again
    // finishes it. Either way nothing is lost or torn, in the mount or in S3.
    let check = |after: &str| -> (usize, usize) {
        let (old_view, new_view) = (in_mount("tree"), in_mount("moved"));
        let keys = server.list_keys(&pv.handle, "");
        for (i, data) in contents.iter().enumerate() {
            let name = format!("f-{i:02}");
            for (dir, view) in [("tree", &old_view), ("moved", &new_view)] {
                let key = format!("{dir}/{name}");
                assert_eq!(view.contains_key(&name), keys.contains(&key), "{after}: {key} in the mount and in S3");
                if let Some(seen) = view.get(&name) {
                    common::assert_same_bytes(seen, data, &format!("{after}: {key} in the mount"));
                    common::assert_same_bytes(&server.get(&pv.handle, &key), data, &format!("{after}: {key} in S3"));
                }
            }
            assert!(
                old_view.contains_key(&name) || new_view.contains_key(&name),
                "{after}: {name} is lost (keys: {keys:?})"
            );
        }
        // Besides the two trees: the volume's marker and the root's attribute record (written
        // behind, so present or not yet, depending on timing).
        let unknown: Vec<&String> = keys
            .iter()
            .filter(|k| {
                !k.starts_with("tree/")
                    && !k.starts_with("moved/")
                    && *k != MARKER_NAME
                    && *k != s3csi::fs::records::RECORD_NAME
            })
            .collect();
        assert!(unknown.iter().all(|k| k.ends_with('/')), "{after}: unexpected keys {unknown:?}");
        (old_view.len(), new_view.len())
    };
    let (old_count, new_count) = check("after the crash");
    eprintln!("after the crash: {old_count} files in tree/, {new_count} in moved/");
    if renamed.is_err() {
        assert_eq!(old_count, FILES, "a rename cut by a crash leaves the old tree complete");
        let (from, to) = (target.join("tree"), target.join("moved"));
        let again = bounded("the rename run again", SYSCALL_LIMIT, move || std::fs::rename(from, to));
        assert!(again.is_ok(), "running the rename again finishes it (README), but: {again:?} (first: {renamed:?})");
    }
    assert_eq!(check("after the rename"), (0, FILES), "every file is at the new path only");
    assert_no_uploads(&server, &pv.handle);
    node.unmount(&pv, &staging, &target);
}

/// The mount process killed while a large file is being written with a multipart upload: the
/// writer gets EIO (not ENOTCONN, not a hang), the successor aborts the upload, and nothing of
/// the file appears in S3.
#[test]
fn a_crash_during_a_multipart_upload_leaves_no_upload_and_nothing_torn() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 48;
    let server = S3Server::start_faithful();
    let node = Node::start(&server);
    let pv = node.provision("multipart");
    let (staging, target) = node.mount(&pv, "pod-multipart");
    let path = target.join("big.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| {
            let mut f = File::create(&path)?;
            for i in 0..CHUNKS {
                f.write_all(&random_bytes(i as u64, CHUNK))?;
            }
            f.sync_all()?;
            let fd = f.into_raw_fd();
            // SAFETY: fd was just released by File and is closed exactly once.
            if unsafe { libc::close(fd) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })();
        let _ = tx.send(r);
    });
    let uploading = wait_until(Duration::from_secs(120), || !server.multipart_uploads(&pv.handle).is_empty());
    assert!(uploading, "the large file never started a multipart upload\n{}", node.logs());
    let old = node.mount_process(&staging);
    signal(old, libc::SIGKILL);
    node.wait_successor(&staging, old, RECOVERY_DEADLINE);
    let written = rx.recv_timeout(SYSCALL_LIMIT * 2).expect("the writer returns");
    let errno = written.as_ref().err().and_then(|e| e.raw_os_error());
    assert_eq!(errno, Some(libc::EIO), "the writer across the crash: {written:?}");
    assert!(
        wait_until(Duration::from_secs(10), || server.multipart_uploads(&pv.handle).is_empty()),
        "the successor aborts the upload: {:?}",
        server.multipart_uploads(&pv.handle)
    );
    assert!(!server.list_keys(&pv.handle, "").contains(&"big.bin".to_owned()), "nothing of big.bin is in S3");
    let path = target.join("big.bin");
    let gone = wait_until(Duration::from_secs(10), || {
        let p = path.clone();
        bounded("stat big.bin", SYSCALL_LIMIT, move || std::fs::metadata(p))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    });
    assert!(gone, "the mount shows no big.bin either");
    node.unmount(&pv, &staging, &target);
}

/// Twenty crashes in a row under a running workload: each time a successor serves; afterwards the
/// keeper holds as many descriptors as before, runs one mount process, and the host has the same
/// mounts; the workload saw only what the rules allow.
#[test]
fn twenty_crashes_in_a_row_leak_nothing() {
    const CYCLES: usize = 20;
    let server = S3Server::start_faithful();
    let node = Node::start(&server);
    let pv = node.provision("cycles");
    let (staging, target) = node.mount(&pv, "pod-cycles");
    let view = PodView::new(&target);
    let workload = Workload::start(&view.path, "wl", 51);
    assert!(workload.progress(2, Duration::from_secs(60)), "the workload never got going\n{}", node.logs());
    let keeper = node.keepers[0].init().expect("keeper runs");
    let fds_before = open_fds(keeper);
    let ours = |view: &Path| -> Vec<(PathBuf, String)> {
        mounts().into_iter().filter(|(p, _)| p.starts_with(&node.root) || p.starts_with(view)).collect()
    };
    let mounts_before = ours(&view.path);
    let mut took = Vec::new();
    for cycle in 0..CYCLES {
        let old = node.mount_process(&staging);
        // Aim at a file being written or closed, so the crash cuts a writer (the window is short:
        // after a while the kill goes ahead anyway).
        workload.wait_for_op(&["write", "close"], Duration::from_secs(2));
        signal(old, libc::SIGKILL);
        // The keeper may back off after repeated crashes (at most a few seconds).
        let (_, t) = node.wait_successor(&staging, old, Duration::from_secs(15));
        took.push(t);
        assert!(workload.progress(1, Duration::from_secs(60)), "cycle {cycle}: the workload makes no progress");
    }
    eprintln!("restart times: {took:?}");
    let report = workload.stop();
    eprintln!("workload: {}", report.summary());
    let failed = report.assert_crash_rules(CYCLES);

    assert_eq!(open_fds(keeper), fds_before, "the keeper's descriptors after {CYCLES} crashes");
    let kids = children_of(keeper);
    assert_eq!(kids.len(), 1, "the keeper runs one mount process (zombies count): {kids:?}");
    assert_eq!(node.mount_processes(&staging).len(), 1);
    assert_eq!(ours(&view.path), mounts_before, "no mount gained or lost");
    assert_workload_in_s3(&server, &pv.handle, "wl", 51, &report, &failed);
    assert_no_uploads(&server, &pv.handle);
    assert!(node.metric("s3csi_mount_restarts_total", &pv) >= CYCLES as f64, "every restart is counted");
    drop(view);
    node.unmount(&pv, &staging, &target);
}

// ---------------------------------------------------------------------------------------------
// The mount's own contract, under the simplest keeper: a shell holding /dev/fuse
// ---------------------------------------------------------------------------------------------

/// `s3csi mount --fuse-fd 3` under a shell that holds `/dev/fuse` as fd 3 and, whenever the mount
/// process ends while the mount is still there, starts another one with `--takeover`: the
/// keeper's job in a dozen lines.
struct FdHolder {
    child: Child,
    mountpoint: PathBuf,
    log: PathBuf,
    recovery: PathBuf,
    _dir: tempfile::TempDir,
}

impl FdHolder {
    fn start(server: &S3Server, bucket: &str) -> FdHolder {
        let dir = tempfile::Builder::new().prefix("s3csi-holder-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mkdir");
        let recovery = dir.path().join("recovery");
        let log = dir.path().join("mount.log");
        let recovery_arg = recovery.to_str().expect("utf-8").to_owned();
        let args = ["--recovery-dir", &recovery_arg, "--allow-other", "--uid", "1000", "--gid", "1000"];
        let mount = common::MountCommand::new(server, bucket, &mountpoint, &args).command(true);
        let script = r#"exec 3<>/dev/fuse
"$@" --fuse-fd 3
while grep -q " $MP " /proc/self/mountinfo; do "$@" --fuse-fd 3 --takeover; done"#;
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(script).arg("bash").arg(mount.get_program()).args(mount.get_args());
        for (k, v) in mount.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.env("MP", &mountpoint).env("RUST_LOG", "info");
        let out = File::create(&log).expect("log");
        cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("dup")).stderr(out);
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start the holder");
        let holder = FdHolder { child, mountpoint, log, recovery, _dir: dir };
        assert!(
            wait_until(Duration::from_secs(30), || is_fuse_mount(&holder.mountpoint)),
            "not mounted:\n{}",
            holder.log()
        );
        holder
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FdHolder {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- mount log ---\n{}", self.log());
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The crash rules of the mount itself, with a plain descriptor holder in the keeper's place.
#[test]
fn a_killed_mount_process_under_a_plain_fd_holder_keeps_its_connection() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("holder");
    let holder = FdHolder::start(&server, &bucket);
    let mnt = holder.mountpoint.clone();
    let workload = Workload::start(&mnt, "wl", 61);
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload never got going\n{}", holder.log());
    let held = open_for_writing(&mnt.join("held.bin"), random_bytes(5, 64 << 10));
    let old = mount_process(&[holder.child.id()], &mnt);
    signal(old, libc::SIGKILL);
    let (new, took) = wait_successor(&[holder.child.id()], &mnt, old, RECOVERY_DEADLINE)
        .unwrap_or_else(|| panic!("no new mount process within {RECOVERY_DEADLINE:?}\n{}", holder.log()));
    eprintln!("mount process {old} killed; {new} serves after {took:?}");
    assert!(workload.progress(3, Duration::from_secs(60)), "the workload makes no progress after the restart");
    let (w, c) = write_then_close(held, random_bytes(6, 64 << 10));
    eprintln!("held file across the crash: write errno {w}, close errno {c}");
    let report = workload.stop();
    eprintln!("workload: {}", report.summary());
    let failed = report.assert_crash_rules(1);
    assert!(w == libc::EIO || c == libc::EIO, "a file open for writing across the crash fails with EIO");
    let keys = server.list_keys(&bucket, "");
    assert!(!keys.contains(&"held.bin".to_owned()) || server.get(&bucket, "held.bin").is_empty(), "{keys:?}");
    assert_workload_in_s3(&server, &bucket, "wl", 61, &report, &failed);
    assert_no_uploads(&server, &bucket);
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_getfd`), as a second keeper would
/// hold it.
fn grab_fd(pid: u32, fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; each returns a new descriptor we own, or -1.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(pidfd);
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as i32;
        assert!(got >= 0, "pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(got)
    }
}

/// Mistakes made by hand with `--fuse-fd` and `--takeover` are refused, saying what to fix,
/// and the process serving the connection is untouched: a second process on a live connection
/// (two processes answering one connection would corrupt its namespace), a successor given a
/// recovery directory that is not its predecessor's, a descriptor that is not `/dev/fuse`.
#[test]
fn a_live_connection_is_not_taken_by_a_second_process_or_with_a_wrong_recovery_dir() {
    let server = S3Server::start_faithful();
    let bucket = server.unique_bucket("refuse");
    let holder = FdHolder::start(&server, &bucket);
    let mnt = holder.mountpoint.clone();
    let path = mnt.join("a.txt");
    bounded("write a.txt", SYSCALL_LIMIT, move || std::fs::write(path, b"before")).expect("write a.txt");
    let serving = mount_process(&[holder.child.id()], &mnt);
    let pid_file = holder.recovery.join(s3csi::fs::recovery::PID_FILE);
    assert!(wait_until(Duration::from_secs(10), || pid_file.exists()), "{}", holder.log());
    let fuse = grab_fd(holder.child.id(), 3);
    let fuse_fd = fuse.as_raw_fd();
    let run = |mountpoint: &Path, args: &[&str]| {
        let mut cmd = common::MountCommand::new(&server, &bucket, mountpoint, args).command(true);
        cmd.stdin(Stdio::null());
        // SAFETY: dup2 only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fuse_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = common::run_with_timeout(cmd, Duration::from_secs(30));
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let recovery = holder.recovery.to_str().expect("utf-8");

    let err = run(&mnt, &["--fuse-fd", "3", "--takeover", "--recovery-dir", recovery]);
    assert!(err.contains(&format!("in use by process {serving}")), "a second process on a live connection: {err}");

    let typo = holder.recovery.with_file_name("recovry");
    let err = run(&mnt, &["--fuse-fd", "3", "--takeover", "--recovery-dir", typo.to_str().expect("utf-8")]);
    assert!(err.contains("holds no record of a mounted connection"), "a takeover with another directory: {err}");
    assert!(!typo.exists(), "a refused takeover creates nothing");

    let elsewhere = holder.recovery.with_file_name("elsewhere");
    std::fs::create_dir(&elsewhere).expect("mkdir");
    let other_dir = holder.recovery.with_file_name("other-recovery");
    let err = run(&elsewhere, &["--fuse-fd", "3", "--recovery-dir", other_dir.to_str().expect("utf-8")]);
    assert!(err.contains("belongs to a connection that is already mounted"), "a new mount of a live connection: {err}");
    assert!(!is_mounted(&elsewhere) && !other_dir.exists(), "a refused mount mounts and creates nothing");
    let err = run(&elsewhere, &["--fuse-fd", "0"]);
    assert!(err.contains("--fuse-fd 0: it is the character device 1:3, not /dev/fuse"), "stdin as --fuse-fd: {err}");

    assert_eq!(mount_process(&[holder.child.id()], &mnt), serving, "the serving process is untouched");
    let dir = mnt.clone();
    let (read, listed) = bounded("use the mount", SYSCALL_LIMIT, move || {
        std::fs::write(dir.join("b.txt"), b"after").expect("write b.txt");
        let read = std::fs::read(dir.join("a.txt")).expect("read a.txt");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        (read, names)
    });
    assert_eq!((read.as_slice(), listed), (&b"before"[..], vec!["a.txt".to_owned(), "b.txt".to_owned()]));
    assert_eq!(server.get(&bucket, "b.txt"), b"after");
    drop(fuse);
}
