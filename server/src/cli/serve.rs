//! `strata serve`: run the appliance. Reads the configuration, binds the sockets, makes sure
//! the built-in test image is in the store, and runs every service until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::app::Services;
use crate::boot::{dhcp, initramfs, tftp};
use crate::config::{Config, DhcpMode};
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
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
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
    let base_initramfs = config.boot.initramfs.clone().or_else(default_initramfs);
    let initramfs = match &base_initramfs {
        Some(base) => Some(initramfs::with_public_key(
            base,
            &public_hex,
            &config.data_dir.join("boot"),
        )?),
        None => {
            tracing::warn!("no initramfs: set boot.initramfs or run scripts/build-initramfs.sh");
            None
        }
    };
    // Nodes whose image records a kernel get it, with node-init's modules for it appended.
    let composer = base_initramfs.as_deref().map(|base| {
        Arc::new(initramfs::Composer::new(
            base,
            &public_hex,
            &config.data_dir.join("boot"),
        ))
    });

    let images: Arc<dyn ImageSource> = crate::images::open(&config).await?;
    let iscsi_key = key.clone();
    let orchestrator = crate::orchestrator::Orchestrator::open(
        &config.data_dir,
        key,
        images,
        crate::orchestrator::Options::from_config(&config),
    )
    .await
    .context("starting the orchestrator")?;
    let fleet = Arc::clone(&orchestrator.fleet);

    let http = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", config.http.listen))?;
    let http_addr = http.local_addr()?;
    let public_url = config.public_url();
    // iSCSI is bound before the HTTP state: diskless nodes' boot scripts name its portal.
    let iscsi = if config.iscsi.enabled {
        let listen = config.iscsi.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding iSCSI {listen}"))?;
        let portal = crate::iscsi::nodes::portal(&config, listener.local_addr()?)?;
        let luns = Arc::new(crate::iscsi::FleetLuns::new(
            Arc::clone(&fleet),
            config.iscsi.clone(),
            iscsi_key,
            config.data_dir.join("iscsi"),
            tokio::runtime::Handle::current(),
            portal,
        ));
        Some((listener, luns))
    } else {
        None
    };
    let state = HttpState {
        public_url: public_url.clone(),
        kernel,
        initramfs,
        cmdline: config.boot.cmdline.clone(),
        tftp_root: config.tftp.root.clone(),
        fleet: Arc::clone(&fleet),
        iscsi: iscsi.as_ref().map(|(_, luns)| Arc::clone(luns)),
        composer,
    };

    let shutdown = CancellationToken::new();
    let mut services = Services::new(shutdown.clone());
    let app = crate::http::router(state).merge(orchestrator.router());
    orchestrator.spawn(&mut services);
    services.spawn("http", move |token| async move {
        axum::serve(http, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
    });
    if config.tftp.enabled {
        let listen = config.tftp.listen;
        let socket = tokio::net::UdpSocket::bind(listen).await.with_context(|| {
            format!("binding TFTP {listen} (port 69 needs root or CAP_NET_BIND_SERVICE)")
        })?;
        let tftp_addr = socket.local_addr()?;
        let opts = tftp::TftpOptions {
            max_window_bytes: config.tftp.max_window_bytes,
            ..Default::default()
        };
        let server = tftp::TftpServer::new(socket, &config.tftp.root, opts)
            .with_context(|| format!("TFTP root {}", config.tftp.root.display()))?;
        services.spawn("tftp", move |token| server.run(token));
        tracing::info!(tftp = %tftp_addr, root = %config.tftp.root.display(), "TFTP on");
    }
    if config.dhcp.mode != DhcpMode::Off {
        start_dhcp(&config, &public_url, &fleet, &mut services).await?;
    }
    if let Some((listener, luns)) = iscsi {
        let iscsi_addr = listener.local_addr()?;
        let target =
            crate::iscsi::IscsiTarget::new(listener, luns, crate::iscsi::TargetOptions::default());
        services.spawn("iscsi", move |token| target.run(token));
        tracing::info!(iscsi = %iscsi_addr, chap = config.iscsi.chap, stateless = config.iscsi.stateless, "iSCSI on");
    }
    if config.multicast.enabled {
        let sched = crate::multicast::Scheduler::new(
            config.multicast.clone(),
            tokio::runtime::Handle::current(),
        );
        fleet.set_multicast(Arc::clone(&sched));
        services.spawn("multicast", move |token| sched.run(token));
        tracing::info!(group = %config.multicast.group, port = config.multicast.port, "multicast sessions offered in manifests");
    }
    if let Some(iface) = config.ra.interface.as_deref() {
        let ra = crate::boot::ra::RaResponder::bind(iface)
            .with_context(|| format!("router advertisements on {iface}"))?;
        services.spawn("ra", move |token| ra.run(token));
        tracing::info!(interface = iface, "answering IPv6 router solicitations");
    }
    tracing::info!(http = %http_addr, %public_url, "listening on {http_addr}");

    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
    services.run().await?;
    Ok(())
}

