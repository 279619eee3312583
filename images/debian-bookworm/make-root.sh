#!/usr/bin/env bash
# Makes the root tree of the Debian bookworm base with debootstrap (root and a Debian mirror
# needed): minbase plus the kernel, systemd, udev, iproute2 and a DHCP client.
# Usage: sudo images/debian-bookworm/make-root.sh DIR [MIRROR]
# Needs debootstrap (on demand only, not in scripts/setup.sh): apt-get install -y debootstrap
# Measured (2026-11-24, deb.debian.org): 1 to 2 min, a 631 MiB tree (docs/images.md).
set -euo pipefail
dir=${1:?usage: make-root.sh DIR [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "make-root.sh: debootstrap needs root (run it with sudo)" >&2; exit 1; }
PATH=$PATH:/usr/sbin:/sbin
command -v debootstrap >/dev/null \
  || { echo "make-root.sh: debootstrap not found: apt-get install -y debootstrap" >&2; exit 1; }
# The directory is removed first: refuse anything that is not a dedicated scratch directory.
case $(realpath -m -- "$dir") in
  /|/bin|/boot|/dev|/etc|/home|/lib*|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/var|/var/tmp|/work)
    echo "make-root.sh: refusing to replace $dir: give a directory of its own" >&2; exit 1 ;;
esac
rm -rf -- "$dir"
debootstrap --variant=minbase \
  --include=linux-image-amd64,systemd-sysv,udev,iproute2,isc-dhcp-client,kmod,procps \
  bookworm "$dir" "$mirror"
# No host-specific state in a base image: debootstrap copies the build host's resolv.conf
# (nodes get theirs from DHCP; dhclient-script writes it).
rm -f "$dir/etc/machine-id" "$dir/var/lib/dbus/machine-id" "$dir/etc/hostname" "$dir/etc/resolv.conf"
rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*
# Repeatable: two runs against the same mirror state give the same tree, so the same layer.
# The initrd again with fixed times (mkinitramfs honours SOURCE_DATE_EPOCH; the recipe's epoch),
# and no logs or caches of this run.
SOURCE_DATE_EPOCH=1700000000 chroot "$dir" update-initramfs -u -k all
rm -f "$dir/var/log/"{bootstrap,dpkg,alternatives}.log "$dir/var/cache/ldconfig/aux-cache"
echo "root tree ready in $dir: strata image build images/debian-bookworm"
