//! From the file model to a [`TrustPolicy`]: the checks that span fields, and warnings.
//!
//! Errors (the file is refused): duplicate policy names; a policy that requires a signature
//! but trusts no DID; a DID listed twice in one policy; `minSignatures` above the number of
//! DIDs the policy trusts; `validFrom` not before `expiresAt`. Each is located at the field.
//!
//! Warnings (the file loads; `policy check` prints them): a `did:plc` that is not 24 base32
//! characters (the guide's `did:plc:alice123` is such a placeholder), a top-level DID no policy
//! uses, `minSignatures`/`maxSignatureAge` on a policy that requires no signature, a registry
//! wildcard in a scope, and a policy that follows a catch-all `**` scope.

use std::collections::{BTreeMap, BTreeSet};

use time::{Duration, OffsetDateTime};

use super::duration::SignatureAge;
use super::file::{Action, DidWindow, PolicyFile};
use super::locate::{Step, diagnostic_at};
use super::scope::Scope;
use super::{Diagnostic, TrustPolicy};
use crate::syntax::{Did, ImageRef, Nsid};

/// One compiled policy: which images it scopes and what it requires of them.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    scope: Scope,
    requires_signature: bool,
    trusted: Vec<TrustedDid>,
    min_signatures: u32,
    max_signature_age: Option<SignatureAge>,
    action: Action,
    signature_collections: Vec<Nsid>,
    match_repository: bool,
}

/// The collection whose records count as signatures unless a policy lists others: ATCR's
/// manifest record.
pub const DEFAULT_SIGNATURE_COLLECTION: &str = "io.atcr.manifest";

impl Policy {
    /// The policy's `name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The normalized scope glob.
    pub fn scope(&self) -> &str {
        self.scope.as_str()
    }

    /// Whether the image's normalized name is in this policy's scope.
    pub fn matches(&self, image: &ImageRef) -> bool {
        self.matches_name(&image.name())
    }

    pub(super) fn matches_name(&self, name: &str) -> bool {
        self.scope.matches(name)
    }

    /// `require: - signature: …` (true when absent).
    pub fn requires_signature(&self) -> bool {
        self.requires_signature
    }

    /// The collections whose records count as signatures (`signatureCollections`).
    pub fn signature_collections(&self) -> &[Nsid] {
        &self.signature_collections
    }

    /// Whether a record in `collection` can count as a signature under this policy.
    pub fn accepts_collection(&self, collection: &str) -> bool {
        self.signature_collections
            .iter()
            .any(|c| c.as_str() == collection)
    }

    /// Whether a record's `repository` field must name the image's repository
    /// (`matchRepository`).
    pub fn match_repository(&self) -> bool {
        self.match_repository
    }

    /// The DIDs this policy trusts, in file order, with their validity windows.
    pub fn trusted_dids(&self) -> &[TrustedDid] {
        &self.trusted
    }

    /// The trusted DID entry for `did`, if the policy trusts it.
    pub fn trusted(&self, did: &Did) -> Option<&TrustedDid> {
        self.trusted.iter().find(|t| &t.did == did)
    }

    /// Distinct trusted DIDs that must have signed: `minSignatures` (default 1), or 0 when the
    /// policy requires no signature.
    pub fn min_signatures(&self) -> u32 {
        if self.requires_signature {
            self.min_signatures
        } else {
            0
        }
    }

    /// `maxSignatureAge`, if set.
    pub fn max_signature_age(&self) -> Option<Duration> {
        self.max_signature_age.map(|a| a.duration())
    }

    /// `enforce` (deny when not verified, the default) or `audit` (never deny).
    pub fn action(&self) -> Action {
        self.action
    }
}

/// A DID a policy trusts, with the validity window from the top-level `trustedDIDs` map
/// (open at both ends when the DID is not in the map) and its pinned keys, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedDid {
    did: Did,
    label: Option<String>,
    valid_from: Option<OffsetDateTime>,
    expires_at: Option<OffsetDateTime>,
    keys: Vec<String>,
}

/// Most keys one DID may pin.
pub const MAX_PINNED_KEYS: usize = 16;

impl TrustedDid {
    /// The DID.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The human `name` from the top-level map.
    pub fn label(&self) -> Option<&str> {
        self.label.as_deref()
    }

    /// The first instant the DID is trusted (`validFrom`), if bounded.
    pub fn valid_from(&self) -> Option<OffsetDateTime> {
        self.valid_from
    }

