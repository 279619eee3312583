#!/usr/bin/env bash
# HTTP throughput on loopback (docs/benchmarks.md, "HTTP layer serving"): a 1 GiB layer served
# by `strata serve` (GET /layers/<blake3>.vhdx) against nginx serving the same file (the same
# inode, in /dev/shm, so both read the same page cache), with sendfile on and off. curl is the
# client: one client for the whole file, and CLIENTS clients at once (aggregate: CLIENTS x the
# file size over the wall time from the first start to the last finish). Runs alternate between
# the servers so load from elsewhere hits all of them alike; prints medians of RUNS runs in MB/s
# and the ratio strata / nginx, each server's CPU seconds per GiB served (user + system of its
# processes, from /proc: unlike throughput, not set by the share of a loaded machine it gets),
# and the load average before and after.
#
#   scripts/bench-http.sh                 SIZE_MIB=1024 RUNS=3 CLIENTS=8 by default
#   STRATA=/path/to/strata scripts/bench-http.sh   use a prebuilt release binary
#
# The layer is published the way the store names layers: the file's blake3 (`strata vhdx
# hash`) is its name in <data>/store/layers/; the HTTP route serves any file published there.
# nginx runs in the foreground with a config of its own on high ports (not the system service).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
CLIENTS=${CLIENTS:-8}
PORT_STRATA=${PORT_STRATA:-18480}
PORT_NGX_SF=${PORT_NGX_SF:-18481}
PORT_NGX_NOSF=${PORT_NGX_NOSF:-18482}

command -v curl >/dev/null || { echo "missing curl: apt-get install curl" >&2; exit 1; }
if ! command -v nginx >/dev/null; then
  log "installing nginx-light (scripts/setup.sh lists it)"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q nginx-light >/dev/null \
    || { echo "cannot install nginx: apt-get install nginx-light" >&2; exit 1; }
fi
NGINX=$(command -v nginx)

if [ -z "${STRATA:-}" ]; then
  log "building strata (release)"
  (cd "$STRATA_ROOT" && cargo build --release -q -p strata-server --bin strata)
  STRATA=$CARGO_TARGET_DIR/release/strata
fi

work=$(mktemp -d /dev/shm/strata-bench-http.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"
mkdir -m 755 "$work/www" "$work/nginx" "$work/data"

log "writing a $SIZE_MIB MiB file"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$work/layer.bin"
chmod 644 "$work/layer.bin"
id=$("$STRATA" vhdx hash "$work/layer.bin" | awk '{print $1}')
[[ $id =~ ^[0-9a-f]{64}$ ]] || { echo "strata vhdx hash printed no blake3: $id" >&2; exit 1; }
ln "$work/layer.bin" "$work/www/layer.bin"

# nginx: master in the foreground, workers as the package's default (auto: one per core).
cat > "$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  default_type application/octet-stream;
  tcp_nopush on;
  keepalive_timeout 10;
  server { listen 127.0.0.1:$PORT_NGX_SF; root $work/www; sendfile on; }
  server { listen 127.0.0.1:$PORT_NGX_NOSF; root $work/www; sendfile off; }
}
EOF
"$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" \
  > "$work/nginx/out.log" 2>&1 &
ngx_pid=$!
pids+=($ngx_pid)

# strata: HTTP only (TFTP off), a fresh data directory.
cat > "$work/strata.toml" <<EOF
[tftp]
enabled = false
EOF
RUST_LOG=${RUST_LOG:-warn,strata_server=info} "$STRATA" serve --config "$work/strata.toml" \
  --data-dir "$work/data" --http-listen "127.0.0.1:$PORT_STRATA" > "$work/strata.log" 2>&1 &
strata_pid=$!
pids+=($strata_pid)
for _ in $(seq 600); do grep -q 'listening on' "$work/strata.log" && break; sleep 0.1; done
grep -q 'listening on' "$work/strata.log" || { echo "strata serve did not start:" >&2; cat "$work/strata.log" >&2; exit 1; }
# Publish: a temp name in the store's layers/ directory, then a rename to <blake3>.vhdx, as
# store::publish_layer does (a hard link keeps one inode for both servers).
ln "$work/layer.bin" "$work/data/store/layers/.bench-$id.tmp"
mv "$work/data/store/layers/.bench-$id.tmp" "$work/data/store/layers/$id.vhdx"

URL_STRATA=http://127.0.0.1:$PORT_STRATA/layers/$id.vhdx
URL_NGX_SF=http://127.0.0.1:$PORT_NGX_SF/layer.bin
URL_NGX_NOSF=http://127.0.0.1:$PORT_NGX_NOSF/layer.bin
for _ in $(seq 100); do curl -sf -o /dev/null -r 0-0 "$URL_NGX_SF" && break; sleep 0.05; done

# The same bytes from each server: the length, and one range from the middle.
size=$((SIZE_MIB << 20))
mid=$((size / 2 + 12345))
expect=$(dd if="$work/layer.bin" bs=1M skip="$mid" count=1 iflag=skip_bytes status=none | cksum)
for url in "$URL_STRATA" "$URL_NGX_SF" "$URL_NGX_NOSF"; do
  len=$(curl -sfI "$url" | tr -d '\r' | awk 'tolower($1) == "content-length:" {print $2}')
  [ "$len" = "$size" ] || { echo "$url: Content-Length $len, want $size" >&2; exit 1; }
  got=$(curl -sf -r "$mid-$((mid + 1048575))" "$url" | cksum)
  [ "$got" = "$expect" ] || { echo "$url: wrong bytes for a range" >&2; exit 1; }
