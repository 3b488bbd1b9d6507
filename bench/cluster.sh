#!/usr/bin/env bash
# Measures Herald in Redis mode (two nodes sharing one redis-server) through
# each publish path, next to one in-memory node, with herald-bench:
#
#   bench/cluster.sh SCENARIO [--rounds N] [--paths "memory http redis-pubsub redis-stream"] [herald-bench options…]
#   bench/cluster.sh notify --connections 10000 --rate 2000 --duration 10s
#
# Paths: `memory` is one node without Redis, published to over HTTP; `http`,
# `redis-pubsub` and `redis-stream` are two nodes and a fresh redis-server,
# with subscribers spread over both nodes and publishes through the nodes'
# HTTP API (round-robin), Redis Pub/Sub, or the Streams ingest. Every run
# starts its servers afresh; the paths alternate within a round so that
# drift on the machine hits all alike. Servers (nodes and Redis) are pinned
# to CPU 0, the load generator to CPU 1. The script adds --url,
# --server-pid, --publish-via, --redis-url and --json itself; pass
# everything else through.
#
# Prints medians per path. "herald CPU s" is the nodes' CPU in the measured
# phase, summed; "redis CPU s" is redis-server's. The JSON and logs of every
# run stay in the output directory (CLUSTER_BENCH_OUT, or a new temporary
# one). Everything the script starts is stopped on exit.
set -euo pipefail

script_name=cluster
usage_lines=2,5
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$repo/bench/lib.sh"

require_scenario "${1-}"
scenario="$1"
shift

rounds=3
paths="memory http redis-pubsub redis-stream"
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --rounds=*) rounds="${1#--rounds=}"; shift ;;
    --paths) paths="$2"; shift 2 ;;
    --paths=*) paths="${1#--paths=}"; shift ;;
    *) bench_args+=("$1"); shift ;;
  esac
done
for path in $paths; do
  case "$path" in
    memory | http | redis-pubsub | redis-stream) ;;
    *) echo "cluster: unknown path $path" >&2; usage ;;
  esac
done

out="${CLUSTER_BENCH_OUT:-$(mktemp -d -t herald-cluster-bench.XXXXXX)}"
mkdir -p "$out"
redis_port=16400
node_ports=(18201 18202)
server_cpu=0
bench_cpu=1

wait_for_redis() {
  local pid="$1"
  local deadline=$((SECONDS + 10))
  until [ "$(redis-cli -p "$redis_port" PING 2>/dev/null)" = "PONG" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "cluster: redis-server exited" >&2; return 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "cluster: redis did not answer within 10s" >&2; return 1; }
    sleep 0.1
  done
}

require_free_ports "$redis_port" "${node_ports[@]}"
for tool in redis-server redis-cli curl taskset python3; do
  command -v "$tool" >/dev/null || { echo "cluster: $tool is missing" >&2; exit 1; }
done

build_release
export_fresh_secrets
unset HERALD_REDIS_URL HERALD_REDIS_PREFIX

# Starts a node on port $1 (with Redis when $2 is set); sets $node_pid.
start_node() {
  local port="$1" redis_url="$2" name="$3"
  if [ -n "$redis_url" ]; then
    HERALD_REDIS_URL="$redis_url" taskset -c "$server_cpu" "$herald" serve --listen "127.0.0.1:$port" \
      >"$out/$name.log" 2>&1 &
  else
    taskset -c "$server_cpu" "$herald" serve --listen "127.0.0.1:$port" >"$out/$name.log" 2>&1 &
  fi
  node_pid=$!
  started_pids+=("$node_pid")
  wait_for_http "http://127.0.0.1:$port/ready" 30 "$node_pid"
}

run_path() {
  local path="$1" round="$2"
  local name="$path-$round"
  local pids=() urls=() redis_pid="" redis_url="" via=http
  if [ "$path" != memory ]; then
    taskset -c "$server_cpu" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$out" >"$out/$name-redis.log" 2>&1 &
    redis_pid=$!
    started_pids+=("$redis_pid")
    wait_for_redis "$redis_pid"
    redis_url="redis://127.0.0.1:$redis_port"
    for i in 0 1; do
      start_node "${node_ports[$i]}" "$redis_url" "$name-node$((i + 1))"
      pids+=("$node_pid")
      urls+=("http://127.0.0.1:${node_ports[$i]}")
    done
    [ "$path" = http ] || via="$path"
  else
    start_node "${node_ports[0]}" "" "$name-node1"
    pids+=("$node_pid")
    urls+=("http://127.0.0.1:${node_ports[0]}")
  fi
  local pid_list url_list
  pid_list="$(IFS=,; echo "${pids[*]}")${redis_pid:+,$redis_pid}"
  url_list="$(IFS=,; echo "${urls[*]}")"
  local redis_args=()
  [ "$via" = http ] || redis_args=(--redis-url "$redis_url")
  echo "cluster: $bench $scenario --url $url_list --server-pid $pid_list --publish-via $via ${redis_args[*]} --json ${bench_args[*]}" \
    >"$out/$name.cmd"
  taskset -c "$bench_cpu" "$bench" "$scenario" --url "$url_list" --server-pid "$pid_list" \
    --publish-via "$via" "${redis_args[@]}" --json "${bench_args[@]}" >"$out/$name.json"
  for pid in "${pids[@]}" $redis_pid; do
    stop_process "$pid"
  done
}

