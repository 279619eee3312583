//! The `strata` subcommands. Each module owns its clap arguments and its `run`.

pub mod client;
pub mod image;
pub mod iscsi;
pub mod mcast;
pub mod nodes;
pub mod roles;
pub mod rollout;
pub mod serve;
pub mod vhdx;
