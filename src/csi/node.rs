//! The Node service: one `s3csi mount` process per staged volume at the staging path, and a
//! bind mount of it into each pod's target path (read-only when asked).
//!
//! Every call is idempotent and safe to retry: a repeat with the same arguments succeeds, a
//! dead FUSE mount found in the way is detached and mounted again, and unpublish or unstage of
//! something already gone succeeds. What was staged is recorded in the state directory, so a
//! restarted server can tear down volumes staged by its predecessor; their FUSE processes keep
//! serving in the meantime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::check_capability;
use super::proto::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse,
    NodeGetInfoRequest, NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest,
    NodeUnstageVolumeResponse, VolumeCapability, VolumeUsage, node_server::Node, node_service_capability,
    volume_capability, volume_usage,
};
use super::state::{StagedVolume, StateDir, TargetRecord};
use super::volume::{MountOptions, VolumeId};
use super::{CsiConfig, CsiError, KeyLocks, Secrets, rpc};
use crate::config::S3Config;
use crate::keeper::KeeperClient;
use crate::keeper::client::Launcher;
use crate::keeper::protocol::VolumeSpec;
use crate::mount::runner::{MountRunner, RunError};
use crate::mount::supervisor::{MountSpec, is_mount_process};
use crate::mount::{MountEntry, MountState, Mounter, SystemMounter};

/// Filesystem types our FUSE mounts show in mountinfo: `fuse` when mounted directly by root (the
/// kernel keeps no subtype then), `fuse.s3csi` through fusermount3. The source, `s3csi:<bucket>`,
/// tells ours from other FUSE filesystems.
const FUSE_FSTYPES: [&str; 2] = ["fuse", "fuse.s3csi"];

fn is_our_type(entry: &MountEntry) -> bool {
    FUSE_FSTYPES.contains(&entry.fstype.as_str()) && entry.source.starts_with("s3csi:")
}

pub struct NodeService {
    node_id: String,
    base: S3Config,
    state: StateDir,
    mounter: Arc<dyn Mounter>,
    runner: Arc<dyn MountRunner>,
    locks: KeyLocks,
}

fn required<'a>(value: &'a str, name: &str) -> Result<&'a str, CsiError> {
    if value.is_empty() { Err(CsiError::InvalidArgument(format!("{name} is required"))) } else { Ok(value) }
}

/// A staging or target path from the CO: absolute, with no `.`, `..` or empty components
/// (kubelet sends exactly such paths). Returned in canonical spelling (no trailing `/`), the
/// form mountinfo shows and the state directory records.
fn absolute_path(value: &str, name: &str) -> Result<PathBuf, CsiError> {
    use std::path::Component;
    required(value, name)?;
    let path = Path::new(value);
    // `Path::components` drops interior `.` silently; a path with one is not what kubelet sends.
    if value.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(CsiError::InvalidArgument(format!(
            "{name} {value:?} must be an absolute path without '.' or '..' components"
        )));
    }
    let mut clean = PathBuf::from("/");
    let mut parts = 0;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => {
                clean.push(part);
                parts += 1;
            }
            _ => {
                return Err(CsiError::InvalidArgument(format!(
                    "{name} {value:?} must be an absolute path without '.' or '..' components"
                )));
            }
        }
    }
    if !path.is_absolute() || parts == 0 {
        return Err(CsiError::InvalidArgument(format!("{name} {value:?} must be an absolute path below /")));
    }
    Ok(clean)
}

/// The mount source of a volume's FUSE mount (`s3csi:<bucket>[/<prefix>]`, see
/// `daemon::mount_source`): from the `--prefix` of its `s3csi mount` arguments when known (it
/// includes a sub-prefix option), else from the volume id.
fn expected_source(id: &VolumeId, mount_args: Option<&[String]>) -> String {
    let prefix = match mount_args {
        Some(args) => args.iter().find_map(|a| a.strip_prefix("--prefix=")).unwrap_or("").to_owned(),
        None => id.prefix.clone(),
    };
    crate::daemon::mount_source(&id.bucket, &prefix)
}

/// Whether `path` itself is a symbolic link (never followed by the node service). Call it
/// only on a path that is not a mount point: on a mount point even `lstat` waits for the
/// filesystem, which may be a hung FUSE server.
fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Something that is not this volume's mount sits at `path`: a live one is `AlreadyExists`, a
/// dead one `FailedPrecondition` (an operator must unmount it; the node never touches it).
fn not_ours(what: &str, path: &Path, state: &MountState) -> CsiError {
    let (fstype, source) = state.entry().map_or(("", ""), |e| (e.fstype.as_str(), e.source.as_str()));
    match state {
        MountState::Dead(_) => CsiError::FailedPrecondition(format!(
            "{what} {} has a dead {fstype} mount of {source} that is not ours; unmount it",
            path.display()
        )),
        _ => CsiError::AlreadyExists(format!("{what} {} already has a {fstype} mount of {source}", path.display())),
    }
}

