"""The product page's (sandbox-persistence) flows, run through the
novita-sandbox Python SDK against `stasis serve` (real KVM guests by default;
STASIS_BACKEND=fake for the counting stand-in)."""

import datetime

import pytest

from novita_sandbox.code_interpreter import Sandbox
from novita_sandbox.core import (
    NotFoundException,
    Sandbox as CoreSandbox,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

from conftest import guest_round, wait_until


def _alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def test_pausing_sandbox():
    sandbox = Sandbox.create()
    print("Sandbox created", sandbox.sandbox_id)
    result = sandbox.beta_pause()
    print("Sandbox paused", sandbox.sandbox_id, result)
    assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
    # Pausing again is a 409, which the SDK accepts silently.
    sandbox.beta_pause()
    assert sandbox.kill() is True
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id)


def test_resuming_sandbox_continues_where_it_was(api):
    sandbox = Sandbox.create()
    wait_until(lambda: guest_round(api, sandbox.sandbox_id) > 5, what="guest progress")
    worker = api.get(f"/sandboxes/{sandbox.sandbox_id}").json()["stasis"]["workerPid"]
    sandbox.beta_pause()
    # Paused: no progress. The worker (and its VM) is gone, and the round
    # the server reads from the guest's memory in the snapshot is the round
    # the worker read from the stopped guest at pause.
    stasis = api.get(f"/sandboxes/{sandbox.sandbox_id}").json()["stasis"]
    assert stasis["workerPid"] is None
    wait_until(lambda: not _alive(worker), what=f"worker {worker} to exit")
    at_pause = stasis["guestRound"]
    assert at_pause is not None and at_pause > 5, stasis
    assert stasis["pausedAtRound"] == at_pause, stasis

    resumed_sandbox = sandbox.connect()
    print("Sandbox resumed", resumed_sandbox.sandbox_id)
    assert resumed_sandbox.sandbox_id == sandbox.sandbox_id
    info = sandbox.get_info()
    assert info.state == SandboxState.RUNNING
    assert guest_round(api, sandbox.sandbox_id) >= at_pause
    wait_until(lambda: guest_round(api, sandbox.sandbox_id) > at_pause + 5, what="progress after resume")
    assert sandbox.kill() is True


def test_listing_paused_sandboxes_with_pagination():
    sandbox = Sandbox.create()
    paused_ids = set()
    for _ in range(3):
        s = Sandbox.create(metadata={"purpose": "list test"})
        s.beta_pause()
        paused_ids.add(s.sandbox_id)

    # The page's example, verbatim.
    paginator = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]))
    sandboxes = []
    while paginator.has_next:
        items = paginator.next_items()
        sandboxes.extend(items)
    print("all paused sandboxes", sandboxes)
    assert paused_ids <= {s.sandbox_id for s in sandboxes}
    assert all(s.state == SandboxState.PAUSED for s in sandboxes)
    assert sandbox.sandbox_id not in {s.sandbox_id for s in sandboxes}

    # Small pages: several pages, nothing lost or repeated.
    paginator = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]), limit=2)
    pages, seen = 0, []
    while paginator.has_next:
        seen.extend(s.sandbox_id for s in paginator.next_items())
        pages += 1
    assert pages >= 2
    assert len(seen) == len(set(seen))
    assert paused_ids <= set(seen)

    # Metadata filter (with a space, encoded the SDK's way).
    paginator = Sandbox.list(query=SandboxQuery(metadata={"purpose": "list test"}))
    found = paginator.next_items()
    assert {s.sandbox_id for s in found} == paused_ids
    assert all(s.metadata == {"purpose": "list test"} for s in found)

    running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
    assert sandbox.sandbox_id in {s.sandbox_id for s in running}

    for sid in paused_ids:
        assert Sandbox.kill(sid) is True
    sandbox.kill()


