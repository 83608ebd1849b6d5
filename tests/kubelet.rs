//! The CSI services called exactly as a cluster calls them: csi-provisioner v5 (with
//! `--extra-create-metadata`) for CreateVolume/DeleteVolume and kubelet 1.32's CSI volume plugin
//! for NodeStage/NodePublish/NodeUnpublish/NodeUnstage, with their paths, volume context, secrets
//! and fsGroup. Pod workloads run as non-root users in forked children.
//!
//! What the two callers send (from their sources):
//! - csi-provisioner strips the `csi.storage.k8s.io/*-secret-*` and `fstype` parameters, adds
//!   `csi.storage.k8s.io/pv/name`, `pvc/name` and `pvc/namespace`, names the volume
//!   `pvc-<PVC UID>`, passes the StorageClass `mountOptions` as mount flags, and stores the
//!   response's volume context plus `storage.kubernetes.io/csiProvisionerIdentity`
//!   (`<unix ms>-<0..9999>-<driver>`) as the PV's `volumeAttributes`.
//! - kubelet creates `<root>/plugins/kubernetes.io/csi/<driver>/<sha256 of handle>/globalmount`
//!   (0750) and writes `vol_data.json` beside it before NodeStageVolume, whose context is the PV's
//!   `volumeAttributes`. For NodePublishVolume it creates only the parent of
//!   `<root>/pods/<pod uid>/volumes/kubernetes.io~csi/<pv name>/mount` and adds the pod info keys
//!   (`podInfoOnMount: true`). Both calls carry the pod's fsGroup as `volume_mount_group` (the
//!   driver has VOLUME_MOUNT_GROUP) and the PV's `mountOptions`. After unpublish/unstage it removes
//!   the directory if it is no longer a mount point.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::driver::{Creds, DRIVER, Driver, code_of};
use common::{S3Server, is_fuse_mount, is_mounted, processes_with_arg, sha256, wait_until};
use s3csi::csi::proto::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability, volume_capability,
};
use tonic::Code;

/// The pod's `securityContext.fsGroup`.
const FS_GROUP: u32 = 2000;

/// A StorageClass as csi-provisioner reads it.
struct StorageClass {
    parameters: Vec<(&'static str, &'static str)>,
    mount_options: Vec<&'static str>,
}

/// The PV csi-provisioner creates.
struct Pv {
    name: String,
    handle: String,
    attributes: HashMap<String, String>,
    mount_options: Vec<String>,
}

/// A pod's identity and security context.
struct Pod {
    uid: String,
    name: &'static str,
    run_as_user: u32,
    fs_group: Option<u32>,
}

fn capability(mount_flags: &[String], fs_group: Option<u32>) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
            fs_type: String::new(),
            mount_flags: mount_flags.to_vec(),
            volume_mount_group: fs_group.map(|g| g.to_string()).unwrap_or_default(),
        })),
        // ReadWriteMany.
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// CreateVolume as csi-provisioner v5 sends it for a 1 GiB ReadWriteMany PVC.
fn provision(d: &Driver, sc: &StorageClass, pvc_name: &str, secrets: &HashMap<String, String>) -> Pv {
    let pv_name = format!("pvc-{}", fake_uid(pvc_name));
    let mut parameters: HashMap<String, String> =
        sc.parameters.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    parameters.insert("csi.storage.k8s.io/pv/name".into(), pv_name.clone());
    parameters.insert("csi.storage.k8s.io/pvc/name".into(), pvc_name.into());
    parameters.insert("csi.storage.k8s.io/pvc/namespace".into(), "default".into());
    let mount_options: Vec<String> = sc.mount_options.iter().map(|s| (*s).to_owned()).collect();
    let req = CreateVolumeRequest {
        name: pv_name.clone(),
        capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![capability(&mount_options, None)],
        parameters,
        secrets: secrets.clone(),
        ..Default::default()
    };
    let vol =
        d.rt.block_on(d.controller().create_volume(req))
            .unwrap_or_else(|e| panic!("CreateVolume: {e:?}\n{}", d.log()))
            .into_inner()
            .volume
            .unwrap();
    let mut attributes = HashMap::from([(
        "storage.kubernetes.io/csiProvisionerIdentity".to_owned(),
        format!("1764534883017-8081-{DRIVER}"),
    )]);
    attributes.extend(vol.volume_context);
    Pv { name: pv_name, handle: vol.volume_id, attributes, mount_options }
}

