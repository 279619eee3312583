//! The Strata appliance as a library: the `strata` binary parses its command line and calls in
//! here. Services take already-bound sockets so tests can bind port 0.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod boot;
pub mod build;
pub mod cli;
pub mod config;
pub mod db;
pub mod fleet;
pub mod http;
pub mod images;
pub mod iscsi;
pub mod keys;
pub mod multicast;
pub mod orchestrator;
pub mod store;
