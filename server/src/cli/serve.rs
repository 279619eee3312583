//! `strata serve`: run the appliance. Reads the configuration, binds the sockets, makes sure
//! the built-in test image is in the store, and runs every service until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Sockets};
use crate::boot::initramfs;
use crate::config::Config;
use crate::fleet::{Fleet, ImageSource};
use crate::http::HttpState;
use crate::keys;

/// Arguments of `strata serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML; see docs/configuration.md). Without one, the embedded
    /// defaults apply.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address (overrides `http.listen`).
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
}

/// The Strata cache `scripts/setup.sh` fills (kernel) and `scripts/build-initramfs.sh` writes.
fn strata_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("strata")
}

/// The newest `vmlinuz-*` unpacked by `scripts/setup.sh`.
fn default_kernel() -> Option<PathBuf> {
    let dir = strata_cache().join("kernel/root/boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    found.sort();
    found.pop()
}

fn default_initramfs() -> Option<PathBuf> {
    let path = strata_cache().join("initramfs/node-init.cpio.gz");
    path.exists().then_some(path)
}

/// Runs the appliance until interrupted.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.http_listen {
        config.http.listen = listen;
    }
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let key = keys::load_or_create(&config.data_dir.join("keys"))?;
    let public_hex = keys::public_hex(&key.verifying_key());

    let kernel = config.boot.kernel.clone().or_else(default_kernel);
    if kernel.is_none() {
        tracing::warn!("no kernel: set boot.kernel or run scripts/setup.sh; nodes cannot boot");
    }
    let initramfs = match config.boot.initramfs.clone().or_else(default_initramfs) {
        Some(base) => Some(initramfs::with_public_key(&base, &public_hex, &config.data_dir.join("boot"))?),
        None => {
            tracing::warn!("no initramfs: set boot.initramfs or run scripts/build-initramfs.sh");
            None
        }
    };

    let images: Arc<dyn ImageSource> = crate::images::open(&config, key.clone()).await?;
    let fleet = Arc::new(Fleet::new(key, images, config.boot.default_role.clone()));

    let http = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", config.http.listen))?;
    let http_addr = http.local_addr()?;
    let public_url = config.public_url();
    let state = HttpState {
        public_url: public_url.clone(),
        kernel,
        initramfs,
        cmdline: config.boot.cmdline.clone(),
        fleet,
    };
    tracing::info!(http = %http_addr, %public_url, "listening on {http_addr}");

    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        signal_token.cancel();
    });
    app::run(Sockets { http }, state, shutdown).await?;
    Ok(())
}