    /// The first instant the DID is no longer trusted (`expiresAt`), if bounded.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.expires_at
    }

    /// The signing keys that count for this DID (`keys`, canonical `did:key` form); empty
    /// when none is pinned (then the DID document's key counts).
    pub fn pinned_keys(&self) -> &[String] {
        &self.keys
    }

    /// Whether a signature proven under `key` (a `did:key`) counts for this DID: always when
    /// no key is pinned, else only for a pinned key.
    pub fn accepts_key(&self, key: &str) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|k| k == key)
    }

    /// Whether `t` is in the window `[validFrom, expiresAt)`: trusted from `validFrom`
    /// inclusive, no longer trusted from `expiresAt` on.
    pub fn holds_at(&self, t: OffsetDateTime) -> bool {
        self.valid_from.is_none_or(|from| t >= from) && self.expires_at.is_none_or(|end| t < end)
    }
}

fn key(k: &str) -> Step {
    Step::Key(k.to_owned())
}

/// Checks across fields and builds the policy; on failure, every error found, in file
/// order.
pub(super) fn compile(file: PolicyFile, text: &str) -> Result<TrustPolicy, Vec<Diagnostic>> {
    let mut warnings = Vec::new();
    let mut warn = |path: Vec<Step>, message: String| {
        warnings.push(diagnostic_at(text, &path, message));
    };
    let mut errors = Vec::new();
    let mut err = |path: Vec<Step>, message: String| {
        errors.push(diagnostic_at(text, &path, message));
    };

    let windows: BTreeMap<&Did, &DidWindow> =
        file.trusted_dids.0.iter().map(|(d, w)| (d, w)).collect();
    let mut warned_plc: BTreeSet<Did> = BTreeSet::new();
    let mut used: BTreeSet<Did> = BTreeSet::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut catch_all: Option<String> = None;
    let mut policies = Vec::with_capacity(file.policies.len());

    for (i, entry) in file.policies.into_iter().enumerate() {
        let at = |field: &str| vec![key("policies"), Step::Index(i), key(field)];
        let name = entry.name.0;
        if let Some(first) = names.insert(name.clone(), i) {
            err(
                at("name"),
                format!(
                    "duplicate policy name {name:?} (also policies[{first}]); names must be unique"
                ),
            );
        }
        let requires_signature = entry.require.signature.unwrap_or(true);
        let mut seen = BTreeSet::new();
        let mut trusted = Vec::with_capacity(entry.trusted_dids.len());
        for (k, did) in entry.trusted_dids.into_iter().enumerate() {
            let path = || {
                vec![
                    key("policies"),
                    Step::Index(i),
                    key("trustedDIDs"),
                    Step::Index(k),
                ]
            };
            if !seen.insert(did.clone()) {
                err(
                    path(),
                    format!("{did} is listed twice in this policy's trustedDIDs"),
                );
                continue;
            }
            if did.method() == "plc" && !did.is_canonical_plc() && warned_plc.insert(did.clone()) {
                warn(path(), plc_warning(&did));
            }
            let window = windows.get(&did);
            used.insert(did.clone());
            trusted.push(TrustedDid {
                label: window.and_then(|w| w.name.clone()),
                valid_from: window.and_then(|w| w.valid_from.map(|t| t.0)),
                expires_at: window.and_then(|w| w.expires_at.map(|t| t.0)),
                keys: window
                    .and_then(|w| w.keys.as_ref())
                    .map(|keys| keys.iter().map(|k| k.0.clone()).collect())
                    .unwrap_or_default(),
                did,
            });
        }
        if requires_signature && trusted.is_empty() {
            // Located at the key, or at the policy when the key is absent.
            err(
                at("trustedDIDs"),
                "a policy that requires a signature needs at least one DID in trustedDIDs (to \
                 admit unsigned images write `require: - signature: false`)"
                    .to_owned(),
            );
        }
        let count = u32::try_from(trusted.len()).unwrap_or(u32::MAX);
        if let Some(min) = entry.min_signatures {
            if requires_signature && !trusted.is_empty() && min.0 > count {
                err(
                    at("minSignatures"),
                    format!(
                        "minSignatures is {} but the policy trusts only {count} DID{}, so it could never be met",
                        min.0,
                        plural(count)
                    ),
                );
            }
            if !requires_signature {
                warn(
                    at("minSignatures"),
                    "has no effect: this policy does not require a signature".to_owned(),
                );
            }
        }
        if entry.max_signature_age.is_some() && !requires_signature {
            warn(
                at("maxSignatureAge"),
                "has no effect: this policy does not require a signature".to_owned(),
            );
        }
        for w in entry.scope.warnings() {
            warn(at("scope"), w.clone());
        }
        if let Some(first) = &catch_all {
            warn(
                at("scope"),
                format!("never used: policy {first:?} before it scopes every image (**)"),
            );
        } else if entry.scope.as_str() == "**" {
            catch_all = Some(name.clone());
        }
        let signature_collections = match entry.signature_collections {
            Some(list) if list.is_empty() => {
                err(
                    at("signatureCollections"),
                    format!(
                        "signatureCollections is empty, so no record could count; list at least \
                         one collection (the default is {DEFAULT_SIGNATURE_COLLECTION})"
                    ),
                );
                Vec::new()
            }
            Some(list) => list,
            None => DEFAULT_SIGNATURE_COLLECTION
                .parse()
                .map(|c| vec![c])
                .unwrap_or_default(),
        };
        policies.push(Policy {
            name,
            scope: entry.scope,
            requires_signature,
            trusted,
            min_signatures: entry.min_signatures.map_or(1, |m| m.0),
            max_signature_age: entry.max_signature_age,
            action: entry.action,
            signature_collections,
            match_repository: entry.match_repository.unwrap_or(true),
        });
    }

    for (did, window) in &file.trusted_dids.0 {
        let path = |field: Option<&str>| {
            let mut p = vec![key("trustedDIDs"), key(did.as_str())];
            p.extend(field.map(key));
            p
        };
        if let (Some(from), Some(end)) = (window.valid_from, window.expires_at)
            && from.0 >= end.0
        {
            err(
                path(Some("validFrom")),
                format!(
                    "validFrom {} is not before expiresAt {}; the DID would never be trusted",
                    rfc3339(from.0),
                    rfc3339(end.0)
                ),
            );
        }
        if let Some(keys) = &window.keys {
            if keys.is_empty() {
                err(
                    path(Some("keys")),
                    format!(
                        "keys is empty, so no signature by {did} could count; list its did:key \
                         signing keys, or remove keys to accept the key its DID document names"
                    ),
                );
            } else if keys.len() > MAX_PINNED_KEYS {
                err(
                    path(Some("keys")),
                    format!(
                        "{} keys pinned for {did}, at most {MAX_PINNED_KEYS} are allowed",
                        keys.len()
                    ),
                );
            }
            let mut seen = BTreeSet::new();
            for (k, key) in keys.iter().enumerate() {
                if !seen.insert(&key.0) {
                    let mut at = path(Some("keys"));
                    at.push(Step::Index(k));
                    err(at, format!("{} is listed twice in {did}'s keys", key.0));
                }
            }
        }
        if did.method() == "plc" && !did.is_canonical_plc() && warned_plc.insert(did.clone()) {
            warn(path(None), plc_warning(did));
        }
        if !used.contains(did) {
            warn(
                path(None),
                format!("{did} is not in any policy's trustedDIDs, so its window has no effect"),
            );
        }
    }

    if policies.is_empty() {
        warn(
            vec![key("policies")],
            format!(
                "no policies: every image gets defaults.unmatched ({})",
                file.defaults.unmatched
            ),
        );
    }

    if !errors.is_empty() {
        errors.sort_by_key(|d| d.location.map(|l| (l.line, l.column)));
        return Err(errors);
    }
    Ok(TrustPolicy {
        policies,
        unmatched: file.defaults.unmatched,
        warnings,
    })
}

