//! The proof engine: bytes in, a proven signature (or exactly why not) out. No I/O.
//!
//! Given the CAR returned by `com.atproto.sync.getRecord`, the signer's key, the record's
//! `at://` URI and an image digest, [`verify_record_proof`] decides whether the DID signed
//! a repo commit whose MST holds a record naming that digest (`DESIGN.md` §3, steps 7–11):
//!
//! 1. every CAR block's CID is recomputed ([`car`]);
//! 2. the root block is a version-3 commit by the DID, signed by its key, low-S ([`commit`]);
//! 3. the commit's MST holds `<collection>/<rkey>`, every node on the path present ([`mst`]);
//! 4. the record has `$type` = collection and `digest` = the image digest ([`record`]).
//!
//! Every block is decoded as strict DAG-CBOR: canonical key order, no duplicate keys,
//! minimal integers, no indefinite lengths, no trailing bytes; floats only where the
//! block's shape allows none anyway (commit, MST) or not at all (record).

pub mod car;
mod commit;
pub mod mst;
mod record;

use cid::Cid;
use serde::Serialize;
use time::OffsetDateTime;

pub use car::{Car, CarError, CarLimits};
pub use commit::VerifiedCommit;

use crate::crypto::{KeyType, PublicKey, SignatureError};
use crate::did_document::{DidDocError, DidDocument};
use crate::syntax::{AtUri, Did, ImageDigest, Tid};

/// Which block of a proof an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockRole {
    /// The signed commit (the CAR root).
    Commit,
    /// A node of the Merkle Search Tree.
    MstNode,
    /// The record the MST points at.
    Record,
}

impl std::fmt::Display for BlockRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockRole::Commit => "commit",
            BlockRole::MstNode => "MST node",
            BlockRole::Record => "record",
        })
    }
}

/// Why a proof does not prove the signature. Every variant says what was expected and
/// what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The CAR file itself is unreadable or altered.
    #[error(transparent)]
    Car(#[from] CarError),
    /// The commit's `did` is not the signer's DID.
    #[error("commit is for {found:?}, expected {expected}")]
    CommitDid {
        /// The DID of the record URI.
        expected: Did,
        /// The commit's `did`.
        found: String,
    },
    /// The commit's `rev` is not a TID.
    #[error("commit rev {found:?} is not a valid TID")]
    CommitRev {
        /// The rev found.
        found: String,
    },
    /// The commit is not version 3.
    #[error("commit version is {found}, expected 3")]
    CommitVersion {
        /// The version found.
        found: i64,
    },
    /// A block is not strict DAG-CBOR of the expected shape.
    #[error("{role} block {cid} is not valid strict DAG-CBOR of the expected shape: {reason}")]
    Decode {
        /// Which block.
        role: BlockRole,
        /// Its CID.
        cid: String,
        /// The decoder's message.
        reason: String,
    },
    /// The DID document does not give a usable signing key.
    #[error(transparent)]
    DidDocument(#[from] DidDocError),
    /// A block the proof needs is not in the CAR.
    #[error("proof incomplete: {role} block {cid} is not in the CAR")]
    MissingBlock {
        /// Which block.
        role: BlockRole,
        /// The CID that was needed.
        cid: String,
    },
    /// An MST node breaks the tree's rules.
    #[error("MST node {cid} is malformed: {reason}")]
    Mst {
        /// The node's CID.
        cid: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The record's `digest` names another image: a replayed signature.
    #[error(
        "record is for digest {found:?}, expected {expected} (signature belongs to another image)"
    )]
    RecordDigest {
        /// The image digest being verified.
        expected: ImageDigest,
        /// The record's digest.
        found: String,
    },
    /// A load-bearing record field is missing or invalid.
    #[error("record field {field}: {reason}")]
    RecordField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The MST proves the key is absent (deleted records land here).
    #[error("record {key} is not in the repo (deleted or never written)")]
    RecordNotInRepo {
        /// The MST key that was looked up.
        key: String,
    },
    /// The commit is older than one already proven for the same repo: a replay of an old
    /// repo state (one that may still hold a record the signer has since deleted).
    #[error(
        "stale commit: the PDS served rev {found} of {did}'s repo, older than rev {seen} \
         already proven (a replay of an old repo state)"
    )]
    StaleCommit {
        /// The signer.
        did: Did,
        /// The commit's rev.
        found: Tid,
        /// The highest rev already proven for the repo.
        seen: Tid,
    },
    /// The record's `$type` is not the URI's collection.
    #[error("record $type is {found:?}, expected {expected}")]
    RecordType {
        /// The collection of the URI.
        expected: crate::syntax::Nsid,
        /// The record's `$type`.
        found: String,
    },
    /// The block is not DAG-CBOR (raw codec) where a structured block is required.
    #[error("{role} block {cid} has codec {codec:#x}, expected dag-cbor (0x71)")]
    WrongCodec {
        /// Which block.
        role: BlockRole,
        /// Its CID.
        cid: String,
        /// The codec found.
        codec: u64,
    },
    /// The commit signature does not verify.
    #[error("commit signature: {source}")]
    Signature {
        /// Why.
        #[source]
        source: SignatureError,
    },
    /// A state the code believes impossible; please report it.
    #[error("internal error while {context}; please report this")]
    Internal {
        /// What was being done.
        context: &'static str,
    },
}

