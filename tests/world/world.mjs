// A real ATProto world on loopback for atcr-verify's tests: an in-memory PLC directory
// (@did-plc/server) and a PDS (@atproto/pds), with two accounts holding io.atcr.manifest
// records. Run from the install dir made by install.sh (so imports resolve there):
//
//   node world.mjs --data-dir DIR [--cleanup]
//
// Writes DID documents and getRecord CARs into DIR, prints ONE JSON line on stdout, then
// serves until stdin closes (or SIGTERM/SIGINT). --cleanup removes DIR on exit.
// Everything else goes to stderr.
import crypto from 'node:crypto'
import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import { parseArgs } from 'node:util'
import { liveWhileStdinOpen, quietStdout } from './lifecycle.mjs'

quietStdout()
const log = (...a) => console.error('[world]', ...a)

const { values: args } = parseArgs({
  options: { 'data-dir': { type: 'string' }, cleanup: { type: 'boolean', default: false } },
})
if (!args['data-dir']) {
  console.error('usage: node world.mjs --data-dir DIR [--cleanup]')
  process.exit(2)
}
const dataDir = path.resolve(args['data-dir'])
fs.mkdirSync(dataDir, { recursive: true })

// Runs on every exit path that runs JS, including a failed startup.
process.on('exit', () => {
  if (args.cleanup) fs.rmSync(dataDir, { recursive: true, force: true })
})
liveWhileStdinOpen()

const t0 = Date.now()
const plc = await import('@did-plc/server')
const pds = await import('@atproto/pds')
const { AtpAgent } = await import('@atproto/api')
const { Secp256k1Keypair } = await import('@atproto/crypto')

async function freePorts(n) {
  const servers = []
  for (let i = 0; i < n; i++) {
    const s = net.createServer()
    await new Promise((ok, fail) => s.once('error', fail).listen(0, '127.0.0.1', ok))
    servers.push(s)
  }
  const ports = servers.map((s) => s.address().port)
  await Promise.all(servers.map((s) => new Promise((ok) => s.close(ok))))
  return ports
}

const [plcPort, pdsPort] = await freePorts(2)
const plcUrl = `http://localhost:${plcPort}`
const pdsUrl = `http://localhost:${pdsPort}`

const plcServer = plc.PlcServer.create({ db: plc.Database.mock(), port: plcPort })
await plcServer.start()

const stateDir = path.join(dataDir, 'pds-state')
fs.mkdirSync(stateDir, { recursive: true })
const rotation = await Secp256k1Keypair.create({ exportable: true })
const env = {
  devMode: true, port: pdsPort, hostname: 'localhost',
  dataDirectory: stateDir, blobstoreDiskLocation: path.join(stateDir, 'blobs'),
  didPlcUrl: plcUrl,
  jwtSecret: 'jwt-secret', adminPassword: 'admin-pass',
  serviceHandleDomains: ['.test'], inviteRequired: false,
  plcRotationKeyK256PrivateKeyHex: Buffer.from(await rotation.export()).toString('hex'),
  disableSsrfProtection: true,
  bskyAppViewUrl: 'https://appview.invalid', bskyAppViewDid: 'did:example:invalid',
  modServiceUrl: 'https://moderator.invalid', modServiceDid: 'did:example:invalid',
  serviceName: 'atcr-verify test pds', crawlers: [],
}
const pdsServer = await pds.PDS.create(pds.envToCfg(env), pds.envToSecrets(env))
await pdsServer.start()
log(`PLC ${plcUrl}, PDS ${pdsUrl} up after ${Date.now() - t0} ms`)

const COLLECTION = 'io.atcr.manifest'
const sha256hex = (s) => crypto.createHash('sha256').update(s).digest('hex')
const manifest = (repository, seed) => ({
  $type: COLLECTION,
  repository,
  digest: 'sha256:' + sha256hex(seed),
  mediaType: 'application/vnd.oci.image.manifest.v1+json',
  schemaVersion: 2,
  createdAt: new Date().toISOString(),
})

async function get(url) {
  const res = await fetch(url)
  const body = Buffer.from(await res.arrayBuffer())
  return { status: res.status, body }
}

async function getRecordCar(did, rkey) {
  const q = new URLSearchParams({ did, collection: COLLECTION, rkey })
  return get(`${pdsUrl}/xrpc/com.atproto.sync.getRecord?${q}`)
}

