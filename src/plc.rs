//! `did:plc` identities proven from their signed operation log
//! (<https://web.plc.directory/spec/v0.1/did-plc>), so that a PLC directory is only a
//! mirror and never a root of trust.
//!
//! Owns: checking an audit log (`GET <plc>/<did>/log/audit`) the way the directory itself
//! checks each operation it accepts (`@did-plc/lib` `assureValidNextOp`): the DID is the
//! hash of the signed genesis operation; every later operation names the CID of the one
//! before it and is signed by one of that operation's rotation keys; a fork (an operation
//! whose `prev` is not the latest one) must be signed by a rotation key of higher priority
//! than the operation it displaces and come within 72 hours of it, and exactly the
//! operations it displaces are the ones the log marks `nullified`. Legacy `create` genesis
//! operations and `plc_tombstone` are understood. Then: comparing a served DID document
//! with the state the log proves. Does no I/O.
//!
//! A directory can still withhold the newest operations (show an older state) or refuse to
//! answer; it can no longer invent a key, a PDS or a handle.
//!
//! Written here rather than taken from a crate. `atproto-plc` 0.2.0 (the Rust crate that
//! checks operation chains) was evaluated, as a dependency and as a test oracle, and is
//! neither: it refuses legacy `create` genesis operations, does not check the genesis hash,
//! the log's order or its `nullified` flags, and it computes a genesis operation's CID
//! without its `prev: null`, so on any log of two or more operations its chain walk stops
//! at the genesis and reports the *first* signing key (seen 2026-11-29 on a log the real
//! `@did-plc/server` accepted; the tests use that server as the oracle instead). It would
//! also add `chrono`, `rand`, `anyhow` and a second `serde_ipld_dagcbor`. The rules are
//! short and reuse [`crate::crypto`].

use std::collections::{BTreeMap, HashSet};

use crate::proof::car::DAG_CBOR;
use base64::Engine;
use ipld_core::ipld::Ipld;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::crypto::PublicKey;
use crate::did_document::DidDocument;
use crate::syntax::Did;
use crate::syntax::text::outside;

/// Largest audit log accepted, in bytes.
pub const MAX_LOG_BYTES: usize = 4 * 1024 * 1024;
/// Most operations (nullified ones included) accepted in one log.
pub const MAX_OPERATIONS: usize = 1000;
/// Largest operation accepted, in DAG-CBOR bytes (the directory refuses over 4,000).
const MAX_OPERATION_BYTES: usize = 8 * 1024;
/// Most rotation keys an operation may list (the directory allows 10).
const MAX_ROTATION_KEYS: usize = 10;
/// How long after an operation a higher-priority rotation key may still displace it.
const RECOVERY_WINDOW: Duration = Duration::hours(72);

