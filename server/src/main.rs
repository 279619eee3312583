//! `strata`: the Strata appliance and its tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strata_server::cli;

/// Strata: image-based node provisioning (PXE, iSCSI, layered VHDX images).
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the appliance: boot services, image store, API.
    Serve(cli::serve::ServeArgs),
    /// Build, list, inspect, diff and collect images (see docs/images.md).
    #[command(subcommand)]
    Image(cli::image::ImageCmd),
    /// Inspect, check and convert VHDX files and chains.
    #[command(subcommand)]
    Vhdx(cli::vhdx::VhdxCmd),
    /// Run the iSCSI target on its own (docs/iscsi.md).
    #[command(subcommand)]
    Iscsi(cli::iscsi::IscsiCmd),
    /// Send or receive a file by reliable multicast (docs/multicast.md).
    #[command(subcommand)]
    Mcast(cli::mcast::McastCmd),
    /// List and change nodes through the API (docs/api.md).
    Nodes(cli::nodes::NodesArgs),
    /// List and change roles through the API.
    Roles(cli::roles::RolesArgs),
    /// Plan, approve, apply, pause, resume and abort rollouts; the event log.
    Rollout(cli::rollout::RolloutArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_) | Cmd::Iscsi(_)) {
        restore_sigpipe();
    }
    let result = match cli.cmd {
        Cmd::Serve(args) => cli::serve::run(args),
        Cmd::Vhdx(cmd) => cli::vhdx::run(cmd),
        Cmd::Iscsi(cmd) => cli::iscsi::run(cmd),
        Cmd::Mcast(cmd) => cli::mcast::run(cmd),
        Cmd::Image(cmd) => cli::image::run(cmd),
        Cmd::Nodes(args) => cli::nodes::run(args),
        Cmd::Roles(args) => cli::roles::run(args),
        Cmd::Rollout(args) => cli::rollout::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("strata: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lets a command whose output goes into a closed pipe (`strata image list | head`) end
/// quietly, as other command-line tools do, instead of panicking in `println!`. Rust starts
/// programs with SIGPIPE ignored; the default disposition ends the process on EPIPE. Sockets
/// are unaffected: std sends with MSG_NOSIGNAL. The long-running services (`serve`, `iscsi
/// serve`) keep SIGPIPE ignored.
fn restore_sigpipe() {
    // SAFETY: called once at start, before any thread is spawned; SIG_DFL is a valid
    // disposition for SIGPIPE and no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
