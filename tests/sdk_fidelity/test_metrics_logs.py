"""Metrics and logs through the SDK: `get_metrics()` after some CPU load in
the sandbox (the server samples every STASIS_METRICS_INTERVAL_MS, 200 ms
here), the multi-sandbox metrics route, and console/agent log lines with
timestamps and paging (past the end: an empty page)."""

import datetime

import pytest

from novita_sandbox.core import Sandbox
from novita_sandbox.core.exceptions import NotFoundException, SandboxException

from conftest import wait_until


def test_metrics_after_cpu_load(sandbox, api):
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    h = sandbox.commands.run("timeout 30 sh -c 'while :; do :; done'", background=True)
    try:
        busy = []

        def seen_load():
            ms = sandbox.get_metrics(start=start)
            busy[:] = [m for m in ms if m.cpu_used_pct > 20]
            return len(busy) >= 2

        wait_until(seen_load, secs=30, what="metrics showing the CPU load")
    finally:
        h.kill()
    m = busy[-1]
    assert m.cpu_count >= 1 and 0 < m.cpu_used_pct <= 100
    assert m.mem_total == 64 << 20 and m.mem_used > 0
    assert m.disk_total > 0 and m.disk_used >= 0
    assert abs((m.timestamp - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 60
    all_metrics = sandbox.get_metrics()
    stamps = [x.timestamp for x in all_metrics]
    assert stamps == sorted(stamps) and len(all_metrics) >= 2
    # A range in the future is empty; the range's end is honoured.
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    assert sandbox.get_metrics(start=future) == []
    assert sandbox.get_metrics(end=start - datetime.timedelta(days=1)) == []

    r = api.get("/sandboxes/metrics", params={"sandbox_ids": f"{sandbox.sandbox_id},nope"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["sandboxes"]) == [sandbox.sandbox_id]
    assert set(body["sandboxes"][sandbox.sandbox_id]) >= {
        "cpuCount", "cpuUsedPct", "memTotal", "memUsed", "diskTotal", "diskUsed", "timestamp", "timestampUnix"}

    # Paused: its samples stay readable; killed: not found.
    sandbox.beta_pause()
    assert len(sandbox.get_metrics()) >= len(all_metrics)
    sid = sandbox.sandbox_id
    Sandbox.kill(sid)
    with pytest.raises((NotFoundException, SandboxException)):
        Sandbox.get_metrics(sid)
    assert api.get(f"/sandboxes/{sid}/metrics").status_code == 404


def test_logs_with_paging(sandbox, api):
    sid = sandbox.sandbox_id

    def lines():
        r = api.get(f"/sandboxes/{sid}/logs")
        assert r.status_code == 200, r.text
        return r.json()

    # The fake backend's console is the agent's output: it logs as it
    # serves; make it log something identifiable too.
    for i in range(3):
        sandbox.commands.run(f"echo marker-{i}")
    wait_until(lambda: len(lines()["logs"]) >= 3, secs=30, what="console lines")
    body = lines()
    assert len(body["logs"]) == len(body["logEntries"])
    for l, e in zip(body["logs"], body["logEntries"]):
        assert l["line"] == e["message"] and l["timestamp"] == e["timestamp"]
        datetime.datetime.fromisoformat(l["timestamp"].replace("Z", "+00:00"))
        assert e["level"] == "info"
    n = len(body["logs"])
    # v1 paging: start (ms) + limit; past the end is an empty page.
    stamps = [datetime.datetime.fromisoformat(l["timestamp"].replace("Z", "+00:00")) for l in body["logs"]]
    ms = [int(s.timestamp() * 1000) for s in stamps]
    assert ms == sorted(ms) and len(set(ms)) == len(ms)
    page = api.get(f"/sandboxes/{sid}/logs", params={"start": ms[1], "limit": 1}).json()
    assert [l["line"] for l in page["logs"]] == [body["logs"][1]["line"]]
    empty = api.get(f"/sandboxes/{sid}/logs", params={"start": ms[-1] + 10_000_000}).json()
    assert empty == {"logs": [], "logEntries": []}
    # v2: cursor, direction, search; pages cover everything once.
    got, cursor = [], None
    while True:
        params = {"limit": 2, "direction": "forward"}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.get(f"/v2/sandboxes/{sid}/logs", params=params).json()["logs"]
        if not page:
            break
        got.extend(e["message"] for e in page)
        last = datetime.datetime.fromisoformat(page[-1]["timestamp"].replace("Z", "+00:00"))
        cursor = int(last.timestamp() * 1000) + 1
    assert got[:n] == [l["line"] for l in body["logs"]]
    back = api.get(f"/v2/sandboxes/{sid}/logs", params={"direction": "backward", "limit": 1}).json()["logs"]
    assert len(back) == 1
    assert api.get(f"/v2/sandboxes/{sid}/logs", params={"level": "error"}).json() == {"logs": []}
    assert api.get(f"/v2/sandboxes/{sid}/logs", params={"direction": "sideways"}).status_code == 400
    assert api.get("/v2/sandboxes/nope/logs").status_code == 404
