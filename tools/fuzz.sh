#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ (cargo fuzz, libFuzzer, AddressSanitizer)
# for a number of executions each, one after the other, then prints a table.
#
#   tools/fuzz.sh                         # 10,000,000 executions per target
#   tools/fuzz.sh --runs 20000000 mask    # more, for one target
#   tools/fuzz.sh --seconds 200           # also stop each target after 200 s
#
# The corpus grows in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET and
# kept between runs); a failing input is saved in fuzz/artifacts/TARGET,
# where `cargo test --test fuzz_seeds` replays it. Exit status 0 when no
# target failed, 1 otherwise, 2 for a wrong argument (an unknown option or
# target, a --runs or --seconds that is not a whole number), said before
# anything is built. Logs: fuzz/target/fuzz-logs/TARGET.log.
#
# cargo fuzz needs nightly rustc flags (-Zsanitizer, sanitizer coverage).
# On a stable toolchain the script sets RUSTC_BOOTSTRAP=1, which lets stable
# rustc accept them; it installs cargo-fuzz when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=10000000
seconds=0
targets=()
# A wrong argument ends the script before cargo-fuzz is installed or
# anything is built (minutes): `--runs abc` reached libFuzzer as -runs=abc,
# and a misspelt target failed only after every target was built.
while [ $# -gt 0 ]; do
  case "$1" in
    --runs|--seconds)
      [[ ${2-} =~ ^[0-9]+$ ]] || { echo "fuzz.sh: $1 needs a whole number (got '${2-}')" >&2; exit 2; }
      if [ "$1" = --runs ]; then runs=$2; else seconds=$2; fi
      shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *)
      [ -f "fuzz/fuzz_targets/$1.rs" ] || {
        echo "fuzz.sh: no fuzz target $1 (targets: $(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//' | xargs))" >&2
        exit 2
      }
      targets+=("$1"); shift ;;
  esac
done

command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet cargo-fuzz
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${#targets[@]} fuzz targets (release, debug assertions, AddressSanitizer)"
cargo fuzz build 2>&1 | tail -n 3

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
failed=0
rows=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  if [ -d "fuzz/seeds/$t" ]; then
    cp -n "fuzz/seeds/$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
  fi
  limit=""
  [ "$seconds" != 0 ] && limit=", at most $seconds s"
  echo "== $t: up to $runs executions$limit"
  start=$(date +%s)
  status=ok
  if ! cargo fuzz run "$t" "fuzz/corpus/$t" -- \
      -runs="$runs" -max_total_time="$seconds" -max_len=8192 -timeout=10 \
      -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    status=FAILED
    failed=1
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$logs/$t.log" | head -n 8 || true
  fi
  took=$(( $(date +%s) - start ))
  execs=$(grep -oP 'stat::number_of_executed_units:\s*\K[0-9]+' "$logs/$t.log" | tail -n 1 || true)
  rate=$(grep -oP 'stat::average_exec_per_sec:\s*\K[0-9]+' "$logs/$t.log" | tail -n 1 || true)
  cov=$(grep -oP '^#[0-9]+\s+\w+\s+cov: \K[0-9]+' "$logs/$t.log" | tail -n 1 || true)
  ft=$(grep -oP '^#[0-9]+\s+\w+\s+cov: [0-9]+ ft: \K[0-9]+' "$logs/$t.log" | tail -n 1 || true)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  rows+=("$(printf '%-14s %12s %9s %7s %6s %7s %7s  %s' "$t" "${execs:-?}" "${rate:-?}" "$took" "${cov:-?}" "${ft:-?}" "$corpus" "$status")")
  echo "${rows[-1]}"
done

echo
printf '%-14s %12s %9s %7s %6s %7s %7s  %s\n' target executions exec/s seconds cov ft corpus result
printf '%s\n' "${rows[@]}"
exit "$failed"
