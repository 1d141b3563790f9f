"""Issue 5's proof, through the real novita-sandbox SDK: a Linux sandbox runs
a command, keeps a file and a background process with state in memory across
a pause and a resume, and is killed.

With STASIS_PROOF_NET=1 (the server's sandboxes have networking behind
tests/nested/fake-internet.sh's namespaces: `--sandbox-uplink-netns` and
`--sandbox-dns 203.0.113.1`) the same run also proves issue 11 in a real
guest: it reaches the fake internet's web server by address and by DNS name
(the resolver the kernel's `ip=` gave it), through the NAT; `set_network`
denyOut blocks one network and not another and is lifted again at runtime;
the guest's throughput and request latency are measured (`PROOF: NET` lines);
after the resume (a fresh worker) the first request is timed; a second
sandbox created with `allow_internet_access=False` reaches nothing, and the
two sandboxes cannot reach each other. And issue 15 where it touches the
guest: the SDK's signed `download_url`/`upload_url` reach the guest's agent
(a tampered signature is refused), `get_metrics()` returns samples of the VM,
the logs route returns the guest's console lines, the guest's agent behaves
as E2B's envd (remove of a missing path succeeds, directory modes without
the type bit, gzip request bodies in both upload forms, gzip responses, a
malformed gzip body 400 with no file left), and a WebSocket echo server in
the guest answers through the proxy.

Run by tests/linux_sdk.rs as the client of tests/nested/run-l1.sh's `serve`
scenario (stasis serve with a Linux template inside an emulated machine; its
port forwarded to this host), or against any `stasis serve --kernel K
--rootfs R` on a host whose KVM runs Linux guests:

    NOVITA_API_URL=http://127.0.0.1:3000 NOVITA_SANDBOX_URL=http://127.0.0.1:3000 \\
    NOVITA_API_KEY=KEY target/sdk-venv/bin/python -m pytest -s tests/nested/test_linux_sdk.py

Timings go to stdout as lines starting with "PROOF:". Nested emulation is slow
(a guest boot takes tens of seconds), so the request timeouts are generous;
STASIS_PROOF_REQUEST_TIMEOUT overrides them.

Evidence from outside stasis: with STASIS_L1_QEMU_PID (set by run-l1.sh's
serve scenario) the proof also reports how much host CPU the emulated machine
(the QEMU process) got between the start of the resume and the agent's first
answer after it, from /proc on this host: a slow answer while QEMU got a small
share of a core is the emulated machine starved by the host, not stasis.
"""

import base64
import gzip
import hashlib
import json
import os
import shlex
import sys
import time
import urllib.parse
import uuid

import httpx
import pytest

from novita_sandbox import Sandbox
from novita_sandbox.core import FileType, SandboxQuery, SandboxState

# The fake backend's fidelity suite's sandbox-side servers (a WebSocket echo)
# and its frame writer, shared rather than copied.
SDK_FIDELITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sdk_fidelity")
sys.path.insert(0, SDK_FIDELITY)
from sandbox_servers import WS_GUID, envd_request, frame, ws_handshake, ws_recv  # noqa: E402

REQUEST_TIMEOUT = float(os.environ.get("STASIS_PROOF_REQUEST_TIMEOUT", "300"))
TEMPLATE = os.environ.get("STASIS_PROOF_TEMPLATE", "base")

