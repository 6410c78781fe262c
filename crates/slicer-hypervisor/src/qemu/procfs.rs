//! Finding QEMU processes in /proc: by their argument list, and a process's identity across
//! pid reuse. Public so that recovery, the bench and tests scan the same way.

/// Pids of the processes whose argument list (`/proc/N/cmdline`) `matches` accepts.
pub fn processes_where(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                matches(&args)
            })
        })
        .collect()
}

/// Whether an argument list names its QEMU `name` (`-name <name>`), or with `prefix` one
/// whose name starts with it.
pub fn args_name(args: &[&[u8]], name: &str, prefix: bool) -> bool {
    args.windows(2).any(|w| {
        w[0] == b"-name"
            && if prefix {
                w[1].starts_with(name.as_bytes())
            } else {
                w[1] == name.as_bytes()
            }
    })
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid, it identifies a process across pid reuse.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