def test_removing_paused_sandbox():
    sandbox = Sandbox.create()
    sandbox.beta_pause()
    assert sandbox.kill() is True
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id)
    assert sandbox.kill() is False


def test_timeout_on_connect():
    sandbox = Sandbox.create()
    # Connecting to a running sandbox never shortens its timeout...
    connected = Sandbox.connect(sandbox.sandbox_id, timeout=60)
    print("Sandbox connected", connected.sandbox_id)
    info = Sandbox.get_info(sandbox.sandbox_id)
    assert (info.end_at - info.started_at).total_seconds() == pytest.approx(300, abs=1)
    # ...but extends it.
    Sandbox.connect(sandbox.sandbox_id, timeout=3600)
    info = Sandbox.get_info(sandbox.sandbox_id)
    assert (info.end_at - _now()).total_seconds() > 3000

    # Resuming resets the timeout: to the default...
    sandbox.beta_pause()
    sandbox.connect()
    info = sandbox.get_info()
    assert (info.end_at - info.started_at).total_seconds() == pytest.approx(300, abs=1)
    # ...or to the one connect passes.
    sandbox.beta_pause()
    Sandbox.connect(sandbox.sandbox_id, timeout=60)
    info = sandbox.get_info()
    assert info.state == SandboxState.RUNNING
    assert (info.end_at - info.started_at).total_seconds() == pytest.approx(60, abs=1)
    sandbox.kill()


def test_set_timeout_and_info():
    sandbox = CoreSandbox.create(template="base", metadata={"a": "b"})
    sandbox.set_timeout(30)
    info = sandbox.get_info()
    assert info.template_id == "base"
    assert info.metadata == {"a": "b"}
    assert info.cpu_count == 1 and info.memory_mb == 64
    assert 0 < (info.end_at - _now()).total_seconds() <= 31
    assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}
    sandbox.kill()


def test_timeout_expiry_auto_pause():
    sandbox = Sandbox.create(timeout=1, auto_pause=True)
    wait_until(lambda: sandbox.get_info().state == SandboxState.PAUSED, secs=30, what="auto-pause")
    assert sandbox.get_info().lifecycle["on_timeout"] == "pause"
    sandbox.connect()
    assert sandbox.get_info().state == SandboxState.RUNNING
    sandbox.kill()


def test_timeout_expiry_kill():
    sandbox = Sandbox.create(timeout=1)

    def gone():
        try:
            sandbox.get_info()
            return False
        except SandboxNotFoundException:
            return True

    wait_until(gone, secs=30, what="kill at timeout")
    with pytest.raises(NotFoundException):
        sandbox.connect()


def test_not_found_for_unknown_ids():
    with pytest.raises(NotFoundException):
        Sandbox.connect("doesnotexist0000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("doesnotexist0000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.beta_pause("doesnotexist0000")
    assert Sandbox.kill("doesnotexist0000") is False


def test_not_found_after_retention(server_factory):
    url, key = server_factory("--retention-secs", "3")
    opts = {"api_url": url, "api_key": key}
    sandbox = Sandbox.create(**opts)
    sandbox.beta_pause()
    info = Sandbox.get_info(sandbox.sandbox_id, **opts)
    assert info.state == SandboxState.PAUSED
    # endAt of a paused sandbox is the end of its retention.
    assert (info.end_at - _now()).total_seconds() <= 3

    def gone():
        try:
            Sandbox.get_info(sandbox.sandbox_id, **opts)
            return False
        except SandboxNotFoundException:
            return True

    wait_until(gone, secs=30, what="retention expiry")
    with pytest.raises(NotFoundException):
        Sandbox.connect(sandbox.sandbox_id, **opts)
    assert Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]), **opts).next_items() == []


def test_unknown_template_is_a_clear_error():
    from novita_sandbox.core import SandboxException

    with pytest.raises(SandboxException, match="400.*no-such-template"):
        CoreSandbox.create(template="no-such-template")
