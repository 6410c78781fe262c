//! `slicer-bench warm`: `create?wait=agent` of a cold boot against a restore from the group's
//! template, interleaved in one daemon (two host groups of the same shape, one with
//! `warm_start: false`), then bursts of concurrent creates of each kind, and the RSS of an idle
//! guest of each kind.

use std::time::{Duration, Instant};

use anyhow::Result;
use slicer_api::ApiClient;

use crate::{create_vm, median, record};

pub struct WarmArgs {
    pub image: String,
    pub creates: usize,
    pub burst: usize,
    pub memory_mib: u32,
    pub images_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

async fn create(c: &ApiClient, group: &str) -> Result<(String, Duration)> {
    let t = Instant::now();
    let h = create_vm(c, group, Some("10m")).await?;
    let took = t.elapsed();
    let start_mode = serde_json::to_value(c.describe_vm(&h).await?.start_mode)?;
    let want = if group == "warm" { "template" } else { "cold" };
    anyhow::ensure!(start_mode == want, "{h} started {start_mode} instead of {want}");
    Ok((h, took))
}

/// Bytes the image's root filesystem occupies on disk (it is sparse) and its kernel's size.
fn image_sizes(images_dir: &std::path::Path, image: &str) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let img = slicer_image::ImageStore::at(images_dir).get(image)?;
    let rootfs = std::fs::metadata(&img.rootfs)?.blocks() * 512;
    Ok((rootfs, std::fs::metadata(&img.kernel)?.len()))
}

async fn delete(c: &ApiClient, group: &str, h: &str) -> Result<()> {
    c.delete_node(group, h).await?;
    Ok(())
}

/// Creates `n` VMs of `group` at once: the wall time until all answer.
async fn burst(c: &ApiClient, group: &str, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, g) = (c.clone(), group.to_string());
            tokio::spawn(async move { create(&c, &g).await })
        })
        .collect();
    let mut names = Vec::new();
    for task in tasks {
        names.push(task.await??.0);
    }
    let took = t.elapsed();
    for h in &names {
        delete(c, group, h).await?;
    }
    Ok(took)
}

/// Resident memory of the VM's QEMU in MiB.
fn rss_mib(hostname: &str) -> Option<f64> {
    let pid = slicer_testkit::qemu::pid_of(hostname)?;
    Some(slicer_testkit::qemu::rss_kib(pid)? as f64 / 1024.0)
}

pub async fn run(a: WarmArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-warm-").tempdir()?;
    let group = |name: &str, warm: bool| {
        format!(
            "  - name: {name}\n    count: 0\n    vcpu: 1\n    ram_mb: {}\n    image: {}\n    warm_start: {warm}\n    network: {{mode: none}}\n",
            a.memory_mib, a.image
        )
    };
    let groups = format!("{}{}", group("cold", false), group("warm", true));
    let (d, c) = crate::bench_daemon(tmp.path(), &groups, &a.images_dir).await?;

    // The template (built now if the image store has none for this shape).
    let shape = slicer_vmm::Shape {
        image: a.image.clone(),
        cpus: 1,
        memory_mib: a.memory_mib,
        nic: false,
    };
    let t = Instant::now();
    let template = d.manager.template(&shape).await?;
    let template_wait = t.elapsed();

    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let (mut cold_rss, mut warm_rss) = (Vec::new(), Vec::new());
    for i in 0..a.creates {
        // One VM at a time: a cold guest keeps booting (systemd units) after its agent
        // answers and would slow whatever runs next.
        let (hw, tw) = create(&c, "warm").await?;
        warm.push(tw.as_secs_f64() * 1e3);
        warm_rss.extend(rss_mib(&hw));
        delete(&c, "warm", &hw).await?;
        let (hc, tc) = create(&c, "cold").await?;
        cold.push(tc.as_secs_f64() * 1e3);
        cold_rss.extend(rss_mib(&hc));
        delete(&c, "cold", &hc).await?;
        eprintln!("create {i}: cold {:.0} ms, warm {:.0} ms", cold[i], warm[i]);
    }
    let burst_warm = burst(&c, "warm", a.burst).await?;
    let burst_cold = burst(&c, "cold", a.burst).await?;
    let accel = crate::daemon_accel(&d, &a.image).await?;
    d.stop().await;

    let (cold_m, warm_m) = (median(cold), median(warm));
    let image_sizes = image_sizes(&a.images_dir, &a.image)?;
    let target = if a.image == "systemd" { 0.1 } else { 0.25 };
    let met = if warm_m / cold_m <= target {
        "met"
    } else {
        "**not met**"
    };
    let table = format!(
        "| measure ({img} image, {accel}, 1 vCPU, {mem} MiB) | cold boot | warm (template restore) | warm / cold |\n|---|---|---|---|\n\
         | `create?wait=agent`, median of {n} (interleaved) | {cold_m:.0} ms | {warm_m:.0} ms | **{:.2}×** (target ≤ {target}×: {met}) |\n\
         | {b} concurrent creates, wall time until all answer | {:.1} s | {:.1} s | {:.2}× |\n\
         | QEMU RSS of an idle guest, median | {:.0} MiB | {:.0} MiB | {:.2}× |\n\
         | template: saved state {} MiB; waiting for it at start took {} ms (0 when already built) | | | |\n\
         | image: root filesystem {} MiB used (ext4, sparse), kernel {:.1} MiB (bzImage) | | | |\n",
        warm_m / cold_m,
        burst_cold.as_secs_f64(),
        burst_warm.as_secs_f64(),
        burst_warm.as_secs_f64() / burst_cold.as_secs_f64(),
        median(cold_rss.clone()),
        median(warm_rss.clone()),
        median(warm_rss) / median(cold_rss),
        template.state_bytes >> 20,
        template_wait.as_millis(),
        image_sizes.0 >> 20,
        image_sizes.1 as f64 / (1u64 << 20) as f64,
        img = a.image,
        mem = a.memory_mib,
        n = a.creates,
        b = a.burst,
    );
    println!("{table}");
    if let Some(path) = a.record_to {
        record(&path, &format!("warm-{}", a.image), &table)?;
    }
    Ok(())
}
