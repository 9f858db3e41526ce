#!/usr/bin/env bash
# Builds the Raspberry Pi image: out/mqtt-uplink-<version>-rpi-arm64.img.xz and its .sha256, and the
# signed RAUC update bundle for the same version: out/mqtt-uplink-<version>-rpi-arm64.raucb.
#
# Run as root on a Debian (bookworm) x86_64 machine; no Docker, no loop devices. Stages:
#   1. the base root: mmdebstrap (bookworm arm64, Debian packages only), cached on the package list
#   2. cross-compile mqtt-uplink for aarch64 with Debian's rustc-web/cargo-web
#   3. our layer on a copy of the base: binary, unit, overlay, users, locked root, enabled services
#   4. the image file: FAT boot partition (mtools), root slot A (ext4, mkfs.ext4 -d), an empty slot B
#      and the data partition (ext4), placed with dd into an sfdisk-partitioned file, compressed with
#      xz, with its sha256; the update bundle: slot A's filesystem image, signed (rauc bundle)
# qemu-user binfmt is registered only when arm64 binaries cannot run yet, and removed again on exit.
#
# Usage: image/build.sh [--refresh-base] [--base-only] [--no-xz]
# Environment: OUT (default image/out), CACHE (default /var/cache/mqtt-uplink-image),
#              MIRROR, SECURITY_MIRROR (Debian mirrors), IMAGE_DEPS=install (apt-get the build tools),
#              RAUC_KEY, RAUC_CERT: the bundle signing key and certificate (PEM files or PKCS#11 URIs);
#              RAUC_KEYRING: the CA certificate(s) the devices trust (default RAUC_CERT). Without
#              them a TEST key is made (once) in OUT/test-keys and used, loudly: never ship it.
#              VERSION: the version to stamp (default: Cargo.toml's).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
OUT=${OUT:-$here/out}
CACHE=${CACHE:-/var/cache/mqtt-uplink-image}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
BOOT_MIB=256   # FAT32 boot partition: firmware, both slots' kernel/initrd/device trees, provisioning
SLOT_MIB=1024  # each root slot (A, B): fixed for the life of a card, so keep room for growth
DATA_MIB=64    # the data partition as shipped; the first boot grows it to the card
ALIGN_MIB=4    # partitions start on 4 MiB boundaries (SD card erase blocks)
DISK_ID=0x6d717475  # fixed MBR id: the slots are PARTUUID=6d717475-02/-03 in every build (system.conf)
COMPATIBLE=mqtt-uplink-rpi-arm64  # RAUC: a bundle installs only on a device with the same string

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

# --- the signing key -------------------------------------------------------------------------------
if [ -n "${RAUC_KEY:-}" ] || [ -n "${RAUC_CERT:-}" ]; then
  { [ -n "${RAUC_KEY:-}" ] && [ -n "${RAUC_CERT:-}" ]; } || die "set both RAUC_KEY and RAUC_CERT (or neither, for a test key)"
  RAUC_KEYRING=${RAUC_KEYRING:-$RAUC_CERT}
  [ -r "$RAUC_KEYRING" ] || die "RAUC_KEYRING $RAUC_KEYRING: not readable"
else
  keys=$OUT/test-keys
  if [ ! -s "$keys/signing.key.pem" ]; then
    mkdir -p "$keys"; chmod 0700 "$keys"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/O=mqtt-uplink TEST/CN=mqtt-uplink TEST bundle signing key, not for production" \
      -keyout "$keys/signing.key.pem" -out "$keys/signing.cert.pem" 2>/dev/null || die "openssl: cannot make the test key"
  fi
  RAUC_KEY=$keys/signing.key.pem RAUC_CERT=$keys/signing.cert.pem RAUC_KEYRING=$keys/signing.cert.pem
  printf 'build.sh: WARNING: no RAUC_KEY/RAUC_CERT: signing with the TEST key in %s; devices from this image trust it. Never ship this image.\n' "$keys" >&2
fi

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
version=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)}
[ -n "$version" ] || die "no version in $repo/Cargo.toml"
name=mqtt-uplink-$version-rpi-arm64

t0=$(date +%s)
log "cross-compiling mqtt-uplink $version for aarch64"
"$here/cross-build.sh" "$work/mqtt-uplink"
t_compile=$(( $(date +%s) - t0 ))

# --- 3. our layer ----------------------------------------------------------------------------------
t0=$(date +%s)
root=$work/root
data=$work/data
mkdir "$root" "$data"
tar -C "$root" --numeric-owner --xattrs --xattrs-include='*' -xpf "$base"
"$here/assemble.sh" "$root" "$data" "$work/mqtt-uplink" "$repo/systemd/mqtt-uplink.service" "$version" "$RAUC_KEYRING"

