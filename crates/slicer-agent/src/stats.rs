//! `GET /v1/stats`: a resource snapshot of the guest, from /proc and statvfs (no processes).

use http::{Response, StatusCode};
use slicer_agent_proto::GuestStats;

use crate::server::{json, ApiError, Body};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes read and written and I/Os in flight on the root disk (`vda`).
fn disk(diskstats: &str) -> (u64, u64, u64) {
    for l in diskstats.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 11 && f[2] == "vda" {
            let n = |i: usize| f[i].parse::<u64>().unwrap_or(0);
            return (n(5) * 512, n(9) * 512, n(11));
        }
    }
    (0, 0, 0)
}

/// Received and sent bytes over all interfaces but loopback.
fn net(dev: &str) -> (u64, u64) {
    let (mut rx, mut tx) = (0, 0);
    for l in dev.lines().skip(2) {
        let Some((name, rest)) = l.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if f.len() >= 9 {
            rx += f[0];
            tx += f[8];
        }
    }
    (rx, tx)
}

fn established(table: &str) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3) == Some("01"))
        .count() as u64
}

pub fn measure() -> GuestStats {
    let mem = read("/proc/meminfo");
    let load: Vec<f64> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    let (disk_read_bytes, disk_write_bytes, disk_io_inflight) = disk(&read("/proc/diskstats"));
    let (net_rx_bytes, net_tx_bytes) = net(&read("/proc/net/dev"));
    let (disk_total, disk_free) = nix::sys::statvfs::statvfs("/")
        .map(|s| (s.blocks() * s.fragment_size(), s.blocks_available() * s.fragment_size()))
        .unwrap_or((0, 0));
    GuestStats {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        uptime_sec: read("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_total: meminfo_kib(&mem, "MemTotal") * 1024,
        memory_available: meminfo_kib(&mem, "MemAvailable") * 1024,
        load_avg: [
            load.first().copied().unwrap_or(0.0),
            load.get(1).copied().unwrap_or(0.0),
            load.get(2).copied().unwrap_or(0.0),
        ],
        disk_read_bytes,
        disk_write_bytes,
        disk_io_inflight,
        net_rx_bytes,
        net_tx_bytes,
        tcp_established: established(&read("/proc/net/tcp")) + established(&read("/proc/net/tcp6")),
        open_files: read("/proc/sys/fs/file-nr")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        entropy: read("/proc/sys/kernel/random/entropy_avail")
            .trim()
            .parse()
            .unwrap_or(0),
        disk_total,
        disk_free,
    }
}

pub async fn handle() -> Result<Response<Body>, ApiError> {
    let s = tokio::task::spawn_blocking(measure)
        .await
        .map_err(|e| ApiError::internal(format!("measuring: {e}")))?;
    Ok(json(StatusCode::OK, &s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let ds = "   8       0 sda 1 2 3 4 5 6 7 8 9 10 11\n 254       0 vda 100 0 2048 50 10 0 4096 20 3 60 70\n";
        assert_eq!(disk(ds), (2048 * 512, 4096 * 512, 3));
        let dev = "Inter-|   Receive\n face |bytes packets\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net(dev), (1000, 2000));
        let tcp = "  sl  local_address rem_address   st\n   0: 0100007F:1F90 00000000:0000 0A\n   1: 0100007F:1F90 0100007F:9C40 01\n";
        assert_eq!(established(tcp), 1);
        assert_eq!(
            meminfo_kib("MemTotal:  1000 kB\nMemAvailable:  400 kB\n", "MemAvailable"),
            400
        );
    }
}
