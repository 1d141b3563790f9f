"""The SDK's commands, files and pty against stasis-envd."""

import asyncio
import os
import time

import pytest

from novita_sandbox.core.exceptions import (
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
)
from novita_sandbox.core.sandbox.commands.command_handle import CommandExitException
from novita_sandbox.core.sandbox.commands.command_handle import PtySize
from novita_sandbox.core.sandbox.filesystem.filesystem import FileType
from novita_sandbox.core.sandbox.filesystem.watch_handle import FilesystemEventType


def wait_until(pred, secs=20.0, what="condition"):
    deadline = time.monotonic() + secs
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_health(sbx):
    assert sbx.is_running()


def test_run_echo_and_exit_codes(sbx):
    r = sbx.commands.run("echo hello")
    assert (r.stdout, r.stderr, r.exit_code) == ("hello\n", "", 0)
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("echo oops >&2; exit 3")
    assert e.value.exit_code == 3
    assert e.value.stderr == "oops\n"


def test_envs_cwd_and_callbacks(sbx, root):
    out = []
    r = sbx.commands.run("echo $FOO-$BAR; pwd", envs={"FOO": "a", "BAR": "b"}, on_stdout=out.append)
    assert r.stdout == f"a-b\n{root}\n"
    assert "".join(out) == r.stdout
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    assert sbx.commands.run("pwd", cwd="sub").stdout == os.path.join(root, "sub") + "\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"


def test_nonexistent_command_and_cwd(sbx):
    with pytest.raises(CommandExitException) as e:
        sbx.commands.run("definitely-not-a-command-xyz")
    assert e.value.exit_code == 127
    assert "not found" in e.value.stderr
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", cwd="/no/such/dir")


def test_large_and_binary_output(sbx):
    r = sbx.commands.run("head -c 5000000 /dev/zero | tr '\\0' 'x'")
    assert len(r.stdout) == 5_000_000
    r = sbx.commands.run("printf '\\377\\000ok'")
    assert r.stdout.endswith("ok")  # undecodable bytes arrive, decoded with replacement


def test_stdin(sbx):
    h = sbx.commands.run("read x; echo got:$x", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "abc\n")
    assert h.wait().stdout == "got:abc\n"


def test_background_list_connect_kill(sbx):
    h = sbx.commands.run("echo started; sleep 1000", background=True, timeout=0)
    assert h.pid in [p.pid for p in sbx.commands.list()]
    info = next(p for p in sbx.commands.list() if p.pid == h.pid)
    assert info.cmd == "/bin/bash" and info.args[-1] == "echo started; sleep 1000"
    h.disconnect()
    h2 = sbx.commands.connect(h.pid)
    assert h2.pid == h.pid
    assert sbx.commands.kill(h.pid)
    with pytest.raises(CommandExitException) as e:
        h2.wait()
    assert e.value.exit_code == -1
    wait_until(lambda: h.pid not in [p.pid for p in sbx.commands.list()], what="the process to leave the list")
    assert not sbx.commands.kill(h.pid)
    with pytest.raises(SandboxException):
        sbx.commands.connect(h.pid)


def test_command_timeout_kills(sbx):
    from novita_sandbox.core.exceptions import TimeoutException

    h = sbx.commands.run("sleep 1000", background=True, timeout=1)
    with pytest.raises(TimeoutException):
        h.wait()
    wait_until(lambda: h.pid not in [p.pid for p in sbx.commands.list()], what="the timed-out process to end")


