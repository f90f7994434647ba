#!/bin/sh
# Builds the tiny kernel: guest-frontend/tiny-kernel/target/x86_64-unknown-linux-gnu/release/
# tiny-kernel (or the same under $CARGO_TARGET_DIR). The explicit --target keeps the flags off
# the build script. Uses only the host toolchain (x86_64-unknown-linux-gnu, no_std).
set -eu
cd "$(dirname "$0")"
unset RUSTFLAGS
export CARGO_ENCODED_RUSTFLAGS="$(printf -- '-C\037no-redzone=yes\037-C\037relocation-model=static\037-C\037code-model=small\037-C\037target-cpu=x86-64\037-C\037target-feature=-sse,-sse2,-avx,-avx2')"
exec cargo build --release --offline --target x86_64-unknown-linux-gnu "$@"
