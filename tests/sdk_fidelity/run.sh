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
# The venv shared with tests/sdk, made once under its lock.
VENV=$(bash "$ROOT/tests/sdk/run.sh" --venv-only | tail -n1)

if [ -n "${STASIS_BIN:-}" ]; then
  BIN=$STASIS_BIN
else
  cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" --bin stasis --bin stasis-envd
  BIN="$ROOT/target/release/stasis"
fi

WORK=$(mktemp -d)
KEY="sdk-fidelity-$RANDOM$RANDOM"
mkdir -p "$WORK/data/templates"
echo '{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}' >"$WORK/data/templates/agent.json"
STASIS_METRICS_INTERVAL_MS=${STASIS_METRICS_INTERVAL_MS:-200} "$BIN" serve --listen 127.0.0.1:0 --backend fake --data-dir "$WORK/data" --api-key "$KEY" \
  ${STASIS_SERVE_ARGS:-} >"$WORK/stdout" 2>"$WORK/server.log" &
SERVER=$!
cleanup() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  if [ "${KEEP_LOG:-}" = 1 ]; then echo "server log: $WORK/server.log" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

URL=""
for _ in $(seq 1 300); do
  URL=$(sed -n 's/^stasis: listening on //p' "$WORK/stdout" | head -n1)
  [ -n "$URL" ] && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { echo "run.sh: server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }

cd "$ROOT/tests/sdk_fidelity"
NOVITA_API_URL="$URL" NOVITA_SANDBOX_URL="$URL" NOVITA_API_KEY="$KEY" STASIS_BIN="$BIN" \
  STASIS_DATA_DIR="$WORK/data" STASIS_ROOT="$ROOT" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
