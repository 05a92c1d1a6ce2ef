//! Kubernetes resource quantities, parsed once into integers: CPU in millicores, memory in bytes.
//!
//! The grammar is the one of `k8s.io/apimachinery/pkg/api/resource`: a signed decimal number
//! followed by a binary suffix (`Ki`..`Ei`), a decimal suffix (`m`, `k`, `M`..`E`) or an exponent
//! (`e3`, `E-2`). Fractions that do not divide evenly round up, as the API server does when it
//! canonicalises a quantity to its smallest unit.

use std::fmt;

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("empty quantity")]
    Empty,
    #[error(
        "{0:?} is not a quantity (expected a number with an optional unit, e.g. 100m, 1.5, 128Mi)"
    )]
    Syntax(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// CPU in millicores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cpu(pub u64);

/// Memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(pub u64);

impl Cpu {
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        // millicores = value * 1000, rounded up.
        parse_scaled(s, 3).map(Cpu)
    }
}

impl Memory {
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        parse_scaled(s, 0).map(Memory)
    }
}

impl fmt::Display for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
            ("", 1),
        ];
        for (suffix, size) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(size) {
                return write!(f, "{}{}", self.0 / size, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses `s` and returns `value * 10^scale`, rounded up to an integer.
fn parse_scaled(s: &str, scale: i32) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax(s.to_owned());
    let s_trim = s.trim();
    if s_trim.is_empty() {
        return Err(QuantityError::Empty);
    }
    let (sign, body) = match s_trim.as_bytes()[0] {
        b'-' => (-1, &s_trim[1..]),
        b'+' => (1, &s_trim[1..]),
        _ => (1, s_trim),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(num_end);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(syntax());
    }
    // Every digit, integer and fraction, as one big integer: value = digits * 10^-frac_len.
    let digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let digits = digits.trim_start_matches('0');
    if sign < 0 && !digits.is_empty() {
        return Err(QuantityError::Negative(s.to_owned()));
    }
    // (binary multiplier, decimal exponent)
    let (binary, exp10): (u128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i32>().ok())
                .filter(|e| e.abs() <= 30)
                .ok_or_else(syntax)?;
            (1, exp)
        }
    };
    if digits.is_empty() {
        return Ok(0);
    }
    let too_large = || QuantityError::TooLarge(s.to_owned());
    if digits.len() > 30 {
        return Err(too_large());
    }
    let mantissa: u128 = digits.parse().map_err(|_| syntax())?;
    let frac_len = i32::try_from(frac_part.len()).map_err(|_| too_large())?;
    let exp = exp10 + scale - frac_len;
    let value = mantissa.checked_mul(binary).ok_or_else(too_large)?;
    let value = if exp >= 0 {
        10u128
            .checked_pow(exp.unsigned_abs())
            .and_then(|p| value.checked_mul(p))
            .ok_or_else(too_large)?
    } else {
        match 10u128.checked_pow(exp.unsigned_abs()) {
            Some(div) => value.div_ceil(div),
            // Dividing by more than u128 can hold: any non-zero value rounds up to one unit.
            None => 1,
        }
    };
    u64::try_from(value).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_table() {
        let cases: &[(&str, Result<u64, ()>)] = &[
            ("100m", Ok(100)),
            ("1", Ok(1000)),
            ("0.5", Ok(500)),
            (".5", Ok(500)),
            ("1.5", Ok(1500)),
            ("2k", Ok(2_000_000)),
            ("1e3", Ok(1_000_000)),
            ("1E-3", Ok(1)),
            ("0.0001", Ok(1)), // rounds up, like the API server
            ("100u", Ok(1)),
            ("250000n", Ok(1)),
            ("0", Ok(0)),
            ("+3", Ok(3000)),
            ("-0", Ok(0)),
            ("", Err(())),
            ("m", Err(())),
            ("abc", Err(())),
            ("1.2.3", Err(())),
            ("-1", Err(())),
            ("1x", Err(())),
            ("1 m", Err(())),
            ("1e99", Err(())),
            ("99999999999999999999999999999999999", Err(())),
            ("100Ei", Err(())),
        ];
        for (input, want) in cases {
            let got = Cpu::parse(input).map(|c| c.0).map_err(|_| ());
            assert_eq!(&got, want, "Cpu::parse({input:?})");
        }
    }

    #[test]
    fn memory_table() {
        let cases: &[(&str, Result<u64, ()>)] = &[
            ("128Mi", Ok(128 << 20)),
            ("1Gi", Ok(1 << 30)),
            ("1G", Ok(1_000_000_000)),
            ("1e9", Ok(1_000_000_000)),
            ("129M", Ok(129_000_000)),
            ("123456", Ok(123_456)),
            ("1.5Gi", Ok(3 << 29)),
            ("100m", Ok(1)), // milli-bytes round up to a whole byte
            ("0.5Ki", Ok(512)),
            ("Mi", Err(())),
            ("12MB", Err(())),
            ("-1Mi", Err(())),
            ("16Ei", Err(())),
        ];
        for (input, want) in cases {
            let got = Memory::parse(input).map(|m| m.0).map_err(|_| ());
            assert_eq!(&got, want, "Memory::parse({input:?})");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["100m", "1", "2500m", "64"] {
            assert_eq!(Cpu::parse(s).map(|c| c.to_string()).as_deref(), Ok(s));
        }
        for s in ["128Mi", "1Gi", "1000", "3Ki"] {
            assert_eq!(Memory::parse(s).map(|m| m.to_string()).as_deref(), Ok(s));
        }
    }

    #[test]
    fn errors_name_the_value() {
        let err = Cpu::parse("fast").unwrap_err().to_string();
        assert!(err.contains("\"fast\""), "{err}");
    }
}
