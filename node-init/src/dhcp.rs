//! A DHCPv4 client (RFC 2131 §3.1, §4.4.1) for a boot interface with no `strata.ip`:
//! DISCOVER → OFFER → REQUEST → ACK, broadcast flag set (the interface has no address yet).
//! Sans-IO: [`DhcpClient`] turns received datagrams into [`Step`]s; `net.rs` owns the socket
//! and the retransmission timer. Packets are parsed by `wire::dhcp`.

use std::net::Ipv4Addr;

use wire::dhcp::{DhcpOption, DhcpPacket, MessageType, Op, Options, FLAG_BROADCAST};

/// The address set-up a server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub ip: Ipv4Addr,
    /// Netmask (default /24 when the server sends none).
    pub netmask: Ipv4Addr,
    /// First router.
    pub router: Option<Ipv4Addr>,
    /// The DHCP server.
    pub server: Ipv4Addr,
    /// Lease seconds.
    pub lease_secs: Option<u32>,
}

/// What to do after a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this packet (broadcast to port 67).
    Send(DhcpPacket),
    /// Done: configure the interface.
    Bound(Lease),
    /// Not for us, or not useful now.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Selecting,
    Requesting { ip: Ipv4Addr, server: Ipv4Addr },
    Bound,
}

/// Client state for one interface.
#[derive(Debug, Clone)]
pub struct DhcpClient {
    mac: [u8; 6],
    xid: u32,
    phase: Phase,
}

const PARAMS: [u8; 3] = [1, 3, 51]; // subnet mask, routers, lease time

impl DhcpClient {
    /// A client for `mac`, using transaction id `xid`.
    pub fn new(mac: [u8; 6], xid: u32) -> Self {
        Self {
            mac,
            xid,
            phase: Phase::Selecting,
        }
    }

