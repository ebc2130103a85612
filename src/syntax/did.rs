//! Decentralized identifiers, generic syntax (<https://atproto.com/specs/did>).

use std::str::FromStr;

use super::{SyntaxError, string_type};

/// A DID in the generic syntax ATProto accepts: `did:<method>:<identifier>`, at most 2048
/// characters. Method-specific rules (such as `did:plc` being 24 base32 characters) are
/// not applied here; `is_canonical_plc` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Did(String);
string_type!(Did);

const MAX_LEN: usize = 2048;

impl Did {
    /// The method name (`plc`, `web`, …).
    pub fn method(&self) -> &str {
        self.0
            .strip_prefix("did:")
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_default()
    }

    /// True for a `did:plc:` whose identifier is 24 characters of lowercase base32.
    pub fn is_canonical_plc(&self) -> bool {
        self.0.strip_prefix("did:plc:").is_some_and(|id| {
            id.len() == 24 && id.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'))
        })
    }
}

impl FromStr for Did {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("DID", s, reason));
        if s.len() > MAX_LEN {
            return err("longer than 2048 characters");
        }
        let Some(rest) = s.strip_prefix("did:") else {
            return err("must start with \"did:\"");
        };
        let Some((method, id)) = rest.split_once(':') else {
            return err("must have a method and an identifier");
        };
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_lowercase()) {
            return err("method must be lowercase letters");
        }
        if id.is_empty() {
            return err("identifier is empty");
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if !id.bytes().all(|b| allowed(b) || b == b':' || b == b'%') {
            return err("identifier has a character outside [A-Za-z0-9._:%-]");
        }
        if !id.bytes().last().is_some_and(allowed) {
            return err("identifier must not end with ':' or '%'");
        }
        Ok(Did(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_and_plc_shape() {
        let d: Did = "did:plc:7iza6de2dwap2sbkpav7c6c6".parse().unwrap();
        assert_eq!(d.method(), "plc");
        assert!(d.is_canonical_plc());
        let short: Did = "did:plc:alice123".parse().unwrap();
        assert!(!short.is_canonical_plc());
        let web: Did = "did:web:example.com".parse().unwrap();
        assert_eq!(web.method(), "web");
        assert!(!web.is_canonical_plc());
    }

    #[test]
    fn error_names_input_and_rule() {
        let e = "did:Foo:x".parse::<Did>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid DID \"did:Foo:x\": method must be lowercase letters"
        );
    }
}