fn internal(what: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(what.to_string())
}

/// Whether the access mode only allows reading.
fn reader_only(cap: &VolumeCapability) -> bool {
    use volume_capability::access_mode::Mode;
    cap.access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .is_some_and(|m| matches!(m, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly))
}

fn mount_parts(cap: &VolumeCapability) -> (&[String], Option<&str>) {
    match &cap.access_type {
        Some(volume_capability::AccessType::Mount(m)) => (&m.mount_flags, Some(m.volume_mount_group.as_str())),
        _ => (&[], None),
    }
}

/// What makes two stagings of a volume incompatible: which keys it shows and whether it is
/// read-only. Everything else (cache sizes, TTL, modes, log and metrics paths) may differ.
fn essential_args(args: &[String]) -> (Option<&str>, bool) {
    let prefix = args.iter().find_map(|a| a.strip_prefix("--prefix="));
    (prefix, args.iter().any(|a| a == "--read-only"))
}

/// Creates `path` as a directory if missing; returns whether it was created. A symbolic link
/// in the last component is refused, never followed.
fn ensure_dir(path: &Path) -> Result<bool, CsiError> {
    let not_dir = |what: &str| {
        CsiError::FailedPrecondition(format!(
            "{} {what}; s3csi mounts only onto a directory and never follows a symbolic link there",
            path.display()
        ))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(not_dir("is a symbolic link")),
        Ok(m) if m.is_dir() => Ok(false),
        Ok(_) => Err(not_dir("exists and is not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| internal(format!("cannot create {}: {e}", parent.display())))?;
            }
            match std::fs::create_dir(path) {
                Ok(()) => Ok(true),
                // Created meanwhile (a retried call): check what it is.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => ensure_dir(path),
                Err(e) => Err(internal(format!("cannot create {}: {e}", path.display()))),
            }
        }
        // A dead mount is dealt with by the caller before this.
        Err(e) => Err(internal(format!("cannot access {}: {e}", path.display()))),
    }
}

/// Removes an empty directory; anything else (a symbolic link, a file, a mount point, a
/// directory with entries) is left alone with a warning.
fn remove_dir(path: &Path) {
    if is_symlink(path) {
        tracing::warn!(path = %path.display(), "a symbolic link, not a directory of ours; leaving it");
        return;
    }
    match std::fs::remove_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove directory; leaving it"),
    }
}

/// Finds the pid of the `s3csi mount` process serving `mountpoint`, if any.
fn find_mount_process(mountpoint: &Path) -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .find(|pid| is_mount_process(*pid, mountpoint))
        .unwrap_or(0)
}

impl NodeService {
    /// The node service with the system mounter and the keeper at `config.keeper_socket`; with
    /// `config.spawn_keeper`, a keeper is started now if none answers (a failure is only logged:
    /// the first stage tries again).
    pub fn new(config: &CsiConfig) -> std::io::Result<Self> {
        let launcher = config
            .spawn_keeper
            .then(|| Launcher { exe: config.mount_exe.clone(), state_dir: config.state_dir.clone() });
        let keeper = KeeperClient::new(config.keeper_socket.clone(), launcher);
        match keeper.ensure_running() {
            Ok(()) => {}
            Err(e) if config.spawn_keeper => {
                tracing::warn!(error = %e, "cannot start a keeper; staging will try again")
            }
            Err(e) => tracing::warn!(error = %e, "no keeper answers yet; staging fails until one does"),
        }
        Self::with_parts(config, Arc::new(SystemMounter), Arc::new(keeper))
    }

    /// A node service with the given mounter and process runner (tests use fakes and short
    /// timeouts).
    pub fn with_parts(
        config: &CsiConfig,
        mounter: Arc<dyn Mounter>,
        runner: Arc<dyn MountRunner>,
    ) -> std::io::Result<Self> {
        let state = StateDir::open(&config.state_dir)?;
        let node = NodeService {
            node_id: config.node_id.clone(),
            base: config.s3.clone(),
            state,
            mounter,
            runner,
            locks: KeyLocks::default(),
        };
        node.report_recovered();
        Ok(node)
    }

