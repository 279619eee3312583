//! The block allocation table (MS-VHDX §2.5): 64-bit entries, payload entries interleaved
//! with one sector bitmap entry after every `chunk_ratio` payload entries.

/// MS-VHDX §2.5.1.1: payload block states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Not in this file: read from the parent (differencing) or zeros.
    NotPresent,
    /// Contents undefined; treated like `NotPresent`.
    Undefined,
    /// Reads as zeros.
    Zero,
    /// Unmapped (trimmed): reads as zeros.
    Unmapped,
    /// Every sector is in this file at the offset.
    FullyPresent(u64),
    /// Differencing only: the sector bitmap says which sectors are here.
    PartiallyPresent(u64),
}

/// Raw entry state values.
pub(crate) const NOT_PRESENT: u64 = 0;
pub(crate) const UNDEFINED: u64 = 1;
pub(crate) const ZERO: u64 = 2;
pub(crate) const UNMAPPED: u64 = 3;
pub(crate) const FULLY_PRESENT: u64 = 6;
pub(crate) const PARTIALLY_PRESENT: u64 = 7;
/// MS-VHDX §2.5.1.2: a sector bitmap block is present.
pub(crate) const SB_PRESENT: u64 = 6;

const OFFSET_MASK: u64 = !((1 << 20) - 1);

/// The state bits of an entry.
pub(crate) fn state(entry: u64) -> u64 {
    entry & 7
}

/// The file offset of an entry (FileOffsetMB * 1 MiB).
pub(crate) fn offset(entry: u64) -> u64 {
    entry & OFFSET_MASK
}

/// An entry from a state and a 1 MiB aligned offset.
pub(crate) fn entry(state: u64, offset: u64) -> u64 {
    (offset & OFFSET_MASK) | (state & 7)
}

/// Decodes a payload entry; `None` for the reserved states 4 and 5.
pub(crate) fn decode_payload(entry: u64) -> Option<BlockState> {
    Some(match state(entry) {
        NOT_PRESENT => BlockState::NotPresent,
        UNDEFINED => BlockState::Undefined,
        ZERO => BlockState::Zero,
        UNMAPPED => BlockState::Unmapped,
        FULLY_PRESENT => BlockState::FullyPresent(offset(entry)),
        PARTIALLY_PRESENT => BlockState::PartiallyPresent(offset(entry)),
        _ => return None,
    })
}

/// BAT index of payload block `block`.
pub(crate) fn payload_index(block: u64, chunk_ratio: u64) -> u64 {
    block + block / chunk_ratio
}

/// BAT index of the sector bitmap entry of chunk `chunk`.
pub(crate) fn bitmap_index(chunk: u64, chunk_ratio: u64) -> u64 {
    chunk * (chunk_ratio + 1) + chunk_ratio
}

/// Whether BAT index `index` is a sector bitmap entry.
pub(crate) fn is_bitmap_index(index: u64, chunk_ratio: u64) -> bool {
    index % (chunk_ratio + 1) == chunk_ratio
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave() {
        // chunk ratio 4: P0 P1 P2 P3 S0 P4 ...
        assert_eq!(payload_index(3, 4), 3);
        assert_eq!(payload_index(4, 4), 5);
        assert_eq!(bitmap_index(0, 4), 4);
        assert_eq!(bitmap_index(1, 4), 9);
        assert!(is_bitmap_index(9, 4));
        assert!(!is_bitmap_index(5, 4));
    }

    #[test]
    fn entry_round_trip() {
        let e = entry(FULLY_PRESENT, 5 << 20);
        assert_eq!(decode_payload(e), Some(BlockState::FullyPresent(5 << 20)));
        assert_eq!(decode_payload(4), None);
    }
}
