//! CPU and NUMA node sets in libvirt's cpuset syntax: `0-3,^2,8`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest CPU (or node) number accepted: libvirt keeps CPU masks in a bitmap of
/// 16384 bits (`VIR_DOMAIN_CPUMASK_LEN`) and refuses a set that names a CPU beyond it.
pub const MAX_CPU: u32 = 16383;

/// Why a cpuset string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CpuSetError(pub String);

/// A set of CPU numbers (or NUMA node numbers), kept sorted.
///
/// Parsing follows libvirt's own parser (`virBitmapParse`) exactly, so that a set means
/// in berth what it means to `virsh`: comma-separated items applied from left to right,
/// each a CPU `N`, a range `N-M`, or an exclusion `^N` that removes one CPU from what
/// the items before it added (`^2,0-3` is `0-3`; `0-3,^2,2` is `0-3`). Ranges of
/// exclusions (`^1-3`) are refused; a trailing comma (`1,2,`) is accepted; spaces, tabs,
/// line breaks, form feeds and carriage returns may surround the numbers, the `-` of a
/// range and the commas, but not follow a `^`. The empty string, and a set from which
/// the exclusions remove every CPU, are refused, as libvirt refuses them everywhere it
/// takes a cpuset. [`fmt::Display`] writes the canonical form, as `virsh` does: `0-1,3`.
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

    /// Parses a CPU list as the kernel writes it (`/sys/devices/system/cpu/online`,
    /// `Cpus_allowed_list`, a cgroup's `cpuset.cpus`), where an empty (or blank) text is
    /// the empty set; anything else is parsed as [`CpuSet::from_str`] does.
    ///
    /// # Errors
    /// [`CpuSetError`] as for [`CpuSet::from_str`].
    pub fn parse_list(text: &str) -> Result<CpuSet, CpuSetError> {
        if text.bytes().all(is_libvirt_space) {
            return Ok(CpuSet::new());
        }
        text.parse()
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        CpuSet(iter.into_iter().collect())
    }
}

/// The white space libvirt skips around numbers and commas (`g_ascii_isspace`): not the
/// vertical tab.
fn is_libvirt_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0c' | b'\r')
}

/// A cursor over the bytes of a cpuset, with libvirt's lexical rules.
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(is_libvirt_space) {
            self.at += 1;
        }
    }

    /// A syntax error: what was wrong, and what a cpuset looks like.
    fn fail(&self, what: impl fmt::Display) -> CpuSetError {
        CpuSetError(format!(
            "{:?}: {what} (expected a list such as 0-3,^2,8)",
            self.text
        ))
    }

    /// An error in a well-formed cpuset.
    fn wrong(&self, what: impl fmt::Display) -> CpuSetError {
        CpuSetError(format!("{:?}: {what}", self.text))
    }

    /// What sits at the cursor, for a message.
    fn found(&self) -> String {
        match self.text[self.at..].chars().next() {
            None => "the end".to_owned(),
            Some(c) => format!("{c:?} at offset {}", self.at),
        }
    }

    /// Digits at the cursor, as a CPU number no larger than [`MAX_CPU`]; `negative`
    /// when a `-` sign came before them (only the end of a range can have one).
    fn number(&mut self, negative: bool) -> Result<u32, CpuSetError> {
        let from = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == from {
            return Err(self.fail(format_args!(
                "expected a CPU number, found {}",
                self.found()
            )));
        }
        let digits = &self.text[from..self.at];
        match (
            digits.parse::<u32>().ok().filter(|n| *n <= MAX_CPU),
            negative,
        ) {
            (Some(0), true) => Ok(0),
            (_, true) => Err(self.fail(format_args!(
                "-{digits} is negative; CPU numbers start at 0"
            ))),
            (Some(n), false) => Ok(n),
            (None, false) => Err(self.wrong(format_args!(
                "CPU {digits} is beyond the largest CPU number libvirt accepts, {MAX_CPU}"
            ))),
        }
    }
}

impl FromStr for CpuSet {
    type Err = CpuSetError;

