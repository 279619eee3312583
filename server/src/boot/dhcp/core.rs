//! The full DHCP server's protocol core (RFC 2131 §4.3), sans-IO: a parsed request and the
//! time in, a reply with its destination, lease changes to persist and a discovery report out.
//! The socket task in [`super::server`] does the I/O; property tests drive this directly.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use wire::dhcp::{DhcpOption, DhcpPacket, MacAddr, MessageType, Op, FLAG_BROADCAST};

use super::boot::{self, BootAnswer, ClientInfo, ClientKind};
use super::config::{BootConfig, UnknownPolicy};
use super::lease::{LeaseChange, LeaseTable};

/// iPXE encapsulated option (175) body: sub-option 176 (no-pxedhcp), length 1, value 1.
pub const IPXE_NO_PXEDHCP: [u8; 3] = [176, 1, 1];

/// DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// DHCP server port.
pub const SERVER_PORT: u16 = 67;

/// A client the server has no reservation for (or, in proxy mode, any boot client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Discovered {
    /// Its hardware address.
    pub mac: MacAddr,
    /// Client architecture (option 93), if sent.
    pub arch: Option<u16>,
    /// Vendor class (option 60), if sent.
    pub vendor_class: Option<String>,
    /// User class (option 77), if sent.
    pub user_class: Option<String>,
}

/// A reply and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The packet.
    pub packet: DhcpPacket,
    /// Destination (RFC 2131 §4.1).
    pub to: SocketAddrV4,
}

/// What handling one request produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The reply, if any. Send it only after `changes` are durable.
    pub reply: Option<Reply>,
    /// Lease changes to persist.
    pub changes: Vec<LeaseChange>,
    /// A client to report.
    pub discovered: Option<Discovered>,
    /// Why the request was dropped or refused, for the log.
    pub note: Option<&'static str>,
}

impl Outcome {
    fn dropped(note: &'static str) -> Self {
        Outcome {
            note: Some(note),
            ..Default::default()
        }
    }
}