    /// Logs what an earlier instance left staged; nothing is changed until the CO asks.
    fn report_recovered(&self) {
        for v in self.state.all() {
            let mount = self.mount_state(&v.staging_path);
            // The process serving it now names itself in the recovery dir, with its pid as the
            // keeper sees it (the keeper may run in another PID namespace: the mount's state,
            // not that pid, tells whether it is served).
            let keeper_pid = v
                .volume_id
                .parse::<VolumeId>()
                .ok()
                .and_then(|id| crate::fs::recovery::serving_pid(&self.state.recovery_dir(&id.file_stem())));
            tracing::info!(
                volume = %v.volume_id,
                staging = %v.staging_path.display(),
                mount = ?mount,
                keeper_pid,
                targets = v.targets.len(),
                "found a volume staged by an earlier instance"
            );
        }
    }

    /// What is mounted at `path`. The check may wait up to `LIVENESS_TIMEOUT` for a FUSE server,
    /// so it leaves the async worker for the time (other RPCs keep being served).
    fn mount_state(&self, path: &Path) -> MountState {
        tokio::task::block_in_place(|| self.mounter.state(path))
    }

    /// Detaches a dead mount at `path` so it can be mounted again.
    fn clear_dead(&self, path: &Path) -> Result<(), CsiError> {
        tracing::warn!(
            path = %path.display(),
            "found a dead mount (its FUSE process is gone or does not answer); detaching it"
        );
        self.mounter.unmount(path).map_err(internal)
    }

    /// Whether a mount is ours with mount source `source` (see [`expected_source`]): our FUSE
    /// type and that source, and when the volume's staging mount is known, the same filesystem
    /// (a bind mount of it shows the same device).
    fn is_ours(&self, entry: &MountEntry, source: &str, staging: Option<&Path>) -> bool {
        if !is_our_type(entry) || entry.source != source {
            return false;
        }
        match staging.and_then(|s| self.mount_state(s).entry().cloned()) {
            Some(staged) if is_our_type(&staged) => staged.device == entry.device,
            _ => true,
        }
    }

    /// Unmounts what is mounted at `path` while it is ours (binds may be stacked by retries);
    /// anything else is left mounted with a warning. Returns whether `path` is free of mounts.
    fn unmount_ours(&self, path: &Path, source: Option<&str>, staging: Option<&Path>) -> Result<bool, CsiError> {
        // Enough for binds stacked by retries; a loop that makes no progress ends here.
        const MAX_STACKED: usize = 16;
        for _ in 0..MAX_STACKED {
            let state = self.mount_state(path);
            let Some(entry) = state.entry() else { return Ok(true) };
            if !source.is_some_and(|source| self.is_ours(entry, source, staging)) {
                tracing::warn!(
                    path = %path.display(),
                    fstype = entry.fstype,
                    source = entry.source,
                    "not a mount of this volume; left alone"
                );
                return Ok(false);
            }
            self.mounter.unmount(path).map_err(internal)?;
        }
        Err(internal(format!("{} is still mounted after {MAX_STACKED} unmounts", path.display())))
    }

    /// The `s3csi mount` command line and environment for a volume.
    fn mount_spec(
        &self,
        id: &VolumeId,
        staging: &Path,
        options: &MountOptions,
        secrets: &Secrets,
    ) -> Result<MountSpec, CsiError> {
        let vs = secrets.volume_s3()?;
        let s3 = vs.apply(&self.base);
        let stem = id.file_stem();
        let mut args = vec!["mount".to_owned(), id.bucket.clone(), staging.display().to_string()];
        args.extend(options.mount_args(&id.prefix));
        if let Some(url) = &s3.endpoint_url {
            args.push(format!("--endpoint-url={url}"));
        }
        if let Some(region) = &s3.region {
            args.push(format!("--region={region}"));
        }
        if s3.force_path_style {
            args.push("--force-path-style".to_owned());
        }
        if let Some(pem) = &vs.ca_pem {
            let path = self.state.ca_file(&stem);
            std::fs::write(&path, pem).map_err(|e| internal(format!("cannot write {}: {e}", path.display())))?;
            args.push(format!("--ca-bundle={}", path.display()));
        } else if let Some(path) = &s3.ca_bundle {
            args.push(format!("--ca-bundle={}", path.display()));
        }
        if options.disk_cache() {
            args.push(format!("--cache-dir={}", self.state.cache_dir(&stem).display()));
        }
        args.push(format!("--log-file={}", self.state.log_file(&stem).display()));
        args.push(format!("--metrics-address=unix:{}", self.state.metrics_socket(&stem).display()));
        let mut env = HashMap::new();
        let mut env_remove = Vec::new();
        if let Some(c) = &vs.credentials {
            env.insert("AWS_ACCESS_KEY_ID".to_owned(), c.access_key_id.clone());
            env.insert("AWS_SECRET_ACCESS_KEY".to_owned(), c.secret_access_key.clone());
            match &c.session_token {
                Some(t) => {
                    env.insert("AWS_SESSION_TOKEN".to_owned(), t.clone());
                }
                None => env_remove.push("AWS_SESSION_TOKEN".to_owned()),
            }
        }
        Ok(MountSpec { args, env, env_remove })
    }

