//! The blocking receiver: a socket2 UDP socket joined to the group, a std loop around
//! [`ReceiverCore`], and the output file (docs/multicast.md, "Receiver API"). Synchronous on
//! purpose: node-init is std code, and one thread keeps up with a 1 Gbit/s stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};

use crate::chunk::{ChunkHash, Digest, LayerId};

use super::packet::Layout;
use super::receiver::{Action, Expect, ReceiverCore, RecvStats, NACK_TICK};

/// Largest receive buffer asked for when `net.core.rmem_max` cannot be read.
const FALLBACK_RCVBUF: usize = 4 << 20;
/// Receive buffer asked for with `SO_RCVBUFFORCE` (root, `CAP_NET_ADMIN`) when no size is
/// configured: at 1.5 Gbit/s it holds about 170 ms of stream, so a receiver the scheduler
/// leaves off the CPU for that long loses nothing (4 MiB, the usual `rmem_max`, holds 20 ms;
/// docs/multicast.md, "Sockets"). The kernel charges it only as packets queue.
pub const FORCED_RCVBUF: usize = 32 << 20;
/// Longest a receiver sleeps when its socket queue is empty.
const IDLE_SLEEP: Duration = Duration::from_millis(1);
/// A receiver gives up on a session whose sender it has not heard for this long.
pub const SENDER_TIMEOUT: Duration = Duration::from_secs(10);

/// A receiver failure (I/O; an incomplete transfer is not an error but a [`Received`]).
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Setting up the socket failed.
    #[error("multicast socket: {what}")]
    Socket {
        /// The step that failed.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Receiving failed.
    #[error("receiving from the group")]
    Recv(#[source] io::Error),
    /// Reading or writing the output file failed.
    #[error("output file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Every chunk matched its hash but the whole file does not match the layer id: the
    /// announced hash list did not belong to the announced layer.
    #[error("received layer hashes to {actual}, announced as {expected}")]
    LayerMismatch {
        /// Announced id.
        expected: LayerId,
        /// What the file hashes to.
        actual: LayerId,
    },
    /// The group is not an IPv4 multicast address.
    #[error("{0} is not an IPv4 multicast group")]
    NotMulticast(Ipv4Addr),
}

/// Receiver settings.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    /// Group address and port.
    pub group: SocketAddrV4,
    /// Interface to join on (None: the kernel's choice by route).
    pub iface: Option<String>,
    /// Which session to follow.
    pub expect: Expect,
    /// Give up (returning what is missing) at this time.
    pub deadline: Option<Instant>,
    /// Bytes of chunk buffers at most (rounded down to whole chunks, at least one chunk).
    pub max_buffer_bytes: usize,
    /// Socket receive buffer to ask for (None: `net.core.rmem_max`).
    pub rcvbuf: Option<usize>,
    /// When a session ends with chunks missing, wait for another session of the same layer
    /// instead of returning.
    pub wait_next_session: bool,
}

impl ReceiveConfig {
    /// Defaults: any interface, 128 MiB of chunk buffers, `rmem_max`, no deadline.
    pub fn new(group: SocketAddrV4, expect: Expect) -> Self {
        Self {
            group,
            iface: None,
            expect,
            deadline: None,
            max_buffer_bytes: 128 << 20,
            rcvbuf: None,
            wait_next_session: false,
        }
    }
}

/// Why [`receive`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file is whole and verified (every chunk and the layer id).
    Complete,
    /// The sender evicted this receiver as too slow.
    Evicted,
    /// The session ended (or its sender went silent) with chunks missing.
    SessionEnded,
    /// The deadline passed.
    Deadline,
}

/// The result of a [`receive`].
#[derive(Debug, Clone)]
pub struct Received {
    /// Why it returned.
    pub outcome: Outcome,
    /// The layer followed (None if no session was seen).
    pub layer: Option<LayerId>,
    /// Its layout.
    pub layout: Option<Layout>,
    /// Its chunk hashes (when known).
    pub chunks: Option<Vec<ChunkHash>>,
    /// Chunk indices still missing (empty when complete).
    pub missing: Vec<u32>,
    /// Counters.
    pub stats: RecvStats,
    /// The socket receive buffer the kernel granted.
    pub rcvbuf: usize,
}

impl Received {
    /// True when the file is whole and verified.
    pub fn is_complete(&self) -> bool {
        self.outcome == Outcome::Complete
    }
}

fn sock_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RecvError {
    let what = what.into();
    move |source| RecvError::Socket { what, source }
}

