//! The bytes of a file response. Which bytes (RFC 9110 §14 `Range`, §13 conditional requests)
//! is decided by `tower_http::services::ServeFile` in `super::serve_file`; this body streams
//! them with positioned reads of [`CHUNK`] bytes on the blocking pool, one chunk read ahead of
//! the socket, so the disk (or page cache) and the socket work at the same time. At most two
//! chunks per response are in memory, never the whole file.
//!
//! Measured against `ServeFile`'s own body (64 KiB `tokio::fs` reads, each through the
//! blocking pool and copied twice): about 1.8x less CPU per byte served (docs/benchmarks.md,
//! "HTTP layer serving").

use std::fs::File;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::{Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use tokio::task::JoinHandle;

/// Bytes per positioned read and per body frame.
pub(super) const CHUNK: usize = 1 << 20;

/// A body streaming `range` of a file.
pub(super) struct FileBody {
    file: Arc<File>,
    /// The next offset to read.
    next: u64,
    /// The offset after the last byte not yet handed to the connection.
    end: u64,
    /// Bytes not yet handed to the connection.
    remaining: u64,
    /// The read in flight (of the bytes from the offset before `next`).
    pending: Option<JoinHandle<io::Result<Bytes>>>,
}

impl FileBody {
    /// Streams `range` of `file`; the caller has checked that the file is that long.
    pub(super) fn new(file: File, range: Range<u64>) -> FileBody {
        FileBody {
            file: Arc::new(file),
            next: range.start,
            end: range.end,
            remaining: range.end.saturating_sub(range.start),
            pending: None,
        }
    }

    /// Starts reading the next chunk, if any is left and none is in flight.
    fn read_ahead(&mut self) {
        if self.pending.is_some() || self.next >= self.end {
            return;
        }
        // At most CHUNK, which fits in usize.
        let len = usize::try_from((self.end - self.next).min(CHUNK as u64)).unwrap_or(CHUNK);
        let offset = self.next;
        self.next += len as u64;
        let file = Arc::clone(&self.file);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            read_exact_at(&file, offset, len)
        }));
    }
}

/// Reads `len` bytes at `offset` into a fresh buffer (not zeroed first: the reads fill it).
fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ended at {at} while serving it (it shrank)"),
                ))
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Bytes::from(buf))
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        this.read_ahead();
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let done = ready!(Pin::new(pending).poll(cx));
        this.pending = None;
        let bytes = match done {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
            Err(e) => {
                return Poll::Ready(Some(Err(io::Error::other(format!("file read task: {e}")))))
            }
        };
        this.remaining = this.remaining.saturating_sub(bytes.len() as u64);
        // The next read runs while the connection writes this chunk.
        this.read_ahead();
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Parses the `Content-Range` value `ServeFile` writes for a 206: `bytes FIRST-LAST/SIZE`,
/// into the byte range to send and the file's size.
pub(super) fn parse_content_range(value: &str) -> Option<(Range<u64>, u64)> {
    let rest = value.strip_prefix("bytes ")?;
    let (span, size) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last, size): (u64, u64, u64) =
        (first.parse().ok()?, last.parse().ok()?, size.parse().ok()?);
    (first <= last && last < size).then(|| (first..last + 1, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn content_range_parses_what_serve_file_writes() {
        assert_eq!(parse_content_range("bytes 0-0/1"), Some((0..1, 1)));
        assert_eq!(
            parse_content_range("bytes 5-1048580/2097152"),
            Some((5..1048581, 2097152))
        );
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("bytes 4-3/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("items 0-1/10"), None);
    }

    async fn collect(mut body: FileBody) -> io::Result<(Vec<u8>, Vec<usize>)> {
        let mut out = Vec::new();
        let mut frames = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let data = frame?
                .into_data()
                .map_err(|_| io::Error::other("not a data frame"))?;
            frames.push(data.len());
            out.extend_from_slice(&data);
        }
        assert!(body.is_end_stream());
        Ok((out, frames))
    }

    #[tokio::test]
    async fn streams_ranges_across_chunk_boundaries() -> anyhow::Result<()> {
        let data: Vec<u8> = (0..(2 * CHUNK + 777))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut tmp = tempfile::NamedTempFile::new()?;
        tmp.write_all(&data)?;
        let len = data.len() as u64;
        let c = CHUNK as u64;
        for range in [
            0..len,
            0..0,
            c - 1..c + 1,
            c..2 * c,
            3..2 * c + 5,
            len - 1..len,
        ] {
            let body = FileBody::new(File::open(tmp.path())?, range.clone());
            assert_eq!(body.size_hint().exact(), Some(range.end - range.start));
            let (got, frames) = collect(body).await?;
            assert_eq!(
                got,
                data[range.start as usize..range.end as usize],
                "range {range:?}"
            );
            assert!(
                frames.iter().all(|&n| n > 0 && n <= CHUNK),
                "frames {frames:?}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_file_that_shrank_is_an_error_not_short_data() -> anyhow::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new()?;
        tmp.write_all(&[1; 100])?;
        let err = collect(FileBody::new(File::open(tmp.path())?, 0..200))
            .await
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::UnexpectedEof));
        Ok(())
    }
}
