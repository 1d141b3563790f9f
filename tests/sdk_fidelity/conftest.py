"""Fixtures for the SDK-fidelity tests. `run.sh` starts `stasis serve
--backend fake` with an `agent` template and exports NOVITA_API_URL,
NOVITA_SANDBOX_URL (the server itself) and NOVITA_API_KEY."""

import os
import time

import httpx
import pytest

from novita_sandbox.core import Sandbox

TEMPLATE = "agent"


def require(var):
    value = os.environ.get(var)
    if not value:
        pytest.exit(f"{var} is not set: run tests/sdk_fidelity/run.sh", returncode=2)
    return value


def wait_until(pred, secs=20.0, what="condition"):
    deadline = time.monotonic() + secs
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def api():
    """A raw HTTP client for the server's lifecycle API (with the API key)."""
    url = require("NOVITA_API_URL")
    key = require("NOVITA_API_KEY")
    with httpx.Client(base_url=url, headers={"X-API-KEY": key}, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def server_url():
    return require("NOVITA_API_URL")


@pytest.fixture
def sandbox():
    """A secured (the SDK's default) agent sandbox, killed afterwards."""
    require("NOVITA_API_URL")
    sbx = Sandbox.create(template=TEMPLATE, timeout=300)
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


@pytest.fixture
def root(sandbox):
    """The sandbox's home directory (the commands' default working directory)."""
    r = sandbox.commands.run("pwd")
    assert r.exit_code == 0
    return r.stdout.strip()
