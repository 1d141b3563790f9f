#!/usr/bin/env bash
# Runs the agent tests (tests/envd) with the novita-sandbox SDK against a
# running stasis-envd: tests/envd_sdk.rs starts the agent and sets
# ENVD_URL, ENVD_ROOT and ENVD_VERSION.
#   tests/envd/run.sh [pytest args...]
# The venv is tests/sdk's (target/sdk-venv, override with STASIS_SDK_VENV):
# tests/sdk/run.sh --venv-only makes it, once, under its lock.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=$(bash "$ROOT/tests/sdk/run.sh" --venv-only | tail -n1)

cd "$ROOT/tests/envd"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
