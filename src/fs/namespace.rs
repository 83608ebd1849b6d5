//! The namespace: lookup, listing, and the operations that change names (create a directory or
//! symlink, unlink, rmdir, rename of files and directories).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::attrs::{StoredAttrs, kind_from_meta, stat_from_meta};
use super::inode::{Inode, Kind, Stat};
use super::prefetch::Access;
use super::records::{self, DirRecord, dir_entry_name};
use super::write::{self, Held, OpenState};
use super::{Attr, Caller, DirEntry, FsError, KEY_MAX, NAME_MAX, RENAME_CONCURRENCY, S_ISGID, S3Fs};
use crate::s3::{ObjectId, ObjectMeta, ObjectStore, S3Error, UserMetadata};

/// Name of the marker object the CSI controller writes at the root of each volume it creates
/// (see `csi::volume`). It is hidden from every listing and cannot be looked up or created.
pub const RESERVED_NAME: &str = ".s3csi-volume";

/// Whether `name` can be a file name; keys whose segment fails this are not shown.
/// Largest file a re-sent rename compares byte for byte with its destination.
const RESUME_COMPARE_MAX: u64 = 8 << 20;

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != RESERVED_NAME
        && name != records::RECORD_NAME
        && name.len() <= NAME_MAX
        && !name.contains(['/', '\0'])
}

pub(super) struct DirHandle {
    pub(super) entries: Vec<DirEntry>,
}

