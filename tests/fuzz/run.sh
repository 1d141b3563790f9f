#!/usr/bin/env bash
# Fuzzes the lifecycle API of a fresh `stasis serve --backend fake` from its
# own /openapi.json with schemathesis (PyPI, pinned), a bounded number of
# examples per operation, and fails on any 5xx or any panic in the server's
# log. Operations marked `x-stasis-unsupported` (the SDK's routes that
# stasis answers 501 by design) are left out.
#   tests/fuzz/run.sh                  # STASIS_BIN: the binary (default: cargo build)
#   STASIS_FUZZ_EXAMPLES=N             # examples per operation (default 60)
#   STASIS_FUZZ_SEED=S                 # hypothesis seed (default fixed; printed)
#   tests/fuzz/run.sh --venv-only      # only make sure the venv exists
# The venv lives in target/fuzz-venv (STASIS_FUZZ_VENV overrides), made
# once under a lock (flock on "$VENV.lock").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_FUZZ_VENV:-$ROOT/target/fuzz-venv}
SCHEMATHESIS_VERSION=4.32.5

venv_ready() { "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; }
if ! venv_ready; then
  mkdir -p "$(dirname "$VENV")"
  (
    flock -x 9
    if ! venv_ready; then
      echo "fuzz/run.sh: creating $VENV (schemathesis==$SCHEMATHESIS_VERSION)" >&2
      python3 -m venv --clear "$VENV"
      "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
    fi
  ) 9>"$VENV.lock"
  venv_ready || { echo "fuzz/run.sh: $VENV is not usable" >&2; exit 1; }
fi
if [ "${1:-}" = --venv-only ]; then
  echo "$VENV"
  exit 0
fi

if [ -n "${STASIS_BIN:-}" ]; then
  BIN=$STASIS_BIN
else
  cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" --bin stasis
  BIN="$ROOT/target/release/stasis"
fi
EXAMPLES=${STASIS_FUZZ_EXAMPLES:-60}
SEED=${STASIS_FUZZ_SEED:-20261202}
KEY="fuzz-key-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

mkdir -p "$ROOT/target/tmp"
WORK=$(mktemp -d "$ROOT/target/tmp/fuzz-api-XXXXXX")
mkdir -p "$WORK/data/templates"
# A small template the fuzzer may name, next to the built-in ones.
echo '{"kernel": "testguest", "memoryMB": 64, "vcpus": 1}' >"$WORK/data/templates/small.json"
# Short timeouts: what the fuzzer creates ends by itself.
"$BIN" serve --listen 127.0.0.1:0 --backend fake --data-dir "$WORK/data" --api-key "$KEY" \
  --max-timeout-secs 600 --max-running 64 >"$WORK/stdout" 2>"$WORK/server.log" &
SERVER=$!
status=0
cleanup() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  if [ "${KEEP_LOG:-}" = 1 ] || [ "$status" != 0 ]; then
    echo "fuzz/run.sh: kept $WORK (server.log, report)" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

URL=""
for _ in $(seq 1 300); do
  URL=$(sed -n 's/^stasis: listening on //p' "$WORK/stdout" | head -n1)
  [ -n "$URL" ] && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$WORK/server.log" >&2; status=1; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { echo "fuzz/run.sh: server did not start" >&2; status=1; exit 1; }

echo "fuzz/run.sh: schemathesis $SCHEMATHESIS_VERSION against $URL/openapi.json, $EXAMPLES examples per operation, seed $SEED (STASIS_FUZZ_SEED)"
set +e
cd "$WORK"
"$VENV/bin/st" run "$URL/openapi.json" \
  --checks not_a_server_error \
  --exclude-by "/x-stasis-unsupported == true" \
  --max-examples "$EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 30 \
  --generation-database :memory: \
  -H "X-API-KEY: $KEY" \
  --no-color 2>&1 | tee "$WORK/report"
st_rc=${PIPESTATUS[0]}
set -e
echo "fuzz/run.sh: schemathesis exit status $st_rc"
if ! kill -0 "$SERVER" 2>/dev/null; then
  echo "fuzz/run.sh: the server died during the run" >&2
  tail -50 "$WORK/server.log" >&2
  status=1
fi
if grep -n "panicked" "$WORK/server.log" >&2; then
  echo "fuzz/run.sh: the server panicked (lines above)" >&2
  status=1
fi
if [ "$st_rc" != 0 ]; then status=1; fi
exit "$status"
