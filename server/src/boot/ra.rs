//! Empty IPv6 router advertisements on the boot network (RFC 4861 §4.2, §6.2).
//!
//! iPXE waits about 16 s per boot stage for IPv6 autoconfiguration on a network without an
//! IPv6 router. An advertisement with router lifetime 0 (not a default router), M = O = 0 (no
//! DHCPv6) and no prefix tells it at once that there is nothing to configure. The responder
//! sends one unsolicited advertisement at start and answers every router solicitation:
//! unicast to a soliciting host with an address, multicast to all nodes (at most once a
//! second) otherwise.
//!
//! The socket is a raw ICMPv6 socket (`socket2`, hop limit 255 as RFC 4861 requires, joined to
//! `ff02::2`, bound to the interface); [`RaResponder::bind`] sets it up. The interface needs
//! IPv6 enabled and its link-local address (the kernel picks it as the source).

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// ICMPv6 router solicitation.
pub const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 router advertisement.
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// All-nodes multicast.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// All-routers multicast.
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Errors of the router-advertisement responder.
#[derive(Debug, thiserror::Error)]
pub enum RaError {
    /// The interface does not exist.
    #[error("interface {iface} not found")]
    NoInterface {
        /// Its name.
        iface: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating or configuring the raw socket failed (needs CAP_NET_RAW).
    #[error("raw ICMPv6 socket on {iface}: {step}")]
    Socket {
        /// Interface.
        iface: String,
        /// Which step.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed.
    #[error("receiving router solicitations")]
    Recv(#[source] std::io::Error),
}

/// Builds the advertisement: cur hop limit 0, M = O = 0, router lifetime 0, reachable time
/// and retransmission timer 0 (unspecified), optionally the source link-layer address. The
/// kernel fills in the checksum of raw ICMPv6 sockets.
pub fn advertisement(mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = vec![
        ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    if let Some(m) = mac {
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&m);
    }
    p
}

/// True when `pkt` is a well-formed router solicitation (RFC 4861 §6.1.1: code 0, at least 8
/// bytes, options of non-zero length that fit).
pub fn is_solicitation(pkt: &[u8]) -> bool {
    let (Some(&ROUTER_SOLICITATION), Some(&0)) = (pkt.first(), pkt.get(1)) else {
        return false;
    };
    let Some(mut opts) = pkt.get(8..) else {
        return false;
    };
    while !opts.is_empty() {
        let len = opts.get(1).map_or(0, |l| usize::from(*l) * 8);
        if len == 0 {
            return false;
        }
        match opts.get(len..) {
            Some(rest) => opts = rest,
            None => return false,
        }
    }
    true
}

/// Answers router solicitations on one interface.
#[derive(Debug)]
pub struct RaResponder {
    socket: UdpSocket,
    ifindex: u32,
    packet: Vec<u8>,
}

impl RaResponder {
    /// Opens and configures the raw ICMPv6 socket on `iface` (needs CAP_NET_RAW) in the
    /// network namespace of the calling thread, and registers it with the tokio runtime.
    pub fn bind(iface: &str) -> Result<Self, RaError> {
        let (s, index) = Self::open_socket(iface)?;
        let socket = UdpSocket::from_std(s).map_err(|source| RaError::Socket {
            iface: iface.to_owned(),
            step: "register with tokio",
            source,
        })?;
        Ok(Self::new(socket, index, None))
    }

    /// Opens and configures the raw ICMPv6 socket, without a runtime: returns it (read
    /// through the datagram API, which works the same on raw sockets) and the interface index.
    pub fn open_socket(iface: &str) -> Result<(std::net::UdpSocket, u32), RaError> {
        let step = |step| {
            move |source| RaError::Socket {
                iface: iface.to_owned(),
                step,
                source,
            }
        };
        use socket2::{Domain, Protocol, Socket, Type};
        let s =
            Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(step("socket"))?;
        // SIOCGIFINDEX on the socket itself: right in any namespace, unlike /sys.
        let index =
            rustix::net::netdevice::name_to_index(&s, iface).map_err(|e| RaError::NoInterface {
                iface: iface.to_owned(),
                source: e.into(),
            })?;
        s.bind_device(Some(iface.as_bytes()))
            .map_err(step("SO_BINDTODEVICE"))?;
        s.set_multicast_hops_v6(255)
            .map_err(step("IPV6_MULTICAST_HOPS"))?;
        s.set_unicast_hops_v6(255)
            .map_err(step("IPV6_UNICAST_HOPS"))?;
        s.set_multicast_if_v6(index)
            .map_err(step("IPV6_MULTICAST_IF"))?;
        s.set_multicast_loop_v6(false)
            .map_err(step("IPV6_MULTICAST_LOOP"))?;
        s.join_multicast_v6(&ALL_ROUTERS, index)
            .map_err(step("join ff02::2"))?;
        s.set_nonblocking(true).map_err(step("O_NONBLOCK"))?;
        Ok((std::net::UdpSocket::from(s), index))
    }

    /// A responder on an already configured raw ICMPv6 socket; `mac`, when given, goes in a
    /// source link-layer address option.
    pub fn new(socket: UdpSocket, ifindex: u32, mac: Option<[u8; 6]>) -> Self {
        RaResponder {
            socket,
            ifindex,
            packet: advertisement(mac),
        }
    }

    async fn send(&self, to: Ipv6Addr) {
        let dest = SocketAddrV6::new(to, 0, 0, self.ifindex);
        if let Err(e) = self.socket.send_to(&self.packet, dest).await {
            warn!(%to, error = %e, "sending router advertisement failed");
        }
    }

    /// Sends one unsolicited advertisement, then answers solicitations until `cancel`.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), RaError> {
        info!(
            ifindex = self.ifindex,
            "router advertisements (lifetime 0, no prefix)"
        );
        self.send(ALL_NODES).await;
        let mut last_multicast: Option<tokio::time::Instant> = None;
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => continue,
                    Err(e) => return Err(RaError::Recv(e)),
                },
            };
            if !is_solicitation(buf.get(..n).unwrap_or_default()) {
                continue;
            }
            let SocketAddr::V6(peer) = peer else { continue };
            let src = *peer.ip();
            if src.is_unspecified() {
                let now = tokio::time::Instant::now();
                if last_multicast.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
                    continue;
                }
                last_multicast = Some(now);
                debug!("router solicitation from ::, multicast advertisement");
                self.send(ALL_NODES).await;
            } else {
                debug!(peer = %src, "router solicitation, unicast advertisement");
                self.send(src).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_layout() {
        let p = advertisement(Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(p[0], ROUTER_ADVERTISEMENT);
        assert_eq!(
            &p[4..8],
            &[0, 0, 0, 0],
            "hop limit, M=O=0, router lifetime 0"
        );
        assert_eq!(&p[16..], &[1, 1, 2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn solicitation_validation() {
        assert!(is_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0]));
        assert!(is_solicitation(&[
            133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5, 6
        ]));
        assert!(
            !is_solicitation(&[133, 1, 0, 0, 0, 0, 0, 0]),
            "code must be 0"
        );
        assert!(!is_solicitation(&[133, 0, 0, 0]), "too short");
        assert!(
            !is_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            "zero-length option"
        );
        assert!(
            !is_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0]),
            "option overruns"
        );
        assert!(!is_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]));
    }
}
