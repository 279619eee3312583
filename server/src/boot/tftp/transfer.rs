//! One TFTP read transfer on its own thread: the I/O around the sans-IO [`Session`].
//!
//! Each transfer owns a connected UDP socket (its transfer ID, RFC 1350 §4) in blocking mode
//! and runs on a blocking thread of the runtime (`JoinSet::spawn_blocking`), the shape of
//! tftpd-hpa's process per transfer. A lock-step TFTP transfer is a chain of round trips, so
//! its speed is the latency of each wake-up: a thread blocked in `recv` is woken by the kernel
//! straight from the ACK's arrival, where a tokio task costs an `epoll_wait` return, a
//! readiness dispatch, a failed `recv` before parking, and (on a busy machine) a wait for a
//! worker thread. The retransmission deadline is the socket's receive timeout (`SO_RCVTIMEO`),
//! changed only when the deadline moves by more than an eighth, so the steady state is one
//! `recv`, one `pread` and one send per window.
//!
//! A window (RFC 7440) is read from the file with one positioned read and sent with UDP
//! segmentation offload (`UDP_SEGMENT`): header + block segments in one buffer, one `send`
//! per 64 KiB, one pass through the network stack; the kernel cuts the datagrams. Where the
//! kernel or the path refuses GSO, one `sendmmsg` sends the window, each datagram a 4-byte
//! header and a slice of the read buffer (two iovecs). Lock-step blocks, and blocks too large
//! for two to fit one GSO send (over 32 KiB), take the latter path.
//!
//! While the client receives and stores a window, the thread reads the next one
//! ([`Session::next_window`]: the window that follows if the client acknowledges all of this
//! one), so the read overlaps the round trip instead of following it; a partial ACK or a
//! timeout reads as before. Measured on a quiet machine (512 MiB, a client that keeps
//! nothing): +16% at 65464 x 16 and 1468 x 64, +34% at 8192 x 16, +19% in lock-step at 65464.
//!
//! The window a client gets is the one it asked for, within
//! [`TftpOptions::max_window_bytes`](super::TftpOptions::max_window_bytes) (1 MiB by default:
//! 16 blocks of 65464); the client must be able to queue it. Reading a GSO window with one
//! `preadv` straight into its datagram layout (instead of a `pread` and a copy) was measured
//! and left out: no difference in server CPU (220-330 ms per 512 MiB at 1468 x 64 either way).
//!
//! Cancellation: the thread checks its token between packets and waits at most
//! [`CANCEL_POLL`] in `recv`, so a server shutdown ends transfers within that time.

use std::fs::File;
use std::io::{self, IoSlice, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::packet::{ErrorCode, Packet, Request};
use super::server::{negotiate, open, Ctx};
use super::session::{Action, FailReason, Session};

/// Longest wait in `recv` before the cancellation token is looked at again.
pub const CANCEL_POLL: Duration = Duration::from_millis(250);

/// Where DATA bytes come from.
#[derive(Debug)]
pub(super) enum Source {
    /// The file's bytes as they are.
    Octet(File),
    /// The file converted to netascii on the fly.
    NetAscii(NetAscii),
}

/// A netascii view of a file: converted bytes from `start` kept in `buf`.
#[derive(Debug)]
pub(super) struct NetAscii {
    file: File,
    src_pos: u64,
    eof: bool,
    start: u64,
    buf: Vec<u8>,
}

/// The size of `file` after netascii conversion (RFC 764: LF becomes CR LF, CR becomes CR NUL).
pub(super) fn netascii_size(file: &File) -> io::Result<u64> {
    let mut r = io::BufReader::with_capacity(1 << 16, file);
    let mut chunk = [0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok(total);
        }
        let part = chunk.get(..n).unwrap_or_default();
        total += n as u64 + part.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64;
    }
}

impl NetAscii {
    /// A netascii view of `file` from its start.
    pub(super) fn new(file: File) -> Self {
        NetAscii {
            file,
            src_pos: 0,
            eof: false,
            start: 0,
            buf: Vec::new(),
        }
    }