/// A stable UUID-shaped id derived from a name (what the API server would assign).
fn fake_uid(name: &str) -> String {
    let h = sha256(name.as_bytes());
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// kubelet's view of one node: its root directory and the CSI calls of its volume plugin.
struct Kubelet<'a> {
    root: PathBuf,
    driver: &'a Driver,
}

impl<'a> Kubelet<'a> {
    fn new(driver: &'a Driver) -> Self {
        Kubelet { root: driver.path("kubelet"), driver }
    }

    fn staging_path(&self, pv: &Pv) -> PathBuf {
        self.root.join("plugins/kubernetes.io/csi").join(DRIVER).join(sha256(pv.handle.as_bytes())).join("globalmount")
    }

    fn target_path(&self, pv: &Pv, pod: &Pod) -> PathBuf {
        let pv_dir = pv.name.replace('/', "~");
        self.root.join("pods").join(&pod.uid).join("volumes/kubernetes.io~csi").join(pv_dir).join("mount")
    }

    /// MountDevice: creates the staging directory (0750) and `vol_data.json`, then stages.
    fn mount_device(&self, pv: &Pv, fs_group: Option<u32>, secrets: &HashMap<String, String>) -> Result<(), Code> {
        let staging = self.staging_path(pv);
        mkdir_all(&staging, 0o750);
        let data = format!(r#"{{"driverName":"{DRIVER}","volumeHandle":"{}"}}"#, pv.handle);
        std::fs::write(staging.parent().unwrap().join("vol_data.json"), data).unwrap();
        let req = NodeStageVolumeRequest {
            volume_id: pv.handle.clone(),
            publish_context: HashMap::new(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability(&pv.mount_options, fs_group)),
            secrets: secrets.clone(),
            volume_context: pv.attributes.clone(),
        };
        self.driver.rt.block_on(self.driver.node().node_stage_volume(req)).map(|_| ()).map_err(|e| {
            eprintln!("NodeStageVolume: {e:?}");
            e.code()
        })
    }

    /// SetUp: creates the target's parent (0750) and `vol_data.json`, then publishes with the
    /// pod info keys (`podInfoOnMount: true`).
    fn set_up(&self, pv: &Pv, pod: &Pod) -> Result<PathBuf, Code> {
        let target = self.target_path(pv, pod);
        mkdir_all(target.parent().unwrap(), 0o750);
        let data = format!(
            r#"{{"specVolID":"{}","volumeHandle":"{}","driverName":"{DRIVER}","nodeName":"test-node","volumeLifecycleMode":"Persistent"}}"#,
            pv.name, pv.handle
        );
        std::fs::write(target.parent().unwrap().join("vol_data.json"), data).unwrap();
        let mut context = pv.attributes.clone();
        context.extend([
            ("csi.storage.k8s.io/pod.name".to_owned(), pod.name.to_owned()),
            ("csi.storage.k8s.io/pod.namespace".to_owned(), "default".to_owned()),
            ("csi.storage.k8s.io/pod.uid".to_owned(), pod.uid.clone()),
            ("csi.storage.k8s.io/serviceAccount.name".to_owned(), "default".to_owned()),
            ("csi.storage.k8s.io/ephemeral".to_owned(), "false".to_owned()),
        ]);
        let req = NodePublishVolumeRequest {
            volume_id: pv.handle.clone(),
            publish_context: HashMap::new(),
            staging_target_path: self.staging_path(pv).display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability(&pv.mount_options, pod.fs_group)),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: context,
        };
        self.driver.rt.block_on(self.driver.node().node_publish_volume(req)).map_err(|e| {
            eprintln!("NodePublishVolume: {e:?}");
            e.code()
        })?;
        Ok(target)
    }

    /// TearDown: unpublishes, then removes what is left if it is no longer a mount point.
    fn tear_down(&self, pv: &Pv, pod: &Pod) {
        let target = self.target_path(pv, pod);
        let req =
            NodeUnpublishVolumeRequest { volume_id: pv.handle.clone(), target_path: target.display().to_string() };
        self.driver.rt.block_on(self.driver.node().node_unpublish_volume(req)).unwrap();
        assert!(!is_mounted(&target), "unpublished: {}", target.display());
        remove_mount_dir(&target);
    }

