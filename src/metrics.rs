//! Prometheus metrics for `s3csi mount` and `s3csi csi`, served as OpenMetrics text on
//! `--metrics-address` at `/metrics`.
//!
//! One process-wide set of metrics ([`metrics()`]); a mount labels everything with its volume
//! (`bucket` or `bucket/prefix`) through [`init`]. Counters that already exist elsewhere as
//! atomics (the block cache's) are copied in at scrape time by registered refreshers, so the hot
//! paths pay nothing extra for them.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Metric names (without the `s3csi_` prefix the registry adds).
pub const S3_REQUESTS: &str = "s3_requests";
pub const S3_REQUEST_SECONDS: &str = "s3_request_duration_seconds";
pub const S3_BYTES_READ: &str = "s3_read_bytes";
pub const S3_BYTES_WRITTEN: &str = "s3_written_bytes";
pub const UPLOADS_IN_FLIGHT: &str = "uploads_in_flight";
pub const CACHE_HITS: &str = "cache_hits";
pub const CACHE_MISSES: &str = "cache_misses";
pub const CACHE_EVICTIONS: &str = "cache_evictions";
pub const CACHE_BYTES: &str = "cache_used_bytes";
pub const FUSE_OPS: &str = "fuse_operations";
pub const FUSE_ERRORS: &str = "fuse_errors";
pub const FUSE_OP_SECONDS: &str = "fuse_operation_duration_seconds";
pub const CSI_RPCS: &str = "csi_rpcs";
pub const CSI_RPC_SECONDS: &str = "csi_rpc_duration_seconds";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct S3Labels {
    pub operation: &'static str,
    /// `ok`, or the error class (`not_found`, `access_denied`, `unreachable`, `error`, ...).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `memory` or `disk`.
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    /// The gRPC status code name (`OK`, `NotFound`, ...).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    /// The CSI volume id.
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

type Refresher = Box<dyn Fn(&Metrics) + Send + Sync>;

/// Every metric s3csi exports.
pub struct Metrics {
    registry: Registry,
    refreshers: Mutex<Vec<Refresher>>,
    pub s3_requests: Family<S3Labels, Counter>,
    pub s3_seconds: Family<OperationLabels, Histogram>,
    pub s3_bytes_read: Counter,
    pub s3_bytes_written: Counter,
    pub uploads_in_flight: Gauge,
    pub cache_hits: Family<TierLabels, Counter>,
    pub cache_misses: Counter,
    pub cache_evictions: Family<TierLabels, Counter>,
    pub cache_bytes: Family<TierLabels, Gauge>,
    pub fuse_ops: Family<OperationLabels, Counter>,
    pub fuse_errors: Family<OperationLabels, Counter>,
    pub fuse_seconds: Family<OperationLabels, Histogram>,
    pub csi_rpcs: Family<RpcLabels, Counter>,
    pub csi_seconds: Family<MethodLabels, Histogram>,
    pub mount_restarts: Family<VolumeLabels, Counter>,
    pub mount_takeovers: Family<VolumeLabels, Counter>,
}

/// Latency buckets from 0.5 ms to about 33 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    fn new(volume: Option<String>) -> Self {
        let labels: Vec<(Cow<'static, str>, Cow<'static, str>)> =
            volume.map(|v| vec![(Cow::Borrowed("volume"), Cow::Owned(v))]).unwrap_or_default();
        let mut registry = Registry::with_prefix_and_labels("s3csi", labels.into_iter());
        let m = Metrics {
            registry: Registry::default(),
            refreshers: Mutex::new(Vec::new()),
            s3_requests: Family::default(),
            s3_seconds: Family::new_with_constructor(latency_histogram),
            s3_bytes_read: Counter::default(),
            s3_bytes_written: Counter::default(),
            uploads_in_flight: Gauge::default(),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            cache_evictions: Family::default(),
            cache_bytes: Family::default(),
            fuse_ops: Family::default(),
            fuse_errors: Family::default(),
            fuse_seconds: Family::new_with_constructor(latency_histogram),
            csi_rpcs: Family::default(),
            csi_seconds: Family::new_with_constructor(latency_histogram),
            mount_restarts: Family::default(),
            mount_takeovers: Family::default(),
        };
        registry.register(S3_REQUESTS, "S3 requests by operation and outcome", m.s3_requests.clone());
        registry.register(S3_REQUEST_SECONDS, "S3 request latency by operation", m.s3_seconds.clone());
        registry.register(S3_BYTES_READ, "Bytes received in S3 GET bodies", m.s3_bytes_read.clone());
        registry.register(S3_BYTES_WRITTEN, "Bytes sent in S3 PUT and UploadPart bodies", m.s3_bytes_written.clone());
        registry.register(UPLOADS_IN_FLIGHT, "PUT and UploadPart requests in flight", m.uploads_in_flight.clone());
        registry.register(CACHE_HITS, "Block cache hits by tier", m.cache_hits.clone());
        registry.register(CACHE_MISSES, "Block cache misses (blocks fetched from S3)", m.cache_misses.clone());
        registry.register(CACHE_EVICTIONS, "Blocks evicted from each cache tier", m.cache_evictions.clone());
        registry.register(CACHE_BYTES, "Bytes held by each cache tier", m.cache_bytes.clone());
        registry.register(FUSE_OPS, "FUSE operations by type", m.fuse_ops.clone());
        registry.register(FUSE_ERRORS, "FUSE operations answered with an error, by type", m.fuse_errors.clone());
        registry.register(FUSE_OP_SECONDS, "FUSE operation latency by type", m.fuse_seconds.clone());
        registry.register(CSI_RPCS, "CSI RPCs by method and gRPC status code", m.csi_rpcs.clone());
        registry.register(CSI_RPC_SECONDS, "CSI RPC latency by method", m.csi_seconds.clone());
        registry.register(
            crate::keeper::MOUNT_RESTARTS,
            "Mount processes started again by the keeper after one ended without being asked, by volume",
            m.mount_restarts.clone(),
        );
        registry.register(
            crate::keeper::MOUNT_TAKEOVERS,
            "Volumes taken over from an earlier keeper (upgrades), by volume",
            m.mount_takeovers.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Adds a function that copies outside state into metrics before each scrape.
    pub fn add_refresher(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.refreshers.lock().expect("refreshers are not poisoned").push(Box::new(f));
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        for f in self.refreshers.lock().expect("refreshers are not poisoned").iter() {
            f(self);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Records one S3 request.
    pub fn s3_request(&self, operation: &'static str, outcome: &'static str, start: Instant) {
        self.s3_requests.get_or_create(&S3Labels { operation, outcome }).inc();
        self.s3_seconds.get_or_create(&OperationLabels { operation }).observe(start.elapsed().as_secs_f64());
    }

    /// Records one FUSE operation.
    pub fn fuse_op(&self, operation: &'static str, start: Instant) {
        self.fuse_ops.get_or_create(&OperationLabels { operation }).inc();
        self.fuse_seconds.get_or_create(&OperationLabels { operation }).observe(start.elapsed().as_secs_f64());
    }

    /// Sets the keeper's per-volume counters from its volume list (counts travel with a volume
    /// from keeper to keeper, so they are copied rather than incremented here).
    pub fn export_mounts(&self, volumes: &[crate::keeper::protocol::VolumeInfo]) {
        self.mount_restarts.clear();
        self.mount_takeovers.clear();
        for v in volumes {
            let labels = VolumeLabels { volume: v.volume_id.clone() };
            self.mount_restarts.get_or_create(&labels).inc_by(v.restarts);
            self.mount_takeovers.get_or_create(&labels).inc_by(v.takeovers);
        }
    }

    /// Records one CSI RPC.
    pub fn csi_rpc(&self, method: &'static str, code: tonic::Code, start: Instant) {
        let code = format!("{code:?}");
        self.csi_rpcs.get_or_create(&RpcLabels { method, code }).inc();
        self.csi_seconds.get_or_create(&MethodLabels { method }).observe(start.elapsed().as_secs_f64());
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Sets the volume label; only the first call (before any metric is touched) has an effect.
pub fn init(volume: Option<String>) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(volume))
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    init(None)
}

/// Where a process serves its metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// HTTP `GET /metrics` on a TCP address, for Prometheus.
    Http(SocketAddr),
    /// A Unix socket that writes the metrics text to each connection and closes it: how the
    /// mounts started by `s3csi csi` hand their metrics to the CSI server, which serves them all.
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(MetricsAddress::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(MetricsAddress::Http)
            .map_err(|_| format!("invalid metrics address {s:?}: expected host:port (e.g. 0.0.0.0:9100) or unix:/path"))
    }
}

/// File names (in a directory) of mount metrics sockets the CSI server collects.
pub const MOUNT_SOCKET_SUFFIX: &str = ".metrics.sock";

/// Serves the metrics at `addr` until the runtime stops; binds before returning, so a bad
/// address is an immediate, clear error. With `collect_dir`, the HTTP endpoint also includes
/// the metrics of every mount socket (`*.metrics.sock`) in that directory.
pub async fn serve(addr: &MetricsAddress, collect_dir: Option<PathBuf>) -> std::io::Result<()> {
    match addr {
        MetricsAddress::Http(addr) => {
            use axum::http::header::CONTENT_TYPE;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let dir = collect_dir.clone();
                    async move {
                        let mut texts = vec![metrics().encode()];
                        if let Some(dir) = dir {
                            texts.extend(collect_mounts(&dir).await);
                        }
                        ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], merge(&texts))
                    }
                }),
            );
            tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            });
        }
        MetricsAddress::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Ok((mut conn, _)) = listener.accept().await {
                    let text = metrics().encode();
                    tokio::spawn(async move {
                        let _ = conn.write_all(text.as_bytes()).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
        }
    }
    Ok(())
}

