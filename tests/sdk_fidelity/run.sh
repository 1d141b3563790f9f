#!/usr/bin/env bash
# SDK-fidelity tests (tests/sdk_fidelity): the novita-sandbox Python SDK (and,
# for test_js.py, the JS SDK under node) against a fresh `stasis serve
# --backend fake` on a free port, with the `agent` template (the fake
# backend's host agent). No KVM needed.
#   tests/sdk_fidelity/run.sh [pytest args...]
# The Python venv is shared with tests/sdk (target/sdk-venv, override with
# STASIS_SDK_VENV) and created on first use (needs PyPI); the JS SDK is
# installed once into target/sdk-node (tests/js/install-sdk.sh, npm registry).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# tests/sdk/run.sh starts the server (fake backend, `agent` template) and
# runs pytest here; metrics are sampled every 200 ms so the tests see some.
STASIS_BACKEND=fake STASIS_SDK_TESTS="$ROOT/tests/sdk_fidelity" \
  STASIS_METRICS_INTERVAL_MS=${STASIS_METRICS_INTERVAL_MS:-200} \
  exec bash "$ROOT/tests/sdk/run.sh" "$@"
