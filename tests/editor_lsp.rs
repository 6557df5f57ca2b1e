//! Editor support, checked with the real `yaml-language-server` (npm) over its stdio
//! protocol: berth's JSON Schema validates every document of a multi-document file when
//! the schema is associated as the README says.
//!
//! yaml-language-server takes a `# yaml-language-server: $schema=...` modeline as part of
//! the document it sits in, so a modeline at the top of a file covers the first document
//! only; a modeline at the top of each document, or an association by file pattern in
//! the editor's settings (`yaml.schemas`), covers them all. Each way is driven here:
//! `initialize`, `workspace/didChangeConfiguration`, `textDocument/didOpen` of a file
//! with a problem in its first and in its second document, then the server's
//! `textDocument/publishDiagnostics` is read.
//!
//! The test fails, rather than skips, when yaml-language-server is missing
//! (`npm install -g yaml-language-server`; `.ci/run` installs it).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use berth_tests::workspace_root;
use serde_json::{json, Value};

/// How long the server may take to answer; node starts slowly on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(60);

const MODELINE: &str = "# yaml-language-server: $schema=../schema/berth.schema.json\n";

/// A Host with an unknown field on its line 4, and a Guest with a misspelled field on its
/// line 7.
const HOST: &str = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                    spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB, bogus: 1}\n";
const GUEST: &str = "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\nspec:\n  \
                     host: kvm01\n  cpu: {vcpus: 1}\n  memory: {size: 64MiB, hardlimit: 1GiB}\n";

/// The server, its input, and the messages it sends, read on a thread.
struct Server {
    child: Child,
    input: ChildStdin,
    messages: Receiver<Value>,
    next_id: u64,
    settings: Value,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_message(reader: &mut impl BufRead) -> Option<Value> {
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = vec![0; length?];
    reader.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

impl Server {
    fn start(root: &Path, settings: Value) -> Server {
        let mut child = Command::new("yaml-language-server")
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run yaml-language-server ({e}): this test needs it; \
                     install it with `npm install -g yaml-language-server`"
                )
            });
        let input = child.stdin.take().expect("piped stdin");
        let mut output = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (tx, messages) = channel();
        std::thread::spawn(move || {
            while let Some(message) = read_message(&mut output) {
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            input,
            messages,
            next_id: 1,
            settings,
        };
        let root_uri = format!("file://{}", root.display());
        server.request(
            "initialize",
            json!({"processId": null, "rootUri": root_uri, "capabilities": {
                "workspace": {"configuration": true}
            }}),
        );
        server.notify("initialized", json!({}));
        let settings = server.settings.clone();
        server.notify(
            "workspace/didChangeConfiguration",
            json!({ "settings": settings }),
        );
        server
    }

    fn send(&mut self, message: &Value) {
        let body = message.to_string();
        write!(self.input, "Content-Length: {}\r\n\r\n{body}", body.len())
            .and_then(|()| self.input.flush())
            .expect("write to yaml-language-server");
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request and waits for its answer, serving the server's own requests.
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        self.wait_for(|m| m.get("id") == Some(&json!(id)) && m.get("method").is_none())
    }

    /// The next message that `wanted` accepts; the server's requests for configuration
    /// are answered with the settings meanwhile.
    fn wait_for(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(left) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("yaml-language-server sent nothing expected in {TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!("yaml-language-server exited"),
            };
            if let (Some(id), Some(method)) = (message.get("id"), message.get("method")) {
                let result = if method == "workspace/configuration" {
                    // One answer per item asked for: the section named, or nothing.
                    let items = message["params"]["items"].as_array().cloned();
                    let answers = items
                        .unwrap_or_default()
                        .iter()
                        .map(|item| match item["section"].as_str() {
                            Some(section) => self.settings[section].clone(),
                            None => Value::Null,
                        })
                        .collect();
                    Value::Array(answers)
                } else {
                    Value::Null
                };
                let id = id.clone();
                self.send(&json!({"jsonrpc": "2.0", "id": id, "result": result}));
                continue;
            }
            if wanted(&message) {
                return message;
            }
        }
    }

