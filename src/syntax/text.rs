//! Text from outside the process, made inert before it enters a verdict, a log line or a
//! terminal.
//!
//! Registries, PDSes, PLC directories and did:web hosts choose the bytes of their error
//! bodies, media types, handles and endpoint URLs. Any of it may be megabytes long or hold
//! terminal escape sequences. [`inert`] cuts such text to a byte budget (on a character
//! boundary, saying how much was cut) and escapes every control character, and the
//! bidirectional-override characters that make a line read differently from its bytes, as
//! `\u{…}`. [`xrpc_error_code`] admits an XRPC `error` only when it looks like one.

/// The budget for one piece of outside text inside a message.
pub const MAX_TEXT: usize = 256;

/// Longest XRPC error code accepted (`RecordNotFound`, `RepoDeactivated`, …).
const MAX_XRPC_CODE: usize = 64;

/// `s` cut to at most about `max` bytes and with its control and bidi-override characters
/// escaped (`\u{1b}`); a cut is marked `…(N more bytes)`.
pub fn inert(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (at, c) in s.char_indices() {
        let escape = needs_escape(c);
        let width = if escape { 10 } else { c.len_utf8() };
        if out.len() + width > max {
            out.push_str(&format!("…({} more bytes)", s.len() - at));
            return out;
        }
        if escape {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// [`inert`] with the [`MAX_TEXT`] budget.
pub fn outside(s: &str) -> String {
    inert(s, MAX_TEXT)
}

/// Whether `c` is shown escaped: C0 and C1 controls, DEL, and the Unicode bidi embedding,
/// override and isolate characters.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The XRPC `error` field when it is shaped like an error code (an ASCII letter, then
/// letters and digits, at most 64), else `None`: anything else is not a code this client
/// could act on, and is not repeated.
pub fn xrpc_error_code(s: &str) -> Option<&str> {
    let mut bytes = s.bytes();
    let first_is_letter = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    (first_is_letter && s.len() <= MAX_XRPC_CODE && bytes.all(|b| b.is_ascii_alphanumeric()))
        .then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_unchanged() {
        assert_eq!(
            inert("RecordNotFound: no such record", 64),
            "RecordNotFound: no such record"
        );
        assert_eq!(inert("", 8), "");
        assert_eq!(inert("héllo", 6), "héllo");
    }

    #[test]
    fn controls_and_bidi_overrides_are_escaped() {
        assert_eq!(inert("a\u{1b}[31mred\n", 64), "a\\u{1b}[31mred\\u{a}");
        assert_eq!(inert("x\u{9b}y\u{7f}", 64), "x\\u{9b}y\\u{7f}");
        assert_eq!(inert("\u{202e}abc\u{2066}", 64), "\\u{202e}abc\\u{2066}");
        assert!(!inert(&"\u{1b}".repeat(100), 256).contains('\u{1b}'));
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_and_says_so() {
        let long = "é".repeat(1_000_000);
        let cut = inert(&long, 100);
        assert!(cut.len() <= 100 + 24, "{}", cut.len());
        assert!(cut.ends_with("…(1999900 more bytes)"), "{cut}");
        let escapes = "\u{1b}".repeat(1000);
        assert!(inert(&escapes, 256).len() <= 256 + 24);
        assert_eq!(
            outside(&"a".repeat(300)).len(),
            256 + "…(44 more bytes)".len()
        );
    }

    #[test]
    fn xrpc_codes_must_look_like_codes() {
        for good in ["RecordNotFound", "RepoDeactivated", "InvalidRequest", "A1"] {
            assert_eq!(xrpc_error_code(good), Some(good));
        }
        let long = "A".repeat(65);
        for bad in [
            "",
            "1abc",
            "Record Not Found",
            "a\u{1b}b",
            "x-y",
            long.as_str(),
            "é",
        ] {
            assert_eq!(xrpc_error_code(bad), None, "{bad:?}");
        }
    }
}
