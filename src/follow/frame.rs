//! One frame of `com.atproto.sync.subscribeRepos`, decoded (pure, no I/O), and what it
//! revokes for the signers being followed.
//!
//! A binary WebSocket frame is two DAG-CBOR values back to back (`DESIGN.md` §6): a header
//! `{op, t}` — `op` 1 for a message whose type `t` is `#commit`, `#sync`, `#identity`,
//! `#account` or `#info`, `op` −1 for an error — and its body. Both are decoded strictly
//! (serde_ipld_dagcbor's default) from a frame of at most [`MAX_FRAME`] bytes; only the
//! fields the follower acts on are kept (a commit's CAR `blocks` are borrowed from the frame,
//! not copied, and read only for a followed repo; operations past [`MAX_OPS`] are counted,
//! not kept). An event is never taken as proof of anything, only as a reason to forget, or
//! as a pointer that is proven before it counts.

use std::collections::HashSet;

use serde::Deserialize;
use serde::de::{IgnoredAny, SeqAccess, Visitor};

use crate::policy::TrustPolicy;
use crate::proof::CarLimits;
use crate::proof::car::Car;
use crate::syntax::{AtUri, Did, ImageDigest};

/// The largest frame accepted, in bytes. The PDS caps a commit's `blocks` at 2 MB; a frame
/// over this is refused whole.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Operations read per commit at most (the PDS sends at most 200).
pub const MAX_OPS: usize = 1000;

/// What a frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// Records of `repo` created, updated or deleted.
    Commit {
        /// Stream sequence number.
        seq: i64,
        /// The repo's DID, as sent.
        repo: String,
        /// The operations.
        ops: Vec<Op>,
        /// The CAR slice of the changed blocks (records included), unchecked, as the
        /// frame holds it.
        blocks: &'a [u8],
        /// The commit was too big for its operations and blocks to be sent.
        too_big: bool,
    },
    /// The repo's state was reset to a new commit (its history may not follow on).
    Sync {
        /// Stream sequence number.
        seq: i64,
        /// The repo's DID, as sent.
        did: String,
    },
    /// The DID's document or handle changed (key rotation, PDS move).
    Identity {
        /// Stream sequence number.
        seq: i64,
        /// The DID, as sent.
        did: String,
    },
    /// The account's hosting status changed.
    Account {
        /// Stream sequence number.
        seq: i64,
        /// The DID, as sent.
        did: String,
        /// Whether the account is active.
        active: bool,
    },
    /// A message from the server (`OutdatedCursor`, …).
    Info {
        /// Its name.
        name: String,
        /// Its text.
        message: Option<String>,
    },
    /// An error frame (`op` −1): the server ends the stream.
    Error {
        /// Its name (`FutureCursor`, `ConsumerTooSlow`, …).
        error: String,
        /// Its text.
        message: Option<String>,
    },
    /// A message type this version does not know (ignored, as the spec asks).
    Other {
        /// Its type.
        t: String,
        /// Its sequence number, when it has one.
        seq: Option<i64>,
    },
}

impl Event<'_> {
    /// The stream sequence number to resume after, when the event has one.
    pub fn seq(&self) -> Option<i64> {
        match self {
            Event::Commit { seq, .. }
            | Event::Sync { seq, .. }
            | Event::Identity { seq, .. }
            | Event::Account { seq, .. } => Some(*seq),
            Event::Other { seq, .. } => *seq,
            Event::Info { .. } | Event::Error { .. } => None,
        }
    }

    /// The metrics label of the event's type.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Commit { .. } => "commit",
            Event::Sync { .. } => "sync",
            Event::Identity { .. } => "identity",
            Event::Account { .. } => "account",
            Event::Info { .. } => "info",
            Event::Error { .. } => "error",
            Event::Other { .. } => "other",
        }
    }
}

