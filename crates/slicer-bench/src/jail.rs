//! `slicer-bench jail`: what the QEMU jail and the per-VM cgroup cost. Two hosts over the same
//! image store, one jailing its QEMUs (the default) and one not; cold boots, template restores
//! and exec round trips, interleaved one by one so that noise hits both alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use slicer_vmm::{ExecRequest, Host, Shape, Vm, VmSpec};

use crate::{median, record};

pub struct JailArgs {
    pub image: String,
    pub boots: usize,
    pub execs: usize,
    pub data_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

fn spec(name: String, image: &str) -> VmSpec {
    let mut s = VmSpec::new(name, image);
    s.boot_timeout = Duration::from_secs(120);
    s
}

async fn cold(host: &Host, name: String, image: &str) -> Result<f64> {
    let t = Instant::now();
    let vm = Vm::boot(host, &spec(name, image)).await?;
    let took = t.elapsed().as_secs_f64() * 1000.0;
    vm.stop(Duration::ZERO).await?;
    Ok(took)
}

async fn warm(host: &Host, name: String, image: &str) -> Result<f64> {
    let s = spec(name, image);
    let template = host.template(&Shape::of(&s)).await?;
    let t = Instant::now();
    let vm = Vm::restore(host, &s, &template).await?;
    vm.wait_ready(Duration::from_secs(60)).await?;
    let took = t.elapsed().as_secs_f64() * 1000.0;
    vm.stop(Duration::ZERO).await?;
    Ok(took)
}

async fn exec_rtt(vm: &Vm) -> Result<f64> {
    let t = Instant::now();
    let out = vm.agent().exec_output(&ExecRequest::argv(["true"]), None).await?;
    anyhow::ensure!(out.status.success(), "true failed: {:?}", out.status);
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

pub async fn run(a: JailArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-jail-").tempdir()?;
    let jailed = Host::new(&a.data_dir, &tmp.path().join("jailed"));
    anyhow::ensure!(jailed.jail.is_some(), "the jail needs root: run as root");
    let cgroups = jailed
        .jail
        .as_ref()
        .and_then(|j| j.cgroups.as_ref())
        .map_or(0, |h| h.version());
    let mut plain = Host::new(&a.data_dir, &tmp.path().join("plain"));
    plain.jail = None;
    let accel = jailed.accel(&jailed.images.get(&a.image)?.kernel).await?;
    // Templates first (shared: the jail is not part of a template's identity).
    warm(&jailed, "bj-prep".into(), &a.image)
        .await
        .context("preparing the template")?;

    let (mut cj, mut cp, mut wj, mut wp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.boots {
        cj.push(cold(&jailed, format!("bj-c{i}"), &a.image).await?);
        cp.push(cold(&plain, format!("bp-c{i}"), &a.image).await?);
        wj.push(warm(&jailed, format!("bj-w{i}"), &a.image).await?);
        wp.push(warm(&plain, format!("bp-w{i}"), &a.image).await?);
        eprintln!(
            "{i}: cold {:.0}/{:.0} ms, warm {:.0}/{:.0} ms (jailed/plain)",
            cj[i], cp[i], wj[i], wp[i]
        );
    }
    let vj = Vm::boot(&jailed, &spec("bj-exec".into(), &a.image)).await?;
    let vp = Vm::boot(&plain, &spec("bp-exec".into(), &a.image)).await?;
    let (mut ej, mut ep) = (Vec::new(), Vec::new());
    for _ in 0..a.execs {
        ej.push(exec_rtt(&vj).await?);
        ep.push(exec_rtt(&vp).await?);
    }
    vj.stop(Duration::ZERO).await?;
    vp.stop(Duration::ZERO).await?;

    let row = |what: &str, j: Vec<f64>, p: Vec<f64>, target: &str| {
        let (mj, mp) = (median(j), median(p));
        format!("| {what} | {mj:.1} ms | {mp:.1} ms | {:.3}× | {target} |\n", mj / mp)
    };
    let table = format!(
        "| {} image, {}, 1 vCPU, 256 MiB, cgroup v{cgroups}; medians | jailed + cgroup | plain | ratio | target |\n|---|---|---|---|---|\n{}{}{}",
        a.image,
        accel.as_str(),
        row(&format!("cold create: overlay + QEMU + boot to agent ({} each)", a.boots), cj, cp, "≤ 1.05×"),
        row(&format!("warm create: restore from template to agent ({} each)", a.boots), wj, wp, "≤ 1.05×"),
        row(&format!("exec `true` round trip ({} each)", a.execs), ej, ep, "no change"),
    );
    println!("{table}");
    if let Some(path) = a.record_to {
        record(&path, &format!("jail-{}", a.image), &table)?;
    }
    Ok(())
}
