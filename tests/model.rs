//! Randomized model tests: the same random operations run on s3csi and on a local directory
//! (the model), and every result must match.
//!
//! - **Mount** ([`random_operations_match_a_local_directory`]): the real `s3csi` binary mounts a
//!   bucket of a real S3 server on 127.0.0.1; operations run as programs run them, through
//!   std::fs / libc on the mount path. A pool of open descriptors lives across steps (several
//!   per file, read-only and writable, `O_APPEND`), so reads through one descriptor interleave
//!   with writes through another. After the run S3 is compared with the model, and again the
//!   mount after a remount (contents, modes, mtimes, symlinks).
//! - **Core** ([`core_operations_match_a_local_directory`]): the same operations through the
//!   public async API of `S3Fs` over `FakeStore`, without a kernel; the driver does what the
//!   kernel does (path walk, symlinks, `O_TRUNC` as a truncate after open, `O_APPEND` at the
//!   size, FLUSH then RELEASE on close).
//! - **Core with failures** ([`core_survives_injected_s3_failures`]): the core again, behind a
//!   [`FaultyStore`] failing, delaying and cutting random S3 calls. An operation may then fail;
//!   once every handle is released, every object in S3 must hold bytes that file had at an
//!   operation boundary (old or new, never a mix), no multipart upload may be left open, and
//!   the model continues from what S3 holds.
//!
//! What the model allows beyond POSIX, as the README documents it: a read-only descriptor may
//! keep reading the version it opened (any whole earlier state of the file, never a mix) or fail
//! with `ESTALE`; directory mtimes are not compared (adding entries does not change them); file
//! mtimes are compared exactly when `utimes` set them (to times before 2010) and must otherwise
//! be recent.
//!
//! Every run prints its seed; `S3CSI_TEST_SEED` replays it, `S3CSI_TEST_STEPS` sets the number
//! of steps of each test case. `long_*` tests (ignored; `cargo test --release --test model --
//! --ignored long_`) run many seeds; `scripts/model-soak.sh` does the same seed by seed.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::IntoRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::faulty::{CallKind, FaultyStore, Rule};
use common::{Backend, DaemonLog, Mount, S3Server, assert_same_bytes, random_bytes, read_at_most, server_for, sha256};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use s3csi::cache::BlockCache;
use s3csi::config::{FsConfig, Ownership, Prefix};
use s3csi::fs::inode::{Kind, ROOT_INO};
use s3csi::fs::write::WriteConfig;
use s3csi::fs::{Attr, Caller, FsError, S3Fs, SetAttr, StoredAttrs};
use s3csi::s3::ObjectStore;
use s3csi::s3::fake::FakeStore;
use test_case::test_case;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// --- Settings ---

/// Names of files and directories alike, so that operations collide often.
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
/// New entries go into directories at most this deep (the root is 0).
const MAX_PARENT_DEPTH: usize = 2;
/// Most files stay below this.
const SMALL_MAX: usize = 256 * KIB;
/// A few files are at least this big: with `--part-size 5MiB` they stream as multipart uploads
/// and, when modified in place, commit with UploadPartCopy for their unchanged parts.
const LARGE_MIN: usize = 6 * MIB;
const LARGE_MAX: usize = 11 * MIB;
const MAX_LARGE_FILES: usize = 2;
/// Descriptors kept open across steps.
const POOL: usize = 6;
/// Default run: a fixed seed, so CI is reproducible.
const DEFAULT_SEED: u64 = 0x5eed_2024;
/// Steps of each mounted run (they cost real S3 round trips, moto is slow).
const DEFAULT_MOUNT_STEPS: usize = 700;
/// Steps of each core run (in memory: cheap).
const DEFAULT_CORE_STEPS: usize = 1500;
/// Full tree comparison every this many steps.
const COMPARE_EVERY: usize = 50;
/// `utimes` sets times before this (2010), so a time the mount shows is either one of those,
/// exactly, or recent.
const OLD_TIME_LIMIT: i64 = 1_262_304_000;
/// Operations of the `long_*` soak tests, across seeds.
const SOAK_OPS: usize = 100_000;
/// Modes `chmod` picks from.
const MODES: [u32; 9] = [0o600, 0o640, 0o644, 0o664, 0o700, 0o755, 0o444, 0o000, 0o777];

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn seed() -> u64 {
    env_number("S3CSI_TEST_SEED").unwrap_or(DEFAULT_SEED)
}

fn steps(default: usize) -> usize {
    env_number("S3CSI_TEST_STEPS").map_or(default, |n| n as usize)
}

// --- Operations ---

/// Pseudo-random bytes described by seed and length (short in `Debug` output).
#[derive(Clone, Copy)]
struct Data {
    seed: u64,
    len: usize,
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes #{:x}", self.len, self.seed)
    }
}

impl Data {
    fn bytes(&self) -> Vec<u8> {
        random_bytes(self.seed, self.len)
    }
}

/// File contents compared in full but printed as length + hash.
#[derive(PartialEq, Clone)]
struct Content(Vec<u8>);

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes sha256 {}", self.0.len(), &sha256(&self.0)[..16])
    }
}

/// How a pooled descriptor was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    Read,
    Write,
    ReadWrite,
    /// `O_WRONLY | O_APPEND`.
    Append,
}

impl OpenMode {
    fn readable(self) -> bool {
        matches!(self, OpenMode::Read | OpenMode::ReadWrite)
    }

    fn writable(self) -> bool {
        !matches!(self, OpenMode::Read)
    }

    fn flags(self) -> i32 {
        match self {
            OpenMode::Read => libc::O_RDONLY,
            OpenMode::Write => libc::O_WRONLY,
            OpenMode::ReadWrite => libc::O_RDWR,
            OpenMode::Append => libc::O_WRONLY | libc::O_APPEND,
        }
    }
}

/// One step, applied with the same calls to s3csi and to the local model.
#[derive(Debug, Clone)]
enum Op {
    /// `File::create` (or `create_new`), write, close.
    Create {
        path: String,
        data: Data,
        exclusive: bool,
    },
    /// Open for writing without truncation, `write_all_at` (possibly past EOF), close.
    Pwrite {
        path: String,
        offset: u64,
        data: Data,
    },
    /// Open with O_APPEND, write, close.
    Append {
        path: String,
        data: Data,
    },
    /// Open for writing, `set_len`, close.
    Ftruncate {
        path: String,
        len: u64,
    },
    /// `truncate(2)` by path.
    Truncate {
        path: String,
        len: u64,
    },
    /// Open (creating), write, fsync, note what is durable, write again, close.
    Fsync {
        path: String,
        first: (u64, Data),
        second: (u64, Data),
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    /// `symlink(target, path)`; targets are relative and stay inside the tree.
    Symlink {
        path: String,
        target: String,
    },
    Readlink {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    /// `utimensat` of atime and mtime to the same (old) time.
    Utimes {
        path: String,
        secs: i64,
        nsecs: i64,
    },
    Read {
        path: String,
    },
    Stat {
        path: String,
    },
    Readdir {
        path: String,
    },
    /// Opens a descriptor into pool slot `slot`.
    Open {
        slot: usize,
        path: String,
        mode: OpenMode,
        create: bool,
        truncate: bool,
    },
    /// `pwrite` at `offset`, or `write` on an `O_APPEND` descriptor.
    FdWrite {
        slot: usize,
        offset: u64,
        data: Data,
    },
    /// `pread` of up to `len` bytes.
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    FdTruncate {
        slot: usize,
        len: u64,
    },
    FdSync {
        slot: usize,
    },
    Close {
        slot: usize,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Pwrite { .. } => "pwrite",
            Op::Append { .. } => "append",
            Op::Ftruncate { .. } => "ftruncate",
            Op::Truncate { .. } => "truncate",
            Op::Fsync { .. } => "fsync",
            Op::Rename { .. } => "rename",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Chmod { .. } => "chmod",
            Op::Utimes { .. } => "utimes",
            Op::Read { .. } => "read",
            Op::Stat { .. } => "stat",
            Op::Readdir { .. } => "readdir",
            Op::Open { .. } => "open",
            Op::FdWrite { .. } => "fd write",
            Op::FdRead { .. } => "fd read",
            Op::FdTruncate { .. } => "fd truncate",
            Op::FdSync { .. } => "fd fsync",
            Op::Close { .. } => "close",
        }
    }
}

/// An errno, printed with its description.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Errno(i32);

impl std::fmt::Debug for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 < 0 {
            return write!(f, "error without errno");
        }
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(-1))
    }
}

impl From<FsError> for Errno {
    fn from(e: FsError) -> Errno {
        Errno(e.errno())
    }
}

/// How an mtime compares: exactly when `utimes` set it, else it must just be recent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mtime {
    Set(i64, i64),
    Recent,
    /// Not compared (directories).
    Any,
}

fn mtime_class(secs: i64, nsecs: i64) -> Mtime {
    if secs < OLD_TIME_LIMIT { Mtime::Set(secs, nsecs) } else { Mtime::Recent }
}

fn system_mtime(t: SystemTime) -> Mtime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => mtime_class(d.as_secs() as i64, i64::from(d.subsec_nanos())),
        Err(e) => Mtime::Set(-(e.duration().as_secs() as i64), 0),
    }
}

/// What a successful step returned.
#[derive(Debug, PartialEq, Clone)]
enum Done {
    Unit,
    Read(Content),
    Stat {
        kind: char,
        size: u64,
        mode: u32,
        mtime: Mtime,
    },
    /// What the storage held right after `fsync` (the model file, or the S3 object).
    Durable(Option<Content>),
    Link(String),
    Names(Vec<String>),
}

type Outcome = Result<Done, Errno>;

// --- The model tree ---

/// Entries by relative path: directories (`""` is the root), files with sizes, symlinks.
#[derive(Debug, Default)]
struct Tree {
    dirs: BTreeSet<String>,
    files: BTreeMap<String, u64>,
    links: BTreeSet<String>,
}

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }
}

fn depth(rel: &str) -> usize {
    if rel.is_empty() { 0 } else { rel.split('/').count() }
}

