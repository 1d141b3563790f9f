#!/usr/bin/env python3
"""stasis code interpreter: the server behind the SDK's `run_code` / `runCode`.

It listens on port 49999 (the SDK's JUPYTER_PORT) inside a sandbox and speaks
exactly what novita-sandbox 2.1.1's `code_interpreter` client sends and parses:

  POST   /execute                 {"code", "context_id", "language", "env_vars"}
                                  -> newline-delimited JSON, streamed:
                                     {"type": "stdout"|"stderr", "text", "timestamp"}
                                     {"type": "result", <formats>, "is_main_result"}
                                     {"type": "error", "name", "value", "traceback"}
                                     {"type": "number_of_executions", "execution_count"}
                                     {"type": "end_of_execution"}
  POST   /contexts                {"language", "cwd"} -> {"id", "language", "cwd"}
  GET    /contexts                -> [{"id", "language", "cwd"}, ...]
  DELETE /contexts/{id}           -> 204
  POST   /contexts/{id}/restart   -> 204
  GET    /health                  -> 200 "OK"

Python contexts are IPython kernels driven through jupyter_client (Debian's
python3-jupyter-client and python3-ipykernel); bash contexts are one
long-lived bash process each, so `cd`, variables and functions persist between
calls, as they do in a terminal. A context's state lives in its process, so it
survives a sandbox pause like every other process.

Executions in one context run one at a time, in order. An execution ends when
its kernel is idle again; if the client goes away first (it disconnected or
its read timeout expired), the kernel is interrupted, not killed, so the
context keeps its variables and the next call works. A kernel that dies
(`os._exit(1)`) gives the running execution an error and is restarted by the
next call to that context.

Standard library only, besides jupyter_client; no web framework.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORT = 49999
# Bodies of /execute and /contexts are JSON documents of code; 64 MiB is far
# beyond any cell and keeps a hostile client from exhausting memory.
MAX_BODY = 64 << 20
# How often a waiting execution looks at its client's socket and its kernel.
POLL_SECONDS = 0.25
# A kernel starts in about a second natively; under nested emulation on a
# loaded host (tests/linux_interpreter.rs) it took more than two minutes.
KERNEL_START_TIMEOUT = float(os.environ.get("STASIS_KERNEL_START_TIMEOUT", "600"))
LANGUAGE_ALIASES = {"python": "python", "python3": "python", "py": "python",
                    "bash": "bash", "sh": "bash", "shell": "bash"}

# Jupyter MIME types -> the field names of the SDK's `Result`.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}


STREAM_PIECE = 256 << 10


def split_text(text: str) -> list:
    """Cuts stream text into pieces of at most STREAM_PIECE characters, at
    line ends where there are any."""
    pieces = []
    while len(text) > STREAM_PIECE:
        cut = text.rfind("\n", 0, STREAM_PIECE) + 1 or STREAM_PIECE
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def now_ns() -> int:
    return time.time_ns()


class ApiError(Exception):
    """An error answered to the client as {"code", "message"} with a status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The HTTP client disconnected while its execution was running."""


def result_message(data: dict, is_main: bool) -> dict:
    """A Jupyter display bundle as the SDK's `result` line."""
    out: dict = {"type": "result", "is_main_result": is_main}
    extra = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field:
            out[field] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


