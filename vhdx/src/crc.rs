//! CRC-32C (Castagnoli) over a structure with its checksum field taken as zero
//! (MS-VHDX §2.2.2, §2.2.3, §2.3.1.1).

/// The CRC-32C of `block` with the 4 bytes at `field` treated as zero.
pub(crate) fn checksum(block: &[u8], field: usize) -> u32 {
    let (head, rest) = block.split_at(field.min(block.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let zeros = [0u8; 4];
    let crc = crc32c::crc32c_append(crc, zeros.get(..rest.len().min(4)).unwrap_or_default());
    crc32c::crc32c_append(crc, tail)
}

/// The checksum stored at `field` (little-endian).
pub(crate) fn stored(block: &[u8], field: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = block.get(field..field + 4) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

/// Computes and stores the checksum at `field`.
pub(crate) fn seal(block: &mut [u8], field: usize) {
    let crc = checksum(block, field);
    if let Some(s) = block.get_mut(field..field + 4) {
        s.copy_from_slice(&crc.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_field_equals_plain_crc_of_zeroed_copy() {
        let mut block = vec![7u8; 4096];
        block[4..8].copy_from_slice(&[1, 2, 3, 4]);
        let mut zeroed = block.clone();
        zeroed[4..8].fill(0);
        assert_eq!(checksum(&block, 4), crc32c::crc32c(&zeroed));
        seal(&mut block, 4);
        assert_eq!(stored(&block, 4), crc32c::crc32c(&zeroed));
    }
}
