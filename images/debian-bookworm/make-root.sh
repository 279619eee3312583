#!/usr/bin/env bash
# Makes the root tree of the Debian bookworm base with debootstrap (root and a Debian mirror
# needed): minbase plus the kernel, systemd, udev, iproute2 and a DHCP client.
# Usage: sudo images/debian-bookworm/make-root.sh DIR [MIRROR]
set -euo pipefail
dir=${1:?usage: make-root.sh DIR [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
rm -rf "$dir"
debootstrap --variant=minbase \
  --include=linux-image-amd64,systemd-sysv,udev,iproute2,isc-dhcp-client,kmod,procps \
  bookworm "$dir" "$mirror"
# No host-specific state in a base image.
rm -f "$dir/etc/machine-id" "$dir/var/lib/dbus/machine-id" "$dir/etc/hostname"
rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*
echo "root tree ready in $dir: strata image build images/debian-bookworm"
