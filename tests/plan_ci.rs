//! `berth plan --base REV --head REV` in CI mode, over a throwaway git repository with
//! real commits and the real `berth` binary: classification, formats and exit codes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use berth_tests::{command, workspace_root};

/// A git repository in a fresh temporary directory, removed on drop.
struct Repo {
    dir: PathBuf,
}

impl Repo {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "berth-plan-ci-{name}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("create the repository directory");
        let repo = Repo { dir };
        repo.git(&["init", "-q"]);
        repo.git(&["config", "user.name", "berth test"]);
        repo.git(&["config", "user.email", "test@berth.invalid"]);
        repo.git(&["config", "commit.gpgsign", "false"]);
        repo
    }

    fn git(&self, args: &[&str]) {
        let status = Command::new("git")
            .current_dir(&self.dir)
            .args(args)
            .status()
            .expect("run git");
        assert!(status.success(), "git {args:?} failed");
    }

    /// Replaces the manifests under `manifests/` with the files of a fixture directory
    /// and commits.
    fn commit_fixture(&self, fixture: &str, message: &str) {
        let target = self.dir.join("manifests");
        let _ = fs::remove_dir_all(&target);
        fs::create_dir_all(&target).expect("create manifests/");
        let source = workspace_root().join("tests/fixtures/plan").join(fixture);
        for entry in fs::read_dir(&source).expect("read the fixture") {
            let path = entry.expect("fixture entry").path();
            fs::copy(&path, target.join(path.file_name().expect("file name"))).expect("copy");
        }
        self.commit(message);
    }

    fn write(&self, path: &str, text: &str) {
        fs::write(self.dir.join(path), text).expect("write a manifest");
    }

    fn commit(&self, message: &str) {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
    }

    fn plan(&self, extra: &[&str]) -> Output {
        command("berth")
            .arg("plan")
            .arg("--repo")
            .arg(&self.dir)
            .args(extra)
            .output()
            .expect("run berth plan")
    }
}

