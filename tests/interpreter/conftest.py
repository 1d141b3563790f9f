"""Starts the code-interpreter server (rootfs/interpreter/stasis_interpreter.py)
on the host on the SDK's JUPYTER_PORT and hands the tests a real
novita-sandbox code-interpreter `Sandbox` object whose `run_code` and context
calls go to it (debug mode: the SDK addresses `localhost:49999`)."""

import pytest
from packaging.version import Version

from interp_server import interpreter_server
from novita_sandbox.code_interpreter import Sandbox
from novita_sandbox.core.connection_config import ConnectionConfig


@pytest.fixture(scope="session")
def server():
    with interpreter_server("stasis-interp-home-") as s:
        yield s


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