    /// Asks the runner to stop a volume's mount process (after its mount was removed).
    async fn stop_process(&self, id: &VolumeId, stem: &str, staging: &Path) -> Result<(), CsiError> {
        let (runner, volume, path) = (Arc::clone(&self.runner), stem.to_owned(), staging.to_owned());
        let stopped = tokio::task::spawn_blocking(move || runner.stop(&volume, &path))
            .await
            .map_err(|e| internal(format!("stop task failed: {e}")))?;
        stopped.map_err(|e| match e {
            RunError::Refused(m) => CsiError::Aborted(format!("cannot stop the mount process of volume {id}: {m}")),
            e => CsiError::Unavailable(format!("cannot stop the mount process of volume {id}: {e}")),
        })
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let staging = absolute_path(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        check_capability(cap)?;
        let id: VolumeId = req.volume_id.parse().map_err(CsiError::NotFound)?;
        let (flags, group) = mount_parts(cap);
        let mut options = MountOptions::build(&req.volume_context, flags, group).map_err(CsiError::InvalidArgument)?;
        options.read_only |= reader_only(cap);
        let secrets = Secrets::new(req.secrets);
        let spec = self.mount_spec(&id, &staging, &options, &secrets)?;
        let stem = id.file_stem();
        let _guard = self.locks.lock(&req.volume_id).await;

        let source = expected_source(&id, Some(&spec.args));
        if let Some(old) = self.state.load(&stem).map_err(internal)? {
            let old_source = expected_source(&id, Some(&old.mount_args));
            if old.staging_path != staging {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is already staged at {} on this node",
                    old.staging_path.display()
                )));
            }
            match self.mount_state(&staging) {
                MountState::Healthy(e)
                    if self.is_ours(&e, &old_source, None)
                        && essential_args(&old.mount_args) == essential_args(&spec.args) =>
                {
                    if old.mount_args != spec.args {
                        // Tuning options (cache sizes, TTL, modes) or a newer driver's extra
                        // flags: the live mount keeps serving; they apply at the next staging.
                        tracing::info!(volume = %id, "already staged with other tuning options; keeping the live mount");
                    }
                    return Ok(NodeStageVolumeResponse {});
                }
                MountState::Healthy(e) if self.is_ours(&e, &old_source, None) => {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {id} is already staged at {} with a different prefix or read-only setting",
                        staging.display()
                    )));
                }
                MountState::Dead(e) if self.is_ours(&e, &old_source, None) => self.clear_dead(&staging)?,
                MountState::NotMounted => {}
                foreign => return Err(not_ours("staging path", &staging, &foreign)),
            }
            // Its process, if the keeper still runs one, serves nothing any more.
            self.stop_process(&id, &stem, &staging).await?;
        } else {
            match self.mount_state(&staging) {
                MountState::Healthy(e) if self.is_ours(&e, &source, None) => {
                    // Staged by an instance whose state was lost: adopt the live mount.
                    let pid = find_mount_process(&staging);
                    tracing::warn!(volume = %id, pid, "adopting a live mount that has no state record");
                    let v = StagedVolume {
                        volume_id: req.volume_id.clone(),
                        staging_path: staging.clone(),
                        pid,
                        mount_args: spec.args.clone(),
                        created_staging_dir: false,
                        targets: Default::default(),
                    };
                    self.state.save(&stem, &v).map_err(internal)?;
                    return Ok(NodeStageVolumeResponse {});
                }
                MountState::Dead(e) if self.is_ours(&e, &source, None) => self.clear_dead(&staging)?,
                MountState::NotMounted => {}
                foreign => return Err(not_ours("staging path", &staging, &foreign)),
            }
        }

        let created = ensure_dir(&staging)?;
        let volume_spec = VolumeSpec {
            volume: stem.clone(),
            volume_id: id.to_string(),
            mountpoint: staging.clone(),
            args: spec.args.clone(),
            env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            env_remove: spec.env_remove.clone(),
            recovery_dir: self.state.recovery_dir(&stem),
        };
        let runner = Arc::clone(&self.runner);
        let started = tokio::task::spawn_blocking(move || runner.start(&volume_spec))
            .await
            .map_err(|e| internal(format!("mount task failed: {e}")))?;
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                // A process killed for not getting ready may have mounted already: remove its
                // mount, so the staging path is as before and a retry starts afresh.
                let cleared = match &e {
                    RunError::Exec(_) | RunError::Refused(_) | RunError::Unavailable(_) => Ok(true),
                    RunError::Failed(_) | RunError::NotReady(_) => self.unmount_ours(&staging, Some(&source), None),
                };
                if created && matches!(cleared, Ok(true)) {
                    remove_dir(&staging);
                }
                let error = match e {
                    RunError::Exec(m) => internal(m),
                    RunError::Failed(m) => internal(format!("cannot mount volume {id}: {m}")),
                    RunError::NotReady(m) => {
                        internal(format!("cannot mount volume {id} at {}: {m}", staging.display()))
                    }
                    RunError::Refused(m) => CsiError::Aborted(format!("cannot mount volume {id}: {m}")),
                    RunError::Unavailable(m) => CsiError::Unavailable(format!("cannot mount volume {id}: {m}")),
                };
                return Err(match cleared {
                    Ok(_) => error,
                    Err(c) => internal(format!("{error}; removing its mount failed too: {c}")),
                });
            }
        };
        let v = StagedVolume {
            volume_id: req.volume_id.clone(),
            staging_path: staging.clone(),
            pid,
            mount_args: spec.args,
            created_staging_dir: created,
            targets: Default::default(),
        };
        if let Err(e) = self.state.save(&stem, &v) {
            let _ = self.mounter.unmount(&staging);
            return Err(internal(format!("cannot record the staged volume in {}: {e}", self.state.root().display())));
        }
        tracing::info!(volume = %id, staging = %staging.display(), pid, "volume staged");
        Ok(NodeStageVolumeResponse {})
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let staging = absolute_path(&req.staging_target_path, "staging_target_path")?;
        let id = req.volume_id.parse::<VolumeId>().ok();
        let stem = id.as_ref().map(VolumeId::file_stem);
        let _guard = self.locks.lock(&req.volume_id).await;
        let record = match &stem {
            Some(stem) => self.state.load(stem).map_err(internal)?.filter(|v| v.staging_path == staging),
            None => None,
        };
        let source = id.as_ref().map(|id| expected_source(id, record.as_ref().map(|v| v.mount_args.as_slice())));
        if let (Some(v), Some(source)) = (&record, &source) {
            for target in v.targets.keys() {
                if self.mount_state(target).entry().is_some_and(|e| self.is_ours(e, source, None)) {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {} is still published at {}; unpublish it first",
                        req.volume_id,
                        target.display()
                    )));
                }
            }
        }
        if self.mount_state(&staging) == MountState::NotMounted && is_symlink(&staging) {
            tracing::warn!(staging = %staging.display(), "staging path is a symbolic link, not ours; left alone");
        } else {
            self.unmount_ours(&staging, source.as_deref(), None)?;
        }
        let Some(v) = record else { return Ok(NodeUnstageVolumeResponse {}) };
        if let (Some(id), Some(stem)) = (&id, &stem) {
            self.stop_process(id, stem, &staging).await?;
        }
        if v.created_staging_dir {
            remove_dir(&staging);
        }
        if let Some(stem) = stem {
            self.state.remove(&stem).map_err(internal)?;
        }
        tracing::info!(volume = %req.volume_id, staging = %staging.display(), "volume unstaged");
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let target = absolute_path(&req.target_path, "target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        if req.staging_target_path.is_empty() {
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is required: volumes must be staged (NodeStageVolume) before publishing".into(),
            ));
        }
        let staging = absolute_path(&req.staging_target_path, "staging_target_path")?;
        check_capability(cap)?;
        let id: VolumeId = req.volume_id.parse().map_err(CsiError::NotFound)?;
        let stem = id.file_stem();
        let read_only = req.readonly || reader_only(cap);
        let _guard = self.locks.lock(&req.volume_id).await;
        let Some(mut v) = self.state.load(&stem).map_err(internal)?.filter(|v| v.staging_path == staging) else {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is not staged at {} on this node; NodeStageVolume must come first",
                staging.display()
            )));
        };
        let source = expected_source(&id, Some(&v.mount_args));
        let why = match self.mount_state(&staging) {
            MountState::Healthy(e) if self.is_ours(&e, &source, None) => None,
            MountState::Healthy(_) => Some("something else is mounted there"),
            MountState::Dead(_) => Some("its FUSE connection is gone or its mount process does not answer"),
            MountState::NotMounted => Some("nothing is mounted there"),
        };
        if let Some(why) = why {
            return Err(CsiError::FailedPrecondition(format!(
                "the staging mount of volume {id} at {} is not usable ({why}; see {}); \
                 unstage and stage the volume again",
                staging.display(),
                self.state.log_file(&stem).display()
            )));
        }
        match self.mount_state(&target) {
            MountState::Healthy(e) => {
                let ours = self.is_ours(&e, &source, Some(&staging));
                return match v.targets.get(&target).filter(|_| ours) {
                    Some(t) if t.read_only == read_only => Ok(NodePublishVolumeResponse {}),
                    Some(_) => Err(CsiError::AlreadyExists(format!(
                        "volume {id} is already published at {} with a different read-only setting",
                        target.display()
                    ))),
                    None => Err(CsiError::AlreadyExists(format!(
                        "target path {} already has something else mounted",
                        target.display()
                    ))),
                };
            }
            // A dead bind of an earlier staging mount has that mount's device: type and source
            // identify it.
            MountState::Dead(e) if self.is_ours(&e, &source, None) => self.clear_dead(&target)?,
            MountState::NotMounted => {}
            foreign => return Err(not_ours("target path", &target, &foreign)),
        }
        let created = ensure_dir(&target)?;
        if let Err(e) = self.mounter.bind(&staging, &target, read_only) {
            if created {
                remove_dir(&target);
            }
            return Err(internal(e));
        }
        let created = created || v.targets.get(&target).is_some_and(|t| t.created);
        v.targets.insert(target.clone(), TargetRecord { read_only, created });
        if let Err(e) = self.state.save(&stem, &v) {
            let _ = self.mounter.unmount(&target);
            return Err(internal(format!("cannot record the published volume: {e}")));
        }
        tracing::info!(volume = %id, target = %target.display(), read_only, "volume published");
        Ok(NodePublishVolumeResponse {})
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<NodeUnpublishVolumeResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let target = absolute_path(&req.target_path, "target_path")?;
        let id = req.volume_id.parse::<VolumeId>().ok();
        let stem = id.as_ref().map(VolumeId::file_stem);
        let _guard = self.locks.lock(&req.volume_id).await;
        let record = match &stem {
            Some(stem) => self.state.load(stem).map_err(internal)?,
            None => None,
        };
        if self.mount_state(&target) == MountState::NotMounted && is_symlink(&target) {
            tracing::warn!(target = %target.display(), "target path is a symbolic link, not ours; left alone");
        } else {
            // A target we published may be a bind of an earlier staging mount (device differs):
            // type and source identify it. Otherwise it must be a bind of the staging mount.
            let staging =
                record.as_ref().filter(|v| !v.targets.contains_key(&target)).map(|v| v.staging_path.as_path());
            let source = id.as_ref().map(|id| expected_source(id, record.as_ref().map(|v| v.mount_args.as_slice())));
            // Only a directory this node created is removed (kubelet removes its own).
            let created = record.as_ref().and_then(|v| v.targets.get(&target)).is_some_and(|t| t.created);
            if self.unmount_ours(&target, source.as_deref(), staging)? && created {
                remove_dir(&target);
            }
        }
        if let (Some(stem), Some(mut v)) = (stem, record)
            && v.targets.remove(&target).is_some()
        {
            self.state.save(&stem, &v).map_err(internal)?;
        }
        Ok(NodeUnpublishVolumeResponse {})
    }

    fn stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        required(&req.volume_id, "volume_id")?;
        let path = absolute_path(&req.volume_path, "volume_path")?;
        let not_ours =
            || CsiError::NotFound(format!("{} is not a path of volume {} on this node", path.display(), req.volume_id));
        let id: VolumeId = req.volume_id.parse().map_err(|_| not_ours())?;
        let v = self.state.load(&id.file_stem()).map_err(internal)?.ok_or_else(not_ours)?;
        if v.staging_path != path && !v.targets.contains_key(&path) {
            return Err(not_ours());
        }
        let st = match crate::mount::statvfs_bounded(&path) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_ours()),
            Err(e) => {
                return Err(internal(format!(
                    "cannot stat {}: {e} (a FUSE process that is gone or hung; see {})",
                    path.display(),
                    self.state.log_file(&id.file_stem()).display()
                )));
            }
        };
        let bytes = |blocks: u64| i64::try_from(blocks.saturating_mul(st.f_frsize)).unwrap_or(i64::MAX);
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    available: bytes(st.f_bavail),
                    total: bytes(st.f_blocks),
                    used: bytes(st.f_blocks.saturating_sub(st.f_bfree)),
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: count(st.f_favail),
                    total: count(st.f_files),
                    used: count(st.f_files.saturating_sub(st.f_ffree)),
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ],
            volume_condition: None,
        })
    }
}

