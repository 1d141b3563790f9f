"""Issue 10's proof in a Linux sandbox, through the real novita-sandbox
code-interpreter SDK: `code-interpreter-v1` on the Debian code-interpreter
image (rootfs/build-image.sh --code-interpreter), reached exactly as a
self-hosted user's SDK reaches it: `https://49999-{id}.{domain}` over TLS,
the domain from the create response, the certificate trusted through
SSL_CERT_FILE. The one stand-in is DNS: getaddrinfo answers every name under
the domain with STASIS_TLS_IP (where the server's TLS listener is reached).

Flow: create -> run_code('x = 41') -> a pandas DataFrame -> beta_pause ->
(a fresh process) Sandbox.connect -> run_code('x + 1') == 42, the DataFrame
and the contexts are the same -> the same flow through the real JS SDK
(interpreter_proof.mjs in node: connect, runCode, betaPause, connect,
runCode) -> the image's tools through commands -> the
interpreter service killed inside the guest is restarted by init -> kill.

Run by tests/linux_interpreter.rs as the client of tests/nested/run-l1.sh's
`serve` scenario, or by hand against any `stasis serve --domain D
--tls-listen ... --kernel K --rootfs R --interpreter-rootfs CI_IMG`:

    NOVITA_API_URL=http://127.0.0.1:3000 NOVITA_API_KEY=KEY SSL_CERT_FILE=ca.pem \\
    STASIS_TLS_IP=127.0.0.1 STASIS_PROOF_DOMAIN=D target/sdk-venv/bin/python \\
        tests/nested/interpreter_proof.py

Numbers go to stdout as lines starting with "PROOF:"; the last one starts with
"PROOF: SUMMARY". Exit status 0 only if every check passed.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

DOMAIN = os.environ.get("STASIS_PROOF_DOMAIN", "sandbox.test")
TLS_IP = os.environ.get("STASIS_TLS_IP", "")
RT = float(os.environ.get("STASIS_PROOF_REQUEST_TIMEOUT", "900"))
ROWS = int(os.environ.get("STASIS_PROOF_DF_ROWS", "2000000"))
ROUND_TRIPS = 5

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, port, *args, **kwargs):
    if TLS_IP and isinstance(host, str) and (host == DOMAIN or host.endswith("." + DOMAIN)):
        host = TLS_IP
    return _real_getaddrinfo(host, port, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo

from novita_sandbox.code_interpreter import Sandbox  # noqa: E402 - after the DNS stand-in
from novita_sandbox.core import SandboxState  # noqa: E402


def proof(msg):
    print(f"PROOF: {msg}", flush=True)


def run(sbx, code, language=None):
    ex = sbx.run_code(code, language=language, timeout=RT, request_timeout=RT)
    if ex.error is not None:
        raise AssertionError(
            f"{code!r} raised {ex.error.name}: {ex.error.value}\n{ex.error.traceback}"
        )
    return ex


def wait_until(pred, secs, what):
    """Polls pred until it returns a truthy value or secs pass."""
    deadline = time.monotonic() + secs
    last = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out after {secs} s waiting for {what} (last error: {last!r})")


def first_process():
    for var in ("NOVITA_API_URL", "NOVITA_API_KEY", "SSL_CERT_FILE"):
        assert os.environ.get(var), f"{var} is not set"
    os.environ.pop("NOVITA_SANDBOX_URL", None)
    os.environ.pop("NOVITA_DEBUG", None)

    t0 = time.monotonic()
    sbx = Sandbox.create(timeout=3600, request_timeout=RT)
    create_s = time.monotonic() - t0
    try:
        host = sbx.get_host(49999)
        assert host == f"49999-{sbx.sandbox_id}.{DOMAIN}", (host, DOMAIN)
        proof(f"sandbox {sbx.sandbox_id} (template code-interpreter-v1) created in {create_s:.2f} s; "
              f"interpreter at https://{host}")
        assert run(sbx, "x = 41").error is None
        first_s = time.monotonic() - t0
        proof(f"create -> first run_code result: {first_s:.2f} s")

        where = run(sbx, "import os, platform, sys\n"
                         "(platform.system(), platform.release(), sys.version.split()[0], os.getuid(), os.getcwd())").text
        proof(f"the kernel runs in: {where}")
        assert where.startswith("('Linux'"), where  # a tuple: its strings keep their quotes
        assert ", 1000, '/home/user')" in where, f"the kernel is not user's (uid 1000, /home/user): {where}"

        rts = []
        for _ in range(ROUND_TRIPS):
            t = time.monotonic()
            assert run(sbx, "1+1").text == "2"
            rts.append(time.monotonic() - t)
        rt_ms = statistics.median(rts) * 1000
        proof(f"run_code('1+1') round trip: median {rt_ms:.0f} ms "
              f"(min {min(rts) * 1000:.0f}, max {max(rts) * 1000:.0f}, n={ROUND_TRIPS})")

        t = time.monotonic()
        run(sbx, "import numpy as np, pandas as pd\n"
                 f"df = pd.DataFrame({{'a': np.arange({ROWS}), 'b': np.arange({ROWS}) * 0.5}})")
        df_s = time.monotonic() - t
        df_sum = run(sbx, "int(df['a'].sum())").text
        assert df_sum == str(ROWS * (ROWS - 1) // 2), df_sum
        df_mib = float(run(sbx, "df.memory_usage(deep=True).sum() / 2**20").text)
        contexts = sorted(c.id for c in sbx.list_code_contexts())
        proof(f"DataFrame of {ROWS} rows ({df_mib:.0f} MiB) made in {df_s:.2f} s; contexts {contexts}")

        t = time.monotonic()
        sbx.beta_pause(request_timeout=RT)
        pause_s = time.monotonic() - t
        state = Sandbox.get_info(sbx.sandbox_id, request_timeout=RT).state
        assert state == SandboxState.PAUSED, state
        proof(f"beta_pause: {pause_s:.2f} s; listed as paused")

        # The resume in a fresh process, as a user's next program does it.
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "resume", sbx.sandbox_id,
             json.dumps({"contexts": contexts, "df_sum": df_sum})],
            stdout=subprocess.PIPE, text=True, timeout=4 * RT,
        )
        sys.stdout.write(child.stdout)
        assert child.returncode == 0, f"the resuming process failed ({child.returncode})"
        res = json.loads([line for line in child.stdout.splitlines() if line.startswith("RESUMED ")][-1][8:])
        proof(
            f"SUMMARY create {create_s:.2f} s, create -> first result {first_s:.2f} s, "
            f"1+1 round trip {rt_ms:.0f} ms (median), DataFrame {df_mib:.0f} MiB, pause {pause_s:.2f} s, "
            f"connect {res['connect_s']:.2f} s, connect -> next result {res['next_s']:.2f} s, "
            f"JS SDK pause {res['js']['pause_s']:.2f} s, connect {res['js']['connect_s']:.2f} s, "
            f"next result {res['js']['next_s']:.2f} s, "
            f"interpreter restarted by init in {res['restart_s']:.2f} s"
        )
    finally:
        try:
            Sandbox.kill(sbx.sandbox_id, request_timeout=RT)
        except Exception as e:  # noqa: BLE001 - best effort
            print(f"cleanup: kill {sbx.sandbox_id}: {e}", flush=True)


def resuming_process(sandbox_id, expect):
    expect = json.loads(expect)
    t0 = time.monotonic()
    sbx = Sandbox.connect(sandbox_id, timeout=3600, request_timeout=RT)
    connect_s = time.monotonic() - t0
    assert sbx.get_host(49999) == f"49999-{sandbox_id}.{DOMAIN}"
    got = run(sbx, "x + 1").text
    next_s = time.monotonic() - t0
    assert got == "42", f"x + 1 after the resume is {got!r}, not '42'"
    proof(f"fresh process: connect {connect_s:.2f} s, run_code('x + 1') -> {got} "
          f"{next_s:.2f} s after connect began")
    df_sum = run(sbx, "int(df['a'].sum())").text
    assert df_sum == expect["df_sum"], (df_sum, expect["df_sum"])
    contexts = sorted(c.id for c in sbx.list_code_contexts())
    assert contexts == expect["contexts"], (contexts, expect["contexts"])
    proof(f"after the resume: the DataFrame (sum {df_sum}) and the contexts {contexts} are the same")

    js = js_flow(sandbox_id)

    # The image is the one users expect (through the agent, also over TLS).
    r = sbx.commands.run(
        "id -un; sudo -n id -un; python --version; pip --version | cut -d' ' -f1-2; "
        "git --version; curl --version | head -n1 | cut -d' ' -f1-2; tput -V; true",
        timeout=int(RT), request_timeout=RT,
    )
    lines = r.stdout.splitlines()
    proof(f"commands in the image: {lines}")
    assert r.exit_code == 0 and lines[:2] == ["user", "root"], r
    assert lines[2].startswith("Python 3.") and lines[3].startswith("pip "), lines

    # The interpreter service dies: init starts it again (the kernel's
    # variables go with it; the next run_code works). A bash context answers
    # without a kernel start (minutes under nested emulation).
    t = time.monotonic()
    sbx.commands.run("pkill -f 'stasis_[i]nterpreter.py' || true", request_timeout=RT)
    wait_until(lambda: "up" in run(sbx, "echo up", language="bash").logs.stdout[0], RT,
               "the interpreter after it was killed")
    restart_s = time.monotonic() - t
    proof(f"the interpreter service was killed in the guest and answered again after {restart_s:.2f} s")
    print("RESUMED " + json.dumps({"connect_s": connect_s, "next_s": next_s, "restart_s": restart_s,
                                   "js": js}), flush=True)


def js_flow(sandbox_id):
    """The same flow through the real JS SDK (interpreter_proof.mjs), in node:
    connect, runCode, betaPause, connect, runCode; its result as a dict."""
    here = os.path.dirname(os.path.abspath(__file__))
    js_dir = os.environ.get("STASIS_JS_SDK_DIR") or os.path.join(here, "..", "..", "target", "sdk-node")
    assert os.path.isdir(os.path.join(js_dir, "node_modules", "novita-sandbox")), \
        f"no JS SDK in {js_dir} (tests/js/install-sdk.sh installs it; STASIS_JS_SDK_DIR names another)"
    # ES modules resolve packages from their own directory: run the script
    # from the one the SDK was installed in.
    script = os.path.join(js_dir, "stasis-interpreter-proof.mjs")
    with open(os.path.join(here, "interpreter_proof.mjs")) as src, open(script, "w") as dst:
        dst.write(src.read())
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=os.environ["SSL_CERT_FILE"])
    out = subprocess.run(
        [os.environ.get("STASIS_NODE", "node"), "--require",
         os.path.join(here, "..", "interpreter", "sdk", "dns-standin.js"), script, sandbox_id],
        env=env, cwd=js_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=4 * RT,
    )
    sys.stdout.write(out.stdout)
    ok = [line for line in out.stdout.splitlines() if line.startswith("JS-PROOF-OK ")]
    assert out.returncode == 0 and ok, f"the JS SDK's flow failed (node exit {out.returncode})"
    return json.loads(ok[-1][len("JS-PROOF-OK "):])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "resume":
        resuming_process(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 1:
        first_process()
    else:
        sys.exit(f"usage: {sys.argv[0]} [resume SANDBOX_ID EXPECT_JSON]")