fn scan(root: &Path) -> Tree {
    fn walk(root: &Path, rel: &str, tree: &mut Tree) {
        tree.dirs.insert(rel.to_owned());
        for e in std::fs::read_dir(root.join(rel)).expect("read model dir") {
            let e = e.expect("model dir entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let child = join_rel(rel, &name);
            let meta = std::fs::symlink_metadata(root.join(&child)).expect("model entry metadata");
            if meta.is_dir() {
                walk(root, &child, tree);
            } else if meta.file_type().is_symlink() {
                tree.links.insert(child);
            } else {
                tree.files.insert(child, meta.len());
            }
        }
    }
    let mut tree = Tree::default();
    walk(root, "", &mut tree);
    tree
}

/// What one randomized run may do; each server lacks something.
#[derive(Debug, Clone, Copy)]
struct Profile {
    backend: Backend,
    /// mkdir, rmdir and directory renames, chmod/utimes of directories. An empty directory
    /// exists only as its marker, so this needs moto (s3s-fs cannot store markers).
    dir_ops: bool,
    /// Files of LARGE_MIN..LARGE_MAX: multipart uploads and UploadPartCopy. These need s3s-fs:
    /// moto 5.2 answers CompleteMultipartUpload with a `CompleteMultipartUploadResponse` root
    /// element, which the Rust SDK rejects (it expects `CompleteMultipartUploadResult`).
    large_files: bool,
}

/// Without directory operations, these directories exist from the start, each holding a
/// [`SENTINEL`] file that no step touches, so none is ever empty (s3s-fs could not show it).
const FIXED_DIRS: [&str; 3] = ["d0", "d1", "d0/d2"];
const SENTINEL: &str = ".keep";

/// What the generator knows of a pooled descriptor.
#[derive(Debug, Clone, Copy)]
struct SlotView {
    mode: OpenMode,
    size: u64,
}

struct OpGen {
    rng: StdRng,
    profile: Profile,
}

impl OpGen {
    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.rng.random_range(0..items.len())]
    }

    fn name(&mut self) -> &'static str {
        NAMES[self.rng.random_range(0..NAMES.len())]
    }

    /// A directory to put something in: usually an existing, shallow one; sometimes a random
    /// path (missing, or a file) to provoke ENOENT / ENOTDIR.
    fn parent(&mut self, tree: &Tree) -> String {
        if self.rng.random_bool(0.1) {
            let n = self.rng.random_range(1..=2);
            return (0..n).map(|_| self.name()).collect::<Vec<_>>().join("/");
        }
        if self.rng.random_bool(0.35) {
            return String::new();
        }
        let shallow: Vec<&String> = tree.dirs.iter().filter(|d| depth(d) <= MAX_PARENT_DEPTH).collect();
        self.pick(&shallow).to_string()
    }

    fn new_path(&mut self, tree: &Tree) -> String {
        let parent = self.parent(tree);
        let name = self.name();
        join_rel(&parent, name)
    }

    /// An existing file (mostly; sometimes a symlink), or any path.
    fn file(&mut self, tree: &Tree) -> String {
        let files: Vec<&String> = tree.files.keys().filter(|f| !f.ends_with(SENTINEL)).collect();
        if !tree.links.is_empty() && self.rng.random_bool(0.05) {
            let links: Vec<&String> = tree.links.iter().collect();
            return self.pick(&links).to_string();
        }
        if !files.is_empty() && self.rng.random_bool(0.9) {
            return self.pick(&files).to_string();
        }
        self.new_path(tree)
    }

    /// An existing directory other than the root (mostly), or any path.
    fn dir(&mut self, tree: &Tree) -> String {
        let dirs: Vec<&String> = tree.dirs.iter().filter(|d| !d.is_empty()).collect();
        if !dirs.is_empty() && self.rng.random_bool(0.85) {
            return self.pick(&dirs).to_string();
        }
        self.new_path(tree)
    }

    /// Any existing entry (mostly), or any path.
    fn entry(&mut self, tree: &Tree) -> String {
        if self.rng.random_bool(0.6) { self.file(tree) } else { self.dir(tree) }
    }

    /// What chmod and utimes change: files and links, and directories when they may.
    fn attr_target(&mut self, tree: &Tree) -> String {
        if self.profile.dir_ops { self.entry(tree) } else { self.file(tree) }
    }

    fn data(&mut self, len: usize) -> Data {
        Data { seed: self.rng.random(), len }
    }

    fn small_len(&mut self) -> usize {
        match self.rng.random_range(0..10) {
            0..6 => self.rng.random_range(0..4 * KIB),
            6..9 => self.rng.random_range(4 * KIB..64 * KIB),
            _ => self.rng.random_range(64 * KIB..SMALL_MAX),
        }
    }

    fn truncate_len(&mut self, size: u64) -> u64 {
        match self.rng.random_range(0..10) {
            0..3 => 0,
            3..6 => self.rng.random_range(0..=size),
            6..9 => self.rng.random_range(size..=size + 64 * KIB as u64),
            _ => size,
        }
    }

    fn old_time(&mut self) -> (i64, i64) {
        (self.rng.random_range(900_000_000..OLD_TIME_LIMIT - 1), self.rng.random_range(0..1_000_000_000))
    }

    fn open(&mut self, tree: &Tree, slots: &[Option<SlotView>]) -> Op {
        let free: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].is_none()).collect();
        if free.is_empty() {
            return self.close(slots);
        }
        let slot = *self.pick(&free);
        let path = self.file(tree);
        let mode = match self.rng.random_range(0..20) {
            0..7 => OpenMode::Read,
            7..11 => OpenMode::Write,
            11..16 => OpenMode::ReadWrite,
            _ => OpenMode::Append,
        };
        let create = mode.writable() && self.rng.random_bool(0.3);
        let truncate = mode.writable() && self.rng.random_bool(0.1);
        Op::Open { slot, path, mode, create, truncate }
    }

    fn close(&mut self, slots: &[Option<SlotView>]) -> Op {
        let open: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].is_some()).collect();
        match open.is_empty() {
            true => Op::Close { slot: 0 },
            false => Op::Close { slot: *self.pick(&open) },
        }
    }

    /// An open slot whose mode passes `want`, if any.
    fn slot(&mut self, slots: &[Option<SlotView>], want: fn(OpenMode) -> bool) -> Option<(usize, SlotView)> {
        let fit: Vec<(usize, SlotView)> =
            slots.iter().enumerate().filter_map(|(i, s)| s.filter(|s| want(s.mode)).map(|s| (i, s))).collect();
        (!fit.is_empty()).then(|| *self.pick(&fit))
    }

    fn op(&mut self, tree: &Tree, slots: &[Option<SlotView>]) -> Op {
        let size_of = |path: &str| tree.files.get(path).copied().unwrap_or(0);
        match self.rng.random_range(0..100) {
            0..9 => {
                let path = self.new_path(tree);
                let large = tree.files.values().filter(|s| **s >= LARGE_MIN as u64).count();
                let len = if self.profile.large_files && large < MAX_LARGE_FILES && self.rng.random_bool(0.05) {
                    self.rng.random_range(LARGE_MIN..=LARGE_MAX)
                } else {
                    self.small_len()
                };
                Op::Create { path, data: self.data(len), exclusive: self.rng.random_bool(0.1) }
            }
            9..14 => {
                let path = self.file(tree);
                let size = size_of(&path);
                // Anywhere in the file or up to 32 KiB past its end (a hole).
                let offset = self.rng.random_range(0..=size + 32 * KIB as u64);
                let len = self.rng.random_range(1..=64 * KIB);
                Op::Pwrite { path, offset, data: self.data(len) }
            }
            14..17 => {
                let path = self.file(tree);
                let len = self.rng.random_range(0..=32 * KIB);
                Op::Append { path, data: self.data(len) }
            }
            17..19 => {
                let path = self.file(tree);
                let len = self.truncate_len(size_of(&path));
                Op::Ftruncate { path, len }
            }
            19..21 => {
                let path = self.file(tree);
                let len = self.truncate_len(size_of(&path));
                Op::Truncate { path, len }
            }
            21..23 => {
                let path = self.file(tree);
                let size = size_of(&path);
                let at = self.rng.random_range(0..=size);
                let len = self.rng.random_range(1..=16 * KIB);
                let first = (at, self.data(len));
                let end = size.max(at + len as u64);
                let at = self.rng.random_range(0..=end + 4 * KIB as u64);
                let len = self.rng.random_range(1..=16 * KIB);
                let second = (at, self.data(len));
                Op::Fsync { path, first, second }
            }
            23..30 if self.profile.dir_ops => {
                let from = self.entry(tree);
                let to = if self.rng.random_bool(0.3) { self.entry(tree) } else { self.new_path(tree) };
                Op::Rename { from, to }
            }
            23..30 => {
                let from = self.file(tree);
                let to = if self.rng.random_bool(0.3) { self.file(tree) } else { self.new_path(tree) };
                Op::Rename { from, to }
            }
            30..33 => Op::Unlink { path: self.entry(tree) },
            33..37 if self.profile.dir_ops => Op::Mkdir { path: self.new_path(tree) },
            33..37 => {
                // In place of mkdir: more small creates.
                let path = self.new_path(tree);
                let len = self.small_len();
                Op::Create { path, data: self.data(len), exclusive: false }
            }
            // Without directory operations this is always ENOTEMPTY, ENOTDIR or ENOENT.
            37..39 => Op::Rmdir { path: self.dir(tree) },
            39..41 => {
                let path = self.new_path(tree);
                let target = if self.rng.random_bool(0.7) {
                    self.name().to_owned()
                } else {
                    format!("{}/{}", self.name(), self.name())
                };
                Op::Symlink { path, target }
            }
            41..42 => {
                let links: Vec<&String> = tree.links.iter().collect();
                let path = if !links.is_empty() && self.rng.random_bool(0.8) {
                    self.pick(&links).to_string()
                } else {
                    self.entry(tree)
                };
                Op::Readlink { path }
            }
            42..45 => Op::Chmod { path: self.attr_target(tree), mode: *self.pick(&MODES) },
            45..48 => {
                let (secs, nsecs) = self.old_time();
                Op::Utimes { path: self.attr_target(tree), secs, nsecs }
            }
            48..52 => Op::Read { path: self.file(tree) },
            52..55 => Op::Stat { path: self.entry(tree) },
            55..57 => {
                let path = if self.rng.random_bool(0.3) { String::new() } else { self.dir(tree) };
                Op::Readdir { path }
            }
            57..67 => self.open(tree, slots),
            67..79 => {
                let Some((slot, view)) = self.slot(slots, OpenMode::writable) else { return self.open(tree, slots) };
                let big = self.profile.large_files && view.size < LARGE_MAX as u64 && self.rng.random_bool(0.25);
                let len = if big { self.rng.random_range(MIB..=2 * MIB) } else { self.rng.random_range(1..=64 * KIB) };
                let offset = match self.rng.random_range(0..10) {
                    0..5 => view.size,
                    _ => self.rng.random_range(0..=view.size + 16 * KIB as u64),
                };
                Op::FdWrite { slot, offset, data: self.data(len) }
            }
            79..87 => {
                let Some((slot, view)) = self.slot(slots, OpenMode::readable) else { return self.open(tree, slots) };
                let offset = self.rng.random_range(0..=view.size);
                let len = if self.rng.random_bool(0.2) {
                    (view.size - offset) as usize + 1
                } else {
                    self.rng.random_range(1..=128 * KIB)
                };
                Op::FdRead { slot, offset, len }
            }
            87..89 => {
                let Some((slot, view)) = self.slot(slots, OpenMode::writable) else { return self.open(tree, slots) };
                Op::FdTruncate { slot, len: self.truncate_len(view.size) }
            }
            89..91 => {
                let Some((slot, _)) = self.slot(slots, |_| true) else { return self.open(tree, slots) };
                Op::FdSync { slot }
            }
            _ => {
                if slots.iter().all(Option::is_none) {
                    return self.open(tree, slots);
                }
                self.close(slots)
            }
        }
    }
}

