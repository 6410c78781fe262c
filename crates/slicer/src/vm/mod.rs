//! `slicer vm ...` and `slicer ls`: the REST client's commands, by job: [`args`] (clap),
//! [`nodes`] (VMs and their lifecycle), [`exec`], [`cp`] (files and tar streams), [`commit`]
//! (commits, forks, disk exports) and [`route`] (reads the daemon's config).

mod args;
mod commit;
mod cp;
mod exec;
mod nodes;
mod route;

pub use args::*;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use slicer_api::{ApiClient, Node, NodeFilter};

#[derive(Args, Clone)]
pub struct Conn {
    /// API URL, or a UNIX socket path.
    #[arg(
        long,
        alias = "api",
        env = "SLICER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    #[arg(long, env = "SLICER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the token (default /var/lib/slicer/auth/token when readable).
    #[arg(long, env = "SLICER_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

impl Conn {
    /// `--json`.
    pub fn json(&self) -> bool {
        self.json
    }

    pub fn client(&self) -> Result<ApiClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => {
                let f = expand_home(f);
                Some(
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading token file {}", f.display()))?
                        .trim()
                        .to_string(),
                )
            }
            (None, None) => std::fs::read_to_string("/var/lib/slicer/auth/token")
                .ok()
                .map(|t| t.trim().to_string()),
        };
        Ok(ApiClient::new(&self.url, token)?)
    }
}

fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

/// Prints a power request's text answer (shutdown, pause, resume, suspend, restore).
fn print_power(text: String) -> Result<()> {
    print!("{text}");
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) use slicer_api::human_bytes;

pub fn print_nodes(nodes: &[Node]) {
    println!(
        "{:<20} {:<16} {:<8} {:<5} {:<8} {:<21} TAGS",
        "HOSTNAME", "IP", "RAM", "CPUS", "STATUS", "CREATED"
    );
    for n in nodes {
        let created = n.created_at.split('.').next().unwrap_or_default().trim_end_matches('Z');
        println!(
            "{:<20} {:<16} {:<8} {:<5} {:<8} {:<21} {}",
            n.hostname,
            if n.ip.is_empty() { "-" } else { &n.ip },
            human_bytes(n.ram_bytes),
            n.cpus,
            n.status,
            created,
            n.tags.join(",")
        );
    }
}

/// `slicer mcp`: an MCP server on stdin/stdout whose tools call the daemon at `--url`.
pub fn run_mcp(conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let c = conn.client()?;
        // stdout is the protocol's: a daemon that is not there yet is said on stderr, and each
        // tool call reports it again until it is.
        if let Err(e) = c.info().await {
            eprintln!(
                "slicer mcp: the daemon at {} does not answer yet ({e}); serving anyway",
                conn.url
            );
        }
        slicer_mcp::serve_stdio(c).await?;
        Ok(())
    })
}

/// `slicer info`: the client's version and the daemon's (`GET /info`).
pub fn run_info(conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let c = conn.client()?;
        let server = c
            .info()
            .await
            .with_context(|| format!("asking the daemon at {} (is `slicer up` running?)", conn.url))?;
        if conn.json {
            #[derive(serde::Serialize)]
            struct Versions<'a> {
                client: slicer_api::Info,
                server: &'a slicer_api::Info,
            }
            let client = slicer_api::Info {
                version: env!("CARGO_PKG_VERSION").into(),
                git_commit: option_env!("SLICER_GIT_COMMIT").unwrap_or("unknown").into(),
                platform: std::env::consts::OS.into(),
                arch: match std::env::consts::ARCH {
                    "x86_64" => "amd64".into(),
                    "aarch64" => "arm64".into(),
                    other => other.into(),
                },
            };
            print_json(&Versions {
                client,
                server: &server,
            })
        } else {
            println!("Client: slicer {}", env!("CARGO_PKG_VERSION"));
            println!(
                "Server: slicer {} ({}, {}/{})",
                server.version, server.git_commit, server.platform, server.arch
            );
            Ok(())
        }
    })
}

/// `slicer secret …`.
pub fn run_secret(cmd: crate::guest::SecretCmd, conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let code = rt.block_on(async {
        let c = conn.client()?;
        crate::guest::secret(&c, cmd, conn.json).await
    })?;
    std::process::exit(code)
}

/// `slicer vm …` (and `slicer ls`, `slicer disk export`): exits with the command's code.
pub fn run(cmd: VmCmd, conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let code = rt.block_on(run_async(cmd, conn))?;
    std::process::exit(code)
}

