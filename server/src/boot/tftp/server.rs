//! The TFTP server task: owns the port-69 socket, validates each request, and runs one
//! transfer per request (on its own socket, the transfer ID of RFC 1350 §4) under a
//! semaphore. A transfer's failure is logged with its peer and stays local.
//!
//! Files are confined to the root: names with `..`, absolute names and names that resolve
//! (through symlinks) outside the canonical root are refused with "access violation". Only
//! regular files are served. netascii is served by converting LF to CR LF and CR to CR NUL on
//! the fly (RFC 764), with a tsize that counts the converted bytes; mail mode and writes are
//! refused.
//!
//! Each transfer runs on a blocking thread with a blocking socket ([`super::transfer`] says
//! why); this task only answers port 69, so a slow disk or a stalled client never holds it.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::packet::{
    ErrorCode, Mode, Packet, Request, TftpOption, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE,
};
use super::session::Params;
use super::transfer::{self, netascii_size, NetAscii, Source};

/// Default of [`TftpOptions::max_window_bytes`]: 1 MiB, a window of 16 blocks of 65464.
pub const DEFAULT_MAX_WINDOW_BYTES: u32 = 1 << 20;

/// Server limits and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpOptions {
    /// Concurrent transfers; requests beyond get "server busy".
    pub max_transfers: usize,
    /// First retransmission timeout when the client does not ask for one, and the ceiling of
    /// the adaptive timeout.
    pub timeout: Duration,
    /// Floor of the adaptive timeout (4 × smoothed RTT). A client that asks for a `timeout`
    /// (RFC 2349) gets exactly that instead.
    pub min_timeout: Duration,
    /// Largest window in payload bytes (windowsize × blksize) granted; a larger request is
    /// answered with the windowsize that fits (RFC 7440 lets the server lower it). The client
    /// chooses its window (RFC 7440) and must be able to queue it: a Linux client that keeps
    /// the default 208 KiB socket receive buffer holds 3 datagrams of blksize 65464, 12 of
    /// 8192 (23 when the sender uses UDP segmentation offload) and 92 of 1468, and loses the
    /// rest of a larger window. The default, 1 MiB, grants 65464 × 16: a client that asks for
    /// that sets a receive buffer for it. Lower it for clients that ask for more than they
    /// hold (`[tftp] max_window_bytes` in docs/configuration.md).
    pub max_window_bytes: u32,
    /// Timeouts in a row before a transfer is abandoned.
    pub max_retries: u32,
    /// Largest blksize granted (8..=65464).
    pub max_blksize: u16,
    /// Largest windowsize granted (at least 1).
    pub max_windowsize: u16,
    /// Bind transfer sockets to this interface (SO_BINDTODEVICE), like the main socket.
    pub bind_device: Option<String>,
}

impl Default for TftpOptions {
    fn default() -> Self {
        TftpOptions {
            max_transfers: 256,
            timeout: Duration::from_secs(1),
            min_timeout: Duration::from_millis(100),
            max_window_bytes: DEFAULT_MAX_WINDOW_BYTES,
            max_retries: 5,
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            bind_device: None,
        }
    }
}

/// Errors that stop or prevent the TFTP service.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The root directory cannot be used.
    #[error("TFTP root {root}")]
    Root {
        /// The configured root.
        root: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Receiving on the main socket failed.
    #[error("receiving on the TFTP socket")]
    Recv(#[source] io::Error),
}

/// Why a request is refused, as sent to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Error code.
    pub code: ErrorCode,
    /// Message.
    pub message: &'static str,
}

fn refuse(code: ErrorCode, message: &'static str) -> Refusal {
    Refusal { code, message }
}

/// Resolves a requested name inside `root` (which must be canonical).
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf, Refusal> {
    if name.starts_with('/') {
        return Err(refuse(
            ErrorCode::AccessViolation,
            "absolute paths are not served",
        ));
    }
    let rel = Path::new(name);
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(refuse(
            ErrorCode::AccessViolation,
            "path leaves the TFTP root",
        ));
    }
    let canon = root.join(rel).canonicalize().map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => refuse(ErrorCode::AccessViolation, "permission denied"),
        _ => refuse(ErrorCode::FileNotFound, "file not found"),
    })?;
    if !canon.starts_with(root) {
        return Err(refuse(
            ErrorCode::AccessViolation,
            "path leaves the TFTP root",
        ));
    }
    Ok(canon)
}

/// A read-only TFTP server.
#[derive(Debug)]
pub struct TftpServer {
    socket: UdpSocket,
    root: PathBuf,
    opts: TftpOptions,
}

