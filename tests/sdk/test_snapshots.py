"""Reusable snapshots and clones through the novita-sandbox SDK (2.1.1):
`create_snapshot`, `list_snapshots` (paginated), `Sandbox.create(snapshot_id)`,
`Sandbox.clone(id, count)`, `delete_snapshot`.

Run by tests/snapshots.rs through run.sh with STASIS_BACKEND=fake: the
`agent` template is the fake backend's host agent, whose "snapshot" is a copy
of its directory tree (its processes are not carried over by the fake; the
VM backend carries the whole guest). Each sandbox made from the snapshot
starts with the snapshot's files, then diverges: its own files after writes,
its own random numbers, its own sandbox id; deleting the origin and the
snapshot leaves them working."""

import os

import pytest

from novita_sandbox.core import Sandbox

TEMPLATE = "agent"


def all_snapshots(**kw):
    paginator = Sandbox.list_snapshots(limit=2, **kw)
    out = []
    while paginator.has_next:
        out.extend(s.snapshot_id for s in paginator.next_items())
    return out


def test_snapshot_create_from_it_clone_and_delete():
    if not os.path.exists(os.path.join(os.environ.get("STASIS_DATA_DIR", ""), "templates", f"{TEMPLATE}.json")):
        pytest.fail("no agent template: run through tests/sdk/run.sh with STASIS_BACKEND=fake")
    origin = Sandbox.create(template=TEMPLATE, timeout=300)
    made = []
    try:
        origin.files.write("state.txt", "from the origin\n")
        info = origin.create_snapshot()
        sid = info.snapshot_id
        # The origin keeps running, with its id.
        assert origin.is_running()
        assert origin.files.read("state.txt") == "from the origin\n"
        origin.files.write("after.txt", "written after the snapshot\n")

        listed = all_snapshots(sandbox_id=origin.sandbox_id)
        assert listed == [sid], listed
        assert sid in all_snapshots()

        # Three sandboxes from the snapshot and three clones of the origin.
        for _ in range(3):
            made.append(Sandbox.create(sid, timeout=120))
        result = Sandbox.clone(origin.sandbox_id, count=3, timeout=120)
        assert result.count == 3
        assert result.snapshot_template_id
        made.extend(result.sandboxes)
        ids = {s.sandbox_id for s in made}
        assert len(ids) == 6 and origin.sandbox_id not in ids

        randoms = set()
        for s in made:
            assert s.is_running()
            # Each starts from its snapshot's state.
            assert s.files.read("state.txt") == "from the origin\n"
            s.files.write("own.txt", s.sandbox_id)
            r = s.commands.run("head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")
            randoms.add(r.stdout)
        # Fresh entropy went through the agent before the SDK could reach
        # it (the agent logs it to the sandbox's console).
        for s in made:
            log_path = os.path.join(os.environ["STASIS_DATA_DIR"], "sandboxes", s.sandbox_id, "console.log")
            with open(log_path) as f:
                assert "fresh entropy: 64 bytes" in f.read(), log_path
        # ...and diverges: its own files, its own random numbers.
        for s in made:
            assert s.files.read("own.txt") == s.sandbox_id
        assert len(randoms) == 6, randoms
        # The sandboxes made from the first snapshot never saw what the
        # origin wrote after it; clones were snapshotted later and did.
        for s in made[:3]:
            assert not s.files.exists("after.txt")
        for s in made[3:]:
            assert s.files.read("after.txt") == "written after the snapshot\n"

        # Bad input: a count of 0 is refused.
        with pytest.raises(Exception):
            Sandbox.clone(origin.sandbox_id, count=0)

        # Deleting the origin and the snapshot leaves them working.
        origin.kill()
        assert Sandbox.delete_snapshot(sid) is True
        assert Sandbox.delete_snapshot(sid) is False
        for s in made:
            assert s.files.read("state.txt") == "from the origin\n"
    finally:
        for s in made + [origin]:
            try:
                s.kill()
            except Exception:
                pass