/// A VM argument: a hostname, else the VM whose `name=` tag it is (as Slicer's CLI).
pub async fn resolve(c: &ApiClient, arg: &str) -> Result<String> {
    if arg.is_empty() || arg.contains(['/', '?', '#', '%']) || arg == "." || arg == ".." {
        bail!("{arg:?} is not a VM hostname or name");
    }
    let resp = c.describe_vm_raw(arg).await?;
    if resp.status() != http::StatusCode::NOT_FOUND {
        return Ok(arg.to_string());
    }
    let filter = NodeFilter {
        tag: Some(format!("name={arg}")),
        ..Default::default()
    };
    let nodes = c.list_nodes(&filter).await?;
    match nodes.as_slice() {
        [n] => Ok(n.hostname.clone()),
        [] => bail!("VM {arg:?} not found: no VM has that hostname or name (see `slicer vm list`)"),
        _ => bail!("several VMs are named {arg:?}"),
    }
}

/// Resolves the VM a command names, then runs it: its exit code.
async fn run_async(mut cmd: VmCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    if let Some(name) = cmd.vm_arg() {
        *name = resolve(&c, name).await?;
    }
    let json = conn.json;
    match cmd {
        VmCmd::List { tag, tag_prefix } => nodes::list(&c, json, NodeFilter { tag, tag_prefix }).await?,
        VmCmd::Group => nodes::groups(&c, json).await?,
        VmCmd::Add(a) => return nodes::add(&c, json, a).await,
        VmCmd::Ready {
            name,
            agent: _,
            userdata,
            timeout,
            interval,
        } => nodes::ready(&c, json, &name, userdata, &timeout, &interval).await?,
        VmCmd::Shutdown { name, reboot } => print_power(c.shutdown_vm(&name, reboot).await?)?,
        VmCmd::Pause { name } => print_power(c.pause_vm(&name).await?)?,
        VmCmd::Resume { name } => print_power(c.resume_vm(&name).await?)?,
        VmCmd::Suspend { name } => print_power(c.suspend_vm(&name).await?)?,
        VmCmd::Restore { name, wait, timeout } => {
            let q = [("wait", wait.unwrap_or_default()), ("timeout", timeout)];
            print_power(c.restore_vm(&name, &q).await?)?;
        }
        cmd @ VmCmd::Commit { .. } => commit::run(&c, json, cmd).await?,
        VmCmd::Fork(f) => commit::fork(&c, json, f).await?,
        VmCmd::ExportDisk { name, output } => commit::export_disk(&c, json, &name, &output).await?,
        VmCmd::Relaunch { name } => nodes::relaunch(&c, json, &name).await?,
        VmCmd::Bg { cmd } => return crate::guest::bg(&c, cmd, json).await,
        VmCmd::Top { name } => return crate::guest::top(&c, name.as_deref(), json).await,
        VmCmd::Route { config, os } => return route::route(&config, &os),
        cmd @ (VmCmd::Shell { .. } | VmCmd::Forward { .. }) => return sessions(&c, cmd).await,
        VmCmd::Delete { name, group } => nodes::delete(&c, json, &name, group).await?,
        VmCmd::Exec {
            name,
            run_as,
            shell,
            command,
        } => return exec::exec(&c, &name, run_as, shell, command).await,
        VmCmd::Cp { src, dst, opts } => cp::cp(&c, &src, &dst, opts).await?,
        VmCmd::Logs { name, lines } => nodes::logs(&c, json, &name, lines).await?,
        VmCmd::Health { name } => nodes::health(&c, json, &name).await?,
        VmCmd::Tags {
            name,
            add,
            remove,
            replace,
        } => nodes::tags(&c, json, &name, add, remove, replace).await?,
    }
    Ok(0)
}

/// `vm shell` and `vm forward` (WebSocket sessions): the exit code.
async fn sessions(c: &ApiClient, cmd: VmCmd) -> Result<i32> {
    match cmd {
        VmCmd::Shell {
            name,
            uid,
            gid,
            shell,
            cwd,
            bootstrap,
        } => {
            let mut q: Vec<(&str, String)> = vec![("uid", uid.to_string())];
            q.extend(gid.map(|g| ("gid", g.to_string())));
            q.extend(shell.map(|s| ("shell", s)));
            q.extend(cwd.map(|d| ("cwd", d)));
            crate::ws::shell(c, &name, &q, bootstrap.as_deref()).await
        }
        VmCmd::Forward { name, spec } => {
            let specs = spec
                .iter()
                .map(|s| crate::ws::parse_spec(s))
                .collect::<Result<Vec<_>>>()?;
            crate::ws::forward(c, &name, specs).await
        }
        _ => bail!("not a WebSocket session"),
    }
}
