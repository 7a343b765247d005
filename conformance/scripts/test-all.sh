#!/usr/bin/env bash
# The whole qmig test suite: formatting, lints, unit/property/vector/live tests, and the
# conformance runner. Run from anywhere as root (live tests start real QEMU and use userfaultfd).
set -euo pipefail
cd "$(dirname "$0")/../.."

step() { printf '\n== %s\n' "$*"; }

step "provisioning QEMU 7.2 and 10.0"
bash conformance/scripts/provision-qemu.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo test (workspace)"
cargo test --workspace --release 2>&1 | tee /tmp/qmig-cargo-test.log
grep -E '^test result:' /tmp/qmig-cargo-test.log | awk '{p+=$4; f+=$6} END {printf "cargo test: %d passed, %d failed\n", p, f}'
