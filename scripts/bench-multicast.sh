#!/usr/bin/env bash
# Multicast benchmark (docs/benchmarks.md, "Multicast"): one sender and 3 or 8 receivers, each
# in its own network namespace on a bridge (mcast_snooping 0), IPv6 off. For each receiver
# count and loss rate (nftables `numgen random` drops in the receivers' namespaces) it sends one
# file with `strata mcast`, udpcast (udp-sender/udp-receiver) and uftp/uftpd, and at 0% loss
# with HTTP (python http.server + one curl per receiver). Prints wall time, the sender's
# wire bytes (tx_bytes of its veth) per file byte, and checks every receiver's copy.
#
# Usage: scripts/bench-multicast.sh            (256 MiB, 3 and 8 receivers, 0%, 1% and 5% loss)
#        SIZE_MIB=64 COUNTS="3" LOSSES="0 1 5" scripts/bench-multicast.sh
# Needs root, udpcast, uftp, nftables, python3, curl (scripts/setup.sh installs them).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SIZE_MIB=${SIZE_MIB:-256}
COUNTS=${COUNTS:-"3 8"}
LOSSES=${LOSSES:-"0 1 5"}
RATE=${RATE:-1500M}          # ceiling for strata (bit/s) and udpcast (--max-bitrate)
TOOLS=${TOOLS:-"strata udpcast uftp http"}
TAG=${TAG:-b$$}
WORK=/dev/shm/strata-mcbench-$TAG
SUBNET=10.98.0

