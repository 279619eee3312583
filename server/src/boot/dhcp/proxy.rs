//! proxyDHCP (PXE specification 2.1 §2.2.3, RFC 4578): boot information for PXE, iPXE and
//! UEFI HTTP clients beside a DHCP server that hands out the addresses.
//!
//! On port 67 the proxy answers a boot client's DHCPDISCOVER with an offer that carries no
//! address (`yiaddr` 0), option 60 `PXEClient` (or `HTTPClient`), the boot file and option 43
//! with PXE discovery control 8 ("boot file in the offer: no boot server discovery"). On port
//! 4011 it answers the client's DHCPREQUEST (and INFORM) with the same information as an ACK,
//! sent back to the address and port it came from. Non-boot clients get nothing, ever.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::dhcp::{DhcpOption, DhcpPacket, MessageType, Op};

use super::boot::{self, BootAnswer, ClientKind};
use super::config::{BootConfig, UnknownPolicy};
use super::core::{base_reply, destination, Discovered, Reply};
use super::server::{is_transient, report, send, DhcpServerError, LogLimiter};

/// PXE vendor options (option 43): PXE_DISCOVERY_CONTROL (6) = 8, then END.
const PXE_VENDOR_OPTIONS: [u8; 4] = [6, 1, 8, 255];

/// Which port a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyPort {
    /// 67, broadcast DISCOVERs.
    Dhcp,
    /// 4011, the PXE boot server port.
    Pxe,
}

/// The proxy's protocol core, sans-IO.
#[derive(Debug)]
pub struct ProxyCore {
    boot: BootConfig,
    reported: HashSet<Discovered>,
}

impl ProxyCore {
    /// A core with this boot policy.
    pub fn new(boot: BootConfig) -> Self {
        ProxyCore {
            boot,
            reported: HashSet::new(),
        }
    }

    /// Handles a request from `peer` that arrived on `port`.
    pub fn handle(
        &mut self,
        req: &DhcpPacket,
        peer: SocketAddr,
        port: ProxyPort,
    ) -> (Option<Reply>, Option<Discovered>) {
        if req.op != Op::BootRequest {
            return (None, None);
        }
        let (Some(mac), Some(t)) = (req.mac(), req.options.message_type()) else {
            return (None, None);
        };
        let info = boot::classify(req);
        if info.kind == ClientKind::Plain {
            return (None, None);
        }
        let mut discovered = None;
        if t == MessageType::Discover {
            let d = Discovered {
                mac,
                arch: info.arch,
                vendor_class: info.vendor_class.clone(),
                user_class: info.user_class.clone(),
            };
            if self.reported.len() >= 16_384 {
                self.reported.clear();
            }
            if self.reported.insert(d.clone()) {
                discovered = Some(d);
            }
        }
        if self.boot.unknown_policy != UnknownPolicy::Boot {
            return (None, discovered);
        }
        let reply_type = match (port, t) {
            (ProxyPort::Dhcp, MessageType::Discover) => MessageType::Offer,
            // A REQUEST on 67 is for the proxy only when it names us.
            (ProxyPort::Dhcp, MessageType::Request)
                if req.options.server_id() == Some(self.boot.server_ip) =>
            {
                MessageType::Ack
            }
            (ProxyPort::Pxe, MessageType::Request | MessageType::Inform) => MessageType::Ack,
            _ => return (None, discovered),
        };
        let answer = boot::select(&self.boot, &info, Some(mac));
        if matches!(answer, BootAnswer::None | BootAnswer::NoFileForArch { .. }) {
            return (None, discovered);
        }
        let mut r = base_reply(req, reply_type, self.boot.server_ip);
        r.siaddr = self.boot.tftp_server();
        let class: &[u8] = if info.kind == ClientKind::UefiHttp {
            b"HTTPClient"
        } else {
            b"PXEClient"
        };
        r.options.set(DhcpOption::VendorClass(class.to_vec()));
        if info.kind == ClientKind::Pxe {
            r.options
                .set(DhcpOption::VendorSpecific(PXE_VENDOR_OPTIONS.to_vec()));
        }
        if let Some(uuid) = req.options.get(wire::dhcp::code::CLIENT_UUID) {
            r.options.set(uuid.clone());
        }
        boot::apply(&answer, &mut r);
        let to = match port {
            ProxyPort::Dhcp => destination(req, false),
            ProxyPort::Pxe => match peer {
                SocketAddr::V4(a) if !a.ip().is_unspecified() => a,
                _ => SocketAddrV4::new(Ipv4Addr::BROADCAST, peer.port()),
            },
        };
        r.ciaddr = req.ciaddr;
        (Some(Reply { packet: r, to }), discovered)
    }
}

/// A proxyDHCP server on ports 67 and 4011.
#[derive(Debug)]
pub struct ProxyDhcpServer {
    dhcp: UdpSocket,
    pxe: UdpSocket,
    core: ProxyCore,
    discovered: Option<mpsc::Sender<Discovered>>,
}

