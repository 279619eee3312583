#!/usr/bin/env bash
# TFTP throughput on loopback: Strata's TFTP server against tftpd-hpa, measured in the same
# run with the same clients and the same options, on a file in /dev/shm. Three clients: atftp
# (a real peer; it keeps Linux's default 208 KiB receive buffer and writes the file), tftp_get
# (server/examples/tftp_get.rs: a 4 MiB receive buffer, recvmmsg, one writev per batch; it
# writes the file too) and tftp_get-discard (the same client writing to /dev/null), which shows
# what each server does when storing the file is not the limit. Every stored file is compared
# with the original after the timed transfer. atftp is timed by the wall time of its process;
# tftp_get by its own clock, from the request to the last byte written (at 2 GB/s a 64 MiB
# transfer takes 30 ms, and process start-up would add 5-10 ms to it).
#
# Runs go round robin: each round fetches once with every configuration (both servers), so
# load from elsewhere hits every row alike. Prints, per row, the best and the median MB/s of
# RUNS rounds for each server and their ratios, the client's CPU share (user + system time over
# wall time, median: near 100% means the client is the limit, not the server), and the load
# average before and after. The windowed rows compare Strata with tftpd-hpa at the same
# blksize and at tftpd-hpa's best (lock-step 65464; it has no windowsize). Last, two ceilings:
# the loopback's UDP ceiling (iperf3 -u, 64 KB datagrams, no protocol, the receiver keeps
# nothing), which no TFTP server can beat, and writing 64 MiB to a new file in /dev/shm (dd,
# 64 KiB writes), which bounds every client that stores what it receives.
source "$(dirname "$0")/common.sh"

