# Shared by bench/compare.sh and bench/cluster.sh: the usage message and the
# scenario check, the port check, the release build, fresh secrets, and
# tracking the processes a script starts (all stopped on exit) and waiting
# for servers. Before sourcing, set `script_name` (it prefixes messages),
# `usage_lines` (the sed range of the script's header that is its usage,
# e.g. 2,5) and `repo` (the repository root).
# shellcheck shell=bash
# shellcheck disable=SC2154 # script_name, usage_lines: set by the sourcing script

started_pids=()
cleanup() {
  for pid in "${started_pids[@]}"; do
    stop_process "$pid"
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Prints the usage (lines $usage_lines of the script's header) and exits 2.
usage() {
  sed -n "${usage_lines}p" "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Exits with the usage unless $1 is a herald-bench scenario.
require_scenario() {
  case "${1-}" in
    idle | broadcast | notify | connect | slow) ;;
    *) usage ;;
  esac
}

# Stops one process we started: TERM, then KILL if it lingers.
stop_process() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# Waits until `curl URL` succeeds, for at most $2 seconds, while $3 lives.
wait_for_http() {
  local url="$1" seconds="$2" pid="$3"
  local deadline=$((SECONDS + seconds))
  until curl -fs -o /dev/null "$url"; do
    kill -0 "$pid" 2>/dev/null || { echo "$script_name: the server exited before answering $url" >&2; return 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "$script_name: $url did not answer within ${seconds}s" >&2; return 1; }
    sleep 0.1
  done
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Exits unless every port given is free on 127.0.0.1.
require_free_ports() {
  local port
  for port in "$@"; do
    port_free "$port" || { echo "$script_name: port $port is already in use" >&2; exit 1; }
  done
}

# Builds herald and herald-bench in release mode (into $CARGO_TARGET_DIR, or
# the repository's target/); sets $herald and $bench to the binaries.
build_release() {
  local target_dir="${CARGO_TARGET_DIR:-$repo/target}"
  echo "$script_name: building release binaries" >&2
  (cd "$repo" && cargo build --release --quiet -p herald-server -p herald-bench)
  # shellcheck disable=SC2034 # used by the sourcing script
  herald="$target_dir/release/herald"
  # shellcheck disable=SC2034
  bench="$target_dir/release/herald-bench"
}

# Exports a fresh HERALD_JWT_SECRET and HERALD_API_KEY for the servers and
# the load generator.
export_fresh_secrets() {
  HERALD_JWT_SECRET="$(openssl rand -hex 32)"
  HERALD_API_KEY="$(openssl rand -hex 24)"
  export HERALD_JWT_SECRET HERALD_API_KEY
}
