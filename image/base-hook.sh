#!/usr/bin/env bash
# mmdebstrap hooks for the cached base root (part of the cache key: changing this file rebuilds it).
#   setup DIR      before any package is installed
#   customize DIR  after all packages are installed, still inside mmdebstrap (arm64 under qemu-user)
# Keep this to what needs the package tools; everything else belongs in assemble.sh, which runs on
# every build from the host, in seconds.
set -euo pipefail
stage=${1:?stage}
root=${2:?root directory}
case $stage in
  setup)
    # raspi-firmware's kernel hook installs the kernel, initrd and device trees here.
    mkdir -p "$root/boot/firmware"
    ;;
  customize)
    # The package manifest, for the README's "what is on the image" and for audits.
    mkdir -p "$root/usr/share/mqtt-uplink-image"
    chroot "$root" dpkg-query -W -f='${binary:Package} ${Version}\n' > "$root/usr/share/mqtt-uplink-image/packages.list"
    ;;
  *) echo "base-hook.sh: unknown stage $stage" >&2; exit 64 ;;
esac