/// Reads the metrics of every mount socket in `dir`; dead sockets are skipped.
async fn collect_mounts(dir: &Path) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if !path.to_string_lossy().ends_with(MOUNT_SOCKET_SUFFIX) {
            continue;
        }
        let read = async {
            let mut conn = tokio::net::UnixStream::connect(&path).await?;
            let mut text = String::new();
            conn.read_to_string(&mut text).await?;
            std::io::Result::Ok(text)
        };
        match tokio::time::timeout(Duration::from_secs(2), read).await {
            Ok(Ok(text)) => out.push(text),
            _ => tracing::debug!(socket = %path.display(), "mount metrics socket did not answer"),
        }
    }
    out
}

/// Merges OpenMetrics texts of several processes into one: each metric family once (its
/// HELP/TYPE from the first text that has it), with the samples of all texts, then `# EOF`.
pub fn merge(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> = Default::default();
    for text in texts {
        let mut current = String::new();
        for line in text.lines() {
            if line == "# EOF" || line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kind = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default().to_owned();
                current = name.clone();
                if !families.contains_key(&name) {
                    order.push(name.clone());
                }
                let (meta, _) = families.entry(name.clone()).or_default();
                let prefix = format!("# {kind} {name} ");
                if !meta.iter().any(|m| m.starts_with(&prefix) || m == line) {
                    meta.push(line.to_owned());
                }
            } else {
                families.entry(current.clone()).or_default().1.push(line.to_owned());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        let (meta, samples) = &families[&name];
        for l in meta.iter().chain(samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labels_and_refreshed_values() {
        let m = Metrics::new(Some("bkt/p".into()));
        m.s3_request("GetObject", "ok", Instant::now());
        m.fuse_op("read", Instant::now());
        m.csi_rpc("NodeStageVolume", tonic::Code::NotFound, Instant::now());
        m.add_refresher(|m| {
            m.cache_bytes.get_or_create(&TierLabels { tier: "memory" }).set(42);
        });
        let text = m.encode();
        assert!(
            text.contains(r#"s3csi_s3_requests_total{volume="bkt/p",operation="GetObject",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"s3csi_cache_used_bytes{volume="bkt/p",tier="memory"} 42"#), "{text}");
        assert!(text.contains(r#"method="NodeStageVolume",code="NotFound""#), "{text}");
        assert!(text.contains("s3csi_fuse_operation_duration_seconds_bucket"), "{text}");
    }

    #[test]
    fn merging_keeps_each_family_once_with_all_samples() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{volume=\"a\"} 1\n# EOF\n".to_owned();
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{volume=\"b\"} 2\n# HELP y Y.\n# TYPE y gauge\ny 3\n# EOF\n"
            .to_owned();
        let merged = merge(&[a, b]);
        assert_eq!(merged.matches("# TYPE x_total counter").count(), 1, "{merged}");
        assert!(merged.contains("x_total{volume=\"a\"} 1\nx_total{volume=\"b\"} 2\n# HELP y Y."), "{merged}");
        assert!(merged.ends_with("y 3\n# EOF\n"), "{merged}");
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:9100".parse::<MetricsAddress>(),
            Ok(MetricsAddress::Http("127.0.0.1:9100".parse().unwrap()))
        );
        assert_eq!("unix:/run/m.sock".parse::<MetricsAddress>(), Ok(MetricsAddress::Unix("/run/m.sock".into())));
        assert!("localhost".parse::<MetricsAddress>().is_err());
    }
}
