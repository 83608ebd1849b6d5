//! The inode table: stable inode numbers for the names the kernel has looked up.
//!
//! Invariants:
//! - Inode 1 is the root (the bucket, or the `--prefix` directory) and is never removed.
//! - A directory's `key` ends in `/` (except an unprefixed root, whose key is empty); a file's
//!   key never does.
//! - `(parent, name)` maps to at most one live inode. When S3 shows that a name changed kind
//!   (file <-> directory), the name gets a fresh inode so the kernel never sees a type change.
//! - An inode stays while the kernel holds a lookup reference; `forget` drops it at zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What S3 last told us about an inode, and when.
#[derive(Debug, Clone)]
pub struct Stat {
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<String>,
    pub validated_at: Instant,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: Kind,
    pub key: String,
    pub stat: Mutex<Stat>,
    lookups: Mutex<u64>,
}

impl Inode {
    pub fn stat(&self) -> Stat {
        self.stat.lock().unwrap().clone()
    }

    pub fn set_stat(&self, stat: Stat) {
        *self.stat.lock().unwrap() = stat;
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
    tables: Mutex<Tables>,
}

impl InodeTable {
    pub fn new(root_key: &str) -> Self {
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            parent: ROOT_INO,
            name: String::new(),
            kind: Kind::Dir,
            key: root_key.to_owned(),
            stat: Mutex::new(Stat {
                size: 0,
                mtime: SystemTime::now(),
                etag: None,
                validated_at: Instant::now(),
            }),
            lookups: Mutex::new(1),
        });
        let mut tables = Tables {
            next_ino: ROOT_INO + 1,
            ..Default::default()
        };
        tables.by_ino.insert(ROOT_INO, root);
        InodeTable {
            tables: Mutex::new(tables),
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.tables.lock().unwrap().by_ino.get(&ino).cloned()
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<Arc<Inode>> {
        let t = self.tables.lock().unwrap();
        t.by_name
            .get(&(parent, name.to_owned()))
            .and_then(|ino| t.by_ino.get(ino))
            .cloned()
    }

    /// Records that `parent/name` exists with `kind` and `stat`, reusing its inode when the kind
    /// is unchanged. `lookup` adds one kernel reference (for replies to `lookup`).
    pub fn upsert(
        &self,
        parent: &Inode,
        name: &str,
        kind: Kind,
        stat: Stat,
        lookup: bool,
    ) -> Arc<Inode> {
        let mut t = self.tables.lock().unwrap();
        let existing = t
            .by_name
            .get(&(parent.ino, name.to_owned()))
            .and_then(|i| t.by_ino.get(i))
            .cloned();
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
        let key = match kind {
            Kind::Dir => format!("{}{name}/", parent.key),
            Kind::File => format!("{}{name}", parent.key),
        };
        let inode = Arc::new(Inode {
            ino,
            parent: parent.ino,
            name: name.to_owned(),
            kind,
            key,
            stat: Mutex::new(stat),
            lookups: Mutex::new(u64::from(lookup)),
        });
        t.by_ino.insert(ino, Arc::clone(&inode));
        t.by_name.insert((parent.ino, name.to_owned()), ino);
        inode
    }

    /// Forgets the name `parent/name` (the object is gone); the inode lives on until `forget`.
    pub fn unlink_name(&self, parent: u64, name: &str) {
        self.tables
            .lock()
            .unwrap()
            .by_name
            .remove(&(parent, name.to_owned()));
    }

    /// Drops `n` kernel references; the inode is removed when none remain.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.tables.lock().unwrap();
        let Some(inode) = t.by_ino.get(&ino).cloned() else {
            return;
        };
        let mut lookups = inode.lookups.lock().unwrap();
        *lookups = lookups.saturating_sub(n);
        if *lookups == 0 {
            t.by_ino.remove(&ino);
            let name_key = (inode.parent, inode.name.clone());
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
        Stat {
            size: 1,
            mtime: SystemTime::UNIX_EPOCH,
            etag: None,
            validated_at: Instant::now(),
        }
    }

    #[test]
    fn keys_follow_the_parent() {
        let t = InodeTable::new("pre/");
        let root = t.get(ROOT_INO).unwrap();
        let d = t.upsert(&root, "d", Kind::Dir, stat(), true);
        let f = t.upsert(&d, "f", Kind::File, stat(), true);
        assert_eq!(d.key, "pre/d/");
        assert_eq!(f.key, "pre/d/f");
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
