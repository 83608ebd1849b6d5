//! `s3csi csi`: the CSI Identity, Controller and Node services over gRPC on a Unix socket.
//!
//! The generated protocol types stay in [`proto`]. Handlers validate a request (required
//! fields first, then lookups), convert it to our types and return a [`CsiError`], which maps to
//! exactly one gRPC status code. Every RPC is logged once, with its method, volume and outcome;
//! secrets are never logged (see [`Secrets`]).

pub mod controller;
pub mod identity;
pub mod node;
pub mod state;
pub mod volume;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Response, Status};

use crate::config::{S3Config, StaticCredentials};
use crate::s3::S3Error;

/// The CSI v1 protocol, generated from `proto/csi.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// Which services this instance serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceMode {
    All,
    Controller,
    Node,
}

impl ServiceMode {
    pub fn controller(self) -> bool {
        matches!(self, ServiceMode::All | ServiceMode::Controller)
    }

    pub fn node(self) -> bool {
        matches!(self, ServiceMode::All | ServiceMode::Node)
    }
}

/// Everything `s3csi csi` needs.
#[derive(Debug, Clone)]
pub struct CsiConfig {
    /// Path of the Unix socket to listen on.
    pub socket: PathBuf,
    pub node_id: String,
    pub mode: ServiceMode,
    pub driver_name: String,
    /// Default S3 endpoint, region and addressing; Secrets may override per volume.
    pub s3: S3Config,
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics (the CSI server's and every mount's on this node).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The `s3csi` binary the node runs for each mount.
    pub mount_exe: PathBuf,
    /// The keeper's socket (`s3csi keeper`), which runs the mount processes.
    pub keeper_socket: PathBuf,
    /// Whether the node starts a keeper itself when none answers (off in Kubernetes, where the
    /// keeper is a container of its own).
    pub spawn_keeper: bool,
}

/// A handler's failure; each variant is one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// An S3 failure during `what` (which names the operation and bucket): transient ones are
    /// `Unavailable` (retry later), everything else `Internal`.
    pub fn s3(what: &str, e: &S3Error) -> Self {
        let msg = format!("{what}: {e}");
        if e.is_transient() { CsiError::Unavailable(msg) } else { CsiError::Internal(msg) }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        match e {
            CsiError::InvalidArgument(m) => Status::invalid_argument(m),
            CsiError::NotFound(m) => Status::not_found(m),
            CsiError::AlreadyExists(m) => Status::already_exists(m),
            CsiError::FailedPrecondition(m) => Status::failed_precondition(m),
            CsiError::OutOfRange(m) => Status::out_of_range(m),
            CsiError::Aborted(m) => Status::aborted(m),
            CsiError::Unimplemented(m) => Status::unimplemented(m),
            CsiError::Unavailable(m) => Status::unavailable(m),
            CsiError::Internal(m) => Status::internal(m),
        }
    }
}

/// Runs one RPC handler and logs its outcome once: method, volume, duration, and the status code
/// and message on failure.
pub(crate) async fn rpc<T>(
    method: &'static str,
    volume: &str,
    fut: impl std::future::Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = fut.await;
    let ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(v) => {
            crate::metrics::metrics().csi_rpc(method, tonic::Code::Ok, start);
            tracing::info!(rpc = method, volume, ms, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let status = Status::from(e);
            crate::metrics::metrics().csi_rpc(method, status.code(), start);
            tracing::warn!(rpc = method, volume, ms, code = ?status.code(), error = status.message(), "failed");
            Err(status)
        }
    }
}

/// Secret keys, as k8s-csi-s3 names them (so existing Secrets keep working).
pub const SECRET_ACCESS_KEY_ID: &str = "accessKeyID";
pub const SECRET_SECRET_ACCESS_KEY: &str = "secretAccessKey";
pub const SECRET_SESSION_TOKEN: &str = "sessionToken";
pub const SECRET_ENDPOINT: &str = "endpoint";
pub const SECRET_REGION: &str = "region";
/// PEM certificates to trust for the endpoint (a private CA, e.g. an in-cluster MinIO).
pub const SECRET_CA_BUNDLE: &str = "caBundle";

/// A request's secrets. `Debug` prints the key names only.
#[derive(Clone, Default)]
pub struct Secrets(HashMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&String> = self.0.keys().collect();
        keys.sort();
        write!(f, "Secrets({keys:?}: <redacted>)")
    }
}

/// Per-volume S3 settings from a Secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<StaticCredentials>,
    pub ca_pem: Option<String>,
}

impl Secrets {
    pub fn new(map: HashMap<String, String>) -> Self {
        Secrets(map)
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// The S3 overrides in these secrets; an access key without its secret is an error.
    pub fn volume_s3(&self) -> Result<VolumeS3, CsiError> {
        let credentials = match (self.get(SECRET_ACCESS_KEY_ID), self.get(SECRET_SECRET_ACCESS_KEY)) {
            (Some(access_key_id), Some(secret_access_key)) => Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: self.get(SECRET_SESSION_TOKEN),
            }),
            (None, None) => None,
            _ => {
                return Err(CsiError::InvalidArgument(format!(
                    "the volume's Secret must set both {SECRET_ACCESS_KEY_ID} and {SECRET_SECRET_ACCESS_KEY}, or neither"
                )));
            }
        };
        let ca_pem = self.get(SECRET_CA_BUNDLE);
        if let Some(pem) = &ca_pem
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(CsiError::InvalidArgument(format!(
                "Secret key {SECRET_CA_BUNDLE} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
            )));
        }
        Ok(VolumeS3 { endpoint: self.get(SECRET_ENDPOINT), region: self.get(SECRET_REGION), credentials, ca_pem })
    }
}

