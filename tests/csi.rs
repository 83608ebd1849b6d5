//! The CSI driver end to end: `s3csi csi` serving real gRPC on a Unix socket, a real S3 server on
//! 127.0.0.1, real FUSE mounts at the staging path and real bind mounts at the targets.
//!
//! Each test starts its own S3 server and driver (state directory and socket in a tempdir) and
//! walks create → stage → publish → I/O → unpublish → unstage → delete, or one of the failure
//! paths, checking gRPC codes, files in the mount and objects in S3.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::driver::{
    Creds, DRIVER, Driver, bucket_exists, code_of, mount_cap, mount_volume, no_secrets, secrets_for, unmount_volume,
};
use common::{Backend, S3Server, is_mounted, processes_with_arg, wait_until};
use s3csi::csi::proto::{
    CapacityRange, ControllerExpandVolumeRequest, CreateVolumeRequest, GetCapacityRequest, GetPluginInfoRequest,
    ListVolumesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest, ValidateVolumeCapabilitiesRequest, Volume,
    VolumeCapability, identity_client::IdentityClient, volume_capability,
};
use s3csi::csi::volume::{MountOptions, generated_name};
use tonic::Code;

#[test]
fn bucket_per_volume_lifecycle_with_purge_of_versions_and_uploads() {
    // Versioning and pending-upload listing need the faithful server.
    let server = S3Server::start_faithful();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-purge-1", &[], &no_secrets()).unwrap();
    let bucket = vol.volume_id.clone();
    assert!(bucket_exists(&server, &bucket), "CreateVolume made bucket {bucket}");
    assert!(vol.capacity_bytes >= 1 << 30);
    if server.backend() != Backend::Fast {
        server.block_on(async {
            use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
            server
                .client()
                .put_bucket_versioning()
                .bucket(&bucket)
                .versioning_configuration(
                    VersioningConfiguration::builder().status(BucketVersioningStatus::Enabled).build(),
                )
                .send()
                .await
                .unwrap();
        });
    }
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "a");
    std::fs::create_dir(target.join("dir")).unwrap();
    std::fs::write(target.join("dir/hello.txt"), b"hello from a pod").unwrap();
    std::fs::write(target.join("v.txt"), b"one").unwrap();
    std::fs::write(target.join("v.txt"), b"two").unwrap();
    std::fs::write(target.join("gone.txt"), b"x").unwrap();
    std::fs::remove_file(target.join("gone.txt")).unwrap();
    assert_eq!(std::fs::read(target.join("dir/hello.txt")).unwrap(), b"hello from a pod");
    assert_eq!(server.get(&bucket, "dir/hello.txt"), b"hello from a pod");
    let names: Vec<_> = std::fs::read_dir(&target).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!names.iter().any(|n| n == ".s3csi-volume"), "the marker is hidden: {names:?}");
    // A pending multipart upload with one part.
    server.block_on(async {
        let up = server.client().create_multipart_upload().bucket(&bucket).key("big.bin").send().await.unwrap();
        server
            .client()
            .upload_part()
            .bucket(&bucket)
            .key("big.bin")
            .upload_id(up.upload_id().unwrap())
            .part_number(1)
            .body(vec![7u8; 1 << 20].into())
            .send()
            .await
            .unwrap();
    });
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&bucket, &no_secrets()).unwrap_or_else(|e| panic!("delete: {e:?}\n{}", d.log()));
    assert!(!bucket_exists(&server, &bucket), "purge removed the bucket with its versions and uploads");
    d.delete(&bucket, &no_secrets()).unwrap();
    let log = d.log();
    let deleted = log.lines().find(|l| l.contains("volume deleted")).unwrap_or_else(|| panic!("{log}"));
    if server.backend() != Backend::Fast {
        // moto lists versions and uploads: every version, the delete marker and the upload went.
        assert!(deleted.contains("versions_listed=true") && deleted.contains("uploads=1"), "{deleted}");
        let objects: u64 = deleted.split("objects=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(objects >= 6, "dir marker, hello, 2 versions of v.txt, gone.txt + delete marker, marker: {deleted}");
    }
}

