//! Signed repo commits, version 3 (<https://atproto.com/specs/repository#commit-objects>).

use cid::Cid;
use serde::{Deserialize, Serialize};

use super::{BlockRole, ProofError, decode_block};
use crate::crypto::PublicKey;
use crate::syntax::{Did, Tid};

/// The commit block as stored: `{did, version, data, rev, prev, sig}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedCommit<'a> {
    did: &'a str,
    version: i64,
    data: Cid,
    rev: &'a str,
    prev: Option<Cid>,
    #[serde(with = "serde_bytes")]
    sig: &'a [u8],
}

/// The same commit without `sig`: the bytes the signature covers.
#[derive(Serialize)]
struct UnsignedCommit<'a> {
    did: &'a str,
    version: i64,
    data: &'a Cid,
    rev: &'a str,
    prev: Option<&'a Cid>,
}

/// A commit whose signature by the DID's key was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommit {
    /// The commit's CID.
    pub cid: Cid,
    /// The MST root it commits to.
    pub data: Cid,
    /// The repo revision.
    pub rev: Tid,
}

/// Decodes the commit block `cid`, checks version, DID and signature.
pub(super) fn verify(
    cid: &Cid,
    block: &[u8],
    did: &Did,
    key: &PublicKey,
) -> Result<VerifiedCommit, ProofError> {
    let commit: SignedCommit = decode_block(BlockRole::Commit, cid, block)?;
    if commit.version != 3 {
        return Err(ProofError::CommitVersion {
            found: commit.version,
        });
    }
    if commit.did != did.as_str() {
        return Err(ProofError::CommitDid {
            expected: did.clone(),
            found: commit.did.chars().take(256).collect(),
        });
    }
    let rev: Tid = commit.rev.parse().map_err(|_| ProofError::CommitRev {
        found: commit.rev.chars().take(64).collect(),
    })?;
    let unsigned = UnsignedCommit {
        did: commit.did,
        version: commit.version,
        data: &commit.data,
        rev: commit.rev,
        prev: commit.prev.as_ref(),
    };
    // Encoding plain strings, integers and CIDs into a Vec cannot fail.
    let unsigned = serde_ipld_dagcbor::to_vec(&unsigned).map_err(|_| ProofError::Internal {
        context: "encoding the unsigned commit",
    })?;
    key.verify(&unsigned, commit.sig)
        .map_err(|source| ProofError::Signature { source })?;
    Ok(VerifiedCommit {
        cid: *cid,
        data: commit.data,
        rev,
    })
}