/// Why an operation log does not prove the identity it was fetched for. Every variant is
/// a refusal: the directory served something the signer's keys did not sign, or hid the
/// evidence that they did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlcLogError {
    /// Larger than [`MAX_LOG_BYTES`].
    #[error("operation log is {found} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// The cap.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// More than [`MAX_OPERATIONS`] entries.
    #[error("operation log has {found} operations, over the limit of {limit}")]
    TooManyOperations {
        /// The cap.
        limit: usize,
        /// The count found.
        found: usize,
    },
    /// Not a JSON array of audit entries.
    #[error("operation log is not a JSON array of audit entries: {reason}")]
    Json {
        /// The parser's message.
        reason: String,
    },
    /// No operations at all.
    #[error("operation log is empty")]
    Empty,
    /// An entry is for another DID.
    #[error("operation {index} is for {found:?}, not this DID")]
    OtherDid {
        /// Position in the log.
        index: usize,
        /// The entry's DID.
        found: String,
    },
    /// An operation is not of a known shape or breaks a size rule.
    #[error("operation {index} is malformed: {reason}")]
    Malformed {
        /// Position in the log.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The entry's `cid` is not the CID of its operation.
    #[error("operation {index} is served with CID {served} but hashes to {computed}")]
    CidMismatch {
        /// Position in the log.
        index: usize,
        /// The CID the log states.
        served: String,
        /// The CID of the operation's DAG-CBOR.
        computed: String,
    },
    /// The same operation twice.
    #[error("operation {index} ({cid}) appears twice in the log")]
    Duplicate {
        /// Position of the second copy.
        index: usize,
        /// Its CID.
        cid: String,
    },
    /// The first operation is not a genesis operation (a `plc_operation` or legacy
    /// `create` with `prev: null`), or a later one claims to be.
    #[error("operation {index} {reason}")]
    Genesis {
        /// Position in the log.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The genesis operation does not hash to the DID.
    #[error("the genesis operation hashes to {computed}, not to this DID")]
    GenesisHash {
        /// The DID the genesis operation derives.
        computed: String,
    },
    /// `prev` names no operation still in the chain (one was removed or reordered).
    #[error(
        "operation {index} follows {prev}, which is not an earlier operation of the chain (an operation was removed or reordered)"
    )]
    UnknownPrev {
        /// Position in the log.
        index: usize,
        /// The CID it names.
        prev: String,
    },
    /// An operation follows a tombstone.
    #[error("operation {index} follows a tombstone")]
    AfterTombstone {
        /// Position in the log.
        index: usize,
    },
    /// Not signed by any rotation key of the operation it follows.
    #[error(
        "operation {index} is not signed by any of the {keys} rotation key(s) of the operation it follows ({reason})"
    )]
    NotSignedByRotationKey {
        /// Position in the log.
        index: usize,
        /// How many keys were tried.
        keys: usize,
        /// Why the signature itself is unusable, or "no key matches".
        reason: String,
    },
    /// A fork not signed by a key of higher priority than the operation it displaces.
    #[error(
        "operation {index} displaces a later operation but is not signed by a rotation key of higher priority than that operation's"
    )]
    WeakFork {
        /// Position in the log.
        index: usize,
    },
    /// A fork later than the 72-hour recovery window, or older than the chain's head.
    #[error("operation {index} displaces operations {reason}")]
    BadForkTime {
        /// Position in the log.
        index: usize,
        /// What is wrong with its time.
        reason: &'static str,
    },
    /// The log's `nullified` flags disagree with the chain its operations prove.
    #[error(
        "operation {index} is marked nullified={served}, but the chain its operations prove says nullified={proven}"
    )]
    NullifiedMismatch {
        /// Position in the log.
        index: usize,
        /// The flag served.
        served: bool,
        /// The flag the replay gives.
        proven: bool,
    },
    /// The served DID document disagrees with the log's latest operation.
    #[error(
        "the directory's DID document disagrees with the signed operation log on {field}: the log says {log}, the document says {document}"
    )]
    DocumentMismatch {
        /// Which part: `#atproto key`, `PDS` or `alsoKnownAs`.
        field: &'static str,
        /// What the log proves.
        log: String,
        /// What the document states.
        document: String,
    },
}

/// What a verified operation log proves about a DID now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlcIdentity {
    /// The latest operation is a `plc_operation` (or legacy `create`).
    Active(PlcState),
    /// The latest operation is a `plc_tombstone`: the DID is deactivated.
    Tombstoned,
}

/// The identity data of a `plc_operation`, legacy `create` operations normalized the way
/// the directory does (`@did-plc/lib` `normalizeOp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlcState {
    /// Rotation keys (`did:key:…`), highest priority first.
    pub rotation_keys: Vec<String>,
    /// `verificationMethods.atproto`: the repo signing key, when present.
    pub atproto_key: Option<String>,
    /// `alsoKnownAs`, in order.
    pub also_known_as: Vec<String>,
    /// `services.atproto_pds.endpoint` when its type is `AtprotoPersonalDataServer`.
    pub pds: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    did: String,
    operation: Ipld,
    cid: String,
    nullified: bool,
    created_at: String,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Operation {
    #[serde(rename = "plc_operation", rename_all = "camelCase")]
    Plc {
        rotation_keys: Vec<String>,
        verification_methods: BTreeMap<String, String>,
        also_known_as: Vec<String>,
        services: BTreeMap<String, Service>,
        prev: Option<String>,
    },
    #[serde(rename = "plc_tombstone")]
    Tombstone { prev: String },
    #[serde(rename = "create", rename_all = "camelCase")]
    Create {
        signing_key: String,
        recovery_key: String,
        handle: String,
        service: String,
        prev: Option<String>,
    },
}

