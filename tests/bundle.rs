//! Offline, self-certifying bundles (`atcr-verify bundle export`, `image --offline --bundle`)
//! against the real local world: images signed on the real PDS, identities on the real PLC
//! directory, artifacts in the real registry. Offline runs happen inside a network
//! namespace with no interface up (`unshare -rn`: not even loopback answers), and once more
//! with the registry and PLC directory failing; every tampered part of a bundle is refused.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::fake::{Fake, Fault};
use crate::common::registry::{Pusher, free_port, real_registry};
use crate::common::world::World;
use crate::common::{cli, signed_image, unique};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn did(handle: &str) -> &'static str {
    &World::get().account(handle).did
}

/// A policy trusting alice for everything on `registry`, written into `dir`.
fn policy_file(dir: &Path, registry: &str) -> PathBuf {
    let file = dir.join("policy.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\npolicies:\n  - name: t\n    scope: \"{registry}/**\"\n    trustedDIDs: [{}]\n",
            did("alice.test")
        ),
    )
    .unwrap();
    file
}

/// The flags that reach the world's PLC directory and `registry`.
fn online(registry: &str, policy: &Path) -> Vec<String> {
    vec![
        "--policy".into(),
        policy.display().to_string(),
        "--plc-url".into(),
        World::get().plc.clone(),
        "--allow-private-addresses".into(),
        "--insecure-registry".into(),
        registry.into(),
    ]
}

fn run(args: &[String]) -> (i32, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cli(&args)
}