impl TftpServer {
    /// A server on `socket` (bound to port 69, or any port in tests) serving files under
    /// `root`, which is canonicalised now.
    pub fn new(
        socket: UdpSocket,
        root: impl AsRef<Path>,
        opts: TftpOptions,
    ) -> Result<Self, TftpError> {
        let root = root.as_ref();
        let canon = root.canonicalize().map_err(|source| TftpError::Root {
            root: root.to_owned(),
            source,
        })?;
        if !canon.is_dir() {
            return Err(TftpError::Root {
                root: root.to_owned(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(TftpServer {
            socket,
            root: canon,
            opts,
        })
    }

    /// The main socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `cancel` fires; transfers in flight are cancelled with it.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), TftpError> {
        let local = self.socket.local_addr().map_err(TftpError::Recv)?;
        info!(addr = %local, root = %self.root.display(), "TFTP server listening");
        let permits = Arc::new(Semaphore::new(self.opts.max_transfers.max(1)));
        let active: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
        let ctx = Arc::new(Ctx {
            root: self.root.clone(),
            opts: self.opts.clone(),
            local_ip: local.ip(),
        });
        let mut tasks = tokio::task::JoinSet::new();
        let mut buf = vec![0u8; 65_536];
        let mut limiter = crate::boot::dhcp::server::LogLimiter::new();
        loop {
            let (n, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) if crate::boot::dhcp::server::is_transient(&e) => continue,
                    Err(e) => return Err(TftpError::Recv(e)),
                },
            };
            let pkt = match Packet::parse(buf.get(..n).unwrap_or_default()) {
                Ok(p) => p,
                Err(e) => {
                    if limiter.allow() {
                        warn!(%peer, len = n, error = %e, "dropping malformed TFTP request");
                    }
                    continue;
                }
            };
            let req = match pkt {
                Packet::Rrq(r) => r,
                Packet::Wrq(r) => {
                    if limiter.allow() {
                        warn!(%peer, file = %r.filename, "write request refused (read-only server)");
                    }
                    reply_error(
                        &self.socket,
                        peer,
                        ErrorCode::AccessViolation,
                        "read-only server",
                    )
                    .await;
                    continue;
                }
                // Stray packets for finished transfers, or garbage: not answered.
                _ => continue,
            };
            // A retransmitted RRQ while its transfer runs is not a second transfer.
            if !lock(&active).insert(peer) {
                debug!(%peer, "duplicate RRQ ignored");
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                lock(&active).remove(&peer);
                if limiter.allow() {
                    warn!(%peer, file = %req.filename, "too many transfers; request refused");
                }
                reply_error(
                    &self.socket,
                    peer,
                    ErrorCode::NotDefined,
                    "server busy, try again",
                )
                .await;
                continue;
            };
            let ctx = ctx.clone();
            let active = active.clone();
            let token = cancel.child_token();
            tasks.spawn_blocking(move || {
                let _permit = permit;
                let _guard = ActiveGuard { set: active, peer };
                transfer::run(&ctx, peer, req, &token);
            });
        }
        tasks.shutdown().await;
        Ok(())
    }
}

fn lock(m: &Mutex<HashSet<SocketAddr>>) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ActiveGuard {
    set: Arc<Mutex<HashSet<SocketAddr>>>,
    peer: SocketAddr,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.peer);
    }
}

/// What every transfer needs from the server.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) root: PathBuf,
    pub(super) opts: TftpOptions,
    pub(super) local_ip: IpAddr,
}

async fn reply_error(socket: &UdpSocket, peer: SocketAddr, code: ErrorCode, message: &str) {
    let _ = socket
        .send_to(&Packet::error(code, message).to_bytes(), peer)
        .await;
}

/// Negotiation result: parameters, OACK options (empty: no OACK).
pub(super) fn negotiate(req: &Request, opts: &TftpOptions, size: u64) -> (Params, Vec<TftpOption>) {
    let mut p = Params {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: opts.timeout,
        min_timeout: opts.min_timeout.min(opts.timeout),
        max_retries: opts.max_retries,
    };
    let mut oack = Vec::new();
    let mut seen = HashSet::new();
    for o in &req.options {
        let key = std::mem::discriminant(o);
        if matches!(o, TftpOption::Unknown { .. }) || !seen.insert(key) {
            continue;
        }
        match o {
            TftpOption::BlkSize(b) => {
                p.blksize = (*b).min(opts.max_blksize).max(MIN_BLKSIZE);
                oack.push(TftpOption::BlkSize(p.blksize));
            }
            TftpOption::TSize(_) => oack.push(TftpOption::TSize(size)),
            TftpOption::Timeout(t) => {
                p.timeout = Duration::from_secs(u64::from(*t));
                p.min_timeout = p.timeout;
                oack.push(TftpOption::Timeout(*t));
            }
            TftpOption::WindowSize(w) => {
                p.windowsize = (*w).min(opts.max_windowsize.max(1));
                oack.push(TftpOption::WindowSize(p.windowsize));
            }
            TftpOption::Unknown { .. } => {}
        }
    }
    // The window must fit the client's receive buffer (RFC 7440 lets the server answer
    // with a smaller windowsize).
    let fit = (opts.max_window_bytes / u32::from(p.blksize)).max(1);
    let fit = u16::try_from(fit).unwrap_or(u16::MAX);
    if p.windowsize > fit {
        p.windowsize = fit;
        for o in &mut oack {
            if let TftpOption::WindowSize(w) = o {
                *w = fit;
            }
        }
    }
    (p, oack)
}

