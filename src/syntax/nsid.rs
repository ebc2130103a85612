//! Namespaced identifiers (<https://atproto.com/specs/nsid>), used as record collections.

use std::str::FromStr;

use super::{SyntaxError, string_type};

/// An NSID such as `io.atcr.manifest`: a reversed domain authority plus a name segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nsid(String);
string_type!(Nsid);

impl FromStr for Nsid {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("NSID", s, reason));
        if s.len() > 317 {
            return err("longer than 317 characters");
        }
        let segments: Vec<&str> = s.split('.').collect();
        let Some((name, authority)) = segments.split_last() else {
            return err("is empty");
        };
        if authority.len() < 2 {
            return err("needs at least three segments");
        }
        for (i, seg) in authority.iter().enumerate() {
            let b = seg.as_bytes();
            if b.is_empty() || b.len() > 63 {
                return err("segments must be 1 to 63 characters");
            }
            if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
                return err("domain segments allow only letters, digits and '-'");
            }
            if b.first() == Some(&b'-') || b.last() == Some(&b'-') {
                return err("domain segments must not start or end with '-'");
            }
            if i == 0 && b.first().is_some_and(u8::is_ascii_digit) {
                return err("first segment must not start with a digit");
            }
        }
        let n = name.as_bytes();
        if n.is_empty() || n.len() > 63 {
            return err("name segment must be 1 to 63 characters");
        }
        if !n.iter().all(u8::is_ascii_alphanumeric) || n.first().is_some_and(u8::is_ascii_digit) {
            return err("name segment must be letters and digits, not starting with a digit");
        }
        Ok(Nsid(s.to_owned()))
    }
}
