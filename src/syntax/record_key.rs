//! Record keys (<https://atproto.com/specs/record-key>).

use std::str::FromStr;

use super::{SyntaxError, string_type};

/// A record key: 1 to 512 characters of `[A-Za-z0-9._:~-]`, never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey(String);
string_type!(RecordKey);

impl FromStr for RecordKey {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("record key", s, reason));
        if s.is_empty() || s.len() > 512 {
            return err("must be 1 to 512 characters");
        }
        if s == "." || s == ".." {
            return err("must not be \".\" or \"..\"");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'~'))
        {
            return err("has a character outside [A-Za-z0-9._:~-]");
        }
        Ok(RecordKey(s.to_owned()))
    }
}
