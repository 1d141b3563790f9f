#!/usr/bin/env bash
# Runs the code-interpreter server's tests (tests/interpreter) through the
# real novita-sandbox SDK, then the SDK's own shipped code-interpreter test
# suite against the server (tests/interpreter/sdk_suite.py). The venv
# (target/interpreter-venv, override with STASIS_INTERPRETER_VENV) pins the
# kernel side (jupyter-client, ipykernel, IPython, matplotlib and its inline
# backend, numpy, pandas, Pillow) to the versions Debian bookworm ships, the
# ones the sandbox image runs; it is created once (under a lock, so parallel
# runs share it), recreated when a pin changes, and needs PyPI.
#   tests/interpreter/run.sh [pytest args...]   (args: the first run only)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_INTERPRETER_VENV:-$ROOT/target/interpreter-venv}
SDK_VERSION=${NOVITA_SANDBOX_VERSION:-2.1.1}
PKGS=("novita-sandbox==$SDK_VERSION" pytest pytest-asyncio "jupyter-client==7.4.9" "ipykernel==6.17.0"
  "ipython==8.5.0" "matplotlib==3.6.3" "matplotlib-inline==0.1.6" "numpy==1.24.2" "pandas==1.5.3"
  "pillow==9.4.0")

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Every package importable, at its pinned version.
if ! "$VENV/bin/python" - "${PKGS[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import novita_sandbox, pytest, pytest_asyncio, jupyter_client, ipykernel, IPython, matplotlib, numpy, pandas, PIL
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    if want and version(name) != want:
        sys.exit(1)
PY
then
  echo "run.sh: creating $VENV (${PKGS[*]})" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "${PKGS[@]}"
fi
flock -u 9

# The JS SDK (npm), for the JS flow of tests/interpreter/sdk.
STASIS_JS_SDK_DIR=$(bash "$ROOT/tests/js/install-sdk.sh" | tail -n1)
export STASIS_JS_SDK_DIR

# The SDK addresses the server at localhost:49999 (its JUPYTER_PORT, debug
# mode): runs from several checkouts on one machine take turns.
exec 8>/tmp/stasis-interpreter-49999.lock
flock 8
cd "$ROOT/tests/interpreter"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
# The SDK's own tests (charts, display data, contexts, streaming, ...), with
# the ones that cannot apply to a host-run server listed and deselected.
"$VENV/bin/python" sdk_suite.py