#[derive(Deserialize)]
struct Service {
    #[serde(rename = "type")]
    service_type: String,
    endpoint: String,
}

/// An operation the replay has accepted into the chain.
struct Accepted {
    cid: String,
    created: OffsetDateTime,
    /// `None` for a tombstone.
    state: Option<PlcState>,
    /// Its rotation keys, parsed.
    keys: Vec<PublicKey>,
    /// Which rotation key of the operation before it signed it (0 for genesis).
    signer: usize,
}

/// Checks the audit log of `did` and returns what its latest valid operation says.
pub fn audit(did: &Did, bytes: &[u8]) -> Result<PlcIdentity, PlcLogError> {
    if bytes.len() > MAX_LOG_BYTES {
        return Err(PlcLogError::TooLarge {
            limit: MAX_LOG_BYTES,
            found: bytes.len(),
        });
    }
    let entries: Vec<Entry> = serde_json::from_slice(bytes).map_err(|e| PlcLogError::Json {
        reason: outside(&e.to_string()),
    })?;
    if entries.len() > MAX_OPERATIONS {
        return Err(PlcLogError::TooManyOperations {
            limit: MAX_OPERATIONS,
            found: entries.len(),
        });
    }
    let mut chain: Vec<Accepted> = Vec::new();
    let mut displaced: HashSet<String> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (index, entry) in entries.iter().enumerate() {
        if entry.did != did.as_str() {
            return Err(PlcLogError::OtherDid {
                index,
                found: outside(&entry.did),
            });
        }
        let accepted = accept(did, index, entry, &seen, &mut chain, &mut displaced)?;
        seen.insert(accepted.cid.clone());
        chain.push(accepted);
    }
    for (index, entry) in entries.iter().enumerate() {
        let proven = displaced.contains(&entry.cid);
        if entry.nullified != proven {
            return Err(PlcLogError::NullifiedMismatch {
                index,
                served: entry.nullified,
                proven,
            });
        }
    }
    match chain.pop() {
        None => Err(PlcLogError::Empty),
        Some(Accepted {
            state: Some(state), ..
        }) => Ok(PlcIdentity::Active(state)),
        Some(Accepted { state: None, .. }) => Ok(PlcIdentity::Tombstoned),
    }
}

