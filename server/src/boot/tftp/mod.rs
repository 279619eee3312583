//! TFTP, read-only: RFC 1350 with the option extension (RFC 2347), blksize (RFC 2348),
//! timeout and tsize (RFC 2349) and windowsize (RFC 7440).
//!
//! [`packet`] parses and serialises, [`session`] is the sans-IO transfer state machine,
//! [`server`] owns the port-69 socket and starts one transfer per request, and [`transfer`]
//! runs a transfer on its own thread around the session. Written here rather than taken
//! from the `tftp-server` crate (0.0.3: mio 0.6, no windowsize, no tokio) or `async-tftp`
//! (runs on its own async-io reactor beside tokio, follows symlinks out of the root, no
//! cancellation, no sans-IO core to property-test).

pub mod packet;
pub mod server;
pub mod session;
pub mod transfer;

pub use server::{TftpError, TftpOptions, TftpServer};
