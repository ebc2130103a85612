//! `maxSignatureAge` durations: `90d`, `12h`, `1d12h`, `2w`.
//!
//! Units are `w` (7 days), `d`, `h`, `m` and `s`; each may appear once, largest first.
//! Months and years are refused because their length varies. The total must be at least one
//! second and at most 100 years.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use time::Duration;

use crate::syntax::FromStrVisitor;

/// A positive duration written in policy units. Displays in the same units it parses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SignatureAge(Duration);

const UNITS: [(u8, i64); 5] = [
    (b'w', 7 * 86_400),
    (b'd', 86_400),
    (b'h', 3_600),
    (b'm', 60),
    (b's', 1),
];
const MAX_SECONDS: i64 = 36_500 * 86_400;

impl SignatureAge {
    /// The duration.
    pub(crate) fn duration(&self) -> Duration {
        self.0
    }
}

/// Why a duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 90d, 12h, 1d12h)")]
pub(crate) struct DurationError {
    input: String,
    reason: &'static str,
}

impl FromStr for SignatureAge {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        let err = |reason| DurationError {
            input: s.chars().take(64).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(err("is empty"));
        }
        if s.len() > 64 {
            return Err(err("longer than 64 characters"));
        }
        let mut total: i64 = 0;
        let mut next_unit = 0usize; // index into UNITS: units must come largest first, once each
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return Err(err("each part must be a number followed by a unit"));
            }
            let (number, after) = rest.split_at(digits);
            let Some((&unit, after)) = after.split_first() else {
                return Err(err("number without a unit (s, m, h, d or w)"));
            };
            let Some(pos) = UNITS.iter().position(|(u, _)| *u == unit) else {
                return Err(err("unknown unit; use s, m, h, d or w"));
            };
            if pos < next_unit {
                return Err(err("units must appear once each, largest first"));
            }
            next_unit = pos + 1;
            let seconds_per = UNITS.get(pos).map_or(1, |(_, s)| *s);
            let number: i64 = std::str::from_utf8(number)
                .ok()
                .and_then(|n| n.parse().ok())
                .filter(|n| *n <= MAX_SECONDS)
                .ok_or_else(|| err("longer than 100 years"))?;
            total = number
                .checked_mul(seconds_per)
                .and_then(|part| total.checked_add(part))
                .filter(|t| *t <= MAX_SECONDS)
                .ok_or_else(|| err("longer than 100 years"))?;
            rest = after;
        }
        if total == 0 {
            return Err(err("must be longer than zero"));
        }
        Ok(SignatureAge(Duration::seconds(total)))
    }
}

impl fmt::Display for SignatureAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_duration(self.0, f)
    }
}

/// Writes a duration in policy units (`91d2h`), rounded down to whole seconds; `0s` for zero
/// or negative.
pub(crate) fn format_duration(d: Duration, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let mut left = d.whole_seconds();
    if left <= 0 {
        return f.write_str("0s");
    }
    // Weeks are left out on output: `91d` reads better than `13w`.
    for (unit, seconds) in UNITS.iter().skip(1) {
        let n = left / seconds;
        if n > 0 {
            write!(f, "{n}{}", char::from(*unit))?;
            left -= n * seconds;
        }
    }
    Ok(())
}

/// A [`Duration`] shown in policy units.
pub(crate) struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_duration(self.0, f)
    }
}

impl<'de> Deserialize<'de> for SignatureAge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor::<SignatureAge>::new(
            "a duration such as 90d",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy_units() {
        for (input, seconds, shown) in [
            ("90d", 90 * 86_400, "90d"),
            ("12h", 12 * 3_600, "12h"),
            ("30m", 1_800, "30m"),
            ("45s", 45, "45s"),
            ("2w", 14 * 86_400, "14d"),
            ("1d12h", 36 * 3_600, "1d12h"),
            ("1w1d1h1m1s", 8 * 86_400 + 3_661, "8d1h1m1s"),
            ("36500d", MAX_SECONDS, "36500d"),
        ] {
            let age: SignatureAge = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(age.duration(), Duration::seconds(seconds), "{input}");
            assert_eq!(age.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn refuses_bad_durations() {
        for (input, needle) in [
            ("", "is empty"),
            ("90", "without a unit"),
            ("d", "number followed by a unit"),
            ("90y", "unknown unit"),
            ("3M", "unknown unit"),
            ("1.5d", "unknown unit"),
            ("-1d", "number followed by a unit"),
            ("1d 2h", "number followed by a unit"),
            ("0d", "longer than zero"),
            ("0h0m", "longer than zero"),
            ("12h1d", "largest first"),
            ("1d1d", "largest first"),
            ("36501d", "100 years"),
            ("99999999999999999999s", "100 years"),
        ] {
            let e = input
                .parse::<SignatureAge>()
                .err()
                .unwrap_or_else(|| panic!("accepted {input:?}"));
            assert!(e.to_string().contains(needle), "{input:?}: {e}");
        }
    }
}
