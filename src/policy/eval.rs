//! Evaluation: an image, the signatures found for its digest, and the time → a [`Verdict`].
//!
//! A signature counts when, in this order: its DID is in the matched policy's
//! `trustedDIDs`; its record is in one of the policy's `signatureCollections`; its proof
//! verified; when the DID pins `keys`, under one of them; the record's `repository`, when it has one, names the image's repository (unless
//! the policy sets `matchRepository: false`); it has a signing time that is not in the
//! future (more than [`CLOCK_SKEW`] ahead of `now`); the DID's window `[validFrom,
//! expiresAt)` holds at the signing time and at `now`; it is no older than
//! `maxSignatureAge`; and no earlier signature from the same DID already counted. The image
//! is verified when the counted signatures reach `minSignatures`, or when the policy requires
//! no signature.
//!
//! A verdict is bounded whatever the evidence: each reason and detail is cut to
//! [`MAX_DETAIL_BYTES`], the one-line `reason` to [`MAX_REASON_BYTES`], and the signature
//! list to [`MAX_SIGNATURES_JSON_BYTES`] of JSON (counted signatures always kept, the number
//! left out in `omittedSignatures`).
//!
//! The signing time comes from signed data (the record's `createdAt`, else the commit `rev`),
//! which the signer chooses; the future-time check keeps a post-dated signature from staying
//! "fresh" under `maxSignatureAge` forever.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Serialize, Serializer};
use time::{Duration, OffsetDateTime};

use super::TrustPolicy;
use super::compile::{Policy, rfc3339};
use super::duration::Human;
use super::file::{Action, Unmatched};
use crate::syntax::text::inert;
use crate::syntax::{Did, ImageRef};

/// How far ahead of `now` a signing time may be before it counts as post-dated.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Longest text of one signature's failure reason or detail, in bytes.
pub const MAX_DETAIL_BYTES: usize = 512;
/// Longest verdict `reason`, in bytes.
pub const MAX_REASON_BYTES: usize = 2048;
/// Most JSON the `signatures` list of one verdict takes, in bytes.
pub const MAX_SIGNATURES_JSON_BYTES: usize = 48 * 1024;

/// One signature artifact found for the image's digest, and what its proof came to.
///
/// Built by the verify layer: for a proof that verified, `did` is the signer, `signed_at`
/// the time and `repository` the record's `repository` field, all from signed data; for one
/// that failed or was not attempted, `did` is whatever the artifact claims (`None` when it
/// could not be read). `uri` is the record's `at://` URI, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The signer's DID, as proven (or as claimed, for a proof that failed or was not tried).
    pub did: Option<Did>,
    /// The signature record's `at://` URI.
    pub uri: Option<String>,
    /// When it was signed, from signed data.
    pub signed_at: Option<OffsetDateTime>,
    /// The record's `repository` field, from signed data.
    pub repository: Option<String>,
    /// The signing key (`did:key`) the proof verified under, for a proof that verified.
    pub key: Option<String>,
    /// What the proof came to.
    pub proof: Proof,
}

/// What a signature's proof came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// It was checked and failed: why, one line.
    Failed(String),
    /// It was not attempted: why (an untrusted signer, a record outside the signature
    /// collections, or more signatures than the verifier proves per image).
    NotChecked(String),
    /// It verified.
    Verified,
}

impl Evidence {
    /// A signature whose proof verified.
    pub fn verified(did: Did, uri: impl Into<String>, signed_at: OffsetDateTime) -> Evidence {
        Evidence {
            did: Some(did),
            uri: Some(uri.into()),
            signed_at: Some(signed_at),
            repository: None,
            key: None,
            proof: Proof::Verified,
        }
    }

    /// A signature whose proof failed.
    pub fn failed(did: Option<Did>, uri: Option<String>, reason: impl AsRef<str>) -> Evidence {
        Evidence {
            did,
            uri,
            signed_at: None,
            repository: None,
            key: None,
            proof: Proof::Failed(inert(reason.as_ref(), MAX_DETAIL_BYTES)),
        }
    }

    /// A signature whose proof was not attempted.
    pub fn not_checked(did: Did, uri: String, why: impl AsRef<str>) -> Evidence {
        Evidence {
            did: Some(did),
            uri: Some(uri),
            signed_at: None,
            repository: None,
            key: None,
            proof: Proof::NotChecked(inert(why.as_ref(), MAX_DETAIL_BYTES)),
        }
    }

