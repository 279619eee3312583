//! The data extents of a layer file: the byte ranges that hold data. Every byte outside them
//! reads as zero (a hole in the server's sparse store file). The server publishes them at
//! `GET /layers/{id}/extents` (docs/api.md) so that a node fetches only those ranges and
//! leaves the rest of its partial file as holes: the bytes a role layer puts on the wire
//! track what the role changed, not VHDX's 1 MiB alignment of its regions and blocks.
//!
//! Format (JSON, one object):
//!
//! ```json
//! {"layer":"<blake3 hex>","size":7340032,"extents":[[0,4096],[65536,4096],[4231168,1089536]]}
//! ```
//!
//! `extents` holds `[offset, length]` pairs. A valid list is canonical: every length is at
//! least 1, the pairs are sorted by offset, each starts strictly after the end of the one
//! before (no overlap, no two touching: touching runs are one extent), each ends within
//! `size`, and there are at most [`MAX_EXTENTS`] of them. So one set of ranges has exactly one
//! encoding, and `parse(to_json(x)) == x`.
//!
//! The list is a transfer hint, never trusted for content: a node verifies every chunk and the
//! whole file against the signed manifest (`crate::chunk`), so a wrong list costs a re-fetch,
//! never a wrong layer. A node that cannot use a list (it does not parse, or names another
//! layer or size) fetches the whole file.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::chunk::LayerId;

/// Most extents one list may hold (a layer this fragmented is better fetched whole; the
/// server merges the smallest gaps to stay under it).
pub const MAX_EXTENTS: usize = 1 << 18;

/// Largest extents document a node reads (bytes): [`MAX_EXTENTS`] pairs of two 20-digit
/// numbers fit.
pub const MAX_DOCUMENT: usize = 12 << 20;

/// Why an extents document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentsError {
    /// Not the JSON object of the format (or unknown fields).
    #[error("not an extents document: {0}")]
    Json(String),
    /// An extent of length 0.
    #[error("extent {index} is empty")]
    Empty {
        /// Position in the list.
        index: usize,
    },
    /// An extent starts before or at the end of the previous one.
    #[error("extent {index} at {start} does not start after the previous extent's end {prev_end}")]
    Unordered {
        /// Position in the list.
        index: usize,
        /// Its offset.
        start: u64,
        /// Where the previous one ended.
        prev_end: u64,
    },
    /// An extent runs past the end of the file (or past `u64::MAX`).
    #[error("extent {index} ({start}+{len}) runs past the file's size {size}")]
    PastEnd {
        /// Position in the list.
        index: usize,
        /// Its offset.
        start: u64,
        /// Its length.
        len: u64,
        /// The file size.
        size: u64,
    },
    /// More than [`MAX_EXTENTS`].
    #[error("{count} extents (at most {MAX_EXTENTS})")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// The document is for another layer than the one asked for.
    #[error("extents of layer {got}, expected {expected}")]
    WrongLayer {
        /// The layer asked for.
        expected: LayerId,
        /// The layer the document names.
        got: LayerId,
    },
    /// The document gives another size than the manifest.
    #[error("extents for a file of {got} bytes, the manifest says {expected}")]
    WrongSize {
        /// Size in the manifest.
        expected: u64,
        /// Size in the document.
        got: u64,
    },
}

/// The validated data extents of one layer file (canonical: see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extents {
    layer: LayerId,
    size: u64,
    ranges: Vec<Range<u64>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    layer: LayerId,
    size: u64,
    extents: Vec<(u64, u64)>,
}

