//! The `strata` subcommands. Each module owns its clap arguments and its `run`.

pub mod image;
pub mod iscsi;
pub mod serve;
pub mod vhdx;