FILE = "/home/user/proof.txt"
FILE_TEXT = "written through the SDK before the pause\n"
COUNTER = "/tmp/counter"
# The counter n lives only in this shell's memory; each tick it publishes n
# to a file (atomically, through a rename) for the test to read.
COUNTER_CMD = (
    "n=0; while true; do n=$((n + 1)); echo $n > /tmp/counter.new; "
    "mv /tmp/counter.new /tmp/counter; sleep 0.5; done"
)
# The same with a Python variable, where the image has python3 (the
# `--python` template); STASIS_PROOF_PYTHON=1 makes it required.
PY_COUNTER = "/tmp/pycounter"
PY_SCRIPT = """import os, time
n = 0
while True:
    n += 1
    with open("/tmp/pycounter.new", "w") as f:
        f.write(str(n))
    os.replace("/tmp/pycounter.new", "/tmp/pycounter")
    time.sleep(0.5)
"""
REQUIRE_PYTHON = os.environ.get("STASIS_PROOF_PYTHON") == "1"
# Issue 11 and 15's checks (see the module's doc).
NET = os.environ.get("STASIS_PROOF_NET") == "1"
# The fake internet (tests/nested/fake-internet.sh).
INET = "203.0.113.1"
INET_B = "198.51.100.1"
UPLINK = "203.0.113.2"
INET_NAME = "files.example.test"
HELLO = "hello from the fake internet\n"
BENCH_REQUESTS = int(os.environ.get("STASIS_PROOF_NET_REQUESTS", "20"))
BENCH_MIB = int(os.environ.get("STASIS_PROOF_NET_MIB", "8"))
# The size of the fake internet's /blob (fake-internet.sh's BLOB_MIB default).
BLOB_MIB = 8
# A blocked connection is dropped: a request gives up after this long.
BLOCKED_TIMEOUT_S = "5"
# The guest side of the network checks: prints one JSON object.
NET_PROBE_PATH = "/home/user/netprobe.py"
NET_PROBE = r"""import json, socket, sys, time, urllib.request


def get(url, timeout):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            status = r.status
        return {"ok": True, "status": status, "bytes": len(body),
                "body": body[:200].decode(errors="replace"), "secs": time.monotonic() - t}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "secs": time.monotonic() - t}


cmd = sys.argv[1]
if cmd == "get":
    out = get(sys.argv[2], float(sys.argv[3]))
elif cmd == "until":
    url, limit = sys.argv[2], float(sys.argv[3])
    t0, n = time.monotonic(), 0
    while True:
        n += 1
        out = get(url, 2)
        if out["ok"] or time.monotonic() - t0 > limit:
            break
        time.sleep(0.1)
    out.update(attempts=n, total=time.monotonic() - t0)
elif cmd == "bench":
    host, n, mib = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    lat = []
    for _ in range(n):
        r = get(f"http://{host}:8080/hello.txt", 30)
        if not r["ok"]:
            print(json.dumps(r))
            sys.exit(0)
        lat.append(r["secs"])
    chunk = bytes(1 << 20)
    t = time.monotonic()
    s = socket.create_connection((host, 9000), timeout=120)
    for _ in range(mib):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):  # the sink closes once it has read everything
        pass
    s.close()
    up = time.monotonic() - t
    d = get(f"http://{host}:8080/blob", 300)
    out = {"ok": d["ok"], "error": d.get("error"), "latency": sorted(lat), "up_secs": up,
           "mib": mib, "down_secs": d["secs"], "down_bytes": d.get("bytes")}
else:
    out = {"ok": False, "error": f"unknown probe {cmd}"}
print(json.dumps(out))
"""


def proof(msg):
    print(f"PROOF: {msg}", flush=True)


def qemu_cpu_s():
    """CPU seconds (user + system) the L1 QEMU process used so far, or None."""
    pid = os.environ.get("STASIS_L1_QEMU_PID")
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def timed(what, fn):
    t = time.monotonic()
    result = fn()
    secs = time.monotonic() - t
    proof(f"{what}: {secs:.2f} s")
    return result, secs


def wait_until(pred, secs, what):
    """Polls pred until it returns a truthy value or secs pass."""
    deadline = time.monotonic() + secs
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {secs} s waiting for {what}")
        time.sleep(0.2)


def read_counter(sbx, path=COUNTER):
    text = sbx.files.read(path, request_timeout=REQUEST_TIMEOUT).strip()
    assert text.isdigit(), f"{path} holds {text!r}, not a number"
    return int(text)


def counter_passes(sbx, value, path=COUNTER, secs=120):
    """Waits for the counter in path to go past value; returns the new value."""
    return wait_until(
        lambda: (lambda v: v if v > value else None)(read_counter(sbx, path)),
        secs,
        f"{path} to go past {value}",
    )


def api_client():
    return httpx.Client(
        base_url=os.environ["NOVITA_API_URL"],
        headers={"X-API-KEY": os.environ["NOVITA_API_KEY"]},
        timeout=REQUEST_TIMEOUT,
    )


