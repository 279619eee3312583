//! The iSCSI target (RFC 7143): serves each node's VHDX chain as a LUN for diskless boot,
//! writing only into that node's own layer.
//!
//! - [`pdu`]: PDU framing, typed BHS, CRC32C digests.
//! - [`text`]: key=value text segments.
//! - [`login`]: login stages, CHAP, operational negotiation.
//! - [`scsi`]: the SPC-4/SBC-3 commands and sense data.
//! - [`session`]: one connection's full feature phase, sans-IO.
//! - [`lun`]: LUN backings (VHDX chains, raw files), target names, [`lun::LunProvider`].
//! - [`nodes`]: the appliance's targets, one per fleet node ([`nodes::FleetLuns`]).
//! - [`target`]: the tokio TCP server, [`IscsiTarget`].
//!
//! docs/iscsi.md describes the design, the peers it is tested against and its limits.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod login;
pub mod lun;
pub mod nodes;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod target;
pub mod text;

pub use lun::{
    node_initiator_iqn, node_target_iqn, Backing, BlockDevice, ChapCredentials, LunError,
    LunProvider, RawLun, StaticLuns, TargetAccess, VhdxLun,
};
pub use nodes::{node_credentials, FleetLuns, NodeCredentials};
pub use target::{IscsiTarget, TargetOptions};

/// Entry points for the fuzz targets in `server/fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use super::pdu::{Bhs, Digests, Pdu, BHS_LEN};
    use super::text::TextPairs;

    /// Parses `data` as a PDU (every digest setting); whatever parses must serialise and
    /// parse back to the same value. Returns false if a round trip changed a value.
    pub fn pdu_roundtrip(data: &[u8]) -> bool {
        let mut ok = true;
        for (header, dg) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = Digests { header, data: dg };
            if let Ok((pdu, _)) = Pdu::parse(data, d, 1 << 24) {
                let again = Pdu::parse(&pdu.to_bytes(d), d, 1 << 24);
                ok &= again.is_ok_and(|(p, _)| p == pdu);
            }
        }
        if let Ok(bhs) = Bhs::parse(data) {
            let raw = bhs.to_bytes(0, 0);
            ok &= raw.len() == BHS_LEN && Bhs::parse(&raw).is_ok_and(|b| b == bhs);
        }
        ok
    }

    /// Parses `data` as a text segment; whatever parses must serialise and parse back.
    pub fn text_roundtrip(data: &[u8]) -> bool {
        match TextPairs::parse(data) {
            Ok(p) => TextPairs::parse(&p.to_bytes()).is_ok_and(|q| q == p),
            Err(_) => true,
        }
    }
}
