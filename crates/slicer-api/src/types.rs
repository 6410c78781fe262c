//! JSON shapes of the REST API. Field names follow SlicerVM's SDKs exactly.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorResponse {
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Info {
    pub version: String,
    pub git_commit: String,
    pub platform: String,
    pub arch: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostGroupInfo {
    pub name: String,
    pub count: u32,
    pub ram_bytes: u64,
    pub cpus: u32,
    pub arch: String,
    pub gpu_count: u32,
    /// The group's guest image (slicer extension).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
}

/// Status of a VM as the API reports it (and the state database records it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStatus {
    Running,
    /// vCPUs stopped by `POST /vm/{h}/pause`.
    Paused,
    Stopped,
    /// Saved to disk by `POST /vm/{h}/suspend`, waiting for `POST /vm/{h}/restore`.
    Suspended,
}

impl VmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Running => "Running",
            VmStatus::Paused => "Paused",
            VmStatus::Stopped => "Stopped",
            VmStatus::Suspended => "Suspended",
        }
    }

    pub fn parse(s: &str) -> Option<VmStatus> {
        [
            VmStatus::Running,
            VmStatus::Paused,
            VmStatus::Stopped,
            VmStatus::Suspended,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host group's network mode (`network.mode` in the YAML).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// TAPs on a shared host bridge.
    Bridge,
    /// A network namespace, bridge, TAP and nftables table per VM.
    Isolated,
    /// No NIC.
    None,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Bridge => "bridge",
            NetworkMode::Isolated => "isolated",
            NetworkMode::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<NetworkMode> {
        [NetworkMode::Bridge, NetworkMode::Isolated, NetworkMode::None]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a VM's current run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartMode {
    /// Booted its kernel.
    Cold,
    /// Restored from a template snapshot.
    Template,
    /// Restored from its own suspended state.
    Resume,
    /// Taken over from an earlier daemon (slicer extension).
    Adopted,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub hostname: String,
    pub hostgroup: String,
    /// Bare address (no prefix) in lists; empty when the VM has no network.
    pub ip: String,
    pub ram_bytes: u64,
    pub cpus: u32,
    /// RFC3339.
    pub created_at: String,
    pub arch: String,
    pub tags: Vec<String>,
    pub status: VmStatus,
    pub persistent: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<Vec<String>>,
}

/// Body of `POST /hostgroup/{g}/nodes`; every field is optional (`{}` = host-group defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateNodeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userdata: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOverride>,
    /// Slicer extension: a proxy-bound VM. The daemon mints a token of this proxy client for the
    /// VM and sets HTTP(S)_PROXY in its login environment to its host group's proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::ProxyBinding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateNodeResponse {
    pub hostname: String,
    pub hostgroup: String,
    /// Address with prefix, e.g. "169.254.100.2/30"; empty without a network.
    pub ip: String,
    pub created_at: String,
    pub arch: String,
    pub persistent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeleteResponse {
    pub message: String,
    /// "true" or "false": a string, as SlicerVM's SDK expects.
    pub disk_removed: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Policy {
    pub allow: Vec<String>,
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkInfo {
    pub mode: NetworkMode,
    pub policy_source: String,
    pub host_group: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#override: Option<NetworkOverride>,
    pub effective: Policy,
}

/// `GET /vm/{h}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmDescription {
    #[serde(flatten)]
    pub node: Node,
    pub storage: String,
    pub storage_size: u64,
    pub image: String,
    pub network: NetworkInfo,
    /// How the VM's current run started: `cold` (kernel boot), `template` (restored from a
    /// template snapshot), `resume` (from its suspended state) or `adopted` (slicer extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_mode: Option<StartMode>,
    /// The last commit made of this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    /// The commit this VM was forked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_commit_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TagsResponse {
    pub hostname: String,
    pub tags: Vec<String>,
}

/// Body of `PATCH /vm/{h}/tags`: `replace` excludes `add` and `remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TagsPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogsResponse {
    pub hostname: String,
    pub lines: usize,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HealthResponse {
    pub hostname: String,
    /// Nanoseconds (Go's time.Duration).
    pub agent_uptime: i64,
    pub agent_version: String,
    /// Nanoseconds.
    pub system_uptime: i64,
    pub userdata_ran: bool,
    pub userdata_exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
}

/// The `type` of an exec or background-exec log frame. A frame without one (the legacy
/// `stdout`/`stderr` fields only) has none; a type this build does not know reads as `Other`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FrameType {
    Started,
    Stdout,
    Stderr,
    Exit,
    Error,
    /// Background exec logs: output the ring dropped before this point.
    Gap,
    #[serde(other)]
    Other,
}

impl FrameType {
    /// The type a guest's background-exec frame names (its word as the guest wrote it):
    /// anything but the known words is `Other`, never passed on as written.
    pub fn from_word(word: &str) -> FrameType {
        serde_json::from_value(serde_json::Value::String(word.to_string())).unwrap_or(FrameType::Other)
    }
}

/// One NDJSON frame of `POST /vm/{h}/exec`. Typed frames (`type`) with the payload in both
/// `data` and the legacy `stdout`/`stderr` field, so old and new clients read it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<FrameType>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ended_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encoding: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signal: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Background exec logs: the frame's id (monotonic; `from_id` resumes from one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Background exec logs, `gap` frames: what the ring dropped before this point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_frames: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ExecFrame {
    /// The payload as sent: `data`, else the legacy `stdout` or `stderr` field.
    pub fn payload_text(&self) -> &str {
        if !self.data.is_empty() {
            &self.data
        } else if !self.stdout.is_empty() {
            &self.stdout
        } else {
            &self.stderr
        }
    }

    /// The payload's bytes, decoded when `encoding` is `base64`.
    pub fn payload(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine as _;
        let p = self.payload_text();
        if self.encoding == "base64" {
            base64::engine::general_purpose::STANDARD.decode(p)
        } else {
            Ok(p.as_bytes().to_vec())
        }
    }
}

/// `POST /vm/{h}/exec?buffered=true`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BufferedExec {
    pub stdout: String,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encoding: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ended_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signal: String,
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// `POST /vm/{h}/exec?background=true` → 201.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecStarted {
    pub exec_id: String,
    pub pid: u32,
    pub started_at: String,
    pub ring_bytes: u64,
}

