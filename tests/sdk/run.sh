#!/usr/bin/env bash
# Runs the novita-sandbox Python SDK tests (tests/sdk) against a fresh
# `stasis serve` on a free port with a temporary data dir.
#   tests/sdk/run.sh [pytest args...]
#   STASIS_BACKEND=fake tests/sdk/run.sh test_agent.py   # commands/files via the host agent
#   tests/sdk/run.sh --venv-only    # only make sure the venv exists; print its path
# The venv lives in target/sdk-venv (override with STASIS_SDK_VENV) and is
# created on first use (needs PyPI), once: test binaries that run in
# parallel (tests/sdk.rs, tests/envd_sdk.rs through tests/envd/run.sh) take
# an exclusive lock (flock on "$VENV.lock") around the check-and-create, so
# one creates it and the others wait and reuse it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_SDK_VENV:-$ROOT/target/sdk-venv}
SDK_VERSION=${NOVITA_SANDBOX_VERSION:-2.1.1}

venv_ready() { "$VENV/bin/python" -c "import novita_sandbox, pytest" 2>/dev/null; }
if ! venv_ready; then
  mkdir -p "$(dirname "$VENV")"
  (
    flock -x 9
    # Checked again under the lock: another run may have made it meanwhile.
    if ! venv_ready; then
      echo "run.sh: creating $VENV (novita-sandbox==$SDK_VERSION, pytest)" >&2
      # --clear: a half-made venv (an interrupted earlier run) starts over.
      python3 -m venv --clear "$VENV"
      "$VENV/bin/pip" install --quiet "novita-sandbox==$SDK_VERSION" pytest
    fi
  ) 9>"$VENV.lock"
  venv_ready || { echo "run.sh: $VENV is not usable" >&2; exit 1; }
fi
if [ "${1:-}" = --venv-only ]; then
  echo "$VENV"
  exit 0
fi

# STASIS_BIN: a built binary (the Rust wrapper test passes its own);
# STASIS_BACKEND: vm (real KVM guests, the default) or fake.
if [ -n "${STASIS_BIN:-}" ]; then
  BIN=$STASIS_BIN
else
  cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" --bin stasis --bin stasis-envd
  BIN="$ROOT/target/release/stasis"
fi
BACKEND=${STASIS_BACKEND:-vm}

WORK=$(mktemp -d)
KEY="sdk-test-$RANDOM$RANDOM"
# The `agent` template of tests/sdk/test_agent.py: the fake backend's host
# agent (stasis-envd next to the stasis binary), or a Linux guest with the
# agent when STASIS_KERNEL and STASIS_ROOTFS are given.
mkdir -p "$WORK/data/templates"
if [ -n "${STASIS_KERNEL:-}" ] && [ -n "${STASIS_ROOTFS:-}" ]; then
  printf '{"kernel": "%s", "rootfs": "%s", "cmdline": "%s", "memoryMB": %s, "vcpus": 1, "agent": true}\n' \
    "$STASIS_KERNEL" "$STASIS_ROOTFS" \
    "${STASIS_CMDLINE:-console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd root=/dev/vda rw}" \
    "${STASIS_MEMORY_MB:-512}" >"$WORK/data/templates/agent.json"
elif [ "$BACKEND" = fake ]; then
  echo '{"kernel": "testguest", "memoryMB": 64, "vcpus": 1, "agent": true}' >"$WORK/data/templates/agent.json"
fi
"$BIN" serve --listen 127.0.0.1:0 --backend "$BACKEND" --data-dir "$WORK/data" --api-key "$KEY" \
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

# STASIS_SDK_TESTS: the pytest directory (default tests/sdk; tests/sdk_fidelity
# runs through here too).
cd "${STASIS_SDK_TESTS:-$ROOT/tests/sdk}"
# NOVITA_SANDBOX_URL: in-sandbox (envd) requests go to the server too, with
# the Novita-Sandbox-Id/-Port headers.
NOVITA_API_URL="$URL" NOVITA_SANDBOX_URL="$URL" NOVITA_API_KEY="$KEY" STASIS_BIN="$BIN" \
  STASIS_DATA_DIR="$WORK/data" STASIS_BACKEND="$BACKEND" STASIS_ROOT="$ROOT" \
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