/// One record operation of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Op {
    /// `create`, `update` or `delete`.
    pub action: String,
    /// `collection/rkey`.
    pub path: String,
    /// The new record's CID (none for a delete).
    #[serde(default)]
    pub cid: Option<cid::Cid>,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Not a header and a body in strict DAG-CBOR.
    #[error("frame is not a DAG-CBOR header and body as subscribeRepos sends: {0}")]
    Malformed(String),
    /// A header `op` other than 1 or −1.
    #[error("frame header has op {0}, expected 1 (message) or -1 (error)")]
    UnknownOp(i64),
    /// More operations in one commit than are read.
    #[error("commit has {0} operations, over the {MAX_OPS} read")]
    TooManyOps(usize),
}

#[derive(Deserialize)]
struct Header {
    op: i64,
    #[serde(default)]
    t: Option<String>,
}

#[derive(Deserialize)]
struct CommitBody<'a> {
    seq: i64,
    repo: String,
    ops: Ops,
    #[serde(default, borrow, with = "serde_bytes")]
    blocks: &'a [u8],
    #[serde(default, rename = "tooBig")]
    too_big: bool,
}

/// A commit's operations: the first [`MAX_OPS`] kept, the rest only counted (skipped
/// without being built), so a frame of tiny operations allocates for `MAX_OPS` at most.
/// Hand-written because serde's `Vec` builds every element before a length can be checked.
struct Ops {
    kept: Vec<Op>,
    total: usize,
}

impl<'de> Deserialize<'de> for Ops {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Counting;
        impl<'de> Visitor<'de> for Counting {
            type Value = Ops;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of operations")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ops, A::Error> {
                let mut kept = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_OPS));
                let mut total = 0usize;
                loop {
                    if kept.len() < MAX_OPS {
                        match seq.next_element::<Op>()? {
                            Some(op) => kept.push(op),
                            None => break,
                        }
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    total += 1;
                }
                Ok(Ops { kept, total })
            }
        }
        d.deserialize_seq(Counting)
    }
}

#[derive(Deserialize)]
struct DidBody {
    seq: i64,
    did: String,
}

#[derive(Deserialize)]
struct AccountBody {
    seq: i64,
    did: String,
    active: bool,
}

#[derive(Deserialize)]
struct InfoBody {
    name: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct SeqOnly {
    #[serde(default)]
    seq: Option<i64>,
}

/// Decodes one binary frame.
pub fn decode(frame: &[u8]) -> Result<Event<'_>, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(frame.len()));
    }
    let mut de = serde_ipld_dagcbor::de::Deserializer::from_slice(frame);
    let malformed = |e: &dyn std::fmt::Display| FrameError::Malformed(e.to_string());
    let header = Header::deserialize(&mut de).map_err(|e| malformed(&e))?;
    macro_rules! body {
        ($t:ty) => {{
            let body = <$t>::deserialize(&mut de).map_err(|e| malformed(&e))?;
            de.end().map_err(|e| malformed(&e))?;
            body
        }};
    }
    let event = match (header.op, header.t.as_deref()) {
        (-1, _) => {
            let b = body!(ErrorBody);
            Event::Error {
                error: b.error,
                message: b.message,
            }
        }
        (1, Some("#commit")) => {
            let b = body!(CommitBody);
            if b.ops.total > MAX_OPS {
                return Err(FrameError::TooManyOps(b.ops.total));
            }
            Event::Commit {
                seq: b.seq,
                repo: b.repo,
                ops: b.ops.kept,
                blocks: b.blocks,
                too_big: b.too_big,
            }
        }
        (1, Some("#sync")) => {
            let b = body!(DidBody);
            Event::Sync {
                seq: b.seq,
                did: b.did,
            }
        }
        (1, Some("#identity")) => {
            let b = body!(DidBody);
            Event::Identity {
                seq: b.seq,
                did: b.did,
            }
        }
        (1, Some("#account")) => {
            let b = body!(AccountBody);
            Event::Account {
                seq: b.seq,
                did: b.did,
                active: b.active,
            }
        }
        (1, Some("#info")) => {
            let b = body!(InfoBody);
            Event::Info {
                name: b.name,
                message: b.message,
            }
        }
        (1, t) => {
            let b = body!(SeqOnly);
            Event::Other {
                t: t.unwrap_or_default().to_owned(),
                seq: b.seq,
            }
        }
        (op, _) => return Err(FrameError::UnknownOp(op)),
    };
    Ok(event)
}

