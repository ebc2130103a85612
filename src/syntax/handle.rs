//! ATProto handles (<https://atproto.com/specs/handle>): only a check, since handles are
//! shown, never trusted (the DID is the identity).

/// Longest handle, as in the spec.
const MAX_LEN: usize = 253;

/// Whether `s` is a syntactically valid handle: at most 253 characters, two or more
/// dot-separated labels of 1–63 ASCII letters, digits and inner hyphens, the last one
/// starting with a letter.
pub fn is_handle(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.len() <= MAX_LEN
        && labels.len() >= 2
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|tld| tld.starts_with(|c: char| c.is_ascii_alphabetic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        for good in [
            "alice.test",
            "a.b.c",
            "xn--ls8h.test",
            "alice-1.bsky.social",
        ] {
            assert!(is_handle(good), "{good}");
        }
        let long = format!("{}.test", "a".repeat(250));
        for bad in [
            "",
            "alice",
            "alice.",
            ".test",
            "a..test",
            "-a.test",
            "a-.test",
            "a.1test",
            "al ice.test",
            "a\u{1b}[31m.test",
            long.as_str(),
        ] {
            assert!(!is_handle(bad), "{bad:?}");
        }
    }
}
