"""Warm templates through the novita-sandbox SDK (2.1.1), fake backend with
the host agent: the `agent` template's first create boots cold, a template
snapshot is built from a separate builder VM, and later creates resume from
it. Run by tests/warm_templates.rs (`sdk_warm_templates_diverge`) through
run.sh with STASIS_BACKEND=fake.

Sandboxes made from one template snapshot diverge: fresh entropy went to
each agent before the SDK could reach it, each has its own env vars, its own
random numbers and its own files; nothing the first (cold) sandbox's user
did is in them."""

import os
import time

import pytest

from novita_sandbox.core import Sandbox

TEMPLATE = "agent"


def warm_snapshot(api, sandbox_id):
    r = api.get(f"/sandboxes/{sandbox_id}")
    assert r.status_code == 200, r.text
    return r.json()["stasis"].get("warmSnapshot")


def template_snapshots(data):
    root = os.path.join(data, "snapshots")
    if not os.path.isdir(root):
        return []
    return [n for n in os.listdir(root) if n.startswith("warm-")]


def test_warm_template_sandboxes_diverge(api):
    data = os.environ.get("STASIS_DATA_DIR", "")
    if not os.path.exists(os.path.join(data, "templates", f"{TEMPLATE}.json")):
        pytest.fail("no agent template: run through tests/sdk/run.sh with STASIS_BACKEND=fake")
    made = []
    try:
        first = Sandbox.create(template=TEMPLATE, timeout=120, envs={"WHO": "first"})
        made.append(first)
        first.files.write("first.txt", "the first user's file\n")
        # Bounded wait for the template snapshot the first create started.
        deadline = time.monotonic() + 60
        while not template_snapshots(data):
            assert time.monotonic() < deadline, "no template snapshot was built"
            time.sleep(0.1)
        (snap,) = template_snapshots(data)
        # Not one of the user's snapshots.
        assert snap not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]

        warm = []
        for who in ["a", "b", "c"]:
            s = Sandbox.create(template=TEMPLATE, timeout=120, envs={"WHO": who})
            made.append(s)
            warm.append((who, s))
            assert warm_snapshot(api, s.sandbox_id) == snap
        randoms = set()
        for who, s in warm:
            assert s.commands.run("echo -n $WHO").stdout == who
            randoms.add(s.commands.run("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout)
            # The builder VM is not the first user's sandbox.
            assert not s.files.exists("first.txt")
            s.files.write("own.txt", s.sandbox_id)
            log_path = os.path.join(data, "sandboxes", s.sandbox_id, "console.log")
            with open(log_path) as f:
                assert "fresh entropy: 64 bytes" in f.read(), log_path
        assert len(randoms) == 3, randoms
        for _, s in warm:
            assert s.files.read("own.txt") == s.sandbox_id
        assert first.files.read("first.txt") == "the first user's file\n"
        assert not first.files.exists("own.txt")
    finally:
        for s in made:
            try:
                s.kill()
            except Exception:
                pass
