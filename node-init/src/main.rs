//! node-init: PID 1 of the Strata boot initramfs.
fn main() {}