// --- Running an operation on a real directory (the mount or the model) ---

/// A descriptor kept open across steps; on the model side also every whole state its file
/// had since it was opened (what a read-only descriptor on the mount may still read).
struct Slot {
    file: File,
    mode: OpenMode,
    snapshots: Vec<Vec<u8>>,
}

type Pool = Vec<Option<Slot>>;

fn new_pool() -> Pool {
    (0..POOL).map(|_| None).collect()
}

/// Closes `f` and returns what `close(2)` returned (the commit result on this filesystem).
fn close_checked(f: File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by its `File`, so it is open and is closed exactly once here.
    if unsafe { libc::close(fd) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn check_rc(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// `truncate(2)` by path.
fn truncate_path(p: &Path, len: u64) -> std::io::Result<()> {
    let c = c_path(p);
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    check_rc(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) })
}

/// Sets atime and mtime of `p` (following symlinks) to `secs.nsecs`.
fn set_times(p: &Path, secs: i64, nsecs: i64) -> std::io::Result<()> {
    let c = c_path(p);
    let t = libc::timespec { tv_sec: secs, tv_nsec: nsecs };
    let times = [t, t];
    // SAFETY: `c` is a valid path and `times` two valid timespecs, both outliving the call.
    check_rc(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) })
}

fn stat_of(m: &std::fs::Metadata) -> Done {
    let (kind, mtime) = if m.is_dir() {
        ('d', Mtime::Any)
    } else if m.file_type().is_symlink() {
        ('l', mtime_class(m.mtime(), m.mtime_nsec()))
    } else {
        ('f', mtime_class(m.mtime(), m.mtime_nsec()))
    };
    Done::Stat { kind, size: if m.is_dir() { 0 } else { m.len() }, mode: m.mode() & 0o7777, mtime }
}