impl VolumeS3 {
    /// The S3 settings for this volume: the driver's defaults with these overrides.
    pub fn apply(&self, base: &S3Config) -> S3Config {
        let mut cfg = base.clone();
        if let Some(e) = &self.endpoint {
            cfg.endpoint_url = Some(e.clone());
        }
        if let Some(r) = &self.region {
            cfg.region = Some(r.clone());
        }
        if self.credentials.is_some() {
            cfg.credentials = self.credentials.clone();
        }
        cfg
    }
}

/// Per-key async locks, so two RPCs for one volume never interleave while different volumes
/// proceed in parallel.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyLocks {
    pub(crate) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.locks.lock().expect("lock map is not poisoned");
            // Drop locks nobody holds, so the map does not grow without bound.
            map.retain(|_, m| Arc::strong_count(m) > 1);
            map.entry(key.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }
}

/// Parses `unix:///path/csi.sock` (or a bare path) into the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = match endpoint.strip_prefix("unix://") {
        Some(rest) => rest,
        None if endpoint.contains("://") => {
            return Err(format!("unsupported --csi-endpoint {endpoint:?}: only unix:// sockets are served"));
        }
        None => endpoint,
    };
    if !path.starts_with('/') {
        return Err(format!("--csi-endpoint {endpoint:?} must be an absolute path, e.g. unix:///csi/csi.sock"));
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket (replacing a stale one left by a previous instance) and serves until
/// `shutdown` resolves.
pub async fn serve(config: CsiConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    use anyhow::Context;
    let socket = &config.socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listener = if remove_stale_socket(socket)? {
        // A rolling update starts the new node pod beside the old one: take the path over (bind
        // under another name, rename over it), so kubelet reaches this server from now on.
        tracing::info!(socket = %socket.display(), "another CSI server answers on the socket; replacing it");
        let mut tmp = socket.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).with_context(|| format!("cannot listen on {}", tmp.display()))?;
        std::fs::rename(&tmp, socket).with_context(|| format!("cannot replace {}", socket.display()))?;
        listener
    } else {
        UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))?
    };
    let bound_ino = std::fs::symlink_metadata(socket).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let identity = identity::IdentityService::new(&config);
    let mut router =
        tonic::transport::Server::builder().add_service(proto::identity_server::IdentityServer::new(identity));
    if config.mode.controller() {
        let c = controller::ControllerService::new(&config);
        router = router.add_service(proto::controller_server::ControllerServer::new(c));
    }
    if config.mode.node() {
        let n = node::NodeService::new(&config).context("cannot start the node service")?;
        router = router.add_service(proto::node_server::NodeServer::new(n));
    }
    if let Some(addr) = config.metrics_address {
        let collect = config.mode.node().then(|| config.state_dir.join("volumes"));
        crate::metrics::serve(&crate::metrics::MetricsAddress::Http(addr), collect)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tracing::info!(
        socket = %socket.display(),
        driver = %config.driver_name,
        node = %config.node_id,
        mode = ?config.mode,
        version = env!("CARGO_PKG_VERSION"),
        "serving CSI"
    );
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("the gRPC server failed")?;
    // Only our own socket: a newer server may have replaced the file.
    if std::fs::symlink_metadata(socket).is_ok_and(|m| Some(std::os::unix::fs::MetadataExt::ino(&m)) == bound_ino) {
        let _ = std::fs::remove_file(socket);
    }
    tracing::info!("CSI server stopped");
    Ok(())
}

/// Removes a socket nobody answers on; returns whether a running server answers there.
fn remove_stale_socket(path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(true);
            }
            std::fs::remove_file(path)?;
            Ok(false)
        }
        Ok(_) => {
            anyhow::bail!("{} exists and is not a socket; remove it or choose another --csi-endpoint", path.display())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(socket_path("unix:///csi/csi.sock").unwrap(), PathBuf::from("/csi/csi.sock"));
        assert_eq!(socket_path("/tmp/x.sock").unwrap(), PathBuf::from("/tmp/x.sock"));
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[test]
    fn secrets_never_print_values() {
        let s = Secrets::new(HashMap::from([
            (SECRET_ACCESS_KEY_ID.to_owned(), "AKIA".to_owned()),
            (SECRET_SECRET_ACCESS_KEY.to_owned(), "hunter2".to_owned()),
        ]));
        let printed = format!("{s:?} {:?}", s.volume_s3().unwrap());
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn half_a_key_pair_is_rejected() {
        let s = Secrets::new(HashMap::from([(SECRET_ACCESS_KEY_ID.to_owned(), "AKIA".to_owned())]));
        assert!(matches!(s.volume_s3(), Err(CsiError::InvalidArgument(_))));
    }
}
