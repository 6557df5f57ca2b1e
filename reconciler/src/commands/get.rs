//! `berth get guests`: the guests that run on this machine, read from their VMMs (no
//! server needed), as a table or JSON.

use std::fmt::Write as _;
use std::process::ExitCode;

use berth_reconciler::driver::local::LocalGuest;
use berth_reconciler::output::{self, Output};
use berth_schema::{Bytes, Pinning};
use serde::Serialize;

use berth_reconciler::driver::{Driver, LibvirtDriver};
use berth_reconciler::model::ObservedGuest;

use super::target::{LibvirtArgs, LocalArgs};
use crate::cli::write_stdout;

/// Arguments of `berth get`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to list.
    #[command(subcommand)]
    pub what: What,
}

/// What `berth get` lists.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// The guests on this machine: state, pinning in force, memory, hugepages, hard
    /// limit, heartbeats and uptime.
    Guests(GuestsArgs),
}

/// Arguments of `berth get guests`.
#[derive(Debug, clap::Args)]
pub struct GuestsArgs {
    /// Output format: `text` (aligned columns; `table` is an alias), or the rows as
    /// `json` or `yaml`.
    #[arg(short = 'o', long, value_name = "FORMAT",
          value_parser = output::without_markdown(), default_value = "text")]
    pub output: Output,
    /// Local driver options.
    #[command(flatten)]
    pub local: LocalArgs,
    /// On a libvirt host.
    #[command(flatten)]
    pub libvirt: LibvirtArgs,
    /// List the whole fleet's guests from etcd (with --etcd) instead of this machine's.
    #[arg(long)]
    pub fleet: bool,
    /// The fleet's etcd, for --fleet.
    #[command(flatten)]
    pub etcd: berth_reconciler::etcd::EtcdArgs,
}

/// One guest, as `berth get guests` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    name: String,
    state: String,
    host: String,
    /// The VMM's pid (berth-vmm hosts), or QEMU's (libvirt hosts with a local URI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    vcpus: u32,
    max_vcpus: u32,
    /// Pinning in force, read back from /proc.
    pinning: Option<Pinning>,
    memory: Bytes,
    /// Hugepages the VMM maps, with their size.
    hugepages: Option<String>,
    hard_limit: Option<Bytes>,
    /// Heartbeat lines the guest wrote, over all vCPUs.
    heartbeats: Option<u64>,
    /// Since the VMM started (berth-vmm hosts), or QEMU (libvirt hosts with a local URI).
    #[serde(skip_serializing_if = "Option::is_none")]
    uptime_ms: Option<u64>,
    /// Why the VMM's state is unknown: it holds its lock but did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    unresponsive: Option<String>,
}