    /// Parses a cpuset as libvirt's `virBitmapParse` does; see [`CpuSet`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut s = Scanner {
            text,
            bytes: text.as_bytes(),
            at: 0,
        };
        let mut set = BTreeSet::new();
        s.skip_spaces();
        if s.peek().is_none() {
            return Err(
                s.wrong("empty; a cpuset names at least one CPU (leave the field out for none)")
            );
        }
        while s.peek().is_some() {
            let exclude = s.peek() == Some(b'^');
            if exclude {
                s.at += 1;
            }
            match s.peek() {
                Some(b) if b.is_ascii_digit() => {}
                Some(b) if exclude && is_libvirt_space(b) => {
                    return Err(s.fail(format_args!(
                        "white space after the ^ at offset {}; write ^N",
                        s.at - 1
                    )))
                }
                Some(b',') => return Err(s.fail(format_args!("empty item at offset {}", s.at))),
                Some(b'-') => {
                    return Err(s.fail(format_args!(
                        "a negative number at offset {}; CPU numbers start at 0",
                        s.at
                    )))
                }
                _ => return Err(s.fail(format_args!("expected a CPU number, found {}", s.found()))),
            }
            let item = s.at - usize::from(exclude);
            let first = s.number(false)?;
            s.skip_spaces();
            match s.peek() {
                None | Some(b',') if exclude => {
                    set.remove(&first);
                }
                None | Some(b',') => {
                    set.insert(first);
                }
                Some(b'-') if exclude => {
                    return Err(s.wrong(format_args!(
                        "the exclusion at offset {item} is a range; an exclusion removes a single CPU (^1,^2 rather than ^1-2)"
                    )))
                }
                Some(b'-') => {
                    s.at += 1;
                    s.skip_spaces();
                    // The end of a range is read with strtol, which also skips a vertical
                    // tab and takes a sign.
                    while s.peek().is_some_and(|b| b == b'\x0b' || is_libvirt_space(b)) {
                        s.at += 1;
                    }
                    let negative = s.peek() == Some(b'-');
                    if matches!(s.peek(), Some(b'-' | b'+')) {
                        s.at += 1;
                    }
                    let last = s.number(negative)?;
                    if last < first {
                        return Err(s.wrong(format_args!(
                            "the range {first}-{last} starts after it ends (write {last}-{first})"
                        )));
                    }
                    set.extend(first..=last);
                    s.skip_spaces();
                }
                Some(_) => {}
            }
            match s.peek() {
                Some(b',') => {
                    s.at += 1;
                    s.skip_spaces();
                }
                None => break,
                Some(_) => {
                    return Err(s.fail(format_args!(
                        "expected a comma or the end, found {}",
                        s.found()
                    )))
                }
            }
        }
        if set.is_empty() {
            return Err(s.wrong(
                "the exclusions leave no CPU; a ^N item removes a CPU that an item before it added, as in 0-7,^5",
            ));
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

/// Reads what [`Serialize`] writes, so the empty set (`""`) reads back too: berth's own
/// JSON (status, state files) holds empty sets. Manifests are checked with
/// [`CpuSet::from_str`] before they are deserialized, so `""` is refused there.
impl<'de> Deserialize<'de> for CpuSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = CpuSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a cpuset such as \"0-3,^2,8\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<CpuSet, E> {
                CpuSet::parse_list(v).map_err(E::custom)
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

/// The shape of a cpuset as a regular expression, for editors: one item or more, commas
/// between them, one trailing comma, white space where libvirt skips it. The parser
/// checks the rest (order of a range's ends, the largest CPU, an empty result).
const SYNTAX: &str = concat!(
    r"^[ \t\n\f\r]*",
    r"(\^[0-9]+|[0-9]+([ \t\n\f\r]*-[ \t\n\v\f\r]*[+-]?[0-9]+)?)[ \t\n\f\r]*",
    r"(,[ \t\n\f\r]*(\^[0-9]+|[0-9]+([ \t\n\f\r]*-[ \t\n\v\f\r]*[+-]?[0-9]+)?)[ \t\n\f\r]*)*",
    r"(,[ \t\n\f\r]*)?$"
);

impl JsonSchema for CpuSet {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("CpuSet")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "a cpuset in libvirt syntax, such as \"0-3,^2,8\"",
            "anyOf": [
                {"type": "string", "pattern": SYNTAX},
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
    fn items_apply_from_left_to_right() {
        assert_eq!("0-3,^2,8".parse(), Ok(set(&[0, 1, 3, 8])));
        assert_eq!("0-10,^5".parse::<CpuSet>().unwrap().len(), 10);
        assert_eq!("^2,0-3".parse(), Ok(set(&[0, 1, 2, 3])));
        assert_eq!("0-3,^2,2".parse(), Ok(set(&[0, 1, 2, 3])));
        assert_eq!("1".parse(), Ok(set(&[1])));
    }

    #[test]
    fn white_space_and_commas_as_libvirt_takes_them() {
        assert_eq!(" 0 - 1 ".parse(), Ok(set(&[0, 1])));
        assert_eq!("1,2,".parse(), Ok(set(&[1, 2])));
        assert_eq!("1 ,\t2\r\n".parse(), Ok(set(&[1, 2])));
        assert_eq!("0-\x0b3".parse::<CpuSet>().map(|s| s.len()), Ok(4));
        assert_eq!("0-+3".parse::<CpuSet>().map(|s| s.len()), Ok(4));
        assert_eq!("0--0".parse(), Ok(set(&[0])));
        assert!("\x0b1".parse::<CpuSet>().is_err());
        assert!("0-3,^ 2".parse::<CpuSet>().is_err());
        assert!("1 2".parse::<CpuSet>().is_err());
    }

    #[test]
    fn bad_cpusets_say_why() {
        let e = |s: &str| s.parse::<CpuSet>().unwrap_err().0;
        assert!(e("").contains("empty; a cpuset names at least one CPU"));
        assert!(e("  ").contains("empty"));
        assert!(e("3-1").contains("the range 3-1 starts after it ends (write 1-3)"));
        assert!(e("1,,2").contains("empty item at offset 2"));
        assert!(e(",1").contains("empty item at offset 0"));
        assert!(e("^1-3").contains("an exclusion removes a single CPU"));
        assert!(e("0-3,^ 2").contains("white space after the ^"));
        assert!(e("^5").contains("the exclusions leave no CPU"));
        assert!(e("0,^0").contains("the exclusions leave no CPU"));
        assert!(e("16384").contains("beyond the largest CPU number libvirt accepts, 16383"));
        assert!(e("0-4294967296").contains("beyond the largest"));
        assert!(e("0-99999999999999999999").contains("beyond the largest"));
        assert!(e("a-b").contains("expected a CPU number, found 'a' at offset 0"));
        assert!(e("1-2-3").contains("expected a comma or the end, found '-' at offset 3"));
        assert!(e("-1").contains("a negative number at offset 0"));
        assert!(e("0,-3").contains("a negative number at offset 2"));
        assert!(e("2--1").contains("-1 is negative"));
        assert!(e("1-").contains("expected a CPU number, found the end"));
    }

    #[test]
    fn kernel_lists_may_be_empty() {
        assert_eq!(CpuSet::parse_list(""), Ok(CpuSet::new()));
        assert_eq!(CpuSet::parse_list("\n"), Ok(CpuSet::new()));
        assert_eq!(CpuSet::parse_list("0-1,4\n"), Ok(set(&[0, 1, 4])));
        let empty: CpuSet = serde_json::from_str("\"\"").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn the_editor_pattern_accepts_what_the_parser_accepts() {
        let re = regex_lite::Regex::new(SYNTAX).unwrap();
        for ok in ["0-3,^2,8", "1,2,", " 0 - 1 ", "0-+3", "0-\x0b3", "^2,0-3"] {
            assert!(re.is_match(ok), "{ok:?}");
        }
        for bad in ["", " ", "1,,2", "^1-3", "0-3,^ 2", "1 2", "\x0b1", "a"] {
            assert!(!re.is_match(bad), "{bad:?}");
        }
    }

    #[test]
    fn canonical_format() {
        assert_eq!(set(&[0, 1, 2, 3, 8, 10, 11]).to_string(), "0-3,8,10-11");
        assert_eq!(CpuSet::new().to_string(), "");
    }

    proptest! {
        #[test]
        fn round_trip(cpus in proptest::collection::btree_set(0u32..=MAX_CPU, 1..64)) {
            let s = CpuSet(cpus);
            prop_assert_eq!(s.to_string().parse::<CpuSet>(), Ok(s));
        }

        #[test]
        fn parser_never_panics(s in "[0-9,^ +\t\x0b-]{0,30}") {
            let _ = s.parse::<CpuSet>();
        }
    }
}