# --- 4. the image file -----------------------------------------------------------------------------
# Boot partition: the firmware and config.txt at the top, slot A's kernel files in slot-a/, the
# slots' state (A committed).
boot_img=$work/boot.img
root_img=$work/root.img
data_img=$work/data.img
fw=$root/boot/firmware
mkdir "$fw/slot-a"
cp -r "$root/usr/lib/mqtt-uplink-image/boot/." "$fw/slot-a/"
sed -i -e "s|@ROOT@|PARTUUID=${DISK_ID#0x}-02|" -e 's|@SLOT@|A|' "$fw/slot-a/cmdline.txt"
printf '# mqtt-uplink A/B root slots (written by the device; see /usr/lib/mqtt-uplink-image/slots.sh)\ncommitted=A\ntrial=\nstate_A=good\nstate_B=bad\n' \
  > "$fw/mqtt-uplink-slots.txt"
truncate -s "${BOOT_MIB}M" "$boot_img"
mkfs.vfat -F 32 -n RASPIFIRM "$boot_img" >/dev/null
(cd "$fw" && mcopy -s -p -m -i "$boot_img" ./* ::/)
find "$fw" -mindepth 1 -delete   # a mount point on the device

# Root slot A: the tree plus a little slack (RAUC grows it to the slot on the device: resize=true;
# the same image is the bundle's payload, so it is kept small).
used_mib=$(( $(du -s --block-size=1M "$root" | cut -f1) ))
root_mib=$(( (used_mib * 11 / 10 + 64 + ALIGN_MIB - 1) / ALIGN_MIB * ALIGN_MIB ))
[ "$root_mib" -le "$SLOT_MIB" ] || die "the root filesystem needs ${root_mib} MiB, a slot has $SLOT_MIB"
mkfs.ext4 -q -L rootfs -d "$root" -b 4096 -I 256 -m 1 "$root_img" "${root_mib}M"
mkfs.ext4 -q -L RASPIDATA -d "$data" -b 4096 -I 256 -m 1 "$data_img" "${DATA_MIB}M"

img=$work/$name.img
boot_start=$(( ALIGN_MIB * 2048 ))              # sectors of 512 bytes
boot_size=$(( BOOT_MIB * 2048 ))
slot_size=$(( SLOT_MIB * 2048 ))
a_start=$(( boot_start + boot_size ))
b_start=$(( a_start + slot_size ))
data_start=$(( b_start + slot_size ))
data_size=$(( DATA_MIB * 2048 ))
truncate -s $(( (data_start + data_size) * 512 )) "$img"
sfdisk --quiet "$img" <<EOF
label: dos
label-id: $DISK_ID
unit: sectors
start=$boot_start, size=$boot_size, type=c, bootable
start=$a_start, size=$slot_size, type=83
start=$b_start, size=$slot_size, type=83
start=$data_start, size=$data_size, type=83
EOF
dd if="$boot_img" of="$img" bs=1M seek=$(( boot_start / 2048 )) conv=notrunc,sparse status=none
dd if="$root_img" of="$img" bs=1M seek=$(( a_start / 2048 )) conv=notrunc,sparse status=none
dd if="$data_img" of="$img" bs=1M seek=$(( data_start / 2048 )) conv=notrunc,sparse status=none
rm -f "$boot_img" "$data_img"

# The update bundle for this version: slot A's filesystem, signed.
bundle_dir=$work/bundle
mkdir "$bundle_dir"
mv "$root_img" "$bundle_dir/rootfs.ext4"
cat > "$bundle_dir/manifest.raucm" <<EOF
[update]
compatible=$COMPATIBLE
version=$version
description=mqtt-uplink $version, Raspberry Pi root filesystem (Debian $SUITE arm64)
build=$(date -u +%Y%m%d%H%M%S)

[bundle]
format=plain

[image.rootfs]
filename=rootfs.ext4
EOF
rm -f "$OUT/$name.raucb"
rauc bundle --cert="$RAUC_CERT" --key="$RAUC_KEY" --keyring="$RAUC_KEYRING" "$bundle_dir" "$OUT/$name.raucb" >/dev/null \
  || die "rauc bundle failed"
(cd "$OUT" && sha256sum "$name.raucb" > "$name.raucb.sha256")
rm -rf "$bundle_dir"
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

log "done: $artifact ($(du -h --apparent-size "$artifact" | cut -f1); image $(( (data_start + data_size) / 2048 )) MiB)"
log "update bundle: $OUT/$name.raucb ($(du -h --apparent-size "$OUT/$name.raucb" | cut -f1); root filesystem ${root_mib} MiB)"
log "timings (s): compile $t_compile, base $t_base, assemble $t_assemble, compress $t_xz, total $(( $(date +%s) - start_all ))"
