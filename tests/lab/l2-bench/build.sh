#!/bin/sh
# Builds the L2 guest's benchmark as a static binary:
# tests/lab/l2-bench/target/x86_64-unknown-linux-gnu/release/l2-bench (or under $CARGO_TARGET_DIR).
set -eu
cd "$(dirname "$0")"
export RUSTFLAGS='-C target-feature=+crt-static'
exec cargo build --release --offline --target x86_64-unknown-linux-gnu "$@"