/// `net.core.rmem_max`, if readable.
pub fn rmem_max() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The kernel index of interface `name` in the calling thread's network namespace
/// (`SIOCGIFINDEX` on `sock`).
pub fn iface_index(sock: &Socket, name: &str) -> io::Result<u32> {
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    Ok(rustix::net::netdevice::name_to_index(sock, name)?)
}

/// Opens a UDP socket bound to the group's port on any address, joined to the group on
/// `iface`, receiving only that group (`IP_MULTICAST_ALL` off), with a receive buffer of
/// `rcvbuf` bytes, or else [`FORCED_RCVBUF`] where the caller may exceed `net.core.rmem_max`
/// (`SO_RCVBUFFORCE`), or else `rmem_max`. Returns the socket and the buffer granted (the
/// kernel reports twice the size asked for: its bookkeeping overhead).
pub fn open_receiver_socket(
    group: SocketAddrV4,
    iface: Option<&str>,
    rcvbuf: Option<usize>,
) -> Result<(UdpSocket, usize), RecvError> {
    if !group.ip().is_multicast() {
        return Err(RecvError::NotMulticast(*group.ip()));
    }
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(sock_err("socket"))?;
    s.set_reuse_address(true)
        .map_err(sock_err("SO_REUSEADDR"))?;
    s.set_multicast_all_v4(false)
        .map_err(sock_err("IP_MULTICAST_ALL"))?;
    let mut index = 0;
    if let Some(name) = iface {
        index = iface_index(&s, name).map_err(sock_err(format!("interface {name}")))?;
        s.bind_device(Some(name.as_bytes()))
            .map_err(sock_err(format!("SO_BINDTODEVICE {name}")))?;
    }
    let forced = rcvbuf.is_none()
        && rustix::net::sockopt::set_socket_recv_buffer_size_force(&s, FORCED_RCVBUF).is_ok();
    if !forced {
        let want = rcvbuf.or_else(rmem_max).unwrap_or(FALLBACK_RCVBUF);
        s.set_recv_buffer_size(want)
            .map_err(sock_err("SO_RCVBUF"))?;
    }
    let granted = s.recv_buffer_size().map_err(sock_err("SO_RCVBUF"))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port()).into())
        .map_err(sock_err(format!("bind port {}", group.port())))?;
    s.join_multicast_v4_n(group.ip(), &InterfaceIndexOrAddress::Index(index))
        .map_err(sock_err(format!("join {}", group.ip())))?;
    Ok((s.into(), granted))
}

/// A fresh random-enough receiver id (not a secret: it tells this run's reports apart).
fn receiver_id() -> u64 {
    let mut h = blake3::Hasher::new();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&t.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let local = 0u8;
    h.update(&(std::ptr::addr_of!(local) as usize).to_le_bytes());
    let b = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(b.as_bytes().get(..8).unwrap_or(&[1; 8]));
    u64::from_le_bytes(id)
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> RecvError + '_ {
    move |source| RecvError::File {
        path: path.to_owned(),
        source,
    }
}

/// Receives a layer into `path`, in place: an existing file is resumed (its chunks that
/// match their hashes are kept and not asked for), verified chunks are written at their
/// offsets, and nothing unverified is ever written. Returns when the file is whole and
/// verified, or on eviction, end of session, or the deadline, reporting the missing chunks
/// (node-init fetches those over HTTP). The file is never renamed here; see
/// [`receive_file`].
pub fn receive(cfg: &ReceiveConfig, path: &Path) -> Result<Received, RecvError> {
    let (sock, granted) = open_receiver_socket(cfg.group, cfg.iface.as_deref(), cfg.rcvbuf)?;
    receive_on(sock, granted, cfg, path)
}

