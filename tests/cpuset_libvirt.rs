//! berth's cpuset parser against libvirt's own, on one table of strings.
//!
//! libvirt's parser is reached through `virsh -c test:///default` (package
//! `libvirt-clients`; the test driver runs inside virsh, no daemon): each string is put
//! in the `cpuset` of a domain's `<emulatorpin>`, the domain is defined, and the set
//! libvirt stored is read back from `dumpxml --xpath` (the attribute node as XML). libvirt refuses a
//! string (the define fails) or stores its canonical form; berth must refuse the same
//! strings and parse the others to the same set, written the same way.
//!
//! A few white-space characters cannot be written in XML 1.0 (vertical tab, form feed):
//! those strings go through `virsh vcpupin` instead, whose argument is parsed by the same
//! function, and are read back from `dumpxml` of the test driver's `test` domain.
//!
//! The test fails, rather than skips, when virsh is missing.

use std::process::{Command, Output};

use berth_schema::CpuSet;

/// Strings written with Rust escapes. Valid and invalid ones; libvirt decides which.
const TABLE: &[&str] = &[
    // Items apply from left to right.
    "0-3,^2,8",
    "0-10,^5",
    "^2,0-3",
    "0-3,^2,2",
    "1,^1,1",
    "0-3,^2,^2",
    "0-3,^0,^1,^2,^3,7",
    // Exclusions are single CPUs.
    "^1-3",
    "0-3,^1-2",
    "0-3^2",
    "0-3 ^2",
    // Commas.
    "1,2,",
    "0-3,",
    "1 ,",
    "1, ",
    "1,,2",
    ",1",
    "0-3,,",
    ",",
    // The empty string, blank strings, empty results.
    "",
    " ",
    "^5",
    "^2,",
    "0,^0",
    // White space.
    " 0-3 ",
    "0 - 3",
    "0 ,1",
    "0-3, ^2",
    "0-3,^ 2",
    "^ 2",
    "1 2",
    "\t1",
    "1\t",
    "0-\t3",
    "1\n",
    "\r1",
    "0\r\n-\r\n3",
    // Numbers.
    "0",
    "00-03",
    "3-3",
    "3-1",
    "0-+3",
    "0--0",
    "0- -1",
    "2--1",
    "+1",
    "-1",
    "0x10",
    "1-2-3",
    "1-",
    "a",
    "1a",
    "1.5",
    // Limits.
    "16383",
    "16384",
    "0-16383",
    "16380-16384",
    "2147483647",
    "2147483648",
    "4294967296",
    "99999999999999999999",
];

/// Strings with characters XML 1.0 cannot carry, checked through `vcpupin` (whose CPU
/// limit is the test driver's 8 CPUs, so the sets stay small).
const NOT_XML: &[&str] = &[
    "\x0b1", "1\x0b", "\x0c1", "1\x0c", "0-\x0b1", "0,\x0b1", "0-\x0c1",
];

/// libvirt's verdict: its canonical form of the set, or its error.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Set(String),
    Refused(String),
}

fn virsh(commands: &str) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", "test:///default", commands])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run virsh ({e}): this test needs libvirt's own cpuset parser; \
                 install it with `apt-get install libvirt-clients`"
            )
        })
}

/// Every character but the harmless ones as an XML character reference, so that the
/// attribute value reaches libvirt unchanged (a literal tab or line break in an
/// attribute would be normalized to a space by the XML parser).
fn xml_attribute(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ",^-+ ".contains(c) {
                c.to_string()
            } else {
                format!("&#{};", u32::from(c))
            }
        })
        .collect()
}

fn split_verdict(out: &Output, what: &str) -> Verdict {
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() && out.status.success() {
        // The attribute node, serialized by libxml2: `cpuset="0-1,3"`.
        let set = stdout
            .strip_prefix("cpuset=\"")
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("virsh printed no cpuset attribute for {what}: {stdout:?}"));
        Verdict::Set(set.to_owned())
    } else {
        assert!(
            !stderr.is_empty(),
            "virsh failed on {what} without saying why: {out:?}"
        );
        Verdict::Refused(stderr)
    }
}

/// libvirt's parse of `s` as the cpuset of `<emulatorpin>`.
fn libvirt_emulatorpin(s: &str, dir: &std::path::Path, i: usize) -> Verdict {
    let file = dir.join(format!("d{i}.xml"));
    let xml = format!(
        "<domain type='test'><name>cpuset{i}</name><memory>1024</memory>\
         <vcpu placement='static'>1</vcpu>\
         <cputune><emulatorpin cpuset='{}'/></cputune>\
         <os><type>hvm</type></os></domain>",
        xml_attribute(s)
    );
    std::fs::write(&file, xml).expect("write the domain XML");
    let out = virsh(&format!(
        "define {}; dumpxml cpuset{i} --xpath /domain/cputune/emulatorpin/@cpuset",
        file.display()
    ));
    split_verdict(&out, &format!("{s:?}"))
}

/// libvirt's parse of `s` given to `vcpupin` for vCPU 0 of the test domain, pinned and
/// read back in one virsh session (the pin lives as long as the connection).
fn libvirt_vcpupin(s: &str) -> Verdict {
    assert!(!s.contains('\''), "{s:?} cannot be quoted for virsh");
    let script = format!(
        "vcpupin test 0 '{s}'; \
         dumpxml test --xpath '/domain/cputune/vcpupin[@vcpu=0]/@cpuset'"
    );
    split_verdict(&virsh(&script), &format!("{s:?}"))
}

fn berth(s: &str) -> Verdict {
    match s.parse::<CpuSet>() {
        Ok(set) => Verdict::Set(set.to_string()),
        Err(e) => Verdict::Refused(e.to_string()),
    }
}

fn same(libvirt: &Verdict, berth: &Verdict) -> bool {
    match (libvirt, berth) {
        (Verdict::Set(a), Verdict::Set(b)) => a == b,
        (Verdict::Refused(_), Verdict::Refused(_)) => true,
        _ => false,
    }
}

#[test]
fn berth_parses_cpusets_exactly_as_libvirt_does() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut disagreements = Vec::new();
    let (mut valid, mut invalid) = (0, 0);
    for (i, s) in TABLE.iter().enumerate() {
        let theirs = libvirt_emulatorpin(s, dir.path(), i);
        let ours = berth(s);
        match &theirs {
            Verdict::Set(_) => valid += 1,
            Verdict::Refused(_) => invalid += 1,
        }
        if !same(&theirs, &ours) {
            disagreements.push(format!("{s:?}: libvirt {theirs:?}, berth {ours:?}"));
        }
    }
    for s in NOT_XML {
        let theirs = libvirt_vcpupin(s);
        let ours = berth(s);
        if !same(&theirs, &ours) {
            disagreements.push(format!(
                "{s:?} (vcpupin): libvirt {theirs:?}, berth {ours:?}"
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "berth and libvirt disagree on {} strings:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // The table exercises both sides of the grammar.
    assert!(
        valid >= 20 && invalid >= 20,
        "{valid} valid, {invalid} invalid"
    );
}
