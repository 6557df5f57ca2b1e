//! Scenario `dirtying`: a guest that dirties memory faster than the link moves it, with
//! a 30 ms downtime limit, under QEMU 7.2 and berth-vmm, with and without auto-converge.
//!
//! Both guests run the same workload shape: a periodic LAPIC timer, and on each tick one
//! write into each of the next N pages of the memory above 2 MiB, wrapping around; they
//! halt between ticks. berth's guest is the heartbeat payload (`dirtyPagesPerTick`, which
//! fills each page); QEMU's is [`dirty_guest`]. Each guest's own counters give the rate
//! it really wrote at, before and during the migration; QEMU's `calc-dirty-rate` (KVM's
//! dirty bitmap over 1 s) checks the QEMU guest's rate from outside.
//!
//! Runs, in order:
//! 1. QEMU as the issue sets it up: `downtime-limit=30`, everything else at its default
//!    (the default `max-bandwidth` is read back and printed), with a guest dirtying
//!    faster than that cap; without auto-converge (cancelled at the deadline), then
//!    with it.
//! 2. QEMU and berth-vmm at one common cap below the heartbeat's dirty rate (the
//!    heartbeat cannot dirty as fast as QEMU's default cap here: it fills whole pages at
//!    about 1 us per instruction, at most about 12 MiB/s on one vCPU), same guest
//!    memory, the heartbeat asked for a little more than the QEMU guest: QEMU without
//!    and with auto-converge; berth with `autoConverge: false, onTimeout: abort` (it
//!    must abort at the deadline and the guest keep running on the source), then with
//!    `autoConverge: true` on the same source guest (it must converge; past the limit
//!    it aborts, never forced).
//!
//! Columns that do not mean quite the same on both sides:
//! - passes: QEMU's `dirty-sync-count`, berth's pass number;
//! - remaining at end: QEMU's `ram.remaining` at the last poll before the cancel (what
//!   is left of the pass under way), berth's pages dirtied during its last pass (what
//!   the next pass would send);
//! - expected downtime: QEMU's `expected-downtime`, berth's `estimatedDowntimeMs`;
//! - dirty rate reported: QEMU's `ram.dirty-pages-rate` (pages found dirty per sync
//!   period: once the guest re-dirties its whole working set during a pass, that is the
//!   working set per pass, about the cap, whatever the guest's real rate), berth's
//!   `dirtyRate` (pages dirtied during a pass over its duration, the same bound).
//!   The guests' own counters give the real rate.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use berth_hypervisor::control::{Client, GuestRunState};
use berth_hypervisor::migration::{self, MigrateArgs, MigrationPhase, MigrationStatus};
use berth_hypervisor::vmm::Payload;
use berth_hypervisor::Vmm;
use berth_schema::Bandwidth;

use crate::dirty_guest::{self, Counters, Workload};
use crate::incoming::IncomingVmm;
use crate::mib;
use crate::qemu::{free_port, Qemu, Qmp};

/// The scenario's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The workload of the runs at QEMU's default cap (QEMU only).
    pub qemu_default_workload: Workload,
    /// The QEMU guest's workload in the side-by-side runs.
    pub workload: Workload,
    /// The heartbeat's in the side-by-side runs: same memory, asked to dirty somewhat
    /// more, so that it dirties at least as fast as the QEMU guest even when it loses
    /// ticks to a busy host.
    pub berth_workload: Workload,
    /// The common cap of the side-by-side runs, bytes/s.
    pub cap: u64,
    /// When runs without auto-converge are given up (QEMU cancelled, berth's completion
    /// timeout).
    pub deadline: Duration,
    /// How long runs with auto-converge may take before they count as not converged.
    pub converge_limit: Duration,
    /// berth's connections.
    pub connections: u32,
}

/// How one migration attempt ended.
#[derive(Debug, Clone, Default)]
struct Row {
    vmm: &'static str,
    cap: String,
    auto_converge: bool,
    result: String,
    secs: f64,
    passes: u64,
    downtime_ms: Option<f64>,
    sent: u64,
    guest: u64,
    remaining: Option<u64>,
    expected_downtime_ms: Option<f64>,
    /// The last throttle in force (it only steps up during a migration; berth shows 0
    /// again once it switches over).
    throttle: u64,
    rate_before: f64,
    rate_during: f64,
    reported_rate_max: f64,
}

