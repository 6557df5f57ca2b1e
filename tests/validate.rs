//! End-to-end tests of `berth validate` and `berth schema` over the real binary.
//!
//! The broken manifests under `tests/fixtures/broken/` (one directory per theme, each a
//! repository of its own) are validated and the whole output compared with
//! `tests/fixtures/broken.expected`. After an intended change of wording, regenerate
//! that file with
//!
//!     BERTH_UPDATE_SNAPSHOTS=1 cargo test -p berth-tests --test validate
//!
//! and review the diff.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use berth_tests::{command, workspace_root};

fn berth(args: &[&str]) -> Output {
    command("berth")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("run berth")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("berth prints UTF-8")
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("berth-validate-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("temp dir is UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn broken_manifests_get_exactly_the_expected_errors() {
    let root = workspace_root();
    let mut dirs: Vec<PathBuf> = fs::read_dir(root.join("tests/fixtures/broken"))
        .expect("read tests/fixtures/broken")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "fixture directories missing: {dirs:?}");
    let mut transcript = String::new();
    for dir in dirs {
        let rel = dir.strip_prefix(&root).expect("under the workspace");
        let rel = rel.to_str().expect("UTF-8 path");
        let out = berth(&["validate", rel]);
        transcript.push_str(&format!("$ berth validate {rel}\n"));
        transcript.push_str(&stdout(&out));
        transcript.push_str(&format!("[exit {}]\n\n", out.status.code().unwrap_or(-1)));
        assert_eq!(out.status.code(), Some(1), "{rel} should be invalid");
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let expected_path = root.join("tests/fixtures/broken.expected");
    if std::env::var_os("BERTH_UPDATE_SNAPSHOTS").is_some() {
        fs::write(&expected_path, &transcript).expect("write the snapshot");
        return;
    }
    let expected = fs::read_to_string(&expected_path).unwrap_or_default();
    if expected != transcript {
        let first = expected
            .lines()
            .zip(transcript.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| expected.lines().count().min(transcript.lines().count()));
        panic!(
            "berth validate output differs from tests/fixtures/broken.expected at line {}:\n\
             expected: {:?}\n     got: {:?}\n\nfull output:\n{transcript}\n\
             If the change is intended: BERTH_UPDATE_SNAPSHOTS=1 cargo test -p berth-tests --test validate",
            first + 1,
            expected.lines().nth(first),
            transcript.lines().nth(first),
        );
    }
}

#[test]
fn the_example_repository_is_valid() {
    let out = berth(&["validate", "manifests"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("manifests: valid:"), "{text}");
    assert!(!text.contains("error"), "{text}");
}

#[test]
fn json_output_parses_and_matches_the_text() {
    let out = berth(&[
        "validate",
        "tests/fixtures/broken/semantic",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(report["valid"], false);
    let diagnostics = report["diagnostics"]
        .as_array()
        .expect("a diagnostics array");
    let errors = diagnostics
        .iter()
        .filter(|d| d["severity"] == "error")
        .count();
    assert_eq!(report["errors"], errors);
    assert!(errors > 10);
    let first = &diagnostics[0];
    assert!(first["file"]
        .as_str()
        .unwrap()
        .starts_with("tests/fixtures/broken/semantic/"));
    assert!(first["line"].as_u64().unwrap() >= 1);
    assert!(first["path"].is_string() && first["message"].is_string());

    let out = berth(&["validate", "manifests", "--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(report["valid"], true);
    assert!(report["guests"].as_u64().unwrap() >= 2);
}

#[test]
fn an_empty_directory_is_invalid() {
    let dir = TempDir::new("empty");
    fs::write(dir.0.join("README.txt"), "no manifests here").unwrap();
    let out = berth(&["validate", dir.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{}: error: no manifests found", dir.arg())),
        "{text}"
    );
}

#[test]
fn a_missing_path_is_invalid() {
    let out = berth(&["validate", "tests/fixtures/no-such-dir"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("tests/fixtures/no-such-dir: error: cannot read"));
}

#[test]
fn a_file_that_is_not_utf8_is_named_with_its_position() {
    let dir = TempDir::new("utf8");
    fs::write(
        dir.0.join("latin1.yaml"),
        b"apiVersion: berth.dev/v1\nkind: Host # caf\xe9\n",
    )
    .unwrap();
    let out = berth(&["validate", dir.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let expected = format!(
        "{}/latin1.yaml:2:17: error: the file is not UTF-8 text (byte 0xe9 at offset 41)",
        dir.arg()
    );
    assert!(text.contains(&expected), "{text}");
}

#[test]
fn a_50_mb_file_is_refused_quickly() {
    let dir = TempDir::new("big");
    let path = dir.0.join("huge.yaml");
    let line = "# padding padding padding padding padding padding padding padding\n";
    let body = line.repeat(50 * 1024 * 1024 / line.len());
    fs::write(&path, &body).unwrap();
    berth_tests::bin("berth"); // built before the clock starts
    let started = Instant::now();
    let out = berth(&["validate", path.to_str().unwrap()]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "huge.yaml: error: the file is {} bytes, more than the 4 MiB",
            body.len()
        )),
        "{text}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn schema_prints_the_checked_in_schema() {
    let out = berth(&["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let file = fs::read_to_string(workspace_root().join("schema/berth.schema.json")).unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert_eq!(printed, checked_in);
    assert_eq!(
        printed["properties"]["kind"]["enum"],
        serde_json::json!(["Guest", "Host", "Fleet"])
    );
}

#[test]
fn every_example_file_carries_the_schema_modeline() {
    let dir = workspace_root().join("manifests");
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# yaml-language-server: $schema=../schema/berth.schema.json"),
                "{} lacks the modeline",
                Path::new(&path).display()
            );
        }
    }
}
