#!/usr/bin/env bash
# TFTP throughput on loopback: Strata's TFTP server against tftpd-hpa, measured in the same
# run with the same client (atftp) and the same options, on a file in /dev/shm. Prints MB/s
# (median of RUNS) per configuration and the ratio ours / tftpd-hpa; the windowsize rows are
# compared with tftpd-hpa's best figure (it has no windowsize).
#
#   scripts/bench-tftp.sh            SIZE_MIB=64 RUNS=3 by default
#   STRATA_TFTPD=/path/to/tftpd scripts/bench-tftp.sh   use a prebuilt example binary
source "$(dirname "$0")/common.sh"

for t in in.tftpd:tftpd-hpa atftp:atftp; do
  command -v "${t%%:*}" >/dev/null || { echo "missing ${t%%:*}: apt-get install ${t#*:} (scripts/setup.sh)" >&2; exit 1; }
done
SIZE_MIB=${SIZE_MIB:-64}
RUNS=${RUNS:-3}
PORT_OURS=${PORT_OURS:-16969}
PORT_HPA=${PORT_HPA:-16970}

if [ -z "${STRATA_TFTPD:-}" ]; then
  log "building the tftpd example (release)"
  (cd "$STRATA_ROOT" && cargo build --release -q -p strata-server --example tftpd)
  STRATA_TFTPD=$CARGO_TARGET_DIR/release/examples/tftpd
fi

work=$(mktemp -d /dev/shm/strata-bench-tftp.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"
mkdir -m 755 "$work/root"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$work/root/file.bin"
chmod 644 "$work/root/file.bin"

"$STRATA_TFTPD" "$work/root" "127.0.0.1:$PORT_OURS" > "$work/ours.log" 2>&1 &
pids+=($!)
in.tftpd -L -s -a "127.0.0.1:$PORT_HPA" "$work/root" > "$work/hpa.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/ours.log" && break; sleep 0.05; done
grep -q listening "$work/ours.log" || { cat "$work/ours.log" >&2; exit 1; }

# once PORT OPTION... -> MB/s of one transfer
once() {
  local port=$1; shift
  local args=() o t0 t1
  for o in "$@"; do args+=(--option "$o"); done
  rm -f "$work/out"
  t0=$(date +%s.%N)
  atftp -g -r file.bin -l "$work/out" "${args[@]}" 127.0.0.1 "$port" >/dev/null 2>&1 \
    || { echo "transfer failed: port $port $*" >&2; exit 1; }
  t1=$(date +%s.%N)
  cmp -s "$work/out" "$work/root/file.bin" || { echo "corrupt transfer: port $port $*" >&2; exit 1; }
  echo "$SIZE_MIB * 1048576 / ($t1 - $t0) / 1000000" | bc -l
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]}'; }
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.2f", $1}'; }

# Runs alternate between the two servers, so load from elsewhere hits both alike.
# pair "OURS OPTIONS" "HPA OPTIONS" -> "ours hpa" medians (options separated by commas)
pair() {
  local a=() b=() o1 o2
  IFS=, read -ra o1 <<< "$1"
  IFS=, read -ra o2 <<< "$2"
  for _ in $(seq "$RUNS"); do
    a+=("$(once "$PORT_OURS" "${o1[@]}")")
    b+=("$(once "$PORT_HPA" "${o2[@]}")")
  done
  echo "$(median "${a[@]}") $(median "${b[@]}")"
}

printf 'TFTP, %d MiB on loopback, atftp client, median of %d alternating runs (MB/s)\n' "$SIZE_MIB" "$RUNS"
printf '%-34s %9s %10s %7s\n' "strata options (tftpd-hpa)" strata tftpd-hpa ratio
row() { # LABEL OURS HPA
  local ours hpa
  read -r ours hpa < <(pair "$2" "$3")
  printf '%-34s %9s %10s %7s\n' "$1" "$ours" "$hpa" "$(ratio "$ours" "$hpa")"
}
for bs in 512 1468 8192 65464; do
  row "blksize $bs" "blksize $bs" "blksize $bs"
done
# tftpd-hpa has no windowsize: the windowed rows run against tftpd-hpa at the same blksize
# and against its best blksize (65464). Strata grants at most 96 KiB per window.
row "blksize 1468 windowsize 16" "blksize 1468,windowsize 16" "blksize 1468"
row "blksize 1468 windowsize 64" "blksize 1468,windowsize 64" "blksize 1468"
row "1468 ws 16 (hpa: blksize 65464)" "blksize 1468,windowsize 16" "blksize 65464"
row "blksize 8192 windowsize 12" "blksize 8192,windowsize 12" "blksize 8192"
