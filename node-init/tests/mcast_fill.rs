//! node-init's multicast path filling the gaps a session left with HTTP `Range` requests
//! (docs/multicast.md, "node-init"; issue 7): a real session on loopback multicast in a
//! network namespace of its own, whose sender never sends some chunks and then ends the
//! session; `node_init::mcast::fetch_layer` must fetch exactly those chunks by range, verify
//! them and the whole layer, and commit it; a corrupt chunk served over HTTP is refused and
//! nothing enters the cache.
//!
//! Each test re-runs itself (this test binary, `--exact <name>`) in a child process that
//! `unshare(CLONE_NEWNET)`s before exec: the kernel's multicast routing and `/proc/net/route`
//! are per process there, the loopback interface is set up with multicast and a
//! `224.0.0.0/4` route, and the namespace disappears with the child (nothing to clean up).
//! Root is needed for the namespace.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use node_init::cache::Cache;
use node_init::http::Client;
use node_init::mcast::{fetch_layer, McastError};
use wire::chunk::{chunk_hashes, chunk_range, Digest};
use wire::manifest::{LayerKind, LayerRef, MulticastOffer};
use wire::multicast::packet::{hash_list_digest, Announce, Data, SessionPhase, Status};
use wire::multicast::{Layout, Outcome, Packet, SessionId};

const CHILD_ENV: &str = "STRATA_MCAST_FILL_NETNS";
const CHUNK: u32 = 4096;
const SYMBOL: u16 = 1024;
/// 10 chunks, the last one short.
const SIZE: usize = 9 * CHUNK as usize + 3000;
/// Chunks the session never sends.
const DROPPED: [u32; 3] = [2, 5, 9];
/// Hang guard for the sender's wait on the receiver (not a timing assertion).
const GUARD: Duration = Duration::from_secs(60);

fn data() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i * 131 % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

fn layer(bytes: &[u8]) -> LayerRef {
    let (id, size, chunks) = chunk_hashes(bytes, CHUNK).expect("hashing a Vec");
    LayerRef {
        id,
        size,
        kind: LayerKind::Base,
        chunk_size: CHUNK,
        chunks,
        url: format!("/layers/{id}"),
    }
}

/// Runs `name` again in a child process in a new network namespace; returns `true` if this
/// process is that child (the caller then runs the test body).
fn in_own_netns(name: &str) -> Result<bool> {
    if std::env::var_os(CHILD_ENV).is_some() {
        setup_loopback()?;
        return Ok(true);
    }
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1");
    // SAFETY: between fork and exec only the async-signal-safe unshare(2) runs.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .context("starting the test in a new network namespace (needs root: CAP_SYS_ADMIN)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{name} in its network namespace failed:\n{text}"
    );
    // `--exact` with a wrong name would pass having run nothing.
    ensure!(
        text.contains("1 passed"),
        "{name} did not run in the child:\n{text}"
    );
    Ok(false)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("ip not found: apt-get install iproute2")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn setup_loopback() -> Result<()> {
    ip(&["link", "set", "lo", "up", "multicast", "on"])?;
    ip(&["route", "add", "224.0.0.0/4", "dev", "lo"])
}

/// A request the layer server saw: path and `Range` as `(first, last)`.
type Request = (String, Option<(u64, u64)>);

/// A minimal layer server that records the `Range` of every request and can serve one chunk
/// corrupted.
struct Http {
    port: u16,
    /// `(path, Range as (first, last))` per request.
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Http {
    fn start(path: String, bytes: Vec<u8>, corrupt: Option<u64>) -> Result<Http> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let mut served = bytes;
        if let Some(off) = corrupt {
            if let Some(b) = served.get_mut(off as usize) {
                *b ^= 0xff;
            }
        }
        let served = Arc::new(served);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let _ = serve(c, &path, &served, &reqs);
            }
        });
        Ok(Http { port, requests })
    }
}

