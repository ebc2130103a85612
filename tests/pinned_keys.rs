//! Key pinning (issue 15, point 3) against the real world: a `trustedDIDs` entry's `keys`
//! decide which signing keys count for that DID, whatever key its DID document names.

use crate::common::registry::real_registry;
use crate::common::repo::Signer;
use crate::common::signed_image;
use crate::common::world::World;
use atcr_verify::cli::EngineArgs;
use atcr_verify::did_document::DidDocument;
use atcr_verify::policy::{NotCounted, TrustPolicy};
use clap::Parser;
use time::OffsetDateTime;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// The `#atproto` key the PLC directory serves for `handle`, as a did:key.
fn document_key(handle: &str) -> String {
    let account = World::get().account(handle);
    let did = account.did.parse().unwrap();
    let bytes = std::fs::read(&account.did_doc).unwrap();
    let document = DidDocument::parse(&did, &bytes).unwrap();
    document.signing_key().unwrap().to_did_key()
}

fn policy(did: &str, keys: &[String]) -> TrustPolicy {
    TrustPolicy::from_yaml(&format!(
        "version: 1\npolicies:\n  - name: t\n    scope: \"{}/**\"\n    trustedDIDs: [{did}]\n\
         trustedDIDs:\n  {did}:\n    keys: [{}]\n",
        real_registry(),
        keys.join(", ")
    ))
    .unwrap()
}

#[tokio::test]
async fn only_signatures_under_a_pinned_key_count() {
    let world = World::get();
    let reg = real_registry();
    let s = signed_image(reg, "alice.test").await;
    let did = &world.account("alice.test").did;
    let v = Flags::parse_from([
        "x",
        "--plc-url",
        &world.plc,
        "--allow-private-addresses",
        "--insecure-registry",
        reg,
    ])
    .engine
    .build()
    .unwrap()
    .verifier;
    let now = OffsetDateTime::now_utc();
    let real = document_key("alice.test");
    let other = Signer::k256(42).did_key();

    let pinned = policy(did, std::slice::from_ref(&real));
    let report = v.verify(&s.image, &pinned, now).await.unwrap();
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);
    // One of several pinned keys (a planned rotation) is enough.
    let both = policy(did, &[other.clone(), real.clone()]);
    let report = v.verify(&s.image, &both, now).await.unwrap();
    assert!(report.verdict.verified, "{:?}", report.verdict.reason);

    let elsewhere = policy(did, std::slice::from_ref(&other));
    let report = v.verify(&s.image, &elsewhere, now).await.unwrap();
    assert!(!report.verdict.verified);
    let [sig] = report.verdict.signatures.as_slice() else {
        panic!("one signature: {report:#?}")
    };
    assert_eq!(sig.reason, Some(NotCounted::UnpinnedKey));
    assert_eq!(
        sig.detail.as_deref(),
        Some(format!("signed under {real}; the policy pins this key for {did}: {other}").as_str())
    );
    let reason = report.verdict.reason.unwrap();
    assert!(
        reason.ends_with(&format!("{did}: unpinned key")),
        "{reason}"
    );
}