/// Whose events count and which records are signatures: the DIDs the trust policy trusts
/// (in any of its policies) and the signature collections of its policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Trusted DIDs.
    pub dids: HashSet<Did>,
    /// Signature collections (NSIDs).
    pub collections: HashSet<String>,
}

impl Interest {
    /// What `policy` makes worth following.
    pub fn of(policy: &TrustPolicy) -> Interest {
        let mut interest = Interest::default();
        for p in policy.policies() {
            for t in p.trusted_dids() {
                interest.dids.insert(t.did().clone());
            }
            for c in p.signature_collections() {
                interest.collections.insert(c.as_str().to_owned());
            }
        }
        interest
    }

    /// The same collections for `dids` only (the trusted DIDs one stream hosts).
    pub fn hosted(&self, dids: HashSet<Did>) -> Interest {
        Interest {
            dids,
            collections: self.collections.clone(),
        }
    }

    /// The DIDs whose events this interest counts and `before` did not: the newly trusted
    /// ones, or all of them when a signature collection was added (its records' changes
    /// were not counted). Their facts cached meanwhile are to be forgotten.
    pub fn joined_since(&self, before: &Interest) -> HashSet<Did> {
        if self.collections.is_subset(&before.collections) {
            self.dids.difference(&before.dids).cloned().collect()
        } else {
            self.dids.clone()
        }
    }

    fn did(&self, did: &str) -> Option<Did> {
        let did: Did = did.parse().ok()?;
        self.dids.contains(&did).then_some(did)
    }
}

/// What an event makes the engine forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    /// Proofs of this record of this DID (its `at://` URI as the engine writes it).
    Record(Did, String),
    /// The DID's document and the proofs of all its records.
    Did(Did),
}

