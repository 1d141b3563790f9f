"""Issue 5's proof, through the real novita-sandbox SDK: a Linux sandbox runs
a command, keeps a file and a background process with state in memory across
a pause and a resume, and is killed.

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

import os
import time

import pytest

from novita_sandbox import Sandbox
from novita_sandbox.core import SandboxQuery, SandboxState

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

    # Kill: it is gone.
    _, kill_s = timed("kill", lambda: resumed.kill(request_timeout=REQUEST_TIMEOUT))
    listed = Sandbox.list().next_items()
    assert sbx.sandbox_id not in [s.sandbox_id for s in listed], listed
    proof(
        f"SUMMARY pause {pause_s:.2f} s, resume {resume_s:.2f} s "
        f"(+{first_after_s:.2f} s to the first agent answer), kill {kill_s:.2f} s"
    )
