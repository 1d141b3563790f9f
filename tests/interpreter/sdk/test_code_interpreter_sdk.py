"""The seed's persistence flow written with run_code, through the real
novita-sandbox code-interpreter SDK against `stasis serve` (fake backend):
create -> run_code('x = 1') -> beta_pause -> connect -> run_code('x') -> 1,
with the SDK reaching the interpreter at https://49999-{id}.{domain}."""

import os
import shutil
import subprocess

import pytest
from novita_sandbox.code_interpreter import Sandbox


def test_run_code_survives_pause_and_resume(stasis):
    sbx = Sandbox.create(timeout=120)
    try:
        assert sbx.get_host(49999) == f"49999-{sbx.sandbox_id}.sandbox.test"
        assert sbx.run_code("x = 1").error is None
        setup = sbx.run_code("import pandas as pd\ndf = pd.DataFrame({'a': range(1000)})\n"
                     "import threading, time\nticks = [0]\n"
                     "def _t():\n    while True:\n        ticks[0] += 1\n        time.sleep(0.05)\n"
                     "threading.Thread(target=_t, daemon=True).start()\n"
                     "fh = open('kept.txt', 'w'); fh.write('open handle'); fh.flush()")
        assert setup.error is None, setup.error
        contexts = {c.id for c in sbx.list_code_contexts()}
        before = int(sbx.run_code("ticks[0]").text)

        sbx.beta_pause()
        assert sbx.get_info().state == "paused"
        resumed = Sandbox.connect(sbx.sandbox_id)

        assert resumed.run_code("x").text == "1"
        assert resumed.run_code("int(df['a'].sum())").text == str(sum(range(1000)))
        assert resumed.run_code("fh.closed").text == "False"
        after = int(resumed.run_code("ticks[0]").text)
        assert after >= before
        # The background thread keeps running after the resume.
        later = after
        for _ in range(200):
            later = int(resumed.run_code("ticks[0]").text)
            if later > after:
                break
        assert later > after, "the kernel's background thread stopped"
        assert {c.id for c in resumed.list_code_contexts()} == contexts
        assert resumed.run_code("x + 1").text == "2"
    finally:
        sbx.kill()


def test_envd_and_interpreter_share_the_sandbox(stasis):
    sbx = Sandbox.create(timeout=60)
    try:
        sbx.files.write("data.txt", "from files")
        ex = sbx.run_code("open('data.txt').read()")
        assert ex.text == "from files"
        r = sbx.commands.run("echo $((6*7))")
        assert r.stdout.strip() == "42"
    finally:
        sbx.kill()


def test_js_sdk_run_code_through_tls(stasis):
    node = os.environ.get("STASIS_NODE", "node")
    js_dir = os.environ.get("STASIS_JS_SDK_DIR")
    if not js_dir:
        pytest.fail("STASIS_JS_SDK_DIR is not set: the JS SDK was not installed (tests/interpreter/run.sh does it)")
    env = dict(os.environ, **stasis["env"], NODE_EXTRA_CA_CERTS=stasis["ca"],
               STASIS_TLS_IP=stasis["tls_ip"])
    env.pop("SSL_CERT_FILE", None)
    here = os.path.dirname(os.path.abspath(__file__))
    # ES modules resolve packages from their own directory: run the flow
    # from the one the SDK was installed in.
    flow = os.path.join(js_dir, "stasis-flow.mjs")
    shutil.copyfile(os.path.join(here, "flow.mjs"), flow)
    out = subprocess.run(
        [node, "--require", os.path.join(here, "dns-standin.js"), flow],
        env=env, capture_output=True, text=True, timeout=240, cwd=js_dir,
    )
    assert out.returncode == 0, f"node failed:\n{out.stdout}\n{out.stderr}"
    assert "JS-FLOW-OK x=1 chart=bar:a/n=3,b/n=5" in out.stdout, out.stdout