    /// UnmountDevice: unstages, then removes the staging directory and `vol_data.json`.
    fn unmount_device(&self, pv: &Pv) {
        let staging = self.staging_path(pv);
        let req = NodeUnstageVolumeRequest {
            volume_id: pv.handle.clone(),
            staging_target_path: staging.display().to_string(),
        };
        self.driver.rt.block_on(self.driver.node().node_unstage_volume(req)).unwrap();
        assert!(!is_mounted(&staging), "unstaged: {}", staging.display());
        remove_mount_dir(&staging);
        common::wait_no_daemon(&staging, Duration::from_secs(30)).unwrap();
    }
}

/// MkdirAllWithPathCheck: an existing directory is left as it is.
fn mkdir_all(path: &Path, mode: u32) {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return;
    }
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// kubelet's removeMountDir: the directory (must be empty and unmounted, or gone), then
/// `vol_data.json` and the parent. Any other failure fails the kubelet operation.
fn remove_mount_dir(dir: &Path) {
    let remove = |r: std::io::Result<()>, what: &Path| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("kubelet cannot remove {}: {e}", what.display()),
        _ => {}
    };
    remove(std::fs::remove_dir(dir), dir);
    let parent = dir.parent().unwrap();
    remove(std::fs::remove_file(parent.join("vol_data.json")), &parent.join("vol_data.json"));
    remove(std::fs::remove_dir(parent), parent);
}

/// What the container runtime does with a published volume: a bind mount of the target into the
/// container's root filesystem (here a world-searchable tempdir), so the pod's processes reach it
/// without searching kubelet's private directories. Unmounted when dropped (the container ends).
struct ContainerView {
    _root: tempfile::TempDir,
    path: PathBuf,
}

impl ContainerView {
    fn new(target: &Path) -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = root.path().join("data");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount").arg("--bind").arg(target).arg(&path).status().unwrap();
        assert!(status.success(), "bind {} into the container", target.display());
        ContainerView { _root: root, path }
    }
}

impl Drop for ContainerView {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A process of a pod: uid `user`, primary and only group `group`, umask 022, working directory
/// `dir` (entered before dropping root, as a container's bind mount needs no path to it).
fn pod_exec(dir: &Path, user: u32, group: u32, script: &str) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).current_dir(dir).env("HOME", "/tmp").env("LC_ALL", "C");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let groups = [group];
            if libc::setgroups(1, groups.as_ptr()) != 0 || libc::setgid(group) != 0 || libc::setuid(user) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::umask(0o022);
            Ok(())
        });
    }
    common::run_with_timeout(cmd, Duration::from_secs(120))
}

/// One step of a pod workload: who runs it and the shell commands.
struct Step {
    user: u32,
    script: &'static str,
}

/// `stat` fields that a local volume and the mount must agree on (no times, sizes of
/// directories, inode numbers or link counts).
const STAT: &str = "stat -c '%n %U %G %a %F'";

