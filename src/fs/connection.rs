//! The kernel side of a FUSE connection served from a descriptor we were given (`--fuse-fd`):
//! mounting it, resuming a connection that another process initialised (no second `INIT`),
//! asking the kernel to re-send the requests a dead process had read, and stopping the session
//! loop so another process can take the connection over. See `docs/recovery.md`.
//!
//! The `fuser` session reads and writes one fd number. Pointing that number at another file
//! with `dup2` is how the session is started on a socket (to let it handle a synthetic `INIT`)
//! and later parked on a socket (to hand the connection over), using only `fuser`'s public API.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A node id the kernel never sees: a `FORGET` of it marks a point in the session's request
/// stream (everything read before it has been dispatched).
pub const BARRIER_INO: u64 = u64::MAX - 1;

/// The bit the kernel sets in the `unique` of a request it re-sends (`FUSE_UNIQUE_RESEND`).
pub const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

const FUSE_FORGET: u32 = 2;
const FUSE_INIT: u32 = 26;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (Linux 6.9).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER: usize = 16;
/// How long the session may take to answer the synthetic `INIT`.
const INIT_WAIT: Duration = Duration::from_secs(10);

/// What the session loop reports about itself, for resuming and hand-over.
#[derive(Debug, Default)]
pub struct SessionProbe {
    /// Requests dispatched to tasks and not yet answered.
    in_flight: AtomicUsize,
    /// Barrier `FORGET`s seen by the session loop.
    barriers: Mutex<u64>,
    barrier_seen: Condvar,
    /// Requests read from the kernel since start (for logs).
    served: AtomicU64,
}

impl SessionProbe {
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Called by the session loop when it reads a barrier.
    pub fn barrier(&self) {
        *self.barriers.lock().unwrap() += 1;
        self.barrier_seen.notify_all();
    }

    fn barriers(&self) -> u64 {
        *self.barriers.lock().unwrap()
    }

    /// Waits until more than `seen` barriers were read, at most `limit`.
    fn wait_barrier(&self, seen: u64, limit: Duration) -> bool {
        let guard = self.barriers.lock().unwrap();
        let (guard, _) = self.barrier_seen.wait_timeout_while(guard, limit, |n| *n <= seen).unwrap();
        *guard > seen
    }

    /// Waits until no request is in flight, at most `limit`; returns how many still are.
    fn wait_idle(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.in_flight();
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Mounts the FUSE connection behind `device` at `mountpoint` (what `fusermount` would do):
/// the kernel then sends `INIT` on `device`.
pub fn mount(device: &OwnedFd, mountpoint: &Path, source: &str, read_only: bool, allow_other: bool) -> io::Result<()> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions", device.as_raw_fd());
    if allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let target = c(&mountpoint.to_string_lossy())?;
    let (source, fstype, data) = (c(source)?, c("fuse.s3csi")?, c(&data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Takes ownership of an inherited descriptor after checking it is open.
pub fn inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD on any integer is safe; it fails with EBADF if the fd is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open and nothing else in this process owns it (it was inherited).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(owned);
    let meta = file.metadata()?;
    let is_fuse = meta.file_type().is_char_device()
        && libc::major(meta.rdev()) == FUSE_MAJOR
        && libc::minor(meta.rdev()) == FUSE_MINOR;
    if !is_fuse {
        // Not closed: it is someone else's descriptor (stdin, a log file).
        let _ = file.into_raw_fd();
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("it is {}, not /dev/fuse", describe(&meta))));
    }
    let owned = OwnedFd::from(file);
    // Not inherited by anything this process starts.
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

/// Whether a `/dev/fuse` descriptor belongs to a mounted connection. The kernel answers a poll
/// of one that does not (opened, never mounted) with `POLLERR` at once.
pub fn is_attached(device: &OwnedFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: device.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfd.revents & libc::POLLERR == 0)
}

/// `/dev/fuse` is the misc character device 10:229 on every Linux system.
const FUSE_MAJOR: u32 = 10;
const FUSE_MINOR: u32 = 229;

/// What kind of file a descriptor is, for an error message.
fn describe(meta: &std::fs::Metadata) -> String {
    let kind = meta.file_type();
    if kind.is_char_device() {
        format!("the character device {}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev()))
    } else if kind.is_file() {
        "a regular file".to_owned()
    } else if kind.is_dir() {
        "a directory".to_owned()
    } else if kind.is_fifo() {
        "a pipe".to_owned()
    } else if kind.is_socket() {
        "a socket".to_owned()
    } else {
        "another kind of file".to_owned()
    }
}

/// A connection whose session runs on `session_fd`, with our own copy of the device.
pub struct Connection {
    device: OwnedFd,
    session_fd: RawFd,
    probe: Arc<SessionProbe>,
}

/// How resuming an initialised connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resent {
    /// The kernel re-queued the requests the previous process had read.
    Yes,
    /// The kernel is older than 6.9: requests read by the previous process stay unanswered.
    Unsupported,
}

impl Connection {
    /// For a session that reads the device directly (a fresh mount): returns the fd to give to
    /// `fuser::Session::from_fd`.
    pub fn fresh(device: OwnedFd, probe: Arc<SessionProbe>) -> io::Result<(Self, OwnedFd)> {
        let session = device.try_clone()?;
        let session_fd = session.as_raw_fd();
        Ok((Connection { device, session_fd, probe }, session))
    }

