//! The command line's conventions, over the real `berth` and `berth-vmm` binaries: one
//! `-o/--output` flag (the old flags still work), shell completions, `-` for standard
//! input, and exit codes CI can trust (a usage error is never 2, the code of
//! `--detailed-exitcode`'s "changes").

use std::path::PathBuf;
use std::process::{Command, Output};

use berth_tests::{command, workspace_root};

fn examples() -> PathBuf {
    workspace_root().join("manifests")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run the binary")
}

/// Runs `berth args` with `input` on standard input.
fn run_with_stdin(args: &[&str], input: &str) -> Output {
    berth_tests::output_with_stdin(command("berth").args(args), input.as_bytes())
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What YAML output holds, as a JSON value, to compare with the JSON output.
fn yaml_value(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

fn json_value(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[test]
fn usage_errors_exit_1_never_2() {
    for args in [
        &["plan", "--bogus"][..],
        &["plan", "--detailed-exitcode", "--bogus"],
        &["plan", "--base", "main"],
        &["validate", "-o", "markdown"],
        &["no-such-command"],
        &[],
    ] {
        let out = run(command("berth").args(args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "berth {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stdout(&out).is_empty(),
            "berth {args:?}: usage goes to stderr"
        );
    }
    for args in [&["--help"][..], &["plan", "--help"], &["--version"]] {
        let out = run(command("berth").args(args));
        assert_eq!(out.status.code(), Some(0), "berth {args:?}");
        assert!(!stdout(&out).is_empty());
    }
    for args in [&["--bogus"][..], &["run"], &["launch"], &[]] {
        let out = run(command("berth-vmm").args(args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "berth-vmm {args:?}: {}",
            stderr(&out)
        );
    }
    let out = run(command("berth-vmm").arg("--help"));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_missing_path_and_invalid_input_exit_1() {
    let out = run(command("berth").args(["validate", "/nonexistent/berth"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(command("berth").args(["plan", "--driver", "sim", "/nonexistent/berth"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = run(command("berth").args([
        "plan",
        "--driver",
        "sim",
        "--detailed-exitcode",
        "/nonexistent/berth",
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn one_output_flag_with_the_old_flags_as_aliases() {
    let dir = examples();
    let dir = dir.to_str().unwrap();
    // validate: -o json, its alias --format json, and yaml with the same data.
    let json = run(command("berth").args(["validate", dir, "-o", "json"]));
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let alias = run(command("berth").args(["validate", dir, "--format", "json"]));
    assert_eq!(stdout(&json), stdout(&alias));
    let yaml = run(command("berth").args(["validate", dir, "--output", "yaml"]));
    assert_eq!(yaml.status.code(), Some(0), "{}", stderr(&yaml));
    let value = json_value(&stdout(&json));
    assert_eq!(value["guests"], 2, "{value}");
    assert_eq!(yaml_value(&stdout(&yaml)), value);

    // plan against a simulated fleet: every format, and the --format alias.
    let plan = |args: &[&str]| {
        let out = run(command("berth")
            .args(["plan", dir, "--driver", "sim"])
            .args(args));
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let json = plan(&["-o", "json"]);
    assert_eq!(json, plan(&["--format", "json"]));
    let value = json_value(&json);
    assert_eq!(value["formatVersion"], 1);
    assert_eq!(yaml_value(&plan(&["-o", "yaml"])), value);
    let markdown = plan(&["-o", "markdown"]);
    assert_eq!(markdown, plan(&["--format", "markdown"]));
    assert!(markdown.contains('|'), "a markdown table: {markdown}");
    assert!(plan(&[]).contains("Plan: 2 to start"), "{}", plan(&[]));

    // schema: json (the default), yaml, markdown (--reference is an alias).
    let schema = |args: &[&str]| stdout(&run(command("berth").arg("schema").args(args)));
    let value = json_value(&schema(&[]));
    assert_eq!(json_value(&schema(&["-o", "json"])), value);
    assert_eq!(yaml_value(&schema(&["-o", "yaml"])), value);
    assert_eq!(schema(&["-o", "markdown"]), schema(&["--reference"]));

    // get guests: `table` is the old name of `text`; the state directory is empty.
    let state = tempfile::tempdir().unwrap();
    let get = |format: &str| {
        let out = run(command("berth")
            .args(["get", "guests", "--host", "kvm01", "-o", format])
            .arg("--state-dir")
            .arg(state.path()));
        assert_eq!(out.status.code(), Some(0), "{format}: {}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(get("table"), get("text"));
    assert_eq!(json_value(&get("json")), serde_json::json!([]));
    assert_eq!(yaml_value(&get("yaml")), serde_json::json!([]));
}

#[test]
fn completions_for_three_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(command("berth").args(["completion", shell]));
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for word in ["validate", "plan", "apply", "status", "output"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    // The bash script is valid bash and completes subcommands.
    let out = run(command("berth").args(["completion", "bash"]));
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), &out.stdout).unwrap();
    let check = format!(
        "source {}; COMP_WORDS=(berth pla); COMP_CWORD=1; _berth berth pla berth; echo \"${{COMPREPLY[@]}}\"",
        script.path().display()
    );
    let out = run(Command::new("bash").args(["-c", &check]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "plan", "{}", stderr(&out));
    let out = run(command("berth").args(["completion", "tcsh-or-so"]));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_dash_reads_the_manifest_from_standard_input() {
    let hosts = std::fs::read_to_string(examples().join("hosts.yaml")).unwrap();
    let guests = std::fs::read_to_string(examples().join("guests.yaml")).unwrap();
    let both = format!("{hosts}\n---\n{guests}");
    let out = run_with_stdin(&["validate", "-", "-o", "json"], &both);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let value = json_value(&stdout(&out));
    assert_eq!(
        (value["guests"].clone(), value["hosts"].clone()),
        (2.into(), 1.into())
    );

    // Problems on standard input are named <stdin>, with their line.
    let broken = both.replace("size: 128MiB", "size: 128MiBs");
    assert_ne!(broken, both, "the example has a 128MiB guest");
    let out = run_with_stdin(&["validate", "-"], &broken);
    assert_eq!(out.status.code(), Some(1));
    let line = stdout(&out)
        .lines()
        .find(|l| l.contains("spec.memory.size"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{}", stdout(&out)));
    assert!(line.starts_with("<stdin>:"), "{line}");

    // plan - (against a simulated fleet, so no host is read) and apply - refuse
    // nothing they would not refuse from a file.
    let out = run_with_stdin(
        &["plan", "-", "--driver", "sim", "--detailed-exitcode"],
        &both,
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Plan: 2 to start"),
        "{}",
        stdout(&out)
    );
    let out = run_with_stdin(&["plan", "-", "--driver", "sim", "--sim-from", "-"], &both);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("standard input is read once"),
        "{}",
        stderr(&out)
    );
    let out = run_with_stdin(&["apply", "-", "--driver", "sim", "--yes"], &both);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains(" done, 0 failed"), "{}", stdout(&out));
    assert!(stdout(&out).contains("The fleet matches the manifests."));
}

/// `apply -o json|yaml` prints one document at the end (the plan, each action's outcome,
/// whether the fleet matches), and needs --yes to act; `stop -o json` lists what it
/// stopped. Over the simulated fleet and an empty state directory: no guest runs.
#[test]
fn apply_and_stop_print_one_document_with_o() {
    let m = examples();
    let m = m.to_str().unwrap();
    let out = run(command("berth").args(["apply", m, "--driver", "sim", "-o", "json"]));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("need --yes"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));

    let out = run(command("berth").args(["apply", m, "--driver", "sim", "-o", "json", "--yes"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc = json_value(&stdout(&out));
    assert_eq!(doc["succeeded"], true, "{doc:#}");
    assert_eq!(doc["matchesManifests"], true, "{doc:#}");
    assert_eq!(doc["plan"]["summary"]["start"], 2, "{doc:#}");
    let results = doc["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "a host setting and two starts: {doc:#}");
    assert!(results.iter().all(|r| r["outcome"] == "done"), "{doc:#}");

    let out = run(command("berth").args(["apply", m, "--driver", "sim", "-o", "yaml", "--yes"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let yaml = yaml_value(&stdout(&out));
    assert_eq!(
        yaml["results"].as_array().map(Vec::len),
        Some(3),
        "{yaml:#}"
    );

    let state = tempfile::tempdir().unwrap();
    let out = run(command("berth")
        .args(["stop", "--all", "-o", "json", "--state-dir"])
        .arg(state.path()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let doc = json_value(&stdout(&out));
    assert_eq!(doc, serde_json::json!({"stopped": [], "failed": []}));
}

/// A few representative failures print their message and each cause once: a cause the
/// message already names is not repeated on a `caused by:` line.
#[test]
fn each_cause_of_an_error_is_printed_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = berth_tests::GitRepo::new(dir.path().join("repo"));
    repo.commit(&[("g.yaml", "apiVersion: berth.dev/v1\n")], "one");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").expect("write");
    let examples = examples();
    // A guest whose VMM holds its lock but whose control socket refuses: the lock is
    // held by this test, and nobody listens on the socket.
    let state = dir.path().join("state");
    let guest_dir = state.join("guests").join("web-1");
    std::fs::create_dir_all(&guest_dir).expect("mkdir");
    let vmm_lock = std::fs::File::create(guest_dir.join("vmm.lock")).expect("lock file");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&vmm_lock);
    // SAFETY: flock on a descriptor this test owns, kept open for the whole test.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0, "{}", std::io::Error::last_os_error());
    std::fs::write(guest_dir.join("pid"), std::process::id().to_string()).expect("pid");
    // Bound and closed: the socket file stays, and connecting to it is refused.
    drop(
        std::os::unix::net::UnixListener::bind(guest_dir.join("control.sock"))
            .expect("bind the control socket"),
    );
    // Invalid manifests.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("g.yaml"),
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\nspec: {host: kvm01, cpu: {vcpus: two}}\n",
    )
    .expect("write");
    // An etcd endpoint that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = format!("http://{}", silent.local_addr().expect("addr"));
    let failures: Vec<Vec<String>> = vec![
        // The state directory cannot be made (a file is in the way): an I/O error under
        // the lock's.
        vec![
            "stop".into(),
            "--all".into(),
            "--state-dir".into(),
            not_a_dir.join("state").display().to_string(),
        ],
        // A missing state directory.
        vec![
            "stop".into(),
            "web-1".into(),
            "--state-dir".into(),
            dir.path().join("missing").display().to_string(),
        ],
        // A VMM whose control socket refuses.
        vec![
            "stop".into(),
            "web-1".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
        // Invalid manifests.
        vec!["plan".into(), bad.display().to_string()],
        // etcd: nothing listens; something listens and never answers.
        vec![
            "status".into(),
            "--fleet".into(),
            "--etcd".into(),
            "http://127.0.0.1:1".into(),
        ],
        vec!["status".into(), "--fleet".into(), "--etcd".into(), silent],
        // A revision git does not know.
        vec![
            "plan".into(),
            "--repo".into(),
            repo.dir.display().to_string(),
            "--base".into(),
            "HEAD".into(),
            "--head".into(),
            "no-such-revision".into(),
        ],
        // An apply whose state directory cannot be made.
        vec![
            "apply".into(),
            "--yes".into(),
            "--host".into(),
            "kvm01".into(),
            "--state-dir".into(),
            not_a_dir.join("state").display().to_string(),
            examples.display().to_string(),
        ],
    ];
    let mut printed = Vec::new();
    for args in failures {
        let out = run(command("berth").args(&args));
        let err = stderr(&out);
        eprintln!("$ berth {}\n{err}", args.join(" "));
        printed.push(err.clone());
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.first().is_some_and(|l| l.starts_with("error: ")),
            "{args:?}: {err}"
        );
        for (i, line) in lines.iter().enumerate().skip(1) {
            let Some(cause) = line.strip_prefix("caused by: ") else {
                continue;
            };
            assert!(
                !lines[..i].iter().any(|earlier| earlier.contains(cause)),
                "{args:?}: {cause:?} is printed twice:\n{err}"
            );
        }
    }
    // The root causes, each once.
    for (i, cause) in [
        (0, "Not a directory"),
        (2, "Connection refused"),
        (4, "Connection refused"),
        (5, "got no answer within"),
    ] {
        assert_eq!(
            printed[i].matches(cause).count(),
            1,
            "{cause:?} once in:\n{}",
            printed[i]
        );
    }
    // etcd's errors name the endpoint and print no Debug text of the gRPC client.
    for i in [4, 5] {
        assert!(
            printed[i].contains("at http://127.0.0.1:"),
            "{}",
            printed[i]
        );
        for debug in ["Status {", "ConnectError(", "tonic::", "Os {"] {
            assert!(!printed[i].contains(debug), "{debug:?} in:\n{}", printed[i]);
        }
    }
    assert!(printed[1].contains("does not run"), "{}", printed[1]);
    assert!(printed[3].contains("spec.cpu.vcpus"), "{}", printed[3]);
}
