//! Units as operators write them: sizes (`512MiB`, `2GiB`, `1G`), durations (`30ms`,
//! `1m30s`) and bandwidths (`1GiB/s`), each parsed once into a newtype.
//!
//! Size suffixes follow libvirt: `K`/`KiB`/`Ki`, `M`/`MiB`/`Mi`, `G`/`GiB`/`Gi`, ... are
//! powers of 1024; `KB`, `MB`, `GB`, ... are powers of 1000. A bare number is bytes.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a unit string could not be parsed. The message is written for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub String);

fn err(msg: impl Into<String>) -> UnitError {
    UnitError(msg.into())
}

const BINARY: [(&str, u64); 6] = [
    ("EiB", 1 << 60),
    ("PiB", 1 << 50),
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

fn size_multiplier(suffix: &str) -> Option<u64> {
    let m = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "e" | "ei" | "eib" => 1 << 60,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "eb" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    Some(m)
}

/// Splits `"1.5GiB"` into `("1.5", "GiB")`, trimming the space people put between them.
fn split_number(s: &str) -> (&str, &str) {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (s[..end].trim(), s[end..].trim())
}

/// `digits[.fraction] * multiplier`, exact, or an error when it overflows or is not a
/// whole number of the base unit.
fn scale(number: &str, multiplier: u64, what: &str, original: &str) -> Result<u64, UnitError> {
    let number = number.replace('_', "");
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number.as_str(), ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(err(format!("{original:?} has no number")));
    }
    if frac.contains('.') {
        return Err(err(format!("{original:?} is not a number")));
    }
    let too_large = || err(format!("{original:?} is too large for a {what}"));
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let mut value = int.checked_mul(multiplier as u128).ok_or_else(too_large)?;
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(err(format!("{original:?} has too many decimal places")));
        }
        let denom = 10u128.pow(frac.len() as u32);
        let frac: u128 = frac.parse().map_err(|_| too_large())?;
        let scaled = frac * multiplier as u128;
        if scaled % denom != 0 {
            return Err(err(format!(
                "{original:?} is not a whole number of {}",
                if what == "duration" {
                    "nanoseconds"
                } else {
                    "bytes"
                }
            )));
        }
        value = value.checked_add(scaled / denom).ok_or_else(too_large)?;
    }
    u64::try_from(value).map_err(|_| too_large())
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl Bytes {
    /// One kibibyte.
    pub const KIB: u64 = 1 << 10;
    /// One mebibyte.
    pub const MIB: u64 = 1 << 20;
    /// One gibibyte.
    pub const GIB: u64 = 1 << 30;

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Bytes(n << 20)
    }

    /// `n` gibibytes.
    pub const fn gib(n: u64) -> Self {
        Bytes(n << 30)
    }

    /// The number of bytes.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl FromStr for Bytes {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(err(format!("{s:?}: a size cannot be negative")));
        }
        let t = t.strip_prefix('+').unwrap_or(t);
        let (number, suffix) = split_number(t);
        let multiplier = size_multiplier(suffix).ok_or_else(|| {
            err(format!(
                "{s:?}: unknown size unit {suffix:?} (expected B, KiB, MiB, GiB, TiB, or KB, MB, GB...)"
            ))
        })?;
        scale(number, multiplier, "size", s).map(Bytes)
    }
}

impl fmt::Display for Bytes {
    /// The largest binary unit that divides the value exactly: `512MiB`, `3GiB`, `1000B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (name, unit) in BINARY {
                if self.0 % unit == 0 {
                    return write!(f, "{}{name}", self.0 / unit);
                }
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// A duration with nanosecond precision, written like Go and Kubernetes do: `30ms`,
/// `60s`, `1m30s`, `2h`. A bare `0` is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// `n` milliseconds.
    pub const fn from_millis(n: u64) -> Self {
        Duration(std::time::Duration::from_millis(n))
    }

    /// `n` seconds.
    pub const fn from_secs(n: u64) -> Self {
        Duration(std::time::Duration::from_secs(n))
    }

    /// The value as a standard duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

const DURATION_UNITS: [(&str, u64); 6] = [
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

impl FromStr for Duration {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.starts_with('-') {
            return Err(err(format!("{s:?}: a duration cannot be negative")));
        }
        if t == "0" {
            return Ok(Duration::default());
        }
        if t.is_empty() {
            return Err(err(
                "empty duration (expected for example 30ms, 60s, 1m30s)",
            ));
        }
        let mut rest = t;
        let mut total: u64 = 0;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let unit_end = rest[num_end..]
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .map_or(rest.len(), |i| num_end + i);
            let (number, unit) = (&rest[..num_end], rest[num_end..unit_end].trim());
            let nanos = DURATION_UNITS
                .iter()
                .find(|(name, _)| *name == unit || (unit == "µs" && *name == "us"))
                .map(|(_, n)| *n)
                .ok_or_else(|| {
                    err(format!(
                        "{s:?}: unknown duration unit {unit:?} (expected h, m, s, ms, us or ns)"
                    ))
                })?;
            let part = scale(number, nanos, "duration", s)?;
            total = total
                .checked_add(part)
                .ok_or_else(|| err(format!("{s:?} is too large for a duration")))?;
            rest = &rest[unit_end..];
        }
        Ok(Duration(std::time::Duration::from_nanos(total)))
    }
}

