//! Volume ids, StorageClass parameters, mount options and the volume marker object.
//!
//! A volume id is `<bucket>` (a whole bucket) or `<bucket>/<prefix>` (the keys under
//! `<prefix>/`). Dynamic volumes get a deterministic name derived from the CreateVolume name;
//! static PVs use the same id format as their `volumeHandle`.
//!
//! Options reach the node from two places with one set of meanings: StorageClass parameters /
//! PV `volumeAttributes` (camelCase keys such as `fileMode`) and PV `mountOptions` (the
//! `s3csi mount` flag names such as `file-mode=0640`). Unknown keys are errors that name the key.
//!
//! The key rule ([`OptionKey::classify`]): only bare keys (`uid`, `fileMode`, ...) are ours.
//! A key with a DNS prefix (`domain/name`, such as `csi.storage.k8s.io/pvc/name` or
//! `storage.kubernetes.io/csiProvisionerIdentity`) belongs to Kubernetes or another component:
//! it is ignored (logged at debug), never an error, in StorageClass parameters and volume
//! context alike; so is every key starting with `csi.storage.k8s.io/`. An unknown bare key is
//! `InvalidArgument`.
//!
//! Values are checked once, by [`MountOptions::apply_context`] / [`MountOptions::apply_mount_flag`]
//! with the types `s3csi mount` parses its flags into (`config::PartSize`, ...): CreateVolume,
//! GetCapacity and ValidateVolumeCapabilities refuse exactly what NodeStageVolume and the mount
//! would refuse.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{
    BucketName, ByteSize, ConfigError, MemoryCacheSize, MetadataTtl, Mode, PartSize, Prefix, StallLimit, WorkerThreads,
};

/// Default driver name; domain-style, ending in a letter.
pub const DEFAULT_DRIVER_NAME: &str = "s3.csi.s3csi.io";
/// Key of the marker object that records a provisioned volume (at the bucket root or at the
/// root of the volume's prefix). The mounted filesystem hides this name.
pub const MARKER_NAME: &str = crate::fs::RESERVED_NAME;

/// StorageClass parameter: provision a prefix per PVC inside this existing bucket.
pub const PARAM_BUCKET: &str = "bucket";
/// StorageClass parameter: prefix for generated bucket (or prefix) names.
pub const PARAM_NAME_PREFIX: &str = "namePrefix";
/// StorageClass parameter: what DeleteVolume does (`purge`, `ifEmpty`, `keep`).
pub const PARAM_ON_DELETE: &str = "onDelete";

/// Keys csi-provisioner and kubelet set (`csi.storage.k8s.io/pvc/name`, `.../pod.name`, ...):
/// foreign whatever follows the prefix.
pub const KUBERNETES_CSI_PREFIX: &str = "csi.storage.k8s.io/";

/// What a parameter or volume-context key is, by the key rule in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionKey<'a> {
    /// A bare key: ours, known or not.
    Ours(&'a str),
    /// `domain/name`: set by Kubernetes (csi-provisioner, kubelet) or another component.
    Foreign,
}

impl<'a> OptionKey<'a> {
    /// `domain/name` with a DNS-subdomain domain (lowercase letters, digits, `-`, `.`, starting
    /// and ending with a letter or digit) and a non-empty name is foreign; anything else
    /// (`uid`, but also `uid/` or `/uid`) is ours, so a typo is an error, not ignored. Any key
    /// starting with [`KUBERNETES_CSI_PREFIX`] is foreign too.
    pub fn classify(key: &'a str) -> Self {
        let foreign = key.starts_with(KUBERNETES_CSI_PREFIX)
            || key.split_once('/').is_some_and(|(domain, name)| {
                !name.is_empty()
                    && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                    && domain.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                    && domain.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
            });
        if foreign { OptionKey::Foreign } else { OptionKey::Ours(key) }
    }
}

/// The entries of `map` that are ours, sorted by key; foreign keys are logged at debug.
fn our_entries<'a>(map: &'a HashMap<String, String>, what: &str) -> Vec<(&'a str, &'a str)> {
    let mut out = Vec::new();
    for (k, v) in map {
        match OptionKey::classify(k) {
            OptionKey::Ours(k) => out.push((k, v.as_str())),
            OptionKey::Foreign => tracing::debug!(key = %k, "ignoring {what} key of another component"),
        }
    }
    out.sort();
    out
}

