#!/usr/bin/env bash
# iSCSI throughput on loopback: Strata's target against tgt (Debian's tgtd), in the same run,
# on the same raw image in /dev/shm, with the same clients:
#   - server/examples/iscsi_bench.rs (fio-like: sequential/random 4 KiB reads and writes,
#     queue depth QD; Debian's fio has no libiscsi engine),
# Ours is measured twice: on the raw file, and on a VHDX chain (base from the raw file plus an
# empty node layer, the way a diskless node's LUN looks). Prints IOPS and MB/s per row and the
# ratio ours/tgt.
#
#   scripts/bench-iscsi.sh              SIZE_MIB=256 SECONDS_PER=5 QD=32 by default
source "$(dirname "$0")/common.sh"

for t in tgtd:tgt tgtadm:tgt; do
  command -v "${t%%:*}" >/dev/null || { echo "missing ${t%%:*}: apt-get install ${t#*:} (scripts/setup.sh)" >&2; exit 1; }
done
SIZE_MIB=${SIZE_MIB:-256}
SECS=${SECONDS_PER:-5}
QD=${QD:-32}
BS=${BS:-4096}
PORT_OURS=${PORT_OURS:-13260}
PORT_VHDX=${PORT_VHDX:-13261}
PORT_TGT=${PORT_TGT:-13262}

log "building strata and the iscsi_bench example (release)"
(cd "$STRATA_ROOT" && cargo build --release -q -p strata-server --bin strata --example iscsi_bench)
STRATA=$CARGO_TARGET_DIR/release/strata
BENCH=$CARGO_TARGET_DIR/release/examples/iscsi_bench

work=$(mktemp -d /dev/shm/strata-bench-iscsi.XXXXXX)
pids=()
cleanup() {
  # tgtd ignores SIGTERM: ask it to stop, then make sure.
  tgtadm -C 7 --op delete --mode system >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

log "making a ${SIZE_MIB} MiB image"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$work/disk.raw"
"$STRATA" vhdx from-raw "$work/disk.raw" "$work/base.vhdx" --block-size 2M >/dev/null
"$STRATA" vhdx from-raw "$work/disk.raw" "$work/node.vhdx" --parent "$work/base.vhdx" --block-size 2M >/dev/null

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

RUST_LOG=warn "$STRATA" iscsi serve --listen 127.0.0.1:$PORT_OURS --lun iqn.2026-11.io.strata:bench=raw:"$work/disk.raw" >"$work/ours.log" 2>&1 &
pids+=($!)
RUST_LOG=warn "$STRATA" iscsi serve --listen 127.0.0.1:$PORT_VHDX --lun iqn.2026-11.io.strata:bench=$work/node.vhdx >"$work/vhdx.log" 2>&1 &
pids+=($!)
tgtd -f --iscsi portal=127.0.0.1:$PORT_TGT -C 7 >"$work/tgt.log" 2>&1 &
pids+=($!)
wait_port $PORT_OURS; wait_port $PORT_VHDX; wait_port $PORT_TGT
sleep 0.5
tgtadm -C 7 --lld iscsi --op new --mode target --tid 1 -T iqn.2026-11.test:bench
tgtadm -C 7 --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/disk.raw"
tgtadm -C 7 --lld iscsi --op bind --mode target --tid 1 -I ALL

declare -A R
run() { # name port target lun mode
  local out
  out=$("$BENCH" --addr 127.0.0.1:$2 --target "$3" --lun "$4" --mode "$5" --bs "$BS" --qd "$QD" --seconds "$SECS")
  R[$1.$5]=$(sed -n 's/.*iops=\([0-9]*\).*/\1/p' <<<"$out")
  printf '%-10s %-10s %s\n' "$1" "$5" "$out" >&2
}

for mode in seqread randread seqwrite randwrite; do
  run ours $PORT_OURS iqn.2026-11.io.strata:bench 0 $mode
  run vhdx $PORT_VHDX iqn.2026-11.io.strata:bench 0 $mode
  run tgt $PORT_TGT iqn.2026-11.test:bench 1 $mode
done

echo
printf '%-10s %12s %12s %12s %10s %10s\n' mode "ours raw" "ours vhdx" tgt "raw/tgt" "vhdx/tgt"
for mode in seqread randread seqwrite randwrite; do
  o=${R[ours.$mode]}; v=${R[vhdx.$mode]}; t=${R[tgt.$mode]}
  printf '%-10s %12s %12s %12s %10s %10s\n' "$mode" "$o" "$v" "$t" \
    "$(awk -v a="$o" -v b="$t" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$v" -v b="$t" 'BEGIN{printf "%.2f", a/b}')"
done
echo "(IOPS, ${BS}-byte commands, queue depth $QD, ${SECS} s each, ${SIZE_MIB} MiB image in /dev/shm)"
