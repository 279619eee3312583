//! The TFTP server against real clients on loopback: tftp-hpa's `tftp` (RFC 1350, octet and
//! netascii) and `atftp` (blksize, tsize, windowsize), byte-identical results, many clients at
//! once, windows of large blocks as a client with a large receive buffer asks, path
//! confinement, a client that stops acknowledging, and garbage on port 69, each refusal with
//! its WARN log line naming the peer or the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_server::boot::tftp::packet::{ErrorCode, Mode, Packet, Request, TftpOption};
use strata_server::boot::tftp::{TftpOptions, TftpServer};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Every log line of the server in this test binary (tests run in parallel, so assertions
/// look for their own peer or file name).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(Mutex::default)
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        // Also to the test's output, shown when a test fails.
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("strata_server=info")
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .try_init();
}

/// Asserts that a WARN line holding every one of `parts` was logged.
fn assert_warned(parts: &[&str]) {
    let text =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains(" WARN ") && parts.iter().all(|p| l.contains(p))),
        "no WARN line with {parts:?} in the server's log"
    );
}

fn require(tool: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if !found {
        bail!("{tool} not found: install it with `apt-get install {package}` (scripts/setup.sh)");
    }
    Ok(())
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Fixture {
    root: tempfile::TempDir,
    out: tempfile::TempDir,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), strata_server::boot::tftp::TftpError>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(opts: TftpOptions) -> Result<Fixture> {
    init_logs();
    require("tftp", "tftp-hpa")?;
    require("atftp", "atftp")?;
    let root = tempfile::tempdir()?;
    let r = root.path();
    std::fs::write(r.join("big.bin"), data(3 * 1024 * 1024 + 123, 1))?;
    std::fs::write(r.join("exact.bin"), data(1468 * 64, 2))?; // a multiple of blksize: empty last block
    std::fs::write(r.join("empty.bin"), b"")?;
    std::fs::create_dir(r.join("ipxe"))?;
    std::fs::write(r.join("ipxe/undionly.kpxe"), data(70_000, 3))?;
    std::fs::write(
        r.join("text.txt"),
        b"line one\nline two\r\nbare cr\rend\n".repeat(500),
    )?;
    std::os::unix::fs::symlink("/etc/passwd", r.join("passwd-link"))?;
    std::os::unix::fs::symlink("ipxe/undionly.kpxe", r.join("inside-link"))?;
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let server = TftpServer::new(socket, r, opts)?;
    let addr = server.local_addr()?;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(cancel.child_token()));
    Ok(Fixture {
        root,
        out: tempfile::tempdir()?,
        addr,
        cancel,
        task,
    })
}

async fn run(cmd: &mut tokio::process::Command) -> Result<std::process::Output> {
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("client hung")?
        .context("spawn client")
}

impl Fixture {
    fn local(&self, name: &str) -> PathBuf {
        self.out.path().join(name.replace('/', "_"))
    }

    async fn atftp(
        &self,
        remote: &str,
        local: &Path,
        options: &[&str],
    ) -> Result<std::process::Output> {
        let mut c = tokio::process::Command::new("atftp");
        c.args(["-g", "-r", remote, "-l"]).arg(local);
        for o in options {
            c.args(["--option", o]);
        }
        c.args(["127.0.0.1", &self.addr.port().to_string()]);
        run(&mut c).await
    }

