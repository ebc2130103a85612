#!/usr/bin/env bash
# `just demo`: sign an image in the local world and show the provider's answers.
#
# 1. Starts the local world (tools/demo/world.sh): registry, PLC directory, PDS.
# 2. Pushes two tiny images to the registry: demo/app:v1 and demo/unsigned:v1.
# 3. Signs demo/app:v1 as bob.test: an io.atcr.manifest record naming its digest in bob's
#    repo on the PDS, and a signature artifact (application/vnd.atproto.signature.v1+json)
#    attached to the image in the registry (pushed by digest, listed in the sha256-<hex>
#    referrers tag, as clients do for registries without the Referrers API).
# 4. Starts `atcr-verify serve` (release build) with a trust policy that trusts bob's DID
#    for <registry>/demo/*, a generated certificate, and the world's PLC directory.
# 5. POSTs Gatekeeper-shaped requests to /provide and /mutate and prints the answers.
#
# Everything runs on 127.0.0.1 and stops when the script ends.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=world.sh
source tools/demo/world.sh

server_pid=""
cleanup() {
  [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  world_stop
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

if [[ -n "${ATCR_VERIFY_BIN:-}" ]]; then
  bin="$ATCR_VERIFY_BIN"
else
  step "building atcr-verify (release)"
  cargo build --release --quiet
  bin="$root/target/release/atcr-verify"
fi

step "starting the local world"
world_start
echo "registry $REGISTRY, PLC $PLC_URL, PDS $PDS_URL" >&2
work="$ATCR_DEMO_DIR/demo"
mkdir -p "$work"

sha256() { printf 'sha256:%s' "$(sha256sum "$1" | cut -d' ' -f1)"; }

# push_blob REPO FILE: uploads FILE (two-step upload), prints its digest.
push_blob() {
  local repo="$1" file="$2" digest location sep
  digest="$(sha256 "$file")"
  location="$(curl -fsS -o /dev/null -D - -X POST "http://$REGISTRY/v2/$repo/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" {print $2}')"
  [[ "$location" == http* ]] || location="http://$REGISTRY$location"
  sep='?'
  [[ "$location" == *'?'* ]] && sep='&'
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$file" "$location${sep}digest=$digest"
  printf '%s' "$digest"
}

# push_manifest REPO REFERENCE MEDIA_TYPE FILE: PUTs the manifest, prints its digest.
push_manifest() {
  curl -fsS -o /dev/null -X PUT -H "Content-Type: $3" --data-binary "@$4" \
    "http://$REGISTRY/v2/$1/manifests/$2"
  sha256 "$4"
}

size() { stat -c %s "$1"; }

# push_image REPO TAG SEED: a one-layer image; prints "digest size".
push_image() {
  local repo="$1" tag="$2" seed="$3" layer config manifest
  printf 'layer of %s\n' "$seed" >"$work/$seed.layer"
  jq -cn --arg seed "$seed" '{architecture: "amd64", os: "linux", seed: $seed}' >"$work/$seed.config"
  layer="$(push_blob "$repo" "$work/$seed.layer")"
  config="$(push_blob "$repo" "$work/$seed.config")"
  jq -cn --arg c "$config" --argjson cs "$(size "$work/$seed.config")" \
    --arg l "$layer" --argjson ls "$(size "$work/$seed.layer")" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]
    }' >"$work/$seed.manifest"
  printf '%s %s\n' "$(push_manifest "$repo" "$tag" application/vnd.oci.image.manifest.v1+json "$work/$seed.manifest")" \
    "$(size "$work/$seed.manifest")"
}

step "pushing $REGISTRY/demo/app:v1, demo/unsigned:v1 and other/app:v1"
read -r app_digest app_size < <(push_image demo/app v1 app)
read -r unsigned_digest _ < <(push_image demo/unsigned v1 unsigned)
read -r other_digest _ < <(push_image other/app v1 other)
echo "demo/app:v1 is $app_digest, demo/unsigned:v1 $unsigned_digest, other/app:v1 $other_digest" >&2

step "signing demo/app:v1 as bob.test"
session="$(curl -fsS -H 'Content-Type: application/json' \
  -d '{"identifier": "bob.test", "password": "hunter22"}' \
  "$PDS_URL/xrpc/com.atproto.server.createSession")"
did="$(jq -r .did <<<"$session")"
jwt="$(jq -r .accessJwt <<<"$session")"
record="$(jq -cn --arg did "$did" --arg digest "$app_digest" --arg now "$(date -u +%Y-%m-%dT%H:%M:%S.000Z)" '{
  repo: $did, collection: "io.atcr.manifest", validate: false,
  record: {"$type": "io.atcr.manifest", repository: "demo/app", digest: $digest,
           mediaType: "application/vnd.oci.image.manifest.v1+json", schemaVersion: 2,
           createdAt: $now}}')"
