#!/usr/bin/env bash
# Makes sure the S3 test server's venv exists: moto's server (a real S3
# HTTP API, in memory) in target/s3-venv (override with STASIS_S3_VENV).
# Created on first use (needs PyPI), once: test binaries running in
# parallel take an exclusive lock (flock on "$VENV.lock") around the
# check-and-create, so one creates it and the others reuse it.
# Prints the venv's path.
#   tests/s3/setup.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${STASIS_S3_VENV:-$ROOT/target/s3-venv}
MOTO_VERSION=${STASIS_MOTO_VERSION:-5.2.5}

venv_ready() { "$VENV/bin/python" -c "import moto.server, flask, flask_cors" 2>/dev/null; }
if ! venv_ready; then
  mkdir -p "$(dirname "$VENV")"
  (
    flock -x 9
    if ! venv_ready; then
      echo "setup.sh: creating $VENV (moto[server]==$MOTO_VERSION)" >&2
      python3 -m venv --clear "$VENV"
      "$VENV/bin/pip" install --quiet "moto[server]==$MOTO_VERSION"
    fi
  ) 9>"$VENV.lock"
  venv_ready || { echo "setup.sh: $VENV is not usable" >&2; exit 1; }
fi
echo "$VENV"