fn sorted_names(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

fn slot(pool: &Pool, i: usize) -> &Slot {
    pool[i].as_ref().expect("the generator picks open slots")
}

fn run_op(op: &Op, root: &Path, pool: &mut Pool, durable: &dyn Fn(&str) -> Option<Vec<u8>>) -> Outcome {
    let p = |rel: &str| root.join(rel);
    let done: std::io::Result<Done> = (|| {
        match op {
            Op::Create { path, data, exclusive } => {
                let mut o = OpenOptions::new();
                o.write(true);
                if *exclusive {
                    o.create_new(true);
                } else {
                    o.create(true).truncate(true);
                }
                let mut f = o.open(p(path))?;
                f.write_all(&data.bytes())?;
                close_checked(f)?;
            }
            Op::Pwrite { path, offset, data } => {
                let f = OpenOptions::new().write(true).open(p(path))?;
                f.write_all_at(&data.bytes(), *offset)?;
                close_checked(f)?;
            }
            Op::Append { path, data } => {
                let mut f = OpenOptions::new().append(true).open(p(path))?;
                f.write_all(&data.bytes())?;
                close_checked(f)?;
            }
            Op::Ftruncate { path, len } => {
                let f = OpenOptions::new().write(true).open(p(path))?;
                f.set_len(*len)?;
                close_checked(f)?;
            }
            Op::Truncate { path, len } => truncate_path(&p(path), *len)?,
            Op::Fsync { path, first, second } => {
                let f = OpenOptions::new().write(true).create(true).truncate(false).open(p(path))?;
                f.write_all_at(&first.1.bytes(), first.0)?;
                f.sync_all()?;
                let snapshot = durable(path).map(Content);
                f.write_all_at(&second.1.bytes(), second.0)?;
                close_checked(f)?;
                return Ok(Done::Durable(snapshot));
            }
            Op::Rename { from, to } => std::fs::rename(p(from), p(to))?,
            Op::Unlink { path } => std::fs::remove_file(p(path))?,
            Op::Mkdir { path } => std::fs::create_dir(p(path))?,
            Op::Rmdir { path } => std::fs::remove_dir(p(path))?,
            Op::Symlink { path, target } => std::os::unix::fs::symlink(target, p(path))?,
            Op::Readlink { path } => {
                return Ok(Done::Link(std::fs::read_link(p(path))?.to_string_lossy().into_owned()));
            }
            Op::Chmod { path, mode } => std::fs::set_permissions(p(path), std::fs::Permissions::from_mode(*mode))?,
            Op::Utimes { path, secs, nsecs } => set_times(&p(path), *secs, *nsecs)?,
            Op::Read { path } => return Ok(Done::Read(Content(std::fs::read(p(path))?))),
            Op::Stat { path } => return Ok(stat_of(&std::fs::symlink_metadata(p(path))?)),
            Op::Readdir { path } => return Ok(Done::Names(sorted_names(&p(path))?)),
            Op::Open { slot, path, mode, create, truncate } => {
                let mut o = OpenOptions::new();
                match mode {
                    OpenMode::Read => o.read(true),
                    OpenMode::Write => o.write(true),
                    OpenMode::ReadWrite => o.read(true).write(true),
                    OpenMode::Append => o.append(true),
                };
                // std refuses append with truncate; open(2) does not.
                o.create(*create).custom_flags(if *truncate { libc::O_TRUNC } else { 0 });
                let file = o.open(p(path))?;
                let snapshots = Vec::new();
                pool[*slot] = Some(Slot { file, mode: *mode, snapshots });
            }
            Op::FdWrite { slot: i, offset, data } => {
                let s = slot(pool, *i);
                if s.mode == OpenMode::Append {
                    (&s.file).write_all(&data.bytes())?;
                } else {
                    s.file.write_all_at(&data.bytes(), *offset)?;
                }
            }
            Op::FdRead { slot: i, offset, len } => {
                return Ok(Done::Read(Content(read_at_most(&slot(pool, *i).file, *offset, *len)?)));
            }
            Op::FdTruncate { slot: i, len } => slot(pool, *i).file.set_len(*len)?,
            Op::FdSync { slot: i } => slot(pool, *i).file.sync_all()?,
            Op::Close { slot: i } => {
                if let Some(s) = pool[*i].take() {
                    close_checked(s.file)?;
                }
            }
        }
        Ok(Done::Unit)
    })();
    done.map_err(Errno::from)
}

/// Whole contents of the file behind a descriptor.
fn fd_contents(file: &File) -> Vec<u8> {
    let meta = file.metadata().expect("fstat a model descriptor");
    if meta.is_dir() {
        return Vec::new();
    }
    let len = meta.len();
    read_at_most(file, 0, len as usize).expect("read a model descriptor")
}

/// Records, for every read-only descriptor of the model, the state its file has now.
fn note_snapshots(pool: &mut Pool) {
    for s in pool.iter_mut().flatten().filter(|s| s.mode == OpenMode::Read) {
        let now = fd_contents(&s.file);
        if s.snapshots.last() != Some(&now) {
            s.snapshots.push(now);
        }
    }
}

fn slot_views(pool: &Pool) -> Vec<Option<SlotView>> {
    pool.iter()
        .map(|s| s.as_ref().map(|s| SlotView { mode: s.mode, size: s.file.metadata().map(|m| m.len()).unwrap_or(0) }))
        .collect()
}

/// Whether s3csi's outcome is allowed given the model's. Exact, except that a read through a
/// descriptor may fail with ESTALE (its object was replaced), and a read through a read-only
/// descriptor may return a whole earlier state of its file (never a mix of two).
fn agrees(op: &Op, got: &Outcome, want: &Outcome, model_pool: &Pool) -> bool {
    if got == want {
        return true;
    }
    let Op::FdRead { slot, offset, len } = op else { return false };
    // Any handle reads the object version it opened: once that object is replaced, ESTALE.
    if *got == Err(Errno(libc::ESTALE)) {
        return true;
    }
    let Some(s) = model_pool[*slot].as_ref().filter(|s| s.mode == OpenMode::Read) else { return false };
    match got {
        Ok(Done::Read(Content(bytes))) => s.snapshots.iter().any(|snap| {
            let start = (*offset as usize).min(snap.len());
            let end = (start + len).min(snap.len());
            snap[start..end] == bytes[..]
        }),
        _ => false,
    }
}

// --- Comparing whole trees ---

/// Compares a mounted tree with the model: names, kinds, sizes, contents, modes, mtimes and
/// symlink targets.
fn compare_trees(model: &Path, mount: &Path, ctx: &dyn Fn() -> String) {
    fn walk(model: &Path, mount: &Path, rel: &str, ctx: &dyn Fn() -> String) {
        let want = sorted_names(&model.join(rel)).expect("list model dir");
        let got =
            sorted_names(&mount.join(rel)).unwrap_or_else(|e| panic!("{}: readdir /{rel} on the mount: {e}", ctx()));
        assert_eq!(got, want, "{}: entries of /{rel} (mount vs local model)", ctx());
        for name in want {
            let child = join_rel(rel, &name);
            let lm = std::fs::symlink_metadata(model.join(&child)).expect("stat model entry");
            let mm = std::fs::symlink_metadata(mount.join(&child))
                .unwrap_or_else(|e| panic!("{}: stat /{child} on the mount: {e}", ctx()));
            assert_eq!(stat_of(&mm), stat_of(&lm), "{}: stat of /{child} (mount vs model)", ctx());
            if lm.is_dir() {
                walk(model, mount, &child, ctx);
            } else if lm.file_type().is_symlink() {
                let want = std::fs::read_link(model.join(&child)).expect("readlink model");
                let got = std::fs::read_link(mount.join(&child))
                    .unwrap_or_else(|e| panic!("{}: readlink /{child} on the mount: {e}", ctx()));
                assert_eq!(got, want, "{}: target of /{child}", ctx());
            } else {
                let want = std::fs::read(model.join(&child)).expect("read model file");
                let got = std::fs::read(mount.join(&child))
                    .unwrap_or_else(|e| panic!("{}: read /{child} on the mount: {e}", ctx()));
                assert_same_bytes(&got, &want, &format!("{}: contents of /{child}", ctx()));
            }
        }
    }
    walk(model, mount, "", ctx);
}

/// Whether `key` is a directory attribute record (s3csi's, not data).
fn is_record(key: &str) -> bool {
    key.rsplit('/').next() == Some(s3csi::fs::records::RECORD_NAME)
}

/// Data keys (without records) and the model, after unmount: every model file or symlink is an
/// object with its bytes (a symlink's are its target), every model directory a marker or a
/// prefix of some key, and no other key exists.
fn compare_keys(keys: &[String], get: &dyn Fn(&str) -> Vec<u8>, model: &Path, ctx: &dyn Fn() -> String) {
    let tree = scan(model);
    let keys: BTreeSet<&String> = keys.iter().filter(|k| !is_record(k)).collect();
    for key in &keys {
        match key.strip_suffix('/') {
            Some(dir) => assert!(tree.dirs.contains(dir), "{}: marker {key:?} in S3 for no model directory", ctx()),
            None => assert!(
                tree.files.contains_key(*key) || tree.links.contains(*key),
                "{}: object {key:?} in S3 for no model file",
                ctx()
            ),
        }
    }
    for file in tree.files.keys().chain(tree.links.iter()) {
        assert!(keys.contains(file), "{}: model file /{file} has no object in S3", ctx());
        let want = match tree.links.contains(file) {
            true => std::fs::read_link(model.join(file)).expect("readlink model").as_os_str().as_bytes().to_vec(),
            false => std::fs::read(model.join(file)).expect("read model file"),
        };
        assert_same_bytes(&get(file), &want, &format!("{}: object {file} in S3", ctx()));
    }
    for dir in tree.dirs.iter().filter(|d| !d.is_empty()) {
        let marker = format!("{dir}/");
        assert!(
            keys.iter().any(|k| k.starts_with(&marker)),
            "{}: model directory /{dir} is neither a marker nor a prefix in S3",
            ctx()
        );
    }
}

/// The last steps, for failure messages.
struct History {
    seed: u64,
    lines: VecDeque<String>,
}

impl History {
    fn new(seed: u64) -> History {
        History { seed, lines: VecDeque::new() }
    }

    fn push(&mut self, line: String) {
        self.lines.push_back(line);
        if self.lines.len() > 2000 {
            self.lines.pop_front();
        }
    }

    fn ctx(&self, what: &str, step: usize) -> String {
        let hist: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        format!(
            "{what}: seed {} (replay: S3CSI_TEST_SEED={}), step {step}\n--- last steps ---\n{}\n---",
            self.seed,
            self.seed,
            hist.join("\n")
        )
    }
}

/// Per-operation counts: (run, succeeded on the model).
type Counts = BTreeMap<&'static str, (usize, usize)>;

fn count(counts: &mut Counts, op: &Op, ok: bool) {
    let c = counts.entry(op.kind()).or_default();
    c.0 += 1;
    c.1 += usize::from(ok);
}

// --- 1. On a real mount ---

/// The object behind `rel` on the mount, following symlinks the way the kernel does.
fn object_behind(server: &S3Server, bucket: &str, mount: &Path, rel: &str) -> Option<Vec<u8>> {
    let real = std::fs::canonicalize(mount.join(rel)).ok()?;
    let key = real.strip_prefix(mount).ok()?.to_str()?.to_owned();
    server.list_keys(bucket, &key).contains(&key).then(|| server.get(bucket, &key))
}

/// One mounted run of `steps` steps from `seed`; returns the number of steps run.
fn mounted_run(profile: Profile, seed: u64, steps: usize) {
    eprintln!("mounted model {profile:?}: seed {seed} ({steps} steps); replay with S3CSI_TEST_SEED={seed}");
    let server = server_for(profile.backend);
    let bucket = server.unique_bucket("model");
    let model_dir = tempfile::Builder::new().prefix("s3csi-model-").tempdir().expect("tempdir for the model");
    let model = model_dir.path().to_owned();
    let log = DaemonLog::new();
    let args = ["--part-size", "5MiB", "--log-file", log.arg()];
    let mount = Mount::new(&server, &bucket, &args);
    if !profile.dir_ops {
        for dir in FIXED_DIRS {
            for root in [mount.path(), model.as_path()] {
                std::fs::create_dir(root.join(dir))
                    .unwrap_or_else(|e| panic!("mkdir {dir} in {}: {e}", root.display()));
                let mut f = File::create(root.join(dir).join(SENTINEL)).expect("create a sentinel");
                f.write_all(dir.as_bytes()).expect("write a sentinel");
                close_checked(f).expect("close a sentinel");
            }
        }
    }
    let mut ops = OpGen { rng: StdRng::seed_from_u64(seed), profile };
    let mut history = History::new(seed);
    let started = Instant::now();
    let mut counts = Counts::new();
    let (mut mount_pool, mut model_pool) = (new_pool(), new_pool());
    let mount_path = mount.path().to_owned();
    let durable = |rel: &str| object_behind(&server, &bucket, &mount_path, rel);
    for step in 0..steps {
        let tree = scan(&model);
        let op = ops.op(&tree, &slot_views(&model_pool));
        let on_mount = run_op(&op, mount.path(), &mut mount_pool, &durable);
        let on_model = run_op(&op, &model, &mut model_pool, &|rel| std::fs::read(model.join(rel)).ok());
        count(&mut counts, &op, on_model.is_ok());
        history.push(format!("{step}: {op:?} -> {on_model:?}"));
        if !agrees(&op, &on_mount, &on_model, &model_pool) {
            panic!(
                "mount and local model differ\n{}\nop:    {op:?}\nmount: {on_mount:?}\nlocal: {on_model:?}",
                history.ctx("mounted model", step)
            );
        }
        note_snapshots(&mut model_pool);
        if (step + 1) % COMPARE_EVERY == 0 {
            compare_trees(&model, mount.path(), &|| history.ctx("mounted model", step));
        }
        if (step + 1) % 250 == 0 {
            eprintln!("step {}: {:?}", step + 1, started.elapsed());
        }
    }
    for slot in 0..POOL {
        let op = Op::Close { slot };
        let on_mount = run_op(&op, mount.path(), &mut mount_pool, &durable);
        let on_model = run_op(&op, &model, &mut model_pool, &|_| None);
        assert_eq!(on_mount, on_model, "{}: closing slot {slot} at the end", history.ctx("mounted model", steps));
    }
    compare_trees(&model, mount.path(), &|| history.ctx("mounted model, all closed", steps));
    let tree = scan(&model);
    eprintln!(
        "{steps} steps in {:?}; per op (run, succeeded): {counts:?}; final model: {} dirs, {} files, {} links, {} bytes",
        started.elapsed(),
        tree.dirs.len(),
        tree.files.len(),
        tree.links.len(),
        tree.files.values().sum::<u64>()
    );
    mount.unmount();
    let keys = server.list_keys(&bucket, "");
    compare_keys(&keys, &|k| server.get(&bucket, k), &model, &|| history.ctx("after unmount", steps));
    let mount = Mount::new(&server, &bucket, &args);
    compare_trees(&model, mount.path(), &|| history.ctx("after remount", steps));
    mount.unmount();
}

/// Two runs, because neither local server does everything: on moto with directory operations
/// (markers) and small files; on s3s-fs with large files (multipart, UploadPartCopy) in fixed,
/// never-empty directories.
#[test_case(Profile { backend: Backend::Faithful, dir_ops: true, large_files: false }; "moto_with_directories")]
#[test_case(Profile { backend: Backend::Fast, dir_ops: false, large_files: true }; "s3s_fs_with_large_files")]
fn random_operations_match_a_local_directory(profile: Profile) {
    mounted_run(profile, seed(), steps(DEFAULT_MOUNT_STEPS));
}

/// Seeds after `first`, each run `per_seed` steps, until `total` steps have run.
fn soak_seeds(first: u64, per_seed: usize, total: usize) -> impl Iterator<Item = u64> {
    (0..total.div_ceil(per_seed) as u64).map(move |i| first.wrapping_add(i))
}

#[test_case(Profile { backend: Backend::Faithful, dir_ops: true, large_files: false }; "moto_with_directories")]
#[test_case(Profile { backend: Backend::Fast, dir_ops: false, large_files: true }; "s3s_fs_with_large_files")]
#[ignore = "by hand: 100,000 operations across seeds (see README, Tests)"]
fn long_mounted_soak(profile: Profile) {
    let per_seed = steps(2000);
    // Half of the soak's operations on mounts, a quarter on each profile.
    for seed in soak_seeds(seed(), per_seed, SOAK_OPS / 4) {
        mounted_run(profile, seed, per_seed);
    }
}

// --- 2. The core, without a kernel ---

type Faulty = FaultyStore<FakeStore>;

/// One open handle of the core driver. `fh` is `None` for a directory opened read-only.
#[derive(Debug, Clone, Copy)]
struct CoreSlot {
    ino: u64,
    fh: Option<u64>,
    mode: OpenMode,
}

/// Where a path leads: its parent directory, final name, the path with symlinks resolved, and
/// what is there.
struct Found {
    parent: u64,
    name: String,
    path: String,
    attr: Option<Attr>,
}

/// Drives `S3Fs` as the kernel would for the same system calls.
struct Core {
    fs: S3Fs<Faulty>,
    store: Arc<Faulty>,
    pool: Vec<Option<CoreSlot>>,
    caller: Caller,
}

const ENOENT: Errno = Errno(libc::ENOENT);

fn core_config(staging: &Path, ttl: Duration) -> FsConfig {
    FsConfig {
        prefix: "".parse::<Prefix>().expect("empty prefix"),
        read_only: false,
        ownership: Ownership { uid: 0, gid: 0, file_mode: 0o644, dir_mode: 0o755, group_forced: false },
        metadata_ttl: ttl,
        stall_limit: s3csi::config::DEFAULT_S3_TIMEOUT,
        max_gets: s3csi::fs::prefetch::MAX_CONCURRENT_GETS,
        write: WriteConfig {
            part_size: 5 << 20,
            buffer_bytes: 32 << 20,
            staging_dir: staging.to_owned(),
            staging_bytes: 1 << 30,
        },
    }
}

impl Core {
    fn new(store: Arc<Faulty>, staging: &Path, ttl: Duration) -> Core {
        let cache = Arc::new(BlockCache::new(64 << 20, None));
        let fs = S3Fs::new(Arc::clone(&store), cache, core_config(staging, ttl)).expect("S3Fs::new");
        // The test process runs as root with umask 022, like the mounted run.
        Core { fs, store, pool: (0..POOL).map(|_| None).collect(), caller: Caller::ROOT }
    }

    async fn lookup(&self, dir: u64, name: &str) -> Result<Option<Attr>, Errno> {
        match self.fs.lookup(dir, name).await {
            Ok(a) => Ok(Some(a)),
            Err(FsError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The kernel's path walk: ENOENT for a missing directory, ENOTDIR for a file on the way,
    /// symlinks followed (the last one only with `follow`), ELOOP after 40.
    async fn walk(&self, rel: &str, follow: bool) -> Result<Found, Errno> {
        let mut todo: VecDeque<String> = rel.split('/').map(str::to_owned).collect();
        let (mut dir, mut dir_path, mut links) = (ROOT_INO, String::new(), 0);
        loop {
            let name = todo.pop_front().expect("paths have a name");
            let last = todo.is_empty();
            let attr = self.lookup(dir, &name).await?;
            match attr {
                None if last => return Ok(Found { parent: dir, path: join_rel(&dir_path, &name), name, attr }),
                None => return Err(ENOENT),
                Some(a) if a.kind == Kind::Symlink && (!last || follow) => {
                    links += 1;
                    if links > 40 {
                        return Err(Errno(libc::ELOOP));
                    }
                    let target = self.fs.readlink(a.ino).await?;
                    let target = String::from_utf8(target.to_vec()).expect("utf-8 target");
                    for part in target.split('/').rev() {
                        todo.push_front(part.to_owned());
                    }
                }
                Some(a) if last => {
                    return Ok(Found { parent: dir, path: join_rel(&dir_path, &name), name, attr: Some(a) });
                }
                Some(a) if a.kind == Kind::Dir => {
                    dir = a.ino;
                    dir_path = join_rel(&dir_path, &name);
                }
                Some(_) => return Err(Errno(libc::ENOTDIR)),
            }
        }
    }

    /// open(2): with `create`, through a dangling symlink too; `O_EXCL` never follows.
    async fn open(
        &self,
        rel: &str,
        mode: OpenMode,
        create: bool,
        exclusive: bool,
        trunc: bool,
    ) -> Result<CoreSlot, Errno> {
        let found = self.walk(rel, !exclusive).await?;
        let flags = mode.flags();
        match &found.attr {
            Some(_) if exclusive => Err(Errno(libc::EEXIST)),
            Some(a) if a.kind == Kind::Dir => match mode.writable() {
                true => Err(Errno(libc::EISDIR)),
                false => Ok(CoreSlot { ino: a.ino, fh: None, mode }),
            },
            Some(a) => {
                let fh = self.fs.open(a.ino, flags).await?;
                // Without atomic O_TRUNC the kernel opens, then truncates through the handle.
                if trunc
                    && let Err(e) = self.setattr(a.ino, Some(fh), SetAttr { size: Some(0), ..Default::default() }).await
                {
                    let _ = self.fs.release(fh).await;
                    return Err(e);
                }
                Ok(CoreSlot { ino: a.ino, fh: Some(fh), mode })
            }
            None if create => {
                let mut flags = flags | libc::O_CREAT;
                if trunc {
                    flags |= libc::O_TRUNC;
                }
                if exclusive {
                    flags |= libc::O_EXCL;
                }
                let (attr, fh) = self.fs.create(self.caller, found.parent, &found.name, 0o644, flags).await?;
                Ok(CoreSlot { ino: attr.ino, fh: Some(fh), mode })
            }
            None => Err(ENOENT),
        }
    }

    async fn setattr(&self, ino: u64, fh: Option<u64>, changes: SetAttr) -> Result<(), Errno> {
        self.fs.setattr(self.caller, ino, fh, changes).await.map(|_| ()).map_err(Errno::from)
    }

    /// write(2) of `data` at `offset` (the size, for O_APPEND), in requests of at most 1 MiB.
    async fn write(&self, s: CoreSlot, offset: Option<u64>, data: &[u8]) -> Result<(), Errno> {
        let fh = s.fh.ok_or(Errno(libc::EBADF))?;
        let mut at = match offset {
            Some(o) => o,
            None => self.fs.getattr(s.ino).await?.size,
        };
        for chunk in data.chunks(MIB) {
            self.fs.write(fh, at, chunk).await?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// pread(2) of up to `len` bytes.
    async fn read(&self, s: CoreSlot, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let fh = s.fh.ok_or(Errno(libc::EISDIR))?;
        let mut out = Vec::new();
        while out.len() < len {
            let want = (len - out.len()).min(MIB) as u32;
            let got: Vec<u8> = self.fs.read(fh, offset + out.len() as u64, want).await?.concat();
            if got.is_empty() {
                break;
            }
            out.extend_from_slice(&got);
        }
        Ok(out)
    }

    /// close(2): FLUSH (its result is close's), then RELEASE.
    async fn close(&self, s: CoreSlot) -> Result<(), Errno> {
        let Some(fh) = s.fh else { return Ok(()) };
        let flushed = self.fs.flush(fh).await;
        let _ = self.fs.release(fh).await;
        flushed.map_err(Errno::from)
    }

    /// read(2) to the end through a fresh descriptor.
    async fn read_path(&self, rel: &str) -> Result<Vec<u8>, Errno> {
        let s = self.open(rel, OpenMode::Read, false, false, false).await?;
        let data = self.read(s, 0, usize::MAX).await;
        let closed = self.close(s).await;
        let data = data?;
        closed?;
        Ok(data)
    }

    async fn stat(&self, rel: &str) -> Outcome {
        let found = self.walk(rel, false).await?;
        let a = found.attr.ok_or(ENOENT)?;
        let (kind, mtime) = match a.kind {
            Kind::Dir => ('d', Mtime::Any),
            Kind::Symlink => ('l', system_mtime(a.mtime)),
            Kind::File => ('f', system_mtime(a.mtime)),
        };
        Ok(Done::Stat { kind, size: a.size, mode: u32::from(a.perm) & 0o7777, mtime })
    }

    async fn readdir(&self, rel: &str) -> Result<Vec<String>, Errno> {
        let ino = if rel.is_empty() {
            ROOT_INO
        } else {
            let a = self.walk(rel, true).await?.attr.ok_or(ENOENT)?;
            if a.kind != Kind::Dir {
                return Err(Errno(libc::ENOTDIR));
            }
            a.ino
        };
        let fh = self.fs.opendir(ino).await?;
        let entries = self.fs.readdir(ino, fh, 0);
        self.fs.releasedir(fh);
        let mut names: Vec<String> =
            entries?.into_iter().map(|(_, e)| e.name).filter(|n| n != "." && n != "..").collect();
        names.sort();
        Ok(names)
    }

    async fn rename(&self, from: &str, to: &str) -> Result<(), Errno> {
        let src = self.walk(from, false).await?;
        let dst = self.walk(to, false).await?;
        let s = src.attr.as_ref().ok_or(ENOENT)?;
        let under = |a: &str, b: &str| a.starts_with(&format!("{b}/"));
        // The VFS order: a source above the target, then a target above the source, then kinds.
        if s.kind == Kind::Dir && under(&dst.path, &src.path) {
            return Err(Errno(libc::EINVAL));
        }
        if let Some(d) = &dst.attr {
            if under(&src.path, &dst.path) {
                return Err(Errno(libc::ENOTEMPTY));
            }
            if d.ino == s.ino {
                return Ok(());
            }
            match (s.kind == Kind::Dir, d.kind == Kind::Dir) {
                (false, true) => return Err(Errno(libc::EISDIR)),
                (true, false) => return Err(Errno(libc::ENOTDIR)),
                _ => {}
            }
        }
        Ok(self.fs.rename(src.parent, &src.name, dst.parent, &dst.name, 0).await?)
    }

    fn slot(&self, i: usize) -> CoreSlot {
        self.pool[i].expect("the generator picks open slots")
    }

    async fn run(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Create { path, data, exclusive } => {
                let s = self.open(path, OpenMode::Write, true, *exclusive, !*exclusive).await?;
                let written = self.write(s, Some(0), &data.bytes()).await;
                let closed = self.close(s).await;
                written?;
                closed?;
            }
            Op::Pwrite { path, offset, data } => {
                let s = self.open(path, OpenMode::Write, false, false, false).await?;
                let written = self.write(s, Some(*offset), &data.bytes()).await;
                let closed = self.close(s).await;
                written?;
                closed?;
            }
            Op::Append { path, data } => {
                let s = self.open(path, OpenMode::Append, false, false, false).await?;
                let written = if data.len == 0 { Ok(()) } else { self.write(s, None, &data.bytes()).await };
                let closed = self.close(s).await;
                written?;
                closed?;
            }
            Op::Ftruncate { path, len } => {
                let s = self.open(path, OpenMode::Write, false, false, false).await?;
                let r = self.setattr(s.ino, s.fh, SetAttr { size: Some(*len), ..Default::default() }).await;
                let closed = self.close(s).await;
                r?;
                closed?;
            }
            Op::Truncate { path, len } => {
                let a = self.walk(path, true).await?.attr.ok_or(ENOENT)?;
                if a.kind == Kind::Dir {
                    return Err(Errno(libc::EISDIR));
                }
                self.setattr(a.ino, None, SetAttr { size: Some(*len), ..Default::default() }).await?;
            }
            Op::Fsync { path, first, second } => {
                // Where the bytes land, found before any fault can hide it.
                let key = self.walk(path, true).await?.path;
                let s = self.open(path, OpenMode::Write, true, false, false).await?;
                let r = async {
                    self.write(s, Some(first.0), &first.1.bytes()).await?;
                    self.fs.flush(s.fh.expect("a file")).await?;
                    let snapshot = self.store.inner().data(&key).map(|b| Content(b.to_vec()));
                    self.write(s, Some(second.0), &second.1.bytes()).await?;
                    Ok::<_, Errno>(snapshot)
                }
                .await;
                let closed = self.close(s).await;
                let snapshot = r?;
                closed?;
                return Ok(Done::Durable(snapshot));
            }
            Op::Rename { from, to } => self.rename(from, to).await?,
            Op::Unlink { path } => {
                let found = self.walk(path, false).await?;
                found.attr.ok_or(ENOENT)?;
                self.fs.unlink(found.parent, &found.name).await?;
            }
            Op::Mkdir { path } => {
                let found = self.walk(path, false).await?;
                if found.attr.is_some() {
                    return Err(Errno(libc::EEXIST));
                }
                self.fs.mkdir(self.caller, found.parent, &found.name, 0o755).await?;
            }
            Op::Rmdir { path } => {
                let found = self.walk(path, false).await?;
                found.attr.ok_or(ENOENT)?;
                self.fs.rmdir(found.parent, &found.name).await?;
            }
            Op::Symlink { path, target } => {
                let found = self.walk(path, false).await?;
                if found.attr.is_some() {
                    return Err(Errno(libc::EEXIST));
                }
                self.fs.symlink(self.caller, found.parent, &found.name, target).await?;
            }
            Op::Readlink { path } => {
                let a = self.walk(path, false).await?.attr.ok_or(ENOENT)?;
                let target = self.fs.readlink(a.ino).await?;
                return Ok(Done::Link(String::from_utf8_lossy(&target).into_owned()));
            }
            Op::Chmod { path, mode } => {
                let a = self.walk(path, true).await?.attr.ok_or(ENOENT)?;
                self.setattr(a.ino, None, SetAttr { mode: Some(*mode as u16), ..Default::default() }).await?;
            }
            Op::Utimes { path, secs, nsecs } => {
                let a = self.walk(path, true).await?.attr.ok_or(ENOENT)?;
                let t = UNIX_EPOCH + Duration::new(*secs as u64, *nsecs as u32);
                self.setattr(a.ino, None, SetAttr { mtime: Some(t), atime: Some(t), ..Default::default() }).await?;
            }
            Op::Read { path } => return Ok(Done::Read(Content(self.read_path(path).await?))),
            Op::Stat { path } => return self.stat(path).await,
            Op::Readdir { path } => return Ok(Done::Names(self.readdir(path).await?)),
            Op::Open { slot, path, mode, create, truncate } => {
                let s = self.open(path, *mode, *create, false, *truncate).await?;
                self.pool[*slot] = Some(s);
            }
            Op::FdWrite { slot, offset, data } => {
                let s = self.slot(*slot);
                let at = (s.mode != OpenMode::Append).then_some(*offset);
                self.write(s, at, &data.bytes()).await?;
            }
            Op::FdRead { slot, offset, len } => {
                return Ok(Done::Read(Content(self.read(self.slot(*slot), *offset, *len).await?)));
            }
            Op::FdTruncate { slot, len } => {
                let s = self.slot(*slot);
                self.setattr(s.ino, s.fh, SetAttr { size: Some(*len), ..Default::default() }).await?;
            }
            Op::FdSync { slot } => {
                if let Some(fh) = self.slot(*slot).fh {
                    self.fs.flush(fh).await?;
                }
            }
            Op::Close { slot } => {
                if let Some(s) = self.pool[*slot].take() {
                    self.close(s).await?;
                }
            }
        }
        Ok(Done::Unit)
    }
}

/// A runtime for the core: one thread, so a seed replays (nearly) the same interleaving.
fn core_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Longest wait for background aborts: their retries back off to 30 s.
const ABORTS_SETTLE: Duration = Duration::from_secs(75);

/// Compares what the core shows with the model, through the core: names, stat, contents and
/// symlink targets of every entry.
async fn compare_core_tree(core: &mut Core, model: &Path, ctx: &dyn Fn() -> String) {
    let tree = scan(model);
    let mut none = new_pool();
    for dir in &tree.dirs {
        let op = Op::Readdir { path: dir.clone() };
        let (got, want) = (core.run(&op).await, run_op(&op, model, &mut none, &|_| None));
        assert_eq!(got, want, "{}: readdir /{dir} (core vs model)", ctx());
    }
    for path in tree.dirs.iter().filter(|d| !d.is_empty()).chain(tree.files.keys()).chain(tree.links.iter()) {
        let mut ops = vec![Op::Stat { path: path.clone() }];
        if tree.files.contains_key(path) {
            ops.push(Op::Read { path: path.clone() });
        }
        if tree.links.contains(path) {
            ops.push(Op::Readlink { path: path.clone() });
        }
        for op in ops {
            let (got, want) = (core.run(&op).await, run_op(&op, model, &mut none, &|_| None));
            assert_eq!(got, want, "{}: {op:?} (core vs model)", ctx());
        }
    }
}

/// Where a session's operations come from: the generator, or a fixed list (a replay).
enum Script<'a> {
    Generate(usize),
    Replay(&'a [Op]),
}

/// Whether `op` can run with the model's pool as it is (a replay whose earlier steps were
/// dropped may name a slot that is not open, or open with another mode).
fn runnable(op: &Op, pool: &Pool) -> bool {
    let mode = |slot: &usize| pool[*slot].as_ref().map(|s| s.mode);
    match op {
        Op::Open { slot, .. } => pool[*slot].is_none(),
        Op::FdWrite { slot, .. } | Op::FdTruncate { slot, .. } => mode(slot).is_some_and(OpenMode::writable),
        Op::FdRead { slot, .. } => mode(slot).is_some_and(OpenMode::readable),
        Op::FdSync { slot } | Op::Close { slot } => mode(slot).is_some(),
        _ => true,
    }
}

/// One core session without failures, every outcome as the model's (see [`agrees`]); panics
/// at the first difference. Every operation run is appended to `log`.
fn core_session(seed: u64, script: Script, log: &mut Vec<Op>) {
    core_session_with(seed, script, log, Duration::from_secs(60));
}

/// [`core_session`] with metadata TTL zero: every lookup asks S3 again.
fn core_session_no_ttl(seed: u64, script: Script, log: &mut Vec<Op>) {
    core_session_with(seed, script, log, Duration::ZERO);
}

fn core_session_with(seed: u64, script: Script, log: &mut Vec<Op>, ttl: Duration) {
    let profile = Profile { backend: Backend::Fast, dir_ops: true, large_files: true };
    let model_dir = tempfile::Builder::new().prefix("s3csi-model-").tempdir().expect("tempdir for the model");
    let staging = tempfile::Builder::new().prefix("s3csi-staging-").tempdir().expect("tempdir for staging");
    let model = model_dir.path().to_owned();
    let fake = Arc::new(FakeStore::new("model"));
    let store = Arc::new(FaultyStore::new(Arc::clone(&fake), seed));
    let rt = core_runtime();
    let mut core = Core::new(Arc::clone(&store), staging.path(), ttl);
    let mut ops = OpGen { rng: StdRng::seed_from_u64(seed), profile };
    let mut history = History::new(seed);
    let mut counts = Counts::new();
    let mut model_pool = new_pool();
    let started = Instant::now();
    let steps = match script {
        Script::Generate(n) => n,
        Script::Replay(list) => list.len(),
    };
    for step in 0..steps {
        let op = match script {
            Script::Generate(_) => ops.op(&scan(&model), &slot_views(&model_pool)),
            Script::Replay(list) if runnable(&list[step], &model_pool) => list[step].clone(),
            Script::Replay(_) => continue,
        };
        log.push(op.clone());
        let on_core = rt.block_on(core.run(&op));
        let on_model = run_op(&op, &model, &mut model_pool, &|rel| std::fs::read(model.join(rel)).ok());
        count(&mut counts, &op, on_model.is_ok());
        history.push(format!("{step}: {op:?} -> {on_model:?}"));
        if !agrees(&op, &on_core, &on_model, &model_pool) {
            panic!(
                "core and local model differ at {}: core {} vs local {}\n{}\nop:    {op:?}\ncore:  {on_core:?}\n\
                 local: {on_model:?}",
                op.kind(),
                outcome_kind(&on_core),
                outcome_kind(&on_model),
                history.ctx("core model", step)
            );
        }
        note_snapshots(&mut model_pool);
        // A replay compares after its last step, so dropping the steps after a difference keeps it.
        let last = matches!(script, Script::Replay(_)) && step + 1 == steps;
        if (step + 1) % COMPARE_EVERY == 0 || last {
            rt.block_on(compare_core_tree(&mut core, &model, &|| history.ctx("core model", step)));
        }
    }
    for slot in 0..POOL {
        let op = Op::Close { slot };
        let on_core = rt.block_on(core.run(&op));
        let on_model = run_op(&op, &model, &mut model_pool, &|_| None);
        assert_eq!(on_core, on_model, "{}: closing slot {slot} at the end", history.ctx("core model", steps));
    }
    rt.block_on(compare_core_tree(&mut core, &model, &|| history.ctx("core model, all closed", steps)));
    rt.block_on(core.fs.flush_records());
    let keys = fake.keys();
    compare_keys(&keys, &|k| fake.data(k).map(|b| b.to_vec()).unwrap_or_default(), &model, &|| {
        history.ctx("core model, S3 at the end", steps)
    });
    assert_eq!(fake.pending_uploads(), 0, "{}: multipart uploads left open", history.ctx("core model", steps));
    // A new filesystem over the same bucket: what persists (contents, modes, mtimes, links).
    let mut fresh = Core::new(Arc::clone(&store), staging.path(), ttl);
    rt.block_on(compare_core_tree(&mut fresh, &model, &|| history.ctx("core model, fresh filesystem", steps)));
    if matches!(script, Script::Generate(_)) {
        eprintln!("{steps} core steps in {:?}; per op (run, succeeded): {counts:?}", started.elapsed());
    }
}

fn outcome_kind(o: &Outcome) -> String {
    match o {
        Ok(Done::Unit) => "Ok".into(),
        Ok(Done::Read(_)) => "Ok(bytes)".into(),
        Ok(Done::Stat { .. }) => "Ok(stat)".into(),
        Ok(Done::Durable(_)) => "Ok(durable bytes)".into(),
        Ok(Done::Link(_)) => "Ok(link)".into(),
        Ok(Done::Names(_)) => "Ok(names)".into(),
        Err(e) => format!("{e:?}"),
    }
}

/// What kind of failure a panic message describes: its first line without numbers, so a
/// shrunk replay is known to fail the same way.
fn failure_kind(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    first.chars().filter(|c| !c.is_ascii_digit()).collect()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<String>(), payload.downcast_ref::<&str>()) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => (*s).to_owned(),
        _ => "panic without a message".to_owned(),
    }
}

/// Runs `session` on a replay of `ops`; the failure kind when it panics.
fn replay_fails(session: fn(u64, Script, &mut Vec<Op>), seed: u64, ops: &[Op]) -> Option<String> {
    replay_message(session, seed, ops).map(|m| failure_kind(&m))
}

/// Runs `session` on a replay of `ops`; the panic message when it panics.
fn replay_message(session: fn(u64, Script, &mut Vec<Op>), seed: u64, ops: &[Op]) -> Option<String> {
    let mut log = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session(seed, Script::Replay(ops), &mut log)));
    r.err().map(|p| panic_message(&*p))
}

/// A failure message without its list of last steps.
fn without_history(message: &str) -> String {
    match (message.find("--- last steps ---"), message.rfind("\n---")) {
        (Some(a), Some(b)) if b > a => format!("{}{}", &message[..a], &message[b + 4..]),
        _ => message.to_owned(),
    }
}

/// Shrinks a failing list of operations to a short one that fails the same way: drops chunks,
/// then single steps, while the failure stays (bounded by `budget`).
fn shrink(session: fn(u64, Script, &mut Vec<Op>), seed: u64, ops: Vec<Op>, kind: &str, budget: Duration) -> Vec<Op> {
    let started = Instant::now();
    quiet_panics_while_shrinking();
    SHRINKING.with(|s| s.set(true));
    let mut ops = ops;
    let mut chunk = ops.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut i = 0;
        while i < ops.len() && started.elapsed() < budget {
            let mut candidate = ops.clone();
            candidate.drain(i..(i + chunk).min(ops.len()));
            if replay_fails(session, seed, &candidate).as_deref() == Some(kind) {
                ops = candidate;
            } else {
                i += chunk;
            }
        }
        chunk /= 2;
    }
    SHRINKING.with(|s| s.set(false));
    ops
}

