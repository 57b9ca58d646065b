#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a fixed time each and reports, per target, the
# executions libFuzzer made and whether it crashed. Exits non-zero if any target crashed (or
# failed to build). See fuzz/README.md.
#
#   scripts/fuzz.sh                      every target, 60 s each
#   scripts/fuzz.sh segment twilio       only these
#   FUZZ_SECONDS=600 scripts/fuzz.sh     longer
#
# Environment:
#   FUZZ_SECONDS      seconds per target (default 60)
#   FUZZ_SANITIZER    address (default), none, ...; address falls back to none when the
#                     toolchain has no ASan runtime
#   FUZZ_TOOLCHAIN    a rustup toolchain to use (default: stable with RUSTC_BOOTSTRAP=1, or
#                     nightly if that does not build)
#   FUZZ_ARGS         extra libFuzzer arguments, e.g. "-max_len=65536 -dict=..."
#   CARGO_TARGET_DIR  default ~/.cache/cohort/fuzz-target (never the main build's)
#   CARGO_BUILD_JOBS  parallel compile jobs (cargo's default when unset)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cohort/fuzz-target}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The targets link DuckDB's library (through cohort-adapters); adapters/build.rs puts it here, and
# cargo fuzz runs the binaries without cargo's library path.
export LD_LIBRARY_PATH="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/duckdb${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo_fuzz_version="0.13.2"
log_dir="$root/fuzz/artifacts/logs"

if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -lt 1 ]; then
  echo "FUZZ_SECONDS must be a positive number of seconds, not '$seconds'" >&2
  exit 2
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 2
fi

# cargo-fuzz, installed once (cargo install is a no-op when this version is already there).
if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  echo "== installing cargo-fuzz $cargo_fuzz_version"
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

# The targets: those named, or every [[bin]] of fuzz/Cargo.toml.
all_targets=()
while IFS= read -r t; do all_targets+=("$t"); done < <(
  cargo fuzz list --fuzz-dir "$root/fuzz" 2>/dev/null || true
)
if [ "${#all_targets[@]}" -eq 0 ]; then
  echo "no fuzz targets found in fuzz/" >&2
  exit 2
fi
if [ "$#" -gt 0 ]; then
  targets=("$@")
  for t in "${targets[@]}"; do
    if ! printf '%s\n' "${all_targets[@]}" | grep -qx -- "$t"; then
      echo "unknown fuzz target '$t' (known: ${all_targets[*]})" >&2
      exit 2
    fi
  done
else
  targets=("${all_targets[@]}")
fi

# The toolchain: cargo fuzz needs unstable rustc flags (-Zsanitizer, sancov). Stable allows them
# with RUSTC_BOOTSTRAP=1, which keeps CI on the toolchain it already has; nightly otherwise.
fuzz() {
  if [ -n "${toolchain:-}" ]; then
    cargo "+$toolchain" fuzz "$@"
  else
    RUSTC_BOOTSTRAP=1 cargo fuzz "$@"
  fi
}

build() {
  : >"$log_dir/build.log"
  for t in "${targets[@]}"; do
    fuzz build --fuzz-dir "$root/fuzz" -s "$sanitizer" "$t" >>"$log_dir/build.log" 2>&1 || return 1
  done
}

mkdir -p "$log_dir"
toolchain="${FUZZ_TOOLCHAIN:-}"
echo "== building ${#targets[@]} target(s) (sanitizer: $sanitizer, toolchain: ${toolchain:-stable + RUSTC_BOOTSTRAP=1})"
if ! build; then
  if [ "$sanitizer" = "address" ] && grep -qiE "asan|sanitizer" "$log_dir/build.log"; then
    echo "   the address sanitizer does not build here; retrying with -s none"
    sanitizer=none
  elif [ -z "$toolchain" ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "   stable + RUSTC_BOOTSTRAP=1 did not build; retrying with nightly"
    toolchain=nightly
  fi
  if ! build; then
    tail -n 40 "$log_dir/build.log" >&2
    echo "build failed (full log: $log_dir/build.log)" >&2
    exit 1
  fi
fi

results=()
crashed=0
for t in "${targets[@]}"; do
  corpus="$root/fuzz/corpus/$t"
  artifacts="$root/fuzz/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  log="$log_dir/$t.log"
  echo "== $t: ${seconds}s"
  status=0
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of libFuzzer flags
  fuzz run --fuzz-dir "$root/fuzz" -s "$sanitizer" "$t" "$corpus" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts" ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)
  [ -n "$execs" ] || execs="?"
  if [ "$status" -eq 0 ]; then
    outcome="ok"
  else
    crashed=1
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)
    kind=$(grep -oE 'deadly signal|panicked at|ERROR: AddressSanitizer: [a-z-]*|ERROR: libFuzzer: [a-z-]*|out-of-memory|timeout' "$log" | head -n 1 || true)
    outcome="CRASH (${kind:-exit $status}) ${artifact:-see $log}"
    grep -m1 -A4 'panicked at' "$log" >&2 || tail -n 20 "$log" >&2
  fi
  echo "   executions: $execs, $outcome"
  results+=("$(printf '%-16s %8ss %14s  %s' "$t" "$seconds" "$execs" "$outcome")")
done

echo
echo "== summary (logs: $log_dir)"
printf '%-16s %9s %14s  %s\n' target time executions result
printf '%s\n' "${results[@]}"
if [ "$crashed" -ne 0 ]; then
  echo "a target crashed: minimise the artifact (cargo fuzz tmin), fix it, and add it to fuzz/regressions/<target>/" >&2
  exit 1
fi
