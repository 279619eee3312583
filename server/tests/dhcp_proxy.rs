//! proxyDHCP beside a site DHCP server: dnsmasq (addresses only) and the Strata proxy share a
//! bridge with a client. A plain client (busybox udhcpc) gets its address from dnsmasq and
//! nothing from the proxy; a PXE client (hand-made, speaking the PXE 2.1 flow) gets two
//! offers — an address from dnsmasq and boot information without an address from the proxy —
//! then its lease from dnsmasq and the boot file from the proxy on port 4011.

mod dhcp_lab;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dhcp_lab::{field, run, udhcpc_script, Netns};
use strata_server::boot::dhcp::{BootConfig, Discovered, ProxyDhcpServer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wire::dhcp::{DhcpOption, DhcpPacket, MessageType, Op, Options, FLAG_BROADCAST};

const PROXY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const SITE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const MAC: [u8; 6] = [0x02, 0x5e, 0, 0, 0, 0x33];

struct Lab {
    srv: Netns,
    site: Netns,
    cli: Netns,
    dir: tempfile::TempDir,
    _dnsmasq: tokio::process::Child,
    cancel: CancellationToken,
    discovered: mpsc::Receiver<Discovered>,
    task: tokio::task::JoinHandle<Result<(), strata_server::boot::dhcp::DhcpServerError>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn lab() -> Result<Lab> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("strata_server=debug")
        .with_test_writer()
        .try_init();
    dhcp_lab::require("dnsmasq", "dnsmasq-base")?;
    dhcp_lab::require("busybox", "busybox-static")?;
    let srv = Netns::new("px-s")?;
    let site = Netns::new("px-d")?;
    let cli = Netns::new("px-c")?;
    srv.ip(&["link", "add", "br0", "type", "bridge"])?;
    srv.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"])?;
    srv.ip(&["link", "set", "br0", "up"])?;
    for (ns, inner, outer) in [(&site, "site0", "p-site"), (&cli, "cli0", "p-cli")] {
        run(
            "ip",
            &[
                "link", "add", outer, "netns", &srv.name, "type", "veth", "peer", "name", inner,
                "netns", &ns.name,
            ],
        )?;
        srv.ip(&["link", "set", outer, "master", "br0", "up"])?;
        ns.ip(&["link", "set", inner, "up"])?;
    }
    site.ip(&["addr", "add", "10.77.0.2/24", "dev", "site0"])?;
    cli.ip(&["link", "set", "cli0", "address", "02:5e:00:00:00:33"])?;

    let dir = tempfile::tempdir()?;
    let dnsmasq = site
        .command("dnsmasq")
        .args([
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            "--user=root",
            "--no-ping",
            "--log-dhcp",
        ])
        .args([
            "--interface=site0",
            "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            dir.path().join("leases").display()
        ))
        .arg(format!("--pid-file={}", dir.path().join("pid").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("dnsmasq")?;

    let dhcp = srv.udp("0.0.0.0:67", Some("br0"))?;
    let pxe = srv.udp("0.0.0.0:4011", Some("br0"))?;
    let boot = BootConfig::new(PROXY, "http://10.77.0.1:8080/boot/ipxe");
    let (tx, discovered) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let task =
        tokio::spawn(ProxyDhcpServer::new(dhcp, pxe, boot, Some(tx)).run(cancel.child_token()));
    Ok(Lab {
        srv,
        site,
        cli,
        dir,
        _dnsmasq: dnsmasq,
        cancel,
        discovered,
        task,
    })
}

fn pxe_packet(t: MessageType, xid: u32, extra: Vec<DhcpOption>) -> DhcpPacket {
    let mut options = Options::new();
    options.set(DhcpOption::MessageType(t));
    options.set(DhcpOption::VendorClass(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    options.set(DhcpOption::ClientArch(vec![0]));
    options.set(DhcpOption::ClientNdi([1, 2, 1]));
    options.set(DhcpOption::ClientUuid(
        [0u8].iter().chain([7u8; 16].iter()).copied().collect(),
    ));
    options.set(DhcpOption::ParameterRequestList(vec![
        1, 3, 6, 43, 60, 66, 67, 97,
    ]));
    for o in extra {
        options.set(o);
    }
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&MAC);
    DhcpPacket {
        op: Op::BootRequest,
        htype: 1,
        hlen: 6,
        hops: 0,
        xid,
        secs: 0,
        flags: FLAG_BROADCAST,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr,
        sname: vec![],
        file: vec![],
        options,
    }
}

/// Receives replies for `xid` until `pred` has seen what it wants.
async fn collect(
    sock: &tokio::net::UdpSocket,
    xid: u32,
    mut want: impl FnMut(&DhcpPacket) -> bool,
) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, _) = sock.recv_from(&mut buf).await?;
        let Ok(p) = DhcpPacket::parse(&buf[..n]) else {
            continue;
        };
        if p.op == Op::BootReply && p.xid == xid && want(&p) {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_client_gets_address_from_site_and_boot_file_from_proxy() -> Result<()> {
    let mut lab = lab().await?;
    let sock = lab.cli.udp("0.0.0.0:68", Some("cli0"))?;
    let bcast: SocketAddr = "255.255.255.255:67".parse()?;
    let wait = Duration::from_secs(30);

    // DISCOVER (resent each second until both offers arrive; dnsmasq may still be starting).
    let xid = 0x5e5e_0001;
    let discover = pxe_packet(MessageType::Discover, xid, vec![]).to_bytes();
    let (mut site_offer, mut proxy_offer) = (None, None);
    tokio::time::timeout(wait, async {
        loop {
            sock.send_to(&discover, bcast).await?;
            let got = tokio::time::timeout(
                Duration::from_secs(1),
                collect(&sock, xid, |p| {
                    match p.options.server_id() {
                        Some(SITE) => site_offer = Some(p.clone()),
                        Some(PROXY) => proxy_offer = Some(p.clone()),
                        _ => {}
                    }
                    site_offer.is_some() && proxy_offer.is_some()
                }),
            )
            .await;
            if let Ok(r) = got {
                return r;
            }
        }
    })
    .await
    .context("offers")??;
    let (site_offer, proxy_offer) = (site_offer.unwrap(), proxy_offer.unwrap());
    assert_eq!(proxy_offer.options.message_type(), Some(MessageType::Offer));
    assert_eq!(
        proxy_offer.yiaddr,
        Ipv4Addr::UNSPECIFIED,
        "the proxy hands out no address"
    );
    assert_eq!(proxy_offer.siaddr, PROXY);
    assert_eq!(proxy_offer.file, b"undionly.kpxe");
    assert_eq!(proxy_offer.options.vendor_class(), Some(&b"PXEClient"[..]));
    assert!(proxy_offer.options.get(97).is_some(), "client UUID echoed");
    let ip = site_offer.yiaddr;
    assert!(ip.octets()[3] >= 100, "address from dnsmasq: {ip}");
    let d = lab.discovered.recv().await.context("discovery")?;
    assert_eq!(d.mac.0, MAC);
    assert_eq!(d.arch, Some(0));

    // REQUEST the address from dnsmasq.
    let req = pxe_packet(
        MessageType::Request,
        xid,
        vec![DhcpOption::ServerId(SITE), DhcpOption::RequestedIp(ip)],
    );
    let req = req.to_bytes();
    tokio::time::timeout(wait, async {
        loop {
            sock.send_to(&req, bcast).await?;
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                collect(&sock, xid, |p| {
                    p.options.message_type() == Some(MessageType::Ack)
                        && p.options.server_id() == Some(SITE)
                }),
            )
            .await;
            if let Ok(r) = r {
                return r;
            }
        }
    })
    .await
    .context("dnsmasq ACK")??;

    // With its address configured, ask the proxy on port 4011.
    lab.cli
        .ip(&["addr", "add", &format!("{ip}/24"), "dev", "cli0"])?;
    let xid2 = 0x5e5e_0002;
    let mut boot_req = pxe_packet(MessageType::Request, xid2, vec![]);
    boot_req.ciaddr = ip;
    boot_req.flags = 0;
    let boot_req = boot_req.to_bytes();
    let mut ack = None;
    tokio::time::timeout(wait, async {
        loop {
            sock.send_to(&boot_req, SocketAddr::from((PROXY, 4011)))
                .await?;
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                collect(&sock, xid2, |p| {
                    ack = Some(p.clone());
                    true
                }),
            )
            .await;
            if let Ok(r) = r {
                return r;
            }
        }
    })
    .await
    .context("proxy ACK on 4011")??;
    let ack = ack.unwrap();
    assert_eq!(ack.options.message_type(), Some(MessageType::Ack));
    assert_eq!(ack.options.server_id(), Some(PROXY));
    assert_eq!(ack.file, b"undionly.kpxe");
    assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert!(!lab.task.is_finished());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_gets_address_from_site_only() -> Result<()> {
    let lab = lab().await?;
    let (script, log) = udhcpc_script(lab.dir.path())?;
    let mut cmd = lab.cli.command("busybox");
    cmd.args([
        "udhcpc", "-i", "cli0", "-f", "-q", "-n", "-t", "10", "-T", "1", "-s",
    ])
    .arg(&script);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    if !out.status.success() {
        bail!("udhcpc: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(&log)?;
    let bound = text
        .lines()
        .find(|l| l.starts_with("bound"))
        .context("bound")?;
    assert_eq!(field(bound, "serverid"), Some("10.77.0.2"), "{bound}");
    assert_eq!(field(bound, "boot_file"), Some(""), "{bound}");
    let _ = (&lab.srv, &lab.site);
    Ok(())
}
