//! The multicast sender for layers (docs/multicast.md): [`session`] is the sans-IO protocol
//! core (scheduling, first pass, NACK repair with suppression, rate control, eviction,
//! completion), [`sender`] the socket loop that runs it, [`schedule`] the sessions
//! `strata serve` offers in manifests. Packets and the receiver live in
//! `wire::multicast`.

pub mod schedule;
pub mod sender;
pub mod session;

pub use schedule::{MulticastConfig, Scheduler, SessionInfo, SessionState};
pub use sender::{
    layer_info, open_sender_socket, run_session, SendError, SendReport, SenderControl,
    SocketOptions,
};
pub use session::{LayerInfo, SendStats, SenderConfig, SenderSession};
