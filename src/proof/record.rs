//! The signed record: it must be an `io.atcr.manifest`-shaped object naming the image digest.
//!
//! Only `$type`, `digest`, `createdAt` and `repository` (when present) are load-bearing (records written with
//! `validate: false` may lack the lexicon's other fields). The whole record must still be
//! valid ATProto data (<https://atproto.com/specs/data-model>): no floats, integers within
//! 64 bits signed.

use cid::Cid;
use ipld_core::ipld::Ipld;
use time::OffsetDateTime;

use super::{BlockRole, ProofError, decode_block};
use crate::syntax::{ImageDigest, Nsid, parse_datetime};

/// What the record proves once its type and digest matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFacts {
    /// The record's `createdAt`, if it has one.
    pub created_at: Option<OffsetDateTime>,
    /// The record's `repository`, if it has one.
    pub repository: Option<String>,
}

/// Longest `repository` accepted, as in the `io.atcr.manifest` lexicon.
const MAX_REPOSITORY: usize = 255;

/// Decodes the record block and binds it to `collection` and `digest`.
pub(super) fn verify(
    cid: &Cid,
    block: &[u8],
    collection: &Nsid,
    digest: &ImageDigest,
) -> Result<RecordFacts, ProofError> {
    let record: Ipld = decode_block(BlockRole::Record, cid, block)?;
    check_data_model(&record).map_err(|reason| ProofError::Decode {
        role: BlockRole::Record,
        cid: cid.to_string(),
        reason: reason.to_owned(),
    })?;
    let Ipld::Map(fields) = &record else {
        return Err(ProofError::RecordField {
            field: "$type",
            reason: "record is not an object".into(),
        });
    };
    let text = |field: &'static str| match fields.get(field) {
        Some(Ipld::String(s)) => Ok(Some(s.as_str())),
        None => Ok(None),
        Some(_) => Err(ProofError::RecordField {
            field,
            reason: "is not a string".into(),
        }),
    };
    let record_type = text("$type")?.unwrap_or_default();
    if record_type != collection.as_str() {
        return Err(ProofError::RecordType {
            expected: collection.clone(),
            found: record_type.chars().take(317).collect(),
        });
    }
    let found = text("digest")?.ok_or(ProofError::RecordField {
        field: "digest",
        reason: "is missing".into(),
    })?;
    if found != digest.as_str() {
        return Err(ProofError::RecordDigest {
            expected: digest.clone(),
            found: found.chars().take(80).collect(),
        });
    }
    let created_at = text("createdAt")?
        .map(|s| {
            parse_datetime(s).map_err(|e| ProofError::RecordField {
                field: "createdAt",
                reason: e.to_string(),
            })
        })
        .transpose()?;
    let repository = text("repository")?
        .map(|r| {
            if r.chars().count() > MAX_REPOSITORY {
                return Err(ProofError::RecordField {
                    field: "repository",
                    reason: format!("is longer than {MAX_REPOSITORY} characters"),
                });
            }
            if r.chars().any(char::is_control) {
                return Err(ProofError::RecordField {
                    field: "repository",
                    reason: "has a control character".into(),
                });
            }
            Ok(r.to_owned())
        })
        .transpose()?;
    Ok(RecordFacts {
        created_at,
        repository,
    })
}

/// Refuses values ATProto's data model forbids. Depth is bounded by the decoder (256).
fn check_data_model(value: &Ipld) -> Result<(), &'static str> {
    match value {
        Ipld::Float(_) => Err("record contains a float, which ATProto data forbids"),
        Ipld::Integer(i) if i64::try_from(*i).is_err() => {
            Err("record contains an integer outside the signed 64-bit range")
        }
        Ipld::List(items) => items.iter().try_for_each(check_data_model),
        Ipld::Map(map) => map.values().try_for_each(check_data_model),
        _ => Ok(()),
    }
}
