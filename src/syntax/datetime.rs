//! ATProto datetimes (<https://atproto.com/specs/lexicon#datetime>): a strict RFC 3339 profile.
//!
//! Written by hand because general RFC 3339 parsers accept forms ATProto forbids
//! (lowercase `t`/`z`, `-00:00`, no seconds) and some cap fractional digits at nine.

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

use super::SyntaxError;

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` into a UTC instant.
pub fn parse_datetime(s: &str) -> Result<OffsetDateTime, SyntaxError> {
    let err = |reason| SyntaxError::new("datetime", s, reason);
    if s.len() > 64 {
        return Err(err("longer than 64 characters"));
    }
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
        })
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
    }
    let fields = (
        num(0..4),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        num(17..19),
    );
    let (Some(year), Some(month), Some(day), Some(hour), Some(min), Some(sec)) = fields else {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS with digits"));
    };
    let mut rest = b.get(19..).unwrap_or_default();
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(err("fractional seconds need at least one digit"));
        }
        nanos = frac
            .iter()
            .take(digits)
            .chain(std::iter::repeat(&b'0'))
            .take(9)
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        rest = frac.get(digits..).unwrap_or_default();
    }
    let offset = match rest {
        b"Z" => UtcOffset::UTC,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [h1, h2, m1, m2];
            if !digits.iter().all(|d| d.is_ascii_digit()) {
                return Err(err("timezone offset must be ±HH:MM"));
            }
            let h = ((h1 - b'0') * 10 + (h2 - b'0')) as i8;
            let m = ((m1 - b'0') * 10 + (m2 - b'0')) as i8;
            if *sign == b'-' && h == 0 && m == 0 {
                return Err(err("-00:00 is not allowed"));
            }
            let (h, m) = if *sign == b'-' { (-h, -m) } else { (h, m) };
            UtcOffset::from_hms(h, m, 0).map_err(|_| err("timezone offset out of range"))?
        }
        _ => return Err(err("must end with Z or a ±HH:MM offset")),
    };
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(|| err("month out of range"))?;
    let date = Date::from_calendar_date(year as i32, month, day as u8)
        .map_err(|_| err("date out of range"))?;
    let time = Time::from_hms_nano(hour as u8, min as u8, sec as u8, nanos)
        .map_err(|_| err("time out of range"))?;
    Ok(date
        .with_time(time)
        .assume_offset(offset)
        .to_offset(UtcOffset::UTC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_normalize_to_utc() {
        let a = parse_datetime("1985-04-12T23:20:50.123-07:00").unwrap();
        let b = parse_datetime("1985-04-13T06:20:50.123Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.offset(), UtcOffset::UTC);
    }

    #[test]
    fn long_fractions_truncate_to_nanoseconds() {
        let a = parse_datetime("1985-04-12T23:20:50.1235678912345Z").unwrap();
        assert_eq!(a.nanosecond(), 123_567_891);
    }
}