impl ProofError {
    /// A stable snake_case code for machines (JSON output, metrics labels).
    pub fn code(&self) -> &'static str {
        match self {
            ProofError::Car(CarError::HashMismatch { .. }) => "car_hash_mismatch",
            ProofError::Car(_) => "car_invalid",
            ProofError::CommitDid { .. } => "commit_did_mismatch",
            ProofError::CommitRev { .. } => "commit_rev_invalid",
            ProofError::CommitVersion { .. } => "commit_version_unsupported",
            ProofError::Decode { .. } => "block_decode_failed",
            ProofError::DidDocument(_) => "did_document_invalid",
            ProofError::MissingBlock { .. } => "proof_incomplete",
            ProofError::Mst { .. } => "mst_malformed",
            ProofError::RecordDigest { .. } => "record_digest_mismatch",
            ProofError::RecordField { .. } => "record_field_invalid",
            ProofError::RecordNotInRepo { .. } => "record_not_in_repo",
            ProofError::RecordType { .. } => "record_type_mismatch",
            ProofError::StaleCommit { .. } => "stale_commit",
            ProofError::WrongCodec { .. } => "block_codec_unsupported",
            ProofError::Signature {
                source: SignatureError::HighS(_),
            } => "signature_high_s",
            ProofError::Signature { .. } => "signature_invalid",
            ProofError::Internal { .. } => "internal",
        }
    }
}

/// Decodes a dag-cbor block strictly into `T`.
fn decode_block<'a, T: serde::Deserialize<'a>>(
    role: BlockRole,
    cid: &Cid,
    block: &'a [u8],
) -> Result<T, ProofError> {
    if cid.codec() != car::DAG_CBOR {
        return Err(ProofError::WrongCodec {
            role,
            cid: cid.to_string(),
            codec: cid.codec(),
        });
    }
    serde_ipld_dagcbor::from_slice(block).map_err(|e| ProofError::Decode {
        role,
        cid: cid.to_string(),
        reason: crate::syntax::text::outside(&e.to_string()),
    })
}

/// Where the signing time reported to users comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SignedAtSource {
    /// The signed record's `createdAt`.
    #[serde(rename = "record.createdAt")]
    RecordCreatedAt,
    /// The signed commit's `rev` TID (the record has no `createdAt`).
    #[serde(rename = "commit.rev")]
    CommitRev,
}

/// A signature proven from signed data alone. Only this crate can make one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
#[serde(rename_all = "camelCase")]
pub struct VerifiedRecord {
    /// The signer.
    pub did: Did,
    /// The record.
    #[serde(serialize_with = "serialize_display")]
    pub uri: AtUri,
    /// The image digest the record names.
    pub digest: ImageDigest,
    /// The curve of the signing key.
    pub key_type: KeyType,
    /// The signed commit.
    #[serde(serialize_with = "serialize_display")]
    pub commit_cid: Cid,
    /// The commit's repo revision.
    pub rev: Tid,
    /// The record block's CID.
    #[serde(serialize_with = "serialize_display")]
    pub record_cid: Cid,
    /// When it was signed, from signed data (see `signed_at_source`).
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: OffsetDateTime,
    /// Which signed field `signed_at` comes from.
    pub signed_at_source: SignedAtSource,
    /// The record's `repository` field, when it has one (ATCR writes the repository scoped
    /// to the signer: `myapp` for `atcr.io/alice/myapp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
}

fn serialize_display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// What a proof must show: this DID, with this key, signed this record naming this digest.
#[derive(Debug, Clone, Copy)]
pub struct ProofClaim<'a> {
    /// The record (its DID is the signer).
    pub uri: &'a AtUri,
    /// The signer's `#atproto` key.
    pub key: &'a PublicKey,
    /// The image digest the record must name.
    pub digest: &'a ImageDigest,
}

/// Checks a `getRecord` CAR against a claim. The heart of atcr-verify.
pub fn verify_record_proof(
    car_bytes: &[u8],
    claim: &ProofClaim<'_>,
    limits: &CarLimits,
) -> Result<VerifiedRecord, ProofError> {
    check_record_proof(car_bytes, claim, limits, None).record
}

/// What a proof came to, with the repo revision it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The rev of the proof's commit, when its signature verified under the signer's key:
    /// a signed repo state, whatever the record check then found (a deleted record's proof
    /// of absence shows one too).
    pub rev: Option<Tid>,
    /// The proven record, or why not.
    pub record: Result<VerifiedRecord, ProofError>,
}

