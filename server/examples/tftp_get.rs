//! A fast TFTP read client for benchmarks: RFC 1350 with blksize, tsize and windowsize
//! (RFC 2348/2349/7440), built the way a client that wants windows to pay off must be: a
//! receive buffer that holds a whole window (`SO_RCVBUF`, 4 MiB asked, capped by
//! `net.core.rmem_max`), every datagram already queued taken with one `recvmmsg`, and the
//! in-order blocks of that batch written to the output file with one `writev`, as they arrive
//! (atftp writes each block too). `scripts/bench-tftp.sh` runs it beside atftp against both
//! servers, so each server is also measured with a client that is not the limit.
//!
//! `cargo run --release -p strata-server --example tftp_get -- HOST:PORT FILE [BLKSIZE]
//! [WINDOWSIZE] [--out PATH] [--rcvbuf BYTES]` writes the file to PATH (default: the file's
//! name in the current directory; `/dev/null` discards it) and prints `bytes seconds MB/s`, the
//! time running from the request to the last byte written (process start-up excluded).
//! Gaps follow RFC 7440 §4: on an out-of-order block the client acknowledges the last block
//! in order, once per gap; on a receive timeout it acknowledges it again (the server resends
//! the window from there).

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use strata_server::boot::tftp::packet::{Mode, Packet, Request, TftpOption};

/// Most datagrams taken by one `recvmmsg`.
const BATCH: usize = 64;
/// Receive timeouts in a row before the client gives up.
const MAX_TIMEOUTS: u32 = 10;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tftp_get: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes `--name VALUE` from `args` and returns VALUE.
fn take_flag(args: &mut Vec<String>, name: &str) -> Result<Option<String>> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    let value = args
        .get(i + 1)
        .with_context(|| format!("{name} needs a value"))?
        .clone();
    args.drain(i..i + 2);
    Ok(Some(value))
}

fn run() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let out = take_flag(&mut args, "--out")?;
    let rcvbuf: usize = take_flag(&mut args, "--rcvbuf")?
        .map_or(Ok(4 << 20), |b| b.parse())
        .context("--rcvbuf")?;
    let [server, file, rest @ ..] = args.as_slice() else {
        bail!(
            "usage: tftp_get HOST:PORT FILE [BLKSIZE] [WINDOWSIZE] [--out PATH] [--rcvbuf BYTES]"
        );
    };
    let blksize: u16 = rest
        .first()
        .map_or(Ok(512), |b| b.parse())
        .context("blksize")?;
    let windowsize: u16 = rest
        .get(1)
        .map_or(Ok(1), |w| w.parse())
        .context("windowsize")?;
    let server: SocketAddr = server
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("no address for {server}"))?;
    let out_path = out.unwrap_or_else(|| {
        std::path::Path::new(file).file_name().map_or_else(
            || "tftp_get.out".into(),
            |n| n.to_string_lossy().into_owned(),
        )
    });
    let mut out = File::create(&out_path).with_context(|| format!("creating {out_path}"))?;
    let (bytes, took) = fetch(server, file, blksize, windowsize, rcvbuf, &mut out)?;
    out.flush()?;
    drop(out);
    let secs = took.as_secs_f64();
    println!("{bytes} {secs:.6} {:.1}", bytes as f64 / secs / 1e6);
    Ok(())
}

/// What one received datagram does to the transfer.
enum Got {
    /// Nothing to write (OACK, duplicate, out of order).
    Nothing,
    /// Bytes `4..len` of the datagram's buffer are the next data in order.
    Data { len: usize, last: bool },
}

/// The client's transfer state.
struct Client {
    socket: UdpSocket,
    blksize: usize,
    windowsize: u16,
    /// Next block expected (wire number).
    expect: u16,
    /// Blocks received in order since the last ACK.
    in_window: u16,
    /// The current gap was acknowledged already.
    gap_acked: bool,
}

impl Client {
    fn ack(&self, block: u16) -> Result<()> {
        self.socket
            .send(&Packet::Ack { block }.to_bytes())
            .context("sending an ACK")?;
        Ok(())
    }

