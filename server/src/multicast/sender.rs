//! The sender's socket loop: a socket2 UDP socket (interface, TTL, loopback, buffers) around a
//! [`SenderSession`], reading symbols from the layer file. Blocking std code on one thread;
//! the server runs it under `spawn_blocking`.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info};
use wire::chunk::{chunk_hashes, CHUNK_SIZE};
use wire::multicast::packet::{write_data_header, Layout, LayoutError, SessionId, DATA_HEADER};

use super::session::{Dest, LayerInfo, Poll, SendStats, SenderConfig, SenderSession};

/// A sender failure.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Reading the layer failed.
    #[error("reading layer {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The layer cannot be sent with these sizes.
    #[error("layer {path}")]
    Layout {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: LayoutError,
    },
    /// Setting up the socket failed.
    #[error("multicast socket: {what}")]
    Socket {
        /// The step.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Sending failed.
    #[error("sending to {to}")]
    Send {
        /// Destination.
        to: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The group is not an IPv4 multicast address.
    #[error("{0} is not an IPv4 multicast group")]
    NotMulticast(Ipv4Addr),
}

/// Socket options for the sender.
#[derive(Debug, Clone, Default)]
pub struct SocketOptions {
    /// Interface to send on (`SO_BINDTODEVICE`).
    pub iface: Option<String>,
    /// Multicast TTL (default 1: the local link).
    pub ttl: Option<u32>,
    /// Deliver to receivers on this host too (`IP_MULTICAST_LOOP`).
    pub loopback: bool,
}

/// Operator controls shared with a running session.
#[derive(Debug, Default)]
pub struct SenderControl {
    start: AtomicBool,
    cancel: AtomicBool,
    sending: AtomicBool,
}

impl SenderControl {
    /// A fresh control.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Start sending now, whatever the receiver count.
    pub fn start_now(&self) {
        self.start.store(true, Ordering::Relaxed);
    }

    /// End the session (announces the end first).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// True once the session has sent its first data packet.
    pub fn is_sending(&self) -> bool {
        self.sending.load(Ordering::Relaxed)
    }
}

/// The outcome of a session.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// Session id.
    pub session: SessionId,
    /// Layer sent.
    pub layer: LayerInfo,
    /// Counters.
    pub stats: SendStats,
}

impl SendReport {
    /// Ethernet frame bytes sent per layer byte.
    pub fn wire_ratio(&self) -> f64 {
        self.stats.frame_bytes as f64 / (self.layer.layout.size().max(1)) as f64
    }
}

fn sock_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SendError {
    let what = what.into();
    move |source| SendError::Socket { what, source }
}

/// Opens the sender's socket: bound to an ephemeral port on any address (receivers' reports
/// come back to it), multicast out of `iface`, TTL, loopback, and 4 MiB buffers.
pub fn open_sender_socket(
    group: SocketAddrV4,
    opts: &SocketOptions,
) -> Result<UdpSocket, SendError> {
    if !group.ip().is_multicast() {
        return Err(SendError::NotMulticast(*group.ip()));
    }
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("socket"))?;
    if let Some(name) = &opts.iface {
        s.bind_device(Some(name.as_bytes()))
            .map_err(sock_err(format!("SO_BINDTODEVICE {name}")))?;
        // With the socket bound to the device, udp_sendmsg routes multicast out of it
        // (the output interface defaults to the bound device).
        wire::multicast::net::iface_index(&s, name)
            .map_err(sock_err(format!("interface {name}")))?;
    }
    s.set_multicast_ttl_v4(opts.ttl.unwrap_or(1))
        .map_err(sock_err("IP_MULTICAST_TTL"))?;
    s.set_multicast_loop_v4(opts.loopback)
        .map_err(sock_err("IP_MULTICAST_LOOP"))?;
    s.set_send_buffer_size(4 << 20)
        .map_err(sock_err("SO_SNDBUF"))?;
    s.set_recv_buffer_size(4 << 20)
        .map_err(sock_err("SO_RCVBUF"))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(sock_err("bind"))?;
    s.set_nonblocking(true).map_err(sock_err("O_NONBLOCK"))?;
    Ok(s.into())
}

/// Hashes a layer file into the [`LayerInfo`] a session announces (1 MiB chunks, as in the
/// manifest).
pub fn layer_info(path: &Path, symbol_size: u16) -> Result<LayerInfo, SendError> {
    let file = File::open(path).map_err(|source| SendError::Read {
        path: path.to_owned(),
        source,
    })?;
    let (id, size, chunks) = chunk_hashes(io::BufReader::with_capacity(1 << 20, file), CHUNK_SIZE)
        .map_err(|source| SendError::Read {
            path: path.to_owned(),
            source,
        })?;
    let layout =
        Layout::new(size, CHUNK_SIZE, symbol_size).map_err(|source| SendError::Layout {
            path: path.to_owned(),
            source,
        })?;
    Ok(LayerInfo { id, layout, chunks })
}

/// A random session id.
pub fn new_session_id() -> SessionId {
    loop {
        if let Some(id) = SessionId::new(rand::random()) {
            return id;
        }
    }
}

