//! Console lines. Markers (`STRATA stage=<name> key=value...`, `STRATA error=<kind> ...`,
//! `STRATA fallback=<decision>`, `STRATA panic ...`) are one line each and are what the boot
//! tests wait for; [`info!`] lines (`node-init: ...`) are for people.
//!
//! PID 1's stdout is the kernel console (`console=ttyS0`), so both go to stdout, written
//! whole and flushed at once so lines never interleave.

use std::io::Write;

/// Writes one `STRATA ...` line to the console.
pub fn emit(args: std::fmt::Arguments<'_>) {
    let line = format!("STRATA {args}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Writes one `node-init: ...` line to the console.
pub fn info(args: std::fmt::Arguments<'_>) {
    let line = format!("node-init: {args}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// `marker!("stage=net ip={ip}")` prints `STRATA stage=net ip=...`.
#[macro_export]
macro_rules! marker {
    ($($t:tt)*) => { $crate::marker::emit(format_args!($($t)*)) };
}

/// `info!("...")` prints `node-init: ...`.
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::marker::info(format_args!($($t)*)) };
}
