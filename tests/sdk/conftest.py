"""Fixtures for the SDK tests. `run.sh` starts the main server and exports
NOVITA_API_URL / NOVITA_API_KEY; tests that need a differently configured
server (short retention) start their own from STASIS_BIN."""

import gc
import os
import subprocess
import tempfile
import time

import httpx
import pytest


def _require(var):
    value = os.environ.get(var)
    if not value:
        pytest.exit(f"{var} is not set: run tests/sdk/run.sh", returncode=2)
    return value


@pytest.fixture(autouse=True)
def no_collection_inside_the_sdk():
    """Cyclic garbage collection only between tests.

    A server-stream generator the SDK leaves behind (a background command's
    event stream, `call_server_stream`) sits in a reference cycle; if the
    collector finalizes it while this thread is inside httpcore's
    `ConnectionPool.handle_request` (holding the pool's non-reentrant lock),
    the generator's close takes that lock again and the test hangs for ever
    (seen: 1 run in 4 under load, a futex wait with no request sent; gdb's
    py-bt shows `Garbage-collecting` -> `PoolByteStream.close` ->
    `_optional_thread_lock`). Collecting here, between tests, where no lock
    is held, closes such streams safely."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture(scope="session")
def api():
    """A raw HTTP client for the same server, to read `stasis.guestRound`."""
    url = _require("NOVITA_API_URL")
    key = _require("NOVITA_API_KEY")
    with httpx.Client(base_url=url, headers={"X-API-KEY": key}, timeout=30) as c:
        yield c


def guest_round(api, sandbox_id):
    """The guest's completed rounds; -1 before a freshly booted guest has
    published any progress."""
    r = api.get(f"/sandboxes/{sandbox_id}")
    assert r.status_code == 200, r.text
    value = r.json()["stasis"]["guestRound"]
    return -1 if value is None else value


def wait_until(pred, secs=20.0, what="condition"):
    deadline = time.monotonic() + secs
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def server_factory():
    """Starts extra `stasis serve` processes; yields a function returning
    (api_url, api_key)."""
    procs = []
    dirs = []

    def start(*extra):
        binary = _require("STASIS_BIN")
        d = tempfile.mkdtemp(prefix="stasis-sdk-")
        dirs.append(d)
        key = "sdk-test-key"
        log = open(os.path.join(d, "server.log"), "w")
        p = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0",
             "--backend", os.environ.get("STASIS_BACKEND", "vm"),
             "--data-dir", os.path.join(d, "data"), "--api-key", key, *extra],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
        procs.append(p)
        line = p.stdout.readline().strip()
        prefix = "stasis: listening on "
        assert line.startswith(prefix), f"server did not start: {line!r}"
        return line[len(prefix):], key

    yield start
    for p in procs:
        p.kill()
        p.wait()
