//! What the commands that act on this machine share (`apply`, `plan --driver local`,
//! `get guests`, `stop`): the state directory, the berth-vmm binary, which host this
//! machine is, and the manifests to apply with the revision they came from.

use std::net::{ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use berth_reconciler::driver::local::{locate_vmm, DEFAULT_STATE_DIR};
use berth_reconciler::driver::LocalDriver;
use berth_reconciler::git;
use berth_reconciler::machine::Machine;
use berth_reconciler::model::Desired;
use berth_schema::{Host, HostDriver, LibvirtSpec, Validated};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Options of the local driver.
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// The local driver's state directory (guests' sockets, logs, the apply lock).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "PATH")]
    pub state_dir: PathBuf,
    /// The berth-vmm binary [default: $BERTH_VMM, else berth-vmm next to berth].
    #[arg(long, value_name = "PATH")]
    pub vmm_path: Option<PathBuf>,
    /// Which host this machine is, by its Host manifest's name [default: the Host whose
    /// address is an address of this machine, else the only Host].
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
}

impl LocalArgs {
    /// The local driver for host `host`.
    pub fn driver(&self, host: &str) -> anyhow::Result<LocalDriver> {
        let vmm = locate_vmm(self.vmm_path.as_deref())?;
        Ok(LocalDriver::new(host, &self.state_dir, vmm))
    }

    /// The local driver for observing only: berth-vmm is not needed to read status.
    pub fn observer(&self, host: &str) -> LocalDriver {
        let vmm = locate_vmm(self.vmm_path.as_deref()).unwrap_or_else(|_| "berth-vmm".into());
        LocalDriver::new(host, &self.state_dir, vmm)
    }

    /// This machine's host name: `--host`, else the Host manifest whose address is
    /// local, else the only Host manifest.
    pub fn this_host(&self, desired: &Desired) -> anyhow::Result<String> {
        if let Some(host) = &self.host {
            return Ok(host.clone());
        }
        let local: Vec<&Host> = desired
            .hosts
            .iter()
            .filter(|h| is_local_address(&h.spec.address))
            .collect();
        match (&local[..], &desired.hosts[..]) {
            ([one], _) => Ok(one.metadata.name.clone()),
            ([], [one]) => Ok(one.metadata.name.clone()),
            ([], []) => bail!("no Host manifest says which host this is; pass --host NAME"),
            ([], all) => bail!(
                "none of the Host manifests ({}) has an address of this machine; pass --host NAME",
                names(all.iter())
            ),
            (several, _) => bail!(
                "several Host manifests have an address of this machine ({}); pass --host NAME",
                names(several.iter().copied())
            ),
        }
    }

    /// The host name recorded by the last apply, else the machine's hostname: for
    /// commands that run without manifests.
    pub fn recorded_host(&self) -> String {
        if let Some(host) = &self.host {
            return host.clone();
        }
        if let Some(applied) = Applied::read(&self.state_dir) {
            return applied.host;
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".to_owned())
    }
}

/// Which libvirt connection a command without manifests (`get guests`, `stop`) uses.
#[derive(Debug, Clone, clap::Args)]
pub struct LibvirtArgs {
    /// The host's libvirt connection, on a libvirt host [default: the one the last
    /// `berth apply` in the state directory used, if its host was a libvirt host].
    #[arg(long, value_name = "URI")]
    pub libvirt_uri: Option<String>,
}

impl LibvirtArgs {
    /// The libvirt connection to use, `None` on a berth-vmm host.
    pub fn spec(&self, local: &LocalArgs) -> Option<LibvirtSpec> {
        match &self.libvirt_uri {
            Some(uri) => Some(LibvirtSpec {
                uri: uri.clone(),
                ..LibvirtSpec::default()
            }),
            None => Applied::read(&local.state_dir)?.libvirt,
        }
    }
}

/// The libvirt connection of host `host` when its Host manifest says `driver: libvirt`;
/// `None` for berth-vmm (the local driver).
pub fn libvirt_host(desired: &Desired, host: &str) -> Option<LibvirtSpec> {
    desired
        .hosts
        .iter()
        .find(|h| h.metadata.name == host && h.spec.driver == HostDriver::Libvirt)
        .map(|h| h.spec.libvirt_or_default())
}

fn names<'a>(hosts: impl Iterator<Item = &'a Host>) -> String {
    hosts
        .map(|h| h.metadata.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `address` (`host:port`) names this machine: a loopback address, or one a
/// socket can be bound to here.
fn is_local_address(address: &str) -> bool {
    let Ok(addrs) = address.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| a.ip().is_loopback() || UdpSocket::bind((a.ip(), 0)).is_ok())
}

/// Where the manifests come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceKind {
    /// A directory or file.
    Path,
    /// A git revision.
    Git,
}

