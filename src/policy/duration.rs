//! Durations: one grammar for command-line flags and policy files, humantime's
//! (<https://docs.rs/humantime>): a number and a unit, repeated — `500ms`, `2s`, `5m`, `12h`,
//! `1d`, `90d`, `2w`, `1d12h`, `1h 30m` (`M` is a month of 30.44 days, `y` a year of 365.25
//! days). `maxSignatureAge` must also be longer than zero and at most 100 years.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use time::Duration;

use crate::syntax::FromStrVisitor;

/// A positive duration for `maxSignatureAge`. Displays in days, hours, minutes and seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SignatureAge(Duration);

/// Units used when a duration is shown (weeks are left out: `91d` reads better than `13w`).
const UNITS: [(char, i64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
const MAX_SECONDS: i64 = 36_500 * 86_400;
/// Longest duration text read.
const MAX_LEN: usize = 64;

impl SignatureAge {
    /// The duration.
    pub(crate) fn duration(&self) -> Duration {
        self.0
    }
}

/// Why a duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 2s, 5m, 12h, 90d)")]
pub struct DurationError {
    input: String,
    reason: String,
}

/// Parses a duration in the one grammar of flags and policy files.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, DurationError> {
    let err = |reason: String| DurationError {
        input: s.chars().take(MAX_LEN).collect(),
        reason,
    };
    if s.len() > MAX_LEN {
        return Err(err(format!("longer than {MAX_LEN} characters")));
    }
    humantime::parse_duration(s.trim()).map_err(|e| err(e.to_string()))
}

impl FromStr for SignatureAge {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, DurationError> {
        let parsed = parse_duration(s)?;
        let err = |reason: &str| DurationError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if parsed.is_zero() {
            return Err(err("must be longer than zero"));
        }
        if parsed.as_secs() > MAX_SECONDS as u64 {
            return Err(err("longer than 100 years"));
        }
        Duration::try_from(parsed)
            .map(SignatureAge)
            .map_err(|_| err("longer than 100 years"))
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
    for (unit, seconds) in UNITS {
        let n = left / seconds;
        if n > 0 {
            write!(f, "{n}{unit}")?;
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
    fn parses_the_one_grammar() {
        for (input, seconds, shown) in [
            ("90d", 90 * 86_400, "90d"),
            ("12h", 12 * 3_600, "12h"),
            ("30m", 1_800, "30m"),
            ("45s", 45, "45s"),
            ("2w", 14 * 86_400, "14d"),
            ("1d12h", 36 * 3_600, "1d12h"),
            ("1d 12h", 36 * 3_600, "1d12h"),
            ("1w1d1h1m1s", 8 * 86_400 + 3_661, "8d1h1m1s"),
            ("36500d", MAX_SECONDS, "36500d"),
        ] {
            let age: SignatureAge = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(age.duration(), Duration::seconds(seconds), "{input}");
            assert_eq!(age.to_string(), shown, "{input}");
        }
        for (input, ms) in [
            ("500ms", 500),
            ("2s", 2_000),
            ("5m", 300_000),
            ("1d", 86_400_000),
        ] {
            assert_eq!(
                parse_duration(input),
                Ok(std::time::Duration::from_millis(ms)),
                "{input}"
            );
        }
    }

    #[test]
    fn refuses_bad_durations() {
        for input in [
            "", "90", "d", "-1d", "90x", "0d", "0h0m", "36501d", "1d\u{1b}",
        ] {
            assert!(input.parse::<SignatureAge>().is_err(), "accepted {input:?}");
        }
        let e = "0d".parse::<SignatureAge>().unwrap_err();
        assert!(e.to_string().contains("longer than zero"), "{e}");
        let e = "36501d".parse::<SignatureAge>().unwrap_err();
        assert!(e.to_string().contains("100 years"), "{e}");
        let e = "90".parse::<SignatureAge>().unwrap_err();
        assert!(e.to_string().contains("expected e.g. 500ms"), "{e}");
    }
}
