#!/usr/bin/env bash
# Runs the agent tests (tests/envd) with the novita-sandbox SDK against a
# running stasis-envd: tests/envd_sdk.rs starts the agent and sets
# ENVD_URL, ENVD_ROOT and ENVD_VERSION.
#   tests/envd/run.sh [pytest args...]
# The venv is shared with tests/sdk (target/sdk-venv, override with
# STASIS_SDK_VENV) and created on first use (needs PyPI).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_SDK_VENV:-$ROOT/target/sdk-venv}
SDK_VERSION=${NOVITA_SANDBOX_VERSION:-2.1.1}

if ! "$VENV/bin/python" -c "import novita_sandbox, pytest" 2>/dev/null; then
  echo "run.sh: creating $VENV (novita-sandbox==$SDK_VERSION, pytest)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "novita-sandbox==$SDK_VERSION" pytest
fi

cd "$ROOT/tests/envd"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