for t in in.tftpd:tftpd-hpa atftp:atftp iperf3:iperf3; do
  command -v "${t%%:*}" >/dev/null || { echo "missing ${t%%:*}: apt-get install ${t#*:} (scripts/setup.sh)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "missing /usr/bin/time: apt-get install time" >&2; exit 1; }
SIZE_MIB=${SIZE_MIB:-64}
RUNS=${RUNS:-5}
PORT_OURS=${PORT_OURS:-16969}
PORT_HPA=${PORT_HPA:-16970}

if [ -z "${STRATA_TFTPD:-}" ] || [ -z "${TFTP_GET:-}" ]; then
  log "building the tftpd and tftp_get examples (release)"
  (cd "$STRATA_ROOT" && cargo build --release -q -p strata-server --example tftpd --example tftp_get)
  STRATA_TFTPD=${STRATA_TFTPD:-$CARGO_TARGET_DIR/release/examples/tftpd}
  TFTP_GET=${TFTP_GET:-$CARGO_TARGET_DIR/release/examples/tftp_get}
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

# once CLIENT PORT OPTIONS(comma-separated) -> "MB/s client-cpu-share" of one transfer
once() {
  local client=$1 port=$2 cmd=() o opts t0 t1 cpu bs=512 ws=1 out=$work/out
  IFS=, read -ra opts <<< "$3"
  if [ "$client" = atftp ]; then
    cmd=(atftp -g -r file.bin -l "$out")
    for o in "${opts[@]}"; do cmd+=(--option "$o"); done
    cmd+=(127.0.0.1 "$port")
  else
    for o in "${opts[@]}"; do
      case $o in blksize\ *) bs=${o#* } ;; windowsize\ *) ws=${o#* } ;; esac
    done
    [ "$client" = tftp_get-discard ] && out=/dev/null
    cmd=("$TFTP_GET" "127.0.0.1:$port" file.bin "$bs" "$ws" --out "$out")
  fi
  rm -f "$work/out"
  t0=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$work/time" "${cmd[@]}" >"$work/client.out" 2>"$work/client.err" \
    || { echo "transfer failed: $client port $port $3: $(cat "$work/client.err")" >&2; exit 1; }
  t1=$(date +%s.%N)
  if [ "$out" != /dev/null ]; then
    cmp -s "$out" "$work/root/file.bin" || { echo "corrupt transfer: $client port $port $3" >&2; exit 1; }
  fi
  cpu=$(awk '{print $1 + $2}' "$work/time")
  # tftp_get's own clock (request to last byte written) where there is one; atftp: wall time
  # of the process (a few ms of start-up included).
  local secs
  secs=$(awk 'NF == 3 {print $2}' "$work/client.out")
  [ -n "$secs" ] || secs=$(echo "$t1 - $t0" | bc -l)
  echo "$(echo "$SIZE_MIB * 1048576 / $secs / 1000000" | bc -l) $(echo "100 * $cpu / ($t1 - $t0)" | bc -l)"
}

best() { printf '%s\n' "$@" | sort -g | tail -n1 | awk '{printf "%.1f", $1}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]}'; }
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.2f", $1}'; }

# Rows: LABEL|STRATA OPTIONS|TFTPD-HPA OPTIONS|CLIENTS (empty: every client). Strata grants
# windows of up to 1 MiB (65464 x 16); atftp's default receive buffer holds 3 blocks of 65464,
# so its large-block window row asks for 3.
rows=(
  "blksize 512|blksize 512|blksize 512|"
  "blksize 1468|blksize 1468|blksize 1468|"
  "blksize 8192|blksize 8192|blksize 8192|"
  "blksize 65464|blksize 65464|blksize 65464|"
  "1468 ws 16 (hpa: 1468)|blksize 1468,windowsize 16|blksize 1468|"
  "1468 ws 64 (hpa: 1468)|blksize 1468,windowsize 64|blksize 1468|"
  "8192 ws 16 (hpa: 8192)|blksize 8192,windowsize 16|blksize 8192|"
  "1468 ws 64 (hpa: 65464, its best)|blksize 1468,windowsize 64|blksize 65464|"
  "8192 ws 16 (hpa: 65464, its best)|blksize 8192,windowsize 16|blksize 65464|"
  "65464 ws 3 (hpa: 65464, its best)|blksize 65464,windowsize 3|blksize 65464|"
  "65464 ws 16 (hpa: 65464, its best)|blksize 65464,windowsize 16|blksize 65464|tftp_get tftp_get-discard"
)
runs_for() { [ -z "$1" ] || [[ " $1 " == *" $2 "* ]]; }
# Every distinct (client, server, options) is fetched once per round.
CLIENTS=${CLIENTS:-atftp tftp_get tftp_get-discard}
declare -A speed=() cpu=()
configs=()
for client in $CLIENTS; do
  for r in "${rows[@]}"; do
    IFS='|' read -r _ o h only <<< "$r"
    runs_for "$only" "$client" || continue
    for c in "$client|ours|$o" "$client|hpa|$h"; do
      [ -n "${speed[$c]+x}" ] || { speed[$c]=""; cpu[$c]=""; configs+=("$c"); }
    done
  done
done

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$RUNS"); do
  log "round $round of $RUNS (load $(cut -d' ' -f1 /proc/loadavg))"
  for c in "${configs[@]}"; do
    IFS='|' read -r client server opts <<< "$c"
    port=$PORT_OURS; [ "$server" = hpa ] && port=$PORT_HPA
    read -r s u < <(once "$client" "$port" "$opts")
    speed[$c]+="$s "
    cpu[$c]+="$u "
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

printf 'TFTP, %d MiB on loopback, %d rounds round robin; load average %s before, %s after\n' \
  "$SIZE_MIB" "$RUNS" "$load_before" "$load_after"
printf 'MB/s best (median); client CPU = client user+sys / wall, median (strata/tftpd-hpa)\n'
for client in $CLIENTS; do
  printf '\nclient: %s\n' "$client"
  printf '%-34s %16s %16s %11s %13s %11s\n' "row (strata options)" strata tftpd-hpa "ratio best" "ratio median" "client CPU"
  for r in "${rows[@]}"; do
    IFS='|' read -r label o h only <<< "$r"
    runs_for "$only" "$client" || continue
    read -ra a <<< "${speed[$client|ours|$o]}"
    read -ra b <<< "${speed[$client|hpa|$h]}"
    read -ra ca <<< "${cpu[$client|ours|$o]}"
    read -ra cb <<< "${cpu[$client|hpa|$h]}"
    printf '%-34s %16s %16s %11s %13s %5s%%/%3s%%\n' "$label" \
      "$(best "${a[@]}") ($(median "${a[@]}"))" "$(best "${b[@]}") ($(median "${b[@]}"))" \
      "$(ratio "$(best "${a[@]}")" "$(best "${b[@]}")")" "$(ratio "$(median "${a[@]}")" "$(median "${b[@]}")")" \
      "$(median "${ca[@]}" | cut -d. -f1)" "$(median "${cb[@]}" | cut -d. -f1)"
  done
done

# The loopback's UDP ceiling, after the rounds (so it does not load them).
iperf3 -s -1 -p 15201 > "$work/iperf-server.log" 2>&1 &
pids+=($!)
sleep 0.5
ceiling=$(iperf3 -c 127.0.0.1 -p 15201 -u -b 0 -l 65000 -t 3 -J 2>/dev/null \
  | python3 -c 'import json,sys; r = json.load(sys.stdin)["end"]["sum_received"]; print("%.1f" % (r["bytes"] / r["seconds"] / 1e6))' 2>/dev/null || echo "?")
printf '\nloopback UDP ceiling (iperf3 -u, 65000-byte datagrams, 3 s, bytes the receiver got): %s MB/s\n' "$ceiling"
# Storing the file: 64 KiB writes to a new file in /dev/shm (what atftp and tftp_get do), best
# of 3.
store=()
for _ in 1 2 3; do
  rm -f "$work/out"
  t0=$(date +%s.%N)
  dd if="$work/root/file.bin" of="$work/out" bs=64K status=none
  t1=$(date +%s.%N)
  store+=("$(echo "$SIZE_MIB * 1048576 / ($t1 - $t0) / 1000000" | bc -l)")
done
printf 'storing ceiling (dd, %d MiB in 64 KiB writes to a new file in /dev/shm, best of 3): %s MB/s\n' \
  "$SIZE_MIB" "$(best "${store[@]}")"
