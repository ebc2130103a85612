// One @atproto/pds as a process a test can kill and start again, for atcr-verify's tests
// (the world's own PDS in world.mjs is shared by every test of a run, so it stays up).
// Run from the install dir made by install.sh (so imports resolve there):
//
//   node pds.mjs --plc URL --port N --data-dir DIR [--handle H]
//
// Everything the PDS keeps is in DIR: its sqlite databases (accounts, sequencer), actor
// stores (repos and their signing keys), blobs, and secrets.json (its PLC rotation key and
// JWT secret, so that a restart is the same PDS). On the first start (no account.json in
// DIR) it creates one account, HANDLE (default signer.test), registered at the PLC
// directory URL; later starts, on any port, serve the same data. Prints ONE JSON line on
// stdout ({pds, did, handle, password}), then serves until stdin closes (or SIGTERM/SIGINT).
// Everything else goes to stderr.
import fs from 'node:fs'
import path from 'node:path'
import { parseArgs } from 'node:util'
import { liveWhileStdinOpen, quietStdout } from './lifecycle.mjs'

quietStdout()
const log = (...a) => console.error('[pds]', ...a)

const { values: args } = parseArgs({
  options: {
    plc: { type: 'string' },
    port: { type: 'string' },
    'data-dir': { type: 'string' },
    handle: { type: 'string', default: 'signer.test' },
  },
})
const port = Number(args.port)
if (!args.plc || !Number.isInteger(port) || port <= 0 || !args['data-dir']) {
  console.error('usage: node pds.mjs --plc URL --port N --data-dir DIR [--handle H]')
  process.exit(2)
}
const dataDir = path.resolve(args['data-dir'])
fs.mkdirSync(dataDir, { recursive: true })

liveWhileStdinOpen()

const t0 = Date.now()
const pds = await import('@atproto/pds')
const { AtpAgent } = await import('@atproto/api')
const { Secp256k1Keypair } = await import('@atproto/crypto')

// Kept across restarts: a PDS with another rotation key could no longer update its
// accounts' PLC identities.
const secretsFile = path.join(dataDir, 'secrets.json')
if (!fs.existsSync(secretsFile)) {
  const rotation = await Secp256k1Keypair.create({ exportable: true })
  const secrets = {
    plcRotationKeyK256PrivateKeyHex: Buffer.from(await rotation.export()).toString('hex'),
    jwtSecret: Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString('hex'),
  }
  fs.writeFileSync(secretsFile + '.tmp', JSON.stringify(secrets))
  fs.renameSync(secretsFile + '.tmp', secretsFile)
}
const secrets = JSON.parse(fs.readFileSync(secretsFile, 'utf8'))

const pdsUrl = `http://localhost:${port}`
const env = {
  devMode: true, port, hostname: 'localhost',
  dataDirectory: dataDir, blobstoreDiskLocation: path.join(dataDir, 'blobs'),
  didPlcUrl: args.plc,
  jwtSecret: secrets.jwtSecret, adminPassword: 'admin-pass',
  serviceHandleDomains: ['.test'], inviteRequired: false,
  plcRotationKeyK256PrivateKeyHex: secrets.plcRotationKeyK256PrivateKeyHex,
  disableSsrfProtection: true,
  bskyAppViewUrl: 'https://appview.invalid', bskyAppViewDid: 'did:example:invalid',
  modServiceUrl: 'https://moderator.invalid', modServiceDid: 'did:example:invalid',
  serviceName: 'atcr-verify test pds (restartable)', crawlers: [],
}
const pdsServer = await pds.PDS.create(pds.envToCfg(env), pds.envToSecrets(env))
await pdsServer.start()

const accountFile = path.join(dataDir, 'account.json')
if (!fs.existsSync(accountFile)) {
  const handle = args.handle
  const password = 'hunter22'
  const agent = new AtpAgent({ service: pdsUrl })
  await agent.createAccount({ handle, email: `${handle.split('.')[0]}@example.com`, password })
  const account = { did: agent.session.did, handle, password }
  fs.writeFileSync(accountFile + '.tmp', JSON.stringify(account))
  fs.renameSync(accountFile + '.tmp', accountFile)
}
const account = JSON.parse(fs.readFileSync(accountFile, 'utf8'))

log(`PDS ${pdsUrl} (data ${dataDir}) up after ${Date.now() - t0} ms`)
process.stdout.write(JSON.stringify({ pds: pdsUrl, ...account }) + '\n')
