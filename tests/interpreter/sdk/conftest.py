"""Starts `stasis serve --backend fake` with a sandbox domain and its TLS
listener, as a self-hosted user runs it, and points the real novita-sandbox
SDK at it exactly as such a user's code does: NOVITA_API_URL and
NOVITA_API_KEY for the API, and for everything inside sandboxes the SDK's own
`https://{port}-{sandboxId}.{domain}` addresses, trusted through
SSL_CERT_FILE (stasis's CA).

The one stand-in is DNS: instead of a wildcard record `*.sandbox.test`
pointing at the server, getaddrinfo is patched in this process to answer
that name with the TLS listener's address (a random 127.x.y.z:443, so runs
on one machine never collide)."""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

DOMAIN = "sandbox.test"
SEED = int(os.environ.get("STASIS_TEST_SEED", random.randrange(1 << 30)))
print(f"[conftest] STASIS_TEST_SEED={SEED}", file=sys.stderr)
_rng = random.Random(SEED)
TLS_IP = f"127.{_rng.randrange(1, 255)}.{_rng.randrange(1, 255)}.{_rng.randrange(2, 255)}"

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, *args, **kwargs):
    if isinstance(host, str) and (host == DOMAIN or host.endswith("." + DOMAIN)):
        host = TLS_IP
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo


def _read_listen_lines(proc, want, limit=60.0):
    """Reads the server's stdout until it printed `want` listening lines."""
    lines = []
    deadline = time.monotonic() + limit
    while len(lines) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"stasis serve printed only {lines} within {limit}s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stasis serve exited ({proc.wait()}) after {lines}")
        if "listening on" in line:
            lines.append(line.strip())
    return lines


@pytest.fixture(scope="session")
def stasis():
    binary = os.environ["STASIS_BIN"]
    work = tempfile.mkdtemp(prefix="stasis-ci-sdk-")
    data = os.path.join(work, "data")
    os.makedirs(os.path.join(data, "templates"))
    # code-interpreter-v1 on the fake backend: the host agent, running the
    # code-interpreter server with this very Python (it has jupyter-client).
    with open(os.path.join(data, "templates", "code-interpreter-v1.json"), "w") as f:
        f.write('{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true, "interpreter": true}')
    key = f"ci-sdk-{SEED}"
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen(
        [binary, "serve", "--backend", "fake", "--listen", "127.0.0.1:0", "--data-dir", data,
         "--api-key", key, "--domain", DOMAIN, "--tls-listen", f"{TLS_IP}:443",
         "--interpreter-python", sys.executable],
        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
    )
    try:
        lines = _read_listen_lines(proc, 2)
        api = re.search(r"http://(\S+)", lines[0]).group(1)
        ca = os.path.join(data, "tls", "ca.pem")
        assert os.path.exists(ca), lines
        env = {
            "NOVITA_API_URL": f"http://{api}",
            "NOVITA_API_KEY": key,
            "NOVITA_DOMAIN": DOMAIN,
            "SSL_CERT_FILE": ca,
        }
        for k in ("NOVITA_SANDBOX_URL", "NOVITA_DEBUG"):
            os.environ.pop(k, None)
        os.environ.update(env)
        yield {"api": api, "key": key, "ca": ca, "env": env, "work": work, "tls_ip": TLS_IP}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        with open(os.path.join(work, "server.log")) as f:
            sys.stderr.write("---- stasis server log (tail) ----\n" + f.read()[-6000:])
        if os.environ.get("KEEP_LOG") != "1":
            shutil.rmtree(work, ignore_errors=True)