    fn fill_to(&mut self, end: u64) -> io::Result<()> {
        let mut raw = vec![0u8; 1 << 16];
        while !self.eof && self.start + (self.buf.len() as u64) < end {
            let n = self.file.read_at(&mut raw, self.src_pos)?;
            if n == 0 {
                self.eof = true;
                break;
            }
            self.src_pos += n as u64;
            for &b in raw.get(..n).unwrap_or_default() {
                match b {
                    b'\n' => self.buf.extend_from_slice(b"\r\n"),
                    b'\r' => self.buf.extend_from_slice(b"\r\0"),
                    b => self.buf.push(b),
                }
            }
        }
        Ok(())
    }

    /// Drops converted bytes before `offset` (no longer needed for retransmission).
    fn release(&mut self, offset: u64) {
        if offset > self.start {
            let drop = usize::try_from(offset - self.start)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            self.buf.drain(..drop);
            self.start += drop as u64;
        }
    }
}

impl Source {
    /// Fills `dst` with the bytes at `off` (of the converted stream for netascii). The caller
    /// keeps `off + dst.len()` within the size the transfer announced; a file that shrank
    /// since gives an error.
    fn read_at(&mut self, off: u64, dst: &mut [u8]) -> io::Result<()> {
        match self {
            Source::Octet(f) => f.read_exact_at(dst, off),
            Source::NetAscii(n) => {
                n.fill_to(off + dst.len() as u64)?;
                let from = usize::try_from(off.saturating_sub(n.start)).unwrap_or(usize::MAX);
                let part = from
                    .checked_add(dst.len())
                    .and_then(|end| n.buf.get(from..end))
                    .ok_or_else(|| io::Error::other("netascii window lost"))?;
                dst.copy_from_slice(part);
                Ok(())
            }
        }
    }

    fn release(&mut self, acked: u64, blksize: u64) {
        if let Source::NetAscii(n) = self {
            n.release(acked * blksize);
        }
    }
}

