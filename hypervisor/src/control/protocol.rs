//! The control protocol, version 1: one JSON object per line each way.
//!
//! Request: `{"v":1,"id":7,"op":"status"}` or, with arguments,
//! `{"v":1,"id":8,"op":"retune","args":{"vcpus":3}}`.
//! Reply: `{"v":1,"id":7,"ok":true,"result":{...}}` or
//! `{"v":1,"id":7,"ok":false,"error":{"code":"refused","message":"..."}}`.
//!
//! Lines longer than [`MAX_LINE`] bytes, malformed JSON, an unknown `v` or an unknown
//! `op` get an error reply; the connection and the VMM stay up (an oversized line is
//! skipped up to its newline).

use std::collections::BTreeMap;

use berth_schema::{CpuSet, IoSpec, MemTune, Pinning};
use serde::{Deserialize, Serialize};

use crate::devices::IgnoredAccesses;
pub use crate::vstate::vcpu::VcpuRegisters;
use crate::vstate::vcpu::VcpuRunState;

/// The protocol version this VMM speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A request. Serialize it to send; read one with [`parse_request`], which classifies
/// what is wrong with a bad line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    /// Protocol version; must be [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Echoed in the reply.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

/// The operations. To add one: a variant here, its name in [`Op::name`] and
/// [`parse_op`], and its handler in the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", content = "args", rename_all = "camelCase")]
pub enum Op {
    /// Report [`Status`] ([`StatusArgs`]).
    Status(StatusArgs),
    /// Apply live changes ([`Retune`]); replies with the new [`Status`].
    Retune(Retune),
    /// Stop the vCPUs; the guest keeps its state.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Stop the guest and end the VMM: graceful, forced after `timeoutMs`.
    Shutdown(ShutdownArgs),
    /// Check every heartbeat data page in guest memory ([`crate::payload::heartbeat::VerifyReport`]).
    VerifyMemory,
    /// Live-migrate the guest to an incoming VMM ([`crate::migration::MigrateArgs`]);
    /// replies at once with the [`crate::migration::MigrationStatus`], the migration
    /// runs in the background.
    Migrate(crate::migration::MigrateArgs),
    /// Report the [`crate::migration::MigrationStatus`].
    MigrateStatus,
    /// Stop a migration before its commit (the guest stays here; an incoming VMM exits).
    MigrateCancel,
    /// End a `switchoverUnknown` state ([`crate::migration::MigrateResolveArgs`]).
    MigrateResolve(crate::migration::MigrateResolveArgs),
    /// Report the [`VcpuRegisters`] of every started vCPU; refused while the guest
    /// runs (pause it first).
    VcpuRegisters,
    /// Arm, renew or disarm the self-fence deadline ([`crate::fence::FenceArgs`]):
    /// unless renewed, the VMM stops the guest and exits at the deadline.
    FenceDeadline(crate::fence::FenceArgs),
}

impl Op {
    /// The `op` string of this operation.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Status(_) => "status",
            Op::Retune(_) => "retune",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Shutdown(_) => "shutdown",
            Op::VerifyMemory => "verifyMemory",
            Op::Migrate(_) => "migrate",
            Op::MigrateStatus => "migrateStatus",
            Op::MigrateCancel => "migrateCancel",
            Op::MigrateResolve(_) => "migrateResolve",
            Op::VcpuRegisters => "vcpuRegisters",
            Op::FenceDeadline(_) => "fenceDeadline",
        }
    }
}

/// Arguments of `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StatusArgs {
    /// Only what an observe compares with the spec: the host's THP mode (`memory.thp`),
    /// and the cgroup's memory usage, cpuset files and process list (in
    /// `cgroup.values`) are left out, so their files are not read; so is the I/O
    /// weight of a guest that asks for none. What a person can
    /// change by hand (affinities, limits, the I/O weight) is read as in a full status.
    /// A VMM older than this argument ignores it and answers in full.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub brief: bool,
}

/// Arguments of `shutdown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShutdownArgs {
    /// How long vCPUs get to stop before the VMM exits anyway (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Shut down also while an outgoing migration's switchover is unknown (refused
    /// otherwise: the guest would be lost if the destination did not run it). Only for
    /// an operator who knows the destination runs the guest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Live changes. Absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retune {
    /// New pinning: listed vCPUs are re-pinned, the emulator set if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinning: Option<Pinning>,
    /// New memory limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memtune: Option<MemTune>,
    /// New I/O weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoSpec>,
    /// vCPUs online: a hot-add up to maxVcpus; a decrease is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// vCPUs to unpin: they may run on every online CPU again and are no longer
    /// reported in `pinning`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpin_vcpus: Vec<u32>,
    /// Unpin the emulator threads likewise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpin_emulator: bool,
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// The request's id (0 when it could not be read).
    pub id: u64,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable: see [`ErrorCode`].
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// Error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCode {
    /// Not JSON, or not a request.
    Malformed,
    /// The line passed [`MAX_LINE`].
    TooLarge,
    /// `v` is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// `op` is not known.
    UnknownOp,
    /// The arguments are wrong (a CPU that does not exist, a vCPU beyond maxVcpus).
    InvalidArgument,
    /// The change cannot be made live (vCPU decrease) or in this state (resume a crashed
    /// guest).
    Refused,
    /// The host refused (a failing syscall).
    Host,
    /// The VMM lacks what this needs.
    Unsupported,
}

