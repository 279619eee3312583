//! MS-VHDX GUIDs: stored in the mixed-endian Windows layout (MS-DTYP §2.3.4.2).

use uuid::Uuid;

/// Decodes a GUID stored on disk.
pub(crate) fn from_disk(bytes: [u8; 16]) -> Uuid {
    Uuid::from_bytes_le(bytes)
}

/// Encodes a GUID for disk.
pub(crate) fn to_disk(guid: Uuid) -> [u8; 16] {
    guid.to_bytes_le()
}

/// A GUID constant from its textual form, for the spec's fixed identifiers.
pub(crate) const fn constant(fields: (u32, u16, u16, [u8; 8])) -> Uuid {
    Uuid::from_fields(fields.0, fields.1, fields.2, &fields.3)
}
