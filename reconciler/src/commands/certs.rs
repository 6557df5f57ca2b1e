//! `berth certs`: a fleet CA and host certificates for `berth serve`'s mutual TLS.
//!
//! Writes into `--out`: `ca.pem` (trusted by every host), `ca.key` (0600; keep it off
//! the hosts), and per host `<host>.pem` and `<host>.key` (0600). An existing
//! `ca.pem`/`ca.key` pair is reused, so a host added later gets a certificate of the
//! same CA. Each host certificate names its Host (DNS subject alternative name) and,
//! from its Host manifest, the IP address (or name) of `spec.address`, so that
//! `berth status --server https://ADDRESS` can check it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use berth_reconciler::tls::{write_file, FleetCa};

use crate::cli::write_stdout;

/// Arguments of `berth certs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the files (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Make a certificate for every Host of these manifests (a directory or a file).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Make a certificate for this host too: `NAME`, or `NAME=IP,...` with addresses
    /// the certificate also names. Repeatable.
    #[arg(long = "host", value_name = "NAME[=IP,...]")]
    pub hosts: Vec<String>,
    /// How long the certificates are valid, in days (a new CA: ten times as long).
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// One certificate to make.
struct Wanted {
    name: String,
    ips: Vec<IpAddr>,
    dns: Vec<String>,
}

fn from_address(name: &str, address: &str) -> Wanted {
    let (ips, dns) = match address.parse::<SocketAddr>() {
        Ok(addr) => (vec![addr.ip()], Vec::new()),
        // `host:port` with a DNS name.
        Err(_) => match address.rsplit_once(':') {
            Some((host, _)) if !host.is_empty() => (Vec::new(), vec![host.to_owned()]),
            _ => (Vec::new(), Vec::new()),
        },
    };
    Wanted {
        name: name.to_owned(),
        ips,
        dns,
    }
}

fn from_flag(flag: &str) -> anyhow::Result<Wanted> {
    let (name, ips) = flag.split_once('=').unwrap_or((flag, ""));
    let ips = ips
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|ip| {
            ip.parse()
                .with_context(|| format!("--host {flag}: {ip:?} is not an IP address"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Wanted {
        name: name.to_owned(),
        ips,
        dns: Vec::new(),
    })
}

/// Makes the files; prints what was written.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut wanted = Vec::new();
    if let Some(path) = &args.manifests {
        let set = berth_schema::load_path(path).map_err(|invalid| {
            let mut text = format!("{} is not valid:", path.display());
            for d in invalid.diagnostics.iter().filter(|d| d.is_error()) {
                text.push_str(&format!("\n  {d}"));
            }
            anyhow::anyhow!(text)
        })?;
        for host in set.manifests.hosts.values() {
            wanted.push(from_address(&host.metadata.name, &host.spec.address));
        }
    }
    for flag in &args.hosts {
        wanted.push(from_flag(flag)?);
    }
    if wanted.is_empty() {
        bail!("no host to make a certificate for (--manifests PATH or --host NAME)");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let (ca_pem, ca_key) = (args.out.join("ca.pem"), args.out.join("ca.key"));
    let mut report = String::new();
    let ca = if ca_pem.exists() && ca_key.exists() {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let ca = FleetCa::load(&read(&ca_pem)?, &read(&ca_key)?)
            .with_context(|| format!("cannot use the CA in {}", args.out.display()))?;
        report.push_str(&format!("reused the fleet CA {}\n", ca_pem.display()));
        ca
    } else {
        let ca = FleetCa::generate(&args.out.display().to_string(), args.days * 10)?;
        write_file(&ca_key, &ca.key_pem(), 0o600)
            .with_context(|| format!("cannot write {}", ca_key.display()))?;
        write_file(&ca_pem, ca.cert_pem(), 0o644)
            .with_context(|| format!("cannot write {}", ca_pem.display()))?;
        report.push_str(&format!(
            "wrote the fleet CA {} (its key {} stays off the hosts)\n",
            ca_pem.display(),
            ca_key.display()
        ));
        ca
    };
    for w in &wanted {
        let issued = ca.issue(&w.name, &w.ips, &w.dns, args.days)?;
        let (cert, key) = (
            args.out.join(format!("{}.pem", w.name)),
            args.out.join(format!("{}.key", w.name)),
        );
        write_file(&key, &issued.key_pem, 0o600)
            .with_context(|| format!("cannot write {}", key.display()))?;
        write_file(&cert, &issued.cert_pem, 0o644)
            .with_context(|| format!("cannot write {}", cert.display()))?;
        let mut names = vec![w.name.clone()];
        names.extend(w.dns.iter().cloned());
        names.extend(w.ips.iter().map(IpAddr::to_string));
        report.push_str(&format!(
            "wrote {} and {} (names: {})\n",
            cert.display(),
            key.display(),
            names.join(", ")
        ));
    }
    write_stdout(&report)?;
    Ok(ExitCode::SUCCESS)
}
