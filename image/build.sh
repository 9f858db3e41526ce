#!/usr/bin/env bash
# Builds the Raspberry Pi image: out/mqtt-uplink-<version>-rpi-arm64.img.xz and its .sha256.
#
# Run as root on a Debian (bookworm) x86_64 machine; no Docker, no loop devices. Stages:
#   1. the base root: mmdebstrap (bookworm arm64, Debian packages only), cached on the package list
#   2. cross-compile mqtt-uplink for aarch64 with Debian's rustc-web/cargo-web
#   3. our layer on a copy of the base: binary, unit, overlay, users, locked root, enabled services
#   4. the image file: FAT boot partition (mtools) + ext4 root (mkfs.ext4 -d), placed with dd into an
#      sfdisk-partitioned file, compressed with xz, with its sha256
# qemu-user binfmt is registered only when arm64 binaries cannot run yet, and removed again on exit.
#
# Usage: image/build.sh [--refresh-base] [--base-only] [--no-xz]
# Environment: OUT (default image/out), CACHE (default /var/cache/mqtt-uplink-image),
#              MIRROR, SECURITY_MIRROR (Debian mirrors), IMAGE_DEPS=install (apt-get the build tools).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
OUT=${OUT:-$here/out}
CACHE=${CACHE:-/var/cache/mqtt-uplink-image}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
BOOT_MIB=256   # FAT32 boot partition: firmware, kernel, initrd, device trees, provisioning files
ALIGN_MIB=4    # partitions start on 4 MiB boundaries (SD card erase blocks)

refresh_base=0
base_only=0
compress=1
for arg in "$@"; do
  case $arg in
    --refresh-base) refresh_base=1 ;;
    --no-xz) compress=0 ;;
    --base-only) base_only=1 ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 64 ;;
  esac
done

log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap, file ownership in the root filesystem)"
[ "$(uname -m)" = x86_64 ] || die "this script cross-builds from x86_64; this machine is $(uname -m)"

if [ "${IMAGE_DEPS:-}" = install ]; then
  "$here/deps.sh" build
fi
missing=$("$here/deps.sh" --check build) || die "missing build tools; install them with: $here/deps.sh build  (packages: $missing)"

start_all=$(date +%s)
work=$(mktemp -d /var/tmp/mqtt-uplink-image.XXXXXX)
binfmt_mounted=0
binfmt_registered=0

