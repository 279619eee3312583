//! A lean TFTP read client for benchmarks: RFC 1350 with blksize, tsize and windowsize
//! (RFC 2348/2349/7440), the file kept in memory, so the client costs one `recv` per block
//! and one `send` per window. `scripts/bench-tftp.sh` runs it beside atftp against both
//! servers, to show what the servers do when the client is not the limit.
//!
//! `cargo run --release -p strata-server --example tftp_get -- HOST:PORT FILE [BLKSIZE]
//! [WINDOWSIZE] [--compare LOCAL]` prints `bytes seconds MB/s`; with `--compare` the received
//! bytes must equal LOCAL's (exit 1 otherwise).

use std::net::UdpSocket;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use strata_server::boot::tftp::packet::{Mode, Packet, Request, TftpOption};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tftp_get: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let compare = match args.iter().position(|a| a == "--compare") {
        Some(i) => {
            let path = args.get(i + 1).context("--compare needs a file")?.clone();
            args.drain(i..i + 2);
            Some(path)
        }
        None => None,
    };
    let [server, file, rest @ ..] = args.as_slice() else {
        bail!("usage: tftp_get HOST:PORT FILE [BLKSIZE] [WINDOWSIZE] [--compare LOCAL]");
    };
    let blksize: u16 = rest
        .first()
        .map_or(Ok(512), |b| b.parse())
        .context("blksize")?;
    let windowsize: u16 = rest
        .get(1)
        .map_or(Ok(1), |w| w.parse())
        .context("windowsize")?;
    let started = Instant::now();
    let data = fetch(server, file, blksize, windowsize)?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(path) = compare {
        let want = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
        ensure!(
            want == data,
            "received {} bytes that differ from {path}",
            data.len()
        );
    }
    println!(
        "{} {:.6} {:.1}",
        data.len(),
        secs,
        data.len() as f64 / secs / 1e6
    );
    Ok(())
}

fn fetch(server: &str, file: &str, blksize: u16, windowsize: u16) -> Result<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("bind")?;
    // Room for a window of large blocks (capped by net.core.rmem_max).
    socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut options = vec![TftpOption::TSize(0)];
    if blksize != 512 {
        options.push(TftpOption::BlkSize(blksize));
    }
    if windowsize > 1 {
        options.push(TftpOption::WindowSize(windowsize));
    }
    let rrq = Packet::Rrq(Request {
        filename: file.into(),
        mode: Mode::Octet,
        options,
    })
    .to_bytes();
    socket
        .send_to(&rrq, server)
        .context("sending the request")?;
    let mut buf = vec![0u8; 65_536];
    let (n, peer) = socket.recv_from(&mut buf).context("no answer")?;
    socket.connect(peer)?;
    let (mut blksize, mut windowsize) = (512usize, 1u16);
    let mut data = Vec::new();
    let mut first = Some(n);
    let mut expect: u16 = 1;
    let mut in_window = 0u16;
    let mut gap_acked = false;
    let mut timeouts = 0;
    loop {
        let n = match first.take() {
            Some(n) => n,
            None => match socket.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    timeouts += 1;
                    ensure!(timeouts < 10, "server stopped sending");
                    // Re-acknowledge the last block in order: the server resends from there.
                    socket.send(
                        &Packet::Ack {
                            block: expect.wrapping_sub(1),
                        }
                        .to_bytes(),
                    )?;
                    in_window = 0;
                    continue;
                }
                Err(e) => return Err(e).context("receiving"),
            },
        };
        let pkt = buf.get(..n).context("datagram")?;
        match pkt {
            [0, 6, ..] => {
                // OACK: take what the server granted, then ACK 0.
                let Packet::Oack { options } = Packet::parse(pkt)? else {
                    bail!("bad OACK")
                };
                for o in options {
                    match o {
                        TftpOption::BlkSize(b) => blksize = usize::from(b),
                        TftpOption::WindowSize(w) => windowsize = w,
                        TftpOption::TSize(t) => {
                            data.reserve(usize::try_from(t.min(1 << 30)).unwrap_or(0))
                        }
                        _ => {}
                    }
                }
                socket.send(&Packet::Ack { block: 0 }.to_bytes())?;
            }
            [0, 3, hi, lo, payload @ ..] => {
                let block = u16::from_be_bytes([*hi, *lo]);
                if block != expect {
                    // Out of order (a loss before it): ACK the last block in order, once per
                    // gap; the server sends the window again from there (RFC 7440 §4).
                    if !gap_acked {
                        socket.send(
                            &Packet::Ack {
                                block: expect.wrapping_sub(1),
                            }
                            .to_bytes(),
                        )?;
                        gap_acked = true;
                        in_window = 0;
                    }
                    continue;
                }
                gap_acked = false;
                timeouts = 0;
                data.extend_from_slice(payload);
                expect = expect.wrapping_add(1);
                in_window += 1;
                let last = payload.len() < blksize;
                if last || in_window == windowsize {
                    socket.send(&Packet::Ack { block }.to_bytes())?;
                    in_window = 0;
                }
                if last {
                    return Ok(data);
                }
            }
            _ => bail!("server: {:?}", Packet::parse(pkt)),
        }
    }
}