    fn request(&self, kind: MessageType, extra: Vec<DhcpOption>) -> DhcpPacket {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&self.mac);
        let mut options = Options::new();
        options.set(DhcpOption::MessageType(kind));
        options.set(DhcpOption::ParameterRequestList(PARAMS.to_vec()));
        let mut cid = vec![1u8];
        cid.extend_from_slice(&self.mac);
        options.set(DhcpOption::ClientId(cid));
        for o in extra {
            options.set(o);
        }
        DhcpPacket {
            op: Op::BootRequest,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: self.xid,
            secs: 0,
            flags: FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options,
        }
    }

    /// The packet to (re)send now: DISCOVER while selecting, REQUEST while requesting.
    pub fn current(&self) -> Option<DhcpPacket> {
        match &self.phase {
            Phase::Selecting => Some(self.request(MessageType::Discover, vec![])),
            Phase::Requesting { ip, server } => Some(self.request(
                MessageType::Request,
                vec![DhcpOption::RequestedIp(*ip), DhcpOption::ServerId(*server)],
            )),
            Phase::Bound => None,
        }
    }

    /// Handles one received datagram.
    pub fn on_datagram(&mut self, bytes: &[u8]) -> Step {
        let Ok(p) = DhcpPacket::parse(bytes) else {
            return Step::Ignore;
        };
        if p.op != Op::BootReply || p.xid != self.xid || p.chaddr.get(..6) != Some(&self.mac[..]) {
            return Step::Ignore;
        }
        let kind = p.options.message_type();
        match (&self.phase, kind) {
            (Phase::Selecting, Some(MessageType::Offer)) => {
                let Some(server) = p.options.server_id() else {
                    return Step::Ignore;
                };
                if p.yiaddr.is_unspecified() || p.yiaddr.is_broadcast() {
                    return Step::Ignore;
                }
                self.phase = Phase::Requesting {
                    ip: p.yiaddr,
                    server,
                };
                self.current().map_or(Step::Ignore, Step::Send)
            }
            (Phase::Requesting { ip, server }, Some(MessageType::Ack)) => {
                if p.yiaddr != *ip || p.options.server_id().is_some_and(|s| s != *server) {
                    return Step::Ignore;
                }
                let netmask = match p.options.get(wire::dhcp::code::SUBNET_MASK) {
                    Some(DhcpOption::SubnetMask(m)) => *m,
                    _ => Ipv4Addr::new(255, 255, 255, 0),
                };
                let router = match p.options.get(wire::dhcp::code::ROUTER) {
                    Some(DhcpOption::Router(r)) => r.first().copied(),
                    _ => None,
                };
                let lease = Lease {
                    ip: *ip,
                    netmask,
                    router,
                    server: *server,
                    lease_secs: p.options.lease_time(),
                };
                self.phase = Phase::Bound;
                Step::Bound(lease)
            }
            (Phase::Requesting { server, .. }, Some(MessageType::Nak))
                if p.options.server_id().is_none_or(|s| s == *server) =>
            {
                self.phase = Phase::Selecting;
                self.current().map_or(Step::Ignore, Step::Send)
            }
            _ => Step::Ignore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn reply(req: &DhcpPacket, kind: MessageType, ip: Ipv4Addr) -> Vec<u8> {
        let mut r = req.reply_skeleton();
        r.yiaddr = ip;
        r.options.set(DhcpOption::MessageType(kind));
        r.options
            .set(DhcpOption::ServerId(Ipv4Addr::new(10, 0, 2, 2)));
        r.options
            .set(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)));
        r.options
            .set(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]));
        r.options.set(DhcpOption::LeaseTime(3600));
        r.to_bytes()
    }

    #[test]
    fn discover_offer_request_ack() {
        let mut c = DhcpClient::new(MAC, 7);
        let d = c.current().unwrap();
        assert_eq!(d.options.message_type(), Some(MessageType::Discover));
        assert!(d.broadcast());
        let ip = Ipv4Addr::new(10, 0, 2, 15);
        let Step::Send(req) = c.on_datagram(&reply(&d, MessageType::Offer, ip)) else {
            panic!()
        };
        assert_eq!(req.options.message_type(), Some(MessageType::Request));
        assert_eq!(req.options.requested_ip(), Some(ip));
        assert_eq!(req.options.server_id(), Some(Ipv4Addr::new(10, 0, 2, 2)));
        let Step::Bound(l) = c.on_datagram(&reply(&req, MessageType::Ack, ip)) else {
            panic!()
        };
        assert_eq!(l.ip, ip);
        assert_eq!(l.netmask, Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(l.lease_secs, Some(3600));
        assert_eq!(c.current(), None);
    }

    #[test]
    fn other_transactions_and_garbage_are_ignored() {
        let mut c = DhcpClient::new(MAC, 7);
        let d = c.current().unwrap();
        let mut other = d.clone();
        other.xid = 8;
        assert_eq!(
            c.on_datagram(&reply(
                &other,
                MessageType::Offer,
                Ipv4Addr::new(10, 0, 2, 15)
            )),
            Step::Ignore
        );
        assert_eq!(c.on_datagram(b"\x02garbage"), Step::Ignore);
        // An ACK while selecting is ignored.
        assert_eq!(
            c.on_datagram(&reply(&d, MessageType::Ack, Ipv4Addr::new(10, 0, 2, 15))),
            Step::Ignore
        );
    }

    #[test]
    fn nak_restarts_with_discover() {
        let mut c = DhcpClient::new(MAC, 7);
        let d = c.current().unwrap();
        let Step::Send(req) =
            c.on_datagram(&reply(&d, MessageType::Offer, Ipv4Addr::new(10, 0, 2, 15)))
        else {
            panic!()
        };
        let Step::Send(again) =
            c.on_datagram(&reply(&req, MessageType::Nak, Ipv4Addr::UNSPECIFIED))
        else {
            panic!()
        };
        assert_eq!(again.options.message_type(), Some(MessageType::Discover));
    }
}
