//! `slicer-bench ab --old BIN --new BIN`: two builds of `slicer` side by side in one run, each
//! as its own `slicer up` process (own data directory, port and group names; the image store is
//! shared, so both restore from the same templates). Interleaved rounds, old then new, of: a
//! cold create (`warm_start: false`), a warm create (from the template), and exec round trips
//! on the warm VM. Medians per build and their ratio, so a change is judged against the code
//! before it on the same machine at the same moment.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use http::Method;
use slicer_api::routes::{self, with_query};
use slicer_api::ApiClient;

use crate::{median, record};

pub struct AbArgs {
    pub old: PathBuf,
    pub new: PathBuf,
    pub image: String,
    pub rounds: usize,
    pub execs: usize,
    pub images_dir: PathBuf,
    pub record_to: Option<PathBuf>,
}

/// One `slicer up` process, killed (and its VMs with it: ephemeral, deleted first) on drop.
struct Up {
    child: std::process::Child,
    api: ApiClient,
    tag: &'static str,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM: the daemon stops its VMs (graceful_shutdown false) and exits.
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn up(bin: &Path, dir: &Path, tag: &'static str, image: &str, images_dir: &Path) -> Result<Up> {
    std::fs::create_dir_all(dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("slicer.yaml");
    std::fs::write(
        &config,
        format!(
            "config:\n  host_groups:\n  - name: {tag}cold\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: {image}\n    warm_start: false\n    network: {{mode: none}}\n  - name: {tag}warm\n    count: 0\n    vcpu: 1\n    ram_mb: 256\n    image: {image}\n    network: {{mode: none}}\n  graceful_shutdown: false\n  api:\n    port: {port}\n    bind_address: 127.0.0.1\n"
        ),
    )?;
    let child = std::process::Command::new(bin)
        .arg("up")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("SLICER_IMAGES_DIR", images_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let token_file = dir.join("data/auth/token");
    let mut up = Up {
        child,
        api: ApiClient::new(&url, None)?,
        tag,
    };
    loop {
        if let Ok(token) = std::fs::read_to_string(&token_file) {
            let api = ApiClient::new(&url, Some(token.trim().to_string()))?;
            if api
                .json::<serde_json::Value>(Method::GET, &routes::hostgroups(), None)
                .await
                .is_ok()
            {
                up.api = api;
                return Ok(up);
            }
        }
        if let Ok(Some(st)) = up.child.try_wait() {
            bail!(
                "{} up exited ({st}); see {}",
                bin.display(),
                dir.join("daemon.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} up did not answer within 120 s", bin.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Create (wait=agent) in `group`: its hostname and time in ms.
async fn create(api: &ApiClient, group: &str) -> Result<(String, f64)> {
    let t = Instant::now();
    let v: serde_json::Value = api
        .json(
            Method::POST,
            &with_query(routes::group_nodes(group), &crate::wait_agent(Some("5m"))),
            Some(&serde_json::json!({})),
        )
        .await
        .with_context(|| format!("creating in {group}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((v["hostname"].as_str().context("no hostname")?.to_string(), ms))
}

async fn delete(api: &ApiClient, group: &str, h: &str) -> Result<()> {
    let _: serde_json::Value = api.json(Method::DELETE, &routes::group_node(group, h), None).await?;
    Ok(())
}

/// Buffered `true` round trips on `h`: each time in ms.
async fn execs(api: &ApiClient, h: &str, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r: serde_json::Value = api
            .json(
                Method::POST,
                &with_query(
                    routes::vm_exec(h),
                    &[("cmd", "true".into()), ("buffered", "true".into()), ("uid", "0".into())],
                ),
                None,
            )
            .await?;
        if r["exit_code"] != 0 {
            bail!("exec on {h}: {r}");
        }
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(v)
}

#[derive(Default)]
struct Samples {
    cold: Vec<f64>,
    warm: Vec<f64>,
    exec: Vec<f64>,
}

async fn round(u: &Up, s: &mut Samples, n_exec: usize) -> Result<()> {
    let (cold_group, warm_group) = (format!("{}cold", u.tag), format!("{}warm", u.tag));
    let (h, ms) = create(&u.api, &cold_group).await?;
    s.cold.push(ms);
    delete(&u.api, &cold_group, &h).await?;
    let (h, ms) = create(&u.api, &warm_group).await?;
    s.warm.push(ms);
    s.exec.extend(execs(&u.api, &h, n_exec).await?);
    delete(&u.api, &warm_group, &h).await?;
    Ok(())
}

pub async fn run(a: AbArgs) -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("slicer-bench-ab-").tempdir()?;
    let old = up(&a.old, &tmp.path().join("old"), "old", &a.image, &a.images_dir).await?;
    let new = up(&a.new, &tmp.path().join("new"), "new", &a.image, &a.images_dir).await?;
    // One unmeasured round each: templates built, caches warm.
    round(&old, &mut Samples::default(), 1).await?;
    round(&new, &mut Samples::default(), 1).await?;
    let (mut so, mut sn) = (Samples::default(), Samples::default());
    for i in 0..a.rounds {
        // Alternate which goes first, so neither always runs right after the other.
        if i % 2 == 0 {
            round(&old, &mut so, a.execs).await?;
            round(&new, &mut sn, a.execs).await?;
        } else {
            round(&new, &mut sn, a.execs).await?;
            round(&old, &mut so, a.execs).await?;
        }
        eprintln!(
            "round {i}: cold {:.0}/{:.0} ms, warm {:.0}/{:.0} ms (old/new)",
            so.cold[i], sn.cold[i], so.warm[i], sn.warm[i]
        );
    }
    drop((old, new));
    let row = |what: &str, o: &[f64], n: &[f64]| {
        let (mo, mn) = (median(o.to_vec()), median(n.to_vec()));
        format!("| {what} | {mo:.1} ms | {mn:.1} ms | {:.2}× |\n", mn / mo)
    };
    let table = format!(
        "Two builds side by side (`slicer-bench --suite ab --old {} --new {}`), `{}` image, 1 vCPU, 256 MiB, no network; {} interleaved rounds (medians; {} exec round trips per round):\n\n\
         | | old | new | new / old |\n|---|---|---|---|\n{}{}{}",
        a.old.display(),
        a.new.display(),
        a.image,
        a.rounds,
        a.execs,
        row("create, cold boot (`warm_start: false`)", &so.cold, &sn.cold),
        row("create, from the template", &so.warm, &sn.warm),
        row("exec round trip (`true`, buffered)", &so.exec, &sn.exec),
    );
    print!("{table}");
    if let Some(path) = &a.record_to {
        record(path, "ab", &table)?;
    }
    Ok(())
}
