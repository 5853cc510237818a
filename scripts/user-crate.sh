#!/usr/bin/env bash
# A user's own crate, out of the tree: copies examples/user-crate (a GRU text classifier with
# dropout that depends on gradguard by path, with gradguard-build in its build.rs) into a
# fresh folder, builds it, and runs its binary and its tests without LD_LIBRARY_PATH. Builds
# into the workspace's target/ with the workspace's Cargo.lock, so that tch and gradguard are
# not compiled again.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=env.sh
source "$repo/scripts/env.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$repo/examples/user-crate" "$work/gru-guarded"
cd "$work/gru-guarded"
sed -i "s|path = \"../..|path = \"$repo|" Cargo.toml
cp "$repo/Cargo.lock" Cargo.lock
export CARGO_TARGET_DIR="$repo/target"
cargo build --release --bins --tests --quiet
unset LD_LIBRARY_PATH
bin="$CARGO_TARGET_DIR/release/gru-guarded"
echo "user crate: $bin (RUNPATH $(readelf -d "$bin" | sed -n 's/.*runpath: \[\(.*\)\]/\1/ip'))"
"$bin"
# One test at a time: libtorch's generator is global to the process (see the Makefile).
cargo test --release --quiet -- --test-threads=1
