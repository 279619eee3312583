//! DHCPv4 packet codec: the BOOTP frame (RFC 951 / RFC 2131 §2), options (RFC 2132), long
//! options split and concatenated (RFC 3396), option overload into `file`/`sname` (RFC 2132
//! §9.3), and the PXE options (RFC 4578: client architecture 93, network interface 94, machine
//! id 97).
//!
//! Shared by the server's DHCP and proxyDHCP services and by node-init's DHCP client.
//! [`DhcpPacket::parse`] validates a datagram once, at the edge, into typed values: every length
//! byte is checked against the bytes that remain, known options are checked for their
//! RFC-given lengths, and instances of one option code are concatenated (RFC 3396), so each
//! code appears at most once in [`Options`]. [`DhcpPacket::to_bytes`] writes options in the
//! `options` field only (never overloads), splitting values longer than 255 bytes, and pads
//! the datagram to the 300 bytes BOOTP relays and old clients expect.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::fmt;
use std::net::Ipv4Addr;

/// DHCP magic cookie (RFC 2131 §3).
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Length of the fixed BOOTP header, before the magic cookie.
pub const HEADER_LEN: usize = 236;
/// Smallest datagram a BOOTP/DHCP participant must accept; replies are padded to it.
pub const MIN_PACKET_LEN: usize = 300;
/// Largest DHCP datagram we accept (the largest IPv4 UDP payload).
pub const MAX_PACKET_LEN: usize = 65_507;
/// Length of the `sname` field.
pub const SNAME_LEN: usize = 64;
/// Length of the `file` field.
pub const FILE_LEN: usize = 128;

/// Why a datagram is not a DHCP packet we can work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    /// Shorter than the fixed header plus the magic cookie.
    #[error("packet of {len} bytes is shorter than a DHCP header (240 bytes)")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Longer than any UDP payload.
    #[error("packet of {len} bytes is longer than any UDP payload")]
    TooLong {
        /// Datagram length.
        len: usize,
    },
    /// `op` is neither BOOTREQUEST nor BOOTREPLY.
    #[error("bad op {op}")]
    BadOp {
        /// The `op` byte.
        op: u8,
    },
    /// `hlen` exceeds the 16-byte `chaddr` field.
    #[error("hardware address length {hlen} exceeds 16")]
    BadHlen {
        /// The `hlen` byte.
        hlen: u8,
    },
    /// The magic cookie is missing: a plain BOOTP packet.
    #[error("no DHCP magic cookie (plain BOOTP is not supported)")]
    NoMagicCookie,
    /// An option's length byte runs past the end of its field.
    #[error("option {code} at offset {offset} claims {len} bytes but only {available} remain")]
    OptionOverrun {
        /// Option code.
        code: u8,
        /// Offset of the option in its field.
        offset: usize,
        /// Claimed length.
        len: usize,
        /// Bytes left in the field.
        available: usize,
    },
    /// A field of options ends without its length byte.
    #[error("option {code} is truncated before its length byte")]
    OptionTruncated {
        /// Option code.
        code: u8,
    },
    /// A known option has a length its RFC does not allow.
    #[error("option {code} has invalid length {len}")]
    BadOptionLength {
        /// Option code.
        code: u8,
        /// Its length after concatenation.
        len: usize,
    },
    /// Option 52 (overload) has a value other than 1, 2 or 3.
    #[error("option overload value {value} is not 1, 2 or 3")]
    BadOverload {
        /// The value.
        value: u8,
    },
    /// Option 52 appears inside an overloaded field.
    #[error("option overload inside an overloaded field")]
    NestedOverload,
}

/// `op` field: who sent the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Client to server.
    BootRequest,
    /// Server to client.
    BootReply,
}

/// DHCP message type (option 53; RFC 2132 §9.6, RFC 4388 for 10-13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// DHCPDISCOVER (1).
    Discover,
    /// DHCPOFFER (2).
    Offer,
    /// DHCPREQUEST (3).
    Request,
    /// DHCPDECLINE (4).
    Decline,
    /// DHCPACK (5).
    Ack,
    /// DHCPNAK (6).
    Nak,
    /// DHCPRELEASE (7).
    Release,
    /// DHCPINFORM (8).
    Inform,
    /// Any other value (lease query and future types), kept for round trips.
    Other(u8),
}