pub(super) fn open(ctx: &Ctx, req: &Request) -> Result<(Source, u64), Refusal> {
    if req.mode == Mode::Mail {
        return Err(refuse(
            ErrorCode::IllegalOperation,
            "mail mode is not supported",
        ));
    }
    let path = resolve(&ctx.root, &req.filename)?;
    let file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => refuse(ErrorCode::AccessViolation, "permission denied"),
        _ => refuse(ErrorCode::FileNotFound, "file not found"),
    })?;
    let meta = file
        .metadata()
        .map_err(|_| refuse(ErrorCode::FileNotFound, "file not found"))?;
    if !meta.is_file() {
        return Err(refuse(ErrorCode::FileNotFound, "not a regular file"));
    }
    match req.mode {
        Mode::NetAscii => {
            let size =
                netascii_size(&file).map_err(|_| refuse(ErrorCode::NotDefined, "read error"))?;
            Ok((Source::NetAscii(NetAscii::new(file)), size))
        }
        _ => Ok((Source::Octet(file), meta.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_confines_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/a", root.join("inside")).unwrap();
        assert_eq!(resolve(&root, "sub/a").unwrap(), root.join("sub/a"));
        assert_eq!(resolve(&root, "./sub/a").unwrap(), root.join("sub/a"));
        assert_eq!(resolve(&root, "inside").unwrap(), root.join("sub/a"));
        let av = |n: &str| resolve(&root, n).unwrap_err().code;
        assert_eq!(av("../../etc/passwd"), ErrorCode::AccessViolation);
        assert_eq!(av("sub/../sub/a"), ErrorCode::AccessViolation);
        assert_eq!(av("/etc/passwd"), ErrorCode::AccessViolation);
        assert_eq!(av("escape"), ErrorCode::AccessViolation);
        assert_eq!(av("missing"), ErrorCode::FileNotFound);
    }

    #[test]
    fn negotiation_clamps_and_echoes() {
        let req = Request {
            filename: "f".into(),
            mode: Mode::Octet,
            options: vec![
                TftpOption::BlkSize(65464),
                TftpOption::TSize(0),
                TftpOption::WindowSize(1000),
                TftpOption::Unknown {
                    name: "multicast".into(),
                    value: "".into(),
                },
                TftpOption::BlkSize(512),
            ],
        };
        let opts = TftpOptions {
            max_blksize: 1468,
            ..Default::default()
        };
        let (p, oack) = negotiate(&req, &opts, 4242);
        assert_eq!(p.blksize, 1468);
        assert_eq!(p.windowsize, 64);
        assert_eq!(
            oack,
            vec![
                TftpOption::BlkSize(1468),
                TftpOption::TSize(4242),
                TftpOption::WindowSize(64)
            ]
        );
        let (p, oack) = negotiate(
            &Request {
                options: vec![],
                ..req
            },
            &opts,
            1,
        );
        assert_eq!((p.blksize, p.windowsize), (512, 1));
        assert!(oack.is_empty());
        // Big blocks: a window of 16 x 65464 fits the default 1 MiB and is granted; 64 of them
        // shrink to the 16 that fit, and a smaller cap shrinks 16 x 8192 to 12. A client
        // timeout fixes the timeout.
        let big = |blksize, windowsize| Request {
            filename: "f".into(),
            mode: Mode::Octet,
            options: vec![
                TftpOption::WindowSize(windowsize),
                TftpOption::BlkSize(blksize),
                TftpOption::Timeout(3),
            ],
        };
        let (p, _) = negotiate(&big(65464, 16), &TftpOptions::default(), 1);
        assert_eq!((p.blksize, p.windowsize), (65464, 16));
        let (p, oack) = negotiate(&big(65464, 64), &TftpOptions::default(), 1);
        assert_eq!(p.windowsize, 16);
        assert_eq!(oack[0], TftpOption::WindowSize(16));
        let small = TftpOptions {
            max_window_bytes: 96 * 1024,
            ..Default::default()
        };
        let (p, oack) = negotiate(&big(8192, 16), &small, 1);
        assert_eq!(p.windowsize, 12);
        assert_eq!(oack[0], TftpOption::WindowSize(12));
        assert_eq!(
            (p.timeout, p.min_timeout),
            (Duration::from_secs(3), Duration::from_secs(3))
        );
    }
}