impl fmt::Display for Duration {
    /// The largest unit that divides the value exactly: `30ms`, `90s`, `2h`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos() as u64;
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (name, unit) in DURATION_UNITS {
            if nanos % unit == 0 {
                return write!(f, "{}{name}", nanos / unit);
            }
        }
        unreachable!("every duration is a whole number of nanoseconds")
    }
}

/// A transfer rate in bytes per second; zero means unlimited. Written `1GiB/s`,
/// `100MB/s`, or `0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bandwidth(pub u64);

impl Bandwidth {
    /// No cap.
    pub const UNLIMITED: Bandwidth = Bandwidth(0);

    /// Bytes per second, or `None` when unlimited.
    pub fn limit(self) -> Option<u64> {
        (self.0 != 0).then_some(self.0)
    }
}

impl FromStr for Bandwidth {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t == "0" || t.eq_ignore_ascii_case("unlimited") {
            return Ok(Bandwidth::UNLIMITED);
        }
        let size = t
            .strip_suffix("/s")
            .or_else(|| t.strip_suffix("ps"))
            .ok_or_else(|| {
                err(format!(
                    "{s:?}: a bandwidth is a size per second, for example 1GiB/s (0 = unlimited)"
                ))
            })?;
        let bytes: Bytes = size.parse()?;
        Ok(Bandwidth(bytes.0))
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{}/s", Bytes(self.0))
        }
    }
}

/// The hugepage sizes x86_64 offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 2 MiB pages (`/sys/kernel/mm/hugepages/hugepages-2048kB`).
    Huge2M,
    /// 1 GiB pages (`/sys/kernel/mm/hugepages/hugepages-1048576kB`).
    Huge1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }

    /// The size in KiB, as the kernel names its pools (`hugepages-2048kB`).
    pub const fn kib(self) -> u64 {
        self.bytes() >> 10
    }
}

impl FromStr for PageSize {
    type Err = UnitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<Bytes>() {
            Ok(b) if b.0 == 2 << 20 => Ok(PageSize::Huge2M),
            Ok(b) if b.0 == 1 << 30 => Ok(PageSize::Huge1G),
            _ => Err(err(format!(
                "{s:?} is not a hugepage size (expected 2MiB or 1GiB)"
            ))),
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&Bytes(self.bytes()), f)
    }
}

/// Serde and JSON Schema for a type that is written as a string (or, where a bare
/// number makes sense, an integer) and parsed with `FromStr`.
macro_rules! string_unit {
    ($ty:ty, $name:literal, $description:literal, $pattern:literal, $int_ok:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($description)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$ty, E> {
                        if $int_ok {
                            v.to_string().parse().map_err(E::custom)
                        } else {
                            Err(E::invalid_type(serde::de::Unexpected::Unsigned(v), &self))
                        }
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$ty, E> {
                        if $int_ok {
                            v.to_string().parse().map_err(E::custom)
                        } else {
                            Err(E::invalid_type(serde::de::Unexpected::Signed(v), &self))
                        }
                    }
                }
                d.deserialize_any(V)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                if $int_ok {
                    json_schema!({
                        "description": $description,
                        "anyOf": [
                            {"type": "string", "pattern": $pattern},
                            {"type": "integer", "minimum": 0}
                        ]
                    })
                } else {
                    json_schema!({
                        "description": $description,
                        "type": "string",
                        "pattern": $pattern
                    })
                }
            }
        }
    };
}

