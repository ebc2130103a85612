//! Fuzzes the CAR + commit + MST + record path with the claim of a captured real proof.
//! Seeds: `fuzz/corpus/proof/` (real PDS CARs). Run: `cargo fuzz run proof`.
#![no_main]

use std::sync::LazyLock;

use atcr_verify::crypto::PublicKey;
use atcr_verify::did_document::DidDocument;
use atcr_verify::proof::{CarLimits, ProofClaim, internal, verify_record_proof};
use atcr_verify::syntax::{AtUri, ImageDigest};
use libfuzzer_sys::fuzz_target;

static CLAIM: LazyLock<(AtUri, ImageDigest, PublicKey)> = LazyLock::new(|| {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/pds/");
    let world: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}world.json")).unwrap()).unwrap();
    let account = &world["accounts"][0];
    let record = &account["records"][0];
    let uri: AtUri = record["uri"].as_str().unwrap().parse().unwrap();
    let digest: ImageDigest = record["digest"].as_str().unwrap().parse().unwrap();
    let doc = std::fs::read(format!("{dir}{}", account["didDoc"].as_str().unwrap())).unwrap();
    let key = DidDocument::parse(uri.did(), &doc).unwrap().signing_key().unwrap();
    (uri, digest, key)
});

fuzz_target!(|data: &[u8]| {
    let (uri, digest, key) = &*CLAIM;
    let claim = ProofClaim { uri, key, digest };
    let _ = verify_record_proof(data, &claim, &CarLimits::default());
    internal::exercise_stages(data, &claim);
});