impl Drop for Repo {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn two_commits(name: &str) -> Repo {
    let repo = Repo::new(name);
    repo.commit_fixture("base", "base");
    repo.commit_fixture("head", "head");
    repo
}

const CI: [&str; 5] = ["--base", "HEAD~1", "--head", "HEAD", "--detailed-exitcode"];

#[test]
fn a_pull_request_is_planned_and_classified() {
    let repo = two_commits("text");
    let out = repo.plan(&CI);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    for line in [
        "  ~ guest web-1: retune live on kvm01",
        "<-> guest web-2: migrate locally into a new VMM on kvm01",
        "<-> guest db-1: migrate live kvm01 -> kvm02",
        "-/+ guest cache-1: restart on kvm02",
        "  ! guest batch-1: blocked on kvm02",
        "  + guest new-1: start on kvm02",
        "  - guest old-1: stop on kvm02",
        "  ? guest legacy-1: orphan (not pruned) on kvm02",
        "  ~ host kvm02: configure",
        "        spec.cpu.pinning.vcpus: {0: 0, 1: 1} -> {0: 2, 1: 3}  (live)",
        "Plan: 1 to start, 1 to retune live, 2 to migrate, 1 to restart, 1 to stop, 1 blocked.",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
}

#[test]
fn the_json_plan_carries_the_classification() {
    let repo = two_commits("json");
    let mut args = CI.to_vec();
    args.extend(["--format", "json"]);
    let out = repo.plan(&args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(plan["formatVersion"], 1);
    let op = |name: &str| {
        plan["guests"]
            .as_array()
            .expect("guests")
            .iter()
            .find(|g| g["name"] == name)
            .map(|g| g["operation"].as_str().expect("operation").to_owned())
    };
    assert_eq!(op("db-1").as_deref(), Some("migrate"));
    assert_eq!(op("web-2").as_deref(), Some("localMigrate"));
    assert_eq!(op("batch-1").as_deref(), Some("blocked"));
    assert_eq!(op("web-1").as_deref(), Some("retune"));
    assert_eq!(plan["summary"]["migrate"], 2);
    let first = &plan["steps"][0];
    assert_eq!(
        (&first["wave"], &first["action"]),
        (&0.into(), &"configureHost".into())
    );
}

#[test]
fn the_markdown_plan_is_a_table_with_diffs() {
    let repo = two_commits("markdown");
    let mut args = CI.to_vec();
    args.extend(["--format", "markdown"]);
    let out = repo.plan(&args);
    let md = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        md.contains("| `<->` | **db-1** | migrate live kvm01 -> kvm02 |"),
        "{md}"
    );
    assert!(
        md.contains("<details><summary><code>~</code> web-1: YAML diff</summary>"),
        "{md}"
    );
}

#[test]
fn no_change_exits_0_and_changes_exit_0_without_the_flag() {
    let repo = two_commits("same");
    let out = repo.plan(&["--base", "HEAD", "--head", "HEAD", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("No changes."));
    let out = repo.plan(&["--base", "HEAD~1", "--head", "HEAD"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_invalid_head_exits_1_with_its_diagnostics() {
    let repo = two_commits("invalid");
    repo.write(
        "manifests/broken.yaml",
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: broken}\n\
         spec: {host: kvm01, cpu: {vcpus: 1}, memroy: {size: 1GiB}}\n",
    );
    repo.commit("a typo");
    let out = repo.plan(&CI);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{err}", stdout(&out));
    assert!(err.contains("is not valid"), "{err}");
    assert!(err.contains("manifests/broken.yaml:4"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "no plan is printed for an invalid head"
    );
}

#[test]
fn an_unknown_revision_exits_1() {
    let repo = two_commits("unknown");
    let out = repo.plan(&[
        "--base",
        "HEAD",
        "--head",
        "no-such-branch",
        "--detailed-exitcode",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no commit \"no-such-branch\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_working_tree_is_not_read() {
    let repo = two_commits("worktree");
    // Uncommitted edits must not change a plan between two commits.
    repo.write("manifests/guests.yaml", "this is not YAML: [");
    let out = repo.plan(&CI);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(Path::new(&repo.dir).join(".git").exists());
}

#[test]
fn ci_mode_classifies_by_each_hosts_driver() {
    let repo = Repo::new("capabilities");
    let host = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                spec: {address: '127.0.0.1:7410', cpus: '0-1', memory: 4GiB, driver: berth-vmm}\n\
                ---\napiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm02}\n\
                spec: {address: '127.0.0.1:7411', cpus: '0-1', memory: 4GiB, driver: libvirt, \
                hugepages: {2MiB: 64}}\n";
    let guest = |name: &str, host: &str, extra: &str| {
        format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\n\
             spec:\n  host: {host}\n  cpu: {{vcpus: 1}}\n  memory: {{size: 64MiB{extra}}}\n"
        )
    };
    let guests = |web: &str, db: &str| {
        format!(
            "{}---\n{}",
            guest("web-1", "kvm01", web),
            guest("db-1", "kvm02", db).replace(
                "  cpu:",
                "  boot: {kernel: /boot/vmlinuz, cmdline: console=ttyS0}\n  cpu:"
            )
        )
    };
    repo.write("hosts.yaml", host);
    repo.write("guests.yaml", &guests("", ""));
    repo.commit("base");
    repo.write(
        "guests.yaml",
        &guests(
            ", sharePages: true, numa: {mode: strict, nodeset: '0'}",
            ", hugepages: {pageSize: 2MiB}",
        ),
    );
    repo.commit("head");
    let out = repo.plan(&CI);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    // berth-vmm sets KSM advice and the NUMA policy when it maps guest memory: the plan
    // says so, with no host access, from the Host manifest's driver.
    for line in [
        "<-> guest web-1: migrate locally into a new VMM on kvm01",
        "spec.memory.sharePages: false -> true  (local migration)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("(live)"), "{text}");
    // libvirt refuses to migrate a domain to its own host: a hugepage change on a
    // libvirt host is blocked unless the policy allows a restart.
    for line in [
        "! guest db-1: blocked on kvm02",
        "the libvirt driver cannot migrate it locally into one; set restartPolicy: ifRequired",
        "spec.memory.hugepages: unset -> 2MiB  (blocked)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn selector_placed_guests_are_placed_where_they_fit_or_blocked_with_the_reason() {
    let repo = Repo::new("selector");
    let host = |name: &str, rack: &str, memory: &str| {
        format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {name}, labels: {{rack: {rack}}}}}\n\
             spec: {{address: '127.0.0.1:7410', cpus: '0-1', memory: {memory}}}\n---\n"
        )
    };
    let guest = |name: &str, memory: &str| {
        format!(
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}, labels: {{app: db}}}}\n\
             spec:\n  hostSelector: {{rack: a}}\n  antiAffinity: {{app: db}}\n  \
             availability: {{onHostFailure: restart}}\n  cpu: {{vcpus: 1}}\n  memory: {{size: {memory}}}\n---\n"
        )
    };
    let hosts = format!(
        "{}{}{}",
        host("kvm01", "a", "1GiB"),
        host("kvm02", "a", "2GiB"),
        host("kvm03", "b", "8GiB")
    );
    repo.write("hosts.yaml", &hosts);
    repo.write("guests.yaml", &guest("db-1", "512MiB"));
    repo.commit("base: db-1");
    // db-2 joins: anti-affinity keeps it off db-1's host, rack b is not selected.
    repo.write(
        "guests.yaml",
        &format!("{}{}", guest("db-1", "512MiB"), guest("db-2", "512MiB")),
    );
    repo.commit("db-2");
    let out = repo.plan(&CI);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    // db-1 was placed on kvm02 in the base (the most free memory) and stays there.
    for line in [
        "+ guest db-2: start on kvm01",
        "placed by selector {rack: a} on kvm01",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains("guest db-1"), "db-1 keeps its host:\n{text}");

    // db-3 fits nowhere: both rack-a hosts run an app: db guest.
    repo.write(
        "guests.yaml",
        &format!(
            "{}{}{}",
            guest("db-1", "512MiB"),
            guest("db-2", "512MiB"),
            guest("db-3", "256MiB")
        ),
    );
    repo.commit("db-3");
    let out = repo.plan(&CI);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(2), "{text}\n{}", stderr(&out));
    for line in [
        "! guest db-3: blocked",
        "placed by selector {rack: a}: nowhere",
        "no host fits: 2 match hostSelector {rack: a}, none has room: \
         kvm01 runs a guest that anti-affinity keeps apart from it ({app: db}); \
         kvm02 runs a guest that anti-affinity keeps apart from it ({app: db})",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let json = repo.plan(&["--base", "HEAD~1", "--head", "HEAD", "-o", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON plan");
    let db3 = plan["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .find(|g| g["name"] == "db-3")
        .expect("db-3 planned");
    assert_eq!(db3["operation"], "blocked", "{db3}");
    assert!(plan["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .all(|s| !s.to_string().contains("db-3")));

    // A commit that grows db-1 beyond kvm02's memory: it fits nowhere, so it is blocked
    // and keeps running where it is (no stop, no move).
    repo.write(
        "guests.yaml",
        &format!("{}{}", guest("db-1", "4GiB"), guest("db-2", "512MiB")),
    );
    repo.commit("db-1 grows");
    let out = repo.plan(&CI);
    let text = stdout(&out);
    for line in [
        "! guest db-1: blocked on kvm02",
        "4GiB does not fit in host kvm02's 2GiB for guests on normal pages",
        "4GiB does not fit in host kvm01's 1GiB for guests on normal pages",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