string_unit!(
    Bytes,
    "Bytes",
    "a size such as 512MiB, 2GiB or 1G (binary units; KB, MB, GB are decimal)",
    r"^\s*\+?[0-9_]*\.?[0-9]*\s*([KkMmGgTtPpEe]([Ii]?[Bb]?|[Ii])|[Bb])?\s*$",
    true
);
string_unit!(
    Duration,
    "Duration",
    "a duration such as 30ms, 60s or 1m30s",
    r"^\s*(0|([0-9]*\.?[0-9]+\s*(h|m|s|ms|us|µs|ns))+)\s*$",
    false
);
string_unit!(
    Bandwidth,
    "Bandwidth",
    "a bandwidth such as 1GiB/s or 100MB/s; 0 is unlimited",
    r"^\s*(0|unlimited|.+(/s|ps))\s*$",
    true
);
string_unit!(
    PageSize,
    "PageSize",
    "a hugepage size: 2MiB or 1GiB",
    r"^\s*(2\s*([Mm]([Ii]?[Bb]?|[Ii]))|1\s*([Gg]([Ii]?[Bb]?|[Ii]))|2048\s*([Kk]([Ii]?[Bb]?|[Ii])))\s*$",
    false
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_as_people_write_them() {
        assert_eq!("512MiB".parse(), Ok(Bytes::mib(512)));
        assert_eq!("2GiB".parse(), Ok(Bytes::gib(2)));
        assert_eq!("1G".parse(), Ok(Bytes::gib(1)));
        assert_eq!("1Gi".parse(), Ok(Bytes::gib(1)));
        assert_eq!("1GB".parse(), Ok(Bytes(1_000_000_000)));
        assert_eq!("1.5GiB".parse(), Ok(Bytes(3 << 29)));
        assert_eq!("4096".parse(), Ok(Bytes(4096)));
        assert_eq!(" 64 MiB ".parse(), Ok(Bytes::mib(64)));
    }

    #[test]
    fn bad_sizes_say_why() {
        let e = "-1GiB".parse::<Bytes>().unwrap_err().0;
        assert!(e.contains("negative"), "{e}");
        let e = "99999999PiB".parse::<Bytes>().unwrap_err().0;
        assert!(e.contains("too large"), "{e}");
        let e = "12 parsecs".parse::<Bytes>().unwrap_err().0;
        assert!(e.contains("unknown size unit"), "{e}");
        let e = "0.3B".parse::<Bytes>().unwrap_err().0;
        assert!(e.contains("whole number"), "{e}");
        assert!("GiB".parse::<Bytes>().is_err());
        assert!("1.2.3MiB".parse::<Bytes>().is_err());
    }

    #[test]
    fn sizes_format_in_the_largest_exact_unit() {
        assert_eq!(Bytes::mib(512).to_string(), "512MiB");
        assert_eq!(Bytes::gib(3).to_string(), "3GiB");
        assert_eq!(Bytes(1000).to_string(), "1000B");
        assert_eq!(Bytes(0).to_string(), "0B");
    }

    #[test]
    fn durations() {
        assert_eq!("30ms".parse(), Ok(Duration::from_millis(30)));
        assert_eq!("1m30s".parse(), Ok(Duration::from_secs(90)));
        assert_eq!("0".parse(), Ok(Duration::default()));
        assert_eq!("1.5s".parse(), Ok(Duration::from_millis(1500)));
        assert_eq!(Duration::from_secs(90).to_string(), "90s");
        assert_eq!(Duration::from_millis(30).to_string(), "30ms");
        assert!("30 fortnights".parse::<Duration>().is_err());
        assert!("-5s".parse::<Duration>().is_err());
        assert!("99999999999999h".parse::<Duration>().is_err());
    }

    #[test]
    fn bandwidths() {
        assert_eq!("1GiB/s".parse(), Ok(Bandwidth(1 << 30)));
        assert_eq!("0".parse(), Ok(Bandwidth::UNLIMITED));
        assert_eq!(Bandwidth(100 << 20).to_string(), "100MiB/s");
        assert!("1GiB".parse::<Bandwidth>().is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!("2MiB".parse(), Ok(PageSize::Huge2M));
        assert_eq!("2M".parse(), Ok(PageSize::Huge2M));
        assert_eq!("1GiB".parse(), Ok(PageSize::Huge1G));
        assert!("4KiB".parse::<PageSize>().is_err());
        assert_eq!(PageSize::Huge2M.to_string(), "2MiB");
    }

    #[test]
    fn yaml_accepts_strings_and_integers() {
        let b: Bytes = serde_yaml::from_str("1073741824").unwrap();
        assert_eq!(b, Bytes::gib(1));
        let b: Bytes = serde_yaml::from_str("\"256MiB\"").unwrap();
        assert_eq!(b, Bytes::mib(256));
        assert!(serde_yaml::from_str::<Duration>("30").is_err());
    }

    proptest! {
        #[test]
        fn bytes_round_trip(n in any::<u64>()) {
            let b = Bytes(n);
            prop_assert_eq!(b.to_string().parse::<Bytes>(), Ok(b));
        }

        #[test]
        fn bytes_round_trip_in_units(n in 0u64..1_000_000, shift in 0u32..4) {
            let b = Bytes(n << (10 * shift));
            prop_assert_eq!(b.to_string().parse::<Bytes>(), Ok(b));
        }

        #[test]
        fn durations_round_trip(n in any::<u64>()) {
            let d = Duration(std::time::Duration::from_nanos(n));
            prop_assert_eq!(d.to_string().parse::<Duration>(), Ok(d));
        }

        #[test]
        fn bandwidths_round_trip(n in any::<u64>()) {
            let b = Bandwidth(n);
            prop_assert_eq!(b.to_string().parse::<Bandwidth>(), Ok(b));
        }

        #[test]
        fn size_parser_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Bytes>();
            let _ = s.parse::<Duration>();
            let _ = s.parse::<Bandwidth>();
        }
    }
}
