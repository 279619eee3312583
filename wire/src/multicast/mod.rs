//! Reliable multicast of layers (docs/multicast.md): the packet formats both ends speak, the
//! receiver's sans-IO core, and the blocking receiver node-init and `strata mcast recv` call.
//!
//! The sender lives in the server (`strata_server::multicast`).

pub mod net;
pub mod packet;
pub mod receiver;

pub use net::{receive, receive_file, receive_on, Outcome, ReceiveConfig, Received, RecvError};
pub use packet::{Layout, Packet, PacketError, SessionId};
pub use receiver::{Expect, RecvStats};
