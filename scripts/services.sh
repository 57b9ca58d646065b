#!/usr/bin/env bash
# Installs (once, cached) and starts/stops the real-protocol servers the tests use:
#   Tansu (Kafka protocol; a second one in memory for benchmarks), SecantusDB (MongoDB wire protocol), bqemulator (BigQuery REST API),
# and the deployment checkers: promtool (Debian's prometheus package) and kubernetes-validate.
# Usage: scripts/services.sh install | start | stop | env | stop-one|start-one|pause|resume kafka|mongo
# Everything listens on 127.0.0.1 on free ports; `start` writes $COHORT_SERVICES_DIR/env with the
# URLs, and `stop` stops exactly the processes it started (by PID).
set -euo pipefail

CACHE="${COHORT_CACHE:-$HOME/.cache/cohort}"
TOOLS="$CACHE/services"
RUN_DIR="${COHORT_SERVICES_DIR:-$CACHE/run}"
TANSU_VERSION=0.6.0
SECANTUS_VERSION=0.5.3-beta.196
BQEMU_VERSION=1.4.0
KUBE_VALIDATE_VERSION=1.37.0
CARGO_DENY_VERSION=0.20.2
DUCKDB_VERSION=1.5.5

log() { printf '[services] %s\n' "$*" >&2; }

tansu_bin() { echo "$TOOLS/tansu-$TANSU_VERSION/bin/tansu"; }
secantus_bin() { echo "$TOOLS/secantus-$SECANTUS_VERSION/bin/secantusd-rs"; }
bq_venv() { echo "$TOOLS/bqemulator-$BQEMU_VERSION"; }

install_tansu() {
  if [ -x "$(tansu_bin)" ]; then return; fi
  log "building tansu $TANSU_VERSION with sqlite storage (about 13 minutes on 2 cores, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TOOLS/tansu-$TANSU_VERSION" --quiet
}

install_secantus() {
  if [ -x "$(secantus_bin)" ]; then return; fi
  if ! command -v cmake >/dev/null 2>&1; then
    log "installing cmake"
    (apt-get update -qq && apt-get install -y -qq cmake) >/dev/null
  fi
  log "building secantusd-rs $SECANTUS_VERSION (about 10 minutes on 2 cores, once)"
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --locked \
    --root "$TOOLS/secantus-$SECANTUS_VERSION" --quiet 2>/dev/null \
  || cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version \
    --root "$TOOLS/secantus-$SECANTUS_VERSION" --quiet
}

deploy_venv() { echo "$TOOLS/deploy-tools"; }

install_deploy_tools() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian's prometheus package)"
    (apt-get update -qq && apt-get install -y -qq prometheus) >/dev/null
    # Only the checker is wanted, not a running Prometheus.
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  local v; v="$(deploy_venv)"
  if [ -x "$v/bin/kubernetes-validate" ]; then return; fi
  log "installing kubernetes-validate $KUBE_VALIDATE_VERSION into a virtualenv"
  python3 -m venv "$v"
  "$v/bin/pip" install --quiet "kubernetes-validate==$KUBE_VALIDATE_VERSION"
}

cargo_deny_bin() { echo "$TOOLS/cargo-deny-$CARGO_DENY_VERSION/bin/cargo-deny"; }

install_cargo_deny() {
  if [ -x "$(cargo_deny_bin)" ]; then return; fi
  log "building cargo-deny $CARGO_DENY_VERSION (about 3 minutes on 2 cores, once)"
  cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked --root "$TOOLS/cargo-deny-$CARGO_DENY_VERSION" --quiet
}

install_bqemulator() {
  local v; v="$(bq_venv)"
  if [ -x "$v/bin/bqemulator" ] && [ -d "$v/home/.duckdb" ]; then return; fi
  log "installing bqemulator $BQEMU_VERSION into a virtualenv"
  python3 -m venv "$v"
  "$v/bin/pip" install --quiet "bqemulator==$BQEMU_VERSION" "duckdb==$DUCKDB_VERSION" \
    "duckdb-extension-spatial==$DUCKDB_VERSION" numpy
  # bqemulator loads DuckDB's spatial extension at start; offline it must come from the wheel.
  local ext; ext="$(find "$v/lib" -name spatial.duckdb_extension | head -n1)"
  mkdir -p "$v/home/.duckdb/extensions/v$DUCKDB_VERSION/linux_amd64"
  ln -sf "$ext" "$v/home/.duckdb/extensions/v$DUCKDB_VERSION/linux_amd64/"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1',$port)))" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  log "$name did not open port $port"; return 1
}