impl MessageType {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
            Self::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            v => Self::Other(v),
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Discover => f.write_str("DISCOVER"),
            Self::Offer => f.write_str("OFFER"),
            Self::Request => f.write_str("REQUEST"),
            Self::Decline => f.write_str("DECLINE"),
            Self::Ack => f.write_str("ACK"),
            Self::Nak => f.write_str("NAK"),
            Self::Release => f.write_str("RELEASE"),
            Self::Inform => f.write_str("INFORM"),
            Self::Other(v) => write!(f, "type-{v}"),
        }
    }
}

/// Option codes this module gives a typed form.
pub mod code {
    /// Pad.
    pub const PAD: u8 = 0;
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Routers.
    pub const ROUTER: u8 = 3;
    /// DNS servers.
    pub const DNS: u8 = 6;
    /// Host name.
    pub const HOST_NAME: u8 = 12;
    /// Domain name.
    pub const DOMAIN_NAME: u8 = 15;
    /// Broadcast address.
    pub const BROADCAST: u8 = 28;
    /// Vendor-specific information (PXE uses it for its sub-options).
    pub const VENDOR_SPECIFIC: u8 = 43;
    /// Requested IP address.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time.
    pub const LEASE_TIME: u8 = 51;
    /// Option overload.
    pub const OVERLOAD: u8 = 52;
    /// DHCP message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Parameter request list.
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    /// Message (error text).
    pub const MESSAGE: u8 = 56;
    /// Maximum DHCP message size.
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    /// Renewal (T1) time.
    pub const RENEWAL_TIME: u8 = 58;
    /// Rebinding (T2) time.
    pub const REBINDING_TIME: u8 = 59;
    /// Vendor class identifier.
    pub const VENDOR_CLASS: u8 = 60;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// TFTP server name.
    pub const TFTP_SERVER: u8 = 66;
    /// Boot file name.
    pub const BOOTFILE: u8 = 67;
    /// User class.
    pub const USER_CLASS: u8 = 77;
    /// Relay agent information.
    pub const RELAY_AGENT_INFO: u8 = 82;
    /// Client system architecture (RFC 4578).
    pub const CLIENT_ARCH: u8 = 93;
    /// Client network device interface (RFC 4578).
    pub const CLIENT_NDI: u8 = 94;
    /// Client machine identifier (RFC 4578).
    pub const CLIENT_UUID: u8 = 97;
    /// iPXE's encapsulated options (a client sending it is iPXE).
    pub const IPXE_ENCAP: u8 = 175;
    /// End.
    pub const END: u8 = 255;
}

/// One DHCP option, typed where Strata uses it, raw otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpOption {
    /// 1: subnet mask.
    SubnetMask(Ipv4Addr),
    /// 3: routers (at least one).
    Router(Vec<Ipv4Addr>),
    /// 6: DNS servers (at least one).
    DnsServers(Vec<Ipv4Addr>),
    /// 12: host name.
    HostName(Vec<u8>),
    /// 15: domain name.
    DomainName(Vec<u8>),
    /// 28: broadcast address.
    BroadcastAddr(Ipv4Addr),
    /// 43: vendor-specific information (opaque; PXE sub-options).
    VendorSpecific(Vec<u8>),
    /// 50: requested IP address.
    RequestedIp(Ipv4Addr),
    /// 51: lease time in seconds.
    LeaseTime(u32),
    /// 53: message type.
    MessageType(MessageType),
    /// 54: server identifier.
    ServerId(Ipv4Addr),
    /// 55: parameter request list.
    ParameterRequestList(Vec<u8>),
    /// 56: message (error text).
    Message(Vec<u8>),
    /// 57: maximum message size the client accepts.
    MaxMessageSize(u16),
    /// 58: renewal (T1) time in seconds.
    RenewalTime(u32),
    /// 59: rebinding (T2) time in seconds.
    RebindingTime(u32),
    /// 60: vendor class identifier ("PXEClient:Arch:00000:...", "HTTPClient:...").
    VendorClass(Vec<u8>),
    /// 61: client identifier.
    ClientId(Vec<u8>),
    /// 66: TFTP server name.
    TftpServerName(Vec<u8>),
    /// 67: boot file name.
    BootfileName(Vec<u8>),
    /// 77: user class (raw: iPXE sends the bare string "iPXE", not RFC 3004's list form).
    UserClass(Vec<u8>),
    /// 82: relay agent information (opaque, echoed back to relays).
    RelayAgentInfo(Vec<u8>),
    /// 93: client system architectures (RFC 4578 §2.1), at least one.
    ClientArch(Vec<u16>),
    /// 94: client network device interface (type, major, minor).
    ClientNdi([u8; 3]),
    /// 97: client machine identifier (type byte then, for type 0, a 16-byte UUID).
    ClientUuid(Vec<u8>),
    /// Any other option.
    Other {
        /// Code, never one of the typed codes, PAD, END or OVERLOAD.
        code: u8,
        /// Value.
        data: Vec<u8>,
    },
}