thread_local! {
    /// Set while this thread replays candidates: their panics are expected and not printed.
    static SHRINKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays quiet on threads that are shrinking.
fn quiet_panics_while_shrinking() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !SHRINKING.with(|s| s.get()) {
                previous(info);
            }
        }));
    });
}

/// Runs a generated session; on failure prints a shrunk replay of it, then fails the same way.
fn run_and_shrink(session: fn(u64, Script, &mut Vec<Op>), seed: u64, steps: usize) {
    let mut log = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session(seed, Script::Generate(steps), &mut log)));
    let Err(payload) = r else { return };
    let message = panic_message(&*payload);
    let kind = failure_kind(&message);
    let budget = Duration::from_secs(env_number("S3CSI_TEST_SHRINK_SECS").unwrap_or(120));
    let small = shrink(session, seed, log, &kind, budget);
    let listed: Vec<String> = small.iter().enumerate().map(|(i, op)| format!("  {i}: {op:?}")).collect();
    SHRINKING.with(|s| s.set(true));
    let how = replay_message(session, seed, &small).map(|m| without_history(&m)).unwrap_or_default();
    SHRINKING.with(|s| s.set(false));
    eprintln!(
        "--- shrunk to {} operations that fail the same way ({kind}) ---\n{}\n--- the shrunk replay fails with ---\n{how}\n",
        small.len(),
        listed.join("\n")
    );
    std::panic::resume_unwind(payload);
}