#[test]
fn prefix_per_volume_in_a_shared_bucket() {
    let server = S3Server::start();
    let shared = server.unique_bucket("shared");
    server.put(&shared, "other-team/data.txt", b"not ours");
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-prefix-1", &[("bucket", &shared), ("uid", "1000")], &no_secrets()).unwrap();
    assert!(vol.volume_id.starts_with(&format!("{shared}/pvc-prefix-1-")), "{}", vol.volume_id);
    assert_eq!(vol.volume_context.get("uid").map(String::as_str), Some("1000"));
    let prefix = format!("{}/", vol.volume_id.split_once('/').unwrap().1);
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "p");
    std::fs::write(target.join("f.txt"), b"in my prefix").unwrap();
    let uid = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!(uid(&target), 1000, "the volume root takes the StorageClass uid");
    assert_eq!(uid(&target.join("f.txt")), 0, "a new file belongs to its creator (root here)");
    assert_eq!(server.get(&shared, &format!("{prefix}f.txt")), b"in my prefix");
    assert!(!target.join("other-team").exists(), "the volume sees only its prefix");
    // The CSI metrics endpoint serves its RPC counters and every mount's metrics, by volume.
    let text = common::scrape_metrics(d.metrics_port);
    let stage_ok = common::metric_sum(&text, "s3csi_csi_rpcs_total", &["method=\"NodeStageVolume\"", "code=\"Ok\""]);
    assert_eq!(stage_ok, 1.0, "{text}");
    let volume = format!("volume=\"{}\"", vol.volume_id);
    assert!(
        common::metric_sum(&text, "s3csi_fuse_operations_total", &[&volume, "operation=\"write\""]) >= 1.0,
        "{text}"
    );
    assert_eq!(text.matches("# TYPE s3csi_fuse_operations counter").count(), 1, "families are merged");
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
    assert!(server.list_keys(&shared, &prefix).is_empty(), "prefix purged");
    assert_eq!(server.get(&shared, "other-team/data.txt"), b"not ours", "the rest of the bucket is untouched");
}

#[test]
fn if_empty_refuses_data_then_deletes_when_empty() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-ifempty", &[("onDelete", "ifEmpty")], &no_secrets()).unwrap();
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "e");
    std::fs::write(target.join("keep-me.txt"), b"data").unwrap();
    unmount_volume(&d, &vol, &staging, &target);
    let err = d.delete(&vol.volume_id, &no_secrets()).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&vol.volume_id) && err.message().contains("keep-me.txt"), "{}", err.message());
    assert_eq!(server.get(&vol.volume_id, "keep-me.txt"), b"data", "nothing was deleted");
    server.delete(&vol.volume_id, "keep-me.txt");
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
    assert!(!bucket_exists(&server, &vol.volume_id));
}

#[test]
fn keep_releases_the_volume_and_keeps_the_data() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-keep", &[("onDelete", "keep")], &no_secrets()).unwrap();
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "k");
    std::fs::write(target.join("precious.txt"), b"keep").unwrap();
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
    assert_eq!(server.get(&vol.volume_id, "precious.txt"), b"keep");
    let marker = String::from_utf8(server.get(&vol.volume_id, ".s3csi-volume")).unwrap();
    assert!(marker.contains("releasedUnix"), "{marker}");
    let listed = d.rt.block_on(d.controller().list_volumes(ListVolumesRequest::default())).unwrap().into_inner();
    assert!(!listed.entries.iter().any(|e| e.volume.as_ref().unwrap().volume_id == vol.volume_id), "released");
}

#[test]
fn static_volumes_mount_but_are_never_deleted() {
    let server = S3Server::start();
    let bucket = server.unique_bucket("static");
    server.put(&bucket, "team/report.csv", b"a,b\n1,2\n");
    let d = Driver::start(&server, Creds::Env);
    let vol = Volume {
        volume_id: format!("{bucket}/team"),
        volume_context: HashMap::from([("fileMode".to_owned(), "0600".to_owned())]),
        ..Default::default()
    };
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "s");
    assert_eq!(std::fs::read(target.join("report.csv")).unwrap(), b"a,b\n1,2\n");
    assert_eq!(std::fs::metadata(target.join("report.csv")).unwrap().permissions().mode() & 0o777, 0o600);
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
    d.delete(&bucket, &no_secrets()).unwrap();
    assert_eq!(server.get(&bucket, "team/report.csv"), b"a,b\n1,2\n", "static data is never deleted");
}

