//! Diia barcodes: 13-digit EAN-13 codes, parsed once at the edge into a fixed-size value.
//!
//! Diia builds each barcode from a random 12-digit base in `[100000000000, 999999999999]`
//! and appends the EAN-13 check digit, so a leading 0 or a wrong check digit can never
//! be a real barcode and is refused before anything leaves the box.

use std::fmt;

/// A syntactically valid Diia barcode. `Debug` and `Display` never show the digits:
/// a barcode lets whoever holds it act on a customer's document for 3 minutes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Barcode(u64);

/// Why a string is not a barcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BarcodeError {
    /// Not exactly 13 characters.
    #[error("barcode must be 13 digits")]
    Length,
    /// A character other than an ASCII digit.
    #[error("barcode must contain only digits")]
    NotDigit,
    /// Diia never issues a barcode starting with 0.
    #[error("barcode must not start with 0")]
    LeadingZero,
    /// The 13th digit is not the EAN-13 check digit of the first 12.
    #[error("barcode check digit is wrong")]
    CheckDigit,
}

impl Barcode {
    /// Parses and checks a barcode without allocating.
    pub fn parse(text: &str) -> Result<Self, BarcodeError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// Same as [`Barcode::parse`] on raw bytes (a query string, a JSON value).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, BarcodeError> {
        let digits: &[u8; 13] = bytes.try_into().map_err(|_| BarcodeError::Length)?;
        let mut value: u64 = 0;
        let mut weighted_sum: u32 = 0;
        for (index, &byte) in digits.iter().enumerate() {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                return Err(BarcodeError::NotDigit);
            }
            value = value * 10 + u64::from(digit);
            if index < 12 {
                let weight = if index % 2 == 0 { 1 } else { 3 };
                weighted_sum += u32::from(digit) * weight;
            }
        }
        if digits[0] == b'0' {
            return Err(BarcodeError::LeadingZero);
        }
        let expected = (10 - weighted_sum % 10) % 10;
        if u32::from(digits[12] - b'0') != expected {
            return Err(BarcodeError::CheckDigit);
        }
        Ok(Self(value))
    }

    /// Builds a valid barcode from a 12-digit base, as Diia does; for the simulator and tests.
    #[must_use]
    pub fn from_base(base: u64) -> Option<Self> {
        if !(100_000_000_000..=999_999_999_999).contains(&base) {
            return None;
        }
        let mut weighted_sum = 0u64;
        let mut rest = base;
        // Walk digits right to left: position 11 (rightmost of the base) has weight 3.
        for position in (0..12).rev() {
            let digit = rest % 10;
            rest /= 10;
            weighted_sum += digit * if position % 2 == 0 { 1 } else { 3 };
        }
        let check = (10 - weighted_sum % 10) % 10;
        Some(Self(base * 10 + check))
    }

    /// The 13 digits as a number; used for keys and by the simulator.
    #[must_use]
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The 13 digits as text. Only for building requests; never log it.
    #[must_use]
    pub fn digits(self) -> String {
        self.0.to_string()
    }
}

impl fmt::Debug for Barcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Barcode(<redacted>)")
    }
}

impl fmt::Display for Barcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<barcode>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_barcodes_seen_in_public_sdks() {
        for sample in [
            "3389798072091",
            "3004970569106",
            "2858364170864",
            "1213187292345",
        ] {
            assert!(Barcode::parse(sample).is_ok(), "{sample}");
        }
    }

    #[test]
    fn refuses_each_malformation() {
        assert_eq!(Barcode::parse("338979807209"), Err(BarcodeError::Length));
        assert_eq!(Barcode::parse("33897980720911"), Err(BarcodeError::Length));
        assert_eq!(Barcode::parse("33897980720a1"), Err(BarcodeError::NotDigit));
        assert_eq!(
            Barcode::parse("3389798072090"),
            Err(BarcodeError::CheckDigit)
        );
        assert_eq!(
            Barcode::parse("0000000000000"),
            Err(BarcodeError::LeadingZero)
        );
        assert_eq!(Barcode::parse("３389798072091"), Err(BarcodeError::Length));
        assert_eq!(Barcode::parse(""), Err(BarcodeError::Length));
    }

    #[test]
    fn from_base_round_trips_through_parse() {
        for base in [
            100_000_000_000,
            338_979_807_209,
            999_999_999_999,
            121_318_729_234,
        ] {
            let barcode = Barcode::from_base(base).expect("base in range");
            assert_eq!(Barcode::parse(&barcode.digits()), Ok(barcode));
        }
        assert_eq!(
            Barcode::from_base(338_979_807_209).map(Barcode::as_u64),
            Some(3_389_798_072_091)
        );
        assert!(Barcode::from_base(99_999_999_999).is_none());
    }

    #[test]
    fn formatting_never_shows_digits() {
        let barcode = Barcode::parse("3389798072091").expect("valid");
        assert!(!format!("{barcode} {barcode:?}").contains("3389798072091"));
    }
}