/// Once with the mount's caching of metadata, once asking S3 on every lookup.
#[test_case(core_session; "metadata_ttl_60s")]
#[test_case(core_session_no_ttl; "metadata_ttl_0")]
fn core_operations_match_a_local_directory(session: fn(u64, Script, &mut Vec<Op>)) {
    let (seed, steps) = (seed(), steps(DEFAULT_CORE_STEPS));
    eprintln!("core model: seed {seed} ({steps} steps); replay with S3CSI_TEST_SEED={seed}");
    run_and_shrink(session, seed, steps);
}

// --- 3. The core with S3 failures ---

/// Marks, in a path's history, that the path may have no object.
const ABSENT: &str = "absent";

/// For each path: every content (hash, or [`ABSENT`]) a file there had at an operation
/// boundary since the last check. S3 may hold any of them, and nothing else.
#[derive(Default)]
struct Seen {
    paths: HashMap<String, HashSet<String>>,
    /// Hash cache by (path, size, mtime, inode).
    hashes: HashMap<(String, u64, i64, i64, u64), String>,
}

impl Seen {
    /// Starts over from the model as it is (after a check).
    fn reset(&mut self, model: &Path) {
        self.paths.clear();
        self.note(model, false);
    }

    fn hash_of(&mut self, model: &Path, path: &str, link: bool) -> String {
        let full = model.join(path);
        let m = std::fs::symlink_metadata(&full).expect("stat model entry");
        let key = (path.to_owned(), m.len(), m.mtime(), m.mtime_nsec(), m.ino());
        if let Some(h) = self.hashes.get(&key) {
            return h.clone();
        }
        let bytes = match link {
            true => std::fs::read_link(&full).expect("readlink model").as_os_str().as_bytes().to_vec(),
            false => std::fs::read(&full).expect("read model file"),
        };
        let h = sha256(&bytes);
        self.hashes.insert(key, h.clone());
        h
    }