#[test]
fn every_call_is_idempotent() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let a = d.create("pvc-twice", &[], &no_secrets()).unwrap();
    let b = d.create("pvc-twice", &[], &no_secrets()).unwrap();
    assert_eq!(a, b, "same name, same volume");
    let staging = d.path("staging-i");
    let target = d.path("pods/i/volume");
    std::fs::create_dir_all(&staging).unwrap();
    d.stage(d.stage_req(&a, &staging, &no_secrets())).unwrap();
    d.stage(d.stage_req(&a, &staging, &no_secrets())).unwrap();
    assert_eq!(processes_with_arg(&staging).len(), 1, "one mount process per volume");
    let mut tuned = d.stage_req(&a, &staging, &no_secrets());
    tuned.volume_context.insert("metadataTtl".into(), "30".into());
    d.stage(tuned).unwrap();
    let mut read_only = d.stage_req(&a, &staging, &no_secrets());
    read_only.volume_context.insert("readOnly".into(), "true".into());
    assert_eq!(code_of(d.stage(read_only)), Code::AlreadyExists, "staged read-write already");
    d.publish(&a.volume_id, &staging, &target, false).unwrap();
    d.publish(&a.volume_id, &staging, &target, false).unwrap();
    let target2 = d.path("pods/j/volume");
    d.publish(&a.volume_id, &staging, &target2, true).unwrap();
    std::fs::write(target.join("x"), b"shared").unwrap();
    assert_eq!(std::fs::read(target2.join("x")).unwrap(), b"shared", "both pods see one filesystem");
    let err = std::fs::write(target2.join("y"), b"no").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "readonly publish is read-only");
    assert_eq!(code_of(d.publish(&a.volume_id, &staging, &target2, false)), Code::AlreadyExists);
    for t in [&target, &target2] {
        d.unpublish(&a.volume_id, t).unwrap();
        d.unpublish(&a.volume_id, t).unwrap();
    }
    d.unstage(&a.volume_id, &staging).unwrap();
    d.unstage(&a.volume_id, &staging).unwrap();
    common::wait_no_daemon(&staging, Duration::from_secs(30)).unwrap();
    d.delete(&a.volume_id, &no_secrets()).unwrap();
    d.delete(&a.volume_id, &no_secrets()).unwrap();
    assert!(!bucket_exists(&server, &a.volume_id));
}