impl Response {
    /// A success reply.
    pub fn ok(id: u64, result: serde_json::Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// An error reply.
    pub fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// Parses one request line, classifying what is wrong with it.
///
/// # Errors
/// An error [`Response`] to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, Response> {
    if line.len() > MAX_LINE {
        return Err(Response::error(
            0,
            ErrorCode::TooLarge,
            format!(
                "request of {} bytes is over the {MAX_LINE}-byte limit",
                line.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| Response::error(0, ErrorCode::Malformed, format!("not JSON: {e}")))?;
    let id = value
        .get("id")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let Some(obj) = value.as_object() else {
        return Err(Response::error(
            id,
            ErrorCode::Malformed,
            "a request is a JSON object",
        ));
    };
    match obj.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(Response::error(
                id,
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported (this VMM speaks {PROTOCOL_VERSION})"
                ),
            ))
        }
        None => return Err(Response::error(id, ErrorCode::Malformed, "missing \"v\"")),
    }
    let Some(op) = obj.get("op").and_then(serde_json::Value::as_str) else {
        return Err(Response::error(id, ErrorCode::Malformed, "missing \"op\""));
    };
    let args = obj.get("args").cloned();
    let op = parse_op(op, args).map_err(|(code, message)| Response::error(id, code, message))?;
    Ok(Request {
        v: PROTOCOL_VERSION,
        id,
        op,
    })
}

/// The operations [`parse_op`] knows.
pub const KNOWN_OPS: [&str; 12] = [
    "status",
    "retune",
    "pause",
    "resume",
    "shutdown",
    "verifyMemory",
    "migrate",
    "migrateStatus",
    "migrateCancel",
    "migrateResolve",
    "vcpuRegisters",
    "fenceDeadline",
];

/// Builds an [`Op`] from its name and `args`. (Arguments are decoded from a
/// `serde_json::Value` directly: serde's buffered enum decoding would lose integer map
/// keys such as pinning's vCPU indexes.)
///
/// # Errors
/// The error code and message to reply with.
pub fn parse_op(op: &str, args: Option<serde_json::Value>) -> Result<Op, (ErrorCode, String)> {
    fn decode<T: serde::de::DeserializeOwned + Default>(
        op: &str,
        args: Option<serde_json::Value>,
    ) -> Result<T, (ErrorCode, String)> {
        match args {
            None | Some(serde_json::Value::Null) => Ok(T::default()),
            Some(value) => serde_json::from_value(value)
                .map_err(|e| (ErrorCode::Malformed, format!("bad {op} arguments: {e}"))),
        }
    }
    Ok(match op {
        "status" => Op::Status(decode(op, args)?),
        "retune" => Op::Retune(decode(op, args)?),
        "pause" => Op::Pause,
        "resume" => Op::Resume,
        "shutdown" => Op::Shutdown(decode(op, args)?),
        "verifyMemory" => Op::VerifyMemory,
        "migrate" => Op::Migrate(decode(op, args)?),
        "migrateStatus" => Op::MigrateStatus,
        "migrateCancel" => Op::MigrateCancel,
        "migrateResolve" => Op::MigrateResolve(decode(op, args)?),
        "vcpuRegisters" => Op::VcpuRegisters,
        "fenceDeadline" => Op::FenceDeadline(decode(op, args)?),
        other => {
            return Err((
                ErrorCode::UnknownOp,
                format!("unknown op {other:?} (known: {})", KNOWN_OPS.join(", ")),
            ))
        }
    })
}

/// The guest's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GuestRunState {
    /// vCPUs run.
    Running,
    /// vCPUs are paused by request.
    Paused,
    /// The guest stopped itself (reset, halt); vCPUs are stopped.
    Halted,
    /// A vCPU crashed (triple fault, entry failure); vCPUs are stopped.
    Crashed,
}

/// What the VMM reports, read back from the kernel and guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Guest name.
    pub name: String,
    /// VMM process id.
    pub pid: i32,
    /// Run state.
    pub state: GuestRunState,
    /// Why the guest crashed or halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What it boots (`builtin:heartbeat` or a kernel path).
    pub boot: String,
    /// vCPUs started.
    pub vcpus: u32,
    /// vCPUs created.
    pub max_vcpus: u32,
    /// Per vCPU, started or not.
    pub vcpu: Vec<VcpuStatus>,
    /// The VMM's other threads.
    pub emulator_threads: Vec<ThreadStatus>,
    /// Pinning as last asked for (what is in force is in `vcpu[].affinity`).
    pub pinning: Pinning,
    /// Memory limits as last asked for (what is in force is in `cgroup`; a limit the
    /// host cannot enforce is only here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memtune: Option<MemTune>,
    /// I/O weight as last asked for, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoSpec>,
    /// Memory.
    pub memory: MemoryStatus,
    /// cgroup values read from the files, when the VMM manages a cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<serde_json::Value>,
    /// The console.
    pub console: ConsoleStatus,
    /// Port and MMIO accesses no device claimed.
    pub ignored_accesses: IgnoredAccesses,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// The phase of this VMM's migration (`idle` when none), so that an observer asks
    /// `migrateStatus` only while one is under way. Absent from older VMMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationPhase>,
    /// Milliseconds until the self-fence deadline ([`crate::fence`]), while one is
    /// armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_in_ms: Option<u64>,
}

