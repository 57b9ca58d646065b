#!/usr/bin/env bash
# Runs Cohort on the real-protocol test services (Kafka via Tansu, MongoDB via SecantusDB,
# BigQuery via bqemulator) on this machine: the production shape, without a cloud.
#   scripts/local-stack.sh            # install once, start the services, serve on 127.0.0.1:8080
#   COHORT_LISTEN=127.0.0.1:9000 scripts/local-stack.sh
# Ctrl-C stops Cohort and the services.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR="${COHORT_SERVICES_DIR:-$HOME/.cache/cohort/run}"
DATA="${COHORT_LOCAL_DATA:-$HOME/.cache/cohort/local-stack}"
mkdir -p "$DATA"

scripts/services.sh install
scripts/services.sh start >/dev/null
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1091
source "$RUN_DIR/env"

cat >"$DATA/cohort.toml" <<TOML
[server]
listen = "${COHORT_LISTEN:-127.0.0.1:8080}"

[storage]
url = "$COHORT_TEST_MONGODB"
database = "cohort_local"

[bus]
url = "kafka://$COHORT_TEST_KAFKA"
partitions = 3

[warehouse]
url = "bigquery://local-project/cohort_local?endpoint=$COHORT_TEST_BIGQUERY"

[gdpr]
key_url = "file:$DATA/cohort.kek"
TOML

echo "[local-stack] config: $DATA/cohort.toml" >&2
cargo run --release --locked --bin cohort -- --config "$DATA/cohort.toml" serve
