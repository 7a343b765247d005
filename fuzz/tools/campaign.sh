#!/usr/bin/env bash
# One campaign pass per target, one libFuzzer process at a time (no -jobs/-workers: a single
# process, the same as -jobs=1 without its fuzz-N.log indirection), at nice 10:
#   fuzz/tools/campaign.sh RUNS SECONDS TARGET...
# Each target runs until RUNS executions or SECONDS seconds, whichever comes first, with the
# dictionary, growing a scratch corpus in $QMIG_FUZZ_WORK/<target> (default /tmp/qmig-fuzz)
# seeded by corpus/<target>. Uses the binaries `cargo +nightly fuzz build -O` left in
# target/x86_64-unknown-linux-gnu/release (build first). Logs: $QMIG_FUZZ_WORK/<target>.log;
# a finding stops that target (reproducer in artifacts/<target>/) and the script goes on.
# Extra libFuzzer flags for every target of the pass: $QMIG_FUZZ_ARGS (e.g. -max_len=4096).
set -uo pipefail
RUNS="$1"; SECS="$2"; shift 2
HERE="$(cd "$(dirname "$0")/.." && pwd)"
cd "$HERE"
WORK="${QMIG_FUZZ_WORK:-/tmp/qmig-fuzz}"
BIN="${QMIG_FUZZ_BIN:-target/x86_64-unknown-linux-gnu/release}"
for t in "$@"; do
    mkdir -p "$WORK/$t" "artifacts/$t"
    echo "campaign: $t start $(date -u +%FT%TZ) runs<=$RUNS secs<=$SECS ${QMIG_FUZZ_ARGS:-}"
    nice -n 10 "$BIN/$t" "$WORK/$t" "corpus/$t" -dict=qmig.dict \
        -runs="$RUNS" -max_total_time="$SECS" -print_final_stats=1 -rss_limit_mb=2048 \
        -timeout=10 -artifact_prefix="artifacts/$t/" ${QMIG_FUZZ_ARGS:-} >"$WORK/$t.log" 2>&1
    rc=$?
    echo "campaign: $t end $(date -u +%FT%TZ) exit $rc"
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|==[0-9]+== ERROR|SUMMARY)' "$WORK/$t.log"
done
