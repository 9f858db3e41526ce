#!/usr/bin/env bash
# Builds the Debian package for amd64 and/or arm64 into OUT (default target/debian):
#   debian/build-deb.sh [--out DIR] amd64|arm64...
# amd64: a release build with the machine's toolchain, then cargo-deb.
# arm64: cross-compiled with Debian's toolchain (image/cross-build.sh: rustc-web/cargo-web, the arm64
#        standard library, gcc-aarch64-linux-gnu; `image/deps.sh check` installs them), then cargo-deb
#        packs that binary with `--target aarch64-unknown-linux-gnu --no-build`, stripped with
#        aarch64-linux-gnu-strip.
# Needs cargo-deb (cargo install cargo-deb --version 3.8.0 --locked).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$repo/target/debian
if [ "${1:-}" = --out ]; then out=$2; shift 2; fi
[ $# -gt 0 ] || { echo "usage: build-deb.sh [--out DIR] amd64|arm64..." >&2; exit 64; }
command -v cargo-deb >/dev/null 2>&1 || {
  echo "build-deb.sh: cargo-deb is not installed (cargo install cargo-deb --version 3.8.0 --locked)" >&2
  exit 1
}
mkdir -p "$out"
cd "$repo"
for arch in "$@"; do
  case $arch in
    amd64)
      cargo deb --locked --output "$out"
      ;;
    arm64)
      target=aarch64-unknown-linux-gnu
      cross_dir=${CROSS_TARGET_DIR:-/var/cache/mqtt-uplink-image/target}
      built=$(mktemp)
      trap 'rm -f "$built"' EXIT
      CROSS_TARGET_DIR=$cross_dir "$repo/image/cross-build.sh" "$built"
      # cargo-deb finds target/release/mqtt-uplink of the cargo-deb asset list under
      # $CARGO_TARGET_DIR/$target/release.
      CARGO_TARGET_DIR=$cross_dir cargo deb --target "$target" --no-build --output "$out"
      ;;
    *)
      echo "build-deb.sh: unknown architecture: $arch (amd64 or arm64)" >&2
      exit 64
      ;;
  esac
done
ls -l "$out"/mqtt-uplink_*.deb
