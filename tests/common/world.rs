//! A real ATProto world for integration tests: a PLC directory and a PDS (the official npm
//! packages) on loopback, with accounts, records and the CARs and DID documents they served.
//! Started once per test process by [`World::get`]; see `tests/world/`. A test that needs it
//! fails loudly when it cannot start; it never skips.
#![allow(dead_code)]

use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct World {
    pub plc: String,
    pub pds: String,
    pub accounts: Vec<Account>,
    #[serde(skip)]
    process: Option<Process>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    pub handle: String,
    pub did: String,
    pub did_doc: PathBuf,
    pub records: Vec<Record>,
    pub absent: Vec<Absent>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub uri: String,
    pub cid: String,
    pub rkey: String,
    pub collection: String,
    pub digest: String,
    pub created_at: String,
    pub car: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Absent {
    pub uri: String,
    pub rkey: String,
    pub status: u16,
    pub car: Option<PathBuf>,
}

/// Held for the life of the test process. Node serves until its stdin closes, which happens
/// when this process exits (statics are never dropped; the kernel closes the pipe). Node then
/// exits and, given `--cleanup`, removes the data directory.
#[derive(Debug)]
struct Process {
    child: Child,
    stdin: ChildStdin,
    data_dir: tempfile::TempDir,
}

impl World {
    pub fn get() -> &'static World {
        // A failed start is remembered, so every later test fails at once with its reason.
        static WORLD: OnceLock<Result<World, String>> = OnceLock::new();
        let world = WORLD.get_or_init(|| {
            std::panic::catch_unwind(start).map_err(|p| {
                let msg = p.downcast_ref::<String>().map(String::as_str);
                msg.or(p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
                    .to_owned()
            })
        });
        match world {
            Ok(world) => world,
            Err(msg) => panic!("the test world failed to start: {msg}"),
        }
    }

    pub fn account(&self, handle: &str) -> &Account {
        self.accounts
            .iter()
            .find(|a| a.handle == handle)
            .unwrap_or_else(|| {
                let known: Vec<_> = self.accounts.iter().map(|a| &a.handle).collect();
                panic!("test world has no account {handle:?} (has {known:?})")
            })
    }
}

/// `bash tests/world/install.sh --locate`: the node binary and the install dir holding the
/// world's scripts (installs nothing).
fn locate() -> (String, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/world/install.sh");
    // Installs nothing: installing is `.ci/run`'s job (or `bash tests/world/install.sh`).
    let out = Command::new("bash")
        .arg(script)
        .arg("--locate")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the test world is not installed: run `bash tests/world/install.sh` ({script} --locate: {})",
        out.status
    );
    let (node, dir) = stdout
        .lines()
        .last()
        .and_then(|l| l.split_once('\t'))
        .unwrap_or_else(|| panic!("{script}: last stdout line is not <node>\\t<dir>:\n{stdout}"));
    (node.to_owned(), dir.to_owned())
}

/// The first line `child` prints on stdout (its JSON), within [`STARTUP_TIMEOUT`]; its
/// stdout is drained after it, so that a full pipe never stalls it.
fn first_line(child: &mut Child) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("child stdout is piped");
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        lines.for_each(drop);
    });
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Some(Ok(line))) => Ok(line),
        Ok(Some(Err(e))) => Err(format!("reading stdout: {e}")),
        Ok(None) => Err("node closed stdout".into()),
        Err(_) => Err(format!("no JSON line within {STARTUP_TIMEOUT:?}")),
    }
}

fn start() -> World {
    let (node, dir) = locate();
    let (node, dir) = (node.as_str(), dir.as_str());
    let data_dir = tempfile::Builder::new()
        .prefix("atcr-world-")
        .tempdir()
        .expect("create temp data dir for the test world");
    let mut child = Command::new(node)
        .args(["world.mjs", "--cleanup", "--data-dir"])
        .arg(data_dir.path())
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {node} world.mjs in {dir}: {e}"));

    // Drain node's stderr for the whole run (a full pipe would stall it); keep a tail.
    let tail = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut stderr = child.stderr.take().expect("child stderr is piped");
    let sink = Arc::clone(&tail);
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            t.extend_from_slice(&buf[..n]);
            let excess = t.len().saturating_sub(16 * 1024);
            t.drain(..excess);
        }
    });
    let line = match first_line(&mut child) {
        Ok(line) => line,
        Err(why) => {
            let _ = child.kill();
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            std::thread::sleep(Duration::from_millis(200)); // let the stderr drain catch up
            let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            panic!(
                "test world did not start ({why}; node {status}); stderr tail:\n{}",
                String::from_utf8_lossy(&tail)
            )
        }
    };
    let mut world: World = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("test world printed bad JSON ({e}):\n{line}"));
    let stdin = child.stdin.take().expect("child stdin is piped");
    world.process = Some(Process {
        child,
        stdin,
        data_dir,
    });
    world
}

