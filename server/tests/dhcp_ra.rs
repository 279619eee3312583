//! Router advertisements on the boot network: a client namespace's raw ICMPv6 socket sees
//! the unsolicited advertisement at start and gets an answer to its router solicitation,
//! with router lifetime 0, M = O = 0 and no prefix, from a link-local source with hop limit
//! 255 (the client's kernel would drop anything else, and so would iPXE).

mod dhcp_lab;

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dhcp_lab::Netns;
use strata_server::boot::ra::{
    RaResponder, ALL_ROUTERS, ROUTER_ADVERTISEMENT, ROUTER_SOLICITATION,
};
use tokio_util::sync::CancellationToken;

fn enable_ipv6(ns: &Netns) -> Result<()> {
    for k in [
        "all.disable_ipv6=0",
        "default.disable_ipv6=0",
        "all.accept_dad=0",
        "default.accept_dad=0",
    ] {
        ns.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{k}")])?;
    }
    Ok(())
}

fn raw_icmpv6(ns: &Netns, dev: &'static str) -> Result<(tokio::net::UdpSocket, u32)> {
    let (s, idx) = ns.within(move || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        s.bind_device(Some(dev.as_bytes()))?;
        s.set_multicast_hops_v6(255)?;
        s.set_nonblocking(true)?;
        let idx = rustix::net::netdevice::name_to_index(&s, dev)?;
        Ok((std::net::UdpSocket::from(s), idx))
    })?;
    Ok((tokio::net::UdpSocket::from_std(s)?, idx))
}

/// Waits for the next router advertisement; returns (source, packet).
async fn next_ra(sock: &tokio::net::UdpSocket) -> Result<(Ipv6Addr, Vec<u8>)> {
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        if buf[0] == ROUTER_ADVERTISEMENT {
            let SocketAddr::V6(from) = from else {
                bail!("v4 source")
            };
            return Ok((*from.ip(), buf[..n].to_vec()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_solicitations_with_an_empty_advertisement() -> Result<()> {
    let server = Netns::new("ra-s")?;
    let client = Netns::new("ra-c")?;
    enable_ipv6(&server)?;
    enable_ipv6(&client)?;
    dhcp_lab::run(
        "ip",
        &[
            "link",
            "add",
            "srv0",
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            "cli0",
            "netns",
            &client.name,
        ],
    )?;
    server.ip(&["link", "set", "srv0", "up"])?;
    client.ip(&["link", "set", "cli0", "up"])?;
    let (sock, cli_idx) = raw_icmpv6(&client, "cli0")?;

    let (raw, idx) = server.within(|| Ok(RaResponder::open_socket("srv0")?))?;
    let responder = RaResponder::new(tokio::net::UdpSocket::from_std(raw)?, idx, None);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(responder.run(cancel.child_token()));

    let wait = Duration::from_secs(20);
    let (src, ra) = tokio::time::timeout(wait, next_ra(&sock))
        .await
        .context("no unsolicited RA")??;
    let check = |src: Ipv6Addr, ra: &[u8]| {
        assert_eq!(src.segments()[0], 0xfe80, "link-local source: {src}");
        assert_eq!(ra[1], 0, "code");
        assert_eq!(ra[5] & 0xc0, 0, "M = O = 0");
        assert_eq!(u16::from_be_bytes([ra[6], ra[7]]), 0, "router lifetime 0");
        assert!(
            ra[16..].chunks(8).all(|o| o[0] != 3),
            "no prefix information option"
        );
    };
    check(src, &ra);

    // A solicitation from the client's link-local address gets an answer.
    let rs = [ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    sock.send_to(&rs, SocketAddrV6::new(ALL_ROUTERS, 0, 0, cli_idx))
        .await?;
    let (src, ra) = tokio::time::timeout(wait, next_ra(&sock))
        .await
        .context("no solicited RA")??;
    check(src, &ra);

    // The client's kernel accepted it (hop limit 255, valid checksum): it lists no default
    // route, and `ip -6 route` shows only the link-local route.
    let routes = client.ip(&["-6", "route", "show", "default"])?;
    assert!(
        routes.trim().is_empty(),
        "router lifetime 0 adds no default route: {routes}"
    );

    // Garbage solicitations do not stop the responder.
    for bad in [
        &[133u8, 1, 0, 0, 0, 0, 0, 0][..],
        &[133, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[133, 0, 0, 0, 0, 0, 0, 0, 1, 9],
    ] {
        sock.send_to(bad, SocketAddrV6::new(ALL_ROUTERS, 0, 0, cli_idx))
            .await?;
    }
    sock.send_to(&rs, SocketAddrV6::new(ALL_ROUTERS, 0, 0, cli_idx))
        .await?;
    tokio::time::timeout(wait, next_ra(&sock))
        .await
        .context("no RA after garbage")??;
    assert!(!task.is_finished());
    cancel.cancel();
    task.await??;
    Ok(())
}
