#!/usr/bin/env bash
# Installs the JS SDK (npm `novita-sandbox`, NOVITA_JS_SDK_VERSION, default
# 2.1.1) into target/sdk-node (override with STASIS_SDK_NODE) once, under a
# lock so parallel test binaries share it; prints the directory (its
# node_modules holds the SDK). Needs node and npm (Debian's nodejs, npm).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${STASIS_SDK_NODE:-$ROOT/target/sdk-node}
VERSION=${NOVITA_JS_SDK_VERSION:-2.1.1}
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "install-sdk.sh: $tool is missing (apt-get install -y nodejs npm)" >&2; exit 1; }
done
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
pkg="$DIR/node_modules/novita-sandbox/package.json"
if [ ! -f "$pkg" ] || ! grep -q "\"version\": \"$VERSION\"" "$pkg"; then
  echo "install-sdk.sh: installing novita-sandbox@$VERSION (npm) into $DIR" >&2
  [ -f "$DIR/package.json" ] || echo '{"private": true}' >"$DIR/package.json"
  (cd "$DIR" && npm install --silent --no-audit --no-fund "novita-sandbox@$VERSION" >&2)
fi
echo "$DIR"