#[test]
fn errors_have_the_right_codes() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let c = || d.controller();
    let block = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(volume_capability::BlockVolume {})),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let rw = mount_cap(volume_capability::access_mode::Mode::SingleNodeWriter);
    let create = |req: CreateVolumeRequest| code_of(d.rt.block_on(c().create_volume(req)));
    assert_eq!(
        create(CreateVolumeRequest { volume_capabilities: vec![rw.clone()], ..Default::default() }),
        Code::InvalidArgument
    );
    assert_eq!(create(CreateVolumeRequest { name: "n".into(), ..Default::default() }), Code::InvalidArgument);
    assert_eq!(
        create(CreateVolumeRequest {
            name: "n".into(),
            volume_capabilities: vec![block.clone()],
            ..Default::default()
        }),
        Code::InvalidArgument
    );
    let bad_param = CreateVolumeRequest {
        name: "n".into(),
        volume_capabilities: vec![rw.clone()],
        parameters: HashMap::from([("colour".to_owned(), "blue".to_owned())]),
        ..Default::default()
    };
    let err = d.rt.block_on(c().create_volume(bad_param)).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("colour"), "{}", err.message());
    let missing_shared = CreateVolumeRequest {
        name: "n".into(),
        volume_capabilities: vec![rw.clone()],
        parameters: HashMap::from([("bucket".to_owned(), "no-such-shared-bucket".to_owned())]),
        ..Default::default()
    };
    assert_eq!(create(missing_shared), Code::FailedPrecondition);

    // Same name, incompatible capacity.
    d.create("pvc-cap", &[], &no_secrets()).unwrap();
    let bigger = CreateVolumeRequest {
        name: "pvc-cap".into(),
        capacity_range: Some(CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 }),
        volume_capabilities: vec![rw.clone()],
        ..Default::default()
    };
    assert_eq!(create(bigger), Code::AlreadyExists);

    // A bucket that exists with someone else's data is never taken over.
    let vol = d.create("pvc-cap", &[], &no_secrets()).unwrap();
    assert_eq!(code_of(d.delete("", &no_secrets())), Code::InvalidArgument);
    d.delete("no-such-volume-anywhere", &no_secrets()).unwrap();
    d.delete("Not A Volume Id!", &no_secrets()).unwrap();

    let validate = |id: &str, caps: Vec<VolumeCapability>| {
        d.rt.block_on(c().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        }))
    };
    assert_eq!(code_of(validate("", vec![rw.clone()])), Code::InvalidArgument);
    assert_eq!(code_of(validate(&vol.volume_id, vec![])), Code::InvalidArgument);
    assert_eq!(code_of(validate("no-such-volume-anywhere", vec![rw.clone()])), Code::NotFound);
    assert!(validate(&vol.volume_id, vec![rw.clone()]).unwrap().into_inner().confirmed.is_some());
    assert!(validate(&vol.volume_id, vec![block.clone()]).unwrap().into_inner().confirmed.is_none());

    let list = |token: &str| {
        d.rt.block_on(c().list_volumes(ListVolumesRequest { max_entries: 1, starting_token: token.into() }))
    };
    assert_eq!(code_of(list("garbage")), Code::Aborted);

    let expand = |id: &str, range: Option<CapacityRange>| {
        d.rt.block_on(c().controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range,
            ..Default::default()
        }))
    };
    let r = Some(CapacityRange { required_bytes: 5 << 30, limit_bytes: 0 });
    assert_eq!(code_of(expand("", r)), Code::InvalidArgument);
    assert_eq!(code_of(expand(&vol.volume_id, None)), Code::InvalidArgument);
    assert_eq!(code_of(expand("no-such-volume-anywhere", r)), Code::NotFound);
    assert_eq!(expand(&vol.volume_id, r).unwrap().into_inner().capacity_bytes, 5 << 30);
    let again = d.create("pvc-cap", &[], &no_secrets()).unwrap();
    assert_eq!(again.capacity_bytes, 5 << 30, "the expanded capacity is recorded");

    let cap = d.rt.block_on(c().get_capacity(GetCapacityRequest::default())).unwrap().into_inner();
    assert!(cap.available_capacity > 0);

    // Node side.
    let n = || d.node();
    let staging = d.path("staging-err");
    std::fs::create_dir_all(&staging).unwrap();
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    req.volume_id.clear();
    assert_eq!(code_of(d.stage(req)), Code::InvalidArgument);
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    req.staging_target_path.clear();
    assert_eq!(code_of(d.stage(req)), Code::InvalidArgument);
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    req.volume_capability = None;
    assert_eq!(code_of(d.stage(req)), Code::InvalidArgument);
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    req.volume_capability = Some(block);
    assert_eq!(code_of(d.stage(req)), Code::InvalidArgument);
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    req.volume_context.insert("colour".into(), "blue".into());
    let err = d.stage(req).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("colour"), "{}", err.message());
    let mut req = d.stage_req(&vol, &staging, &no_secrets());
    if let Some(volume_capability::AccessType::Mount(m)) =
        req.volume_capability.as_mut().and_then(|c| c.access_type.as_mut())
    {
        m.mount_flags.push("noexec".into());
    }
    let err = d.stage(req).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("noexec"), "{}", err.message());
    let missing = Volume { volume_id: "no-such-bucket-for-stage".into(), ..Default::default() };
    let err = d.stage(d.stage_req(&missing, &staging, &no_secrets())).unwrap_err();
    assert!(err.message().contains("no-such-bucket-for-stage"), "{}", err.message());
    assert!(!is_mounted(&staging), "nothing is mounted after a failed stage");

    let target = d.path("pods/e/volume");
    assert_eq!(
        code_of(d.publish(&vol.volume_id, &staging, &target, false)),
        Code::FailedPrecondition,
        "publish before stage"
    );
    assert_eq!(code_of(d.unpublish("", &target)), Code::InvalidArgument);
    assert_eq!(code_of(d.unpublish(&vol.volume_id, Path::new(""))), Code::InvalidArgument);
    assert_eq!(code_of(d.unstage("", &staging)), Code::InvalidArgument);
    let stats = |id: &str, path: &Path| {
        d.rt.block_on(n().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        }))
    };
    assert_eq!(code_of(stats("", &staging)), Code::InvalidArgument);
    assert_eq!(code_of(stats(&vol.volume_id, Path::new(""))), Code::InvalidArgument);
    assert_eq!(code_of(stats(&vol.volume_id, &staging)), Code::NotFound, "not staged: not ours");
    assert_eq!(code_of(stats(&vol.volume_id, Path::new("/tmp"))), Code::NotFound);
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
}

