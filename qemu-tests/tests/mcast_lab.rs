//! Two VMs get their base layer over multicast from `strata serve` (docs/multicast.md,
//! "Sessions scheduled by the server"): the server, with `[multicast]` on, offers a session
//! for the base in both nodes' signed manifests; node-init in each VM joins it
//! (node-init/src/mcast.rs), fetches the role and node layers over HTTP, and boots to the
//! image's marker. The server's session counters show the base sent once (every symbol one
//! first-pass packet), plus repairs, and both nodes done. The lab bridge has
//! `mcast_snooping 0`, so the group reaches every tap.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use strata_lab::server::LAB_CONFIG_TEMPLATE;
use strata_lab::{fixture, tools, Disk, Firmware, Lab, LabConfig, Strata, StrataConfig, VmConfig};

const BOOT: Duration = Duration::from_secs(600);
const NODES: [&str; 2] = ["52:54:00:42:77:01", "52:54:00:42:77:02"];

/// The node-init initramfs: `$STRATA_NODE_INITRAMFS`, else the one scripts/build-initramfs.sh
/// writes into the Strata cache (scripts/test.sh builds it).
fn node_initramfs() -> Result<PathBuf> {
    let path = match std::env::var_os("STRATA_NODE_INITRAMFS") {
        Some(p) => PathBuf::from(p),
        None => fixture::cache_dir().join("initramfs/node-init.cpio.gz"),
    };
    ensure!(
        path.is_file(),
        "{} missing: run scripts/build-initramfs.sh",
        path.display()
    );
    Ok(path)
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// GET with the admin token, from inside the lab's network.
fn admin_get(lab: &Lab, addr: SocketAddr, path: &str, token: &str) -> Result<Value> {
    let mut s =
        lab.in_netns(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)))??;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default()).into_owned();
    ensure!(
        head.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {head}"
    );
    Ok(serde_json::from_slice(
        raw.get(split + 4..).unwrap_or_default(),
    )?)
}

#[test]
fn two_vms_get_the_base_over_multicast_and_boot() -> Result<()> {
    tools::require_root()?;
    let mut lab = Lab::new(LabConfig::default())?;
    let server_ip = lab.config().server_ip;
    let mut strata = Strata::new(Strata::locate_binary()?);
    // Both nodes wait for each other (or 120 s); then the base goes out once at 200 Mbit/s at
    // most (TCG guests are slow receivers; rate control backs off further if they lose).
    strata.config = StrataConfig::Template(format!(
        "{LAB_CONFIG_TEMPLATE}\n[multicast]\nenabled = true\ninterface = \"{{{{bridge}}}}\"\n\
         min_nodes = 2\nmax_wait_secs = 120\nnode_wait_secs = 400\nrate_bps = 200000000\n"
    ));
    strata.boot = Some(strata_lab::BootFiles {
        kernel: fixture::debian_kernel()?,
        initrd: node_initramfs()?,
        cmdline: "no_timer_check".into(),
    });
    strata
        .ready
        .push("multicast sessions offered in manifests".into());
    lab.start_server(&strata)?;
    let data_dir = lab.dir().join("servers/strata-0/data");
    let admin = std::fs::read_to_string(data_dir.join("admin.token"))?
        .trim()
        .to_owned();
    let api = SocketAddr::from((server_ip, 8080));

    let mut vms = Vec::new();
    for (i, mac) in NODES.iter().enumerate() {
        let disk = lab.dir().join(format!("node{i}.raw"));
        fixture::create_disk(&disk, "raw", "256M")?;
        let mut cfg = VmConfig::new(&format!("node{i}"), Firmware::Bios);
        cfg.memory_mib = 512;
        cfg.mac = Some((*mac).into());
        cfg.disk = Some(Disk {
            path: disk,
            format: "raw".into(),
        });
        cfg.no_reboot = true;
        cfg.fail_markers = vec!["STRATA panic".into(), "Kernel panic".into()];
        vms.push(lab.start_vm(cfg)?);
    }
    let mut base = None;
    for vm in &mut vms {
        let joined = vm.wait_for_line("STRATA stage=multicast", BOOT)?;
        ensure!(field(&joined, "iface") == Some("eth0"), "{joined}");
        let done = vm.wait_for_line("STRATA stage=multicast_done", BOOT)?;
        eprintln!("{}: {done}", vm.name());
        let layer = field(&done, "layer").context("layer")?.to_owned();
        ensure!(
            base.get_or_insert_with(|| layer.clone()) == &layer,
            "both nodes joined for the same base"
        );
        vm.wait_for_serial("STRATA stage=switch_root", BOOT)?;
        vm.wait_for_serial(
            "STRATA image=busybox role=web version=1 stage=running",
            BOOT,
        )?;
    }
    let base = base.context("no base")?;
    // The session ends once both reported done; its counters are then final.
    let start = Instant::now();
    let session = loop {
        let v = admin_get(&lab, api, "/api/v1/multicast/sessions", &admin)?;
        let found = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["layer"] == base.as_str() && s["state"] == "finished")
            })
            .cloned();
        if let Some(s) = found {
            break s;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no finished session for {base}: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("session: {session}");
    let c = &session["counters"];
    ensure!(
        c["data_packets"] == c["layer_symbols"],
        "the base went out once: {session}"
    );
    ensure!(
        c["receivers_done"].as_u64().unwrap_or(0) + c["receivers_evicted"].as_u64().unwrap_or(0)
            == 2,
        "{session}"
    );
    let offered = session["offered_to"].as_array().context("offered_to")?;
    for mac in NODES {
        ensure!(
            offered.iter().any(|m| m == mac),
            "{mac} not offered the session: {session}"
        );
    }
    // One session for the base: both nodes joined the same one, and the agents in the booted
    // images, whose manifests no longer offer the layers they reported cached, started none.
    let all = admin_get(&lab, api, "/api/v1/multicast/sessions", &admin)?;
    let for_base = all
        .as_array()
        .map(|a| a.iter().filter(|s| s["layer"] == base.as_str()).count());
    ensure!(for_base == Some(1), "one session for the base: {all}");
    Ok(())
}