/// Longest generated name prefix, leaving room for the name and the hash in 63 characters.
const MAX_NAME_PREFIX: usize = 24;
/// Hex digits of the SHA-256 of the request name appended to every generated name.
const HASH_LEN: usize = 10;
/// S3's bucket name limit.
const MAX_BUCKET_LEN: usize = 63;

/// Where a volume's data lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    pub bucket: String,
    /// Empty for a whole-bucket volume, otherwise ends in `/`.
    pub prefix: String,
}

impl VolumeId {
    pub fn is_bucket(&self) -> bool {
        self.prefix.is_empty()
    }

    /// Key of this volume's marker object.
    pub fn marker_key(&self) -> String {
        format!("{}{MARKER_NAME}", self.prefix)
    }

    /// A short stable file name for per-volume state on the node.
    pub fn file_stem(&self) -> String {
        hex::encode(&Sha256::digest(self.to_string().as_bytes())[..12])
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            f.write_str(&self.bucket)
        } else {
            write!(f, "{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
        }
    }
}

impl FromStr for VolumeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (bucket, prefix) = s.split_once('/').unwrap_or((s, ""));
        let bucket: BucketName =
            bucket.parse().map_err(|e| format!("volume id {s:?} is not <bucket> or <bucket>/<prefix>: {e}"))?;
        let prefix: Prefix =
            prefix.parse().map_err(|e| format!("volume id {s:?} is not <bucket> or <bucket>/<prefix>: {e}"))?;
        Ok(VolumeId { bucket: bucket.as_str().to_owned(), prefix: prefix.as_str().to_owned() })
    }
}

/// What DeleteVolume does with a volume this driver created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OnDelete {
    /// Delete every object, version, delete marker and pending upload, then the bucket.
    #[default]
    #[serde(rename = "purge")]
    Purge,
    /// Delete the bucket (or prefix) only if it holds no objects; otherwise fail.
    #[serde(rename = "ifEmpty")]
    IfEmpty,
    /// Keep the data and mark the volume released.
    #[serde(rename = "keep")]
    Keep,
}

impl FromStr for OnDelete {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "purge" => Ok(OnDelete::Purge),
            "ifEmpty" => Ok(OnDelete::IfEmpty),
            "keep" => Ok(OnDelete::Keep),
            _ => Err(format!("invalid parameter {PARAM_ON_DELETE}={s:?}: expected purge, ifEmpty or keep")),
        }
    }
}

impl fmt::Display for OnDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnDelete::Purge => "purge",
            OnDelete::IfEmpty => "ifEmpty",
            OnDelete::Keep => "keep",
        })
    }
}

/// The marker object of a provisioned volume: who created it, for which request, and what
/// capacity was asked for (S3 has no capacity; it is recorded for Kubernetes' sake).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRecord {
    /// The driver name that created the volume; other drivers' volumes are never deleted.
    pub driver: String,
    /// The CreateVolume name (the PV name in Kubernetes).
    pub name: String,
    pub capacity_bytes: i64,
    pub on_delete: OnDelete,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// Set by DeleteVolume with `onDelete: keep`: the data stays, the volume is gone.
    #[serde(default)]
    pub released_unix: Option<u64>,
    /// The volume context returned at creation, so ListVolumes can return it too.
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

impl VolumeRecord {
    pub fn to_json(&self) -> bytes::Bytes {
        serde_json::to_vec_pretty(self).expect("a volume record always serializes").into()
    }

    pub fn from_json(data: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(data).map_err(|e| format!("unreadable volume marker: {e}"))
    }
}

/// Lowercase, `[a-z0-9-]` only, no repeated or edge dashes.
fn sanitize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_owned()
}

/// The bucket (or prefix) name for a CreateVolume `name`: `<namePrefix><name>-<hash>`, a valid
/// bucket name of at most 63 characters. The hash of the full original name keeps names that
/// sanitize or truncate to the same text apart.
pub fn generated_name(name_prefix: &str, name: &str) -> String {
    let hash = hex::encode(Sha256::digest(name.as_bytes()));
    let hash = &hash[..HASH_LEN];
    let budget = MAX_BUCKET_LEN - name_prefix.len() - HASH_LEN - 1;
    let mut body = sanitize(name);
    body.truncate(budget);
    let mut body = body.trim_end_matches('-').to_owned();
    if body.is_empty() && name_prefix.is_empty() {
        body = "vol".to_owned();
    }
    if body.is_empty() { format!("{name_prefix}{hash}") } else { format!("{name_prefix}{body}-{hash}") }
}

