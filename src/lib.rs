//! s3csi: a FUSE filesystem over S3 with a block cache, and (soon) a Kubernetes CSI driver.
//!
//! Modules: [`config`] (validated settings), [`s3`] (the object store trait and its AWS
//! implementation), [`cache`] (the two-tier block cache), [`fs`] (the filesystem core and its
//! FUSE adapter) and [`daemon`] (running a mount: checks, detaching, readiness, signals).

pub mod cache;
pub mod config;
pub mod daemon;
pub mod fs;
pub mod s3;
