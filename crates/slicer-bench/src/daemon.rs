//! `slicer-bench daemon`: the REST API's create latency (cold boots: the group has
//! `warm_start: false`; `warm` compares against restores) against a raw boot, a burst of
//! concurrent creates, and `GET /nodes` with 100 records.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use slicer_api::{ApiClient, NodeFilter};
use slicer_vmm::Host;

use crate::boot::raw_boot;
use crate::{create_vm, median, record};

pub struct DaemonArgs {
    pub image: String,
    pub creates: usize,
    pub burst: usize,
    pub images_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

pub async fn run(a: DaemonArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-daemon-").tempdir()?;
    let groups = format!(
        "  - name: bench\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: {}\n    warm_start: false\n    network: {{mode: none}}\n",
        a.image
    );
    let (d, c) = crate::bench_daemon(tmp.path(), &groups, &a.images_dir).await?;
    let (raw, create) = creates(&c, &a, tmp.path()).await?;
    let burst = burst(&c, a.burst).await?;
    let list = list_100(&c, tmp.path(), &a.image).await?;
    let accel = crate::daemon_accel(&d, &a.image).await?;
    d.stop().await;

    let (raw_m, create_m) = (median(raw), median(create));
    let table = format!(
        "| measure ({} image, {accel}, 1 vCPU, 256 MiB) | value | target |\n|---|---|---|\n\
         | raw QEMU boot to init marker, median of {n} | {raw_m:.0} ms | — |\n\
         | `POST /hostgroup/bench/nodes?wait=agent`, median of {n} | {create_m:.0} ms | — |\n\
         | ratio API create / raw boot | {:.2}× | — |\n\
         | {} concurrent creates with wait=agent, wall time | {:.1} s | — |\n\
         | `GET /nodes` with 100 records, median of 100 | {:.2} ms | — |\n",
        a.image,
        create_m / raw_m,
        a.burst,
        burst.as_secs_f64(),
        median(list),
        n = a.creates,
    );
    println!("{table}");
    if let Some(path) = a.record_to {
        record(&path, &format!("daemon-{}", a.image), &table)?;
    }
    Ok(())
}

/// `create?wait=agent` then delete, interleaved with raw boots: (raw, create) times in ms.
async fn creates(c: &ApiClient, a: &DaemonArgs, tmp: &Path) -> Result<(Vec<f64>, Vec<f64>)> {
    let host = Host::with_images(
        slicer_image::ImageStore::at(&a.images_dir),
        &tmp.join("data"),
        &tmp.join("raw"),
    );
    let image = host.images.get(&a.image)?;
    let args = crate::Args::for_daemon(&a.image);
    let (mut raw, mut create) = (Vec::new(), Vec::new());
    for i in 0..a.creates {
        raw.push(
            raw_boot(&host, &image, &tmp.join(format!("raw-{i}")), &args)
                .await?
                .as_secs_f64()
                * 1e3,
        );
        let t = Instant::now();
        let h = create_vm(c, "bench", None).await?;
        create.push(t.elapsed().as_secs_f64() * 1e3);
        c.delete_node("bench", &h).await?;
        eprintln!("create {i}: raw {:.0} ms, API {:.0} ms", raw[i], create[i]);
    }
    Ok((raw, create))
}

/// A burst of `n` concurrent creates: the wall time until all answered (then they go).
async fn burst(c: &ApiClient, n: usize) -> Result<Duration> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { create_vm(&c, "bench", Some("10m")).await }));
    }
    let mut names = Vec::new();
    for task in tasks {
        names.push(task.await??);
    }
    let burst = t.elapsed();
    for h in &names {
        c.delete_node("bench", h).await?;
    }
    Ok(burst)
}

/// `GET /nodes` with 100 records (rows of stopped persistent VMs; no guests needed), written
/// through a second connection to the daemon's state database: 100 times in ms.
async fn list_100(c: &ApiClient, tmp: &Path, image: &str) -> Result<Vec<f64>> {
    let db = slicer_daemon::state::Db::open(&tmp.join("data").join("state.db"))?;
    for _ in 0..100 {
        let mut rec = slicer_daemon::state::VmRecord {
            hostname: String::new(),
            host_group: "bench".into(),
            cpus: 1,
            ram_bytes: 256 << 20,
            persistent: true,
            protected: false,
            status: slicer_api::VmStatus::Stopped,
            created_at: slicer_daemon::manager::stamp(),
            ip: String::new(),
            pid: None,
            image: image.to_string(),
            storage_size: None,
            userdata: None,
            userdata_ran: false,
            userdata_exit_code: None,
            tags: vec!["user=bench".into(), "job=list".into()],
            net_allow: None,
            net_drop: None,
            pid_start: None,
        };
        db.create(&mut rec, None)?;
    }
    let mut list = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let v = c.list_nodes(&NodeFilter::default()).await?;
        list.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(v.len() == 100, "expected 100 records, got {}", v.len());
    }
    Ok(list)
}
