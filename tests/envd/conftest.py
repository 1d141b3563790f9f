"""Fixtures for the agent tests: the real novita-sandbox SDK's Sandbox
objects wired straight to a `stasis-envd --tcp` agent (no API server).
`tests/envd_sdk.rs` starts the agent and exports ENVD_URL (its address),
ENVD_ROOT (its --root: home and default cwd) and ENVD_VERSION."""

import os

import pytest
from packaging.version import Version

from novita_sandbox.core.connection_config import ConnectionConfig
from novita_sandbox.core.sandbox_async.main import AsyncSandbox
from novita_sandbox.core.sandbox_sync.main import Sandbox


def _require(var):
    value = os.environ.get(var)
    if not value:
        pytest.exit(f"{var} is not set: run through tests/envd_sdk.rs", returncode=2)
    return value


def _opts():
    url = _require("ENVD_URL")
    return dict(
        sandbox_id="envd-test",
        sandbox_domain=None,
        envd_version=Version(_require("ENVD_VERSION")),
        envd_access_token=None,
        traffic_access_token=None,
        connection_config=ConnectionConfig(sandbox_url=url, api_key="unused", request_timeout=30),
    )


@pytest.fixture(scope="session")
def root():
    return _require("ENVD_ROOT")


@pytest.fixture(scope="session")
def sbx():
    """A sync Sandbox whose commands/files talk to the agent."""
    return Sandbox(**_opts())


@pytest.fixture
def make_async():
    """Makes an AsyncSandbox (inside a running event loop)."""
    return lambda: AsyncSandbox(**_opts())
