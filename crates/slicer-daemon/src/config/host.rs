//! What the configuration asks of the host: its memory and cores.

use super::*;

pub use slicer_api::human_bytes;

/// The host's memory (MemTotal of /proc/meminfo) in bytes.
pub fn host_memory_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| {
            let kib = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim();
            kib.parse::<u64>().ok()
        })
        .map(|kib| kib << 10)
        .context("no MemTotal in /proc/meminfo")
}

/// The host's cores available to the daemon (and so to its VMs).
pub fn host_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}
