//! Evaluation: an image, the signatures found for its digest, and the time → a [`Verdict`].
//!
//! A signature counts when, in this order: its proof verified; its DID is in the matched
//! policy's `trustedDIDs`; it has a signing time that is not in the future (more than
//! [`CLOCK_SKEW`] ahead of `now`); the DID's window `[validFrom, expiresAt)` holds at the
//! signing time and at `now`; it is no older than `maxSignatureAge`; and no earlier signature
//! from the same DID already counted. The image is verified when the counted signatures reach
//! `minSignatures`, or when the policy requires no signature.
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
use crate::syntax::{Did, ImageRef};

/// How far ahead of `now` a signing time may be before it counts as post-dated.
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// One signature artifact found for the image's digest, after its proof was checked.
///
/// Built by the verify layer from a proof result: for a proof that verified, `did` is the
/// signer, `signed_at` the time from signed data and `proof` is `Ok(())`; for one that failed,
/// `proof` is `Err(reason)`, and `did`/`signed_at` are whatever could be read (the DID may be
/// `None` when the artifact's DID did not parse). `uri` is the record's `at://` URI, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The signer's DID, as proven (or as claimed, for a failed proof).
    pub did: Option<Did>,
    /// The signature record's `at://` URI.
    pub uri: Option<String>,
    /// When it was signed, from signed data.
    pub signed_at: Option<OffsetDateTime>,
    /// `Ok(())` when the proof verified; otherwise why not, one line.
    pub proof: Result<(), String>,
}

impl Evidence {
    /// A signature whose proof verified.
    pub fn verified(did: Did, uri: impl Into<String>, signed_at: OffsetDateTime) -> Evidence {
        Evidence {
            did: Some(did),
            uri: Some(uri.into()),
            signed_at: Some(signed_at),
            proof: Ok(()),
        }
    }

    /// A signature whose proof failed.
    pub fn failed(did: Option<Did>, uri: Option<String>, reason: impl Into<String>) -> Evidence {
        Evidence {
            did,
            uri,
            signed_at: None,
            proof: Err(reason.into()),
        }
    }
}

/// The outcome for one image: what a Rego author or a CLI user needs to decide and explain.
///
/// JSON (camelCase): `image`, `verified`, `deny`, `policy`, `action`, `did`, `signedAt`,
/// `requiredSignatures`, `countedSignatures`, `signatures`, `reason`.
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
    /// Every signature found, in input order, with whether and why it counted.
    pub signatures: Vec<SignatureVerdict>,
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
    /// `outside validity window`: the DID was not trusted at the signing time or is not now.
    OutsideWindow,
    /// `proof failed: …`: the proof did not verify.
    ProofFailed(String),
    /// `signed in the future`: the signing time is more than [`CLOCK_SKEW`] after now.
    SignedInFuture,
    /// `too old`: older than the policy's `maxSignatureAge`.
    TooOld,
    /// `untrusted DID`: the DID is not in the policy's `trustedDIDs`.
    UntrustedDid,
}

impl fmt::Display for NotCounted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotCounted::Duplicate => f.write_str("duplicate"),
            NotCounted::NoPolicy => f.write_str("no matching policy"),
            NotCounted::NoSigningTime => f.write_str("no signing time"),
            NotCounted::OutsideWindow => f.write_str("outside validity window"),
            NotCounted::ProofFailed(why) => write!(f, "proof failed: {}", one_line(why)),
            NotCounted::SignedInFuture => f.write_str("signed in the future"),
            NotCounted::TooOld => f.write_str("too old"),
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
                    Err(why) => NotCounted::ProofFailed(why.clone()),
                    Ok(()) => NotCounted::NoPolicy,
                };
                not_counted(e, reason, None)
            })
            .collect();
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
        match judge(policy, e, now, &counted_dids, &mut changes_at) {
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
            let parts: Vec<String> = signatures
                .iter()
                .filter_map(|s| {
                    let reason = s.reason.as_ref()?;
                    let who = s
                        .did
                        .as_ref()
                        .map(ToString::to_string)
                        .or_else(|| s.uri.clone())
                        .unwrap_or_else(|| "unknown signer".to_owned());
                    Some(format!("{who}: {reason}"))
                })
                .collect();
            why.push_str(&parts.join("; "));
        }
        if policy.action() == Action::Audit {
            why.push_str(" (action audit: reported, not denied)");
        }
        one_line(&why)
    });
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
        reason,
        changes_at,
    }
}

/// Lowers `changes_at` to `t`.
fn change_at(changes_at: &mut Option<OffsetDateTime>, t: OffsetDateTime) {
    *changes_at = Some(changes_at.map_or(t, |c| c.min(t)));
}

/// Whether one signature counts: its DID and signing time, or why not. Lowers `changes_at`
/// to the first instant after `now` at which the answer (or its text) would differ.
fn judge<'e>(
    policy: &Policy,
    e: &'e Evidence,
    now: OffsetDateTime,
    counted: &BTreeSet<&Did>,
    changes_at: &mut Option<OffsetDateTime>,
) -> Result<(&'e Did, OffsetDateTime), (NotCounted, Option<String>)> {
    if let Err(why) = &e.proof {
        return Err((NotCounted::ProofFailed(why.clone()), None));
    }
    let Some(did) = &e.did else {
        return Err((
            NotCounted::ProofFailed("the evidence names no signer DID".to_owned()),
            None,
        ));
    };
    let Some(trusted) = policy.trusted(did) else {
        return Err((NotCounted::UntrustedDid, None));
    };
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

/// `from X until Y` (either end may be open).
pub(super) fn window_text(from: Option<OffsetDateTime>, end: Option<OffsetDateTime>) -> String {
    match (from, end) {
        (None, None) => "always".to_owned(),
        (Some(f), None) => format!("from {} (no expiry)", rfc3339(f)),
        (None, Some(e)) => format!("until {} (exclusive)", rfc3339(e)),
        (Some(f), Some(e)) => format!("from {} until {} (exclusive)", rfc3339(f), rfc3339(e)),
    }
}
