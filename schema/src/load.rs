//! Loading a manifest repository: from a directory or file on disk, or from files held
//! in memory (a git revision), into a validated [`ManifestSet`].
//!
//! Loading never stops at the first problem: every file is read, every document is
//! checked against the schema, every clean document is checked against the others, and
//! all problems come back together.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::diagnostic::{self, Diagnostic, Location};
use crate::manifest::{Fleet, Guest, Host};
use crate::node::{parse_documents, Node};
use crate::semantic;
use crate::source::{child_path, index_path, Manifest, Origin, SourceMap};
use crate::structure::check_document;

/// The largest manifest file read, in bytes. Manifests are small; anything larger is a
/// mistake (a disk image committed by accident) and is refused before it is parsed.
pub const MAX_FILE_SIZE: u64 = 4 << 20;

/// The deepest directory level searched for manifests.
const MAX_DIR_DEPTH: usize = 32;

/// Every document of a repository revision, by kind and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestSet {
    /// Guests by name.
    pub guests: BTreeMap<String, Manifest<Guest>>,
    /// Hosts by name.
    pub hosts: BTreeMap<String, Manifest<Host>>,
    /// The repository-wide settings, if a `Fleet` document exists.
    pub fleet: Option<Manifest<Fleet>>,
}

impl ManifestSet {
    /// The guests placed on `host`, by name. This scans every guest: to visit the guests
    /// of every host, index them once with [`ManifestSet::guests_by_host`].
    pub fn guests_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Manifest<Guest>> {
        self.guests.values().filter(move |g| g.spec.host == host)
    }

    /// Every guest named to a host, grouped by that host (hosts without a Host document
    /// included), each group by name: one pass over the guests. Guests placed by
    /// `hostSelector` are in no group.
    pub fn guests_by_host(&self) -> HashMap<&str, Vec<&Manifest<Guest>>> {
        let mut by_host: HashMap<&str, Vec<&Manifest<Guest>>> = HashMap::new();
        for guest in self.guests.values().filter(|g| !g.spec.host.is_empty()) {
            by_host.entry(&guest.spec.host).or_default().push(guest);
        }
        by_host
    }
}

/// A repository revision that passed validation, and the warnings it raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The documents.
    pub manifests: ManifestSet,
    /// Problems that do not block applying the revision.
    pub warnings: Vec<Diagnostic>,
}

/// A repository revision that failed validation: every problem found, errors and
/// warnings, in file and line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Every problem, sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
}

impl Invalid {
    /// The number of errors (not warnings).
    pub fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.error_count();
        write!(
            f,
            "{n} error{} in the manifests",
            if n == 1 { "" } else { "s" }
        )?;
        for d in &self.diagnostics {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// Loads and validates the manifests at `path`: a directory (searched recursively for
/// `*.yaml`, `*.yml` and `*.json`, in sorted order, skipping hidden entries such as `.git`) or a
/// single file. File names in diagnostics start with `path` as given.
///
/// # Errors
/// [`Invalid`] with every problem found, when any is an error.
pub fn load_path(path: &Path) -> Result<Validated, Invalid> {
    let mut diagnostics = Vec::new();
    let files = match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let mut files = Vec::new();
            walk(path, 0, &mut files, &mut diagnostics);
            files.sort();
            files
        }
        Ok(_) => vec![path.to_path_buf()],
        Err(e) => {
            diagnostics.push(Diagnostic::error(
                path.display().to_string(),
                None,
                "",
                format!("cannot read: {e}"),
            ));
            return Err(finish_invalid(diagnostics));
        }
    };
    let mut sources = Vec::new();
    for file in files {
        let name = file.display().to_string();
        match read_capped(&file) {
            Ok(bytes) => sources.push((name, bytes)),
            Err(message) => diagnostics.push(Diagnostic::error(name, None, "", message)),
        }
    }
    load_sources(&path.display().to_string(), sources, diagnostics)
}