/// Codes with a typed [`DhcpOption`] variant, plus the structural ones (PAD, OVERLOAD, END),
/// which may not appear as [`DhcpOption::Other`].
pub fn is_reserved_code(c: u8) -> bool {
    matches!(
        c,
        code::PAD
            | code::SUBNET_MASK
            | code::ROUTER
            | code::DNS
            | code::HOST_NAME
            | code::DOMAIN_NAME
            | code::BROADCAST
            | code::VENDOR_SPECIFIC
            | code::REQUESTED_IP
            | code::LEASE_TIME
            | code::OVERLOAD
            | code::MESSAGE_TYPE
            | code::SERVER_ID
            | code::PARAMETER_REQUEST_LIST
            | code::MESSAGE
            | code::MAX_MESSAGE_SIZE
            | code::RENEWAL_TIME
            | code::REBINDING_TIME
            | code::VENDOR_CLASS
            | code::CLIENT_ID
            | code::TFTP_SERVER
            | code::BOOTFILE
            | code::USER_CLASS
            | code::RELAY_AGENT_INFO
            | code::CLIENT_ARCH
            | code::CLIENT_NDI
            | code::CLIENT_UUID
            | code::END
    )
}

fn ipv4(b: &[u8]) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

fn ipv4_list(b: &[u8]) -> Option<Vec<Ipv4Addr>> {
    if b.is_empty() || !b.chunks_exact(4).remainder().is_empty() {
        return None;
    }
    Some(b.chunks_exact(4).filter_map(ipv4).collect())
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

impl DhcpOption {
    /// The option code.
    pub fn code(&self) -> u8 {
        match self {
            Self::SubnetMask(_) => code::SUBNET_MASK,
            Self::Router(_) => code::ROUTER,
            Self::DnsServers(_) => code::DNS,
            Self::HostName(_) => code::HOST_NAME,
            Self::DomainName(_) => code::DOMAIN_NAME,
            Self::BroadcastAddr(_) => code::BROADCAST,
            Self::VendorSpecific(_) => code::VENDOR_SPECIFIC,
            Self::RequestedIp(_) => code::REQUESTED_IP,
            Self::LeaseTime(_) => code::LEASE_TIME,
            Self::MessageType(_) => code::MESSAGE_TYPE,
            Self::ServerId(_) => code::SERVER_ID,
            Self::ParameterRequestList(_) => code::PARAMETER_REQUEST_LIST,
            Self::Message(_) => code::MESSAGE,
            Self::MaxMessageSize(_) => code::MAX_MESSAGE_SIZE,
            Self::RenewalTime(_) => code::RENEWAL_TIME,
            Self::RebindingTime(_) => code::REBINDING_TIME,
            Self::VendorClass(_) => code::VENDOR_CLASS,
            Self::ClientId(_) => code::CLIENT_ID,
            Self::TftpServerName(_) => code::TFTP_SERVER,
            Self::BootfileName(_) => code::BOOTFILE,
            Self::UserClass(_) => code::USER_CLASS,
            Self::RelayAgentInfo(_) => code::RELAY_AGENT_INFO,
            Self::ClientArch(_) => code::CLIENT_ARCH,
            Self::ClientNdi(_) => code::CLIENT_NDI,
            Self::ClientUuid(_) => code::CLIENT_UUID,
            Self::Other { code, .. } => *code,
        }
    }

    /// Decodes the (already concatenated) value of option `code`.
    pub fn decode(c: u8, v: &[u8]) -> Result<Self, DhcpError> {
        let bad = || DhcpError::BadOptionLength {
            code: c,
            len: v.len(),
        };
        let bytes = || v.to_vec();
        Ok(match c {
            code::SUBNET_MASK => Self::SubnetMask(ipv4(v).ok_or_else(bad)?),
            code::ROUTER => Self::Router(ipv4_list(v).ok_or_else(bad)?),
            code::DNS => Self::DnsServers(ipv4_list(v).ok_or_else(bad)?),
            code::HOST_NAME => Self::HostName(bytes()),
            code::DOMAIN_NAME => Self::DomainName(bytes()),
            code::BROADCAST => Self::BroadcastAddr(ipv4(v).ok_or_else(bad)?),
            code::VENDOR_SPECIFIC => Self::VendorSpecific(bytes()),
            code::REQUESTED_IP => Self::RequestedIp(ipv4(v).ok_or_else(bad)?),
            code::LEASE_TIME => Self::LeaseTime(be_u32(v).ok_or_else(bad)?),
            code::MESSAGE_TYPE => match v {
                [t] => Self::MessageType(MessageType::from_u8(*t)),
                _ => return Err(bad()),
            },
            code::SERVER_ID => Self::ServerId(ipv4(v).ok_or_else(bad)?),
            code::PARAMETER_REQUEST_LIST => Self::ParameterRequestList(bytes()),
            code::MESSAGE => Self::Message(bytes()),
            code::MAX_MESSAGE_SIZE => match v {
                [a, b] => Self::MaxMessageSize(u16::from_be_bytes([*a, *b])),
                _ => return Err(bad()),
            },
            code::RENEWAL_TIME => Self::RenewalTime(be_u32(v).ok_or_else(bad)?),
            code::REBINDING_TIME => Self::RebindingTime(be_u32(v).ok_or_else(bad)?),
            code::VENDOR_CLASS => Self::VendorClass(bytes()),
            code::CLIENT_ID => Self::ClientId(bytes()),
            code::TFTP_SERVER => Self::TftpServerName(bytes()),
            code::BOOTFILE => Self::BootfileName(bytes()),
            code::USER_CLASS => Self::UserClass(bytes()),
            code::RELAY_AGENT_INFO => Self::RelayAgentInfo(bytes()),
            code::CLIENT_ARCH => {
                if v.is_empty() || !v.chunks_exact(2).remainder().is_empty() {
                    return Err(bad());
                }
                Self::ClientArch(
                    v.chunks_exact(2)
                        .filter_map(|p| p.try_into().ok().map(u16::from_be_bytes))
                        .collect(),
                )
            }
            code::CLIENT_NDI => Self::ClientNdi(v.try_into().map_err(|_| bad())?),
            code::CLIENT_UUID => Self::ClientUuid(bytes()),
            c => Self::Other {
                code: c,
                data: bytes(),
            },
        })
    }

    /// Appends the value bytes (without code and length).
    fn encode_value(&self, out: &mut Vec<u8>) {
        match self {
            Self::SubnetMask(a)
            | Self::BroadcastAddr(a)
            | Self::RequestedIp(a)
            | Self::ServerId(a) => out.extend_from_slice(&a.octets()),
            Self::Router(l) | Self::DnsServers(l) => {
                l.iter().for_each(|a| out.extend_from_slice(&a.octets()))
            }
            Self::LeaseTime(t) | Self::RenewalTime(t) | Self::RebindingTime(t) => {
                out.extend_from_slice(&t.to_be_bytes())
            }
            Self::MessageType(t) => out.push(t.to_u8()),
            Self::MaxMessageSize(s) => out.extend_from_slice(&s.to_be_bytes()),
            Self::ClientArch(l) => l
                .iter()
                .for_each(|a| out.extend_from_slice(&a.to_be_bytes())),
            Self::ClientNdi(b) => out.extend_from_slice(b),
            Self::HostName(b)
            | Self::DomainName(b)
            | Self::VendorSpecific(b)
            | Self::ParameterRequestList(b)
            | Self::Message(b)
            | Self::VendorClass(b)
            | Self::ClientId(b)
            | Self::TftpServerName(b)
            | Self::BootfileName(b)
            | Self::UserClass(b)
            | Self::RelayAgentInfo(b)
            | Self::ClientUuid(b)
            | Self::Other { data: b, .. } => out.extend_from_slice(b),
        }
    }

    /// Appends code, length and value, splitting values over 255 bytes into several
    /// instances (RFC 3396). An empty value is written as one zero-length instance.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut value = Vec::new();
        self.encode_value(&mut value);
        let code = self.code();
        if value.is_empty() {
            out.extend_from_slice(&[code, 0]);
            return;
        }
        for chunk in value.chunks(255) {
            out.push(code);
            // chunks(255) yields at most 255 bytes.
            out.push(u8::try_from(chunk.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(chunk);
        }
    }
}

/// The options of a packet: at most one entry per code, in first-seen order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(Vec<DhcpOption>);

impl Options {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an option, replacing any previous one with the same code (keeping its position).
    pub fn set(&mut self, opt: DhcpOption) {
        let c = opt.code();
        match self.0.iter_mut().find(|o| o.code() == c) {
            Some(slot) => *slot = opt,
            None => self.0.push(opt),
        }
    }

    /// Removes the option with this code.
    pub fn remove(&mut self, c: u8) -> Option<DhcpOption> {
        let i = self.0.iter().position(|o| o.code() == c)?;
        Some(self.0.remove(i))
    }

    /// The option with this code.
    pub fn get(&self, c: u8) -> Option<&DhcpOption> {
        self.0.iter().find(|o| o.code() == c)
    }

    /// All options in order.
    pub fn iter(&self) -> impl Iterator<Item = &DhcpOption> {
        self.0.iter()
    }

    /// Number of options.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no options.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Option 53.
    pub fn message_type(&self) -> Option<MessageType> {
        match self.get(code::MESSAGE_TYPE)? {
            DhcpOption::MessageType(t) => Some(*t),
            _ => None,
        }
    }

    /// Option 50.
    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        match self.get(code::REQUESTED_IP)? {
            DhcpOption::RequestedIp(a) => Some(*a),
            _ => None,
        }
    }

    /// Option 54.
    pub fn server_id(&self) -> Option<Ipv4Addr> {
        match self.get(code::SERVER_ID)? {
            DhcpOption::ServerId(a) => Some(*a),
            _ => None,
        }
    }

    /// Option 51.
    pub fn lease_time(&self) -> Option<u32> {
        match self.get(code::LEASE_TIME)? {
            DhcpOption::LeaseTime(t) => Some(*t),
            _ => None,
        }
    }

    /// Option 60.
    pub fn vendor_class(&self) -> Option<&[u8]> {
        match self.get(code::VENDOR_CLASS)? {
            DhcpOption::VendorClass(v) => Some(v),
            _ => None,
        }
    }

    /// Option 77.
    pub fn user_class(&self) -> Option<&[u8]> {
        match self.get(code::USER_CLASS)? {
            DhcpOption::UserClass(v) => Some(v),
            _ => None,
        }
    }

    /// Option 93: the first (preferred) architecture.
    pub fn client_arch(&self) -> Option<u16> {
        match self.get(code::CLIENT_ARCH)? {
            DhcpOption::ClientArch(v) => v.first().copied(),
            _ => None,
        }
    }

    /// Option 57.
    pub fn max_message_size(&self) -> Option<u16> {
        match self.get(code::MAX_MESSAGE_SIZE)? {
            DhcpOption::MaxMessageSize(s) => Some(*s),
            _ => None,
        }
    }

    /// Option 61.
    pub fn client_id(&self) -> Option<&[u8]> {
        match self.get(code::CLIENT_ID)? {
            DhcpOption::ClientId(v) => Some(v),
            _ => None,
        }
    }

    /// Option 55.
    pub fn parameter_request_list(&self) -> Option<&[u8]> {
        match self.get(code::PARAMETER_REQUEST_LIST)? {
            DhcpOption::ParameterRequestList(v) => Some(v),
            _ => None,
        }
    }

    /// Option 12.
    pub fn host_name(&self) -> Option<&[u8]> {
        match self.get(code::HOST_NAME)? {
            DhcpOption::HostName(v) => Some(v),
            _ => None,
        }
    }
}

impl FromIterator<DhcpOption> for Options {
    fn from_iter<I: IntoIterator<Item = DhcpOption>>(iter: I) -> Self {
        let mut o = Options::new();
        for opt in iter {
            o.set(opt);
        }
        o
    }
}

/// A hardware (MAC) address, printed `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Error parsing a MAC address string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (expected six hex bytes separated by ':' or '-')")]
pub struct ParseMacError(pub String);

impl std::str::FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for b in &mut out {
            let p = parts.next().ok_or_else(err)?;
            // Two hex digits exactly: `from_str_radix` alone would also take a sign ("+f").
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// A DHCP packet (RFC 2131 §2, Figure 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpPacket {
    /// BOOTREQUEST or BOOTREPLY.
    pub op: Op,
    /// Hardware type (1 = Ethernet).
    pub htype: u8,
    /// Hardware address length, at most 16.
    pub hlen: u8,
    /// Relay hops.
    pub hops: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags; bit 15 is the broadcast flag.
    pub flags: u16,
    /// Client address (when the client has one).
    pub ciaddr: Ipv4Addr,
    /// "Your" address, offered or assigned.
    pub yiaddr: Ipv4Addr,
    /// Next server (TFTP) address.
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address (the first `hlen` bytes are meaningful).
    pub chaddr: [u8; 16],
    /// Server host name, up to the first NUL (at most 64 bytes). Empty when overloaded.
    pub sname: Vec<u8>,
    /// Boot file name, up to the first NUL (at most 128 bytes). Empty when overloaded.
    pub file: Vec<u8>,
    /// Options, concatenated per code.
    pub options: Options,
}

/// The broadcast bit of `flags` (RFC 2131 §2).
pub const FLAG_BROADCAST: u16 = 0x8000;

fn get<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

fn cstr(field: &[u8]) -> Vec<u8> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field.get(..end).unwrap_or_default().to_vec()
}

