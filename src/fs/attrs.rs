//! The attribute codec: the one place that reads and writes the attributes s3csi keeps in an
//! object's user metadata (`x-amz-meta-s3csi-*`).
//!
//! Invariants:
//! - Every path that rewrites an object's metadata (a commit, `chmod`/`chown`/`utimes`, `mkdir`,
//!   `symlink`) starts from [`StoredAttrs`] decoded from everything stored and encodes all of it
//!   back, so one change never drops another (a `chmod` keeps a stored mtime) and user metadata
//!   of other tools survives.
//! - Decoding never panics: any value S3 returns is input. An invalid value is ignored (the
//!   mount default applies) with one warning that names the key and the value.
//! - Times keep nanoseconds: a decimal number of seconds since the epoch with nine fraction
//!   digits (`981173106.000000042`), negative before 1970.

use std::time::{Duration, SystemTime};

use super::inode::{Kind, Stat};
use crate::s3::{ObjectMeta, UserMetadata};

/// User-metadata names (after `x-amz-meta-`) where file attributes persist.
pub const META_MODE: &str = "s3csi-mode";
pub const META_UID: &str = "s3csi-uid";
pub const META_GID: &str = "s3csi-gid";
pub const META_MTIME: &str = "s3csi-mtime";
pub const META_ATIME: &str = "s3csi-atime";
pub const META_TYPE: &str = "s3csi-type";
/// The value of [`META_TYPE`] for a symbolic link (its target is the object's body).
pub const TYPE_SYMLINK: &str = "symlink";

/// Permission bits and the set-user-ID, set-group-ID and sticky bits.
const MODE_MASK: u16 = 0o7777;

/// The attributes stored with one object, and any other user metadata it carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredAttrs {
    pub mode: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Modification time as the mount reported it (kept to the nanosecond).
    pub mtime: Option<SystemTime>,
    /// Access time, stored only when set explicitly (`utimes`); otherwise it follows mtime.
    pub atime: Option<SystemTime>,
    pub symlink: bool,
    /// User metadata that is not ours, kept as is.
    pub other: UserMetadata,
}

impl StoredAttrs {
    /// Reads everything stored. Invalid values of our keys are dropped with a warning.
    pub fn decode(meta: &UserMetadata) -> Self {
        let mut a = StoredAttrs::default();
        for (k, v) in meta {
            let ok = match k.as_str() {
                META_MODE => {
                    u16::from_str_radix(v, 8).ok().filter(|m| *m <= MODE_MASK).map(|m| a.mode = Some(m)).is_some()
                }
                META_UID => v.parse::<u32>().ok().map(|u| a.uid = Some(u)).is_some(),
                META_GID => v.parse::<u32>().ok().map(|g| a.gid = Some(g)).is_some(),
                META_MTIME => parse_time(v).map(|t| a.mtime = Some(t)).is_some(),
                META_ATIME => parse_time(v).map(|t| a.atime = Some(t)).is_some(),
                META_TYPE => (v == TYPE_SYMLINK).then(|| a.symlink = true).is_some(),
                _ => {
                    a.other.insert(k.clone(), v.clone());
                    true
                }
            };
            if !ok {
                tracing::warn!(key = %k, value = %v, "ignoring an invalid s3csi attribute in object metadata; \
                    the mount default applies");
            }
        }
        a
    }

    /// Everything to store: our keys for the attributes that are set, and the other metadata.
    pub fn encode(&self) -> UserMetadata {
        let mut m = self.other.clone();
        if let Some(mode) = self.mode {
            m.insert(META_MODE.into(), format!("{:o}", mode & MODE_MASK));
        }
        if let Some(uid) = self.uid {
            m.insert(META_UID.into(), uid.to_string());
        }
        if let Some(gid) = self.gid {
            m.insert(META_GID.into(), gid.to_string());
        }
        if let Some(t) = self.mtime {
            m.insert(META_MTIME.into(), format_time(t));
        }
        if let Some(t) = self.atime {
            m.insert(META_ATIME.into(), format_time(t));
        }
        if self.symlink {
            m.insert(META_TYPE.into(), TYPE_SYMLINK.into());
        }
        m
    }

    /// Only our attributes, without other tools' metadata (what a directory record keeps).
    pub fn ours(&self) -> StoredAttrs {
        StoredAttrs { other: UserMetadata::new(), ..self.clone() }
    }

    /// The same attributes, ignoring the times (what a metadata-only change compares).
    pub fn same_except_times(&self, other: &StoredAttrs) -> bool {
        let strip = |a: &StoredAttrs| StoredAttrs { mtime: None, atime: None, ..a.clone() };
        strip(self) == strip(other)
    }
}