/// What `event` revokes among the signatures `interest` covers: a signature record updated
/// or deleted; a trusted DID's identity change, repo reset (`#sync`) or deactivation; the
/// whole DID for a commit of a trusted repo that is `tooBig` (its operations are not sent)
/// or has an operation whose path cannot be read (no collection, or an invalid record path
/// in a signature collection). Everything else — another repo's event, another collection,
/// a created record — revokes nothing (and nothing is ever made to hold by an event).
pub fn revocations(event: &Event, interest: &Interest) -> Vec<Revoke> {
    match event {
        Event::Commit {
            repo, ops, too_big, ..
        } => {
            let Some(did) = interest.did(repo) else {
                return Vec::new();
            };
            if *too_big {
                return vec![Revoke::Did(did)];
            }
            let mut out = Vec::new();
            for op in signature_ops(&did, ops, interest) {
                match op {
                    Some((op, uri)) if op.action != "create" => {
                        out.push(Revoke::Record(did.clone(), uri.to_string()));
                    }
                    Some(_) => {}
                    None => {
                        out = vec![Revoke::Did(did.clone())];
                        break;
                    }
                }
            }
            out
        }
        Event::Sync { did, .. } | Event::Identity { did, .. } => {
            interest.did(did).map(Revoke::Did).into_iter().collect()
        }
        Event::Account { did, active, .. } if !active => {
            interest.did(did).map(Revoke::Did).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// What a commit changes in the signature index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Indexing {
    /// The record names this digest now.
    Put(AtUri, ImageDigest),
    /// The record is gone, or names no digest the index can read.
    Remove(AtUri),
}

#[derive(Deserialize)]
struct RecordDigest {
    digest: String,
}

/// What `event` changes in the signature index, for the signature records of trusted
/// signers: a created or updated record whose block (in the commit's CAR slice, checked
/// against its CID) names a digest points at it; a deleted one, or one that cannot be read,
/// points nowhere. Pointers only: each is proven by `getRecord` before it counts.
pub fn indexing(event: &Event, interest: &Interest) -> Vec<Indexing> {
    let Event::Commit {
        repo, ops, blocks, ..
    } = event
    else {
        return Vec::new();
    };
    let Some(did) = interest.did(repo) else {
        return Vec::new();
    };
    let limits = CarLimits {
        max_total_bytes: MAX_FRAME,
        max_block_bytes: MAX_FRAME,
    };
    let car = Car::read(blocks, &limits).ok();
    signature_ops(&did, ops, interest)
        .flatten()
        .map(|(op, uri)| {
            if op.action == "delete" {
                return Indexing::Remove(uri);
            }
            let digest = op
                .cid
                .as_ref()
                .and_then(|cid| car.as_ref()?.block(cid))
                .and_then(|block| serde_ipld_dagcbor::from_slice::<RecordDigest>(block).ok())
                .and_then(|r| r.digest.parse::<ImageDigest>().ok());
            match digest {
                Some(d) => Indexing::Put(uri, d),
                None => Indexing::Remove(uri),
            }
        })
        .collect()
}

/// The operations of `did`'s commit that concern a signature collection of `interest`, each
/// with its record's URI; `None` for one whose path cannot be read (no collection, or an
/// invalid record path in a signature collection).
fn signature_ops<'a>(
    did: &'a Did,
    ops: &'a [Op],
    interest: &'a Interest,
) -> impl Iterator<Item = Option<(&'a Op, AtUri)>> + 'a {
    ops.iter().filter_map(move |op| {
        let Some((collection, _)) = op.path.split_once('/') else {
            return Some(None);
        };
        if !interest.collections.contains(collection) {
            return None;
        }
        let uri = format!("at://{did}/{}", op.path).parse::<AtUri>().ok();
        Some(uri.map(|uri| (op, uri)))
    })
}

/// Frame builders for the tests of this module and of the follower.
#[cfg(test)]
pub(crate) mod test_frames {
    use ipld_core::ipld::Ipld;

    /// A frame: the header's DAG-CBOR, then the body's.
    pub(crate) fn frame(header: Ipld, body: Ipld) -> Vec<u8> {
        let mut bytes = serde_ipld_dagcbor::to_vec(&header).unwrap();
        bytes.extend(serde_ipld_dagcbor::to_vec(&body).unwrap());
        bytes
    }

    pub(crate) fn map(entries: &[(&str, Ipld)]) -> Ipld {
        Ipld::Map(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    pub(crate) fn s(v: &str) -> Ipld {
        Ipld::String(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use ipld_core::ipld::Ipld;

    use super::*;

    const ALICE: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    const BOB: &str = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";

    use super::test_frames::{frame, map, s};

    fn commit(repo: &str, ops: &[(&str, &str)]) -> Vec<u8> {
        let ops = ops
            .iter()
            .map(|(a, p)| map(&[("action", s(a)), ("path", s(p)), ("cid", Ipld::Null)]))
            .collect();
        frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]),
            map(&[
                ("seq", Ipld::Integer(42)),
                ("repo", s(repo)),
                ("rev", s("3kabc")),
                ("blocks", Ipld::Bytes(vec![1, 2, 3])),
                ("ops", Ipld::List(ops)),
                ("tooBig", Ipld::Bool(false)),
            ]),
        )
    }

    fn interest() -> Interest {
        Interest {
            dids: [ALICE.parse().unwrap()].into(),
            collections: ["io.atcr.manifest".to_owned()].into(),
        }
    }

    #[test]
    fn signers_joined_are_the_newly_trusted_or_all_when_a_collection_is_added() {
        let before = interest();
        let alice: Did = ALICE.parse().unwrap();
        let bob: Did = BOB.parse().unwrap();
        let mut more = before.clone();
        more.dids.insert(bob.clone());
        assert_eq!(more.joined_since(&before), [bob.clone()].into());
        assert!(
            before.joined_since(&more).is_empty(),
            "a signer dropped joins nothing"
        );
        let mut collection = more.clone();
        collection.collections.insert("com.example.sig".to_owned());
        assert_eq!(collection.joined_since(&more), [alice, bob].into());
    }

    #[test]
    fn a_commit_revokes_the_trusted_signers_updated_and_deleted_signatures_only() {
        let bytes = commit(
            ALICE,
            &[
                ("delete", "io.atcr.manifest/3kdel"),
                ("update", "io.atcr.manifest/3kupd"),
                ("create", "io.atcr.manifest/3knew"),
                ("delete", "app.bsky.feed.post/3kpost"),
            ],
        );
        let event = decode(&bytes).unwrap();
        assert_eq!(event.seq(), Some(42));
        let alice: Did = ALICE.parse().unwrap();
        assert_eq!(
            revocations(&event, &interest()),
            vec![
                Revoke::Record(
                    alice.clone(),
                    format!("at://{ALICE}/io.atcr.manifest/3kdel")
                ),
                Revoke::Record(
                    alice.clone(),
                    format!("at://{ALICE}/io.atcr.manifest/3kupd")
                ),
            ]
        );
        // Another repo on the same PDS: nothing.
        let bytes = commit(BOB, &[("delete", "io.atcr.manifest/3kdel")]);
        let other = decode(&bytes).unwrap();
        assert!(revocations(&other, &interest()).is_empty());
    }

    #[test]
    fn identity_sync_and_deactivation_revoke_the_did() {
        let alice: Did = ALICE.parse().unwrap();
        let did_frame = |t: &str, extra: &[(&str, Ipld)]| {
            let mut body = vec![("seq", Ipld::Integer(7)), ("did", s(ALICE))];
            body.extend_from_slice(extra);
            let bytes = frame(map(&[("op", Ipld::Integer(1)), ("t", s(t))]), map(&body));
            // Events of these types borrow nothing from the frame.
            match decode(&bytes).unwrap() {
                Event::Sync { seq, did } => Event::Sync { seq, did },
                Event::Identity { seq, did } => Event::Identity { seq, did },
                Event::Account { seq, did, active } => Event::Account { seq, did, active },
                other => panic!("{other:?}"),
            }
        };
        for event in [
            did_frame("#identity", &[("handle", s("a.test"))]),
            did_frame("#sync", &[("blocks", Ipld::Bytes(vec![]))]),
            did_frame("#account", &[("active", Ipld::Bool(false))]),
        ] {
            assert_eq!(
                revocations(&event, &interest()),
                vec![Revoke::Did(alice.clone())],
                "{event:?}"
            );
        }
        let active = did_frame("#account", &[("active", Ipld::Bool(true))]);
        assert!(revocations(&active, &interest()).is_empty());
    }

    #[test]
    fn identity_sync_and_account_events_of_other_dids_revoke_nothing() {
        let did_frame = |t: &str, did: &str, extra: &[(&str, Ipld)]| {
            let mut body = vec![("seq", Ipld::Integer(8)), ("did", s(did))];
            body.extend_from_slice(extra);
            frame(map(&[("op", Ipld::Integer(1)), ("t", s(t))]), map(&body))
        };
        let inactive = [("active", Ipld::Bool(false))];
        // An untrusted DID, and a DID as sent that does not parse.
        for did in [BOB, "did:plc:NOT-A-DID", ""] {
            for (t, extra) in [
                ("#identity", &[][..]),
                ("#sync", &[][..]),
                ("#account", &inactive[..]),
            ] {
                let bytes = did_frame(t, did, extra);
                let event = decode(&bytes).unwrap();
                assert_eq!(event.seq(), Some(8));
                assert!(revocations(&event, &interest()).is_empty(), "{t} {did}");
                assert!(indexing(&event, &interest()).is_empty(), "{t} {did}");
            }
        }
        // `active` is required: an `#account` without it is refused, not taken as active.
        let bytes = did_frame("#account", ALICE, &[]);
        assert!(matches!(decode(&bytes), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn errors_info_and_unknown_types_decode_and_revoke_nothing() {
        let error_frame = frame(
            map(&[("op", Ipld::Integer(-1))]),
            map(&[("error", s("FutureCursor")), ("message", s("no"))]),
        );
        let error = decode(&error_frame).unwrap();
        assert_eq!(
            error,
            Event::Error {
                error: "FutureCursor".into(),
                message: Some("no".into())
            }
        );
        let info_frame = frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#info"))]),
            map(&[("name", s("OutdatedCursor"))]),
        );
        let info = decode(&info_frame).unwrap();
        assert_eq!(info.kind(), "info");
        let other_frame = frame(
            map(&[("op", Ipld::Integer(1)), ("t", s("#labels"))]),
            map(&[("seq", Ipld::Integer(9))]),
        );
        let other = decode(&other_frame).unwrap();
        assert_eq!(other.seq(), Some(9));
        for e in [error, info, other] {
            assert!(revocations(&e, &interest()).is_empty());
        }
    }

    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A CAR v1 holding `blocks` (the first is the root), and their CIDs.
    fn car(blocks: &[Vec<u8>]) -> (Vec<u8>, Vec<cid::Cid>) {
        use sha2::Digest;
        let cids: Vec<cid::Cid> = blocks
            .iter()
            .map(|b| {
                let hash =
                    cid::multihash::Multihash::<64>::wrap(0x12, &sha2::Sha256::digest(b)).unwrap();
                cid::Cid::new_v1(0x71, hash)
            })
            .collect();
        let header = map(&[
            ("roots", Ipld::List(vec![Ipld::Link(cids[0])])),
            ("version", Ipld::Integer(1)),
        ]);
        let header = serde_ipld_dagcbor::to_vec(&header).unwrap();
        let mut out = Vec::new();
        varint(header.len(), &mut out);
        out.extend(header);
        for (cid, block) in cids.iter().zip(blocks) {
            let cid_bytes = cid.to_bytes();
            varint(cid_bytes.len() + block.len(), &mut out);
            out.extend(cid_bytes);
            out.extend(block);
        }
        (out, cids)
    }

    #[test]
    fn commits_index_the_digests_their_trusted_signature_records_name() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let record = serde_ipld_dagcbor::to_vec(&map(&[
            ("$type", s("io.atcr.manifest")),
            ("digest", s(&digest)),
        ]))
        .unwrap();
        let bad = serde_ipld_dagcbor::to_vec(&map(&[("digest", s("not a digest"))])).unwrap();
        let commit_block = serde_ipld_dagcbor::to_vec(&map(&[("rev", s("3k"))])).unwrap();
        let (blocks, cids) = car(&[commit_block, record, bad]);
        let op = |action: &str, path: &str, cid: Option<cid::Cid>| {
            map(&[
                ("action", s(action)),
                ("path", s(path)),
                ("cid", cid.map_or(Ipld::Null, Ipld::Link)),
            ])
        };
        let event = |repo: &str| {
            frame(
                map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]),
                map(&[
                    ("seq", Ipld::Integer(5)),
                    ("repo", s(repo)),
                    ("blocks", Ipld::Bytes(blocks.clone())),
                    (
                        "ops",
                        Ipld::List(vec![
                            op("create", "io.atcr.manifest/3ka", Some(cids[1])),
                            op("update", "io.atcr.manifest/3kb", Some(cids[2])),
                            op("delete", "io.atcr.manifest/3kc", None),
                            op("create", "app.bsky.feed.post/3kd", Some(cids[1])),
                        ]),
                    ),
                ]),
            )
        };
        let uri = |rkey: &str| -> AtUri {
            format!("at://{ALICE}/io.atcr.manifest/{rkey}")
                .parse()
                .unwrap()
        };
        assert_eq!(
            indexing(&decode(&event(ALICE)).unwrap(), &interest()),
            vec![
                Indexing::Put(uri("3ka"), digest.parse().unwrap()),
                Indexing::Remove(uri("3kb")),
                Indexing::Remove(uri("3kc")),
            ]
        );
        assert!(
            indexing(&decode(&event(BOB)).unwrap(), &interest()).is_empty(),
            "untrusted repo"
        );
    }

    #[test]
    fn an_unreadable_path_or_a_too_big_commit_of_a_trusted_repo_revokes_the_did() {
        let alice: Did = ALICE.parse().unwrap();
        for path in ["io.atcr.manifest/not a key", "io.atcr.manifest/", "noslash"] {
            let bytes = commit(ALICE, &[("create", path)]);
            let event = decode(&bytes).unwrap();
            assert_eq!(
                revocations(&event, &interest()),
                vec![Revoke::Did(alice.clone())],
                "{path}"
            );
            let bytes = commit(BOB, &[("delete", path)]);
            assert!(revocations(&decode(&bytes).unwrap(), &interest()).is_empty());
        }
        let too_big = |repo: &str| {
            frame(
                map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]),
                map(&[
                    ("seq", Ipld::Integer(3)),
                    ("repo", s(repo)),
                    ("blocks", Ipld::Bytes(vec![])),
                    ("ops", Ipld::List(vec![])),
                    ("tooBig", Ipld::Bool(true)),
                ]),
            )
        };
        let bytes = too_big(ALICE);
        assert_eq!(
            revocations(&decode(&bytes).unwrap(), &interest()),
            vec![Revoke::Did(alice)]
        );
        let bytes = too_big(BOB);
        assert!(revocations(&decode(&bytes).unwrap(), &interest()).is_empty());
    }

    #[test]
    fn operations_past_the_cap_are_counted_not_kept_and_blocks_are_borrowed() {
        let ops: Vec<(&str, &str)> = vec![("delete", "io.atcr.manifest/3k"); MAX_OPS + 5];
        let bytes = commit(ALICE, &ops);
        assert_eq!(decode(&bytes), Err(FrameError::TooManyOps(MAX_OPS + 5)));
        let bytes = commit(ALICE, &ops[..MAX_OPS]);
        let Event::Commit { ops, blocks, .. } = decode(&bytes).unwrap() else {
            panic!("a commit");
        };
        assert_eq!(ops.len(), MAX_OPS);
        // The blocks are the frame's own bytes, not a copy.
        let range = bytes.as_ptr_range();
        assert!(range.contains(&blocks.as_ptr()));
    }

    #[test]
    fn hostile_frames_are_refused() {
        let ok = commit(ALICE, &[("delete", "io.atcr.manifest/3k")]);
        // Truncated, trailing bytes, no body, garbage, an unknown op.
        assert!(decode(&ok[..ok.len() - 1]).is_err());
        let mut trailing = ok.clone();
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(FrameError::Malformed(_))));
        let header_only =
            serde_ipld_dagcbor::to_vec(&map(&[("op", Ipld::Integer(1)), ("t", s("#commit"))]))
                .unwrap();
        assert!(decode(&header_only).is_err());
        assert!(decode(b"\xff\xff\xff").is_err());
        assert_eq!(
            decode(&frame(map(&[("op", Ipld::Integer(2))]), map(&[]))),
            Err(FrameError::UnknownOp(2))
        );
        // Over the cap: refused before decoding.
        assert_eq!(
            decode(&vec![0; MAX_FRAME + 1]),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
    }
}
