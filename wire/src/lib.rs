//! Types that both the Strata server and node-init speak: the signed node manifest, layer and
//! chunk hashing, and node state reports.
#![forbid(unsafe_code)]
