#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 60): libFuzzer on
# the nightly toolchain, one target after the other, each starting from its
# corpus (fuzz/corpus/TARGET, kept between runs) and the seeds committed in
# fuzz/seeds/TARGET. Prints the executions per target and exits non-zero if
# any target crashed, failed a check, timed out or ran out of memory; the
# input that did it is in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="smtp_session dsn" scripts/fuzz.sh 600   # only some
#   FUZZ_SANITIZER=none scripts/fuzz.sh 30                # what CI runs
#
# FUZZ_SANITIZER=address (the default) builds with cargo-fuzz and
# AddressSanitizer, installing cargo-fuzz when it is missing. `none` builds
# the same coverage-instrumented targets with plain `cargo +nightly` (no
# cargo-fuzz, no sanitizer: mxspool forbids unsafe code, and the property
# checks and panics are what find its faults), in about half the time.
# Needs a nightly toolchain (`cargo +nightly`), which it does not install.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac
sanitizer="${FUZZ_SANITIZER:-address}"
case "$sanitizer" in
  address | none) ;;
  *) echo "fuzz.sh: FUZZ_SANITIZER must be address or none, not $sanitizer" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain (cargo +nightly); libFuzzer needs one" >&2
  exit 1
fi

# Every [[bin]] in fuzz/Cargo.toml is a target.
all_targets="$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^mxspool-fuzz$')"
targets="${FUZZ_TARGETS:-$all_targets}"

echo "--- building the fuzz targets (sanitizer: $sanitizer)"
start=$(date +%s)
if [ "$sanitizer" = address ]; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "--- installing cargo-fuzz"
    cargo install cargo-fuzz --locked
  fi
  cargo +nightly fuzz build
  run_target() { # target, libFuzzer arguments...
    local target=$1; shift
    cargo +nightly fuzz run "$target" "$@"
  }
else
  # The instrumentation cargo-fuzz adds, without its sanitizer.
  triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
  (
    cd fuzz
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
      CARGO_PROFILE_RELEASE_DEBUG=0 \
      cargo +nightly build --release --locked --target "$triple" --bins
  )
  bin_dir="${CARGO_TARGET_DIR:-fuzz/target}/$triple/release"
  run_target() {
    local target=$1; shift
    mkdir -p "fuzz/artifacts/$target"
    "$bin_dir/$target" -artifact_prefix="fuzz/artifacts/$target/" "$@"
  }
fi
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
  if [ "$sanitizer" = address ]; then
    set -- "${dirs[@]}" --
  else
    set -- "${dirs[@]}"
  fi
  run_target "$target" "$@" -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
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