done
# Warm the page cache through each server once (the file was just written; this only makes
# the first measured run like the others).
for url in "$URL_STRATA" "$URL_NGX_SF"; do curl -sf -o /dev/null "$url"; done

one() { # URL -> MB/s of one client
  local bps
  bps=$(curl -sf -o /dev/null -w '%{speed_download}' "$1") || { echo "download failed: $1" >&2; exit 1; }
  echo "$bps / 1000000" | bc -l
}
many() { # URL -> aggregate MB/s of CLIENTS clients started together
  local t0 t1 i cpids=() rc=0
  t0=$(date +%s.%N)
  for i in $(seq "$CLIENTS"); do
    curl -sf -o /dev/null -w '%{size_download}\n' "$1" > "$work/many.$i" &
    cpids+=($!)
  done
  for p in "${cpids[@]}"; do wait "$p" || rc=1; done
  t1=$(date +%s.%N)
  ((rc == 0)) || { echo "a download failed: $1" >&2; exit 1; }
  for i in $(seq "$CLIENTS"); do
    [ "$(cat "$work/many.$i")" = "$size" ] || { echo "short download from $1" >&2; exit 1; }
  done
  echo "$CLIENTS * $size / ($t1 - $t0) / 1000000" | bc -l
}
# CPU time (user + system, clock ticks) of processes and all their threads. On a loaded
# machine throughput follows the CPU share a server gets; CPU seconds per GiB served do not,
# so they are printed too. (On loopback the kernel's receive work partly runs in the sender's
# context: the figure is the server's whole cost, kernel included.)
cpu_ticks() {
  local t=0 p f st
  for p in "$@"; do
    for f in /proc/"$p"/task/*/stat; do
      st=$(cat "$f" 2>/dev/null) || continue
      st=${st##*) }
      read -r -a st <<< "$st"
      t=$((t + st[11] + st[12]))
    done
  done
  echo "$t"
}
HZ=$(getconf CLK_TCK)
server_pids() { # KEY -> the server's processes
  case $1 in strata) echo "$strata_pid" ;; *) echo "$ngx_pid $(pgrep -P "$ngx_pid" | tr '\n' ' ')" ;; esac
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.0f", a[int((NR+1)/2)]}'; }
median2() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR+1)/2)]}'; }
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.2f", $1}'; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A r cpu
for _ in $(seq "$RUNS"); do
  for s in strata ngx_sf ngx_nosf; do
    case $s in strata) u=$URL_STRATA ;; ngx_sf) u=$URL_NGX_SF ;; ngx_nosf) u=$URL_NGX_NOSF ;; esac
    # shellcheck disable=SC2046
    for c in 1 n; do
      c0=$(cpu_ticks $(server_pids "$s"))
      if [ "$c" = 1 ]; then v=$(one "$u"); gib=$size; else v=$(many "$u"); gib=$((CLIENTS * size)); fi
      c1=$(cpu_ticks $(server_pids "$s"))
      r[$s.$c]+=" $v"
      cpu[$s.$c]+=" $(echo "($c1 - $c0) / $HZ / ($gib / 1073741824)" | bc -l)"
    done
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

printf 'HTTP, %d MiB file on loopback, curl, median of %d runs; load average %s -> %s\n' \
  "$SIZE_MIB" "$RUNS" "$load_before" "$load_after"
printf '%-16s %8s %14s %16s %12s %14s\n' "MB/s, clients" strata nginx-sendfile nginx-nosendfile "/ sendfile" "/ nosendfile"
for c in 1 n; do
  # shellcheck disable=SC2086
  st=$(median ${r[strata.$c]}); sf=$(median ${r[ngx_sf.$c]}); nsf=$(median ${r[ngx_nosf.$c]})
  label=1; [ "$c" = n ] && label="$CLIENTS (aggregate)"
  printf '%-16s %8s %14s %16s %12s %14s\n' "$label" "$st" "$sf" "$nsf" "$(ratio "$st" "$sf")" "$(ratio "$st" "$nsf")"
done
printf '%-16s %8s %14s %16s %12s %14s\n' "CPU s/GiB" strata nginx-sendfile nginx-nosendfile "/ sendfile" "/ nosendfile"
for c in 1 n; do
  # shellcheck disable=SC2086
  st=$(median2 ${cpu[strata.$c]}); sf=$(median2 ${cpu[ngx_sf.$c]}); nsf=$(median2 ${cpu[ngx_nosf.$c]})
  label=1; [ "$c" = n ] && label="$CLIENTS (aggregate)"
  printf '%-16s %8s %14s %16s %12s %14s\n' "$label" "$st" "$sf" "$nsf" "$(ratio "$st" "$sf")" "$(ratio "$st" "$nsf")"
done
printf 'all runs (MB/s | server CPU s/GiB):\n'
for k in strata.1 ngx_sf.1 ngx_nosf.1 strata.n ngx_sf.n ngx_nosf.n; do
  # shellcheck disable=SC2086
  printf '  %-11s %s| %s\n' "$k" "$(printf '%.0f ' ${r[$k]})" "$(printf '%.2f ' ${cpu[$k]})"
done