/// Validated manifests and the revision they are.
pub struct Source {
    /// The manifests.
    pub validated: Validated,
    /// A commit id (git) or `sha256:` of the documents (a path).
    pub revision: String,
    /// Path or git.
    pub kind: SourceKind,
    /// The path, or `<repo>@<rev>`.
    pub location: String,
}

/// Reads and validates the manifests at `path`, or at revision `rev` of `repo`.
pub fn load_source(
    path: Option<&Path>,
    rev: Option<&str>,
    repo: &Path,
    dir: Option<&str>,
) -> anyhow::Result<Source> {
    if let Some(rev) = rev {
        let revision = git::read_revision(repo, rev, dir)
            .with_context(|| format!("reading revision {rev} of {}", repo.display()))?;
        let validated = berth_schema::load_files(revision.files).with_context(|| {
            format!(
                "revision {rev} ({}) is not valid; nothing was applied",
                &revision.commit[..revision.commit.len().min(12)]
            )
        })?;
        return Ok(Source {
            validated,
            revision: revision.commit,
            kind: SourceKind::Git,
            location: format!("{}@{rev}", repo.display()),
        });
    }
    let path = path.unwrap_or(Path::new("."));
    let validated = super::input::load(path).with_context(|| {
        format!(
            "the manifests in {} are not valid; nothing was applied",
            path.display()
        )
    })?;
    let revision = content_hash(&Desired::from_manifests(&validated.manifests));
    Ok(Source {
        validated,
        revision,
        kind: SourceKind::Path,
        location: path.display().to_string(),
    })
}

/// `sha256:<hex>` of the documents (not of the files: formatting and comments do not
/// change it).
fn content_hash(desired: &Desired) -> String {
    let mut hasher = Sha256::new();
    let mut guests: Vec<_> = desired.guests.iter().collect();
    guests.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut hosts: Vec<_> = desired.hosts.iter().collect();
    hosts.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let doc = serde_json::json!({"guests": guests, "hosts": hosts, "fleet": desired.fleet});
    hasher.update(doc.to_string().as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `<state>/applied.json`: what the last successful apply applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    /// The commit id, or `sha256:` of the documents.
    pub revision: String,
    /// Path or git.
    pub source: SourceKind,
    /// The path, or `<repo>@<rev>`.
    pub location: String,
    /// The host it was applied on.
    pub host: String,
    /// When (RFC 3339, UTC).
    pub applied_at: String,
    /// The host's libvirt connection, when it is a libvirt host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtSpec>,
}

impl Applied {
    /// The file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("applied.json")
    }

    /// The record, if there is a readable one.
    pub fn read(state_dir: &Path) -> Option<Applied> {
        let text = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record (atomically).
    pub fn write(&self, state_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(state_dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Checks the Host manifest `host` (and the guests placed on it) against this machine.
///
/// # Errors
/// The mismatches, as [`berth_schema::Invalid`] (each with its file, line and field),
/// or why the machine could not be read.
pub fn ensure_machine_fits(validated: &Validated, host: &str) -> anyhow::Result<()> {
    let machine = Machine::read()?;
    machine
        .ensure_fits(&validated.manifests, host)
        .with_context(|| {
            format!("the Host manifest {host} does not match this machine; nothing was applied")
        })
}