    /// Handles one datagram.
    fn on_datagram(&mut self, pkt: &[u8]) -> Result<Got> {
        match pkt {
            [0, 6, ..] => {
                // OACK: take what the server granted, then ACK 0.
                let Packet::Oack { options } = Packet::parse(pkt)? else {
                    bail!("bad OACK")
                };
                for o in options {
                    match o {
                        TftpOption::BlkSize(b) => self.blksize = usize::from(b),
                        TftpOption::WindowSize(w) => self.windowsize = w.max(1),
                        _ => {}
                    }
                }
                self.ack(0)?;
                Ok(Got::Nothing)
            }
            [0, 3, hi, lo, payload @ ..] => {
                let block = u16::from_be_bytes([*hi, *lo]);
                if block != self.expect {
                    // Out of order (a loss before it) or a repeat: ACK the last block in order,
                    // once per gap; the server sends the window again from there.
                    if !self.gap_acked && block != self.expect.wrapping_sub(1) {
                        self.ack(self.expect.wrapping_sub(1))?;
                        self.gap_acked = true;
                        self.in_window = 0;
                    }
                    return Ok(Got::Nothing);
                }
                ensure!(
                    payload.len() <= self.blksize,
                    "block {block} longer than blksize"
                );
                self.gap_acked = false;
                self.expect = self.expect.wrapping_add(1);
                self.in_window += 1;
                let last = payload.len() < self.blksize;
                if last || self.in_window >= self.windowsize {
                    self.ack(block)?;
                    self.in_window = 0;
                }
                Ok(Got::Data {
                    len: pkt.len(),
                    last,
                })
            }
            _ => bail!("server: {:?}", Packet::parse(pkt)),
        }
    }
}

fn fetch(
    server: SocketAddr,
    file: &str,
    blksize: u16,
    windowsize: u16,
    rcvbuf: usize,
    out: &mut File,
) -> Result<(u64, Duration)> {
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any).context("bind")?;
    // Room for a whole window (capped by net.core.rmem_max).
    socket2::SockRef::from(&socket).set_recv_buffer_size(rcvbuf)?;
    let got = socket2::SockRef::from(&socket).recv_buffer_size()?;
    if got < rcvbuf {
        eprintln!(
            "tftp_get: receive buffer {got} bytes, not {rcvbuf} (net.core.rmem_max): large \
             windows may overflow it"
        );
    }
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
    // One buffer per datagram of a batch, each large enough for any blksize.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; 65_536]).collect();
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut lens = Vec::with_capacity(BATCH);
    let mut runs: Vec<(usize, usize)> = Vec::with_capacity(BATCH);
    // The transfer's time: from the request to the last byte written.
    let started = Instant::now();
    socket
        .send_to(&rrq, server)
        .context("sending the request")?;
    // The first answer names the server's transfer port.
    let mut first = vec![0u8; 65_536];
    let (n, peer) = socket.recv_from(&mut first).context("no answer")?;
    socket.connect(peer)?;
    let mut c = Client {
        socket,
        blksize: 512,
        windowsize: 1,
        expect: 1,
        in_window: 0,
        gap_acked: false,
    };
    let mut total = 0u64;
    if let Got::Data { len, last } = c.on_datagram(first.get(..n).unwrap_or_default())? {
        out.write_all(first.get(4..len).unwrap_or_default())?;
        total += (len - 4) as u64;
        if last {
            return Ok((total, started.elapsed()));
        }
    }
    let mut timeouts = 0;
    let fd = c.socket.as_raw_fd();
    loop {
        lens.clear();
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(b.as_mut_slice())])
                .collect();
            // Blocks for the first datagram (up to the socket's receive timeout), then takes
            // whatever else is queued.
            match recvmmsg(
                fd,
                &mut headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(msgs) => lens.extend(msgs.map(|m| m.bytes)),
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("receiving"),
            }
        }
        if lens.is_empty() {
            timeouts += 1;
            ensure!(timeouts < MAX_TIMEOUTS, "server stopped sending");
            // Re-acknowledge the last block in order: the server resends from there.
            c.ack(c.expect.wrapping_sub(1))?;
            c.in_window = 0;
            continue;
        }
        timeouts = 0;
        runs.clear();
        let mut done = false;
        for (i, &n) in lens.iter().enumerate() {
            let pkt = bufs.get(i).and_then(|b| b.get(..n)).unwrap_or_default();
            if let Got::Data { len, last } = c.on_datagram(pkt)? {
                runs.push((i, len));
                if last {
                    done = true;
                    break;
                }
            }
        }
        // The batch's in-order payloads, written with one writev.
        let mut slices: Vec<IoSlice<'_>> = runs
            .iter()
            .filter_map(|&(i, len)| bufs.get(i).and_then(|b| b.get(4..len)))
            .filter(|s| !s.is_empty())
            .map(IoSlice::new)
            .collect();
        total += slices.iter().map(|s| s.len() as u64).sum::<u64>();
        let mut rest = slices.as_mut_slice();
        while !rest.is_empty() {
            let n = out.write_vectored(rest).context("writing the output")?;
            ensure!(n > 0, "output file refused data");
            IoSlice::advance_slices(&mut rest, n);
        }
        if done {
            return Ok((total, started.elapsed()));
        }
    }
}
