//! `strata mcast send|recv` in network namespaces (docs/multicast.md): a bridge with
//! `mcast_snooping 0`, one sender namespace and one namespace per receiver joined by veth
//! pairs, IPv6 off, loss injected with nftables `numgen random` drops on the receivers' input.
//! Checks that every receiver's file is identical and verified, with 3 and 8 receivers, at 1%
//! and 5% loss, with a late joiner and a receiver killed and restarted mid-session, and that
//! packets of another session and forged packets are never written. Files are 16-24 MiB; the
//! 256 MiB runs are in scripts/bench-multicast.sh.

use std::fs::File;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use wire::multicast::packet::{Data, Hashes, Packet, SessionId};

const STRATA: &str = env!("CARGO_BIN_EXE_strata");

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn require(tool: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false);
    ensure!(
        found,
        "{tool} not found: apt-get install {package} (scripts/setup.sh)"
    );
    Ok(())
}

/// One sender and `n` receivers, each in its own namespace, on one bridge.
struct Lab {
    tag: String,
    subnet: u8,
    receivers: usize,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str, subnet: u8, receivers: usize) -> Result<Lab> {
        require("ip", "iproute2")?;
        require("nft", "nftables")?;
        let lab = Lab {
            tag: format!("smc{tag}{}", std::process::id() % 10000),
            subnet,
            receivers,
            dir: tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?,
        };
        lab.down();
        let br = lab.ns("br");
        let s = lab.ns("s");
        for ns in [&br, &s] {
            run(&["ip", "netns", "add", ns])?;
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "ip",
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        run(&["ip", "-n", &br, "link", "set", "br0", "up"])?;
        lab.attach(&s, "p0", 1)?;
        for i in 1..=receivers {
            let r = lab.ns(&format!("r{i}"));
            run(&["ip", "netns", "add", &r])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ])?;
            run(&["ip", "-n", &r, "link", "set", "lo", "up"])?;
            lab.attach(&r, &format!("p{i}"), 10 + i)?;
        }
        Ok(lab)
    }

    fn ns(&self, what: &str) -> String {
        format!("{}{what}", self.tag)
    }

    fn attach(&self, ns: &str, port: &str, host: usize) -> Result<()> {
        let br = self.ns("br");
        run(&[
            "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
            "netns", &br,
        ])?;
        run(&["ip", "-n", &br, "link", "set", port, "master", "br0", "up"])?;
        let addr = format!("10.{}.0.{host}/24", self.subnet);
        run(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    fn group(&self) -> String {
        format!("239.255.{}.1:9000", self.subnet)
    }

    /// Drops `percent`% of UDP packets arriving in receiver `i`'s namespace.
    fn loss(&self, i: usize, percent: u32) -> Result<()> {
        let r = self.ns(&format!("r{i}"));
        let nft = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &r, "nft"];
            v.extend_from_slice(args);
            run(&v)
        };
        nft(&["add", "table", "inet", "loss"])?;
        nft(&[
            "add",
            "chain",
            "inet",
            "loss",
            "input",
            "{ type filter hook input priority 0; }",
        ])?;
        let rule = format!("meta l4proto udp numgen random mod 100 < {percent} counter drop");
        let mut v = vec!["add", "rule", "inet", "loss", "input"];
        v.extend(rule.split(' '));
        nft(&v)
    }

    fn file(&self, name: &str, mib: usize, seed: u64) -> Result<PathBuf> {
        let path = self.dir.path().join(name);
        let mut x = seed | 1;
        let mut data = vec![0u8; mib << 20];
        for w in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(&path, &data)?;
        Ok(path)
    }

    fn out(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("out{i}"))
    }

    fn recv(&self, i: usize, extra: &[&str]) -> Result<Child> {
        let out = self.out(i);
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns(&format!("r{i}")),
            STRATA,
            "mcast",
            "recv",
        ])
        .args([
            "--group",
            &self.group(),
            "--iface",
            "eth0",
            "--timeout",
            "300",
        ])
        .arg("--out")
        .arg(&out)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd.spawn().context("starting strata mcast recv")
    }

    fn send(&self, file: &Path, extra: &[&str]) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns("s"), STRATA, "mcast", "send"])
            .arg(file)
            .args(["--group", &self.group(), "--iface", "eth0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strata mcast send")
    }

    fn down(&self) {
        for i in 1..=self.receivers {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(&format!("r{i}"))])
                .output();
        }
        for n in ["s", "br"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

/// Waits for a command and parses the JSON report on its stdout.
fn report(child: Child, what: &str) -> Result<(bool, Value, String)> {
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&stderr).into_owned();
    let json: Value = serde_json::from_slice(&stdout)
        .with_context(|| format!("{what}: no JSON report; stderr:\n{err}"))?;
    Ok((status.success(), json, err))
}