/// One vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VcpuStatus {
    /// Index (APIC ID).
    pub index: u32,
    /// Thread id, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<i32>,
    /// Affinity from `/proc/<pid>/task/<tid>/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<CpuSet>,
    /// What the thread does.
    pub run_state: VcpuRunState,
    /// Heartbeat timer ticks counted in guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticks: Option<u64>,
    /// Heartbeat lines written, from guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
}

/// A non-vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThreadStatus {
    /// Thread id.
    pub tid: i32,
    /// Thread name.
    pub name: String,
    /// Affinity from `/proc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<CpuSet>,
}

/// Memory facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStatus {
    /// Guest RAM, bytes.
    pub size: u64,
    /// `anonymous`, `hugetlb-2MiB` or `hugetlb-1GiB`.
    pub backing: String,
    /// Hugepages this process maps (from `/proc/<pid>/status` HugetlbPages).
    pub hugepages: u64,
    /// Resident set of the VMM (VmRSS, bytes; includes touched anonymous guest memory).
    pub rss: u64,
    /// Locked bytes (VmLck).
    pub locked: u64,
    /// KSM allowed.
    pub share_pages: bool,
    /// Host THP mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thp: Option<berth_schema::ThpMode>,
}

/// Console facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleStatus {
    /// The log file.
    pub path: String,
    /// Lines the guest wrote since start.
    pub lines: u64,
    /// Bytes the guest wrote since start.
    pub bytes: u64,
    /// Rotations done.
    pub rotations: u64,
}

/// Per-vCPU pins as a map, for building [`Pinning`] by hand.
pub fn vcpu_pins(pins: &[(u32, &str)]) -> BTreeMap<u32, CpuSet> {
    pins.iter()
        .map(|(i, s)| (*i, s.parse().expect("valid cpuset")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = parse_request(br#"{"v":1,"id":1,"op":"status"}"#).unwrap();
        assert_eq!(r.op, Op::Status(StatusArgs::default()));
        let r = parse_request(br#"{"v":1,"id":1,"op":"status","args":{"brief":true}}"#).unwrap();
        assert_eq!(r.op, Op::Status(StatusArgs { brief: true }));
        let r = parse_request(br#"{"v":1,"id":1,"op":"shutdown"}"#).unwrap();
        assert_eq!(r.op, Op::Shutdown(ShutdownArgs::default()));
        let r = parse_request(
            br#"{"v":1,"id":1,"op":"retune","args":{"pinning":{"vcpus":{"0":"1","1":"0-1"}}}}"#,
        )
        .unwrap();
        let Op::Retune(retune) = r.op else { panic!() };
        assert_eq!(
            retune.pinning.unwrap().vcpus,
            vcpu_pins(&[(0, "1"), (1, "0-1")])
        );
        let line = serde_json::to_string(&Request {
            v: 1,
            id: 2,
            op: Op::Retune(Retune {
                vcpus: Some(3),
                ..Default::default()
            }),
        })
        .unwrap();
        assert_eq!(line, r#"{"v":1,"id":2,"op":"retune","args":{"vcpus":3}}"#);
        assert_eq!(parse_request(line.as_bytes()).unwrap().id, 2);
        let s = serde_json::to_string(&Request {
            v: 1,
            id: 3,
            op: Op::Pause,
        })
        .unwrap();
        assert_eq!(s, r#"{"v":1,"id":3,"op":"pause"}"#);
    }

    #[test]
    fn bad_requests_are_classified() {
        let code = |line: &[u8]| parse_request(line).unwrap_err().error.unwrap().code;
        assert_eq!(code(b"{nope"), ErrorCode::Malformed);
        assert_eq!(code(br#"[1,2]"#), ErrorCode::Malformed);
        assert_eq!(
            code(br#"{"v":2,"id":1,"op":"status"}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(code(br#"{"id":1,"op":"status"}"#), ErrorCode::Malformed);
        assert_eq!(code(br#"{"v":1,"id":1,"op":"fly"}"#), ErrorCode::UnknownOp);
        assert_eq!(
            code(br#"{"v":1,"id":1,"op":"retune","args":{"vcpuz":3}}"#),
            ErrorCode::Malformed
        );
        assert_eq!(code(&vec![b' '; MAX_LINE + 1]), ErrorCode::TooLarge);
        let err = parse_request(br#"{"v":9,"id":42,"op":"status"}"#).unwrap_err();
        assert_eq!(err.id, 42);
    }
}