/// The pod workload: pod A (uid 1000) creates, appends, rewrites in place, makes a directory
/// and a file in it, chmods, and runs sqlite; pod B (uid 1001, same fsGroup) shares the volume.
fn workload() -> Vec<Step> {
    const A: u32 = 1000;
    const B: u32 = 1001;
    vec![
        Step { user: A, script: "echo hello > hello.txt && cat hello.txt && STAT hello.txt" },
        Step { user: A, script: "echo more >> hello.txt && cat hello.txt" },
        Step {
            user: A,
            script: "python3 -c \"f = open('hello.txt', 'r+b'); f.seek(0); f.write(b'HE'); f.close()\" && cat hello.txt",
        },
        Step { user: A, script: "mkdir sub && echo x > sub/f && STAT sub sub/f" },
        Step { user: A, script: "chmod 600 hello.txt && STAT hello.txt" },
        Step {
            user: A,
            script: "python3 -c \"
import sqlite3
c = sqlite3.connect('app.db')
c.execute('create table t (k integer primary key, v text)')
c.executemany('insert into t (v) values (?)', [('one',), ('two',)])
c.commit()
c.execute('update t set v = ? where k = 1', ('uno',))
c.commit()
c.close()
c = sqlite3.connect('app.db')
print(c.execute('select k, v from t order by k').fetchall())
print(c.execute('pragma integrity_check').fetchone()[0])
\" && ls && STAT app.db",
        },
        Step { user: B, script: "cat hello.txt" },
        Step { user: B, script: "echo b > b.txt && STAT b.txt" },
        Step { user: B, script: "echo x >> hello.txt" },
        Step { user: B, script: "touch sub/b" },
        Step { user: B, script: "chmod 644 hello.txt" },
        Step { user: B, script: "chown 1001 b.txt" },
        Step { user: B, script: "mkdir shared && chmod 2775 shared && STAT shared" },
        Step { user: A, script: "echo a > shared/a && STAT shared/a" },
        Step { user: A, script: "ln -s hello.txt link && stat -c '%n %U %G %F' link && readlink link" },
        Step { user: B, script: "rm b.txt && ls" },
        Step { user: A, script: "STAT . hello.txt sub sub/f app.db shared shared/a" },
    ]
}

/// What a step printed and how it ended, for comparing the mount with a local directory.
fn transcript(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_step(dir: &Path, step: &Step) -> String {
    let script = step.script.replace("STAT", STAT);
    transcript(&pod_exec(dir, step.user, FS_GROUP, &script))
}

fn secrets_for(server: &S3Server) -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyID".to_owned(), server.access_key().to_owned()),
        ("secretAccessKey".to_owned(), server.secret_key().to_owned()),
    ])
}

/// The whole path of a dynamically provisioned PVC, and non-root pods that see what they would
/// see on a local volume kubelet prepared for their fsGroup, checked against S3 after each step.
#[test]
fn dynamic_pvc_with_fs_group_behaves_like_a_local_volume() {
    // Directory markers (mkdir) need the faithful server.
    let server = S3Server::start_faithful();
    // The driver has no credentials of its own: they come from the provisioner and node-stage
    // Secrets, as in a cluster whose StorageClass names them.
    let d = Driver::start(&server, Creds::SecretsOnly);
    let secrets = secrets_for(&server);
    let sc = StorageClass { parameters: vec![("onDelete", "purge")], mount_options: vec!["metadata-ttl=1"] };
    let pv = provision(&d, &sc, "data", &secrets);
    assert!(pv.attributes.contains_key("storage.kubernetes.io/csiProvisionerIdentity"));
    let kubelet = Kubelet::new(&d);
    kubelet.mount_device(&pv, Some(FS_GROUP), &secrets).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    assert!(is_fuse_mount(&kubelet.staging_path(&pv)));
    let pod = Pod { uid: fake_uid("app-0"), name: "app-0", run_as_user: 1000, fs_group: Some(FS_GROUP) };
    let target = kubelet.set_up(&pv, &pod).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    assert!(is_mounted(&target));

    // A local directory prepared as kubelet prepares a volume for an fsGroup: group = fsGroup,
    // the group's rw bits and set-group-ID on directories.
    let local = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(local.path(), Some(0), Some(FS_GROUP)).unwrap();
    std::fs::set_permissions(local.path(), std::fs::Permissions::from_mode(0o2775)).unwrap();

    let bucket = pv.handle.clone();
    let container = ContainerView::new(&target);
    for (i, step) in workload().iter().enumerate() {
        let want = run_step(local.path(), step);
        let got = run_step(&container.path, step);
        assert_eq!(got, want, "step {i} (uid {}): {}\n{}", step.user, step.script, d.log());
        // What the step acknowledged is in S3.
        match i {
            0 => assert_eq!(server.get(&bucket, "hello.txt"), b"hello\n"),
            1 => assert_eq!(server.get(&bucket, "hello.txt"), b"hello\nmore\n"),
            2 => assert_eq!(server.get(&bucket, "hello.txt"), b"HEllo\nmore\n"),
            3 => {
                assert_eq!(server.get(&bucket, "sub/f"), b"x\n");
                let m = server.user_metadata(&bucket, "sub/");
                assert_eq!(owner(&m), ("1000", "2000", "2755"), "{m:?}");
                assert_eq!(owner(&server.user_metadata(&bucket, "sub/f")), ("1000", "2000", "644"));
            }
            4 => assert_eq!(owner(&server.user_metadata(&bucket, "hello.txt")), ("1000", "2000", "600")),
            5 => {
                assert!(server.get(&bucket, "app.db").starts_with(b"SQLite format 3\0"));
                assert!(!server.list_keys(&bucket, "").iter().any(|k| k.contains("journal")));
            }
            7 => assert_eq!(owner(&server.user_metadata(&bucket, "b.txt")), ("1001", "2000", "644")),
            12 => assert_eq!(owner(&server.user_metadata(&bucket, "shared/")), ("1001", "2000", "2775")),
            13 => assert_eq!(server.get(&bucket, "shared/a"), b"a\n"),
            _ => {}
        }
    }
    // A second pod on the same node, same volume, another user, same fsGroup.
    let pod_b = Pod { uid: fake_uid("app-1"), name: "app-1", run_as_user: 1001, fs_group: Some(FS_GROUP) };
    let container_b = ContainerView::new(&kubelet.set_up(&pv, &pod_b).unwrap());
    let out = pod_exec(&container_b.path, pod_b.run_as_user, FS_GROUP, "echo from-b > from-b.txt && cat from-b.txt");
    assert_eq!(transcript(&out), "exit Some(0)\nfrom-b\n");
    assert_eq!(server.get(&bucket, "from-b.txt"), b"from-b\n");
    // ... and it sees what the first pod wrote.
    let out = pod_exec(&container_b.path, pod_b.run_as_user, FS_GROUP, "cat sub/f shared/a");
    assert_eq!(transcript(&out), "exit Some(0)\nx\na\n");
    drop((container, container_b));

    kubelet.tear_down(&pv, &pod_b);
    kubelet.tear_down(&pv, &pod);
    kubelet.unmount_device(&pv);
    let req = DeleteVolumeRequest { volume_id: pv.handle.clone(), secrets };
    d.rt.block_on(d.controller().delete_volume(req)).unwrap();
    assert!(!server.list_buckets().unwrap().contains(&bucket));
}