async function createAccount(handle) {
  const agent = new AtpAgent({ service: pdsUrl })
  const name = handle.split('.')[0]
  await agent.createAccount({ handle, email: `${name}@example.com`, password: 'hunter22' })
  return agent
}

// Writes the records, returns [{uri, cid, rkey, record}] in write order.
async function writeRecords(agent, records) {
  const out = []
  for (let i = 0; i < records.length; i += 200) {
    const batch = records.slice(i, i + 200)
    const res = await agent.com.atproto.repo.applyWrites({
      repo: agent.session.did,
      validate: false,
      writes: batch.map((value) => ({ $type: 'com.atproto.repo.applyWrites#create', collection: COLLECTION, value })),
    })
    res.data.results.forEach((r, j) => {
      out.push({ uri: r.uri, cid: r.cid, rkey: r.uri.split('/').pop(), record: batch[j] })
    })
  }
  return out
}

async function saveCars(handle, did, written) {
  const records = []
  for (const w of written) {
    const { status, body } = await getRecordCar(did, w.rkey)
    if (status !== 200) throw new Error(`getRecord ${w.uri}: HTTP ${status}: ${body}`)
    const car = path.join(dataDir, `${handle}-${w.rkey}.car`)
    fs.writeFileSync(car, body)
    records.push({
      uri: w.uri, cid: w.cid, rkey: w.rkey, collection: COLLECTION,
      digest: w.record.digest, createdAt: w.record.createdAt, car,
    })
  }
  return records
}

async function saveDidDoc(handle, did) {
  const { status, body } = await get(`${plcUrl}/${did}`)
  if (status !== 200) throw new Error(`PLC ${did}: HTTP ${status}: ${body}`)
  const file = path.join(dataDir, `${handle}.did.json`)
  fs.writeFileSync(file, body)
  return file
}

async function absent(handle, did, rkey) {
  const { status, body } = await getRecordCar(did, rkey)
  let car = null
  if (status === 200) {
    car = path.join(dataDir, `${handle}-absent-${rkey}.car`)
    fs.writeFileSync(car, body)
  } else {
    log(`getRecord of absent ${rkey}: HTTP ${status}: ${body}`)
  }
  return { uri: `at://${did}/${COLLECTION}/${rkey}`, rkey, status, car }
}

const accounts = []

{ // alice: 300 records (MST several levels deep), plus absent and deleted records
  const handle = 'alice.test'
  const agent = await createAccount(handle)
  const did = agent.session.did
  const recs = Array.from({ length: 300 }, (_, i) => manifest(`alice/app${i}`, `image-${i}`))
  const written = await writeRecords(agent, recs)
  const picks = [0, 1, 42, 99, 150, 199, 200, 257, 299].map((i) => written[i])
  const records = await saveCars(handle, did, picks)

  // Deleted: created, then deleted.
  const created = await agent.com.atproto.repo.createRecord({
    repo: did, collection: COLLECTION, validate: false, record: manifest('alice/deleted', 'deleted-image'),
  })
  const deletedRkey = created.data.uri.split('/').pop()
  await agent.com.atproto.repo.deleteRecord({ repo: did, collection: COLLECTION, rkey: deletedRkey })
  // Never existed: below every TID; and one between two neighbouring written keys.
  const mid = written[150].rkey
  const between = mid.slice(0, -1) + (mid.endsWith('2') ? '3' : '2')
  if (written.some((w) => w.rkey === between)) throw new Error(`rkey ${between} exists`)
  const absents = [
    await absent(handle, did, '2222222222222'),
    await absent(handle, did, between),
    await absent(handle, did, deletedRkey),
  ]
  accounts.push({ handle, did, didDoc: await saveDidDoc(handle, did), records, absent: absents })
}

{ // bob: exactly one record
  const handle = 'bob.test'
  const agent = await createAccount(handle)
  const did = agent.session.did
  const written = await writeRecords(agent, [manifest('bob/app', 'bob-image')])
  const records = await saveCars(handle, did, written)
  accounts.push({ handle, did, didDoc: await saveDidDoc(handle, did), records, absent: [] })
}

log(`world ready after ${Date.now() - t0} ms`)
process.stdout.write(JSON.stringify({ plc: plcUrl, pds: pdsUrl, dataDir, accounts }) + '\n')
