#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 60): cargo-fuzz
# (libFuzzer) on the nightly toolchain, one target after the other, each
# starting from its corpus (fuzz/corpus/TARGET, kept between runs) and the
# seeds committed in fuzz/seeds/TARGET. Prints the executions per target and
# exits non-zero if any target crashed, leaked, timed out or ran out of
# memory; the input that did it is in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="smtp_session dsn" scripts/fuzz.sh 600   # only some
#
# Installs cargo-fuzz when it is missing. Needs a nightly toolchain
# (`cargo +nightly`), which it does not install.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain (cargo +nightly); libFuzzer needs one" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "--- installing cargo-fuzz"
  start=$(date +%s)
  cargo install cargo-fuzz --locked
  echo "cargo-fuzz installed in $(( $(date +%s) - start )) s"
fi

targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"

echo "--- building the fuzz targets"
start=$(date +%s)
cargo +nightly fuzz build
echo "built in $(( $(date +%s) - start )) s"

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
failed=()
summary=()
for target in $targets; do
  mkdir -p "fuzz/corpus/$target"
  dirs=("fuzz/corpus/$target")
  [ -d "fuzz/seeds/$target" ] && dirs+=("fuzz/seeds/$target")
  echo "--- $target: ${seconds} s"
  log="$logs/$target.log"
  status=0
  cargo +nightly fuzz run "$target" "${dirs[@]}" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  line="$(printf '%-18s %12s executions in %s s' "$target" "${execs:-?}" "$seconds")"
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    line="$line  FAILED (exit $status)"
    # The report: the panic or sanitizer message and the input's path.
    grep -E -A 12 "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY:|Test unit written to" "$log" | head -60 || tail -40 "$log"
  fi
  echo "$line"
  summary+=("$line")
done

echo "--- fuzzing summary ($(date -u +%Y-%m-%dT%H:%MZ))"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
