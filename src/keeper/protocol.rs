//! The keeper's wire protocol: newline-delimited JSON over a Unix stream socket, one request per
//! connection, except a hand-over, which keeps its connection for all volumes. A `/dev/fuse`
//! descriptor travels as `SCM_RIGHTS` ancillary data on the message that offers its volume.
//!
//! Requests come from the node service (start, stop, list) and from a newer keeper (hand-over,
//! confirm, decline); responses carry the result, or an error with the kind the caller maps to
//! its own errors.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::mount::supervisor::MountSpec;

/// Longest message accepted: a spec with its arguments and credentials is a few KiB.
const MAX_LINE_BYTES: usize = 1 << 20;
/// Descriptors accepted with one read; a message carries at most one.
const MAX_FDS_PER_READ: usize = 4;

/// What to run for one volume.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The volume's name in the state directory (its file stem); the keeper's key.
    pub volume: String,
    /// The CSI volume id, for logs and metric labels.
    pub volume_id: String,
    pub mountpoint: PathBuf,
    /// Arguments after `s3csi`, starting with `mount`.
    pub args: Vec<String>,
    /// Environment additions (credentials): never logged.
    pub env: BTreeMap<String, String>,
    /// Environment variables to remove from the keeper's own.
    pub env_remove: Vec<String>,
    /// The mount process's journal (`--recovery-dir`); removed when the volume is stopped.
    pub recovery_dir: PathBuf,
}

impl fmt::Debug for VolumeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeSpec")
            .field("volume", &self.volume)
            .field("volume_id", &self.volume_id)
            .field("mountpoint", &self.mountpoint)
            .field("args", &self.args)
            .field("env", &self.env.keys().map(|k| (k, "<redacted>")).collect::<Vec<_>>())
            .field("env_remove", &self.env_remove)
            .field("recovery_dir", &self.recovery_dir)
            .finish()
    }
}

impl VolumeSpec {
    /// Whether `other` asks for the same mount (a repeated start is then answered with the
    /// running process). Credentials are not compared: a rotated Secret applies at the next
    /// staging, as other tuning does.
    pub fn same_mount(&self, other: &VolumeSpec) -> bool {
        self.mountpoint == other.mountpoint && self.args == other.args
    }

    /// The command line and environment for the supervisor.
    pub fn mount_spec(&self) -> MountSpec {
        MountSpec {
            args: self.args.clone(),
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            env_remove: self.env_remove.clone(),
        }
    }
}

/// A request to the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start a volume's mount process (idempotent for the same spec).
    Start { spec: VolumeSpec },
    /// Stop a volume's mount process (the caller unmounted it) and forget the volume.
    Stop { volume: String },
    /// Every volume the keeper owns.
    List,
    /// From a newer keeper: hand every volume over on this connection.
    HandOver { keeper_id: Option<String> },
    /// From the newer keeper: it holds the offered descriptor of `volume`; the old keeper may
    /// now end its process.
    Accept { volume: String },
    /// From the newer keeper: its successor for `volume` serves.
    Confirm { volume: String },
    /// From the newer keeper: it could not start a successor for `volume`.
    Decline { volume: String, error: String },
}

/// Why a request failed, as far as the caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The mount process could not be executed.
    Exec,
    /// The mount process exited before it was ready.
    Failed,
    /// The mount process was not ready in time and was killed.
    NotReady,
    /// The request conflicts with the keeper's state (busy volume, other arguments, handed over).
    Refused,
    /// Anything else on the keeper's side.
    Internal,
}

/// What a volume's supervision is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// A mount process serves it.
    Running,
    /// Its mount process exited; a successor is being started.
    Restarting,
    /// It is being stopped.
    Stopping,
    /// It is being handed over to a newer keeper.
    HandingOver,
}

/// One volume in a list answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub volume: String,
    pub volume_id: String,
    pub mountpoint: PathBuf,
    /// The serving mount process, if one runs.
    pub pid: Option<u32>,
    pub restarts: u64,
    pub takeovers: u64,
    pub state: VolumeState,
}

/// A volume's restart and takeover counts, which move with it from keeper to keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub restarts: u64,
    pub takeovers: u64,
}

/// An answer from the keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Response {
    Started {
        pid: u32,
    },
    Stopped,
    Volumes {
        volumes: Vec<VolumeInfo>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// Hand-over: a volume, with its `/dev/fuse` descriptor attached.
    Offer {
        spec: VolumeSpec,
        restarts: u64,
        takeovers: u64,
    },
    /// Hand-over: the offered volume's mount process has exited (`status` as the OS reports it),
    /// with the volume's counts as they ended (a successor may have started since the offer).
    /// Keepers that predate the counts here send none; the offer's stand.
    Exited {
        volume: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Counts>,
    },
    /// Hand-over: every volume was offered; the old keeper now holds nothing.
    Done,
}

