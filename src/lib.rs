//! s3csi: a FUSE filesystem over S3 with a block cache, and a Kubernetes CSI driver.
//!
//! Modules: [`config`] (validated settings), [`s3`] (the object store trait, its AWS
//! implementation and bucket administration), [`cache`] (the two-tier block cache), [`fs`] (the
//! filesystem core and its FUSE adapter), [`daemon`] (running a mount: checks, detaching,
//! readiness, signals), [`metrics`] (Prometheus metrics), [`mount`] (bind mounts and the per-volume mount processes),
//! [`keeper`] (the process holding every volume's FUSE connection) and [`csi`] (the CSI gRPC services).

pub mod cache;
pub mod config;
pub mod csi;
pub mod daemon;
pub mod fs;
pub mod keeper;
pub mod metrics;
pub mod mount;
pub mod s3;
