"""Starts the code-interpreter server (rootfs/interpreter/stasis_interpreter.py)
on the host on the SDK's JUPYTER_PORT and hands the tests a real
novita-sandbox code-interpreter `Sandbox` object whose `run_code` and context
calls go to it (debug mode: the SDK addresses `localhost:49999`)."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from packaging.version import Version

from novita_sandbox.code_interpreter import Sandbox
from novita_sandbox.core.connection_config import ConnectionConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "rootfs", "interpreter", "stasis_interpreter.py")
PORT = 49999


def _wait_port(port, proc, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"interpreter server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"interpreter server did not listen on {port} within {limit}s")


@pytest.fixture(scope="session")
def server():
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
        raise RuntimeError(f"port {PORT} is already in use: the tests would talk to someone else's server")
    except OSError:
        pass
    home = tempfile.mkdtemp(prefix="stasis-interp-home-")
    log = open(os.path.join(home, "server.log"), "w")
    env = dict(os.environ, HOME=home)
    proc = subprocess.Popen(
        [sys.executable, SERVER, "--host", "127.0.0.1", "--port", str(PORT), "--cwd", home],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        _wait_port(PORT, proc)
        yield {"proc": proc, "home": home, "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        with open(log.name) as f:
            sys.stderr.write("---- interpreter server log ----\n" + f.read()[-4000:])


@pytest.fixture
def sbx(server):
    cfg = ConnectionConfig(debug=True, api_key="unused", request_timeout=120)
    return Sandbox(
        sandbox_id="interpreter-host-test",
        sandbox_domain=None,
        envd_version=Version("0.5.7"),
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=cfg,
    )
