//! `slicer-bench hold`: how many idle sandboxes this host holds. Idle VMs (no network,
//! restored from one template with shared RAM, through the VM library as the daemon does) are
//! added one at a time until one of: the target count, a create slower than twice the idle
//! create latency (the median of the first ten), or memory pressure (MemAvailable below 10 %
//! of MemTotal, or any stall in /proc/pressure/memory). Every hundred VMs it records host
//! memory used, summed PSS and the idle host CPU of all QEMUs.

use std::time::{Duration, Instant};

use anyhow::Result;
use slicer_vmm::{Host, Shape, Template, Vm, VmSpec};

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

/// The VMs held so far and what adding them measured.
struct Held {
    vms: Vec<Vm>,
    /// Each create's latency in ms.
    lat: Vec<f64>,
    /// The idle create latency: the median of the first ten.
    baseline: Option<f64>,
    /// The table's rows, one per hundred VMs.
    rows: String,
    /// MemAvailable (KiB) before the first VM.
    avail0: u64,
}

impl Held {
    /// The latency a create answers in now: the median of the last five.
    fn recent(&self) -> f64 {
        median(self.lat[self.lat.len().saturating_sub(5)..].to_vec())
    }
}

/// The VM spec of the `i`th VM.
fn spec(a: &HoldArgs, i: usize) -> VmSpec {
    let mut s = VmSpec::new(format!("h{i}"), &a.image);
    s.memory_mib = a.memory_mib;
    s
}

/// Why no VM may be added (the target reached, memory short or under pressure), if so.
fn full(a: &HoldArgs, held: usize, total_kib: u64, stall0: Option<u64>) -> Option<String> {
    if held >= a.max {
        return Some(format!("the target of {} VMs", a.max));
    }
    let (_, avail) = meminfo();
    if avail < total_kib / 10 {
        return Some(format!("memory: {} MiB available", avail >> 10));
    }
    if let (Some(s0), Some(s)) = (stall0, memory_stall_us()) {
        if s > s0 {
            return Some(format!("memory pressure ({} µs of stalls)", s - s0));
        }
    }
    None
}

/// One VM restored from `template` and ready, or why it was not.
async fn add(host: &Host, spec: &VmSpec, template: &Template) -> Result<Vm, String> {
    let vm = Vm::restore(host, spec, template)
        .await
        .map_err(|e| format!("a failed create: {e:#}"))?;
    if let Err(e) = vm.wait_ready(Duration::from_secs(120)).await {
        vm.discard().await;
        return Err(format!("a create that did not become ready: {e:#}"));
    }
    Ok(vm)
}

/// A table row for `vms` (labelled `label`): create latency, PSS per VM, host memory used
/// since `avail0`, idle CPU of all and per 100 VMs; and that idle CPU.
async fn row(vms: &[Vm], label: &str, recent: f64, avail0: u64) -> (String, f64) {
    let cpu = idle_cpu(vms, 10).await;
    let pss: u64 = vms.iter().filter_map(|v| pss_kib(v.pid()).ok()).sum();
    let (_, avail) = meminfo();
    let n = vms.len().max(1) as f64;
    let row = format!(
        "| {label} | {recent:.0} | {:.1} | {:.0} | {cpu:.1} | {:.1} |\n",
        pss as f64 / 1024.0 / n,
        avail0.saturating_sub(avail) as f64 / 1024.0,
        cpu * 100.0 / n
    );
    (row, cpu)
}

/// Adds VMs until one of the stops: why it stopped.
async fn hold(a: &HoldArgs, host: &Host, template: &Template, h: &mut Held) -> String {
    let (total_kib, _) = meminfo();
    let stall0 = memory_stall_us();
    loop {
        if let Some(why) = full(a, h.vms.len(), total_kib, stall0) {
            return why;
        }
        let t = Instant::now();
        let vm = match add(host, &spec(a, h.vms.len()), template).await {
            Ok(vm) => vm,
            Err(why) => return why,
        };
        h.vms.push(vm);
        h.lat.push(t.elapsed().as_secs_f64() * 1e3);
        if h.lat.len() == 10 {
            h.baseline = Some(median(h.lat.clone()));
        }
        let recent = h.recent();
        if let Some(b) = h.baseline {
            if recent > 2.0 * b {
                return format!("create latency: {recent:.0} ms, over twice the idle {b:.0} ms");
            }
        }
        if h.vms.len().is_multiple_of(100) {
            let (r, cpu) = row(&h.vms, &h.vms.len().to_string(), recent, h.avail0).await;
            h.rows.push_str(&r);
            println!("{} VMs: create {recent:.0} ms, idle CPU {cpu:.1} %", h.vms.len());
        }
    }
}

pub async fn run(a: HoldArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-hold-").tempdir()?;
    let host = Host::new(&a.data_dir, &tmp.path().join("vms"));
    let template = host.template(&Shape::of(&spec(&a, 0))).await?;
    let mut h = Held {
        vms: Vec::new(),
        lat: Vec::new(),
        baseline: None,
        rows: String::new(),
        avail0: meminfo().1,
    };
    let stopped_by = hold(&a, &host, &template, &mut h).await;
    let held = h.vms.len();
    let (r, _) = row(&h.vms, &format!("{held} (end)"), h.recent(), h.avail0).await;
    h.rows.push_str(&r);
    for vm in h.vms {
        let _ = vm.stop(Duration::ZERO).await;
    }
    let table = format!(
        "Idle `{}` VMs ({} MiB, 1 vCPU, no network, one template with shared RAM) held: **{held}**, stopped by {stopped_by}; \
         idle create latency (median of the first 10) {:.0} ms.\n\n\
         | VMs | create (median of last 5), ms | PSS per VM, MiB | host memory used, MiB | idle CPU of all, % of a core | idle CPU per 100 VMs, % |\n|---|---|---|---|---|---|\n{}",
        a.image,
        a.memory_mib,
        h.baseline.unwrap_or(0.0),
        h.rows,
    );
    println!("{table}");
    if let Some(p) = &a.record_to {
        record(p, &format!("hold-{}", a.image), &table)?;
    }
    Ok(())
}
