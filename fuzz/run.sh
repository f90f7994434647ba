#!/bin/sh
# Runs every fuzz target for SECONDS (default 20) each, starting from the
# committed seeds. New inputs go to corpus/<target> (git-ignored), never to
# seeds/. Needs the nightly toolchain and `cargo install cargo-fuzz`.
set -eu
cd "$(dirname "$0")"
seconds="${1:-20}"
for target in xenstore_decoder xenstore_engine; do
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096
done
