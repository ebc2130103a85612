// Shared by world.mjs and pds.mjs (copied beside them by install.sh): stdout carries exactly
// one line, the JSON, and library chatter goes to stderr; the process lives exactly as long
// as whoever holds its stdin (or until SIGTERM/SIGINT).
export function quietStdout() {
  process.env.LOG_ENABLED = 'false'
  console.log = console.info = console.debug = (...a) => console.error(...a)
}

export function liveWhileStdinOpen() {
  const exit = () => process.exit(0)
  process.stdin.on('end', exit)
  process.stdin.on('close', exit)
  process.stdin.on('error', exit)
  process.stdin.resume()
  process.on('SIGTERM', exit)
  process.on('SIGINT', exit)
}
