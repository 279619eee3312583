//! Positioned reads and writes with the file name and offset in every error.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Result, VhdxError};

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|source| VhdxError::Read {
            file: path.to_path_buf(),
            offset,
            len: buf.len() as u64,
            source,
        })
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all_at(file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(buf, offset)
        .map_err(|source| VhdxError::Write {
            file: path.to_path_buf(),
            offset,
            source,
        })
}

/// Flushes data (not necessarily metadata such as timestamps) to stable storage.
pub(crate) fn sync_data(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(|source| VhdxError::Write {
        file: path.to_path_buf(),
        offset: 0,
        source,
    })
}

/// Sets the file's length.
pub(crate) fn set_len(file: &File, path: &Path, len: u64) -> Result<()> {
    file.set_len(len).map_err(|source| VhdxError::Write {
        file: path.to_path_buf(),
        offset: len,
        source,
    })
}

/// The file's length.
pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| VhdxError::Open {
            file: path.to_path_buf(),
            source,
        })
}