impl<S: ObjectStore> S3Fs<S> {
    pub(super) fn check_new_name(&self, dir: &Inode, name: &str) -> Result<String, FsError> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        if !valid_name(name) {
            return Err(FsError::Invalid(
                "names must not be empty, '.', '..', the reserved .s3csi-volume, or contain '/'",
            ));
        }
        let key = format!("{}{name}/", self.inodes.key(dir));
        if key.len() > KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        Ok(key[..key.len() - 1].to_owned())
    }

    /// A directory without stored attributes (implied by keys under it, or a marker written by
    /// another client): its mtime is the mount's start time, stable for the life of the mount.
    pub(super) fn dir_stat(&self) -> Stat {
        Stat::new(0, self.started)
    }

    /// Asks S3 what `dir_key + name` is: a directory (wins), a file or symlink, or nothing.
    pub(super) async fn probe(&self, dir_key: &str, name: &str) -> Result<Option<(Kind, Stat)>, FsError> {
        let file_key = format!("{dir_key}{name}");
        let dir_prefix = format!("{file_key}/");
        // Both requests run at once; when the listing shows a directory, the HEAD is not awaited
        // (some servers answer HEAD on a "directory" key slowly or with a retried 5xx).
        let head_fut = self.store.head_object(&file_key);
        let list_fut = self.store.list_page(&dir_prefix, Some("/"), None, Some(1));
        tokio::pin!(head_fut, list_fut);
        let mut head_early = None;
        let list = loop {
            tokio::select! {
                l = &mut list_fut => break l?,
                h = &mut head_fut, if head_early.is_none() => head_early = Some(h),
            }
        };
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            let mut stat = self.dir_stat();
            // S3 has been asked: what it said about the attributes is settled for the TTL.
            stat.from_head = true;
            if let Some(marker) = list.objects.iter().find(|o| o.key == dir_prefix) {
                match self.store.head_object(&marker.key).await {
                    Ok(meta) => {
                        // A marker's Last-Modified is as stable as a stored mtime.
                        let m = stat_from_meta(&meta);
                        (stat.attrs, stat.mtime, stat.marker) = (m.attrs, m.mtime, true);
                    }
                    // Removed since the listing: a directory implied by its keys.
                    Err(S3Error::NotFound(_)) => {}
                    // Not the defaults in its place: a failed HEAD is an error, not an answer.
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(Some((Kind::Dir, stat)));
        }
        let head = match head_early {
            Some(h) => h,
            None => head_fut.await,
        };
        match head {
            Ok(meta) => Ok(Some((kind_from_meta(&meta), stat_from_meta(&meta)))),
            Err(S3Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Finds `parent/name`: from memory when fresh (or being written), otherwise from S3.
    pub(super) async fn resolve(&self, dir: &Arc<Inode>, name: &str, lookup: bool) -> Result<Arc<Inode>, FsError> {
        if !valid_name(name) {
            return Err(FsError::NotFound);
        }
        let existing = self.inodes.child(dir.ino, name);
        if let Some(child) = &existing {
            let stat = child.stat();
            // Open for writing here (created or not): this mount's view of it is the truth until
            // it is committed and closed (its size, mode and times change locally first).
            let pending = child.open_state().is_some_and(|s| !s.is_unlinked());
            let local = child.local_dir.load(Ordering::Relaxed);
            if pending || local || (self.fresh(&stat) && stat.from_head) {
                return Ok(self.inodes.upsert(dir, name, child.kind, stat, lookup));
            }
            if self.fresh(&stat) && child.kind == Kind::File {
                // Known from a listing: one HEAD for the metadata kept in the object.
                if let Ok(meta) = self.store.head_object(&self.inodes.key(child)).await {
                    let fresh = stat_from_meta(&meta);
                    // Not in the directory's record: add it, so the next listing needs no HEAD.
                    if let Some(etag) = &fresh.etag {
                        self.records.note(
                            &self.inodes.key(dir),
                            name,
                            Self::file_entry(etag, fresh.size, &fresh.attrs, None),
                        );
                    }
                    return Ok(self.inodes.upsert(dir, name, kind_from_meta(&meta), fresh, lookup));
                }
            }
        }
        let known_dir = existing.filter(|c| c.kind == Kind::Dir).map(|c| c.stat());
        // A directory listed in a directory whose record lacks it: record what the probe finds.
        let unrecorded_dir = known_dir.as_ref().is_some_and(|stat| self.fresh(stat) && !stat.from_head);
        match self.probe(&self.inodes.key(dir), name).await? {
            Some((kind, mut stat)) => {
                let bare_dir = kind == Kind::Dir && stat.attrs == StoredAttrs::default();
                if let Some(known) = known_dir.as_ref().filter(|_| bare_dir) {
                    if !self.markers.load(Ordering::Relaxed) {
                        // A server that cannot keep markers: the record is the only place the
                        // directory's attributes live.
                        (stat.attrs, stat.mtime) = (known.attrs.clone(), known.mtime);
                    } else if known.attrs != StoredAttrs::default() {
                        // Markers are kept, yet this one is gone or carries no attributes (a
                        // half-done rename, another client): the record describes a directory
                        // that no longer exists. Drop its entry, so listings stop showing it.
                        self.records.note(&self.inodes.key(dir), &dir_entry_name(name), None);
                    }
                }
                if unrecorded_dir && kind == Kind::Dir {
                    self.records.note(&self.inodes.key(dir), &dir_entry_name(name), Self::dir_entry(&stat.attrs));
                }
                Ok(self.inodes.upsert(dir, name, kind, stat, lookup))
            }
            None => {
                self.inodes.unlink_name(dir.ino, name);
                Err(FsError::NotFound)
            }
        }
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let dir = self.dir_inode(parent)?;
        let inode = self.resolve(&dir, name, true).await?;
        Ok(self.attr(&inode))
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.inodes.forget(ino, nlookup);
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let inode = self.inode(ino)?;
        // A file unlinked or replaced here but still open keeps its last attributes, as on a
        // local filesystem (the kernel asks before reads near the end of a file).
        self.settle(&inode).await?;
        let stale = !self.fresh(&inode.stat()) && self.inodes.is_linked(&inode);
        if inode.kind != Kind::Dir && inode.open_state().is_none() && stale {
            match self.store.head_object(&self.inodes.key(&inode)).await {
                Ok(meta) => self.refresh(&inode, &meta),
                Err(S3Error::NotFound(_)) => {
                    self.inodes.unlink_name(inode.parent(), &inode.name());
                    return Err(FsError::NotFound);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.attr(&inode))
    }

    /// Learns the attributes of an inode an earlier process served (a working directory, an
    /// open descriptor, a parent the kernel holds) from S3, as a lookup would, before anything
    /// shows or builds on its placeholder (owner root, mode defaults, mtime 0).
    pub(super) async fn settle(&self, inode: &Arc<Inode>) -> Result<(), FsError> {
        if !inode.stat.lock().unwrap().unknown || inode.ino == super::inode::ROOT_INO || !self.inodes.is_linked(inode) {
            return Ok(());
        }
        let parent = self.dir_inode(inode.parent())?;
        Box::pin(self.settle(&parent)).await?;
        self.resolve(&parent, &inode.name(), false).await?;
        Ok(())
    }

    /// A directory by inode number, its attributes known (see [`S3Fs::settle`]).
    pub(super) async fn settled_dir(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        let dir = self.dir_inode(ino)?;
        self.settle(&dir).await?;
        Ok(dir)
    }

    /// HEADs the object behind `inode`, refreshing its stat.
    pub(super) async fn head(&self, inode: &Inode) -> Result<ObjectMeta, FsError> {
        match self.store.head_object(&self.inodes.key(inode)).await {
            Ok(meta) => {
                self.refresh(inode, &meta);
                Ok(meta)
            }
            Err(S3Error::NotFound(_)) => {
                self.inodes.unlink_name(inode.parent(), &inode.name());
                Err(FsError::NotFound)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Takes what a HEAD said about `inode`. When the attributes believed so far (from a
    /// listing and its directory record) turn out wrong for the same object, the record was
    /// stale (identical bytes rewritten by another client, or a lost record update): correct it,
    /// with the object's Last-Modified so the entry is checked strictly from now on.
    pub(super) fn refresh(&self, inode: &Inode, meta: &ObjectMeta) {
        let fresh = stat_from_meta(meta);
        let old = inode.stat();
        if old.from_head
            && old.etag == fresh.etag
            && old.attrs.ours() != fresh.attrs.ours()
            && let Some(etag) = &fresh.etag
        {
            tracing::debug!(key = %meta.key, "directory record was stale for this object; correcting it");
            let entry = Self::file_entry(etag, fresh.size, &fresh.attrs, Some(meta.last_modified));
            self.note_entry(inode.parent(), &inode.name(), inode.kind, entry);
        }
        inode.set_stat(fresh);
    }

    /// Owner, group and mode of a new entry, as a local filesystem sets them: the caller owns
    /// it; its group is the parent's when the parent is set-group-ID, else the volume's group
    /// when one is forced (`--gid`, a pod's fsGroup), else the caller's; its mode is the
    /// requested mode (the kernel's umask already applied), and a new directory inherits the
    /// parent's set-group-ID bit. All three are stored with the object.
    pub(super) fn set_new_owner(&self, stat: &mut Stat, caller: Caller, parent: &Inode, kind: Kind, mode: u16) {
        let own = &self.config.ownership;
        let parent = self.attr(parent);
        let gid = if parent.perm & S_ISGID != 0 {
            parent.gid
        } else if own.group_forced {
            own.gid
        } else {
            caller.gid
        };
        let mut mode = mode & 0o7777;
        if kind == Kind::Dir && parent.perm & S_ISGID != 0 {
            mode |= S_ISGID;
        }
        stat.attrs.uid = Some(caller.uid);
        stat.attrs.gid = Some(gid);
        stat.attrs.mode = Some(mode);
        stat.attrs.symlink = kind == Kind::Symlink;
        // Stored with the object, so the mtime never changes by itself (S3's Last-Modified has
        // whole seconds and is the upload's time, not the mount's).
        stat.attrs.mtime = Some(stat.mtime);
    }

    pub async fn mkdir(&self, caller: Caller, parent: u64, name: &str, mode: u16) -> Result<Attr, FsError> {
        self.check_writable()?;
        let dir = self.settled_dir(parent).await?;
        let key = self.check_new_name(&dir, name)?;
        if self.resolve(&dir, name, false).await.is_ok() {
            return Err(FsError::Exists);
        }
        let mut stat = Stat::new(0, SystemTime::now());
        stat.from_head = true;
        self.set_new_owner(&mut stat, caller, &dir, Kind::Dir, mode);
        let metadata = stat.attrs.encode();
        let markers = self.markers.load(Ordering::Relaxed);
        stat.marker = markers;
        if markers {
            self.store.put_object(&format!("{key}/"), Bytes::new(), &metadata).await?;
        }
        if markers {
            self.note_entry(dir.ino, name, Kind::Dir, Self::dir_entry(&stat.attrs));
        }
        let inode = self.inodes.upsert(&dir, name, Kind::Dir, stat, true);
        inode.local_dir.store(!markers, Ordering::Relaxed);
        Ok(self.attr(&inode))
    }

    pub async fn symlink(&self, caller: Caller, parent: u64, name: &str, target: &str) -> Result<Attr, FsError> {
        self.check_writable()?;
        let dir = self.settled_dir(parent).await?;
        let key = self.check_new_name(&dir, name)?;
        if self.resolve(&dir, name, false).await.is_ok() {
            return Err(FsError::Exists);
        }
        let mut stat = Stat::new(target.len() as u64, SystemTime::now());
        stat.from_head = true;
        self.set_new_owner(&mut stat, caller, &dir, Kind::Symlink, 0o777);
        let metadata = stat.attrs.encode();
        let etag = self.store.put_object(&key, Bytes::copy_from_slice(target.as_bytes()), &metadata).await?;
        self.note_entry(dir.ino, name, Kind::Symlink, Self::file_entry(&etag, stat.size, &stat.attrs, None));
        stat.etag = Some(etag);
        let inode = self.inodes.upsert(&dir, name, Kind::Symlink, stat, true);
        Ok(self.attr(&inode))
    }

    pub async fn readlink(&self, ino: u64) -> Result<Bytes, FsError> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symbolic link"));
        }
        // A fresh stat names the exact object (ETag, size): read it without another HEAD. A
        // target that changed since fails the ETag check and is asked for again.
        let stat = inode.stat();
        let key = self.inodes.key(&inode);
        if let Some(etag) = stat.etag.as_ref().filter(|_| self.fresh(&stat) && stat.size > 0) {
            let object = Arc::new(ObjectId { key, version: etag.clone(), has_etag: true });
            match self.fetcher.read(&object, stat.size, 0..stat.size, Access::Random).await {
                Ok(parts) => return Ok(parts.concat().into()),
                Err(e) => tracing::debug!(error = %e, "symlink target changed; reading it again"),
            }
        }
        let meta = self.head(&inode).await?;
        let object = Arc::new(ObjectId::from_meta(&meta));
        Ok(self.fetcher.read(&object, meta.size, 0..meta.size, Access::Random).await?.concat().into())
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        let dir = self.settled_dir(parent).await?;
        let inode = self.resolve(&dir, name, false).await?;
        if inode.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        // An open file's lock is held across the delete: a commit in flight ends first, none
        // starts until the file is marked unlinked, and its bytes stay readable.
        let key = self.inodes.key(&inode);
        let state = inode.open_state();
        let mut held = match &state {
            Some(state) => Some(state.hold().await),
            None => None,
        };
        if let Some(held) = &mut held {
            held.keep_bytes(&self.writes, &key).await;
        }
        self.keep_dir(&dir).await?;
        self.store.delete_object(&key).await?;
        if let Some(held) = &held {
            held.mark_unlinked();
        }
        self.note_entry(parent, name, inode.kind, None);
        self.inodes.unlink_name(parent, name);
        Ok(())
    }

    /// Before an entry leaves `dir`: a directory without a marker object exists only through
    /// the keys under it (written by another client, or left by an interrupted rename), and
    /// would vanish with its last entry. It gets a marker first, so it stays, as a directory
    /// does. One LIST the first time, for directories not already known to have one.
    pub(super) async fn keep_dir(&self, dir: &Inode) -> Result<(), FsError> {
        if dir.ino == super::inode::ROOT_INO
            || !self.markers.load(Ordering::Relaxed)
            || dir.local_dir.load(Ordering::Relaxed)
            || dir.stat.lock().unwrap().marker
        {
            return Ok(());
        }
        let key = self.inodes.key(dir);
        let page = self.store.list_page(&key, None, None, Some(1)).await?;
        if page.objects.first().is_none_or(|o| o.key != key) {
            self.store.put_object(&key, Bytes::new(), &pinned(&dir.stat())).await?;
            tracing::debug!(key, "wrote a marker for a directory that had none, so it outlives its last entry");
        }
        dir.stat.lock().unwrap().marker = true;
        Ok(())
    }

    /// Whether a directory has any entry (in S3 or being written here).
    pub(super) async fn dir_has_entries(&self, dir: &Inode) -> Result<bool, FsError> {
        if !self.inodes.pending_children(dir.ino).is_empty() {
            return Ok(true);
        }
        let key = self.inodes.key(dir);
        let record = format!("{key}{}", records::RECORD_NAME);
        // The marker and the record are not entries; a third key is.
        let page = self.store.list_page(&key, Some("/"), None, Some(3)).await?;
        Ok(!page.common_prefixes.is_empty() || page.objects.iter().any(|o| o.key != key && o.key != record))
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> Result<(), FsError> {
        self.check_writable()?;
        let dir = self.settled_dir(parent).await?;
        let inode = self.resolve(&dir, name, false).await?;
        if inode.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if self.dir_has_entries(&inode).await? {
            return Err(FsError::NotEmpty);
        }
        let key = self.inodes.key(&inode);
        self.keep_dir(&dir).await?;
        self.records.delete(&key).await?;
        self.store.delete_object(&key).await?;
        self.note_entry(parent, name, Kind::Dir, None);
        self.inodes.unlink_name(parent, name);
        Ok(())
    }

    /// Renames a file (copy, then delete) or a directory (every key under it; not atomic).
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
    ) -> Result<(), FsError> {
        self.rename_as(parent, name, newparent, newname, flags, false).await
    }

    /// A rename the kernel re-sent after the process serving it died: a directory rename that
    /// process left half done (the destination holds only copies of source keys, or the source
    /// only keys already copied) is completed instead of failing with `ENOTEMPTY`.
    pub async fn rename_resumed(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
    ) -> Result<(), FsError> {
        self.rename_as(parent, name, newparent, newname, flags, true).await
    }

    /// Whether `dest` looks like the copy a rename of `src` cut off made: for files, the same
    /// object (ETag); for directories, one set of names (relative to each directory) contains
    /// the other.
    async fn is_partial_move(&self, src: &Inode, dest: &Inode) -> Result<bool, FsError> {
        if src.kind != Kind::Dir {
            let (a, b) = (self.head(src).await?, self.head(dest).await?);
            if a.size != b.size {
                return Ok(false);
            }
            if a.etag.is_some() && a.etag == b.etag {
                return Ok(true);
            }
            // A copy's ETag differs on some servers (and for multipart objects): small files are
            // compared byte for byte.
            if a.size > RESUME_COMPARE_MAX {
                return Ok(false);
            }
            let (x, y) = (
                self.store.get_object_start(&a.key, RESUME_COMPARE_MAX).await?,
                self.store.get_object_start(&b.key, RESUME_COMPARE_MAX).await?,
            );
            return Ok(x.data == y.data);
        }
        let (a, b) = (self.inodes.key(src), self.inodes.key(dest));
        let names = |prefix: String| async move {
            let mut out = std::collections::HashSet::new();
            let mut token = None;
            loop {
                let page = self.store.list_page(&prefix, None, token, None).await?;
                out.extend(page.objects.into_iter().map(|o| o.key[prefix.len()..].to_owned()));
                match page.next_token {
                    Some(t) => token = Some(t),
                    None => return Ok::<_, FsError>(out),
                }
            }
        };
        let (from, to) = (names(a).await?, names(b).await?);
        Ok(to.is_subset(&from) || from.is_subset(&to))
    }

    async fn rename_as(
        &self,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        flags: u32,
        resumed: bool,
    ) -> Result<(), FsError> {
        self.check_writable()?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::NotSupported("RENAME_EXCHANGE"));
        }
        let dir = self.settled_dir(parent).await?;
        let newdir = self.settled_dir(newparent).await?;
        let new_key_base = self.check_new_name(&newdir, newname)?;
        let src = self.resolve(&dir, name, false).await?;
        let target = match self.resolve(&newdir, newname, false).await {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = &target {
            if t.ino == src.ino {
                return Ok(());
            }
            // The destination is what the dead process's copy made of the source.
            let resume = resumed && src.kind == t.kind && self.is_partial_move(&src, t).await?;
            if flags & libc::RENAME_NOREPLACE != 0 && !resume {
                return Err(FsError::Exists);
            }
            match (src.kind == Kind::Dir, t.kind == Kind::Dir) {
                (false, true) => return Err(FsError::IsDir),
                (true, false) => return Err(FsError::NotDir),
                (true, true) if !resume && self.dir_has_entries(t).await? => return Err(FsError::NotEmpty),
                _ => {}
            }
        }
        if src.kind == Kind::Dir && format!("{new_key_base}/").starts_with(&self.inodes.key(&src)) {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        if parent != newparent {
            self.keep_dir(&dir).await?;
        }
        // The files the rename moves or replaces are locked (in inode order) across all of it:
        // no write, truncate or commit of them runs until their keys are the new ones, and a
        // replaced file is marked unlinked before its lock is released.
        let mut open = match src.kind {
            Kind::Dir => self.open_files_under(&self.inodes.key(&src)),
            _ => src.open_state().map(|s| (Arc::clone(&src), s)).into_iter().collect(),
        };
        let target_state = target.as_ref().and_then(|t| t.open_state().map(|s| (Arc::clone(t), s)));
        open.extend(target_state.clone());
        open.sort_by_key(|(inode, _)| inode.ino);
        let mut held = Vec::with_capacity(open.len());
        for (inode, state) in &open {
            held.push((Arc::clone(inode), state.hold().await));
        }
        if let Some((t, _)) = &target_state
            && let Some((_, h)) = held.iter_mut().find(|(i, _)| i.ino == t.ino)
        {
            // Before the rename's copy overwrites the object it still reads from.
            h.keep_bytes(&self.writes, &self.inodes.key(t)).await;
        }
        let moving: Vec<&mut (Arc<Inode>, Held<'_>)> =
            held.iter_mut().filter(|(i, _)| target_state.as_ref().is_none_or(|(t, _)| t.ino != i.ino)).collect();
        self.rename_keys(&src, target.as_ref(), moving, parent, name, newparent, newname, &new_key_base).await?;
        if let Some((t, _)) = &target_state
            && let Some((_, h)) = held.iter().find(|(i, _)| i.ino == t.ino)
        {
            h.mark_unlinked();
        }
        if target.is_some() {
            self.inodes.unlink_name(newparent, newname);
        }
        self.inodes.rename(&src, newparent, newname);
        Ok(())
    }

    /// The S3 side of a rename: copies and deletes.
    #[allow(clippy::too_many_arguments)]
    async fn rename_keys(
        &self,
        src: &Inode,
        target: Option<&Arc<Inode>>,
        mut moving: Vec<&mut (Arc<Inode>, Held<'_>)>,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
        new_key_base: &str,
    ) -> Result<(), FsError> {
        if src.kind == Kind::Dir {
            let new_prefix = format!("{new_key_base}/");
            let old_prefix = self.inodes.key(src);
            if let Some(t) = target {
                let key = self.inodes.key(t);
                self.records.delete(&key).await?;
                self.store.delete_object(&key).await?;
            }
            // Files open for writing under it commit first (as a file rename does), so the
            // copies carry what they hold; afterwards they write on under the new keys.
            for (inode, held) in moving.iter_mut() {
                let committed = held.commit(&self.writes, &self.inodes.key(inode)).await?;
                if let Some(state) = inode.open_state() {
                    self.published(inode, &state, committed);
                }
            }
            let moved = {
                let _no_flush = self.records.exclusive().await;
                let moved = self.rename_dir(&old_prefix, &new_prefix).await?;
                if self.markers.load(Ordering::Relaxed) && !moved.contains_key(&old_prefix) {
                    // An implied directory moved: it had no marker to copy, and its new name
                    // (maybe an emptied directory whose marker just went) needs one to keep
                    // what it shows now, as `keep_dir` gives one to a directory left behind.
                    self.store.put_object(&new_prefix, Bytes::new(), &pinned(&src.stat())).await?;
                    src.stat.lock().unwrap().marker = true;
                }
                // Attribute changes not yet written follow the directory (a listing of the new
                // one must not show defaults for them).
                self.records.move_dir(&old_prefix, &new_prefix);
                moved
            };
            for (_, held) in moving.iter_mut() {
                let Some(old_key) = held.source_key() else { continue };
                if let Some(copy) = moved.get(&old_key) {
                    held.rebase(copy.clone());
                }
            }
            self.note_entry(parent, name, Kind::Dir, None);
            self.note_entry(newparent, newname, Kind::Dir, Self::dir_entry(&src.stat().attrs));
        } else {
            let mut src_held = moving.into_iter().next();
            if let Some((inode, held)) = src_held.as_deref_mut() {
                let committed = held.commit(&self.writes, &self.inodes.key(inode)).await?;
                if let Some(state) = inode.open_state() {
                    self.published(inode, &state, committed);
                }
            }
            let meta = self.head(src).await?;
            let metadata = unpinned_mtime(&meta);
            let copied = self.copy_any(&ObjectId::from_meta(&meta), meta.size, new_key_base, metadata.as_ref()).await?;
            self.store.delete_object(&meta.key).await?;
            let mut attrs = stat_from_meta(&meta).attrs;
            attrs.mtime = attrs.mtime.or(metadata.is_some().then_some(meta.last_modified));
            self.note_entry(parent, name, src.kind, None);
            let entry = Self::file_entry(&copied.etag, meta.size, &attrs, copied.last_modified);
            self.note_entry(newparent, newname, src.kind, entry);
            if let Some((_, held)) = src_held {
                // Open handles keep writing under the new name; unchanged bytes now live there.
                let id = if copied.etag.is_empty() {
                    ObjectId::from_meta(&self.store.head_object(new_key_base).await?)
                } else {
                    ObjectId { key: new_key_base.to_owned(), version: copied.etag.clone(), has_etag: true }
                };
                held.rebase(id);
            }
        }
        Ok(())
    }

    /// Copies every key under `old` to `new`, then deletes the originals; bounded concurrency.
    /// A crash in the middle leaves both trees, each complete up to the failure, never a lost key.
    /// Files under the directory key `prefix` with write state not unlinked.
    pub(super) fn open_files_under(&self, prefix: &str) -> Vec<(Arc<Inode>, Arc<OpenState>)> {
        let mut open = self.inodes.with_open_state();
        open.retain(|(inode, state)| !state.is_unlinked() && self.inodes.key(inode).starts_with(prefix));
        open
    }

    pub(super) async fn rename_dir(&self, old: &str, new: &str) -> Result<write::Moved, FsError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self.store.list_page(old, None, token, None).await?;
            keys.extend(page.objects);
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let this = self;
        let gate = Arc::new(Semaphore::new(RENAME_CONCURRENCY));
        let mut copies = futures::stream::FuturesUnordered::new();
        for meta in &keys {
            let gate = Arc::clone(&gate);
            let dest = format!("{new}{}", &meta.key[old.len()..]);
            copies.push(async move {
                let _permit = gate.acquire().await.expect("never closed");
                // A listing carries no metadata: HEAD tells whether the mtime is pinned.
                let meta = this.store.head_object(&meta.key).await?;
                let metadata = unpinned_mtime(&meta);
                let copied = this.copy_any(&ObjectId::from_meta(&meta), meta.size, &dest, metadata.as_ref()).await?;
                let id = if copied.etag.is_empty() {
                    ObjectId::from_meta(&this.store.head_object(&dest).await?)
                } else {
                    ObjectId { key: dest, version: copied.etag, has_etag: true }
                };
                Ok::<_, FsError>((meta.key.clone(), id))
            });
        }
        use futures::StreamExt;
        let mut moved = write::Moved::new();
        while let Some(r) = copies.next().await {
            let (old_key, id) = r?;
            moved.insert(old_key, id);
        }
        drop(copies);
        // The directory's own marker goes last: if a delete fails, the old directory keeps its
        // attributes along with what is left in it.
        let (marker, rest): (Vec<_>, Vec<_>) = keys.iter().partition(|m| m.key == old);
        let mut deletes = futures::stream::FuturesUnordered::new();
        for meta in rest {
            let gate = Arc::clone(&gate);
            deletes.push(async move {
                let _permit = gate.acquire().await.expect("never closed");
                this.store.delete_object(&meta.key).await
            });
        }
        while let Some(r) = deletes.next().await {
            r?;
        }
        for meta in marker {
            this.store.delete_object(&meta.key).await?;
        }
        Ok(moved)
    }

    /// Lists a directory completely (all pages) and snapshots it for `readdir`.
    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let dir = self.dir_inode(ino)?;
        let entries = self.list_dir(&dir).await?;
        let fh = self.handle_number(false);
        self.dirs.lock().unwrap().insert(fh, Arc::new(DirHandle { entries }));
        Ok(fh)
    }

    /// Whether a `readdir` on `fh` needs [`S3Fs::adopt_dir`] first.
    pub fn dir_needs_adoption(&self, fh: u64) -> bool {
        self.is_foreign(fh) && !self.dirs.lock().unwrap().contains_key(&fh)
    }

    /// Lists `ino` again under `fh`, a directory handle of an earlier process serving this
    /// connection; a listing in progress continues from the same offset.
    pub async fn adopt_dir(&self, ino: u64, fh: u64) -> Result<(), FsError> {
        if !self.dir_needs_adoption(fh) {
            return Ok(());
        }
        let dir = self.dir_inode(ino)?;
        let entries = self.list_dir(&dir).await?;
        self.dirs.lock().unwrap().insert(fh, Arc::new(DirHandle { entries }));
        Ok(())
    }

    pub(super) async fn list_dir(&self, dir: &Arc<Inode>) -> Result<Vec<DirEntry>, FsError> {
        let dir_key = self.inodes.key(dir);
        // Files not yet in S3, taken before the LIST starts: one committed while the LIST runs
        // may be missing from its pages, but not from both.
        let pending = self.inodes.pending_children(dir.ino);
        // The record (one GET) comes beside the LIST pages.
        let (record, names) = tokio::join!(self.records.load(&dir_key), self.list_names(&dir_key));
        let (mut names, marker) = names?;
        if marker {
            dir.stat.lock().unwrap().marker = true;
        }
        // Every entry counts as seen now, when the whole listing is known: with thousands of
        // entries the first pages are seconds old by the last one, and `ls -l` looks them up
        // only after reading the whole directory.
        let listed_at = Instant::now();
        for (name, (kind, stat)) in names.iter_mut() {
            let Some(stat) = stat else { continue };
            stat.validated_at = listed_at;
            self.apply_record(record.as_ref(), name, kind, stat);
        }
        for child in pending {
            names.entry(child.name()).or_insert((child.kind, None));
        }
        let mut entries = Vec::with_capacity(names.len());
        for (name, (kind, stat)) in names {
            let existing = self.inodes.child(dir.ino, &name);
            let inode = match (existing, stat) {
                // Being written here, or known at least as well (fresh, from S3, same object).
                (Some(ex), _) if ex.open_state().is_some() || ex.local_dir.load(Ordering::Relaxed) => ex,
                (Some(ex), Some(stat)) if ex.kind == kind && self.known_as_well(&ex.stat(), &stat) => ex,
                (_, Some(stat)) => self.inodes.upsert(dir, &name, kind, stat, false),
                (Some(ex), None) => ex,
                (None, None) => continue,
            };
            entries.push(DirEntry { ino: inode.ino, name, kind: inode.kind });
        }
        Ok(entries)
    }

    /// Whether `known` (in memory) is as good as `listed` (from a listing and the record).
    pub(super) fn known_as_well(&self, known: &Stat, listed: &Stat) -> bool {
        // A server that omits ETags from listings (s3s-fs) vouches for nothing but the size.
        let same_etag = listed.etag.is_none() || known.etag == listed.etag;
        self.fresh(known) && known.from_head && same_etag && known.size == listed.size
    }

    /// Every name directly under `dir_key`: directories (common prefixes; they win over an
    /// object of the same name) and objects with what the listing says of them; and whether the
    /// directory's own marker object was listed.
    pub(super) async fn list_names(
        &self,
        dir_key: &str,
    ) -> Result<(BTreeMap<String, (Kind, Option<Stat>)>, bool), FsError> {
        let mut names: BTreeMap<String, (Kind, Option<Stat>)> = BTreeMap::new();
        let mut marker = false;
        let mut token = None;
        loop {
            let page = self.store.list_page(dir_key, Some("/"), token, None).await?;
            for p in &page.common_prefixes {
                let name = p[dir_key.len()..].trim_end_matches('/');
                if valid_name(name) && p.ends_with('/') && !name.contains('/') {
                    names.insert(name.to_owned(), (Kind::Dir, Some(self.dir_stat())));
                } else {
                    tracing::debug!(prefix = %p, "skipping prefix that cannot be a directory name");
                }
            }
            for o in &page.objects {
                let Some(name) = o.key.strip_prefix(dir_key) else { continue };
                if name.is_empty() {
                    marker = true; // the directory's own marker object
                    continue;
                }
                if !valid_name(name) {
                    if name != records::RECORD_NAME && name != RESERVED_NAME {
                        tracing::debug!(key = %o.key, "skipping key that cannot be a file name");
                    }
                    continue;
                }
                // A directory of the same name wins (it may come on a later page).
                names.entry(name.to_owned()).or_insert_with(|| (Kind::File, Some(stat_from_meta(o))));
            }
            match page.next_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        Ok((names, marker))
    }

    /// What a directory's record says about a listed entry (see [`records`]): with no record,
    /// nothing there carries s3csi attributes (mount defaults, no HEAD); an entry the record
    /// vouches for (same ETag and size) gets its attributes and kind; anything else is left for
    /// a HEAD at lookup.
    pub(super) fn apply_record(&self, record: Option<&DirRecord>, name: &str, kind: &mut Kind, stat: &mut Stat) {
        let Some(record) = record else {
            stat.from_head = true;
            return;
        };
        let entry = match kind {
            Kind::Dir => record.dir(name),
            _ => record.file(name, stat.etag.as_deref(), stat.size, stat.mtime),
        };
        let Some(entry) = entry else {
            stat.from_head = false;
            return;
        };
        stat.attrs = StoredAttrs::decode(&entry.meta);
        if let Some(t) = stat.attrs.mtime {
            stat.mtime = t;
        }
        if *kind != Kind::Dir && stat.attrs.symlink {
            *kind = Kind::Symlink;
        }
        stat.from_head = true;
    }

    /// Entries of an open directory from `offset` (0 = start; `.` and `..` come first).
    pub fn readdir(&self, ino: u64, fh: u64, offset: u64) -> Result<Vec<(u64, DirEntry)>, FsError> {
        let dir = self.dir_inode(ino)?;
        let handle = self.dirs.lock().unwrap().get(&fh).cloned().ok_or(FsError::BadHandle)?;
        let dots = [
            DirEntry { ino: dir.ino, name: ".".into(), kind: Kind::Dir },
            DirEntry { ino: dir.parent(), name: "..".into(), kind: Kind::Dir },
        ];
        let all = dots.into_iter().chain(handle.entries.iter().cloned());
        Ok(all.enumerate().skip(offset as usize).map(|(i, e)| (i as u64 + 1, e)).collect())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().unwrap().remove(&fh);
    }
}

/// Metadata for a marker written for a directory that had none: what it shows now, its
/// mtime included (a new marker's Last-Modified would otherwise replace it).
fn pinned(stat: &Stat) -> UserMetadata {
    let mut attrs = stat.attrs.clone();
    attrs.mtime = Some(stat.mtime);
    attrs.encode()
}

/// For a copy that renames `meta`'s object: `None` when its metadata pins the mtime (the
/// copy keeps it as it is), else that metadata with the mtime pinned to the source's
/// Last-Modified, which objects written by other clients show and the copy would change.
fn unpinned_mtime(meta: &ObjectMeta) -> Option<UserMetadata> {
    let stored = meta.user_metadata.as_ref().map(StoredAttrs::decode).unwrap_or_default();
    if stored.mtime.is_some() {
        return None;
    }
    let mut attrs = stored;
    attrs.mtime = Some(meta.last_modified);
    Some(attrs.encode())
}
