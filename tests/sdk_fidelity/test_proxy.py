"""The proxy, as a client of a sandbox's server sees it: header names keep
their case and order both ways, hop-by-hop fields (RFC 9110 §7.6.1) are
not forwarded, `Via` is added, and WebSocket upgrades are proxied (an echo
server started in the sandbox through the SDK, reached in both addressing
forms)."""

import base64
import hashlib
import json
import os
import socket
import urllib.parse

import pytest

from conftest import wait_until
from sandbox_servers import WS_GUID, frame, ws_handshake, ws_recv  # noqa: F401 - ws_* for test_proxy_pause

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_addr(server_url):
    u = urllib.parse.urlsplit(server_url)
    return u.hostname, u.port


def start(sandbox, kind):
    with open(os.path.join(HERE, "sandbox_servers.py")) as f:
        sandbox.files.write("sandbox_servers.py", f.read())
    port = free_port()
    h = sandbox.commands.run(f"python3 sandbox_servers.py {kind} {port}", background=True)
    return port, h


def read_response(f):
    status = f.readline().decode("latin-1").rstrip("\r\n")
    headers = []
    while True:
        line = f.readline().decode("latin-1")
        if line in ("\r\n", "\n", ""):
            break
        k, v = line.rstrip("\r\n").split(":", 1)
        headers.append((k, v.strip()))
    n = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = f.read(n) if n else b""
    return status, headers, body


def raw_exchange(addr, request: bytes):
    with socket.create_connection(addr, timeout=20) as s:
        s.sendall(request)
        f = s.makefile("rb")
        return read_response(f)


def routing(sandbox, port):
    return f"Novita-Sandbox-Id: {sandbox.sandbox_id}\r\nNovita-Sandbox-Port: {port}\r\n"


def test_header_case_order_and_hop_by_hop(sandbox, server_url):
    port, _ = start(sandbox, "echo-headers")
    addr = server_addr(server_url)
    probe = f"GET /ready HTTP/1.1\r\nHost: x\r\n{routing(sandbox, port)}Content-Length: 0\r\n\r\n".encode()
    wait_until(lambda: raw_exchange(addr, probe)[0].startswith("HTTP/1.1 200"), what="the sandbox's server")

    request = (
        "POST /echo?q=1 HTTP/1.1\r\n"
        "Host: example.test\r\n"
        f"{routing(sandbox, port)}"
        "X-CamelCase-Header: 1\r\n"
        "x-lower: 2\r\n"
        "Connection: keep-alive, X-Drop-Me\r\n"
        "X-UPPER-CASE: 3\r\n"
        "X-Drop-Me: private to this hop\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers, deflate\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Upgrade: h2c\r\n"
        "Trailer: X-Checksum\r\n"
        "Content-Type: text/plain\r\n"
        "X-After: 4\r\n"
        "Content-Length: 5\r\n"
        "\r\n"
        "hello"
    ).encode()
    status, headers, body = raw_exchange(addr, request)
    assert status.startswith("HTTP/1.1 200"), (status, body)
    seen = json.loads(body)
    assert seen["request_line"] == "POST /echo?q=1 HTTP/1.1"
    names = [k for k, _ in seen["headers"]]
    ours = [n for n in names if n.lower().startswith("x-") or n.lower() == "content-type"]
    # Case and order as sent; the field Connection named is gone.
    assert ours == ["X-CamelCase-Header", "x-lower", "X-UPPER-CASE", "Content-Type", "X-After"], names
    lower = [n.lower() for n in names]
    for hop in ("connection", "keep-alive", "proxy-authorization", "proxy-connection", "upgrade", "trailer",
                "x-drop-me"):
        assert hop not in lower, (hop, seen["headers"])
    assert dict((k.lower(), v) for k, v in seen["headers"])["te"] == "trailers"
    assert ("Host", "example.test") in [tuple(h) for h in seen["headers"]]
    assert any(k.lower() == "via" and "stasis" in v for k, v in seen["headers"])

    # The answer: names as the sandbox's server wrote them, its hop-by-hop
    # fields dropped.
    resp_names = [k for k, _ in headers]
    assert "X-MiXeD-Case-Answer" in resp_names and "x-lower-answer" in resp_names, resp_names
    assert resp_names.index("X-MiXeD-Case-Answer") < resp_names.index("x-lower-answer")
    assert "X-Private-Answer" not in resp_names and "Keep-Alive" not in resp_names, resp_names


@pytest.mark.parametrize("form", ["headers", "host"])
def test_websocket_echo_through_the_proxy(sandbox, server_url, form):
    port, _ = start(sandbox, "ws-echo")
    addr = server_addr(server_url)
    if form == "headers":
        extra = f"Host: {addr[0]}:{addr[1]}\r\n{routing(sandbox, port)}"
    else:
        extra = f"Host: {port}-{sandbox.sandbox_id}.stasis.test\r\n"

    def up():
        s, _, status, _, _ = ws_handshake(addr, extra)
        s.close()
        return status.startswith("HTTP/1.1 101")

    wait_until(up, what="the WebSocket server in the sandbox")
    s, f, status, head, key = ws_handshake(addr, extra)
    try:
        assert status.startswith("HTTP/1.1 101"), status
        assert head["upgrade"].lower() == "websocket" and "upgrade" in head["connection"].lower()
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert head["sec-websocket-accept"] == want
        for i, msg in enumerate([b"hello", b"x" * 300, os.urandom(70000)]):
            op = 1 if i < 2 else 2
            s.sendall(frame(op, msg, mask=os.urandom(4)))
            got_op, payload = ws_recv(f)
            assert (got_op, payload) == (op, b"echo:" + msg)
        s.sendall(frame(8, b"\x03\xe8", mask=os.urandom(4)))
        assert ws_recv(f)[0] == 8
    finally:
        s.close()
