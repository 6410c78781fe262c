//! `slicer-bench daemon`: the REST API's create latency (cold boots: the group has
//! `warm_start: false`; `warm` compares against restores) against a raw boot, a burst of
//! concurrent creates, and `GET /nodes` with 100 records.

use std::time::Instant;

use anyhow::{Context, Result};
use http::Method;
use slicer_vmm::Host;

use crate::{median, raw_boot, record};

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
    let data = tmp.path().join("data");
    let host = Host::with_images(
        slicer_image::ImageStore::at(&a.images_dir),
        &data,
        &tmp.path().join("raw"),
    );
    let image = host.images.get(&a.image)?;
    let args = crate::Args::for_daemon(&a.image);

    // create?wait=agent then delete, interleaved with raw boots.
    let (mut raw, mut create) = (Vec::new(), Vec::new());
    for i in 0..a.creates {
        raw.push(
            raw_boot(&host, &image, &tmp.path().join(format!("raw-{i}")), &args)
                .await?
                .as_secs_f64()
                * 1e3,
        );
        let t = Instant::now();
        let v: serde_json::Value = c
            .json(
                Method::POST,
                "/hostgroup/bench/nodes?wait=agent",
                Some(&serde_json::json!({})),
            )
            .await?;
        create.push(t.elapsed().as_secs_f64() * 1e3);
        let h = v["hostname"].as_str().context("hostname")?;
        let _: serde_json::Value = c
            .json(Method::DELETE, &format!("/hostgroup/bench/nodes/{h}"), None)
            .await?;
        eprintln!("create {i}: raw {:.0} ms, API {:.0} ms", raw[i], create[i]);
    }

    // A burst of concurrent creates.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.burst {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.json::<serde_json::Value>(
                Method::POST,
                "/hostgroup/bench/nodes?wait=agent&timeout=10m",
                Some(&serde_json::json!({})),
            )
            .await
        }));
    }
    let mut names = Vec::new();
    for task in tasks {
        names.push(task.await??["hostname"].as_str().unwrap_or_default().to_string());
    }
    let burst = t.elapsed();
    for h in &names {
        let _: serde_json::Value = c
            .json(Method::DELETE, &format!("/hostgroup/bench/nodes/{h}"), None)
            .await?;
    }

    // GET /nodes with 100 records (rows of stopped persistent VMs; no guests needed), written
    // through a second connection to the daemon's state database.
    let db = slicer_daemon::state::Db::open(&tmp.path().join("data").join("state.db"))?;
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
            image: a.image.clone(),
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
        let v: Vec<serde_json::Value> = c.json(Method::GET, "/nodes", None).await?;
        list.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(v.len() == 100, "expected 100 records, got {}", v.len());
    }
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
