#!/usr/bin/env bash
# Regenerates tests/fixtures/pds/ from a freshly started world (see world.mjs): DID documents,
# getRecord CARs (alice: her deepest MST path and her first record; bob: his one record),
# alice's absence CARs, and world.json (world.mjs's JSON line, file paths made relative to
# tests/fixtures/pds/, only the records copied).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$(cd "$HERE/../fixtures" && pwd)/pds"

IFS=$'\t' read -r NODE DIR < <(bash "$HERE/install.sh" | tail -n 1)
TMP="$(mktemp -d)"
cleanup() {
  if [[ -n "${WORLD_PID:-}" ]]; then kill "$WORLD_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

coproc WORLD { cd "$DIR" && exec "$NODE" world.mjs --data-dir "$TMP/data" 2>"$TMP/stderr"; }
if ! IFS= read -r -t 120 LINE <&"${WORLD[0]}"; then
  echo "world.mjs did not start; stderr:" >&2
  cat "$TMP/stderr" >&2
  exit 1
fi

mkdir -p "$OUT"
rm -f "$OUT"/*.car "$OUT"/*.did.json "$OUT"/world.json
WORLD_JSON="$LINE" OUT="$OUT" "$NODE" --input-type=module - <<'JS'
import fs from 'node:fs'
import path from 'node:path'
const world = JSON.parse(process.env.WORLD_JSON)
const out = process.env.OUT
// CAR v1: varint header length, header, then (varint length, CID + block) repeated.
function carBlocks(file) {
  const buf = fs.readFileSync(file)
  let pos = 0, n = -1
  while (pos < buf.length) {
    let len = 0, shift = 0, b
    do { b = buf[pos++]; len += (b & 0x7f) * 2 ** shift; shift += 7 } while (b & 0x80)
    pos += len
    n++
  }
  return n
}
const copy = (file) => {
  const name = path.basename(file)
  fs.copyFileSync(file, path.join(out, name))
  return name
}
for (const acct of world.accounts) {
  let keep = acct.records
  if (acct.records.length > 2) {
    // commit + MST nodes on the path + record: more blocks, deeper path.
    const deepest = acct.records.reduce((a, r) => (carBlocks(r.car) > carBlocks(a.car) ? r : a))
    const other = acct.records[0] !== deepest ? acct.records[0] : acct.records.at(-1)
    keep = acct.records.filter((r) => r === deepest || r === other)
  }
  for (const r of keep) console.error(`${acct.handle} ${r.rkey}: ${carBlocks(r.car) - 2} MST nodes on the path`)
  acct.records = keep.map((r) => ({ ...r, car: copy(r.car) }))
  acct.absent = acct.absent.map((a) => ({ ...a, car: a.car && copy(a.car) }))
  acct.didDoc = copy(acct.didDoc)
}
world.dataDir = '.'
fs.writeFileSync(path.join(out, 'world.json'), JSON.stringify(world, null, 2) + '\n')
JS

# Stop the world: close its stdin, and wait for it.
exec {WORLD[1]}>&-
wait "$WORLD_PID"
WORLD_PID=
ls -l "$OUT" >&2
