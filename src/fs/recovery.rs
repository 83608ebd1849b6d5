//! What a mount process leaves for the process that takes its connection over
//! (`--recovery-dir`, see `docs/recovery.md`):
//!
//! - `generation`: how many processes have served this connection; handle numbers carry it.
//! - `inodes`: a journal of the inode table (appended before the kernel learns of a change).
//! - `uploads`: multipart uploads started and not yet completed or aborted.
//! - `handover`: files open for writing at a graceful hand-over, committed, to open again.
//! - `lock`: locked (`flock`) by the process serving the connection for as long as it lives, so
//!   a second process never serves the same connection or writes the same journals; the kernel
//!   drops the lock when the process ends, however it ends.
//!
//! Each journal is one JSON value per line; a torn last line (the process died mid-write) is
//! ignored. The directory is private (0700): it names keys and upload ids.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One change to the inode table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeRecord {
    /// A new inode: number, parent, kind (0 file, 1 dir, 2 symlink), name.
    N(u64, u64, u8, String),
    /// An inode moved to a parent and name.
    M(u64, u64, String),
    /// A name removed (the inode lives on while the kernel holds it).
    U(u64, String),
    /// An inode removed.
    F(u64),
}

/// One change to the set of multipart uploads in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadRecord {
    /// Started: key, upload id.
    Start(String, String),
    /// Completed or aborted: upload id.
    End(String),
}

/// A handle open for writing at a hand-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverHandle {
    pub fh: u64,
    pub ino: u64,
    pub flags: i32,
    /// Whether its data reached S3 before the hand-over (if not, it fails with `EIO`).
    pub committed: bool,
}

/// An append-only journal file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    /// Records written since the file was last rewritten.
    pub appended: u64,
    failed: bool,
}

impl Journal {
    fn open(path: PathBuf) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
        Ok(Journal { path, file: Some(file), appended: 0, failed: false })
    }

    /// Appends one record. A failure is logged once; the mount keeps working, only a successor
    /// would not find everything.
    pub fn append<T: Serialize>(&mut self, record: &T) {
        let Some(file) = self.file.as_mut() else { return };
        let mut line = serde_json::to_string(record).expect("records serialize");
        line.push('\n');
        match file.write_all(line.as_bytes()) {
            Ok(()) => self.appended += 1,
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!(path = %self.path.display(), error = %e,
                    "cannot write the recovery journal; a process taking this mount over after a crash may not find every file");
            }
            Err(_) => {}
        }
    }

    /// Replaces the journal's content with `records` (atomically: write, then rename).
    pub fn rewrite<T: Serialize>(&mut self, records: impl Iterator<Item = T>) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out =
            io::BufWriter::new(OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?);
        let mut n = 0;
        for r in records {
            serde_json::to_writer(&mut out, &r).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
            n += 1;
        }
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, &self.path)?;
        self.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        self.appended = n;
        Ok(())
    }
}

/// Reads every whole record of a journal (none if it does not exist).
fn read_records<T: DeserializeOwned>(path: &Path) -> io::Result<Vec<T>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        match serde_json::from_str(&line) {
            Ok(r) => out.push(r),
            // Only the last line can be torn; anything else is skipped the same way.
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping a damaged recovery record"),
        }
    }
    Ok(out)
}

/// The file in a recovery directory that names the process serving the connection now.
pub const PID_FILE: &str = "pid";

/// The pid recorded in the recovery directory at `root`, if any.
pub fn serving_pid(root: &Path) -> Option<u32> {
    std::fs::read_to_string(root.join(PID_FILE)).ok()?.trim().parse().ok()
}

/// The file a serving process keeps locked.
const LOCK_FILE: &str = "lock";
/// The file every process that served the connection wrote first.
const GENERATION_FILE: &str = "generation";

/// The recovery directory of one mounted connection.
#[derive(Debug, Clone)]
pub struct RecoveryDir {
    root: PathBuf,
}

