//! Kubernetes resource quantities ("30", "1k", "2Gi", "1e3", "500m") as integers.
//!
//! Kubernetes' `Quantity.Value()` rounds fractional values up. Extended resources such as
//! `vcuda-core` must be whole numbers, so [`parse_count`] rejects fractions instead of rounding.

use std::fmt;

/// Why a quantity string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a Kubernetes quantity (expected a number with an optional suffix such as 30, 1k, 2Gi or 1e3)")]
    Syntax(String),
    #[error("{0:?} is negative; resource quantities must be zero or more")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} is not a whole number; extended resources take whole numbers")]
    Fractional(String),
}

/// A parsed quantity: its value rounded up to an integer, and whether it was exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    /// The value rounded up to the next integer (Kubernetes `Quantity.Value()`).
    pub ceil: i64,
    /// True when the quantity is a whole number.
    pub exact: bool,
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.ceil)
    }
}

/// Parse a quantity string into its rounded-up integer value. Negative values are rejected.
pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
    let syntax = || QuantityError::Syntax(s.to_string());
    let too_large = || QuantityError::TooLarge(s.to_string());
    let t = s.trim();
    if t.is_empty() || t.len() > 64 {
        return Err(syntax());
    }
    let (negative, rest) = match t.as_bytes()[0] {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    // Number part: digits with at most one dot.
    let num_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(num_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(syntax());
    }
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits: String = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(too_large());
    }
    let mantissa: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| syntax())?
    };
    let scale = frac_part.len() as i32;
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        other => {
            let exp = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .ok_or_else(syntax)?;
            let unsigned = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            let e: i32 = exp.parse().map_err(|_| too_large())?;
            if e.abs() > 60 {
                return Err(too_large());
            }
            (e, 0)
        }
    };
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(s.to_string()));
    }
    let scaled = mantissa.checked_shl(exp2).filter(|v| v >> exp2 == mantissa);
    let scaled = scaled.ok_or_else(too_large)?;
    let e = exp10 - scale;
    let (ceil, exact) = if e >= 0 {
        let factor = 10i128.checked_pow(e as u32).ok_or_else(too_large)?;
        (scaled.checked_mul(factor).ok_or_else(too_large)?, true)
    } else if -e > 38 {
        (i128::from(scaled > 0), scaled == 0)
    } else {
        let div = 10i128.pow((-e) as u32);
        let q = scaled / div;
        let r = scaled % div;
        (q + i128::from(r > 0), r == 0)
    };
    let ceil = i64::try_from(ceil).map_err(|_| too_large())?;
    Ok(Quantity { ceil, exact })
}

/// Parse a quantity that must be a whole, non-negative number (extended resources).
pub fn parse_count(s: &str) -> Result<u64, QuantityError> {
    let q = parse(s)?;
    if !q.exact {
        return Err(QuantityError::Fractional(s.to_string()));
    }
    u64::try_from(q.ceil).map_err(|_| QuantityError::Negative(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_and_suffixed_values() {
        let cases = [
            ("30", 30, true),
            ("0", 0, true),
            ("1k", 1000, true),
            ("2Ki", 2048, true),
            ("1Gi", 1 << 30, true),
            ("1e3", 1000, true),
            ("1E3", 1000, true),
            ("1.5", 2, false),
            ("500m", 1, false),
            ("1000m", 1, true),
            ("0.1", 1, false),
            ("+7", 7, true),
            ("12.", 12, true),
            (".5", 1, false),
            ("5e-1", 1, false),
            ("10e-1", 1, true),
            ("-0", 0, true),
            ("007", 7, true),
        ];
        for (s, v, exact) in cases {
            assert_eq!(parse(s), Ok(Quantity { ceil: v, exact }), "{s}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_the_allowed_forms() {
        for s in [
            "", "abc", "1x", "1.2.3", "Gi", "1 Gi", "1e", "1e+", "--1", ".",
        ] {
            let e = parse(s).unwrap_err();
            assert!(matches!(e, QuantityError::Syntax(_)), "{s}: {e:?}");
            assert!(e.to_string().contains("expected a number"), "{e}");
        }
    }

    #[test]
    fn negative_and_huge_values_are_rejected() {
        assert!(matches!(parse("-5"), Err(QuantityError::Negative(_))));
        assert!(matches!(parse("9Ei"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(parse("1e60"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(
            parse("1234567890123456789012345678901234"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn counts_must_be_whole() {
        assert_eq!(parse_count("30"), Ok(30));
        assert_eq!(parse_count("2k"), Ok(2000));
        let e = parse_count("500m").unwrap_err();
        assert!(e.to_string().contains("whole number"), "{e}");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }

        #[test]
        fn integers_round_trip(v in 0u64..=u64::from(u32::MAX)) {
            prop_assert_eq!(parse_count(&v.to_string()), Ok(v));
        }
    }
}
