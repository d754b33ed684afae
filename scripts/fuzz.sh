#!/usr/bin/env bash
# Fuzz qlive's hostile-input parsers (fuzz/, docs/fuzzing.md) for
# ${FUZZ_SECONDS:-60} seconds per target, starting from the committed seed
# corpus. Prints runs and exec/s per target; exits non-zero if any target
# crashed, with the crash artifact's path (under target/fuzz-artifacts/).
#
#   FUZZ_SECONDS=60             time per target
#   FUZZ_TARGETS="api_request definition"
#   FUZZ_SANITIZER=address      or none (faster, catches panics only)
#
# cargo-fuzz needs nightly rustc flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Nothing under fuzz/ is modified: the corpus is copied
# to target/fuzz-corpus/<target>/ and grows there.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
read -r -a targets <<<"${FUZZ_TARGETS:-api_request definition}"
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

fuzz=(cargo fuzz)
common=(--fuzz-dir fuzz --target-dir target/fuzz --sanitizer "$sanitizer")
"${fuzz[@]}" build "${common[@]}"

# One libFuzzer process per target, all at once (each is single-threaded;
# CI machines have two cores); results are collected afterwards.
run_target() {
  local t=$1
  local corpus=target/fuzz-corpus/$t artifacts=target/fuzz-artifacts/$t log=target/fuzz-logs/$t.log
  rm -rf "$corpus"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  cp fuzz/corpus/"$t"/* "$corpus"/
  local dict=()
  [ -f fuzz/dicts/"$t".dict ] && dict=(-dict=fuzz/dicts/"$t".dict)
  echo "fuzz: $t for ${seconds}s (corpus $corpus, log $log)"
  local status=0
  "${fuzz[@]}" run "${common[@]}" "$t" "$corpus" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "${dict[@]}" >"$log" 2>&1 || status=$?
  echo "$status" >"$log.status"
}

for t in "${targets[@]}"; do
  run_target "$t" &
done
wait

failed=()
summary=()
for t in "${targets[@]}"; do
  corpus=target/fuzz-corpus/$t
  log=target/fuzz-logs/$t.log
  status=$(cat "$log.status" 2>/dev/null || echo 1)
  runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n1)
  if [ -z "$runs" ]; then
    runs=$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$log" | tail -n1)
  fi
  if [ "$status" != 0 ]; then
    tail -n 60 "$log"
    artifact=$(grep -o "Test unit written to [^ ]*" "$log" | tail -n1 | sed 's/Test unit written to //' || true)
    echo "fuzz: $t FAILED (exit $status); crash artifact: ${artifact:-none written, see $log}"
    echo "fuzz: reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${common[*]} $t ${artifact:-<artifact>}"
    failed+=("$t")
    summary+=("$t: FAILED after ${runs:-?} runs; artifact ${artifact:-?}")
    continue
  fi
  if [ -z "$runs" ] || [ -z "$secs" ]; then
    tail -n 20 "$log"
    echo "fuzz: $t: no final stats in $log"
    failed+=("$t")
    continue
  fi
  rate=$(( runs / (secs > 0 ? secs : 1) ))
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 || true)
  summary+=("$t: $runs runs in ${secs}s = $rate exec/s (${cov:-cov: ?}, corpus $(find "$corpus" -maxdepth 1 -type f | wc -l) inputs, sanitizer $sanitizer)")
done

echo "fuzz: summary"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashed or failed: ${failed[*]}"
  exit 1
fi