uri="$(curl -fsS -H 'Content-Type: application/json' -H "Authorization: Bearer $jwt" \
  -d "$record" "$PDS_URL/xrpc/com.atproto.repo.createRecord" | jq -r .uri)"
echo "record $uri" >&2

sig_type=application/vnd.atproto.signature.v1+json
printf '{}' >"$work/empty.json"
jq -cn --arg did "$did" --arg uri "$uri" --arg pds "$PDS_URL" --arg digest "$app_digest" '{
  "$type": "io.atcr.atproto.signature", version: "1.0",
  subject: {digest: $digest, mediaType: "application/vnd.oci.image.manifest.v1+json"},
  atproto: {did: $did, handle: "bob.test", pdsEndpoint: $pds, recordUri: $uri}
}' >"$work/signature.json"
empty="$(push_blob demo/app "$work/empty.json")"
sig="$(push_blob demo/app "$work/signature.json")"
jq -cn --arg t "$sig_type" --arg e "$empty" --arg s "$sig" --argjson ss "$(size "$work/signature.json")" \
  --arg subject "$app_digest" --argjson subject_size "$app_size" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", artifactType: $t,
    config: {mediaType: "application/vnd.oci.empty.v1+json", digest: $e, size: 2},
    layers: [{mediaType: $t, digest: $s, size: $ss}],
    subject: {mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $subject, size: $subject_size}
  }' >"$work/artifact.json"
artifact="$(sha256 "$work/artifact.json")"
push_manifest demo/app "$artifact" application/vnd.oci.image.manifest.v1+json "$work/artifact.json" >/dev/null
jq -cn --arg t "$sig_type" --arg a "$artifact" --argjson asize "$(size "$work/artifact.json")" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $a, size: $asize, artifactType: $t}]
}' >"$work/referrers.json"
push_manifest demo/app "${app_digest/:/-}" application/vnd.oci.image.index.v1+json "$work/referrers.json" >/dev/null
echo "signature artifact $artifact attached" >&2

step "trust policy: bob's DID for $REGISTRY/demo/*"
cat >"$work/trust-policy.yaml" <<YAML
version: 1
defaults:
  unmatched: deny
policies:
  - name: demo
    scope: "$REGISTRY/demo/*"
    trustedDIDs: [$did]
    action: enforce
YAML
cat "$work/trust-policy.yaml"
"$bin" policy check "$work/trust-policy.yaml"

step "starting atcr-verify serve"
port="$(world_free_port)"
metrics="$(world_free_port)"
"$bin" serve --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" \
  --policy "$work/trust-policy.yaml" --plc-url "$PLC_URL" --allow-private-addresses \
  --insecure-registry "$REGISTRY" 2>"$work/serve.log" &
server_pid=$!
deadline=$((SECONDS + 30))
until curl -fsS "http://127.0.0.1:$metrics/readyz" >/dev/null 2>&1; do
  ((SECONDS < deadline)) || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.2
done
# The generated certificate's CA, printed base64-encoded for the Provider's caBundle.
grep -A1 'Provider caBundle' "$work/serve.log" | tail -n 1 | base64 -d >"$work/ca.pem"
echo "serving on https://localhost:$port (CA in $work/ca.pem, log in $work/serve.log)" >&2

ask() {
  local path="$1"
  shift
  jq -cn --args '{apiVersion: "externaldata.gatekeeper.sh/v1beta1", kind: "ProviderRequest",
    request: {keys: $ARGS.positional}}' "$@" >"$work/request.json"
  echo "\$ curl --cacert ca.pem https://localhost:$port$path -d '$(cat "$work/request.json")'"
  curl -fsS --cacert "$work/ca.pem" -H 'Content-Type: application/json' \
    --data-binary "@$work/request.json" "https://localhost:$port$path" | jq .
}

step "/provide: the signed image, the unsigned one, and one no policy scopes"
ask /provide "$REGISTRY/demo/app:v1" "$REGISTRY/demo/unsigned:v1" "$REGISTRY/other/app:v1"

step "/mutate: pin the signed image's tag to its digest"
ask /mutate "$REGISTRY/demo/app:v1"

step "metrics (excerpt)"
curl -fsS "http://127.0.0.1:$metrics/metrics" | grep -E '^atcr_verify_(requests|keys)_total' || true
