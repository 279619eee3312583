//! `strata serve`: run the appliance.

use std::process::ExitCode;

/// Arguments of `strata serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
}

/// Runs the appliance until interrupted.
pub fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("serve: not built yet")
}