/// Checks a `namePrefix` parameter: lowercase letters, digits and `-`, starting with a letter or
/// digit, at most 24 characters.
pub fn check_name_prefix(p: &str) -> Result<(), String> {
    let ok = p.len() <= MAX_NAME_PREFIX
        && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && p.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid parameter {PARAM_NAME_PREFIX}={p:?}: use at most {MAX_NAME_PREFIX} lowercase letters, digits \
             and '-', starting with a letter or digit"
        ))
    }
}

/// Controller-side StorageClass parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateParams {
    /// Shared bucket for prefix-per-PVC volumes.
    pub bucket: Option<String>,
    pub name_prefix: String,
    pub on_delete: OnDelete,
    /// The mount options among the parameters, validated, passed on as volume context.
    pub context: BTreeMap<String, String>,
}

impl CreateParams {
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, String> {
        let mut out = CreateParams::default();
        for (k, v) in our_entries(params, "StorageClass parameter") {
            match k {
                PARAM_BUCKET => {
                    let b: BucketName = v.parse().map_err(|e| format!("invalid parameter {PARAM_BUCKET}: {e}"))?;
                    out.bucket = Some(b.as_str().to_owned());
                }
                PARAM_NAME_PREFIX => {
                    check_name_prefix(v)?;
                    out.name_prefix = v.to_owned();
                }
                PARAM_ON_DELETE => out.on_delete = v.parse()?,
                _ => {
                    MountOptions::default().apply_context(k, v)?;
                    out.context.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// The volume a CreateVolume `name` maps to under these parameters.
    pub fn volume_id(&self, name: &str) -> VolumeId {
        let generated = generated_name(&self.name_prefix, name);
        match &self.bucket {
            Some(bucket) => VolumeId { bucket: bucket.clone(), prefix: format!("{generated}/") },
            None => VolumeId { bucket: generated, prefix: String::new() },
        }
    }
}

/// How a value of an option is checked: by the type `s3csi mount` parses it into, so the
/// driver accepts exactly the values the mount accepts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A uid or gid (`u32`).
    Id,
    Mode,
    Size,
    PartSize,
    MemoryCacheSize,
    MetadataTtl,
    StallLimit,
    WorkerThreads,
}

/// (volume-context key, `s3csi mount` flag, kind). The flag names double as `mountOptions`.
const VALUE_OPTIONS: &[(&str, &str, Kind)] = &[
    ("uid", "uid", Kind::Id),
    ("gid", "gid", Kind::Id),
    ("fileMode", "file-mode", Kind::Mode),
    ("dirMode", "dir-mode", Kind::Mode),
    ("metadataTtl", "metadata-ttl", Kind::MetadataTtl),
    ("memoryCacheSize", "memory-cache-size", Kind::MemoryCacheSize),
    ("diskCacheSize", "max-cache-size", Kind::Size),
    ("partSize", "part-size", Kind::PartSize),
    ("writeBufferSize", "write-buffer-size", Kind::Size),
    ("maxStagingSize", "max-staging-size", Kind::Size),
    ("s3Timeout", "s3-timeout", Kind::StallLimit),
    ("workerThreads", "worker-threads", Kind::WorkerThreads),
];

/// Volume-context key: mount only this sub-prefix of the volume.
pub const CTX_PREFIX: &str = "prefix";
/// Volume-context key: mount read-only (`"true"`/`"false"`).
pub const CTX_READ_ONLY: &str = "readOnly";

/// Default modes under a pod's fsGroup (kubelet ORs `0660` into file modes and `0660` plus
/// set-group-ID into directory modes of the default `0644`/`0755`).
pub const FS_GROUP_FILE_MODE: &str = "0664";
pub const FS_GROUP_DIR_MODE: &str = "2775";

/// Node-side options for one mount, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `s3csi mount` flag name -> value, for the value-carrying flags.
    pub values: BTreeMap<&'static str, String>,
    pub read_only: bool,
    /// Extra prefix below the volume's own prefix.
    pub sub_prefix: Option<String>,
}

/// Checks one option value: the one check for StorageClass parameters (CreateVolume, GetCapacity,
/// ValidateVolumeCapabilities), volume context and mount options (NodeStageVolume). The message
/// names the key, the value and what is accepted.
fn check_value(key: &str, kind: Kind, v: &str) -> Result<(), String> {
    fn parses<T: FromStr<Err = ConfigError>>(v: &str) -> Result<(), String> {
        v.parse::<T>().map(drop).map_err(|e| e.0)
    }
    let ok = match kind {
        Kind::Id => v.parse::<u32>().map(drop).map_err(|_| format!("expected a number from 0 to {}", u32::MAX)),
        Kind::Mode => parses::<Mode>(v),
        Kind::Size => parses::<ByteSize>(v),
        Kind::PartSize => parses::<PartSize>(v),
        Kind::MemoryCacheSize => parses::<MemoryCacheSize>(v),
        Kind::MetadataTtl => parses::<MetadataTtl>(v),
        Kind::StallLimit => parses::<StallLimit>(v),
        Kind::WorkerThreads => parses::<WorkerThreads>(v),
    };
    ok.map_err(|why| format!("invalid value {v:?} for option {key}: {why}"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("invalid value {v:?} for option {key}: expected true or false")),
    }
}

impl MountOptions {
    /// Applies one volume-context entry (StorageClass parameter or PV volumeAttribute) whose
    /// key is ours (see [`OptionKey`]).
    pub fn apply_context(&mut self, key: &str, value: &str) -> Result<(), String> {
        if let Some(&(_, flag, kind)) = VALUE_OPTIONS.iter().find(|(k, _, _)| *k == key) {
            check_value(key, kind, value)?;
            self.values.insert(flag, value.to_owned());
            return Ok(());
        }
        match key {
            CTX_PREFIX => {
                let p: Prefix = value.parse().map_err(|e: crate::config::ConfigError| e.0)?;
                self.sub_prefix = (!p.is_empty()).then(|| p.as_str().to_owned());
            }
            CTX_READ_ONLY => self.read_only |= parse_bool(key, value)?,
            PARAM_BUCKET | PARAM_NAME_PREFIX | PARAM_ON_DELETE => {}
            _ => {
                let known: Vec<&str> = VALUE_OPTIONS.iter().map(|(k, _, _)| *k).collect();
                return Err(format!(
                    "unknown parameter or volume attribute {key:?}; known: {PARAM_BUCKET}, {PARAM_NAME_PREFIX}, \
                     {PARAM_ON_DELETE}, {}, {CTX_PREFIX}, {CTX_READ_ONLY} (keys of other components carry a \
                     domain prefix, such as csi.storage.k8s.io/...)",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Applies one PV `mountOptions` entry (`ro`, `allow-other`, `file-mode=0640`, ...).
    pub fn apply_mount_flag(&mut self, flag: &str) -> Result<(), String> {
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (flag.trim(), None),
        };
        match (name, value) {
            ("ro" | "read-only", None) => self.read_only = true,
            ("rw", None) => {}
            // Always on for CSI mounts: pods run as arbitrary users.
            ("allow-other" | "allow_other", None) => {}
            (_, Some(v)) => {
                let Some(&(_, flag_name, kind)) = VALUE_OPTIONS.iter().find(|(_, f, _)| *f == name) else {
                    return Err(self::unknown_flag(flag));
                };
                check_value(name, kind, v)?;
                self.values.insert(flag_name, v.to_owned());
            }
            _ => return Err(self::unknown_flag(flag)),
        }
        Ok(())
    }

    /// Builds options from a volume context, the capability's mount flags and the fsGroup.
    pub fn build(
        context: &HashMap<String, String>,
        mount_flags: &[String],
        mount_group: Option<&str>,
    ) -> Result<Self, String> {
        let mut o = MountOptions::default();
        for (k, v) in our_entries(context, "volume context") {
            o.apply_context(k, v)?;
        }
        for f in mount_flags {
            o.apply_mount_flag(f)?;
        }
        if let Some(group) = mount_group.filter(|g| !g.is_empty()) {
            check_value("volume_mount_group", Kind::Id, group)?;
            o.values.insert("gid", group.to_owned());
            // What kubelet makes of a local volume for an fsGroup: the group may read and
            // write everything, and directories are set-group-ID so new entries keep the group.
            o.values.entry("file-mode").or_insert_with(|| FS_GROUP_FILE_MODE.to_owned());
            o.values.entry("dir-mode").or_insert_with(|| FS_GROUP_DIR_MODE.to_owned());
        }
        Ok(o)
    }

    /// Arguments for `s3csi mount` (after bucket and mountpoint), without S3 settings.
    pub fn mount_args(&self, volume_prefix: &str) -> Vec<String> {
        let mut args = Vec::new();
        let prefix = format!("{volume_prefix}{}", self.sub_prefix.as_deref().unwrap_or(""));
        if !prefix.is_empty() {
            args.push(format!("--prefix={prefix}"));
        }
        for (flag, value) in &self.values {
            args.push(format!("--{flag}={value}"));
        }
        if self.read_only {
            args.push("--read-only".to_owned());
        }
        args.push("--allow-other".to_owned());
        args
    }

    /// Whether a disk cache was asked for (`diskCacheSize` / `max-cache-size` above zero).
    pub fn disk_cache(&self) -> bool {
        self.values.get("max-cache-size").and_then(|v| v.parse::<ByteSize>().ok()).is_some_and(|s| s.0 > 0)
    }
}

fn unknown_flag(flag: &str) -> String {
    let known: Vec<&str> = VALUE_OPTIONS.iter().map(|(_, f, _)| *f).collect();
    format!("unknown mount option {flag:?}; known: ro, rw, allow-other, and {}=<value>", known.join("=, "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("vol", "vol", "")]
    #[test_case("bkt/data", "bkt", "data/")]
    #[test_case("bkt/a/b/", "bkt", "a/b/")]
    fn volume_ids_parse(s: &str, bucket: &str, prefix: &str) {
        let id: VolumeId = s.parse().unwrap();
        assert_eq!((id.bucket.as_str(), id.prefix.as_str()), (bucket, prefix));
        assert_eq!(id.to_string(), s.trim_end_matches('/'));
    }

    #[test_case("")]
    #[test_case("UPPER")]
    #[test_case("b/../x")]
    #[test_case("x")]
    fn bad_volume_ids_fail(s: &str) {
        assert!(s.parse::<VolumeId>().is_err());
    }

    #[test]
    fn generated_names_are_valid_and_distinct() {
        let long = "pvc-".to_owned() + &"x".repeat(200);
        for (prefix, name) in [
            ("", "pvc-0a1b2c3d-1111-2222-3333-444455556666"),
            ("team-a-", "PVC_Upper.Case"),
            ("", "!!!"),
            ("p-", &long),
            ("", "sanity-Controller Service [Controller Server] CreateVolume-1234ABCD"),
        ] {
            let n = generated_name(prefix, name);
            assert!(n.parse::<BucketName>().is_ok(), "{n}");
            assert!(n.len() <= 63 && n.starts_with(prefix), "{n}");
            assert_eq!(n, generated_name(prefix, name), "deterministic");
        }
        assert_ne!(generated_name("", "PVC-a"), generated_name("", "pvc-a"));
        assert_ne!(generated_name("", &(long.clone() + "1")), generated_name("", &(long + "2")));
    }

    #[test]
    fn create_params_split_controller_and_mount_keys() {
        let params: HashMap<String, String> =
            [("bucket", "shared"), ("onDelete", "ifEmpty"), ("uid", "1000"), ("csi.storage.k8s.io/pvc/name", "x")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let p = CreateParams::parse(&params).unwrap();
        assert_eq!(p.bucket.as_deref(), Some("shared"));
        assert_eq!(p.on_delete, OnDelete::IfEmpty);
        assert_eq!(p.context.get("uid").map(String::as_str), Some("1000"));
        let id = p.volume_id("pvc-1");
        assert_eq!(id.bucket, "shared");
        assert!(id.prefix.starts_with("pvc-1-") && id.prefix.ends_with('/'));
    }

    #[test_case("colour", "blue", "unknown parameter or volume attribute \"colour\"")]
    #[test_case("onDelete", "never", "expected purge, ifEmpty or keep")]
    #[test_case("uid", "root", "invalid value \"root\" for option uid")]
    #[test_case("namePrefix", "UPPER", "invalid parameter namePrefix")]
    #[test_case("s3Timeout", "1.5", "expected whole seconds from 3 to 86400")]
    #[test_case("s3Timeout", "2", "invalid value \"2\" for option s3Timeout")]
    #[test_case(
        "partSize",
        "1MiB",
        "invalid value \"1MiB\" for option partSize: invalid part size \"1MiB\": expected 5MiB to 5GiB"
    )]
    #[test_case("partSize", "6GiB", "expected 5MiB to 5GiB")]
    #[test_case("partSize", "eight", "invalid value \"eight\" for option partSize: invalid size")]
    #[test_case("memoryCacheSize", "512KiB", "invalid value \"512KiB\" for option memoryCacheSize")]
    #[test_case("memoryCacheSize", "lots", "expected e.g. 1048576, 512MiB, 10GiB")]
    #[test_case("diskCacheSize", "10 gigs", "invalid value \"10 gigs\" for option diskCacheSize")]
    #[test_case("writeBufferSize", "-1", "invalid value \"-1\" for option writeBufferSize")]
    #[test_case("maxStagingSize", "4GiBs", "invalid value \"4GiBs\" for option maxStagingSize")]
    #[test_case("metadataTtl", "1e9", "expected seconds from 0 to below 1000000000")]
    #[test_case("metadataTtl", "NaN", "invalid value \"NaN\" for option metadataTtl")]
    #[test_case("readOnly", "yes", "invalid value \"yes\" for option readOnly: expected true or false")]
    #[test_case("gid", "4294967296", "expected a number from 0 to 4294967295")]
    #[test_case("dirMode", "rwxr-xr-x", "invalid value \"rwxr-xr-x\" for option dirMode: invalid mode")]
    #[test_case("prefix", "/abs", "invalid prefix \"/abs\"")]
    fn bad_params_name_the_key(k: &str, v: &str, want: &str) {
        let params = HashMap::from([(k.to_owned(), v.to_owned())]);
        let err = CreateParams::parse(&params).unwrap_err();
        assert!(err.contains(want), "{err}");
        // NodeStageVolume refuses the same value with the same message.
        if ![PARAM_BUCKET, PARAM_NAME_PREFIX, PARAM_ON_DELETE].contains(&k) {
            assert_eq!(MountOptions::build(&params, &[], None).unwrap_err(), err);
        }
    }

    /// CreateVolume and NodeStageVolume (volume context and mount options) accept the same values.
    #[test_case("partSize", "part-size", &["5MiB", "5GiB", "8 MiB", "1MiB", "5242879", "5368709121", "x"])]
    #[test_case("memoryCacheSize", "memory-cache-size", &["1MiB", "1048575", "0", "2GiB"])]
    #[test_case("metadataTtl", "metadata-ttl", &["0", "0.25", "999999999", "1e9", "-0.5", "inf"])]
    #[test_case("s3Timeout", "s3-timeout", &["3", "86400", "2", "86401", "60.0"])]
    #[test_case("workerThreads", "worker-threads", &["1", "64", "0", "65", "2.0", "-1"])]
    #[test_case("uid", "uid", &["0", "4294967295", "4294967296", "-1"])]
    #[test_case("fileMode", "file-mode", &["0640", "7777", "10000", "9"])]
    #[test_case("diskCacheSize", "max-cache-size", &["0", "1TiB", "1PiB"])]
    fn every_entry_point_checks_alike(key: &str, flag: &str, values: &[&str]) {
        for v in values {
            let params = HashMap::from([(key.to_owned(), (*v).to_owned())]);
            let create = CreateParams::parse(&params).is_ok();
            let context = MountOptions::build(&params, &[], None).is_ok();
            let mount_flag = MountOptions::build(&HashMap::new(), &[format!("{flag}={v}")], None).is_ok();
            assert_eq!((create, context), (mount_flag, mount_flag), "{key}={v}");
        }
    }

    #[test]
    fn limits_are_accepted_and_passed_on() {
        let params: HashMap<String, String> = [
            ("partSize", "5MiB"),
            ("memoryCacheSize", "1MiB"),
            ("metadataTtl", "0"),
            ("s3Timeout", "86400"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let p = CreateParams::parse(&params).unwrap();
        assert_eq!(p.context.len(), 4, "{p:?}");
        let o = MountOptions::build(&p.context.clone().into_iter().collect(), &[], None).unwrap();
        let args = o.mount_args("");
        assert!(args.contains(&"--part-size=5MiB".to_owned()) && args.contains(&"--s3-timeout=86400".to_owned()));
    }

    #[test]
    fn mount_options_from_all_sources() {
        let ctx = HashMap::from([("fileMode".to_owned(), "0600".to_owned()), ("prefix".to_owned(), "sub".to_owned())]);
        let flags = vec!["ro".to_owned(), "metadata-ttl=5".to_owned(), "allow-other".to_owned()];
        let o = MountOptions::build(&ctx, &flags, Some("2000")).unwrap();
        let args = o.mount_args("vol/");
        assert!(args.contains(&"--prefix=vol/sub/".to_owned()), "{args:?}");
        assert!(args.contains(&"--file-mode=0600".to_owned()), "explicit mode wins over the fsGroup default");
        assert!(args.contains(&"--dir-mode=2775".to_owned()), "set-group-ID directories under an fsGroup");
        assert!(args.contains(&"--gid=2000".to_owned()));
        assert!(args.contains(&"--metadata-ttl=5".to_owned()));
        assert!(args.contains(&"--read-only".to_owned()) && args.contains(&"--allow-other".to_owned()));
    }

    /// Exactly what a provisioner-created PV carries (csi-provisioner v5 with
    /// `--extra-create-metadata`; kubelet adds pod info when `podInfoOnMount` is set).
    const KUBERNETES_KEYS: &[(&str, &str)] = &[
        ("storage.kubernetes.io/csiProvisionerIdentity", "1764534883017-8081-s3.csi.s3csi.io"),
        ("csi.storage.k8s.io/pv/name", "pvc-5f0c2f0e-6f7d-4a5e-9a43-0f1c1a2b3c4d"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
        ("csi.storage.k8s.io/pod.name", "app-0"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "0b7c9c3e-1111-2222-3333-444455556666"),
        ("csi.storage.k8s.io/serviceAccount.name", "default"),
        ("csi.storage.k8s.io/ephemeral", "false"),
        ("csi.storage.k8s.io/serviceAccount.tokens", "{}"),
        ("example.com/anything", "x"),
    ];

    fn map(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn keys_of_other_components_are_ignored_everywhere() {
        let mut ctx = map(KUBERNETES_KEYS);
        ctx.insert("uid".into(), "1000".into());
        let o = MountOptions::build(&ctx, &[], None).unwrap();
        assert_eq!(o.values.get("uid").map(String::as_str), Some("1000"));
        assert_eq!(o.values.len(), 1, "{o:?}");
        let p = CreateParams::parse(&ctx).unwrap();
        assert_eq!(p.context.keys().collect::<Vec<_>>(), ["uid"], "foreign keys are not passed on");
        // A bare key that is not ours is still an error, next to the foreign ones.
        ctx.insert("colour".into(), "blue".into());
        assert!(MountOptions::build(&ctx, &[], None).unwrap_err().contains("\"colour\""));
        assert!(CreateParams::parse(&ctx).unwrap_err().contains("\"colour\""));
    }

    #[test_case("storage.kubernetes.io/csiProvisionerIdentity", true)]
    #[test_case("csi.storage.k8s.io/ephemeral", true)]
    #[test_case("csi.storage.k8s.io/provisioner-secret-name", true)]
    #[test_case("csi.storage.k8s.io/fstype", true)]
    #[test_case("csi.storage.k8s.io/", true)]
    #[test_case("example.com/uid", true)]
    #[test_case("uid", false)]
    #[test_case("colour", false)]
    #[test_case("uid/", false)]
    #[test_case("/uid", false)]
    #[test_case("Example.com/uid", false)]
    #[test_case("example.com./uid", false)]
    fn key_rule(key: &str, foreign: bool) {
        assert_eq!(OptionKey::classify(key) == OptionKey::Foreign, foreign);
    }

    #[test_case("noexec", "unknown mount option \"noexec\"")]
    #[test_case("uid=abc", "invalid value \"abc\" for option uid")]
    #[test_case("colour=red", "unknown mount option \"colour=red\"")]
    fn bad_mount_flags_name_the_option(flag: &str, want: &str) {
        let err = MountOptions::build(&HashMap::new(), &[flag.to_owned()], None).unwrap_err();
        assert!(err.contains(want), "{err}");
    }

    #[test]
    fn records_round_trip() {
        let r = VolumeRecord {
            driver: DEFAULT_DRIVER_NAME.into(),
            name: "pvc-1".into(),
            capacity_bytes: 1 << 30,
            on_delete: OnDelete::Keep,
            created_unix: 1,
            released_unix: None,
            context: BTreeMap::new(),
        };
        assert_eq!(VolumeRecord::from_json(&r.to_json()).unwrap(), r);
        assert!(String::from_utf8(r.to_json().to_vec()).unwrap().contains("\"onDelete\": \"keep\""));
    }
}
