//! Signers' identities. did:plc proven from its signed operation log (issue 15, point 1): the
//! real PLC directory
//! of the test world is the oracle: every operation below is one it accepted (it checks each
//! one as it arrives), and the verifier must reach the same state from the audit log alone.
//! A tampering proxy in front of it then changes one thing at a time, and each change is
//! refused with its own error.

use atcr_verify::net::{Guard, HttpClient, NetConfig};
use atcr_verify::plc::{self, PlcIdentity, PlcLogError};
use atcr_verify::resolve::{DidResolver, HttpDidResolver, PlcTrust, ResolveError};
use atcr_verify::syntax::Did;
use base64::Engine;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::fake::{Fake, Fault};
use crate::common::repo::Signer;
use crate::common::unique;
use crate::common::world::World;

pub(crate) fn dag_cbor(v: &Value) -> Vec<u8> {
    serde_ipld_dagcbor::to_vec(v).unwrap()
}

pub(crate) fn cid(op: &Value) -> String {
    let hash = cid::multihash::Multihash::<64>::wrap(0x12, &Sha256::digest(dag_cbor(op))).unwrap();
    cid::Cid::new_v1(0x71, hash).to_string()
}

pub(crate) fn sign(mut unsigned: Value, key: &Signer) -> Value {
    let sig = key.sign(&dag_cbor(&unsigned));
    unsigned["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sig)
        .into();
    unsigned
}

fn did_of(genesis: &Value) -> String {
    let b32 = multibase::encode(
        multibase::Base::Base32Lower,
        Sha256::digest(dag_cbor(genesis)),
    );
    format!("did:plc:{}", &b32[1..25])
}

fn op(rotation: &[&Signer], atproto: &Signer, aka: &str, pds: &str, prev: Option<&str>) -> Value {
    json!({
        "type": "plc_operation",
        "rotationKeys": rotation.iter().map(|k| k.did_key()).collect::<Vec<_>>(),
        "verificationMethods": {"atproto": atproto.did_key()},
        "alsoKnownAs": [format!("at://{aka}")],
        "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": pds}},
        "prev": prev,
    })
}

fn resolver(plc: &str, trust: PlcTrust) -> HttpDidResolver {
    let config = NetConfig {
        guard: Guard {
            allow_private_addresses: true,
            ..Guard::default()
        },
        ..NetConfig::default()
    };
    HttpDidResolver::new(
        HttpClient::new(config).unwrap(),
        plc.parse().unwrap(),
        trust,
    )
}

pub(crate) async fn post(plc: &str, did: &str, op: &Value) {
    let answer = crate::common::client()
        .post(format!("{plc}/{did}"))
        .json(op)
        .send()
        .await
        .unwrap();
    let status = answer.status();
    assert!(
        status.is_success(),
        "PLC refused: {status} {}",
        answer.text().await.unwrap()
    );
}

