//! `berth import`: reads the domains of a libvirt connection and writes Guest manifests
//! for them and a Host manifest for the host, then marks the domains as berth's (their
//! `<metadata>`), so that `berth plan` on the written manifests shows no changes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use berth_hypervisor::libvirt::Libvirt;
use berth_schema::{
    CpuSet, DomainType, Host, HostDriver, HostSpec, KsmSpec, LibvirtSpec, Metadata, ThpMode,
    API_VERSION,
};

use crate::cli::write_stdout;

/// Arguments of `berth import`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The domains to import [default: every persistent domain of the connection].
    #[arg(value_name = "DOMAIN")]
    pub domains: Vec<String>,
    /// The libvirt connection to read.
    #[arg(long, default_value = LibvirtSpec::DEFAULT_URI, value_name = "URI")]
    pub uri: String,
    /// The name of the Host manifest to write, on which the guests are placed.
    #[arg(long, value_name = "NAME")]
    pub host: String,
    /// `ip:port` of the host's `berth serve` API, for its Host manifest.
    #[arg(long, default_value = "127.0.0.1:7410", value_name = "ADDR")]
    pub address: String,
    /// Where to write `hosts/<host>.yaml` and `guests/<domain>.yaml`; existing files
    /// are never overwritten.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write the manifests only; leave the domains unmarked (berth then lists them as
    /// not its own and does not touch them).
    #[arg(long)]
    pub no_adopt: bool,
}

/// Runs `berth import`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let libvirt = Libvirt::open(&args.uri)?;
    let mut imported = libvirt.import(&args.host)?;
    if !args.domains.is_empty() {
        for name in &args.domains {
            if !imported.iter().any(|(g, _)| &g.metadata.name == name) {
                bail!("no persistent domain {name} at {}", args.uri);
            }
        }
        imported.retain(|(g, _)| args.domains.contains(&g.metadata.name));
    }
    let kinds: std::collections::BTreeSet<DomainType> = imported.iter().map(|(_, t)| *t).collect();
    let domain_type = match kinds.len() {
        0 | 1 => kinds.into_iter().next().unwrap_or_default(),
        _ => bail!(
            "the domains mix types kvm and qemu; a Host has one domainType: import them separately by name"
        ),
    };
    let node = libvirt.node()?;
    let host = host_manifest(args, node.cpus, node.memory_total, domain_type);

    let mut files: Vec<(PathBuf, String)> = vec![(
        args.out.join("hosts").join(format!("{}.yaml", args.host)),
        serde_yaml::to_string(&host)?,
    )];
    for (guest, _) in &imported {
        files.push((
            args.out
                .join("guests")
                .join(format!("{}.yaml", guest.metadata.name)),
            serde_yaml::to_string(guest)?,
        ));
    }
    if let Some((existing, _)) = files.iter().find(|(path, _)| path.exists()) {
        bail!(
            "{} exists; berth import never overwrites a manifest (nothing was written)",
            existing.display()
        );
    }
    for (path, text) in &files {
        write_new(path, text)?;
    }
    // What was written must load as a repository before any domain is marked.
    berth_schema::load_path(&args.out).with_context(|| {
        format!(
            "the manifests written to {} are not valid; no domain was marked as berth's",
            args.out.display()
        )
    })?;
    let mut out = String::new();
    for (guest, _) in &imported {
        if !args.no_adopt {
            libvirt.adopt(guest, "import")?;
        }
        out.push_str(&format!(
            "imported {} ({})\n",
            guest.metadata.name,
            if args.no_adopt {
                "not adopted"
            } else {
                "adopted"
            }
        ));
    }
    out.push_str(&format!(
        "{} guest(s) and host {} written to {}.\n",
        imported.len(),
        args.host,
        args.out.display()
    ));
    write_stdout(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn host_manifest(
    args: &Args,
    cpus: CpuSet,
    memory: berth_schema::Bytes,
    domain_type: DomainType,
) -> Host {
    Host {
        api_version: API_VERSION.to_owned(),
        kind: "Host".to_owned(),
        metadata: Metadata {
            name: args.host.clone(),
            ..Metadata::default()
        },
        spec: HostSpec {
            address: args.address.clone(),
            cpus,
            reserved_cpus: CpuSet::new(),
            memory,
            hugepages: Default::default(),
            ksm: KsmSpec::default(),
            transparent_hugepages: ThpMode::default(),
            schedulable: true,
            cpu_model: None,
            driver: HostDriver::Libvirt,
            libvirt: Some(LibvirtSpec {
                uri: args.uri.clone(),
                domain_type,
                remote_uri: None,
                migration_uri: None,
            }),
        },
    }
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
