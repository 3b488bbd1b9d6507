#!/usr/bin/env bash
# Measures Herald and nchan side by side with herald-bench, on one machine:
#
#   bench/compare.sh SCENARIO [--rounds N] [herald-bench options…]
#   bench/compare.sh broadcast --connections 1000 --rate 200 --duration 5s --payload 100
#
# SCENARIO is idle, broadcast, notify, connect or slow. Each round restarts
# the server under test so that its memory starts from the same point, and
# the targets alternate (Herald, nchan, Herald, nchan, …) so that drift on
# the machine hits both alike. Both servers are pinned to CPU 0 (Herald runs
# one tokio worker thread there, nchan one nginx worker); the load generator
# is pinned to CPU 1. The script adds --target, the URLs, --server-pid and
# --json itself; pass everything else through.
#
# Prints medians per target and the Herald/nchan ratios of deliveries per
# server CPU-second, p99 latency and KiB per connection. The JSON of every
# round stays in the output directory (COMPARE_OUT, or a new temporary one).
# Everything the script starts is stopped on exit.
set -euo pipefail

script_name=compare
usage_lines=2,4
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/lib.sh
. "$repo/bench/lib.sh"

require_scenario "${1-}"
scenario="$1"
shift

rounds=3
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --rounds=*) rounds="${1#--rounds=}"; shift ;;
    *) bench_args+=("$1"); shift ;;
  esac
done

nchan_run="$repo/../shared/peers/nchan/run.sh"
out="${COMPARE_OUT:-$(mktemp -d -t herald-compare.XXXXXX)}"
mkdir -p "$out"
herald_port=18081
nchan_port=18090
server_cpu=0
bench_cpu=1

require_free_ports "$herald_port" "$nchan_port"
[ -x "$nchan_run" ] || { echo "compare: $nchan_run not found (the shared/ peers folder)" >&2; exit 1; }

build_release
export_fresh_secrets

run_herald_round() {
  local round="$1"
  taskset -c "$server_cpu" "$herald" serve --listen "127.0.0.1:$herald_port" \
    >"$out/herald-$round.log" 2>&1 &
  local pid=$!
  started_pids+=("$pid")
  wait_for_http "http://127.0.0.1:$herald_port/ready" 30 "$pid"
  taskset -c "$bench_cpu" "$bench" "$scenario" --target herald \
    --url "http://127.0.0.1:$herald_port" --server-pid "$pid" --json "${bench_args[@]}" \
    >"$out/herald-$round.json"
  stop_process "$pid"
}

run_nchan_round() {
  local round="$1"
  # run.sh execs nginx (daemon off): $! is the master. The one worker
  # process does the work, so it is the one measured.
  taskset -c "$server_cpu" "$nchan_run" "$nchan_port" 1 >"$out/nchan-$round.log" 2>&1 &
  local master=$!
  started_pids+=("$master")
  # The first run may install nchan with apt-get.
  wait_for_http "http://127.0.0.1:$nchan_port/nchan_status" 600 "$master"
  local worker
  worker="$(pgrep -P "$master" | head -n 1)"
  [ -n "$worker" ] || { echo "compare: no nginx worker under $master" >&2; return 1; }
  taskset -c "$bench_cpu" "$bench" "$scenario" --target peer \
    --sub-url "ws://127.0.0.1:$nchan_port/sub/{channel}" \
    --pub-url "http://127.0.0.1:$nchan_port/pub/{channel}" \
    --server-pid "$worker" --json "${bench_args[@]}" \
    >"$out/nchan-$round.json"
  stop_process "$master"
}

for round in $(seq "$rounds"); do
  echo "compare: round $round/$rounds: herald" >&2
  run_herald_round "$round"
  echo "compare: round $round/$rounds: nchan" >&2
  run_nchan_round "$round"
done

echo "compare: results in $out" >&2
python3 - "$out" "$scenario" "$rounds" "${bench_args[*]}" <<'PY'
import glob, json, os, statistics, sys

