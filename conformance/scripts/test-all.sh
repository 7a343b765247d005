#!/usr/bin/env bash
# The whole qmig test suite: provisioning of QEMU 7.2 and 10.0, formatting, lints, every unit,
# property, vector and live test (real QEMU, userfaultfd, network namespaces), the fuzz smoke
# run, the conformance runner over every vector (replayed into qmig-dst), and the live interop
# matrix (inside cargo test). Run as root from
# anywhere; it ends with one line `tests: N passed, M failed` and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
export QMIG_REQUIRE_QEMU="${QMIG_REQUIRE_QEMU:-1}"
log_dir="${TMPDIR:-/tmp}/qmig-test-all"
mkdir -p "$log_dir"

step() { printf '\n== %s\n' "$*"; }

step "provisioning QEMU 7.2 and 10.0"
bash conformance/scripts/provision-qemu.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test (workspace)"
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee "$log_dir/cargo-test.log" || status=$?

extra_failed=0
if [ -x fuzz/run-smoke.sh ]; then
    step "fuzz smoke (every target, bounded time)"
    bash fuzz/run-smoke.sh "${QMIG_FUZZ_SECONDS:-20}" || extra_failed=$((extra_failed + 1))
fi

qmig="${CARGO_TARGET_DIR:-target}/debug/qmig"
step "conformance runner over every vector"
"$qmig" conformance 2>&1 | tee "$log_dir/conformance.log" || extra_failed=$((extra_failed + 1))

# The live interop matrix runs inside `cargo test` (conformance/tests/interop.rs: every cell
# QEMU supports, cross-version, and the qmig combinations); `qmig interop` prints the full table.

grep -E '^test result:' "$log_dir/cargo-test.log" |
    awk -v extra="$extra_failed" '{p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f + extra}'
if [ "$status" -ne 0 ] || [ "$extra_failed" -ne 0 ]; then
    exit 1
fi