/// Walks one options field, appending (code, value) pairs; returns the overload value seen.
fn scan_options<'a>(
    field: &'a [u8],
    raw: &mut Vec<(u8, Vec<u8>)>,
    allow_overload: bool,
) -> Result<Option<u8>, DhcpError> {
    let mut overload = None;
    let mut i = 0usize;
    while let Some(&c) = field.get(i) {
        match c {
            code::PAD => {
                i += 1;
                continue;
            }
            code::END => break,
            _ => {}
        }
        let len = usize::from(
            *field
                .get(i + 1)
                .ok_or(DhcpError::OptionTruncated { code: c })?,
        );
        let start = i + 2;
        let value: &'a [u8] = field
            .get(start..start + len)
            .ok_or(DhcpError::OptionOverrun {
                code: c,
                offset: i,
                len,
                available: field.len().saturating_sub(start),
            })?;
        if c == code::OVERLOAD {
            if !allow_overload {
                return Err(DhcpError::NestedOverload);
            }
            match value {
                [v @ 1..=3] => overload = Some(*v),
                [v] => return Err(DhcpError::BadOverload { value: *v }),
                _ => return Err(DhcpError::BadOptionLength { code: c, len }),
            }
        } else {
            match raw.iter_mut().find(|(rc, _)| *rc == c) {
                Some((_, existing)) => existing.extend_from_slice(value),
                None => raw.push((c, value.to_vec())),
            }
        }
        i = start + len;
    }
    Ok(overload)
}

