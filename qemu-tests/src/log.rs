//! A byte stream captured from a child process (a VM's serial console, a server's log), kept in
//! memory for waiters and copied to a file as it arrives.
//!
//! One reader thread per stream appends each chunk as soon as `read` returns it and wakes the
//! waiters through a condition variable, so a marker is seen within microseconds of QEMU
//! writing it: `poweroff -f` right after a marker cannot race the waiter, and nothing sleeps
//! blindly.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The bytes that may follow a marker for it to count as matched: a marker is a whole
/// word sequence, so `version=7` does not match `version=70`.
const MARKER_END: &[u8] = b"\r\n \t";

#[derive(Debug, Default)]
struct State {
    buf: Vec<u8>,
    /// The writer side closed (the process exited or closed the stream).
    eof: bool,
}

#[derive(Debug)]
struct Shared {
    name: String,
    path: PathBuf,
    state: Mutex<State>,
    cond: Condvar,
}

/// A captured stream: cheap to clone, every clone sees the same bytes.
#[derive(Debug, Clone)]
pub struct LogStream {
    shared: Arc<Shared>,
}

/// Where a waited-for marker was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// Offset of the first byte of the marker in the stream.
    pub start: usize,
    /// Offset just past the marker: pass it as `from` to wait for the next occurrence.
    pub end: usize,
    /// When the waiter saw it (within microseconds of the bytes arriving).
    pub at: Instant,
}

/// Why a wait ended without the marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFailure {
    /// The deadline passed.
    Timeout,
    /// The stream ended (the process exited) before the marker appeared.
    Closed,
    /// A failure marker (for instance `Kernel panic`) appeared first.
    FailMarker(String),
}

impl std::fmt::Display for WaitFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => write!(f, "timed out"),
            Self::Closed => write!(f, "the stream closed (process exited)"),
            Self::FailMarker(m) => write!(f, "failure marker {m:?} appeared"),
        }
    }
}

impl LogStream {
    /// Starts a thread that copies `reader` into memory and into the file at `path`
    /// (created or truncated). `echo`, when set, also prints each complete line to stderr
    /// with that prefix (used by `strata-lab up --follow`).
    pub fn capture(
        name: &str,
        reader: impl Read + Send + 'static,
        path: &Path,
        echo: Option<String>,
    ) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("creating log {}", path.display()))?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            path: path.to_owned(),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || pump(&thread_shared, reader, file, echo))
            .context("spawning a log reader thread")?;
        Ok(Self { shared })
    }

    /// The stream's name (VM or server name).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The file the stream is copied to.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a waiter panicked; the bytes are still good.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Everything captured so far.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().buf.clone()
    }

    /// Number of bytes captured so far.
    pub fn len(&self) -> usize {
        self.lock().buf.len()
    }

    /// True when nothing has been captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the writer closed its end.
    pub fn is_closed(&self) -> bool {
        self.lock().eof
    }

    /// The last `lines` lines, lossily decoded, with terminal escapes and carriage returns
    /// removed: for error messages and failure dumps.
    pub fn tail(&self, lines: usize) -> String {
        let state = self.lock();
        tail_text(&state.buf, lines)
    }

    /// Waits until `marker` appears at or after offset `from`, followed by a line end or a
    /// space (see [`MARKER_END`]), or one of `fail` appears there (any position), or the
    /// stream closes, or `timeout` passes.
    pub fn wait_for(
        &self,
        from: usize,
        marker: &str,
        fail: &[String],
        timeout: Duration,
    ) -> std::result::Result<Match, WaitFailure> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(start) = find_marker(&state.buf, from, marker.as_bytes()) {
                return Ok(Match {
                    start,
                    end: start + marker.len(),
                    at: Instant::now(),
                });
            }
            let window = state.buf.get(from..).unwrap_or_default();
            if let Some(f) = fail.iter().find(|f| find(window, f.as_bytes()).is_some()) {
                return Err(WaitFailure::FailMarker(f.clone()));
            }
            if state.eof {
                return Err(WaitFailure::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitFailure::Timeout);
            }
            state = self
                .shared
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The whole line holding a match (from the previous `\n` to the next), waiting up to
    /// `timeout` for the line's end to arrive; carriage returns and escapes removed.
    pub fn line_of(&self, m: &Match, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let rest = state.buf.get(m.end..).unwrap_or_default();
            if let Some(i) = rest.iter().position(|&b| b == b'\n') {
                let start = state
                    .buf
                    .get(..m.start)
                    .unwrap_or_default()
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                return clean(state.buf.get(start..m.end + i).unwrap_or_default());
            }
            let now = Instant::now();
            if state.eof || now >= deadline {
                let start = state
                    .buf
                    .get(..m.start)
                    .unwrap_or_default()
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                return clean(state.buf.get(start..).unwrap_or_default());
            }
            state = self
                .shared
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// [`Self::wait_for`] with an error that carries the stream's tail.
    pub fn expect(
        &self,
        from: usize,
        marker: &str,
        fail: &[String],
        timeout: Duration,
    ) -> Result<Match> {
        match self.wait_for(from, marker, fail, timeout) {
            Ok(m) => Ok(m),
            Err(why) => bail!(
                "waiting {timeout:?} for {marker:?} in {} ({}): {why}\n--- last lines of {} ---\n{}",
                self.name(),
                self.path().display(),
                self.name(),
                self.tail(40)
            ),
        }
    }
}