    /// For resuming an initialised connection: returns the fd to give to
    /// `fuser::Session::from_fd` (a socket carrying a synthetic `INIT`) and what finishes the
    /// switch once the session runs ([`Resume::complete`]).
    pub fn resume(device: OwnedFd, probe: Arc<SessionProbe>) -> io::Result<(Self, OwnedFd, Resume)> {
        let (ours, theirs) = UnixStream::pair()?;
        (&ours).write_all(&init_request())?;
        let session: OwnedFd = theirs.into();
        let session_fd = session.as_raw_fd();
        let conn = Connection { device, session_fd, probe };
        Ok((conn, session, Resume { peer: ours }))
    }

    /// The device descriptor (for notifications).
    pub fn device(&self) -> RawFd {
        self.device.as_raw_fd()
    }

    /// Stops the session loop from reading the kernel, waits (at most `limit`) until every
    /// request it read has been answered, and leaves the loop parked. Replies written meanwhile
    /// still reach the kernel. `loop_thread` is the session thread. Returns how many requests
    /// were still unanswered at the limit (the successor's resend covers them).
    pub fn quiesce(&self, loop_thread: libc::pthread_t, limit: Duration) -> io::Result<usize> {
        install_interrupt_handler()?;
        let (park, ours) = UnixStream::pair()?;
        let seen = self.probe.barriers();
        // From here the session reads the socket; its replies go there too, and the forwarder
        // passes them on to the kernel.
        dup2(park.as_raw_fd(), self.session_fd)?;
        drop(park);
        let device = self.device.try_clone()?;
        let reader = ours.try_clone()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forwarder = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("s3csi-handover".into())
                .spawn(move || forward_replies(reader, device, &stop))?
        };
        // Wake the loop if it waits in a read of the device (EINTR: fuser retries, on the socket).
        // SAFETY: pthread_kill with a live thread id and a signal whose handler does nothing.
        unsafe { libc::pthread_kill(loop_thread, libc::SIGUSR1) };
        (&ours).write_all(&forget_request(BARRIER_INO))?;
        let deadline = Instant::now() + limit;
        if !self.probe.wait_barrier(seen, limit) {
            stop.store(true, Ordering::SeqCst);
            let _ = forwarder.join();
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the FUSE session loop did not stop reading"));
        }
        let left = self.probe.wait_idle(deadline.saturating_duration_since(Instant::now()));
        stop.store(true, Ordering::SeqCst);
        let _ = forwarder.join();
        // `ours` stays open until exit: the parked loop must not read end-of-file and quit.
        std::mem::forget(ours);
        Ok(left)
    }
}

/// The rest of resuming an initialised connection, run while the session thread runs.
pub struct Resume {
    peer: UnixStream,
}

impl Resume {
    /// Waits for the session's answer to the synthetic `INIT`, asks the kernel to re-send what
    /// the previous process had read, and points the session at the device.
    pub fn complete(self, conn: &Connection) -> io::Result<Resent> {
        self.peer.set_read_timeout(Some(INIT_WAIT))?;
        let mut header = [0u8; OUT_HEADER];
        (&self.peer)
            .read_exact(&mut header)
            .map_err(|e| io::Error::new(e.kind(), format!("the FUSE session did not answer INIT: {e}")))?;
        let len = u32::from_ne_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let mut rest = vec![0u8; len.saturating_sub(OUT_HEADER)];
        (&self.peer).read_exact(&mut rest)?;
        let error = i32::from_ne_bytes(header[4..8].try_into().expect("4 bytes"));
        if error != 0 {
            return Err(io::Error::other(format!("the FUSE session refused INIT (error {error})")));
        }
        // Before the session reads the device, so nothing is read twice.
        let resent = notify_resend(conn.device.as_raw_fd())?;
        dup2(conn.device.as_raw_fd(), conn.session_fd)?;
        // If the loop is already blocked on the socket, this wakes it; it then reads the device.
        let seen = conn.probe.barriers();
        if (&self.peer).write_all(&forget_request(BARRIER_INO)).is_ok() {
            conn.probe.wait_barrier(seen, Duration::from_millis(50));
        }
        Ok(resent)
    }
}

fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: both are fds this process holds; dup2 atomically replaces `to`.
    if unsafe { libc::dup2(from, to) } < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Writes `FUSE_NOTIFY_RESEND` to the device.
fn notify_resend(device: RawFd) -> io::Result<Resent> {
    let mut msg = Vec::with_capacity(OUT_HEADER);
    msg.extend_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    msg.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    // SAFETY: writing an owned buffer to an fd we hold.
    let rc = unsafe { libc::write(device, msg.as_ptr().cast(), msg.len()) };
    if rc >= 0 {
        return Ok(Resent::Yes);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => Ok(Resent::Unsupported),
        _ => Err(e),
    }
}

fn in_header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&opcode.to_ne_bytes());
    m.extend_from_slice(&unique.to_ne_bytes());
    m.extend_from_slice(&nodeid.to_ne_bytes());
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
    m
}

/// An `INIT` as the kernel sends it (protocol 7.31, the features we use offered).
fn init_request() -> Vec<u8> {
    // `struct fuse_init_in` of protocol 7.36: major, minor, max_readahead, flags, flags2, unused[11].
    let len = IN_HEADER + 64;
    let mut m = in_header(len, FUSE_INIT, 1, 0);
    let flags = (fuser::consts::FUSE_ASYNC_READ
        | fuser::consts::FUSE_BIG_WRITES
        | fuser::consts::FUSE_MAX_PAGES
        | fuser::consts::FUSE_PARALLEL_DIROPS) as u32;
    for v in [7u32, 31, 1 << 20, flags] {
        m.extend_from_slice(&v.to_ne_bytes());
    }
    m.resize(len, 0);
    m
}

fn forget_request(nodeid: u64) -> Vec<u8> {
    let len = IN_HEADER + 8;
    let mut m = in_header(len, FUSE_FORGET, 0, nodeid);
    m.extend_from_slice(&0u64.to_ne_bytes());
    m
}

/// Passes replies the session writes to the socket on to the kernel, one message at a time,
/// until `stop` is set and nothing is left to read.
fn forward_replies(socket: UnixStream, device: OwnedFd, stop: &std::sync::atomic::AtomicBool) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match (&socket).read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read replies during the hand-over");
                return;
            }
        }
        while buf.len() >= OUT_HEADER {
            let len = u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if len < OUT_HEADER || buf.len() < len {
                break;
            }
            // SAFETY: writing an owned buffer to the device fd we hold.
            let rc = unsafe { libc::write(device.as_raw_fd(), buf.as_ptr().cast(), len) };
            if rc < 0 {
                // The request was interrupted or the connection is gone: as for any reply.
                tracing::debug!(error = %io::Error::last_os_error(), "reply not taken by the kernel");
            }
            buf.drain(..len);
        }
    }
}

extern "C" fn interrupt_read(_: libc::c_int) {}

/// A `SIGUSR1` handler that does nothing, without `SA_RESTART`: the signal makes a blocking read
/// of the device return `EINTR`.
fn install_interrupt_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupt_read as *const () as usize;
        action.sa_flags = 0;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_requests_have_the_kernel_layout() {
        let init = init_request();
        assert_eq!(init.len(), 104);
        assert_eq!(u32::from_ne_bytes(init[..4].try_into().unwrap()) as usize, init.len());
        assert_eq!(u32::from_ne_bytes(init[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(init[40..44].try_into().unwrap()), 7);
        let forget = forget_request(BARRIER_INO);
        assert_eq!(forget.len(), 48);
        assert_eq!(u64::from_ne_bytes(forget[16..24].try_into().unwrap()), BARRIER_INO);
    }

    #[test]
    fn the_barrier_wait_ends_when_the_loop_reports_it() {
        let probe = Arc::new(SessionProbe::default());
        let seen = probe.barriers();
        assert!(!probe.wait_barrier(seen, Duration::from_millis(10)));
        let p = Arc::clone(&probe);
        let t = std::thread::spawn(move || p.barrier());
        assert!(probe.wait_barrier(seen, Duration::from_secs(5)));
        t.join().unwrap();
        probe.started();
        assert_eq!(probe.wait_idle(Duration::from_millis(10)), 1);
        probe.finished();
        assert_eq!(probe.wait_idle(Duration::from_millis(10)), 0);
    }
}