impl DhcpPacket {
    /// Parses and validates a datagram.
    pub fn parse(b: &[u8]) -> Result<Self, DhcpError> {
        if b.len() < HEADER_LEN + 4 {
            return Err(DhcpError::TooShort { len: b.len() });
        }
        if b.len() > MAX_PACKET_LEN {
            return Err(DhcpError::TooLong { len: b.len() });
        }
        let [op, htype, hlen, hops] = get::<4>(b, 0);
        let op = match op {
            1 => Op::BootRequest,
            2 => Op::BootReply,
            op => return Err(DhcpError::BadOp { op }),
        };
        if hlen > 16 {
            return Err(DhcpError::BadHlen { hlen });
        }
        if get::<4>(b, HEADER_LEN) != MAGIC_COOKIE {
            return Err(DhcpError::NoMagicCookie);
        }
        let sname_field = b.get(44..44 + SNAME_LEN).unwrap_or_default();
        let file_field = b.get(108..108 + FILE_LEN).unwrap_or_default();
        let opts_field = b.get(HEADER_LEN + 4..).unwrap_or_default();

        // RFC 3396 §5: options field, then file, then sname, concatenated per code.
        let mut raw = Vec::new();
        let overload = scan_options(opts_field, &mut raw, true)?;
        let (mut sname, mut file) = (cstr(sname_field), cstr(file_field));
        if let Some(ov) = overload {
            if ov & 1 != 0 {
                scan_options(file_field, &mut raw, false)?;
                file.clear();
            }
            if ov & 2 != 0 {
                scan_options(sname_field, &mut raw, false)?;
                sname.clear();
            }
        }
        let options = raw
            .iter()
            .map(|(c, v)| DhcpOption::decode(*c, v))
            .collect::<Result<Options, _>>()?;

        Ok(DhcpPacket {
            op,
            htype,
            hlen,
            hops,
            xid: u32::from_be_bytes(get(b, 4)),
            secs: u16::from_be_bytes(get(b, 8)),
            flags: u16::from_be_bytes(get(b, 10)),
            ciaddr: Ipv4Addr::from(get::<4>(b, 12)),
            yiaddr: Ipv4Addr::from(get::<4>(b, 16)),
            siaddr: Ipv4Addr::from(get::<4>(b, 20)),
            giaddr: Ipv4Addr::from(get::<4>(b, 24)),
            chaddr: get(b, 28),
            sname,
            file,
            options,
        })
    }