fn owner(m: &HashMap<String, String>) -> (&str, &str, &str) {
    let get = |k: &str| m.get(k).map(String::as_str).unwrap_or("-");
    (get("s3csi-uid"), get("s3csi-gid"), get("s3csi-mode"))
}

/// Without an fsGroup, new entries take the creating process's group; the volume's uid/gid
/// options own only what other S3 clients wrote.
#[test]
fn without_fs_group_new_files_take_the_callers_group() {
    let server = S3Server::start_faithful();
    let d = Driver::start(&server, Creds::Env);
    let sc = StorageClass { parameters: vec![("uid", "1000"), ("gid", "3000")], mount_options: vec![] };
    let pv = provision(&d, &sc, "nogroup", &HashMap::new());
    server.put(&pv.handle, "from-elsewhere.txt", b"seeded");
    let kubelet = Kubelet::new(&d);
    // `gid` forces the group of new entries, as an fsGroup does.
    kubelet.mount_device(&pv, None, &HashMap::new()).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    let pod = Pod { uid: fake_uid("plain"), name: "plain", run_as_user: 1000, fs_group: None };
    let container = ContainerView::new(&kubelet.set_up(&pv, &pod).unwrap());
    let out =
        pod_exec(&container.path, 1000, 4000, "echo mine > mine.txt && stat -c '%u %g %a' mine.txt from-elsewhere.txt");
    assert_eq!(transcript(&out), "exit Some(0)\n1000 3000 644\n1000 3000 644\n", "forced group 3000");
    assert_eq!(owner(&server.user_metadata(&pv.handle, "mine.txt")), ("1000", "3000", "644"));
    drop(container);
    kubelet.tear_down(&pv, &pod);
    kubelet.unmount_device(&pv);

    // A static volume with only `uid`: the caller's group wins.
    let bucket = server.unique_bucket("static-uid");
    let static_pv = Pv {
        name: "static-uid".into(),
        handle: bucket.clone(),
        attributes: HashMap::from([("uid".to_owned(), "1000".to_owned())]),
        mount_options: vec![],
    };
    kubelet.mount_device(&static_pv, None, &HashMap::new()).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    let container = ContainerView::new(&kubelet.set_up(&static_pv, &pod).unwrap());
    let out = pod_exec(&container.path, 1000, 4000, "echo mine > mine.txt && mkdir d && stat -c '%u %g %a' mine.txt d");
    assert_eq!(transcript(&out), "exit Some(0)\n1000 4000 644\n1000 4000 755\n");
    assert_eq!(owner(&server.user_metadata(&bucket, "d/")), ("1000", "4000", "755"));
    drop(container);
    kubelet.tear_down(&static_pv, &pod);
    kubelet.unmount_device(&static_pv);
}