def test_files_write_read_list_exists_remove_rename(sbx, root):
    info = sbx.files.write("dir/a.txt", "hello")
    assert (info.name, info.path) == ("a.txt", os.path.join(root, "dir/a.txt"))
    assert sbx.files.read("dir/a.txt") == "hello"
    assert sbx.files.read(os.path.join(root, "dir/a.txt")) == "hello"
    assert sbx.files.exists("dir/a.txt")
    assert not sbx.files.exists("dir/nope")
    assert sbx.files.make_dir("dir/sub/deeper")
    assert not sbx.files.make_dir("dir/sub")
    entries = sbx.files.list("dir")
    assert [(e.name, e.type) for e in entries] == [("a.txt", FileType.FILE), ("sub", FileType.DIR)]
    assert entries[0].size == 5
    assert [e.name for e in sbx.files.list("dir", depth=3)] == ["a.txt", "sub", "deeper"]
    moved = sbx.files.rename("dir/a.txt", "dir/b.txt")
    assert moved.name == "b.txt" and moved.type == FileType.FILE
    assert not sbx.files.exists("dir/a.txt")
    info = sbx.files.get_info("dir/b.txt")
    assert info.size == 5 and info.permissions.startswith("-")
    sbx.files.remove("dir")
    assert not sbx.files.exists("dir")
    # Files written through the API are visible to commands, and back.
    sbx.files.write("seen.txt", "x")
    assert sbx.commands.run("cat seen.txt").stdout == "x"
    sbx.commands.run("echo from-cmd > made.txt")
    assert sbx.files.read("made.txt") == "from-cmd\n"


def test_write_files_and_octet_stream(sbx):
    from novita_sandbox.core.sandbox.filesystem.filesystem import WriteEntry

    res = sbx.files.write_files([WriteEntry(path="m/1.txt", data="one"), WriteEntry(path="m/2.txt", data=b"two")])
    assert [r.name for r in res] == ["1.txt", "2.txt"]
    assert sbx.files.read("m/2.txt") == "two"
    sbx.files.write("m/o.bin", b"\x00\x01octet", use_octet_stream=True)
    assert sbx.files.read("m/o.bin", format="bytes") == bytearray(b"\x00\x01octet")


def test_binary_round_trip(sbx):
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sbx.files.write("bin/data", data)
    assert bytes(sbx.files.read("bin/data", format="bytes")) == data
    assert b"".join(sbx.files.read("bin/data", format="stream")) == data
    assert sbx.commands.run("wc -c < bin/data").stdout.strip() == str(len(data))


def test_missing_files(sbx):
    with pytest.raises(FileNotFoundException):
        sbx.files.read("no/such/file")
    with pytest.raises(FileNotFoundException):
        sbx.files.list("no/such/dir")
    # Removing what isn't there succeeds, as E2B's envd (remove-all).
    sbx.files.remove("no/such/file")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("no/such/file")
    with pytest.raises(FileNotFoundException):
        sbx.files.rename("no/such/file", "x")


def test_upload_without_space(sbx):
    from novita_sandbox.core.exceptions import NotEnoughSpaceException

    # /dev/full fails every write with ENOSPC, like a full disk.
    with pytest.raises(NotEnoughSpaceException):
        sbx.files.write("/dev/full", b"x" * 100000)
    assert os.path.exists("/dev/full")


def test_watch_dir_polling(sbx):
    sbx.files.make_dir("w")
    handle = sbx.files.watch_dir("w", recursive=True)
    sbx.files.write("w/new.txt", "1")
    events = []
    wait_until(
        lambda: events.extend(handle.get_new_events())
        or any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events),
        what="a create event",
    )
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_watch_dir_stream(make_async):
    async def main():
        sbx = make_async()
        await sbx.files.make_dir("ws")
        seen = asyncio.Event()
        names = []

        def on_event(e):
            names.append(e.name)
            if e.name == "f.txt":
                seen.set()

        handle = await sbx.files.watch_dir("ws", on_event=on_event)
        await sbx.files.write("ws/f.txt", "x")
        await asyncio.wait_for(seen.wait(), 20)
        await handle.stop()
        return names

    assert "f.txt" in asyncio.run(main())


def test_pty(sbx):
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; exit\n")
    h.wait(on_pty=out.extend)
    assert b"30 100" in out
