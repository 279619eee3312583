//! Which boot file a client gets: classification by vendor class (option 60), user class
//! (option 77), iPXE's option 175 and the client architecture (option 93, RFC 4578 §2.1 and
//! the IANA "Processor Architecture Types" registry), and writing the answer into a reply.
//!
//! - iPXE (user class `iPXE` or option 175 present) gets the HTTP URL of its script, so a
//!   chainloaded iPXE does not fetch iPXE again (the classic PXE loop).
//! - UEFI HTTP boot clients (vendor class `HTTPClient…`) get an `http://` URL and option 60
//!   `HTTPClient`, which the UEFI HTTP boot driver requires in the answer.
//! - PXE ROMs (vendor class `PXEClient…`) get a TFTP file name, `siaddr` (next-server) and
//!   options 66/67.
//! - Anything else (an OS DHCP client) gets no boot information.

use std::net::Ipv4Addr;

use wire::dhcp::{code, DhcpOption, DhcpPacket, MacAddr};

use super::config::BootConfig;

/// RFC 4578 architecture types Strata knows.
pub mod arch {
    /// Intel x86PC (legacy BIOS).
    pub const BIOS: u16 = 0;
    /// EFI IA32.
    pub const EFI_IA32: u16 = 6;
    /// EFI BC (x86-64; what EDK2 sends).
    pub const EFI_BC: u16 = 7;
    /// EFI x86-64.
    pub const EFI_X64: u16 = 9;
    /// ARM 64-bit UEFI.
    pub const EFI_ARM64: u16 = 11;
    /// x86-64 UEFI HTTP boot.
    pub const EFI_X64_HTTP: u16 = 16;
    /// ARM 64-bit UEFI HTTP boot.
    pub const EFI_ARM64_HTTP: u16 = 19;
}

/// What kind of boot client sent a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// iPXE (any build: ROM or chainloaded).
    Ipxe,
    /// A UEFI HTTP boot client.
    UefiHttp,
    /// A PXE ROM.
    Pxe,
    /// Not a network boot client.
    Plain,
}

/// The boot-relevant facts of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Classification.
    pub kind: ClientKind,
    /// Option 93, or the `Arch:NNNNN` field of the vendor class.
    pub arch: Option<u16>,
    /// Option 60 (lossy UTF-8).
    pub vendor_class: Option<String>,
    /// Option 77 (lossy UTF-8).
    pub user_class: Option<String>,
}

