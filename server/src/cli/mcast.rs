//! `strata mcast send|recv`: reliable multicast of one file without the rest of Strata, like
//! udpcast's udp-sender/udp-receiver (protocol: docs/multicast.md). Both print a JSON report on
//! stdout. `recv` exits 0 only when the file is whole and verified.
//!
//! `strata mcast sessions|start`: the sessions a running `strata serve` offers in manifests,
//! through its API (`/api/v1/multicast/sessions`).

use std::io::BufRead;
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use wire::multicast::net::{receive_file, Outcome, ReceiveConfig};
use wire::multicast::packet::DEFAULT_SYMBOL_SIZE;
use wire::multicast::Expect;

use super::client::{s, table, Client, ClientArgs};
use crate::multicast::{
    layer_info, open_sender_socket, run_session, SenderConfig, SenderControl, SocketOptions,
};

/// `strata mcast` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum McastCmd {
    /// Send FILE to a multicast group; a line on stdin starts the session at once.
    Send(SendArgs),
    /// Receive a file from a multicast group; exits 0 only when it is whole and verified.
    Recv(RecvArgs),
    /// List the multicast sessions a running server offers (live, then finished).
    Sessions {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start a running server's waiting session for a layer now (operator's command).
    Start {
        /// The layer (blake3, 64 hex digits).
        layer: wire::LayerId,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `strata mcast send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The file to send.
    pub file: PathBuf,
    /// Group address and port, e.g. 239.255.10.1:9000.
    #[arg(long)]
    pub group: SocketAddrV4,
    /// Interface to send on.
    #[arg(long)]
    pub iface: Option<String>,
    /// Start once this many receivers wait.
    #[arg(long, default_value_t = 1)]
    pub min_receivers: usize,
    /// Start after this many seconds whatever the receiver count.
    #[arg(long)]
    pub max_wait: Option<f64>,
    /// Rate ceiling in bit/s on the wire, with an optional k/M/G suffix.
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    pub rate: u64,
    /// Evict receivers still incomplete this many seconds after the first pass
    /// (default: the first pass's duration, at least 10 s).
    #[arg(long)]
    pub slow_bound: Option<f64>,
    /// Multicast TTL.
    #[arg(long, default_value_t = 1)]
    pub ttl: u32,
    /// Also deliver to receivers on this host (IP_MULTICAST_LOOP).
    #[arg(long)]
    pub loopback: bool,
    /// Payload bytes per data packet (1456 fills a 1500-byte MTU).
    #[arg(long, default_value_t = DEFAULT_SYMBOL_SIZE)]
    pub symbol_size: u16,
}

/// `strata mcast recv`.
#[derive(Debug, clap::Args)]
pub struct RecvArgs {
    /// Group address and port.
    #[arg(long)]
    pub group: SocketAddrV4,
    /// Output file (assembled in OUT.part, renamed when verified; a present OUT.part is
    /// resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Interface to join on.
    #[arg(long)]
    pub iface: Option<String>,
    /// Accept only a session for this layer id (blake3, 64 hex digits).
    #[arg(long)]
    pub layer: Option<wire::LayerId>,
    /// Give up after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// When a session ends with chunks missing, wait for the next session of the layer.
    #[arg(long)]
    pub wait_next: bool,
    /// Chunk buffer memory, MiB.
    #[arg(long, default_value_t = 128)]
    pub buffer_mib: usize,
}

/// Parses `1500m`, `1G`, `800M`, `50000k` or a plain number of bit/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1_000),
        Some((i, 'm' | 'M')) => (&s[..i], 1_000_000),
        Some((i, 'g' | 'G')) => (&s[..i], 1_000_000_000),
        _ => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("not a rate: {s:?}"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("not a rate: {s:?}"));
    }
    let bps = v * mult as f64;
    if !(8_000.0..=100e9).contains(&bps) {
        return Err(format!("rate {s:?} out of range (8k..100G bit/s)"));
    }
    Ok(bps as u64)
}

fn seconds(s: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("bad {what}: {s}"))
}

/// Runs a subcommand.
pub fn run(cmd: McastCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        McastCmd::Send(a) => send(a),
        McastCmd::Recv(a) => recv(a),
        McastCmd::Sessions { client } => {
            let c = Client::new(&client)?;
            let v = c.call("GET", "/api/v1/multicast/sessions", None)?;
            c.print(&v, session_rows);
            Ok(ExitCode::SUCCESS)
        }
        McastCmd::Start { layer, client } => {
            let c = Client::new(&client)?;
            let v = c.call(
                "POST",
                &format!("/api/v1/multicast/sessions/{layer}/start"),
                None,
            )?;
            c.print(&v, session_rows);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn send(a: SendArgs) -> anyhow::Result<ExitCode> {
    let info = layer_info(&a.file, a.symbol_size)?;
    let cfg = SenderConfig {
        rate_bps: a.rate,
        min_receivers: a.min_receivers,
        max_wait: a.max_wait.map(|s| seconds(s, "--max-wait")).transpose()?,
        slow_bound: a
            .slow_bound
            .map(|s| seconds(s, "--slow-bound"))
            .transpose()?,
        symbol_size: a.symbol_size,
        ..SenderConfig::default()
    };
    let sock = open_sender_socket(
        a.group,
        &SocketOptions {
            iface: a.iface.clone(),
            ttl: Some(a.ttl),
            loopback: a.loopback,
        },
    )?;
    let control = SenderControl::new();
    // The operator's start command: any line on stdin.
    {
        let control = control.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            if let Ok(n) = std::io::stdin().lock().read_line(&mut line) {
                if n > 0 {
                    control.start_now();
                }
            }
        });
    }
    let report = run_session(&sock, a.group, &a.file, info, cfg, &control)?;
    let s = &report.stats;
    let size = report.layer.layout.size();
    println!(
        "{}",
        json!({
            "session": report.session.to_string(),
            "layer": report.layer.id.to_hex(),
            "size": size,
            "data_packets": s.data_packets,
            "repair_packets": s.repair_packets,
            "control_packets": s.control_packets,
            "udp_bytes": s.udp_bytes,
            "frame_bytes": s.frame_bytes,
            "wire_ratio": report.wire_ratio(),
            "repairs_queued": s.repairs_queued,
            "repairs_suppressed": s.repairs_suppressed,
            "nacks": s.nacks,
            "receivers_done": s.receivers_done,
            "receivers_evicted": s.receivers_evicted,
            "receivers_lost": s.receivers_lost,
            "send_seconds": s.send_time.as_secs_f64(),
            "min_rate_bps": s.min_rate_bps,
        })
    );
    if s.receivers_done > 0 && s.receivers_evicted == 0 && s.receivers_lost == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "strata: session ended with {} receivers done, {} evicted, {} lost",
            s.receivers_done, s.receivers_evicted, s.receivers_lost
        );
        Ok(ExitCode::from(2))
    }
}

fn recv(a: RecvArgs) -> anyhow::Result<ExitCode> {
    let expect = match a.layer {
        Some(id) => Expect::Layer(id),
        None => Expect::Any,
    };
    let mut cfg = ReceiveConfig::new(a.group, expect);
    cfg.iface = a.iface;
    cfg.wait_next_session = a.wait_next;
    cfg.max_buffer_bytes = a.buffer_mib.max(1) << 20;
    if let Some(t) = a.timeout {
        cfg.deadline = Some(Instant::now() + seconds(t, "--timeout")?);
    }
    let r = receive_file(&cfg, &a.out).with_context(|| format!("receiving {}", a.out.display()))?;
    let s = &r.stats;
    println!(
        "{}",
        json!({
            "outcome": format!("{:?}", r.outcome),
            "layer": r.layer.map(|l| l.to_hex()),
            "size": r.layout.map(|l| l.size()),
            "missing_chunks": r.missing.len(),
            "packets": s.packets,
            "bytes": s.bytes,
            "data_packets": s.data_packets,
            "duplicates": s.duplicates,
            "malformed": s.malformed,
            "foreign": s.foreign,
            "bad_symbols": s.bad_symbols,
            "bad_chunks": s.bad_chunks,
            "deferred": s.deferred,
            "nacks": s.nacks,
            "resumed_chunks": s.resumed_chunks,
            "chunks_written": s.chunks_written,
            "rcvbuf": r.rcvbuf,
        })
    );
    match r.outcome {
        Outcome::Complete => Ok(ExitCode::SUCCESS),
        other => {
            eprintln!(
                "strata: {} incomplete ({other:?}): {} chunks missing; partial data kept in {}",
                a.out.display(),
                r.missing.len(),
                wire::multicast::net::part_path(&a.out).display()
            );
            Ok(ExitCode::from(2))
        }
    }
}

/// Sessions as a table: id, state, layer, group, size, nodes offered, and the counters.
fn session_rows(v: &serde_json::Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let c = &r["counters"];
                    let offered = r["offered_to"].as_array().map_or(0, |o| o.len());
                    vec![
                        s(&r["id"]),
                        s(&r["state"]),
                        s(&r["layer"]).chars().take(16).collect(),
                        s(&r["group"]),
                        s(&r["size"]),
                        offered.to_string(),
                        s(&c["receivers_done"]),
                        s(&c["repair_packets"]),
                        c["wire_ratio"]
                            .as_f64()
                            .map_or_else(|| "-".into(), |w| format!("{w:.3}")),
                        s(&r["error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID", "STATE", "LAYER", "GROUP", "BYTES", "OFFERED", "DONE", "REPAIRS", "WIRE", "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_rate("1500m"), Ok(1_500_000_000));
        assert_eq!(parse_rate("64k"), Ok(64_000));
        assert_eq!(parse_rate("100000"), Ok(100_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5M").is_err());
        assert!(parse_rate("1k").is_err());
    }
}
