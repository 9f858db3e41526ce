#!/usr/bin/env bash
# Cross-compiles mqtt-uplink for aarch64-unknown-linux-gnu and copies the binary to DEST.
# Usage: cross-build.sh [--check] DEST   (--check: the cross-check profile, unoptimised, for the fast
#        CI check; default release)
# Uses Debian's toolchain, not rustup's: rustc-web/cargo-web (1.96, bookworm-security) with the arm64
# standard library from libstd-rust-web-dev:arm64, and gcc-aarch64-linux-gnu as linker and as the C
# compiler for aws-lc-sys. Its own target dir (CROSS_TARGET_DIR) so it never fights the x86 builds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
profile=release
if [ "${1:-}" = --check ]; then profile=cross-check; shift; fi
dest=${1:?usage: cross-build.sh [--check] DEST}
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CROSS_TARGET_DIR:-/var/cache/mqtt-uplink-image/target}
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

if [ ! -x /usr/bin/cargo ] || [ ! -x "$RUSTC" ]; then
  echo "cross-build.sh: Debian's cargo-web/rustc-web are not installed (image/deps.sh build)" >&2
  exit 1
fi
[ -d "/usr/lib/rustlib/$target/lib" ] || { echo "cross-build.sh: no $target standard library (apt install libstd-rust-web-dev:arm64)" >&2; exit 1; }
need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
have=$("$RUSTC" --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
  echo "cross-build.sh: $RUSTC is $have, the crate needs >= $need" >&2
  exit 1
fi

mkdir -p "$CARGO_TARGET_DIR"
(cd "$repo" && /usr/bin/cargo build --profile "$profile" --locked --target "$target" --bin mqtt-uplink)
install -m 0755 "$CARGO_TARGET_DIR/$target/$profile/mqtt-uplink" "$dest"