fn pump(shared: &Shared, mut reader: impl Read, mut file: File, echo: Option<String>) {
    let mut chunk = [0u8; 8192];
    let mut echo_line = Vec::new();
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = chunk.get(..n).unwrap_or_default();
        // The file is a convenience copy: a failed write must not stop the waiters.
        let _ = file.write_all(data);
        let _ = file.flush();
        if let Some(prefix) = &echo {
            for &b in data {
                if b == b'\n' {
                    eprintln!("{prefix}{}", clean(&echo_line));
                    echo_line.clear();
                } else {
                    echo_line.push(b);
                }
            }
        }
        let mut state = shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.buf.extend_from_slice(data);
        drop(state);
        shared.cond.notify_all();
    }
    let mut state = shared
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state.eof = true;
    drop(state);
    shared.cond.notify_all();
}

/// Finds `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Finds `marker` at or after `from`, followed by one of [`MARKER_END`]. A marker at the
/// very end of the buffer is not yet a match: its terminator has not arrived.
fn find_marker(buf: &[u8], from: usize, marker: &[u8]) -> Option<usize> {
    let mut pos = from;
    loop {
        let rest = buf.get(pos..)?;
        let i = find(rest, marker)?;
        let start = pos + i;
        let after = buf.get(start + marker.len())?;
        if MARKER_END.contains(after) {
            return Some(start);
        }
        pos = start + 1;
    }
}

/// Removes ANSI escape sequences and carriage returns, lossily decoding UTF-8.
fn clean(line: &[u8]) -> String {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while let Some(&b) = line.get(i) {
        if b == 0x1b {
            // CSI: ESC [ params final-byte; other escapes: ESC + one byte.
            i += 1;
            if line.get(i) == Some(&b'[') {
                i += 1;
                while let Some(&c) = line.get(i) {
                    i += 1;
                    if (0x40..=0x7e).contains(&c) {
                        break;
                    }
                }
            } else {
                i += 1;
            }
            continue;
        }
        if b != b'\r' {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tail_text(buf: &[u8], lines: usize) -> String {
    let text: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
    let skip = text.len().saturating_sub(lines);
    text.iter()
        .skip(skip)
        .map(|l| clean(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_needs_a_terminator() {
        assert_eq!(find_marker(b"x STRATA v=7\r\n", 0, b"STRATA v=7"), Some(2));
        assert_eq!(find_marker(b"STRATA v=70\n", 0, b"STRATA v=7"), None);
        assert_eq!(
            find_marker(b"STRATA v=70\nSTRATA v=7 ok\n", 0, b"STRATA v=7"),
            Some(12)
        );
        assert_eq!(find_marker(b"STRATA v=7", 0, b"STRATA v=7"), None);
        assert_eq!(
            find_marker(b"STRATA v=7\nSTRATA v=7\n", 1, b"STRATA v=7"),
            Some(11)
        );
    }

    #[test]
    fn clean_strips_escapes() {
        assert_eq!(clean(b"\x1b[2J\x1b[01;01Hhello\r"), "hello");
        assert_eq!(clean(b"a\x1bcb"), "ab");
    }

    #[test]
    fn waiter_wakes_on_arrival_and_reports_close() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, mut writer) = std::io::pipe().unwrap();
        let log = LogStream::capture("t", reader, &dir.path().join("t.log"), None).unwrap();
        let w = thread::spawn(move || {
            writer.write_all(b"boot...\nSTRATA done\n").unwrap();
        });
        let m = log
            .wait_for(0, "STRATA done", &[], Duration::from_secs(10))
            .unwrap();
        assert_eq!(m.start, 8);
        assert_eq!(log.line_of(&m, Duration::from_secs(10)), "STRATA done");
        let first = log
            .wait_for(0, "boot...", &[], Duration::from_secs(10))
            .unwrap();
        assert_eq!(log.line_of(&first, Duration::from_secs(10)), "boot...");
        w.join().unwrap();
        assert_eq!(
            log.wait_for(m.end, "STRATA done", &[], Duration::from_secs(10)),
            Err(WaitFailure::Closed)
        );
        assert_eq!(
            std::fs::read(log.path()).unwrap(),
            b"boot...\nSTRATA done\n"
        );
    }

    #[test]
    fn fail_marker_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, mut writer) = std::io::pipe().unwrap();
        let log = LogStream::capture("t", reader, &dir.path().join("t.log"), None).unwrap();
        writer
            .write_all(b"Kernel panic - not syncing: x\n")
            .unwrap();
        let fail = vec!["Kernel panic".to_owned()];
        assert_eq!(
            log.wait_for(0, "STRATA done", &fail, Duration::from_secs(10)),
            Err(WaitFailure::FailMarker("Kernel panic".into()))
        );
    }
}