/// Staging and target paths are absolute and never followed through a symbolic link; unpublish
/// and unstage unmount only what is ours.
#[test]
fn the_node_touches_only_its_own_mounts() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let sc = StorageClass { parameters: vec![], mount_options: vec![] };
    let pv = provision(&d, &sc, "paths", &HashMap::new());
    let kubelet = Kubelet::new(&d);

    // An unrelated filesystem elsewhere on the node.
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "unrelated"]).arg(&elsewhere).status();
    assert!(status.unwrap().success());
    std::fs::write(elsewhere.join("precious"), b"keep me").unwrap();

    // Relative paths are refused and nothing is created relative to the server's directory.
    let cap = Some(capability(&[], None));
    let stage_rel = NodeStageVolumeRequest {
        volume_id: pv.handle.clone(),
        staging_target_path: "relative/globalmount".into(),
        volume_capability: cap.clone(),
        volume_context: pv.attributes.clone(),
        ..Default::default()
    };
    assert_eq!(code_of(d.rt.block_on(d.node().node_stage_volume(stage_rel))), Code::InvalidArgument);
    for bad in ["relative/mount", "/a/../b", ""] {
        let req = NodeUnpublishVolumeRequest { volume_id: pv.handle.clone(), target_path: bad.into() };
        assert_eq!(code_of(d.rt.block_on(d.node().node_unpublish_volume(req))), Code::InvalidArgument, "{bad:?}");
        let req = NodeUnstageVolumeRequest { volume_id: pv.handle.clone(), staging_target_path: bad.into() };
        assert_eq!(code_of(d.rt.block_on(d.node().node_unstage_volume(req))), Code::InvalidArgument, "{bad:?}");
    }

    // A staging path that is a symbolic link to the unrelated mount: refused, nothing mounted.
    let staging = kubelet.staging_path(&pv);
    std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &staging).unwrap();
    let req = NodeStageVolumeRequest {
        volume_id: pv.handle.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: cap.clone(),
        volume_context: pv.attributes.clone(),
        ..Default::default()
    };
    assert_eq!(code_of(d.rt.block_on(d.node().node_stage_volume(req))), Code::FailedPrecondition);
    assert!(processes_with_arg(&staging).is_empty() && processes_with_arg(&elsewhere).is_empty());
    // Unstage of that path leaves the link and what it points to alone.
    let req =
        NodeUnstageVolumeRequest { volume_id: pv.handle.clone(), staging_target_path: staging.display().to_string() };
    d.rt.block_on(d.node().node_unstage_volume(req)).unwrap();
    assert!(std::fs::symlink_metadata(&staging).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(elsewhere.join("precious")).unwrap(), b"keep me");
    std::fs::remove_file(&staging).unwrap();
    std::fs::remove_dir(staging.parent().unwrap()).unwrap();

    // Stage for real; then a target path that is a symbolic link to the unrelated mount.
    kubelet.mount_device(&pv, None, &HashMap::new()).unwrap();
    let pod = Pod { uid: fake_uid("links"), name: "links", run_as_user: 0, fs_group: None };
    let target = kubelet.target_path(&pv, &pod);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
    let publish = |target: &Path| NodePublishVolumeRequest {
        volume_id: pv.handle.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: cap.clone(),
        volume_context: pv.attributes.clone(),
        ..Default::default()
    };
    assert_eq!(code_of(d.rt.block_on(d.node().node_publish_volume(publish(&target)))), Code::FailedPrecondition);
    assert!(!is_fuse_mount(&elsewhere), "nothing was mounted through the link");
    let unpublish = |target: &Path| NodeUnpublishVolumeRequest {
        volume_id: pv.handle.clone(),
        target_path: target.display().to_string(),
    };
    d.rt.block_on(d.node().node_unpublish_volume(unpublish(&target))).unwrap();
    assert!(is_mounted(&elsewhere), "unpublish through a link must not unmount its destination");
    assert_eq!(std::fs::read(elsewhere.join("precious")).unwrap(), b"keep me");
    assert!(std::fs::symlink_metadata(&target).unwrap().file_type().is_symlink(), "the link is left alone");
    std::fs::remove_file(&target).unwrap();

    // A target that has someone else's mount on it: unpublish leaves it mounted.
    std::fs::create_dir_all(&target).unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "foreign"]).arg(&target).status();
    assert!(status.unwrap().success());
    d.rt.block_on(d.node().node_unpublish_volume(unpublish(&target))).unwrap();
    assert!(is_mounted(&target), "a foreign mount at the target is not ours to unmount");
    assert!(d.log().contains("not a mount of this volume; left alone"), "{}", d.log());
    assert_eq!(code_of(d.rt.block_on(d.node().node_publish_volume(publish(&target)))), Code::AlreadyExists);
    Command::new("umount").arg(&target).status().unwrap();

    // The real publish still works, and its unpublish unmounts exactly our bind.
    d.rt.block_on(d.node().node_publish_volume(publish(&target))).unwrap();
    std::fs::write(target.join("f"), b"ours").unwrap();
    kubelet.tear_down(&pv, &pod);
    kubelet.unmount_device(&pv);
    assert_eq!(server.get(&pv.handle, "f"), b"ours");
    assert!(is_mounted(&elsewhere));
    Command::new("umount").arg(&elsewhere).status().unwrap();
}