impl ProxyDhcpServer {
    /// A proxy on `dhcp` (bound to `0.0.0.0:67`, `SO_BROADCAST`, `SO_REUSEADDR` so it can share
    /// the port with a DHCP server on the same host, bound to the boot interface) and `pxe`
    /// (bound to `0.0.0.0:4011`, `SO_BROADCAST`).
    pub fn new(
        dhcp: UdpSocket,
        pxe: UdpSocket,
        boot: BootConfig,
        discovered: Option<mpsc::Sender<Discovered>>,
    ) -> Self {
        ProxyDhcpServer {
            dhcp,
            pxe,
            core: ProxyCore::new(boot),
            discovered,
        }
    }

    /// Serves until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), DhcpServerError> {
        info!(dhcp = ?self.dhcp.local_addr().ok(), pxe = ?self.pxe.local_addr().ok(), "proxyDHCP listening");
        let mut b1 = vec![0u8; 65_536];
        let mut b2 = vec![0u8; 65_536];
        let mut limiter = LogLimiter::new();
        let mut report_limiter = LogLimiter::new();
        loop {
            let (r, port) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.dhcp.recv_from(&mut b1) => (r.map(|(n, p)| (b1.get(..n).unwrap_or_default().to_vec(), p)), ProxyPort::Dhcp),
                r = self.pxe.recv_from(&mut b2) => (r.map(|(n, p)| (b2.get(..n).unwrap_or_default().to_vec(), p)), ProxyPort::Pxe),
            };
            let (datagram, peer) = match r {
                Ok(x) => x,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(DhcpServerError::Recv(e)),
            };
            let req = match DhcpPacket::parse(&datagram) {
                Ok(p) => p,
                Err(e) => {
                    if limiter.allow() {
                        warn!(%peer, len = datagram.len(), error = %e, ?port, "dropping malformed DHCP packet");
                    }
                    continue;
                }
            };
            let (reply, discovered) = self.core.handle(&req, peer, port);
            if let Some(d) = discovered {
                report(&self.discovered, d, &mut report_limiter);
            }
            if let Some(reply) = reply {
                let mac = req.mac().map(|m| m.to_string()).unwrap_or_default();
                info!(%mac, ?port, to = %reply.to, file = %String::from_utf8_lossy(&reply.packet.file), "proxyDHCP answer");
                let sock = match port {
                    ProxyPort::Dhcp => &self.dhcp,
                    ProxyPort::Pxe => &self.pxe,
                };
                send(sock, &reply.packet.to_bytes(), reply.to).await;
            } else {
                debug!(%peer, ?port, "proxyDHCP: no answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::dhcp::Options;

    fn req(t: MessageType, vc: &[u8]) -> DhcpPacket {
        let mut options = Options::new();
        options.set(DhcpOption::MessageType(t));
        options.set(DhcpOption::VendorClass(vc.to_vec()));
        options.set(DhcpOption::ClientArch(vec![0]));
        options.set(DhcpOption::ClientUuid(vec![0; 17]));
        DhcpPacket {
            op: Op::BootRequest,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 9,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sname: vec![],
            file: vec![],
            options,
        }
    }

    fn core() -> ProxyCore {
        ProxyCore::new(BootConfig::new(
            Ipv4Addr::new(10, 0, 0, 1),
            "http://10.0.0.1:8080/boot/ipxe",
        ))
    }

    const PEER: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68));

    #[test]
    fn pxe_discover_gets_addressless_offer() {
        let (r, d) = core().handle(
            &req(MessageType::Discover, b"PXEClient:Arch:00000:UNDI:002001"),
            PEER,
            ProxyPort::Dhcp,
        );
        let r = r.unwrap();
        assert!(d.is_some());
        assert_eq!(r.packet.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.packet.siaddr, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(r.packet.file, b"undionly.kpxe");
        assert_eq!(r.packet.options.vendor_class(), Some(&b"PXEClient"[..]));
        assert_eq!(
            r.packet.options.get(43),
            Some(&DhcpOption::VendorSpecific(PXE_VENDOR_OPTIONS.to_vec()))
        );
        assert!(r.packet.options.get(97).is_some());
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    }

    #[test]
    fn port_4011_request_gets_ack_to_sender() {
        let mut q = req(MessageType::Request, b"PXEClient:Arch:00000:UNDI:002001");
        q.ciaddr = Ipv4Addr::new(10, 0, 0, 150);
        let peer: SocketAddr = "10.0.0.150:4011".parse().unwrap();
        let r = core().handle(&q, peer, ProxyPort::Pxe).0.unwrap();
        assert_eq!(r.packet.options.message_type(), Some(MessageType::Ack));
        assert_eq!(r.to, "10.0.0.150:4011".parse().unwrap());
    }

    #[test]
    fn plain_clients_and_foreign_requests_ignored() {
        let mut c = core();
        assert_eq!(
            c.handle(
                &req(MessageType::Discover, b"udhcp 1.35"),
                PEER,
                ProxyPort::Dhcp
            ),
            (None, None)
        );
        // A REQUEST to the site's DHCP server (its server id) is not ours.
        let mut q = req(MessageType::Request, b"PXEClient:Arch:00000");
        q.options
            .set(DhcpOption::ServerId(Ipv4Addr::new(10, 0, 0, 2)));
        assert!(c.handle(&q, PEER, ProxyPort::Dhcp).0.is_none());
    }
}
