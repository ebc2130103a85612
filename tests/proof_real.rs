//! The proof engine against proofs made by the real ATProto PDS and PLC directory (started
//! by `crate::common::world`), then against every mutation of them an attacker or a broken
//! server could produce. Each mutation must be rejected with the error that names it.

use std::collections::BTreeMap;

use crate::common::repo::{
    Blocks, Signer, decode, encode, encode_map_in_order, high_s, map_entries,
};
use crate::common::world::{Account, Record, World};
use atcr_verify::crypto::{KeyType, SignatureError};
use atcr_verify::did_document::DidDocument;
use atcr_verify::proof::{
    BlockRole, CarError, CarLimits, ProofError, SignedAtSource, VerifiedRecord,
    verify_with_document,
};
use atcr_verify::syntax::{AtUri, ImageDigest, parse_datetime};
use ipld_core::ipld::Ipld;

fn alice() -> &'static Account {
    World::get().account("alice.test")
}

fn bob() -> &'static Account {
    World::get().account("bob.test")
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn verify(car: &[u8], doc: &[u8], uri: &str, digest: &str) -> Result<VerifiedRecord, ProofError> {
    let uri: AtUri = uri.parse().unwrap();
    let digest: ImageDigest = digest.parse().unwrap();
    let doc = DidDocument::parse(uri.did(), doc)?;
    verify_with_document(car, &doc, &uri, &digest, &CarLimits::default())
}

/// Verifies `car` as if it were `record`'s proof, with the account's real DID document.
fn check(account: &Account, record: &Record, car: &[u8]) -> Result<VerifiedRecord, ProofError> {
    verify(car, &read(&account.did_doc), &record.uri, &record.digest)
}

/// A DID document for `did` whose `#atproto` key is `signer` (Multikey form).
fn doc_with_key(account: &Account, signer: &Signer) -> Vec<u8> {
    let mut doc: serde_json::Value = serde_json::from_slice(&read(&account.did_doc)).unwrap();
    doc["verificationMethod"] = serde_json::json!([{
        "id": format!("{}#atproto", account.did),
        "type": "Multikey",
        "controller": account.did,
        "publicKeyMultibase": signer.multikey(),
    }]);
    serde_json::to_vec(&doc).unwrap()
}

/// The deepest of alice's records (most MST nodes on its path) and its editable blocks.
fn deep_record() -> (&'static Record, Blocks) {
    alice()
        .records
        .iter()
        .map(|r| (r, Blocks::from_car(&read(&r.car))))
        .max_by_key(|(r, b)| b.path(&key_of(r)).0.len())
        .unwrap()
}

fn key_of(r: &Record) -> String {
    format!("{}/{}", r.collection, r.rkey)
}

fn decode_error(result: Result<VerifiedRecord, ProofError>) -> BlockRole {
    match result {
        Err(ProofError::Decode { role, .. }) => role,
        other => panic!("expected a strict-decoding error, got {other:?}"),
    }
}

#[test]
fn every_real_proof_verifies() {
    let world = World::get();
    let mut checked = 0;
    for account in &world.accounts {
        for record in &account.records {
            let v = check(account, record, &read(&record.car))
                .unwrap_or_else(|e| panic!("{}: {e}", record.uri));
            assert_eq!(v.did.as_str(), account.did);
            assert_eq!(v.key_type, KeyType::K256);
            assert_eq!(v.record_cid.to_string(), record.cid);
            assert_eq!(v.digest.as_str(), record.digest);
            assert_eq!(v.signed_at_source, SignedAtSource::RecordCreatedAt);
            assert_eq!(v.signed_at, parse_datetime(&record.created_at).unwrap());
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} real proofs");
    let (record, blocks) = deep_record();
    let (nodes, _) = blocks.path(&key_of(record));
    assert!(nodes.len() >= 2, "alice's MST is only {} deep", nodes.len());
}

#[test]
fn legacy_and_multikey_documents_give_the_same_key() {
    let account = alice();
    let legacy = DidDocument::parse(&account.did.parse().unwrap(), &read(&account.did_doc))
        .unwrap()
        .signing_key()
        .unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&read(&account.did_doc)).unwrap();
    let method_type = doc["verificationMethod"][0]["type"]
        .as_str()
        .unwrap()
        .to_owned();
    let multibase = legacy
        .to_did_key()
        .trim_start_matches("did:key:")
        .to_owned();
    doc["verificationMethod"][0]["type"] = "Multikey".into();
    doc["verificationMethod"][0]["publicKeyMultibase"] = multibase.into();
    let record = &account.records[0];
    let v = verify(
        &read(&record.car),
        &serde_json::to_vec(&doc).unwrap(),
        &record.uri,
        &record.digest,
    )
    .unwrap();
    assert_eq!(v.key_type, KeyType::K256);
    // The PLC reference server serves the legacy form; both must work.
    assert!(method_type == "EcdsaSecp256k1VerificationKey2019" || method_type == "Multikey");
}