fn serve(
    mut s: TcpStream,
    layer_path: &str,
    data: &[u8],
    reqs: &Mutex<Vec<Request>>,
) -> Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                let (a, b) = v
                    .trim()
                    .strip_prefix("bytes=")
                    .and_then(|x| x.split_once('-'))
                    .context("range syntax")?;
                range = Some((a.parse::<u64>()?, b.parse::<u64>()?));
            }
        }
    }
    reqs.lock().expect("lock").push((path.clone(), range));
    let len = data.len() as u64;
    if path.split('?').next() != Some(layer_path) {
        write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let (status, a, e, extra) = match range {
        Some((a, b)) if a <= b && a < len => {
            let e = b.min(len - 1);
            (
                "206 Partial Content",
                a,
                e + 1,
                format!("Content-Range: bytes {a}-{e}/{len}\r\n"),
            )
        }
        Some(_) => bail!("unsatisfiable range"),
        None => ("200 OK", 0, len, String::new()),
    };
    let body = data.get(a as usize..e as usize).context("range")?;
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    Ok(())
}

/// A session sender that sends every chunk but `dropped`, round after round, until the
/// receiver reports holding all of those, then announces the end until `stop`.
fn sender(
    group: SocketAddrV4,
    l: &LayerRef,
    bytes: Arc<Vec<u8>>,
    dropped: &'static [u32],
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<u32>>> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_multicast_loop_v4(true)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let layout = Layout::new(l.size, l.chunk_size, SYMBOL)?;
    let session = SessionId::new(0x5eed).context("session id")?;
    let announce = |phase| {
        Packet::Announce(Announce {
            session,
            phase,
            layer: l.id,
            layout,
            hash_list: hash_list_digest(&l.chunks),
            horizon: layout.symbol_slots(),
            receivers: 1,
            rate_kbps: 1000,
        })
        .to_bytes()
    };
    let (sending, ending) = (
        announce(SessionPhase::Sending),
        announce(SessionPhase::Ending),
    );
    let want = layout.chunks() as u32 - dropped.len() as u32;
    Ok(std::thread::spawn(move || -> Result<u32> {
        let guard = Instant::now() + GUARD;
        let mut seq = 0u32;
        let mut buf = [0u8; 2048];
        // Phase 1: the delivered chunks, repeated until the receiver holds them all.
        'deliver: loop {
            ensure!(
                Instant::now() < guard,
                "receiver never reported {want} chunks"
            );
            sock.send_to(&sending, group)?;
            for c in (0..layout.chunks() as u32).filter(|c| !dropped.contains(c)) {
                let first = layout.first_symbol(c);
                for sym in first..first + layout.symbols_in(c) {
                    let r = layout.symbol_range(sym).context("symbol")?;
                    let payload = bytes
                        .get(r.start as usize..r.end as usize)
                        .context("payload")?;
                    let p = Packet::Data(Data {
                        session,
                        seq,
                        symbol: sym,
                        repair: false,
                        payload,
                    });
                    seq = seq.wrapping_add(1);
                    sock.send_to(&p.to_bytes(), group)?;
                }
            }
            // Reports come every STATUS_INTERVAL; NACKs for the dropped chunks are ignored.
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                if let Ok(Packet::Status(Status { have_chunks, .. })) =
                    Packet::parse(buf.get(..n).unwrap_or_default())
                {
                    if have_chunks >= want {
                        break 'deliver;
                    }
                }
            }
        }
        // Phase 2: the session ends with the dropped chunks never sent.
        while !stop.load(Ordering::SeqCst) {
            ensure!(Instant::now() < guard, "receiver never left the session");
            sock.send_to(&ending, group)?;
            let _ = sock.recv_from(&mut buf);
        }
        Ok(seq)
    }))
}

