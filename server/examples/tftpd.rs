//! A stand-alone Strata TFTP server, for benchmarks and manual tests:
//! `cargo run --release -p strata-server --example tftpd -- ROOT [ADDR] [MAX_WINDOWSIZE]
//! [MAX_WINDOW_BYTES]` (default address 127.0.0.1:6969; the window caps default to
//! [`TftpOptions::default`]'s). `strata serve` runs the same server as one of its
//! services.

use std::process::ExitCode;

use strata_server::boot::tftp::{TftpOptions, TftpServer};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let Some(root) = args.next() else {
        eprintln!("usage: tftpd ROOT [ADDR] [MAX_WINDOWSIZE] [MAX_WINDOW_BYTES]");
        return ExitCode::from(2);
    };
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:6969".into());
    let mut opts = TftpOptions::default();
    if let Some(w) = args.next().and_then(|w| w.parse().ok()) {
        opts.max_windowsize = w;
    }
    if let Some(b) = args.next().and_then(|b| b.parse().ok()) {
        opts.max_window_bytes = b;
    }
    let socket = match tokio::net::UdpSocket::bind(&addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tftpd: cannot bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match TftpServer::new(socket, &root, opts) {
        Ok(s) => s,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            eprintln!("tftpd: {e}: {cause}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {addr}");
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    match server.run(cancel).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tftpd: {e}");
            ExitCode::FAILURE
        }
    }
}