#[test]
fn flipping_a_byte_in_any_block_is_a_hash_mismatch() {
    let (record, blocks) = deep_record();
    for (cid, bytes) in &blocks.blocks {
        for at in [0, bytes.len() / 2, bytes.len() - 1] {
            let mut edited = blocks.clone();
            edited.blocks.get_mut(cid).unwrap()[at] ^= 0x01;
            let err = check(alice(), record, &edited.to_car()).unwrap_err();
            assert_eq!(
                err,
                ProofError::Car(CarError::HashMismatch {
                    cid: cid.to_string()
                }),
                "block {cid} byte {at}"
            );
        }
    }
}

#[test]
fn dropping_any_block_on_the_path_is_proof_incomplete() {
    let (record, blocks) = deep_record();
    let (nodes, record_cid) = blocks.path(&key_of(record));
    assert_eq!(
        blocks.blocks.len(),
        nodes.len() + 2,
        "a getRecord CAR holds exactly commit + path + record"
    );
    let mut expected = vec![(blocks.root, BlockRole::Commit)];
    expected.extend(nodes.iter().map(|n| (*n, BlockRole::MstNode)));
    expected.push((record_cid, BlockRole::Record));
    for (cid, role) in expected {
        let mut edited = blocks.clone();
        edited.blocks.remove(&cid);
        assert_eq!(
            check(alice(), record, &edited.to_car()).unwrap_err(),
            ProofError::MissingBlock {
                role,
                cid: cid.to_string()
            },
            "dropped {role} {cid}"
        );
    }
}

#[test]
fn swapped_record_is_refused() {
    let (record, blocks) = deep_record();
    let (_, record_cid) = blocks.path(&key_of(record));
    let bobs = Blocks::from_car(&read(&bob().records[0].car));
    let (_, bob_record) = bobs.path(&key_of(&bob().records[0]));
    // Bob's record in place of alice's: the MST still names alice's record CID.
    let mut swapped = blocks.clone();
    swapped.blocks.remove(&record_cid);
    swapped
        .blocks
        .insert(bob_record, bobs.blocks[&bob_record].clone());
    assert!(matches!(
        check(alice(), record, &swapped.to_car()),
        Err(ProofError::MissingBlock {
            role: BlockRole::Record,
            ..
        })
    ));
    // Re-linked all the way up: the commit changes, so alice's signature no longer holds.
    let mut relinked = blocks.clone();
    relinked.replace(record_cid, bobs.blocks[&bob_record].clone());
    assert_eq!(
        check(alice(), record, &relinked.to_car()).unwrap_err(),
        ProofError::Signature {
            source: SignatureError::Mismatch(KeyType::K256)
        }
    );
}

#[test]
fn forged_record_needs_the_signers_key() {
    let (record, blocks) = deep_record();
    let (_, record_cid) = blocks.path(&key_of(record));
    let forged_digest = format!("sha256:{}", "ee".repeat(32));
    let mut entries: BTreeMap<String, Ipld> = map_entries(&blocks.blocks[&record_cid])
        .into_iter()
        .collect();
    entries.insert("digest".into(), Ipld::String(forged_digest.clone()));
    let mut forged = blocks.clone();
    forged.replace(record_cid, encode(&Ipld::Map(entries)));
    let attacker = Signer::k256(9);
    forged.resign(&attacker);
    let car = forged.to_car();
    // With alice's real key: refused.
    assert_eq!(
        verify(&car, &read(&alice().did_doc), &record.uri, &forged_digest).unwrap_err(),
        ProofError::Signature {
            source: SignatureError::Mismatch(KeyType::K256)
        }
    );
    // Control: only a DID document naming the attacker's key would accept it.
    verify(
        &car,
        &doc_with_key(alice(), &attacker),
        &record.uri,
        &forged_digest,
    )
    .unwrap();
}

