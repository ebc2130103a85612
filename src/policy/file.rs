//! The policy file as written: a serde model with `deny_unknown_fields` everywhere.
//!
//! Every field type checks its own value while it is deserialized, so the YAML parser attaches
//! the line, column and field path of the offending value to the error. Checks that span
//! fields live in `compile`.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use super::duration::SignatureAge;
use super::scope::Scope;
use crate::crypto::PublicKey;
use crate::syntax::{Did, FromStrVisitor, Nsid, parse_datetime};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicyFile {
    #[allow(dead_code)] // checked while parsing; only version 1 exists
    pub version: Version,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    #[serde(default, rename = "trustedDIDs")]
    pub trusted_dids: DidWindows,
}

/// `version`: `1`, `1.0` (a YAML float, as in the guide), `"1"` or `"1.0"`.
#[derive(Debug)]
pub(super) struct Version;

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("version 1 (or 1.0)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
                match v {
                    1 => Ok(Version),
                    _ => Err(E::custom(format!(
                        "unsupported version {v}, expected 1 (or 1.0)"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "unsupported version {v}, expected 1 (or 1.0)"
                    ))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Version, E> {
                if v == 1.0 {
                    Ok(Version)
                } else {
                    Err(E::custom(format!(
                        "unsupported version {v}, expected 1 (or 1.0)"
                    )))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                match v {
                    "1" | "1.0" => Ok(Version),
                    _ => Err(E::custom(format!(
                        "unsupported version {v:?}, expected 1 (or 1.0)"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `defaults`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Defaults {
    #[serde(default)]
    pub unmatched: Unmatched,
}

/// What happens to an image that no policy scopes (`defaults.unmatched`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Admit it unchecked; the verdict says `action: none` (the default).
    #[default]
    Allow,
    /// Deny it; the verdict says `action: deny`.
    Deny,
}

/// What a policy does when an image fails it (`action`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Report the failure, never deny.
    Audit,
    /// Deny admission (the default).
    #[default]
    Enforce,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Audit => "audit",
            Action::Enforce => "enforce",
        })
    }
}

impl fmt::Display for Unmatched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unmatched::Allow => "allow",
            Unmatched::Deny => "deny",
        })
    }
}

/// One entry of `policies`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicyEntry {
    pub name: PolicyName,
    pub scope: Scope,
    #[serde(default)]
    pub require: Require,
    #[serde(default, rename = "trustedDIDs")]
    pub trusted_dids: Vec<Did>,
    pub min_signatures: Option<MinSignatures>,
    pub max_signature_age: Option<SignatureAge>,
    #[serde(default)]
    pub action: Action,
    /// Collections whose records count as signatures (default: `io.atcr.manifest`).
    pub signature_collections: Option<Vec<Nsid>>,
    /// Whether a record's `repository` field must name the image's repository (default:
    /// true).
    pub match_repository: Option<bool>,
}

/// A policy name: 1 to 128 characters, no control characters.
#[derive(Debug, Clone)]
pub(super) struct PolicyName(pub String);

impl FromStr for PolicyName {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        if s.trim().is_empty() {
            return Err("policy name is empty");
        }
        if s.chars().count() > 128 {
            return Err("policy name is longer than 128 characters");
        }
        if s.chars().any(char::is_control) {
            return Err("policy name has a control character");
        }
        Ok(PolicyName(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for PolicyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<PolicyName>::new("a policy name"))
    }
}

/// `minSignatures`: a whole number of at least 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct MinSignatures(pub u32);

impl<'de> Deserialize<'de> for MinSignatures {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MinSignatures;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number of at least 1")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<MinSignatures, E> {
                match u32::try_from(n) {
                    Ok(0) => Err(E::custom(
                        "must be at least 1, found 0 (to admit unsigned images use `require: - signature: false`)",
                    )),
                    Ok(n) => Ok(MinSignatures(n)),
                    Err(_) => Err(E::custom(format!(
                        "must be at most the number of trusted DIDs, found {n}"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<MinSignatures, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!("must be at least 1, found {n}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `require`: the guide's list form (`- signature: true`), or a plain mapping
/// (`signature: true`). Absent means a signature is required.
#[derive(Debug, Default)]
pub(super) struct Require {
    pub signature: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequireItem {
    signature: bool,
}

impl<'de> Deserialize<'de> for Require {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Require;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of requirements such as `- signature: true`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Require, A::Error> {
                let mut signature = None;
                while let Some(item) = seq.next_element::<RequireItem>()? {
                    if signature.replace(item.signature).is_some() {
                        return Err(de::Error::custom(
                            "`signature` is required more than once; list it once",
                        ));
                    }
                }
                if signature.is_none() {
                    return Err(de::Error::custom(
                        "require is empty; write `- signature: true` or `- signature: false`",
                    ));
                }
                Ok(Require { signature })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Require, A::Error> {
                let item = RequireItem::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Require {
                    signature: Some(item.signature),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A DID's entry in the top-level `trustedDIDs` map: its validity window (`null` ends are
/// open) and, optionally, the signing keys that count for it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DidWindow {
    pub name: Option<String>,
    pub valid_from: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub keys: Option<Vec<PinnedKey>>,
}

/// A pinned signing key: a `did:key` of a K-256 or P-256 key, kept in its canonical form
/// (compressed point), the form a DID document's key is compared in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PinnedKey(pub String);

impl FromStr for PinnedKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PublicKey::from_did_key(s)
            .map(|k| PinnedKey(k.to_did_key()))
            .map_err(|e| format!("{e} (expected did:key:z… of a K-256 or P-256 public key)"))
    }
}

impl<'de> Deserialize<'de> for PinnedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<PinnedKey>::new("a did:key"))
    }
}

/// An RFC 3339 datetime in the strict ATProto profile.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timestamp(pub OffsetDateTime);

impl FromStr for Timestamp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_datetime(s)
            .map(Timestamp)
            .map_err(|e| format!("{e} (expected e.g. 2025-01-01T00:00:00Z)"))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<Timestamp>::new("an RFC 3339 datetime"))
    }
}

/// The top-level `trustedDIDs` map, in file order, each DID once.
#[derive(Debug, Default)]
pub(super) struct DidWindows(pub Vec<(Did, DidWindow)>);

impl<'de> Deserialize<'de> for DidWindows {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DidWindows;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from DID to {name, validFrom, expiresAt}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DidWindows, A::Error> {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                while let Some(did) = map.next_key_seed(NewDid { seen: &mut seen })? {
                    let window: Option<DidWindow> = map.next_value()?;
                    out.push((did, window.unwrap_or_default()));
                }
                Ok(DidWindows(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Deserializes a map key as a DID not seen before in the same map, so a duplicate is
/// reported at the duplicate key.
struct NewDid<'a> {
    seen: &'a mut BTreeSet<Did>,
}

impl<'de> DeserializeSeed<'de> for NewDid<'_> {
    type Value = Did;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Did, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for NewDid<'_> {
    type Value = Did;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a DID")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Did, E> {
        let did: Did = v.parse().map_err(E::custom)?;
        if !self.seen.insert(did.clone()) {
            return Err(E::custom(format!("{did} is listed twice in trustedDIDs")));
        }
        Ok(did)
    }
}
