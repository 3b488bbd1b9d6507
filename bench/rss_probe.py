#!/usr/bin/env python3
"""Quick RSS probe until herald-bench exists: opens N authenticated WebSocket
connections (each user also joins one group) and prints the server's RSS
before and after. Standard library only.

    HERALD_JWT_SECRET=... bench/rss_probe.py --pid PID --port 8081 --connections 1000
"""
import argparse, base64, hashlib, hmac, json, os, socket, time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, user: str) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket) -> bytes:
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data
    first, second = exact(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exact(2), "big")
    elif length == 127:
        length = int.from_bytes(exact(8), "big")
    return exact(length)


def connect(port: int, secret: str, user: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = b64(os.urandom(16)) + "=="
    request = (f"GET /ws?token={token(secret, user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0], response
    assert b"auth_success" in read_frame(sock)
    sock.sendall(masked_text_frame(json.dumps({"type": "join_group", "data": {"group_id": user[-2:]}})))
    assert b"ack" in read_frame(sock)
    return sock


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    secret = os.environ["HERALD_JWT_SECRET"]
    before = rss_kib(args.pid)
    sockets = [connect(args.port, secret, f"user{i:05d}") for i in range(args.connections)]
    time.sleep(1)  # let allocator state settle before reading RSS (measurement, not synchronisation)
    after = rss_kib(args.pid)
    per = (after - before) / args.connections
    print(f"connections={args.connections} rss_before_kib={before} rss_after_kib={after} per_connection_kib={per:.2f}")
    for sock in sockets:
        sock.close()


if __name__ == "__main__":
    main()
