"""The JS SDK (npm `novita-sandbox` 2.1.1) under node: signed URLs and
metrics (js_sdk.cjs). node and npm must be installed (Debian `nodejs` and
`npm`; .ci/run installs them); the SDK is installed into target/sdk-node
(override with STASIS_SDK_NODE) on first use from the npm registry."""

import fcntl
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
JS_SDK_VERSION = os.environ.get("NOVITA_JS_SDK_VERSION", "2.1.1")


def js_sdk_dir():
    root = os.environ.get("STASIS_ROOT") or os.path.abspath(os.path.join(HERE, "..", ".."))
    d = os.environ.get("STASIS_SDK_NODE") or os.path.join(root, "target", "sdk-node")
    os.makedirs(d, exist_ok=True)
    pkg = os.path.join(d, "node_modules", "novita-sandbox")
    with open(os.path.join(d, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(pkg, "package.json")):
            if not os.path.exists(os.path.join(d, "package.json")):
                with open(os.path.join(d, "package.json"), "w") as f:
                    f.write('{"private": true}\n')
            r = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", f"novita-sandbox@{JS_SDK_VERSION}"],
                cwd=d, capture_output=True, text=True, timeout=600,
            )
            assert r.returncode == 0, f"npm install failed:\n{r.stdout}\n{r.stderr}"
    return pkg


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
