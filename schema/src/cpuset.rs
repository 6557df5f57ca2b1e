//! CPU and NUMA node sets in libvirt's cpuset syntax: `0-3,^2,8`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest CPU (or node) number accepted: Linux's NR_CPUS tops out at 8192.
pub const MAX_CPU: u32 = 8191;

/// Why a cpuset string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CpuSetError(pub String);

/// A set of CPU numbers (or NUMA node numbers), kept sorted.
///
/// Parsing accepts libvirt's syntax: comma-separated numbers and ranges, where `^N` or
/// `^N-M` removes CPUs from what the other items add. `""` is the empty set.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuSet(BTreeSet<u32>);

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the set has no CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// Adds `cpu`.
    pub fn insert(&mut self, cpu: u32) {
        self.0.insert(cpu);
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// Whether every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The CPUs in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.intersection(&other.0).copied().collect())
    }

    /// The CPUs of `self` that are not in `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.difference(&other.0).copied().collect())
    }

    /// The CPUs in either set.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        CpuSet(self.0.union(&other.0).copied().collect())
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        CpuSet(iter.into_iter().collect())
    }
}

fn parse_cpu(s: &str, whole: &str) -> Result<u32, CpuSetError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CpuSetError(format!(
            "{whole:?}: {s:?} is not a CPU number (expected a list like 0-3,^2,8)"
        )));
    }
    match s.parse::<u32>() {
        Ok(n) if n <= MAX_CPU => Ok(n),
        _ => Err(CpuSetError(format!(
            "{whole:?}: CPU {s} is beyond the largest supported CPU number {MAX_CPU}"
        ))),
    }
}

impl FromStr for CpuSet {
    type Err = CpuSetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = BTreeSet::new();
        let mut excluded = BTreeSet::new();
        if s.trim().is_empty() {
            return Ok(CpuSet::default());
        }
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(CpuSetError(format!(
                    "{s:?}: empty item between commas (expected a list like 0-3,^2,8)"
                )));
            }
            let (negate, range) = match item.strip_prefix('^') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            if range.trim_start().starts_with('-') {
                return Err(CpuSetError(format!(
                    "{s:?}: {item} is negative; CPU numbers start at 0"
                )));
            }
            let (start, end) = match range.split_once('-') {
                Some((a, b)) => (parse_cpu(a, s)?, parse_cpu(b, s)?),
                None => {
                    let n = parse_cpu(range, s)?;
                    (n, n)
                }
            };
            if start > end {
                return Err(CpuSetError(format!(
                    "{s:?}: range {start}-{end} starts after it ends (write {end}-{start})"
                )));
            }
            let target = if negate { &mut excluded } else { &mut set };
            target.extend(start..=end);
        }
        if set.is_empty() && !excluded.is_empty() {
            return Err(CpuSetError(format!(
                "{s:?}: only exclusions; a ^ item removes CPUs from a list such as 0-7,^5"
            )));
        }
        for cpu in &excluded {
            set.remove(cpu);
        }
        if set.is_empty() {
            return Err(CpuSetError(format!(
                "{s:?}: the exclusions remove every CPU"
            )));
        }
        Ok(CpuSet(set))
    }
}

impl fmt::Display for CpuSet {
    /// Canonical form: ascending, ranges collapsed, no exclusions: `0-3,8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.0.iter().copied().peekable();
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end = iter.next().expect("peeked");
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CpuSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a cpuset such as \"0-3,^2,8\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CpuSet, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<CpuSet, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<CpuSet, E> {
                v.to_string().parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for CpuSet {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("CpuSet")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "a cpuset in libvirt syntax, such as \"0-3,^2,8\"",
            "anyOf": [
                {"type": "string", "pattern": r"^\s*(\^?[0-9]+(-[0-9]+)?\s*(,\s*\^?[0-9]+(-[0-9]+)?\s*)*)?$"},
                {"type": "integer", "minimum": 0, "maximum": MAX_CPU}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(cpus: &[u32]) -> CpuSet {
        cpus.iter().copied().collect()
    }

    #[test]
    fn libvirt_syntax() {
        assert_eq!("0-3,^2,8".parse(), Ok(set(&[0, 1, 3, 8])));
        assert_eq!("0-10,^5".parse::<CpuSet>().unwrap().len(), 10);
        assert_eq!("1".parse(), Ok(set(&[1])));
        assert_eq!(" 0 - 1 ".parse::<CpuSet>().map(|s| s.len()), Ok(2));
        assert_eq!("".parse(), Ok(CpuSet::new()));
    }

    #[test]
    fn bad_cpusets_say_why() {
        let e = |s: &str| s.parse::<CpuSet>().unwrap_err().0;
        assert!(e("3-1").contains("starts after it ends"));
        assert!(e("1,,2").contains("empty item"));
        assert!(e("^5").contains("only exclusions"));
        assert!(e("0-4294967295").contains("beyond the largest"));
        assert!(e("0-99999999999999999999").contains("beyond the largest"));
        assert!(e("a-b").contains("not a CPU number"));
        assert!(e("0,^0").contains("remove every CPU"));
        assert!(e("-1").contains("is negative"));
        assert!(e("0,-3").contains("is negative"));
    }

    #[test]
    fn canonical_format() {
        assert_eq!(set(&[0, 1, 2, 3, 8, 10, 11]).to_string(), "0-3,8,10-11");
        assert_eq!(CpuSet::new().to_string(), "");
    }

    proptest! {
        #[test]
        fn round_trip(cpus in proptest::collection::btree_set(0u32..=MAX_CPU, 0..64)) {
            let s = CpuSet(cpus);
            prop_assert_eq!(s.to_string().parse::<CpuSet>(), Ok(s));
        }

        #[test]
        fn parser_never_panics(s in "[0-9,^ -]{0,30}") {
            let _ = s.parse::<CpuSet>();
        }
    }
}