fn same(a: &Path, b: &Path) -> Result<bool> {
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

/// Sends `file` to all receivers (some with loss), checks every copy, returns the sender's
/// report.
fn transfer(lab: &Lab, file: &Path, loss: &[u32]) -> Result<Value> {
    for (i, l) in loss.iter().enumerate() {
        if *l > 0 {
            lab.loss(i + 1, *l)?;
        }
    }
    let rx: Vec<Child> = (1..=lab.receivers)
        .map(|i| lab.recv(i, &[]))
        .collect::<Result<_>>()?;
    let n = lab.receivers.to_string();
    let tx = lab.send(file, &["--min-receivers", &n, "--rate", "400M"])?;
    let (ok, sent, err) = report(tx, "sender")?;
    for (i, child) in rx.into_iter().enumerate() {
        let (ok, r, err) = report(child, "receiver")?;
        ensure!(ok, "receiver {} failed: {r}\n{err}", i + 1);
        ensure!(r["outcome"] == "Complete", "receiver {}: {r}", i + 1);
        ensure!(
            same(file, &lab.out(i + 1))?,
            "receiver {} has a different file",
            i + 1
        );
        ensure!(!wire::multicast::net::part_path(&lab.out(i + 1)).exists());
    }
    ensure!(ok, "sender failed: {sent}\n{err}");
    ensure!(sent["receivers_done"] == lab.receivers as u64, "{sent}");
    eprintln!(
        "{} receivers, loss {loss:?}: wire ratio {:.3} ({} data, {} repair packets, {} NACKs)",
        lab.receivers,
        sent["wire_ratio"],
        sent["data_packets"],
        sent["repair_packets"],
        sent["nacks"]
    );
    Ok(sent)
}

#[test]
fn three_receivers_get_identical_verified_files() -> Result<()> {
    let lab = Lab::new("a", 81, 3)?;
    let file = lab.file("layer", 24, 1)?;
    let sent = transfer(&lab, &file, &[0, 0, 0])?;
    // No loss: one pass of 16-byte headers, within 5% of the layer size on the wire.
    let ratio = sent["wire_ratio"].as_f64().context("ratio")?;
    ensure!(ratio < 1.05, "wire ratio {ratio}");
    Ok(())
}

#[test]
fn three_receivers_at_one_percent_loss() -> Result<()> {
    let lab = Lab::new("b", 82, 3)?;
    let file = lab.file("layer", 16, 2)?;
    let sent = transfer(&lab, &file, &[1, 1, 1])?;
    ensure!(sent["repair_packets"].as_u64() > Some(0), "{sent}");
    Ok(())
}

#[test]
fn eight_receivers_at_five_percent_loss() -> Result<()> {
    let lab = Lab::new("c", 83, 8)?;
    let file = lab.file("layer", 16, 3)?;
    let sent = transfer(&lab, &file, &[5; 8])?;
    // Repairs are shared: far fewer than eight receivers' losses resent one by one would be.
    let data = sent["data_packets"].as_f64().context("data")?;
    let repair = sent["repair_packets"].as_f64().context("repair")?;
    ensure!(repair < data * 0.8, "{sent}");
    Ok(())
}

/// Receiver 1 from the start; receiver 2 killed mid-session and restarted (it resumes its
/// partial file); receiver 3 joins late. All finish with the right file.
#[test]
fn late_joiner_and_restarted_receiver_complete() -> Result<()> {
    let lab = Lab::new("d", 84, 3)?;
    let file = lab.file("layer", 24, 4)?;
    let r1 = lab.recv(1, &[])?;
    let mut r2 = lab.recv(2, &[])?;
    // 24 MiB at 60 Mbit/s: a first pass of about 3.5 s.
    let tx = lab.send(&file, &["--min-receivers", "2", "--rate", "60M"])?;
    let part2 = wire::multicast::net::part_path(&lab.out(2));
    wait_for_chunks(&part2, &file, 4)?;
    r2.kill()?;
    r2.wait()?;
    let r3 = lab.recv(3, &[])?;
    let r2 = lab.recv(2, &[])?;
    let (ok, sent, err) = report(tx, "sender")?;
    for (i, child) in [(1, r1), (2, r2), (3, r3)] {
        let (ok, r, err) = report(child, "receiver")?;
        ensure!(ok && r["outcome"] == "Complete", "receiver {i}: {r}\n{err}");
        ensure!(
            same(&file, &lab.out(i))?,
            "receiver {i} has a different file"
        );
        if i == 2 {
            ensure!(
                r["resumed_chunks"].as_u64() >= Some(4),
                "restart did not resume: {r}"
            );
        }
        if i == 3 {
            // It joined after the pass began: what it has came partly from repairs it asked for.
            ensure!(
                r["nacks"].as_u64() > Some(0),
                "late joiner asked for nothing: {r}"
            );
        }
    }
    ensure!(sent["receivers_done"].as_u64() >= Some(3), "{sent}\n{err}");
    let _ = ok;
    Ok(())
}

/// Polls a partial output until its first `n` chunks match the source (verified chunks were
/// written), so the kill happens mid-session.
fn wait_for_chunks(part: &Path, file: &Path, n: usize) -> Result<()> {
    use std::io::Read;
    let mut want = vec![0u8; n << 20];
    File::open(file)?.read_exact(&mut want)?;
    let mut got = vec![0u8; n << 20];
    let start = Instant::now();
    loop {
        if let Ok(mut f) = File::open(part) {
            if f.read_exact(&mut got).is_ok() && got == want {
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no progress in {}", part.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Enters a network namespace on this thread.
fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

/// A second session (another file) runs on the same group, and a forger that learned the
/// real session id sends data packets with random bytes and a bogus hash list. The receiver,
/// pinned to the layer, ends with exactly the right file, having dropped and counted the rest.
#[test]
fn foreign_sessions_and_forged_packets_are_never_written() -> Result<()> {
    // Receiver 2's namespace hosts the forger (another machine on the link).
    let lab = Lab::new("e", 85, 2)?;
    let file = lab.file("layer", 16, 5)?;
    let other = lab.file("other", 16, 6)?;
    let (id, _, _) = wire::chunk::chunk_hashes(File::open(&file)?, wire::chunk::CHUNK_SIZE)?;
    // The other session starts at once and keeps the group busy.
    let tx_other = lab.send(&other, &["--min-receivers", "0", "--rate", "40M"])?;
    let rx = lab.recv(1, &["--layer", &id.to_hex()])?;
    // The forger: on its own host, listens for the real session's announcement,
    // then floods forged data and hash packets for it.
    let stop = Arc::new(AtomicBool::new(false));
    let forger = {
        let stop = stop.clone();
        let ns = lab.ns("r2");
        let group: SocketAddrV4 = lab.group().parse()?;
        std::thread::spawn(move || -> Result<u64> {
            enter_netns(&ns)?;
            let (sock, _) = wire::multicast::net::open_receiver_socket(group, Some("eth0"), None)?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let out = strata_server::multicast::open_sender_socket(
                group,
                &strata_server::multicast::SocketOptions {
                    iface: Some("eth0".into()),
                    ..Default::default()
                },
            )?;
            out.set_nonblocking(false)?;
            let mut buf = [0u8; 2048];
            let (session, layout) = loop {
                if stop.load(Ordering::Relaxed) {
                    bail!("no announcement seen");
                }
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    if let Ok(Packet::Announce(a)) = Packet::parse(&buf[..n]) {
                        if a.layer == id {
                            break (a.session, a.layout);
                        }
                    }
                }
            };
            let mut sent = 0u64;
            let mut x = 0x9e3779b97f4a7c15u64;
            while !stop.load(Ordering::Relaxed) && sent < 40_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let symbol = (x % u64::from(layout.symbol_slots())) as u32;
                let Some(r) = layout.symbol_in_chunk(symbol) else {
                    continue;
                };
                let payload = vec![(x >> 8) as u8; r.len()];
                let p = Packet::Data(Data {
                    session,
                    seq: x as u32,
                    symbol,
                    repair: true,
                    payload: &payload,
                });
                out.send_to(&p.to_bytes(), SocketAddr::V4(group))?;
                if sent.is_multiple_of(100) {
                    let h = Packet::Hashes(Hashes {
                        session,
                        first: 0,
                        hashes: vec![wire::chunk::Digest([0xee; 32]); 8],
                    });
                    out.send_to(&h.to_bytes(), SocketAddr::V4(group))?;
                    // And a packet of a session that does not exist.
                    let alien = Packet::Data(Data {
                        session: SessionId::new(session.get() ^ 0x5a5a).unwrap_or(session),
                        seq: 0,
                        symbol,
                        repair: false,
                        payload: &payload,
                    });
                    out.send_to(&alien.to_bytes(), SocketAddr::V4(group))?;
                }
                sent += 1;
                if sent.is_multiple_of(16) {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            Ok(sent)
        })
    };
    let tx = lab.send(&file, &["--min-receivers", "1", "--rate", "60M"])?;
    let (ok, r, err) = report(rx, "receiver")?;
    stop.store(true, Ordering::Relaxed);
    let forged = forger
        .join()
        .map_err(|_| anyhow::anyhow!("forger panicked"))??;
    let (_, sent, _) = report(tx, "sender")?;
    let mut tx_other = tx_other;
    let _ = tx_other.kill();
    let _ = tx_other.wait();
    ensure!(
        ok && r["outcome"] == "Complete",
        "receiver: {r}\n{err}\nsender: {sent}"
    );
    ensure!(same(&file, &lab.out(1))?, "receiver wrote something else");
    ensure!(
        r["foreign"].as_u64() > Some(0),
        "no foreign packets counted: {r}"
    );
    eprintln!("forged {forged} packets; receiver: {r}");
    ensure!(forged > 0);
    // Forged symbols either poisoned a chunk (thrown away) or arrived as duplicates.
    let bad = r["bad_chunks"].as_u64().unwrap_or(0) + r["duplicates"].as_u64().unwrap_or(0);
    ensure!(bad > 0, "forged packets not seen: {r}");
    Ok(())
}

/// A blocking HTTP/1.1 request (the caller's thread may be in a namespace); returns status
/// and body.
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    ensure!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answer: {head}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// `strata serve` with `[multicast]` on: two nodes (in their own namespaces) ask for their
/// signed manifests, which offer a session for the base layer; each joins it with the hashes
/// from the manifest, as node-init does (`wire::multicast::receive`, `Expect::Known`). The
/// session starts when both wait; both get the verified layer, and the server's counters show
/// the layer sent once, plus repairs.
#[test]
fn the_server_offers_a_session_in_manifests_and_sends_the_base_once() -> Result<()> {
    use std::io::BufRead;
    let lab = Lab::new("v", 86, 2)?;
    let data = lab.dir.path().join("data");
    let config = lab.dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[http]\nlisten = \"10.86.0.1:0\"\n[tftp]\nenabled = false\n\
             [multicast]\nenabled = true\ninterface = \"eth0\"\nmin_nodes = 2\nmax_wait_secs = 60\nnode_wait_secs = 120\n\
             rate_bps = 400000000\n"
        ),
    )?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.ns("s"), STRATA, "serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = server.stderr.take().context("stderr")?;
    let server = Kill(server);
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(|l| l.ok())
        {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = tx.send(addr);
            }
            if let Ok(mut l) = log2.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| {
            anyhow::anyhow!(
                "strata serve did not start:\n{}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            )
        })?
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()?;
    let key_hex = std::fs::read_to_string(data.join("keys/server.key"))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(key_hex.trim(), &mut secret)?;
    let vk = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
    let admin = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_owned();

    let nodes: Vec<_> = (1..=2)
        .map(|i| {
            let ns = lab.ns(&format!("r{i}"));
            let out = lab.dir.path().join(format!("node{i}.layer"));
            std::thread::spawn(move || -> Result<(wire::manifest::LayerRef, PathBuf, wire::multicast::Received)> {
                enter_netns(&ns)?;
                let mac = format!("52:54:00:86:00:0{i}");
                let (status, body) = http(addr, "GET", &format!("/api/v1/nodes/by-mac/{mac}/manifest"), None)?;
                ensure!(status == 200, "manifest: {status} {}", String::from_utf8_lossy(&body));
                let m = wire::manifest::SignedManifest::from_json(&body)?.verify(&vk)?;
                let base = m.layers.first().context("no layers")?.clone();
                let offer = m.multicast_offer(&base.id).context("no multicast offer for the base")?.clone();
                ensure!(m.multicast.len() == 1, "only the base is offered: {:?}", m.multicast);
                let mut cfg = wire::multicast::ReceiveConfig::new(
                    offer.group,
                    wire::multicast::Expect::Known {
                        id: base.id,
                        size: base.size,
                        chunk_size: base.chunk_size,
                        chunks: base.chunks.clone(),
                    },
                );
                cfg.iface = Some("eth0".into());
                cfg.deadline = Some(Instant::now() + Duration::from_secs(u64::from(offer.wait_secs)));
                let r = wire::multicast::receive(&cfg, &out)?;
                Ok((base, out, r))
            })
        })
        .collect();
    let mut base = None;
    for n in nodes {
        let (l, out, r) = n
            .join()
            .map_err(|_| anyhow::anyhow!("node thread panicked"))??;
        ensure!(r.is_complete(), "node did not complete: {:?}", r.outcome);
        let bytes = std::fs::read(&out)?;
        ensure!(
            wire::chunk::Digest::of(&bytes) == l.id,
            "node's copy does not hash to the layer id"
        );
        base = Some(l);
    }
    let base = base.context("no node")?;
    // The session's counters, once it has announced its end.
    let ns = lab.ns("r1");
    let cli_admin = admin.clone();
    let sessions = std::thread::spawn(move || -> Result<Value> {
        enter_netns(&ns)?;
        let start = Instant::now();
        loop {
            let (status, body) = http(addr, "GET", "/api/v1/multicast/sessions", Some(&admin))?;
            ensure!(status == 200, "sessions: {status}");
            let v: Value = serde_json::from_slice(&body)?;
            if v.as_array()
                .is_some_and(|a| a.iter().any(|s| s["state"] == "finished"))
            {
                return Ok(v);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "no finished session: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sessions thread panicked"))??;
    let s = sessions
        .as_array()
        .and_then(|a| a.iter().find(|s| s["state"] == "finished"))
        .context("finished")?;
    let c = &s["counters"];
    eprintln!("scheduled session: {s}");
    ensure!(s["layer"] == base.id.to_string(), "{s}");
    ensure!(s["offered_to"].as_array().map(Vec::len) == Some(2), "{s}");
    ensure!(c["receivers_done"] == 2, "{s}");
    ensure!(
        c["data_packets"] == c["layer_symbols"],
        "the layer went out once: {s}"
    );
    let repairs = c["repair_packets"].as_u64().unwrap_or(u64::MAX);
    ensure!(
        repairs * 20 < c["layer_symbols"].as_u64().unwrap_or(0),
        "repairs within 5%: {s}"
    );

    // The operator's view through the CLI: the same session, as JSON and as a table; starting a
    // session nobody offered is a clear error.
    let url = format!("http://{addr}");
    let cli = |args: &[&str]| -> Result<std::process::Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &lab.ns("r1"), STRATA, "mcast"])
            .args(args)
            .args(["--url", &url, "--token", &cli_admin])
            .output()?)
    };
    let out = cli(&["sessions", "--json"])?;
    ensure!(
        out.status.success(),
        "strata mcast sessions: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        listed.as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["id"] == s["id"] && x["layer"] == s["layer"])),
        "the CLI lists the finished session: {listed}"
    );
    let out = cli(&["sessions"])?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && table.contains("finished")
            && table.contains(&base.id.to_string()[..16]),
        "{table}"
    );
    let out = cli(&["start", &"0".repeat(64)])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("multicast session"),
        "starting an unknown session: {err}"
    );
    drop(server);
    Ok(())
}