    /// The same evidence with the signing key (`did:key`) its proof verified under.
    pub fn with_key(mut self, key: String) -> Evidence {
        self.key = Some(key);
        self
    }

    /// The same evidence with the record's `repository` field.
    pub fn with_repository(mut self, repository: Option<String>) -> Evidence {
        self.repository = repository;
        self
    }

    /// The collection of the record URI (`at://<did>/<collection>/<rkey>`), when known.
    fn collection(&self) -> Option<&str> {
        let path = self.uri.as_deref()?.strip_prefix("at://")?;
        let mut parts = path.split('/');
        parts.next()?;
        parts.next()
    }
}

/// The outcome for one image: what a Rego author or a CLI user needs to decide and explain.
///
/// JSON (camelCase): `image`, `verified`, `deny`, `policy`, `action`, `did`, `signedAt`,
/// `requiredSignatures`, `countedSignatures`, `signatures`, `omittedSignatures`, `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Verdict {
    /// The image, normalized.
    pub image: String,
    /// The matched policy's requirements are met (true for an unscoped image when
    /// `defaults.unmatched` is `allow`; false when it is `deny`).
    pub verified: bool,
    /// Admission should be denied: not verified under `enforce`, or unscoped under
    /// `defaults.unmatched: deny`. Never true under `audit`.
    pub deny: bool,
    /// The matched policy's name; `null` when none matched.
    pub policy: Option<String>,
    /// `enforce` / `audit` from the matched policy; `none` or `deny` when none matched.
    pub action: VerdictAction,
    /// The DID of the first signature that counted.
    pub did: Option<Did>,
    /// The signing time of the first signature that counted.
    #[serde(with = "time::serde::rfc3339::option")]
    pub signed_at: Option<OffsetDateTime>,
    /// Distinct trusted DIDs needed (0 when no signature is required).
    pub required_signatures: u32,
    /// Distinct trusted DIDs that counted.
    pub counted_signatures: u32,
    /// The signatures found, in input order, with whether and why each counted: all of
    /// them, unless their JSON would pass [`MAX_SIGNATURES_JSON_BYTES`] (then every counted
    /// one and as many others as fit).
    pub signatures: Vec<SignatureVerdict>,
    /// How many signatures were left out of `signatures` to keep the verdict bounded.
    pub omitted_signatures: u32,
    /// One line saying why, when not verified (and that audit did not deny); `null` otherwise.
    pub reason: Option<String>,
    /// The earliest instant after `now` at which evaluating the same evidence again could
    /// give another verdict (a validity window or `maxSignatureAge` boundary), or `now`
    /// itself when the verdict's text names the current time; `None` when time cannot
    /// change it. Not serialized: it tells callers how long they may reuse the verdict.
    #[serde(skip)]
    pub changes_at: Option<OffsetDateTime>,
}

/// The action a verdict reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictAction {
    /// The policy audits: failures are reported, never denied.
    Audit,
    /// No policy matched and `defaults.unmatched` is `deny`.
    Deny,
    /// The policy enforces: failures are denied.
    Enforce,
    /// No policy matched and `defaults.unmatched` is `allow`.
    None,
}

/// One signature's part in a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct SignatureVerdict {
    /// The signer.
    pub did: Option<Did>,
    /// The signature record's URI.
    pub uri: Option<String>,
    /// When it was signed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub signed_at: Option<OffsetDateTime>,
    /// Whether it counted toward `minSignatures`.
    pub counted: bool,
    /// Why it did not count; `null` when it did.
    pub reason: Option<NotCounted>,
    /// Human detail for `reason` (the window or age involved); `null` when none.
    pub detail: Option<String>,
}

/// Why a signature did not count. Serialized as the text of its `Display`, which is stable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotCounted {
    /// `duplicate`: an earlier signature from the same DID already counted.
    Duplicate,
    /// `no matching policy`: no policy scopes the image.
    NoPolicy,
    /// `no signing time`: the evidence has no signing time to check the window against.
    NoSigningTime,
    /// `not a signature record`: the record is not in the policy's `signatureCollections`.
    NotASignatureRecord,
    /// `not checked: …`: the proof was not attempted (more signatures than are proven per
    /// image).
    NotChecked(String),
    /// `other repository`: the record's `repository` names another repository.
    OtherRepository,
    /// `outside validity window`: the DID was not trusted at the signing time or is not now.
    OutsideWindow,
    /// `proof failed: …`: the proof did not verify.
    ProofFailed(String),
    /// `signed in the future`: the signing time is more than [`CLOCK_SKEW`] after now.
    SignedInFuture,
    /// `too old`: older than the policy's `maxSignatureAge`.
    TooOld,
    /// `unpinned key`: the proof verified under a key that is not among the DID's pinned
    /// `keys`.
    UnpinnedKey,
    /// `untrusted DID`: the DID is not in the policy's `trustedDIDs`.
    UntrustedDid,
}

