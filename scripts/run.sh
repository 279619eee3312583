#!/usr/bin/env bash
# The main job: the Strata appliance with its embedded defaults (SQLite store under
# ~/.cache/strata/data, the built-in busybox test image, HTTP on :8080, TFTP on :69, DHCP off).
#   scripts/run.sh                 run the appliance on this host until Ctrl-C
#   scripts/run.sh --lab [N]       run it inside a network namespace with a bridge and DHCP on,
#                                  and boot N (default 2) QEMU VMs that PXE boot from it
# Extra arguments after `--` go to `strata serve` (or to `strata-lab up` with --lab).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

lab=0; vms=2; extra=()
while (($#)); do
  case $1 in
    --lab) lab=1; if [[ ${2:-} =~ ^[0-9]+$ ]]; then vms=$2; shift; fi ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

bash "$STRATA_ROOT/scripts/setup.sh"
cd "$STRATA_ROOT"
log "building strata (release)"
cargo build --release --locked -p strata-server -p qemu-tests --bins
bash "$STRATA_ROOT/scripts/build-initramfs.sh" >/dev/null
bin=$CARGO_TARGET_DIR/release
if ((lab)); then
  # node-init caches images on each VM's disk; IPv6 on the bridge so Strata's router
  # advertisements end iPXE's IPv6 wait.
  exec "$bin/strata-lab" up --vms "$vms" --strata "$bin/strata" --ipv6 \
    --memory 512 --disk-size 512M "${extra[@]}"
else
  exec "$bin/strata" serve --data-dir "$STRATA_CACHE/data" "${extra[@]}"
fi
