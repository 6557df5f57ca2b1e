//! `berth get guests --fleet` and `berth status --fleet`: the whole fleet as its hosts
//! publish it in etcd, read in one range read, asking no host.

use std::fmt::Write as _;
use std::process::ExitCode;

use berth_reconciler::etcd::{read_fleet, EtcdArgs, FleetView, Ownership, PublishedHost};
use berth_reconciler::ObservedGuest;
use berth_schema::Bytes;
use serde::Serialize;

use crate::cli::write_stdout;
use berth_reconciler::output::Output;

/// Arguments of `berth status`.
#[derive(Debug, clap::Args)]
pub struct FleetStatusArgs {
    /// The service's status options.
    #[command(flatten)]
    pub serve: berth_reconciler::serve::StatusArgs,
    /// Show the whole fleet from etcd (with --etcd) instead of one `berth serve`.
    #[arg(long)]
    pub fleet: bool,
    /// The fleet's etcd.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Runs `berth status`.
pub fn status(args: &FleetStatusArgs) -> anyhow::Result<ExitCode> {
    if !args.fleet {
        write_stdout(&berth_reconciler::serve::status_text(&args.serve)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let view = read(&args.etcd)?;
    let text = if args.serve.json || args.serve.output == Output::Json {
        serde_json::to_string_pretty(&FleetJson::of(&view))? + "\n"
    } else {
        status_table(&view)
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `berth get guests --fleet`.
pub fn get_guests(etcd: &EtcdArgs, output: Output) -> anyhow::Result<ExitCode> {
    let view = read(etcd)?;
    let rows = guest_rows(&view);
    let text = match output {
        Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
        Output::Yaml => berth_reconciler::output::yaml(&rows)?,
        Output::Text | Output::Markdown => guests_table(&rows),
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn read(etcd: &EtcdArgs) -> anyhow::Result<FleetView> {
    let config = etcd.config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(async {
        let store = config.connect().await?;
        read_fleet(&store).await
    })?)
}

/// `berth status --fleet -o json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FleetJson<'a> {
    revision: i64,
    leader: Option<&'a str>,
    hosts: Vec<&'a PublishedHost>,
    guests: &'a [ObservedGuest],
    owners: Vec<&'a Ownership>,
}

impl<'a> FleetJson<'a> {
    fn of(view: &'a FleetView) -> Self {
        FleetJson {
            revision: view.revision,
            leader: view.leader.as_deref(),
            hosts: view.hosts.values().collect(),
            guests: &view.observed,
            owners: view.owners.values().collect(),
        }
    }
}

/// One guest of the fleet: where it runs and who owns it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GuestRow {
    name: String,
    /// The host that runs it; `None` when no host reports it.
    host: Option<String>,
    /// Run state as its host observes it; `None` when no host reports it.
    state: Option<String>,
    vcpus: Option<u32>,
    memory: Option<Bytes>,
    /// The host that may run it (its ownership record).
    owner: Option<String>,
    /// Where a migration under way takes it.
    moving_to: Option<String>,
    /// The ownership record's revision.
    token: Option<i64>,
}

fn guest_rows(view: &FleetView) -> Vec<GuestRow> {
    let mut rows: Vec<GuestRow> = view
        .observed
        .iter()
        .map(|g| {
            let owner = view.owners.get(&g.name);
            GuestRow {
                name: g.name.clone(),
                host: Some(g.host.clone()),
                state: serde_json::to_value(g.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned)),
                vcpus: Some(g.cpu.vcpus),
                memory: Some(g.memory.size),
                owner: owner.map(|o| o.record.host.clone()),
                moving_to: owner.and_then(|o| o.record.moving_to.clone()),
                token: owner.map(|o| o.token.0),
            }
        })
        .collect();
    // Owned guests no host reports (being started, or their host stopped publishing).
    for (name, owner) in &view.owners {
        if !view.observed.iter().any(|g| &g.name == name) {
            rows.push(GuestRow {
                name: name.clone(),
                host: None,
                state: None,
                vcpus: None,
                memory: None,
                owner: Some(owner.record.host.clone()),
                moving_to: owner.record.moving_to.clone(),
                token: Some(owner.token.0),
            });
        }
    }
    rows.sort_by(|a, b| (&a.name, &a.host).cmp(&(&b.name, &b.host)));
    rows
}

fn guests_table(rows: &[GuestRow]) -> String {
    if rows.is_empty() {
        return "No guests in the fleet.\n".into();
    }
    let dash = || "-".to_owned();
    columns(
        &["NAME", "HOST", "STATE", "VCPUS", "MEMORY", "OWNER", "TOKEN"],
        rows.iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.host.clone().unwrap_or_else(dash),
                    r.state.clone().unwrap_or_else(dash),
                    r.vcpus.map_or_else(dash, |v| v.to_string()),
                    r.memory.map_or_else(dash, |m| m.to_string()),
                    match (&r.owner, &r.moving_to) {
                        (Some(o), Some(to)) => format!("{o} -> {to}"),
                        (Some(o), None) => o.clone(),
                        (None, _) => "none".to_owned(),
                    },
                    r.token.map_or_else(dash, |t| t.to_string()),
                ]
            })
            .collect(),
    )
}

fn status_table(view: &FleetView) -> String {
    let mut out = format!(
        "Fleet in etcd at revision {}: {} host(s) alive, leader {}.\n",
        view.revision,
        view.hosts.len(),
        view.leader.as_deref().unwrap_or("none")
    );
    if view.hosts.is_empty() {
        return out;
    }
    out.push('\n');
    out.push_str(&columns(
        &[
            "HOST", "LEASE", "CPUS", "MEMORY", "FREE", "GUESTS", "OWNED", "ADDRESS",
        ],
        view.hosts
            .values()
            .map(|h| {
                let o = &h.record.observed;
                let guests = view.observed.iter().filter(|g| g.host == h.name).count();
                let owned = view
                    .owners
                    .values()
                    .filter(|w| w.record.host == h.name)
                    .count();
                vec![
                    h.name.clone(),
                    format!("{:x}", h.lease),
                    o.cpus.to_string(),
                    o.memory_total.to_string(),
                    o.memory_free.to_string(),
                    guests.to_string(),
                    owned.to_string(),
                    h.record.address.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    ));
    let orphans: Vec<&str> = view
        .owners
        .values()
        .filter(|w| !view.hosts.contains_key(&w.record.host))
        .map(|w| w.guest.as_str())
        .collect();
    if !orphans.is_empty() {
        let _ = writeln!(
            out,
            "\nOwned by a host that publishes no record: {}",
            orphans.join(", ")
        );
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn columns(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