/// Checks one entry against the chain so far (`seen`: the CIDs of the entries before it);
/// on a fork, moves the operations it displaces from `chain` to `displaced`.
fn accept(
    did: &Did,
    index: usize,
    entry: &Entry,
    seen: &HashSet<String>,
    chain: &mut Vec<Accepted>,
    displaced: &mut HashSet<String>,
) -> Result<Accepted, PlcLogError> {
    let malformed = |reason: String| PlcLogError::Malformed { index, reason };
    let Ipld::Map(signed) = &entry.operation else {
        return Err(malformed("not a JSON object".into()));
    };
    let signed_bytes = dag_cbor(&entry.operation).map_err(malformed)?;
    if signed_bytes.len() > MAX_OPERATION_BYTES {
        return Err(malformed(format!(
            "{} bytes of DAG-CBOR, over the {MAX_OPERATION_BYTES}-byte limit",
            signed_bytes.len()
        )));
    }
    let cid = crate::proof::car::cid_of(DAG_CBOR, &signed_bytes).to_string();
    if cid != entry.cid {
        return Err(PlcLogError::CidMismatch {
            index,
            served: outside(&entry.cid),
            computed: cid,
        });
    }
    // Before the chain rules: a repeated operation names an earlier `prev` with the same
    // signer, so they would call it a weak fork (or a second genesis), not what it is.
    if seen.contains(&cid) {
        return Err(PlcLogError::Duplicate { index, cid });
    }
    let operation: Operation = ipld_core::serde::from_ipld(entry.operation.clone())
        .map_err(|e| malformed(outside(&e.to_string())))?;
    let sig = match signed.get("sig") {
        Some(Ipld::String(sig)) => sig.as_str(),
        _ => return Err(malformed("no `sig` string".into())),
    };
    let mut unsigned = signed.clone();
    unsigned.remove("sig");
    let unsigned_bytes = dag_cbor(&Ipld::Map(unsigned)).map_err(malformed)?;
    let created = crate::syntax::parse_datetime(&entry.created_at)
        .map_err(|e| malformed(format!("createdAt: {e}")))?;
    // A tombstone's `prev` is required by its type, so an operation without one (a genesis)
    // always has a state.
    let (prev, state) = normalize(index, operation)?;
    let keys = match &state {
        Some(state) => parse_keys(index, &state.rotation_keys)?,
        None => Vec::new(),
    };
    // The directory refuses an operation with a key it cannot parse (`assureValidOp`);
    // of the verification methods, this verifier uses only `atproto`.
    if let Some(key) = state.as_ref().and_then(|s| s.atproto_key.as_deref()) {
        PublicKey::from_did_key(key).map_err(|e| PlcLogError::Malformed {
            index,
            reason: format!("verificationMethods.atproto: {e}"),
        })?;
    }
    let accepted = |signer| Accepted {
        cid: cid.clone(),
        created,
        state: state.clone(),
        keys: keys.clone(),
        signer,
    };

    let Some(prev) = prev else {
        if index != 0 {
            return Err(PlcLogError::Genesis {
                index,
                reason: "has `prev: null` but is not the first operation",
            });
        }
        let signer = signed_by(index, &keys, &unsigned_bytes, sig)?;
        let computed = did_for_genesis(&signed_bytes);
        if computed != did.as_str() {
            return Err(PlcLogError::GenesisHash { computed });
        }
        return Ok(accepted(signer));
    };
    if index == 0 {
        return Err(PlcLogError::Genesis {
            index,
            reason: "is first in the log but names a `prev` (not a genesis operation)",
        });
    }
    let position =
        chain
            .iter()
            .position(|a| a.cid == prev)
            .ok_or_else(|| PlcLogError::UnknownPrev {
                index,
                prev: outside(&prev),
            })?;
    let (before, after) = chain.split_at(position + 1);
    let Some(parent) = before.last() else {
        return Err(PlcLogError::UnknownPrev { index, prev });
    };
    if parent.state.is_none() {
        return Err(PlcLogError::AfterTombstone { index });
    }
    let Some(first_displaced) = after.first() else {
        let signer = signed_by(index, &parent.keys, &unsigned_bytes, sig)?;
        return Ok(accepted(signer));
    };
    // A fork: only a key listed before the displaced operation's signer may sign it.
    let stronger = parent
        .keys
        .get(..first_displaced.signer)
        .unwrap_or_default();
    let signer = signed_by(index, stronger, &unsigned_bytes, sig).map_err(|e| match e {
        PlcLogError::NotSignedByRotationKey { .. } => PlcLogError::WeakFork { index },
        other => other,
    })?;
    if chain.last().is_some_and(|head| created <= head.created) {
        return Err(PlcLogError::BadForkTime {
            index,
            reason: "but is not newer than the chain's latest operation",
        });
    }
    if created - first_displaced.created > RECOVERY_WINDOW {
        return Err(PlcLogError::BadForkTime {
            index,
            reason: "more than 72 hours after the first of them (the recovery window)",
        });
    }
    displaced.extend(chain.drain(position + 1..).map(|gone| gone.cid));
    Ok(accepted(signer))
}

/// The operation's `prev` and its identity data (`None` for a tombstone).
fn normalize(
    index: usize,
    operation: Operation,
) -> Result<(Option<String>, Option<PlcState>), PlcLogError> {
    let malformed = |reason: String| PlcLogError::Malformed { index, reason };
    Ok(match operation {
        Operation::Plc {
            rotation_keys,
            mut verification_methods,
            also_known_as,
            mut services,
            prev,
        } => {
            let pds = services
                .remove("atproto_pds")
                .filter(|s| s.service_type == "AtprotoPersonalDataServer")
                .map(|s| s.endpoint);
            let state = PlcState {
                rotation_keys,
                atproto_key: verification_methods.remove("atproto"),
                also_known_as,
                pds,
            };
            (prev, Some(state))
        }
        Operation::Tombstone { prev } => (Some(prev), None),
        Operation::Create {
            signing_key,
            recovery_key,
            handle,
            service,
            prev,
        } => {
            if prev.is_some() {
                return Err(malformed(
                    "a legacy `create` operation with a `prev`".into(),
                ));
            }
            let handle = handle
                .replacen("http://", "", 1)
                .replacen("https://", "", 1);
            let handle = if handle.starts_with("at://") {
                handle
            } else {
                format!("at://{handle}")
            };
            let service = if service.starts_with("http://") || service.starts_with("https://") {
                service
            } else {
                format!("https://{service}")
            };
            let state = PlcState {
                rotation_keys: vec![recovery_key, signing_key.clone()],
                atproto_key: Some(signing_key),
                also_known_as: vec![handle],
                pds: Some(service),
            };
            (None, Some(state))
        }
    })
}