/// Writes through the PDS's XRPC API as an account of the world (password from world.mjs).
pub struct Writer {
    pds: String,
    did: String,
    jwt: String,
}

/// The password of every account on the world's PDS (set by world.mjs).
pub const PASSWORD: &str = "hunter22";

impl World {
    /// Logs in as `handle`.
    pub async fn writer(&self, handle: &str) -> Writer {
        Writer::login(&self.pds, handle, PASSWORD).await
    }

    /// Creates a new account `<unique(prefix)>.test` on the world's PDS, with the world's
    /// password and, when given, a PLC recovery key (a `did:key`) above the PDS's rotation key.
    pub async fn create_account(&self, prefix: &str, recovery_key: Option<&str>) -> NewAccount {
        let handle = format!("{}.test", super::unique(prefix));
        let mut body = serde_json::json!({"handle": handle,
            "email": format!("{handle}@example.com"), "password": PASSWORD});
        if let Some(key) = recovery_key {
            body["recoveryKey"] = key.into();
        }
        let session = self
            .xrpc_post("com.atproto.server.createAccount", None, &body)
            .await;
        NewAccount {
            handle,
            did: session["did"].as_str().unwrap().to_owned(),
            jwt: session["accessJwt"].as_str().unwrap().to_owned(),
        }
    }
}

impl World {
    /// [`xrpc_post`] to the world's PDS.
    pub async fn xrpc_post(
        &self,
        method: &str,
        bearer: Option<&str>,
        body: &serde_json::Value,
    ) -> serde_json::Value {
        xrpc_post(&self.pds, method, bearer, body).await
    }
}