/// [`receive`] on an already-open socket (tests, or a caller with its own socket setup).
pub fn receive_on(
    sock: UdpSocket,
    rcvbuf: usize,
    cfg: &ReceiveConfig,
    path: &Path,
) -> Result<Received, RecvError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(file_err(path))?;
    let present = file.metadata().map_err(file_err(path))?.len();
    // Non-blocking, with a short sleep when the queue is empty: a receiver that is not asleep
    // on the socket costs the sender's delivery path no wake-up per packet (profiled: those
    // wake-ups and the context switches were the largest cost on the loaded 2-core machine),
    // and the 32 MiB buffer holds what arrives meanwhile.
    sock.set_nonblocking(true).map_err(sock_err("O_NONBLOCK"))?;
    let chunk = match &cfg.expect {
        Expect::Known { chunk_size, .. } => *chunk_size as usize,
        _ => crate::chunk::CHUNK_SIZE as usize,
    };
    let max_chunks = (cfg.max_buffer_bytes / chunk.max(1)).max(1);
    let mut core = ReceiverCore::new(cfg.expect.clone(), receiver_id(), max_chunks);
    let mut buf = vec![0u8; 65536];
    let mut scanned: Option<LayerId> = None;
    let outcome = 'run: loop {
        let now = Instant::now();
        if cfg.deadline.is_some_and(|d| now >= d) {
            break Outcome::Deadline;
        }
        let mut actions = match sock.recv_from(&mut buf) {
            Ok((n, from)) => core.on_packet(buf.get(..n).unwrap_or_default(), from, now),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let wake = core.next_deadline().unwrap_or(now + NACK_TICK);
                std::thread::sleep(
                    wake.saturating_duration_since(now)
                        .clamp(Duration::from_micros(200), IDLE_SLEEP),
                );
                Vec::new()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                Vec::new()
            }
            Err(e) => return Err(RecvError::Recv(e)),
        };
        actions.extend(core.on_timeout(now));
        for a in actions {
            match a {
                Action::Send { to, bytes } => {
                    // A lost report is repeated by the next timer; do not fail the transfer.
                    let _ = sock.send_to(&bytes, to);
                }
                Action::Joined { layer, layout } => {
                    if scanned != Some(layer) {
                        scanned = Some(layer);
                        prepare(&file, path, present, layout, &mut core)?;
                    }
                }
                Action::Write { offset, data, .. } => {
                    file.write_all_at(&data, offset).map_err(file_err(path))?;
                    core.recycle(data);
                }
                Action::Evicted => break 'run Outcome::Evicted,
                Action::SessionEnded => {
                    if !cfg.wait_next_session {
                        break 'run Outcome::SessionEnded;
                    }
                }
            }
        }
        if core.is_complete() {
            break Outcome::Complete;
        }
        if !cfg.wait_next_session && core.sender_silent(now, SENDER_TIMEOUT) {
            break Outcome::SessionEnded;
        }
    };
    // Tell the sender we are done (or leaving): three times, reports are not acknowledged.
    for _ in 0..3 {
        if let Some(Action::Send { to, bytes }) = core.farewell() {
            let _ = sock.send_to(&bytes, to);
        }
    }
    let (layer, layout, chunks) = match core.layer() {
        Some((l, y, c)) => (Some(l), Some(y), c),
        None => (None, None, None),
    };
    let mut outcome = outcome;
    if outcome == Outcome::Complete {
        file.sync_all().map_err(file_err(path))?;
        if let Some(expected) = layer {
            let actual = hash_file(&file).map_err(file_err(path))?;
            if actual != expected {
                return Err(RecvError::LayerMismatch { expected, actual });
            }
        } else {
            outcome = Outcome::SessionEnded;
        }
    }
    Ok(Received {
        outcome,
        layer,
        layout,
        chunks,
        missing: if outcome == Outcome::Complete {
            Vec::new()
        } else {
            core.missing_chunks()
        },
        stats: core.stats(),
        rcvbuf,
    })
}

/// Sizes the output to the layer and marks the chunks it already holds correctly.
fn prepare(
    file: &File,
    path: &Path,
    present: u64,
    layout: Layout,
    core: &mut ReceiverCore,
) -> Result<(), RecvError> {
    let size = layout.size();
    let len = file.metadata().map_err(file_err(path))?.len();
    if len != size {
        file.set_len(size).map_err(file_err(path))?;
    }
    let cs = u64::from(layout.chunk_size());
    let mut buf = Vec::new();
    for c in 0..layout.chunks() as u32 {
        let start = u64::from(c) * cs;
        let n = u64::from(layout.chunk_len(c));
        if start + n > present.min(size) {
            break;
        }
        let Some(expected) = core.chunk_hash(c) else {
            continue;
        };
        buf.resize(n as usize, 0);
        file.read_exact_at(&mut buf, start)
            .map_err(file_err(path))?;
        if Digest::of(&buf) == expected {
            core.mark_present(c);
        }
    }
    Ok(())
}

fn hash_file(mut file: &File) -> io::Result<Digest> {
    file.seek(SeekFrom::Start(0))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(Digest::from(h.finalize()))
}

/// The temporary file [`receive_file`] assembles `out` in: `out` with `.part` appended.
pub fn part_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// Receives into `OUT.part` (resuming it if present) and, once whole and verified, fsyncs it
/// and renames it to `out` (then fsyncs the directory): `out` never exists half-written.
pub fn receive_file(cfg: &ReceiveConfig, out: &Path) -> Result<Received, RecvError> {
    let part = part_path(out);
    let r = receive(cfg, &part)?;
    if r.is_complete() {
        std::fs::rename(&part, out).map_err(file_err(out))?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(file_err(dir))?;
    }
    Ok(r)
}
