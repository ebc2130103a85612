//! Property tests over the CAR + commit + MST + record path (the CI-run companion of the
//! `cargo fuzz` target in `fuzz/`): no input panics, and no mutation of a real PDS proof
//! verifies to anything but the original outcome.

use std::path::PathBuf;
use std::sync::LazyLock;

use atcr_verify::crypto::PublicKey;
use atcr_verify::did_document::DidDocument;
use atcr_verify::proof::{CarLimits, ProofClaim, VerifiedRecord, verify_record_proof};
use atcr_verify::syntax::{AtUri, ImageDigest};
use proptest::prelude::*;

struct Seed {
    car: Vec<u8>,
    uri: AtUri,
    digest: ImageDigest,
    key: PublicKey,
    verified: VerifiedRecord,
}

/// Every real proof captured in `tests/fixtures/pds/`.
static SEEDS: LazyLock<Vec<Seed>> = LazyLock::new(|| {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pds");
    let world: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("world.json")).unwrap()).unwrap();
    let mut seeds = Vec::new();
    for account in world["accounts"].as_array().unwrap() {
        let doc = std::fs::read(dir.join(account["didDoc"].as_str().unwrap())).unwrap();
        for record in account["records"].as_array().unwrap() {
            let car = std::fs::read(dir.join(record["car"].as_str().unwrap())).unwrap();
            let uri: AtUri = record["uri"].as_str().unwrap().parse().unwrap();
            let digest: ImageDigest = record["digest"].as_str().unwrap().parse().unwrap();
            let key = DidDocument::parse(uri.did(), &doc)
                .unwrap()
                .signing_key()
                .unwrap();
            let verified = verify(&car, &uri, &digest, &key).unwrap();
            seeds.push(Seed {
                car,
                uri,
                digest,
                key,
                verified,
            });
        }
    }
    assert!(seeds.len() >= 2, "captured fixtures are missing");
    seeds
});

fn verify(
    car: &[u8],
    uri: &AtUri,
    digest: &ImageDigest,
    key: &PublicKey,
) -> Result<VerifiedRecord, atcr_verify::proof::ProofError> {
    verify_record_proof(car, &ProofClaim { uri, key, digest }, &CarLimits::default())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    DuplicateRange { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..64usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 1..400usize).prop_map(|(at, len)| Mutation::DuplicateRange { at, len }),
    ]
}

fn apply(car: &[u8], m: &Mutation) -> Vec<u8> {
    let mut out = car.to_vec();
    let n = out.len();
    if n == 0 {
        // An earlier mutation in the chain truncated or deleted everything.
        return out;
    }
    match m {
        Mutation::Flip { at, mask } => out[at % n] ^= mask,
        Mutation::Truncate { at } => out.truncate(at % n),
        Mutation::Insert { at, bytes } => {
            let at = at % (n + 1);
            out.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let at = at % n;
            out.drain(at..(at + len).min(n));
        }
        Mutation::DuplicateRange { at, len } => {
            let at = at % n;
            let range = out[at..(at + len).min(n)].to_vec();
            out.extend(range);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_proofs_never_verify_to_something_else(
        seed in 0..64usize,
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let s = &SEEDS[seed % SEEDS.len()];
        let mut car = s.car.clone();
        for m in &muts {
            car = apply(&car, m);
        }
        if let Ok(v) = verify(&car, &s.uri, &s.digest, &s.key) {
            prop_assert_eq!(v, s.verified.clone());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_verify(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let s = &SEEDS[0];
        prop_assert!(verify(&bytes, &s.uri, &s.digest, &s.key).is_err());
    }
}