#[test]
fn wrong_did_and_wrong_key_are_refused() {
    let record = &alice().records[0];
    let car = read(&record.car);
    // Alice's proof presented as bob's record: the commit names alice.
    let as_bob = record.uri.replace(&alice().did, &bob().did);
    assert!(matches!(
        verify(&car, &read(&bob().did_doc), &as_bob, &record.digest),
        Err(ProofError::CommitDid { .. })
    ));
    // Alice's DID document with bob's key in it.
    let mut doc: serde_json::Value = serde_json::from_slice(&read(&alice().did_doc)).unwrap();
    let bobs: serde_json::Value = serde_json::from_slice(&read(&bob().did_doc)).unwrap();
    doc["verificationMethod"][0]["publicKeyMultibase"] =
        bobs["verificationMethod"][0]["publicKeyMultibase"].clone();
    assert_eq!(
        verify(
            &car,
            &serde_json::to_vec(&doc).unwrap(),
            &record.uri,
            &record.digest
        )
        .unwrap_err(),
        ProofError::Signature {
            source: SignatureError::Mismatch(KeyType::K256)
        }
    );
    // A document served for another DID.
    assert!(matches!(
        verify(&car, &read(&bob().did_doc), &record.uri, &record.digest),
        Err(ProofError::DidDocument(_))
    ));
}

#[test]
fn high_s_signature_is_refused_on_both_curves() {
    let (record, blocks) = deep_record();
    let mut k = blocks.clone();
    k.set_sig(high_s(&blocks.sig(), KeyType::K256));
    assert_eq!(
        check(alice(), record, &k.to_car()).unwrap_err(),
        ProofError::Signature {
            source: SignatureError::HighS(KeyType::K256)
        }
    );
    // The same real repo re-signed with a P-256 key verifies, and its high-S twin does not.
    let signer = Signer::p256(5);
    let doc = doc_with_key(alice(), &signer);
    let mut p = blocks.clone();
    p.resign(&signer);
    let v = verify(&p.to_car(), &doc, &record.uri, &record.digest).unwrap();
    assert_eq!(v.key_type, KeyType::P256);
    p.set_sig(high_s(&p.sig(), KeyType::P256));
    assert_eq!(
        verify(&p.to_car(), &doc, &record.uri, &record.digest).unwrap_err(),
        ProofError::Signature {
            source: SignatureError::HighS(KeyType::P256)
        }
    );
}

#[test]
fn record_for_another_digest_is_a_replay() {
    let account = alice();
    let record = &account.records[0];
    let other = &account.records[1];
    assert_ne!(record.digest, other.digest);
    let err = verify(
        &read(&record.car),
        &read(&account.did_doc),
        &record.uri,
        &other.digest,
    )
    .unwrap_err();
    assert!(matches!(err, ProofError::RecordDigest { .. }), "{err}");
    // Another record's proof presented under this record's URI.
    let err = check(account, record, &read(&other.car)).unwrap_err();
    assert!(
        matches!(
            err,
            ProofError::MissingBlock { .. } | ProofError::RecordNotInRepo { .. }
        ),
        "{err}"
    );
}