/// Loads and validates manifests held in memory, as `(file name, contents)`: the
/// reconciler reads them from a git revision. Every file is taken as a manifest file,
/// whatever its name; order does not matter.
///
/// # Errors
/// [`Invalid`] with every problem found, when any is an error.
pub fn load_files<I, N, B>(files: I) -> Result<Validated, Invalid>
where
    I: IntoIterator<Item = (N, B)>,
    N: Into<String>,
    B: AsRef<[u8]>,
{
    let mut diagnostics = Vec::new();
    let mut sources = Vec::new();
    for (name, bytes) in files {
        let name = name.into();
        let bytes = bytes.as_ref();
        if bytes.len() as u64 > MAX_FILE_SIZE {
            diagnostics.push(Diagnostic::error(
                name,
                None,
                "",
                too_large(bytes.len() as u64),
            ));
        } else {
            sources.push((name, bytes.to_vec()));
        }
    }
    sources.sort();
    load_sources("the repository", sources, diagnostics)
}

/// Whether `path` names a manifest file by its extension: `.yaml`, `.yml` or `.json`.
pub fn is_manifest_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

/// Whether a file is read as JSON (by its name, `*.json`).
fn is_json_name(file: &str) -> bool {
    Path::new(file)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Checks that a `.json` file is JSON, with JSON's own error and position, and makes it
/// ready for the YAML parser, which builds the tree with positions (JSON is YAML 1.2):
/// tabs become spaces, as YAML does not indent with tabs, and a character escaped as a
/// UTF-16 surrogate pair (`\ud83d\ude00`), which YAML does not know, is escaped as
/// YAML's `\U0001f600`, two characters shorter, so two spaces follow the string's
/// closing quote. Valid JSON has tabs only between tokens, and a tab and a space are one
/// column each, so every position stays true.
fn check_json(text: &str) -> Result<String, (Location, String)> {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Ok(json_for_yaml(text)),
        Err(e) => {
            let at = Location {
                line: e.line().max(1),
                column: e.column().max(1),
            };
            let message = e.to_string();
            let message = message
                .rfind(" at line ")
                .map_or(message.as_str(), |cut| &message[..cut]);
            Err((at, format!("invalid JSON: {message}")))
        }
    }
}

/// The rewriting [`check_json`] describes, of a text that is valid JSON.
fn json_for_yaml(text: &str) -> String {
    fn surrogate(hex: &str, range: std::ops::RangeInclusive<u32>) -> Option<u32> {
        u32::from_str_radix(hex, 16)
            .ok()
            .filter(|u| range.contains(u))
    }
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut pad = 0;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let mut step = c.len_utf8();
        match c {
            '"' => {
                out.push('"');
                if in_string {
                    out.extend(std::iter::repeat_n(' ', pad));
                    pad = 0;
                }
                in_string = !in_string;
            }
            '\\' if in_string => {
                let pair = rest.get(..12).and_then(|e| {
                    let high = surrogate(e.strip_prefix("\\u")?.get(..4)?, 0xd800..=0xdbff)?;
                    let low = surrogate(e.get(6..)?.strip_prefix("\\u")?, 0xdc00..=0xdfff)?;
                    Some(0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00))
                });
                match pair {
                    Some(code) => {
                        out.push_str(&format!("\\U{code:08x}"));
                        pad += 2;
                        step = 12;
                    }
                    None => {
                        // Any other escape: copied with the character it escapes, so
                        // that an escaped quote does not end the string.
                        out.push('\\');
                        if let Some(next) = rest[1..].chars().next() {
                            out.push(next);
                            step += next.len_utf8();
                        }
                    }
                }
            }
            '\t' => out.push(' '),
            c => out.push(c),
        }
        rest = &rest[step..];
    }
    out
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Collects manifest files under `dir`. Symbolic links to directories are not followed,
/// so a link loop cannot trap the search.
fn walk(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, out: &mut Vec<Diagnostic>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            out.push(Diagnostic::error(
                dir.display().to_string(),
                None,
                "",
                format!("cannot read the directory: {e}"),
            ));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                out.push(Diagnostic::error(
                    dir.display().to_string(),
                    None,
                    "",
                    format!("cannot read the directory: {e}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        if is_hidden(&path) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if depth + 1 >= MAX_DIR_DEPTH {
                out.push(Diagnostic::warning(
                    path.display().to_string(),
                    None,
                    "",
                    format!("not searched: deeper than {MAX_DIR_DEPTH} directory levels"),
                ));
            } else {
                walk(&path, depth + 1, files, out);
            }
        } else if is_manifest_file(&path) && (kind.is_file() || path.is_file()) {
            files.push(path);
        }
    }
}

