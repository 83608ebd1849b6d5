//! The inode table: stable inode numbers for the names the kernel has looked up.
//!
//! Invariants:
//! - Inode 1 is the root (the bucket, or the `--prefix` directory) and is never removed.
//! - An inode's S3 key is derived from its parent chain on demand ([`InodeTable::key`]), so a
//!   directory rename moves every descendant at once. A directory's key ends in `/` (except an
//!   unprefixed root, whose key is empty); a file's or symlink's never does.
//! - `(parent, name)` maps to at most one live inode. When S3 shows that a name changed kind,
//!   the name gets a fresh inode so the kernel never sees a type change under one number.
//! - An inode stays while the kernel holds a lookup reference or a file is open on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::attrs::StoredAttrs;
use super::recovery::{InodeRecord, Journal};
use super::write::OpenState;

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// What S3 last told us about an inode, and when.
#[derive(Debug, Clone)]
pub struct Stat {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    pub validated_at: Instant,
    /// Attributes stored in the object's metadata (unset ones: mount defaults).
    pub attrs: StoredAttrs,
    /// Whether this came from HEAD (metadata known) rather than a listing.
    pub from_head: bool,
    /// A directory known to have its marker object (false: absent or not known).
    pub marker: bool,
    /// A placeholder for an inode a previous process served (see [`InodeTable::restore`]):
    /// nothing about it is known until S3 is asked.
    pub unknown: bool,
}

impl Stat {
    pub fn new(size: u64, mtime: SystemTime) -> Self {
        Stat {
            size,
            mtime,
            etag: None,
            validated_at: Instant::now(),
            attrs: StoredAttrs::default(),
            from_head: false,
            marker: false,
            unknown: false,
        }
    }
}

#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    loc: Mutex<(u64, String)>,
    pub stat: Mutex<Stat>,
    lookups: Mutex<u64>,
    /// Dirty or open-for-write state, shared by every handle that writes this file.
    pub open: Mutex<Option<Arc<OpenState>>>,
    /// A directory made here that S3 cannot hold (the server stores no marker objects): it
    /// exists in this mount only, until keys under it make it real.
    pub local_dir: std::sync::atomic::AtomicBool,
}

impl Inode {
    pub fn stat(&self) -> Stat {
        self.stat.lock().unwrap().clone()
    }

    pub fn set_stat(&self, stat: Stat) {
        *self.stat.lock().unwrap() = stat;
    }

    pub fn parent(&self) -> u64 {
        self.loc.lock().unwrap().0
    }

    pub fn name(&self) -> String {
        self.loc.lock().unwrap().1.clone()
    }

    pub fn open_state(&self) -> Option<Arc<OpenState>> {
        self.open.lock().unwrap().clone()
    }
}

#[derive(Debug, Default)]
struct Tables {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_name: HashMap<(u64, String), u64>,
    next_ino: u64,
    /// Where every change is recorded for a successor process (`--recovery-dir`).
    journal: Option<Journal>,
}

/// A journal is rewritten from the live table once it holds this many records and four times
/// as many as there are inodes: replay stays short, rewrites stay rare.
const COMPACT_MIN_RECORDS: u64 = 10_000;

/// Kernel references given to inodes restored from a journal: their real counts are unknown,
/// so they stay until the process ends (memory for the inodes alive at the crash).
const RESTORED_LOOKUPS: u64 = u64::MAX / 2;

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
    }
}

fn code_kind(code: u8) -> Kind {
    match code {
        1 => Kind::Dir,
        2 => Kind::Symlink,
        _ => Kind::File,
    }
}

impl Tables {
    fn record(&mut self, record: InodeRecord) {
        let live = self.by_ino.len() as u64;
        let Some(journal) = self.journal.as_mut() else { return };
        journal.append(&record);
        if journal.appended >= COMPACT_MIN_RECORDS && journal.appended >= 4 * live {
            self.compact();
        }
    }

    /// Rewrites the journal as the records that build the table as it is now.
    fn compact(&mut self) {
        let Some(mut journal) = self.journal.take() else { return };
        let mut unlinked = Vec::new();
        let mut linked = Vec::new();
        for inode in self.by_ino.values().filter(|i| i.ino != ROOT_INO) {
            let (parent, name) = inode.loc.lock().unwrap().clone();
            let new = InodeRecord::N(inode.ino, parent, kind_code(inode.kind), name.clone());
            if self.by_name.get(&(parent, name.clone())) == Some(&inode.ino) {
                linked.push(new);
            } else {
                unlinked.push(new);
                unlinked.push(InodeRecord::U(parent, name));
            }
        }
        // The highest number handed out, so a replay continues after it.
        let high = InodeRecord::F(self.next_ino.saturating_sub(1));
        let records = std::iter::once(high).chain(unlinked).chain(linked);
        if let Err(e) = journal.rewrite(records) {
            tracing::warn!(error = %e, "cannot rewrite the inode journal; it keeps growing");
        }
        self.journal = Some(journal);
    }
}

