# Shared by bench/compare.sh and bench/cluster.sh: tracking the processes a
# script starts (all stopped on exit), and waiting for servers. Set
# `script_name` before sourcing; it prefixes messages.

started_pids=()
cleanup() {
  for pid in "${started_pids[@]}"; do
    stop_process "$pid"
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
