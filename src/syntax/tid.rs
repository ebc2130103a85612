//! Timestamp identifiers (<https://atproto.com/specs/tid>), used as commit revisions.

use std::str::FromStr;

use time::OffsetDateTime;

use super::{SyntaxError, string_type};

/// A TID: 13 characters of base32-sortable, encoding microseconds since the Unix epoch in
/// its top 53 bits and a clock id in the low 10.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tid(String);
string_type!(Tid);

const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";

impl Tid {
    /// The instant the TID encodes.
    pub fn timestamp(&self) -> OffsetDateTime {
        let value = self.0.bytes().fold(0u64, |acc, c| {
            // Every byte is in ALPHABET (checked by from_str), so position() is Some.
            let digit = ALPHABET.iter().position(|a| *a == c).unwrap_or(0) as u64;
            (acc << 5) | digit
        });
        let micros = i128::from(value >> 10);
        OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl FromStr for Tid {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("TID", s, reason));
        if s.len() != 13 {
            return err("must be 13 characters");
        }
        if !s.bytes().all(|b| ALPHABET.contains(&b)) {
            return err("has a character outside base32-sortable [2-7a-z]");
        }
        if !s
            .bytes()
            .next()
            .is_some_and(|b| b"234567abcdefghij".contains(&b))
        {
            return err("top bit must be zero (first character 2-7 or a-j)");
        }
        Ok(Tid(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_decodes_microseconds() {
        // 3jzfcijpj2z2a is the spec's example; its timestamp is 2023-01-18 (microsecond TID).
        let t: Tid = "3jzfcijpj2z2a".parse().unwrap();
        assert_eq!(t.timestamp().year(), 2023);
        let zero: Tid = "2222222222222".parse().unwrap();
        assert_eq!(zero.timestamp(), OffsetDateTime::UNIX_EPOCH);
    }
}