pub(crate) async fn audit_log(plc: &str, did: &str) -> Vec<Value> {
    let url = format!("{plc}/{did}/log/audit");
    crate::common::client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The account keys of one test identity: two rotation keys (priority order) and two
/// signing keys.
struct Keys {
    rot0: Signer,
    rot1: Signer,
    key_a: Signer,
    key_b: Signer,
}

fn keys() -> Keys {
    Keys {
        rot0: Signer::k256(201),
        rot1: Signer::p256(202),
        key_a: Signer::p256(203),
        key_b: Signer::k256(204),
    }
}

/// Creates a fresh identity on the real directory; returns its DID and genesis operation.
async fn genesis(plc: &str, k: &Keys, pds: &str) -> (String, Value) {
    let aka = format!("{}.test", unique("plc"));
    let genesis = sign(op(&[&k.rot0, &k.rot1], &k.key_a, &aka, pds, None), &k.rot0);
    let did = did_of(&genesis);
    post(plc, &did, &genesis).await;
    (did, genesis)
}

fn state(identity: PlcIdentity) -> plc::PlcState {
    match identity {
        PlcIdentity::Active(state) => state,
        PlcIdentity::Tombstoned => panic!("tombstoned"),
    }
}

/// The accounts the real PDS created: their logs prove their documents.
#[tokio::test]
async fn the_world_accounts_are_proven_by_their_logs() {
    let world = World::get();
    for account in &world.accounts {
        let did: Did = account.did.parse().unwrap();
        let document = resolver(&world.plc, PlcTrust::Log)
            .resolve(&did)
            .await
            .unwrap();
        let key = document.signing_key().unwrap();
        let log = serde_json::to_vec(&audit_log(&world.plc, &account.did).await).unwrap();
        let proven = state(plc::audit(&did, &log).unwrap());
        assert_eq!(proven.pds.as_deref(), Some(world.pds.as_str()));
        assert_eq!(proven.atproto_key, Some(key.to_did_key()));
        assert_eq!(
            proven.also_known_as,
            vec![format!("at://{}", account.handle)]
        );
    }
}

/// Key rotation by the second rotation key, a fork by the first that nullifies it, then a
/// tombstone: the directory accepted each, and the log alone gives what the directory serves.
#[tokio::test]
async fn the_verifier_agrees_with_the_real_directory_through_rotation_fork_and_tombstone() {
    let world = World::get();
    let k = keys();
    let (did_s, g) = genesis(&world.plc, &k, "https://pds.one.example").await;
    let did: Did = did_s.parse().unwrap();
    let dids = resolver(&world.plc, PlcTrust::Log);
    let key = |d: atcr_verify::did_document::DidDocument| d.signing_key().unwrap().to_did_key();
    assert_eq!(key(dids.resolve(&did).await.unwrap()), k.key_a.did_key());

    // The second rotation key moves the signing key to key_b.
    let aka = g["alsoKnownAs"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("at://")
        .to_owned();
    let rotate = sign(
        op(
            &[&k.rot0, &k.rot1],
            &k.key_b,
            &aka,
            "https://pds.one.example",
            Some(&cid(&g)),
        ),
        &k.rot1,
    );
    post(&world.plc, &did_s, &rotate).await;
    assert_eq!(key(dids.resolve(&did).await.unwrap()), k.key_b.did_key());

    // The first (higher-priority) rotation key forks from genesis within 72 hours: the
    // rotation is nullified, and the PDS moves.
    let fork = sign(
        op(
            &[&k.rot0, &k.rot1],
            &k.key_a,
            &aka,
            "https://pds.two.example",
            Some(&cid(&g)),
        ),
        &k.rot0,
    );
    post(&world.plc, &did_s, &fork).await;
    let log = audit_log(&world.plc, &did_s).await;
    let flags: Vec<bool> = log
        .iter()
        .map(|e| e["nullified"].as_bool().unwrap())
        .collect();
    assert_eq!(
        flags,
        [false, true, false],
        "the directory nullified the rotation"
    );
    let document = dids.resolve(&did).await.unwrap();
    assert_eq!(key(document.clone()), k.key_a.did_key());
    assert_eq!(document.pds_endpoint().unwrap(), "https://pds.two.example");

    // A tombstone deactivates it.
    let tombstone = sign(
        json!({"type": "plc_tombstone", "prev": cid(&fork)}),
        &k.rot0,
    );
    post(&world.plc, &did_s, &tombstone).await;
    let err = dids.resolve(&did).await.unwrap_err();
    assert!(matches!(err, ResolveError::Deactivated { .. }), "{err}");
}

/// A proxy in front of the real directory that edits one answer; `edit` gets the parsed
/// audit log (for `/log/audit`) or document.
fn tampering(world: &World, did: &str, edit: fn(&str, &mut Value)) -> Fake {
    let proxy = Fake::proxy(&world.plc);
    let did = did.to_owned();
    proxy.transform(move |path, body| {
        if !path.starts_with(&format!("/{did}")) {
            return body;
        }
        let mut value: Value = serde_json::from_slice(&body).unwrap();
        edit(path, &mut value);
        serde_json::to_vec(&value).unwrap()
    });
    proxy
}

async fn refused(proxy: &Fake, did: &str) -> PlcLogError {
    let did: Did = did.parse().unwrap();
    match resolver(&proxy.url(), PlcTrust::Log).resolve(&did).await {
        Err(ResolveError::Unproven { source, .. }) => *source,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Puts `key` as the document's #atproto key (a valid key, so only the log can tell).
fn swap_key(document: &mut Value, key: &Signer) {
    document["verificationMethod"][0]["type"] = "Multikey".into();
    document["verificationMethod"][0]["publicKeyMultibase"] = key.multikey().into();
}

fn is_log(path: &str) -> bool {
    path.ends_with("/log/audit")
}

/// One identity with three operations: genesis, a rotation by the second rotation key, a
/// move back to the first signing key by the first.
async fn three_operations() -> String {
    let world = World::get();
    let k = keys();
    let (did, g) = genesis(&world.plc, &k, "https://pds.one.example").await;
    let aka = g["alsoKnownAs"][0]
        .as_str()
        .unwrap()
        .trim_start_matches("at://")
        .to_owned();
    let pds = "https://pds.one.example";
    let second = sign(
        op(&[&k.rot0, &k.rot1], &k.key_b, &aka, pds, Some(&cid(&g))),
        &k.rot1,
    );
    post(&world.plc, &did, &second).await;
    let third = sign(
        op(
            &[&k.rot0, &k.rot1],
            &k.key_a,
            &aka,
            pds,
            Some(&cid(&second)),
        ),
        &k.rot0,
    );
    post(&world.plc, &did, &third).await;
    did
}

#[tokio::test]
async fn a_swapped_key_or_pds_in_the_document_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    let untampered = tampering(world, &did, |_, _| {});
    let did_parsed: Did = did.parse().unwrap();
    let dids = resolver(&untampered.url(), PlcTrust::Log);
    dids.resolve(&did_parsed)
        .await
        .expect("the untampered proxy is transparent");
    assert_eq!(
        untampered.total(),
        2,
        "one document and one log, nothing more"
    );

    let key = tampering(world, &did, |path, v| {
        if !is_log(path) {
            swap_key(v, &Signer::k256(99));
        }
    });
    let err = refused(&key, &did).await;
    assert!(
        matches!(
            err,
            PlcLogError::DocumentMismatch {
                field: "#atproto key",
                ..
            }
        ),
        "{err}"
    );

    let pds = tampering(world, &did, |path, v| {
        if !is_log(path) {
            v["service"][0]["serviceEndpoint"] = "https://evil.example".into();
        }
    });
    let err = refused(&pds, &did).await;
    assert!(
        matches!(err, PlcLogError::DocumentMismatch { field: "PDS", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("https://evil.example"), "{err}");

    // The same forgery is taken as served when the directory is trusted.
    let trusting = resolver(&pds.url(), PlcTrust::Directory);
    let document = trusting.resolve(&did_parsed).await.unwrap();
    assert_eq!(document.pds_endpoint().unwrap(), "https://evil.example");
}

#[tokio::test]
async fn a_swapped_key_in_both_document_and_log_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    // The proxy rewrites the key everywhere: the operation no longer hashes to its CID.
    let proxy = tampering(world, &did, |path, v| {
        let evil = Signer::k256(99);
        if is_log(path) {
            v[2]["operation"]["verificationMethods"]["atproto"] = evil.did_key().into();
        } else {
            swap_key(v, &evil);
        }
    });
    let err = refused(&proxy, &did).await;
    assert!(
        matches!(err, PlcLogError::CidMismatch { index: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_appended_operation_signed_by_a_non_rotation_key_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    let proxy = tampering(world, &did, |path, v| {
        let evil = Signer::k256(99);
        if !is_log(path) {
            swap_key(v, &evil);
            v["service"][0]["serviceEndpoint"] = "https://evil.example".into();
            return;
        }
        let last = v[2]["operation"].clone();
        let aka = last["alsoKnownAs"][0].as_str().unwrap();
        let aka = aka.trim_start_matches("at://").to_owned();
        let pds = "https://evil.example";
        // Signed by the signing key, which is not a rotation key.
        let forged = sign(
            op(&[&evil], &evil, &aka, pds, Some(&cid(&last))),
            &Signer::k256(204),
        );
        let did = v[0]["did"].clone();
        v.as_array_mut().unwrap().push(json!({
            "did": did, "operation": forged, "cid": cid(&forged),
            "nullified": false, "createdAt": "2030-01-01T00:00:00.000Z",
        }));
    });
    let err = refused(&proxy, &did).await;
    assert!(
        matches!(
            err,
            PlcLogError::NotSignedByRotationKey {
                index: 3,
                keys: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_removed_or_reordered_operation_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    // Each edit of the served log, and the refusal it must get. Withholding the newest
    // operation is not detectable from the log: the document then disagrees with it (the
    // directory serves the newest state), and that is refused too.
    type Edit = fn(&str, &mut Value);
    type Expected = fn(&PlcLogError) -> bool;
    let cases: [(&str, Edit, Expected); 4] = [
        (
            "removed",
            |path, v| {
                if is_log(path) {
                    v.as_array_mut().unwrap().remove(1);
                }
            },
            |e| matches!(e, PlcLogError::UnknownPrev { index: 1, .. }),
        ),
        (
            "reordered",
            |path, v| {
                if is_log(path) {
                    v.as_array_mut().unwrap().swap(1, 2);
                }
            },
            |e| matches!(e, PlcLogError::UnknownPrev { index: 1, .. }),
        ),
        (
            "genesis moved",
            |path, v| {
                if is_log(path) {
                    v.as_array_mut().unwrap().swap(0, 1);
                }
            },
            |e| matches!(e, PlcLogError::Genesis { index: 0, .. }),
        ),
        (
            "newest withheld",
            |path, v| {
                if is_log(path) {
                    v.as_array_mut().unwrap().pop();
                }
            },
            |e| matches!(e, PlcLogError::DocumentMismatch { .. }),
        ),
    ];
    for (what, edit, expected) in cases {
        let err = refused(&tampering(world, &did, edit), &did).await;
        assert!(expected(&err), "{what}: {err}");
    }
}

#[tokio::test]
async fn a_genesis_that_does_not_hash_to_the_did_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    // Another, validly signed genesis (same keys, another handle) in place of the real one.
    let proxy = tampering(world, &did, |path, v| {
        if is_log(path) {
            let k = keys();
            let other = sign(
                op(
                    &[&k.rot0, &k.rot1],
                    &k.key_a,
                    "someone-else.test",
                    "https://x.example",
                    None,
                ),
                &k.rot0,
            );
            v[0]["operation"] = other.clone();
            v[0]["cid"] = cid(&other).into();
        }
    });
    let err = refused(&proxy, &did).await;
    assert!(matches!(err, PlcLogError::GenesisHash { .. }), "{err}");
}

#[tokio::test]
async fn a_false_nullified_flag_is_refused() {
    let world = World::get();
    let did = three_operations().await;
    let proxy = tampering(world, &did, |path, v| {
        if is_log(path) {
            v[1]["nullified"] = true.into();
        }
    });
    let err = refused(&proxy, &did).await;
    assert!(
        matches!(
            err,
            PlcLogError::NullifiedMismatch {
                index: 1,
                served: true,
                proven: false
            }
        ),
        "{err}"
    );
}

/// A legacy `create` genesis (the directory no longer accepts new ones, so the log is built
/// here): normalized as the directory does, its signing key is the #atproto key.
#[test]
fn a_legacy_create_genesis_is_understood() {
    let k = keys();
    let create = sign(
        json!({
            "type": "create",
            "signingKey": k.key_a.did_key(),
            "recoveryKey": k.rot0.did_key(),
            "handle": "legacy.test",
            "service": "pds.legacy.example",
            "prev": null,
        }),
        &k.rot0,
    );
    let did = did_of(&create);
    let entry = |op: &Value, nullified: bool, at: &str| json!({"did": did, "operation": op, "cid": cid(op), "nullified": nullified, "createdAt": at});
    let log = json!([entry(&create, false, "2023-01-01T00:00:00.000Z")]);
    let parsed: Did = did.parse().unwrap();
    let proven = state(plc::audit(&parsed, &serde_json::to_vec(&log).unwrap()).unwrap());
    assert_eq!(proven.atproto_key, Some(k.key_a.did_key()));
    assert_eq!(proven.rotation_keys, [k.rot0.did_key(), k.key_a.did_key()]);
    assert_eq!(proven.pds.as_deref(), Some("https://pds.legacy.example"));
    assert_eq!(proven.also_known_as, ["at://legacy.test"]);

    // The signing key is the second rotation key; it may sign the next operation.
    let next = sign(
        op(
            &[&k.rot0],
            &k.key_b,
            "legacy.test",
            "https://pds.legacy.example",
            Some(&cid(&create)),
        ),
        &k.key_a,
    );
    let log = json!([
        entry(&create, false, "2023-01-01T00:00:00.000Z"),
        entry(&next, false, "2023-01-02T00:00:00.000Z"),
    ]);
    let proven = state(plc::audit(&parsed, &serde_json::to_vec(&log).unwrap()).unwrap());
    assert_eq!(proven.atproto_key, Some(k.key_b.did_key()));

    // A fork more than 72 hours later is refused, as is one by a weaker key.
    let late = sign(
        op(
            &[&k.rot0],
            &k.key_a,
            "legacy.test",
            "https://pds.legacy.example",
            Some(&cid(&create)),
        ),
        &k.rot0,
    );
    let log = json!([
        entry(&create, false, "2023-01-01T00:00:00.000Z"),
        entry(&next, true, "2023-01-02T00:00:00.000Z"),
        entry(&late, false, "2023-01-05T00:00:01.000Z"),
    ]);
    let err = plc::audit(&parsed, &serde_json::to_vec(&log).unwrap()).unwrap_err();
    assert!(
        matches!(err, PlcLogError::BadForkTime { index: 2, .. }),
        "{err}"
    );
    let weak = sign(
        op(
            &[&k.rot0],
            &k.key_a,
            "legacy.test",
            "https://x.example",
            Some(&cid(&create)),
        ),
        &k.key_a,
    );
    let log = json!([
        entry(&create, false, "2023-01-01T00:00:00.000Z"),
        entry(&next, true, "2023-01-02T00:00:00.000Z"),
        entry(&weak, false, "2023-01-02T01:00:00.000Z"),
    ]);
    let err = plc::audit(&parsed, &serde_json::to_vec(&log).unwrap()).unwrap_err();
    assert!(matches!(err, PlcLogError::WeakFork { index: 2 }), "{err}");
}

/// Hostile sizes and shapes: a clean error, never a panic.
#[test]
fn hostile_logs_are_clean_errors() {
    let did: Did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz".parse().unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"[]".to_vec(), "empty"),
        (b"{}".to_vec(), "JSON array"),
        (vec![b' '; plc::MAX_LOG_BYTES + 1], "limit"),
        (b"[{\"did\":\"did:plc:other\",\"operation\":{},\"cid\":\"x\",\"nullified\":false,\"createdAt\":\"x\"}]".to_vec(), "not this DID"),
        (format!("[{{\"did\":\"{did}\",\"operation\":[1],\"cid\":\"x\",\"nullified\":false,\"createdAt\":\"x\"}}]").into_bytes(), "malformed"),
        (format!("[{}]", "[".repeat(10_000)).into_bytes(), "JSON array"),
    ];
    for (bytes, expected) in cases {
        let err = plc::audit(&did, &bytes).unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    let one = json!({"did": did.as_str(), "operation": {}, "cid": "x", "nullified": false, "createdAt": "x"});
    let log = Value::Array(vec![one; plc::MAX_OPERATIONS + 1]);
    let err = plc::audit(&did, &serde_json::to_vec(&log).unwrap()).unwrap_err();
    assert!(
        matches!(err, PlcLogError::TooManyOperations { .. }),
        "{err}"
    );
}

/// A did:web host serving `body` with `status` at `/.well-known/did.json`.
fn web_host(status: u16, body: Vec<u8>) -> (Fake, Did) {
    let host = Fake::registry(10, None);
    host.set_fault(Some(Fault::BodyOnPath(
        "/.well-known/did.json".into(),
        status,
        std::sync::Arc::new(body),
    )));
    let did = format!("did:web:{}", host.addr.replace(':', "%3A"));
    (host, did.parse().unwrap())
}

fn web_document(id: &str, key: &Signer) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "alsoKnownAs": ["at://web.test"],
        "verificationMethod": [{"id": "#atproto", "type": "Multikey", "controller": id,
            "publicKeyMultibase": key.multikey()}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": "https://pds.web.example"}],
    }))
    .unwrap()
}

/// did:web (point 4): the host's own document, fetched from the host alone (never the PLC
/// directory), whose `id` must be the DID, within the size cap, hostname only.
#[tokio::test]
async fn did_web_is_the_hosts_document_for_that_did_only() {
    let world = World::get();
    let plc = Fake::proxy(&world.plc);
    let dids = resolver(&plc.url(), PlcTrust::Log);
    let key = Signer::k256(55);

    let (host, did) = web_host(200, Vec::new());
    host.set_fault(Some(Fault::BodyOnPath(
        "/.well-known/did.json".into(),
        200,
        std::sync::Arc::new(web_document(did.as_str(), &key)),
    )));
    let document = dids.resolve(&did).await.unwrap();
    assert_eq!(document.signing_key().unwrap(), key.public());
    assert_eq!(document.pds_endpoint().unwrap(), "https://pds.web.example");
    assert_eq!(plc.total(), 0, "did:web never asks the PLC directory");

    // Another DID's document, served by this host: refused.
    let (_other, did) = web_host(200, web_document("did:web:someone.example", &key));
    let err = dids.resolve(&did).await.unwrap_err();
    assert!(
        err.to_string().contains("does not match the expected DID"),
        "{err}"
    );

    // Over the 256 KiB cap: refused, not read on.
    let mut big = web_document("did:web:x", &key);
    big.resize(300 * 1024, b' ');
    let (_big, did) = web_host(200, big);
    let err = dids.resolve(&did).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");

    // A path (did:web:host:user) is not ATProto's did:web: refused before any request.
    let with_path: Did = "did:web:example.com:users:alice".parse().unwrap();
    let err = dids.resolve(&with_path).await.unwrap_err();
    assert!(err.to_string().contains("with a path"), "{err}");
}

/// did:web is fetched over HTTPS only: without `--allow-private-addresses` (which also allows
/// plain HTTP on loopback for local testing), a did:web host is asked with `https://`.
#[tokio::test]
async fn did_web_is_https_only() {
    let (host, did) = web_host(200, web_document("x", &Signer::k256(55)));
    let strict = HttpDidResolver::new(
        HttpClient::new(NetConfig::default()).unwrap(),
        "https://plc.directory".parse().unwrap(),
        PlcTrust::Log,
    );
    let err = strict.resolve(&did).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("https://{}", host.addr)), "{text}");
    assert_eq!(host.total(), 0, "nothing reached the plain-HTTP host");
}

/// An audit log of `ops` (operation, nullified, createdAt) for `did`, as the directory
/// serves it.
fn log_of(did: &str, ops: &[(&Value, bool, &str)]) -> Vec<u8> {
    let entries: Vec<Value> = ops
        .iter()
        .map(|(op, nullified, at)| {
            json!({"did": did, "operation": op, "cid": cid(op), "nullified": nullified, "createdAt": at})
        })
        .collect();
    serde_json::to_vec(&entries).unwrap()
}

/// The refusal of `log` for `did`, checking that its text says `says` (each part).
fn refusal(did: &str, log: &[u8], says: &[&str]) -> PlcLogError {
    let parsed: Did = did.parse().unwrap();
    let err = plc::audit(&parsed, log).unwrap_err();
    let text = err.to_string();
    for needle in says {
        assert!(text.contains(needle), "expected {needle:?} in: {text}");
    }
    err
}

const T0: &str = "2024-01-01T00:00:00.000Z";
const T1: &str = "2024-01-01T01:00:00.000Z";
const T2: &str = "2024-01-01T02:00:00.000Z";

/// An unsigned operation of the pure tests' identity (handle `pure.test`, PDS
/// `https://pds.example`) with `rotation` keys and signing `key`, after `prev` (its CID).
fn pure_op(rotation: &[&Signer], key: &Signer, prev: Option<&Value>) -> Value {
    let prev = prev.map(cid);
    op(
        rotation,
        key,
        "pure.test",
        "https://pds.example",
        prev.as_deref(),
    )
}

/// A genesis of the test keys (signed by the first rotation key) and its DID.
fn pure_genesis(k: &Keys) -> (Value, String) {
    let g = sign(pure_op(&[&k.rot0, &k.rot1], &k.key_a, None), &k.rot0);
    let did = did_of(&g);
    (g, did)
}

/// Issue: an operation after a `plc_tombstone` is refused (the directory answers "Cannot
/// apply op to tombstone"); the tombstone alone is a deactivated DID.
#[test]
fn an_operation_after_a_tombstone_is_refused() {
    let k = keys();
    let (g, did) = pure_genesis(&k);
    let tombstone = sign(json!({"type": "plc_tombstone", "prev": cid(&g)}), &k.rot0);
    let parsed: Did = did.parse().unwrap();
    let alone = log_of(&did, &[(&g, false, T0), (&tombstone, false, T1)]);
    assert_eq!(
        plc::audit(&parsed, &alone).unwrap(),
        PlcIdentity::Tombstoned
    );

    let revived = sign(pure_op(&[&k.rot0], &k.key_b, Some(&tombstone)), &k.rot0);
    let log = log_of(
        &did,
        &[
            (&g, false, T0),
            (&tombstone, false, T1),
            (&revived, false, T2),
        ],
    );
    let err = refusal(&did, &log, &["operation 2 follows a tombstone"]);
    assert_eq!(err, PlcLogError::AfterTombstone { index: 2 });

    let again = sign(
        json!({"type": "plc_tombstone", "prev": cid(&tombstone)}),
        &k.rot0,
    );
    let log = log_of(
        &did,
        &[
            (&g, false, T0),
            (&tombstone, false, T1),
            (&again, false, T2),
        ],
    );
    assert_eq!(
        refusal(&did, &log, &["operation 2 follows a tombstone"]),
        PlcLogError::AfterTombstone { index: 2 }
    );
}

/// Issue: the same operation twice is `Duplicate` (before the fix it was reported as a weak
/// fork, or for the genesis as a second genesis).
#[test]
fn an_operation_served_twice_is_refused_as_a_duplicate() {
    let k = keys();
    let (g, did) = pure_genesis(&k);
    let next = sign(pure_op(&[&k.rot0, &k.rot1], &k.key_b, Some(&g)), &k.rot0);
    let log = log_of(
        &did,
        &[(&g, false, T0), (&next, false, T1), (&next, false, T2)],
    );
    let expected = format!("operation 2 ({}) appears twice in the log", cid(&next));
    let err = refusal(&did, &log, &[expected.as_str()]);
    assert_eq!(
        err,
        PlcLogError::Duplicate {
            index: 2,
            cid: cid(&next)
        }
    );
    let log = log_of(&did, &[(&g, false, T0), (&g, false, T1)]);
    let err = refusal(&did, &log, &["operation 1", "appears twice"]);
    assert!(
        matches!(err, PlcLogError::Duplicate { index: 1, .. }),
        "{err}"
    );
}

/// Issue: more than 10 rotation keys (or none) is malformed, in a genesis or a later
/// operation; 10 are accepted.
#[test]
fn the_rotation_key_count_is_capped() {
    let k = keys();
    let many: Vec<Signer> = (1..=11).map(Signer::k256).collect();
    let refs: Vec<&Signer> = many.iter().collect();
    let ten = sign(pure_op(&refs[..10], &k.key_a, None), &many[0]);
    let did = did_of(&ten);
    let proven =
        state(plc::audit(&did.parse().unwrap(), &log_of(&did, &[(&ten, false, T0)])).unwrap());
    assert_eq!(proven.rotation_keys.len(), 10);

    let eleven = sign(pure_op(&refs, &k.key_a, None), &many[0]);
    let did = did_of(&eleven);
    let err = refusal(
        &did,
        &log_of(&did, &[(&eleven, false, T0)]),
        &["operation 0 is malformed: 11 rotation keys (1 to 10 are allowed)"],
    );
    assert!(
        matches!(err, PlcLogError::Malformed { index: 0, .. }),
        "{err}"
    );

    let none = sign(pure_op(&[], &k.key_a, None), &k.rot0);
    let did = did_of(&none);
    refusal(
        &did,
        &log_of(&did, &[(&none, false, T0)]),
        &["operation 0 is malformed: 0 rotation keys (1 to 10 are allowed)"],
    );

    // A later operation listing eleven, signed by a valid rotation key of the genesis.
    let (g, did) = pure_genesis(&k);
    let grown = sign(pure_op(&refs, &k.key_a, Some(&g)), &k.rot0);
    let err = refusal(
        &did,
        &log_of(&did, &[(&g, false, T0), (&grown, false, T1)]),
        &["operation 1 is malformed: 11 rotation keys"],
    );
    assert!(
        matches!(err, PlcLogError::Malformed { index: 1, .. }),
        "{err}"
    );
}

/// A `did:key:` of `prefix` ‖ `point`, base58btc.
fn did_key_of(prefix: &[u8], point: &[u8]) -> String {
    let bytes: Vec<u8> = prefix.iter().chain(point).copied().collect();
    format!(
        "did:key:{}",
        multibase::encode(multibase::Base::Base58Btc, bytes)
    )
}

/// Issue: a rotation key or `#atproto` verification key that is not a K-256/P-256
/// `did:key` is malformed, with the reason (the directory refuses such operations). The
/// bad key is second, after the key that signs, so skipping it would accept the log.
#[test]
fn unparsable_rotation_and_verification_keys_are_refused() {
    let k = keys();
    let good = k.rot0.did_key();
    let point = {
        let multikey = k.rot0.multikey();
        let bytes = multibase::decode(&multikey).unwrap().1;
        bytes[2..].to_vec()
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "truncated",
            did_key_of(&[0xe7, 0x01], &point[..20]),
            vec!["public key is not a valid k256 point (20 bytes)"],
        ),
        (
            "ed25519 multicodec",
            did_key_of(&[0xed, 0x01], &[7; 32]),
            vec!["multicodec prefix ed01 is not secp256k1 (e701) or P-256 (8024)"],
        ),
        (
            "not base58btc multibase",
            format!(
                "did:key:{}",
                multibase::encode(
                    multibase::Base::Base32Lower,
                    [&[0xe7, 0x01][..], &point].concat()
                )
            ),
            vec!["is not base58btc multibase"],
        ),
        ("not a did:key", k.rot0.multikey(), vec!["is not a did:key"]),
    ];
    for (what, bad, says) in cases {
        let mut rotation = pure_op(&[&k.rot0], &k.key_a, None);
        rotation["rotationKeys"] = json!([good, bad]);
        let rotation = sign(rotation, &k.rot0);
        let did = did_of(&rotation);
        let mut needles = vec!["operation 0 is malformed: rotation key: "];
        needles.extend(&says);
        let err = refusal(&did, &log_of(&did, &[(&rotation, false, T0)]), &needles);
        assert!(
            matches!(err, PlcLogError::Malformed { index: 0, .. }),
            "{what}: {err}"
        );

        let mut verification = pure_op(&[&k.rot0], &k.key_a, None);
        verification["verificationMethods"]["atproto"] = json!(bad);
        let verification = sign(verification, &k.rot0);
        let did = did_of(&verification);
        let mut needles = vec!["operation 0 is malformed: verificationMethods.atproto: "];
        needles.extend(&says);
        let err = refusal(&did, &log_of(&did, &[(&verification, false, T0)]), &needles);
        assert!(
            matches!(err, PlcLogError::Malformed { index: 0, .. }),
            "{what}: {err}"
        );
    }
}

/// The other refusals no test reached: each malformed shape, a second genesis, a tombstone
/// as genesis, a bad signature encoding, a fork not newer than the head, and a document
/// whose `alsoKnownAs` differs from the log's.
#[test]
fn the_remaining_refusals_say_what_was_expected_and_found() {
    let k = keys();
    let (g, did) = pure_genesis(&k);

    // Malformed operations in second place (the genesis is fine), each with its reason.
    let mut no_sig = sign(pure_op(&[&k.rot0], &k.key_a, Some(&g)), &k.rot0);
    no_sig.as_object_mut().unwrap().remove("sig");
    let mut unknown = sign(pure_op(&[&k.rot0], &k.key_a, Some(&g)), &k.rot0);
    unknown["type"] = json!("plc_something");
    let mut huge = pure_op(&[&k.rot0], &k.key_a, Some(&g));
    huge["alsoKnownAs"] = json!(vec!["at://x.test".repeat(100); 10]);
    let huge = sign(huge, &k.rot0);
    let create_with_prev = sign(
        json!({"type": "create", "signingKey": k.key_a.did_key(), "recoveryKey": k.rot0.did_key(),
               "handle": "x.test", "service": "pds.example", "prev": cid(&g)}),
        &k.rot0,
    );
    let tombstone_null = sign(json!({"type": "plc_tombstone", "prev": null}), &k.rot0);
    let fine = sign(pure_op(&[&k.rot0], &k.key_a, Some(&g)), &k.rot0);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no sig",
            no_sig,
            T1,
            "operation 1 is malformed: no `sig` string",
        ),
        (
            "unknown type",
            unknown,
            T1,
            "unknown variant `plc_something`, expected one of `plc_operation`, `plc_tombstone`, `create`",
        ),
        ("over 8 KiB", huge, T1, "over the 8192-byte limit"),
        (
            "create with prev",
            create_with_prev,
            T1,
            "a legacy `create` operation with a `prev`",
        ),
        (
            "tombstone prev null",
            tombstone_null,
            T1,
            "operation 1 is malformed: serde error: invalid type: Option value, expected a string",
        ),
        (
            "bad createdAt",
            fine.clone(),
            "yesterday",
            "operation 1 is malformed: createdAt: ",
        ),
    ];
    for (what, second, at, says) in cases {
        let log = log_of(&did, &[(&g, false, T0), (&second, false, at)]);
        let err = refusal(&did, &log, &[says]);
        assert!(
            matches!(err, PlcLogError::Malformed { index: 1, .. }),
            "{what}: {err}"
        );
    }

    // A second genesis (another handle) in second place.
    let other = sign(
        op(
            &[&k.rot0],
            &k.key_a,
            "other.test",
            "https://pds.example",
            None,
        ),
        &k.rot0,
    );
    let err = refusal(
        &did,
        &log_of(&did, &[(&g, false, T0), (&other, false, T1)]),
        &["operation 1 has `prev: null` but is not the first operation"],
    );
    assert!(
        matches!(err, PlcLogError::Genesis { index: 1, .. }),
        "{err}"
    );
    // A tombstone first: it names a `prev`, so it is no genesis.
    let tombstone = sign(json!({"type": "plc_tombstone", "prev": cid(&g)}), &k.rot0);
    let err = refusal(
        &did,
        &log_of(&did, &[(&tombstone, false, T0)]),
        &["operation 0 is first in the log but names a `prev`"],
    );
    assert!(
        matches!(err, PlcLogError::Genesis { index: 0, .. }),
        "{err}"
    );

    // Signatures that are not unpadded base64url.
    for (sig, says) in [
        ("AAAA=", "the signature is padded base64"),
        ("not base64!", "the signature is not base64url"),
    ] {
        let mut bad = fine.clone();
        bad["sig"] = json!(sig);
        let err = refusal(
            &did,
            &log_of(&did, &[(&g, false, T0), (&bad, false, T1)]),
            &[
                "operation 1 is not signed by any of the 2 rotation key(s)",
                says,
            ],
        );
        assert!(
            matches!(
                err,
                PlcLogError::NotSignedByRotationKey {
                    index: 1,
                    keys: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    // A fork (by the stronger key, displacing an operation of the weaker one) dated no
    // later than the operation it displaces.
    let weak = sign(pure_op(&[&k.rot0, &k.rot1], &k.key_b, Some(&g)), &k.rot1);
    let log = log_of(
        &did,
        &[(&g, false, T0), (&weak, true, T2), (&fine, false, T1)],
    );
    let err = refusal(
        &did,
        &log,
        &["operation 2 displaces operations but is not newer than the chain's latest operation"],
    );
    assert!(
        matches!(err, PlcLogError::BadForkTime { index: 2, .. }),
        "{err}"
    );
    // The same fork dated after it is accepted (so the time is what was refused).
    let log = log_of(
        &did,
        &[(&g, false, T0), (&weak, true, T1), (&fine, false, T2)],
    );
    let parsed: Did = did.parse().unwrap();
    let proven = state(plc::audit(&parsed, &log).unwrap());
    assert_eq!(proven.rotation_keys, [k.rot0.did_key()]);

    // The document names other handles than the log.
    let document = serde_json::to_vec(&json!({
        "id": did,
        "alsoKnownAs": ["at://someone-else.test"],
        "verificationMethod": [{"id": format!("{did}#atproto"), "type": "Multikey",
            "controller": did, "publicKeyMultibase": k.key_a.multikey()}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": "https://pds.example"}],
    }))
    .unwrap();
    let document = atcr_verify::did_document::DidDocument::parse(&parsed, &document).unwrap();
    let err = proven.check_document(&document).unwrap_err();
    assert!(
        matches!(
            err,
            PlcLogError::DocumentMismatch {
                field: "alsoKnownAs",
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("on alsoKnownAs: the log says [\"at://pure.test\"], the document says [\"at://someone-else.test\"]"),
        "{text}"
    );
}

/// The log-level refusals matched by variant (the test above checks only their text).
#[test]
fn the_log_level_refusals_are_their_variants() {
    let k = keys();
    let (g, did) = pure_genesis(&k);
    let parsed: Did = did.parse().unwrap();
    let err = plc::audit(&parsed, &vec![b' '; plc::MAX_LOG_BYTES + 1]).unwrap_err();
    assert_eq!(
        err,
        PlcLogError::TooLarge {
            limit: plc::MAX_LOG_BYTES,
            found: plc::MAX_LOG_BYTES + 1
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "operation log is {} bytes, over the {}-byte limit",
            plc::MAX_LOG_BYTES + 1,
            plc::MAX_LOG_BYTES
        )
    );
    let err = plc::audit(&parsed, b"{\"did\": 1}").unwrap_err();
    assert!(matches!(err, PlcLogError::Json { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("operation log is not a JSON array of audit entries: invalid type: map, expected a sequence"),
        "{err}"
    );
    let err = plc::audit(&parsed, b"[]").unwrap_err();
    assert_eq!(err, PlcLogError::Empty);
    assert_eq!(err.to_string(), "operation log is empty");
    // The genesis of another DID, served under this one.
    let (other, other_did) = {
        let o = sign(
            op(
                &[&k.rot0],
                &k.key_a,
                "other.test",
                "https://pds.example",
                None,
            ),
            &k.rot0,
        );
        let d = did_of(&o);
        (o, d)
    };
    let mut entries: Vec<Value> =
        serde_json::from_slice(&log_of(&did, &[(&g, false, T0)])).unwrap();
    entries.extend(
        serde_json::from_slice::<Vec<Value>>(&log_of(&other_did, &[(&other, false, T1)])).unwrap(),
    );
    let err = plc::audit(&parsed, &serde_json::to_vec(&entries).unwrap()).unwrap_err();
    assert_eq!(
        err,
        PlcLogError::OtherDid {
            index: 1,
            found: other_did.clone()
        }
    );
    assert_eq!(
        err.to_string(),
        format!("operation 1 is for {other_did:?}, not this DID")
    );
}