#[derive(Debug)]
pub struct InodeTable {
    root_key: String,
    tables: Mutex<Tables>,
}

impl InodeTable {
    pub fn new(root_key: &str) -> Self {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            kind: Kind::Dir,
            loc: Mutex::new((ROOT_INO, String::new())),
            stat: Mutex::new(Stat::new(0, SystemTime::now())),
            lookups: Mutex::new(1),
            open: Mutex::new(None),
            local_dir: Default::default(),
        });
        let mut tables = Tables { next_ino: ROOT_INO + 1, ..Default::default() };
        tables.by_ino.insert(ROOT_INO, root);
        InodeTable { root_key: root_key.to_owned(), tables: Mutex::new(tables) }
    }

    /// Rebuilds the table a previous process recorded, so the inode numbers the kernel holds
    /// resolve to the same names. Attributes are unknown (the first use asks S3 again).
    pub fn restore(&self, records: Vec<InodeRecord>) {
        let mut t = self.tables.lock().unwrap();
        let long_ago = Instant::now().checked_sub(Duration::from_secs(24 * 3600)).unwrap_or_else(Instant::now);
        for r in records {
            match r {
                InodeRecord::N(ino, parent, kind, name) => {
                    t.next_ino = t.next_ino.max(ino + 1);
                    if ino == ROOT_INO {
                        continue;
                    }
                    let mut stat = Stat::new(0, SystemTime::UNIX_EPOCH);
                    stat.validated_at = long_ago;
                    stat.unknown = true;
                    let inode = Arc::new(Inode {
                        ino,
                        kind: code_kind(kind),
                        loc: Mutex::new((parent, name.clone())),
                        stat: Mutex::new(stat),
                        lookups: Mutex::new(RESTORED_LOOKUPS),
                        open: Mutex::new(None),
                        local_dir: Default::default(),
                    });
                    t.by_ino.insert(ino, inode);
                    t.by_name.insert((parent, name), ino);
                }
                InodeRecord::M(ino, parent, name) => {
                    let Some(inode) = t.by_ino.get(&ino).cloned() else { continue };
                    let old = inode.loc.lock().unwrap().clone();
                    if t.by_name.get(&old) == Some(&ino) {
                        t.by_name.remove(&old);
                    }
                    t.by_name.insert((parent, name.clone()), ino);
                    *inode.loc.lock().unwrap() = (parent, name);
                }
                InodeRecord::U(parent, name) => {
                    t.by_name.remove(&(parent, name));
                }
                InodeRecord::F(ino) => {
                    t.next_ino = t.next_ino.max(ino + 1);
                    if ino == ROOT_INO {
                        continue;
                    }
                    if let Some(inode) = t.by_ino.remove(&ino) {
                        let loc = inode.loc.lock().unwrap().clone();
                        if t.by_name.get(&loc) == Some(&ino) {
                            t.by_name.remove(&loc);
                        }
                    }
                }
            }
        }
    }

    /// Records every later change in `journal`, starting from a snapshot of the table now.
    pub fn attach_journal(&self, journal: Journal) {
        let mut t = self.tables.lock().unwrap();
        t.journal = Some(journal);
        t.compact();
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.tables.lock().unwrap().by_ino.get(&ino).cloned()
    }

    /// The S3 key of an inode, from its current place in the tree.
    pub fn key(&self, inode: &Inode) -> String {
        if inode.ino == ROOT_INO {
            return self.root_key.clone();
        }
        let t = self.tables.lock().unwrap();
        let mut names = vec![inode.name()];
        let mut parent = inode.parent();
        while parent != ROOT_INO {
            match t.by_ino.get(&parent) {
                Some(p) => {
                    names.push(p.name());
                    parent = p.parent();
                }
                None => break,
            }
        }
        let mut key = self.root_key.clone();
        for (i, n) in names.iter().rev().enumerate() {
            key.push_str(n);
            if i + 1 < names.len() {
                key.push('/');
            }
        }
        if inode.kind == Kind::Dir {
            key.push('/');
        }
        key
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<Arc<Inode>> {
        let t = self.tables.lock().unwrap();
        t.by_name.get(&(parent, name.to_owned())).and_then(|ino| t.by_ino.get(ino)).cloned()
    }

    /// Children of `parent` that exist here but not (yet) in S3: files being written, and
    /// directories on a server without marker objects.
    pub fn pending_children(&self, parent: u64) -> Vec<Arc<Inode>> {
        let t = self.tables.lock().unwrap();
        t.by_name
            .iter()
            .filter(|((p, _), _)| *p == parent)
            .filter_map(|(_, ino)| t.by_ino.get(ino))
            .filter(|i| {
                i.open_state().is_some_and(|s| s.is_pending()) || i.local_dir.load(std::sync::atomic::Ordering::Relaxed)
            })
            .cloned()
            .collect()
    }

    /// Whether `inode` still has its name (it was not unlinked or replaced here).
    pub fn is_linked(&self, inode: &Inode) -> bool {
        let loc = inode.loc.lock().unwrap().clone();
        self.tables.lock().unwrap().by_name.get(&loc) == Some(&inode.ino)
    }

    /// Every inode with write state (files open for writing, or changed and not yet committed).
    pub fn with_open_state(&self) -> Vec<(Arc<Inode>, Arc<OpenState>)> {
        let t = self.tables.lock().unwrap();
        t.by_ino.values().filter_map(|i| i.open_state().map(|s| (Arc::clone(i), s))).collect()
    }

    /// Records that `parent/name` exists with `kind` and `stat`, reusing its inode when the kind
    /// is unchanged. `lookup` adds one kernel reference (for replies to `lookup`/`create`).
    pub fn upsert(&self, parent: &Inode, name: &str, kind: Kind, stat: Stat, lookup: bool) -> Arc<Inode> {
        let mut t = self.tables.lock().unwrap();
        let existing = t.by_name.get(&(parent.ino, name.to_owned())).and_then(|i| t.by_ino.get(i)).cloned();
        if let Some(inode) = existing
            && inode.kind == kind
        {
            inode.set_stat(stat);
            if lookup {
                *inode.lookups.lock().unwrap() += 1;
            }
            return inode;
        }
        let ino = t.next_ino;
        t.next_ino += 1;
        let inode = Arc::new(Inode {
            ino,
            kind,
            loc: Mutex::new((parent.ino, name.to_owned())),
            stat: Mutex::new(stat),
            lookups: Mutex::new(u64::from(lookup)),
            open: Mutex::new(None),
            local_dir: Default::default(),
        });
        t.by_ino.insert(ino, Arc::clone(&inode));
        t.by_name.insert((parent.ino, name.to_owned()), ino);
        t.record(InodeRecord::N(ino, parent.ino, kind_code(kind), name.to_owned()));
        inode
    }

    /// Forgets the name `parent/name` (the object is gone); the inode lives on until `forget`.
    pub fn unlink_name(&self, parent: u64, name: &str) {
        let mut t = self.tables.lock().unwrap();
        if t.by_name.remove(&(parent, name.to_owned())).is_some() {
            t.record(InodeRecord::U(parent, name.to_owned()));
        }
    }

    /// Moves `inode` to `new_parent/new_name`, replacing whatever had that name.
    pub fn rename(&self, inode: &Inode, new_parent: u64, new_name: &str) {
        let mut t = self.tables.lock().unwrap();
        let old = inode.loc.lock().unwrap().clone();
        if t.by_name.get(&old) == Some(&inode.ino) {
            t.by_name.remove(&old);
        }
        t.by_name.insert((new_parent, new_name.to_owned()), inode.ino);
        *inode.loc.lock().unwrap() = (new_parent, new_name.to_owned());
        t.record(InodeRecord::M(inode.ino, new_parent, new_name.to_owned()));
    }

    /// Drops `n` kernel references; the inode is removed when none remain.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.tables.lock().unwrap();
        let Some(inode) = t.by_ino.get(&ino).cloned() else { return };
        let mut lookups = inode.lookups.lock().unwrap();
        *lookups = lookups.saturating_sub(n);
        if *lookups == 0 && inode.open_state().is_none() {
            t.by_ino.remove(&ino);
            let name_key = inode.loc.lock().unwrap().clone();
            if t.by_name.get(&name_key) == Some(&ino) {
                t.by_name.remove(&name_key);
            }
            drop(lookups);
            t.record(InodeRecord::F(ino));
        }
    }

    pub fn len(&self) -> usize {
        self.tables.lock().unwrap().by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat() -> Stat {
        Stat::new(1, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn keys_follow_the_parent_chain_and_renames() {
        let t = InodeTable::new("pre/");
        let root = t.get(ROOT_INO).unwrap();
        let d = t.upsert(&root, "d", Kind::Dir, stat(), true);
        let f = t.upsert(&d, "f", Kind::File, stat(), true);
        assert_eq!(t.key(&d), "pre/d/");
        assert_eq!(t.key(&f), "pre/d/f");
        assert_eq!(t.key(&root), "pre/");
        let e = t.upsert(&root, "e", Kind::Dir, stat(), true);
        t.rename(&d, e.ino, "moved");
        assert_eq!(t.key(&f), "pre/e/moved/f");
        assert!(t.child(ROOT_INO, "d").is_none());
        assert_eq!(t.child(e.ino, "moved").unwrap().ino, d.ino);
    }

    #[test]
    fn same_kind_reuses_inode_and_kind_change_gets_new_one() {
        let t = InodeTable::new("");
        let root = t.get(ROOT_INO).unwrap();
        let a = t.upsert(&root, "x", Kind::File, stat(), true);
        let b = t.upsert(&root, "x", Kind::File, stat(), true);
        assert_eq!(a.ino, b.ino);
        let c = t.upsert(&root, "x", Kind::Dir, stat(), true);
        assert_ne!(a.ino, c.ino);
        assert_eq!(t.child(ROOT_INO, "x").unwrap().ino, c.ino);
    }

    #[test]
    fn forget_removes_at_zero_only() {
        let t = InodeTable::new("");
        let root = t.get(ROOT_INO).unwrap();
        let a = t.upsert(&root, "x", Kind::File, stat(), true);
        t.upsert(&root, "x", Kind::File, stat(), true);
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_some());
        t.forget(a.ino, 1);
        assert!(t.get(a.ino).is_none());
        assert!(t.child(ROOT_INO, "x").is_none());
        t.forget(ROOT_INO, 100);
        assert!(t.get(ROOT_INO).is_some());
    }

    fn replayed(dir: &std::path::Path) -> InodeTable {
        let r = crate::fs::recovery::RecoveryDir::open(dir).unwrap();
        let (records, journal) = r.inodes().unwrap();
        let t = InodeTable::new("p/");
        t.restore(records);
        t.attach_journal(journal);
        t
    }

    #[test]
    fn a_journal_rebuilds_numbers_names_and_renames() {
        let dir = tempfile::tempdir().unwrap();
        let t = replayed(dir.path());
        let root = t.get(ROOT_INO).unwrap();
        let d = t.upsert(&root, "d", Kind::Dir, stat(), true);
        let f = t.upsert(&d, "f", Kind::File, stat(), true);
        let g = t.upsert(&root, "g", Kind::Symlink, stat(), true);
        let gone = t.upsert(&root, "gone", Kind::File, stat(), true);
        let e = t.upsert(&root, "e", Kind::Dir, stat(), true);
        t.rename(&d, e.ino, "moved");
        t.unlink_name(ROOT_INO, "g");
        t.forget(gone.ino, 1);
        drop(t);

        let t = replayed(dir.path());
        assert_eq!(t.key(&t.get(f.ino).unwrap()), "p/e/moved/f");
        assert_eq!(t.child(e.ino, "moved").unwrap().ino, d.ino);
        assert_eq!(t.get(g.ino).unwrap().kind, Kind::Symlink, "an unlinked inode stays for the kernel");
        assert!(t.child(ROOT_INO, "g").is_none());
        assert!(t.get(gone.ino).is_none() && t.child(ROOT_INO, "gone").is_none());
        // New numbers continue after every number handed out, also forgotten ones.
        let root = t.get(ROOT_INO).unwrap();
        let h = t.upsert(&root, "h", Kind::File, stat(), true);
        assert!(h.ino > gone.ino);
        // Restored inodes stay whatever the kernel forgets (their counts are not known).
        t.forget(f.ino, 1000);
        assert!(t.get(f.ino).is_some());
    }

    #[test]
    fn a_compacted_journal_replays_to_the_same_table() {
        let dir = tempfile::tempdir().unwrap();
        let t = replayed(dir.path());
        let root = t.get(ROOT_INO).unwrap();
        let keep = t.upsert(&root, "keep", Kind::File, stat(), true);
        let old = t.upsert(&root, "same", Kind::File, stat(), true);
        t.unlink_name(ROOT_INO, "same");
        let new = t.upsert(&root, "same", Kind::File, stat(), true);
        // Enough churn to rewrite the journal several times.
        for i in 0..(3 * COMPACT_MIN_RECORDS) {
            let x = t.upsert(&root, &format!("tmp{}", i % 7), Kind::File, stat(), true);
            t.forget(x.ino, 1);
        }
        let high = t.upsert(&root, "last", Kind::File, stat(), true).ino;
        drop(t);
        let lines = std::fs::read_to_string(dir.path().join("inodes")).unwrap().lines().count() as u64;
        assert!(lines < 2 * COMPACT_MIN_RECORDS, "the journal was compacted ({lines} lines)");

        let t = replayed(dir.path());
        assert_eq!(t.child(ROOT_INO, "keep").unwrap().ino, keep.ino);
        assert_eq!(t.child(ROOT_INO, "same").unwrap().ino, new.ino, "the replacing inode owns the name");
        assert!(t.get(old.ino).is_some(), "the replaced inode is kept, without a name");
        assert_eq!(t.len(), 5, "root, keep, both `same`, last");
        let root = t.get(ROOT_INO).unwrap();
        assert!(t.upsert(&root, "next", Kind::File, stat(), true).ino > high);
    }
}
