//! `atcr-verify sign` end to end in the local world: a fresh account on the real PDS (with an
//! app password) signs an unsigned image on the real CNCF registry (no Referrers API: the
//! `sha256-<hex>` tag index is updated) and on the Referrers-API fake (behind bearer tokens
//! and Basic credentials), and then `atcr-verify image` says verified under a policy
//! trusting that DID. Also: the artifact is in the guide's format, and the failures — wrong
//! password, password variable unset, registry refusing the push before or after the
//! record was created — exit 2 with what the user needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::common::fake::{Fake, Fault};
use crate::common::registry::{
    OCI_INDEX, OCI_MANIFEST, Pusher, SIG_TYPE, free_port, real_registry, sha256,
};
use crate::common::world::World;
use crate::common::{client, unique};

const PASSWORD_VAR: &str = "ATCR_TEST_APP_PASSWORD";

/// A fresh account on the world's PDS, with an app password.
struct Account {
    handle: String,
    did: String,
    app_password: String,
}

async fn fresh_account() -> Account {
    let world = World::get();
    let account = world.create_account("s", None).await;
    let name = json!({"name": "atcr-verify sign"});
    let app = world
        .xrpc_post(
            "com.atproto.server.createAppPassword",
            Some(&account.jwt),
            &name,
        )
        .await;
    Account {
        handle: account.handle,
        did: account.did,
        app_password: app["password"].as_str().unwrap().to_owned(),
    }
}

/// Runs `atcr-verify` with `args` and the environment `env`: exit code, stdout, stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_atcr-verify"));
    command.args(args).env_remove(PASSWORD_VAR);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("running atcr-verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `sign IMAGE --record-uri URI` (attach an existing record: no login), plus `extra`.
fn attach(image: &str, uri: &str, registry: &str, extra: &[&str]) -> (i32, String, String) {
    let world = World::get();
    let mut args = vec![
        "sign",
        image,
        "--pds",
        &world.pds,
        "--record-uri",
        uri,
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        registry,
    ];
    args.extend_from_slice(extra);
    run(&args, &[])
}

/// `atcr-verify sign REF` as `account` on the world's PDS, trusting `registry` over plain
/// HTTP; `extra` flags appended.
fn sign(account: &Account, image: &str, registry: &str, extra: &[&str]) -> (i32, String, String) {
    sign_at(&World::get().pds, account, image, registry, extra)
}

/// [`sign`] logging in at the PDS `pds` instead.
fn sign_at(
    pds: &str,
    account: &Account,
    image: &str,
    registry: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let world = World::get();
    let mut args = vec![
        "sign",
        image,
        "--pds",
        pds,
        "--identifier",
        &account.handle,
        "--password-env",
        PASSWORD_VAR,
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        registry,
    ];
    args.extend_from_slice(extra);
    run(&args, &[(PASSWORD_VAR, &account.app_password)])
}

/// A policy file trusting `dids` for everything on `registry`, needing `min` signatures.
fn policy_file(dir: &Path, registry: &str, dids: &[&str], min: usize) -> PathBuf {
    let list: String = dids.iter().map(|d| format!("      - {d}\n")).collect();
    let yaml = format!(
        "version: 1\npolicies:\n  - name: signed\n    scope: \"{registry}/**\"\n    require:\n      - signature: true\n    trustedDIDs:\n{list}    minSignatures: {min}\n    action: enforce\n"
    );
    let path = dir.join(format!("{}.yaml", unique("policy")));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `atcr-verify image REF --json` under `policy`: exit code and the report.
fn verify(image: &str, registry: &str, policy: &Path, extra: &[&str]) -> (i32, Value) {
    let world = World::get();
    let mut args = vec![
        "image",
        image,
        "--json",
        "--policy",
        policy.to_str().unwrap(),
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        registry,
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args, &[]);
    let report = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("image --json printed no JSON ({e}): {out}\n{err}"));
    (code, report)
}

/// GETs `path` on a registry (`http://host:port`) with `accept`, optionally with a bearer
/// token.
async fn get(base: &str, path: &str, accept: &str, bearer: Option<&str>) -> (u16, Vec<u8>) {
    let mut r = client()
        .get(format!("{base}{path}"))
        .header("accept", accept);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let answer = r.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.bytes().await.unwrap().to_vec())
}

