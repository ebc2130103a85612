//! `atcr-verify proof` from the shell, on proofs made by the real PDS: JSON on stdout,
//! exit 0 verified, 1 rejected, 2 usage or input error.

use std::process::{Command, Output};

use crate::common::world::World;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
        .args(args)
        .output()
        .expect("running atcr-verify")
}

fn proof_args<'a>(car: &'a str, doc: &'a str, uri: &'a str, digest: &'a str) -> Vec<&'a str> {
    vec![
        "proof",
        "--car",
        car,
        "--did-doc",
        doc,
        "--uri",
        uri,
        "--digest",
        digest,
    ]
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn verified_proof_exits_0_with_the_facts() {
    let alice = World::get().account("alice.test");
    let r = &alice.records[0];
    let out = run(&proof_args(
        r.car.to_str().unwrap(),
        alice.did_doc.to_str().unwrap(),
        &r.uri,
        &r.digest,
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["verified"], true);
    assert_eq!(v["did"], alice.did.as_str());
    assert_eq!(v["uri"], r.uri.as_str());
    assert_eq!(v["digest"], r.digest.as_str());
    assert_eq!(v["keyType"], "k256");
    assert_eq!(v["recordCid"], r.cid.as_str());
    assert_eq!(v["signedAtSource"], "record.createdAt");
    assert!(v["commitCid"].as_str().unwrap().starts_with("bafyrei"));
    assert_eq!(v["rev"].as_str().unwrap().len(), 13);
}

#[test]
fn rejected_proof_exits_1_with_a_code_and_message() {
    let alice = World::get().account("alice.test");
    let r = &alice.records[0];
    let other = &alice.records[1].digest;
    let out = run(&proof_args(
        r.car.to_str().unwrap(),
        alice.did_doc.to_str().unwrap(),
        &r.uri,
        other,
    ));
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["verified"], false);
    assert_eq!(v["error"]["code"], "record_digest_mismatch");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(other) && message.contains(&r.digest),
        "{message}"
    );

    // A DID document for someone else is evidence that fails, not a usage error.
    let bob = World::get().account("bob.test");
    let out = run(&proof_args(
        r.car.to_str().unwrap(),
        bob.did_doc.to_str().unwrap(),
        &r.uri,
        &r.digest,
    ));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "did_document_invalid");

    // Garbage instead of a CAR.
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not a car at all").unwrap();
    let out = run(&proof_args(
        garbage.path().to_str().unwrap(),
        alice.did_doc.to_str().unwrap(),
        &r.uri,
        &r.digest,
    ));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "car_invalid");
}

#[test]
fn usage_and_input_errors_exit_2() {
    let alice = World::get().account("alice.test");
    let r = &alice.records[0];
    let car = r.car.to_str().unwrap();
    let doc = alice.did_doc.to_str().unwrap();
    for (args, needle) in [
        (proof_args(car, doc, &r.uri, "sha256:abc"), "image digest"),
        (
            proof_args(car, doc, "at://alice.test/io.atcr.manifest/x", &r.digest),
            "DID",
        ),
        (
            proof_args("/nonexistent/x.car", doc, &r.uri, &r.digest),
            "/nonexistent/x.car",
        ),
        (vec!["proof", "--car", car], "--did-doc"),
        (vec!["no-such-command"], "no-such-command"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Every engine flag is also read from `ATCR_VERIFY_<FLAG>` (the process faces get no
/// flags): a bad value there is refused as the flag's would be, `ATCR_VERIFY_INSECURE_REGISTRY`
/// is a comma-separated list (its second entry is checked too), and a flag wins over its
/// variable.
#[test]
fn engine_flags_are_read_from_the_environment() {
    let image = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_atcr-verify"))
            .args(["image", "localhost:1/x@sha256:0000000000000000000000000000000000000000000000000000000000000000"])
            .args(args)
            .env_remove("ATCR_VERIFY_POLICY")
            .envs(env.iter().copied())
            .output()
            .expect("running atcr-verify");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = image(&[("ATCR_VERIFY_TAG_TTL", "3")], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--tag-ttl") && err.contains('3'), "{err}");
    let (code, err) = image(&[("ATCR_VERIFY_MAX_SIGNATURES", "many")], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--max-signatures"), "{err}");
    let (code, err) = image(
        &[(
            "ATCR_VERIFY_INSECURE_REGISTRY",
            "localhost:5000,localhost:443",
        )],
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("\"localhost:443\"") && err.contains("port 443"),
        "{err}"
    );
    let (code, err) = image(&[("ATCR_VERIFY_PLC_URL", "http://127.0.0.1:9")], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--plc-url http://127.0.0.1:9/"), "{err}");
    // The flag wins.
    let (code, err) = image(
        &[("ATCR_VERIFY_PLC_URL", "http://127.0.0.1:9")],
        &["--plc-url", "http://127.0.0.2:9"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("--plc-url http://127.0.0.2:9/"), "{err}");
}
