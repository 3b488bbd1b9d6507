"""A minimal WebSocket client and JWT minting, standard library only, shared
by the probe scripts in this folder (herald-bench is the real load tool)."""
import base64, hashlib, hmac, json, os, socket, time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, user: str, ttl: int = 3600) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    # Groups are members-only by default: the probes' users may join any.
    claims = b64(json.dumps({"sub": user, "exp": int(time.time()) + ttl, "channels": ["group:*"]}).encode())
    signature = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def text_frame(text: str) -> bytes:
    """A masked client text frame."""
    payload = text.encode()
    mask = os.urandom(4)
    if len(payload) < 126:
        head = bytes([0x81, 0x80 | len(payload)])
    else:
        head = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Connection:
    def __init__(self, port: int, secret: str, user: str):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buffer = b""
        key = b64(os.urandom(16)) + "=="
        request = (f"GET /ws?token={token(secret, user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        assert self.frame()["type"] == "auth_success"

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> dict:
        """The next text frame, parsed (control frames are skipped)."""
        while True:
            first, second = self._exact(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self._exact(2), "big")
            elif length == 127:
                length = int.from_bytes(self._exact(8), "big")
            payload = self._exact(length)
            if first & 0x0F == 0x1:
                return json.loads(payload)

    def send(self, message: dict) -> None:
        self.sock.sendall(text_frame(json.dumps(message)))

    def close(self) -> None:
        self.sock.close()