class Sink:
    """Writes the lines of one streamed response; notices a client that left."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler = handler
        self.sock: socket.socket = handler.connection

    def send(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        try:
            self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.handler.wfile.flush()
        except OSError as e:
            raise ClientGone() from e

    def close(self) -> None:
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
            self.handler.wfile.flush()
        except OSError:
            pass

    def gone(self) -> bool:
        """True once the client has closed its side (EOF) or reset it."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class PythonContext:
    """An IPython kernel, started through jupyter_client."""

    language = "python"

    def __init__(self, cid: str, cwd: str):
        self.id = cid
        self.cwd = cwd
        self.lock = threading.Lock()
        self.km = None
        self.kc = None
        self._start()

    def _start(self) -> None:
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="python3")
        env = dict(os.environ)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        km.start_kernel(cwd=self.cwd, env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        except RuntimeError as e:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise ApiError(500, f"python kernel did not start: {e}") from e
        self.km, self.kc = km, kc

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def restart(self) -> None:
        self.shutdown()
        self._start()

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - a dead kernel is the usual case
                pass
        self.km = self.kc = None

    def _silent(self, code: str) -> None:
        """Runs bookkeeping code (env vars) without output or history."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, stop_on_error=False)
        self._wait_reply(msg_id, None)

    def _wait_reply(self, msg_id: str, sink: Sink | None) -> dict:
        """The shell reply to `msg_id` (its content)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = self.kc.get_shell_msg(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.alive():
                    raise ApiError(500, "the kernel died")
                if sink is None and time.monotonic() > deadline:
                    raise ApiError(500, "the kernel did not answer")
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply.get("content", {})

    def execute(self, code: str, env_vars: dict | None, sink: Sink) -> None:
        if not self.alive():
            sink.send({"type": "stderr", "text": "[stasis] the kernel had died; restarted it (its variables are gone)\n",
                       "timestamp": now_ns()})
            self.restart()
        if env_vars:
            self._silent(
                "import os as __stasis_os\n"
                f"__stasis_env_saved = {{k: __stasis_os.environ.get(k) for k in {list(env_vars)!r}}}\n"
                f"__stasis_os.environ.update({json.dumps(env_vars)})\n"
            )
        try:
            self._run(code, sink)
        finally:
            if env_vars and self.alive():
                self._silent(
                    "for __k, __v in __stasis_env_saved.items():\n"
                    "    if __v is None: __stasis_os.environ.pop(__k, None)\n"
                    "    else: __stasis_os.environ[__k] = __v\n"
                    "del __stasis_env_saved\n"
                )

    def _run(self, code: str, sink: Sink) -> None:
        # stop_on_error=False: with the default, ipykernel aborts requests
        # that reach it just after a failed one (an interrupted execution is
        # one), and the next call would silently return nothing.
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        interrupted = False
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.alive():
                    sink.send({"type": "error", "name": "KernelDied",
                               "value": "the kernel died while running this code; it restarts on the next call",
                               "traceback": ""})
                    return
                if not interrupted and sink.gone():
                    # The client left (disconnect or read timeout): stop the
                    # code, keep the kernel and its variables.
                    self.km.interrupt_kernel()
                    interrupted = True
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            content = msg["content"]
            out = None
            if kind == "stream":
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                # A fast writer's output arrives as one large message: pass
                # it on in pieces, so the client sees it as a stream.
                pieces = split_text(content.get("text", ""))
                for piece in pieces[:-1]:
                    if not interrupted:
                        try:
                            sink.send({"type": name, "text": piece, "timestamp": now_ns()})
                        except ClientGone:
                            self.km.interrupt_kernel()
                            interrupted = True
                out = {"type": name, "text": pieces[-1], "timestamp": now_ns()}
            elif kind == "execute_result":
                out = result_message(content.get("data", {}), True)
            elif kind == "display_data":
                out = result_message(content.get("data", {}), False)
            elif kind == "error":
                out = {"type": "error", "name": content.get("ename", ""),
                       "value": content.get("evalue", ""),
                       "traceback": "\n".join(content.get("traceback", []))}
            elif kind == "execute_input":
                out = {"type": "number_of_executions",
                       "execution_count": content.get("execution_count")}
            elif kind == "status" and content.get("execution_state") == "idle":
                # Collect the shell reply (so the channel does not fill up);
                # an aborted request ran nothing and must not look like a
                # silent success.
                try:
                    reply = self._wait_reply(msg_id, None)
                except ApiError:
                    reply = {}
                if reply.get("status") == "aborted" and not interrupted:
                    sink.send({"type": "error", "name": "ExecutionAborted",
                               "value": "the kernel aborted this execution", "traceback": ""})
                return
            if out is not None and not interrupted:
                try:
                    sink.send(out)
                except ClientGone:
                    self.km.interrupt_kernel()
                    interrupted = True


class BashContext:
    """One long-lived bash; each execution is sourced into it."""

    language = "bash"

    def __init__(self, cid: str, cwd: str):
        self.id = cid
        self.cwd = cwd
        self.lock = threading.Lock()
        self.count = 0
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix=f"stasis-bash-{cid}-")
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=self.cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, bufsize=0,
        )
        # An interrupt stops the running command, not the shell.
        self.proc.stdin.write(b"trap 'echo interrupted >&2' INT\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.shutdown()
        self._start()

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def execute(self, code: str, env_vars: dict | None, sink: Sink) -> None:
        if not self.alive():
            self.restart()
        self.count += 1
        sink.send({"type": "number_of_executions", "execution_count": self.count})
        marker = uuid.uuid4().hex
        cell = os.path.join(self.dir, "cell.sh")
        with open(cell, "w") as f:
            f.write(code)
            f.write("\n")
        exports = "".join(
            f"{k}={shell_quote(v)} " for k, v in (env_vars or {}).items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
        )
        # env vars apply to this execution only: a subshell would lose `cd`
        # and variables, so they are exported around the source instead.
        saved = ""
        restore = ""
        if exports:
            names = [k for k in (env_vars or {}) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
            saved = "".join(f"__stasis_{k}=${{{k}-__stasis_unset}}; " for k in names)
            restore = "".join(
                f"if [ \"$__stasis_{k}\" = __stasis_unset ]; then unset {k}; else export {k}=\"$__stasis_{k}\"; fi; "
                for k in names
            )
            exports = "export " + exports + "; "
        line = (f"{saved}{exports}source {shell_quote(cell)}; __stasis_rc=$?; {restore}"
                f"printf '\\n{marker} %d\\n' $__stasis_rc; printf '\\n{marker}\\n' >&2\n")
        self.proc.stdin.write(line.encode())
        self._pump(marker, sink)

    def _pump(self, marker: str, sink: Sink) -> None:
        streams = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        buffers = {"stdout": b"", "stderr": b""}
        done = {"stdout": False, "stderr": False}
        held = {"stdout": False, "stderr": False}
        rc = None
        interrupted = False
        end = marker.encode()
        while not all(done.values()):
            readable, _, _ = select.select(list(streams), [], [], POLL_SECONDS)
            if not readable:
                if not self.alive():
                    sink.send({"type": "error", "name": "ShellDied",
                               "value": "bash exited; it restarts on the next call", "traceback": ""})
                    return
                if not interrupted and sink.gone():
                    self._interrupt()
                    interrupted = True
                continue
            for fd in readable:
                name = streams[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    done[name] = True
                    continue
                buf = buffers[name] + chunk
                # Emit whole lines; keep a partial line (and a possible
                # partial marker) for the next read.
                while b"\n" in buf:
                    text, buf = buf.split(b"\n", 1)
                    if text.startswith(end):
                        # The marker follows a newline of its own: a blank
                        # line held back just before it was ours, not output.
                        done[name] = True
                        held[name] = False
                        rest = text[len(end):].strip()
                        if rest.isdigit():
                            rc = int(rest)
                        continue
                    if done[name] or interrupted:
                        continue
                    lines = []
                    if held[name]:
                        lines.append("\n")
                        held[name] = False
                    if text:
                        lines.append(text.decode(errors="replace") + "\n")
                    else:
                        held[name] = True
                    try:
                        for t in lines:
                            sink.send({"type": name, "text": t, "timestamp": now_ns()})
                    except ClientGone:
                        self._interrupt()
                        interrupted = True
                buffers[name] = buf
        if rc:
            sink.send({"type": "error", "name": "ExitCodeError", "value": f"exit status {rc}",
                       "traceback": ""})

    def _interrupt(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def shell_quote(s: str) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


class Contexts:
    """All contexts of this sandbox, and the default one of each language."""

    def __init__(self, default_cwd: str):
        self.default_cwd = default_cwd
        self.lock = threading.Lock()
        self.by_id: dict = {}
        self.defaults: dict = {}

    @staticmethod
    def language(name: str | None) -> str:
        lang = LANGUAGE_ALIASES.get((name or "python").lower())
        if lang is None:
            raise ApiError(400, f"language {name!r} is not supported (supported: python, bash)")
        return lang

    def create(self, language: str | None, cwd: str | None):
        lang = self.language(language)
        cwd = cwd or self.default_cwd
        if not os.path.isdir(cwd):
            raise ApiError(400, f"cwd {cwd!r} is not a directory")
        cid = uuid.uuid4().hex
        ctx = (PythonContext if lang == "python" else BashContext)(cid, cwd)
        with self.lock:
            self.by_id[cid] = ctx
        return ctx

    def default(self, language: str | None):
        lang = self.language(language)
        with self.lock:
            cid = self.defaults.get(lang)
            if cid in self.by_id:
                return self.by_id[cid]
        ctx = self.create(lang, None)
        with self.lock:
            # Two first calls may race: keep the first default, drop ours.
            if self.defaults.get(lang) in self.by_id:
                winner = self.by_id[self.defaults[lang]]
                del self.by_id[ctx.id]
                threading.Thread(target=ctx.shutdown, daemon=True).start()
                return winner
            self.defaults[lang] = ctx.id
        return ctx

    def get(self, cid: str):
        with self.lock:
            ctx = self.by_id.get(cid)
        if ctx is None:
            raise ApiError(404, f"context {cid!r} not found")
        return ctx

    def remove(self, cid: str) -> None:
        with self.lock:
            ctx = self.by_id.pop(cid, None)
            for lang, d in list(self.defaults.items()):
                if d == cid:
                    del self.defaults[lang]
        if ctx is None:
            raise ApiError(404, f"context {cid!r} not found")
        ctx.shutdown()

    def list(self) -> list:
        with self.lock:
            return [describe(c) for c in self.by_id.values()]

    def shutdown(self) -> None:
        with self.lock:
            ctxs = list(self.by_id.values())
            self.by_id.clear()
        for c in ctxs:
            c.shutdown()


def describe(ctx) -> dict:
    return {"id": ctx.id, "language": ctx.language, "cwd": ctx.cwd}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stasis-interpreter/1"
    contexts: Contexts  # set on the class by serve()

    def log_message(self, fmt, *args):  # noqa: D102 - quieter than the default
        if os.environ.get("STASIS_INTERPRETER_DEBUG"):
            super().log_message(fmt, *args)

    # --- plumbing ---------------------------------------------------------
    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        return data

    def _send(self, status: int, body=None) -> None:
        payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except ApiError as e:
            self._send(e.status, {"code": e.status, "message": e.message})
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answer, never drop the server
            self._send(500, {"code": 500, "message": f"{type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    # --- routes -----------------------------------------------------------
    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/health":
            return self._send(200, b"OK")
        if method == "POST" and path == "/execute":
            return self._execute(self._body())
        if path == "/contexts":
            if method == "POST":
                body = self._body()
                ctx = self.contexts.create(body.get("language"), body.get("cwd"))
                return self._send(200, describe(ctx))
            if method == "GET":
                return self._send(200, self.contexts.list())
        if len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            self.contexts.remove(parts[1])
            return self._send(204)
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" and method == "POST":
            ctx = self.contexts.get(parts[1])
            with ctx.lock:
                ctx.restart()
            return self._send(204)
        raise ApiError(404, f"no route {method} {path}")

    def _execute(self, body: dict) -> None:
        code = body.get("code")
        if not isinstance(code, str):
            raise ApiError(400, "`code` (a string) is required")
        env_vars = body.get("env_vars") or None
        if env_vars is not None and (not isinstance(env_vars, dict)
                                     or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env_vars.items())):
            raise ApiError(400, "`env_vars` must map strings to strings")
        if body.get("context_id") and body.get("language"):
            raise ApiError(400, "give `context_id` or `language`, not both")
        if body.get("context_id"):
            ctx = self.contexts.get(body["context_id"])
        else:
            ctx = self.contexts.default(body.get("language"))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sink = Sink(self)
        with ctx.lock:
            try:
                ctx.execute(code, env_vars, sink)
                sink.send({"type": "end_of_execution"})
            except ClientGone:
                self.close_connection = True
                return
            except ApiError as e:
                try:
                    sink.send({"type": "error", "name": "InterpreterError", "value": e.message,
                               "traceback": ""})
                except ClientGone:
                    self.close_connection = True
                    return
        sink.close()


def serve(host: str, port: int, cwd: str, ready=None) -> None:
    contexts = Contexts(cwd)
    Handler.contexts = contexts
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"stasis-interpreter: listening on {host}:{server.server_address[1]}", flush=True)
    if ready:
        ready(server.server_address[1])
    try:
        # The default python context starts with the server, so the first
        # run_code does not wait for a kernel.
        if os.environ.get("STASIS_INTERPRETER_PREWARM", "1") == "1":
            threading.Thread(target=lambda: contexts.default("python"), daemon=True).start()
        server.serve_forever(poll_interval=0.5)
    finally:
        contexts.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("STASIS_INTERPRETER_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("STASIS_INTERPRETER_PORT", DEFAULT_PORT)))
    home = os.environ.get("HOME") or "/home/user"
    p.add_argument("--cwd", default="/home/user" if os.path.isdir("/home/user") else home)
    a = p.parse_args()
    serve(a.host, a.port, a.cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