#[test]
fn credentials_come_from_secrets_and_never_reach_argv_or_logs() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::SecretsOnly);
    let secrets = secrets_for(&server);
    let err = d.create("pvc-secret", &[], &no_secrets()).unwrap_err();
    assert!(matches!(err.code(), Code::FailedPrecondition | Code::Internal), "{err:?}");
    let vol = d.create("pvc-secret", &[], &secrets).unwrap();
    let (staging, target) = mount_volume(&d, &vol, &secrets, "sec");
    std::fs::write(target.join("f"), b"via secrets").unwrap();
    assert_eq!(server.get(&vol.volume_id, "f"), b"via secrets");
    for pid in processes_with_arg(&staging) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(server.secret_key()), "secret in argv: {cmdline}");
    }
    let stats =
        d.rt.block_on(d.node().node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    assert!(stats.usage[0].total > 0);
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&vol.volume_id, &secrets).unwrap();
    assert!(!bucket_exists(&server, &vol.volume_id));
    assert!(!d.log().contains(server.secret_key()), "secret in the driver log");
}

#[test]
fn a_restarted_driver_unpublishes_and_unstages_what_its_predecessor_staged() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-restart", &[], &no_secrets()).unwrap();
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "r");
    std::fs::write(target.join("before"), b"written before the restart").unwrap();
    let (dir, state_dir) = d.kill();
    // The mount outlives the driver.
    assert_eq!(std::fs::read(target.join("before")).unwrap(), b"written before the restart");
    std::fs::write(target.join("during"), b"written while the driver was down").unwrap();
    let d = Driver::start_with(&server, Creds::Env, dir, state_dir);
    assert!(d.log().contains("found a volume staged by an earlier instance"), "{}", d.log());
    d.stage(d.stage_req(&vol, &staging, &no_secrets())).unwrap();
    assert_eq!(processes_with_arg(&staging).len(), 1, "the live mount is reused, not remounted");
    unmount_volume(&d, &vol, &staging, &target);
    assert_eq!(server.get(&vol.volume_id, "during"), b"written while the driver was down");
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
}

