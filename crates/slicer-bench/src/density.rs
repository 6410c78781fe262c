//! `slicer-bench density`: N idle VMs restored from one template, with the template's RAM
//! shared copy-on-write (a memfd every clone maps privately) against RAM loaded from the saved
//! state into each clone (the fallback), side by side in one run: proportional set size (PSS)
//! per QEMU, host CPU while idle, and restore latency.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use slicer_vmm::{Host, Vm, VmSpec};

use crate::{median, record};

pub struct DensityArgs {
    pub image: String,
    pub vms: usize,
    pub memory_mib: u32,
    pub data_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

/// The value of a `Key:   N kB` line of a /proc file's text.
pub fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A process's PSS in KiB (from /proc/<pid>/smaps_rollup).
pub fn pss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    kib_field(&text, "Pss:").context("no Pss line")
}

/// CPU time (user + system, in clock ticks) of processes.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// CPU the processes use over `window`, in % of one core.
pub async fn cpu_pct(pids: &[u32], window: Duration) -> f64 {
    let t0 = cpu_ticks(pids);
    let w = Instant::now();
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pids).saturating_sub(t0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz / w.elapsed().as_secs_f64() * 100.0
}

struct Run {
    pss_mib: f64,
    restore_ms: f64,
    idle_cpu_pct: f64,
}

async fn run_mode(a: &DensityArgs, shared: bool, root: &std::path::Path) -> Result<Run> {
    let mut host = Host::new(&a.data_dir, &root.join(if shared { "shared" } else { "private" }));
    host.shared_template_ram = shared;
    let spec = |i: usize| {
        let mut s = VmSpec::new(format!("d{}-{i}", if shared { "s" } else { "p" }), &a.image);
        s.memory_mib = a.memory_mib;
        s
    };
    let template = host.template(&slicer_vmm::Shape::of(&spec(0))).await?;
    anyhow::ensure!(
        template.shared_ram == shared,
        "wanted a template with shared RAM = {shared}, got {}",
        template.shared_ram
    );
    let mut vms = Vec::new();
    let mut restore = Vec::new();
    for i in 0..a.vms {
        let t = Instant::now();
        let vm = Vm::restore(&host, &spec(i), &template).await?;
        vm.wait_ready(Duration::from_secs(60)).await?;
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        vms.push(vm);
    }
    // Idle: let boot-time work settle, then measure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = vms.iter().map(|v| v.pid()).collect();
    let idle_cpu_pct = cpu_pct(&pids, Duration::from_secs(10)).await;
    let mut pss = 0u64;
    for p in &pids {
        pss += pss_kib(*p)?;
    }
    for vm in vms {
        vm.stop(Duration::ZERO).await?;
    }
    Ok(Run {
        pss_mib: pss as f64 / 1024.0 / a.vms as f64,
        restore_ms: median(restore),
        idle_cpu_pct,
    })
}

pub async fn run(a: DensityArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-density-").tempdir()?;
    let shared = run_mode(&a, true, tmp.path()).await?;
    let private = run_mode(&a, false, tmp.path()).await?;
    let table = format!(
        "| {} idle `{}` VMs ({} MiB) restored from one template | RAM shared (memfd, copy-on-write) | RAM in the state (fallback) | ratio |\n|---|---|---|---|\n\
         | PSS per VM (QEMU, summed / N) | {:.1} MiB | {:.1} MiB | {:.2}× |\n\
         | restore to agent-ready (median) | {:.0} ms | {:.0} ms | {:.2}× |\n\
         | host CPU while idle, all N (10 s) | {:.1} % | {:.1} % | |\n",
        a.vms,
        a.image,
        a.memory_mib,
        shared.pss_mib,
        private.pss_mib,
        shared.pss_mib / private.pss_mib,
        shared.restore_ms,
        private.restore_ms,
        shared.restore_ms / private.restore_ms,
        shared.idle_cpu_pct,
        private.idle_cpu_pct,
    );
    println!("{table}");
    if let Some(p) = &a.record_to {
        record(p, &format!("density-{}", a.image), &table)?;
    }
    Ok(())
}