    async fn fetch_atftp(&self, remote: &str, options: &[&str]) -> Result<()> {
        let local = self.local(&format!("{remote}-{}", options.join("-").replace(' ', "")));
        let out = self.atftp(remote, &local, options).await?;
        if !out.status.success() {
            bail!(
                "atftp {remote} {options:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let want = std::fs::read(self.root.path().join(remote))?;
        let got = std::fs::read(&local)?;
        assert!(
            got == want,
            "atftp {remote} {options:?}: {} bytes, want {}",
            got.len(),
            want.len()
        );
        Ok(())
    }

    async fn tftp_hpa(&self, mode: &str, remote: &str) -> Result<(std::process::Output, PathBuf)> {
        let local = self.local(&format!("hpa-{mode}-{remote}"));
        let mut c = tokio::process::Command::new("tftp");
        c.args([
            "-m",
            mode,
            "127.0.0.1",
            &self.addr.port().to_string(),
            "-c",
            "get",
            remote,
        ])
        .arg(&local);
        Ok((run(&mut c).await?, local))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_octet_and_netascii() -> Result<()> {
    let f = serve(TftpOptions::default()).await?;
    for name in [
        "big.bin",
        "exact.bin",
        "empty.bin",
        "ipxe/undionly.kpxe",
        "inside-link",
    ] {
        let (out, local) = f.tftp_hpa("binary", name).await?;
        let want = std::fs::read(f.root.path().join(name))?;
        let got = std::fs::read(&local)
            .with_context(|| format!("{name}: {}", String::from_utf8_lossy(&out.stderr)))?;
        assert!(
            got == want,
            "{name}: {} bytes, want {}",
            got.len(),
            want.len()
        );
    }
    // netascii: the client turns CR LF back into LF and CR NUL into CR.
    let (_, local) = f.tftp_hpa("ascii", "text.txt").await?;
    assert_eq!(
        std::fs::read(local)?,
        std::fs::read(f.root.path().join("text.txt"))?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_block_sizes_tsize_and_windowsize() -> Result<()> {
    let f = serve(TftpOptions::default()).await?;
    for opts in [
        &[][..],
        &["blksize 1468", "tsize 0"],
        &["blksize 8"],
        &["blksize 8192"],
        &["blksize 65464", "tsize 0"],
        &["blksize 1468", "windowsize 16"],
        &["blksize 1468", "windowsize 64", "tsize 0"],
        // Windows of larger blocks: GSO segments of 8196 bytes, and blocks of 65464 that
        // go out with sendmmsg (atftp's default receive buffer holds 3 of them).
        &["blksize 8192", "windowsize 16"],
        &["blksize 65464", "windowsize 3", "tsize 0"],
        &["windowsize 4", "timeout 2"],
    ] {
        for name in ["big.bin", "exact.bin", "empty.bin"] {
            if opts == ["blksize 8"] && name == "big.bin" {
                continue; // 400k lock-step round trips: covered by the smaller files
            }
            f.fetch_atftp(name, opts).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() -> Result<()> {
    let f = serve(TftpOptions::default()).await?;
    let opts: [&[&str]; 4] = [
        &[],
        &["blksize 1468"],
        &["blksize 1468", "windowsize 16"],
        &["blksize 65464"],
    ];
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..24 {
        let name = if i % 3 == 0 {
            "big.bin"
        } else {
            "ipxe/undionly.kpxe"
        };
        let want = std::fs::read(f.root.path().join(name))?;
        let local = f.local(&format!("many-{i}"));
        let mut c = tokio::process::Command::new("atftp");
        c.args(["-g", "-r", name, "-l"]).arg(&local);
        for o in opts[i % 4] {
            c.args(["--option", o]);
        }
        c.args(["127.0.0.1", &f.addr.port().to_string()]);
        clients.spawn(async move {
            let out = run(&mut c).await?;
            anyhow::ensure!(
                out.status.success(),
                "client {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            anyhow::ensure!(
                std::fs::read(&local)? == want,
                "client {i} got different bytes"
            );
            Ok(())
        });
    }
    while let Some(r) = clients.join_next().await {
        r??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_root_are_refused() -> Result<()> {
    let f = serve(TftpOptions::default()).await?;
    for (name, why) in [
        ("../../etc/passwd", "path leaves the TFTP root"),
        ("ipxe/../../../etc/passwd", "path leaves the TFTP root"),
        ("/etc/passwd", "absolute paths are not served"),
        ("passwd-link", "path leaves the TFTP root"),
        ("missing.bin", "file not found"),
        ("ipxe", "not a regular file"),
    ] {
        let local = f.local(&format!("refused-{name}"));
        let out = f.atftp(name, &local, &[]).await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{name} was served");
        assert!(text.contains(why), "{name}: expected {why:?} in {text:?}");
        let leaked = std::fs::read(&local).unwrap_or_default();
        assert!(leaked.is_empty(), "{name}: bytes written");
        // The server says why, naming the file.
        assert_warned(&[&format!("file={name}}}:"), "request refused", why]);
    }
    // tftp-hpa sees the same refusal.
    let (out, _) = f.tftp_hpa("binary", "../../etc/passwd").await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Error code 2"), "{text}");
    Ok(())
}

fn rrq(name: &str, options: Vec<TftpOption>) -> Vec<u8> {
    Packet::Rrq(Request {
        filename: name.into(),
        mode: Mode::Octet,
        options,
    })
    .to_bytes()
}

/// A client that sized its receive buffer for a window of 16 blocks of 65464 (1 MiB, the
/// default cap) gets that window granted and every byte in order: 16 DATA per ACK, the last
/// window short, the file's bytes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_windows_as_the_client_asks() -> Result<()> {
    let f = serve(TftpOptions::default()).await?;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    // Past net.core.rmem_max where it is lower (root: SO_RCVBUFFORCE).
    if nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20)).is_err()
    {
        socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20)?;
    }
    let rcvbuf = socket2::SockRef::from(&s).recv_buffer_size()?;
    anyhow::ensure!(
        rcvbuf >= 2 << 20,
        "receive buffer {rcvbuf} bytes: run as root or raise net.core.rmem_max to 4 MiB"
    );
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = rrq(
        "big.bin",
        vec![TftpOption::BlkSize(65464), TftpOption::WindowSize(16)],
    );
    s.send_to(&req, f.addr)?;
    let mut buf = vec![0u8; 65_536];
    let (n, peer) = s.recv_from(&mut buf)?;
    s.connect(peer)?;
    assert_eq!(
        Packet::parse(&buf[..n])?,
        Packet::Oack {
            options: vec![TftpOption::BlkSize(65464), TftpOption::WindowSize(16)]
        }
    );
    s.send(&Packet::Ack { block: 0 }.to_bytes())?;
    let want = std::fs::read(f.root.path().join("big.bin"))?;
    let mut got = Vec::new();
    let mut block = 0u16;
    loop {
        // One window: up to 16 blocks in order, then one ACK.
        let mut last = false;
        for _ in 0..16 {
            let n = s.recv(&mut buf).context("a window's block")?;
            let Packet::Data { block: b, data } = Packet::parse(&buf[..n])? else {
                bail!("expected DATA");
            };
            assert_eq!(b, block.wrapping_add(1), "blocks in order, none lost");
            block = b;
            got.extend_from_slice(&data);
            if data.len() < 65464 {
                last = true;
                break;
            }
        }
        s.send(&Packet::Ack { block }.to_bytes())?;
        if last {
            break;
        }
    }
    // 3 MiB + 123 bytes: 49 blocks, three full windows and one of one.
    assert_eq!(block, 49);
    assert!(got == want, "received bytes differ from big.bin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_times_out_without_affecting_others() -> Result<()> {
    let max_retries = 3;
    let f = serve(TftpOptions {
        timeout: Duration::from_millis(200),
        max_retries,
        ..Default::default()
    })
    .await?;
    let stalled = UdpSocket::bind("127.0.0.1:0").await?;
    stalled.send_to(&rrq("big.bin", vec![]), f.addr).await?;
    let mut buf = vec![0u8; 2048];
    let (n, tid) = stalled.recv_from(&mut buf).await?;
    assert!(matches!(
        Packet::parse(&buf[..n])?,
        Packet::Data { block: 1, .. }
    ));
    stalled.connect(tid).await?;

    // Meanwhile another client gets its file.
    f.fetch_atftp("ipxe/undionly.kpxe", &["blksize 1468"])
        .await?;

    // Block 1 is retransmitted max_retries times, then the transfer is abandoned.
    let mut copies = 1;
    while copies < 1 + max_retries {
        let n = tokio::time::timeout(Duration::from_secs(30), stalled.recv(&mut buf)).await??;
        assert!(matches!(
            Packet::parse(&buf[..n])?,
            Packet::Data { block: 1, .. }
        ));
        copies += 1;
    }
    // Once abandoned, its socket is closed: a stale ACK 0 (ignored while the transfer lives)
    // draws "port unreachable".
    let closed = async {
        loop {
            stalled.send(&Packet::Ack { block: 0 }.to_bytes()).await?;
            match tokio::time::timeout(Duration::from_millis(200), stalled.recv(&mut buf)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return anyhow::Ok(())
                }
                Ok(Ok(n)) => bail!(
                    "unexpected packet after abandoning: {:?}",
                    Packet::parse(&buf[..n])
                ),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .context("transfer never abandoned")??;
    assert_warned(&[
        &format!("peer={}", stalled.local_addr()?),
        "client stopped acknowledging; transfer abandoned",
        "acked_blocks=0",
    ]);
    assert!(!f.task.is_finished());
    Ok(())
}

/// Sends `req` until `expect` arrives (other answers, such as a late reply to an earlier
/// request, are skipped).
async fn ask(s: &UdpSocket, req: &[u8], to: SocketAddr, expect: Packet) -> Result<()> {
    let mut buf = vec![0u8; 2048];
    for _ in 0..100 {
        s.send_to(req, to).await?;
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf)).await {
            if Packet::parse(&buf[..r?])? == expect {
                return Ok(());
            }
        }
    }
    bail!("no {expect:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_floods_on_port_69() -> Result<()> {
    let f = serve(TftpOptions {
        max_transfers: 8,
        ..Default::default()
    })
    .await?;
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    let mut garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 9, 1, 2],
        b"\0\x01no-terminator".to_vec(),
        b"\0\x01\0octet\0".to_vec(),
        b"\0\x01f\0binary\0".to_vec(),
        b"\0\x01f\0octet\0blksize\0".to_vec(),
        vec![0, 3, 0, 1, 1, 2, 3],
        vec![0, 4, 0, 1],
    ];
    let mut many = b"\0\x01big.bin\0octet\0".to_vec();
    for _ in 0..100 {
        many.extend_from_slice(b"x\0y\0");
    }
    garbage.push(many);
    // A write request is refused with an error and a log line (sent before the flood, whose
    // log lines the server rate-limits).
    let wrq = Packet::Wrq(Request {
        filename: "x".into(),
        mode: Mode::Octet,
        options: vec![],
    })
    .to_bytes();
    let first = UdpSocket::bind("127.0.0.1:0").await?;
    ask(
        &first,
        &wrq,
        f.addr,
        Packet::error(ErrorCode::AccessViolation, "read-only server"),
    )
    .await?;
    assert_warned(&[
        &format!("peer={}", first.local_addr()?),
        "write request refused (read-only server)",
    ]);
    for _ in 0..50 {
        for g in &garbage {
            s.send_to(g, f.addr).await?;
        }
    }
    // After the flood too. (The flood may have overflowed the server's receive buffer, so a
    // lost request is sent again.)
    ask(
        &s,
        &wrq,
        f.addr,
        Packet::error(ErrorCode::AccessViolation, "read-only server"),
    )
    .await?;
    // Mail mode is refused clearly.
    let mail = b"\0\x01big.bin\0mail\0";
    ask(
        &s,
        mail,
        f.addr,
        Packet::error(ErrorCode::IllegalOperation, "mail mode is not supported"),
    )
    .await?;
    let mut buf = vec![0u8; 2048];

    // A flood of RRQs from many ports, never acknowledged: beyond max_transfers the server
    // answers "busy" instead of queueing.
    let mut flooders = Vec::new();
    for _ in 0..20 {
        let c = UdpSocket::bind("127.0.0.1:0").await?;
        c.send_to(&rrq("big.bin", vec![]), f.addr).await?;
        flooders.push(c);
    }
    let (mut busy, mut data) = (0, 0);
    for c in &flooders {
        let n = tokio::time::timeout(Duration::from_secs(30), c.recv(&mut buf)).await??;
        match Packet::parse(&buf[..n])? {
            Packet::Data { block: 1, .. } => data += 1,
            p if p == Packet::error(ErrorCode::NotDefined, "server busy, try again") => busy += 1,
            p => bail!("unexpected answer to a flood RRQ: {p:?}"),
        }
    }
    // At most 8 transfers run; the rest are refused at once rather than queued. (A refused
    // transfer from the requests above may still hold a slot, so "at most".)
    assert!(
        (1..=8).contains(&data),
        "{data} transfers started, {busy} refused"
    );
    assert_eq!(data + busy, 20);
    // Each kind of refusal is logged clearly, naming the peer. (The "too many transfers"
    // lines of the flood are not asserted: past 20 warnings a second the server counts
    // instead of logging.)
    let peer = format!("peer={}", s.local_addr()?);
    assert_warned(&[&peer, "dropping malformed TFTP request"]);
    assert_warned(&[&peer, "request refused", "mail mode is not supported"]);
    drop(flooders);
    // The flooders' transfers end (port unreachable); real clients are served again.
    let mut served = false;
    for _ in 0..100 {
        if f.fetch_atftp("ipxe/undionly.kpxe", &[]).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "server recovered after the flood");
    assert!(!f.task.is_finished());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_transfers_in_flight() -> Result<()> {
    // A long retransmission timeout: the transfer would otherwise wait 5 s per try.
    let mut f = serve(TftpOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.send_to(&rrq("big.bin", vec![]), f.addr).await?;
    let mut buf = vec![0u8; 2048];
    let (n, tid) = client.recv_from(&mut buf).await?;
    assert!(matches!(
        Packet::parse(&buf[..n])?,
        Packet::Data { block: 1, .. }
    ));
    // The server stops, and with it the transfer's thread: run() returns only after every
    // transfer ended.
    f.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(60), &mut f.task)
        .await
        .context("server did not stop")???;
    // Its transfer socket is closed: an ACK draws "port unreachable".
    client.connect(tid).await?;
    client.send(&Packet::Ack { block: 1 }.to_bytes()).await?;
    let r = tokio::time::timeout(Duration::from_secs(30), client.recv(&mut buf))
        .await
        .context("no answer to an ACK after shutdown")?;
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        other => bail!("expected port unreachable, got {other:?}"),
    }
}
