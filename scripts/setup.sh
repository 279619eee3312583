#!/usr/bin/env bash
# Installs everything Strata's build, lab and tests need on Debian 12, idempotently:
# Debian packages (QEMU and firmware, e2fsprogs, busybox, the peers the tests compare against),
# and the Debian kernel the test images boot, unpacked into the cache (not installed on the host).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# QEMU from bookworm: the preinstalled qemu-utils is newer and blocks qemu-system-x86.
APT_PACKAGES=(
  qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm
  ipxe-qemu ipxe ovmf seabios
  busybox-static e2fsprogs cpio zstd xz-utils kmod
  dnsmasq-base iproute2 nftables
  tftp-hpa atftp tftpd-hpa
  libiscsi-bin libvhdi-utils tgt open-iscsi extlinux
  udpcast uftp iperf3
  nginx-light
)
# Package names without the /release suffix, for the "already installed?" check.
missing=()
for p in "${APT_PACKAGES[@]}"; do
  name=${p%%/*}
  dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --allow-downgrades "${APT_PACKAGES[@]}"
fi

# Debian kernels (a metapackage's current kernel), with their modules, unpacked into the cache.
unpack_kernel() { # <metapackage> <dir>
  local pkg dir=$2
  pkg=$(apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "setup: apt cannot resolve $1 to a kernel package (run apt-get update)" >&2; return 1; }
  if [ ! -f "$dir/.done" ] || [ "$(cat "$dir/.done")" != "$pkg" ]; then
    log "unpacking $pkg into $dir"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    (cd "$dir.tmp" && apt-get download "$pkg" >/dev/null && dpkg-deb -x ./*.deb root && rm -f ./*.deb)
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    echo "$pkg" > "$dir/.done"
  fi
}
# The kernel the lab boots.
unpack_kernel linux-image-amd64 "$STRATA_CACHE/kernel"
# A second, different kernel (the cloud flavour: small, virtio built in) for the lab test that
# boots a node into the kernel recorded with its image (qemu-tests/tests/image_kernel.rs).
unpack_kernel linux-image-cloud-amd64 "$STRATA_CACHE/kernel-cloud"

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
log "setup complete (cache: $STRATA_CACHE)"