impl Row {
    fn of(g: &LocalGuest) -> Row {
        let o = &g.observed;
        let Some(s) = &g.status else {
            // Its VMM runs but did not answer: what it was built with, marked so.
            return Row {
                name: o.name.clone(),
                state: "unresponsive".into(),
                host: o.host.clone(),
                pid: g.pid,
                vcpus: o.cpu.vcpus,
                max_vcpus: o.cpu.max_vcpus,
                pinning: None,
                memory: o.memory.size,
                hugepages: None,
                hard_limit: None,
                heartbeats: None,
                uptime_ms: None,
                unresponsive: o.unresponsive.clone(),
            };
        };
        let lines: Vec<u64> = s.vcpu.iter().filter_map(|v| v.lines).collect();
        Row {
            name: o.name.clone(),
            state: serde_json::to_value(s.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            host: o.host.clone(),
            pid: Some(s.pid),
            vcpus: s.vcpus,
            max_vcpus: s.max_vcpus,
            pinning: o.cpu.pinning.clone(),
            memory: o.memory.size,
            hugepages: o
                .memory
                .hugepages
                .map(|size| format!("{}x{size}", s.memory.hugepages)),
            hard_limit: o.memory.tune.as_ref().and_then(|t| t.hard_limit),
            heartbeats: (!lines.is_empty()).then(|| lines.iter().sum()),
            uptime_ms: Some(s.uptime_ms),
            unresponsive: None,
        }
    }

    /// A guest of a libvirt host, read back from libvirt; its QEMU's pid and uptime
    /// when libvirtd runs on this machine.
    fn of_domain(o: &ObservedGuest, local: bool) -> Row {
        let qemu = local
            .then(|| berth_hypervisor::libvirt::qemu_process(&o.name))
            .flatten();
        Row {
            name: o.name.clone(),
            state: serde_json::to_value(o.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            host: o.host.clone(),
            pid: qemu.map(|q| q.pid),
            vcpus: o.cpu.vcpus,
            max_vcpus: o.cpu.max_vcpus,
            pinning: o.cpu.pinning.clone(),
            memory: o.memory.size,
            hugepages: o.memory.hugepages.map(|size| size.to_string()),
            hard_limit: o.memory.tune.as_ref().and_then(|t| t.hard_limit),
            heartbeats: None,
            uptime_ms: qemu.map(|q| q.uptime.as_millis() as u64),
            unresponsive: None,
        }
    }
}

/// Runs `berth get`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let What::Guests(args) = &args.what;
    if args.fleet {
        return super::fleet::get_guests(&args.etcd, args.output);
    }
    let host = args.local.recorded_host();
    let rows: Vec<Row> = match args.libvirt.spec(&args.local) {
        Some(spec) => {
            let local = spec.is_local();
            LibvirtDriver::new(&host, spec, "")?
                .observe()?
                .guests
                .iter()
                .map(|g| Row::of_domain(g, local))
                .collect()
        }
        None => args
            .local
            .observer(&host)
            .guests()?
            .iter()
            .map(Row::of)
            .collect(),
    };
    let text = match args.output {
        Output::Json => output::json(&rows)?,
        Output::Yaml => output::yaml(&rows)?,
        Output::Text | Output::Markdown => table(&rows),
    };
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn pinning_text(p: Option<&Pinning>) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let mut parts: Vec<String> = p.vcpus.iter().map(|(i, s)| format!("{i}:{s}")).collect();
    if let Some(e) = &p.emulator {
        parts.push(format!("emu:{e}"));
    }
    parts.join(" ")
}

fn uptime_text(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn table(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "No guests run on this machine.\n".into();
    }
    let header = [
        "NAME",
        "STATE",
        "HOST",
        "VCPUS",
        "PINNING",
        "MEMORY",
        "HUGEPAGES",
        "HARD LIMIT",
        "HEARTBEATS",
        "UPTIME",
    ];
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.state.clone(),
                r.host.clone(),
                format!("{}/{}", r.vcpus, r.max_vcpus),
                pinning_text(r.pinning.as_ref()),
                r.memory.to_string(),
                r.hugepages.clone().unwrap_or_else(|| "-".into()),
                r.hard_limit.map_or_else(|| "-".into(), |b| b.to_string()),
                r.heartbeats.map_or_else(|| "-".into(), |n| n.to_string()),
                r.uptime_ms.map_or_else(|| "-".into(), uptime_text),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for c in &cells {
        line(c.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_well() {
        assert_eq!(uptime_text(5_400), "5s");
        assert_eq!(uptime_text(125_000), "2m5s");
        assert_eq!(uptime_text(7_260_000), "2h1m");
        assert_eq!(uptime_text(90_000_000), "1d1h");
    }

    #[test]
    fn pinning_reads_well() {
        let p = Pinning {
            vcpus: [(0, "0".parse().unwrap()), (1, "1".parse().unwrap())].into(),
            emulator: Some("0-1".parse().unwrap()),
        };
        assert_eq!(pinning_text(Some(&p)), "0:0 1:1 emu:0-1");
        assert_eq!(pinning_text(None), "-");
    }
}