for t in udp-sender udp-receiver uftp uftpd nft curl python3; do
  command -v "$t" >/dev/null || { echo "missing $t: run scripts/setup.sh (apt-get install udpcast uftp nftables curl)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }

if [ -n "${STRATA_BIN:-}" ]; then
  STRATA=$STRATA_BIN   # an already-built binary (skips the release build)
else
  log "building strata (release)"
  cargo build -q --release -p strata-server --bin strata
  STRATA=$CARGO_TARGET_DIR/release/strata
fi

NS_S=mc${TAG}s NS_B=mc${TAG}br
MAXN=0
for n in $COUNTS; do ((n > MAXN)) && MAXN=$n; done
cleanup() {
  for i in $(seq 1 "$MAXN"); do ip netns del "mc${TAG}r$i" 2>/dev/null || true; done
  ip netns del "$NS_S" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

lab_up() { # receivers
  ip netns add "$NS_B"; ip netns add "$NS_S"
  ip netns exec "$NS_B" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip -n "$NS_B" link add br0 type bridge mcast_snooping 0
  ip -n "$NS_B" link set br0 up
  ip link add eth0 netns "$NS_S" type veth peer name s0 netns "$NS_B"
  ip -n "$NS_B" link set s0 master br0 up
  ip netns exec "$NS_S" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
  ip -n "$NS_S" addr add $SUBNET.1/24 dev eth0
  ip -n "$NS_S" link set eth0 up; ip -n "$NS_S" link set lo up
  for i in $(seq 1 "$1"); do
    local r=mc${TAG}r$i
    ip netns add "$r"
    ip netns exec "$r" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip link add eth0 netns "$r" type veth peer name r$i netns "$NS_B"
    ip -n "$NS_B" link set r$i master br0 up
    ip -n "$r" addr add $SUBNET.$((10 + i))/24 dev eth0
    ip -n "$r" link set eth0 up; ip -n "$r" link set lo up
  done
}

set_loss() { # receivers percent
  for i in $(seq 1 "$1"); do
    local r=mc${TAG}r$i
    ip netns exec "$r" nft delete table inet strata_loss 2>/dev/null || true
    if [ "$2" != 0 ]; then
      ip netns exec "$r" nft add table inet strata_loss
      ip netns exec "$r" nft add chain inet strata_loss input '{ type filter hook input priority 0; }'
      ip netns exec "$r" nft add rule inet strata_loss input meta l4proto '{ tcp, udp }' numgen random mod 100 '<' "$2" counter drop
    fi
  done
}

tx_bytes() { ip netns exec "$NS_S" cat /sys/class/net/eth0/statistics/tx_bytes; }
now() { date +%s.%N; }

# Waits for receivers after the sender is done: 30 s at most, then kills the stragglers (a
# udp-receiver that lost its sender's handshake waits forever); they count as failed copies.
reap() {
  local deadline=$((SECONDS + 30))
  while ((SECONDS < deadline)); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  wait "$@" 2>/dev/null || true
}

# Each runner: $1 receivers; leaves receiver i's copy at $WORK/r$i/out (or prints why not).
run_strata() {
  local n=$1 pids=()
  for i in $(seq 1 "$n"); do
    ip netns exec "mc${TAG}r$i" "$STRATA" mcast recv --group 239.255.90.1:9000 --iface eth0 \
      --out "$WORK/r$i/out" --timeout 600 >"$WORK/r$i/strata.json" 2>"$WORK/r$i/strata.err" &
    pids+=($!)
  done
  sleep 0.3
  ip netns exec "$NS_S" "$STRATA" mcast send "$FILE" --group 239.255.90.1:9000 --iface eth0 \
    --min-receivers "$n" --rate "$RATE" </dev/null >"$WORK/strata-send.json" 2>"$WORK/strata-send.err" || true
  wait "${pids[@]}" || true
}

run_udpcast() {
  local n=$1 pids=()
  for i in $(seq 1 "$n"); do
    ip netns exec "mc${TAG}r$i" udp-receiver --interface eth0 --file "$WORK/r$i/out" --nokbd \
      --portbase 9100 --mcast-rdv-address 239.255.91.1 --rcvbuf 4194304 --no-progress \
      >"$WORK/r$i/udpcast.log" 2>&1 &
    pids+=($!)
  done
  sleep 0.3
  ip netns exec "$NS_S" timeout -k 5 600 udp-sender --interface eth0 --file "$FILE" --nokbd \
    --min-receivers "$n" --max-bitrate "${RATE,,}" --portbase 9100 \
    --mcast-rdv-address 239.255.91.1 --mcast-data-address 239.255.91.2 \
    >"$WORK/udpcast-send.log" 2>&1 || true
  reap "${pids[@]}"
}

run_uftp() {
  local n=$1 pids=()
  for i in $(seq 1 "$n"); do
    mkdir -p "$WORK/r$i/uftp"
    ip netns exec "mc${TAG}r$i" uftpd -d -I eth0 -M 239.255.92.1 -D "$WORK/r$i/uftp" -B 4194304 \
      -P "$WORK/r$i/uftpd.pid" >"$WORK/r$i/uftpd.log" 2>&1 &
    pids+=($!)
  done
  sleep 0.5
  local kbps=$(( $(numfmt --from=si "${RATE}") / 1000 ))
  ip netns exec "$NS_S" timeout -k 5 600 uftp -I eth0 -M 239.255.92.1 -P 239.255.92.2 \
    -R "$kbps" -B 4194304 -s 10 "$FILE" >"$WORK/uftp-send.log" 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  for i in $(seq 1 "$n"); do
    [ -f "$WORK/r$i/uftp/$(basename "$FILE")" ] && mv "$WORK/r$i/uftp/$(basename "$FILE")" "$WORK/r$i/out"
  done
}

run_http() {
  local n=$1 pids=()
  ip netns exec "$NS_S" python3 -m http.server 8000 --bind $SUBNET.1 --directory "$(dirname "$FILE")" \
    >"$WORK/http.log" 2>&1 &
  local srv=$!
  for _ in $(seq 1 100); do
    ip netns exec "mc${TAG}r1" curl -sf -o /dev/null -r 0-0 "http://$SUBNET.1:8000/$(basename "$FILE")" && break
    sleep 0.1
  done
  local t0; t0=$(now); local tx0; tx0=$(tx_bytes)
  for i in $(seq 1 "$n"); do
    ip netns exec "mc${TAG}r$i" curl -sf -o "$WORK/r$i/out" "http://$SUBNET.1:8000/$(basename "$FILE")" &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  HTTP_T=$(echo "$(now) - $t0" | bc); HTTP_TX=$(( $(tx_bytes) - tx0 ))
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
}

mkdir -p "$WORK"
FILE=$WORK/layer.img
log "making a ${SIZE_MIB} MiB random layer"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$FILE"
SUM=$(sha256sum "$FILE" | cut -d' ' -f1)
BYTES=$((SIZE_MIB << 20))
lab_up "$MAXN"

echo "# multicast bench: ${SIZE_MIB} MiB, rate ceiling $RATE, $(nproc) cores, load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-9s %-5s %-8s %9s %10s %8s %s\n' receivers loss tool seconds wire_ratio ok notes
for n in $COUNTS; do
  for loss in $LOSSES; do
    set_loss "$MAXN" "$loss"
    for tool in $TOOLS; do
      [ "$tool" = http ] && [ "$loss" != 0 ] && continue
      for i in $(seq 1 "$n"); do rm -rf "$WORK/r$i"; mkdir -p "$WORK/r$i"; done
      notes=""
      if [ "$tool" = http ]; then
        run_http "$n"; secs=$HTTP_T; tx=$HTTP_TX
      else
        tx0=$(tx_bytes); t0=$(now)
        "run_$tool" "$n"
        secs=$(echo "$(now) - $t0" | bc); tx=$(( $(tx_bytes) - tx0 ))
      fi
      ok=0
      for i in $(seq 1 "$n"); do
        [ -f "$WORK/r$i/out" ] && [ "$(sha256sum "$WORK/r$i/out" | cut -d' ' -f1)" = "$SUM" ] && ok=$((ok + 1))
      done
      if [ "$tool" = strata ]; then
        notes=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("repairs=%d min_rate=%dM evicted=%d" % (d["repair_packets"], d["min_rate_bps"] / 1e6, d["receivers_evicted"]))' "$WORK/strata-send.json" 2>/dev/null || echo "no report")
      fi
      printf '%-9s %-5s %-8s %9.2f %10.3f %5s/%-2s %s\n' "$n" "$loss%" "$tool" "$secs" \
        "$(echo "scale=4; $tx / $BYTES" | bc)" "$ok" "$n" "$notes"
    done
  done
done
echo "# load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
