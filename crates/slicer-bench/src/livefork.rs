//! `slicer-bench livefork`: live fork against a template create, side by side in one run.
//! A running source (restored from the template, a counter process in it) is captured
//! ([`Host::capture`]) and VMs are restored from the capture, one at a time and ten at once;
//! each fork is checked to continue the counter.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use slicer_vmm::{ExecRequest, Host, Shape, Vm, VmSpec};

use crate::{median, record};

pub struct LiveForkArgs {
    pub image: String,
    pub memory_mib: u32,
    pub runs: usize,
    pub data_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

async fn sh(vm: &Vm, script: &str) -> Result<String> {
    let out = vm.agent().exec_output(&ExecRequest::shell(script), None).await?;
    ensure!(out.status.success(), "{}: {script}: {:?}", vm.name, out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn ready(host: &Host, spec: &VmSpec, t: &slicer_vmm::Template) -> Result<Vm> {
    let vm = Vm::restore(host, spec, t).await?;
    vm.wait_ready(Duration::from_secs(120)).await?;
    Ok(vm)
}

pub async fn run(a: LiveForkArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-livefork-").tempdir()?;
    let host = Host::new(&a.data_dir, &tmp.path().join("vms"));
    let spec = |name: String| {
        let mut s = VmSpec::new(name, &a.image);
        s.memory_mib = a.memory_mib;
        s
    };
    let shape = Shape::of(&spec("x".into()));
    let template = host.template(&shape).await?;
    let src = ready(&host, &spec("src".into()), &template).await?;
    sh(
        &src,
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count.new; mv /dev/shm/count.new /dev/shm/count; sleep 0.05; done' </dev/null >/dev/null 2>&1 &",
    )
    .await?;
    let (mut create, mut pause, mut capture, mut fork1, mut commit_fork) = (vec![], vec![], vec![], vec![], vec![]);
    let mut fork10 = Vec::new();
    for r in 0..a.runs {
        // A template create.
        let t = Instant::now();
        let vm = ready(&host, &spec(format!("tpl-{r}")), &template).await?;
        create.push(t.elapsed().as_secs_f64() * 1e3);
        vm.stop(Duration::ZERO).await?;
        // A live commit, then one fork of it.
        let t = Instant::now();
        let dest = tmp.path().join(format!("capture-{r}"));
        let (cap, times) = host.capture(&src, &shape, &dest).await?;
        pause.push(times.paused.as_secs_f64() * 1e3);
        capture.push(times.total.as_secs_f64() * 1e3);
        let f = Instant::now();
        let vm = ready(&host, &spec(format!("f1-{r}")), &cap).await?;
        fork1.push(f.elapsed().as_secs_f64() * 1e3);
        commit_fork.push(t.elapsed().as_secs_f64() * 1e3);
        let n: u64 = sh(&vm, "cat /dev/shm/count").await?.trim().parse().context("counter")?;
        ensure!(n > 0, "the fork did not continue the counter");
        vm.stop(Duration::ZERO).await?;
        // Ten forks of the capture at once.
        let t = Instant::now();
        let vms = futures_util::future::join_all((0..10).map(|i| {
            let s = spec(format!("f10-{r}-{i}"));
            let (host, cap) = (&host, &cap);
            async move { ready(host, &s, cap).await }
        }))
        .await;
        fork10.push(t.elapsed().as_secs_f64() * 1e3);
        for vm in vms {
            vm?.stop(Duration::ZERO).await?;
        }
        let _ = std::fs::remove_dir_all(&dest);
    }
    src.stop(Duration::ZERO).await?;
    let (create, commit_fork) = (median(create), median(commit_fork));
    let table = format!(
        "| live fork of a running `{}` VM ({} MiB), medians of {} | ms | vs a template create |\n|---|---|---|\n\
         | template create (restore to agent-ready) | {create:.0} | 1.00× |\n\
         | live commit: source paused | {:.0} | |\n\
         | live commit: in all (capture QEMU, copy, stream, save) | {:.0} | |\n\
         | fork of the commit, N=1 (restore to agent-ready) | {:.0} | |\n\
         | live commit + fork N=1 (one running VM forked) | {commit_fork:.0} | {:.2}× |\n\
         | fork of the commit, N=10 at once (all agent-ready) | {:.0} | |\n",
        a.image,
        a.memory_mib,
        a.runs,
        median(pause),
        median(capture),
        median(fork1),
        commit_fork / create,
        median(fork10),
    );
    println!("{table}");
    if let Some(p) = &a.record_to {
        record(p, &format!("livefork-{}", a.image), &table)?;
    }
    Ok(())
}
