# Shared by the scripts in this folder: where caches live and how to build.
# Sourced, not run.
set -euo pipefail
STRATA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STRATA_CACHE=${STRATA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata}
export STRATA_ROOT STRATA_CACHE
# One target dir outside the clone, so a fresh clone (CI) does not build from zero.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$STRATA_CACHE/target}
mkdir -p "$STRATA_CACHE"
# CI builds once per run: incremental caches only cost time and disk there.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}; fi

log() { printf '==> %s\n' "$*" >&2; }
