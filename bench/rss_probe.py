#!/usr/bin/env python3
"""Quick RSS probe: opens N authenticated WebSocket connections (each user
also joins one group) and prints the server's RSS before and after.
herald-bench's `idle` scenario is the full tool; this needs only Python.

    HERALD_JWT_SECRET=... bench/rss_probe.py --pid PID --port 8081 --connections 1000
"""
import argparse, os, time

from wslib import Connection


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    secret = os.environ["HERALD_JWT_SECRET"]
    before = rss_kib(args.pid)
    connections = []
    for i in range(args.connections):
        connection = Connection(args.port, secret, f"user{i:05d}")
        connection.send({"type": "join_group", "data": {"group_id": f"{i % 100}"}})
        assert connection.frame()["type"] == "ack"
        connections.append(connection)
    time.sleep(1)  # let allocator state settle before reading RSS (measurement, not synchronisation)
    after = rss_kib(args.pid)
    per = (after - before) / args.connections
    print(f"connections={args.connections} rss_before_kib={before} rss_after_kib={after} per_connection_kib={per:.2f}")
    for connection in connections:
        connection.close()


if __name__ == "__main__":
    main()