/// A mount whose processes were killed (its mount process and the keeper holding its
/// connection) looks alive to `stat` for as long as the kernel caches attributes (here an hour);
/// the node must still see that it is dead and mount it again.
#[test]
fn a_killed_mount_process_is_dead_even_with_a_long_metadata_ttl() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let sc = StorageClass { parameters: vec![], mount_options: vec!["metadata-ttl=3600"] };
    let pv = provision(&d, &sc, "ttl", &HashMap::new());
    server.put(&pv.handle, "f", b"survives");
    let kubelet = Kubelet::new(&d);
    kubelet.mount_device(&pv, None, &HashMap::new()).unwrap();
    let pod = Pod { uid: fake_uid("ttl"), name: "ttl", run_as_user: 0, fs_group: None };
    let target = kubelet.set_up(&pv, &pod).unwrap();
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"survives");
    let staging = kubelet.staging_path(&pv);
    let pids = processes_with_arg(&staging);
    assert_eq!(pids.len(), 1);
    let keeper = processes_with_arg(&d.state_dir);
    assert_eq!(keeper.len(), 1, "the keeper the node started");
    for pid in keeper.into_iter().chain(pids) {
        // SAFETY: plain kill of a test child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || processes_with_arg(&staging).is_empty()));
    // The kernel still answers stat from its cache: exactly the trap.
    assert!(std::fs::metadata(&staging).is_ok(), "stat is answered from the attribute cache");

    // kubelet retries: stage and publish must not answer OK over the dead mount.
    kubelet.mount_device(&pv, None, &HashMap::new()).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    assert_eq!(processes_with_arg(&staging).len(), 1, "a new mount process serves the staging path");
    assert!(d.log().contains("found a dead mount"), "{}", d.log());
    kubelet.set_up(&pv, &pod).unwrap_or_else(|c| panic!("{c:?}\n{}", d.log()));
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"survives", "the pod's target works again");
    std::fs::write(target.join("g"), b"after").unwrap();
    assert_eq!(server.get(&pv.handle, "g"), b"after");
    kubelet.tear_down(&pv, &pod);
    kubelet.unmount_device(&pv);
}