def probe(sbx, *args):
    """Runs the network probe in the guest; its JSON answer."""
    r = sbx.commands.run(
        "python3 " + " ".join(shlex.quote(a) for a in (NET_PROBE_PATH, *args)),
        timeout=REQUEST_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def must_get(sbx, url, what):
    r = probe(sbx, "get", url, "60")
    assert r["ok"], f"{what}: GET {url} from the guest failed: {r}"
    return r


def must_not_get(sbx, url, what):
    r = probe(sbx, "get", url, BLOCKED_TIMEOUT_S)
    assert not r["ok"], f"{what}: GET {url} from the guest should have failed: {r}"
    return r


def net_address(api, sid):
    d = api.get(f"/sandboxes/{sid}")
    assert d.status_code == 200, d.text
    return d.json()


def network_before_pause(sbx, api):
    """Issue 11 in a running guest; returns the guest's address."""
    sid = sbx.sandbox_id
    info = net_address(api, sid)
    addr = info["network"].get("address")
    assert addr and info["allowInternetAccess"] is True, info
    sbx.files.write(NET_PROBE_PATH, NET_PROBE, request_timeout=REQUEST_TIMEOUT)
    resolv = sbx.commands.run("cat /etc/resolv.conf", request_timeout=REQUEST_TIMEOUT).stdout
    assert f"nameserver {INET}" in resolv, f"/etc/resolv.conf: {resolv!r}"
    proof(f"NET guest address {addr} (gateway {info['network'].get('gateway')}); "
          f"/etc/resolv.conf from /proc/net/pnp: {resolv.strip()!r}")

    r = must_get(sbx, f"http://{INET}:8080/hello.txt", "by address")
    assert r["body"] == HELLO, r
    r = must_get(sbx, f"http://{INET_NAME}:8080/hello.txt", "by DNS name")
    assert r["body"] == HELLO, r
    r = must_get(sbx, f"http://{INET_B}:8080/cgi-bin/whoami", "the NAT")
    assert UPLINK in r["body"], f"the fake internet saw {r['body']!r}, not the uplink {UPLINK}"
    proof(f"NET the guest reached http://{INET}:8080 and http://{INET_NAME}:8080 (DNS through "
          f"the resolver from ip=); the server saw it as {r['body'].strip()!r} (masqueraded)")

    b = probe(sbx, "bench", INET, str(BENCH_REQUESTS), str(BENCH_MIB))
    assert b["ok"] and b["down_bytes"] == BLOB_MIB << 20, b
    lat = b["latency"]
    med = lat[len(lat) // 2]
    proof(f"NET (nested) request latency, {len(lat)} GETs each on a new TCP connection: "
          f"min {lat[0] * 1000:.1f} ms, median {med * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    proof(f"NET (nested) guest -> internet TCP: {b['mib']} MiB in {b['up_secs']:.2f} s = "
          f"{b['mib'] / b['up_secs']:.2f} MiB/s; internet -> guest (HTTP GET): "
          f"{b['down_bytes'] / 1048576:.0f} MiB in {b['down_secs']:.2f} s = "
          f"{b['down_bytes'] / 1048576 / b['down_secs']:.2f} MiB/s")

    # Runtime rules: deny one network, the other still answers; lifted again.
    sbx.set_network(deny_out=["203.0.113.0/24"], request_timeout=REQUEST_TIMEOUT)
    assert net_address(api, sid)["network"]["denyOut"] == ["203.0.113.0/24"]
    blocked = must_not_get(sbx, f"http://{INET}:8080/hello.txt", "denyOut 203.0.113.0/24")
    r = must_get(sbx, f"http://{INET_B}:8080/hello.txt", "not in denyOut")
    sbx.set_network(deny_out=[], request_timeout=REQUEST_TIMEOUT)
    r = must_get(sbx, f"http://{INET}:8080/hello.txt", "denyOut lifted")
    proof(f"NET set_network(deny_out=['203.0.113.0/24']): {INET} blocked ({blocked['error']}), "
          f"{INET_B} still answers; set_network(deny_out=[]): {INET} answers again")
    return addr


def fidelity_checks(sbx, api):
    """Issue 15 where it touches the guest: signed URLs, metrics, logs."""
    sid = sbx.sandbox_id
    assert sbx._envd_access_token, "the SDK's default sandbox is secured"
    url = sbx.download_url(FILE)
    assert "signature=v1_" in url, url
    r = httpx.get(url, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200 and r.text == FILE_TEXT, (r.status_code, r.text)
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qs(parts.query)
    sig = q["signature"][0]
    q["signature"] = [sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")]
    tampered = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q, doseq=True)))
    r = httpx.get(tampered, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 401, (r.status_code, r.text)
    up_path = "/home/user/uploaded-via-signed-url.txt"
    up_text = "uploaded through the SDK's signed upload_url\n"
    r = httpx.post(sbx.upload_url(up_path), files={"file": ("x", up_text.encode())},
                   timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, (r.status_code, r.text)
    assert sbx.files.read(up_path, request_timeout=REQUEST_TIMEOUT) == up_text
    proof("FIDELITY signed download_url and upload_url reach the guest's agent; "
          "a tampered signature: 401")

    metrics = wait_until(lambda: sbx.get_metrics(request_timeout=REQUEST_TIMEOUT), 120,
                         "metrics of the VM sandbox")
    m = metrics[-1]
    assert m.cpu_count >= 1 and 0 <= m.cpu_used_pct <= 100, m
    assert m.mem_total > 0 and m.mem_used > 0 and m.disk_total > 0, m
    proof(f"FIDELITY get_metrics(): {len(metrics)} sample(s), last: {m.cpu_count} CPU, "
          f"{m.cpu_used_pct:.1f} %, memory {m.mem_used >> 20}/{m.mem_total >> 20} MiB, "
          f"disk {m.disk_used >> 20}/{m.disk_total >> 20} MiB")

    marker = f"STASIS-CONSOLE-MARKER-{uuid.uuid4().hex[:12]}"
    sbx.commands.run(f"echo {marker} >/dev/console", user="root", request_timeout=REQUEST_TIMEOUT)

    def marker_lines():
        r = api.get(f"/v2/sandboxes/{sid}/logs", params={"search": marker})
        assert r.status_code == 200, r.text
        return [e["message"] for e in r.json()["logs"] if marker in e["message"]] or None

    wait_until(marker_lines, 60, f"{marker} in the sandbox's logs")
    r = api.get(f"/sandboxes/{sid}/logs", params={"limit": 1000})
    assert r.status_code == 200, r.text
    lines = [l["line"] for l in r.json()["logs"]]
    boot = [l for l in lines if "Linux version" in l]
    assert boot, f"no kernel boot line among the first {len(lines)} log lines: {lines[:5]}"
    proof(f"FIDELITY logs: the guest's console, from {boot[0].strip()[:60]!r} (v1, first page) "
          f"to a marker echoed to /dev/console (v2 search)")
    agent_behaviours(sbx)
    websocket_echo(sbx)


def agent_behaviours(sbx):
    """Issue 15's agent behaviours, by the guest's own agent: remove of a
    missing path succeeds, a directory's mode carries no type bit, gzip
    request bodies (both upload forms) and gzip responses."""
    rt = REQUEST_TIMEOUT
    sbx.files.remove("/home/user/no/such/file", request_timeout=rt)
    sbx.files.write("/home/user/gone.txt", "x", request_timeout=rt)
    sbx.files.remove("/home/user/gone.txt", request_timeout=rt)
    sbx.files.remove("/home/user/gone.txt", request_timeout=rt)
    assert not sbx.files.exists("/home/user/gone.txt", request_timeout=rt)

    r = sbx.commands.run("mkdir -p /home/user/d/sub && chmod 755 /home/user/d && chmod 1777 /home/user/d/sub",
                         request_timeout=rt)
    assert r.exit_code == 0, r
    info = sbx.files.get_info("/home/user/d", request_timeout=rt)
    assert info.type == FileType.DIR and info.mode == 0o755, (info.type, oct(info.mode))
    assert info.permissions == "drwxr-xr-x", info.permissions
    sub = {e.name: e for e in sbx.files.list("/home/user/d", request_timeout=rt)}["sub"]
    assert sub.mode == 0o777 and sub.permissions == "dtrwxrwxrwx", (oct(sub.mode), sub.permissions)

    data = (b"stasis gzip round trip in a Linux guest " * 4000) + bytes(range(256))
    path = "/home/user/gz-octet.bin"
    sbx.files.write(path, data, gzip=True, use_octet_stream=True, request_timeout=rt)
    assert bytes(sbx.files.read(path, format="bytes", request_timeout=rt)) == data
    assert bytes(sbx.files.read(path, format="bytes", gzip=True, request_timeout=rt)) == data
    url, headers = envd_request(sbx)
    boundary = uuid.uuid4().hex
    multi = "/home/user/gz-multi.bin"
    mp = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{multi}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(f"{url}/files", content=gzip.compress(mp), timeout=rt,
                   headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}",
                            "Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()[0]["path"] == multi, (r.status_code, r.text)
    r = sbx.commands.run(f"sha256sum {multi}", request_timeout=rt)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest(), r.stdout
    r = httpx.post(f"{url}/files", params={"path": "/home/user/bad.bin"}, content=b"not gzip at all",
                   timeout=rt, headers={**headers, "Content-Type": "application/octet-stream",
                                        "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["message"], (r.status_code, r.text)
    assert not sbx.files.exists("/home/user/bad.bin", request_timeout=rt)
    r = httpx.get(f"{url}/files", params={"path": path}, timeout=rt,
                  headers={**headers, "Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip", (r.status_code, r.headers)
    assert r.content == data
    proof(f"FIDELITY agent: remove of a missing path succeeds; directory mode {oct(info.mode)} "
          f"({info.permissions}); gzip uploads (octet-stream, multipart) and a gzip download of "
          f"{len(data)} bytes round-trip; a malformed gzip body: 400, no file")


def websocket_echo(sbx):
    """Issue 15's WebSocket through the proxy to a server in the Linux guest
    (the fidelity suite's RFC 6455 echo server, started through the SDK)."""
    port = 8765
    with open(os.path.join(SDK_FIDELITY, "sandbox_servers.py")) as f:
        sbx.files.write("/home/user/sandbox_servers.py", f.read(), request_timeout=REQUEST_TIMEOUT)
    sbx.commands.run(f"python3 /home/user/sandbox_servers.py ws-echo {port}", background=True, timeout=0,
                     request_timeout=REQUEST_TIMEOUT)
    u = urllib.parse.urlsplit(os.environ["NOVITA_SANDBOX_URL"])
    addr = (u.hostname, u.port or 80)

    routing = (f"Host: {addr[0]}:{addr[1]}\r\nNovita-Sandbox-Id: {sbx.sandbox_id}\r\n"
               f"Novita-Sandbox-Port: {port}\r\n")

    def handshake():
        return ws_handshake(addr, routing)

    def up():
        s, _, status, _, _ = handshake()
        s.close()
        return status.startswith("HTTP/1.1 101")

    wait_until(up, 120, "the WebSocket server in the guest")
    s, f, status, head, key = handshake()
    try:
        assert status.startswith("HTTP/1.1 101"), status
        want = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert head["sec-websocket-accept"] == want, head
        for op, msg in ((1, b"hello"), (1, b"x" * 300), (2, os.urandom(70000))):
            s.sendall(frame(op, msg, mask=os.urandom(4)))
            assert ws_recv(f) == (op, b"echo:" + msg)
        s.sendall(frame(8, b"\x03\xe8", mask=os.urandom(4)))
        assert ws_recv(f)[0] == 8
    finally:
        s.close()
    proof(f"FIDELITY a WebSocket through the proxy to port {port} in the guest: 101, text and "
          f"70000-byte binary frames echoed, closed cleanly")


def no_internet_and_isolation(first, api):
    """A sandbox created with allow_internet_access=False reaches nothing;
    `first` (internet allowed) cannot reach it either."""
    t = time.monotonic()
    other = Sandbox.create(template=TEMPLATE, timeout=600, allow_internet_access=False,
                           request_timeout=REQUEST_TIMEOUT)
    try:
        info = net_address(api, other.sandbox_id)
        assert info["allowInternetAccess"] is False, info
        addr = info["network"]["address"].split("/")[0]
        other.files.write(NET_PROBE_PATH, NET_PROBE, request_timeout=REQUEST_TIMEOUT)
        must_not_get(other, f"http://{INET}:8080/hello.txt", "allow_internet_access=False")
        must_not_get(other, f"http://{INET_B}:8080/hello.txt", "allow_internet_access=False")
        # A server in the second sandbox answers there, not from the first.
        other.commands.run("python3 -m http.server --bind 0.0.0.0 8000", background=True,
                           timeout=0, cwd="/home/user", request_timeout=REQUEST_TIMEOUT)
        r = probe(other, "until", "http://127.0.0.1:8000/", "60")
        assert r["ok"], f"the second sandbox's own server does not answer: {r}"
        r = must_not_get(first, f"http://{addr}:8000/", "one sandbox to another")
        proof(f"NET allow_internet_access=False: a second sandbox ({addr}) reaches neither "
              f"{INET} nor {INET_B}; the first cannot reach its server ({r['error']}) "
              f"[{time.monotonic() - t:.1f} s with its create]")
    finally:
        Sandbox.kill(other.sandbox_id, request_timeout=REQUEST_TIMEOUT)


def first_tick(sbx, path):
    return wait_until(
        lambda: sbx.files.exists(path, request_timeout=REQUEST_TIMEOUT) and read_counter(sbx, path),
        120,
        f"the first tick in {path}",
    )


@pytest.fixture
def sandbox():
    for var in ("NOVITA_API_URL", "NOVITA_SANDBOX_URL", "NOVITA_API_KEY"):
        assert os.environ.get(var), f"{var} is not set"
    sbx, _ = timed(
        f"create a Linux sandbox (template {TEMPLATE!r})",
        lambda: Sandbox.create(template=TEMPLATE, timeout=3600, request_timeout=REQUEST_TIMEOUT),
    )
    proof(f"sandbox {sbx.sandbox_id}")
    yield sbx
    # Kill it whatever happened (the test kills it itself on success).
    try:
        Sandbox.kill(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - best effort cleanup
        print(f"cleanup: kill {sbx.sandbox_id}: {e}")


def test_linux_sandbox_keeps_files_processes_and_memory_across_pause(sandbox):
    sbx = sandbox

    # A command runs in a real Linux guest.
    r, _ = timed(
        "first command",
        lambda: sbx.commands.run("uname -sr; id -un; echo hello from $(hostname)",
                                 timeout=REQUEST_TIMEOUT, request_timeout=REQUEST_TIMEOUT),
    )
    proof(f"command output: {r.stdout.strip()!r} exit {r.exit_code}")
    assert r.exit_code == 0, r
    assert r.stdout.splitlines()[0].startswith("Linux "), r.stdout
    assert "hello from" in r.stdout, r.stdout

    # A file, and a background process whose state lives in its memory.
    sbx.files.write(FILE, FILE_TEXT, request_timeout=REQUEST_TIMEOUT)
    assert sbx.files.read(FILE, request_timeout=REQUEST_TIMEOUT) == FILE_TEXT
    # timeout=0: no limit (the agent ends commands after 60 s by default).
    handle = sbx.commands.run(COUNTER_CMD, background=True, timeout=0,
                              request_timeout=REQUEST_TIMEOUT)
    pid = handle.pid
    proof(f"background counter started, pid {pid}")
    first = first_tick(sbx, COUNTER)
    before = counter_passes(sbx, first)
    proof(f"counter advancing before the pause: {first} -> {before}")

    has_python = sbx.commands.run("command -v python3 || true",
                                  request_timeout=REQUEST_TIMEOUT).stdout.strip() != ""
    assert has_python or not REQUIRE_PYTHON, "STASIS_PROOF_PYTHON=1 but the image has no python3"
    if has_python:
        sbx.files.write("/home/user/counter.py", PY_SCRIPT, request_timeout=REQUEST_TIMEOUT)
        py = sbx.commands.run("python3 /home/user/counter.py", background=True, timeout=0,
                              request_timeout=REQUEST_TIMEOUT)
        py_first = first_tick(sbx, PY_COUNTER)
        py_before = counter_passes(sbx, py_first, PY_COUNTER)
        proof(f"python variable advancing before the pause (pid {py.pid}): {py_first} -> {py_before}")
    else:
        proof("no python3 in this image: the Python-variable check is left out")

    net_addr = None
    if NET:
        assert has_python, "STASIS_PROOF_NET=1 needs python3 in the image (the network probe)"
        api = api_client()
        net_addr = network_before_pause(sbx, api)
        fidelity_checks(sbx, api)

    # The values just before the pause.
    before = read_counter(sbx)
    if has_python:
        py_before = read_counter(sbx, PY_COUNTER)

    # Pause: the sandbox is listed as paused.
    _, pause_s = timed("pause", lambda: sbx.pause(request_timeout=REQUEST_TIMEOUT))
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sbx.sandbox_id in [s.sandbox_id for s in paused], paused
    info = Sandbox.get_info(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    assert info.state == SandboxState.PAUSED, info
    proof(f"listed as paused: {sbx.sandbox_id}")

    # Connect resumes it: the seed's static `Sandbox.connect(id)`. The object
    # it returns sends agent requests with only the sandbox's envd access
    # token (no routing headers); the server routes them by that token.
    cpu0, wall0 = qemu_cpu_s(), time.monotonic()
    load0 = os.getloadavg()[0]
    resumed, resume_s = timed(
        "resume (connect)",
        lambda: Sandbox.connect(sbx.sandbox_id, timeout=3600, request_timeout=REQUEST_TIMEOUT),
    )
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    _, first_after_s = timed(
        "first agent call after the resume",
        lambda: wait_until(
            lambda: resumed.files.exists(FILE, request_timeout=REQUEST_TIMEOUT), 120, "the agent"
        ),
    )
    cpu1, wall1 = qemu_cpu_s(), time.monotonic()
    window = wall1 - wall0
    if cpu0 is not None and cpu1 is not None and window > 0:
        share = f"QEMU (L1) got {cpu1 - cpu0:.2f} s of host CPU in it ({100 * (cpu1 - cpu0) / window:.0f} % of one core)"
    else:
        share = "QEMU's CPU time unknown (no STASIS_L1_QEMU_PID)"
    proof(
        f"RESUME-TO-FIRST-ANSWER {window:.2f} s (connect {resume_s:.2f} s + first call "
        f"{first_after_s:.2f} s); {share}; host load {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    first_net_s = None
    if NET:
        # The worker is a fresh process with a fresh tap: the first request.
        r = probe(resumed, "until", f"http://{INET}:8080/hello.txt", "60")
        first_net_s = time.monotonic() - wall0
        assert r["ok"] and r["body"] == HELLO, f"no request succeeded after the resume: {r}"
        proof(f"NET (nested) first request after the resume: {first_net_s:.2f} s after connect began "
              f"(in the guest: {r['attempts']} attempt(s), {r['total']:.2f} s, the request "
              f"{r['secs'] * 1000:.0f} ms)")
        r = must_get(resumed, f"http://{INET_NAME}:8080/hello.txt", "by name after the resume")
        assert net_address(api, sbx.sandbox_id)["network"]["address"] == net_addr
        proof(f"NET after the resume: same address {net_addr}, DNS and HTTP work")

    # The file, the process and its in-memory counter are all still there.
    assert resumed.files.read(FILE, request_timeout=REQUEST_TIMEOUT) == FILE_TEXT
    procs = resumed.commands.list(request_timeout=REQUEST_TIMEOUT)
    assert pid in [p.pid for p in procs], f"pid {pid} not among {[(p.pid, p.cmd) for p in procs]}"
    at_resume = read_counter(resumed)
    assert at_resume >= before, (
        f"the counter went back from {before} to {at_resume}: the process restarted or lost memory"
    )
    after = counter_passes(resumed, at_resume)
    proof(f"after the resume: file intact, pid {pid} alive, counter {before} -> {at_resume} -> {after}")
    if has_python:
        assert py.pid in [p.pid for p in procs], f"python pid {py.pid} is gone"
        py_at_resume = read_counter(resumed, PY_COUNTER)
        assert py_at_resume >= py_before, (
            f"the Python variable went back from {py_before} to {py_at_resume}"
        )
        py_after = counter_passes(resumed, py_at_resume, PY_COUNTER)
        proof(f"after the resume: python pid {py.pid} alive, n {py_before} -> {py_at_resume} -> {py_after}")

    # Commands still run after the resume.
    r = resumed.commands.run("cat /home/user/proof.txt; cat /tmp/counter",
                             timeout=REQUEST_TIMEOUT, request_timeout=REQUEST_TIMEOUT)
    assert r.exit_code == 0 and FILE_TEXT.strip() in r.stdout, r

    if NET:
        no_internet_and_isolation(resumed, api)
        proof(f"NET-SUMMARY the guest reached the fake internet by address and name, through "
              f"NAT; runtime denyOut enforced and lifted; works after the resume (first request "
              f"{first_net_s:.2f} s after connect began); allow_internet_access=False and "
              f"sandbox isolation enforced")

    # Kill: it is gone.
    _, kill_s = timed("kill", lambda: resumed.kill(request_timeout=REQUEST_TIMEOUT))
    listed = Sandbox.list().next_items()
    assert sbx.sandbox_id not in [s.sandbox_id for s in listed], listed
    proof(
        f"SUMMARY pause {pause_s:.2f} s, resume {resume_s:.2f} s "
        f"(+{first_after_s:.2f} s to the first agent answer), kill {kill_s:.2f} s"
    )
