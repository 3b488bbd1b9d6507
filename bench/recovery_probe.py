#!/usr/bin/env python3
"""Time to recover N missed messages: a client subscribes to a channel with
history, disconnects, N messages are published, and it resubscribes with its
offset and epoch; the time is from sending that subscribe to receiving the
last missed message (checked in order, no gap, no duplicate).

The server needs a namespace with history, e.g. `[namespaces.feed]
subscribe = "authenticated"`, `history_size = 10000`.

    HERALD_JWT_SECRET=... HERALD_API_KEY=... bench/recovery_probe.py --port 8081 --messages 1000 --rounds 5
"""
import argparse, json, os, statistics, time, urllib.request

from wslib import Connection


def publish(port: int, api_key: str, channel: str, seq: int) -> None:
    body = json.dumps({"channel": channel, "data": {"seq": seq}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/publish", data=body,
                                     headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request) as response:
        assert response.status == 200


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channel", default="feed:recovery")
    args = parser.parse_args()
    secret, api_key = os.environ["HERALD_JWT_SECRET"], os.environ["HERALD_API_KEY"]
    timings = []
    for round_number in range(args.rounds):
        channel = f"{args.channel}{round_number}"
        client = Connection(args.port, secret, "prober")
        client.send({"type": "subscribe", "message_id": "s", "data": {"channel": channel}})
        ack = client.frame()
        offset, epoch = ack["data"]["offset"], ack["data"]["epoch"]
        client.close()
        for seq in range(args.messages):
            publish(args.port, api_key, channel, seq)
        client = Connection(args.port, secret, "prober")
        started = time.perf_counter()
        client.send({"type": "subscribe", "message_id": "r",
                     "data": {"channel": channel, "offset": offset, "epoch": epoch}})
        ack = client.frame()
        assert ack["data"]["recovered"] is True, ack
        for expected in range(args.messages):
            frame = client.frame()
            assert frame["data"]["seq"] == expected, (frame, expected)
        timings.append((time.perf_counter() - started) * 1000)
        client.close()
    print(f"messages={args.messages} rounds={args.rounds} median_ms={statistics.median(timings):.1f} "
          f"min_ms={min(timings):.1f} max_ms={max(timings):.1f}")


if __name__ == "__main__":
    main()