fn too_large(len: u64) -> String {
    format!(
        "the file is {len} bytes, more than the {} MiB a manifest file may have",
        MAX_FILE_SIZE >> 20
    )
}

/// Reads a file, refusing to read past [`MAX_FILE_SIZE`] (a special file such as a
/// pipe or `/dev/zero` has no size to check beforehand).
fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        let len =
            fs::metadata(path).map_or(bytes.len() as u64, |m| m.len().max(bytes.len() as u64));
        return Err(too_large(len));
    }
    Ok(bytes)
}

/// Where the first byte that is not UTF-8 sits.
fn utf8_error(bytes: &[u8], error: &std::str::Utf8Error) -> (Location, String) {
    let valid = &bytes[..error.valid_up_to()];
    let text = String::from_utf8_lossy(valid);
    let line = text.matches('\n').count() + 1;
    let column = text.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let bad = bytes.get(error.valid_up_to()).copied().unwrap_or(0);
    (
        Location { line, column },
        format!(
            "the file is not UTF-8 text (byte 0x{bad:02x} at offset {})",
            error.valid_up_to()
        ),
    )
}

/// A document that passed the structural checks, typed.
pub(crate) enum Typed {
    Guest(Box<Guest>),
    Host(Box<Host>),
    Fleet(Fleet),
}

fn finish_invalid(mut diagnostics: Vec<Diagnostic>) -> Invalid {
    diagnostic::sort(&mut diagnostics);
    Invalid { diagnostics }
}

/// What one file yields: its typed documents, its problems, how many documents it had,
/// and whether every Host document in it made it through.
#[derive(Default)]
struct FileResult {
    documents: Vec<(Origin, Typed)>,
    diagnostics: Vec<Diagnostic>,
    seen_documents: usize,
    hosts_complete: bool,
}

/// Reads, parses, checks and types the documents of one file.
fn load_file(file: &str, bytes: &[u8]) -> FileResult {
    let mut result = FileResult {
        hosts_complete: true,
        ..FileResult::default()
    };
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let (at, message) = utf8_error(bytes, &e);
            result
                .diagnostics
                .push(Diagnostic::error(file, Some(at), "", message));
            result.hosts_complete = false;
            return result;
        }
    };
    let json_text;
    let text = if is_json_name(file) {
        match check_json(text) {
            Ok(text) => {
                json_text = text;
                json_text.as_str()
            }
            Err((at, message)) => {
                result
                    .diagnostics
                    .push(Diagnostic::error(file, Some(at), "", message));
                result.hosts_complete = false;
                return result;
            }
        }
    } else {
        text
    };
    let (docs, syntax_error) = parse_documents(text);
    if let Some(e) = syntax_error {
        result
            .diagnostics
            .push(Diagnostic::error(file, Some(e.at), "", e.message));
        result.hosts_complete = false;
    }
    for doc in docs {
        if is_json_schema(&doc) {
            continue;
        }
        result.seen_documents += 1;
        match check_and_type(file, &doc, &mut result.diagnostics) {
            Some(typed) => {
                let origin = Origin {
                    file: file.to_owned(),
                    at: doc.at,
                    spans: SourceMap::of(doc),
                };
                result.documents.push((origin, typed));
            }
            None => {
                if doc.get_str("kind").is_none_or(|k| k == "Host") {
                    result.hosts_complete = false;
                }
            }
        }
    }
    result
}

/// Below this many files, loading stays on the calling thread.
const PARALLEL_FROM: usize = 64;

