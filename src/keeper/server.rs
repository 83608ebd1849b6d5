//! The keeper's server: owns one `/dev/fuse` descriptor and one supervision thread per volume.
//!
//! Invariants:
//! - A volume is in the table exactly while this keeper owns it; its descriptor closes when the
//!   last reference to the [`Volume`] goes (the table's and its supervision thread's).
//! - At most one supervision thread runs per volume ([`VolState::supervised`]); it alone waits for
//!   the volume's mount process and starts its successors. Requests that end a process (stop,
//!   hand-over) set the intent first and then signal, so the thread releases the volume instead
//!   of restarting it.
//! - At most one request per volume is in progress ([`Shared::busy`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::policy::{self, CrashHistory, ExitAction, HandoverStep, Intent, OwnerAction, TakeoverStep};
use super::protocol::{Conn, Counts, ErrorKind, Request, Response, VolumeInfo, VolumeSpec, VolumeState};
use super::{KeeperConfig, KeeperError};
use crate::mount::supervisor::{CHILD_FUSE_FD, MountSupervisor, SpawnError, kill_and_reap, signal};

/// How long a stopped mount process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a process gets to exit after SIGKILL (one in an uninterruptible call exits later).
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long a mount process gets to hand over after SIGUSR2: it finishes its requests in flight
/// and commits the files open for writing, which may upload a part or two.
const HANDOVER_GRACE: Duration = Duration::from_secs(60);
/// How long an idle request connection may stay silent.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for another request of the same volume to finish.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// How many times a new keeper asks the old one again after a hand-over broke off.
const HANDOVER_ROUNDS: usize = 5;

/// Whether a mountpoint is still mounted. The keeper only reads the mount table: a syscall on
/// the mountpoint would wait for the very process that just died.
pub trait MountTable: Send + Sync + 'static {
    fn is_mounted(&self, path: &Path) -> bool;
}

/// The system mount table (`/proc/self/mountinfo`).
#[derive(Debug, Default)]
pub struct SystemMountTable;

impl MountTable for SystemMountTable {
    fn is_mounted(&self, path: &Path) -> bool {
        crate::mount::mount_entry(path).is_some()
    }
}

/// One owned volume.
struct Volume {
    spec: VolumeSpec,
    /// Our duplicate of the volume's `/dev/fuse` connection.
    fuse: OwnedFd,
    st: Mutex<VolState>,
    changed: Condvar,
}

struct VolState {
    intent: Intent,
    /// The mount process serving the volume (our unreaped child).
    pid: Option<u32>,
    /// Whether a supervision thread runs for the volume.
    supervised: bool,
    restarting: bool,
    restarts: u64,
    takeovers: u64,
    /// How the last mount process ended.
    last_exit: Option<String>,
}

impl Volume {
    fn new(spec: VolumeSpec, fuse: OwnedFd, restarts: u64, takeovers: u64) -> Arc<Self> {
        Arc::new(Volume {
            spec,
            fuse,
            st: Mutex::new(VolState {
                intent: Intent::Serve,
                pid: None,
                supervised: false,
                restarting: false,
                restarts,
                takeovers,
                last_exit: None,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, VolState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> &str {
        &self.spec.volume_id
    }

    /// Sets the intent and sends `sig` to the serving process, if any.
    fn end_process(&self, intent: Intent, sig: i32) {
        let mut st = self.lock();
        st.intent = intent;
        if let Some(pid) = st.pid {
            signal(pid, sig);
        }
        self.changed.notify_all();
    }

    /// Waits until no supervision thread runs, at most `timeout`; returns whether none does.
    fn wait_unsupervised(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self.changed.wait_timeout_while(st, timeout, |s| s.supervised).unwrap_or_else(|e| e.into_inner());
        !st.supervised
    }

    fn info(&self) -> VolumeInfo {
        let st = self.lock();
        let state = match st.intent {
            Intent::Stop => VolumeState::Stopping,
            Intent::HandOver => VolumeState::HandingOver,
            Intent::Serve if st.restarting || st.pid.is_none() => VolumeState::Restarting,
            Intent::Serve => VolumeState::Running,
        };
        VolumeInfo {
            volume: self.spec.volume.clone(),
            volume_id: self.spec.volume_id.clone(),
            mountpoint: self.spec.mountpoint.clone(),
            pid: st.pid,
            restarts: st.restarts,
            takeovers: st.takeovers,
            state,
        }
    }
}

struct Shared {
    config: KeeperConfig,
    supervisor: MountSupervisor,
    table: Arc<dyn MountTable>,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
    busy: Mutex<HashSet<String>>,
    busy_changed: Condvar,
    /// Set while handing volumes over and after: new starts are refused.
    handing_over: AtomicBool,
    /// Set after SIGTERM: new starts are refused, owned volumes keep being served.
    draining: AtomicBool,
}

/// Marks a volume busy for the life of the guard.
struct BusyGuard<'a> {
    shared: &'a Shared,
    volume: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.shared.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.volume);
        self.shared.busy_changed.notify_all();
    }
}

impl Shared {
    fn volumes(&self) -> MutexGuard<'_, HashMap<String, Arc<Volume>>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, volume: &str) -> Option<Arc<Volume>> {
        self.volumes().get(volume).cloned()
    }

    /// Waits (bounded) until no other request works on `volume`, then claims it.
    fn claim(&self, volume: &str) -> Result<BusyGuard<'_>, KeeperError> {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (mut busy, _) = self
            .busy_changed
            .wait_timeout_while(busy, BUSY_WAIT, |b| b.contains(volume))
            .unwrap_or_else(|e| e.into_inner());
        if !busy.insert(volume.to_owned()) {
            return Err(KeeperError::Busy { volume: volume.to_owned() });
        }
        Ok(BusyGuard { shared: self, volume: volume.to_owned() })
    }