/// A UDP socket for a DHCP service: `SO_BROADCAST`, `SO_REUSEADDR` and bound to `iface`
/// (`SO_BINDTODEVICE`), so the service answers on the boot network only.
fn dhcp_socket(iface: &str, port: u16) -> anyhow::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let what = || format!("DHCP socket on {iface} port {port}");
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).with_context(what)?;
    socket.set_reuse_address(true).with_context(what)?;
    socket.set_broadcast(true).with_context(what)?;
    socket
        .bind_device(Some(iface.as_bytes()))
        .with_context(what)?;
    socket.set_nonblocking(true).with_context(what)?;
    socket
        .bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .with_context(what)?;
    tokio::net::UdpSocket::from_std(socket.into()).with_context(what)
}

/// Starts DHCP (full or proxy) as the configuration says. Clients it sees are recorded by
/// the fleet as discovered.
async fn start_dhcp(
    config: &Config,
    public_url: &str,
    fleet: &Arc<Fleet>,
    services: &mut Services,
) -> anyhow::Result<()> {
    let d = &config.dhcp;
    let (Some(iface), Some(server_ip)) = (d.interface.as_deref(), d.server_ip) else {
        anyhow::bail!("dhcp.interface and dhcp.server_ip are required");
    };
    let mut boot = dhcp::BootConfig::new(
        server_ip,
        format!("{public_url}/boot/node.ipxe?mac={{mac}}"),
    );
    boot.http_boot = dhcp::HttpBootUrls {
        x64: Some(format!("{public_url}/boot/file/ipxe.efi")),
        arm64: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<dhcp::Discovered>(1024);
    let discovered_fleet = Arc::clone(fleet);
    services.spawn("discovery", move |token| async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return Ok::<(), std::convert::Infallible>(()),
                seen = rx.recv() => match seen {
                    None => return Ok(()),
                    Some(seen) => {
                        // MacAddr prints the canonical form the fleet keys nodes by.
                        let mac = seen.mac.to_string();
                        tracing::debug!(%mac, arch = ?seen.arch, vendor = ?seen.vendor_class, user = ?seen.user_class, "DHCP client");
                        let _ = discovered_fleet.node_booting(&mac).await;
                    }
                }
            }
        }
    });
    match d.mode {
        DhcpMode::Off => {}
        DhcpMode::Full => {
            let subnet = dhcp::Subnet::from_netmask(server_ip, d.netmask)
                .with_context(|| format!("dhcp.netmask {} is not a contiguous mask", d.netmask))?;
            let (Some(start), Some(end)) = (d.pool_start, d.pool_end) else {
                anyhow::bail!("dhcp.pool_start and dhcp.pool_end are required in full mode");
            };
            let mut pool = dhcp::PoolConfig::new(subnet, start, end);
            pool.router = d.router;
            pool.dns = d.dns.clone();
            pool.lease_time = std::time::Duration::from_secs(u64::from(d.lease_secs));
            for r in &d.reservations {
                let mac = r
                    .mac
                    .parse()
                    .map_err(|_| anyhow::anyhow!("dhcp.reservations: bad MAC {:?}", r.mac))?;
                pool.reservations.push(dhcp::Reservation {
                    mac,
                    ip: r.ip,
                    hostname: r.hostname.clone(),
                });
            }
            let leases = dhcp::LeaseStore::open(&config.data_dir.join("leases.db")).await?;
            let socket = dhcp_socket(iface, 67)?;
            let server = dhcp::DhcpServer::new(socket, pool, boot, leases, Some(tx)).await?;
            services.spawn("dhcp", move |token| server.run(token));
        }
        DhcpMode::Proxy => {
            let socket = dhcp_socket(iface, 67)?;
            let pxe = dhcp_socket(iface, 4011)?;
            let server = dhcp::ProxyDhcpServer::new(socket, pxe, boot, Some(tx));
            services.spawn("proxy-dhcp", move |token| server.run(token));
        }
    }
    tracing::info!(interface = iface, mode = ?d.mode, "DHCP on");
    Ok(())
}