/// [`load_file`] over every source, in order, on as many threads as there are CPUs:
/// files are independent until their documents are checked against each other.
fn load_all(sources: &[(String, Vec<u8>)]) -> Vec<FileResult> {
    let load = |(file, bytes): &(String, Vec<u8>)| load_file(file, bytes);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads < 2 || sources.len() < PARALLEL_FROM {
        return sources.iter().map(load).collect();
    }
    let chunk = sources.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = sources
            .chunks(chunk)
            .map(|files| scope.spawn(move || files.iter().map(load).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

fn load_sources(
    root: &str,
    sources: Vec<(String, Vec<u8>)>,
    mut diagnostics: Vec<Diagnostic>,
) -> Result<Validated, Invalid> {
    let mut documents: Vec<(Origin, Typed)> = Vec::new();
    let mut seen_documents = 0usize;
    // Whether every Host document made it through; when one did not, "unknown host"
    // errors would only repeat the real problem.
    let mut hosts_complete = true;
    for result in load_all(&sources) {
        documents.extend(result.documents);
        diagnostics.extend(result.diagnostics);
        seen_documents += result.seen_documents;
        hosts_complete &= result.hosts_complete;
    }
    if seen_documents == 0 && diagnostics.iter().all(|d| !d.is_error()) {
        diagnostics.push(Diagnostic::error(
            root,
            None,
            "",
            "no manifests found (expected Guest and Host documents in .yaml, .yml or .json files)",
        ));
    }
    let (manifests, more) = semantic::assemble(documents, hosts_complete);
    diagnostics.extend(more);
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(finish_invalid(diagnostics));
    }
    diagnostic::sort(&mut diagnostics);
    Ok(Validated {
        manifests,
        warnings: diagnostics,
    })
}

/// The top-level key a document may carry to name its JSON Schema for an editor (the
/// JSON counterpart of the yaml-language-server modeline); berth ignores its value.
pub const SCHEMA_KEY: &str = "$schema";

/// Whether a document is a JSON Schema rather than a manifest: it has `$schema` but
/// neither `apiVersion` nor `kind` (a copy of `berth.schema.json` kept beside the
/// manifests for editors). Such documents are skipped.
fn is_json_schema(doc: &Node) -> bool {
    doc.get(SCHEMA_KEY).is_some() && doc.get("apiVersion").is_none() && doc.get("kind").is_none()
}

/// Structural checks, then deserialization into the manifest types.
fn check_and_type(file: &str, doc: &Node, out: &mut Vec<Diagnostic>) -> Option<Typed> {
    let before = out.len();
    let kind = check_document(file, doc, out)?;
    if out.len() > before {
        return None;
    }
    let mut value = doc.to_json();
    if let serde_json::Value::Object(map) = &mut value {
        map.remove(SCHEMA_KEY);
    }
    let typed = match kind {
        "Guest" => serde_path_to_error::deserialize(value).map(|g| Typed::Guest(Box::new(g))),
        "Host" => serde_path_to_error::deserialize(value).map(|h| Typed::Host(Box::new(h))),
        _ => serde_path_to_error::deserialize(value).map(Typed::Fleet),
    };
    match typed {
        Ok(typed) => Some(typed),
        Err(e) => {
            // The schema and the types come from the same source, so this means a value
            // the schema cannot express; it is still reported where it is.
            let mut path = String::new();
            for segment in e.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Map { key } => path = child_path(&path, key),
                    serde_path_to_error::Segment::Seq { index } => {
                        path = index_path(&path, *index);
                    }
                    _ => {}
                }
            }
            let origin = Origin {
                file: file.to_owned(),
                at: doc.at,
                spans: SourceMap::of(doc.clone()),
            };
            let at = origin.locate(&path);
            out.push(Diagnostic::error(
                file,
                Some(at),
                path,
                format!("cannot read the {kind}: {}", e.inner()),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOST: &str = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\nspec: {address: \"127.0.0.1:7410\", cpus: 0-1, memory: 4GiB}\n";
    const GUEST: &str = "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\nspec:\n  host: kvm01\n  cpu: {vcpus: 1}\n  memory: {size: 64MiB}\n";

    #[test]
    fn loads_from_memory_with_origins() {
        let both = format!("{HOST}---\n{GUEST}");
        let v = load_files([("repo/all.yaml", both.as_bytes())]).unwrap();
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        let guest = &v.manifests.guests["web-1"];
        assert_eq!(guest.origin.file, "repo/all.yaml");
        assert_eq!(guest.origin.at.line, 6);
        assert_eq!(
            guest.origin.locate("spec.memory.size"),
            Location {
                line: 12,
                column: 18
            }
        );
        assert_eq!(v.manifests.guests_on("kvm01").count(), 1);
        assert_eq!(v.manifests.guests_by_host()["kvm01"].len(), 1);
        assert!(v.manifests.fleet.is_none());
    }

    #[test]
    fn an_empty_repository_is_an_error() {
        let e = load_files(Vec::<(String, Vec<u8>)>::new()).unwrap_err();
        assert_eq!(e.error_count(), 1);
        assert!(e.diagnostics[0].message.starts_with("no manifests found"));
        let e = load_files([("a.yaml", "# nothing\n---\n")]).unwrap_err();
        assert!(e.diagnostics[0].message.starts_with("no manifests found"));
    }

    #[test]
    fn not_utf8_names_the_place() {
        let e = load_files([("bad.yaml", b"a: 1\nb: \xff\n".as_slice())]).unwrap_err();
        let d = &e.diagnostics[0];
        assert_eq!((d.line, d.column), (Some(2), Some(4)));
        assert!(d.message.contains("not UTF-8"), "{d}");
    }

    #[test]
    fn oversized_files_are_refused_unread() {
        let big = vec![b'#'; MAX_FILE_SIZE as usize + 1];
        let e = load_files([("big.yaml", big)]).unwrap_err();
        assert!(
            e.diagnostics[0].message.contains("more than the 4 MiB"),
            "{e}"
        );
    }

    #[test]
    fn walks_directories_in_order_and_skips_hidden_ones() {
        let dir = std::env::temp_dir().join(format!("berth-load-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("b/c")).unwrap();
        fs::create_dir_all(dir.join(".git")).unwrap();
        fs::write(dir.join("a.yml"), HOST).unwrap();
        fs::write(dir.join("b/c/guest.yaml"), GUEST).unwrap();
        fs::write(dir.join("b/notes.txt"), "not yaml").unwrap();
        fs::write(dir.join(".git/x.yaml"), "broken: [").unwrap();
        let v = load_path(&dir).unwrap();
        assert_eq!(v.manifests.hosts.len(), 1);
        assert_eq!(
            v.manifests.guests["web-1"].origin.file,
            dir.join("b/c/guest.yaml").display().to_string()
        );
        // A single file works too; this one alone names an unknown host.
        let e = load_path(&dir.join("b/c/guest.yaml")).unwrap_err();
        assert!(
            e.diagnostics[0].message.contains("unknown host kvm01"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The host and guest of the YAML tests, as JSON, indented with tabs as `jq --tab`
    /// writes it.
    const HOST_JSON: &str = "{\n\t\"apiVersion\": \"berth.dev/v1\",\n\t\"kind\": \"Host\",\n\t\"metadata\": {\"name\": \"kvm01\"},\n\t\"spec\": {\"address\": \"127.0.0.1:7410\", \"cpus\": \"0-1\", \"memory\": \"4GiB\"}\n}\n";

    fn messages(e: &Invalid) -> Vec<String> {
        e.diagnostics.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn json_manifests_load_with_positions() {
        let guest = r#"{"apiVersion":"berth.dev/v1","kind":"Guest","metadata":{"name":"web-1"},
 "spec": {
  "host": "kvm01",
  "cpu": {"vcpus": 2, "pinning": {"vcpus": {"0": "1", "1": 0}, "emulator": "0-1"}},
  "memory": {"size": "64MiB"}
 }
}"#;
        let v = load_files([("h.json", HOST_JSON), ("g.json", guest)]).unwrap();
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        let g = &v.manifests.guests["web-1"];
        let pins = &g.spec.cpu.pinning.as_ref().unwrap().vcpus;
        assert_eq!(pins[&0].to_string(), "1");
        assert_eq!(pins[&1].to_string(), "0");
        assert_eq!(
            g.origin.locate("spec.memory.size"),
            Location {
                line: 5,
                column: 22
            }
        );
        assert_eq!(
            v.manifests.hosts["kvm01"].origin.locate("spec.cpus"),
            Location {
                line: 5,
                column: 48
            }
        );
    }

    #[test]
    fn quoted_keys_in_flow_yaml_read_as_integers() {
        let text = GUEST.replace(
            "cpu: {vcpus: 1}",
            "cpu: {vcpus: 1, pinning: {vcpus: {\"0\": \"1\"}}}",
        );
        let v = load_files([("h.yaml", HOST), ("g.yaml", text.as_str())]).unwrap();
        let pins = &v.manifests.guests["web-1"]
            .spec
            .cpu
            .pinning
            .as_ref()
            .unwrap()
            .vcpus;
        assert_eq!(pins[&0].to_string(), "1");
    }

    #[test]
    fn json_errors_are_as_good_as_yaml_errors_and_all_reported() {
        let guest = "{\n  \"apiVersion\": \"berth.dev/v1\",\n  \"kind\": \"Guest\",\n  \"metadata\": {\"name\": \"web-1\"},\n  \"spec\": {\n    \"host\": \"kvm01\",\n    \"cpu\": {\"vcpus\": \"two\", \"pinning\": {\"vcpus\": {\"0\": \"1\", \"99999999999\": \"0\"}}},\n    \"memroy\": {\"size\": \"64MiB\"}\n  }\n}\n";
        let e = load_files([("h.json", HOST_JSON), ("g.json", guest)]).unwrap_err();
        assert_eq!(
            messages(&e),
            [
                "g.json:5:3: error: spec.memory: missing field memory",
                "g.json:7:22: error: spec.cpu.vcpus: expected an integer, found the string \"two\"",
                "g.json:7:61: error: spec.cpu.pinning.vcpus.99999999999: key 99999999999 is out of range (expected at most 4294967295)",
                "g.json:8:5: error: spec.memroy: unknown field memroy, did you mean memory?",
            ]
        );
    }

    #[test]
    fn json_surrogate_pairs_keep_positions() {
        let host = HOST_JSON.replace(
            "{\"name\": \"kvm01\"}",
            "{\"name\": \"kvm01\", \"labels\": {\"x\": \"a\\ud83d\\ude00\\\"\\u00e9\", \"y\": \"b\"}}",
        );
        let v = load_files([("h.json", host.as_str())]).unwrap();
        let h = &v.manifests.hosts["kvm01"];
        assert_eq!(h.metadata.labels["x"], "a\u{1f600}\"\u{e9}");
        let line = host.lines().nth(3).unwrap();
        let column = line[..line.find("\"b\"").unwrap()].chars().count() + 1;
        assert_eq!(
            h.origin.locate("metadata.labels.y"),
            Location { line: 4, column }
        );
    }

    #[test]
    fn json_syntax_errors_are_json_errors() {
        let e = load_files([
            ("g.json", "{\n  \"kind\": \"Guest\",\n}\n"),
            ("h.json", HOST_JSON),
        ])
        .unwrap_err();
        assert_eq!(
            messages(&e),
            ["g.json:3:1: error: invalid JSON: key must be a string"]
        );
    }

    #[test]
    fn a_schema_key_is_allowed_and_schema_files_are_skipped() {
        let host = HOST_JSON.replace(
            "{\n",
            "{\n\t\"$schema\": \"../schema/berth.schema.json\",\n",
        );
        let schema = crate::json_schema_text();
        let v = load_files([
            ("h.json", host.as_str()),
            ("berth.schema.json", schema.as_str()),
        ])
        .unwrap();
        assert_eq!(v.manifests.hosts.len(), 1);
        let yaml = format!("$schema: ./berth.schema.json\n{HOST}");
        assert!(load_files([("h.yaml", yaml)]).is_ok());
    }

    #[test]
    fn json_files_are_found_in_directories() {
        let dir = std::env::temp_dir().join(format!("berth-load-json-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("hosts.json"), HOST_JSON).unwrap();
        fs::write(dir.join("guest.yaml"), GUEST).unwrap();
        let v = load_path(&dir).unwrap();
        assert_eq!(
            v.manifests.hosts["kvm01"].origin.file,
            dir.join("hosts.json").display().to_string()
        );
        assert_eq!(v.manifests.guests.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = load_files([("x.yaml", bytes.clone())]);
            let _ = load_files([("x.json", bytes)]);
        }

        #[test]
        fn never_panics_on_mangled_manifests(cut in 0usize..300, junk in "[ :\\[\\]{}\\-,&*!|>'\"#a-z0-9\n]{0,12}") {
            let text = format!("{HOST}---\n{GUEST}");
            let cut = cut.min(text.len());
            let mangled = format!("{}{junk}{}", &text[..cut], &text[cut..]);
            let _ = load_files([("x.yaml", mangled)]);
        }
    }
}