    fn mount_args(&self, spec: &VolumeSpec, takeover: bool) -> Vec<String> {
        let mut args = vec![
            "--fuse-fd".to_owned(),
            CHILD_FUSE_FD.to_string(),
            "--recovery-dir".to_owned(),
            spec.recovery_dir.display().to_string(),
        ];
        if takeover {
            args.push("--takeover".to_owned());
        }
        args
    }

    fn spawn(&self, vol: &Volume, takeover: bool) -> Result<Child, SpawnError> {
        let extra = self.mount_args(&vol.spec, takeover);
        self.supervisor.start_child(vol.name(), &vol.spec.mount_spec(), &extra, Some(vol.fuse.as_fd()))
    }

    fn start(self: &Arc<Self>, spec: VolumeSpec) -> Result<u32, KeeperError> {
        if self.handing_over.load(Ordering::SeqCst) {
            return Err(KeeperError::HandingOver { volume: spec.volume_id });
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(KeeperError::Draining { volume: spec.volume_id });
        }
        let _busy = self.claim(&spec.volume)?;
        if let Some(vol) = self.get(&spec.volume) {
            if !vol.spec.same_mount(&spec) {
                return Err(KeeperError::Conflict {
                    volume: spec.volume_id,
                    mountpoint: vol.spec.mountpoint.display().to_string(),
                });
            }
            return Ok(vol.lock().pid.unwrap_or(0));
        }
        let path = &self.config.fuse_device;
        let fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| KeeperError::FuseDevice { path: path.clone(), source })?;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&spec.recovery_dir).map_err(|source| {
            KeeperError::RecoveryDir { volume: spec.volume_id.clone(), path: spec.recovery_dir.clone(), source }
        })?;
        let vol = Volume::new(spec, fuse.into(), 0, 0);
        let child =
            self.spawn(&vol, false).map_err(|e| KeeperError::Spawn { volume: vol.name().to_owned(), source: e })?;
        let pid = child.id();
        self.adopt(vol, Some(child));
        Ok(pid)
    }

    /// Puts `vol` in the table and supervises it: `child` is its serving process, or `None` to
    /// start a successor (`--takeover`) first.
    fn adopt(self: &Arc<Self>, vol: Arc<Volume>, child: Option<Child>) {
        {
            let mut st = vol.lock();
            st.intent = Intent::Serve;
            st.supervised = true;
            st.pid = child.as_ref().map(Child::id);
        }
        self.volumes().insert(vol.spec.volume.clone(), Arc::clone(&vol));
        let (shared, watched) = (Arc::clone(self), Arc::clone(&vol));
        let spawned =
            std::thread::Builder::new().name("s3csi-keeper-vol".into()).spawn(move || shared.supervise(watched, child));
        if let Err(e) = spawned {
            // Without a thread nobody waits for the process: keep the volume (and its mount)
            // and say so; a stop still ends it.
            tracing::error!(volume = vol.name(), error = %e, "cannot start a supervision thread; crashes of this volume's mount process will not be recovered");
            let mut st = vol.lock();
            st.supervised = false;
            vol.changed.notify_all();
        }
    }

    /// The supervision loop of one volume: waits for its process, decides, starts successors.
    fn supervise(self: Arc<Self>, vol: Arc<Volume>, first: Option<Child>) {
        let mut history = CrashHistory::default();
        let mut current = first;
        let mut delay = Duration::ZERO;
        loop {
            if let Some(mut child) = current.take() {
                let started = Instant::now();
                let pid = child.id();
                let status = child.wait();
                let uptime = started.elapsed();
                let described = match &status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("unknown ({e})"),
                };
                let intent = {
                    let mut st = vol.lock();
                    st.pid = None;
                    st.last_exit = Some(described.clone());
                    vol.changed.notify_all();
                    st.intent
                };
                let mounted = self.table.is_mounted(&vol.spec.mountpoint);
                match policy::on_exit(intent, mounted, uptime, &mut history) {
                    ExitAction::Release => {
                        tracing::info!(volume = vol.name(), pid, status = described, "mount process exited as asked");
                        return self.release(&vol);
                    }
                    ExitAction::Drop => {
                        tracing::info!(volume = vol.name(), pid, status = described,
                            mountpoint = %vol.spec.mountpoint.display(), "mount process exited and the mountpoint is no longer mounted; forgetting the volume");
                        return self.drop_volume(&vol);
                    }
                    ExitAction::Restart { delay: d } => {
                        tracing::warn!(
                            volume = vol.name(),
                            pid,
                            status = described,
                            delay_s = d.as_secs_f64(),
                            "mount process ended without being asked; starting a successor on the same connection"
                        );
                        delay = d;
                    }
                }
            }
            // Wait out the backoff, unless someone ends the volume meanwhile.
            {
                let mut st = vol.lock();
                st.restarting = true;
                let (st, _) = vol
                    .changed
                    .wait_timeout_while(st, delay, |s| s.intent == Intent::Serve)
                    .unwrap_or_else(|e| e.into_inner());
                if st.intent != Intent::Serve {
                    drop(st);
                    return self.release(&vol);
                }
            }
            // Counted as started: a successor that dies before it serves is a restart too.
            vol.lock().restarts += 1;
            match self.spawn(&vol, true) {
                Ok(child) => {
                    let mut st = vol.lock();
                    st.pid = Some(child.id());
                    st.restarting = false;
                    tracing::info!(volume = vol.name(), pid = child.id(), restarts = st.restarts, "successor serves");
                    // Ended while it started: pass the request on to it.
                    match st.intent {
                        Intent::Serve => {}
                        Intent::Stop => signal(child.id(), libc::SIGTERM),
                        Intent::HandOver => signal(child.id(), libc::SIGUSR2),
                    }
                    vol.changed.notify_all();
                    current = Some(child);
                }
                Err(e) => {
                    if !self.table.is_mounted(&vol.spec.mountpoint) {
                        tracing::warn!(volume = vol.name(), error = %e, "successor failed and the mountpoint is gone; forgetting the volume");
                        return self.drop_volume(&vol);
                    }
                    delay = history.record(Duration::ZERO);
                    tracing::warn!(volume = vol.name(), error = %e, delay_s = delay.as_secs_f64(), "successor failed to start; retrying");
                }
            }
        }
    }

    fn release(&self, vol: &Volume) {
        let mut st = vol.lock();
        st.supervised = false;
        st.restarting = false;
        vol.changed.notify_all();
    }

    /// Forgets a volume whose mount is gone; its journal is of no use any more.
    fn drop_volume(&self, vol: &Arc<Volume>) {
        {
            let mut volumes = self.volumes();
            if volumes.get(&vol.spec.volume).is_some_and(|v| Arc::ptr_eq(v, vol)) {
                volumes.remove(&vol.spec.volume);
            }
        }
        remove_recovery_dir(vol);
        self.release(vol);
    }

    fn stop(&self, volume: &str) -> Result<(), KeeperError> {
        let _busy = self.claim(volume)?;
        let Some(vol) = self.get(volume) else { return Ok(()) };
        vol.end_process(Intent::Stop, libc::SIGTERM);
        if !vol.wait_unsupervised(STOP_GRACE) {
            tracing::warn!(volume = vol.name(), "mount process did not exit after SIGTERM; killing it");
            vol.end_process(Intent::Stop, libc::SIGKILL);
            if !vol.wait_unsupervised(KILL_GRACE) {
                tracing::warn!(volume = vol.name(), "mount process has not exited after SIGKILL; forgetting it anyway");
            }
        }
        self.volumes().remove(volume);
        remove_recovery_dir(&vol);
        tracing::info!(volume = vol.name(), "volume stopped");
        Ok(())
    }

    fn list(&self) -> Vec<VolumeInfo> {
        let mut out: Vec<VolumeInfo> = self.volumes().values().map(|v| v.info()).collect();
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }

    /// Serves one connection.
    fn handle(self: &Arc<Self>, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(REQUEST_READ_TIMEOUT));
        let mut conn = Conn::new(stream);
        let request = match conn.recv::<Request>() {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable keeper request");
                return;
            }
        };
        let response = match request {
            Request::Start { spec } => {
                let volume = spec.volume_id.clone();
                match self.start(spec) {
                    Ok(pid) => {
                        tracing::info!(volume, pid, "volume started");
                        Response::Started { pid }
                    }
                    Err(e) => error_response(&volume, &e),
                }
            }
            Request::Stop { volume } => match self.stop(&volume) {
                Ok(()) => Response::Stopped,
                Err(e) => error_response(&volume, &e),
            },
            Request::List => Response::Volumes { volumes: self.list() },
            Request::HandOver { keeper_id } => {
                let _ = conn.stream().set_read_timeout(Some(self.config.ready_timeout + REQUEST_READ_TIMEOUT));
                return self.hand_over(conn, keeper_id);
            }
            Request::Accept { .. } | Request::Confirm { .. } | Request::Decline { .. } => Response::Error {
                kind: ErrorKind::Refused,
                message: "confirm and decline belong to a hand-over connection".into(),
            },
        };
        if let Err(e) = conn.send(&response, None) {
            tracing::warn!(error = %e, "cannot answer a keeper request (the caller went away)");
        }
    }

    /// The old keeper's side of a hand-over: offers each volume in turn on `conn`.
    fn hand_over(self: &Arc<Self>, mut conn: Conn, to: Option<String>) {
        tracing::info!(to = ?to, "a newer keeper takes the volumes over");
        self.handing_over.store(true, Ordering::SeqCst);
        let names: Vec<String> = self.volumes().keys().cloned().collect();
        for name in names {
            let Ok(_busy) = self.claim(&name) else {
                tracing::warn!(volume = name, "volume stays busy; stopping the hand-over");
                return self.abandon_hand_over();
            };
            let Some(vol) = self.get(&name) else { continue };
            let (restarts, takeovers) = {
                let st = vol.lock();
                (st.restarts, st.takeovers)
            };
            let offer = Response::Offer { spec: vol.spec.clone(), restarts, takeovers };
            let mut step = HandoverStep::Offered;
            let accepted = conn.send(&offer, Some(vol.fuse.as_fd())).and_then(|()| conn.recv::<Request>());
            if !matches!(&accepted, Ok(Some(Request::Accept { volume })) if *volume == name) {
                tracing::warn!(volume = vol.name(), answer = ?accepted, "the newer keeper did not accept the volume; keeping it");
                self.after_hand_over(&vol, step);
                return self.abandon_hand_over();
            }
            vol.end_process(Intent::HandOver, libc::SIGUSR2);
            if !vol.wait_unsupervised(HANDOVER_GRACE) {
                tracing::warn!(volume = vol.name(), "mount process did not hand over in time; killing it");
                vol.end_process(Intent::HandOver, libc::SIGKILL);
                vol.wait_unsupervised(KILL_GRACE);
            }
            step = HandoverStep::Released;
            let (status, counts) = {
                let st = vol.lock();
                let status = st.last_exit.clone().unwrap_or_else(|| "no process".into());
                (status, Counts { restarts: st.restarts, takeovers: st.takeovers })
            };
            let confirmed = conn
                .send(&Response::Exited { volume: name.clone(), status, counts: Some(counts) }, None)
                .and_then(|()| conn.recv::<Request>());
            match confirmed {
                Ok(Some(Request::Confirm { volume })) if volume == name => step = HandoverStep::Confirmed,
                Ok(Some(Request::Decline { error, .. })) => {
                    tracing::warn!(
                        volume = vol.name(),
                        error,
                        "the newer keeper could not start the volume; serving it again"
                    );
                }
                Ok(other) => tracing::warn!(volume = vol.name(), answer = ?other, "hand-over broke off"),
                Err(e) => tracing::warn!(volume = vol.name(), error = %e, "hand-over connection lost"),
            }
            self.after_hand_over(&vol, step);
            if step != HandoverStep::Confirmed {
                return self.abandon_hand_over();
            }
        }
        if let Some(id) = &to {
            tracing::info!(to = id, "every volume handed over");
        }
        if let Some(me) = &self.config.keeper_id
            && let Err(e) = super::record_handed_over(&self.config.state_dir, me)
        {
            tracing::warn!(error = %e, "cannot record the hand-over; a restart of this keeper would take the volumes back");
        }
        if let Err(e) = conn.send(&Response::Done, None) {
            tracing::warn!(error = %e, "cannot report the end of the hand-over");
        }
        // Idle from now on: starts stay refused.
    }

    fn abandon_hand_over(&self) {
        self.handing_over.store(false, Ordering::SeqCst);
    }

    fn after_hand_over(self: &Arc<Self>, vol: &Arc<Volume>, step: HandoverStep) {
        match policy::old_owner_after(step) {
            OwnerAction::KeepServing => {}
            OwnerAction::StartSuccessor => {
                tracing::info!(volume = vol.name(), "starting a successor ourselves");
                self.adopt(Arc::clone(vol), None);
            }
            OwnerAction::Forget => {
                self.volumes().remove(&vol.spec.volume);
                tracing::info!(volume = vol.name(), "volume handed over");
            }
        }
    }

    /// The newer keeper's side: takes every volume from the keeper answering at `socket`.
    /// Returns how many volumes it took.
    fn take_over(self: &Arc<Self>, socket: &Path) -> usize {
        let mut taken = 0;
        for _ in 0..HANDOVER_ROUNDS {
            let Ok(stream) = UnixStream::connect(socket) else { return taken };
            let mut conn = Conn::new(stream);
            let hello = Request::HandOver { keeper_id: self.config.keeper_id.clone() };
            if conn.send(&hello, None).is_err() {
                return taken;
            }
            let mut pending: Option<(Arc<Volume>, TakeoverStep)> = None;
            let finished = loop {
                match conn.recv::<Response>() {
                    Ok(Some(Response::Offer { spec, restarts, takeovers })) => {
                        let Some(fd) = conn.take_fd() else {
                            tracing::warn!(volume = spec.volume_id, "offer without a descriptor; ignoring it");
                            break false;
                        };
                        let volume = spec.volume.clone();
                        pending = Some((Volume::new(spec, fd, restarts, takeovers), TakeoverStep::Received));
                        if let Err(e) = conn.send(&Request::Accept { volume }, None) {
                            tracing::warn!(error = %e, "cannot accept an offered volume");
                            break false;
                        }
                    }
                    Ok(Some(Response::Exited { volume, status, counts })) => {
                        let Some((vol, _)) = pending.take().filter(|(v, _)| v.spec.volume == volume) else {
                            tracing::warn!(volume, "exit report for a volume not offered");
                            break false;
                        };
                        if let Some(c) = counts {
                            let mut st = vol.lock();
                            (st.restarts, st.takeovers) = (c.restarts, c.takeovers);
                        }
                        tracing::info!(volume = vol.name(), status, "old mount process handed over; starting ours");
                        match self.spawn(&vol, true) {
                            Ok(child) => {
                                if let Err(e) = conn.send(&Request::Confirm { volume }, None) {
                                    tracing::warn!(volume = vol.name(), error = %e, "cannot confirm the hand-over");
                                    let _ = kill_and_reap(child, vol.name());
                                    pending = Some((vol, TakeoverStep::OldExited));
                                    break false;
                                }
                                vol.lock().takeovers += 1;
                                self.adopt(vol, Some(child));
                                taken += 1;
                            }
                            Err(e) => {
                                tracing::warn!(volume = vol.name(), error = %e, "cannot start the successor; the old keeper keeps the volume");
                                let _ = conn.send(&Request::Decline { volume, error: e.to_string() }, None);
                                break false;
                            }
                        }
                    }
                    Ok(Some(Response::Done)) => break true,
                    Ok(other) => {
                        tracing::warn!(answer = ?other, "unexpected hand-over message");
                        break false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "hand-over connection lost");
                        break false;
                    }
                }
            };
            drop(conn);
            if let Some((vol, step)) = pending {
                let old_answers = UnixStream::connect(socket).is_ok();
                match policy::new_owner_after_drop(step, old_answers) {
                    OwnerAction::Forget => tracing::info!(volume = vol.name(), "the old keeper keeps the volume"),
                    OwnerAction::StartSuccessor => {
                        tracing::warn!(volume = vol.name(), "the old keeper is gone; recovering the volume");
                        vol.lock().takeovers += 1;
                        self.adopt(vol, None);
                        taken += 1;
                    }
                    OwnerAction::KeepServing => {}
                }
            }
            if finished {
                return taken;
            }
        }
        tracing::warn!(
            "the old keeper still holds volumes after {HANDOVER_ROUNDS} hand-over attempts; it keeps serving them"
        );
        taken
    }
}