/// A mount process that stops answering (SIGSTOP) must not stall the node: every check of a
/// mount is bounded, so stage, publish, stats and probe answer, and the lock is released.
#[test]
fn a_hung_mount_process_never_blocks_the_node() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let sc = StorageClass { parameters: vec![], mount_options: vec!["metadata-ttl=3600"] };
    let pv = provision(&d, &sc, "hung", &HashMap::new());
    let kubelet = Kubelet::new(&d);
    kubelet.mount_device(&pv, None, &HashMap::new()).unwrap();
    let pod = Pod { uid: fake_uid("hung"), name: "hung", run_as_user: 0, fs_group: None };
    let target = kubelet.set_up(&pv, &pod).unwrap();
    let staging = kubelet.staging_path(&pv);
    let pid = processes_with_arg(&staging)[0] as i32;
    // SAFETY: plain signals to a test child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let started = std::time::Instant::now();
    let other = Pod { uid: fake_uid("hung-2"), name: "hung-2", run_as_user: 0, fs_group: None };
    assert_eq!(kubelet.set_up(&pv, &other), Err(Code::FailedPrecondition), "the staging mount does not answer");
    let stats = s3csi::csi::proto::NodeGetVolumeStatsRequest {
        volume_id: pv.handle.clone(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    assert_eq!(code_of(d.rt.block_on(d.node().node_get_volume_stats(stats))), Code::Internal);
    let probe = d.rt.block_on(
        s3csi::csi::proto::identity_client::IdentityClient::new(d.channel.clone())
            .probe(s3csi::csi::proto::ProbeRequest {}),
    );
    assert!(probe.is_ok(), "the server keeps answering");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded: {:?}", started.elapsed());
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let req = s3csi::csi::proto::NodeGetVolumeStatsRequest {
        volume_id: pv.handle.clone(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    d.rt.block_on(d.node().node_get_volume_stats(req)).unwrap();
    kubelet.tear_down(&pv, &pod);
    kubelet.unmount_device(&pv);
}

/// Prefix volumes share a bucket; a call naming one volume never unmounts another's mounts.
#[test]
fn volumes_sharing_a_bucket_never_unmount_each_other() {
    let server = S3Server::start();
    let shared = server.unique_bucket("shared");
    let d = Driver::start(&server, Creds::Env);
    let bucket: &'static str = Box::leak(shared.clone().into_boxed_str());
    let sc = StorageClass { parameters: vec![("bucket", bucket)], mount_options: vec![] };
    let a = provision(&d, &sc, "a", &HashMap::new());
    let b = provision(&d, &sc, "b", &HashMap::new());
    let kubelet = Kubelet::new(&d);
    kubelet.mount_device(&a, None, &HashMap::new()).unwrap();
    kubelet.mount_device(&b, None, &HashMap::new()).unwrap();
    let pod = Pod { uid: fake_uid("share"), name: "share", run_as_user: 0, fs_group: None };
    let target_a = kubelet.set_up(&a, &pod).unwrap();
    let (staging_a, staging_b) = (kubelet.staging_path(&a), kubelet.staging_path(&b));
    // Volume A's id with B's staging path, and the bucket's id with A's target.
    let req =
        NodeUnstageVolumeRequest { volume_id: a.handle.clone(), staging_target_path: staging_b.display().to_string() };
    d.rt.block_on(d.node().node_unstage_volume(req)).unwrap();
    assert!(is_fuse_mount(&staging_b), "B's staging mount stays");
    let req = NodeUnpublishVolumeRequest { volume_id: shared.clone(), target_path: target_a.display().to_string() };
    d.rt.block_on(d.node().node_unpublish_volume(req)).unwrap();
    assert!(is_mounted(&target_a), "A's pod mount stays");
    let req = NodeUnpublishVolumeRequest { volume_id: b.handle.clone(), target_path: target_a.display().to_string() };
    d.rt.block_on(d.node().node_unpublish_volume(req)).unwrap();
    assert!(is_mounted(&target_a), "A's pod mount stays for B's id too");
    // A path with an interior `.` is not what kubelet sends.
    let dotted = format!("{}/./x", d.path("kubelet").display());
    let req = NodeUnpublishVolumeRequest { volume_id: a.handle.clone(), target_path: dotted };
    assert_eq!(code_of(d.rt.block_on(d.node().node_unpublish_volume(req))), Code::InvalidArgument);
    kubelet.tear_down(&a, &pod);
    kubelet.unmount_device(&a);
    kubelet.unmount_device(&b);
    assert!(!is_mounted(&staging_a) && !is_mounted(&staging_b));
}
