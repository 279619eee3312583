#!/usr/bin/env bash
# VHDX engine benchmark: chain read throughput (1 and 3 layers) against qemu-img convert,
# and blake3 against sha256sum, measured in one run. Figures go to stdout; see
# docs/benchmarks.md. Environment: BENCH_SIZE_MIB (default 1024), BENCH_RUNS (3),
# BENCH_DIR (/dev/shm/strata-vhdx-bench), BENCH_KEEP=1 keeps the images.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }
cargo build --release -p vhdx --example bench >&2
exec "${CARGO_TARGET_DIR:-target}/release/examples/bench"