#[test]
fn a_dead_mount_is_cleaned_up_and_mounted_again() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-dead", &[], &no_secrets()).unwrap();
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "d");
    std::fs::write(target.join("f"), b"survives").unwrap();
    d.unpublish(&vol.volume_id, &target).unwrap();
    // A killed mount process alone: the keeper serves the same mount with a successor.
    let first = processes_with_arg(&staging);
    for pid in &first {
        // SAFETY: plain kill of a test child.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || {
        let now = processes_with_arg(&staging);
        now.len() == 1 && !first.contains(&now[0])
    }));
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"survives", "the mount never went away");
    // The keeper killed too: the mount dies with it.
    for pid in processes_with_arg(&d.state_dir).into_iter().chain(processes_with_arg(&staging)) {
        // SAFETY: plain kill of a test child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&staging).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
    }));
    assert_eq!(code_of(d.publish(&vol.volume_id, &staging, &target, false)), Code::FailedPrecondition);
    // Staging again finds the dead mount, detaches it and mounts afresh (with a new keeper).
    d.stage(d.stage_req(&vol, &staging, &no_secrets())).unwrap();
    assert!(std::fs::metadata(&staging).is_ok(), "the staging path answers again");
    assert_eq!(processes_with_arg(&staging).len(), 1);
    d.publish(&vol.volume_id, &staging, &target, false).unwrap();
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"survives");
    unmount_volume(&d, &vol, &staging, &target);
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
}

#[test]
fn list_volumes_pages_with_tokens() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let shared = server.unique_bucket("list");
    let mut want = Vec::new();
    for i in 0..3 {
        want.push(d.create(&format!("pvc-list-{i}"), &[], &no_secrets()).unwrap().volume_id);
    }
    want.push(d.create("pvc-list-p", &[("bucket", &shared)], &no_secrets()).unwrap().volume_id);
    want.sort();
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page =
            d.rt.block_on(d.controller().list_volumes(ListVolumesRequest { max_entries: 2, starting_token: token }))
                .unwrap()
                .into_inner();
        assert!(page.entries.len() <= 2);
        got.extend(page.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(got, want);
    let info = d.rt.block_on(IdentityClient::new(d.channel.clone()).get_plugin_info(GetPluginInfoRequest {})).unwrap();
    assert_eq!(info.into_inner().name, DRIVER);
    let node = d.rt.block_on(d.node().node_get_info(NodeGetInfoRequest {})).unwrap().into_inner();
    assert_eq!(node.node_id, "test-node");
}

#[test]
fn an_unreachable_s3_endpoint_is_unavailable_and_named() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let port = common::free_port();
    let secrets = HashMap::from([("endpoint".to_owned(), format!("http://127.0.0.1:{port}"))]);
    let err = d.create("pvc-unreachable", &[], &secrets).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("pvc-unreachable-"), "names the bucket: {}", err.message());
    let err = d.delete("some-bucket", &secrets).unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("some-bucket"), "{}", err.message());
}

#[test]
fn purging_a_large_bucket_pages_and_deletes_in_batches() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let vol = d.create("pvc-large", &[], &no_secrets()).unwrap();
    let objects: Vec<(String, Vec<u8>)> = (0..2500).map(|i| (format!("d{}/f{i:05}", i % 7), vec![b'x'; 16])).collect();
    server.put_many(&vol.volume_id, objects, 16);
    d.delete(&vol.volume_id, &no_secrets()).unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    assert!(!bucket_exists(&server, &vol.volume_id));
    let log = d.log();
    let progress = log.lines().filter(|l| l.contains("purging") && l.contains(&vol.volume_id)).count();
    assert!(progress >= 3, "progress is logged per batch of at most 1000: {log}");
    assert!(log.contains("objects=2501"), "every object and the marker: {log}");
}

