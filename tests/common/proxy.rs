//! [`FaultProxy`]: a TCP proxy on 127.0.0.1 that sits between a client (an `s3csi mount`) and
//! an S3 server and injects network faults on command: a blackhole (a hung server or network)
//! and, optionally, a slow downstream direction.
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so sync tests drive it
//! with plain method calls. Data is copied in chunks of at most [`CHUNK`] bytes and the fault
//! mode is re-checked around every chunk, so a fault also hits transfers already under way.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// Largest chunk read and forwarded at once.
const CHUNK: usize = 32 << 10;

/// The fault state every connection watches.
#[derive(Clone, Copy, Debug, Default)]
struct Mode {
    blackholed: bool,
    /// Number of blackholes started so far: a connection born under an older value lived
    /// through a blackhole and must be closed.
    epoch: u64,
    /// Downstream rate limit per connection, bytes per second.
    down_rate: Option<u64>,
}

impl Mode {
    /// Whether a connection born at `epoch` may no longer forward anything.
    fn holds(&self, epoch: u64) -> bool {
        self.blackholed || self.epoch != epoch
    }
}

struct Shared {
    mode: watch::Sender<Mode>,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    connections: AtomicU64,
}

/// A fault-injecting TCP proxy from an ephemeral port on 127.0.0.1 to an upstream address.
/// Dropping it stops its thread and closes every socket.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy").field("addr", &self.addr).field("mode", &*self.shared.mode.borrow()).finish()
    }
}

impl FaultProxy {
    /// Forwards 127.0.0.1:<ephemeral> to `upstream` ("http://host:port" or "host:port").
    /// The listener is bound when this returns.
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream_addrs = parse_upstream(upstream);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy on 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking proxy listener");
        let addr = listener.local_addr().expect("proxy listener address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime for the fault proxy");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::default()),
            bytes_down: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("register the proxy listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, upstream_addrs, thread_shared) => {}
                    }
                });
                // Dropping the runtime drops every connection task and so closes every socket.
                drop(runtime);
            })
            .expect("spawn the fault proxy thread");
        FaultProxy { addr, shared, stop: Some(stop), thread: Some(thread) }
    }

    /// "http://127.0.0.1:PORT", for `--endpoint-url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering: new connections are accepted but get nothing; open connections stop
    /// forwarding both ways mid-transfer. Held bytes are not delivered; nothing is closed.
    pub fn blackhole(&self) {
        self.shared.mode.send_modify(|m| {
            if !m.blackholed {
                m.blackholed = true;
                m.epoch += 1;
            }
        });
    }

    /// Ends a blackhole: every connection that lived through it is closed; new connections
    /// forward normally.
    pub fn resume(&self) {
        self.shared.mode.send_modify(|m| m.blackholed = false);
    }

    /// Limits the upstream-to-client direction of each connection to `bytes_per_sec`
    /// (`None`: unlimited). Takes effect from the next chunk.
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        assert!(bytes_per_sec != Some(0), "a zero rate is a blackhole: use blackhole()");
        self.shared.mode.send_modify(|m| m.down_rate = bytes_per_sec);
    }

    /// Bytes forwarded from upstream to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from clients to upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::Relaxed)
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the fault proxy thread panicked");
        }
    }
}

fn parse_upstream(upstream: &str) -> Vec<SocketAddr> {
    let hostport = upstream.strip_prefix("http://").unwrap_or(upstream);
    assert!(!hostport.contains("://"), "the fault proxy forwards plain TCP to host:port or http://, not {upstream}");
    let hostport = hostport.split('/').next().unwrap_or_default();
    let addrs: Vec<SocketAddr> =
        hostport.to_socket_addrs().unwrap_or_else(|e| panic!("fault proxy upstream {upstream}: {e}")).collect();
    assert!(!addrs.is_empty(), "fault proxy upstream {upstream} resolves to no address");
    addrs
}

async fn accept_loop(listener: TcpListener, upstream: Vec<SocketAddr>, shared: Arc<Shared>) {
    let upstream: Arc<[SocketAddr]> = upstream.into();
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of descriptors and the like: try again rather than stop proxying.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(client, upstream.clone(), shared.clone()));
    }
}

/// Why a pump stopped without a clean end of stream: the connection is dropped whole.
struct Abort;

async fn serve(client: TcpStream, upstream: Arc<[SocketAddr]>, shared: Arc<Shared>) {
    let mut rx = shared.mode.subscribe();
    let mode = *rx.borrow_and_update();
    if mode.blackholed {
        // Accepted but never answered; closed when the blackhole ends.
        let _ = park(&mut rx).await;
        return;
    }
    let born = mode.epoch;
    let upstream = tokio::select! {
        biased;
        _ = until_held(&mut rx, born) => {
            let _ = park(&mut rx).await;
            return;
        }
        conn = TcpStream::connect(&upstream[..]) => match conn {
            Ok(conn) => conn,
            Err(_) => return,
        },
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (upstream_rd, upstream_wr) = upstream.into_split();
    let up = pump(client_rd, upstream_wr, shared.mode.subscribe(), born, &shared.bytes_up, false);
    let down = pump(upstream_rd, client_wr, shared.mode.subscribe(), born, &shared.bytes_down, true);
    // The first abort drops both directions, closing both sockets.
    let _ = tokio::try_join!(up, down);
}

/// Copies `from` to `to` chunk by chunk until end of stream (then half-closes `to`). Stops
/// forwarding as soon as the connection is held, parks until the blackhole ends, then aborts.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut rx: watch::Receiver<Mode>,
    born: u64,
    counter: &AtomicU64,
    throttled: bool,
) -> Result<(), Abort> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let rate = if throttled { rx.borrow().down_rate } else { None };
        // At most ~50 ms worth of data per chunk when throttled, so pacing stays smooth.
        let limit = rate.map_or(CHUNK, |r| usize::try_from(r / 20).unwrap_or(CHUNK).clamp(1, CHUNK));
        let n = tokio::select! {
            biased;
            _ = until_held(&mut rx, born) => return park(&mut rx).await,
            r = from.read(&mut buf[..limit]) => r.map_err(|_| Abort)?,
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let mut sent = 0;
        while sent < n {
            let w = tokio::select! {
                biased;
                _ = until_held(&mut rx, born) => return park(&mut rx).await,
                r = to.write(&buf[sent..n]) => r.map_err(|_| Abort)?,
            };
            if w == 0 {
                return Err(Abort);
            }
            sent += w;
            counter.fetch_add(w as u64, Ordering::Relaxed);
        }
        if let Some(rate) = rate {
            let pause = Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::select! {
                biased;
                _ = until_held(&mut rx, born) => return park(&mut rx).await,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Resolves once a connection born at `born` may no longer forward (or the proxy stops).
async fn until_held(rx: &mut watch::Receiver<Mode>, born: u64) {
    let _ = rx.wait_for(|m| m.holds(born)).await;
}

/// Holds the connection, reading and writing nothing, until the blackhole ends (or the proxy
/// stops); then the caller drops it.
async fn park(rx: &mut watch::Receiver<Mode>) -> Result<(), Abort> {
    let _ = rx.wait_for(|m| !m.blackholed).await;
    Err(Abort)
}