# start_tansu PORT [NAME STORAGE]: runs in $RUN_DIR/NAME (which must exist), logs to NAME.log.
# The tests' broker is `tansu` on SQLite. The benchmarks' is `tansu-bench` in memory: the SQLite
# engine costs about a millisecond of CPU per produced batch on the cores Cohort shares
# (BENCHMARKS.md, session 11), so a throughput figure through it measures SQLite.
start_tansu() {
  local port=$1 name=${2:-tansu} storage=${3:-sqlite://tansu.db}
  (cd "$RUN_DIR/$name" && exec "$(tansu_bin)" broker \
      --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "$storage" >>"$RUN_DIR/$name.log" 2>&1) &
  echo $! >"$RUN_DIR/$name.pid"
}

start_mongo() {
  local port=$1
  "$(secantus_bin)" --host 127.0.0.1 --port "$port" --storage-path "$RUN_DIR/mongo" --cache-size 512M \
      >>"$RUN_DIR/mongo.log" 2>&1 &
  echo $! >"$RUN_DIR/mongo.pid"
}

start() {
  for bin in "$(tansu_bin)" "$(secantus_bin)" "$(bq_venv)/bin/bqemulator"; do
    [ -x "$bin" ] || { log "$bin is missing: run scripts/services.sh install first"; exit 1; }
  done
  stop_quiet
  mkdir -p "$RUN_DIR"
  local kport mport bport gport tbport
  kport=$(free_port); mport=$(free_port); bport=$(free_port); gport=$(free_port); tbport=$(free_port)

  # Tansu reads a .env file from its working directory: run it in an empty folder, with a fresh
  # database every run (a reused one has been seen to break it).
  rm -rf "$RUN_DIR/tansu" "$RUN_DIR/tansu-bench" && mkdir -p "$RUN_DIR/tansu" "$RUN_DIR/tansu-bench"
  start_tansu "$kport"
  start_tansu "$tbport" tansu-bench memory://

  rm -rf "$RUN_DIR/mongo" && mkdir -p "$RUN_DIR/mongo"
  start_mongo "$mport"

  local v; v="$(bq_venv)"
  HOME="$v/home" "$v/bin/bqemulator" start --rest-host 127.0.0.1 --rest-port "$bport" \
      --grpc-host 127.0.0.1 --grpc-port "$gport" --project test-project --log-level warning \
      >"$RUN_DIR/bq.log" 2>&1 &
  echo $! >"$RUN_DIR/bq.pid"

  wait_port "$kport" tansu || { log "tansu failed to start, see $RUN_DIR/tansu.log"; stop_quiet; exit 1; }
  # Only the benchmark uses it: without it the tests still run, and COHORT_BENCH_KAFKA is unset.
  local bench_env="export COHORT_BENCH_KAFKA=127.0.0.1:$tbport"
  wait_port "$tbport" tansu-bench || { log "the benchmark tansu failed to start, see $RUN_DIR/tansu-bench.log"; stop_one tansu-bench; bench_env=""; }
  wait_port "$mport" secantusdb || { log "secantusdb failed to start, see $RUN_DIR/mongo.log"; stop_quiet; exit 1; }
  wait_port "$bport" bqemulator || { log "bqemulator failed to start, see $RUN_DIR/bq.log"; stop_quiet; exit 1; }
  cat >"$RUN_DIR/env" <<ENV
export COHORT_TEST_KAFKA=127.0.0.1:$kport
$bench_env
export COHORT_TEST_MONGODB=mongodb://127.0.0.1:$mport
export COHORT_TEST_BIGQUERY=http://127.0.0.1:$bport/bigquery/v2
export COHORT_SERVICES_DIR=$RUN_DIR
export COHORT_TEST_TANSU_BIN=$(tansu_bin)
export COHORT_TEST_SECANTUS_BIN=$(secantus_bin)
export COHORT_TEST_PROMTOOL=$(command -v promtool || true)
export COHORT_TEST_DEPLOY_TOOLS=$(deploy_venv)/bin
export COHORT_TEST_CARGO_DENY=$(cargo_deny_bin)
ENV
  log "started: kafka 127.0.0.1:$kport (benchmarks: 127.0.0.1:$tbport, in memory), mongodb 127.0.0.1:$mport, bigquery 127.0.0.1:$bport"
  cat "$RUN_DIR/env"
}

stop_one() {
  local pidfile="$RUN_DIR/$1.pid"
  if [ -f "$pidfile" ]; then
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  fi
}

# Restarts one server on the same port with its data kept (outage tests).
restart_one() {
  # shellcheck disable=SC1091
  source "$RUN_DIR/env"
  case "$1" in
    kafka) stop_one tansu; start_tansu "${COHORT_TEST_KAFKA##*:}"; wait_port "${COHORT_TEST_KAFKA##*:}" tansu ;;
    mongo) stop_one mongo; start_mongo "${COHORT_TEST_MONGODB##*:}"; wait_port "${COHORT_TEST_MONGODB##*:}" secantusdb ;;
    *) echo "restart: kafka or mongo" >&2; exit 2 ;;
  esac
}

stop_quiet() {
  for name in tansu tansu-bench mongo bq; do stop_one "$name"; done
}

case "${1:-}" in
  install) install_deploy_tools; install_cargo_deny; install_bqemulator; install_secantus; install_tansu ;;
  start) start ;;
  stop) stop_quiet; log "stopped" ;;
  stop-one) case "${2:-}" in kafka) stop_one tansu ;; mongo) stop_one mongo ;; *) echo "stop-one kafka|mongo" >&2; exit 2 ;; esac ;;
  start-one) restart_one "${2:-}" ;;
  # Freeze or thaw a server (SIGSTOP/SIGCONT): an outage without a restart. Tansu's SQLite engine
  # has been seen to panic when restarted on its own database, so outage tests pause it instead.
  pause|resume)
    case "${2:-}" in kafka) name=tansu ;; mongo) name=mongo ;; *) echo "$1 kafka|mongo" >&2; exit 2 ;; esac
    sig=STOP; [ "$1" = resume ] && sig=CONT
    kill -"$sig" "$(cat "$RUN_DIR/$name.pid")" ;;
  env) cat "$RUN_DIR/env" ;;
  *) echo "usage: $0 install|start|stop|env|stop-one kafka|mongo|start-one kafka|mongo" >&2; exit 2 ;;
esac
