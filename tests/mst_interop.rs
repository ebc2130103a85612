//! The atproto interop MST fixtures (`firehose/commit-proof-fixtures.json`, CC0): an MST
//! built from the fixture keys must have the fixture's root CIDs, and the proof engine must
//! find every added key (and prove every deleted key absent) from `blocksInProof` alone.

use std::collections::{BTreeMap, BTreeSet};

use atcr_verify::proof::{BlockRole, Car, CarLimits, ProofError, mst};
use cid::Cid;

use crate::common::repo::{build_mst, write_car};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Case {
    comment: String,
    leaf_value: String,
    keys: Vec<String>,
    adds: Vec<String>,
    dels: Vec<String>,
    root_before_commit: String,
    root_after_commit: String,
    blocks_in_proof: Vec<String>,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/atproto-interop/firehose/commit-proof-fixtures.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tree(keys: &BTreeSet<String>, leaf: Cid) -> (Cid, BTreeMap<Cid, Vec<u8>>) {
    let pairs: Vec<(String, Cid)> = keys.iter().map(|k| (k.clone(), leaf)).collect();
    build_mst(&pairs)
}

fn car_of(root: Cid, blocks: &BTreeMap<Cid, Vec<u8>>, only: Option<&BTreeSet<Cid>>) -> Vec<u8> {
    let list: Vec<(Cid, Vec<u8>)> = blocks
        .iter()
        .filter(|(c, _)| only.is_none_or(|set| set.contains(c)))
        .map(|(c, b)| (*c, b.clone()))
        .collect();
    write_car(&[root], &list)
}

#[test]
fn roots_match_and_proofs_verify_from_proof_blocks_alone() {
    let cases = cases();
    assert!(cases.len() >= 5);
    for case in cases {
        let leaf: Cid = case.leaf_value.parse().unwrap();
        let before: BTreeSet<String> = case.keys.iter().cloned().collect();
        let (root_before, _) = tree(&before, leaf);
        assert_eq!(
            root_before.to_string(),
            case.root_before_commit,
            "{}",
            case.comment
        );

        let mut after = before.clone();
        after.extend(case.adds.iter().cloned());
        for d in &case.dels {
            after.remove(d);
        }
        let (root_after, blocks) = tree(&after, leaf);
        assert_eq!(
            root_after.to_string(),
            case.root_after_commit,
            "{}",
            case.comment
        );

        let proof: BTreeSet<Cid> = case
            .blocks_in_proof
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert!(
            proof.iter().all(|c| blocks.contains_key(c)),
            "{}: proof names a block the built tree lacks",
            case.comment
        );
        let bytes = car_of(root_after, &blocks, Some(&proof));
        let car = Car::read(&bytes, &CarLimits::default()).unwrap();
        for add in &case.adds {
            assert_eq!(
                mst::find(&car, &root_after, add.as_bytes()),
                Ok(leaf),
                "{}: {add}",
                case.comment
            );
        }
        for del in &case.dels {
            assert!(
                matches!(
                    mst::find(&car, &root_after, del.as_bytes()),
                    Err(ProofError::RecordNotInRepo { .. })
                ),
                "{}: {del}",
                case.comment
            );
        }
    }
}

#[test]
fn every_key_is_found_and_every_missing_path_node_is_reported() {
    for case in cases() {
        let leaf: Cid = case.leaf_value.parse().unwrap();
        let keys: BTreeSet<String> = case.keys.iter().chain(&case.adds).cloned().collect();
        let (root, blocks) = tree(&keys, leaf);
        let full = car_of(root, &blocks, None);
        let car = Car::read(&full, &CarLimits::default()).unwrap();
        for key in &keys {
            assert_eq!(mst::find(&car, &root, key.as_bytes()), Ok(leaf), "{key}");
        }
        // Dropping any node: every key whose path crosses it now fails as incomplete,
        // never as "not in repo".
        for dropped in blocks.keys() {
            let rest: BTreeSet<Cid> = blocks.keys().filter(|c| *c != dropped).copied().collect();
            let bytes = car_of(root, &blocks, Some(&rest));
            let car = Car::read(&bytes, &CarLimits::default()).unwrap();
            let mut hit = 0;
            for key in &keys {
                match mst::find(&car, &root, key.as_bytes()) {
                    Ok(v) => assert_eq!(v, leaf),
                    Err(ProofError::MissingBlock { role, cid }) => {
                        assert_eq!(role, BlockRole::MstNode);
                        assert_eq!(cid, dropped.to_string());
                        hit += 1;
                    }
                    Err(e) => panic!("{key}: unexpected {e}"),
                }
            }
            assert!(hit > 0, "no key's path crosses node {dropped}");
        }
    }
}
