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
