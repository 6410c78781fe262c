use serde::{Deserialize, Serialize};

/// Health report of the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub agent_version: String,
    /// Nanoseconds since the agent started.
    pub agent_uptime_ns: u64,
    /// Nanoseconds since the guest kernel booted.
    pub system_uptime_ns: u64,
    /// Whether the agent runs as PID 1 (the `min` image) or under an init system.
    pub pid1: bool,
    pub hostname: String,
}

/// What to run. Exactly one of `argv` (direct exec) or `shell` (a command line run by
/// `shell_path -c`) is given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Interpreter for `shell`; default `/bin/sh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_path: Option<String>,
    /// Extra environment, `KEY=VALUE` pairs, on top of a clean default environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// When false, stdin is /dev/null and the request body after the spec is ignored.
    #[serde(default)]
    pub stdin: bool,
}

impl ExecRequest {
    /// Run `argv[0]` with arguments, no shell.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Run a command line through `/bin/sh -c`.
    pub fn shell(cmd: impl Into<String>) -> Self {
        ExecRequest {
            shell: Some(cmd.into()),
            ..Default::default()
        }
    }

    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Checks the request's shape; the agent answers 400 with this message otherwise.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.shell, self.argv.is_empty()) {
            (Some(_), false) => return Err("give either argv or shell, not both".into()),
            (None, true) => return Err("nothing to run: argv is empty and no shell command given".into()),
            (Some(s), true) if s.is_empty() => return Err("shell command is empty".into()),
            _ => {}
        }
        if self.argv.first().is_some_and(|a| a.is_empty()) {
            return Err("argv[0] is empty".into());
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("invalid environment variable name {k:?}"));
            }
        }
        Ok(())
    }
}

/// First frame of an exec response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Started {
    pub pid: u32,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
}

/// How a process ended: exactly one of `code` or `signal` is set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The shell's exit code: the code, else 128 + the signal. The guest says both, so a
    /// signal outside 1..=127 (which no real one is) counts as 0 rather than overflowing.
    pub fn shell_code(&self) -> i32 {
        self.code
            .unwrap_or_else(|| 128 + self.signal.filter(|s| (1..=127).contains(s)).unwrap_or(0))
    }
}

/// Last frame of an exec response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Exited {
    #[serde(flatten)]
    pub status: ExitStatus,
    pub ended_at_ms: u64,
}

/// Error body of any non-2xx agent response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// Machine-readable kind: `bad_request`, `not_found`, `permission_denied`, `conflict`, `internal`.
    pub kind: String,
    pub error: String,
}

/// Answer of `PUT /v1/file` and `PUT /v1/tar`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileWritten {
    pub path: String,
    pub bytes: u64,
}

/// Query of the file and tar routes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PathQuery {
    pub path: String,
    /// Octal mode for a written file, e.g. "644".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Writes, SlicerVM's cp-v1 placement: when `path` is an existing directory the copy goes
    /// inside it under this name (a directory's contents merge into `path` instead with
    /// `copy_contents`), and a directory copy replaces its target whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_contents: bool,
}

/// `POST /v1/identity`: what makes a VM restored from a template (or a suspended state) its
/// own. Every field is optional; the agent applies the ones given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Bytes mixed into the kernel's entropy pool, followed by a reseed of its CRNG.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_seed: Vec<u8>,
    /// Wall-clock time to set, in ns since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_unix_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// 32 lowercase hex digits, written to /etc/machine-id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Nameservers for /etc/resolv.conf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetIdentity>,
    /// The root disk's size in bytes: the agent waits until the kernel sees it, then grows
    /// the root filesystem (in the background).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// The first NIC's (`eth0`) address, MAC and default route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetIdentity {
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
}

/// Checks a machine id: 32 lowercase hex digits, not all zero.
pub fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

/// An entry of `GET /v1/fs/readdir` (and the answer of `GET /v1/fs/stat`). Symlinks are
/// reported as such, not followed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FsEntry {
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the Unix epoch.
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
}

/// `POST /v1/bg`: start a process that outlives the request; its output goes to a ring.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BgStart {
    pub spec: ExecRequest,
    /// Ring size in bytes (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BgStarted {
    pub exec_id: String,
    pub pid: u32,
    pub started_at_ms: u64,
    pub ring_bytes: u64,
}

