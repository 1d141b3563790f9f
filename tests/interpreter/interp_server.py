"""The code-interpreter server (rootfs/interpreter/stasis_interpreter.py) run
on the host on the SDK's JUPYTER_PORT, for tests/interpreter's own tests
(conftest.py) and the SDK's suite (sdk_suite.py)."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "..", "..", "rootfs", "interpreter", "stasis_interpreter.py")
PORT = 49999


def _wait_port(port, proc, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"interpreter server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"interpreter server did not listen on {port} within {limit}s")


@contextlib.contextmanager
def interpreter_server(prefix, show_log=lambda text: True, remove_home=False):
    """Starts the server on localhost:PORT in a new temp home (its cwd and
    HOME) and yields {"proc", "home", "log"} once it listens; stops it after,
    writes the tail of its log to stderr when show_log(text) says so, and
    removes the home if asked."""
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
        raise RuntimeError(f"port {PORT} is already in use: the tests would talk to someone else's server")
    except OSError:
        pass
    home = tempfile.mkdtemp(prefix=prefix)
    log_path = os.path.join(home, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, SERVER, "--host", "127.0.0.1", "--port", str(PORT), "--cwd", home],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HOME=home), start_new_session=True,
        )
    try:
        _wait_port(PORT, proc)
        yield {"proc": proc, "home": home, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        with open(log_path) as f:
            text = f.read()
        if show_log(text):
            sys.stderr.write(f"---- interpreter server log ----\n{text[-4000:]}\n")
        if remove_home:
            shutil.rmtree(home, ignore_errors=True)
