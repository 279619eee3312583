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
//! - [`create`], [`create_differencing`], [`from_raw`]: new files, written to a temporary
//!   and renamed into place; reproducible with [`CreateOptions::deterministic`].
//!
//! docs/vhdx.md describes the write ordering that keeps files consistent across a crash.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)
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
pub use create::{create, create_differencing, from_raw, from_raw_reader, ConvertStats, CreateOptions};
pub use export::to_raw;
pub use error::{ErrorKind, MetadataItem, Result, Structure, VhdxError};
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
            let entry = crate::log::encode_entry(uuid::Uuid::nil(), 1, 0, r.flushed_file_offset, r.last_file_offset, &r.ops);
            let mut log = entry.clone();
            log.resize(entry.len().next_multiple_of(1 << 20), 0);
            let again = crate::log::scan(p, &log, uuid::Uuid::nil());
            ok &= again.is_ok_and(|a| a.is_some_and(|a| a.ops == r.ops));
        }
        ok
    }
}
