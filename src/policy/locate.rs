//! Line and column for policy problems.
//!
//! Problems found while deserializing come with their position from `yaml_serde`. Problems
//! found afterwards, across fields, are located by walking the YAML a second time along the
//! field's path and stopping at the node: the parser marks that stop with the node's line,
//! column and path, exactly as it marks its own errors.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::file::PolicyFile;
use super::{Diagnostic, Location};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    Key(String),
    Index(usize),
}

/// Formats a path the way `yaml_serde` does: `policies[0].minSignatures`.
pub(super) fn path_string(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Parses the file's text into the serde model.
pub(super) fn parse(text: &str) -> Result<PolicyFile, Diagnostic> {
    yaml_serde::from_str(text).map_err(|e| from_yaml_error(&e))
}

/// Turns a `yaml_serde` error into a diagnostic, splitting off the field path and location
/// the parser put into its message.
fn from_yaml_error(e: &yaml_serde::Error) -> Diagnostic {
    let location = e.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut message = e.to_string();
    if let Some(l) = &location {
        let suffix = format!(" at line {} column {}", l.line, l.column);
        if let Some(at) = message.find(&suffix) {
            message.replace_range(at..at + suffix.len(), "");
        }
    }
    // yaml_serde writes "<path>: <message>" for errors inside the document; a path has no
    // spaces ("policies[0].scope", "trustedDIDs.did:plc:x.validFrom").
    let field = match message.split_once(": ") {
        Some((path, rest)) if !path.is_empty() && !path.contains(char::is_whitespace) => {
            let field = path.to_owned();
            message = rest.to_owned();
            Some(field)
        }
        _ => None,
    };
    Diagnostic {
        file: None,
        location,
        field,
        message,
    }
}

/// A diagnostic for the node at `path` (or the deepest part of it that exists).
pub(super) fn diagnostic_at(text: &str, path: &[Step], message: String) -> Diagnostic {
    Diagnostic {
        file: None,
        location: locate(text, path),
        field: Some(path_string(path)),
        message,
    }
}

/// The position of the node at `path`, or of the deepest existing node on the way to it.
pub(super) fn locate(text: &str, path: &[Step]) -> Option<Location> {
    let de = yaml_serde::Deserializer::from_str(text);
    let seek = Seek { path };
    match seek.deserialize(de) {
        Ok(()) => None,
        Err(e) => e.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        }),
    }
}

const FOUND: &str = "found";

/// Walks to the node at `path` and fails there, so the parser records its position.
struct Seek<'a> {
    path: &'a [Step],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Step::Key(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        while let Some(key) = map.next_key::<KeyText>()? {
            if key.0.as_deref() == Some(want.as_str()) {
                return map.next_value_seed(Seek { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Step::Index(want), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let mut i = 0;
        loop {
            if i == *want {
                return match seq.next_element_seed(Seek { path: rest })? {
                    Some(()) => Ok(()),
                    None => Err(de::Error::custom(FOUND)),
                };
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(FOUND));
            }
            i += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

/// A mapping key as text, when it is a scalar.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "a: 1\nlist:\n  - x: 1\n    y: [1, 2]\n  - x: 2\n    y:\n      z: hello\n";

    fn at(path: &[Step]) -> Option<(usize, usize)> {
        locate(TEXT, path).map(|l| (l.line, l.column))
    }

    #[test]
    fn finds_nodes_by_path() {
        use Step::{Index, Key};
        assert_eq!(at(&[Key("a".into())]), Some((1, 4)));
        assert_eq!(
            at(&[Key("list".into()), Index(0), Key("x".into())]),
            Some((3, 8))
        );
        assert_eq!(
            at(&[Key("list".into()), Index(0), Key("y".into()), Index(1)]),
            Some((4, 12))
        );
        assert_eq!(
            at(&[
                Key("list".into()),
                Index(1),
                Key("y".into()),
                Key("z".into())
            ]),
            Some((7, 10))
        );
        // A missing leaf is reported at its nearest existing parent.
        assert_eq!(
            at(&[Key("list".into()), Index(1), Key("nope".into())]),
            Some((5, 5))
        );
        assert_eq!(
            path_string(&[Key("list".into()), Index(1), Key("y".into())]),
            "list[1].y"
        );
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn yaml_errors_split_into_location_field_and_message() {
        let d = parse("version: 1\ndefaults:\n  unmatched: maybe\n").unwrap_err();
        assert_eq!(
            d.location,
            Some(Location {
                line: 3,
                column: 14
            })
        );
        assert_eq!(d.field.as_deref(), Some("defaults.unmatched"));
        assert_eq!(
            d.message,
            "unknown variant `maybe`, expected `allow` or `deny`"
        );
        assert_eq!(
            d.to_string(),
            "line 3, column 14: defaults.unmatched: unknown variant `maybe`, expected `allow` or `deny`"
        );
        // A syntax error has no field; its text keeps the parser's context.
        let d =
            parse("version: 1\npolicies:\n  - name: a\n    scope: a.io/*\n   trustedDIDs: []\n")
                .unwrap_err();
        assert_eq!(d.field, None);
        assert_eq!(d.location, Some(Location { line: 5, column: 4 }));
        assert!(
            d.message.contains("while parsing a block collection"),
            "{d}"
        );
    }
}