#[test]
fn absent_and_deleted_records_are_not_in_repo() {
    let account = alice();
    let with_proofs: Vec<_> = account.absent.iter().filter(|a| a.car.is_some()).collect();
    assert!(
        !with_proofs.is_empty(),
        "the PDS gave no absence proof: {:?}",
        account.absent.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for absent in with_proofs {
        let car = read(absent.car.as_ref().unwrap());
        let err = verify(
            &car,
            &read(&account.did_doc),
            &absent.uri,
            &account.records[0].digest,
        )
        .unwrap_err();
        assert!(
            matches!(err, ProofError::RecordNotInRepo { .. }),
            "{}: {err}",
            absent.uri
        );
    }
}

#[test]
fn non_canonical_duplicate_and_float_encodings_are_refused_in_every_block() {
    let (record, blocks) = deep_record();
    let (nodes, record_cid) = blocks.path(&key_of(record));
    let attacker = Signer::k256(11);
    let doc = doc_with_key(alice(), &attacker);
    let run = |b: &Blocks| verify(&b.to_car(), &doc, &record.uri, &record.digest);

    let reversed = |bytes: &[u8]| {
        let mut e = map_entries(bytes);
        e.reverse();
        let e: Vec<(&str, Ipld)> = e.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        encode_map_in_order(&e)
    };
    let duplicated = |bytes: &[u8]| {
        let e = map_entries(bytes);
        let mut e: Vec<(&str, Ipld)> = e.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let first = e[0].clone();
        e.insert(1, first);
        encode_map_in_order(&e)
    };
    let with_float = |bytes: &[u8], field: &str| {
        let mut e: BTreeMap<String, Ipld> = map_entries(bytes).into_iter().collect();
        e.insert(field.to_owned(), Ipld::Float(3.0));
        encode(&Ipld::Map(e))
    };

    // Control: re-signing alone keeps the proof valid, so each refusal below is the encoding's.
    let mut control = blocks.clone();
    control.resign(&attacker);
    run(&control).unwrap();

    // Commit: checked before the signature, so no re-signing is needed.
    for bytes in [
        reversed(&blocks.blocks[&blocks.root]),
        duplicated(&blocks.blocks[&blocks.root]),
        with_float(&blocks.blocks[&blocks.root], "version"),
    ] {
        let mut b = blocks.clone();
        b.replace(blocks.root, bytes);
        assert_eq!(decode_error(run(&b)), BlockRole::Commit);
    }
    // MST root and leaf nodes, and the record: re-linked and re-signed by the attacker key.
    let node_targets = [nodes[0], *nodes.last().unwrap()];
    for (cid, role) in node_targets
        .iter()
        .map(|c| (*c, BlockRole::MstNode))
        .chain([(record_cid, BlockRole::Record)])
    {
        let float_field = if role == BlockRole::Record {
            "ratio"
        } else {
            "l"
        };
        for bytes in [
            reversed(&blocks.blocks[&cid]),
            duplicated(&blocks.blocks[&cid]),
            with_float(&blocks.blocks[&cid], float_field),
        ] {
            let mut b = blocks.clone();
            b.replace(cid, bytes);
            b.resign(&attacker);
            assert_eq!(decode_error(run(&b)), role, "{role} {cid}");
        }
    }
}

#[test]
fn commit_version_and_did_fields_are_checked_before_the_signature() {
    let (record, blocks) = deep_record();
    let attacker = Signer::k256(12);
    let doc = doc_with_key(alice(), &attacker);
    let mut entries: BTreeMap<String, Ipld> = map_entries(&blocks.blocks[&blocks.root])
        .into_iter()
        .collect();
    entries.insert("version".into(), Ipld::Integer(2));
    let mut b = blocks.clone();
    b.replace(blocks.root, encode(&Ipld::Map(entries)));
    b.resign(&attacker);
    assert_eq!(
        verify(&b.to_car(), &doc, &record.uri, &record.digest).unwrap_err(),
        ProofError::CommitVersion { found: 2 }
    );
    // A commit carrying an extra field is not the v3 shape.
    let mut entries: BTreeMap<String, Ipld> = map_entries(&blocks.blocks[&blocks.root])
        .into_iter()
        .collect();
    entries.insert("extra".into(), Ipld::Null);
    let mut b = blocks.clone();
    b.replace(blocks.root, encode(&Ipld::Map(entries)));
    assert_eq!(
        decode_error(verify(&b.to_car(), &doc, &record.uri, &record.digest)),
        BlockRole::Commit
    );
    let _ = decode(&blocks.blocks[&blocks.root]);
}

/// A record nested a hundred thousand levels deep (signed by the key the document names)
/// is a clean `block_decode_failed`, not a stack overflow.
#[test]
fn deeply_nested_cbor_is_a_clean_decode_error() {
    let (record, blocks) = deep_record();
    let (_, record_cid) = blocks.path(&key_of(record));
    let attacker = Signer::k256(12);
    let doc = doc_with_key(alice(), &attacker);
    let mut deep = vec![0x81u8; 100_000]; // an array holding an array holding …
    deep.push(0x00);
    let mut b = blocks.clone();
    b.replace(record_cid, deep);
    b.resign(&attacker);
    let result = verify(&b.to_car(), &doc, &record.uri, &record.digest);
    assert_eq!(decode_error(result.clone()), BlockRole::Record);
    assert_eq!(result.unwrap_err().code(), "block_decode_failed");
}
