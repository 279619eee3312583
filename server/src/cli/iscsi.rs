//! `strata iscsi serve`: the iSCSI target on its own, for tests, benchmarks and users who
//! want to serve a VHDX chain (or a raw image) without the rest of the appliance.
//! docs/iscsi.md has examples.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::iscsi::{
    Backing, ChapCredentials, IscsiTarget, RawLun, StaticLuns, TargetAccess, TargetOptions, VhdxLun,
};

/// `strata iscsi` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum IscsiCmd {
    /// Serve LUNs over iSCSI until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Print a node's target, initiator name and CHAP credentials under `strata serve`'s
    /// configuration and key (for an operator setting up iPXE or open-iscsi by hand).
    Node(NodeArgs),
}

/// Arguments of `strata iscsi node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node's MAC.
    #[arg(long)]
    pub mac: String,
    /// `strata serve`'s configuration file (for `[iscsi]` and `data_dir`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`): the server key is read from `keys/` in it.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Prints `target=`, `initiator=`, `chap_user=`, `chap_secret=` and `stateless=` lines.
fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => crate::config::Config::load(path)?,
        None => crate::config::Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let mac: wire::dhcp::MacAddr = args.mac.parse()?;
    let keys = config.data_dir.join("keys");
    if !keys.join("server.key").is_file() {
        bail!(
            "no server key in {}: run `strata serve` with this data directory first",
            keys.display()
        );
    }
    let key = crate::keys::load_or_create(&keys)?;
    let c = crate::iscsi::node_credentials(&config.iscsi, &key, &mac);
    println!("target={}", c.target);
    println!("initiator={}", c.initiator);
    if let Some(chap) = &c.chap {
        println!("chap_user={}", chap.user);
        println!("chap_secret={}", String::from_utf8_lossy(&chap.secret));
    }
    println!("stateless={}", c.stateless);
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `strata iscsi serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:3260")]
    pub listen: SocketAddr,
    /// A target: `IQN=TOP.vhdx` (chain followed by parent locators, top writable),
    /// `IQN=BASE.vhdx,ROLE.vhdx,NODE.vhdx` (base first, last writable) or `IQN=raw:FILE`.
    /// Repeat for several targets.
    #[arg(long = "lun", required = true, value_name = "IQN=SPEC")]
    pub luns: Vec<String>,
    /// Require one-way CHAP with this `USER:SECRET` on every target.
    #[arg(long, value_name = "USER:SECRET")]
    pub chap: Option<String>,
    /// Answer mutual CHAP with this `USER:SECRET`.
    #[arg(long, value_name = "USER:SECRET", requires = "chap")]
    pub mutual_chap: Option<String>,
    /// Only these initiator names may log in (repeatable; default: any).
    #[arg(long = "initiator", value_name = "IQN")]
    pub initiators: Vec<String>,
    /// Serve VHDX chains read-only.
    #[arg(long, conflicts_with = "stateless")]
    pub read_only: bool,
    /// Stateless: each session writes to a scratch layer discarded at logout; the files
    /// named stay untouched.
    #[arg(long)]
    pub stateless: bool,
    /// Where stateless scratch layers live.
    #[arg(long, default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
    /// Most connections at once.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
}

fn creds(s: &str) -> anyhow::Result<ChapCredentials> {
    let Some((user, secret)) = s.split_once(':') else {
        bail!("CHAP credentials must be USER:SECRET")
    };
    if user.is_empty() || secret.is_empty() {
        bail!("CHAP user and secret must not be empty");
    }
    Ok(ChapCredentials {
        user: user.to_owned(),
        secret: secret.as_bytes().to_vec(),
    })
}

/// Builds the targets named on the command line.
pub fn build_luns(args: &ServeArgs) -> anyhow::Result<StaticLuns> {
    let access = TargetAccess {
        chap: args.chap.as_deref().map(creds).transpose()?,
        target_chap: args.mutual_chap.as_deref().map(creds).transpose()?,
        initiators: args.initiators.clone(),
    };
    let mut luns = StaticLuns::new();
    for spec in &args.luns {
        let Some((iqn, what)) = spec.split_once('=') else {
            bail!("--lun {spec}: expected IQN=SPEC")
        };
        if !iqn.starts_with("iqn.") && !iqn.starts_with("eui.") && !iqn.starts_with("naa.") {
            bail!("--lun {spec}: {iqn} is not an iSCSI name (iqn., eui. or naa.)");
        }
        let backing = if let Some(raw) = what.strip_prefix("raw:") {
            let lun = RawLun::open(raw.as_ref(), !args.read_only)
                .with_context(|| format!("opening {raw}"))?;
            Backing::Shared(Arc::new(lun))
        } else {
            let paths: Vec<PathBuf> = what.split(',').map(PathBuf::from).collect();
            if args.stateless {
                let paths = if paths.len() == 1 {
                    let chain =
                        vhdx::Chain::open(&paths[0]).with_context(|| format!("opening {what}"))?;
                    chain
                        .layers()
                        .iter()
                        .map(|l| l.path().to_path_buf())
                        .collect()
                } else {
                    paths
                };
                // Fail now, not at the first login.
                VhdxLun::open_stateless(&paths, &args.scratch_dir)
                    .with_context(|| format!("opening {what}"))?;
                Backing::Stateless {
                    paths,
                    scratch_dir: args.scratch_dir.clone(),
                }
            } else {
                let lun = match (paths.as_slice(), args.read_only) {
                    ([top], false) => VhdxLun::open_top(top),
                    ([top], true) => vhdx::Chain::open(top).map_err(Into::into).and_then(|c| {
                        VhdxLun::open_read_only(
                            &c.layers()
                                .iter()
                                .map(|l| l.path().to_path_buf())
                                .collect::<Vec<_>>(),
                        )
                    }),
                    (all, false) => VhdxLun::open_node(all),
                    (all, true) => VhdxLun::open_read_only(all),
                }
                .with_context(|| format!("opening {what}"))?;
                Backing::Shared(Arc::new(lun))
            }
        };
        luns.insert(iqn, access.clone(), backing);
    }
    Ok(luns)
}

/// Runs a `strata iscsi` subcommand.
pub fn run(cmd: IscsiCmd) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        IscsiCmd::Serve(args) => args,
        IscsiCmd::Node(args) => return node(args),
    };
    let luns = build_luns(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to learn the port when listening on port 0.
        println!("listening on {addr}");
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            stop.cancel();
        });
        let opts = TargetOptions {
            max_connections: args.max_connections,
            ..TargetOptions::default()
        };
        IscsiTarget::new(listener, Arc::new(luns), opts)
            .run(cancel)
            .await
            .context("iSCSI target")?;
        Ok(ExitCode::SUCCESS)
    })
}
