//! The tools' arguments, as the agent sends them: each type's JSON schema is what `tools/list`
//! shows, so field doc comments are the agent's documentation. (The types themselves carry no
//! doc comments on purpose: they would become schema descriptions and change the tools' schemas.)

use std::collections::BTreeMap;

use rmcp::schemars::{self, JsonSchema};
use serde::Deserialize;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// Host group to create the sandbox in (list_groups shows them). Optional when there is
    /// only one group, or when `image` picks one.
    #[serde(default)]
    pub group: Option<String>,
    /// Guest image (e.g. "min" or "systemd"): picks the first group built on it, or must match
    /// the given group's image.
    #[serde(default)]
    pub image: Option<String>,
    /// Tags to find the sandbox by later, e.g. "user=alice" or "job=42".
    #[serde(default)]
    pub tags: Vec<String>,
    /// vCPUs (default: the group's).
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB (default: the group's).
    #[serde(default)]
    #[schemars(range(min = 64, max = 1048576))]
    pub ram_mb: Option<u64>,
    /// What to wait for before answering: "agent" (default: commands can run), "userdata" (the
    /// userdata script finished) or "none".
    #[serde(default)]
    pub wait: Option<Wait>,
    /// A shell script run as root on first boot.
    #[serde(default)]
    pub userdata: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    Agent,
    Userdata,
    None,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// Only sandboxes of this host group.
    #[serde(default)]
    pub group: Option<String>,
    /// Only sandboxes with exactly this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Only sandboxes with a tag that starts with this (e.g. "user=").
    #[serde(default)]
    pub tag_prefix: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArg {
    /// The sandbox's hostname, as create_sandbox or list_sandboxes gave it.
    pub sandbox: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// A shell command line, run with /bin/bash -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, run directly (no shell). Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory: absolute, or ~/... in the user's home (default: the home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Seconds before the command is killed (default 120, at most 3600).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_secs: Option<u64>,
    /// Bytes of stdout, and of stderr, returned (default 65536, at most 4194304); the rest is
    /// cut and replaced by a line starting "[slicer: output truncated".
    #[serde(default)]
    #[schemars(range(min = 0, max = 4194304))]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// A shell command line, run with /bin/bash -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// A program and its arguments, run directly. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Working directory: absolute, or ~/... (default: the home).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecIdArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
    /// Continue from this frame id (the previous call's next_from_id); default: the oldest kept.
    #[serde(default)]
    pub from_id: Option<u64>,
    /// Bytes of stdout, and of stderr, returned (default 65536, at most 4194304).
    #[serde(default)]
    #[schemars(range(min = 0, max = 4194304))]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The id start_background returned.
    pub exec_id: String,
    /// TERM (default; KILL follows after grace_ms), KILL, INT, HUP, QUIT, USR1 or USR2.
    #[serde(default)]
    pub signal: Option<Signal>,
    /// With TERM: milliseconds before KILL follows (default 5000).
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum Signal {
    TERM,
    KILL,
    INT,
    HUP,
    QUIT,
    USR1,
    USR2,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The file: absolute, or ~/... in the default user's home.
    pub path: String,
    /// Bytes returned at most (default 1048576, at most 8388608); longer files are cut with a
    /// marker.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8388608))]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The file: absolute, or ~/... in the default user's home; missing directories are made.
    pub path: String,
    /// The file's content (at most 8 MiB): text, or base64 when `base64` is true.
    pub content: String,
    /// `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
    /// Octal mode, e.g. "0755" (default 0644).
    #[serde(default)]
    pub permissions: Option<String>,
    /// Owner uid (0 is root; default: the image's default user).
    #[serde(default)]
    pub uid: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirArgs {
    /// The sandbox's hostname.
    pub sandbox: String,
    /// The directory: absolute, or ~/... in the default user's home.
    pub path: String,
}
