//! `berth serve` end to end, over the simulated fleet (`--driver sim`: no real guests):
//! a throwaway git repository, the real binary on a loopback port, commits noticed
//! through the filesystem watch and through a signed webhook, an invalid commit
//! refused with file:line while the last good revision stays, a bad signature refused,
//! and a restart (SIGTERM and SIGKILL) that adopts the running guests.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use berth_tests::{command, github_signature, GitRepo};
use serde_json::Value;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

const HOSTS: &str = "\
apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm01}
spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB}
---
apiVersion: berth.dev/v1
kind: Host
metadata: {name: kvm02}
spec: {address: 127.0.0.2:1, cpus: 0-1, memory: 4GiB}
";

const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";

fn guests(weight: u16) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: web-1}}\n\
         spec:\n  host: kvm01\n  cpu: {{vcpus: 1}}\n  memory: {{size: 64MiB}}\n  io: {{weight: {weight}}}\n\
         ---\napiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: db-1}}\n\
         spec:\n  host: kvm02\n  cpu: {{vcpus: 1}}\n  memory: {{size: 64MiB}}\n"
    )
}

/// A running `berth serve`, killed (by its pid, through the Child handle) when
/// dropped, so a failing test leaves no process behind.
struct Serve {
    child: Option<Child>,
    addr: String,
    log: PathBuf,
}

impl Serve {
    fn start(repo: &Path, state: &Path, log: PathBuf, extra: &[&str]) -> Self {
        Self::start_as("kvm01", free_port(), repo, state, log, extra)
    }

    fn start_as(
        host: &str,
        port: u16,
        repo: &Path,
        state: &Path,
        log: PathBuf,
        extra: &[&str],
    ) -> Self {
        let addr = format!("127.0.0.1:{port}");
        let secret = state.with_extension("webhook-secret");
        fs::write(&secret, format!("{WEBHOOK_SECRET}\n")).expect("write secret");
        fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod secret");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = command("berth")
            .args([
                "serve", "--driver", "sim", "--host", host, "--branch", "main",
            ])
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(state)
            .arg("--webhook-secret-file")
            .arg(&secret)
            .args([
                "--listen",
                &addr,
                "--poll-interval",
                "1h",
                "--resync-interval",
                "1h",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start berth serve");
        let serve = Serve {
            child: Some(child),
            addr,
            log,
        };
        serve.wait_for("/healthz", |_| true);
        serve
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Value {
        let (code, body) = http(&self.addr, "GET", "/status", &[], "");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// Polls `/status` until `done` holds, for up to 20 s.
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = try_http(&self.addr, "GET", "/status", &[], "")
                .ok()
                .and_then(|(code, body)| (code == 200).then_some(body))
                .and_then(|body| serde_json::from_str::<Value>(&body).ok());
            if let Some(status) = status {
                if done(&status) {
                    return status;
                }
                if Instant::now() > deadline {
                    panic!(
                        "timed out waiting for {what}; status {status:#}\nlog:\n{}",
                        self.log()
                    );
                }
            } else if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}: no status\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the service (by its pid) and waits for it to exit.
    fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid fits");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child,
        // not yet waited for, so it cannot have been reused.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "berth serve did not exit after signal {signal}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    probe.local_addr().expect("addr").port()
}

fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    berth_tests::http_exchange(TcpStream::connect(addr)?, addr, method, path, headers, body)
}

fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    try_http(addr, method, path, headers, body).expect("HTTP request")
}

fn applied(revision: &str) -> impl Fn(&Value) -> bool + '_ {
    move |s| s["lastApplied"]["revision"] == revision
}

fn guest<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .find(|g| g["name"] == name)
}

/// The service's condition of type `kind` (`Null` when absent).
fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

/// A guest's condition of type `kind`; it must be there.
fn guest_condition<'a>(guest: &'a Value, kind: &str) -> &'a Value {
    guest["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} condition: {guest}"))
}