/// A blocking UDP socket bound next to the server's address and connected to `peer`.
fn transfer_socket(ctx: &Ctx, peer: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, any) = match peer {
        SocketAddr::V4(_) => (Domain::IPV4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        SocketAddr::V6(_) => (Domain::IPV6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    };
    let ip = if ctx.local_ip.is_unspecified() || ctx.local_ip.is_ipv4() != peer.is_ipv4() {
        any
    } else {
        ctx.local_ip
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(dev) = &ctx.opts.bind_device {
        s.bind_device(Some(dev.as_bytes()))?;
    }
    // Room for a whole window of large blocks.
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.connect(&peer.into())?;
    Ok(s.into())
}

/// DATA for a run of consecutive blocks (a window, or one block in lock-step): the payload
/// of every block in one buffer, read with one positioned read, and a header per block.
struct Window {
    blksize: usize,
    heads: Vec<[u8; 4]>,
    data: Vec<u8>,
    /// Bytes of `data` holding the current run.
    len: usize,
    /// UDP segmentation offload is set on the socket (segment size `4 + blksize`): a run of
    /// blocks goes out as one buffer of header + payload segments per send.
    gso: bool,
    /// That buffer.
    segments: Vec<u8>,
}

/// Largest UDP payload of one send (IPv4's limit; IPv6 allows a little more).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Most segments one UDP GSO send may carry (`UDP_MAX_SEGMENTS`: 64 on older kernels, more
/// on newer ones).
const MAX_GSO_SEGMENTS: usize = 64;

impl Window {
    fn new(blksize: u16) -> Self {
        Window {
            blksize: usize::from(blksize),
            heads: Vec::new(),
            data: Vec::new(),
            len: 0,
            gso: false,
            segments: Vec::new(),
        }
    }

    /// Turns on UDP segmentation offload (`UDP_SEGMENT`, Linux 4.18) for windows, when at
    /// least two blocks fit one send. A window then costs one pass through the network stack
    /// instead of one per block. Refused by the kernel: windows use `sendmmsg` alone.
    fn enable_gso(&mut self, socket: &UdpSocket) {
        let segment = self.blksize + 4;
        if segment * 2 > MAX_UDP_PAYLOAD {
            return;
        }
        let Ok(size) = i32::try_from(segment) else {
            return;
        };
        match nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::UdpGsoSegment, &size)
        {
            Ok(()) => self.gso = true,
            Err(e) => debug!(error = %e, "no UDP segmentation offload; windows use sendmmsg"),
        }
    }

    /// Reads blocks `first..=last` (1-based) of a `size`-byte stream.
    fn load(&mut self, source: &mut Source, first: u64, last: u64, size: u64) -> io::Result<()> {
        let blksize = self.blksize as u64;
        let off = first.saturating_sub(1) * blksize;
        let count = (last + 1).saturating_sub(first);
        let len = size.saturating_sub(off).min(count * blksize);
        let len = usize::try_from(len).map_err(|_| io::Error::other("window too large"))?;
        if self.data.len() < len {
            // Grows to the largest window once; the negotiation bounds it.
            self.data.resize(len, 0);
        }
        let dst = self
            .data
            .get_mut(..len)
            .ok_or_else(|| io::Error::other("window buffer too small"))?;
        source.read_at(off, dst)?;
        self.len = len;
        self.heads.clear();
        self.heads
            .extend((first..=last).map(|b| [0, 3, (b >> 8) as u8, b as u8]));
        Ok(())
    }

    /// Sends the loaded blocks, one datagram each: with UDP segmentation offload when it is
    /// on, otherwise with as few `sendmmsg` calls as the kernel allows (one, unless it stops
    /// early).
    fn send(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let mut from = 0;
        if self.gso && self.heads.len() > 1 {
            match self.send_gso(socket, &mut from) {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        || crate::boot::dhcp::server::is_transient(&e) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    // EINVAL (segment larger than the path MTU), EIO (no checksum offload on
                    // the device), ...: fall back to one datagram per block from here on.
                    debug!(error = %e, "UDP segmentation offload refused; using sendmmsg");
                    self.gso = false;
                }
            }
        }
        self.send_each(socket, from)
    }

    /// Sends the run as GSO sends of up to [`MAX_GSO_SEGMENTS`] segments; `from` counts the
    /// blocks sent.
    fn send_gso(&mut self, socket: &UdpSocket, from: &mut usize) -> io::Result<()> {
        let segment = self.blksize + 4;
        let per_send = (MAX_UDP_PAYLOAD / segment).clamp(1, MAX_GSO_SEGMENTS);
        let data = self.data.get(..self.len).unwrap_or_default();
        while *from < self.heads.len() {
            let to = (*from + per_send).min(self.heads.len());
            self.segments.clear();
            for i in *from..to {
                let start = i.saturating_mul(self.blksize).min(data.len());
                let end = start.saturating_add(self.blksize).min(data.len());
                self.segments
                    .extend_from_slice(self.heads.get(i).map_or(&[][..], |h| &h[..]));
                self.segments
                    .extend_from_slice(data.get(start..end).unwrap_or_default());
            }
            loop {
                match socket.send(&self.segments) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            *from = to;
        }
        Ok(())
    }

    /// Sends blocks `from..` of the run, one datagram each, with `sendmmsg`.
    fn send_each(&self, socket: &UdpSocket, from: usize) -> io::Result<()> {
        let data = self.data.get(..self.len).unwrap_or_default();
        let iovs: Vec<[IoSlice<'_>; 2]> = self
            .heads
            .iter()
            .enumerate()
            .skip(from)
            .map(|(i, head)| {
                let start = i.saturating_mul(self.blksize).min(data.len());
                let end = start.saturating_add(self.blksize).min(data.len());
                [
                    IoSlice::new(head),
                    IoSlice::new(data.get(start..end).unwrap_or_default()),
                ]
            })
            .collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = iovs
            .iter()
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut msgs: Vec<MMsgHdr<'_>> = iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, control)| MMsgHdr::new(iov, control))
            .collect();
        let mut sent = 0;
        while sent < msgs.len() {
            let rest = msgs.get_mut(sent..).unwrap_or_default();
            match rustix::net::sendmmsg(socket, rest, SendFlags::empty()) {
                Ok(0) => return Err(io::ErrorKind::WouldBlock.into()),
                Ok(n) => sent += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// What the transfer loop does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    End,
}

/// A running transfer: its socket, its bytes and its session.
struct Transfer<'a> {
    socket: UdpSocket,
    source: Source,
    size: u64,
    session: Session,
    window: Window,
    /// The next window, read while the client still works on the current one, and its
    /// blocks (first, last); used when the client acknowledges the whole window.
    ahead: Window,
    ahead_run: Option<(u64, u64)>,
    oack: Vec<u8>,
    started: Instant,
    inbuf: Vec<u8>,
    /// The receive timeout set on the socket.
    rcv_timeout: Option<Duration>,
    cancel: &'a CancellationToken,
}

impl Transfer<'_> {
    /// Performs `actions` in order; runs of consecutive DATA blocks go out as one window.
    fn perform(&mut self, actions: Vec<Action>) -> Step {
        let mut run: Option<(u64, u64)> = None;
        for a in actions {
            if let Action::SendData { block } = a {
                run = match run {
                    Some((first, last)) if block == last + 1 => Some((first, block)),
                    Some(r) => {
                        if self.send_blocks(r) == Step::End {
                            return Step::End;
                        }
                        Some((block, block))
                    }
                    None => Some((block, block)),
                };
                continue;
            }
            if let Some(r) = run.take() {
                if self.send_blocks(r) == Step::End {
                    return Step::End;
                }
            }
            if self.act(a) == Step::End {
                return Step::End;
            }
        }
        if let Some(r) = run {
            return self.send_blocks(r);
        }
        Step::Continue
    }

    /// Reads the window that follows if the client acknowledges everything sent, while the
    /// client is still receiving and storing the current one: the read then overlaps the
    /// round trip instead of following it. A read error is left for `send_blocks` to meet.
    fn read_ahead(&mut self) {
        let Some(run) = self.session.next_window() else {
            return;
        };
        if self.ahead_run == Some(run) {
            return;
        }
        self.ahead_run = self
            .ahead
            .load(&mut self.source, run.0, run.1, self.size)
            .ok()
            .map(|()| run);
    }

    fn send_blocks(&mut self, (first, last): (u64, u64)) -> Step {
        if self.ahead_run.take() == Some((first, last)) {
            std::mem::swap(&mut self.window, &mut self.ahead);
        } else if let Err(e) = self.window.load(&mut self.source, first, last, self.size) {
            warn!(error = %e, block = first, "read failed; transfer aborted");
            let _ = self
                .socket
                .send(&Packet::error(ErrorCode::NotDefined, "read error").to_bytes());
            return Step::End;
        }
        let sent = self.window.send(&self.socket);
        self.sent(sent)
    }

    /// Judges the result of a send.
    fn sent(&self, r: io::Result<()>) -> Step {
        match r {
            Ok(()) => Step::Continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                warn!("client port unreachable; transfer abandoned");
                Step::End
            }
            Err(e) if crate::boot::dhcp::server::is_transient(&e) => {
                // A full send buffer or an ICMP error: the retransmission timer covers it.
                debug!(error = %e, "send failed");
                Step::Continue
            }
            Err(e) => {
                warn!(error = %e, "send failed; transfer aborted");
                Step::End
            }
        }
    }

    fn act(&mut self, a: Action) -> Step {
        let params = self.session.params();
        match a {
            Action::SendData { .. } => Step::Continue, // batched by `perform`
            Action::SendOack => {
                let r = self.socket.send(&self.oack).map(|_| ());
                self.sent(r)
            }
            Action::SendError { code, message } => {
                let r = self
                    .socket
                    .send(&Packet::error(code, message).to_bytes())
                    .map(|_| ());
                self.sent(r)
            }
            Action::Done => {
                let secs = self.started.elapsed().as_secs_f64().max(1e-6);
                info!(
                    bytes = self.size,
                    blksize = params.blksize,
                    windowsize = params.windowsize,
                    ms = (secs * 1000.0) as u64,
                    mb_per_s = format!("{:.1}", self.size as f64 / secs / 1e6),
                    "transfer complete"
                );
                Step::End
            }
            Action::Failed(FailReason::TimedOut { acked }) => {
                warn!(
                    acked_blocks = acked,
                    total_blocks = self.session.total_blocks(),
                    "client stopped acknowledging; transfer abandoned"
                );
                Step::End
            }
            Action::Failed(FailReason::ClientError { code, message }) => {
                info!(code, %message, "client aborted the transfer");
                Step::End
            }
            Action::Failed(FailReason::Protocol) => {
                warn!("client sent an unexpected packet; transfer aborted");
                Step::End
            }
        }
    }

    /// Waits for the packet or timeout that makes the session act; `None` ends the transfer.
    fn next_actions(&mut self) -> Option<Vec<Action>> {
        loop {
            if self.cancel.is_cancelled() {
                debug!("transfer cancelled");
                return None;
            }
            let now = Instant::now();
            let deadline = self.session.deadline();
            if now >= deadline {
                return Some(self.session.on_timeout(now));
            }
            let wait = (deadline - now)
                .min(CANCEL_POLL)
                .max(Duration::from_millis(1));
            // One setsockopt per change of the deadline's distance, not per packet: a wait
            // within an eighth of the one set is close enough (an early wake-up loops here).
            if self
                .rcv_timeout
                .is_none_or(|cur| cur.abs_diff(wait) > wait / 8)
            {
                if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
                    warn!(error = %e, "cannot set the receive timeout; transfer aborted");
                    return None;
                }
                self.rcv_timeout = Some(wait);
            }
            match self.socket.recv(&mut self.inbuf) {
                Ok(n) => match Packet::parse(self.inbuf.get(..n).unwrap_or_default()) {
                    Ok(p) => {
                        let actions = self.session.on_packet(&p, Instant::now());
                        if !actions.is_empty() {
                            return Some(actions);
                        }
                    }
                    Err(e) => debug!(error = %e, "malformed packet from client ignored"),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    warn!("client port unreachable; transfer abandoned");
                    return None;
                }
                Err(e) if crate::boot::dhcp::server::is_transient(&e) => {
                    debug!(error = %e, "receive error");
                }
                Err(e) => {
                    warn!(error = %e, "receive failed; transfer aborted");
                    return None;
                }
            }
        }
    }
}

/// Runs one read transfer for `peer` to its end, on the calling (blocking) thread.
#[tracing::instrument(skip_all, fields(peer = %peer, file = %req.filename))]
pub(super) fn run(ctx: &Ctx, peer: SocketAddr, req: Request, cancel: &CancellationToken) {
    let socket = match transfer_socket(ctx, peer) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open a transfer socket");
            return;
        }
    };
    let (source, size) = match open(ctx, &req) {
        Ok(x) => x,
        Err(r) => {
            warn!(reason = r.message, "request refused");
            let _ = socket.send(&Packet::error(r.code, r.message).to_bytes());
            return;
        }
    };
    let (params, oack) = negotiate(&req, &ctx.opts, size);
    let started = Instant::now();
    let (session, actions) = Session::start(params, size, !oack.is_empty(), started);
    debug!(size, blksize = params.blksize, windowsize = params.windowsize, mode = %req.mode, "transfer started");
    let mut window = Window::new(params.blksize);
    let mut ahead = Window::new(params.blksize);
    if params.windowsize > 1 {
        window.enable_gso(&socket);
        ahead.gso = window.gso;
    }
    let mut t = Transfer {
        socket,
        source,
        size,
        session,
        window,
        ahead,
        ahead_run: None,
        oack: Packet::Oack { options: oack }.to_bytes(),
        started,
        inbuf: vec![0u8; 1024],
        rcv_timeout: None,
        cancel,
    };
    let blksize = u64::from(params.blksize);
    let mut actions = actions;
    loop {
        if t.perform(actions) == Step::End {
            return;
        }
        t.source.release(t.session.acked(), blksize);
        t.read_ahead();
        match t.next_actions() {
            Some(a) => actions = a,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netascii_conversion_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let text = b"a\nb\r\nc\rd".repeat(1000);
        std::fs::write(&path, &text).unwrap();
        let file = File::open(&path).unwrap();
        let size = netascii_size(&file).unwrap();
        let mut expect = Vec::new();
        for &b in &text {
            match b {
                b'\n' => expect.extend_from_slice(b"\r\n"),
                b'\r' => expect.extend_from_slice(b"\r\0"),
                b => expect.push(b),
            }
        }
        assert_eq!(size, expect.len() as u64);
        let mut src = Source::NetAscii(NetAscii::new(file));
        let mut w = Window::new(100);
        let mut got = Vec::new();
        let total = size / 100 + 1;
        for b in 1..=total {
            // Re-read the previous block too (a retransmission), then release it.
            if b > 1 {
                w.load(&mut src, b - 1, b - 1, size).unwrap();
            }
            w.load(&mut src, b, b, size).unwrap();
            got.extend_from_slice(&w.data[..w.len]);
            src.release(b - 1, 100);
        }
        assert_eq!(got, expect);
    }

    #[test]
    fn window_reads_blocks_and_headers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mut src = Source::Octet(File::open(&path).unwrap());
        let mut w = Window::new(1000);
        // Blocks 2..=3 of 2500 bytes: 1000 + 500 bytes.
        w.load(&mut src, 2, 3, 2500).unwrap();
        assert_eq!(&w.data[..w.len], &bytes[1000..]);
        assert_eq!(w.heads, vec![[0, 3, 0, 2], [0, 3, 0, 3]]);
        // Block 65537 wraps to wire number 1; a window past the end reads nothing.
        w.load(&mut src, 65537, 65537, 2500).unwrap();
        assert_eq!((w.len, w.heads.clone()), (0, vec![[0, 3, 0, 1]]));
        // A file shorter than announced is an error, not short data.
        assert!(w.load(&mut src, 1, 3, 3000).is_err());
    }

    #[test]
    fn window_send_is_one_datagram_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let size = bytes.len() as u64;
        let mut src = Source::Octet(File::open(&path).unwrap());
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let mut buf = vec![0u8; 70_000];
        // (blksize, blocks of the run, GSO): a window, more blocks than one GSO send takes
        // (two sends), and the short last block of the file ending a run.
        for (blksize, first, last, gso) in [
            (1000u16, 1u64, 3u64, false),
            (1000, 1, 3, true),
            (1468, 1, 100, true),
            (8192, 20, 25, true),
            (1468, 130, 137, true),
            (65464, 1, 2, true),
        ] {
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.connect(rx.local_addr().unwrap()).unwrap();
            let mut w = Window::new(blksize);
            if gso {
                w.enable_gso(&tx);
                assert_eq!(
                    w.gso,
                    blksize < 30_000,
                    "GSO on loopback, blksize {blksize}"
                );
            }
            let bs = u64::from(blksize);
            let last = last.min(size / bs + 1);
            w.load(&mut src, first, last, size).unwrap();
            w.send(&tx).unwrap();
            for block in first..=last {
                let n = rx.recv(&mut buf).unwrap();
                let start = ((block - 1) * bs) as usize;
                let end = (start + usize::from(blksize)).min(bytes.len());
                assert_eq!(
                    Packet::parse(&buf[..n]).unwrap(),
                    Packet::Data {
                        block: block as u16,
                        data: bytes[start..end].to_vec()
                    },
                    "blksize {blksize} block {block}"
                );
            }
        }
    }
}
