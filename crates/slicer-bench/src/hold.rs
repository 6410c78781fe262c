//! `slicer-bench hold`: how many idle sandboxes this host holds. Idle VMs (no network,
//! restored from one template with shared RAM, through the VM library as the daemon does) are
//! added one at a time until one of: the target count, a create slower than twice the idle
//! create latency (the median of the first ten), or memory pressure (MemAvailable below 10 %
//! of MemTotal, or any stall in /proc/pressure/memory). Every hundred VMs it records host
//! memory used, summed PSS and the idle host CPU of all QEMUs.

use std::time::{Duration, Instant};

use anyhow::Result;
use slicer_vmm::{Host, Shape, Vm, VmSpec};

use crate::density::{cpu_pct, kib_field, pss_kib};
use crate::{median, record};

pub struct HoldArgs {
    pub image: String,
    pub memory_mib: u32,
    pub max: usize,
    pub data_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

/// (MemTotal, MemAvailable) in KiB.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| kib_field(&text, k).unwrap_or(0);
    (get("MemTotal:"), get("MemAvailable:"))
}

/// Total µs tasks stalled on memory (`some`), if the kernel reports pressure.
fn memory_stall_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    text.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Idle host CPU of `vms` over `secs`, in % of one core.
async fn idle_cpu(vms: &[Vm], secs: u64) -> f64 {
    let pids: Vec<u32> = vms.iter().map(|v| v.pid()).collect();
    cpu_pct(&pids, Duration::from_secs(secs)).await
}

pub async fn run(a: HoldArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-hold-").tempdir()?;
    let host = Host::new(&a.data_dir, &tmp.path().join("vms"));
    let spec = |i: usize| {
        let mut s = VmSpec::new(format!("h{i}"), &a.image);
        s.memory_mib = a.memory_mib;
        s
    };
    let template = host.template(&Shape::of(&spec(0))).await?;
    let (total_kib, avail0) = meminfo();
    let stall0 = memory_stall_us();
    let mut vms: Vec<Vm> = Vec::new();
    let mut lat = Vec::new();
    let mut rows = String::new();
    let mut baseline = None;
    let stopped_by;
    loop {
        if vms.len() >= a.max {
            stopped_by = format!("the target of {} VMs", a.max);
            break;
        }
        let (_, avail) = meminfo();
        if avail < total_kib / 10 {
            stopped_by = format!("memory: {} MiB available", avail >> 10);
            break;
        }
        if let (Some(s0), Some(s)) = (stall0, memory_stall_us()) {
            if s > s0 {
                stopped_by = format!("memory pressure ({} µs of stalls)", s - s0);
                break;
            }
        }
        let t = Instant::now();
        let vm = match Vm::restore(&host, &spec(vms.len()), &template).await {
            Ok(vm) => vm,
            Err(e) => {
                stopped_by = format!("a failed create: {e:#}");
                break;
            }
        };
        if let Err(e) = vm.wait_ready(Duration::from_secs(120)).await {
            stopped_by = format!("a create that did not become ready: {e:#}");
            vm.discard().await;
            break;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        vms.push(vm);
        lat.push(ms);
        if lat.len() == 10 {
            baseline = Some(median(lat.clone()));
        }
        // The latency a create answers in now: the median of the last five.
        let recent = median(lat[lat.len().saturating_sub(5)..].to_vec());
        if let Some(b) = baseline {
            if recent > 2.0 * b {
                stopped_by = format!("create latency: {recent:.0} ms, over twice the idle {b:.0} ms");
                break;
            }
        }
        if vms.len().is_multiple_of(100) {
            let cpu = idle_cpu(&vms, 10).await;
            let pss: u64 = vms.iter().filter_map(|v| pss_kib(v.pid()).ok()).sum();
            let (_, avail) = meminfo();
            rows.push_str(&format!(
                "| {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.1} |\n",
                vms.len(),
                recent,
                pss as f64 / 1024.0 / vms.len() as f64,
                avail0.saturating_sub(avail) as f64 / 1024.0,
                cpu,
                cpu * 100.0 / vms.len() as f64
            ));
            println!("{} VMs: create {recent:.0} ms, idle CPU {cpu:.1} %", vms.len());
        }
    }
    let held = vms.len();
    let cpu = idle_cpu(&vms, 10).await;
    let pss: u64 = vms.iter().filter_map(|v| pss_kib(v.pid()).ok()).sum();
    let (_, avail) = meminfo();
    let last = median(lat[lat.len().saturating_sub(5)..].to_vec());
    rows.push_str(&format!(
        "| {held} (end) | {last:.0} | {:.1} | {:.0} | {cpu:.1} | {:.1} |\n",
        pss as f64 / 1024.0 / held.max(1) as f64,
        avail0.saturating_sub(avail) as f64 / 1024.0,
        cpu * 100.0 / held.max(1) as f64
    ));
    for vm in vms {
        let _ = vm.stop(Duration::ZERO).await;
    }
    let table = format!(
        "Idle `{}` VMs ({} MiB, 1 vCPU, no network, one template with shared RAM) held: **{held}**, stopped by {stopped_by}; \
         idle create latency (median of the first 10) {:.0} ms.\n\n\
         | VMs | create (median of last 5), ms | PSS per VM, MiB | host memory used, MiB | idle CPU of all, % of a core | idle CPU per 100 VMs, % |\n|---|---|---|---|---|---|\n{rows}",
        a.image,
        a.memory_mib,
        baseline.unwrap_or(0.0),
    );
    println!("{table}");
    if let Some(p) = &a.record_to {
        record(p, &format!("hold-{}", a.image), &table)?;
    }
    Ok(())
}
