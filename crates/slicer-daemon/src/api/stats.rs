//! `GET /nodes/stats` and `GET /node/{h}/stats`: resource snapshots measured in the guests,
//! in SlicerVM's camelCase shape. Both answer arrays (the SDK decodes one for a single node).

use axum::extract::{Path, State};
use axum::Json;
use slicer_agent_proto::GuestStats;

use super::Shared;
use crate::api::error::ApiErr;
use crate::state::VmRecord;

use slicer_api::{NodeStats, StatsSnapshot as Snapshot};

/// A duration as Go prints it, to the second: `6m53s`, `1h2m3s`, `45s`.
fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 10_000.0 / whole as f64).round() / 100.0
    }
}

/// The guest's numbers under the VM's own hostname (not what the guest claims).
fn snapshot(hostname: &str, g: GuestStats) -> Snapshot {
    let memory_used = g.memory_total.saturating_sub(g.memory_available);
    let disk_used = g.disk_total.saturating_sub(g.disk_free);
    let timestamp = crate::api::time::rfc3339_ms(g.timestamp_ms);
    Snapshot {
        hostname: hostname.to_string(),
        arch: g.arch.chars().take(32).collect(),
        timestamp,
        uptime: go_duration(g.uptime_sec.max(0.0) as u64),
        total_cpus: g.cpus,
        total_memory: g.memory_total,
        memory_used,
        memory_available: g.memory_available,
        memory_used_percent: percent(memory_used, g.memory_total),
        load_avg1: g.load_avg[0],
        load_avg5: g.load_avg[1],
        load_avg15: g.load_avg[2],
        disk_read_total: g.disk_read_bytes,
        disk_write_total: g.disk_write_bytes,
        network_read_total: g.net_rx_bytes,
        network_write_total: g.net_tx_bytes,
        disk_io_inflight: g.disk_io_inflight,
        open_connections: g.tcp_established,
        open_files: g.open_files,
        entropy: g.entropy,
        disk_space_total: g.disk_total,
        disk_space_used: disk_used,
        disk_space_free: g.disk_free,
        disk_space_used_percent: percent(disk_used, g.disk_total),
    }
}

async fn node_stats(st: &Shared, rec: &VmRecord) -> NodeStats {
    let measured = match st.manager.guest_stats(&rec.hostname).await {
        Ok(g) => Ok(snapshot(&rec.hostname, g)),
        Err(e) => Err(e.to_string()),
    };
    let (snapshot, error) = match measured {
        Ok(s) => (Some(s), String::new()),
        Err(e) => (None, e),
    };
    NodeStats {
        hostname: rec.hostname.clone(),
        ip: rec.ip.split('/').next().unwrap_or_default().to_string(),
        created_at: rec.created_at.clone(),
        snapshot,
        error,
    }
}

pub async fn all(State(st): State<Shared>) -> Result<Json<Vec<NodeStats>>, ApiErr> {
    let recs = st.manager.records()?;
    let stats = futures_util::future::join_all(recs.iter().map(|r| node_stats(&st, r))).await;
    Ok(Json(stats))
}

pub async fn one(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<Vec<NodeStats>>, ApiErr> {
    if slicer_vmm::validate_name(&hostname).is_err() {
        return Err(ApiErr::bad_request(format!("invalid hostname {hostname:?}")));
    }
    let rec = st.manager.record(&hostname)?;
    Ok(Json(vec![node_stats(&st, &rec).await]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(go_duration(413), "6m53s");
        assert_eq!(go_duration(45), "45s");
        assert_eq!(go_duration(3723), "1h2m3s");
        assert_eq!(percent(1, 3), 33.33);
        assert_eq!(percent(1, 0), 0.0);
        let s = serde_json::to_value(snapshot("vm-1", GuestStats::default())).unwrap();
        for k in [
            "totalCpus",
            "memoryUsedPercent",
            "loadAvg15",
            "diskIOInflight",
            "diskSpaceUsedPercent",
            "openConnections",
        ] {
            assert!(s.get(k).is_some(), "{k} missing in {s}");
        }
    }
}
