"""Servers the proxy tests start inside a sandbox (uploaded by the test and
run with python3 there; stdlib only):
  python3 sandbox_servers.py echo-headers PORT  # answers the request's raw header lines as JSON
  python3 sandbox_servers.py ws-echo PORT       # a WebSocket echo server (RFC 6455, text/binary frames)
Each prints "ready" once listening. The clients' side of the same wire
(frame, ws_handshake, ws_recv) and the agent request form the SDK uses
(envd_request) are here too, for the fake backend's tests and the nested
Linux proof alike."""

import base64
import hashlib
import json
import os
import socket
import socketserver
import struct
import sys

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"


def read_head(f):
    lines = []
    while True:
        line = f.readline(65536)
        if not line or line in (b"\r\n", b"\n"):
            return lines
        lines.append(line.decode("latin-1").rstrip("\r\n"))


class EchoHeaders(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            head = read_head(self.rfile)
            if not head:
                return
            fields = [l.split(":", 1) for l in head[1:]]
            fields = [[k, v.strip()] for k, v in fields]
            length = next((int(v) for k, v in fields if k.lower() == "content-length"), 0)
            if length:
                self.rfile.read(length)
            body = json.dumps({"request_line": head[0], "headers": fields}).encode()
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Type: application/json\r\n"
                b"X-MiXeD-Case-Answer: yes\r\n"
                b"x-lower-answer: yes\r\n"
                b"Connection: keep-alive, X-Private-Answer\r\n"
                b"X-Private-Answer: hop\r\n"
                b"Keep-Alive: timeout=30\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            self.wfile.flush()


def recv_exact(f, n):
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


class WsEcho(socketserver.StreamRequestHandler):
    def handle(self):
        head = read_head(self.rfile)
        fields = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in head[1:])}
        if fields.get("upgrade", "").lower() != "websocket":
            self.wfile.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        accept = base64.b64encode(hashlib.sha1((fields["sec-websocket-key"] + WS_GUID).encode()).digest())
        self.wfile.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.wfile.flush()
        try:
            while True:
                b0, b1 = recv_exact(self.rfile, 2)
                op, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", recv_exact(self.rfile, 2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", recv_exact(self.rfile, 8))[0]
                mask = recv_exact(self.rfile, 4) if masked else b"\0\0\0\0"
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(recv_exact(self.rfile, n)))
                if op == 8:  # close: answer it
                    self.wfile.write(bytes([0x88, len(payload)]) + payload)
                    self.wfile.flush()
                    return
                if op in (1, 2):
                    self.wfile.write(frame(op, b"echo:" + payload))
                    self.wfile.flush()
        except (EOFError, ConnectionError):
            return


def frame(op, payload, mask=None):
    head = bytes([0x80 | op])
    m = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        head += mask
    return head + payload


def ws_handshake(addr, extra_headers):
    """Opens a WebSocket to addr with extra_headers (Host and routing);
    returns (socket, its reader, status line, lower-cased head, key)."""
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection(addr, timeout=20)
    s.sendall(
        (
            "GET /chat HTTP/1.1\r\n"
            f"{extra_headers}"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    f = s.makefile("rb")
    status = f.readline().decode()
    head = {}
    while True:
        line = f.readline().decode()
        if line in ("\r\n", ""):
            break
        k, v = line.split(":", 1)
        head[k.strip().lower()] = v.strip()
    return s, f, status, head, key


def ws_recv(f):
    """One unmasked frame from the server: (opcode, payload)."""
    b0, b1 = f.read(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(f.read(2), "big")
    elif n == 127:
        n = int.from_bytes(f.read(8), "big")
    return b0 & 0x0F, f.read(n)


def envd_request(sandbox):
    """The base URL and headers the SDK itself uses for agent requests."""
    cfg = sandbox.connection_config
    headers = dict(cfg.sandbox_headers)
    headers["Novita-Sandbox-Id"] = sandbox.sandbox_id
    headers["Novita-Sandbox-Port"] = str(cfg.envd_port)
    headers["X-Access-Token"] = sandbox._envd_access_token
    return sandbox.envd_api_url.rstrip("/"), headers


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    handler = {"echo-headers": EchoHeaders, "ws-echo": WsEcho}[kind]
    srv = Server(("127.0.0.1", port), handler)
    print("ready", flush=True)
    srv.serve_forever()