out, scenario, rounds, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def load(target):
    reports = []
    for round in range(1, rounds + 1):
        with open(os.path.join(out, f"{target}-{round}.json")) as f:
            reports.append(json.load(f))
    return reports

def get(report, path):
    value = report
    for key in path.split("."):
        if value is None:
            return None
        value = value.get(key)
    return value

def median(reports, path):
    values = [get(r, path) for r in reports]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def total(reports, path):
    values = [get(r, path) or 0 for r in reports]
    return sum(values)

herald, nchan = load("herald"), load("nchan")
# (label, path, how to combine rounds, which way is better)
rows = [
    ("connections connected", "connected", median, None),
    ("connect rate /s", "connect.rate_per_s", median, "higher"),
    ("connect p99 ms", "connect.latency_ms.p99", median, "lower"),
    ("publishes sent", "publishes.sent", median, None),
    ("publish errors (all rounds)", "publishes.errors", total, "lower"),
    ("deliveries received", "deliveries.received", median, None),
    ("lost (all rounds)", "deliveries.lost", total, "lower"),
    ("duplicated (all rounds)", "deliveries.duplicated", total, "lower"),
    ("deliveries/s", "deliveries.per_second", median, "higher"),
    ("latency p50 ms", "latency_ms.p50", median, "lower"),
    ("latency p90 ms", "latency_ms.p90", median, "lower"),
    ("latency p99 ms", "latency_ms.p99", median, "lower"),
    ("latency p99.9 ms", "latency_ms.p999", median, "lower"),
    ("latency max ms", "latency_ms.max", median, "lower"),
    ("server CPU s (measured)", "server.cpu_measured_s", median, "lower"),
    ("server CPU s (connecting)", "server.cpu_connect_s", median, "lower"),
    ("deliveries per server CPU-s", "server.deliveries_per_cpu_s", median, "higher"),
    ("server RSS before KiB", "server.rss_before_kib", median, None),
    ("server RSS connected KiB", "server.rss_after_connect_kib", median, None),
    ("KiB per connection", "server.kib_per_connection", median, "lower"),
    ("slow subscribers", "slow.subscribers", median, None),
    ("bench CPU s", "bench_cpu_s", median, None),
]

def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"

def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b

print(f"scenario {scenario}, {rounds} round(s) per target, median per target; args: {args}")
print(f"{'':32} {'herald':>14} {'nchan':>14} {'herald/nchan':>13}")
for label, path, combine, _better in rows:
    h, n = combine(herald, path), combine(nchan, path)
    if h is None and n is None:
        continue
    r = ratio(h, n)
    print(f"{label:32} {fmt(h):>14} {fmt(n):>14} {('%.2f' % r) if r is not None else '-':>13}")

print()
print("headline ratios (herald/nchan):")
for label, path, better in [
    ("deliveries per server CPU-second", "server.deliveries_per_cpu_s", "higher is better for Herald"),
    ("p99 latency", "latency_ms.p99", "lower is better for Herald"),
    ("KiB per connection", "server.kib_per_connection", "lower is better for Herald"),
]:
    r = ratio(median(herald, path), median(nchan, path))
    print(f"  {label:34} {('%.2f' % r) if r is not None else '-':>8}   ({better})")

print()
print("per round:")
for target, reports in (("herald", herald), ("nchan", nchan)):
    for i, r in enumerate(reports, 1):
        print(f"  {target:6} #{i}: {fmt(get(r, 'deliveries.per_second'))} deliveries/s, "
              f"p99 {fmt(get(r, 'latency_ms.p99'))} ms, "
              f"{fmt(get(r, 'server.deliveries_per_cpu_s'))} per CPU-s, "
              f"{fmt(get(r, 'server.kib_per_connection'))} KiB/conn, "
              f"lost {get(r, 'deliveries.lost')}, connected {get(r, 'connected')}")
PY
