//! Attribute changes (`chmod`, `chown`, `utimes`, `truncate`) and the server-side copies they
//! need.

use std::time::Instant;

use bytes::Bytes;

use super::attrs::{StoredAttrs, stat_from_meta};
use super::inode::{Inode, Kind, ROOT_INO};
use super::write;
use super::{Attr, COPY_PART_SIZE, Caller, FsError, S3Fs, SetAttr};
use crate::s3::{ObjectId, ObjectStore, UserMetadata};

impl<S: ObjectStore> S3Fs<S> {
    pub async fn setattr(&self, caller: Caller, ino: u64, fh: Option<u64>, changes: SetAttr) -> Result<Attr, FsError> {
        self.check_writable()?;
        let inode = self.inode(ino)?;
        self.settle(&inode).await?;
        self.check_attr_change(caller, &inode, &changes)?;
        if let Some(size) = changes.size {
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if size > write::MAX_OBJECT_SIZE {
                return Err(FsError::TooBig);
            }
            let from_handle = fh.and_then(|fh| self.handle(fh).ok()).and_then(|h| h.write_state());
            let key = || self.inodes.key(&inode);
            match from_handle {
                Some(state) => {
                    let truncated = state.truncate(&self.writes, &key, size).await;
                    self.published(&inode, &state, state.take_committed());
                    truncated?;
                }
                None => {
                    // Without a writable handle: a writer that truncates and closes at once
                    // (committing if no other writer has the file open).
                    let state = self.begin_writing(&inode, false).await?;
                    let truncated = state.truncate(&self.writes, &key, size).await;
                    let closed = self.end_writing(&inode, &state).await;
                    truncated.and(closed)?;
                }
            }
        }
        let attrs_change =
            changes.mode.is_some() || changes.uid.is_some() || changes.gid.is_some() || changes.mtime.is_some();
        if attrs_change || changes.atime.is_some() {
            self.store_attrs(&inode, &changes).await?;
        }
        Ok(self.attr(&inode))
    }

    /// Applies `chmod`/`chown`/`utimes` and stores the result, starting from everything stored,
    /// so no other attribute changes: mode and owner changes keep the mtime; only `utimes`
    /// sets it. The root's attributes live in memory (it has no object of its own); an open
    /// file stores them with its next commit; a directory in its marker object; any other
    /// object by copying it onto itself with the new metadata.
    pub(super) async fn store_attrs(&self, inode: &Inode, changes: &SetAttr) -> Result<(), FsError> {
        let apply = |a: &mut StoredAttrs| {
            if let Some(mode) = changes.mode {
                a.mode = Some(mode & 0o7777);
            }
            a.uid = changes.uid.or(a.uid);
            a.gid = changes.gid.or(a.gid);
            a.atime = changes.atime.or(a.atime);
        };
        if inode.ino == ROOT_INO {
            let mut stat = inode.stat();
            apply(&mut stat.attrs);
            stat.mtime = changes.mtime.unwrap_or(stat.mtime);
            inode.set_stat(stat);
            return Ok(());
        }
        if let Some(state) = self.join_writing(inode) {
            // Joined as a writer, so the state cannot be detached before it stores them.
            state.update_attrs(apply, changes.mtime).await;
            let mut stat = inode.stat();
            stat.attrs = state.attrs().await;
            inode.set_stat(stat);
            return self.end_writing(inode, &state).await;
        }
        let key = self.inodes.key(inode);
        let (mut stat, source) = if inode.kind == Kind::Dir {
            (inode.stat(), None)
        } else {
            // The current object: its metadata is the base, its ETag the copy source.
            let meta = self.head(inode).await?;
            (stat_from_meta(&meta), Some((ObjectId::from_meta(&meta), meta.size)))
        };
        apply(&mut stat.attrs);
        stat.mtime = changes.mtime.unwrap_or(stat.mtime);
        // Pin the mtime: the rewrite gives the object a new Last-Modified.
        stat.attrs.mtime = Some(stat.mtime);
        let metadata = stat.attrs.encode();
        let entry = match source {
            None => {
                self.store.put_object(&key, Bytes::new(), &metadata).await?;
                Self::dir_entry(&stat.attrs)
            }
            Some((object, size)) => {
                let copied = self.copy_any(&object, size, &key, Some(&metadata)).await?;
                stat.etag = Some(copied.etag.clone());
                Self::file_entry(&copied.etag, size, &stat.attrs, copied.last_modified)
            }
        };
        self.note_entry(inode.parent(), &inode.name(), inode.kind, entry);
        stat.from_head = true;
        stat.marker |= inode.kind == Kind::Dir;
        stat.validated_at = Instant::now();
        inode.set_stat(stat);
        Ok(())
    }

    /// POSIX rules for `chmod`/`chown`/`utimes` (the kernel enforces them as well, since the
    /// mount uses `default_permissions`): only root gives a file away; the owner (or root) may
    /// change the mode, the group and set explicit times.
    pub(super) fn check_attr_change(&self, caller: Caller, inode: &Inode, changes: &SetAttr) -> Result<(), FsError> {
        if caller.is_root() {
            return Ok(());
        }
        let current = self.attr(inode);
        let owner = caller.uid == current.uid;
        if changes.uid.is_some_and(|uid| uid != current.uid) {
            return Err(FsError::NotPermitted("only root may change a file's owner"));
        }
        // The kernel clears set-user-ID/set-group-ID on a write by another user (killpriv).
        let only_clears_privs = changes.mode.is_some_and(|m| m == current.perm & !0o6000);
        let mode_change = changes.mode.is_some() && !only_clears_privs;
        if !owner && (mode_change || changes.gid.is_some_and(|g| g != current.gid)) {
            return Err(FsError::NotPermitted("only the owner or root may change mode or group"));
        }
        Ok(())
    }

    /// Server-side copy of any size: CopyObject up to 5 GiB, a multipart copy above.
    pub(super) async fn copy_any(
        &self,
        src: &ObjectId,
        size: u64,
        dest: &str,
        metadata: Option<&UserMetadata>,
    ) -> Result<crate::s3::Copied, FsError> {
        write::copy_any(&self.writes, src, size, dest, metadata, self.copy_object_max, COPY_PART_SIZE).await
    }
}