impl fmt::Display for NotCounted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotCounted::Duplicate => f.write_str("duplicate"),
            NotCounted::NoPolicy => f.write_str("no matching policy"),
            NotCounted::NoSigningTime => f.write_str("no signing time"),
            NotCounted::NotASignatureRecord => f.write_str("not a signature record"),
            NotCounted::NotChecked(why) => write!(f, "not checked: {}", one_line(why)),
            NotCounted::OtherRepository => f.write_str("other repository"),
            NotCounted::OutsideWindow => f.write_str("outside validity window"),
            NotCounted::ProofFailed(why) => write!(f, "proof failed: {}", one_line(why)),
            NotCounted::SignedInFuture => f.write_str("signed in the future"),
            NotCounted::TooOld => f.write_str("too old"),
            NotCounted::UnpinnedKey => f.write_str("unpinned key"),
            NotCounted::UntrustedDid => f.write_str("untrusted DID"),
        }
    }
}

impl Serialize for NotCounted {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl TrustPolicy {
    /// Decides `image` from the signatures found for its digest, at time `now`.
    pub fn evaluate(
        &self,
        image: &ImageRef,
        evidence: &[Evidence],
        now: OffsetDateTime,
    ) -> Verdict {
        match self.matching(image) {
            Some(policy) => evaluate_policy(policy, image, evidence, now),
            None => self.evaluate_unmatched(image, evidence),
        }
    }

