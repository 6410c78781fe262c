//! The manager's domain types as the API's wire types (slicer-api's).

use slicer_api::{
    CommitInfo, CommitMode, CommitResponse, CreateNodeResponse, DeleteResponse, ForkResponse, Node, ParentStatus,
};

use crate::manager::{Commit, Created, Deleted, Forked, VmInfo};

impl From<VmInfo> for Node {
    /// A listed VM: its bare address (no prefix), empty when it has none.
    fn from(v: VmInfo) -> Node {
        Node {
            hostname: v.hostname,
            hostgroup: v.group,
            ip: v.ip.map(|a| a.addr.to_string()).unwrap_or_default(),
            ram_bytes: v.ram_bytes,
            cpus: v.cpus,
            created_at: v.created_at,
            arch: slicer_api::VM_ARCH.into(),
            tags: v.tags,
            status: v.status,
            persistent: v.persistent,
        }
    }
}

impl From<Created> for CreateNodeResponse {
    /// A created VM: its address with its prefix, empty when it has none.
    fn from(c: Created) -> CreateNodeResponse {
        CreateNodeResponse {
            hostname: c.hostname,
            hostgroup: c.group,
            ip: c.ip.map(|a| a.to_string()).unwrap_or_default(),
            created_at: c.created_at,
            arch: slicer_api::VM_ARCH.into(),
            persistent: c.persistent,
        }
    }
}

impl From<Deleted> for DeleteResponse {
    fn from(d: Deleted) -> DeleteResponse {
        DeleteResponse {
            message: "VM deleted successfully".into(),
            disk_removed: d.disk_removed.to_string(),
            error: String::new(),
        }
    }
}

/// How a VM's current run started, on the wire.
pub fn start_mode(m: slicer_vmm::StartMode) -> slicer_api::StartMode {
    match m {
        slicer_vmm::StartMode::Cold => slicer_api::StartMode::Cold,
        slicer_vmm::StartMode::Template => slicer_api::StartMode::Template,
        slicer_vmm::StartMode::Resume => slicer_api::StartMode::Resume,
        slicer_vmm::StartMode::Adopted => slicer_api::StartMode::Adopted,
    }
}

impl From<Commit> for CommitInfo {
    fn from(c: Commit) -> CommitInfo {
        CommitInfo {
            commit_id: c.commit_id,
            source_hostname: c.source_hostname,
            source_host_group: c.source_host_group,
            created_at: c.created_at,
            mode: c.mode,
            tags: c.tags,
            labels: c.labels,
            cache_key: c.cache_key,
        }
    }
}

impl From<Commit> for CommitResponse {
    /// A commit made: a disk commit's source was stopped, a live one's runs on.
    fn from(c: Commit) -> CommitResponse {
        CommitResponse {
            hostname: c.source_hostname,
            commit_id: c.commit_id,
            status: "committed".into(),
            parent_status: Some(match c.mode {
                CommitMode::Live => ParentStatus::Running,
                CommitMode::Disk => ParentStatus::Stopped,
            }),
            mode: c.mode,
            tags: c.tags,
            labels: c.labels,
            cache_key: c.cache_key,
        }
    }
}

impl From<Forked> for ForkResponse {
    /// A fork made: its address with its prefix, empty when it has none.
    fn from(f: Forked) -> ForkResponse {
        ForkResponse {
            hostname: f.hostname,
            source_hostname: f.source_hostname,
            commit_id: Some(f.commit_id),
            status: "forked".into(),
            parent_status: None,
            child_status: Some(f.child),
            mode: f.mode,
            persistent: f.persistent,
            ip: f.ip.map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}