fn plc_warning(did: &Did) -> String {
    format!(
        "{did} is not a canonical did:plc (24 characters of base32 a-z2-7); a placeholder? It \
         loads, but no real identity has this DID"
    )
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// RFC 3339 text of a UTC instant, for messages.
pub(super) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::parse_datetime;

    fn t(s: &str) -> OffsetDateTime {
        parse_datetime(s).unwrap()
    }

    #[test]
    fn windows_are_half_open() {
        let w = TrustedDid {
            did: "did:plc:x".parse().unwrap(),
            label: None,
            valid_from: Some(t("2024-01-01T00:00:00Z")),
            expires_at: Some(t("2025-01-01T00:00:00Z")),
            keys: Vec::new(),
        };
        for (at, holds) in [
            ("2023-12-31T23:59:59.999999999Z", false),
            ("2024-01-01T00:00:00Z", true),
            ("2024-12-31T23:59:59.999999999Z", true),
            ("2025-01-01T00:00:00Z", false),
        ] {
            assert_eq!(w.holds_at(t(at)), holds, "{at}");
        }
        let open = TrustedDid {
            valid_from: None,
            expires_at: None,
            ..w
        };
        assert!(open.holds_at(t("0001-01-01T00:00:00Z")));
        assert!(open.holds_at(t("9999-12-31T23:59:59Z")));
    }

    #[test]
    fn min_signatures_is_zero_without_a_signature_requirement() {
        let policy = TrustPolicy::from_yaml(
            "version: 1\npolicies:\n  - name: a\n    scope: atcr.io/*\n    require: [{signature: false}]\n",
        )
        .unwrap();
        let [p] = policy.policies() else {
            panic!("one policy")
        };
        assert_eq!((p.requires_signature(), p.min_signatures()), (false, 0));
        assert_eq!(p.action(), Action::Enforce);
    }
}