#[test]
fn create_volume_refuses_option_values_the_mount_would_refuse() {
    let server = S3Server::start();
    let d = Driver::start(&server, Creds::Env);
    let name = "pvc-bad-part-size";
    let err = d.create(name, &[("partSize", "1MiB")], &no_secrets()).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    for part in ["partSize", "\"1MiB\"", "5MiB", "5GiB"] {
        assert!(err.message().contains(part), "names the key, the value and what is accepted: {}", err.message());
    }
    let bucket = generated_name("", name);
    assert!(!bucket_exists(&server, &bucket), "no bucket for a refused volume");

    // Every other option is checked by the same rules, with Kubernetes' own keys beside them.
    for (key, value) in [
        ("memoryCacheSize", "512KiB"),
        ("memoryCacheSize", "lots"),
        ("diskCacheSize", "ten gigs"),
        ("metadataTtl", "1e9"),
        ("metadataTtl", "-1"),
        ("s3Timeout", "86401"),
        ("readOnly", "yes"),
        ("uid", "-1"),
        ("fileMode", "rw-r--r--"),
    ] {
        let params = [(key, value), ("csi.storage.k8s.io/pvc/name", "data"), ("csi.storage.k8s.io/pv/name", name)];
        let err = d.create(name, &params, &no_secrets()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key}={value}: {err:?}");
        assert!(err.message().contains(key) && err.message().contains(value), "{key}={value}: {}", err.message());
    }
    assert!(!bucket_exists(&server, &bucket), "no bucket for a refused volume");

    // The limits themselves are accepted, and a volume so created stages.
    let ok = [("partSize", "5MiB"), ("memoryCacheSize", "1MiB"), ("csi.storage.k8s.io/pvc/namespace", "default")];
    let vol = d.create(name, &ok, &no_secrets()).unwrap_or_else(|e| panic!("{e:?}\n{}", d.log()));
    assert_eq!(vol.volume_id, bucket);
    let (staging, target) = mount_volume(&d, &vol, &no_secrets(), "limits");
    unmount_volume(&d, &vol, &staging, &target);

    // ValidateVolumeCapabilities checks parameters and volume context with the same rules.
    let rw = mount_cap(volume_capability::access_mode::Mode::SingleNodeWriter);
    let validate = |context: &[(&str, &str)], parameters: &[(&str, &str)]| {
        let map = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        d.rt.block_on(d.controller().validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![rw.clone()],
            volume_context: map(context),
            parameters: map(parameters),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
    };
    let context: Vec<(&str, &str)> = vol.volume_context.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert!(validate(&context, &ok).confirmed.is_some());
    let bad: &[(&str, &str)] = &[("partSize", "1MiB")];
    for (context, parameters) in [(bad, &[][..]), (&[][..], bad)] {
        let r = validate(context, parameters);
        assert!(r.confirmed.is_none(), "not confirmed: {context:?} {parameters:?}");
        assert!(r.message.contains("partSize") && r.message.contains("1MiB"), "{}", r.message);
    }
    d.delete(&vol.volume_id, &no_secrets()).unwrap();
}

/// The CSI side checks option values with the rules `s3csi mount` applies to its flags: for each
/// value, the real binary (which checks its options before the mountpoint) and the driver's
/// validation agree.
#[test]
fn the_driver_accepts_exactly_the_option_values_the_mount_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let cases: &[(&str, &[&str])] = &[
        ("uid", &["0", "1000", "4294967295", "4294967296", "-1", "abc"]),
        ("gid", &["2000", "x"]),
        ("file-mode", &["0640", "644", "0o600", "7777", "17777", "999", "rw"]),
        ("dir-mode", &["2775", "8"]),
        ("metadata-ttl", &["0", "1.5", "999999999", "1e9", "-1", "inf", "NaN", "abc"]),
        ("memory-cache-size", &["1MiB", "1048576", "1048575", "512KiB", "256MiB", "lots"]),
        ("max-cache-size", &["0", "10GiB", "1XB"]),
        ("part-size", &["1MiB", "5242879", "5MiB", "8MiB", "5GiB", "5368709121", "6GiB", "big"]),
        ("write-buffer-size", &["0", "64MiB", "x"]),
        ("max-staging-size", &["4GiB", "x"]),
        ("s3-timeout", &["2", "3", "60", "86400", "86401", "1.5", "abc"]),
    ];
    for (flag, values) in cases {
        for value in *values {
            let out = std::process::Command::new(common::S3CSI_BIN)
                .arg("mount")
                .arg("some-bucket")
                .arg(&missing)
                .arg(format!("--{flag}={value}"))
                .env("RUST_LOG", "off")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "--{flag}={value}: {stderr}");
            // Options are checked first; a value the mount accepts gets as far as the mountpoint.
            let mount_accepts = stderr.contains("does not exist");
            let driver = MountOptions::default().apply_mount_flag(&format!("{flag}={value}"));
            assert_eq!(driver.is_ok(), mount_accepts, "--{flag}={value}: mount says {stderr:?}, driver {driver:?}");
        }
    }
}