cleanup() {
  local rc=$?
  if [ "$binfmt_registered" = 1 ] && [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64 || echo "build.sh: could not remove the qemu-aarch64 binfmt entry" >&2
  fi
  if [ "$binfmt_mounted" = 1 ]; then
    umount /proc/sys/fs/binfmt_misc || echo "build.sh: could not unmount binfmt_misc" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- qemu-user for arm64 maintainer scripts --------------------------------------------------------
binfmt_setup() {
  if arch-test arm64 >/dev/null 2>&1; then
    log "arm64 binaries already run on this host (binfmt present): leaving binfmt alone"
    return
  fi
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
    binfmt_mounted=1
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # The F flag opens the interpreter now, so it also works inside the chroot.
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register \
      || die "cannot register qemu-aarch64 with binfmt_misc"
    binfmt_registered=1
  fi
  arch-test arm64 >/dev/null 2>&1 || die "arm64 binaries still do not run after registering qemu-aarch64"
  log "registered qemu-aarch64 binfmt (removed again on exit)"
}

# --- 1. the base root, cached on the package list ---------------------------------------------------
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/packages.txt" | grep -v '^$')
components="main non-free-firmware"
sources=(
  "deb $MIRROR $SUITE $components"
  "deb $MIRROR $SUITE-updates $components"
  "deb $SECURITY_MIRROR $SUITE-security $components"
)
base_key=$( { printf '%s\n' "$SUITE" "${packages[@]}" "${sources[@]}"; cat "$here/base-hook.sh"; } \
  | sha256sum | cut -c1-16)
base=$CACHE/base-$SUITE-arm64-$base_key.tar
mkdir -p "$CACHE" "$OUT"

t0=$(date +%s)
if [ "$refresh_base" = 1 ] || [ ! -s "$base" ]; then
  binfmt_setup
  log "building the base root with mmdebstrap (cold: ~25 min under emulation) -> $base"
  include=$(IFS=,; echo "${packages[*]}")
  rm -rf "$base.tmp"
  mmdebstrap --mode=root --format=tar --architectures=arm64 --variant=minbase \
    --components="$components" --include="$include" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --setup-hook="$here/base-hook.sh setup \"\$1\"" \
    --customize-hook="$here/base-hook.sh customize \"\$1\"" \
    "$SUITE" "$base.tmp" "${sources[@]}"
  mv "$base.tmp" "$base"
  # Old bases (other package lists) are dead weight.
  find "$CACHE" -maxdepth 1 -name "base-$SUITE-arm64-*.tar" ! -name "$(basename "$base")" -delete
else
  log "base root from cache: $base"
fi
t_base=$(( $(date +%s) - t0 ))
if [ "$base_only" = 1 ]; then
  log "base root ready in ${t_base}s: $base"
  exit 0
fi

# --- 2. the binary -------------------------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)
[ -n "$version" ] || die "no version in $repo/Cargo.toml"
name=mqtt-uplink-$version-rpi-arm64

t0=$(date +%s)
log "cross-compiling mqtt-uplink $version for aarch64"
"$here/cross-build.sh" "$work/mqtt-uplink"
t_compile=$(( $(date +%s) - t0 ))

# --- 3. our layer ----------------------------------------------------------------------------------
t0=$(date +%s)
root=$work/root
mkdir "$root"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
"$here/assemble.sh" "$root" "$work/mqtt-uplink" "$repo/systemd/mqtt-uplink.service" "$version"

# --- 4. the image file -----------------------------------------------------------------------------
boot_img=$work/boot.img
root_img=$work/root.img
truncate -s "${BOOT_MIB}M" "$boot_img"
mkfs.vfat -F 32 -n RASPIFIRM "$boot_img" >/dev/null
(cd "$root/boot/firmware" && mcopy -s -p -m -i "$boot_img" ./* ::/)
find "$root/boot/firmware" -mindepth 1 -delete   # a mount point on the device

# Root: the tree plus a quarter for slack (the first boot grows it to the card anyway).
used_mib=$(( $(du -s --block-size=1M "$root" | cut -f1) ))
root_mib=$(( (used_mib * 5 / 4 + 128 + ALIGN_MIB - 1) / ALIGN_MIB * ALIGN_MIB ))
mkfs.ext4 -q -L RASPIROOT -d "$root" -b 4096 -I 256 -m 1 "$root_img" "${root_mib}M"

img=$work/$name.img
boot_start=$(( ALIGN_MIB * 2048 ))              # sectors of 512 bytes
boot_size=$(( BOOT_MIB * 2048 ))
root_start=$(( boot_start + boot_size ))
root_size=$(( root_mib * 2048 ))
truncate -s $(( (root_start + root_size) * 512 )) "$img"
sfdisk --quiet "$img" <<EOF
label: dos
unit: sectors
start=$boot_start, size=$boot_size, type=c, bootable
start=$root_start, size=$root_size, type=83
EOF
dd if="$boot_img" of="$img" bs=1M seek=$(( boot_start / 2048 )) conv=notrunc,sparse status=none
dd if="$root_img" of="$img" bs=1M seek=$(( root_start / 2048 )) conv=notrunc,sparse status=none
rm -f "$boot_img" "$root_img"
t_assemble=$(( $(date +%s) - t0 ))

t0=$(date +%s)
rm -f "$OUT/$name.img" "$OUT/$name.img.sha256" "$OUT/$name.img.xz" "$OUT/$name.img.xz.sha256"
if [ "$compress" = 1 ]; then
  xz -T0 -3 -c "$img" > "$OUT/$name.img.xz.tmp"
  mv "$OUT/$name.img.xz.tmp" "$OUT/$name.img.xz"
  (cd "$OUT" && sha256sum "$name.img.xz" > "$name.img.xz.sha256")
  artifact=$OUT/$name.img.xz
else
  mv "$img" "$OUT/$name.img"
  (cd "$OUT" && sha256sum "$name.img" > "$name.img.sha256")
  artifact=$OUT/$name.img
fi
t_xz=$(( $(date +%s) - t0 ))

log "done: $artifact ($(du -h --apparent-size "$artifact" | cut -f1); image $(( (root_start + root_size) / 2048 )) MiB)"
log "timings (s): compile $t_compile, base $t_base, assemble $t_assemble, compress $t_xz, total $(( $(date +%s) - start_all ))"
