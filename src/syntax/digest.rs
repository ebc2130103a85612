//! OCI content digests of images (<https://github.com/opencontainers/image-spec/blob/main/descriptor.md#digests>).

use std::str::FromStr;

use super::{SyntaxError, string_type};

/// An image digest in the only form ATCR signs: `sha256:` and 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageDigest(String);
string_type!(ImageDigest);

impl FromStr for ImageDigest {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        let err = |reason| Err(SyntaxError::new("image digest", s, reason));
        let Some(hex) = s.strip_prefix("sha256:") else {
            return err("must start with \"sha256:\"");
        };
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return err("must be sha256: followed by 64 lowercase hex digits");
        }
        Ok(ImageDigest(s.to_owned()))
    }
}

impl ImageDigest {
    /// The digest of `bytes` (what a registry's content must hash to).
    pub fn of_bytes(bytes: &[u8]) -> ImageDigest {
        use sha2::Digest;
        use std::fmt::Write;
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in sha2::Sha256::digest(bytes) {
            let _ = write!(s, "{b:02x}"); // writing to a String cannot fail
        }
        ImageDigest(s)
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        self.0.get(7..).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lowercase_sha256() {
        assert!(
            format!("sha256:{}", "ab".repeat(32))
                .parse::<ImageDigest>()
                .is_ok()
        );
        assert!(
            format!("sha256:{}", "AB".repeat(32))
                .parse::<ImageDigest>()
                .is_err()
        );
        assert!(
            format!("sha512:{}", "ab".repeat(64))
                .parse::<ImageDigest>()
                .is_err()
        );
        assert!("sha256:abc".parse::<ImageDigest>().is_err());
    }
}