struct Run {
    result: Result<node_init::mcast::McastFetch, McastError>,
    requests: Vec<Request>,
    cache: Cache,
    l: LayerRef,
    bytes: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// One session with `DROPPED` never sent, against an HTTP server corrupting the byte at
/// `corrupt` (if any).
fn run(corrupt: Option<u64>) -> Result<Run> {
    let bytes = data();
    let l = layer(&bytes);
    let http = Http::start(l.url.clone(), bytes.clone(), corrupt)?;
    let client = Client::new(format!("127.0.0.1:{}", http.port).parse()?);
    let dir = tempfile::tempdir()?;
    let cache = Cache::open(dir.path())?;
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 77, 7, 7), 47007);
    let offer = MulticastOffer {
        layer: l.id,
        group,
        // Far beyond the test: the session's end, not the deadline, must end the receive.
        wait_secs: 600,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let tx = sender(group, &l, Arc::new(bytes.clone()), &DROPPED, stop.clone())?;
    let result = fetch_layer(&client, &cache, &l, &offer);
    stop.store(true, Ordering::SeqCst);
    let sent = tx
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    ensure!(sent > 0, "the sender sent no data");
    let requests = http.requests.lock().expect("lock").clone();
    Ok(Run {
        result,
        requests,
        cache,
        l,
        bytes,
        _dir: dir,
    })
}

fn expected_ranges(l: &LayerRef) -> Vec<Request> {
    DROPPED
        .iter()
        .map(|&c| {
            let r = chunk_range(u64::from(c), l.size, l.chunk_size);
            (l.url.clone(), Some((r.start, r.end - 1)))
        })
        .collect()
}

#[test]
fn chunks_the_session_never_sent_are_filled_by_range_requests() -> Result<()> {
    if !in_own_netns("chunks_the_session_never_sent_are_filled_by_range_requests")? {
        return Ok(());
    }
    let r = run(None)?;
    let done = r.result.context("fetch_layer")?;
    assert_eq!(done.outcome, Outcome::SessionEnded);
    assert_eq!(done.chunks_from_group, 10 - DROPPED.len() as u64);
    assert_eq!(done.chunks_by_http, DROPPED.len() as u64);
    let by_http: u64 = DROPPED
        .iter()
        .map(|&c| chunk_range(u64::from(c), r.l.size, CHUNK).count() as u64)
        .sum();
    assert_eq!(done.http_bytes, by_http);
    // Exactly one Range request per missing chunk, for exactly its bytes; no whole download.
    assert_eq!(r.requests, expected_ranges(&r.l));
    // The layer is in the cache, whole, and hashes to its id.
    let cached = std::fs::read(r.cache.layer_path(&r.l.id))?;
    assert_eq!(cached, r.bytes);
    assert_eq!(Digest::of(&cached), r.l.id);
    assert!(r.cache.verify_layer(&r.l)?.is_empty());
    assert!(!r.cache.partial_path(&r.l.id).exists());
    Ok(())
}

#[test]
fn a_corrupt_chunk_over_http_is_refused_and_nothing_is_committed() -> Result<()> {
    if !in_own_netns("a_corrupt_chunk_over_http_is_refused_and_nothing_is_committed")? {
        return Ok(());
    }
    // One byte of chunk 5 (the second one to fill) is wrong on the HTTP server.
    let bad = u64::from(5 * CHUNK + 100);
    let r = run(Some(bad))?;
    match r.result {
        Err(McastError::BadChunk { chunk: 5 }) => {}
        other => bail!("expected BadChunk for chunk 5, got {other:?}"),
    }
    // It stopped at the bad chunk: chunk 2, then chunk 5, nothing after.
    assert_eq!(r.requests, expected_ranges(&r.l)[..2].to_vec());
    assert!(!r.cache.layer_path(&r.l.id).exists());
    assert!(!r.cache.has_layer(&r.l));
    // The partial file keeps every verified chunk and never the corrupt bytes.
    let partial = std::fs::read(r.cache.partial_path(&r.l.id))?;
    assert_eq!(partial.len(), SIZE);
    for c in 0..10u32 {
        let range = chunk_range(u64::from(c), SIZE as u64, CHUNK);
        let (a, e) = (range.start as usize, range.end as usize);
        if c == 5 || c == 9 {
            assert!(
                partial[a..e].iter().all(|&b| b == 0),
                "chunk {c} was written unverified"
            );
        } else {
            assert_eq!(partial[a..e], r.bytes[a..e], "chunk {c}");
        }
    }
    Ok(())
}