/// POSTs `body` to XRPC `method` of the PDS at `pds` (with a bearer token when given); the
/// answer's JSON (`null` when it has no body), which must be a success.
pub async fn xrpc_post(
    pds: &str,
    method: &str,
    bearer: Option<&str>,
    body: &serde_json::Value,
) -> serde_json::Value {
    let mut request = super::client()
        .post(format!("{pds}/xrpc/{method}"))
        .json(body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.expect(method);
    let status = r.status();
    let bytes = r.bytes().await.expect(method);
    assert!(
        status.is_success(),
        "{method}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// An account made by [`World::create_account`]: its handle, DID and access token.
pub struct NewAccount {
    pub handle: String,
    pub did: String,
    pub jwt: String,
}

impl Writer {
    /// Logs in as `handle` on the PDS at `pds`.
    pub async fn login(pds: &str, handle: &str, password: &str) -> Writer {
        let login = serde_json::json!({"identifier": handle, "password": password});
        let session = xrpc_post(pds, "com.atproto.server.createSession", None, &login).await;
        Writer {
            pds: pds.to_owned(),
            did: session["did"].as_str().unwrap().to_owned(),
            jwt: session["accessJwt"].as_str().unwrap().to_owned(),
        }
    }
}

impl Writer {
    pub fn did(&self) -> &str {
        &self.did
    }

    /// [`xrpc_post`] as this account, on its PDS.
    async fn post(&self, method: &str, body: &serde_json::Value) -> serde_json::Value {
        xrpc_post(&self.pds, method, Some(&self.jwt), body).await
    }

    /// Creates an `io.atcr.manifest` record naming `digest`; returns its `at://` URI.
    pub async fn sign(&self, repository: &str, digest: &str) -> String {
        self.sign_in("io.atcr.manifest", repository, digest).await
    }

    /// Creates a record shaped like `io.atcr.manifest` (with `$type` = `collection`) in
    /// any collection; returns its `at://` URI.
    pub async fn sign_in(&self, collection: &str, repository: &str, digest: &str) -> String {
        let record = serde_json::json!({
            "$type": collection, "repository": repository, "digest": digest,
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "schemaVersion": 2,
            "createdAt": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339).unwrap(),
        });
        let create = serde_json::json!({"repo": self.did, "collection": collection,
                                        "validate": false, "record": record});
        let out = self.post("com.atproto.repo.createRecord", &create).await;
        out["uri"].as_str().unwrap().to_owned()
    }

    /// Deletes the record at `uri` (revoking the signature).
    pub async fn delete(&self, uri: &str) {
        let rkey = uri.rsplit('/').next().unwrap();
        let delete =
            serde_json::json!({"repo": self.did, "collection": "io.atcr.manifest", "rkey": rkey});
        self.post("com.atproto.repo.deleteRecord", &delete).await;
    }
}

impl Writer {
    /// Creates one `io.atcr.manifest` record per (repository, digest) (200 per applyWrites
    /// call); returns their URIs in order.
    pub async fn sign_many(&self, signed: &[(String, String)]) -> Vec<String> {
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let mut uris = Vec::with_capacity(signed.len());
        for chunk in signed.chunks(200) {
            let writes: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(repository, d)| {
                    serde_json::json!({"$type": "com.atproto.repo.applyWrites#create",
                        "collection": "io.atcr.manifest",
                        "value": {"$type": "io.atcr.manifest", "repository": repository, "digest": d,
                                  "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                  "schemaVersion": 2, "createdAt": now}})
                })
                .collect();
            let apply = serde_json::json!({"repo": self.did, "validate": false, "writes": writes});
            let out = self.post("com.atproto.repo.applyWrites", &apply).await;
            for result in out["results"].as_array().unwrap() {
                uris.push(result["uri"].as_str().unwrap().to_owned());
            }
        }
        uris
    }
}

/// A PDS of a test's own (`tests/world/pds.mjs`), registering its one account at the
/// world's PLC directory, as a node process the test can kill and start again: its data
/// directory (databases, sequencer, repos and their keys, the PDS's rotation key) outlives
/// the process, so a restart is the same PDS with the same events. Killed when dropped.
pub struct RestartablePds {
    /// The port its account's DID document names (`http://localhost:PORT`).
    pub home: u16,
    pub did: String,
    pub handle: String,
    pub password: String,
    /// The port it serves on now (`home`, unless started elsewhere with [`Self::start_at`]).
    port: u16,
    child: Option<(Child, ChildStdin)>,
    data_dir: tempfile::TempDir,
}

#[derive(Deserialize)]
struct PdsLine {
    pds: String,
    did: String,
    handle: String,
    password: String,
}

impl RestartablePds {
    /// Starts it on a free port, creating the account `handle` (e.g. `x.test`).
    pub fn start(handle: &str) -> RestartablePds {
        let home = super::registry::free_port();
        let data_dir = tempfile::Builder::new()
            .prefix("atcr-pds-")
            .tempdir()
            .expect("create temp data dir for the PDS");
        let mut pds = RestartablePds {
            home,
            did: String::new(),
            handle: handle.to_owned(),
            password: String::new(),
            port: home,
            child: None,
            data_dir,
        };
        pds.start_at(home);
        pds
    }

    /// `http://localhost:PORT` of the port it serves on now.
    pub fn url(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    /// SIGKILLs the node process and waits until it is gone: its port refuses connections.
    pub fn kill(&mut self) {
        let (mut child, stdin) = self.child.take().expect("the PDS is running");
        child.kill().expect("SIGKILL the PDS");
        child.wait().expect("reap the PDS");
        drop(stdin);
        let refused = std::net::TcpStream::connect(("127.0.0.1", self.port));
        assert!(
            refused.is_err(),
            "port {} still accepts connections after the PDS was killed",
            self.port
        );
    }

    /// Starts it again on its home port, on the same data.
    pub fn restart(&mut self) {
        self.start_at(self.home);
    }

    /// Starts it on `port` (on the same data), waiting for its JSON line.
    pub fn start_at(&mut self, port: u16) {
        assert!(self.child.is_none(), "the PDS is already running");
        let (node, dir) = locate();
        let n = std::fs::read_dir(self.data_dir.path()).map_or(0, |d| d.count());
        let log = self.data_dir.path().join(format!("pds-{port}-{n}.log"));
        let mut child = Command::new(&node)
            .args(["pds.mjs", "--plc", &World::get().plc, "--port"])
            .arg(port.to_string())
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--handle", &self.handle])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the PDS log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {node} pds.mjs in {dir}: {e}"));
        let line = match first_line(&mut child) {
            Ok(line) => line,
            Err(why) => {
                let _ = child.kill();
                let status = child.wait().map(|s| s.to_string());
                panic!(
                    "the PDS did not start on port {port} ({why}; node {status:?}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            }
        };
        let got: PdsLine = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("pds.mjs printed bad JSON ({e}):\n{line}"));
        assert_eq!(got.pds, format!("http://localhost:{port}"));
        assert!(
            self.did.is_empty() || self.did == got.did,
            "the restarted PDS serves another account: {} then {}",
            self.did,
            got.did
        );
        (self.did, self.handle, self.password) = (got.did, got.handle, got.password);
        self.port = port;
        let stdin = child.stdin.take().expect("child stdin is piped");
        self.child = Some((child, stdin));
    }

    /// Logs in as its account, on the port it serves on now.
    pub async fn writer(&self) -> Writer {
        Writer::login(&self.url(), &self.handle, &self.password).await
    }
}

impl Drop for RestartablePds {
    fn drop(&mut self) {
        if let Some((mut child, _stdin)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