/// `GET /vm/{h}/exec/{id}` (and each entry of `GET /vm/{h}/exec`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecInfo {
    pub exec_id: String,
    pub pid: u32,
    pub command: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub started_at: String,
    pub running: bool,
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    pub ended_at: Option<String>,
    pub bytes_written: u64,
    pub bytes_dropped: u64,
    pub next_id: u64,
    pub ring_bytes: u64,
}

/// `POST /vm/{h}/exec/{id}/kill` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecKillRequest {
    /// TERM (default), KILL, INT, HUP, QUIT, USR1 or USR2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// With TERM: KILL follows after this long if the process still runs (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

/// `POST /vm/{h}/exec/{id}/kill` → 200.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecKilled {
    pub exec_id: String,
    pub pid: u32,
    pub running: bool,
    pub signal_sent: String,
}

/// `GET /vm/{h}/exec/{id}/wait-exit` → 200.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecWaitExit {
    pub exec_id: String,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub ended_at: Option<String>,
    pub timed_out: bool,
}

/// `DELETE /vm/{h}/exec/{id}` → 200.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecReaped {
    pub exec_id: String,
    pub reaped: bool,
}

/// A secret as `GET /secrets` lists it (never its value).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SecretInfo {
    pub name: String,
    pub size: u64,
    /// Octal, e.g. "0600".
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
    pub modified_at: String,
}

impl SecretInfo {
    pub fn mode(&self) -> u32 {
        u32::from_str_radix(&self.permissions, 8).unwrap_or(0o600)
    }
}

/// `POST /secrets` body; `data` is base64.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateSecretRequest {
    pub name: String,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// `PATCH /secrets/{name}` body; `data` is base64.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateSecretRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// What a guest measured of itself (`slicer-vmmeter`'s shape: camelCase).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub hostname: String,
    pub arch: String,
    pub timestamp: String,
    /// A Go duration, e.g. `6m53s`.
    pub uptime: String,
    pub total_cpus: u32,
    pub total_memory: u64,
    pub memory_used: u64,
    pub memory_available: u64,
    pub memory_used_percent: f64,
    pub load_avg1: f64,
    pub load_avg5: f64,
    pub load_avg15: f64,
    pub disk_read_total: u64,
    pub disk_write_total: u64,
    pub network_read_total: u64,
    pub network_write_total: u64,
    #[serde(rename = "diskIOInflight")]
    pub disk_io_inflight: u64,
    pub open_connections: u64,
    pub open_files: u64,
    pub entropy: u64,
    pub disk_space_total: u64,
    pub disk_space_used: u64,
    pub disk_space_free: u64,
    pub disk_space_used_percent: f64,
}