fn remove_recovery_dir(vol: &Volume) {
    match std::fs::remove_dir_all(&vol.spec.recovery_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(volume = vol.name(), path = %vol.spec.recovery_dir.display(), error = %e, "cannot remove the recovery directory");
        }
        _ => {}
    }
}

fn error_response(volume: &str, e: &KeeperError) -> Response {
    tracing::warn!(volume, error = %e, "keeper request failed");
    Response::Error { kind: e.kind(), message: e.to_string() }
}

/// A running keeper.
pub struct Keeper {
    shared: Arc<Shared>,
}

impl Keeper {
    /// Takes the volumes over from a keeper answering at the socket path (if any), then binds the
    /// socket (replacing the file) and serves it on a thread of its own. A keeper whose identity
    /// is recorded as handed over stays idle instead: it takes nothing and binds nothing.
    /// Blocking.
    pub fn start(config: KeeperConfig, table: Arc<dyn MountTable>) -> Result<Keeper, KeeperError> {
        let supervisor = MountSupervisor::new(config.exe.clone()).with_ready_timeout(config.ready_timeout);
        let shared = Arc::new(Shared {
            config,
            supervisor,
            table,
            volumes: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            busy_changed: Condvar::new(),
            handing_over: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        });
        let keeper = Keeper { shared };
        let config = &keeper.shared.config;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| KeeperError::StateDir { path: config.state_dir.clone(), source })?;
        if let Some(id) = &config.keeper_id
            && super::handed_over(&config.state_dir, id)
        {
            tracing::warn!(keeper_id = id, "this keeper already handed its volumes over; staying idle");
            keeper.shared.handing_over.store(true, Ordering::SeqCst);
            return Ok(keeper);
        }
        let taken = keeper.shared.take_over(&config.socket);
        if taken > 0 {
            tracing::info!(volumes = taken, "took volumes over from the previous keeper");
        }
        let listener = bind(&config.socket)?;
        let shared = Arc::clone(&keeper.shared);
        std::thread::Builder::new()
            .name("s3csi-keeper".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            let shared = Arc::clone(&shared);
                            let spawned = std::thread::Builder::new()
                                .name("s3csi-keeper-req".into())
                                .spawn(move || shared.handle(stream));
                            if let Err(e) = spawned {
                                tracing::warn!(error = %e, "cannot start a thread for a keeper request");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot accept a keeper connection"),
                    }
                }
            })
            .map_err(|source| KeeperError::Bind { socket: config.socket.clone(), source })?;
        tracing::info!(socket = %config.socket.display(), "keeper serving");
        Ok(keeper)
    }

    /// Every owned volume.
    pub fn list(&self) -> Vec<VolumeInfo> {
        self.shared.list()
    }

    /// Whether this keeper serves the socket (it is not idle after handing over).
    pub fn serving(&self) -> bool {
        !self.shared.handing_over.load(Ordering::SeqCst)
    }

    /// After SIGTERM: refuse new starts; returns whether the keeper owns no volume (and may
    /// exit). Owned volumes keep being served: exiting would end their mount processes with the
    /// container.
    pub fn drain(&self) -> bool {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.volumes().is_empty()
    }
}

/// Binds `socket` with mode 0600: on a temporary name first, then renamed over the path, so a
/// keeper answering there until now is replaced without a moment with no socket.
fn bind(socket: &Path) -> Result<UnixListener, KeeperError> {
    let err = |source| KeeperError::Bind { socket: socket.to_owned(), source };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = socket.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    std::fs::rename(&tmp, socket).map_err(err)?;
    Ok(listener)
}
