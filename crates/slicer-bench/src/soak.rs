//! `slicer-bench soak`: concurrent clients create, exec in, copy into and out of, watch and
//! delete sandboxes with random tags and sizes for `--secs` against a daemon in this process
//! (isolated networking, jailed QEMUs). Afterwards nothing may be left (QEMU, network
//! namespace, nftables table, cgroup, VM directory, record), and the process's RSS and open
//! files must be flat between the end of the first round and the end of the run. Prints
//! p50/p99 per operation; fails (exit 1) on a leak, an error or growth.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use rand::Rng;
use slicer_api::client::full;
use slicer_api::query::CopyQuery;
use slicer_api::{ApiClient, CreateNodeRequest, NodeFilter};

use crate::{cmd, exec_buffered, record, wait_agent};

pub struct SoakArgs {
    pub image: String,
    pub secs: u64,
    pub clients: usize,
    pub images_dir: std::path::PathBuf,
    pub record_to: Option<std::path::PathBuf>,
}

const GROUP: &str = "soak";

type Samples = BTreeMap<&'static str, Vec<f64>>;

fn rss_kib() -> u64 {
    crate::density::kib_field(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        "VmRSS:",
    )
    .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

async fn timed<T>(s: &mut Samples, what: &'static str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let t = Instant::now();
    let r = f.await.with_context(|| what)?;
    s.entry(what).or_default().push(t.elapsed().as_secs_f64() * 1e3);
    Ok(r)
}

/// One sandbox's life: create, exec, cp in and out, watch, delete.
async fn cycle(c: &ApiClient, n: usize, s: &mut Samples) -> Result<()> {
    let (tag, ram_mb, size) = {
        let mut r = rand::thread_rng();
        (
            format!("user=u{}", r.gen_range(0..1000)),
            [256u64, 320][r.gen_range(0..2)],
            r.gen_range(16usize..512) << 10,
        )
    };
    let body = CreateNodeRequest {
        tags: vec![tag, format!("job={n}")],
        ram_bytes: Some(ram_mb << 20),
        ..Default::default()
    };
    let h = timed(s, "create", async {
        Ok(c.create_node(GROUP, &body, &wait_agent(Some("5m"))).await?.hostname)
    })
    .await?;
    let work = use_sandbox(c, &h, size, s).await;
    // The sandbox goes whatever happened to it.
    let deleted = timed(s, "delete", async {
        c.delete_node(GROUP, &h).await?;
        Ok(())
    })
    .await;
    work.with_context(|| format!("VM {h}"))?;
    deleted
}

/// Exec, a copy of `size` random bytes in and back out, and a watch, on `h`.
async fn use_sandbox(c: &ApiClient, h: &str, size: usize, s: &mut Samples) -> Result<()> {
    let out = timed(s, "exec", exec_buffered(c, h, cmd("uname -r; echo $((6*7))"))).await?;
    ensure!(
        out["exit_code"] == 0 && out["stdout"].as_str().unwrap_or_default().ends_with("42\n"),
        "exec: {out}"
    );
    copies(c, h, size, s).await?;
    watch(c, h, s).await
}

/// `size` random bytes copied into the guest and back: what comes back is what went in.
async fn copies(c: &ApiClient, h: &str, size: usize, s: &mut Samples) -> Result<()> {
    let blob: Vec<u8> = {
        let mut r = rand::thread_rng();
        (0..size).map(|_| r.gen::<u8>()).collect()
    };
    let q = CopyQuery {
        path: "/tmp/soak.bin".into(),
        mode: Some("binary".into()),
        ..Default::default()
    };
    timed(s, "cp in", async {
        let r = c
            .cp_upload(h, &q, "application/octet-stream", full(blob.clone()))
            .await?;
        ensure!(r.status() == 200, "cp in: {}", r.status());
        r.into_body().collect().await?;
        Ok(())
    })
    .await?;
    let back = timed(s, "cp out", async {
        let r = c.cp_download(h, &q).await?;
        ensure!(r.status() == 200, "cp out: {}", r.status());
        Ok(r.into_body().collect().await?.to_bytes())
    })
    .await?;
    ensure!(
        back.as_ref() == blob.as_slice(),
        "cp out: {} bytes differ from the {} sent",
        back.len(),
        blob.len()
    );
    Ok(())
}

/// A watch sees a file the guest writes.
async fn watch(c: &ApiClient, h: &str, s: &mut Samples) -> Result<()> {
    let wq = [
        ("paths", "/tmp".to_string()),
        ("one_shot", "true".into()),
        ("timeout", "20s".into()),
        ("patterns", "soak-w".into()),
    ];
    timed(s, "watch", async {
        let r = c.fs_watch(h, &wq).await?;
        ensure!(r.status() == 200, "watch: {}", r.status());
        let mut body = r.into_body().into_data_stream();
        exec_buffered(c, h, cmd("touch /tmp/soak-w")).await?;
        let mut seen = String::new();
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk?));
            if seen.contains("soak-w") {
                return Ok(());
            }
        }
        bail!("watch ended without the event: {seen:?}")
    })
    .await
}

