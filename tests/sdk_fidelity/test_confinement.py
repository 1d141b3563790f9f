"""The fake backend's agent is a harmless stand-in (issue 14): the commands
a client runs in a fake sandbox see what they would see in a VM (user
`user`, uid 1000, home /home/user) and nothing of the host: no host secrets
or data directory, no host processes, no capabilities, a read-only /usr."""

import shlex


def sh(sandbox, cmd):
    r = sandbox.commands.run("sh -c " + shlex.quote(cmd + "; true"))
    return r.stdout.strip()


def test_commands_run_as_user_in_their_own_home(sandbox):
    assert sh(sandbox, "id -u; id -g; id -un; echo $HOME; pwd").split() == [
        "1000", "1000", "user", "/home/user", "/home/user"]
    sandbox.files.write("owned.txt", "mine")
    info = sandbox.files.get_info("owned.txt")
    assert info.path == "/home/user/owned.txt"
    assert (info.owner, info.group) == ("user", "user")


def test_the_host_is_out_of_sight(sandbox, tmp_path):
    # Host secrets and the server's data directory are not in the box.
    assert sh(sandbox, "test -e /etc/shadow && echo visible || echo hidden") == "hidden"
    assert sh(sandbox, "cat /etc/shadow >/dev/null 2>&1 && echo read || echo refused") == "refused"
    marker = tmp_path / "host-marker"
    marker.write_text("host")
    assert sh(sandbox, f"test -e {shlex.quote(str(marker))} && echo visible || echo hidden") == "hidden"
    # Writing outside the home fails: /usr is read-only, / is not the host's.
    assert sh(sandbox, "touch /usr/stasis-escape 2>/dev/null && echo wrote || echo refused") == "refused"
    # Its own pid namespace: a handful of processes, none of the host's.
    pids = [p for p in sh(sandbox, "ls /proc").split() if p.isdigit()]
    assert len(pids) < 20, pids
    assert sh(sandbox, "cat /proc/1/comm") == "bwrap"
    # Its uid outside is an unprivileged one of its own, not root.
    assert sh(sandbox, "cat /proc/self/uid_map").split()[-3:][1] != "0"
    # No capabilities.
    caps = dict(line.split(":\t") for line in sh(sandbox, "grep ^Cap /proc/self/status").splitlines())
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0, caps
