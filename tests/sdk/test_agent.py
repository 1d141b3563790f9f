"""Commands and files through the novita-sandbox SDK, routed by `stasis
serve` to the sandbox's agent (`NOVITA_SANDBOX_URL` = the server, so the SDK
sends `Novita-Sandbox-Id`/`-Port` headers), before and after a pause.

The `agent` template is written by run.sh: with STASIS_BACKEND=fake it is the
fake backend's host agent (`stasis-envd --uds`, its files under the
sandbox's `root/` dir, relative paths resolve there); with STASIS_KERNEL and
STASIS_ROOTFS it is a Linux guest with the agent."""

import os
import time

import pytest

from novita_sandbox.core import Sandbox, SandboxQuery, SandboxState
from novita_sandbox.core.sandbox.commands.command_handle import CommandExitException

from conftest import wait_until

TEMPLATE = "agent"


@pytest.fixture
def sandbox():
    if not os.path.exists(os.path.join(os.environ.get("STASIS_DATA_DIR", ""), "templates", f"{TEMPLATE}.json")):
        pytest.fail("no agent template: run through tests/sdk/run.sh with STASIS_BACKEND=fake "
                    "or STASIS_KERNEL/STASIS_ROOTFS set")
    sbx = Sandbox.create(template=TEMPLATE, timeout=300)
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


def test_commands_and_files(sandbox):
    assert sandbox.is_running()
    r = sandbox.commands.run("echo hello; echo oops >&2")
    assert r.exit_code == 0
    assert r.stdout == "hello\n"
    assert r.stderr == "oops\n"

    with pytest.raises(CommandExitException) as e:
        sandbox.commands.run("exit 3")
    assert e.value.exit_code == 3

    sandbox.files.write("notes.txt", "written through the proxy\n")
    assert sandbox.files.read("notes.txt") == "written through the proxy\n"
    assert sandbox.files.exists("notes.txt")
    names = [entry.name for entry in sandbox.files.list(".")]
    assert "notes.txt" in names
    blob = bytes(range(256)) * 64
    sandbox.files.write("blob.bin", blob)
    assert bytes(sandbox.files.read("blob.bin", format="bytes")) == blob
    sandbox.files.remove("blob.bin")
    assert not sandbox.files.exists("blob.bin")

    # Streamed output arrives while the command runs.
    seen = []
    r = sandbox.commands.run("for i in 1 2 3; do echo line$i; sleep 0.2; done",
                             on_stdout=lambda line: seen.append(line))
    assert r.exit_code == 0
    assert "".join(seen).split() == ["line1", "line2", "line3"]


def _counter(sandbox):
    text = sandbox.files.read("counter.txt").strip()
    return int(text) if text else -1


def test_background_process_and_files_survive_pause_and_resume(sandbox):
    sandbox.files.write("kept.txt", "before the pause")
    # The counter lives in the shell's memory; the file only shows it.
    loop = "i=0; while true; do i=$((i+1)); echo $i > counter.txt.tmp; mv counter.txt.tmp counter.txt; sleep 0.05; done"
    handle = sandbox.commands.run(loop, background=True)
    wait_until(lambda: sandbox.files.exists("counter.txt") and _counter(sandbox) > 5,
               secs=60, what="the counter to start")
    before = _counter(sandbox)

    sandbox.beta_pause()
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
    listed = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert any(s.sandbox_id == sandbox.sandbox_id for s in listed)
    # Paused: unreachable, clearly.
    assert not sandbox.is_running()
    with pytest.raises(Exception) as e:
        sandbox.files.read("kept.txt")
    assert "paused" in str(e.value)

    data_dir = os.environ.get("STASIS_DATA_DIR")
    root = os.path.join(data_dir, "sandboxes", sandbox.sandbox_id, "root") if data_dir else None
    if root and os.path.isdir(root):
        # Host agent: its processes are stopped, so the counter stands still.
        frozen = open(os.path.join(root, "counter.txt")).read()
        time.sleep(0.3)  # the loop writes every 50 ms when it runs
        assert open(os.path.join(root, "counter.txt")).read() == frozen

    resumed = sandbox.connect()
    assert resumed.sandbox_id == sandbox.sandbox_id
    assert sandbox.is_running()
    assert sandbox.files.read("kept.txt") == "before the pause"
    after = _counter(sandbox)
    assert after >= before, (before, after)
    wait_until(lambda: _counter(sandbox) > after + 5, secs=60, what="the counter to advance after resume")
    pids = [p.pid for p in sandbox.commands.list()]
    assert handle.pid in pids
    assert sandbox.commands.kill(handle.pid)
    # Close its event stream now rather than leave it to the collector (see
    # conftest.no_collection_inside_the_sdk).
    handle.disconnect()


def test_static_connect_reaches_the_sandbox_by_its_envd_token(sandbox, api):
    """The seed's resume call is the static `Sandbox.connect(id)`. The object
    it returns sends envd requests with no routing headers, only the
    sandbox's `X-Access-Token`: the server routes by that token."""
    sandbox.files.write("static.txt", "kept across the static connect")
    sandbox.beta_pause()
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED

    resumed = Sandbox.connect(sandbox.sandbox_id, timeout=120)
    assert resumed.sandbox_id == sandbox.sandbox_id
    assert resumed.files.read("static.txt") == "kept across the static connect"
    r = resumed.commands.run("echo via-token")
    assert r.stdout == "via-token\n"

    # The envd port of a secured sandbox needs its token.
    r = api.get("/health", headers={"Novita-Sandbox-Id": sandbox.sandbox_id,
                                    "Novita-Sandbox-Port": "49983"})
    assert r.status_code == 401, r.text
    assert "X-Access-Token" in r.json()["message"]


def test_create_envs_reach_every_command():
    sbx = Sandbox.create(template=TEMPLATE, timeout=300,
                         envs={"STASIS_GREETING": "hi from create", "STASIS_N": "7"})
    try:
        r = sbx.commands.run('echo "$STASIS_GREETING/$STASIS_N"')
        assert r.stdout == "hi from create/7\n"
        # Per-command envs add to (and override) the sandbox's.
        r = sbx.commands.run('echo "$STASIS_GREETING/$STASIS_N"', envs={"STASIS_N": "8"})
        assert r.stdout == "hi from create/8\n"
    finally:
        sbx.kill()


def test_traffic_resumes_a_paused_auto_resume_sandbox():
    sbx = Sandbox.create(template=TEMPLATE, timeout=300,
                         lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        sbx.files.write("auto.txt", "still here")
        sbx.beta_pause()
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        # No connect: the request itself wakes the sandbox.
        assert sbx.files.read("auto.txt") == "still here"
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    finally:
        sbx.kill()


def test_traffic_does_not_resume_a_plain_paused_sandbox(sandbox):
    sandbox.beta_pause()
    with pytest.raises(Exception) as e:
        sandbox.files.read("anything.txt")
    assert "paused" in str(e.value)
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