/// One chunk of the layer kept in memory (the pass reads chunk after chunk; repairs keep
/// their own).
struct ChunkCache {
    index: Option<u32>,
    data: Vec<u8>,
}

impl ChunkCache {
    fn get(
        &mut self,
        file: &File,
        path: &Path,
        layout: Layout,
        c: u32,
    ) -> Result<&[u8], SendError> {
        if self.index != Some(c) {
            self.index = None;
            self.data.resize(layout.chunk_len(c) as usize, 0);
            file.read_exact_at(
                &mut self.data,
                u64::from(c) * u64::from(layout.chunk_size()),
            )
            .map_err(|source| SendError::Read {
                path: path.to_owned(),
                source,
            })?;
            self.index = Some(c);
        }
        Ok(&self.data)
    }
}

/// Runs one session to its end: announces `info` (the file at `path`) on `group`, waits
/// as `cfg` says (or for `control.start_now()`), sends, repairs, and returns the counters.
pub fn run_session(
    sock: &UdpSocket,
    group: SocketAddrV4,
    path: &Path,
    info: LayerInfo,
    cfg: SenderConfig,
    control: &SenderControl,
) -> Result<SendReport, SendError> {
    let file = File::open(path).map_err(|source| SendError::Read {
        path: path.to_owned(),
        source,
    })?;
    let layout = info.layout;
    let mut session = SenderSession::new(info, cfg, new_session_id(), Instant::now());
    info!(
        session = %session.id(),
        layer = %session.layer().id,
        size = layout.size(),
        group = %group,
        "multicast session announced"
    );
    let group_addr = SocketAddr::V4(group);
    let mut pass = ChunkCache {
        index: None,
        data: Vec::new(),
    };
    let mut repair = ChunkCache {
        index: None,
        data: Vec::new(),
    };
    let mut rbuf = vec![0u8; 2048];
    let mut pkt = vec![0u8; DATA_HEADER + usize::from(layout.symbol_size())];
    let mut started = false;
    loop {
        let now = Instant::now();
        // Receivers' reports first, a bounded batch per turn.
        for _ in 0..64 {
            match sock.recv_from(&mut rbuf) {
                Ok((n, from)) => session.on_packet(rbuf.get(..n).unwrap_or_default(), from, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from a receiver that went away: not the session's problem.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    return Err(SendError::Socket {
                        what: "recv".into(),
                        source: e,
                    })
                }
            }
        }
        if control.start.swap(false, Ordering::Relaxed) {
            session.start_now();
        }
        if control.cancel.load(Ordering::Relaxed) {
            session.cancel(now);
        }
        match session.poll(now) {
            Poll::Finished => break,
            Poll::Wait(t) => {
                let d = t.saturating_duration_since(now);
                if !d.is_zero() {
                    std::thread::sleep(d.min(Duration::from_millis(2)));
                }
            }
            Poll::Control { dest, bytes } => {
                let to = match dest {
                    Dest::Group => group_addr,
                    Dest::To(a) => a,
                };
                send(sock, &bytes, to)?;
            }
            Poll::Data {
                symbol,
                seq,
                repair: is_repair,
            } => {
                if !started {
                    started = true;
                    control.sending.store(true, Ordering::Relaxed);
                    info!(session = %session.id(), receivers = session.live_receivers(), "multicast session sending");
                }
                let (c, _) = layout.locate(symbol);
                let Some(r) = layout.symbol_in_chunk(symbol) else {
                    continue;
                };
                let cache = if is_repair { &mut repair } else { &mut pass };
                let chunk = cache.get(&file, path, layout, c)?;
                let payload = chunk
                    .get(r.start as usize..r.end as usize)
                    .unwrap_or_default();
                let len = DATA_HEADER + payload.len();
                let mut head = [0u8; DATA_HEADER];
                write_data_header(&mut head, session.id(), seq, symbol, is_repair);
                let Some((h, rest)) = pkt.split_at_mut_checked(DATA_HEADER) else {
                    continue;
                };
                h.copy_from_slice(&head);
                if let Some(dst) = rest.get_mut(..payload.len()) {
                    dst.copy_from_slice(payload);
                }
                send(sock, pkt.get(..len).unwrap_or_default(), group_addr)?;
            }
        }
    }
    let stats = session.stats().clone();
    debug!(?stats, "multicast session stats");
    Ok(SendReport {
        session: session.id(),
        layer: session.layer().clone(),
        stats,
    })
}

/// Sends one datagram, waiting out a full socket buffer.
fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) -> Result<(), SendError> {
    loop {
        match sock.send_to(bytes, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // No route / unreachable unicast receiver: drop this report, keep the session.
            Err(e)
                if matches!(to, SocketAddr::V4(a) if !a.ip().is_multicast())
                    && e.raw_os_error().is_some() =>
            {
                return Ok(());
            }
            // ENOBUFS: the device queue is full; back off briefly.
            Err(e) if e.raw_os_error() == Some(105) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(source) => return Err(SendError::Send { to, source }),
        }
    }
}