fn metric(serve: &Serve, line_start: &str) -> Option<f64> {
    let (_, text) = http(&serve.addr, "GET", "/metrics", &[], "");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn commits_are_applied_through_the_watch_and_invalid_ones_are_refused() {
    let tmp = tempdir();
    let repo = GitRepo::new(tmp.path().join("repo"));
    let first = repo.commit(
        &[("hosts.yaml", HOSTS), ("guests.yaml", &guests(100))],
        "first",
    );
    let serve = Serve::start(
        &repo.dir,
        &tmp.path().join("state"),
        tmp.path().join("serve.log"),
        &[],
    );

    let status = serve.wait_for("the first revision applied", |s| {
        applied(&first)(s) && condition(s, "Ready")["status"] == "True"
    });
    assert_eq!(status["host"], "kvm01");
    assert_eq!(status["driver"], "sim");
    assert_eq!(status["ready"], true);
    assert_eq!(guest(&status, "web-1").expect("web-1")["phase"], "Running");
    // Kubernetes-style: the service's and the guest's conditions, the revisions.
    assert_eq!(status["lastAppliedRevision"], first.as_str());
    assert_eq!(status["lastAttemptedRevision"], first.as_str());
    assert_eq!(condition(&status, "Ready")["reason"], "Converged");
    let web = guest(&status, "web-1").expect("web-1");
    assert_eq!(web["observedRevision"], first.as_str());
    let ready = guest_condition(web, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&"True".into(), &"InSync".into())
    );
    assert!(ready["lastTransitionTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(
        guest(&status, "db-1").is_none(),
        "kvm02's guest is not acted on here"
    );

    // A live change, noticed through the filesystem watch (poll is 1 h, no webhook).
    let committed = Instant::now();
    let second = repo.commit(&[("guests.yaml", &guests(300))], "io weight 300");
    let status = serve.wait_for("the second revision applied", |s| {
        applied(&second)(s)
            && guest(s, "web-1").is_some_and(|g| g["observedRevision"] == second.as_str())
    });
    eprintln!(
        "commit to applied through the watch: {:?}",
        committed.elapsed()
    );
    let web_ready = guest_condition(guest(&status, "web-1").expect("web-1"), "Ready").clone();
    assert_eq!(
        metric(&serve, "berth_actions_total{kind=\"retune\",result=\"ok\"}"),
        Some(1.0)
    );

    // An invalid revision: refused with commit id and file:line, the last good stays.
    let broken = guests(300).replace("weight: 300", "weight: heavy");
    let third = repo.commit(&[("guests.yaml", &broken)], "broken");
    let status = serve.wait_for("the refusal", |s| {
        s["lastError"]["revision"] == third.as_str()
    });
    let error = &status["lastError"];
    assert_eq!(error["kind"], "invalid");
    let problem = &error["diagnostics"][0];
    assert_eq!(problem["file"], "guests.yaml");
    assert_eq!(problem["line"], 8);
    assert!(
        problem["text"]
            .as_str()
            .expect("text")
            .starts_with("guests.yaml:8:"),
        "{problem}"
    );
    assert_eq!(status["enforcing"], second.as_str());
    assert_eq!(status["lastApplied"]["revision"], second.as_str());
    assert_eq!(status["source"]["revision"], third.as_str());
    assert_eq!(status["lastAppliedRevision"], second.as_str());
    assert_eq!(status["lastAttemptedRevision"], third.as_str());
    let stalled = condition(&status, "Stalled");
    assert_eq!(
        (&stalled["status"], &stalled["reason"]),
        (&"True".into(), &"RevisionInvalid".into())
    );
    assert_eq!(condition(&status, "Ready")["status"], "False");
    // web-1 stayed ready all along: its Ready condition did not flip, nor its time.
    let web = guest(&status, "web-1").expect("web-1");
    assert_eq!(guest_condition(web, "Ready"), &web_ready);
    assert_eq!(web["observedRevision"], second.as_str());

    // `berth status` prints the same as a table.
    let out = command("berth")
        .args(["status", "--server", &format!("http://{}", serve.addr)])
        .output()
        .expect("berth status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("guests.yaml:8:"), "{table}");
    assert!(
        table.contains("Ready=False (RevisionInvalid), Stalled=True (RevisionInvalid)"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("web-1")
            && l.contains("True (InSync)")
            && l.contains(&second[..12])),
        "{table}"
    );
    // And -o yaml (or the old --json) the same document as /status.
    for args in [&["-o", "yaml"][..], &["--json"], &["-o", "json"]] {
        let out = command("berth")
            .args(["status", "--server", &format!("http://{}", serve.addr)])
            .args(args)
            .output()
            .expect("berth status");
        assert!(out.status.success(), "{args:?}");
        let doc: Value = serde_yaml::from_slice(&out.stdout).expect("YAML (JSON is YAML)");
        assert_eq!(doc["lastAttemptedRevision"], third.as_str(), "{args:?}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web-1") && l.contains("Running")),
        "{table}"
    );

    // Fixing it applies the fix and clears the error.
    let fourth = repo.commit(&[("guests.yaml", &guests(400))], "fixed");
    let status = serve.wait_for("the fix applied", applied(&fourth));
    assert!(status.get("lastError").is_none(), "{status:#}");
}

#[test]
fn webhooks_need_a_valid_signature() {
    let tmp = tempdir();
    let repo = GitRepo::new(tmp.path().join("repo"));
    let first = repo.commit(
        &[("hosts.yaml", HOSTS), ("guests.yaml", &guests(100))],
        "first",
    );
    let serve = Serve::start(
        &repo.dir,
        &tmp.path().join("state"),
        tmp.path().join("serve.log"),
        &["--no-watch"],
    );
    serve.wait_for("the first revision applied", applied(&first));

    let second = repo.commit(&[("guests.yaml", &guests(200))], "io weight 200");
    let body = format!(r#"{{"ref":"refs/heads/main","after":"{second}"}}"#);
    let wrong = github_signature("not-the-secret", &body);
    for headers in [vec![], vec![("X-Hub-Signature-256", wrong.as_str())]] {
        let (code, answer) = http(&serve.addr, "POST", "/hooks/git", &headers, &body);
        assert_eq!(code, 401, "{answer}");
    }
    // Neither the refused webhooks nor anything else (no watch, poll 1 h) looked.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(serve.status()["source"]["revision"], first.as_str());

    let good = github_signature(WEBHOOK_SECRET, &body);
    let sent = Instant::now();
    let (code, answer) = http(
        &serve.addr,
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", &good), ("X-GitHub-Event", "push")],
        &body,
    );
    assert_eq!(code, 202, "{answer}");
    serve.wait_for("the second revision applied", applied(&second));
    eprintln!("webhook to applied: {:?}", sent.elapsed());

    // A body over the limit (25 MiB, README) gets a JSON error and a log line.
    let (code, answer) = oversized_webhook(&serve.addr, (25 << 20) + 1);
    assert_eq!(code, 413, "{answer}");
    let error: Value = serde_json::from_str(&answer).expect("a JSON error");
    assert_eq!(
        error["error"], "webhook refused: the body is larger than 26214400 bytes",
        "{answer}"
    );
    assert!(
        serve
            .log()
            .contains("webhook refused: its body could not be read"),
        "{}",
        serve.log()
    );
}

/// POSTs a `len`-byte webhook body (spaces) and returns the answer; the service may
/// answer before the body is sent whole, so a failed write is not an error.
fn oversized_webhook(addr: &str, len: usize) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "POST /hooks/git HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         X-Hub-Signature-256: sha256=00\r\nContent-Length: {len}\r\n\r\n"
    )
    .expect("send the head");
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        if stream.write_all(&chunk[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").expect("an answer");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

#[test]
fn a_restart_adopts_running_guests_and_never_starts_them_twice() {
    let tmp = tempdir();
    let repo = GitRepo::new(tmp.path().join("repo"));
    let first = repo.commit(
        &[("hosts.yaml", HOSTS), ("guests.yaml", &guests(100))],
        "first",
    );
    let state = tmp.path().join("state");
    let log = tmp.path().join("serve.log");

    let mut serve = Serve::start(&repo.dir, &state, log.clone(), &[]);
    serve.wait_for("the first revision applied", applied(&first));
    assert_eq!(
        metric(&serve, "berth_actions_total{kind=\"start\",result=\"ok\"}"),
        Some(1.0)
    );

    // SIGTERM: a clean exit; the guest keeps running (in the simulated fleet's state).
    let exit = serve.signal_and_wait(libc::SIGTERM);
    assert!(exit.success(), "{exit:?}\n{}", serve.log());
    assert!(
        serve.log().contains("guests keep running"),
        "{}",
        serve.log()
    );
    assert!(
        !serve.log().contains("cancelling"),
        "no migration was in flight, none is said to be cancelled:\n{}",
        serve.log()
    );
    let fleet = fs::read_to_string(state.join("sim-fleet.json")).expect("fleet state");
    assert!(fleet.contains("\"web-1\""), "{fleet}");

    // Restarted after SIGTERM, then after SIGKILL: each time the guest is adopted.
    let adopted = |serve: &Serve| {
        let status = serve.wait_for("the revision applied again", applied(&first));
        assert_eq!(guest(&status, "web-1").expect("web-1")["phase"], "Running");
        let starts = metric(serve, "berth_actions_total{kind=\"start\"");
        assert_eq!(starts, None, "nothing is started again\n{}", serve.log());
    };
    let mut serve = Serve::start(&repo.dir, &state, log.clone(), &[]);
    adopted(&serve);
    let exit = serve.signal_and_wait(libc::SIGKILL);
    assert!(!exit.success());
    let serve = Serve::start(&repo.dir, &state, log, &[]);
    adopted(&serve);
}

/// Two services on one repository, each with its own simulated fleet. The move of a
/// guest from kvm01 to kvm02 is simulated as a hand-off (kvm01's fleet lets the guest
/// go, then kvm02 starts it): what is checked is that kvm02 never starts the guest while
/// kvm01 still reports running it, and says that it is waiting.
#[test]
fn a_guest_moving_here_is_not_started_while_its_old_host_runs_it() {
    let tmp = tempdir();
    let repo = GitRepo::new(tmp.path().join("repo"));
    let (p1, p2) = (free_port(), free_port());
    let hosts = format!(
        "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm01}}\n\
         spec: {{address: 127.0.0.1:{p1}, cpus: 0-1, memory: 4GiB}}\n---\n\
         apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm02}}\n\
         spec: {{address: 127.0.0.1:{p2}, cpus: 0-1, memory: 4GiB}}\n"
    );
    let placed_on = |host: &str| guests(100).replacen("host: kvm01", &format!("host: {host}"), 1);
    let first = repo.commit(
        &[("hosts.yaml", &hosts), ("guests.yaml", &placed_on("kvm01"))],
        "first",
    );
    // kvm01 looks at the repository only when its webhook says so.
    let kvm01 = Serve::start_as(
        "kvm01",
        p1,
        &repo.dir,
        &tmp.path().join("state1"),
        tmp.path().join("kvm01.log"),
        &["--no-watch"],
    );
    let kvm02 = Serve::start_as(
        "kvm02",
        p2,
        &repo.dir,
        &tmp.path().join("state2"),
        tmp.path().join("kvm02.log"),
        &[],
    );
    let status = kvm01.wait_for("kvm01 applied", applied(&first));
    assert_eq!(guest(&status, "web-1").expect("web-1")["runsHere"], true);
    kvm02.wait_for("kvm02 applied", applied(&first));

    let second = repo.commit(
        &[("guests.yaml", &placed_on("kvm02"))],
        "move web-1 to kvm02",
    );
    let status = kvm02.wait_for("kvm02 waiting", |s| {
        guest(s, "web-1").is_some_and(|g| g["phase"] == "WaitingForMigration")
    });
    let web = guest(&status, "web-1").expect("web-1");
    assert!(web.to_string().contains("kvm01 still runs web-1"), "{web}");
    std::thread::sleep(Duration::from_millis(500));
    // One start so far: db-1, placed on kvm02 from the first revision.
    let starts = "berth_actions_total{kind=\"start\",result=\"ok\"}";
    assert_eq!(
        metric(&kvm02, starts),
        Some(1.0),
        "kvm02 started a second copy\n{}",
        kvm02.log()
    );

    let body = r#"{"ref":"refs/heads/main"}"#;
    let signature = github_signature(WEBHOOK_SECRET, body);
    let (code, answer) = http(
        &kvm01.addr,
        "POST",
        "/hooks/git",
        &[("X-Hub-Signature-256", &signature)],
        body,
    );
    assert_eq!(code, 202, "{answer}");
    kvm01.wait_for("kvm01 let the guest go", applied(&second));
    let status = kvm02.wait_for("kvm02 applied", applied(&second));
    let web = guest(&status, "web-1").expect("web-1");
    assert_eq!(web["phase"], "Running", "{web}");
    assert_eq!(web["runsHere"], true);
    assert_eq!(metric(&kvm02, starts), Some(2.0));
}

/// What Prometheus 2.42 sends when it scrapes (scrape/scrape.go, `acceptHeader`).
const PROMETHEUS_2_42_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` with `accept`: (Content-Type, body).
fn scrape(addr: &str, accept: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .expect("a Content-Type");
    (content_type, body.to_owned())
}

/// promtool (Debian package `prometheus`, installed by .ci/run). Not there is a failure,
/// never a skipped check.
fn promtool() -> &'static str {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool is needed (apt-get install prometheus; .ci/run installs it)"
    );
    "promtool"
}

#[test]
fn metrics_answer_in_the_format_the_scraper_asks_for_and_pass_promtool() {
    use std::io::Write;
    let promtool = promtool();
    let tmp = tempdir();
    let repo = GitRepo::new(tmp.path().join("repo"));
    let first = repo.commit(
        &[("hosts.yaml", HOSTS), ("guests.yaml", &guests(100))],
        "first",
    );
    let serve = Serve::start(
        &repo.dir,
        &tmp.path().join("state"),
        tmp.path().join("serve.log"),
        &[],
    );
    serve.wait_for("the first revision applied", applied(&first));
    let second = repo.commit(&[("guests.yaml", &guests(300))], "io weight 300");
    serve.wait_for("the second revision applied", applied(&second));

    // Prometheus 2.42 prefers OpenMetrics and gets it.
    let (content_type, openmetrics) = scrape(&serve.addr, PROMETHEUS_2_42_ACCEPT);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE berth_actions counter\n"));
    // promtool's OpenMetrics parser (the one of its backfill, strict about `# EOF`)
    // reads it; backfilling needs a timestamp per sample, so one is added.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let stamped: String = openmetrics
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} {now}\n")
            }
        })
        .collect();
    let om_file = tmp.path().join("metrics.om");
    fs::write(&om_file, stamped).expect("write");
    let out = std::process::Command::new(promtool)
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&om_file)
        .arg(tmp.path().join("blocks"))
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool reads the OpenMetrics output: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Asked for the text format 0.0.4 (as `curl -H 'Accept: text/plain;version=0.0.4'`
    // for `promtool check metrics`), it gets that, and promtool's linter finds nothing.
    let (content_type, text) = scrape(&serve.addr, "text/plain;version=0.0.4");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE berth_actions_total counter\n"),
        "{text}"
    );
    assert!(text.contains("berth_actions_total{kind=\"retune\",result=\"ok\"} 1\n"));
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric is listed in the README, by its full name.
    let readme =
        fs::read_to_string(berth_tests::workspace_root().join("README.md")).expect("README.md");
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().expect("a name");
        assert!(
            readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{name}{{")),
            "README.md does not list {name}"
        );
    }
}