/// The account's io.atcr.manifest records (a fresh account has only what the test wrote).
async fn records(did: &str) -> Vec<Value> {
    let world = World::get();
    let r = client()
        .get(format!(
            "{}/xrpc/com.atproto.repo.listRecords?repo={did}&collection=io.atcr.manifest&limit=100",
            world.pds
        ))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    body["records"].as_array().unwrap().clone()
}

/// Checks the artifact manifest and its layer against the guide's format ("Crane: Fetch
/// Manifests", "Fetching Signature Metadata"), for an image of `size` bytes at `digest`
/// signed by `account` with record `uri`. Returns the manifest.
async fn check_artifact(
    base: &str,
    repo: &str,
    artifact: &str,
    subject: (&str, usize),
    account: &Account,
    uri: &str,
    bearer: Option<&str>,
) -> Value {
    let world = World::get();
    let (status, bytes) = get(
        base,
        &format!("/v2/{repo}/manifests/{artifact}"),
        OCI_MANIFEST,
        bearer,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sha256(&bytes), artifact, "pushed by digest");
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], OCI_MANIFEST);
    assert_eq!(m["artifactType"], SIG_TYPE);
    assert_eq!(
        m["config"],
        json!({"mediaType": "application/vnd.oci.empty.v1+json",
               "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
               "size": 2})
    );
    assert_eq!(
        m["subject"],
        json!({"mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1})
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], SIG_TYPE);
    assert_eq!(
        layers[0]["annotations"]["org.opencontainers.image.title"],
        "atproto-signature.json"
    );
    assert_eq!(
        m["annotations"]["io.atcr.atproto.did"],
        account.did.as_str()
    );
    assert_eq!(m["annotations"]["io.atcr.atproto.pds"], world.pds.as_str());
    assert_eq!(m["annotations"]["io.atcr.atproto.recordUri"], uri);
    // The layer.
    let layer_digest = layers[0]["digest"].as_str().unwrap();
    let (status, bytes) = get(
        base,
        &format!("/v2/{repo}/blobs/{layer_digest}"),
        "application/octet-stream",
        bearer,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sha256(&bytes), layer_digest);
    assert_eq!(layers[0]["size"], bytes.len());
    let l: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(l["$type"], "io.atcr.atproto.signature");
    assert_eq!(l["version"], "1.0");
    assert_eq!(
        l["subject"],
        json!({"digest": subject.0, "mediaType": OCI_MANIFEST})
    );
    let a = &l["atproto"];
    assert_eq!(a["did"], account.did.as_str());
    assert_eq!(a["handle"], account.handle.as_str());
    assert_eq!(a["pdsEndpoint"], world.pds.as_str());
    assert_eq!(a["recordUri"], uri);
    assert!(
        a["commitCid"].as_str().unwrap().starts_with("bafyrei"),
        "{a}"
    );
    atcr_verify::syntax::parse_datetime(a["signedAt"].as_str().unwrap()).unwrap();
    let s = &l["signature"];
    assert_eq!(s["algorithm"], "ECDSA-K256-SHA256");
    assert_eq!(s["keyId"], format!("{}#atproto", account.did));
    assert!(
        s["publicKeyMultibase"]
            .as_str()
            .unwrap()
            .starts_with("zQ3s"),
        "a compressed K-256 multikey: {s}"
    );
    m
}

/// The record on the PDS carries the lexicon's required fields and names the image.
async fn check_record(uri: &str, repository: &str, digest: &str) {
    let world = World::get();
    let parts: Vec<&str> = uri.trim_start_matches("at://").split('/').collect();
    let r = client()
        .get(format!(
            "{}/xrpc/com.atproto.repo.getRecord?repo={}&collection={}&rkey={}",
            world.pds, parts[0], parts[1], parts[2]
        ))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    let v = &body["value"];
    assert_eq!(v["$type"], "io.atcr.manifest");
    assert_eq!(v["repository"], repository);
    assert_eq!(v["digest"], digest);
    assert_eq!(v["mediaType"], OCI_MANIFEST);
    assert_eq!(v["schemaVersion"], 2);
    atcr_verify::syntax::parse_datetime(v["createdAt"].as_str().unwrap()).unwrap();
}

