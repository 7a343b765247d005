#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: fuzz/run-smoke.sh [SECONDS-PER-TARGET] [TARGET...]
#
# Default 20 s per target (10 targets: under 4 minutes of fuzzing plus the build). Uses
# `cargo +nightly fuzz` when a nightly toolchain is installed, else the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Zsanitizer flags); prints which one ran. Installs
# cargo-fuzz if it is missing. Each target starts from its committed seed corpus
# (fuzz/corpus/<target>) plus a scratch corpus under fuzz/target/smoke-corpus/<target>, uses
# the dictionary fuzz/qmig.dict, and fails the script on the first crash, leak, timeout or
# out-of-memory (the reproducer is left in fuzz/artifacts/<target>/).
set -euo pipefail

SECS="${1:-20}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# QMIG_FUZZ_TOOLCHAIN=stable forces the stable path (to test it where a nightly exists);
# QMIG_FUZZ_TARGET_DIR puts the build elsewhere than fuzz/target.
if [ "${QMIG_FUZZ_TOOLCHAIN:-}" != stable ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    TOOLCHAIN=(+nightly)
    echo "run-smoke: toolchain: nightly ($(rustc +nightly --version))"
else
    TOOLCHAIN=(+stable)
    export RUSTC_BOOTSTRAP=1
    echo "run-smoke: toolchain: stable with RUSTC_BOOTSTRAP=1 ($(rustc +stable --version))"
fi

TDIR=()
if [ -n "${QMIG_FUZZ_TARGET_DIR:-}" ]; then
    TDIR=(--target-dir "$QMIG_FUZZ_TARGET_DIR")
fi

if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo "${TOOLCHAIN[@]}" fuzz list)
fi

cargo "${TOOLCHAIN[@]}" fuzz build -O "${TDIR[@]}"
for t in "${TARGETS[@]}"; do
    scratch="target/smoke-corpus/$t"
    mkdir -p "$scratch" "artifacts/$t"
    echo "run-smoke: $t for ${SECS}s"
    log="target/smoke-$t.log"
    rc=0
    cargo "${TOOLCHAIN[@]}" fuzz run -O "${TDIR[@]}" "$t" "$scratch" "corpus/$t" -- \
        -dict=qmig.dict -max_total_time="$SECS" -print_final_stats=1 \
        -rss_limit_mb=2048 -timeout=20 >"$log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+== ERROR|thread .* panicked|SUMMARY)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$log"
        echo "run-smoke: $t FAILED (exit $rc; reproducer in fuzz/artifacts/$t/)"
        exit 1
    fi
done
echo "run-smoke: all ${#TARGETS[@]} targets ran ${SECS}s each without a finding"
