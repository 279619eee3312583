//! Types that both the Strata server and node-init speak: the signed node manifest, layer and
//! chunk hashing, layer data extents, and node state reports.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod chunk;
pub mod dhcp;
pub mod extents;
pub mod manifest;
pub mod multicast;
pub mod report;

pub use chunk::{ChunkHash, Digest, LayerId};