/// The real CNCF registry has no Referrers API: `sign` adds the artifact to the
/// `sha256-<hex>` tag index, keeping what the index already lists; the image goes from
/// unsigned (exit 1) to verified (exit 0), and with a second signer to two signatures.
#[tokio::test]
async fn signs_an_unsigned_image_on_the_real_registry_through_the_tag_index() {
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("tosign"));
    let pushed = pusher.image(&repo, "v1", &unique("seed")).await;
    let image = format!("{reg}/{repo}:v1");
    let (alice, bob) = (fresh_account().await, fresh_account().await);
    let dir = tempfile::tempdir().unwrap();
    let trust_alice = policy_file(dir.path(), reg, &[&alice.did], 1);

    let (code, report) = verify(&image, reg, &trust_alice, &[]);
    assert_eq!(code, 1, "unsigned before: {report:#}");

    let (code, out, err) = sign(&alice, &image, reg, &["--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains(&alice.app_password) && !err.contains(&alice.app_password));
    let signed: Value = serde_json::from_str(&out).unwrap();
    let tag = format!("sha256-{}", &pushed.digest["sha256:".len()..]);
    assert_eq!(signed["digest"], pushed.digest.as_str());
    assert_eq!(signed["mediaType"], OCI_MANIFEST);
    assert_eq!(signed["did"], alice.did.as_str());
    assert_eq!(signed["handle"], alice.handle.as_str());
    assert_eq!(signed["repository"], repo.as_str());
    assert_eq!(signed["recordCreated"], true);
    assert_eq!(signed["attachedVia"], "referrers-tag");
    assert_eq!(signed["referrersTag"], tag.as_str());
    let uri = signed["recordUri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with(&format!("at://{}/io.atcr.manifest/", alice.did)));
    check_record(&uri, &repo, &pushed.digest).await;
    let artifact = signed["artifactDigest"].as_str().unwrap().to_owned();
    let manifest = check_artifact(
        &pusher.base,
        &repo,
        &artifact,
        (&pushed.digest, pushed.size),
        &alice,
        &uri,
        None,
    )
    .await;

    // `discover` lists it as the guide's `oras discover` would, with its claims.
    let world = World::get();
    let (code, out, err) = run(
        &[
            "discover",
            &image,
            "--json",
            "--plc-url",
            &world.plc,
            "--allow-private-addresses",
            "--insecure-registry",
            reg,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed["artifacts"],
        json!([{"digest": artifact, "did": alice.did, "recordUri": uri, "claimedPds": world.pds}]),
        "{listed:#}"
    );

    // The image now verifies, through that signature.
    let (code, report) = verify(&image, reg, &trust_alice, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["verified"], true);
    assert_eq!(report["did"], alice.did.as_str());
    assert_eq!(report["signatures"][0]["uri"], uri.as_str());

    // A second signer appends to the index; the first entry stays.
    let (code, out, err) = sign(&bob, &image, reg, &["--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let bob_signed: Value = serde_json::from_str(&out).unwrap();
    let (status, index) = get(
        &pusher.base,
        &format!("/v2/{repo}/manifests/{tag}"),
        OCI_INDEX,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let index: Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{index:#}");
    assert_eq!(entries[0]["digest"], artifact.as_str());
    assert_eq!(entries[0]["artifactType"], SIG_TYPE);
    assert_eq!(entries[0]["annotations"], manifest["annotations"]);
    assert_eq!(entries[1]["digest"], bob_signed["artifactDigest"]);
    let trust_both = policy_file(dir.path(), reg, &[&alice.did, &bob.did], 2);
    let (code, report) = verify(&image, reg, &trust_both, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["countedSignatures"], 2, "{report:#}");

    // By digest too, with the human output.
    let by_digest = format!("{reg}/{repo}@{}", pushed.digest);
    let (code, out, err) = sign(&alice, &by_digest, reg, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.starts_with(&format!("signed: {reg}/{repo}@{}\n", pushed.digest)),
        "{out}"
    );
    assert!(out.contains("listed in the referrers tag"), "{out}");
}

/// A registry with the Referrers API, behind bearer tokens whose endpoint demands Basic
/// credentials (from --registry-config): `sign` pushes with a push-scoped token and leaves
/// the indexing to the API (no `sha256-<hex>` tag is written).
#[tokio::test]
async fn signs_on_a_registry_with_the_referrers_api() {
    let fake = Fake::private_registry("push-token", "ci", "s3cret");
    let repo = "team/app";
    let config = fake.put_blob(br#"{"architecture":"amd64","os":"linux"}"#.to_vec());
    let layer = fake.put_blob(unique("layer").into_bytes());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 37},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1}],
    }))
    .unwrap();
    let size = manifest.len();
    let digest = fake.put_manifest(repo, Some("v1"), OCI_MANIFEST, manifest);
    let image = format!("{}/{repo}:v1", fake.addr);
    let account = fresh_account().await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("config.json");
    std::fs::write(
        &creds,
        json!({"auths": {fake.addr.as_str(): {"username": "ci", "password": "s3cret"}}})
            .to_string(),
    )
    .unwrap();
    let creds = creds.to_str().unwrap();
    let policy = policy_file(dir.path(), &fake.addr, &[&account.did], 1);

    let (code, report) = verify(&image, &fake.addr, &policy, &["--registry-config", creds]);
    assert_eq!(code, 1, "unsigned before: {report:#}");

    // Without credentials, the token endpoint refuses: nothing is written on the PDS.
    let (code, out, err) = sign(&account, &image, &fake.addr, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("401"), "{err}");
    assert!(records(&account.did).await.is_empty());

    let (code, out, err) = sign(
        &account,
        &image,
        &fake.addr,
        &["--json", "--registry-config", creds],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let signed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(signed["attachedVia"], "referrers-api");
    assert_eq!(signed["referrersTag"], Value::Null);
    let uri = signed["recordUri"].as_str().unwrap().to_owned();
    let artifact = signed["artifactDigest"].as_str().unwrap().to_owned();
    check_record(&uri, repo, &digest).await;
    check_artifact(
        &fake.url(),
        repo,
        &artifact,
        (&digest, size),
        &account,
        &uri,
        Some("push-token"),
    )
    .await;
    let tag = format!("sha256-{}", &digest["sha256:".len()..]);
    let (status, _) = get(
        &fake.url(),
        &format!("/v2/{repo}/manifests/{tag}"),
        OCI_INDEX,
        Some("push-token"),
    )
    .await;
    assert_eq!(status, 404, "no fallback tag on a registry with the API");
    let (status, listed) = get(
        &fake.url(),
        &format!("/v2/{repo}/referrers/{digest}"),
        OCI_INDEX,
        Some("push-token"),
    )
    .await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(listed["manifests"][0]["digest"], artifact.as_str());

    let (code, report) = verify(&image, &fake.addr, &policy, &["--registry-config", creds]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["did"], account.did.as_str());
}

/// A wrong password: exit 2 with the PDS's XRPC error; nothing pushed, nothing echoed.
#[tokio::test]
async fn a_wrong_password_is_refused_with_the_xrpc_error() {
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("wrongpw"));
    pusher.image(&repo, "v1", &unique("seed")).await;
    let account = fresh_account().await;
    let wrong = Account {
        app_password: "wrong-password-1234".into(),
        handle: account.handle.clone(),
        did: account.did.clone(),
    };
    let image = format!("{reg}/{repo}:v1");
    let (code, out, err) = sign(&wrong, &image, reg, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("login_refused"), "{err}");
    assert!(err.contains("HTTP 401 AuthenticationRequired"), "{err}");
    assert!(err.contains("com.atproto.server.createSession"), "{err}");
    assert!(!err.contains("wrong-password-1234") && !out.contains("wrong-password-1234"));
    let (code, out, _) = sign(&wrong, &image, reg, &["--json"]);
    assert_eq!(code, 2);
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["error"]["code"], "login_refused");
    assert_eq!(answer["recordUri"], Value::Null);
    assert!(records(&account.did).await.is_empty());
    let (status, _) = get(
        &pusher.base,
        &format!("/v2/{repo}/blobs/sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"),
        "application/octet-stream",
        None,
    )
    .await;
    assert_eq!(status, 404, "nothing pushed before the login");
}

/// The password comes only from the named variable: unset or empty is a usage error, and
/// there is no flag that takes it.
#[test]
fn the_password_variable_must_be_set() {
    let pds = "http://127.0.0.1:9";
    let base = [
        "sign",
        "127.0.0.1:1/app:v1",
        "--pds",
        pds,
        "--identifier",
        "alice.test",
        "--password-env",
        PASSWORD_VAR,
        "--allow-private-addresses",
    ];
    let (code, out, err) = run(&base, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("usage:"), "{err}");
    assert!(
        err.contains(&format!(
            "--password-env {PASSWORD_VAR}: the variable is not set"
        )),
        "{err}"
    );
    let (code, _, err) = run(&base, &[(PASSWORD_VAR, "")]);
    assert_eq!(code, 2);
    assert!(err.contains("the variable is empty"), "{err}");
    let (code, _, err) = run(
        &[
            "sign",
            "127.0.0.1:1/app:v1",
            "--pds",
            pds,
            "--identifier",
            "alice.test",
            "--password",
            "hunter22",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--password"), "{err}");
    // Neither the identifier nor --record-uri: clap says what is missing.
    let (code, _, err) = run(&["sign", "127.0.0.1:1/app:v1", "--pds", pds], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--identifier") && err.contains("--password-env"),
        "{err}"
    );
}

/// A registry that refuses only the artifact manifest (a fake: the CNCF registry refuses all
/// writes or none): the record was created, and the failure says so with its URI and the
/// command that attaches it; that command then finishes the job.
#[tokio::test]
async fn a_registry_refusing_the_push_leaves_no_signature_lost() {
    let fake = Fake::registry_without_referrers_api();
    let repo = "team/app";
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(b"c"), "size": 1},
        "layers": [],
        "annotations": {"seed": unique("seed")},
    }))
    .unwrap();
    let digest = fake.put_manifest(repo, Some("v1"), OCI_MANIFEST, manifest);
    let image = format!("{}/{repo}:v1", fake.addr);
    let account = fresh_account().await;

    fake.set_fault(Some(Fault::StatusOnWrite("/manifests/".into(), 403)));
    let (code, out, err) = sign(&account, &image, &fake.addr, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("registry_refused"), "{err}");
    let written = records(&account.did).await;
    assert_eq!(written.len(), 1);
    let uri = written[0]["uri"].as_str().unwrap();
    assert!(
        err.contains(&format!(
            "the signature record {uri} was created on the PDS"
        )),
        "{err}"
    );
    let retry = format!(
        "atcr-verify sign {image} --pds {} --record-uri {uri}",
        World::get().pds
    );
    assert!(err.contains(&retry), "{err}");
    let (code, out, _) = sign(&account, &image, &fake.addr, &["--json"]);
    assert_eq!(code, 2);
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["recordCreated"], true);
    assert!(answer["recordUri"].as_str().unwrap().starts_with("at://"));

    // The retry: attach the existing record, no login, nothing new on the PDS.
    fake.set_fault(None);
    let (code, out, err) = attach(&image, uri, &fake.addr, &["--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let signed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(signed["recordCreated"], false);
    assert_eq!(signed["recordUri"], uri);
    assert_eq!(signed["attachedVia"], "referrers-tag");
    assert_eq!(signed["repository"], repo, "the existing record's");
    assert_eq!(
        records(&account.did).await.len(),
        2,
        "only the two attempts wrote records"
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), &fake.addr, &[&account.did], 1);
    let (code, report) = verify(&image, &fake.addr, &policy, &[]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["signatures"][0]["uri"], uri);

    // A record for another image is not attached.
    let other = fake.put_manifest(
        repo,
        Some("v2"),
        OCI_MANIFEST,
        b"{\"schemaVersion\":2}".to_vec(),
    );
    let (code, _, err) = attach(
        &format!("{}/{repo}@{other}", fake.addr),
        uri,
        &fake.addr,
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("record_mismatch") && err.contains(&digest),
        "{err}"
    );

    // Nor a record of the same digest for another repository (the verifier would not count
    // it: `matchRepository`).
    let elsewhere = format!("{}/team/other@{digest}", fake.addr);
    let (status, bytes) = get(
        &fake.url(),
        &format!("/v2/{repo}/manifests/{digest}"),
        OCI_MANIFEST,
        None,
    )
    .await;
    assert_eq!(status, 200);
    fake.put_manifest("team/other", None, OCI_MANIFEST, bytes);
    let (code, out, err) = sign(&account, &elsewhere, &fake.addr, &["--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let other_signed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(other_signed["repository"], "team/other");
    let other_uri = other_signed["recordUri"].as_str().unwrap();
    let (code, _, err) = attach(&image, other_uri, &fake.addr, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("record_mismatch") && err.contains("its repository \"team/other\""),
        "{err}"
    );
}

/// A CNCF registry of the test's own over `root` (read-only when asked: it answers 405 to
/// every write), stopped when dropped.
struct OwnRegistry {
    addr: String,
    child: std::process::Child,
}

impl OwnRegistry {
    fn start(root: &Path, read_only: bool) -> OwnRegistry {
        let port = free_port();
        let config = root.join(format!("config-{port}.yml"));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage: {{filesystem: {{rootdirectory: {}}}, maintenance: {{readonly: {{enabled: {read_only}}}}}}}\n\
                 http: {{addr: 127.0.0.1:{port}}}\nlog: {{level: error}}\n",
                root.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "docker-registry (Debian package docker-registry; tests/world/install-system.sh)",
            );
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        OwnRegistry { addr, child }
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real registry in read-only mode refuses the first push, which `sign` makes before
/// writing anything on the PDS: exit 2, `registry_refused`, no record.
#[tokio::test]
async fn a_read_only_registry_is_found_out_before_the_record_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let repo = "acme/app";
    {
        let writable = OwnRegistry::start(dir.path(), false);
        Pusher::new(&writable.addr)
            .image(repo, "v1", &unique("seed"))
            .await;
    }
    let read_only = OwnRegistry::start(dir.path(), true);
    let image = format!("{}/{repo}:v1", read_only.addr);
    let account = fresh_account().await;
    let (code, out, err) = sign(&account, &image, &read_only.addr, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("registry_refused"), "{err}");
    assert!(err.contains("HTTP 405"), "{err}");
    assert!(err.contains("does not accept pushes"), "{err}");
    assert!(!err.contains("at://"), "{err}");
    assert!(
        records(&account.did).await.is_empty(),
        "nothing written on the PDS"
    );
}

/// A PDS that redirects the login elsewhere does not get the password forwarded: the PDS
/// client follows no redirect (the target here is the real PDS, where the login would
/// succeed).
#[tokio::test]
async fn the_login_is_not_forwarded_by_a_redirect() {
    let world = World::get();
    let reg = real_registry();
    let pusher = Pusher::new(reg);
    let repo = format!("test/{}", unique("redirect"));
    pusher.image(&repo, "v1", &unique("seed")).await;
    let account = fresh_account().await;
    let forwarder = Fake::registry(10, None);
    forwarder.set_fault(Some(Fault::RedirectOnPath(
        "/xrpc/".into(),
        world.pds.clone(),
    )));
    let image = format!("{reg}/{repo}:v1");
    let pds = forwarder.url();
    let (code, out, err) = sign_at(&pds, &account, &image, reg, &[]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("more than 0 redirects"), "{err}");
    assert!(err.contains("com.atproto.server.createSession"), "{err}");
    assert!(records(&account.did).await.is_empty());
}

/// An image `team/app:v1` put straight into `fake`; returns its reference.
fn image_in(fake: &Fake) -> String {
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(b"c"), "size": 1},
        "layers": [],
        "annotations": {"seed": unique("seed")},
    }))
    .unwrap();
    fake.put_manifest("team/app", Some("v1"), OCI_MANIFEST, manifest);
    format!("{}/team/app:v1", fake.addr)
}

