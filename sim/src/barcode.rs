//! The simulator's own EAN-13 check, written apart from the gateway's parser so that a bug
//! in one is caught by the other.

/// A Diia barcode as the simulator stores it: the 13 digits as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(u64);

impl Code {
    /// Appends the EAN-13 check digit to a 12-digit base in Diia's range.
    #[must_use]
    pub fn issue(base: u64) -> Option<Self> {
        if !(100_000_000_000..=999_999_999_999).contains(&base) {
            return None;
        }
        let digits: Vec<u32> = base
            .to_string()
            .chars()
            .filter_map(|c| c.to_digit(10))
            .collect();
        Some(Self(base * 10 + u64::from(check_digit(&digits))))
    }

    /// Reads 13 digits with a correct check digit; anything else is `None`.
    #[must_use]
    pub fn read(text: &str) -> Option<Self> {
        if text.len() != 13 || text.starts_with('0') {
            return None;
        }
        let digits: Vec<u32> = text
            .chars()
            .map(|c| c.to_digit(10))
            .collect::<Option<_>>()?;
        if check_digit(&digits[..12]) != digits[12] {
            return None;
        }
        text.parse().ok().map(Self)
    }

    /// The 13 digits.
    #[must_use]
    pub fn digits(self) -> String {
        format!("{:013}", self.0)
    }
}

/// EAN-13: weights 1, 3, 1, 3, … from the left over the first 12 digits.
fn check_digit(first_twelve: &[u32]) -> u32 {
    let sum: u32 = first_twelve
        .iter()
        .enumerate()
        .map(|(i, d)| if i % 2 == 1 { d * 3 } else { *d })
        .sum();
    (10 - sum % 10) % 10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_codes_read_back() {
        let code = Code::issue(338_979_807_209).expect("in range");
        assert_eq!(code.digits(), "3389798072091");
        assert_eq!(Code::read("3389798072091"), Some(code));
        assert_eq!(Code::read("3389798072090"), None);
        assert_eq!(Code::read("0389798072091"), None);
        assert_eq!(Code::read("338979807209"), None);
        assert_eq!(Code::issue(99), None);
    }
}
