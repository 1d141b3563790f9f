"""The process RPC's fields as the SDK parses them (issue 15): what
`commands.list()` reports for a background command started with envs and a
cwd (pid, tag, cmd, args, envs, cwd), `commands.connect(pid)` to it from a
second SDK object (as another program would), its output streamed to the
new handle, stdin sent through that handle, and the exit code it reports."""

from novita_sandbox.core import Sandbox

from conftest import wait_until


def test_list_fields_and_connect_from_another_object(sandbox, root):
    cmd = 'echo "ready $MARK in $(pwd)"; read line; echo "got $line"; exit 7'
    h = sandbox.commands.run(cmd, background=True, stdin=True, timeout=0,
                             envs={"MARK": "m-41"}, cwd=root)
    wait_until(lambda: h.pid in [p.pid for p in sandbox.commands.list()],
               what="the command in the process list")
    info = next(p for p in sandbox.commands.list() if p.pid == h.pid)
    assert info.pid == h.pid
    assert info.cmd == "/bin/bash", info
    assert info.args[-1] == cmd, info
    assert info.envs.get("MARK") == "m-41", info.envs
    assert info.cwd == root, info
    assert info.tag is None or isinstance(info.tag, str), info

    # Another SDK object (another program) connects by pid.
    other = Sandbox.connect(sandbox.sandbox_id)
    h.disconnect()
    h2 = other.commands.connect(h.pid)
    assert h2.pid == h.pid
    other.commands.send_stdin(h.pid, "hello\n")
    from novita_sandbox.core.sandbox.commands.command_handle import CommandExitException

    try:
        result = h2.wait()
        raise AssertionError(f"exit 7 expected, got {result}")
    except CommandExitException as e:
        assert e.exit_code == 7, e
        assert "got hello" in e.stdout, e.stdout
    wait_until(lambda: h.pid not in [p.pid for p in sandbox.commands.list()],
               what="the ended command to leave the list")
