#!/usr/bin/env bash
# The whole test suite: installs what it needs (scripts/setup.sh), builds once, runs every
# crate's tests, including the peer tests (qemu-img, tftp-hpa, ...) and the QEMU lab tests
# (root: network namespaces and taps). `.ci/run` calls exactly this.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bash "$STRATA_ROOT/scripts/setup.sh"
cd "$STRATA_ROOT"
log "building (target dir $CARGO_TARGET_DIR)"
cargo build --workspace --all-targets --locked
# The node-init initramfs `strata serve` hands to lab VMs by default.
bash "$STRATA_ROOT/scripts/build-initramfs.sh" >/dev/null
log "running the test suite"
cargo test --workspace --locked --no-fail-fast "$@"