fn node_capability(t: node_service_capability::rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("NodeStageVolume", &id, self.stage(req)).await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("NodeUnstageVolume", &id, self.unstage(req)).await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("NodePublishVolume", &id, self.publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        rpc("NodeUnpublishVolume", &id, self.unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        // statvfs may wait up to `LIVENESS_TIMEOUT` for a FUSE server: off the async worker.
        rpc("NodeGetVolumeStats", &id, async move { tokio::task::block_in_place(|| self.stats(req)) }).await
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeExpandVolume is not needed: S3 volumes have no size to grow on the node"))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                node_capability(Type::StageUnstageVolume),
                node_capability(Type::GetVolumeStats),
                node_capability(Type::VolumeMountGroup),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mount::MountError;
    use crate::mount::supervisor::{process_gone, stub_exe};

    /// Name of the file a stub mount process creates in its mountpoint to stand for a mount.
    const FAKE_MOUNT: &str = ".fake-mount";

    /// A mounter that sees our FUSE mount of `s3csi:bucket-a` at every directory holding
    /// [`FAKE_MOUNT`], and unmounts by removing that file.
    #[derive(Default)]
    struct FakeMounter {
        unmounted: Mutex<Vec<PathBuf>>,
    }

    impl Mounter for FakeMounter {
        fn state(&self, path: &Path) -> MountState {
            if path.join(FAKE_MOUNT).exists() {
                let entry =
                    MountEntry { source: "s3csi:bucket-a".into(), fstype: "fuse".into(), device: "0:99".into() };
                MountState::Healthy(entry)
            } else {
                MountState::NotMounted
            }
        }

        fn bind(&self, _source: &Path, _target: &Path, _read_only: bool) -> Result<(), MountError> {
            unimplemented!("not used by these tests")
        }

        fn unmount(&self, path: &Path) -> Result<(), MountError> {
            self.unmounted.lock().unwrap().push(path.to_owned());
            let _ = std::fs::remove_file(path.join(FAKE_MOUNT));
            Ok(())
        }
    }

    /// The keeper's view of the same fake mounts.
    struct FakeTable;

    impl crate::keeper::MountTable for FakeTable {
        fn is_mounted(&self, path: &Path) -> bool {
            path.join(FAKE_MOUNT).exists()
        }
    }

    const READY_TIMEOUT: Duration = Duration::from_secs(1);

    /// A node whose mount processes run `script` (arguments: `mount <bucket> <staging> ...`),
    /// started by a keeper serving in this process (with `/dev/null` for the FUSE device).
    fn node(dir: &Path, script: &str) -> (NodeService, Arc<FakeMounter>) {
        let exe = stub_exe(dir, script);
        let state_dir = dir.join("state");
        let config = CsiConfig {
            socket: dir.join("csi.sock"),
            node_id: "node-1".into(),
            mode: super::super::ServiceMode::Node,
            driver_name: super::super::volume::DEFAULT_DRIVER_NAME.into(),
            s3: S3Config::default(),
            state_dir: state_dir.clone(),
            metrics_address: None,
            mount_exe: exe.clone(),
            keeper_socket: state_dir.join(crate::keeper::SOCKET_NAME),
            spawn_keeper: false,
        };
        let mut keeper_config = crate::keeper::KeeperConfig::new(state_dir, exe);
        keeper_config.fuse_device = PathBuf::from("/dev/null");
        keeper_config.ready_timeout = READY_TIMEOUT;
        crate::keeper::Keeper::start(keeper_config, Arc::new(FakeTable)).unwrap();
        let mounter = Arc::new(FakeMounter::default());
        let keeper = Arc::new(KeeperClient::new(config.keeper_socket.clone(), None));
        (NodeService::with_parts(&config, mounter.clone(), keeper).unwrap(), mounter)
    }

    fn stage_req(staging: &Path) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: "bucket-a".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(volume_capability::AccessType::Mount(Default::default())),
                access_mode: Some(volume_capability::AccessMode {
                    mode: volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
                }),
            }),
            ..Default::default()
        }
    }

    fn unstage_req(staging: &Path) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest { volume_id: "bucket-a".into(), staging_target_path: staging.display().to_string() }
    }

    /// At most this long for a call that must not wait for a lock (or anything else).
    const PROMPT: Duration = Duration::from_secs(5);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mount_process_that_never_gets_ready_is_killed_and_releases_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("echo $$ > {}\necho 'resolving the S3 endpoint' >&2\nexec sleep 600", pid_file.display());
        let (node, mounter) = node(dir.path(), &script);
        let staging = dir.path().join("globalmount");

        let started = Instant::now();
        let err = node.stage(stage_req(&staging)).await.unwrap_err();
        assert!(started.elapsed() < READY_TIMEOUT + PROMPT, "bounded: {:?}", started.elapsed());
        let CsiError::Internal(msg) = &err else { panic!("mount failures are Internal: {err:?}") };
        let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        for part in [
            "cannot mount volume bucket-a at ".to_owned() + &staging.display().to_string(),
            format!("mount process {pid} did not report the mount ready within 1s and was killed"),
            "its last output on stderr: resolving the S3 endpoint".to_owned(),
        ] {
            assert!(msg.contains(&part), "{part:?} in {msg}");
        }
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the mount process is killed and reaped");
        assert!(!staging.exists(), "the staging directory it created is removed");
        assert!(node.state.load(&"bucket-a".parse::<VolumeId>().unwrap().file_stem()).unwrap().is_none());
        assert!(mounter.unmounted.lock().unwrap().is_empty(), "nothing was mounted, nothing unmounted");

        // The volume's lock is free: the next calls for it go ahead at once (or wait their own
        // bounded time for their own mount process).
        tokio::time::timeout(PROMPT, node.unstage(unstage_req(&staging)))
            .await
            .expect("unstage is not blocked")
            .unwrap();
        let again = tokio::time::timeout(READY_TIMEOUT + PROMPT, node.stage(stage_req(&staging)))
            .await
            .expect("a second stage is not blocked");
        assert!(matches!(again, Err(CsiError::Internal(_))), "{again:?}");
        let pid2: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(pid2 != pid && process_gone(pid2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mount_left_by_a_process_that_never_got_ready_is_unmounted() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // Mounts (its mountpoint is the third argument), then hangs before reporting ready.
        let script = format!("echo $$ > {}\ntouch \"$3/{FAKE_MOUNT}\"\nexec sleep 600", pid_file.display());
        let (node, mounter) = node(dir.path(), &script);
        let staging = dir.path().join("globalmount");

        let err = node.stage(stage_req(&staging)).await.unwrap_err();
        let CsiError::Internal(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("did not report the mount ready") && msg.contains("it wrote nothing on stderr"), "{msg}");
        let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the mount process is killed and reaped");
        assert_eq!(*mounter.unmounted.lock().unwrap(), vec![staging.clone()], "its mount is removed");
        assert_eq!(node.mount_state(&staging), MountState::NotMounted);
        assert!(!staging.exists(), "the staging directory it created is removed");
        tokio::time::timeout(PROMPT, node.unstage(unstage_req(&staging)))
            .await
            .expect("unstage is not blocked")
            .unwrap();
    }

    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_staged_volume_runs_under_the_keeper_which_restarts_it_until_unstaged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("args");
        // Mounts, reports ready, records its arguments (one line per process), then serves.
        let script = format!(
            "touch \"$3/{FAKE_MOUNT}\"\necho \"$$ $*\" >> {}\necho {}\nexec sleep 600",
            log.display(),
            crate::daemon::READY_LINE
        );
        let (node, mounter) = node(dir.path(), &script);
        let staging = dir.path().join("globalmount");
        node.stage(stage_req(&staging)).await.unwrap();
        let stem = "bucket-a".parse::<VolumeId>().unwrap().file_stem();
        let record = node.state.load(&stem).unwrap().unwrap();
        let lines = std::fs::read_to_string(&log).unwrap();
        let first: Vec<&str> = lines.lines().next().unwrap().split(' ').collect();
        assert_eq!(record.pid.to_string(), first[0], "the recorded pid is the keeper's child");
        let recovery = node.state.recovery_dir(&stem);
        let want = ["--foreground", "--fuse-fd", "3", "--recovery-dir", recovery.to_str().unwrap()];
        assert!(first.ends_with(&want), "{first:?}");
        assert!(recovery.is_dir());

        // Staging again is a no-op on the live mount.
        node.stage(stage_req(&staging)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);

        // A crash: the keeper starts a successor on the same connection.
        signal_pid(record.pid, libc::SIGKILL);
        eventually("a successor starts", || std::fs::read_to_string(&log).unwrap().lines().count() == 2);
        let lines = std::fs::read_to_string(&log).unwrap();
        let second: Vec<&str> = lines.lines().nth(1).unwrap().split(' ').collect();
        assert_eq!(second.last(), Some(&"--takeover"), "{second:?}");
        let successor: u32 = second[0].parse().unwrap();

        node.unstage(unstage_req(&staging)).await.unwrap();
        assert_eq!(*mounter.unmounted.lock().unwrap(), vec![staging.clone()]);
        eventually("the successor is stopped", || process_gone(successor));
        assert!(!recovery.exists(), "the recovery directory is removed");
        assert!(node.state.load(&stem).unwrap().is_none());
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2, "no successor after a stop");
    }

    fn signal_pid(pid: u32, sig: i32) {
        // SAFETY: kill has no memory effects; the pid is a live child of the test's keeper.
        unsafe { libc::kill(pid as i32, sig) };
    }
}