fn mib_s(bytes_per_sec: f64) -> String {
    format!("{:.1}", bytes_per_sec / f64::from(1 << 20))
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

impl Row {
    fn print(&self) {
        println!(
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} / {} | {} | {} | {} | {} / {} | {} |",
            self.vmm,
            self.cap,
            if self.auto_converge { "on" } else { "off" },
            self.result,
            self.secs,
            self.passes,
            or_dash(self.downtime_ms.map(|d| format!("{d:.2}"))),
            mib(self.sent),
            mib(self.guest),
            or_dash(self.remaining.map(mib)),
            or_dash(self.expected_downtime_ms.map(|d| format!("{d:.0}"))),
            self.throttle,
            mib_s(self.rate_before),
            mib_s(self.rate_during),
            mib_s(self.reported_rate_max),
        );
    }
}

fn describe(w: &Workload) -> String {
    format!(
        "{} MiB guest, {} pages/tick x {} Hz = {} MiB/s asked",
        w.memory_mib,
        w.pages_per_tick,
        w.tick_hz,
        mib_s(w.nominal_rate())
    )
}

/// Runs the scenario and prints its tables.
pub fn run(vmm_bin: &Path, work: &Path, s: &Settings) -> anyhow::Result<()> {
    ensure!(
        s.workload.memory_mib == s.berth_workload.memory_mib,
        "the side-by-side guests must have the same memory size"
    );
    let mut rows = Vec::new();
    let mut notes = vec![format!("load average before: {}", load_average())];

    let w = s.qemu_default_workload;
    let elf = write_guest(work, "dirty-default.elf", &w)?;
    for ac in [false, true] {
        let limit = if ac { s.converge_limit } else { s.deadline };
        let (row, note) = qemu_run(work, &elf, &w, None, ac, limit)
            .with_context(|| format!("QEMU at its default cap, auto-converge {ac}"))?;
        notes.push(note);
        rows.push(row);
    }

    let w = s.workload;
    let elf = write_guest(work, "dirty.elf", &w)?;
    for ac in [false, true] {
        let limit = if ac { s.converge_limit } else { s.deadline };
        let (row, note) = qemu_run(work, &elf, &w, Some(s.cap), ac, limit)
            .with_context(|| format!("QEMU at {}, auto-converge {ac}", Bandwidth(s.cap)))?;
        notes.push(note);
        rows.push(row);
    }
    let (berth_rows, berth_notes) = berth_runs(vmm_bin, work, s).context("berth-vmm")?;
    notes.extend(berth_notes);
    rows.extend(berth_rows);

    notes.push(format!("load average after: {}", load_average()));
    println!();
    println!(
        "Dirtying guest, 30 ms downtime limit. QEMU at its default cap: {}. At the common cap: \
         QEMU {}; berth {}.",
        describe(&s.qemu_default_workload),
        describe(&s.workload),
        describe(&s.berth_workload),
    );
    println!();
    println!(
        "| VMM | cap | auto-converge | result | time s | passes | downtime ms | sent / guest | \
         remaining at end | expected downtime ms | final throttle % | guest writes MiB/s \
         before / during | dirty MiB/s reported (max) |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        r.print();
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| e.to_string())
}

fn write_guest(work: &Path, name: &str, w: &Workload) -> anyhow::Result<std::path::PathBuf> {
    let path = work.join(name);
    std::fs::write(&path, dirty_guest::image(w)?).with_context(|| format!("writing {name}"))?;
    Ok(path)
}

fn counters(q: &mut Qmp) -> anyhow::Result<Counters> {
    let out = q.hmp(&format!("xp /4gx {:#x}", dirty_guest::COUNTERS))?;
    Counters::parse(&out).with_context(|| format!("unexpected xp output {out:?}"))
}

