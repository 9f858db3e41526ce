#!/usr/bin/env bash
# The Debian packages the image tooling needs, per job:
#   build  image/build.sh: cross toolchain (Debian's rustc-web/cargo-web 1.96 from bookworm-security and
#          the arm64 standard library), mmdebstrap, qemu-user, mkfs/mtools/sfdisk, xz, rauc (bundles)
#   boot   image/test/boot.sh: qemu-system-aarch64, mtools, debugfs, xz, mosquitto clients, rauc and
#          openssl (the update scenarios' test bundles and keys)
#   check  the fast CI check (tests/image.rs): cross toolchain, qemu-user, shellcheck, systemd-analyze
# Usage: deps.sh JOB...            installs what is missing (root; adds the arm64 dpkg architecture
#                                  when the cross toolchain is needed)
#        deps.sh --check JOB...    prints the missing packages and exits 1 when any is missing
set -euo pipefail

check_only=0
if [ "${1:-}" = --check ]; then check_only=1; shift; fi
[ $# -gt 0 ] || { echo "usage: deps.sh [--check] build|boot|check..." >&2; exit 64; }

cross=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
wanted=()
for job in "$@"; do
  case $job in
    build) wanted+=("${cross[@]}" mmdebstrap arch-test qemu-user-static dosfstools mtools fdisk e2fsprogs xz-utils rauc squashfs-tools openssl) ;;
    boot) wanted+=(qemu-system-arm mtools e2fsprogs xz-utils mosquitto-clients fdisk rauc squashfs-tools openssl curl socat) ;;
    check) wanted+=("${cross[@]}" qemu-user-static shellcheck systemd rauc) ;;
    *) echo "deps.sh: unknown job: $job" >&2; exit 64 ;;
  esac
done

missing=()
for pkg in "${wanted[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$pkg")
done
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | grep -v '^$' || true)

if [ "$check_only" = 1 ]; then
  [ ${#missing[@]} -eq 0 ] && exit 0
  echo "${missing[*]}"
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0
[ "$(id -u)" -eq 0 ] || { echo "deps.sh: installing ${missing[*]} needs root" >&2; exit 1; }
if printf '%s\n' "${missing[@]}" | grep -q ':arm64$' && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
