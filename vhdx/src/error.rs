//! The one error type of the crate, with a small stable [`ErrorKind`] callers match on.

use std::io;
use std::path::PathBuf;

/// A structure of the file, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    /// File type identifier (MS-VHDX §2.2.1).
    FileIdentifier,
    /// Header 1 (offset 64 KiB) or 2 (offset 128 KiB), MS-VHDX §2.2.2.
    Header(u8),
    /// Region table 1 (offset 192 KiB) or 2 (offset 256 KiB), MS-VHDX §2.2.3.
    RegionTable(u8),
    /// The metadata table (MS-VHDX §2.6.1).
    MetadataTable,
    /// One metadata item (MS-VHDX §2.6.2).
    MetadataItem(MetadataItem),
    /// The block allocation table (MS-VHDX §2.5).
    Bat,
    /// A log entry (MS-VHDX §2.3.1).
    LogEntry,
    /// A sector bitmap block (MS-VHDX §2.4.2).
    SectorBitmap,
    /// A payload block (MS-VHDX §2.4.1).
    PayloadBlock,
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FileIdentifier => f.write_str("file type identifier"),
            Self::Header(n) => write!(f, "header {n}"),
            Self::RegionTable(n) => write!(f, "region table {n}"),
            Self::MetadataTable => f.write_str("metadata table"),
            Self::MetadataItem(item) => write!(f, "metadata item {item}"),
            Self::Bat => f.write_str("BAT"),
            Self::LogEntry => f.write_str("log entry"),
            Self::SectorBitmap => f.write_str("sector bitmap block"),
            Self::PayloadBlock => f.write_str("payload block"),
        }
    }
}

/// The known metadata items (MS-VHDX §2.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataItem {
    /// File Parameters (§2.6.2.1).
    FileParameters,
    /// Virtual Disk Size (§2.6.2.2).
    VirtualDiskSize,
    /// Page 83 Data (§2.6.2.3).
    Page83Data,
    /// Logical Sector Size (§2.6.2.4).
    LogicalSectorSize,
    /// Physical Sector Size (§2.6.2.5).
    PhysicalSectorSize,
    /// Parent Locator (§2.6.2.6).
    ParentLocator,
}

impl std::fmt::Display for MetadataItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::FileParameters => "file parameters",
            Self::VirtualDiskSize => "virtual disk size",
            Self::Page83Data => "page 83 data",
            Self::LogicalSectorSize => "logical sector size",
            Self::PhysicalSectorSize => "physical sector size",
            Self::ParentLocator => "parent locator",
        })
    }
}

/// The stable classification of a [`VhdxError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system failed a read, write or open.
    Io,
    /// The bytes are not a VHDX file, or a caller's argument is invalid.
    InvalidFormat,
    /// A valid VHDX feature this engine does not implement.
    Unsupported,
    /// A VHDX file whose structures contradict each other or the spec.
    Corrupt,
}