fn parse_keys(index: usize, keys: &[String]) -> Result<Vec<PublicKey>, PlcLogError> {
    if keys.is_empty() || keys.len() > MAX_ROTATION_KEYS {
        return Err(PlcLogError::Malformed {
            index,
            reason: format!(
                "{} rotation keys (1 to {MAX_ROTATION_KEYS} are allowed)",
                keys.len()
            ),
        });
    }
    keys.iter()
        .map(|key| {
            PublicKey::from_did_key(key).map_err(|e| PlcLogError::Malformed {
                index,
                reason: format!("rotation key: {e}"),
            })
        })
        .collect()
}

/// The position in `keys` of the key that signed `unsigned` with `sig` (base64url, no
/// padding, 64-byte compact low-S).
fn signed_by(
    index: usize,
    keys: &[PublicKey],
    unsigned: &[u8],
    sig: &str,
) -> Result<usize, PlcLogError> {
    let refuse = |reason: String| PlcLogError::NotSignedByRotationKey {
        index,
        keys: keys.len(),
        reason,
    };
    if sig.ends_with('=') {
        return Err(refuse("the signature is padded base64".into()));
    }
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|e| refuse(format!("the signature is not base64url: {e}")))?;
    let mut last = String::from("no rotation keys");
    for (position, key) in keys.iter().enumerate() {
        match key.verify(unsigned, &sig) {
            Ok(()) => return Ok(position),
            Err(e) => last = e.to_string(),
        }
    }
    Err(refuse(last))
}

fn dag_cbor(value: &Ipld) -> Result<Vec<u8>, String> {
    serde_ipld_dagcbor::to_vec(value).map_err(|e| format!("cannot be encoded as DAG-CBOR: {e}"))
}

/// `did:plc:` + the first 24 characters of the lowercase, unpadded base32 of the SHA-256
/// of the signed genesis operation's DAG-CBOR.
fn did_for_genesis(signed: &[u8]) -> String {
    let encoded = multibase::encode(multibase::Base::Base32Lower, Sha256::digest(signed));
    // Drop the multibase prefix `b`.
    let base32: String = encoded.chars().skip(1).take(24).collect();
    format!("did:plc:{base32}")
}

impl PlcState {
    /// Refuses a served document whose signing key, PDS or `alsoKnownAs` differ from
    /// what this state proves.
    pub fn check_document(&self, document: &DidDocument) -> Result<(), PlcLogError> {
        let mismatch = |field, log: String, document: String| PlcLogError::DocumentMismatch {
            field,
            log: outside(&log),
            document: outside(&document),
        };
        let shown = |s: Option<String>| s.unwrap_or_else(|| "nothing".into());
        let log_key = self
            .atproto_key
            .as_deref()
            .and_then(|k| PublicKey::from_did_key(k).ok());
        let document_key = document.signing_key().ok();
        if log_key != document_key {
            return Err(mismatch(
                "#atproto key",
                shown(self.atproto_key.clone()),
                shown(document_key.map(|k| k.to_did_key())),
            ));
        }
        let document_pds = document.pds_endpoint().ok();
        if self.pds.as_deref() != document_pds {
            return Err(mismatch(
                "PDS",
                shown(self.pds.clone()),
                shown(document_pds.map(str::to_owned)),
            ));
        }
        if self.also_known_as != document.also_known_as() {
            return Err(mismatch(
                "alsoKnownAs",
                format!("{:?}", self.also_known_as),
                format!("{:?}", document.also_known_as()),
            ));
        }
        Ok(())
    }
}