/// One end of a keeper connection: reads and writes messages, with descriptors.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Self {
        Conn { stream, buf: Vec::new(), fds: VecDeque::new() }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one message, with `fd` attached when given.
    pub fn send<T: Serialize>(&mut self, msg: &T, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let raw = fd.map(|fd| [fd.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> = raw.iter().map(|r| ControlMessage::ScmRights(r)).collect();
        let sent = loop {
            match sendmsg::<()>(self.stream.as_raw_fd(), &[IoSlice::new(&line)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The descriptor went with the first byte; the rest is plain data.
        (&self.stream).write_all(&line[sent..])
    }

    /// Receives one message; `None` at end of stream between messages.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<Option<T>> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed keeper message: {e}")));
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "keeper message too long"));
            }
            let mut chunk = [0u8; 8192];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS_PER_READ]);
            let (n, received) = {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = match recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut received = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        received.extend(fds);
                    }
                }
                (msg.bytes, received)
            };
            for fd in received {
                // SAFETY: the kernel just installed this descriptor in our table for us; nothing
                // else owns it.
                self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "keeper connection closed mid-message"))
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The oldest descriptor received and not taken yet.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn spec() -> VolumeSpec {
        VolumeSpec {
            volume: "bucket-a".into(),
            volume_id: "bucket-a".into(),
            mountpoint: "/mnt/a".into(),
            args: vec!["mount".into(), "bucket-a".into(), "/mnt/a".into()],
            env: BTreeMap::from([("AWS_SECRET_ACCESS_KEY".to_owned(), "hunter2".to_owned())]),
            env_remove: vec!["AWS_SESSION_TOKEN".into()],
            recovery_dir: "/state/volumes/bucket-a.recovery".into(),
        }
    }

    #[test]
    fn requests_and_responses_round_trip_as_tagged_lines() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        let msgs = vec![
            Request::Start { spec: spec() },
            Request::Stop { volume: "v".into() },
            Request::List,
            Request::HandOver { keeper_id: Some("pod-1".into()) },
            Request::Accept { volume: "v".into() },
            Request::Confirm { volume: "v".into() },
            Request::Decline { volume: "v".into(), error: "boom".into() },
        ];
        for m in &msgs {
            a.send(m, None).unwrap();
        }
        for m in &msgs {
            assert_eq!(&b.recv::<Request>().unwrap().unwrap(), m);
        }
        b.send(&Response::Error { kind: ErrorKind::NotReady, message: "slow".into() }, None).unwrap();
        drop(b);
        let r: Response = a.recv().unwrap().unwrap();
        assert_eq!(r, Response::Error { kind: ErrorKind::NotReady, message: "slow".into() });
        assert_eq!(a.recv::<Response>().unwrap(), None, "end of stream between messages");
    }

    #[test]
    fn the_wire_format_is_stable() {
        let line = serde_json::to_string(&Request::Stop { volume: "v".into() }).unwrap();
        assert_eq!(line, r#"{"op":"stop","volume":"v"}"#);
        let r: Response = serde_json::from_str(r#"{"op":"started","pid":42}"#).unwrap();
        assert_eq!(r, Response::Started { pid: 42 });
        // A keeper of the previous version reports an exit without counts; ours reads it.
        let r: Response = serde_json::from_str(r#"{"op":"exited","volume":"v","status":"exit status: 0"}"#).unwrap();
        assert_eq!(r, Response::Exited { volume: "v".into(), status: "exit status: 0".into(), counts: None });
        let counts = Some(Counts { restarts: 3, takeovers: 1 });
        let line = serde_json::to_string(&Response::Exited { volume: "v".into(), status: "s".into(), counts }).unwrap();
        assert_eq!(line, r#"{"op":"exited","volume":"v","status":"s","counts":{"restarts":3,"takeovers":1}}"#);
    }

    #[test]
    fn malformed_and_truncated_messages_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(b);
        (&a).write_all(b"{\"op\":\"nope\"}\n{\"op\":").unwrap();
        drop(a);
        assert_eq!(conn.recv::<Request>().unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(conn.recv::<Request>().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_descriptor_travels_with_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::new(a), Conn::new(b));
        a.send(&Response::Offer { spec: spec(), restarts: 2, takeovers: 1 }, Some(file.as_fd())).unwrap();
        a.send(&Response::Done, None).unwrap();
        let Response::Offer { spec: got, restarts: 2, takeovers: 1 } = b.recv().unwrap().unwrap() else { panic!() };
        assert_eq!(got, spec());
        let fd = b.take_fd().expect("the descriptor arrived");
        assert_ne!(fd.as_raw_fd(), file.as_raw_fd());
        let ours = std::fs::File::from(fd);
        assert_eq!(ours.metadata().unwrap().ino(), file.metadata().unwrap().ino(), "the same file");
        assert_eq!(b.recv::<Response>().unwrap(), Some(Response::Done));
        assert!(b.take_fd().is_none());
    }

    #[test]
    fn debug_output_hides_credentials() {
        let printed = format!("{:?}", Request::Start { spec: spec() });
        assert!(!printed.contains("hunter2") && printed.contains("AWS_SECRET_ACCESS_KEY"), "{printed}");
    }
}
