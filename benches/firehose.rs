//! `firehose`: what reading a relay's whole stream costs (`serve --relay`): one `#commit`
//! frame decoded and matched against the trusted signers, for a repo nobody trusts (nearly
//! every frame of a relay) and for a trusted signer's signature-record delete.
//!
//! Run: `cargo bench --bench firehose`. A frame is shaped like a real PDS's: header
//! `{op: 1, t: "#commit"}`, body with `seq`, `repo`, `rev`, `since`, `commit` (a CID link),
//! `blocks` (a 3 KiB CAR slice), one operation, `blobs`, `time`, `rebase`, `tooBig`.

use std::collections::BTreeMap;

use atcr_verify::follow::frame::{Interest, decode, indexing, revocations};
use criterion::{Criterion, criterion_group, criterion_main};
use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;

const TRUSTED: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
const STRANGER: &str = "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz";

fn s(v: &str) -> Ipld {
    Ipld::String(v.to_owned())
}

fn map(entries: Vec<(&str, Ipld)>) -> Ipld {
    Ipld::Map(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// A `#commit` frame of `repo` with one `action` on `path`.
fn commit(repo: &str, action: &str, path: &str) -> Vec<u8> {
    let cid: Cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
        .parse()
        .unwrap();
    let op_cid = if action == "delete" {
        Ipld::Null
    } else {
        Ipld::Link(cid)
    };
    let header = map(vec![("op", Ipld::Integer(1)), ("t", s("#commit"))]);
    let body = map(vec![
        ("seq", Ipld::Integer(9_876_543_210)),
        ("repo", s(repo)),
        ("rev", s("3lbxq2hzn2k2a")),
        ("since", s("3lbxq2dqwfk2a")),
        ("commit", Ipld::Link(cid)),
        ("blocks", Ipld::Bytes(vec![0x5a; 3 * 1024])),
        (
            "ops",
            Ipld::List(vec![map(vec![
                ("action", s(action)),
                ("path", s(path)),
                ("cid", op_cid),
            ])]),
        ),
        ("blobs", Ipld::List(vec![])),
        ("time", s("2026-11-29T23:50:00.000Z")),
        ("rebase", Ipld::Bool(false)),
        ("tooBig", Ipld::Bool(false)),
    ]);
    let mut bytes = serde_ipld_dagcbor::to_vec(&header).unwrap();
    bytes.extend(serde_ipld_dagcbor::to_vec(&body).unwrap());
    bytes
}

/// Decodes `frame` and works out what it revokes and indexes, as the follower does.
fn handle(frame: &[u8], interest: &Interest) -> usize {
    let event = decode(frame).unwrap();
    revocations(&event, interest).len() + indexing(&event, interest).len()
}

fn bench(c: &mut Criterion) {
    // Ten trusted signers; one signature collection.
    let mut interest = Interest::default();
    for i in 0..10u8 {
        let did = format!("did:plc:{}", String::from(char::from(b'a' + i)).repeat(24));
        interest.dids.insert(did.parse().unwrap());
    }
    interest.collections.insert("io.atcr.manifest".to_owned());
    assert!(interest.dids.contains(&TRUSTED.parse().unwrap()));

    let stranger = commit(STRANGER, "create", "app.bsky.feed.post/3lbxq2hzn2k2a");
    let revoke = commit(TRUSTED, "delete", "io.atcr.manifest/3lbxq2hzn2k2a");
    assert_eq!(handle(&stranger, &interest), 0);
    assert_eq!(
        handle(&revoke, &interest),
        2,
        "one revocation, one index removal"
    );

    let mut group = c.benchmark_group("firehose");
    group.bench_function("untrusted_repo_commit", |b| {
        b.iter(|| handle(std::hint::black_box(&stranger), &interest))
    });
    group.bench_function("trusted_signature_delete", |b| {
        b.iter(|| handle(std::hint::black_box(&revoke), &interest))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
