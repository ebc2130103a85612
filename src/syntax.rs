//! Pure identifier types of ATProto and OCI: parse at the boundary, then pass typed values.
//!
//! Owns: DIDs, NSIDs, record keys, `at://` URIs, TIDs, datetimes, image digests and image
//! references, each checked against its spec (<https://atproto.com/specs/>, the OCI
//! distribution reference grammar) with a length cap. Does no
//! resolution and applies no policy. Every type is built only through `FromStr`, so a value
//! of the type is proof that the string was checked.

mod at_uri;
mod datetime;
mod did;
mod digest;
mod handle;
mod image_ref;
mod nsid;
mod record_key;
pub mod text;
mod tid;

pub use at_uri::AtUri;
pub use datetime::parse_datetime;
pub use did::Did;
pub use digest::ImageDigest;
pub use handle::is_handle;
pub use image_ref::ImageRef;
pub(crate) use image_ref::{canonical_registry, check_registry, split_port};
pub use nsid::Nsid;
pub use record_key::RecordKey;
pub use tid::Tid;

/// An identifier that does not follow its syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct SyntaxError {
    /// Which kind of identifier was expected ("DID", "NSID", …).
    pub what: &'static str,
    /// The offending input, truncated to 128 characters.
    pub input: String,
    /// What rule it breaks.
    pub reason: &'static str,
}

impl SyntaxError {
    pub(crate) fn new(what: &'static str, input: &str, reason: &'static str) -> Self {
        let input = match input.char_indices().nth(128) {
            Some((cut, _)) => format!("{}…", &input[..cut]),
            None => input.to_owned(),
        };
        SyntaxError {
            what,
            input,
            reason,
        }
    }
}

/// Implements `as_str`, `Display`, `AsRef<str>` and string serde for a checked string type.
macro_rules! string_type {
    ($name:ident) => {
        impl $name {
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str($crate::syntax::FromStrVisitor::<$name>::new(stringify!(
                    $name
                )))
            }
        }
    };
}
pub(crate) use string_type;

/// A serde visitor that parses a string with `FromStr` *inside* the visit, so a
/// position-tracking deserializer (the policy YAML) attaches the string's own line and column
/// to a parse error.
pub(crate) struct FromStrVisitor<T> {
    expecting: &'static str,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> FromStrVisitor<T> {
    /// `expecting` names the type in "invalid type" errors.
    pub(crate) fn new(expecting: &'static str) -> Self {
        FromStrVisitor {
            expecting,
            _type: std::marker::PhantomData,
        }
    }
}

impl<T> serde::de::Visitor<'_> for FromStrVisitor<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a string ({})", self.expecting)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod fixture_tests {
    //! The atproto interop syntax fixtures (CC0), run against each parser.
    use super::*;
    use std::str::FromStr;

    fn lines(name: &str) -> Vec<String> {
        let path = format!(
            "{}/tests/fixtures/atproto-interop/syntax/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    fn check<T: FromStr>(kind: &str) {
        let valid = lines(&format!("{kind}_syntax_valid.txt"));
        let invalid = lines(&format!("{kind}_syntax_invalid.txt"));
        assert!(!valid.is_empty() && !invalid.is_empty());
        for v in &valid {
            assert!(T::from_str(v).is_ok(), "{kind}: valid input refused: {v:?}");
        }
        for v in &invalid {
            assert!(
                T::from_str(v).is_err(),
                "{kind}: invalid input accepted: {v:?}"
            );
        }
    }

    #[test]
    fn did_fixtures() {
        check::<Did>("did");
    }

    #[test]
    fn nsid_fixtures() {
        check::<Nsid>("nsid");
    }

    #[test]
    fn record_key_fixtures() {
        check::<RecordKey>("recordkey");
    }

    #[test]
    fn tid_fixtures() {
        check::<Tid>("tid");
    }

    struct Dt;
    impl FromStr for Dt {
        type Err = SyntaxError;
        fn from_str(s: &str) -> Result<Self, SyntaxError> {
            parse_datetime(s).map(|_| Dt)
        }
    }

    #[test]
    fn datetime_fixtures() {
        check::<Dt>("datetime");
    }
}
