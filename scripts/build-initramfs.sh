#!/usr/bin/env bash
# Builds the node-init initramfs: a gzip'd newc cpio holding
#   /init                              node-init, static (crt-static), profile node-init
#   /sbin/mke2fs + its shared libraries  e2fsprogs' mke2fs, only for formatting the cache (ext4)
#   /lib/modules/<kver>/...            the modules node-init needs, dependencies resolved
#   /lib/modules/strata-modules.list   their paths in load order (node-init finit_module()s them)
#   /dev/console, /etc/strata/         (the server appends /etc/strata/server.pub as a 2nd archive)
# Usage: scripts/build-initramfs.sh [--kernel-root DIR] [--out FILE] [--extra-modules "a b"]
#   --kernel-root  unpacked kernel package (default: $STRATA_CACHE/kernel/root, from setup.sh)
#   --out          output (default: $STRATA_CACHE/initramfs/node-init.cpio.gz)
#   NODE_INIT_BIN=path skips the cargo build and uses that binary.
# Prints the output path on stdout.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

kroot=$STRATA_CACHE/kernel/root
out=$STRATA_CACHE/initramfs/node-init.cpio.gz
extra=""
while (($#)); do
  case $1 in
    --kernel-root) kroot=$2; shift ;;
    --out) out=$2; shift ;;
    --extra-modules) extra=$2; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Boot NICs and disks of the lab and common hardware, loop + device-mapper for attaching the
# chain, ext4 for the cache and images, nbd for a future NBD attach, iscsi_tcp for diskless
# nodes (with iscsistart below).
MODULES="virtio_pci virtio_net virtio_blk virtio_scsi sd_mod e1000 e1000e
  loop dm_mod dm_zero dm_snapshot crc32c_generic ext4 nbd iscsi_tcp $extra"

for tool in cpio gzip depmod ldd; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/setup.sh" >&2; exit 1; }
done
mke2fs_bin=/sbin/mke2fs
[ -x "$mke2fs_bin" ] || { echo "$mke2fs_bin missing: apt-get install e2fsprogs" >&2; exit 1; }
# open-iscsi's iscsistart logs a diskless node in to its target (node-init/src/iscsi.rs).
iscsistart_bin=/usr/sbin/iscsistart
[ -x "$iscsistart_bin" ] || { echo "$iscsistart_bin missing: apt-get install open-iscsi" >&2; exit 1; }
[ -d "$kroot/lib/modules" ] || { echo "no kernel at $kroot: run scripts/setup.sh" >&2; exit 1; }
kver=$(ls "$kroot/lib/modules" | head -n1)

if [ -n "${NODE_INIT_BIN:-}" ]; then
  bin=$NODE_INIT_BIN
else
  log "building node-init (static, profile node-init)"
  (cd "$STRATA_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q -p node-init --profile node-init --target x86_64-unknown-linux-gnu >&2)
  bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/node-init/node-init
fi
file -L "$bin" | grep -Eq 'static(-pie)? linked' || { echo "$bin is not static" >&2; exit 1; }

work=$(mktemp -d "$STRATA_CACHE/initramfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# depmod on a hard-linked copy (no space, the kernel tree stays untouched).
mkdir -p "$work/k/lib/modules"
cp -al "$kroot/lib/modules/$kver" "$work/k/lib/modules/$kver" 2>/dev/null \
  || cp -a "$kroot/lib/modules/$kver" "$work/k/lib/modules/$kver"
depmod -b "$work/k" "$kver"
mdir=$work/k/lib/modules/$kver

# name -> path from modules.dep, dependencies loaded first (depth-first post-order).
declare -A path_of deps_of seen
while IFS= read -r line; do
  p=${line%%:*}; d=${line#*:}
  n=$(basename "$p" .ko); n=${n//-/_}
  path_of[$n]=$p; deps_of[$n]=$d
done < "$mdir/modules.dep"
order=()
visit() {
  local n=${1//-/_} dep
  [ -n "${seen[$n]:-}" ] && return; seen[$n]=1
  for dep in ${deps_of[$n]}; do visit "$(basename "$dep" .ko)"; done
  order+=("$n")
}
for m in $MODULES; do
  n=${m//-/_}
  if [ -z "${path_of[$n]:-}" ]; then
    if grep -q "/${m//_/[_-]}.ko\$" "$mdir/modules.builtin" 2>/dev/null; then continue; fi
    echo "module $m not found in $kver" >&2; exit 1
  fi
  # Soft pre-dependencies (ext4 wants crc32c) come first.
  for pre in $(sed -n "s/^softdep $n pre: //p" "$mdir/modules.softdep" 2>/dev/null); do
    [ -n "${path_of[${pre//-/_}]:-}" ] && visit "$pre"
  done
  visit "$n"
done

root=$work/root
mkdir -p "$root"/{sbin,dev,etc/strata,proc,sys,run,newroot,lib/modules}
install -m 0755 "$bin" "$root/init"
# mke2fs with the shared libraries and loader it needs (ldd), and its configuration.
install -m 0755 "$mke2fs_bin" "$root/sbin/mke2fs"
for lib in $(ldd "$mke2fs_bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
[ -f /etc/mke2fs.conf ] && install -m 0644 /etc/mke2fs.conf "$root/etc/mke2fs.conf"
install -m 0755 "$iscsistart_bin" "$root/sbin/iscsistart"
for lib in $(ldd "$iscsistart_bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
mknod -m 0600 "$root/dev/console" c 5 1
mknod -m 0666 "$root/dev/null" c 1 3
list=$root/lib/modules/strata-modules.list
echo "# kernel $kver: load order (scripts/build-initramfs.sh)" > "$list"
for n in "${order[@]}"; do
  p=${path_of[$n]}
  mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
  cp "$mdir/$p" "$root/lib/modules/$kver/$p"
  echo "/lib/modules/$kver/$p" >> "$list"
done

mkdir -p "$(dirname "$out")"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
  | gzip -n -9 > "$out.tmp"
mv "$out.tmp" "$out"
log "initramfs: $(du -h "$out" | cut -f1) ($(wc -l < "$list" | tr -d ' ') lines in the module list, node-init $(du -h "$bin" | cut -f1), kernel $kver)"
echo "$out"
