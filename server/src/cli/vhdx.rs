//! `strata vhdx ...`: inspect, check and convert VHDX files and chains.

use std::process::ExitCode;

/// `strata vhdx` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VhdxCmd {
    /// Print a VHDX file's structure as JSON.
    Info {
        /// The VHDX file.
        file: std::path::PathBuf,
    },
}

/// Runs a `strata vhdx` subcommand.
pub fn run(cmd: VhdxCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        VhdxCmd::Info { file } => anyhow::bail!("{}: not yet readable", file.display()),
    }
}