impl Extents {
    /// Checks `ranges` against the canonical form (see the module docs).
    pub fn new(layer: LayerId, size: u64, ranges: Vec<Range<u64>>) -> Result<Self, ExtentsError> {
        if ranges.len() > MAX_EXTENTS {
            return Err(ExtentsError::TooMany {
                count: ranges.len(),
            });
        }
        let mut prev_end: Option<u64> = None;
        for (index, r) in ranges.iter().enumerate() {
            if r.end <= r.start {
                return Err(ExtentsError::Empty { index });
            }
            if r.end > size {
                return Err(ExtentsError::PastEnd {
                    index,
                    start: r.start,
                    len: r.end - r.start,
                    size,
                });
            }
            if let Some(prev_end) = prev_end.filter(|&p| r.start <= p) {
                return Err(ExtentsError::Unordered {
                    index,
                    start: r.start,
                    prev_end,
                });
            }
            prev_end = Some(r.end);
        }
        Ok(Self {
            layer,
            size,
            ranges,
        })
    }

    /// Builds the canonical list from data runs as a file system reports them (in any order,
    /// possibly touching or overlapping, empty runs ignored, runs clamped to `size`). If more
    /// than [`MAX_EXTENTS`] remain, the smallest gaps are merged (the holes inside are then
    /// sent as zeros, which is still the file's content).
    pub fn from_runs(
        layer: LayerId,
        size: u64,
        runs: impl IntoIterator<Item = Range<u64>>,
    ) -> Self {
        let mut runs: Vec<Range<u64>> = runs
            .into_iter()
            .map(|r| r.start.min(size)..r.end.min(size))
            .filter(|r| r.end > r.start)
            .collect();
        runs.sort_by_key(|r| r.start);
        let mut ranges = merge_gaps(runs, 0);
        let mut gap = 4096u64;
        while ranges.len() > MAX_EXTENTS {
            ranges = merge_gaps(ranges, gap);
            gap = gap.saturating_mul(2);
        }
        Self {
            layer,
            size,
            ranges,
        }
    }

    /// The whole file as one extent (what a file system without hole reporting gives).
    pub fn whole(layer: LayerId, size: u64) -> Self {
        Self::from_runs(layer, size, std::iter::once(0..size))
    }

    /// Parses and validates a document (at most [`MAX_DOCUMENT`] bytes are looked at; a
    /// longer one is refused).
    pub fn parse(bytes: &[u8]) -> Result<Self, ExtentsError> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(ExtentsError::Json(format!(
                "{} bytes (at most {MAX_DOCUMENT})",
                bytes.len()
            )));
        }
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| ExtentsError::Json(e.to_string()))?;
        if raw.extents.len() > MAX_EXTENTS {
            return Err(ExtentsError::TooMany {
                count: raw.extents.len(),
            });
        }
        let mut ranges = Vec::with_capacity(raw.extents.len());
        for (index, (start, len)) in raw.extents.into_iter().enumerate() {
            let end = start.checked_add(len).ok_or(ExtentsError::PastEnd {
                index,
                start,
                len,
                size: raw.size,
            })?;
            ranges.push(start..end);
        }
        Self::new(raw.layer, raw.size, ranges)
    }

    /// Parses a document and checks that it is for layer `id` of `size` bytes (the manifest's
    /// values).
    pub fn parse_for(bytes: &[u8], id: &LayerId, size: u64) -> Result<Self, ExtentsError> {
        let e = Self::parse(bytes)?;
        if e.layer != *id {
            return Err(ExtentsError::WrongLayer {
                expected: *id,
                got: e.layer,
            });
        }
        if e.size != size {
            return Err(ExtentsError::WrongSize {
                expected: size,
                got: e.size,
            });
        }
        Ok(e)
    }

    /// The document (see the module docs).
    pub fn to_json(&self) -> Vec<u8> {
        let raw = Raw {
            layer: self.layer,
            size: self.size,
            extents: self
                .ranges
                .iter()
                .map(|r| (r.start, r.end - r.start))
                .collect(),
        };
        // A struct of a digest, integers and pairs of integers always serialises.
        serde_json::to_vec(&raw).unwrap_or_default()
    }

    /// The layer.
    pub fn layer(&self) -> &LayerId {
        &self.layer
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The extents, sorted, disjoint, not touching.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Bytes in the extents: what a node fetches for a fresh copy.
    pub fn data_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The parts of the extents inside `window`, in order.
    pub fn within(&self, window: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        // The first extent that ends after the window starts.
        let first = self.ranges.partition_point(|r| r.end <= window.start);
        self.ranges
            .get(first..)
            .unwrap_or_default()
            .iter()
            .take_while(move |r| r.start < window.end)
            .map(move |r| r.start.max(window.start)..r.end.min(window.end))
            .filter(|r| r.end > r.start)
    }
}