/// Waits until `f` holds, polling every 50 ms.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The rate the guest writes at over `window`, bytes/s, from its page counter.
fn qemu_guest_rate(q: &mut Qmp, window: Duration) -> anyhow::Result<f64> {
    let (c0, t0) = (counters(q)?, Instant::now());
    std::thread::sleep(window);
    let (c1, t1) = (counters(q)?, Instant::now());
    Ok((c1.pages - c0.pages) as f64 * 4096.0 / (t1 - t0).as_secs_f64())
}

/// Whether the guest behind `q` runs: its tick counter moves within 500 ms.
fn qemu_guest_runs(q: &mut Qmp) -> anyhow::Result<bool> {
    let status = q.call(r#"{"execute":"query-status"}"#)?;
    let before = counters(q)?.ticks;
    std::thread::sleep(Duration::from_millis(500));
    Ok(status["status"] == "running" && counters(q)?.ticks > before)
}

fn qemu_run(
    work: &Path,
    elf: &Path,
    w: &Workload,
    cap: Option<u64>,
    auto_converge: bool,
    limit: Duration,
) -> anyhow::Result<(Row, String)> {
    let tag = format!("{}-{}", cap.unwrap_or(0), u8::from(auto_converge));
    let src_qmp = work.join(format!("dirty-src-{tag}.qmp"));
    let dst_qmp = work.join(format!("dirty-dst-{tag}.qmp"));
    let port = free_port()?;
    let kernel: [OsString; 2] = ["-kernel".into(), elf.into()];
    let _src = Qemu::spawn(work, w.memory_mib, &src_qmp, &kernel, None)?;
    let _dst = Qemu::spawn(work, w.memory_mib, &dst_qmp, &kernel, Some(port))?;
    let mut src = Qmp::connect(&src_qmp)?;
    let mut dst = Qmp::connect(&dst_qmp)?;
    // Firmware, long mode, the first lap over the working set, then a second of ticks.
    wait_for("the QEMU guest's ticks", Duration::from_secs(60), || {
        Ok(counters(&mut src)?.ticks >= u64::from(w.tick_hz))
    })?;
    let rate_before = qemu_guest_rate(&mut src, Duration::from_secs(2))?;
    src.call(r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"dirty-bitmap"}}"#)?;
    let mut bitmap_rate = f64::NAN;
    wait_for("calc-dirty-rate", Duration::from_secs(10), || {
        let r = src.call(r#"{"execute":"query-dirty-rate"}"#)?;
        bitmap_rate = r["dirty-rate"].as_f64().unwrap_or(f64::NAN) * f64::from(1 << 20);
        Ok(r["status"] == "measured")
    })?;
    let params = src.call(r#"{"execute":"query-migrate-parameters"}"#)?;
    let default_cap = params["max-bandwidth"].as_u64().context("max-bandwidth")?;
    let set = match cap {
        Some(cap) => serde_json::json!({"downtime-limit": 30, "max-bandwidth": cap}),
        None => serde_json::json!({"downtime-limit": 30}),
    };
    src.call(
        &serde_json::json!({"execute": "migrate-set-parameters", "arguments": set}).to_string(),
    )?;
    if auto_converge {
        src.call(
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"auto-converge","state":true}]}}"#,
        )?;
    }
    let c0 = counters(&mut src)?;
    let t0 = Instant::now();
    src.call(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
    ))?;
    let mut row = Row {
        vmm: "QEMU 7.2",
        cap: match cap {
            Some(c) => Bandwidth(c).to_string(),
            None => format!("default {}", Bandwidth(default_cap)),
        },
        auto_converge,
        guest: w.memory_mib << 20,
        rate_before,
        ..Row::default()
    };
    let mut last = serde_json::Value::Null;
    let status = loop {
        let st = src.call(r#"{"execute":"query-migrate"}"#)?;
        let ram = &st["ram"];
        row.reported_rate_max = row
            .reported_rate_max
            .max(ram["dirty-pages-rate"].as_f64().unwrap_or(0.0) * 4096.0);
        if let Some(t) = st["cpu-throttle-percentage"].as_u64() {
            row.throttle = row.throttle.max(t);
        }
        let status = st["status"].as_str().unwrap_or_default().to_owned();
        match status.as_str() {
            "completed" | "cancelled" => break status,
            "active" | "setup" | "device" | "pre-switchover" => {}
            "failed" => bail!("the QEMU migration failed: {st}"),
            other => bail!("QEMU migration status {other}: {st}"),
        }
        if t0.elapsed() >= limit {
            src.call(r#"{"execute":"migrate_cancel"}"#)?;
            wait_for("QEMU to cancel", Duration::from_secs(10), || {
                Ok(src.call(r#"{"execute":"query-migrate"}"#)?["status"] == "cancelled")
            })?;
            break "cancelled".to_owned();
        }
        last = st;
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = t0.elapsed();
    let c1 = counters(&mut src)?;
    let end = src.call(r#"{"execute":"query-migrate"}"#)?;
    match status.as_str() {
        "completed" => {
            let total_ms = end["total-time"].as_f64().unwrap_or(f64::NAN);
            row.secs = total_ms / 1000.0;
            row.downtime_ms = end["downtime"].as_f64();
            row.passes = end["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            row.sent = end["ram"]["transferred"].as_u64().unwrap_or(0);
            row.remaining = Some(0);
            row.rate_during = (c1.pages - c0.pages) as f64 * 4096.0 / (total_ms / 1000.0);
            let runs = qemu_guest_runs(&mut dst)?;
            row.result = if runs {
                "completed; runs on the destination".into()
            } else {
                "completed; destination NOT running".into()
            };
        }
        _ => {
            // The last poll before the cancel: what QEMU still had to send then.
            let ram = &last["ram"];
            row.secs = elapsed.as_secs_f64();
            row.passes = ram["dirty-sync-count"].as_u64().unwrap_or(0);
            row.sent = ram["transferred"].as_u64().unwrap_or(0);
            row.remaining = ram["remaining"].as_u64();
            row.expected_downtime_ms = last["expected-downtime"].as_f64();
            row.rate_during = (c1.pages - c0.pages) as f64 * 4096.0 / elapsed.as_secs_f64();
            let runs = qemu_guest_runs(&mut src)?;
            row.result = format!(
                "{status} at {:.0} s (not converged); {}",
                elapsed.as_secs_f64(),
                if runs {
                    "runs on the source"
                } else {
                    "source NOT running"
                }
            );
        }
    }
    let note = format!(
        "QEMU, cap {}{}, auto-converge {}: the guest wrote {} MiB/s before the migration (its \
         counters), calc-dirty-rate (KVM dirty bitmap, 1 s) saw {} MiB/s; working set {} pages",
        row.cap,
        if cap.is_none() {
            format!(" (query-migrate-parameters: max-bandwidth {default_cap})")
        } else {
            String::new()
        },
        if auto_converge { "on" } else { "off" },
        mib_s(rate_before),
        mib_s(bitmap_rate),
        w.working_set_pages(),
    );
    Ok((row, note))
}

/// Pages the heartbeat has dirtied so far (all vCPUs), from its records.
fn heartbeat_pages(vmm: &Vmm) -> anyhow::Result<u64> {
    let Payload::Heartbeat(layout) = vmm.payload() else {
        bail!("the source runs no heartbeat payload");
    };
    let mut pages = 0;
    for i in 0..vmm.online_vcpus() {
        let r = layout.record(vmm.vm().memory(), i)?;
        pages += (r.generation - 1) * r.pages + r.cursor;
    }
    Ok(pages)
}

fn heartbeat_ticks(vmm: &Vmm) -> anyhow::Result<u64> {
    let Payload::Heartbeat(layout) = vmm.payload() else {
        bail!("the source runs no heartbeat payload");
    };
    let mut ticks = 0;
    for i in 0..vmm.online_vcpus() {
        ticks += layout.record(vmm.vm().memory(), i)?.ticks;
    }
    Ok(ticks)
}

fn heartbeat_rate(vmm: &Vmm, window: Duration) -> anyhow::Result<f64> {
    let (p0, t0) = (heartbeat_pages(vmm)?, Instant::now());
    std::thread::sleep(window);
    let (p1, t1) = (heartbeat_pages(vmm)?, Instant::now());
    Ok((p1 - p0) as f64 * 4096.0 / (t1 - t0).as_secs_f64())
}

fn spec_text(name: &str, w: &Workload) -> String {
    format!(
        "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: {name}}}\nspec:\n  host: bench\n  \
         cpu: {{vcpus: 1}}\n  memory: {{size: {}MiB}}\n  boot: {{kernel: builtin:heartbeat, \
         heartbeat: {{tickHz: {}, ticksPerLine: {}, dirtyPagesPerTick: {}}}}}\n",
        w.memory_mib, w.tick_hz, w.tick_hz, w.pages_per_tick
    )
}

/// The berth policy: 30 ms, the cap, and a completion timeout of `timeout` for this
/// guest (berth scales `completionTimeoutPerGiB` by the guest size, at least 1/64 GiB).
fn policy(w: &Workload, cap: u64, auto_converge: bool, timeout: Duration) -> serde_json::Value {
    let per_gib_ms = timeout.as_millis() as u64 * 1024 / w.memory_mib.max(16);
    serde_json::json!({
        "maxDowntime": "30ms",
        "bandwidth": Bandwidth(cap).to_string(),
        "autoConverge": auto_converge,
        "completionTimeoutPerGiB": format!("{per_gib_ms}ms"),
        "onTimeout": "abort",
    })
}

/// Migrates `vmm` to a new incoming VMM with `policy`, following its status until it
/// ends.
fn berth_migrate(
    vmm: &Arc<Vmm>,
    dest: &IncomingVmm,
    policy: serde_json::Value,
    connections: u32,
    row: &mut Row,
) -> anyhow::Result<(MigrationStatus, Duration, u64)> {
    let args = MigrateArgs {
        destination: dest.address.clone(),
        token: dest.token.clone(),
        policy: serde_json::from_value(policy)?,
        connections: Some(connections),
    };
    let p0 = heartbeat_pages(vmm)?;
    let t0 = Instant::now();
    migration::send::start(vmm, args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut last_precopy = MigrationStatus::default();
    let status = loop {
        let st = vmm.migration().status().clone();
        row.reported_rate_max = row.reported_rate_max.max(st.dirty_rate as f64);
        row.throttle = row.throttle.max(u64::from(st.throttle_percent));
        match st.phase {
            MigrationPhase::Prechecks | MigrationPhase::Switchover => {}
            MigrationPhase::Precopy => last_precopy = st,
            _ => break st,
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = t0.elapsed();
    let pages = heartbeat_pages(vmm)? - p0;
    row.secs = elapsed.as_secs_f64();
    row.passes = u64::from(status.pass);
    row.sent = status.bytes_sent;
    row.rate_during = pages as f64 * 4096.0 / elapsed.as_secs_f64();
    Ok((status, elapsed, last_precopy.dirty_pages))
}

/// berth-vmm at the common cap: the abort run, then the auto-converge run, on one
/// source guest (this process).
fn berth_runs(
    vmm_bin: &Path,
    work: &Path,
    s: &Settings,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let w = s.berth_workload;
    let name = format!("bench-dirty-{}", std::process::id());
    let root = work.join(&name);
    std::fs::create_dir_all(&root)?;
    let text = spec_text(&name, &w);
    let spec_path = root.join("spec.yaml");
    std::fs::write(&spec_path, &text)?;
    let vmm = crate::source_vmm(&text, &root)?;
    vmm.start()?;
    // A full lap, so that no page of the working set is zero (as in the QEMU guest).
    wait_for(
        "the heartbeat's first lap",
        Duration::from_secs(120),
        || {
            let Payload::Heartbeat(layout) = vmm.payload() else {
                return Ok(false);
            };
            Ok(layout.record(vmm.vm().memory(), 0)?.generation >= 2)
        },
    )?;
    let rate_before = heartbeat_rate(&vmm, Duration::from_secs(2))?;
    let cap = Bandwidth(s.cap).to_string();
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // Without auto-converge: it must abort at the deadline, the guest staying here.
    let mut dest = IncomingVmm::spawn(vmm_bin, &spec_path, &root, &name)?;
    let mut row = Row {
        vmm: "berth-vmm",
        cap: cap.clone(),
        guest: w.memory_mib << 20,
        rate_before,
        ..Row::default()
    };
    let (status, elapsed, remaining) = berth_migrate(
        &vmm,
        &dest,
        policy(&w, s.cap, false, s.deadline),
        s.connections,
        &mut row,
    )?;
    row.remaining = Some(remaining * 4096);
    row.expected_downtime_ms = Some(status.estimated_downtime_ms);
    let exit = dest.wait_exit(Duration::from_secs(15))?;
    let ticks = heartbeat_ticks(&vmm)?;
    std::thread::sleep(Duration::from_millis(500));
    let beating = heartbeat_ticks(&vmm)? > ticks && vmm.run_state().0 == GuestRunState::Running;
    let intact = vmm.verify_memory()?.ok();
    let why = status.error.clone().unwrap_or_default();
    row.result = match status.phase {
        MigrationPhase::Failed if why.contains("converge") => format!(
            "aborted at {:.0} s (not converged); {}",
            elapsed.as_secs_f64(),
            match (beating, intact) {
                (true, true) => "runs on the source, memory verified",
                (true, false) => "runs on the source, memory BAD",
                (false, _) => "source NOT running",
            }
        ),
        other => {
            bail!("without auto-converge the migration ended {other:?} ({why}), not in an abort")
        }
    };
    notes.push(format!(
        "berth-vmm, auto-converge off: {why:?}; the destination exited with {}",
        exit.map_or("nothing (killed)".into(), |e| e.to_string())
    ));
    drop(dest);
    rows.push(row);

    // With auto-converge: it must converge.
    let mut dest = IncomingVmm::spawn(vmm_bin, &spec_path, &root, &name)?;
    let mut row = Row {
        vmm: "berth-vmm",
        cap,
        auto_converge: true,
        guest: w.memory_mib << 20,
        rate_before: heartbeat_rate(&vmm, Duration::from_secs(2))?,
        ..Row::default()
    };
    let (status, _, _) = berth_migrate(
        &vmm,
        &dest,
        policy(&w, s.cap, true, s.converge_limit),
        s.connections,
        &mut row,
    )?;
    if status.phase == MigrationPhase::Completed {
        vmm.stop_vcpus(Duration::from_secs(2));
        row.downtime_ms = status.downtime_ms;
        row.remaining = Some(0);
        let socket = root.join("guests").join(&name).join("control.sock");
        wait_for(
            "the destination's control socket",
            Duration::from_secs(10),
            || Ok(socket.exists()),
        )?;
        let mut client = Client::connect(&socket)?;
        let ticks = |c: &mut Client| -> anyhow::Result<u64> {
            Ok(c.status()?.vcpu.iter().filter_map(|v| v.ticks).sum())
        };
        let before = ticks(&mut client)?;
        std::thread::sleep(Duration::from_millis(500));
        let beating = ticks(&mut client)? > before;
        let intact = client.verify_memory()?.ok();
        client.shutdown(Duration::from_secs(10))?;
        dest.wait_exit(Duration::from_secs(10))?;
        row.result = match (beating, intact) {
            (true, true) => "completed; runs on the destination, memory verified".into(),
            (true, false) => "completed; runs on the destination, memory BAD".into(),
            (false, _) => "completed; destination NOT running".into(),
        };
    } else {
        row.result = format!(
            "{:?}: {} (not converged)",
            status.phase,
            status.error.as_deref().unwrap_or_default()
        );
    }
    rows.push(row);
    notes.insert(
        0,
        format!(
            "berth-vmm, cap {}: the heartbeat (1 vCPU) wrote {} MiB/s before the migrations \
             (its records); working set {} pages",
            Bandwidth(s.cap),
            mib_s(rate_before),
            w.working_set_pages(),
        ),
    );
    Ok((rows, notes))
}
