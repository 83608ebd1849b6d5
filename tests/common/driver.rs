//! A running `s3csi csi` driver for the CSI test tiers: real gRPC on a Unix socket in a tempdir,
//! the real `s3csi` binary, and clients for its three services. Dropping a [`Driver`] kills it
//! and lazily unmounts anything left under its tempdir.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use s3csi::csi::proto::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, ProbeRequest, Volume, VolumeCapability,
    controller_client::ControllerClient, identity_client::IdentityClient, node_client::NodeClient, volume_capability,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{S3CSI_BIN, S3Server, is_fuse_mount, is_mounted, wait_until};

pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DRIVER: &str = "s3.csi.s3csi.io";

/// A running `s3csi csi` and clients for its three services.
pub struct Driver {
    pub dir: TempDir,
    pub state_dir: PathBuf,
    child: Option<Child>,
    pub rt: tokio::runtime::Runtime,
    pub channel: Channel,
    pub metrics_port: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Creds {
    /// The driver gets the server's credentials in its environment.
    Env,
    /// The driver has no credentials; every request carries them as CSI secrets.
    SecretsOnly,
}

impl Driver {
    pub fn start(server: &S3Server, creds: Creds) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        Self::start_with(server, creds, dir, state_dir)
    }

    pub fn start_with(server: &S3Server, creds: Creds, dir: TempDir, state_dir: PathBuf) -> Driver {
        Self::start_wrapped(server, creds, dir, state_dir, &[], |cmd| cmd)
    }

    /// Like [`Driver::start_with`], with `extra_args` after the standard ones and the finished
    /// command passed through `wrap` before it is spawned (to run it inside a namespace, say).
    pub fn start_wrapped(
        server: &S3Server,
        creds: Creds,
        dir: TempDir,
        state_dir: PathBuf,
        extra_args: &[&str],
        wrap: impl FnOnce(Command) -> Command,
    ) -> Driver {
        let socket = dir.path().join("csi.sock");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("driver.log")).unwrap();
        let metrics_port = super::free_port();
        let mut cmd = Command::new(S3CSI_BIN);
        cmd.args(["csi", "--node-id", "test-node", "--force-path-style"])
            .arg(format!("--csi-endpoint=unix://{}", socket.display()))
            .arg(format!("--endpoint-url={}", server.endpoint()))
            .arg(format!("--region={}", server.region()))
            .arg(format!("--state-dir={}", state_dir.display()))
            .arg(format!("--metrics-address=127.0.0.1:{metrics_port}"))
            .args(extra_args)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("no-credentials"))
            .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
            .env("RUST_LOG", "info");
        if creds == Creds::Env {
            cmd.envs(server.env());
        }
        let child = wrap(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start s3csi csi");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        assert!(wait_until(STARTUP_TIMEOUT, || socket.exists()), "socket never appeared: {}", read_log(dir.path()));
        // The socket file appears at bind(), a moment before listen(), and a killed predecessor
        // leaves its file behind: retry until the server answers.
        let mut channel = None;
        let connected = wait_until(STARTUP_TIMEOUT, || {
            let path = socket.clone();
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                }
            });
            channel = rt.block_on(Endpoint::from_static("http://localhost").connect_with_connector(connector)).ok();
            // A connection made while a restarted server replaces the socket may be reset: ask
            // once on it before taking it.
            channel =
                channel.take().filter(|c| rt.block_on(IdentityClient::new(c.clone()).probe(ProbeRequest {})).is_ok());
            channel.is_some()
        });
        assert!(connected, "cannot connect to {}: {}", socket.display(), read_log(dir.path()));
        let channel = channel.expect("connected");
        let d = Driver { dir, state_dir, child: Some(child), rt, channel, metrics_port };
        let ready = d.rt.block_on(IdentityClient::new(d.channel.clone()).probe(ProbeRequest {})).unwrap();
        assert_eq!(ready.into_inner().ready, Some(true));
        d
    }

    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Pid of the process started (the driver, or whatever `wrap` made of its command).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Kills the server without any cleanup (as a crash or a container restart would).
    pub fn kill(mut self) -> (TempDir, PathBuf) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        // What runs under the state directory (keeper, mounts) lives on for the next driver.
        let state_dir = std::mem::replace(&mut self.state_dir, self.dir.path().join("state"));
        (dir, state_dir)
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn create(
        &self,
        name: &str,
        params: &[(&str, &str)],
        secrets: &HashMap<String, String>,
    ) -> Result<Volume, tonic::Status> {
        let req = CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(CapacityRange { required_bytes: 1 << 30, limit_bytes: 0 }),
            volume_capabilities: vec![mount_cap(volume_capability::access_mode::Mode::MultiNodeMultiWriter)],
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            secrets: secrets.clone(),
            ..Default::default()
        };
        self.rt.block_on(self.controller().create_volume(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn delete(&self, id: &str, secrets: &HashMap<String, String>) -> Result<(), tonic::Status> {
        let req = DeleteVolumeRequest { volume_id: id.to_owned(), secrets: secrets.clone() };
        self.rt.block_on(self.controller().delete_volume(req)).map(|_| ())
    }

    pub fn stage_req(&self, vol: &Volume, staging: &Path, secrets: &HashMap<String, String>) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(volume_capability::access_mode::Mode::MultiNodeMultiWriter)),
            secrets: secrets.clone(),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        }
    }

    pub fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), tonic::Status> {
        self.rt.block_on(self.node().node_stage_volume(req)).map(|_| ())
    }

    pub fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        let req =
            NodeUnstageVolumeRequest { volume_id: id.to_owned(), staging_target_path: staging.display().to_string() };
        self.rt.block_on(self.node().node_unstage_volume(req)).map(|_| ())
    }

    pub fn publish(&self, id: &str, staging: &Path, target: &Path, readonly: bool) -> Result<(), tonic::Status> {
        let req = NodePublishVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(volume_capability::access_mode::Mode::MultiNodeMultiWriter)),
            readonly,
            ..Default::default()
        };
        self.rt.block_on(self.node().node_publish_volume(req)).map(|_| ())
    }

    pub fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let req = NodeUnpublishVolumeRequest { volume_id: id.to_owned(), target_path: target.display().to_string() };
        self.rt.block_on(self.node().node_unpublish_volume(req)).map(|_| ())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The keeper the driver started for itself, and its mount processes, outlive the driver
        // by design; a test ends them with it.
        kill_processes_using(&self.state_dir);
        // Never leave mounts behind, whatever the test did.
        let mut leftovers: Vec<PathBuf> =
            super::mounts().into_iter().map(|(p, _)| p).filter(|p| p.starts_with(self.dir.path())).collect();
        leftovers.reverse();
        for p in leftovers {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

/// SIGKILLs every process with an argument under `dir` (a keeper's `--state-dir`, a mount's
/// `--recovery-dir`).
fn kill_processes_using(dir: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else { return };
    let me = std::process::id();
    for pid in procs.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())) {
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let uses = cmdline.split(|&b| b == 0).any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)).starts_with(dir));
        if uses {
            // SAFETY: a signal to a process of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

pub fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default()
}