/// Why a process may not serve with a recovery directory.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryDirError {
    #[error(
        "it holds no record of a mounted connection (no `{GENERATION_FILE}` file): --takeover needs the \
         --recovery-dir the previous process of this mount used"
    )]
    NotUsed,
    #[error(
        "it is in use by process {}, which still serves that connection: a successor may only start \
         once it has exited (SIGUSR2 makes it hand the connection over and exit)",
        .0.map_or_else(|| "(pid unknown)".to_owned(), |p| p.to_string())
    )]
    InUse(Option<u32>),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The lock of the serving process on its recovery directory: held until dropped or the
/// process ends.
#[derive(Debug)]
pub struct ServingLock {
    _file: File,
}

impl RecoveryDir {
    /// Opens (creating, mode 0700) the directory.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
        Ok(RecoveryDir { root: root.to_path_buf() })
    }

    /// Opens the directory of a connection some process served before (`--takeover`): it must
    /// exist and hold that process's records; an empty or mistyped directory would serve the
    /// connection with none of the inodes the kernel knows.
    pub fn open_used(root: &Path) -> Result<Self, RecoveryDirError> {
        match std::fs::metadata(root.join(GENERATION_FILE)) {
            Ok(_) => Ok(RecoveryDir { root: root.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(RecoveryDirError::NotUsed),
            Err(e) => Err(e.into()),
        }
    }

    /// Locks the directory for this process, waiting up to `wait` for a process that is
    /// exiting. Fails with [`RecoveryDirError::InUse`] while another process serves.
    pub fn lock(&self, wait: std::time::Duration) -> Result<ServingLock, RecoveryDirError> {
        let file =
            OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(self.root.join(LOCK_FILE))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ServingLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(RecoveryDirError::InUse(serving_pid(&self.root))),
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Forgets everything an earlier connection left (a fresh mount).
    pub fn clear(&self) -> io::Result<()> {
        for name in [GENERATION_FILE, "inodes", "uploads", "handover", "inodes.tmp", "uploads.tmp"] {
            match std::fs::remove_file(self.root.join(name)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The next generation (1 for a fresh mount), recorded before it is used.
    pub fn next_generation(&self) -> io::Result<u64> {
        let path = self.root.join(GENERATION_FILE);
        let current = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let next = current + 1;
        let tmp = self.root.join("generation.tmp");
        std::fs::write(&tmp, next.to_string())?;
        std::fs::rename(&tmp, &path)?;
        Ok(next)
    }

    /// The inode journal's records so far, and the journal to append to.
    pub fn inodes(&self) -> io::Result<(Vec<InodeRecord>, Journal)> {
        let path = self.root.join("inodes");
        Ok((read_records(&path)?, Journal::open(path)?))
    }

    /// Uploads started and not finished by earlier processes, and the journal to append to
    /// (rewritten empty: the caller aborts the ones returned).
    pub fn uploads(&self) -> io::Result<(Vec<(String, String)>, Journal)> {
        let path = self.root.join("uploads");
        let mut open: Vec<(String, String)> = Vec::new();
        for r in read_records::<UploadRecord>(&path)? {
            match r {
                UploadRecord::Start(key, id) => open.push((key, id)),
                UploadRecord::End(id) => open.retain(|(_, i)| *i != id),
            }
        }
        let mut journal = Journal::open(path)?;
        journal.rewrite(open.iter().map(|(k, i)| UploadRecord::Start(k.clone(), i.clone())))?;
        Ok((open, journal))
    }

    /// Records `pid` as the process serving the connection now (for operators and the node
    /// service; a successor replaces it).
    pub fn write_pid(&self, pid: u32) -> io::Result<()> {
        let tmp = self.root.join("pid.tmp");
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, self.root.join(PID_FILE))
    }

    /// Records the handles a successor opens again.
    pub fn write_handover(&self, handles: &[HandoverHandle]) -> io::Result<()> {
        let tmp = self.root.join("handover.tmp");
        std::fs::write(&tmp, serde_json::to_vec(handles).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, self.root.join("handover"))
    }

    /// Takes the hand-over record, if the previous process left one (it is removed: a later
    /// crash must not reopen the same handles).
    pub fn take_handover(&self) -> io::Result<Option<Vec<HandoverHandle>>> {
        let path = self.root.join("handover");
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(&path)?;
        Ok(Some(serde_json::from_slice(&data).map_err(io::Error::other)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_at_a_time_serves_and_a_takeover_needs_a_used_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rec");
        assert!(matches!(RecoveryDir::open_used(&root), Err(RecoveryDirError::NotUsed)));
        assert!(!root.exists(), "a refused takeover creates nothing");
        let dir = RecoveryDir::open(&root).unwrap();
        assert!(matches!(RecoveryDir::open_used(&root), Err(RecoveryDirError::NotUsed)), "created, never served");
        dir.next_generation().unwrap();
        dir.write_pid(4242).unwrap();
        let held = dir.lock(std::time::Duration::ZERO).unwrap();
        let again = RecoveryDir::open_used(&root).unwrap();
        let err = again.lock(std::time::Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, RecoveryDirError::InUse(Some(4242))), "{err}");
        assert!(err.to_string().contains("in use by process 4242"), "{err}");
        drop(held);
        again.lock(std::time::Duration::ZERO).expect("free once the holder is gone");
    }

    #[test]
    fn journals_replay_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let r = RecoveryDir::open(&dir.path().join("rec")).unwrap();
        assert_eq!(r.next_generation().unwrap(), 1);
        assert_eq!(r.next_generation().unwrap(), 2);
        let (records, mut j) = r.inodes().unwrap();
        assert!(records.is_empty());
        j.append(&InodeRecord::N(2, 1, 0, "a\tb\nc".into()));
        j.append(&InodeRecord::M(2, 1, "d".into()));
        drop(j);
        let mut f = OpenOptions::new().append(true).open(r.root().join("inodes")).unwrap();
        f.write_all(b"{\"F\":").unwrap();
        let (records, _) = r.inodes().unwrap();
        assert_eq!(records, vec![InodeRecord::N(2, 1, 0, "a\tb\nc".into()), InodeRecord::M(2, 1, "d".into())]);
        assert_eq!(serving_pid(r.root()), None);
        r.write_pid(4242).unwrap();
        r.write_pid(4343).unwrap();
        assert_eq!(serving_pid(r.root()), Some(4343), "a successor's pid replaces its predecessor's");
        r.clear().unwrap();
        assert_eq!(r.next_generation().unwrap(), 1);
    }

    #[test]
    fn uploads_left_open_are_returned_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = RecoveryDir::open(dir.path()).unwrap();
        let (open, mut j) = r.uploads().unwrap();
        assert!(open.is_empty());
        j.append(&UploadRecord::Start("k1".into(), "u1".into()));
        j.append(&UploadRecord::Start("k2".into(), "u2".into()));
        j.append(&UploadRecord::End("u1".into()));
        drop(j);
        let (open, mut j) = r.uploads().unwrap();
        assert_eq!(open, vec![("k2".to_owned(), "u2".to_owned())]);
        j.append(&UploadRecord::End("u2".into()));
        drop(j);
        assert!(r.uploads().unwrap().0.is_empty());
    }

    #[test]
    fn the_handover_record_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = RecoveryDir::open(dir.path()).unwrap();
        assert_eq!(r.take_handover().unwrap(), None);
        let h = vec![HandoverHandle { fh: 7, ino: 3, flags: libc::O_WRONLY, committed: true }];
        r.write_handover(&h).unwrap();
        assert_eq!(r.take_handover().unwrap(), Some(h));
        assert_eq!(r.take_handover().unwrap(), None);
    }
}
