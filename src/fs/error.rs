//! [`FsError`]: every way a filesystem operation fails, and its single mapping to an errno.

use crate::s3::S3Error;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only file system (mounted with --read-only)")]
    ReadOnly,
    #[error("the object changed on the server while it was open; reopen the file")]
    ObjectChanged,
    #[error("access denied by S3: {0}")]
    AccessDenied(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("invalid file handle")]
    BadHandle,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    #[error("directory not empty")]
    NotEmpty,
    #[error("file exists")]
    Exists,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file name too long (S3 keys are limited to 1024 bytes)")]
    NameTooLong,
    #[error("no space left in the staging area")]
    NoSpace,
    #[error("an earlier upload of this file failed ({0}); its data was not saved")]
    UploadFailed(String),
    #[error("file too large: S3 objects are limited to 5 TiB")]
    TooBig,
    #[error(
        "the file was open for writing when the process serving this mount stopped; what was written since its last successful fsync is lost"
    )]
    HandleLost,
    #[error("local I/O failed: {0}")]
    Local(String),
    #[error(transparent)]
    Store(S3Error),
}

impl FsError {
    pub fn errno(&self) -> libc::c_int {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::ObjectChanged => libc::ESTALE, // ETag no longer matches
            FsError::AccessDenied(_) => libc::EACCES,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::BadHandle => libc::EBADF,
            FsError::NotSupported(_) => libc::ENOTSUP,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Exists => libc::EEXIST,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NoSpace => libc::ENOSPC,
            FsError::TooBig => libc::EFBIG,
            FsError::Local(_) | FsError::UploadFailed(_) | FsError::HandleLost => libc::EIO,
            FsError::Store(_) => libc::EIO,
        }
    }

    /// Answers programs meet in normal work (a probe for a missing file, `mkdir -p` of an
    /// existing one, `rmdir` of a full one, `ln` falling back to a copy) are logged quietly;
    /// everything else at `warn`.
    pub fn is_expected(&self) -> bool {
        matches!(
            self,
            FsError::NotFound
                | FsError::ReadOnly
                | FsError::NotDir
                | FsError::IsDir
                | FsError::NotPermitted(_)
                | FsError::NotSupported(_)
                | FsError::Exists
                | FsError::NotEmpty
        )
    }
}

impl From<S3Error> for FsError {
    fn from(e: S3Error) -> Self {
        match e {
            S3Error::NotFound(_) => FsError::NotFound,
            S3Error::AccessDenied(why) => FsError::AccessDenied(why),
            S3Error::PreconditionFailed(_) => FsError::ObjectChanged,
            other => FsError::Store(other),
        }
    }
}