/// Errors of the VHDX engine. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhdxError {
    /// Opening or creating a file failed.
    #[error("{file}: open")]
    Open {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A read failed.
    #[error("{file}: read of {len} bytes at offset {offset}")]
    Read {
        /// The file.
        file: PathBuf,
        /// File offset.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A write, flush or resize failed.
    #[error("{file}: write at offset {offset}")]
    Write {
        /// The file.
        file: PathBuf,
        /// File offset (the new length for a resize, 0 for a flush).
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file ends before a structure that must be there.
    #[error("{file}: truncated: {structure} at offset {offset} ends past the end of the file ({file_size} bytes)")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// What was being read.
        structure: Structure,
        /// Where it starts.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The file does not start with the VHDX file type identifier.
    #[error("{file}: not a VHDX file (no \"vhdxfile\" signature)")]
    NotVhdx {
        /// The file.
        file: PathBuf,
    },
    /// A structure's signature is wrong.
    #[error("{file}: bad signature in {structure} at offset {offset}")]
    BadSignature {
        /// The file.
        file: PathBuf,
        /// Which structure.
        structure: Structure,
        /// Where it starts.
        offset: u64,
    },
    /// A structure's CRC-32C does not match.
    #[error("{file}: bad checksum in {structure} at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The file.
        file: PathBuf,
        /// Which structure.
        structure: Structure,
        /// Where it starts.
        offset: u64,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// Neither header is valid; `first` and `second` say why.
    #[error("{file}: no valid header (header 1: {first}; header 2: {second})")]
    NoValidHeader {
        /// The file.
        file: PathBuf,
        /// Why header 1 was rejected.
        first: Box<VhdxError>,
        /// Why header 2 was rejected.
        second: Box<VhdxError>,
    },
    /// Neither region table is valid.
    #[error("{file}: no valid region table (table 1: {first}; table 2: {second})")]
    NoValidRegionTable {
        /// The file.
        file: PathBuf,
        /// Why table 1 was rejected.
        first: Box<VhdxError>,
        /// Why table 2 was rejected.
        second: Box<VhdxError>,
    },
    /// A field holds a value the spec forbids.
    #[error("{file}: invalid {structure}: {reason}")]
    InvalidField {
        /// The file.
        file: PathBuf,
        /// Which structure.
        structure: Structure,
        /// What is wrong.
        reason: String,
    },
    /// Two regions, or a region and a fixed structure, overlap.
    #[error("{file}: regions overlap: [{a_offset}, +{a_len}) and [{b_offset}, +{b_len})")]
    RegionOverlap {
        /// The file.
        file: PathBuf,
        /// First region's offset.
        a_offset: u64,
        /// First region's length.
        a_len: u64,
        /// Second region's offset.
        b_offset: u64,
        /// Second region's length.
        b_len: u64,
    },
    /// The BAT or metadata region is absent.
    #[error("{file}: required region {region} missing")]
    MissingRegion {
        /// The file.
        file: PathBuf,
        /// "BAT" or "metadata".
        region: &'static str,
    },
    /// A required metadata item is absent.
    #[error("{file}: required metadata item {item} missing")]
    MissingMetadata {
        /// The file.
        file: PathBuf,
        /// Which item.
        item: MetadataItem,
    },
    /// A BAT entry is invalid (bad state, offset, or overlap).
    #[error("{file}: BAT entry {index}: {reason}")]
    BadBatEntry {
        /// The file.
        file: PathBuf,
        /// Index into the BAT.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// A BAT entry points at a block that ends past the end of the file.
    #[error("{file}: BAT entry {index} points at offset {offset}, past the end of the file ({file_size} bytes)")]
    BatPastEnd {
        /// The file.
        file: PathBuf,
        /// Index into the BAT.
        index: u64,
        /// The block's file offset.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The log holds entries to replay and the file was opened read-only.
    #[error("{file}: the log holds unreplayed entries (an unclean shutdown); open it read-write (e.g. `strata vhdx check --repair`) to replay them")]
    DirtyLog {
        /// The file.
        file: PathBuf,
    },
    /// The log is non-empty but cannot be replayed.
    #[error("{file}: log cannot be replayed: {reason}")]
    BadLog {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A feature this engine does not implement.
    #[error("{file}: unsupported: {what}")]
    Unsupported {
        /// The file.
        file: PathBuf,
        /// What it is.
        what: String,
    },
    /// A differencing disk's parent cannot be found.
    #[error("{child}: parent not found (tried {})", tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ParentNotFound {
        /// The differencing disk.
        child: PathBuf,
        /// Paths tried, in order.
        tried: Vec<PathBuf>,
    },
    /// A parent's DataWriteGuid does not match the child's parent_linkage.
    #[error("{child}: parent {parent} does not match: parent_linkage {expected}, parent's DataWriteGuid {found}")]
    ParentMismatch {
        /// The differencing disk.
        child: PathBuf,
        /// The parent file.
        parent: PathBuf,
        /// The child's parent_linkage.
        expected: uuid::Uuid,
        /// The parent's DataWriteGuid.
        found: uuid::Uuid,
    },
    /// A parent's virtual size or sector size differs from the child's.
    #[error("{child}: parent {parent} has a different geometry: {reason}")]
    ParentGeometry {
        /// The differencing disk.
        child: PathBuf,
        /// The parent file.
        parent: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A chain's base is itself a differencing disk, or a non-base layer is not one.
    #[error("{file}: {reason}")]
    ChainShape {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Following parents came back to a file already in the chain.
    #[error("{file}: parent loop: this file is already in the chain")]
    ParentLoop {
        /// The file seen twice.
        file: PathBuf,
    },
    /// The chain is deeper than [`crate::MAX_CHAIN_DEPTH`].
    #[error("{file}: chain deeper than {max} layers")]
    ChainTooDeep {
        /// The file at which the cap was hit.
        file: PathBuf,
        /// The cap.
        max: usize,
    },
    /// A read or write past the end of the virtual disk.
    #[error("{file}: range [{offset}, +{len}) outside the virtual disk ({virtual_size} bytes)")]
    OutOfRange {
        /// The file.
        file: PathBuf,
        /// Virtual offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The virtual disk size.
        virtual_size: u64,
    },
    /// A redundant copy (the other header or region table) is damaged; the file is
    /// readable from the good copy.
    #[error("{file}: damaged redundant copy: {reason}")]
    DamagedCopy {
        /// The file.
        file: PathBuf,
        /// What is wrong with the copy.
        reason: String,
    },
    /// A write to a file opened read-only.
    #[error("{file}: opened read-only")]
    ReadOnly {
        /// The file.
        file: PathBuf,
    },
    /// A caller's argument is invalid (sizes, block sizes, raw input length).
    #[error("{file}: {reason}")]
    InvalidArgument {
        /// The file concerned.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl VhdxError {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Open { .. } | Self::Read { .. } | Self::Write { .. } => ErrorKind::Io,
            Self::ParentNotFound { .. } => ErrorKind::Io,
            Self::NotVhdx { .. } | Self::OutOfRange { .. } | Self::ReadOnly { .. } => {
                ErrorKind::InvalidFormat
            }
            Self::InvalidArgument { .. } => ErrorKind::InvalidFormat,
            Self::Unsupported { .. } | Self::DirtyLog { .. } => ErrorKind::Unsupported,
            Self::Truncated { .. }
            | Self::BadSignature { .. }
            | Self::BadChecksum { .. }
            | Self::NoValidHeader { .. }
            | Self::NoValidRegionTable { .. }
            | Self::InvalidField { .. }
            | Self::RegionOverlap { .. }
            | Self::MissingRegion { .. }
            | Self::MissingMetadata { .. }
            | Self::BadBatEntry { .. }
            | Self::BatPastEnd { .. }
            | Self::BadLog { .. }
            | Self::ParentMismatch { .. }
            | Self::ParentGeometry { .. }
            | Self::ChainShape { .. }
            | Self::ParentLoop { .. }
            | Self::ChainTooDeep { .. }
            | Self::DamagedCopy { .. } => ErrorKind::Corrupt,
        }
    }
}

/// Results of this crate.
pub type Result<T, E = VhdxError> = std::result::Result<T, E>;