/// As [`verify_record_proof`], refusing a commit whose rev is older than `floor` (the
/// highest rev already proven for the repo) as [`ProofError::StaleCommit`], before the
/// record is looked at; and saying which rev the commit had.
pub fn check_record_proof(
    car_bytes: &[u8],
    claim: &ProofClaim<'_>,
    limits: &CarLimits,
    floor: Option<&Tid>,
) -> Checked {
    let mut rev = None;
    let record = prove(car_bytes, claim, limits, floor, &mut rev);
    Checked { rev, record }
}

fn prove(
    car_bytes: &[u8],
    claim: &ProofClaim<'_>,
    limits: &CarLimits,
    floor: Option<&Tid>,
    rev: &mut Option<Tid>,
) -> Result<VerifiedRecord, ProofError> {
    let car = Car::read(car_bytes, limits)?;
    let root = *car.root();
    let commit_block = car.block(&root).ok_or_else(|| ProofError::MissingBlock {
        role: BlockRole::Commit,
        cid: root.to_string(),
    })?;
    let did = claim.uri.did();
    let commit = commit::verify(&root, commit_block, did, claim.key)?;
    *rev = Some(commit.rev.clone());
    if let Some(seen) = floor.filter(|seen| commit.rev < **seen) {
        return Err(ProofError::StaleCommit {
            did: did.clone(),
            found: commit.rev,
            seen: seen.clone(),
        });
    }
    let record_cid = mst::find(&car, &commit.data, claim.uri.repo_key().as_bytes())?;
    let record_block = car
        .block(&record_cid)
        .ok_or_else(|| ProofError::MissingBlock {
            role: BlockRole::Record,
            cid: record_cid.to_string(),
        })?;
    let facts = record::verify(
        &record_cid,
        record_block,
        claim.uri.collection(),
        claim.digest,
    )?;
    let (signed_at, signed_at_source) = match facts.created_at {
        Some(t) => (t, SignedAtSource::RecordCreatedAt),
        None => (commit.rev.timestamp(), SignedAtSource::CommitRev),
    };
    Ok(VerifiedRecord {
        did: did.clone(),
        uri: claim.uri.clone(),
        digest: claim.digest.clone(),
        key_type: claim.key.key_type(),
        commit_cid: commit.cid,
        rev: commit.rev,
        record_cid,
        signed_at,
        signed_at_source,
        repository: facts.repository,
    })
}

/// As [`verify_record_proof`], taking the signer's key from their DID document, which must
/// belong to the URI's DID.
pub fn verify_with_document(
    car_bytes: &[u8],
    document: &DidDocument,
    uri: &AtUri,
    digest: &ImageDigest,
    limits: &CarLimits,
) -> Result<VerifiedRecord, ProofError> {
    check_with_document(car_bytes, document, uri, digest, limits, None).record
}

/// As [`check_record_proof`], taking the signer's key from their DID document, which must
/// belong to the URI's DID.
pub fn check_with_document(
    car_bytes: &[u8],
    document: &DidDocument,
    uri: &AtUri,
    digest: &ImageDigest,
    limits: &CarLimits,
    floor: Option<&Tid>,
) -> Checked {
    let key = if document.did() != uri.did() {
        Err(DidDocError::IdMismatch {
            expected: uri.did().clone(),
            found: document.did().to_string(),
        }
        .into())
    } else {
        document.signing_key().map_err(ProofError::from)
    };
    match key {
        Ok(key) => check_record_proof(
            car_bytes,
            &ProofClaim {
                uri,
                key: &key,
                digest,
            },
            limits,
            floor,
        ),
        Err(e) => Checked {
            rev: None,
            record: Err(e),
        },
    }
}

/// Entry points for fuzzing each stage without the signature gate (which a fuzzer cannot
/// pass). Not a stable interface.
#[doc(hidden)]
pub mod internal {
    use super::*;

    /// Reads `car_bytes`, then runs the commit check on the root, the MST walk from the
    /// root (as if it were an MST root) and the record check on every block, ignoring
    /// their outcomes. Must never panic.
    pub fn exercise_stages(car_bytes: &[u8], claim: &ProofClaim<'_>) {
        let Ok(car) = Car::read(car_bytes, &CarLimits::default()) else {
            return;
        };
        let root = *car.root();
        if let Some(block) = car.block(&root) {
            let _ = commit::verify(&root, block, claim.uri.did(), claim.key);
        }
        let _ = mst::find(&car, &root, claim.uri.repo_key().as_bytes());
        for cid in car.cids() {
            if let Some(block) = car.block(cid) {
                let _ = record::verify(cid, block, claim.uri.collection(), claim.digest);
                let _ = mst::find(&car, cid, claim.uri.repo_key().as_bytes());
            }
        }
    }
}
