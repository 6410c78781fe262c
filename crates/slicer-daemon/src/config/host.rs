//! What the configuration asks of the host: its memory and cores, and sizes for people.

use super::*;

/// A size for people: `512 MiB`, `20 GiB`, `21.3 GiB`.
pub fn human_bytes(b: u64) -> String {
    const GIB: u64 = 1 << 30;
    if b >= GIB && b.is_multiple_of(GIB) {
        format!("{} GiB", b / GIB)
    } else if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

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
