"""The JS SDK (npm `novita-sandbox` 2.1.1) under node: signed URLs and
metrics (js_sdk.cjs). node and npm must be installed (Debian `nodejs` and
`npm`; .ci/run installs them); tests/js/install-sdk.sh installs the SDK
once into target/sdk-node from the npm registry."""

import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def js_sdk_dir():
    """tests/js/install-sdk.sh: the shared, once-installed JS SDK."""
    script = os.path.join(HERE, "..", "js", "install-sdk.sh")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"installing the JS SDK failed:\n{r.stdout}\n{r.stderr}"
    return os.path.join(r.stdout.strip().splitlines()[-1], "node_modules", "novita-sandbox")


def test_js_sdk_signed_urls_and_metrics():
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install Debian's nodejs and npm (apt-get install -y nodejs npm); "
                        ".ci/run must install them for this test")
    env = dict(os.environ, NOVITA_JS_SDK=js_sdk_dir())
    r = subprocess.run(["node", os.path.join(HERE, "js_sdk.cjs")], env=env, capture_output=True, text=True,
                       timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"node js_sdk.cjs failed:\n{r.stdout}\n{r.stderr}"
    assert "JS OK" in r.stdout