pub fn mount_cap(mode: volume_capability::access_mode::Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume::default())),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn no_secrets() -> HashMap<String, String> {
    HashMap::new()
}

pub fn secrets_for(server: &S3Server) -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyID".to_owned(), server.access_key().to_owned()),
        ("secretAccessKey".to_owned(), server.secret_key().to_owned()),
    ])
}

pub fn bucket_exists(server: &S3Server, bucket: &str) -> bool {
    server.list_buckets().unwrap().iter().any(|b| b == bucket)
}

pub fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("call should fail").code()
}

/// Stage + publish a volume; returns (staging, target).
pub fn mount_volume(d: &Driver, vol: &Volume, secrets: &HashMap<String, String>, tag: &str) -> (PathBuf, PathBuf) {
    let staging = d.path(&format!("staging-{tag}"));
    let target = d.path(&format!("pods/{tag}/volume"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    d.stage(d.stage_req(vol, &staging, secrets)).unwrap_or_else(|e| panic!("stage: {e:?}\n{}", d.log()));
    d.publish(&vol.volume_id, &staging, &target, false).unwrap_or_else(|e| panic!("publish: {e:?}\n{}", d.log()));
    assert!(is_fuse_mount(&staging) && is_mounted(&target));
    (staging, target)
}

pub fn unmount_volume(d: &Driver, vol: &Volume, staging: &Path, target: &Path) {
    d.unpublish(&vol.volume_id, target).unwrap();
    d.unstage(&vol.volume_id, staging).unwrap();
    assert!(!is_mounted(target) && !is_mounted(staging));
    assert!(!target.exists(), "the target directory is removed");
    super::wait_no_daemon(staging, Duration::from_secs(30)).unwrap();
}
