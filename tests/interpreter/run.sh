#!/usr/bin/env bash
# Runs the code-interpreter server's tests (tests/interpreter) through the
# real novita-sandbox SDK. The venv (target/interpreter-venv, override with
# STASIS_INTERPRETER_VENV) pins jupyter-client and ipykernel to the versions
# Debian bookworm ships, the ones the sandbox image runs; it is created once
# (under a lock, so parallel runs share it) and needs PyPI.
#   tests/interpreter/run.sh [pytest args...]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_INTERPRETER_VENV:-$ROOT/target/interpreter-venv}
SDK_VERSION=${NOVITA_SANDBOX_VERSION:-2.1.1}
PKGS=("novita-sandbox==$SDK_VERSION" pytest "jupyter-client==7.4.9" "ipykernel==6.17.0" matplotlib pandas)

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if ! "$VENV/bin/python" -c "import novita_sandbox, pytest, jupyter_client, ipykernel, matplotlib, pandas" 2>/dev/null; then
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
