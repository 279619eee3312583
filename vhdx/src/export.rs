//! Writing the virtual disk of a chain as a raw image: sparse where the chain has no data,
//! written to a temporary and renamed into place.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use crate::chain::{Chain, Source};
use crate::create::atomic_write;
use crate::error::{Result, VhdxError};
use crate::io;

/// Copy unit for file extents.
const CHUNK: u64 = 8 * 1024 * 1024;

/// Writes the chain's virtual disk to `out` as raw bytes. Extents no layer holds are left
/// as holes. Returns the number of bytes copied from layer files.
pub fn to_raw(chain: &Chain, out: &Path) -> Result<u64> {
    atomic_write(out, |path, file| {
        io::set_len(&file, path, chain.virtual_size())?;
        let copied = copy_extents(chain, &file, path)?;
        file.sync_all().map_err(|source| VhdxError::Write { file: path.to_path_buf(), offset: 0, source })?;
        Ok(copied)
    })
}

fn copy_extents(chain: &Chain, out: &File, out_path: &Path) -> Result<u64> {
    let mut copied = 0;
    let mut buf = Vec::new();
    for e in chain.map()? {
        let Source::File { layer_index, file_offset } = e.source else { continue };
        let Some(layer) = chain.layers().get(layer_index) else { continue };
        let mut done = 0;
        while done < e.length {
            let n = (e.length - done).min(CHUNK);
            buf.resize(n as usize, 0);
            io::read_exact_at(layer.file(), layer.path(), &mut buf, file_offset + done)?;
            io::write_all_at(out, out_path, &buf, e.virtual_offset + done)?;
            done += n;
        }
        copied += e.length;
    }
    let mut f = out;
    let _ = f.seek(SeekFrom::Start(0));
    Ok(copied)
}
