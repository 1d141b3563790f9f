#!/usr/bin/env python3
"""A stand-in for `stasis-envd --uds PATH --root DIR`, for the proxy tests:
it speaks the agent socket's handshake (`CONNECT <port>\\n` -> `OK <port>\\n`;
port 49983 serves HTTP, port 49982 forwards to a local TCP port) and serves a
few test endpoints. One request per connection.

  GET  /health        204
  GET  /counter       a counter a background thread advances (process memory)
  GET  /pid           this process's pid
  GET  /headers       the request's headers as JSON
  GET  /stream        chunked, a line every 20 ms, endless
  POST /echo          the request body, echoed chunk by chunk as it arrives
  GET  /spawn         starts an orphaned process in its own session (like a
                      daemonized user command); it writes its pid to
                      spawned.pid in the root dir

STANDIN_MODE=silent: never listens (an agent that never starts).
"""

import json
import os
import socket
import socketserver
import sys
import threading
import time

ENVD_PORT = 49983
FORWARD_PORT = 49982

counter = 0
ROOT = "."


def count():
    global counter
    while True:
        counter += 1
        time.sleep(0.01)


def read_line(f, limit=65536):
    line = f.readline(limit)
    if not line.endswith(b"\n"):
        raise EOFError("connection closed mid-line")
    return line[:-1].decode("latin-1").rstrip("\r")


def send_chunk(w, data):
    w.write(b"%x\r\n%s\r\n" % (len(data), data))
    w.flush()


def respond(w, status, body=b"", ctype="text/plain"):
    reason = {200: "OK", 204: "No Content", 404: "Not Found"}.get(status, "X")
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
    if status != 204:
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    w.write(head.encode() + b"\r\n" + (body if status != 204 else b""))
    w.flush()


def serve_http(r, w):
    request_line = read_line(r)
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    while True:
        line = read_line(r)
        if not line:
            break
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    path = target.split("?", 1)[0]
    if path == "/health":
        respond(w, 204)
    elif path == "/counter":
        respond(w, 200, str(counter).encode())
    elif path == "/pid":
        respond(w, 200, str(os.getpid()).encode())
    elif path == "/spawn":
        import subprocess
        subprocess.Popen(
            ["sh", "-c", "setsid sh -c 'echo $$ > spawned.pid.tmp; mv spawned.pid.tmp spawned.pid; "
             "while :; do sleep 0.05; done' >/dev/null 2>&1 &"],
            cwd=ROOT).wait()
        respond(w, 200, b"spawned")
    elif path == "/headers":
        respond(w, 200, json.dumps(headers).encode(), "application/json")
    elif path == "/stream":
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: text/plain\r\n\r\n")
        i = 0
        while True:
            send_chunk(w, b"tick %d\n" % i)
            i += 1
            time.sleep(0.02)
    elif path == "/echo" and method == "POST":
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n")
        w.flush()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                n = int(read_line(r).split(";")[0], 16)
                if n == 0:
                    read_line(r)
                    break
                data = r.read(n)
                read_line(r)
                send_chunk(w, data)
        else:
            left = int(headers.get("content-length", "0"))
            while left > 0:
                data = r.read1(min(left, 65536))
                if not data:
                    break
                left -= len(data)
                send_chunk(w, data)
        w.write(b"0\r\n\r\n")
        w.flush()
    else:
        respond(w, 404, b'{"message":"no such route"}', "application/json")


def splice(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        try:
            words = read_line(self.rfile).split()
            if len(words) != 2 or words[0] != "CONNECT":
                return
            port = int(words[1])
            if port not in (ENVD_PORT, FORWARD_PORT):
                return
            self.wfile.write(b"OK %d\n" % port)
            self.wfile.flush()
            if port == ENVD_PORT:
                serve_http(self.rfile, self.wfile)
                return
            target = int(read_line(self.rfile))
            try:
                out = socket.create_connection(("127.0.0.1", target), timeout=5)
            except OSError as e:
                self.wfile.write(f"ERR connect 127.0.0.1:{target}: {e.strerror}\n".encode())
                self.wfile.flush()
                return
            out.settimeout(None)
            self.wfile.write(b"OK\n")
            self.wfile.flush()
            # The proxy sends nothing before our OK, so rfile holds no
            # read-ahead and the raw socket can be spliced.
            t = threading.Thread(target=splice, args=(out, self.connection), daemon=True)
            t.start()
            splice(self.connection, out)
            t.join()
            out.close()
        except (EOFError, OSError, ValueError):
            pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    args = sys.argv[1:]
    uds = args[args.index("--uds") + 1]
    global ROOT
    if "--root" in args:
        ROOT = args[args.index("--root") + 1]
    if os.environ.get("STANDIN_MODE") == "silent":
        while True:
            time.sleep(3600)
    threading.Thread(target=count, daemon=True).start()
    try:
        os.unlink(uds)
    except FileNotFoundError:
        pass
    with Server(uds, Handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    main()
