# atcr-verify tasks. `just` comes from PyPI (rust-just) into the tools venv:
#   bash tests/world/install-system.sh && ~/.cache/atcr-verify/venv/bin/just --list
# The venv's tools (kubectl, kubernetes-validate, hadolint) come first on PATH here.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := env_var_or_default("ATCR_WORLD_HOME", env_var("HOME") / ".cache/atcr-verify") / "venv"
export PATH := venv / "bin" + ":" + env_var("PATH")
certs_dir := "target/dev-certs"

# List the recipes.
default:
    @just --list

# Run the provider: `cargo run --release -- serve ARGS` (no ARGS: example policy, generated certificate).
run *ARGS:
    cargo run --release -- serve {{ ARGS }}

# The whole test suite (the README's test command), after installing the test world.
test: tools
    cargo test --all-targets

# Formatting, clippy, the Containerfile (hadolint) and the manifests (render + schemas).
lint: tools
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings
    hadolint Containerfile
    kubectl kustomize manifests/ >/dev/null
    cargo test --test tests deploy::

# Benchmarks: the proof micro-benchmark (criterion) and the provider load run
# (benches/provider_load.rs: wrk against the release server, latency-injecting fakes).
bench:
    cargo bench

# The serving certificate is for localhost and 127.0.0.1; the client certificate carries
# Gatekeeper's name, gatekeeper-webhook-service.gatekeeper-system.svc.
#
# Dev CA, serving and client certificates in target/dev-certs (for mTLS by hand).
certs:
    #!/usr/bin/env bash
    set -euo pipefail
    dir={{ certs_dir }}
    mkdir -p "$dir" && cd "$dir"
    ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ec ca.key
    openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=atcr-verify dev CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out ca.crt
    leaf() { # name san eku
      ec "$1.key"
      openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 90 -sha256 \
        -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n' "$3" "$4") \
        -out "$1.crt" 2>/dev/null
      rm -f "$1.csr"
    }
    leaf tls localhost "DNS:localhost,IP:127.0.0.1" serverAuth
    leaf client gatekeeper-webhook-service.gatekeeper-system.svc \
      "DNS:gatekeeper-webhook-service.gatekeeper-system.svc" clientAuth
    openssl verify -CAfile ca.crt tls.crt client.crt
    echo "caBundle (base64 of ca.crt): $(base64 -w0 ca.crt)"
    cat <<TEXT
    Serve with mTLS:
      cargo run --release -- serve --tls-cert $PWD/tls.crt --tls-key $PWD/tls.key \\
        --client-ca $PWD/ca.crt --client-san gatekeeper-webhook-service.gatekeeper-system.svc
    Ask as Gatekeeper would:
      curl --cacert $PWD/ca.crt --cert $PWD/client.crt --key $PWD/client.key \\
        -d '{"apiVersion":"externaldata.gatekeeper.sh/v1beta1","kind":"ProviderRequest","request":{"keys":["nginx"]}}' \\
        https://localhost:8443/provide
    TEXT

# Start the local registry + PLC directory + PDS for manual runs (Ctrl-C stops them).
world:
    bash tools/demo/world.sh

# Sign an image in the local world and show the provider's answers to /provide and /mutate.
demo:
    bash tools/demo/demo.sh

# Build the release binary (as the Containerfile does) and check it starts and gets ready.
smoke:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo build --release --locked
    port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
    https=$(port); metrics=$(port); log=$(mktemp)
    target/release/atcr-verify serve --listen 127.0.0.1:$https --metrics-listen 127.0.0.1:$metrics 2>"$log" &
    pid=$!
    trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$log"' EXIT
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$metrics/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -fsS "http://127.0.0.1:$metrics/readyz"
    grep -A1 'Provider caBundle' "$log" | tail -n 1 | base64 -d >"$log.ca"
    curl -fsS --cacert "$log.ca" -H 'Content-Type: application/json' \
      -d '{"apiVersion":"externaldata.gatekeeper.sh/v1beta1","kind":"ProviderRequest","request":{"keys":["UPPER/Case"]}}' \
      "https://localhost:$https/provide"
    echo
    rm -f "$log.ca"
    echo "smoke: release binary $(du -h target/release/atcr-verify | cut -f1), ready, /provide answered"

# Deploy to the current kubectl context (README "Deploy to a cluster").
deploy:
    #!/usr/bin/env bash
    set -euo pipefail
    ns=gatekeeper-system
    kubectl apply -k manifests/ -l app.kubernetes.io/name=atcr-verify
    kubectl -n $ns wait --for=condition=Ready certificate/atcr-verify-tls --timeout=3m
    kubectl -n $ns rollout status deployment/atcr-verify --timeout=5m
    templates=$(kubectl apply -k rego/ -o name)
    kubectl wait --for=jsonpath='{.status.created}'=true --timeout=2m $templates
    ca=$(kubectl -n $ns get secret atcr-verify-tls -o jsonpath='{.data.ca\.crt}')
    kubectl kustomize manifests/ | sed "s|REPLACE_WITH_BASE64_PEM_CA|$ca|" | kubectl apply -f -

# Install the tools the tests and these recipes use (Debian packages, PyPI venv).
tools:
    bash tests/world/install-system.sh
    bash tests/world/install.sh >/dev/null