/// Merges sorted `ranges` that overlap, touch, or leave a gap smaller than `gap` bytes
/// between them: one request (or extent) instead of several when the bytes between are few.
pub fn merge_gaps(ranges: impl IntoIterator<Item = Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        if r.end <= r.start {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Digest;
    use proptest::prelude::*;

    fn id() -> LayerId {
        Digest::of(b"layer")
    }

    #[test]
    fn a_document_round_trips_and_reads_as_documented() {
        let e = Extents::new(id(), 100, vec![0..10, 20..30, 99..100]).unwrap();
        let json = String::from_utf8(e.to_json()).unwrap();
        assert_eq!(
            json,
            format!(
                "{{\"layer\":\"{}\",\"size\":100,\"extents\":[[0,10],[20,10],[99,1]]}}",
                id()
            )
        );
        assert_eq!(Extents::parse(json.as_bytes()).unwrap(), e);
        assert_eq!(e.data_bytes(), 21);
        assert_eq!(Extents::parse_for(json.as_bytes(), &id(), 100).unwrap(), e);
    }

    #[test]
    fn bad_lists_are_refused_by_name() {
        let doc = |ext: &str, size: u64| {
            format!(
                "{{\"layer\":\"{}\",\"size\":{size},\"extents\":{ext}}}",
                id()
            )
            .into_bytes()
        };
        let err = |ext: &str, size| Extents::parse(&doc(ext, size)).unwrap_err();
        assert_eq!(err("[[0,0]]", 10), ExtentsError::Empty { index: 0 });
        assert!(matches!(
            err("[[0,5],[5,1]]", 10),
            ExtentsError::Unordered { index: 1, .. }
        ));
        assert!(matches!(
            err("[[4,2],[0,1]]", 10),
            ExtentsError::Unordered { index: 1, .. }
        ));
        assert!(matches!(
            err("[[0,5],[3,4]]", 10),
            ExtentsError::Unordered { index: 1, .. }
        ));
        assert!(matches!(
            err("[[8,3]]", 10),
            ExtentsError::PastEnd { index: 0, .. }
        ));
        assert!(matches!(
            err("[[18446744073709551615,2]]", u64::MAX),
            ExtentsError::PastEnd { index: 0, .. }
        ));
        assert!(matches!(err("[[0,-1]]", 10), ExtentsError::Json(_)));
        assert!(matches!(err("[[0,1,2]]", 10), ExtentsError::Json(_)));
        assert!(matches!(
            Extents::parse(b"{\"layer\":\"00\",\"size\":1,\"extents\":[]}"),
            Err(ExtentsError::Json(_))
        ));
        let extra = format!(
            "{{\"layer\":\"{}\",\"size\":1,\"extents\":[],\"more\":1}}",
            id()
        );
        assert!(matches!(
            Extents::parse(extra.as_bytes()),
            Err(ExtentsError::Json(_))
        ));
        let ok = doc("[[0,1]]", 10);
        assert_eq!(
            Extents::parse_for(&ok, &Digest::of(b"other"), 10).unwrap_err(),
            ExtentsError::WrongLayer {
                expected: Digest::of(b"other"),
                got: id()
            }
        );
        assert_eq!(
            Extents::parse_for(&ok, &id(), 11).unwrap_err(),
            ExtentsError::WrongSize {
                expected: 11,
                got: 10
            }
        );
    }

    #[test]
    fn too_many_extents_are_refused_and_the_server_merges_below_the_cap() {
        let runs: Vec<Range<u64>> = (0..MAX_EXTENTS as u64 + 10)
            .map(|i| i * 8..i * 8 + 4)
            .collect();
        assert_eq!(
            Extents::new(id(), u64::MAX, runs.clone()).unwrap_err(),
            ExtentsError::TooMany {
                count: MAX_EXTENTS + 10
            }
        );
        let e = Extents::from_runs(id(), u64::MAX, runs.clone());
        assert!(e.ranges().len() <= MAX_EXTENTS);
        // Still covers every run.
        for r in runs.iter().step_by(1000) {
            assert_eq!(e.within(r.clone()).map(|x| x.end - x.start).sum::<u64>(), 4);
        }
        assert!(Extents::parse(&e.to_json()).is_ok());
    }

    #[test]
    fn within_clips_to_the_window() {
        let e = Extents::new(id(), 100, vec![0..10, 20..30, 40..50]).unwrap();
        let got: Vec<_> = e.within(5..45).collect();
        assert_eq!(got, vec![5..10, 20..30, 40..45]);
        assert_eq!(e.within(10..20).count(), 0);
        assert_eq!(e.within(50..100).count(), 0);
        assert_eq!(e.within(0..100).count(), 3);
    }

    #[test]
    fn gaps_below_the_threshold_merge() {
        assert_eq!(
            merge_gaps([0..10, 15..20, 100..110, 110..120], 5),
            vec![0..20, 100..120]
        );
        assert_eq!(merge_gaps([0..10, 15..20], 4), vec![0..10, 15..20]);
    }

    fn any_extents() -> impl Strategy<Value = Extents> {
        (
            proptest::collection::vec((1u64..5000, 1u64..5000), 0..40),
            0u64..5000,
        )
            .prop_map(|(pairs, tail)| {
                let mut ranges = Vec::new();
                let mut at = 0u64;
                for (gap, len) in pairs {
                    // The first extent may start at 0; later ones leave a gap.
                    let start = if ranges.is_empty() {
                        at + gap - 1
                    } else {
                        at + gap
                    };
                    ranges.push(start..start + len);
                    at = start + len;
                }
                Extents::new(Digest::of(&at.to_le_bytes()), at + tail, ranges).unwrap()
            })
    }

    proptest! {
        #[test]
        fn documents_round_trip(e in any_extents()) {
            prop_assert_eq!(Extents::parse(&e.to_json()).unwrap(), e);
        }

        /// Whatever runs a file system reports, the list covers exactly their union (clamped to
        /// the size) and is canonical.
        #[test]
        fn runs_become_their_canonical_union(
            size in 0u64..2000,
            runs in proptest::collection::vec((0u64..2100, 0u64..300), 0..20),
        ) {
            let runs: Vec<Range<u64>> = runs.into_iter().map(|(s, l)| s..s + l).collect();
            let e = Extents::from_runs(id(), size, runs.clone());
            prop_assert!(Extents::new(id(), size, e.ranges().to_vec()).is_ok());
            for b in 0..size {
                let in_runs = runs.iter().any(|r| r.contains(&b));
                let in_list = e.ranges().iter().any(|r| r.contains(&b));
                prop_assert_eq!(in_runs, in_list, "byte {}", b);
            }
        }

        /// Arbitrary bytes never panic; whatever parses re-serialises to the same list.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(e) = Extents::parse(&bytes) {
                prop_assert_eq!(Extents::parse(&e.to_json()).unwrap(), e);
            }
        }

        /// Mutated valid documents either parse to a valid list or are refused.
        #[test]
        fn flipped_documents_parse_canonical_or_fail(e in any_extents(), at in any::<usize>(), bit in 0u8..8) {
            let mut doc = e.to_json();
            let i = at % doc.len();
            doc[i] ^= 1 << bit;
            if let Ok(back) = Extents::parse(&doc) {
                prop_assert!(Extents::new(*back.layer(), back.size(), back.ranges().to_vec()).is_ok());
            }
        }
    }
}