/// Reads the `Arch:NNNNN` field of a PXE/HTTP vendor class.
fn arch_from_vendor_class(vc: &str) -> Option<u16> {
    let mut parts = vc.split(':');
    while let Some(p) = parts.next() {
        if p == "Arch" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// Classifies a request.
pub fn classify(pkt: &DhcpPacket) -> ClientInfo {
    let vendor_class = pkt
        .options
        .vendor_class()
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let user_class = pkt
        .options
        .user_class()
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let arch = pkt
        .options
        .client_arch()
        .or_else(|| vendor_class.as_deref().and_then(arch_from_vendor_class));
    // iPXE sends the bare string "iPXE"; an RFC 3004 list would be "\x04iPXE".
    let is_ipxe = user_class
        .as_deref()
        .is_some_and(|u| u == "iPXE" || u == "\u{4}iPXE")
        || pkt.options.get(code::IPXE_ENCAP).is_some();
    let vc = vendor_class.as_deref().unwrap_or("");
    let kind = if is_ipxe {
        ClientKind::Ipxe
    } else if vc.starts_with("HTTPClient") {
        ClientKind::UefiHttp
    } else if vc.starts_with("PXEClient") {
        ClientKind::Pxe
    } else {
        ClientKind::Plain
    };
    ClientInfo {
        kind,
        arch,
        vendor_class,
        user_class,
    }
}

/// The boot answer chosen for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootAnswer {
    /// No boot information (not a boot client, or policy says so).
    None,
    /// A file over TFTP from `server`.
    Tftp {
        /// TFTP server (`siaddr`, option 66).
        server: Ipv4Addr,
        /// File name (`file`, option 67).
        file: String,
    },
    /// An HTTP URL; `http_client` adds option 60 `HTTPClient` (UEFI HTTP boot).
    Http {
        /// The URL.
        url: String,
        /// The client is UEFI HTTP boot.
        http_client: bool,
    },
    /// A boot client whose architecture has no configured file.
    NoFileForArch {
        /// The architecture, if it sent one.
        arch: Option<u16>,
    },
}

/// Chooses the boot answer for a client.
pub fn select(cfg: &BootConfig, info: &ClientInfo, mac: Option<MacAddr>) -> BootAnswer {
    match info.kind {
        ClientKind::Plain => BootAnswer::None,
        ClientKind::Ipxe => {
            let mac = mac
                .map(|m| m.to_string().replace(':', "-"))
                .unwrap_or_default();
            BootAnswer::Http {
                url: cfg.ipxe_script_url.replace("{mac}", &mac),
                http_client: false,
            }
        }
        ClientKind::UefiHttp => {
            let url = match info.arch {
                Some(arch::EFI_ARM64_HTTP) => cfg.http_boot.arm64.clone(),
                // Unknown or absent: x86-64 is what OVMF sends (16).
                Some(arch::EFI_X64_HTTP) | None => cfg.http_boot.x64.clone(),
                Some(_) => None,
            };
            match url {
                Some(url) => BootAnswer::Http {
                    url,
                    http_client: true,
                },
                None => BootAnswer::NoFileForArch { arch: info.arch },
            }
        }
        ClientKind::Pxe => {
            let f = &cfg.tftp_files;
            let file = match info.arch {
                Some(arch::BIOS) | None => f.bios.clone(),
                Some(arch::EFI_BC | arch::EFI_X64) => f.uefi_x64.clone(),
                Some(arch::EFI_ARM64) => f.uefi_arm64.clone(),
                Some(_) => None,
            };
            match file {
                Some(file) => BootAnswer::Tftp {
                    server: cfg.tftp_server(),
                    file,
                },
                None => BootAnswer::NoFileForArch { arch: info.arch },
            }
        }
    }
}

/// Writes a boot answer into a reply: `siaddr`, `file`, options 66/67, and option 60 for
/// HTTP boot. A name longer than the 128-byte `file` field goes in option 67 only.
pub fn apply(answer: &BootAnswer, reply: &mut DhcpPacket) {
    let (name, http_client) = match answer {
        BootAnswer::None | BootAnswer::NoFileForArch { .. } => return,
        BootAnswer::Tftp { server, file } => {
            reply.siaddr = *server;
            reply
                .options
                .set(DhcpOption::TftpServerName(server.to_string().into_bytes()));
            (file.as_bytes(), false)
        }
        BootAnswer::Http { url, http_client } => (url.as_bytes(), *http_client),
    };
    if name.len() < wire::dhcp::FILE_LEN {
        reply.file = name.to_vec();
    }
    reply.options.set(DhcpOption::BootfileName(name.to_vec()));
    if http_client {
        reply
            .options
            .set(DhcpOption::VendorClass(b"HTTPClient".to_vec()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::dhcp::{MessageType, Op, Options};

    fn req(opts: Vec<DhcpOption>) -> DhcpPacket {
        let mut options = Options::new();
        options.set(DhcpOption::MessageType(MessageType::Discover));
        for o in opts {
            options.set(o);
        }
        DhcpPacket {
            op: Op::BootRequest,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid: 1,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0x52, 0x54, 0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sname: vec![],
            file: vec![],
            options,
        }
    }

    fn cfg() -> BootConfig {
        let mut c = BootConfig::new(
            Ipv4Addr::new(10, 0, 0, 1),
            "http://10.0.0.1:8080/boot/{mac}",
        );
        c.tftp_files.uefi_arm64 = Some("arm64.efi".into());
        c.http_boot.x64 = Some("http://10.0.0.1:8080/ipxe.efi".into());
        c
    }

    fn pxe(arch: u16) -> DhcpPacket {
        req(vec![
            DhcpOption::VendorClass(format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes()),
            DhcpOption::ClientArch(vec![arch]),
        ])
    }

    fn answer(p: &DhcpPacket) -> BootAnswer {
        select(&cfg(), &classify(p), p.mac())
    }

    fn tftp(file: &str) -> BootAnswer {
        BootAnswer::Tftp {
            server: Ipv4Addr::new(10, 0, 0, 1),
            file: file.into(),
        }
    }

    #[test]
    fn architectures_pick_files() {
        assert_eq!(answer(&pxe(0)), tftp("undionly.kpxe"));
        assert_eq!(answer(&pxe(7)), tftp("snponly.efi"));
        assert_eq!(answer(&pxe(9)), tftp("snponly.efi"));
        assert_eq!(answer(&pxe(11)), tftp("arm64.efi"));
        assert_eq!(answer(&pxe(6)), BootAnswer::NoFileForArch { arch: Some(6) });
    }

    #[test]
    fn arch_from_vendor_class_when_option_93_is_missing() {
        let p = req(vec![DhcpOption::VendorClass(
            b"PXEClient:Arch:00007:UNDI:003016".to_vec(),
        )]);
        assert_eq!(classify(&p).arch, Some(7));
        assert_eq!(answer(&p), tftp("snponly.efi"));
    }

    #[test]
    fn ipxe_gets_script_url_not_ipxe_again() {
        let mut p = pxe(0);
        p.options.set(DhcpOption::UserClass(b"iPXE".to_vec()));
        assert_eq!(
            answer(&p),
            BootAnswer::Http {
                url: "http://10.0.0.1:8080/boot/52-54-00-01-02-03".into(),
                http_client: false
            }
        );
        let mut p = pxe(7);
        p.options.set(DhcpOption::Other {
            code: code::IPXE_ENCAP,
            data: vec![1, 1, 1],
        });
        assert_eq!(classify(&p).kind, ClientKind::Ipxe);
    }

    #[test]
    fn uefi_http_gets_url_and_httpclient_class() {
        let p = req(vec![
            DhcpOption::VendorClass(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()),
            DhcpOption::ClientArch(vec![16]),
        ]);
        let a = answer(&p);
        assert_eq!(
            a,
            BootAnswer::Http {
                url: "http://10.0.0.1:8080/ipxe.efi".into(),
                http_client: true
            }
        );
        let mut reply = p.reply_skeleton();
        apply(&a, &mut reply);
        assert_eq!(reply.options.vendor_class(), Some(&b"HTTPClient"[..]));
        assert_eq!(reply.file, b"http://10.0.0.1:8080/ipxe.efi");
    }

    #[test]
    fn tftp_answer_sets_next_server_and_options() {
        let p = pxe(0);
        let mut reply = p.reply_skeleton();
        apply(&answer(&p), &mut reply);
        assert_eq!(reply.siaddr, Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(reply.file, b"undionly.kpxe");
        assert_eq!(
            reply.options.get(code::BOOTFILE),
            Some(&DhcpOption::BootfileName(b"undionly.kpxe".to_vec()))
        );
        assert_eq!(
            reply.options.get(code::TFTP_SERVER),
            Some(&DhcpOption::TftpServerName(b"10.0.0.1".to_vec()))
        );
    }

    #[test]
    fn plain_clients_get_nothing() {
        let p = req(vec![DhcpOption::VendorClass(b"udhcp 1.35.0".to_vec())]);
        assert_eq!(answer(&p), BootAnswer::None);
    }
}