    /// Adds what the model holds now; paths new since the last check may also be absent.
    fn note(&mut self, model: &Path, new_may_be_absent: bool) {
        let tree = scan(model);
        let present: Vec<(String, bool)> =
            tree.files.keys().map(|f| (f.clone(), false)).chain(tree.links.iter().map(|l| (l.clone(), true))).collect();
        for (path, link) in &present {
            let h = self.hash_of(model, path, *link);
            let set = self.paths.entry(path.clone()).or_default();
            if set.is_empty() && new_may_be_absent {
                set.insert(ABSENT.to_owned());
            }
            set.insert(h);
        }
        let now: HashSet<&String> = present.iter().map(|(p, _)| p).collect();
        for (path, set) in self.paths.iter_mut() {
            if !now.contains(path) {
                set.insert(ABSENT.to_owned());
            }
        }
    }

    /// A rename (done or not, whole or in part): keys under `to` may hold what was under `from`.
    fn renamed(&mut self, from: &str, to: &str) {
        let moved: Vec<(String, HashSet<String>)> = self
            .paths
            .iter()
            .filter_map(|(p, set)| {
                let rest =
                    if p == from { Some("") } else { p.strip_prefix(&format!("{from}/")).map(|_| &p[from.len()..]) };
                rest.map(|rest| (format!("{to}{rest}"), set.clone()))
            })
            .collect();
        for (p, set) in moved {
            let entry = self.paths.entry(p).or_default();
            entry.insert(ABSENT.to_owned());
            entry.extend(set);
        }
    }
}

/// After a failure, with every handle closed and aborts finished: every object holds bytes its
/// path had at an operation boundary since the last check (never a mix), every model file that
/// cannot be absent is there, and no multipart upload is open. Returns a description of what
/// differs from the model (files that took their old content or vanished), for the log.
fn check_store(
    fake: &FakeStore,
    model: &Path,
    seen: &Seen,
    unknowable: usize,
    ctx: &dyn Fn() -> String,
) -> Vec<String> {
    assert!(
        fake.pending_uploads() <= unknowable,
        "{}: {} multipart uploads left open after every handle closed ({unknowable} made by cut creates)",
        ctx(),
        fake.pending_uploads()
    );
    let mut notes = Vec::new();
    let keys: Vec<String> = fake.keys().into_iter().filter(|k| !is_record(k) && !k.ends_with('/')).collect();
    let tree = scan(model);
    for key in &keys {
        let bytes = fake.data(key).expect("listed key");
        let h = sha256(&bytes);
        let allowed = seen.paths.get(key);
        assert!(
            allowed.is_some_and(|set| set.contains(&h)),
            "{}: object {key:?} ({} bytes, sha256 {}) holds content that no file at that path had at any \
             operation boundary since the last check (a mix of versions?); allowed: {allowed:?}",
            ctx(),
            bytes.len(),
            &h[..16]
        );
        if !tree.files.contains_key(key) && !tree.links.contains(key) {
            notes.push(format!("{key} is in S3 but not in the model"));
        }
    }
    for path in tree.files.keys().chain(tree.links.iter()) {
        if !keys.contains(path) {
            let may = seen.paths.get(path).is_some_and(|set| set.contains(ABSENT));
            assert!(may, "{}: model file /{path} has no object in S3 although it existed throughout", ctx());
            notes.push(format!("{path} is missing from S3"));
        }
    }
    notes
}

/// Rebuilds the model directory from what S3 holds: the core, whose metadata TTL is zero,
/// shows exactly that once every handle is closed.
fn model_from_store(fake: &FakeStore, model: &Path) {
    for e in std::fs::read_dir(model).expect("read model root") {
        let p = e.expect("model entry").path();
        let m = std::fs::symlink_metadata(&p).expect("stat model entry");
        if m.is_dir() {
            std::fs::remove_dir_all(&p).expect("clear the model");
        } else {
            std::fs::remove_file(&p).expect("clear the model");
        }
    }
    let keys: Vec<String> = fake.keys().into_iter().filter(|k| !is_record(k)).collect();
    // Keys whose parent is the directory winning over an object of the same name.
    let dirs: BTreeSet<String> = keys
        .iter()
        .flat_map(|k| {
            let parts: Vec<&str> = k.trim_end_matches('/').split('/').collect();
            let n = if k.ends_with('/') { parts.len() } else { parts.len() - 1 };
            (1..=n).map(move |i| parts[..i].join("/")).collect::<Vec<_>>()
        })
        .collect();
    for dir in &dirs {
        std::fs::create_dir_all(model.join(dir)).expect("model dir");
    }
    let mut attrs_of = Vec::new();
    for key in &keys {
        let attrs = StoredAttrs::decode(&fake.metadata(key).unwrap_or_default());
        let path = key.trim_end_matches('/');
        if key.ends_with('/') {
            attrs_of.push((path.to_owned(), attrs));
            continue;
        }
        if dirs.contains(path) {
            continue;
        }
        let bytes = fake.data(key).expect("listed key");
        if attrs.symlink {
            std::os::unix::fs::symlink(String::from_utf8_lossy(&bytes).as_ref(), model.join(path)).expect("symlink");
        } else {
            std::fs::write(model.join(path), &bytes).expect("model file");
        }
        attrs_of.push((path.to_owned(), attrs));
    }
    for (path, attrs) in attrs_of {
        let full = model.join(&path);
        if std::fs::symlink_metadata(&full).expect("model entry").file_type().is_symlink() {
            continue;
        }
        if let Some(mode) = attrs.mode {
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(u32::from(mode))).expect("chmod model");
        }
        if let Some(t) = attrs.mtime.filter(|_| !full.is_dir()) {
            let d = t.duration_since(UNIX_EPOCH).expect("mtime after 1970");
            set_times(&full, d.as_secs() as i64, i64::from(d.subsec_nanos())).expect("utimes model");
        }
    }
}

/// Closes every handle on both sides (as a program does after EIO), lets aborts finish, checks
/// S3 and starts the model over from it.
fn settle(
    rt: &tokio::runtime::Runtime,
    core: &mut Core,
    model: &Path,
    model_pool: &mut Pool,
    seen: &mut Seen,
    ctx: &dyn Fn() -> String,
) -> Vec<String> {
    for (core_slot, model_slot) in core.pool.clone().iter().zip(model_pool.iter_mut()) {
        if let Some(s) = core_slot {
            let _ = rt.block_on(core.close(*s));
        }
        if let Some(s) = model_slot.take() {
            close_checked(s.file).expect("close a model descriptor");
        }
    }
    core.pool.iter_mut().for_each(|s| *s = None);
    seen.note(model, true);
    // Failed aborts are retried in the background; give them their chance (with faults off).
    // A CreateMultipartUpload whose reply was cut made an upload the client never learned the
    // id of: nothing can abort it but a bucket lifecycle rule (as with any S3 client).
    let unknowable = core
        .store
        .injected()
        .iter()
        .filter(|i| i.kind == CallKind::CreateMultipart && i.fault.starts_with("cut"))
        .count();
    let waited = Instant::now();
    while core.store.inner().pending_uploads() > unknowable && waited.elapsed() < ABORTS_SETTLE {
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }
    let notes = check_store(core.store.inner(), model, seen, unknowable, ctx);
    model_from_store(core.store.inner(), model);
    seen.reset(model);
    notes
}

