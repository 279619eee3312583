//! The full DHCP server task: owns the port-67 socket, parses each datagram once, runs the
//! [`DhcpCore`], persists lease changes through the [`LeaseStore`] and only then sends the
//! reply. Bad packets are logged (rate-limited) and dropped; nothing a client sends ends the
//! task.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::dhcp::{DhcpPacket, MessageType};

use super::config::{BootConfig, ConfigError, PoolConfig};
use super::core::{DhcpCore, Discovered, Outcome};
use super::lease::LeaseTable;
use super::store::{LeaseStore, StoreError};

/// Errors that stop or prevent a DHCP service.
#[derive(Debug, thiserror::Error)]
pub enum DhcpServerError {
    /// The configuration does not fit together.
    #[error("invalid DHCP configuration")]
    Config(#[from] ConfigError),
    /// The lease database failed.
    #[error("lease store")]
    Store(#[from] StoreError),
    /// Receiving on the socket failed (sending failures are logged per peer).
    #[error("receiving on the DHCP socket")]
    Recv(#[source] std::io::Error),
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Logs at most a burst of warnings per second, then counts the rest.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window: tokio::time::Instant,
    count: u32,
}

impl LogLimiter {
    pub(crate) fn new() -> Self {
        LogLimiter {
            window: tokio::time::Instant::now(),
            count: 0,
        }
    }

    /// True when this event may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.count > 20 {
                warn!(
                    suppressed = self.count - 20,
                    "similar log lines suppressed in the last second"
                );
            }
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= 20
    }
}

/// A full DHCP server (addresses and boot information).
#[derive(Debug)]
pub struct DhcpServer {
    socket: UdpSocket,
    core: DhcpCore,
    store: LeaseStore,
    discovered: Option<mpsc::Sender<Discovered>>,
}

impl DhcpServer {
    /// A server on `socket` (bound to `0.0.0.0:67`, with `SO_BROADCAST` and bound to the boot
    /// interface). Loads the persisted leases from `store`. Clients without a reservation are
    /// sent to `discovered` (never blocking: when the channel is full the report is dropped
    /// and logged).
    pub async fn new(
        socket: UdpSocket,
        pool: PoolConfig,
        boot: BootConfig,
        store: LeaseStore,
        discovered: Option<mpsc::Sender<Discovered>>,
    ) -> Result<Self, DhcpServerError> {
        pool.validate(boot.server_ip)?;
        let records = store.load().await?;
        let table = LeaseTable::new(pool, boot.server_ip, records);
        Ok(DhcpServer {
            socket,
            core: DhcpCore::new(boot, table),
            store,
            discovered,
        })
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `cancel` fires. Returns an error only when the socket or the lease
    /// database fails.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), DhcpServerError> {
        if let Ok(addr) = self.socket.local_addr() {
            info!(%addr, "DHCP server listening");
        }
        let mut buf = vec![0u8; 65_536];
        let mut limiter = LogLimiter::new();
        let mut report_limiter = LogLimiter::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(60));
        loop {
            let (len, peer) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = sweep.tick() => {
                    let changes = self.core.sweep(unix_now());
                    self.store.apply(changes).await?;
                    continue;
                }
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                    Err(e) if is_transient(&e) => { debug!(error = %e, "transient receive error"); continue; }
                    Err(e) => return Err(DhcpServerError::Recv(e)),
                },
            };
            let datagram = buf.get(..len).unwrap_or_default();
            let req = match DhcpPacket::parse(datagram) {
                Ok(p) => p,
                Err(e) => {
                    if limiter.allow() {
                        warn!(%peer, len, error = %e, "dropping malformed DHCP packet");
                    }
                    continue;
                }
            };
            let out = self.core.handle(&req, unix_now());
            self.finish(&req, peer, out, &mut report_limiter).await?;
        }
    }

    async fn finish(
        &mut self,
        req: &DhcpPacket,
        peer: SocketAddr,
        out: Outcome,
        limiter: &mut LogLimiter,
    ) -> Result<(), DhcpServerError> {
        let mac = req.mac().map(|m| m.to_string()).unwrap_or_default();
        let t = req
            .options
            .message_type()
            .map(|t| t.to_string())
            .unwrap_or_default();
        if let Some(d) = out.discovered {
            report(&self.discovered, d, limiter);
        }
        if let Some(note) = out.note {
            debug!(%peer, %mac, msg = %t, note, "DHCP");
        }
        self.store.apply(out.changes).await?;
        if let Some(reply) = out.reply {
            let rt = reply.packet.options.message_type();
            let bytes = reply.packet.to_bytes();
            match rt {
                Some(MessageType::Ack) if reply.packet.yiaddr.is_unspecified() => {
                    debug!(%mac, to = %reply.to, "DHCPACK (INFORM)")
                }
                Some(MessageType::Ack) => {
                    info!(%mac, ip = %reply.packet.yiaddr, to = %reply.to, "DHCPACK")
                }
                Some(MessageType::Nak) => {
                    info!(%mac, to = %reply.to, reason = out.note.unwrap_or(""), "DHCPNAK")
                }
                _ => {
                    debug!(%mac, ip = %reply.packet.yiaddr, to = %reply.to, "DHCP {}", rt.map(|t| t.to_string()).unwrap_or_default())
                }
            }
            send(&self.socket, &bytes, reply.to).await;
        }
        Ok(())
    }
}

pub(crate) fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | HostUnreachable
            | NetworkUnreachable
            | Interrupted
            | WouldBlock
    )
}

pub(crate) async fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddrV4) {
    if let Err(e) = socket.send_to(bytes, to).await {
        warn!(%to, error = %e, "sending DHCP reply failed");
    }
}

pub(crate) fn report(
    tx: &Option<mpsc::Sender<Discovered>>,
    d: Discovered,
    limiter: &mut LogLimiter,
) {
    let log = limiter.allow();
    if log {
        info!(mac = %d.mac, arch = ?d.arch, vendor_class = ?d.vendor_class, user_class = ?d.user_class, "discovered boot client");
    }
    if let Some(tx) = tx {
        if let Err(e) = tx.try_send(d) {
            if log {
                warn!(error = %e, "discovery channel full or closed; report dropped");
            }
        }
    }
}
