//! Prometheus metrics of a real mount: scrape `--metrics-address` after some reads and writes
//! and check that the S3, byte, cache and FUSE counters moved.

mod common;

use common::{Mount, S3Server, free_port, metric_sum, scrape_metrics};

#[test]
fn mount_metrics_count_s3_requests_bytes_cache_and_fuse_operations() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("metrics");
    let data = common::random_bytes(7, 3 << 20);
    server.put(&bucket, "data.bin", &data);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mount = Mount::new(&server, &bucket, &["--metrics-address", &addr]);
    let before = scrape_metrics(port);
    assert!(before.contains("# TYPE s3csi_s3_requests counter"), "{before}");
    assert_eq!(metric_sum(&before, "s3csi_s3_read_bytes_total", &[]), 0.0);

    assert_eq!(std::fs::read(mount.join("data.bin")).unwrap(), data);
    std::fs::write(mount.join("new.txt"), b"written through the mount").unwrap();
    let after = scrape_metrics(port);
    let volume = format!("volume=\"{bucket}\"");
    let get_ok = metric_sum(&after, "s3csi_s3_requests_total", &["operation=\"GetObject\"", "outcome=\"ok\"", &volume]);
    assert!(get_ok >= 1.0, "GetObject counted: {after}");
    assert!(metric_sum(&after, "s3csi_s3_requests_total", &["operation=\"PutObject\"", "outcome=\"ok\""]) >= 1.0);
    assert!(metric_sum(&after, "s3csi_s3_request_duration_seconds_count", &["operation=\"GetObject\""]) >= 1.0);
    assert!(metric_sum(&after, "s3csi_s3_read_bytes_total", &[]) >= data.len() as f64, "{after}");
    assert!(metric_sum(&after, "s3csi_s3_written_bytes_total", &[]) >= 25.0);
    assert!(metric_sum(&after, "s3csi_cache_misses_total", &[]) >= 1.0);
    assert!(metric_sum(&after, "s3csi_cache_used_bytes", &["tier=\"memory\""]) > 0.0);
    assert!(metric_sum(&after, "s3csi_fuse_operations_total", &["operation=\"read\""]) >= 1.0);
    assert!(metric_sum(&after, "s3csi_fuse_operations_total", &["operation=\"write\""]) >= 1.0);
    assert_eq!(metric_sum(&after, "s3csi_uploads_in_flight", &[]), 0.0);

    // A second read of the same data is served from the cache.
    let hits_before = metric_sum(&after, "s3csi_cache_hits_total", &["tier=\"memory\""]);
    // Drop the kernel's page cache for the file so the reads reach the filesystem again.
    std::fs::write("/proc/sys/vm/drop_caches", b"1").ok();
    assert_eq!(std::fs::read(mount.join("data.bin")).unwrap(), data);
    let again = scrape_metrics(port);
    assert!(metric_sum(&again, "s3csi_cache_hits_total", &["tier=\"memory\""]) > hits_before, "{again}");
    // Errors are counted by operation.
    assert!(std::fs::metadata(mount.join("missing")).is_err());
    let last = scrape_metrics(port);
    assert!(metric_sum(&last, "s3csi_fuse_errors_total", &["operation=\"lookup\""]) >= 1.0, "{last}");
    mount.unmount();
}

#[test]
fn a_bad_metrics_address_is_a_clear_error() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("metrics-bad");
    let out = Mount::try_new(&server, &bucket, &["--metrics-address", "not-an-address"]).unwrap_err();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid metrics address"), "{err}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let log = dir.path().join("log");
    let mut child = std::process::Command::new(common::S3CSI_BIN)
        .args(["csi", "--log-format", "json", "--node-id", "n1", "--mode", "controller"])
        .arg(format!("--csi-endpoint=unix://{}", socket.display()))
        .arg(format!("--state-dir={}", dir.path().join("state").display()))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logged = common::wait_until(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("serving CSI"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(logged, "{}", std::fs::read_to_string(&log).unwrap_or_default());
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
}