for round in $(seq "$rounds"); do
  for path in $paths; do
    echo "cluster: round $round/$rounds: $path" >&2
    run_path "$path" "$round"
  done
done

echo "cluster: results in $out" >&2
python3 - "$out" "$scenario" "$rounds" "$paths" "${bench_args[*]}" <<'PY'
import json, os, statistics, sys

out, scenario, rounds, paths, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), sys.argv[5]

def load(path):
    reports = []
    for round in range(1, rounds + 1):
        with open(os.path.join(out, f"{path}-{round}.json")) as f:
            reports.append(json.load(f))
    return reports

def get(report, key):
    value = report
    for part in key.split("."):
        if value is None:
            return None
        value = value.get(part)
    return value

def node_cpu(report):
    # Every listed pid but the last is a node when Redis was measured too.
    per_pid = (report.get("server") or {}).get("per_pid") or []
    nodes = len(report.get("nodes") or []) or 1
    return sum(p["cpu_measured_s"] for p in per_pid[:nodes]) if per_pid else None

def redis_cpu(report):
    per_pid = (report.get("server") or {}).get("per_pid") or []
    nodes = len(report.get("nodes") or []) or 1
    return sum(p["cpu_measured_s"] for p in per_pid[nodes:]) if len(per_pid) > nodes else None

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

rows = [
    ("connected", lambda r: get(r, "connected"), median),
    ("publishes sent", lambda r: get(r, "publishes.sent"), median),
    ("publish errors (all rounds)", lambda r: get(r, "publishes.errors"), sum),
    ("zero receivers (all rounds)", lambda r: get(r, "publishes.zero_receivers"), lambda v: sum(x for x in v if x is not None) if any(x is not None for x in v) else None),
    ("deliveries expected", lambda r: get(r, "deliveries.expected"), median),
    ("lost (all rounds)", lambda r: get(r, "deliveries.lost"), sum),
    ("duplicated (all rounds)", lambda r: get(r, "deliveries.duplicated"), sum),
    ("deliveries/s", lambda r: get(r, "deliveries.per_second"), median),
    ("latency p50 ms", lambda r: get(r, "latency_ms.p50"), median),
    ("latency p99 ms", lambda r: get(r, "latency_ms.p99"), median),
    ("latency p99.9 ms", lambda r: get(r, "latency_ms.p999"), median),
    ("latency max ms", lambda r: get(r, "latency_ms.max"), median),
    ("publisher max lag ms", lambda r: get(r, "publishes.max_lag_ms"), median),
    ("herald CPU s (measured)", node_cpu, median),
    ("redis CPU s (measured)", redis_cpu, median),
    ("server CPU s (sum)", lambda r: get(r, "server.cpu_measured_s"), median),
    ("deliveries per server CPU-s", lambda r: get(r, "server.deliveries_per_cpu_s"), median),
    ("bench CPU s", lambda r: get(r, "bench_cpu_s"), median),
]

def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"

reports = {path: load(path) for path in paths}
print(f"scenario {scenario}, {rounds} round(s) per path, medians; args: {args}")
print(f"{'':30}" + "".join(f"{path:>15}" for path in paths))
for label, extract, combine in rows:
    cells = [combine([extract(r) for r in reports[path]]) for path in paths]
    if all(c is None for c in cells):
        continue
    print(f"{label:30}" + "".join(f"{fmt(c):>15}" for c in cells))
print()
print("per run:")
for path in paths:
    for i, r in enumerate(reports[path], 1):
        print(f"  {path:13} #{i}: {fmt(get(r, 'deliveries.per_second'))}/s, p50 {fmt(get(r, 'latency_ms.p50'))} ms, "
              f"p99 {fmt(get(r, 'latency_ms.p99'))} ms, p99.9 {fmt(get(r, 'latency_ms.p999'))} ms, "
              f"lost {get(r, 'deliveries.lost')}, errors {get(r, 'publishes.errors')}, "
              f"herald CPU {fmt(node_cpu(r))} s, redis CPU {fmt(redis_cpu(r))} s")
PY
