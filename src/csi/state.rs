//! The node's record of what it staged and published, one JSON file per volume under
//! `<state-dir>/volumes/`, so a restarted `s3csi csi` can unpublish and unstage volumes staged by
//! its previous instance. Files are replaced atomically (write, fsync, rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One published target (a bind mount of the staging path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRecord {
    pub read_only: bool,
    /// Whether NodePublishVolume created the directory (and so removes it).
    pub created: bool,
}

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    /// The `s3csi mount` process that first served the staging path (0 if unknown), as the keeper
    /// saw it; the one serving it now writes its pid to `pid` in the volume's recovery directory.
    pub pid: u32,
    /// The mount arguments used, to tell a compatible repeat of NodeStageVolume from a conflict.
    pub mount_args: Vec<String>,
    pub created_staging_dir: bool,
    #[serde(default)]
    pub targets: BTreeMap<PathBuf, TargetRecord>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) `<root>/volumes` and `<root>/cache`.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root.join("volumes"))?;
        std::fs::create_dir_all(root.join("cache"))?;
        Ok(StateDir { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, stem: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{stem}.json"))
    }

    /// Per-volume log file of the mount process.
    pub fn log_file(&self, stem: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{stem}.log"))
    }

    /// Per-volume metrics socket of the mount process, collected by the CSI metrics endpoint.
    pub fn metrics_socket(&self, stem: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{stem}{}", crate::metrics::MOUNT_SOCKET_SUFFIX))
    }

    /// Per-volume CA bundle written from a Secret.
    pub fn ca_file(&self, stem: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{stem}.ca.pem"))
    }

    /// Per-volume journal of the mount process (`--recovery-dir`), kept by the keeper.
    pub fn recovery_dir(&self, stem: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{stem}.recovery"))
    }

    /// Per-volume disk cache directory.
    pub fn cache_dir(&self, stem: &str) -> PathBuf {
        self.root.join("cache").join(stem)
    }

    pub fn load(&self, stem: &str) -> std::io::Result<Option<StagedVolume>> {
        match std::fs::read(self.file(stem)) {
            Ok(data) => serde_json::from_slice(&data).map(Some).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, stem: &str, v: &StagedVolume) -> std::io::Result<()> {
        let path = self.file(stem);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Removes a volume's record and everything the node kept for it.
    pub fn remove(&self, stem: &str) -> std::io::Result<()> {
        for p in [self.file(stem), self.ca_file(stem), self.metrics_socket(stem)] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        for dir in [self.cache_dir(stem), self.recovery_dir(stem)] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every record, skipping (and logging) unreadable files.
    pub fn all(&self) -> Vec<StagedVolume> {
        let Ok(dir) = std::fs::read_dir(self.root.join("volumes")) else { return Vec::new() };
        let mut out = Vec::new();
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|d| serde_json::from_slice::<StagedVolume>(&d).map_err(|e| e.to_string()))
                {
                    Ok(v) => out.push(v),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "skipping unreadable state file"),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let mut v = StagedVolume {
            volume_id: "b/p".into(),
            staging_path: "/s".into(),
            pid: 42,
            mount_args: vec!["--read-only".into()],
            created_staging_dir: false,
            targets: BTreeMap::new(),
        };
        v.targets.insert("/t".into(), TargetRecord { read_only: true, created: true });
        state.save("x", &v).unwrap();
        assert_eq!(state.load("x").unwrap(), Some(v.clone()));
        assert_eq!(state.all(), vec![v]);
        std::fs::write(dir.path().join("volumes/junk.json"), b"{").unwrap();
        assert_eq!(state.all().len(), 1, "unreadable files are skipped");
        state.remove("x").unwrap();
        assert_eq!(state.load("x").unwrap(), None);
        state.remove("x").unwrap();
    }
}