/// What of the soak is left on the host: a list of leaks.
fn leftovers(data: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let prefix = format!("slicer-{GROUP}-");
    for pid in slicer_hypervisor::qemu::processes_where(|args| slicer_hypervisor::qemu::args_name(args, &prefix, true))
    {
        out.push(format!("QEMU {pid}"));
    }
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) {
            out.push(format!("network namespace {n}"));
        }
    }
    if let Ok(o) = std::process::Command::new("nft").args(["list", "tables"]).output() {
        for l in String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&prefix))
        {
            out.push(format!("nftables {l}"));
        }
    }
    for root in [
        "/sys/fs/cgroup/memory/slicer",
        "/sys/fs/cgroup/slicer",
        "/sys/fs/cgroup/pids/slicer",
    ] {
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{GROUP}-")) {
                out.push(format!("cgroup {root}/{n}"));
            }
        }
    }
    for e in std::fs::read_dir(data.join("vms")).into_iter().flatten().flatten() {
        out.push(format!("VM directory {}", e.path().display()));
    }
    out
}

pub async fn run(a: SoakArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-soak-").tempdir()?;
    let groups = format!(
        "  - name: {GROUP}\n    count: 0\n    vcpu: 1\n    ram_mb: 384\n    image: {}\n    network: {{mode: isolated, range: 169.254.252.0/22}}\n",
        a.image
    );
    let (d, c) = crate::bench_daemon(tmp.path(), &groups, &a.images_dir).await?;
    let data = tmp.path().join("data");

    // A first round of every client (templates of both sizes built, pools and caches warm),
    // then the clock and the baseline.
    first_round(&c, a.clients).await?;
    let (rss0, fds0) = (rss_kib(), open_fds());
    let t0 = Instant::now();
    let mut r = soak(&c, a.clients, t0 + Duration::from_secs(a.secs)).await?;
    let took = t0.elapsed();
    let nodes = c.list_nodes(&NodeFilter::default()).await?;
    let (rss1, fds1) = (rss_kib(), open_fds());
    let accel = crate::daemon_accel(&d, &a.image).await?;
    d.stop().await;
    let mut leaks = leftovers(&data);
    if !nodes.is_empty() {
        leaks.push(format!("{} records", nodes.len()));
    }

    let mut table = format!(
        "| soak ({} image, {accel}, {} clients, {:.0} s, isolated network) | p50 | p99 | count |\n|---|---|---|---|\n",
        a.image,
        a.clients,
        took.as_secs_f64()
    );
    for (k, v) in r.samples.iter_mut() {
        let n = v.len();
        table.push_str(&format!(
            "| {k} | {:.0} ms | {:.0} ms | {n} |\n",
            pct(v, 0.5),
            pct(v, 0.99)
        ));
    }
    table.push_str(&format!(
        "| sandboxes through their whole life | {} | | |\n\
         | daemon RSS after the first round → at the end | {} → {} MiB | | |\n\
         | daemon open files after the first round → at the end | {fds0} → {fds1} | | |\n\
         | left on the host afterwards (QEMU, netns, nftables, cgroups, VM dirs, records) | {} | | |\n\
         | errors | {} | | |\n",
        r.cycles,
        rss0 >> 10,
        rss1 >> 10,
        if leaks.is_empty() {
            "nothing".to_string()
        } else {
            leaks.join(", ")
        },
        r.errors.len()
    ));
    println!("{table}");
    check(&a, &r, &leaks, (rss0, rss1), (fds0, fds1))?;
    if let Some(path) = a.record_to {
        record(&path, &format!("soak-{}", a.image), &table)?;
    }
    Ok(())
}

/// One cycle of each of `clients` clients, at once.
async fn first_round(c: &ApiClient, clients: usize) -> Result<()> {
    let mut warm = Vec::new();
    for i in 0..clients {
        let c = c.clone();
        warm.push(tokio::spawn(async move {
            let mut s = Samples::new();
            cycle(&c, i, &mut s).await
        }));
    }
    for w in warm {
        w.await??;
    }
    Ok(())
}

/// What the soak's clients did: every operation's times, the cycles finished, the errors.
struct Soaked {
    samples: Samples,
    cycles: usize,
    errors: Vec<String>,
}

/// `clients` clients cycling sandboxes until `deadline`.
async fn soak(c: &ApiClient, clients: usize, deadline: Instant) -> Result<Soaked> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Samples::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                cycle(&c, i * 100_000 + n, &mut s).await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>((s, n))
        }));
    }
    let mut r = Soaked {
        samples: Samples::new(),
        cycles: 0,
        errors: Vec::new(),
    };
    for t in tasks {
        match t.await? {
            Ok((s, n)) => {
                r.cycles += n;
                for (k, v) in s {
                    r.samples.entry(k).or_default().extend(v);
                }
            }
            Err(e) => r.errors.push(format!("{e:#}")),
        }
    }
    Ok(r)
}

/// Fails the soak on an error, a leak, no finished cycle, or growth of open files or RSS
/// (`rss` and `fds`: after the first round, at the end).
fn check(a: &SoakArgs, r: &Soaked, leaks: &[String], rss: (u64, u64), fds: (usize, usize)) -> Result<()> {
    let ((rss0, rss1), (fds0, fds1)) = (rss, fds);
    ensure!(r.errors.is_empty(), "soak errors: {:?}", r.errors);
    ensure!(leaks.is_empty(), "left on the host: {leaks:?}");
    ensure!(r.cycles > 0, "no sandbox finished within {} s", a.secs);
    // Flat: file descriptors back where they were; RSS within 32 MiB or 25% of the baseline.
    // (The clients' pooled connections are in this process too: a few either way.)
    ensure!(fds1 <= fds0 + 16, "open files grew from {fds0} to {fds1}");
    ensure!(
        rss1 <= rss0 + (rss0 / 4).max(32 << 10),
        "RSS grew from {} to {} MiB",
        rss0 >> 10,
        rss1 >> 10
    );
    Ok(())
}