/// The fault rules of a run: mostly failed and cut writes, some failed reads, some delays.
fn add_fault_rules(store: &Faulty) {
    store.add(Rule::on_kinds(&CallKind::WRITES).chance(0.03).fail());
    store.add(Rule::on_kinds(&CallKind::WRITES).chance(0.01).cut());
    store.add(Rule::on_kinds(&[CallKind::Get, CallKind::Head, CallKind::List]).chance(0.005).fail());
    store.add(Rule::on(CallKind::Get).chance(0.005).cut());
    store.add(Rule::any().chance(0.02).delay(Duration::from_millis(20)));
}

fn faulty_core_run(seed: u64, steps: usize) {
    eprintln!("core model with S3 failures: seed {seed} ({steps} steps); replay with S3CSI_TEST_SEED={seed}");
    let profile = Profile { backend: Backend::Fast, dir_ops: true, large_files: true };
    let model_dir = tempfile::Builder::new().prefix("s3csi-model-").tempdir().expect("tempdir for the model");
    let staging = tempfile::Builder::new().prefix("s3csi-staging-").tempdir().expect("tempdir for staging");
    let model = model_dir.path().to_owned();
    let fake = Arc::new(FakeStore::new("model"));
    let store = Arc::new(FaultyStore::new(Arc::clone(&fake), seed));
    let rt = core_runtime();
    // Metadata TTL zero: after a failure the core shows S3 as it is, and so does the model.
    let mut core = Core::new(Arc::clone(&store), staging.path(), Duration::ZERO);
    add_fault_rules(&store);
    let mut ops = OpGen { rng: StdRng::seed_from_u64(seed), profile };
    let mut history = History::new(seed);
    let mut counts = Counts::new();
    let mut model_pool = new_pool();
    let mut seen = Seen::default();
    seen.reset(&model);
    let mut faults_at_check = 0;
    let (mut failures, mut settled) = (0, 0);
    let started = Instant::now();
    for step in 0..steps {
        let tree = scan(&model);
        let op = ops.op(&tree, &slot_views(&model_pool));
        let on_core = rt.block_on(core.run(&op));
        let on_model = run_op(&op, &model, &mut model_pool, &|rel| std::fs::read(model.join(rel)).ok());
        count(&mut counts, &op, on_model.is_ok());
        if let Op::Rename { from, to } = &op {
            seen.renamed(from, to);
        }
        // fsync commits in the middle of its step: what it made durable is a boundary too.
        if let (Op::Fsync { path, .. }, Ok(Done::Durable(Some(Content(bytes))))) = (&op, &on_model)
            && let Ok(real) = std::fs::canonicalize(model.join(path))
            && let Ok(rel) = real.strip_prefix(model.canonicalize().expect("canonical model root"))
        {
            let rel = rel.to_string_lossy().into_owned();
            let set = seen.paths.entry(rel).or_default();
            if set.is_empty() {
                // Created by this very step: if it fails, the file may never have reached S3.
                set.insert(ABSENT.to_owned());
            }
            set.insert(sha256(bytes));
        }
        seen.note(&model, true);
        let faults = store.failures();
        history.push(format!("{step}: {op:?} -> model {on_model:?}, core {on_core:?} ({faults} faults so far)"));
        if agrees(&op, &on_core, &on_model, &model_pool) {
            note_snapshots(&mut model_pool);
            continue;
        }
        // Only an error may differ, and only after a failed or cut call since the last check.
        if on_core.is_ok() || faults == faults_at_check {
            panic!(
                "core and local model differ{}\n{}\nop:    {op:?}\ncore:  {on_core:?}\nlocal: {on_model:?}\ninjected: {:?}",
                if on_core.is_ok() { " (the core succeeded)" } else { " without any fault injected" },
                history.ctx("core model with failures", step),
                store.injected().iter().rev().take(8).collect::<Vec<_>>()
            );
        }
        failures += 1;
        store.clear();
        let notes = settle(&rt, &mut core, &model, &mut model_pool, &mut seen, &|| {
            history.ctx("core model with failures", step)
        });
        if !notes.is_empty() {
            history.push(format!("settled after the failure: {}", notes.join("; ")));
        }
        settled += 1;
        faults_at_check = store.failures();
        add_fault_rules(&store);
    }
    store.clear();
    settle(&rt, &mut core, &model, &mut model_pool, &mut seen, &|| history.ctx("core model with failures, end", steps));
    rt.block_on(compare_core_tree(&mut core, &model, &|| history.ctx("core model with failures, end", steps)));
    eprintln!(
        "{steps} core steps with failures in {:?}: {} faults injected ({} failed or cut calls), {failures} \
         operations failed by them, {settled} checks; calls: {:?}; per op (run, succeeded on the model): {counts:?}",
        started.elapsed(),
        store.total_faults(),
        store.failures(),
        store.call_counts()
    );
}

#[test]
fn core_survives_injected_s3_failures() {
    faulty_core_run(seed(), steps(DEFAULT_CORE_STEPS));
}

#[test]
#[ignore = "by hand: 100,000 operations across seeds (see README, Tests)"]
fn long_core_soak() {
    let per_seed = steps(5000);
    // The other half on the core: three sessions per seed.
    for seed in soak_seeds(seed(), per_seed, SOAK_OPS / 2 / 3) {
        eprintln!("core model: seed {seed} ({per_seed} steps); replay with S3CSI_TEST_SEED={seed}");
        run_and_shrink(core_session, seed, per_seed);
        run_and_shrink(core_session_no_ttl, seed, per_seed);
        faulty_core_run(seed, per_seed);
    }
}

// --- 4. The failure-injecting store itself ---

fn faulty_fake() -> (Arc<FakeStore>, FaultyStore<FakeStore>) {
    let fake = Arc::new(FakeStore::new("b"));
    let store = FaultyStore::new(Arc::clone(&fake), 1);
    (fake, store)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    core_runtime().block_on(f)
}

#[test]
fn faulty_store_fails_the_nth_call_of_a_kind_and_counts_calls() {
    let (fake, store) = faulty_fake();
    store.add(Rule::on(CallKind::Put).nth(2));
    let meta = Default::default();
    block_on(async {
        assert!(store.put_object("a", "1".into(), &meta).await.is_ok());
        let err = store.put_object("b", "2".into(), &meta).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(store.put_object("c", "3".into(), &meta).await.is_ok());
        assert!(store.head_object("a").await.is_ok());
    });
    assert_eq!(fake.keys(), ["a", "c"], "the failed PUT never reached the store");
    assert_eq!((store.calls(CallKind::Put), store.faults(CallKind::Put)), (3, 1));
    assert_eq!((store.calls(CallKind::Head), store.faults(CallKind::Head)), (1, 0));
    assert_eq!(store.injected().len(), 1);
    assert_eq!(store.injected()[0].key, "b");
}

#[test]
fn faulty_store_selects_calls_by_key_and_limits_firings() {
    let (fake, store) = faulty_fake();
    fake.put("dir/x", "x");
    fake.put("other", "o");
    store.add(Rule::any().key_contains("dir/").times(2));
    block_on(async {
        assert!(store.head_object("other").await.is_ok());
        assert!(store.head_object("dir/x").await.is_err());
        assert!(store.delete_object("dir/x").await.is_err());
        assert!(store.head_object("dir/x").await.is_ok(), "the rule fired its two times");
    });
    assert_eq!(store.total_faults(), 2);
    let (_, store) = faulty_fake();
    store.add(Rule::on(CallKind::Delete).key(|k| k.ends_with('z')));
    block_on(async {
        assert!(store.delete_object("a").await.is_ok());
        assert!(store.delete_object("z").await.is_err());
    });
}

#[test]
fn faulty_store_cuts_replies_after_the_call_took_effect() {
    let (fake, store) = faulty_fake();
    let data = random_bytes(5, 300 * KIB);
    fake.put("big", data.clone());
    store.add(Rule::on(CallKind::Get).cut());
    store.add(Rule::on(CallKind::Delete).cut());
    block_on(async {
        use futures::StreamExt;
        let meta = fake.head_object("big").await.unwrap();
        let object = s3csi::s3::ObjectId::from_meta(&meta);
        let got = store.get_range(&object, 0..data.len() as u64).await.unwrap();
        let chunks: Vec<_> = got.body.collect().await;
        let (ok, err): (Vec<_>, Vec<_>) = chunks.into_iter().partition(Result::is_ok);
        let received: Vec<u8> = ok.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert_eq!(received, data[..data.len() / 2], "half the body, then the break");
        assert_eq!(err.len(), 1);
        assert!(err[0].as_ref().unwrap_err().is_transient());
        let err = store.delete_object("big").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    });
    assert!(fake.data("big").is_none(), "a cut call still took effect");
}

#[test]
fn faulty_store_delays_calls_and_chance_is_reproducible_by_seed() {
    block_on(async {
        let (_, store) = faulty_fake();
        store.add(Rule::on(CallKind::List).delay(Duration::from_millis(200)));
        let t = Instant::now();
        assert!(store.list_page("", None, None, None).await.is_ok());
        assert!(t.elapsed() >= Duration::from_millis(200), "the call waited");
        assert_eq!((store.total_faults(), store.failures()), (1, 0), "a delay is a fault but not a failure");
    });
    let pattern = |seed: u64| -> Vec<bool> {
        let fake = Arc::new(FakeStore::new("b"));
        let store = FaultyStore::new(fake, seed);
        store.add(Rule::on(CallKind::Head).chance(0.5));
        block_on(async {
            let mut v = Vec::new();
            for _ in 0..64 {
                v.push(matches!(store.head_object("k").await, Err(s3csi::s3::S3Error::Service { .. })));
            }
            v
        })
    };
    let a = pattern(7);
    assert_eq!(a, pattern(7), "one seed, one sequence of faults");
    assert_ne!(a, pattern(8));
    let fired = a.iter().filter(|f| **f).count();
    assert!((16..=48).contains(&fired), "about half of 64 calls fail, got {fired}");
}
