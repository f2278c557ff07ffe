//! Durations as flags and environment variables spell them: `500ms`, `30s`, `2m`, `1h`,
//! `1m30s`, or a bare number of seconds. One parser for every binary, so `--gc-interval` and
//! `--reservation-ttl` accept the same forms and reject bad input with the same words.

use std::time::Duration;

/// What the user may write, quoted in every error.
pub const DURATION_FORMS: &str = "use a positive duration such as 500ms, 30s, 2m, 1h or 1m30s \
     (units ms, s, m, h; a bare number means seconds)";

/// Why a duration was refused. The message quotes the input and the allowed forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing but whitespace.
    #[error("empty duration: {DURATION_FORMS}")]
    Empty,
    /// Not a sequence of `<number><unit>` parts.
    #[error("{0:?} is not a duration: {DURATION_FORMS}")]
    Malformed(String),
    /// A number too large for a `u64`.
    #[error("{0:?} is too large: {DURATION_FORMS}")]
    TooLarge(String),
    /// A number followed by no unit, inside a compound duration (`1m30`).
    #[error("{0:?} has a number without a unit: {DURATION_FORMS}")]
    MissingUnit(String),
    /// A unit other than ms, s, m, h.
    #[error("{input:?} has the unknown unit {unit:?}: {DURATION_FORMS}")]
    UnknownUnit {
        /// The whole input.
        input: String,
        /// The unit that was not understood.
        unit: String,
    },
    /// The duration adds up to zero.
    #[error("{0:?} is zero: {DURATION_FORMS}")]
    Zero(String),
}

/// Parse a positive duration (see the module docs). Saturates instead of overflowing on huge
/// hour counts; zero is refused because every duration flag is an interval or a timeout.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    let total = if t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| DurationError::TooLarge(s.to_string()))?
    } else {
        let mut total = Duration::ZERO;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(DurationError::Malformed(s.to_string()));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| DurationError::TooLarge(s.to_string()))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let part = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "" if rest.is_empty() => return Err(DurationError::MissingUnit(s.to_string())),
                "" => return Err(DurationError::Malformed(s.to_string())),
                u => {
                    return Err(DurationError::UnknownUnit {
                        input: s.to_string(),
                        unit: u.to_string(),
                    })
                }
            };
            rest = &rest[unit_len..];
            total = total.saturating_add(part);
        }
        total
    };
    if total.is_zero() {
        return Err(DurationError::Zero(s.to_string()));
    }
    Ok(total)
}

/// Render a duration the way [`parse_duration`] reads it back (`1500ms`, `15s`).
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_compound_and_bare_durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h0m500ms"),
            Ok(Duration::from_millis(3_600_500))
        );
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn bad_durations_name_the_input_and_the_allowed_forms() {
        for (bad, words) in [
            ("", "empty duration"),
            ("   ", "empty duration"),
            ("s", "\"s\" is not a duration"),
            ("-1s", "\"-1s\" is not a duration"),
            ("1.5s", "\"1.5s\" is not a duration"),
            ("10 s", "\"10 s\" is not a duration"),
            ("1m30", "\"1m30\" has a number without a unit"),
            ("10x", "\"10x\" has the unknown unit \"x\""),
            ("5 minutes", "\"5 minutes\" is not a duration"),
            ("3days", "unknown unit \"days\""),
            ("0s", "\"0s\" is zero"),
            ("0", "\"0\" is zero"),
            ("99999999999999999999s", "is too large"),
        ] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(e.contains(words), "{bad:?}: {e}");
            assert!(e.contains("500ms, 30s, 2m, 1h or 1m30s"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn huge_hour_counts_saturate_instead_of_panicking() {
        let d = parse_duration("18446744073709551615h").unwrap();
        assert!(d >= Duration::from_secs(u64::MAX / 2));
    }

    proptest! {
        #[test]
        fn formatting_then_parsing_gives_back_the_duration(ms in 1u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,24}") {
            let _ = parse_duration(&s);
        }
    }
}
