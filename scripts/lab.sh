#!/usr/bin/env bash
# The QEMU lab command (docs/lab.md): builds `strata-lab` and runs it as root.
#   scripts/lab.sh up --vms 2 [--strata PATH] ...   a lab with VMs PXE booting, until Ctrl-C
#   scripts/lab.sh boot-test --firmware uefi --ra   one boot to the marker, timed
#   scripts/lab.sh bench --runs 3                   boot-time benchmark
# `scripts/lab.sh --help` lists every subcommand and flag.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bash "$STRATA_ROOT/scripts/setup.sh" >&2
cd "$STRATA_ROOT"
cargo build --release --locked -q -p qemu-tests --bin strata-lab
bin=$CARGO_TARGET_DIR/release/strata-lab
if [ "$(id -u)" = 0 ]; then exec "$bin" "$@"; else exec sudo -E "$bin" "$@"; fi