/// `--registry-config` file giving `user:password` for `registry`, in `dir`.
fn registry_config(dir: &Path, registry: &str, user: &str, password: &str) -> String {
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        json!({"auths": {registry: {"username": user, "password": password}}}).to_string(),
    )
    .unwrap();
    path.display().to_string()
}

/// The OCI distribution spec lets an upload's `Location` be absolute, on another origin
/// (a storage front end): `sign` sends the blob there, but never the registry's bearer
/// token, nor its Basic credentials to a token realm that other origin advertises.
#[tokio::test]
async fn an_upload_location_on_another_origin_gets_no_credentials() {
    let registry = Fake::private_registry("push-token", "ci", "s3cret");
    let image = image_in(&registry);
    let dir = tempfile::tempdir().unwrap();
    let creds = registry_config(dir.path(), &registry.addr, "ci", "s3cret");
    let account = fresh_account().await;

    // Another origin that itself demands a token: it answers 401 with a challenge, which is
    // not followed (no token request there, no credentials) and fails the push before any
    // record is written.
    // `sign` with the registry's uploads sent to `origin`.
    let sign_uploading_to = |origin: &Fake| {
        let location = format!("{}/upload/1", origin.url());
        registry.set_fault(Some(Fault::UploadLocation(Some(location))));
        sign(
            &account,
            &image,
            &registry.addr,
            &["--json", "--registry-config", &creds],
        )
    };
    let guarded = Fake::registry(10, Some("elsewhere-token"));
    let (code, out, err) = sign_uploading_to(&guarded);
    assert_eq!(code, 2, "{out}\n{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["error"]["code"], "registry_refused", "{answer:#}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("HTTP 401"), "{message}");
    assert_eq!(
        guarded.counts().get("blobs"),
        Some(&1),
        "{:?}",
        guarded.counts()
    );
    assert_eq!(
        guarded.counts().get("token"),
        None,
        "{:?}",
        guarded.counts()
    );
    assert_eq!(guarded.authorizations(), vec![], "no credentials elsewhere");
    assert!(records(&account.did).await.is_empty());

    // An open other origin: the blobs are uploaded there, without credentials; the
    // registry itself got its push token.
    let open = Fake::registry(10, None);
    registry.reset_counts();
    let (code, out, err) = sign_uploading_to(&open);
    assert_eq!(code, 0, "{out}\n{err}");
    let signed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(signed["attachedVia"], "referrers-api", "{signed:#}");
    assert_eq!(open.counts().get("blobs"), Some(&2), "{:?}", open.counts());
    assert_eq!(open.authorizations(), vec![], "no credentials elsewhere");
    // The empty config blob `{}` is on the other origin.
    let (status, body) = get(
        &open.url(),
        "/v2/team/app/blobs/sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "application/octet-stream",
        None,
    )
    .await;
    assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
    let seen = registry.authorizations();
    assert!(
        seen.iter()
            .any(|(path, value)| path.contains("/blobs/uploads/")
                && value == "Bearer push-token+push"),
        "the registry's own upload start carried its token: {seen:?}"
    );
}

/// An upload start without a `Location`, or with one that is no usable URL: exit 2 with
/// what the registry sent, and nothing written on the PDS.
#[tokio::test]
async fn a_missing_or_garbage_upload_location_is_refused() {
    let registry = Fake::registry(10, None);
    let image = image_in(&registry);
    let account = fresh_account().await;
    let cases: Vec<(Option<String>, &str, &str)> = vec![
        (
            None,
            "upstream_invalid",
            "HTTP 202 without a Location header",
        ),
        (
            Some("http://[::1/upload".into()),
            "upstream_invalid",
            "Location \"http://[::1/upload\": invalid IPv6 address",
        ),
        (
            Some("ftp://127.0.0.1/upload".into()),
            "upstream_refused",
            "scheme \"ftp\" is not allowed",
        ),
        (
            Some(format!("http://user:pw@{}/upload/1", registry.addr)),
            "upstream_refused",
            "credentials in URLs are refused",
        ),
    ];
    for (location, code_expected, says) in cases {
        registry.set_fault(Some(Fault::UploadLocation(location.clone())));
        let (code, out, err) = sign(&account, &image, &registry.addr, &["--json"]);
        assert_eq!(code, 2, "{location:?}: {out}\n{err}");
        let answer: Value = serde_json::from_str(&out).unwrap();
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("uploading blob sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a to {}/team/app", registry.addr)),
            "{location:?}: {message}"
        );
        assert!(message.contains(says), "{location:?}: {message}");
        assert_eq!(
            answer["error"]["code"], code_expected,
            "{location:?}: {answer:#}"
        );
    }
    assert!(records(&account.did).await.is_empty());
}