/// `GET /v1/bg` (a list of these) and `GET /v1/bg/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BgInfo {
    pub exec_id: String,
    pub pid: u32,
    pub command: String,
    pub args: Vec<String>,
    pub cwd: Option<String>,
    pub uid: Option<u32>,
    pub started_at_ms: u64,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at_ms: Option<u64>,
    pub bytes_written: u64,
    pub bytes_dropped: u64,
    pub next_id: u64,
    pub ring_bytes: u64,
}

/// A line of `GET /v1/bg/{id}/logs` (NDJSON): `stdout`/`stderr` with base64 `data`, `gap`
/// when the ring dropped frames the reader asked for, `exit` last.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BgFrame {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    pub timestamp_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_frames: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Query of `GET /v1/bg/{id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BgLogsQuery {
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub from_id: u64,
}

/// Body of `POST /v1/bg/{id}/kill`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BgKill {
    /// TERM (default), KILL, INT, HUP, QUIT, USR1 or USR2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// With TERM: KILL follows after this long if the process still runs (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BgKilled {
    pub exec_id: String,
    pub pid: u32,
    pub running: bool,
    pub signal_sent: String,
}

/// Answer of `GET /v1/bg/{id}/wait-exit?timeout=<seconds>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BgWait {
    pub exec_id: String,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at_ms: Option<u64>,
    pub timed_out: bool,
}

/// `GET /v1/stats`: a snapshot measured in the guest from /proc and statvfs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GuestStats {
    pub hostname: String,
    pub arch: String,
    /// When measured: ms since the Unix epoch (guest clock).
    pub timestamp_ms: u64,
    pub uptime_sec: f64,
    pub cpus: u32,
    pub memory_total: u64,
    pub memory_available: u64,
    pub load_avg: [f64; 3],
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub disk_io_inflight: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Established TCP connections (v4 and v6).
    pub tcp_established: u64,
    pub open_files: u64,
    pub entropy: u64,
    pub disk_total: u64,
    pub disk_free: u64,
}

/// Body of `POST /v1/fs/watch`: the response streams [`WatchEvent`] lines until the host
/// goes away.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    pub paths: Vec<String>,
    #[serde(default)]
    pub recursive: bool,
}

/// One filesystem change seen by inotify.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WatchEvent {
    /// `create`, `write`, `remove`, `rename` or `chmod`; `overflow` when the kernel dropped events.
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    pub timestamp_ms: u64,
}

/// Query of `DELETE /v1/fs/remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RemoveQuery {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
}

/// Body of `POST /v1/fs/mkdir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    /// Octal permission bits such as "0755" (default 0755).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Poweroff,
    Reboot,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PowerRequest {
    pub action: PowerAction,
}

/// Largest CA bundle `PUT /v1/ca` takes (PEM text).
pub const MAX_CA_BUNDLE: usize = 1 << 20;
/// Most certificates one bundle may hold.
pub const MAX_CA_CERTS: usize = 64;

/// One CA certificate slicer installed in a guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CaCert {
    /// The first 12 hex digits of the SHA-256 of its DER (its file is `<short>.crt`).
    pub short: String,
    pub subject: String,
    /// `YYYY-MM-DD` (UTC).
    pub not_after: String,
}

/// `PUT /v1/ca`'s answer: every CA slicer installed in the guest (sorted by `short`), which of
/// them this request added, and the system bundles that hold them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CaInstalled {
    pub certs: Vec<CaCert>,
    pub added: Vec<String>,
    pub bundles: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes_never_overflow_on_what_a_guest_says() {
        let st = |code, signal| ExitStatus { code, signal };
        assert_eq!(st(Some(3), None).shell_code(), 3);
        assert_eq!(st(None, Some(9)).shell_code(), 137);
        assert_eq!(st(None, Some(i32::MAX)).shell_code(), 128);
        assert_eq!(st(None, Some(-5)).shell_code(), 128);
        assert_eq!(st(None, None).shell_code(), 128);
    }

    #[test]
    fn validate_rejects_ambiguous_and_empty() {
        assert!(ExecRequest::default().validate().is_err());
        let mut both = ExecRequest::argv(["true"]);
        both.shell = Some("true".into());
        assert!(both.validate().is_err());
        assert!(ExecRequest::argv([""]).validate().is_err());
        let mut env = ExecRequest::argv(["env"]);
        env.env.push(("A=B".into(), "x".into()));
        assert!(env.validate().is_err());
        assert!(ExecRequest::shell("echo hi").validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<ExecRequest, _> = serde_json::from_str(r#"{"argv":["x"],"bogus":1}"#);
        assert!(r.is_err());
    }
}
