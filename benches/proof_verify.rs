//! `proof_verify`: whole verification of a real PDS proof (key already parsed) against the
//! physical floor, one bare K-256 `verify` of the same commit signature, in one run.
//!
//! Run: `cargo bench --bench proof_verify`. The target is proof_verify ≤ 1.5 × k256_verify.

use std::collections::BTreeMap;
use std::path::PathBuf;

use atcr_verify::did_document::DidDocument;
use atcr_verify::proof::{Car, CarLimits, ProofClaim, verify_record_proof};
use atcr_verify::syntax::{AtUri, ImageDigest};
use criterion::{Criterion, criterion_group, criterion_main};
use ipld_core::ipld::Ipld;

struct Fixture {
    car: Vec<u8>,
    uri: AtUri,
    digest: ImageDigest,
    doc: Vec<u8>,
}

/// The deepest captured real proof in `tests/fixtures/pds/`.
fn fixture() -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pds");
    let world: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("world.json")).unwrap()).unwrap();
    let mut best: Option<Fixture> = None;
    for account in world["accounts"].as_array().unwrap() {
        let doc = std::fs::read(dir.join(account["didDoc"].as_str().unwrap())).unwrap();
        for record in account["records"].as_array().unwrap() {
            let car = std::fs::read(dir.join(record["car"].as_str().unwrap())).unwrap();
            if best.as_ref().is_none_or(|b| car.len() > b.car.len()) {
                best = Some(Fixture {
                    car,
                    uri: record["uri"].as_str().unwrap().parse().unwrap(),
                    digest: record["digest"].as_str().unwrap().parse().unwrap(),
                    doc: doc.clone(),
                });
            }
        }
    }
    best.unwrap()
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let key = DidDocument::parse(f.uri.did(), &f.doc)
        .unwrap()
        .signing_key()
        .unwrap();
    let claim = ProofClaim {
        uri: &f.uri,
        key: &key,
        digest: &f.digest,
    };
    let limits = CarLimits::default();
    verify_record_proof(&f.car, &claim, &limits).unwrap();

    // The same signature and signed bytes the proof check verifies.
    let car = Car::read(&f.car, &limits).unwrap();
    let commit: BTreeMap<String, Ipld> =
        serde_ipld_dagcbor::from_slice(car.block(car.root()).unwrap()).unwrap();
    let mut unsigned = commit.clone();
    let Some(Ipld::Bytes(sig)) = unsigned.remove("sig") else {
        panic!("commit without sig")
    };
    let unsigned = serde_ipld_dagcbor::to_vec(&unsigned).unwrap();
    key.verify(&unsigned, &sig).unwrap();

    let mut g = c.benchmark_group("proof");
    g.bench_function("k256_verify", |b| {
        b.iter(|| key.verify(std::hint::black_box(&unsigned), &sig))
    });
    g.bench_function("proof_verify", |b| {
        b.iter(|| verify_record_proof(std::hint::black_box(&f.car), &claim, &limits))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
