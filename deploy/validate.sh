#!/usr/bin/env bash
# Validates deploy/nomad and deploy/kubernetes offline (no Nomad, no
# cluster): HCL2 syntax with python-hcl2, Kubernetes objects against the
# OpenAPI schemas bundled in kubernetes-validate (strict), then the checks
# of deploy/validate.py. Prints validate.py's JSON summary on stdout.
#   deploy/validate.sh [--only] [EXTRA.hcl|EXTRA.yaml ...]
#   deploy/validate.sh --venv-only     # make sure the venv exists; print its path
# The venv lives in target/deploy-venv (override with STASIS_DEPLOY_VENV),
# made on first use from PyPI, under an exclusive lock so parallel runs
# make it once.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${STASIS_DEPLOY_VENV:-$ROOT/target/deploy-venv}
HCL2_VERSION=${PYTHON_HCL2_VERSION:-8.1.4}
K8S_VALIDATE_VERSION=${KUBERNETES_VALIDATE_VERSION:-1.37.0}

venv_ready() { "$VENV/bin/python" -c "import hcl2, kubernetes_validate, yaml" 2>/dev/null; }
if ! venv_ready; then
  mkdir -p "$(dirname "$VENV")"
  (
    flock -x 9
    if ! venv_ready; then
      echo "validate.sh: creating $VENV (python-hcl2==$HCL2_VERSION, kubernetes-validate==$K8S_VALIDATE_VERSION)" >&2
      python3 -m venv --clear "$VENV"
      "$VENV/bin/pip" install --quiet "python-hcl2==$HCL2_VERSION" \
        "kubernetes-validate==$K8S_VALIDATE_VERSION" PyYAML
    fi
  ) 9>"$VENV.lock"
  venv_ready || { echo "validate.sh: $VENV is not usable" >&2; exit 1; }
fi
if [ "${1:-}" = --venv-only ]; then
  echo "$VENV"
  exit 0
fi
exec "$VENV/bin/python" "$ROOT/deploy/validate.py" "$@"
