//! The Strata appliance as a library: the `strata` binary parses its command line and calls in
//! here. Services take already-bound sockets so tests can bind port 0.
#![forbid(unsafe_code)]

pub mod boot;
pub mod cli;