    fn evaluate_unmatched(&self, image: &ImageRef, evidence: &[Evidence]) -> Verdict {
        let signatures = evidence
            .iter()
            .map(|e| {
                let reason = match &e.proof {
                    Proof::Failed(why) => NotCounted::ProofFailed(why.clone()),
                    Proof::NotChecked(_) | Proof::Verified => NotCounted::NoPolicy,
                };
                not_counted(e, reason, None)
            })
            .collect();
        let (signatures, omitted_signatures) = bounded(signatures);
        let name = image.name();
        let (verified, action, reason) = match self.unmatched {
            Unmatched::Allow => (true, VerdictAction::None, None),
            Unmatched::Deny => (
                false,
                VerdictAction::Deny,
                Some(format!(
                    "no policy scopes {name} and defaults.unmatched is deny"
                )),
            ),
        };
        Verdict {
            image: image.to_string(),
            verified,
            deny: !verified,
            policy: None,
            action,
            did: None,
            signed_at: None,
            required_signatures: 0,
            counted_signatures: 0,
            signatures,
            omitted_signatures,
            reason,
            changes_at: None,
        }
    }
}

fn not_counted(e: &Evidence, reason: NotCounted, detail: Option<String>) -> SignatureVerdict {
    SignatureVerdict {
        did: e.did.clone(),
        uri: e.uri.clone(),
        signed_at: e.signed_at,
        counted: false,
        reason: Some(reason),
        detail,
    }
}

fn evaluate_policy(
    policy: &Policy,
    image: &ImageRef,
    evidence: &[Evidence],
    now: OffsetDateTime,
) -> Verdict {
    let mut counted_dids: BTreeSet<&Did> = BTreeSet::new();
    let mut first: Option<(&Did, OffsetDateTime)> = None;
    let mut signatures = Vec::with_capacity(evidence.len());
    let mut changes_at = None;
    for e in evidence {
        match judge(policy, image, e, now, &counted_dids, &mut changes_at) {
            Ok((did, signed_at)) => {
                counted_dids.insert(did);
                first.get_or_insert((did, signed_at));
                signatures.push(SignatureVerdict {
                    did: Some(did.clone()),
                    uri: e.uri.clone(),
                    signed_at: Some(signed_at),
                    counted: true,
                    reason: None,
                    detail: None,
                });
            }
            Err((reason, detail)) => signatures.push(not_counted(e, reason, detail)),
        }
    }
    let counted = u32::try_from(counted_dids.len()).unwrap_or(u32::MAX);
    let required = policy.min_signatures();
    let verified = !policy.requires_signature() || counted >= required;
    let (action, deny) = match policy.action() {
        Action::Enforce => (VerdictAction::Enforce, !verified),
        Action::Audit => (VerdictAction::Audit, false),
    };
    let reason = (!verified).then(|| {
        let mut why = format!(
            "policy {:?} requires {required} signature{} from its trusted DIDs, {counted} counted: ",
            policy.name(),
            if required == 1 { "" } else { "s" },
        );
        if signatures.is_empty() {
            why.push_str("no signatures found");
        } else {
            // Each signature's part, until the reason's budget is spent.
            let parts = signatures.iter().filter_map(|s| {
                let reason = s.reason.as_ref()?;
                let who = s
                    .did
                    .as_ref()
                    .map(ToString::to_string)
                    .or_else(|| s.uri.clone())
                    .unwrap_or_else(|| "unknown signer".to_owned());
                Some(format!("{who}: {reason}"))
            });
            let budget = MAX_REASON_BYTES / 2;
            let (mut shown, mut left) = (0, 0);
            for part in parts {
                if why.len() + part.len() > budget && shown > 0 {
                    left += 1;
                    continue;
                }
                if shown > 0 {
                    why.push_str("; ");
                }
                why.push_str(&part);
                shown += 1;
            }
            if left > 0 {
                why.push_str(&format!("; and {left} more"));
            }
        }
        if policy.action() == Action::Audit {
            why.push_str(" (action audit: reported, not denied)");
        }
        inert(&one_line(&why), MAX_REASON_BYTES)
    });
    let (signatures, omitted_signatures) = bounded(signatures);
    Verdict {
        image: image.to_string(),
        verified,
        deny,
        policy: Some(policy.name().to_owned()),
        action,
        did: first.map(|(d, _)| d.clone()),
        signed_at: first.map(|(_, t)| t),
        required_signatures: required,
        counted_signatures: counted,
        signatures,
        omitted_signatures,
        reason,
        changes_at,
    }
}

/// The signatures whose JSON fits [`MAX_SIGNATURES_JSON_BYTES`]: every counted one, then the
/// others in order while they fit; and how many were left out.
fn bounded(signatures: Vec<SignatureVerdict>) -> (Vec<SignatureVerdict>, u32) {
    let size = |s: &SignatureVerdict| serde_json::to_vec(s).map_or(usize::MAX, |v| v.len() + 1);
    let total: usize = signatures.iter().map(size).fold(0, usize::saturating_add);
    if total <= MAX_SIGNATURES_JSON_BYTES {
        return (signatures, 0);
    }
    let mut room = MAX_SIGNATURES_JSON_BYTES.saturating_sub(
        signatures
            .iter()
            .filter(|s| s.counted)
            .map(size)
            .fold(0, usize::saturating_add),
    );
    let before = signatures.len();
    let kept: Vec<SignatureVerdict> = signatures
        .into_iter()
        .filter(|s| {
            if s.counted {
                return true;
            }
            let n = size(s);
            let fits = n <= room;
            if fits {
                room -= n;
            }
            fits
        })
        .collect();
    let omitted = u32::try_from(before - kept.len()).unwrap_or(u32::MAX);
    (kept, omitted)
}

/// Lowers `changes_at` to `t`.
fn change_at(changes_at: &mut Option<OffsetDateTime>, t: OffsetDateTime) {
    *changes_at = Some(changes_at.map_or(t, |c| c.min(t)));
}

/// Whether one signature counts: its DID and signing time, or why not. Lowers `changes_at`
/// to the first instant after `now` at which the answer (or its text) would differ.
fn judge<'e>(
    policy: &Policy,
    image: &ImageRef,
    e: &'e Evidence,
    now: OffsetDateTime,
    counted: &BTreeSet<&Did>,
    changes_at: &mut Option<OffsetDateTime>,
) -> Result<(&'e Did, OffsetDateTime), (NotCounted, Option<String>)> {
    let Some(did) = &e.did else {
        let why = match &e.proof {
            Proof::Failed(why) => why.clone(),
            Proof::NotChecked(_) | Proof::Verified => "the evidence names no signer DID".into(),
        };
        return Err((NotCounted::ProofFailed(why), None));
    };
    let Some(trusted) = policy.trusted(did) else {
        return Err((NotCounted::UntrustedDid, None));
    };
    if let Some(collection) = e.collection()
        && !policy.accepts_collection(collection)
    {
        let accepted: Vec<&str> = policy
            .signature_collections()
            .iter()
            .map(|c| c.as_str())
            .collect();
        return Err((
            NotCounted::NotASignatureRecord,
            Some(inert(
                &format!(
                    "{collection} is not in the policy's signatureCollections ({})",
                    accepted.join(", ")
                ),
                MAX_DETAIL_BYTES,
            )),
        ));
    }
    match &e.proof {
        Proof::Verified => {}
        Proof::Failed(why) => return Err((NotCounted::ProofFailed(why.clone()), None)),
        Proof::NotChecked(why) => return Err((NotCounted::NotChecked(why.clone()), None)),
    }
    if !trusted.pinned_keys().is_empty()
        && !e.key.as_deref().is_some_and(|k| trusted.accepts_key(k))
    {
        return Err((NotCounted::UnpinnedKey, Some(unpinned_detail(e, trusted))));
    }
    if policy.match_repository()
        && let Some(named) = &e.repository
        && !names_repository(image.repository(), named)
    {
        return Err((
            NotCounted::OtherRepository,
            Some(inert(
                &format!(
                    "the record names repository {named:?}, not {} (or a trailing part of it)",
                    image.repository()
                ),
                MAX_DETAIL_BYTES,
            )),
        ));
    }
    let Some(signed_at) = e.signed_at else {
        return Err((NotCounted::NoSigningTime, None));
    };
    if signed_at > now.checked_add(CLOCK_SKEW).unwrap_or(now) {
        change_at(changes_at, now); // the detail names the current time
        return Err((
            NotCounted::SignedInFuture,
            Some(format!(
                "signed at {}, after now ({}) by more than {}",
                rfc3339(signed_at),
                rfc3339(now),
                Human(CLOCK_SKEW)
            )),
        ));
    }
    for (label, t) in [("signing time", signed_at), ("now", now)] {
        if !trusted.holds_at(t) {
            if label == "now" {
                change_at(changes_at, now); // the detail names the current time
            }
            return Err((
                NotCounted::OutsideWindow,
                Some(format!(
                    "{did} is trusted {}; {label} is {}",
                    window_text(trusted.valid_from(), trusted.expires_at()),
                    rfc3339(t)
                )),
            ));
        }
    }
    for edge in [trusted.valid_from(), trusted.expires_at()]
        .into_iter()
        .flatten()
        .filter(|&edge| edge > now)
    {
        change_at(changes_at, edge);
    }
    if let Some(max) = policy.max_signature_age() {
        let age = now - signed_at;
        if age > max {
            change_at(changes_at, now); // the detail names the age
            return Err((
                NotCounted::TooOld,
                Some(format!(
                    "signed {} ago, maxSignatureAge is {}",
                    Human(age),
                    Human(max)
                )),
            ));
        }
        if let Some(too_old) = signed_at.checked_add(max) {
            change_at(changes_at, too_old);
        }
    }
    if counted.contains(did) {
        return Err((NotCounted::Duplicate, None));
    }
    Ok((did, signed_at))
}

