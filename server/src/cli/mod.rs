//! The `strata` subcommands. Each module owns its clap arguments and its `run`.

pub mod serve;
pub mod vhdx;
