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
use std::time::{Instant, SystemTime};

use super::attrs::StoredAttrs;
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
}

impl Stat {
    pub fn new(size: u64, mtime: SystemTime) -> Self {
        Stat { size, mtime, etag: None, validated_at: Instant::now(), attrs: StoredAttrs::default(), from_head: false }
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
        inode
    }

    /// Forgets the name `parent/name` (the object is gone); the inode lives on until `forget`.
    pub fn unlink_name(&self, parent: u64, name: &str) {
        self.tables.lock().unwrap().by_name.remove(&(parent, name.to_owned()));
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
}
