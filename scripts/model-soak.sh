#!/usr/bin/env bash
# Runs the randomized model tests of tests/model.rs seed after seed until about OPS operations
# have run (default 100,000), then prints a summary: each failing seed with the first line of
# its failure and the shrunk sequence of operations the core tests print. Logs stay in LOG_DIR.
#
#   scripts/model-soak.sh                      # all four model runs, 2,000 steps each per seed
#   OPS=20000 FILTER=core_ scripts/model-soak.sh   # only the core runs
#
# Settings (environment): OPS, STEPS (steps per test case and seed), FIRST_SEED, FILTER (a test
# name filter, as for `cargo test`), LOG_DIR. It needs what `cargo test --release` needs.
set -u
ops=${OPS:-100000}
steps=${STEPS:-2000}
seed=${FIRST_SEED:-1}
filter=${FILTER:-}
log_dir=${LOG_DIR:-$(mktemp -d -t s3csi-soak-XXXXXX)}
mkdir -p "$log_dir"
cd "$(dirname "$0")/.."

cargo test --release --test model --no-run >/dev/null 2>&1 || {
    echo "model tests do not build; run: cargo test --release --test model --no-run" >&2
    exit 2
}
list=$(cargo test --release --test model -- --list $filter 2>/dev/null | grep ': test$' | grep -vc -e long_ -e faulty_store)
if [ "$list" -eq 0 ]; then
    echo "no test matches FILTER=$filter" >&2
    exit 2
fi
done_ops=0
failed=()
passed=0
while [ "$done_ops" -lt "$ops" ]; do
    log="$log_dir/seed-$seed.log"
    start=$(date +%s)
    if S3CSI_TEST_SEED=$seed S3CSI_TEST_STEPS=$steps cargo test --release --test model -- $filter >"$log" 2>&1; then
        passed=$((passed + 1))
        result=ok
    else
        failed+=("$seed")
        result=FAILED
    fi
    done_ops=$((done_ops + steps * list))
    echo "seed $seed: $result in $(( $(date +%s) - start )) s ($done_ops of $ops operations)"
    seed=$((seed + 1))
done

echo
echo "=== $done_ops operations, $((passed + ${#failed[@]})) seeds: $passed passed, ${#failed[@]} failed; logs in $log_dir ==="
for s in "${failed[@]}"; do
    log="$log_dir/seed-$s.log"
    echo
    echo "--- seed $s (replay: S3CSI_TEST_SEED=$s S3CSI_TEST_STEPS=$steps cargo test --release --test model -- $filter) ---"
    grep -m3 -A1 "panicked at" "$log" | grep -v 'panicked at' | head -3
    sed -n '/^--- shrunk to/,/^$/p' "$log" | head -40
done
[ "${#failed[@]}" -eq 0 ]
