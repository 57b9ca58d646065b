#!/usr/bin/env bash
# Installs what the tests need and runs every check and test. Safe to run again: nothing is
# reinstalled when already present. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse builds across clones on the same machine, like a CI cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cohort/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental state only speeds up edit-compile loops; in CI it costs gigabytes of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
    rustup component add "$component"
  fi
done

echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== docs (broken or private intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --locked
echo "== build"
cargo build --workspace --all-targets --locked
echo "== test services (Kafka protocol: Tansu, MongoDB wire: SecantusDB, BigQuery API: bqemulator)"
scripts/services.sh install
scripts/services.sh start
trap 'scripts/services.sh stop' EXIT
# shellcheck disable=SC1091
source "${COHORT_SERVICES_DIR:-$HOME/.cache/cohort/run}/env"

echo "== supply chain (licenses, bans, sources; see deny.toml)"
"$COHORT_TEST_CARGO_DENY" check licenses bans sources

echo "== test"
cargo test --workspace --all-targets --locked -- --test-threads 2