/// One entry of `GET /nodes/stats` (and of `GET /node/{h}/stats`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStats {
    pub hostname: String,
    pub ip: String,
    pub created_at: String,
    pub snapshot: Option<StatsSnapshot>,
    pub error: String,
}

/// `DELETE /secrets/{name}` → 200.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SecretDeleted {
    pub name: String,
    pub deleted: bool,
}

/// A file as `GET /vm/{h}/fs/readdir|stat` and `POST /vm/{h}/fs/mkdir` answer it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FsEntry {
    pub name: String,
    /// `file`, `directory` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// RFC 3339.
    pub mtime: String,
    /// Octal, e.g. "0644".
    pub mode: String,
}

/// `POST /vm/{h}/fs/mkdir` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `POST /vm/{h}/cp` → 200.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CopyResponse {
    pub hostname: String,
    pub path: String,
    pub bytes: u64,
}

/// `POST /vm/{h}/commit` (all optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CommitRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// Extension: commit a running VM with its memory and devices (`mode: live`): it pauses
    /// briefly and continues; forks of the commit continue from that moment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
}

/// What a commit holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitMode {
    /// The stopped VM's disk.
    Disk,
    /// A running VM's disk, memory and devices (slicer extension).
    Live,
}

impl CommitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CommitMode::Disk => "disk",
            CommitMode::Live => "live",
        }
    }
}

impl std::fmt::Display for CommitMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a commit's source VM after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParentStatus {
    /// A live commit's source runs on.
    Running,
    /// A disk commit's source was stopped.
    Stopped,
}

/// A fork's state in the answer to its fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChildStatus {
    /// Its agent answers.
    Running,
    /// Not waited for (`wait=none`).
    Starting,
}

/// How a fork's tags come from its commit's (`ForkRequest::tag_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TagMode {
    /// The commit's tags, then the request's.
    #[default]
    Append,
    /// The request's tags only.
    Replace,
}

impl TagMode {
    /// The mode a request names (`None`: no such mode).
    pub fn parse(s: &str) -> Option<TagMode> {
        match s {
            "append" => Some(TagMode::Append),
            "replace" => Some(TagMode::Replace),
            _ => None,
        }
    }
}

/// What a fork's first boot changes so that it is not its commit's source
/// (`ForkRequest::fixups`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fixup {
    Hostname,
    MachineId,
    SshHostKeys,
}

impl Fixup {
    /// Every fixup, in the order the API names them.
    pub const ALL: [Fixup; 3] = [Fixup::Hostname, Fixup::MachineId, Fixup::SshHostKeys];

    pub fn as_str(self) -> &'static str {
        match self {
            Fixup::Hostname => "hostname",
            Fixup::MachineId => "machine-id",
            Fixup::SshHostKeys => "ssh-host-keys",
        }
    }

    /// The fixup a request names (`None`: no such fixup).
    pub fn parse(s: &str) -> Option<Fixup> {
        Fixup::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// The answer to a commit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitResponse {
    pub hostname: String,
    pub commit_id: String,
    /// `committed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_status: Option<ParentStatus>,
    /// `disk`, or `live` (memory and devices too).
    pub mode: CommitMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
}

/// One commit in `GET /vm/commits`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitInfo {
    pub commit_id: String,
    pub source_hostname: String,
    pub source_host_group: String,
    pub created_at: String,
    pub mode: CommitMode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
}

/// `DELETE /vm/commits/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommitDeleted {
    pub commit_id: String,
    /// `deleted`.
    pub status: String,
}

/// `POST /vm/commits/{id}/fork` (all optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ForkRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `append` (default: the commit's tags, then these) or `replace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    /// `hostname`, `machine-id`, `ssh-host-keys`; absent: all of them; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixups: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
    /// Extension: make this many forks in one call (1-32); the answer is then an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// The answer to a fork.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ForkResponse {
    pub hostname: String,
    pub source_hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_id: Option<String>,
    /// `forked`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_status: Option<ParentStatus>,
    /// `running` (the agent answers) or `starting` (`wait=none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_status: Option<ChildStatus>,
    pub mode: CommitMode,
    pub persistent: bool,
    /// Address with prefix; empty without a network.
    #[serde(default)]
    pub ip: String,
}

#[cfg(test)]
mod tests;