    /// Opens `text` as the file `path` and returns the lines (from 1) and messages of the
    /// diagnostics the server publishes for it.
    fn diagnostics(&mut self, path: &Path, text: &str) -> Vec<(u64, String)> {
        let uri = format!("file://{}", path.display());
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri, "languageId": "yaml", "version": 1, "text": text}}),
        );
        let published = self.wait_for(|m| {
            m["method"] == "textDocument/publishDiagnostics" && m["params"]["uri"] == uri
        });
        published["params"]["diagnostics"]
            .as_array()
            .expect("diagnostics")
            .iter()
            .map(|d| {
                (
                    d["range"]["start"]["line"].as_u64().expect("line") + 1,
                    d["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// A manifest repository laid out as the README's: `schema/berth.schema.json` (the
/// checked-in schema) beside `manifests/`.
fn repository() -> tempfile::TempDir {
    // Not tempfile's default `.tmpXXXX`: a glob's `**` does not enter hidden directories.
    let dir = tempfile::Builder::new()
        .prefix("berth-editor-")
        .tempdir()
        .expect("a temp dir");
    std::fs::create_dir_all(dir.path().join("schema")).expect("mkdir schema");
    std::fs::create_dir_all(dir.path().join("manifests")).expect("mkdir manifests");
    std::fs::copy(
        workspace_root().join("schema/berth.schema.json"),
        dir.path().join("schema/berth.schema.json"),
    )
    .expect("copy the schema");
    dir
}

fn lines(diagnostics: &[(u64, String)]) -> Vec<u64> {
    diagnostics.iter().map(|(line, _)| *line).collect()
}

fn assert_mentions(diagnostics: &[(u64, String)], line: u64, word: &str) {
    assert!(
        diagnostics
            .iter()
            .any(|(l, message)| *l == line && message.contains(word)),
        "no diagnostic about {word} on line {line}: {diagnostics:?}"
    );
}

#[test]
fn a_modeline_in_each_document_validates_every_document() {
    let repo = repository();
    let file = repo.path().join("manifests/all.yaml");
    let text = format!("{MODELINE}{HOST}---\n{MODELINE}{GUEST}");
    let mut server = Server::start(repo.path(), json!({"yaml": {"validate": true}}));
    let found = server.diagnostics(&file, &text);
    assert_eq!(lines(&found), [5, 14], "{found:?}");
    assert_mentions(&found, 5, "bogus");
    assert_mentions(&found, 14, "hardlimit");
}

#[test]
fn a_modeline_covers_only_the_document_it_is_in() {
    // Why the README asks for a modeline in every document: this is yaml-language-server's
    // behaviour, which berth cannot change.
    let repo = repository();
    let file = repo.path().join("manifests/all.yaml");
    let text = format!("{MODELINE}{HOST}---\n{GUEST}");
    let mut server = Server::start(repo.path(), json!({"yaml": {"validate": true}}));
    let found = server.diagnostics(&file, &text);
    assert_eq!(lines(&found), [5], "{found:?}");
}

#[test]
fn a_settings_association_validates_every_document() {
    let repo = repository();
    let file = repo.path().join("manifests/all.yaml");
    let text = format!("{HOST}---\n{GUEST}");
    let schema = format!("file://{}/schema/berth.schema.json", repo.path().display());
    let settings =
        json!({"yaml": {"validate": true, "schemas": {schema: ["manifests/**/*.yaml"]}}});
    let mut server = Server::start(repo.path(), settings);
    let found = server.diagnostics(&file, &text);
    assert_eq!(lines(&found), [4, 12], "{found:?}");
    assert_mentions(&found, 4, "bogus");
    assert_mentions(&found, 12, "hardlimit");
}

#[test]
fn the_example_manifests_are_clean_in_the_editor() {
    let root = workspace_root();
    let mut server = Server::start(&root, json!({"yaml": {"validate": true}}));
    for name in ["guests.yaml", "hosts.yaml", "fleet.yaml"] {
        let path = root.join("manifests").join(name);
        let text = std::fs::read_to_string(&path).expect("read the example");
        let found = server.diagnostics(&path, &text);
        assert!(found.is_empty(), "{name}: {found:?}");
    }
    // And the check is not vacuous: the same files with an error in their last document.
    let path = root.join("manifests/guests.yaml");
    let text = std::fs::read_to_string(&path).expect("read the example") + "  bogus: 1\n";
    let found = server.diagnostics(&root.join("manifests/broken-guests.yaml"), &text);
    assert!(found.iter().any(|(_, m)| m.contains("bogus")), "{found:?}");
}