/// Runs the binary inside a new user + network namespace: no interface is up, so nothing —
/// loopback included — can be reached.
fn run_without_network(args: &[String]) -> (i32, String, String) {
    let out = std::process::Command::new("unshare")
        .arg("-rn")
        .arg(env!("CARGO_BIN_EXE_atcr-verify"))
        .args(args)
        .output()
        .expect("running unshare (util-linux)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn export(refs: &[&str], out: &Path, flags: &[String]) -> (i32, String, String) {
    let mut args = vec!["bundle".to_owned(), "export".to_owned()];
    args.extend(refs.iter().map(|r| (*r).to_owned()));
    args.extend(["-o".to_owned(), out.display().to_string()]);
    args.extend_from_slice(flags);
    run(&args)
}

/// `image REF --offline --bundle FILE --policy P`, plus `extra`.
fn offline_args(image: &str, bundle: &Path, policy: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "image".to_owned(),
        image.to_owned(),
        "--offline".into(),
        "--bundle".into(),
        bundle.display().to_string(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

fn bytes_of(value: &Value) -> Vec<u8> {
    B64.decode(value.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_bundle_verifies_with_no_network_at_all() {
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg);
    let signed = signed_image(reg, "alice.test").await;
    let by_bob = signed_image(reg, "bob.test").await;
    let repo = format!("test/{}", unique("unsigned"));
    let unsigned = Pusher::new(reg).image(&repo, "v1", &unique("u")).await;
    let unsigned_ref = format!("{reg}/{repo}@{}", unsigned.digest);
    let file = dir.path().join("bundle.json");

    let (code, out, err) = export(
        &[&signed.name, &by_bob.name, &unsigned_ref],
        &file,
        &online(reg, &policy),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "verified: {}@{}",
            signed.name, signed.pushed.digest
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("NOT verified: {}", by_bob.name)),
        "{out}"
    );
    assert!(out.contains("wrote "), "{out}");

    // What the file holds: the tag fact, every manifest, every listed signature artifact,
    // and only the trusted signer's identity and proofs.
    let bundle = read_json(&file);
    assert_eq!(bundle["version"], 1);
    let manifests = bundle["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 3, "{bundle:#}");
    let tagged = manifests
        .iter()
        .find(|m| m["digest"] == signed.pushed.digest.as_str())
        .unwrap();
    assert_eq!(tagged["tag"], "v1");
    assert_eq!(bytes_of(&tagged["manifest"]), signed.pushed.bytes);
    let identities = bundle["identities"].as_array().unwrap();
    assert_eq!(identities.len(), 1, "only alice is trusted: {bundle:#}");
    assert_eq!(identities[0]["did"], did("alice.test"));
    assert!(
        identities[0]["log"].is_string(),
        "the did:plc log is bundled"
    );
    let records = bundle["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["uri"], signed.uri.as_str());
    for s in bundle["signatures"].as_array().unwrap() {
        let n = s["artifacts"].as_array().unwrap().len();
        let signed_subjects = [&signed.pushed.digest, &by_bob.pushed.digest];
        let expected = usize::from(signed_subjects.iter().any(|d| s["subject"] == d.as_str()));
        assert_eq!(n, expected, "{s:#}");
    }

    // Offline, in a namespace without network: the tag resolved from the bundle, verified.
    let (code, out, err) = run_without_network(&offline_args(&signed.name, &file, &policy, &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with(&format!(
            "verified: {}@{}",
            signed.name, signed.pushed.digest
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("signed by {}", did("alice.test"))),
        "{out}"
    );
    assert!(
        err.contains("its oldest fact was fetched at") && err.contains(" ago)"),
        "{err}"
    );
    // As the integration guide writes it: the flags first, `image` implied.
    let guide_form = vec![
        "--offline".to_owned(),
        "--bundle".into(),
        file.display().to_string(),
        signed.name.clone(),
        "--policy".into(),
        policy.display().to_string(),
    ];
    let (code, out, err) = run_without_network(&guide_form);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified: "), "{out}");
    // The same digest, named by digest.
    let by_digest = format!("{reg}/{}@{}", signed.repo, signed.pushed.digest);
    let (code, out, _) =
        run_without_network(&offline_args(&by_digest, &file, &policy, &["--json"]));
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verified"], true);
    assert_eq!(report["digest"], signed.pushed.digest.as_str());
    assert_eq!(report["handle"], "alice.test");
    assert!(
        report["bundle"]["ageSeconds"].as_i64().unwrap() >= 0,
        "{report:#}"
    );
    let oldest = report["bundle"]["oldestFact"].as_str().unwrap();
    let fetched: Vec<&str> = manifests
        .iter()
        .chain(identities)
        .chain(records)
        .map(|f| f["fetchedAt"].as_str().unwrap())
        .collect();
    assert_eq!(Some(oldest), fetched.iter().min().copied(), "{report:#}");

    // Not verified offline: signed by an untrusted DID, and unsigned.
    let (code, out, err) = run_without_network(&offline_args(&by_bob.name, &file, &policy, &[]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("NOT verified"), "{out}");
    let (code, out, err) = run_without_network(&offline_args(&unsigned_ref, &file, &policy, &[]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("no signatures found"), "{out}");

    // Under a policy trusting bob, whose identity and proof the bundle does not hold: not
    // "unsigned" but undecided (exit 2), since his artifact is listed.
    let bob_policy = dir.path().join("bob.yaml");
    let yaml = std::fs::read_to_string(&policy)
        .unwrap()
        .replace(did("alice.test"), did("bob.test"));
    std::fs::write(&bob_policy, yaml).unwrap();
    let (code, out, err) =
        run_without_network(&offline_args(&by_bob.name, &file, &bob_policy, &[]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("not in the bundle"), "{err}");

    // The namespace really has no network: the same verification online cannot answer.
    let mut args = vec!["image".to_owned(), signed.name.clone()];
    args.extend(online(reg, &policy));
    let (code, _, err) = run_without_network(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("upstream_unavailable"), "{err}");
}

#[tokio::test]
async fn offline_needs_no_upstream_that_answers() {
    // The registry answers 503 to everything and the PLC directory's port is closed.
    let world = World::get();
    let fake = Fake::registry(10, None);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), &fake.addr);
    let signed = signed_image(&fake.addr, "alice.test").await;
    let file = dir.path().join("bundle.json");
    let (code, out, err) = export(&[&signed.name], &file, &online(&fake.addr, &policy));
    assert_eq!(code, 0, "{out}{err}");
    fake.set_fault(Some(Fault::Status(503, None)));
    let dead_plc = format!("http://127.0.0.1:{}", free_port());
    let dead = [
        "--plc-url",
        dead_plc.as_str(),
        "--allow-private-addresses",
        "--insecure-registry",
        fake.addr.as_str(),
    ];
    let (code, out, err) = run(&offline_args(&signed.name, &file, &policy, &dead));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("verified: "), "{out}");
    // Online, the same flags cannot answer.
    let mut args = vec!["image".to_owned(), signed.name.clone(), "--policy".into()];
    args.push(policy.display().to_string());
    args.extend(dead.iter().map(|s| (*s).to_owned()));
    let (code, _, err) = run(&args);
    assert_eq!(code, 2, "{err}");
    let _ = world;
}

/// One tampered copy of a good bundle: what was changed, and the refusal expected.
struct Tamper {
    what: &'static str,
    edit: Box<dyn Fn(&mut Value)>,
    /// Texts the refusal must contain.
    says: Vec<String>,
}

/// Decodes the base64 field at `pointer`, edits the bytes, stores them back.
fn edit_bytes(bundle: &mut Value, pointer: &str, edit: impl Fn(&mut Vec<u8>)) {
    let field = bundle.pointer_mut(pointer).unwrap();
    let mut bytes = bytes_of(field);
    edit(&mut bytes);
    *field = json!(B64.encode(bytes));
}

/// Decodes the base64 JSON field at `pointer`, edits the JSON, stores it back.
fn edit_embedded_json(bundle: &mut Value, pointer: &str, edit: impl Fn(&mut Value)) {
    edit_bytes(bundle, pointer, |bytes| {
        let mut value: Value = serde_json::from_slice(bytes).unwrap();
        edit(&mut value);
        *bytes = serde_json::to_vec(&value).unwrap();
    });
}

#[tokio::test]
async fn every_tampered_part_is_refused_with_its_reason() {
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg);
    let signed = signed_image(reg, "alice.test").await;
    let file = dir.path().join("bundle.json");
    let (code, out, err) = export(&[&signed.name], &file, &online(reg, &policy));
    assert_eq!(code, 0, "{out}{err}");
    let good = read_json(&file);
    let bob_doc: Value =
        serde_json::from_slice(&std::fs::read(&World::get().account("bob.test").did_doc).unwrap())
            .unwrap();
    let bob_key = bob_doc["verificationMethod"][0]["publicKeyMultibase"].clone();
    assert!(bob_key.is_string(), "{bob_doc:#}");
    let alice = did("alice.test");
    let tampers = vec![
        Tamper {
            what: "a manifest byte",
            edit: Box::new(|b| {
                edit_bytes(b, "/manifests/0/manifest", |m| {
                    let i = m.iter().position(|&c| c == b'2').unwrap();
                    m[i] = b'3';
                })
            }),
            says: vec![
                "manifests[0]".into(),
                "the manifest bytes have digest".into(),
                format!("the bundle says {}", signed.pushed.digest),
            ],
        },
        Tamper {
            what: "the signature layer",
            edit: Box::new(|b| {
                edit_embedded_json(b, "/signatures/0/artifacts/0/layer", |l| {
                    l["atproto"]["pdsEndpoint"] = json!("https://pds.evil.example");
                })
            }),
            says: vec![
                "signatures[0].artifacts[0]".into(),
                "layer does not match its descriptor".into(),
            ],
        },
        Tamper {
            what: "a CAR block",
            edit: Box::new(|b| {
                edit_bytes(b, "/records/0/car", |car| {
                    // The last byte belongs to the last block's data.
                    *car.last_mut().unwrap() ^= 0x01;
                })
            }),
            says: vec![
                format!("records[0] ({})", signed.uri),
                "does not match its hash".into(),
            ],
        },
        Tamper {
            what: "the DID document's key",
            edit: Box::new(move |b| {
                let key = bob_key.clone();
                edit_embedded_json(b, "/identities/0/document", move |d| {
                    d["verificationMethod"][0]["publicKeyMultibase"] = key.clone();
                })
            }),
            says: vec![
                format!("identities[0] ({alice})"),
                "not proven by the DID's signed operation log".into(),
                "#atproto key".into(),
            ],
        },
        Tamper {
            what: "an operation of the PLC log",
            edit: Box::new(|b| {
                edit_embedded_json(b, "/identities/0/log", |log| {
                    let last = log.as_array_mut().unwrap().last_mut().unwrap();
                    last["operation"]["services"]["atproto_pds"]["endpoint"] =
                        json!("https://pds.evil.example");
                })
            }),
            says: vec![
                format!("identities[0] ({alice})"),
                "not proven by the DID's signed operation log".into(),
                "but hashes to".into(),
            ],
        },
        Tamper {
            what: "the PLC log left out",
            edit: Box::new(|b| {
                let identity = b["identities"][0].as_object_mut().unwrap();
                assert!(identity.remove("log").is_some(), "the export holds the log");
            }),
            says: vec![
                format!("identities[0] ({alice})"),
                "no operation log: a did:plc document is taken only with the log that proves it"
                    .into(),
            ],
        },
    ];
    // Every variant is checked (and every problem reported) before the test fails.
    let mut problems = Vec::new();
    for t in tampers {
        let mut bundle = good.clone();
        (t.edit)(&mut bundle);
        let path = dir.path().join("tampered.json");
        write_json(&path, &bundle);
        let (code, out, err) = run(&offline_args(&signed.name, &path, &policy, &["--json"]));
        let json: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let message = json["error"]["message"].as_str().unwrap_or_default();
        let said = t
            .says
            .iter()
            .all(|needle| message.contains(needle.as_str()));
        if code != 2 || json["error"]["code"] != "bundle_tampered" || !said {
            problems.push(format!(
                "{}: exit {code}, expected 2, bundle_tampered and {:?}:\n{out}{err}",
                t.what, t.says
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    // The untouched bundle still verifies (the edits above are what was refused).
    write_json(&dir.path().join("again.json"), &good);
    let (code, out, err) = run(&offline_args(
        &signed.name,
        &dir.path().join("again.json"),
        &policy,
        &[],
    ));
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test]
async fn references_and_files_the_bundle_cannot_answer_for() {
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg);
    let signed = signed_image(reg, "alice.test").await;
    let file = dir.path().join("bundle.json");
    let by_digest = format!("{reg}/{}@{}", signed.repo, signed.pushed.digest);
    let (code, out, err) = export(&[&by_digest], &file, &online(reg, &policy));
    assert_eq!(code, 0, "{out}{err}");
    let bundle = read_json(&file);
    assert_eq!(bundle["manifests"][0]["tag"], Value::Null);

    // Exported by digest: the tag is not in it (no tag → digest fact), nor another image.
    let other = format!("{reg}/test/{}:v1", unique("elsewhere"));
    for image in [signed.name.as_str(), other.as_str()] {
        let (code, out, err) = run(&offline_args(image, &file, &policy, &["--json"]));
        assert_eq!(code, 2, "{out}{err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["error"]["code"], "not_in_bundle", "{json:#}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{image} is not in bundle")) && message.contains(&by_digest),
            "{message}"
        );
    }
    // Without --json, the CI line closes stdout as for every exit 2.
    let (code, out, err) = run(&offline_args(&other, &file, &policy, &[]));
    assert_eq!(code, 2, "{out}{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "ERROR {other}: not_in_bundle: {other} is not in bundle"
        )),
        "{out}"
    );
    let (code, out, _) = run(&offline_args(&by_digest, &file, &policy, &[]));
    assert_eq!(code, 0, "{out}");

    // Files that are not usable bundles.
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "not JSON",
            b"bundle?".to_vec(),
            "bundle_not_json",
            "is not JSON",
        ),
        (
            "version 2",
            serde_json::to_vec(&json!({"version": 2, "manifests": []})).unwrap(),
            "bundle_version",
            "has version 2; this atcr-verify reads version 1",
        ),
        (
            "a JSON array",
            b"[1, 2]".to_vec(),
            "bundle_malformed",
            "expected a JSON object",
        ),
        (
            "no version",
            b"{}".to_vec(),
            "bundle_version",
            "has version (none)",
        ),
        (
            "bad base64",
            {
                let mut b = bundle.clone();
                b["records"][0]["car"] = json!("%%%");
                serde_json::to_vec(&b).unwrap()
            },
            "bundle_malformed",
            "records[0]",
        ),
    ];
    for (what, bytes, code_expected, needle) in cases {
        let path = dir.path().join("bad.json");
        std::fs::write(&path, bytes).unwrap();
        let (code, out, err) = run(&offline_args(&by_digest, &path, &policy, &["--json"]));
        assert_eq!(code, 2, "{what}: {out}{err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["error"]["code"], code_expected, "{what}: {json:#}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{what}: {message}");
    }
    // Over the cap (32 MiB): refused without being parsed. A sparse file costs no disk.
    let big = dir.path().join("big.json");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(atcr_verify::bundle::MAX_BUNDLE_BYTES as u64 + 1)
        .unwrap();
    let (code, out, _) = run(&offline_args(&by_digest, &big, &policy, &["--json"]));
    assert_eq!(code, 2);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["error"]["code"], "bundle_too_large", "{json:#}");
    // A missing file.
    let (code, _, err) = run(&offline_args(
        &by_digest,
        &dir.path().join("nope"),
        &policy,
        &[],
    ));
    assert_eq!(code, 2);
    assert!(err.contains("bundle_unreadable"), "{err}");

    // --offline and --bundle go together.
    for args in [
        vec!["image", by_digest.as_str(), "--offline"],
        vec!["image", by_digest.as_str(), "--bundle", "x.json"],
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(
            err.contains("--bundle") || err.contains("--offline"),
            "{err}"
        );
    }
    // A bundle cannot be built without the did:plc operation logs.
    let mut flags = online(reg, &policy);
    flags.extend(["--plc-trust".into(), "directory".into()]);
    let (code, _, err) = export(&[&by_digest], &dir.path().join("dir.json"), &flags);
    assert_eq!(code, 2);
    assert!(err.contains("operation log"), "{err}");
}

/// Forgeries whose every digest and CID is consistent pass the file check; the chain run
/// over the bundle then refuses them, as it refuses them from the network.
#[tokio::test]
async fn consistent_forgeries_fail_the_chain() {
    use crate::common::repo::{Blocks, Signer};
    let reg = real_registry();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg);
    let first = signed_image(reg, "alice.test").await;
    let second = signed_image(reg, "alice.test").await;
    let file = dir.path().join("bundle.json");
    let (code, out, err) = export(&[&first.name, &second.name], &file, &online(reg, &policy));
    assert_eq!(code, 0, "{out}{err}");
    let good = read_json(&file);
    let index_of = |uri: &str| {
        good["records"]
            .as_array()
            .unwrap()
            .iter()
            .position(|r| r["uri"] == uri)
            .unwrap()
    };
    let (a, b) = (index_of(&first.uri), index_of(&second.uri));

    // The commit re-signed by another key (every CID recomputed).
    let mut forged = good.clone();
    edit_bytes(&mut forged, &format!("/records/{a}/car"), |car| {
        let mut blocks = Blocks::from_car(car);
        blocks.resign(&Signer::k256(9));
        *car = blocks.to_car();
    });
    // The proof of the other image's record, filed under this record's URI.
    let mut swapped = good.clone();
    let other_car = good["records"][b]["car"].clone();
    swapped["records"][a]["car"] = other_car;

    for (what, bundle, needle) in [
        ("re-signed commit", forged, "signature"),
        ("another record's proof", swapped, "proof failed"),
    ] {
        let path = dir.path().join("forged.json");
        write_json(&path, &bundle);
        let (code, out, err) = run(&offline_args(&first.name, &path, &policy, &[]));
        assert_eq!(code, 1, "{what}: {out}{err}");
        assert!(out.starts_with("NOT verified"), "{what}: {out}");
        assert!(out.contains(needle), "{what}: {out}");
        // The other image, whose proof is intact, still verifies from the same file.
        let (code, out, err) = run(&offline_args(&second.name, &path, &policy, &[]));
        assert_eq!(code, 0, "{what}: {out}{err}");
    }
}

/// A policy trusting `dids` for everything on `registry`, needing `min` signatures.
fn policy_trusting(dir: &Path, registry: &str, dids: &[&str], min: usize) -> PathBuf {
    let file = dir.join(format!("{}.yaml", unique("trusting")));
    std::fs::write(
        &file,
        format!(
            "version: 1\npolicies:\n  - name: t\n    scope: \"{registry}/**\"\n    trustedDIDs: [{}]\n    minSignatures: {min}\n",
            dids.join(", ")
        ),
    )
    .unwrap();
    file
}

/// A did:web signer is refused offline, with the reason (a did:web document is not signed
/// data, so no bundle can prove it), and its signature never counts: export cannot bundle
/// one locally (the world's accounts are did:plc), so its identity and proof are added by
/// hand, as a builder could.
#[tokio::test]
async fn a_did_web_signer_is_refused_offline_and_never_counts() {
    use crate::common::registry::payload;
    use crate::common::repo::{Blocks, Signer, encode};
    use ipld_core::ipld::Ipld;
    let reg = real_registry();
    let world = World::get();
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), reg);
    let signed = signed_image(reg, "alice.test").await;
    let alice = did("alice.test");
    // A second signature artifact on the same image, naming a did:web signer.
    let web = "did:web:signer.example";
    let web_uri = signed.uri.replace(alice, web);
    Pusher::new(reg)
        .attach(
            &signed.repo,
            &signed.pushed,
            &payload(&signed.pushed.digest, web, &web_uri, &world.pds),
        )
        .await;
    let file = dir.path().join("bundle.json");
    let (code, out, err) = export(&[&signed.name], &file, &online(reg, &policy));
    assert_eq!(code, 0, "{out}{err}");
    let mut bundle = read_json(&file);
    assert_eq!(
        bundle["signatures"][0]["artifacts"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "both listed artifacts are bundled: {bundle:#}"
    );
    let without_identity = dir.path().join("without.json");
    write_json(&without_identity, &bundle);
    // The builder's forgery, consistent in every byte: a did:web document with a key of
    // its own, and alice's proof re-issued for the did:web (commit `did` changed, signed by
    // that key). Only the rule that a did:web document proves nothing stops it.
    let forger = Signer::k256(77);
    let mut document: Value =
        serde_json::from_slice(&std::fs::read(&world.account("alice.test").did_doc).unwrap())
            .unwrap();
    document["id"] = json!(web);
    document["alsoKnownAs"] = json!(["at://signer.example"]);
    document["verificationMethod"][0]["id"] = json!(format!("{web}#atproto"));
    document["verificationMethod"][0]["controller"] = json!(web);
    document["verificationMethod"][0]["type"] = json!("Multikey");
    document["verificationMethod"][0]["publicKeyMultibase"] = json!(forger.multikey());
    let fetched_at = bundle["createdAt"].clone();
    bundle["identities"].as_array_mut().unwrap().push(json!({
        "did": web,
        "document": B64.encode(serde_json::to_vec(&document).unwrap()),
        "log": null,
        "fetchedAt": fetched_at,
    }));
    let alice_record = bundle["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["uri"] == signed.uri.as_str())
        .unwrap()
        .clone();
    let mut blocks = Blocks::from_car(&bytes_of(&alice_record["car"]));
    let mut commit: std::collections::BTreeMap<String, Ipld> =
        blocks.commit().into_iter().collect();
    commit.insert("did".into(), Ipld::String(web.into()));
    blocks.replace(blocks.root, encode(&Ipld::Map(commit)));
    blocks.resign(&forger);
    let mut forged_record = alice_record;
    forged_record["uri"] = json!(web_uri);
    forged_record["car"] = json!(B64.encode(blocks.to_car()));
    bundle["records"]
        .as_array_mut()
        .unwrap()
        .push(forged_record);
    let with_identity = dir.path().join("with.json");
    write_json(&with_identity, &bundle);

    // Trusting only the did:web signer: its signature is not counted, with the reason, so
    // the image is NOT verified (exit 1, as for a did:plc document its log does not prove).
    let web_policy = policy_trusting(dir.path(), reg, &[web], 1);
    let reason = format!(
        "proof failed: resolving {web}: the DID document of {web} in bundle {}: a did:web document is not signed data, so a bundle cannot prove it; verify did:web signers online",
        with_identity.display()
    );
    let (code, out, err) = run_without_network(&offline_args(
        &signed.name,
        &with_identity,
        &web_policy,
        &["--json"],
    ));
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verified"], false, "{report:#}");
    assert_eq!(report["deny"], true, "{report:#}");
    assert_eq!(report["countedSignatures"], 0, "{report:#}");
    let signatures = report["signatures"].as_array().unwrap();
    let of_web = signatures.iter().find(|s| s["did"] == web).unwrap();
    assert_eq!(of_web["counted"], false, "{report:#}");
    assert_eq!(of_web["reason"], reason.as_str(), "{report:#}");
    assert!(
        signatures.iter().all(|s| s["counted"] == false),
        "{report:#}"
    );
    let (code, out, err) = run_without_network(&offline_args(
        &signed.name,
        &with_identity,
        &web_policy,
        &[],
    ));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("NOT verified"), "{out}");
    assert!(out.contains(&reason), "{out}");
    // Without the added identity it is missing instead: the document above was what was
    // refused.
    let (code, out, _) = run_without_network(&offline_args(
        &signed.name,
        &without_identity,
        &web_policy,
        &["--json"],
    ));
    assert_eq!(code, 2, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["error"]["code"], "not_in_bundle", "{report:#}");

    // Needing both alice and the did:web signer: alice's counts, the did:web one does not.
    let both = policy_trusting(dir.path(), reg, &[alice, web], 2);
    let (code, out, err) = run_without_network(&offline_args(
        &signed.name,
        &with_identity,
        &both,
        &["--json"],
    ));
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verified"], false, "{report:#}");
    assert_eq!(report["countedSignatures"], 1, "{report:#}");
    // Needing one of them: alice's signature alone verifies it (the bundle is usable).
    let either = policy_trusting(dir.path(), reg, &[alice, web], 1);
    let (code, out, err) =
        run_without_network(&offline_args(&signed.name, &with_identity, &either, &[]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("signed by {alice}")), "{out}");
}
