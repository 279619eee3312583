//! The VHDX format (MS-VHDX v1.0, "[MS-VHDX]: Virtual Hard Disk v2 (VHDX) File Format"):
//! fixed, dynamic and differencing disks, parent chains, the log. Synchronous, no
//! network, no unsafe code.
//!
//! - [`Vhdx::open`] validates every structure of one file (file identifier, both headers,
//!   both region tables, metadata, the whole BAT read at once) before use;
//!   [`Vhdx::open_writable`] also replays a non-empty log.
//! - [`Chain::open`] follows parent locators from a top file down to the base;
//!   [`Chain::from_paths`] takes the order from the caller. Both check parent linkage.
//! - [`Chain::read_at`], [`Chain::write_at`] (top file only), [`Chain::map`] (extents for a
//!   device-mapper linear table).
//! - [`create`], [`create_differencing`], [`from_raw`], [`differencing_from_blocks`]: new files, written to a temporary
//!   and renamed into place; reproducible with [`CreateOptions::deterministic`].
//!
//! docs/vhdx.md describes the write ordering that keeps files consistent across a crash.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod bat;
mod chain;
mod crc;
mod create;
mod error;
mod export;
mod file;
mod guid;
mod header;
mod io;
pub mod log;
mod metadata;
mod parent;
mod region;

pub use bat::BlockState;
pub use chain::{Chain, Extent, Source, MAX_CHAIN_DEPTH};
pub use create::{
    create, create_differencing, differencing_from_blocks, from_raw, from_raw_reader, ConvertStats,
    CreateOptions,
};
pub use error::{ErrorKind, MetadataItem, Result, Structure, VhdxError};
pub use export::to_raw;
pub use file::{DiskType, Vhdx};
pub use header::Header;
pub use metadata::Metadata;
pub use parent::ParentLocator;
pub use region::Region;
pub use uuid::Uuid;

/// Entry points for the fuzz targets in `vhdx/fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// Parses `data` as each structure that the engine both reads and writes (header,
    /// region table, metadata region, parent locator, log); for each that parses,
    /// serialises it and parses again. Returns false if a round trip changed a value.
    pub fn roundtrip(data: &[u8]) -> bool {
        let p = Path::new("fuzz");
        let mut ok = true;
        if let Ok(h) = crate::header::parse_header(p, 1, 0, data) {
            let again = crate::header::parse_header(p, 1, 0, &h.to_block());
            ok &= again.is_ok_and(|a| a == h);
        }
        if let Ok(r) = crate::region::parse(p, 1, 0, data) {
            ok &= crate::region::parse(p, 1, 0, &crate::region::to_block(&r)).is_ok_and(|a| a == r);
        }
        if let Ok(m) = crate::metadata::parse(p, 0, data) {
            let len = (data.len() + (1 << 17)).next_multiple_of(1 << 20);
            let again = crate::metadata::parse(p, 0, &crate::metadata::to_region(&m, len));
            ok &= again.is_ok_and(|a| a == m);
        }
        if let Ok(l) = crate::parent::parse(p, data) {
            ok &= crate::parent::parse(p, &l.to_bytes()).is_ok_and(|a| a == l);
        }
        if let Ok(Some(r)) = crate::log::scan(p, data, uuid::Uuid::nil()) {
            let entry = crate::log::encode_entry(
                uuid::Uuid::nil(),
                1,
                0,
                r.flushed_file_offset,
                r.last_file_offset,
                &r.ops,
            );
            let mut log = entry.clone();
            log.resize(entry.len().next_multiple_of(1 << 20), 0);
            let again = crate::log::scan(p, &log, uuid::Uuid::nil());
            ok &= again.is_ok_and(|a| a.is_some_and(|a| a.ops == r.ops));
        }
        ok
    }
}

/// Property tests: every structure both parsed and written round-trips.
#[cfg(test)]
mod roundtrip_props {
    use std::path::Path;

    use proptest::prelude::*;
    use uuid::Uuid;

    use crate::header::{parse_header, Header};
    use crate::log::{encode_entry, scan, LogOp};
    use crate::metadata::{self, Metadata};
    use crate::parent::{self, ParentLocator};
    use crate::region::{self, Region, Regions};

    fn guid() -> impl Strategy<Value = Uuid> {
        any::<u128>().prop_map(Uuid::from_u128)
    }

    proptest! {
        #[test]
        fn header(seq in any::<u64>(), fw in guid(), dw in guid(), lg in guid(), log_mib in 0u32..64, log_at in 1u64..1000) {
            let h = Header { sequence_number: seq, file_write_guid: fw, data_write_guid: dw, log_guid: lg,
                log_offset: log_at << 20, log_length: log_mib << 20 };
            prop_assert_eq!(parse_header(Path::new("p"), 1, 0, &h.to_block()).ok(), Some(h));
        }

        #[test]
        fn regions(bat in 1u64..100, md in 101u64..200, bl in 1u64..50, ml in 1u64..50) {
            let r = Regions { bat: Region { offset: bat << 20, length: bl << 20 }, metadata: Region { offset: (md + 50) << 20, length: ml << 20 } };
            prop_assert_eq!(region::parse(Path::new("p"), 1, 0, &region::to_block(&r)).ok(), Some(r));
        }

        #[test]
        fn metadata_and_locator(bs_log in 20u32..=28, big in any::<bool>(), sectors in 1u64..(1 << 30), fixed in any::<bool>(),
                                parent in proptest::option::of((guid(), "[a-zA-Z0-9 ._\\\\-]{1,40}")), p83 in guid()) {
            let lss: u32 = if big { 4096 } else { 512 };
            let loc = parent.map(|(g, path)| ParentLocator::new(g, Some(path), None));
            let m = Metadata { block_size: 1 << bs_log, leave_blocks_allocated: fixed && loc.is_none(), has_parent: loc.is_some(),
                virtual_size: sectors * u64::from(lss), logical_sector_size: lss, physical_sector_size: 4096, page83: p83, parent: loc.clone() };
            prop_assert_eq!(metadata::parse(Path::new("p"), 0, &metadata::to_region(&m, 1 << 20)).ok(), Some(m));
            if let Some(l) = loc {
                prop_assert_eq!(parent::parse(Path::new("p"), &l.to_bytes()).ok(), Some(l));
            }
        }

        #[test]
        fn log_entry(g in guid(), seq in 1u64..u64::MAX, ops in proptest::collection::vec(
            prop_oneof![
                (1u64..1000, any::<u8>()).prop_map(|(o, b)| LogOp::Data { offset: o << 12, bytes: vec![b; 4096] }),
                (1u64..1000, 1u64..100).prop_map(|(o, n)| LogOp::Zero { offset: o << 12, len: n << 12 }),
            ], 0..20)) {
            let mut log = encode_entry(g, seq, 0, 0, 0, &ops);
            log.resize(1 << 20, 0);
            let r = scan(Path::new("p"), &log, g).ok().flatten().map(|r| r.ops);
            prop_assert_eq!(r, Some(ops));
        }
    }
}