/// Names the key a proof verified under and the DID's pinned keys (the first three, then how
/// many more), within [`MAX_DETAIL_BYTES`].
fn unpinned_detail(e: &Evidence, trusted: &super::TrustedDid) -> String {
    let pinned = trusted.pinned_keys();
    let mut list: Vec<&str> = pinned.iter().take(3).map(String::as_str).collect();
    let more = pinned.len().saturating_sub(list.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    if list.is_empty() {
        list.push("none");
    }
    let found = match &e.key {
        Some(key) => format!("signed under {key}"),
        None => "the proof names no signing key".to_owned(),
    };
    inert(
        &format!(
            "{found}; the policy pins {} for {}: {}{more}",
            if pinned.len() == 1 {
                "this key"
            } else {
                "these keys"
            },
            trusted.did(),
            list.join(", ")
        ),
        MAX_DETAIL_BYTES,
    )
}

/// Whether a record's `repository` field names the image's repository path: the whole
/// path, or a trailing part of it on a `/` boundary (ATCR writes `myapp` for
/// `atcr.io/alice/myapp`).
pub(crate) fn names_repository(path: &str, named: &str) -> bool {
    !named.is_empty()
        && (path == named
            || path
                .strip_suffix(named)
                .is_some_and(|head| head.ends_with('/')))
}

/// `from X until Y` (either end may be open).
pub(super) fn window_text(from: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> String {
    match (from, end) {
        (None, None) => "always".to_owned(),
        (Some(f), None) => format!("from {} (no expiry)", rfc3339(f)),
        (None, Some(e)) => format!("until {} (exclusive)", rfc3339(e)),
        (Some(f), Some(e)) => format!("from {} until {} (exclusive)", rfc3339(f), rfc3339(e)),
    }
}
