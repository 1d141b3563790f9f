"""The SDK's network controls against `stasis serve` (fake backend, the
`agent` template run.sh writes): `allow_internet_access`, `network`
(`allow_out`, `deny_out`, `allow_public_traffic`, `mask_request_host`) at
create, `set_network` while running and while paused, the traffic access
token the SDK gets back and the proxy's enforcement of it on user ports.
Egress enforcement itself (nftables) is proven in tests/network.rs."""

import http.server
import os
import threading

import httpx
import pytest

from novita_sandbox.core import Sandbox, SandboxState

TEMPLATE = "agent"


def _echo_server():
    """A "user process" on a host port (the fake backend's host agent
    forwards to 127.0.0.1): answers with the Host it saw."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"host={self.headers.get('Host')}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_network_controls_through_the_sdk(api):
    if not os.path.exists(os.path.join(os.environ.get("STASIS_DATA_DIR", ""), "templates", f"{TEMPLATE}.json")):
        pytest.fail("no agent template: run through tests/sdk/run.sh with STASIS_BACKEND=fake")
    # A bad CIDR is refused, naming it.
    with pytest.raises(Exception) as bad:
        Sandbox.create(template=TEMPLATE, network={"deny_out": ["10.0.0.0/33"]})
    assert "10.0.0.0/33" in str(bad.value)

    sbx = Sandbox.create(
        template=TEMPLATE,
        timeout=120,
        allow_internet_access=False,
        network={
            "allow_out": ["1.1.1.1"],
            "deny_out": ["8.8.8.0/24"],
            "allow_public_traffic": False,
            "mask_request_host": "${PORT}-masked.example.test",
        },
    )
    srv = _echo_server()
    try:
        token = sbx.traffic_access_token
        assert token and len(token) == 32
        d = api.get(f"/sandboxes/{sbx.sandbox_id}").json()
        assert d["allowInternetAccess"] is False
        assert d["network"]["allowOut"] == ["1.1.1.1"]
        assert d["network"]["denyOut"] == ["8.8.8.0/24"]
        assert d["network"]["allowPublicTraffic"] is False

        # User ports need the token; the sandbox sees the masked Host.
        port = srv.server_address[1]
        host = f"{port}-{sbx.sandbox_id}.example.test"
        url = str(api.base_url)
        r = httpx.get(url, headers={"Host": host})
        assert r.status_code == 403, r.text
        r = httpx.get(url, headers={"Host": host, "E2B-Traffic-Access-Token": token})
        assert r.status_code == 200, r.text
        assert r.text == f"host={port}-masked.example.test"

        # Runtime change, then a bad one (refused, nothing changes).
        sbx.set_network(deny_out=["9.9.9.9"])
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").json()["network"]["denyOut"] == ["9.9.9.9"]
        with pytest.raises(Exception) as bad:
            sbx.set_network(allow_out=["300.0.0.1"])
        assert "300.0.0.1" in str(bad.value)
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").json()["network"]["allowOut"] == ["1.1.1.1"]

        # Paused: stored, and there after the resume.
        sbx.beta_pause()
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        Sandbox.set_network(sbx.sandbox_id, allow_out=["10.1.0.0/16"])
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.is_running()
        d = api.get(f"/sandboxes/{sbx.sandbox_id}").json()
        assert d["network"]["allowOut"] == ["10.1.0.0/16"]
        assert d["network"]["denyOut"] == ["9.9.9.9"]
        r = httpx.get(url, headers={"Host": host, "E2B-Traffic-Access-Token": token})
        assert r.status_code == 200, r.text
    finally:
        srv.shutdown()
        sbx.kill()
