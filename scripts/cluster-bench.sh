#!/usr/bin/env bash
# Cluster throughput on this machine: 1, 2 and 3 `cohort` replicas in cluster mode on the test
# services (Tansu, SecantusDB), the same load each time, spread over the replicas.
#   scripts/cluster-bench.sh                 # 50,000 events per run
#   EVENTS=20000 REPLICAS="1 3" scripts/cluster-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR="${COHORT_SERVICES_DIR:-$HOME/.cache/cohort/run}"
EVENTS="${EVENTS:-50000}"
REPLICAS="${REPLICAS:-1 2 3}"
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

scripts/services.sh start >/dev/null
# shellcheck disable=SC1091
source "$RUN_DIR/env"
cargo build --release --locked --bin cohort --bin cohort-cluster-bench
BIN="${CARGO_TARGET_DIR:-target}/release"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for n in $REPLICAS; do
  id="cbench_$$_${n}_$(date +%s)"
  cat >"$WORK/$n.toml" <<TOML
[storage]
url = "$COHORT_TEST_MONGODB"
database = "$id"
[bus]
url = "kafka://$COHORT_TEST_KAFKA"
topic_prefix = "$id."
group_id = "$id"
partitions = 6
[warehouse]
url = "none://"
[gdpr]
key_url = "file:$WORK/$id.kek"
[server]
ingest_requests_per_second = 0
api_requests_per_second = 0
[cluster]
enabled = true
heartbeat_secs = 1
member_ttl_secs = 3
TOML
  urls=()
  pids=()
  for i in $(seq 1 "$n"); do
    port="$(free_port)"
    HOSTNAME="bench-$i" COHORT__SERVER__LISTEN="127.0.0.1:$port" COHORT__TELEMETRY__LOG_FILTER=warn \
      "$BIN/cohort" --config "$WORK/$n.toml" serve >"$WORK/$n-$i.log" 2>&1 &
    pids+=("$!")
    urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do
    until curl -fs "$u/health/ready" >/dev/null; do sleep 0.2; done
  done
  # Let the consumer groups settle on all members before measuring.
  sleep 15
  "$BIN/cohort-cluster-bench" --urls "$(IFS=,; echo "${urls[*]}")" --events "$EVENTS"
  for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  pids=()
done