/// A decimal number of seconds since the epoch, negative before it, with up to nine fraction
/// digits (`981173106.123456789`, `-301987200.75`); `None` for anything else, including times
/// `SystemTime` cannot hold.
pub fn parse_time(v: &str) -> Option<SystemTime> {
    let (negative, v) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) || (v.contains('.') && frac.is_empty()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse().ok()? };
    let d = Duration::new(secs, nanos);
    if negative { SystemTime::UNIX_EPOCH.checked_sub(d) } else { SystemTime::UNIX_EPOCH.checked_add(d) }
}

/// The inverse of [`parse_time`]: seconds with all nine fraction digits.
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            format!("-{}.{:09}", d.as_secs(), d.subsec_nanos())
        }
    }
}

/// What S3 says about an object: from a HEAD (with metadata) or a listing (without). The mtime
/// is the stored one when there is one, else S3's Last-Modified.
pub(crate) fn stat_from_meta(meta: &ObjectMeta) -> Stat {
    let mut stat = Stat::new(meta.size, meta.last_modified);
    stat.etag = meta.etag.clone();
    if let Some(m) = &meta.user_metadata {
        stat.from_head = true;
        stat.attrs = StoredAttrs::decode(m);
        if let Some(t) = stat.attrs.mtime {
            stat.mtime = t;
        }
    }
    stat
}

pub(crate) fn kind_from_meta(meta: &ObjectMeta) -> Kind {
    match meta.user_metadata.as_ref().and_then(|m| m.get(META_TYPE)) {
        Some(t) if t == TYPE_SYMLINK => Kind::Symlink,
        _ => Kind::File,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use test_case::test_case;

    fn meta(pairs: &[(&str, &str)]) -> UserMetadata {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn everything_stored_round_trips() {
        let a = StoredAttrs {
            mode: Some(0o2755),
            uid: Some(1000),
            gid: Some(2000),
            mtime: Some(SystemTime::UNIX_EPOCH + Duration::new(981_173_106, 123_456_789)),
            atime: Some(SystemTime::UNIX_EPOCH + Duration::new(5, 0)),
            symlink: true,
            other: meta(&[("owner-team", "data")]),
        };
        assert_eq!(StoredAttrs::decode(&a.encode()), a);
        assert!(a.same_except_times(&StoredAttrs { mtime: None, ..a.clone() }));
        assert!(!a.same_except_times(&StoredAttrs { mode: Some(0o600), ..a.clone() }));
    }

    #[test_case(META_MTIME, "18446744073709551615.0")]
    #[test_case(META_MTIME, "1.9999999999")]
    #[test_case(META_MTIME, "12.")]
    #[test_case(META_MTIME, "--1.0")]
    #[test_case(META_MTIME, "1e9")]
    #[test_case(META_MODE, "177777")]
    #[test_case(META_MODE, "rwx")]
    #[test_case(META_UID, "-1")]
    #[test_case(META_GID, "4294967296")]
    #[test_case(META_TYPE, "fifo")]
    fn invalid_values_fall_back_without_panicking(key: &str, value: &str) {
        let a = StoredAttrs::decode(&meta(&[(key, value), ("other-tool", "kept")]));
        assert_eq!(a, StoredAttrs { other: meta(&[("other-tool", "kept")]), ..Default::default() });
    }

    #[test_case("1000000000.5", 1_000_000_000, 500_000_000)]
    #[test_case("978307200.050000000", 978_307_200, 50_000_000)]
    #[test_case("12", 12, 0)]
    fn times_are_decimal_seconds(v: &str, secs: u64, nanos: u32) {
        assert_eq!(parse_time(v), Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)));
    }

    #[test]
    fn times_before_1970_are_kept() {
        let t = SystemTime::UNIX_EPOCH - Duration::new(301_987_200, 250_000_000);
        assert_eq!(format_time(t), "-301987200.250000000");
        assert_eq!(parse_time("-301987200.25"), Some(t));
    }

    proptest! {
        #[test]
        fn times_keep_nanoseconds(secs in 0u64..(1 << 40), nanos in 0u32..1_000_000_000, before in proptest::bool::ANY) {
            let d = Duration::new(secs, nanos);
            let t = if before { SystemTime::UNIX_EPOCH - d } else { SystemTime::UNIX_EPOCH + d };
            prop_assert_eq!(parse_time(&format_time(t)), Some(t));
        }

        #[test]
        fn decoding_any_input_never_panics(k in "s3csi-[a-z]{1,6}", v in "\\PC{0,30}") {
            let _ = StoredAttrs::decode(&meta(&[(&k, &v)]));
        }
    }
}
