"""Issue 15: an upgraded (WebSocket) connection through the proxy when its
sandbox pauses."""

import os

from novita_sandbox.core import Sandbox

from conftest import wait_until
from sandbox_servers import frame
from test_proxy import routing, server_addr, start, ws_handshake, ws_recv


def test_websocket_is_closed_when_its_sandbox_pauses(sandbox, server_url):
    """An upgraded connection through the proxy ends when its sandbox is
    paused (it cannot be carried across a snapshot); the client sees the
    end of the stream, not a connection that hangs. After the resume a new
    connection echoes again."""
    port, _ = start(sandbox, "ws-echo")
    addr = server_addr(server_url)
    extra = f"Host: {addr[0]}:{addr[1]}\r\n{routing(sandbox, port)}"

    def up():
        s, _, status, _, _ = ws_handshake(addr, extra)
        s.close()
        return status.startswith("HTTP/1.1 101")

    wait_until(up, what="the WebSocket server in the sandbox")
    s, f, status, _, _ = ws_handshake(addr, extra)
    try:
        assert status.startswith("HTTP/1.1 101"), status
        s.sendall(frame(1, b"before", mask=os.urandom(4)))
        assert ws_recv(f) == (1, b"echo:before")
        sandbox.beta_pause()
        # Bounded: a connection left open would hit this timeout and fail.
        s.settimeout(30)
        try:
            rest = f.read()
        except ConnectionResetError:
            rest = b""
        # The stream ended: nothing, or at most a close frame, came after.
        assert rest == b"" or rest[0] & 0x0F == 8, rest[:20]
    finally:
        s.close()
    Sandbox.connect(sandbox.sandbox_id)
    wait_until(up, what="the WebSocket server after the resume")