/// Reply destination per RFC 2131 §4.1: relay, then `ciaddr`, then broadcast. Without raw
/// sockets the server cannot unicast to a client that has no address yet (no ARP entry), so
/// a reply that would go to `yiaddr` by `chaddr` is broadcast instead, which every client
/// accepts.
pub fn destination(req: &DhcpPacket, nak: bool) -> SocketAddrV4 {
    if !req.giaddr.is_unspecified() {
        SocketAddrV4::new(req.giaddr, SERVER_PORT)
    } else if !nak && !req.ciaddr.is_unspecified() {
        SocketAddrV4::new(req.ciaddr, CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }
}

/// Options every reply to `req` carries: message type, server id, and the echoes of option 61
/// (RFC 6842) and option 82 (RFC 3046).
pub fn base_reply(req: &DhcpPacket, t: MessageType, server_ip: Ipv4Addr) -> DhcpPacket {
    let mut r = req.reply_skeleton();
    r.options.set(DhcpOption::MessageType(t));
    r.options.set(DhcpOption::ServerId(server_ip));
    for code in [
        wire::dhcp::code::CLIENT_ID,
        wire::dhcp::code::RELAY_AGENT_INFO,
    ] {
        if let Some(o) = req.options.get(code) {
            r.options.set(o.clone());
        }
    }
    r
}

/// The full server's state: lease table, boot policy, discovery de-duplication.
#[derive(Debug)]
pub struct DhcpCore {
    boot: BootConfig,
    leases: LeaseTable,
    reported: HashSet<Discovered>,
}

impl DhcpCore {
    /// A core over a lease table.
    pub fn new(boot: BootConfig, leases: LeaseTable) -> Self {
        DhcpCore {
            boot,
            leases,
            reported: HashSet::new(),
        }
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Periodic housekeeping: forgets declined addresses whose hold has passed.
    pub fn sweep(&mut self, now: u64) -> Vec<LeaseChange> {
        self.leases.sweep(now)
    }

    fn discovered(&mut self, mac: MacAddr, info: &ClientInfo) -> Option<Discovered> {
        let d = Discovered {
            mac,
            arch: info.arch,
            vendor_class: info.vendor_class.clone(),
            user_class: info.user_class.clone(),
        };
        if self.reported.len() >= 16_384 {
            self.reported.clear();
        }
        self.reported.insert(d.clone()).then_some(d)
    }

    /// Handles one request at `now` (Unix seconds).
    pub fn handle(&mut self, req: &DhcpPacket, now: u64) -> Outcome {
        if req.op != Op::BootRequest {
            return Outcome::dropped("not a BOOTREQUEST");
        }
        let Some(mac) = req.mac() else {
            return Outcome::dropped("hardware address is not 6 bytes");
        };
        let Some(t) = req.options.message_type() else {
            return Outcome::dropped("no message type (BOOTP)");
        };
        let info = boot::classify(req);
        let reserved = self.leases.reservation(mac).is_some();
        let mut discovered = None;
        if !reserved && t == MessageType::Discover {
            discovered = self.discovered(mac, &info);
        }
        let policy = if reserved {
            UnknownPolicy::Boot
        } else {
            self.boot.unknown_policy
        };
        if policy == UnknownPolicy::Ignore {
            return Outcome {
                discovered,
                note: Some("unknown client ignored by policy"),
                ..Default::default()
            };
        }
        let mut out = match t {
            MessageType::Discover => self.discover(req, mac, &info, policy, now),
            MessageType::Request => self.request(req, mac, &info, policy, now),
            MessageType::Decline => self.decline(req, mac, now),
            MessageType::Release => self.release(req, mac, now),
            MessageType::Inform => self.inform(req, &info, policy),
            _ => Outcome::dropped("message type a server does not accept"),
        };
        out.discovered = discovered;
        out
    }

    fn config_options(&self, r: &mut DhcpPacket, with_lease: bool) {
        let p = self.leases.pool();
        r.options.set(DhcpOption::SubnetMask(p.subnet.mask()));
        if let Some(gw) = p.router {
            r.options.set(DhcpOption::Router(vec![gw]));
        }
        if !p.dns.is_empty() {
            r.options.set(DhcpOption::DnsServers(p.dns.clone()));
        }
        if let Some(d) = &p.domain {
            r.options
                .set(DhcpOption::DomainName(d.clone().into_bytes()));
        }
        r.options
            .set(DhcpOption::BroadcastAddr(p.subnet.broadcast()));
        if with_lease {
            let secs = u32::try_from(p.lease_time.as_secs()).unwrap_or(u32::MAX);
            r.options.set(DhcpOption::LeaseTime(secs));
            r.options.set(DhcpOption::RenewalTime(secs / 2));
            r.options.set(DhcpOption::RebindingTime(secs / 8 * 7));
        }
    }

    fn boot_options(
        &self,
        r: &mut DhcpPacket,
        info: &ClientInfo,
        mac: MacAddr,
        policy: UnknownPolicy,
    ) -> Option<&'static str> {
        if policy != UnknownPolicy::Boot {
            return None;
        }
        let answer = boot::select(&self.boot, info, Some(mac));
        boot::apply(&answer, r);
        if info.kind == ClientKind::Ipxe {
            // iPXE's encapsulated option 175, "no-pxedhcp" (176) = 1: this server is the
            // whole answer, so iPXE need not wait ~3 s for ProxyDHCP offers after this one.
            r.options.set(DhcpOption::Other {
                code: wire::dhcp::code::IPXE_ENCAP,
                data: IPXE_NO_PXEDHCP.to_vec(),
            });
        }
        match answer {
            BootAnswer::NoFileForArch { .. } => {
                Some("boot client architecture has no boot file configured")
            }
            _ => None,
        }
    }

    fn host_options(&self, r: &mut DhcpPacket, mac: MacAddr) {
        if let Some(h) = self
            .leases
            .reservation(mac)
            .and_then(|res| res.hostname.clone())
        {
            r.options.set(DhcpOption::HostName(h.into_bytes()));
        }
    }

    fn discover(
        &mut self,
        req: &DhcpPacket,
        mac: MacAddr,
        info: &ClientInfo,
        policy: UnknownPolicy,
        now: u64,
    ) -> Outcome {
        let Some(ip) = self.leases.pick(mac, req.options.requested_ip(), now) else {
            return Outcome::dropped("address pool exhausted");
        };
        self.leases.offer(mac, ip, now);
        let mut r = base_reply(req, MessageType::Offer, self.boot.server_ip);
        r.yiaddr = ip;
        self.config_options(&mut r, true);
        self.host_options(&mut r, mac);
        let note = self.boot_options(&mut r, info, mac, policy);
        Outcome {
            reply: Some(Reply {
                to: destination(req, false),
                packet: r,
            }),
            note,
            ..Default::default()
        }
    }

    fn ack(
        &mut self,
        req: &DhcpPacket,
        mac: MacAddr,
        ip: Ipv4Addr,
        info: &ClientInfo,
        policy: UnknownPolicy,
        now: u64,
    ) -> Outcome {
        let hostname = req
            .options
            .host_name()
            .map(|h| String::from_utf8_lossy(h).into_owned());
        let changes = self.leases.bind(mac, ip, hostname, now);
        let mut r = base_reply(req, MessageType::Ack, self.boot.server_ip);
        r.yiaddr = ip;
        r.ciaddr = req.ciaddr;
        self.config_options(&mut r, true);
        self.host_options(&mut r, mac);
        let note = self.boot_options(&mut r, info, mac, policy);
        Outcome {
            reply: Some(Reply {
                to: destination(req, false),
                packet: r,
            }),
            changes,
            note,
            ..Default::default()
        }
    }

    fn nak(&self, req: &DhcpPacket, why: &'static str) -> Outcome {
        let mut r = base_reply(req, MessageType::Nak, self.boot.server_ip);
        r.options.set(DhcpOption::Message(why.as_bytes().to_vec()));
        if !req.giaddr.is_unspecified() {
            r.flags |= FLAG_BROADCAST;
        }
        Outcome {
            reply: Some(Reply {
                to: destination(req, true),
                packet: r,
            }),
            note: Some(why),
            ..Default::default()
        }
    }

    fn request(
        &mut self,
        req: &DhcpPacket,
        mac: MacAddr,
        info: &ClientInfo,
        policy: UnknownPolicy,
        now: u64,
    ) -> Outcome {
        // RFC 2131 §4.3.2: SELECTING carries our server id; INIT-REBOOT carries option 50 and
        // no ciaddr; RENEWING/REBINDING carry ciaddr and no option 50.
        if let Some(sid) = req.options.server_id() {
            if sid != self.boot.server_ip {
                self.leases.withdraw_offer(mac);
                return Outcome::dropped("client selected another server");
            }
            let Some(ip) = req
                .options
                .requested_ip()
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr))
            else {
                return self.nak(req, "REQUEST without requested address");
            };
            return if self.leases.available_to(ip, mac, now) {
                self.ack(req, mac, ip, info, policy, now)
            } else {
                self.nak(req, "requested address is not available")
            };
        }
        let ip = match (req.options.requested_ip(), req.ciaddr.is_unspecified()) {
            (Some(ip), true) => ip,   // INIT-REBOOT
            (_, false) => req.ciaddr, // RENEWING / REBINDING
            (None, true) => return self.nak(req, "REQUEST without requested address"),
        };
        if !self.leases.pool().subnet.contains(ip) {
            return self.nak(req, "requested address is on another network");
        }
        // Authoritative for the subnet: the client's own binding, its reservation or a free
        // pool address is confirmed; anything else is refused.
        if self.leases.available_to(ip, mac, now) {
            self.ack(req, mac, ip, info, policy, now)
        } else {
            self.nak(req, "requested address is not available")
        }
    }

    fn decline(&mut self, req: &DhcpPacket, mac: MacAddr, now: u64) -> Outcome {
        if req
            .options
            .server_id()
            .is_some_and(|s| s != self.boot.server_ip)
        {
            return Outcome::dropped("DECLINE for another server");
        }
        let Some(ip) = req.options.requested_ip() else {
            return Outcome::dropped("DECLINE without requested address");
        };
        let changes = self.leases.decline(mac, ip, now);
        Outcome {
            changes,
            note: Some("address declined by client"),
            ..Default::default()
        }
    }

    fn release(&mut self, req: &DhcpPacket, mac: MacAddr, now: u64) -> Outcome {
        if req
            .options
            .server_id()
            .is_some_and(|s| s != self.boot.server_ip)
        {
            return Outcome::dropped("RELEASE for another server");
        }
        let changes = self.leases.release(mac, req.ciaddr, now);
        Outcome {
            changes,
            note: Some("lease released"),
            ..Default::default()
        }
    }

    fn inform(&mut self, req: &DhcpPacket, info: &ClientInfo, policy: UnknownPolicy) -> Outcome {
        // RFC 2131 §4.3.5: configuration only, no lease, no yiaddr, unicast to ciaddr.
        let mut r = base_reply(req, MessageType::Ack, self.boot.server_ip);
        r.ciaddr = req.ciaddr;
        self.config_options(&mut r, false);
        if info.kind != ClientKind::Plain {
            if let Some(mac) = req.mac() {
                self.boot_options(&mut r, info, mac, policy);
            }
        }
        Outcome {
            reply: Some(Reply {
                to: destination(req, false),
                packet: r,
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{PoolConfig, Reservation, Subnet};
    use super::super::lease::LeaseState;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use wire::dhcp::Options;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    fn pool(size: u8) -> PoolConfig {
        let s = Subnet {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
        };
        let mut p = PoolConfig::new(
            s,
            Ipv4Addr::new(10, 0, 0, 100),
            Ipv4Addr::new(10, 0, 0, 99 + size),
        );
        p.reservations.push(Reservation {
            mac: MacAddr([2, 0, 0, 0, 0, 0xaa]),
            ip: Ipv4Addr::new(10, 0, 0, 50),
            hostname: Some("fixed".into()),
        });
        p
    }

    fn core(size: u8) -> DhcpCore {
        let p = pool(size);
        let boot = BootConfig::new(SERVER, "http://10.0.0.1:8080/boot/ipxe");
        DhcpCore::new(boot, LeaseTable::new(p, SERVER, vec![]))
    }

    fn msg(mac: u8, t: MessageType, opts: Vec<DhcpOption>) -> DhcpPacket {
        let mut options = Options::new();
        options.set(DhcpOption::MessageType(t));
        for o in opts {
            options.set(o);
        }
        DhcpPacket {
            op: Op::BootRequest,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: u32::from(mac),
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, mac, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sname: vec![],
            file: vec![],
            options,
        }
    }

    fn dora(c: &mut DhcpCore, mac: u8, now: u64) -> Option<Ipv4Addr> {
        let offer = c
            .handle(&msg(mac, MessageType::Discover, vec![]), now)
            .reply?;
        let ip = offer.packet.yiaddr;
        let ack = c
            .handle(
                &msg(
                    mac,
                    MessageType::Request,
                    vec![DhcpOption::ServerId(SERVER), DhcpOption::RequestedIp(ip)],
                ),
                now,
            )
            .reply?;
        (ack.packet.options.message_type() == Some(MessageType::Ack)).then_some(ack.packet.yiaddr)
    }

    #[test]
    fn discover_offer_request_ack() {
        let mut c = core(10);
        let out = c.handle(&msg(1, MessageType::Discover, vec![]), 1000);
        let r = out.reply.unwrap();
        assert_eq!(r.packet.options.message_type(), Some(MessageType::Offer));
        assert_eq!(r.packet.yiaddr, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        assert!(out.changes.is_empty(), "an offer is not persisted");
        assert_eq!(out.discovered.unwrap().mac, MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(dora(&mut c, 1, 1000), Some(Ipv4Addr::new(10, 0, 0, 100)));
        assert_eq!(
            c.leases()
                .lease_of(MacAddr([2, 0, 0, 0, 0, 1]))
                .unwrap()
                .expires,
            4600
        );
    }

    #[test]
    fn reservation_gets_fixed_address_and_hostname() {
        let mut c = core(10);
        let out = c.handle(&msg(0xaa, MessageType::Discover, vec![]), 0);
        assert!(out.discovered.is_none(), "reserved clients are known");
        let r = out.reply.unwrap().packet;
        assert_eq!(r.yiaddr, Ipv4Addr::new(10, 0, 0, 50));
        assert_eq!(r.options.host_name(), Some(&b"fixed"[..]));
        // Nobody else gets the reserved address, even asking for it.
        let r = c.handle(
            &msg(
                3,
                MessageType::Discover,
                vec![DhcpOption::RequestedIp(Ipv4Addr::new(10, 0, 0, 50))],
            ),
            0,
        );
        assert_ne!(r.reply.unwrap().packet.yiaddr, Ipv4Addr::new(10, 0, 0, 50));
        let r = c.handle(
            &msg(
                3,
                MessageType::Request,
                vec![DhcpOption::RequestedIp(Ipv4Addr::new(10, 0, 0, 50))],
            ),
            0,
        );
        assert_eq!(
            r.reply.unwrap().packet.options.message_type(),
            Some(MessageType::Nak)
        );
    }

    #[test]
    fn renewal_extends_and_unicasts() {
        let mut c = core(10);
        let ip = dora(&mut c, 1, 0).unwrap();
        let mut renew = msg(1, MessageType::Request, vec![]);
        renew.ciaddr = ip;
        let out = c.handle(&renew, 1800);
        let r = out.reply.unwrap();
        assert_eq!(r.packet.options.message_type(), Some(MessageType::Ack));
        assert_eq!(r.to, SocketAddrV4::new(ip, 68));
        assert_eq!(
            c.leases()
                .lease_of(MacAddr([2, 0, 0, 0, 0, 1]))
                .unwrap()
                .expires,
            5400
        );
        assert_eq!(out.changes.len(), 1);
    }

    #[test]
    fn expiry_frees_address_for_others() {
        let mut c = core(1);
        assert_eq!(dora(&mut c, 1, 0), Some(Ipv4Addr::new(10, 0, 0, 100)));
        // Pool of one is taken.
        assert!(c
            .handle(&msg(2, MessageType::Discover, vec![]), 100)
            .reply
            .is_none());
        // After expiry, the next client gets it.
        assert_eq!(dora(&mut c, 2, 3601), Some(Ipv4Addr::new(10, 0, 0, 100)));
        // And the first client's renewal is refused.
        let mut renew = msg(1, MessageType::Request, vec![]);
        renew.ciaddr = Ipv4Addr::new(10, 0, 0, 100);
        let r = c.handle(&renew, 3602).reply.unwrap();
        assert_eq!(r.packet.options.message_type(), Some(MessageType::Nak));
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
    }

    #[test]
    fn release_and_decline() {
        let mut c = core(2);
        let ip = dora(&mut c, 1, 0).unwrap();
        let mut rel = msg(1, MessageType::Release, vec![DhcpOption::ServerId(SERVER)]);
        rel.ciaddr = ip;
        let out = c.handle(&rel, 10);
        assert!(out.reply.is_none());
        assert_eq!(out.changes.len(), 1);
        assert!(c.leases().available_to(ip, MacAddr([2, 0, 0, 0, 0, 2]), 10));

        // Client 2 declines the address it was given: it is held out of use.
        let ip2 = dora(&mut c, 2, 20).unwrap();
        let out = c.handle(
            &msg(
                2,
                MessageType::Decline,
                vec![DhcpOption::ServerId(SERVER), DhcpOption::RequestedIp(ip2)],
            ),
            21,
        );
        assert_eq!(out.changes.len(), 1);
        assert_eq!(c.leases().get(ip2).unwrap().state, LeaseState::Declined);
        assert_ne!(dora(&mut c, 2, 22), Some(ip2));
        // After the hold, sweep forgets it.
        assert_eq!(c.sweep(21 + 601), vec![LeaseChange::Delete(ip2)]);
    }

    #[test]
    fn inform_gets_config_without_lease() {
        let mut c = core(2);
        let mut inf = msg(7, MessageType::Inform, vec![]);
        inf.ciaddr = Ipv4Addr::new(10, 0, 0, 77);
        let r = c.handle(&inf, 0).reply.unwrap();
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 77), 68));
        assert_eq!(r.packet.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.packet.options.lease_time(), None);
        assert_eq!(r.packet.options.message_type(), Some(MessageType::Ack));
    }

    #[test]
    fn relayed_requests_answer_the_relay() {
        let mut c = core(2);
        let mut d = msg(
            1,
            MessageType::Discover,
            vec![DhcpOption::RelayAgentInfo(vec![1, 2, 3, 4])],
        );
        d.giaddr = Ipv4Addr::new(10, 0, 0, 254);
        let r = c.handle(&d, 0).reply.unwrap();
        assert_eq!(r.to, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 254), 67));
        assert_eq!(r.packet.giaddr, d.giaddr);
        assert_eq!(
            r.packet.options.get(82),
            Some(&DhcpOption::RelayAgentInfo(vec![1, 2, 3, 4]))
        );
    }

    #[test]
    fn other_server_selected_withdraws_offer() {
        let mut c = core(1);
        let ip = c
            .handle(&msg(1, MessageType::Discover, vec![]), 0)
            .reply
            .unwrap()
            .packet
            .yiaddr;
        let out = c.handle(
            &msg(
                1,
                MessageType::Request,
                vec![
                    DhcpOption::ServerId(Ipv4Addr::new(10, 0, 0, 2)),
                    DhcpOption::RequestedIp(ip),
                ],
            ),
            1,
        );
        assert!(out.reply.is_none());
        assert_eq!(dora(&mut c, 2, 2), Some(ip));
    }

    #[test]
    fn pxe_and_ipxe_boot_answers() {
        let mut c = core(4);
        let pxe = msg(
            1,
            MessageType::Discover,
            vec![
                DhcpOption::VendorClass(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
                DhcpOption::ClientArch(vec![0]),
            ],
        );
        let r = c.handle(&pxe, 0).reply.unwrap().packet;
        assert_eq!(r.file, b"undionly.kpxe");
        assert_eq!(r.siaddr, SERVER);
        let mut ipxe = pxe.clone();
        ipxe.options.set(DhcpOption::UserClass(b"iPXE".to_vec()));
        let out = c.handle(&ipxe, 0);
        let reply = out.reply.unwrap().packet;
        assert_eq!(reply.file, b"http://10.0.0.1:8080/boot/ipxe");
        assert_eq!(
            reply.options.get(wire::dhcp::code::IPXE_ENCAP),
            Some(&DhcpOption::Other {
                code: 175,
                data: IPXE_NO_PXEDHCP.to_vec()
            }),
            "iPXE is told not to wait for proxyDHCP"
        );
        assert!(
            r.options.get(wire::dhcp::code::IPXE_ENCAP).is_none(),
            "only for iPXE"
        );
        assert_eq!(out.discovered.unwrap().user_class.as_deref(), Some("iPXE"));
    }

    #[test]
    fn ignore_policy_reports_but_does_not_answer() {
        let mut c = core(4);
        c.boot.unknown_policy = UnknownPolicy::Ignore;
        let out = c.handle(&msg(1, MessageType::Discover, vec![]), 0);
        assert!(out.reply.is_none() && out.discovered.is_some());
        assert!(c
            .handle(&msg(0xaa, MessageType::Discover, vec![]), 0)
            .reply
            .is_some());
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Discover(u8),
        Select(u8),
        InitReboot(u8, u8),
        Renew(u8),
        Release(u8),
        Decline(u8),
        Tick(u16),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        let mac = prop_oneof![0u8..8, Just(0xaa)];
        prop_oneof![
            mac.clone().prop_map(Ev::Discover),
            mac.clone().prop_map(Ev::Select),
            (mac.clone(), 90u8..110).prop_map(|(m, o)| Ev::InitReboot(m, o)),
            mac.clone().prop_map(Ev::Renew),
            mac.clone().prop_map(Ev::Release),
            mac.prop_map(Ev::Decline),
            any::<u16>().prop_map(Ev::Tick),
        ]
    }

    proptest! {
        /// Whatever clients do: no address is live-bound to two clients, every ACK hands out an
        /// address of the pool or the client's own reservation, reserved addresses go to their
        /// owner only, and the persisted changes replayed from empty give the same table.
        #[test]
        fn lease_invariants(evs in proptest::collection::vec(ev(), 1..80)) {
            let mut c = core(4);
            let mut now = 0u64;
            let mut held: HashMap<u8, Ipv4Addr> = HashMap::new();
            let mut offered: HashMap<u8, Ipv4Addr> = HashMap::new();
            let mut persisted: Vec<LeaseChange> = Vec::new();
            for e in evs {
                let out = match e {
                    Ev::Tick(s) => { now += u64::from(s); persisted.extend(c.sweep(now)); continue; }
                    Ev::Discover(m) => {
                        let out = c.handle(&msg(m, MessageType::Discover, vec![]), now);
                        if let Some(r) = &out.reply { offered.insert(m, r.packet.yiaddr); }
                        out
                    }
                    Ev::Select(m) => {
                        let ip = offered.get(&m).copied().unwrap_or(Ipv4Addr::new(10, 0, 0, 101));
                        c.handle(&msg(m, MessageType::Request, vec![DhcpOption::ServerId(SERVER), DhcpOption::RequestedIp(ip)]), now)
                    }
                    Ev::InitReboot(m, o) => c.handle(&msg(m, MessageType::Request, vec![DhcpOption::RequestedIp(Ipv4Addr::new(10, 0, 0, o))]), now),
                    Ev::Renew(m) => {
                        let mut r = msg(m, MessageType::Request, vec![]);
                        r.ciaddr = held.get(&m).copied().unwrap_or(Ipv4Addr::new(10, 0, 0, 100));
                        c.handle(&r, now)
                    }
                    Ev::Release(m) => {
                        let mut r = msg(m, MessageType::Release, vec![]);
                        r.ciaddr = held.get(&m).copied().unwrap_or(Ipv4Addr::new(10, 0, 0, 100));
                        c.handle(&r, now)
                    }
                    Ev::Decline(m) => {
                        let ip = held.get(&m).copied().unwrap_or(Ipv4Addr::new(10, 0, 0, 100));
                        c.handle(&msg(m, MessageType::Decline, vec![DhcpOption::RequestedIp(ip)]), now)
                    }
                };
                persisted.extend(out.changes.iter().cloned());
                if let Some(r) = out.reply {
                    if r.packet.options.message_type() == Some(MessageType::Ack) {
                        let m = r.packet.chaddr[5];
                        let ip = r.packet.yiaddr;
                        if m == 0xaa {
                            prop_assert_eq!(ip, Ipv4Addr::new(10, 0, 0, 50));
                        } else {
                            prop_assert!((100..=103).contains(&ip.octets()[3]), "ACK outside pool: {}", ip);
                        }
                        held.insert(m, ip);
                    }
                }
                // No two live bindings share an address (by construction of by_ip) and each
                // MAC has at most one live binding.
                let live: Vec<_> = c.leases().leases().filter(|l| l.state == LeaseState::Bound && l.expires > now).collect();
                let mut macs = HashSet::new();
                for l in &live {
                    prop_assert!(macs.insert(l.mac), "two live leases for {}", l.mac);
                    if l.ip == Ipv4Addr::new(10, 0, 0, 50) { prop_assert_eq!(l.mac, MacAddr([2, 0, 0, 0, 0, 0xaa])); }
                }
            }
            // Replaying persisted changes reproduces the table's records.
            let mut replay: std::collections::BTreeMap<Ipv4Addr, super::super::lease::Lease> = Default::default();
            for ch in persisted {
                match ch {
                    LeaseChange::Upsert(l) => { replay.insert(l.ip, l); }
                    LeaseChange::Delete(ip) => { replay.remove(&ip); }
                }
            }
            let table: Vec<_> = c.leases().leases().cloned().collect();
            let replayed: Vec<_> = replay.into_values().collect();
            prop_assert_eq!(table, replayed);
        }
    }
}