    /// Serialises the packet. `sname` and `file` longer than their fields are truncated (a
    /// value with no room for the terminating NUL fills the field exactly).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MIN_PACKET_LEN + 64);
        out.push(match self.op {
            Op::BootRequest => 1,
            Op::BootReply => 2,
        });
        out.extend_from_slice(&[self.htype, self.hlen.min(16), self.hops]);
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&self.secs.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&a.octets());
        }
        out.extend_from_slice(&self.chaddr);
        let mut field = |v: &[u8], n: usize| {
            let take = v.len().min(n);
            out.extend_from_slice(v.get(..take).unwrap_or_default());
            out.resize(out.len() + (n - take), 0);
        };
        field(&self.sname, SNAME_LEN);
        field(&self.file, FILE_LEN);
        out.extend_from_slice(&MAGIC_COOKIE);
        for o in self.options.iter() {
            o.encode(&mut out);
        }
        out.push(code::END);
        if out.len() < MIN_PACKET_LEN {
            out.resize(MIN_PACKET_LEN, 0);
        }
        out
    }

    /// The client's MAC address, when the hardware is Ethernet-like (`hlen` 6).
    pub fn mac(&self) -> Option<MacAddr> {
        if self.hlen != 6 {
            return None;
        }
        Some(MacAddr(get(&self.chaddr, 0)))
    }

    /// True when the client asked for broadcast replies.
    pub fn broadcast(&self) -> bool {
        self.flags & FLAG_BROADCAST != 0
    }

    /// A reply skeleton for this request (RFC 2131 Table 3): same xid, flags, giaddr and
    /// chaddr, `op` BOOTREPLY, no options.
    pub fn reply_skeleton(&self) -> DhcpPacket {
        DhcpPacket {
            op: Op::BootReply,
            htype: self.htype,
            hlen: self.hlen,
            hops: 0,
            xid: self.xid,
            secs: 0,
            flags: self.flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: self.giaddr,
            chaddr: self.chaddr,
            sname: Vec::new(),
            file: Vec::new(),
            options: Options::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn option() -> impl Strategy<Value = DhcpOption> {
        prop_oneof![
            ip().prop_map(DhcpOption::SubnetMask),
            proptest::collection::vec(ip(), 1..5).prop_map(DhcpOption::Router),
            proptest::collection::vec(ip(), 1..70).prop_map(DhcpOption::DnsServers),
            bytes(300).prop_map(DhcpOption::HostName),
            ip().prop_map(DhcpOption::RequestedIp),
            any::<u32>().prop_map(DhcpOption::LeaseTime),
            any::<u8>().prop_map(|t| DhcpOption::MessageType(MessageType::from_u8(t))),
            ip().prop_map(DhcpOption::ServerId),
            bytes(40).prop_map(DhcpOption::ParameterRequestList),
            any::<u16>().prop_map(DhcpOption::MaxMessageSize),
            bytes(600).prop_map(DhcpOption::VendorClass),
            bytes(20).prop_map(DhcpOption::ClientId),
            bytes(20).prop_map(DhcpOption::UserClass),
            bytes(20).prop_map(DhcpOption::RelayAgentInfo),
            proptest::collection::vec(any::<u16>(), 1..4).prop_map(DhcpOption::ClientArch),
            any::<[u8; 3]>().prop_map(DhcpOption::ClientNdi),
            bytes(17).prop_map(DhcpOption::ClientUuid),
            (any::<u8>(), bytes(300))
                .prop_filter("typed code", |(c, _)| !is_reserved_code(*c))
                .prop_map(|(code, data)| DhcpOption::Other { code, data }),
        ]
    }

    fn nul_free(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 0..=max)
    }

    prop_compose! {
        fn packet()(
            op in prop_oneof![Just(Op::BootRequest), Just(Op::BootReply)],
            htype in any::<u8>(), hlen in 0u8..=16, hops in any::<u8>(),
            xid in any::<u32>(), secs in any::<u16>(), flags in any::<u16>(),
            ciaddr in ip(), yiaddr in ip(), siaddr in ip(), giaddr in ip(),
            chaddr in any::<[u8; 16]>(),
            sname in nul_free(SNAME_LEN), file in nul_free(FILE_LEN),
            options in proptest::collection::vec(option(), 0..12),
        ) -> DhcpPacket {
            DhcpPacket { op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr,
                giaddr, chaddr, sname, file, options: options.into_iter().collect() }
        }
    }

    proptest! {
        #[test]
        fn round_trip(p in packet()) {
            let bytes = p.to_bytes();
            prop_assert!(bytes.len() >= MIN_PACKET_LEN);
            prop_assert_eq!(DhcpPacket::parse(&bytes)?, p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in bytes(1500)) {
            let _ = DhcpPacket::parse(&b);
        }

        #[test]
        fn mutated_valid_packets_parse_or_error(p in packet(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut b = p.to_bytes();
            for (at, v) in flips {
                let n = b.len();
                b[at % n] = v;
            }
            if let Ok(q) = DhcpPacket::parse(&b) {
                // Whatever parses must serialise and parse to itself.
                prop_assert_eq!(DhcpPacket::parse(&q.to_bytes())?, q);
            }
        }
    }

    fn discover() -> DhcpPacket {
        let mut p = DhcpPacket {
            op: Op::BootRequest,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 0x1234_5678,
            secs: 0,
            flags: FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [
                0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            sname: vec![],
            file: vec![],
            options: Options::new(),
        };
        p.options
            .set(DhcpOption::MessageType(MessageType::Discover));
        p.options.set(DhcpOption::ClientArch(vec![7]));
        p.options.set(DhcpOption::VendorClass(
            b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
        ));
        p
    }

    #[test]
    fn typed_accessors() {
        let p = DhcpPacket::parse(&discover().to_bytes()).unwrap();
        assert_eq!(p.options.message_type(), Some(MessageType::Discover));
        assert_eq!(p.options.client_arch(), Some(7));
        assert_eq!(p.mac().unwrap().to_string(), "52:54:00:12:34:56");
        assert!(p.broadcast());
    }

    #[test]
    fn overload_reads_file_and_sname() {
        let mut b = discover().to_bytes();
        // Replace END after the options with overload=3 then END.
        let end = b.iter().rposition(|&x| x == code::END).unwrap();
        b.truncate(end);
        b.extend_from_slice(&[code::OVERLOAD, 1, 3, code::END]);
        // file field: host name "ab" split across file and sname (RFC 3396 concatenation).
        b[108..112].copy_from_slice(&[code::HOST_NAME, 2, b'a', b'b']);
        b[112] = code::END;
        b[44..49].copy_from_slice(&[code::HOST_NAME, 1, b'c', code::LEASE_TIME, 4]);
        b[49..53].copy_from_slice(&60u32.to_be_bytes());
        b[53] = code::END;
        let p = DhcpPacket::parse(&b).unwrap();
        assert_eq!(p.options.host_name(), Some(&b"abc"[..]));
        assert_eq!(p.options.lease_time(), Some(60));
        assert!(p.file.is_empty() && p.sname.is_empty());
    }

    #[test]
    fn long_option_splits_and_rejoins() {
        let mut p = discover();
        p.options.set(DhcpOption::VendorSpecific(vec![7; 600]));
        let b = p.to_bytes();
        assert!(
            b.windows(2)
                .filter(|w| w == &[code::VENDOR_SPECIFIC, 255])
                .count()
                >= 2
        );
        assert_eq!(DhcpPacket::parse(&b).unwrap(), p);
    }

    #[test]
    fn errors_name_the_fault() {
        let good = discover().to_bytes();
        assert_eq!(
            DhcpPacket::parse(&good[..200]),
            Err(DhcpError::TooShort { len: 200 })
        );

        let mut b = good.clone();
        b[0] = 9;
        assert_eq!(DhcpPacket::parse(&b), Err(DhcpError::BadOp { op: 9 }));

        let mut b = good.clone();
        b[2] = 17;
        assert_eq!(DhcpPacket::parse(&b), Err(DhcpError::BadHlen { hlen: 17 }));

        let mut b = good.clone();
        b[236] = 0;
        assert_eq!(DhcpPacket::parse(&b), Err(DhcpError::NoMagicCookie));

        // Option overflow: a length byte past the end of the datagram.
        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[code::HOST_NAME, 200, b'x']);
        assert!(matches!(
            DhcpPacket::parse(&b),
            Err(DhcpError::OptionOverrun {
                code: 12,
                len: 200,
                available: 1,
                ..
            })
        ));

        let mut b = good[..240].to_vec();
        b.push(code::HOST_NAME);
        assert_eq!(
            DhcpPacket::parse(&b),
            Err(DhcpError::OptionTruncated { code: 12 })
        );

        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[code::MESSAGE_TYPE, 2, 1, 1, code::END]);
        assert_eq!(
            DhcpPacket::parse(&b),
            Err(DhcpError::BadOptionLength { code: 53, len: 2 })
        );

        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[code::OVERLOAD, 1, 4, code::END]);
        assert_eq!(
            DhcpPacket::parse(&b),
            Err(DhcpError::BadOverload { value: 4 })
        );
    }

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "52-54-00-AB-cd-01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:01:02".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<MacAddr>().is_err());
    }
}
