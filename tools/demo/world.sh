#!/usr/bin/env bash
# The local world for manual runs: a CNCF distribution registry (Debian's docker-registry,
# plain HTTP on 127.0.0.1) and a real ATProto PLC directory + PDS (tests/world/world.mjs,
# accounts alice.test and bob.test, password hunter22), all on loopback.
#
#   bash tools/demo/world.sh          (`just world`) start, print the endpoints, run until Ctrl-C
#   source tools/demo/world.sh        defines world_start / world_stop (tools/demo/demo.sh)
#
# State goes to ${ATCR_DEMO_DIR:-target/world}; world_start writes $ATCR_DEMO_DIR/env with
# REGISTRY, PLC_URL and PDS_URL.

world_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ATCR_DEMO_DIR="${ATCR_DEMO_DIR:-$world_root/target/world}"
world_pids=()

world_log() { printf '[world] %s\n' "$*" >&2; }

world_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

world_stop() {
  local pid
  for pid in "${world_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${world_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  world_pids=()
}

world_start() {
  bash "$world_root/tests/world/install-system.sh"
  local installed node dir
  installed="$(bash "$world_root/tests/world/install.sh" | tail -n 1)"
  node="${installed%%$'\t'*}"
  dir="${installed#*$'\t'}"
  rm -rf "$ATCR_DEMO_DIR"
  mkdir -p "$ATCR_DEMO_DIR/registry"

  local port
  port="$(world_free_port)"
  cat >"$ATCR_DEMO_DIR/registry/config.yml" <<YAML
version: 0.1
storage:
  filesystem: {rootdirectory: $ATCR_DEMO_DIR/registry/data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
log: {level: error}
YAML
  docker-registry serve "$ATCR_DEMO_DIR/registry/config.yml" >"$ATCR_DEMO_DIR/registry.log" 2>&1 &
  world_pids+=($!)
  REGISTRY="127.0.0.1:$port"

  # world.mjs lives as long as its stdin is open: a FIFO this shell holds (fd 8), so it
  # also ends when this shell does, however that happens.
  world_log "starting the PLC directory and PDS (writes 300 records; about a minute)"
  mkfifo "$ATCR_DEMO_DIR/world.stdin"
  exec 8<>"$ATCR_DEMO_DIR/world.stdin"
  (cd "$dir" && exec "$node" world.mjs --data-dir "$ATCR_DEMO_DIR/atproto" --cleanup \
    <"$ATCR_DEMO_DIR/world.stdin" >"$ATCR_DEMO_DIR/world.json" 2>"$ATCR_DEMO_DIR/world.log") &
  world_pids+=($!)
  local deadline=$((SECONDS + 300))
  until [[ -s "$ATCR_DEMO_DIR/world.json" ]] && curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      world_log "the world did not start; logs in $ATCR_DEMO_DIR/world.log and registry.log"
      return 1
    fi
    sleep 0.5
  done
  PLC_URL="$(jq -r .plc "$ATCR_DEMO_DIR/world.json")"
  PDS_URL="$(jq -r .pds "$ATCR_DEMO_DIR/world.json")"
  printf 'REGISTRY=%s\nPLC_URL=%s\nPDS_URL=%s\n' "$REGISTRY" "$PLC_URL" "$PDS_URL" >"$ATCR_DEMO_DIR/env"
  export REGISTRY PLC_URL PDS_URL
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  trap world_stop EXIT
  trap 'exit 130' INT TERM
  world_start
  cat <<TEXT

The local world is up (state in $ATCR_DEMO_DIR, also in $ATCR_DEMO_DIR/env):
  registry (plain HTTP)  $REGISTRY
  PLC directory          $PLC_URL
  PDS                    $PDS_URL      accounts alice.test, bob.test (password hunter22)
  DIDs                   $(jq -r '[.accounts[] | "\(.handle) \(.did)"] | join(", ")' "$ATCR_DEMO_DIR/world.json")

Run the provider against it:
  cargo run --release -- serve --plc-url $PLC_URL --allow-private-addresses \\
    --insecure-registry $REGISTRY --policy YOUR-POLICY.yaml

Ctrl-C stops everything.
TEXT
  wait
fi
