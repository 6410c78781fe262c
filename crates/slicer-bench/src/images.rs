//! `slicer-bench images`: pulling and converting an OCI image of about 100 MB from a local
//! `docker-registry` (first pull into an empty store, then the same digest again), and a
//! fork of a commit against a create from a template, side by side through the REST API.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http_body_util::BodyExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth;
use slicer_api::{ApiClient, CommitRequest, ForkRequest, VmStatus};

use crate::{cmd, create_vm, median, record};

pub struct ImagesArgs {
    pub runs: usize,
    pub images_dir: PathBuf,
    pub agent: PathBuf,
    pub record_to: Option<PathBuf>,
}

/// Our `min` package tree (gzip) plus 32 MiB that does not compress: about 100 MB to pull.
fn layers(images: &Path) -> Result<Vec<ImageLayer>> {
    let dir = images.join("debootstrap");
    let tree = std::fs::read_dir(&dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("min-") && e.path().join("complete").exists())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .context("no min package tree (scripts/setup.sh builds it)")?
        .path()
        .join("rootfs");
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    b.append_dir_all(".", &tree)?;
    let base = b.into_inner()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &base)?;
    let base = gz.finish()?;
    let noise: Vec<u8> = (0..32u32 << 20).map(|_| rand::random::<u8>()).collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(noise.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "opt/noise.bin", &noise[..])?;
    Ok(vec![
        ImageLayer::oci_v1_gzip(base, None),
        ImageLayer::oci_v1(b.into_inner()?, None),
    ])
}

/// A store that knows our kernel and images but holds no pulled image.
fn empty_store(images: &Path, at: &Path) -> Result<slicer_image::ImageStore> {
    std::fs::create_dir_all(at)?;
    for m in ["min.json", "systemd.json"] {
        std::fs::copy(images.join(m), at.join(m)).with_context(|| format!("{m} (scripts/setup.sh)"))?;
    }
    Ok(slicer_image::ImageStore::at(at))
}

pub async fn run(a: ImagesArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-images-").tempdir()?;
    let reg = slicer_testkit::Registry::start(tmp.path(), None)?;
    let addr = reg.addr.clone();
    let reference = format!("{addr}/bench/min:v1");
    let bytes = push(&a.images_dir, &reference).await?;
    let (first, again) = pulls(&a, tmp.path(), &reference, &addr).await?;

    // Fork against template create, interleaved, through one daemon.
    let groups = "  - name: bench\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: min\n    persistent: true\n    network: {mode: none}\n";
    let (d, c) = crate::bench_daemon(tmp.path(), groups, &a.images_dir).await?;
    let commit = committed_builder(&c).await?;
    let (warm, fork) = creates_and_forks(&c, &commit, a.runs.max(5)).await?;
    d.stop().await;

    let (f, g) = (median(first), median(again));
    let (w, k) = (median(warm.clone()), median(fork.clone()));
    let table = format!(
        "| images (min tree + 32 MiB, {:.0} MB compressed, from docker-registry on loopback; medians) | value |\n|---|---|\n\
         | first pull: download, apply layers, inject the agent, mkfs.ext4 ({} runs) | {f:.1} s |\n\
         | second pull of the same digest (manifest only) | {g:.0} ms |\n\
         | create from a template (`warm_start`), {} runs | {w:.0} ms |\n\
         | fork of a commit (cold boot of the commit's disk) | {k:.0} ms |\n\
         | fork / template create | {:.2}× |\n",
        bytes as f64 / 1e6,
        a.runs,
        warm.len(),
        k / w
    );
    println!("{table}");
    if let Some(p) = &a.record_to {
        record(p, "images-min", &table)?;
    }
    Ok(())
}

/// Pushes the benchmark's image (the `min` tree and noise) as `reference`: its compressed bytes.
async fn push(images_dir: &Path, reference: &str) -> Result<usize> {
    let layers = layers(images_dir)?;
    let bytes: usize = layers.iter().map(|l| l.data.len()).sum();
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let config = Config::oci_v1(
        br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec(),
        None,
    );
    client
        .push(&reference.parse()?, &layers, config, &RegistryAuth::Anonymous, None)
        .await
        .context("pushing the image")?;
    Ok(bytes)
}

/// `a.runs` pulls into an empty store, each followed by a pull of the same digest: (first
/// pulls in s, second pulls in ms).
async fn pulls(a: &ImagesArgs, tmp: &Path, reference: &str, addr: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut opts = slicer_image::oci::PullOptions::new(a.agent.clone());
    opts.insecure = vec![addr.to_string()];
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        let store = empty_store(&a.images_dir, &tmp.join(format!("store-{i}")))?;
        let t = Instant::now();
        slicer_image::oci::pull(&store, reference, &opts).await?;
        first.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        slicer_image::oci::pull(&store, reference, &opts).await?;
        again.push(t.elapsed().as_secs_f64() * 1e3);
        eprintln!("pull {i}: first {:.1} s, again {:.0} ms", first[i], again[i]);
    }
    Ok((first, again))
}

/// A VM created, synced, shut down and committed: the commit's id.
async fn committed_builder(c: &ApiClient) -> Result<String> {
    let builder = create_vm(c, "bench", None).await?;
    // The answer (NDJSON frames) is read to its end, and whatever it says is ignored.
    if let Ok(r) = c.vm_exec(&builder, &cmd("sync"), slicer_api::client::empty()).await {
        let _ = r.into_body().collect().await;
    }
    c.shutdown_vm(&builder, false).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if c.describe_vm(&builder).await?.node.status == VmStatus::Stopped {
            break;
        }
        if Instant::now() > deadline {
            bail!("the builder did not stop");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(c.commit_vm(&builder, &CommitRequest::default()).await?.commit_id)
}

/// `runs` creates from the template and forks of `commit`, interleaved, each deleted: their
/// times in ms.
async fn creates_and_forks(c: &ApiClient, commit: &str, runs: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut warm, mut fork) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        let h = create_vm(c, "bench", None).await?;
        warm.push(t.elapsed().as_secs_f64() * 1e3);
        c.delete_node("bench", &h).await?;
        let t = Instant::now();
        let forks = c.fork_commit(commit, &ForkRequest::default(), &[]).await?;
        fork.push(t.elapsed().as_secs_f64() * 1e3);
        let h = &forks.first().context("hostname")?.hostname;
        c.delete_node("bench", h).await?;
        eprintln!("create {i}: template {:.0} ms, fork {:.0} ms", warm[i], fork[i]);
    }
    Ok((warm, fork))
}
