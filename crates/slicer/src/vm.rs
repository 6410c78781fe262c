//! `slicer vm ...` and `slicer ls`: the REST client.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use futures_util::TryStreamExt;
use http::Method;
use http_body_util::BodyExt;
use slicer_api::client::{empty, query, Body};
use slicer_api::query::{CopyQuery, ExecQuery};
use slicer_api::{
    ApiClient, CreateNodeRequest, CreateNodeResponse, DeleteResponse, ExecFrame, HealthResponse, HostGroupInfo,
    LogsResponse, Node, TagsResponse, VmDescription,
};

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

/// Who a command runs as in the guest, and where (`vm exec`, `vm bg exec`).
#[derive(Args, Clone, Debug)]
pub struct RunAs {
    /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
    /// image's non-root user; 1000 is `ubuntu`).
    #[arg(long, default_value_t = 0)]
    pub uid: u32,
    #[arg(long)]
    pub gid: Option<u32>,
    /// Working directory in the guest: absolute, ~ or ~/x.
    #[arg(long)]
    pub cwd: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
}

impl RunAs {
    /// `q` acting as this user, there, with this environment.
    pub fn apply(self, q: ExecQuery) -> ExecQuery {
        ExecQuery {
            uid: Some(self.uid),
            gid: self.gid,
            cwd: self.cwd,
            env: self.env,
            ..q
        }
    }
}

/// An `--ssh-key` value: a public key as given, or the key in the file it names.
pub fn ssh_key_arg(k: &str) -> Result<String> {
    match std::fs::read_to_string(expand_home(Path::new(k))) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(_) if k.contains(' ') => Ok(k.to_string()),
        Err(e) => bail!("--ssh-key {k}: not a key, and reading it as a file: {e}"),
    }
}

#[derive(Subcommand)]
pub enum CommitCmd {
    /// Commits, newest last.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        cache_key: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a commit (refused while VMs or commits sit on it).
    #[command(alias = "rm")]
    Delete { id: String },
}

// `vm add` (a plain comment: a doc comment would become the help text).
#[derive(Args)]
pub struct AddArgs {
    group: Option<String>,
    /// The VM's name: sugar for the immutable tag name=NAME (a lowercase DNS label, unique);
    /// every command that takes a VM accepts it.
    #[arg(short = 'n', long)]
    name: Option<String>,
    #[arg(long)]
    cpus: Option<u32>,
    #[arg(long)]
    ram_gb: Option<u64>,
    #[arg(long)]
    ram_mb: Option<u64>,
    #[arg(long)]
    ram_bytes: Option<u64>,
    /// key=value (repeatable).
    #[arg(long)]
    tag: Vec<String>,
    #[arg(long)]
    userdata: Option<String>,
    #[arg(long)]
    userdata_file: Option<PathBuf>,
    /// Secrets the VM gets (comma-separated; default all).
    #[arg(long, alias = "secret", value_delimiter = ',')]
    secrets: Option<Vec<String>>,
    /// A public key, or a file holding one (repeatable).
    #[arg(long = "ssh-key")]
    ssh_keys: Vec<String>,
    /// Keep the VM and its disk when it stops (the CLI's default; the API's is false).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    persistent: bool,
    /// Open a shell in the VM once it is ready.
    #[arg(long)]
    shell: bool,
    /// Wait for the agent (or with --wait-userdata, for userdata) before returning.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    wait_userdata: bool,
    #[arg(long, default_value = "5m")]
    timeout: String,
}

// `vm fork`.
#[derive(Args)]
pub struct ForkArgs {
    commit: String,
    /// Tag of the new VM, after the commit's (repeat).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The new VM's name (a name= tag).
    #[arg(long)]
    name: Option<String>,
    /// Return once the agent answers (default); --wait=false returns at once.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true")]
    wait: bool,
    /// Allow egress to this CIDR or address[:port] (isolated groups; repeat).
    #[arg(long)]
    allow: Vec<String>,
    /// Clear the allow list the fork would inherit.
    #[arg(long)]
    no_allow: bool,
    /// Drop egress to this CIDR (isolated groups; repeat).
    #[arg(long)]
    drop: Vec<String>,
    /// Make this many forks at once (1-32; one line, or one JSON object, each).
    #[arg(long)]
    count: Option<u32>,
}

// How `vm cp` copies.
#[derive(Args)]
pub struct CpOpts {
    /// binary (one file) or tar (a directory).
    #[arg(long)]
    mode: Option<String>,
    #[arg(short = 'r', long)]
    recursive: bool,
    /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
    /// image's non-root user; 1000 is `ubuntu`).
    #[arg(long, default_value_t = 0)]
    uid: u32,
    #[arg(long)]
    gid: Option<u32>,
    #[arg(long)]
    permissions: Option<String>,
    /// Leave out paths matching this gitignore-style pattern (repeatable); an upload of a
    /// directory also honours its .slicerignore.
    #[arg(long)]
    exclude: Vec<String>,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// List VMs.
    #[command(alias = "ls", alias = "l")]
    List {
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        tag_prefix: Option<String>,
    },
    /// Create a VM in a host group (the only group when omitted).
    #[command(alias = "launch")]
    Add(AddArgs),
    /// Wait until a VM's agent answers (or, with --userdata, its userdata ran).
    Ready {
        name: String,
        /// Wait for the agent (the default; accepted for Slicer's form).
        #[arg(long)]
        agent: bool,
        #[arg(long)]
        userdata: bool,
        #[arg(long, default_value = "5m")]
        timeout: String,
        #[arg(long, default_value = "100ms")]
        interval: String,
    },
    /// Delete a VM and its disk.
    #[command(alias = "rm")]
    Delete { name: String, group: Option<String> },
    /// Run a command; streams its output and exits with its exit code.
    Exec {
        name: String,
        #[command(flatten)]
        run_as: RunAs,
        /// Shell for the command line; "" runs the command directly.
        #[arg(long)]
        shell: Option<String>,
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Copy a file or directory: `./f NAME:/path` or `NAME:/path ./f`.
    Cp {
        src: String,
        dst: String,
        #[command(flatten)]
        opts: CpOpts,
    },
    /// Serial console of a VM.
    Logs {
        name: String,
        #[arg(long, default_value_t = 20)]
        lines: usize,
    },
    /// Agent health of a VM.
    Health { name: String },
    /// Show or change tags (name= stays).
    #[command(alias = "tag")]
    Tags {
        name: String,
        #[arg(long)]
        add: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
        #[arg(long)]
        replace: Vec<String>,
    },
    /// Host groups.
    Group,
    /// Power a VM off (ephemeral VMs are then removed), or reboot it with --reboot.
    Shutdown {
        name: String,
        #[arg(long)]
        reboot: bool,
    },
    /// Freeze a VM's vCPUs (memory kept).
    Pause { name: String },
    /// Unfreeze a paused VM.
    Resume { name: String },
    /// Save a VM's memory and devices to disk and stop it; `vm restore` continues it.
    Suspend { name: String },
    /// Continue a suspended VM where it stopped.
    Restore {
        name: String,
        /// `agent`: return once the VM's agent answers.
        #[arg(long)]
        wait: Option<String>,
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Boot a stopped persistent VM again from its disk.
    Relaunch { name: String },
    /// Commit a stopped persistent VM's disk under a new id (`commit list`, `commit delete ID`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Commit {
        #[command(subcommand)]
        sub: Option<CommitCmd>,
        /// The VM to commit.
        #[arg(required = true)]
        name: Option<String>,
        /// Cache key: one source VM's commits; find them with `commit list --cache-key`.
        #[arg(long)]
        cache_key: Option<String>,
        /// Tag of the commit (repeat).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Commit the running VM with its memory and devices (it pauses briefly and
        /// continues); forks continue from that moment.
        #[arg(long)]
        live: bool,
    },
    /// Fork a commit into a new persistent VM of its host group (named by the allocator).
    Fork(ForkArgs),
    /// Write a stopped VM's disk as a standalone qcow2 image (`slicer disk export`).
    #[command(hide = true)]
    ExportDisk { name: String, output: PathBuf },
    /// Background execs: start, list, logs, kill, wait, rm.
    Bg {
        #[command(subcommand)]
        cmd: crate::guest::BgCmd,
    },
    /// Load, memory and disk of every VM (or of one), measured in the guests.
    Top { name: Option<String> },
    /// An interactive shell on a PTY in the VM (exits with the shell's exit code; Ctrl-]
    /// detaches).
    Shell {
        name: String,
        /// User to act as: root by default, as with SlicerVM's CLI (the API's default is the
        /// image's non-root user; 1000 is `ubuntu`).
        #[arg(long, default_value_t = 0)]
        uid: u32,
        #[arg(long)]
        gid: Option<u32>,
        /// Absolute path of the shell (default bash, else sh).
        #[arg(long)]
        shell: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// A command line typed into the shell first.
        #[arg(long)]
        bootstrap: Option<String>,
    },
    /// Print the commands another machine runs to reach this host's bridge-mode VMs.
    Route {
        /// The daemon's config (slicer.yaml).
        config: PathBuf,
        /// linux or darwin.
        #[arg(long, default_value = "linux")]
        os: String,
    },
    /// Forward local ports or sockets to the VM: -L [ADDR:]PORT:HOST:PORT, -L PORT:/remote.sock,
    /// -L /local.sock:/remote.sock, -L HOST:PORT (repeatable). Runs until interrupted.
    Forward {
        name: String,
        #[arg(short = 'L', required = true)]
        spec: Vec<String>,
    },
}

/// A power request (POST, no body); prints the daemon's text answer.
async fn power(c: &slicer_api::ApiClient, path: &str) -> Result<()> {
    let resp = c.call(Method::POST, path, None, empty()).await?;
    let text = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    print!("{}", String::from_utf8_lossy(&text));
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{}GiB", b >> 30)
    } else {
        format!("{}MiB", b >> 20)
    }
}

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

/// `slicer info`: the client's version and the daemon's (`GET /info`).
/// `slicer mcp`: an MCP server on stdin/stdout whose tools call the daemon at `--url`.
pub fn run_mcp(conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let c = conn.client()?;
        // stdout is the protocol's: a daemon that is not there yet is said on stderr, and each
        // tool call reports it again until it is.
        if let Err(e) = c.json::<slicer_api::Info>(Method::GET, "/info", None).await {
            eprintln!(
                "slicer mcp: the daemon at {} does not answer yet ({e}); serving anyway",
                conn.url
            );
        }
        slicer_mcp::serve_stdio(c).await?;
        Ok(())
    })
}

pub fn run_info(conn: Conn) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let c = conn.client()?;
        let server: slicer_api::Info = c
            .json(Method::GET, "/info", None)
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
    let resp = c.send(Method::GET, &format!("/vm/{arg}"), None, empty()).await?;
    if resp.status() != http::StatusCode::NOT_FOUND {
        return Ok(arg.to_string());
    }
    let q = query(&[("tag", format!("name={arg}"))]);
    let nodes: Vec<Node> = c.json(Method::GET, &format!("/nodes?{q}"), None).await?;
    match nodes.as_slice() {
        [n] => Ok(n.hostname.clone()),
        [] => bail!("VM {arg:?} not found: no VM has that hostname or name (see `slicer vm list`)"),
        _ => bail!("several VMs are named {arg:?}"),
    }
}

impl VmCmd {
    /// The VM the command acts on, to resolve from a name.
    fn vm_arg(&mut self) -> Option<&mut String> {
        match self {
            VmCmd::Delete { name, .. }
            | VmCmd::Exec { name, .. }
            | VmCmd::Logs { name, .. }
            | VmCmd::Health { name }
            | VmCmd::Tags { name, .. }
            | VmCmd::Ready { name, .. }
            | VmCmd::Shutdown { name, .. }
            | VmCmd::Pause { name }
            | VmCmd::Resume { name }
            | VmCmd::Suspend { name }
            | VmCmd::Restore { name, .. }
            | VmCmd::Relaunch { name }
            | VmCmd::Shell { name, .. }
            | VmCmd::Forward { name, .. } => Some(name),
            VmCmd::Bg { cmd } => Some(cmd.vm_arg()),
            VmCmd::Commit {
                sub: None,
                name: Some(name),
                ..
            } => Some(name),
            VmCmd::ExportDisk { name, .. } => Some(name),
            VmCmd::Top { name: Some(name) } => Some(name),
            _ => None,
        }
    }
}

/// `vm route`: one route per bridge group, via this host's address on its default route.
fn route(config: &Path, os: &str) -> Result<i32> {
    let settings = slicer_daemon::config::File::load(config)?.settings(config.parent().unwrap_or(Path::new(".")))?;
    // connect() on a UDP socket picks the source address of the default route and sends nothing.
    let host = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("198.51.100.1:9").and_then(|()| s.local_addr()))
        .map(|a| a.ip().to_string())
        .context("finding this host's address (no default route?)")?;
    for g in &settings.groups {
        if g.network_mode != slicer_api::NetworkMode::Bridge {
            println!(
                "# {}: {} network, not reachable from other machines",
                g.name, g.network_mode
            );
            continue;
        }
        let (addr, prefix) = g.gateway.split_once('/').unwrap_or((&g.gateway, "24"));
        let (addr, prefix): (std::net::Ipv4Addr, u32) = (addr.parse()?, prefix.parse()?);
        let mask = u32::MAX.checked_shl(32 - prefix.min(32)).unwrap_or(0);
        let net = std::net::Ipv4Addr::from(u32::from(addr) & mask);
        match os {
            "linux" => println!("sudo ip route add {net}/{prefix} via {host}"),
            "darwin" => println!("sudo route -n add -net {net}/{prefix} {host}"),
            other => bail!("--os {other:?}: use linux or darwin"),
        }
    }
    Ok(0)
}

async fn run_async(mut cmd: VmCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    if let Some(name) = cmd.vm_arg() {
        *name = resolve(&c, name).await?;
    }
    let json = conn.json;
    match cmd {
        VmCmd::List { tag, tag_prefix } => list(&c, json, tag, tag_prefix).await?,
        VmCmd::Group => groups(&c, json).await?,
        VmCmd::Add(a) => return add(&c, json, a).await,
        VmCmd::Ready {
            name,
            agent: _,
            userdata,
            timeout,
            interval,
        } => ready(&c, json, &name, userdata, &timeout, &interval).await?,
        VmCmd::Shutdown { name, reboot } => {
            let action = if reboot { "reboot" } else { "shutdown" };
            power(&c, &format!("/vm/{name}/shutdown?action={action}")).await?;
        }
        VmCmd::Pause { name } => power(&c, &format!("/vm/{name}/pause")).await?,
        VmCmd::Resume { name } => power(&c, &format!("/vm/{name}/resume")).await?,
        VmCmd::Suspend { name } => power(&c, &format!("/vm/{name}/suspend")).await?,
        VmCmd::Restore { name, wait, timeout } => {
            let q = query(&[("wait", wait.unwrap_or_default()), ("timeout", timeout)]);
            power(&c, &format!("/vm/{name}/restore?{q}")).await?;
        }
        VmCmd::Commit {
            sub: Some(CommitCmd::List { cache_key, tags }),
            ..
        } => commit_list(&c, json, cache_key, tags).await?,
        VmCmd::Commit {
            sub: Some(CommitCmd::Delete { id }),
            ..
        } => commit_delete(&c, json, &id).await?,
        VmCmd::Commit {
            name,
            cache_key,
            tags,
            live,
            ..
        } => {
            let name = name.context("which VM? slicer vm commit NAME")?;
            commit(&c, json, &name, cache_key, tags, live).await?
        }
        VmCmd::Fork(f) => fork(&c, json, f).await?,
        VmCmd::ExportDisk { name, output } => export_disk(&c, json, &name, &output).await?,
        VmCmd::Relaunch { name } => relaunch(&c, json, &name).await?,
        VmCmd::Bg { cmd } => return crate::guest::bg(&c, cmd, json).await,
        VmCmd::Top { name } => return crate::guest::top(&c, name.as_deref(), json).await,
        VmCmd::Route { config, os } => return route(&config, &os),
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
            return crate::ws::shell(&c, &name, &query(&q), bootstrap.as_deref()).await;
        }
        VmCmd::Forward { name, spec } => {
            let specs = spec
                .iter()
                .map(|s| crate::ws::parse_spec(s))
                .collect::<Result<Vec<_>>>()?;
            return crate::ws::forward(&c, &name, specs).await;
        }
        VmCmd::Delete { name, group } => delete(&c, json, &name, group).await?,
        VmCmd::Exec {
            name,
            run_as,
            shell,
            command,
        } => return exec(&c, &name, run_as, shell, command).await,
        VmCmd::Cp { src, dst, opts } => cp(&c, &src, &dst, opts).await?,
        VmCmd::Logs { name, lines } => logs(&c, json, &name, lines).await?,
        VmCmd::Health { name } => health(&c, json, &name).await?,
        VmCmd::Tags {
            name,
            add,
            remove,
            replace,
        } => tags(&c, json, &name, add, remove, replace).await?,
    }
    Ok(0)
}

/// `vm list`.
async fn list(c: &ApiClient, json: bool, tag: Option<String>, tag_prefix: Option<String>) -> Result<()> {
    let mut q = Vec::new();
    if let Some(t) = tag {
        q.push(("tag", t));
    }
    if let Some(t) = tag_prefix {
        q.push(("tag_prefix", t));
    }
    let nodes: Vec<Node> = c.json(Method::GET, &format!("/nodes?{}", query(&q)), None).await?;
    if json {
        print_json(&nodes)?;
    } else {
        print_nodes(&nodes);
    }
    Ok(())
}

/// `vm group`.
async fn groups(c: &ApiClient, json: bool) -> Result<()> {
    let groups: Vec<HostGroupInfo> = c.json(Method::GET, "/hostgroup", None).await?;
    if json {
        return print_json(&groups);
    }
    println!("{:<20} {:<6} {:<5} RAM", "NAME", "COUNT", "CPUS");
    for g in groups {
        println!(
            "{:<20} {:<6} {:<5} {}",
            g.name,
            g.count,
            g.cpus,
            human_bytes(g.ram_bytes)
        );
    }
    Ok(())
}

/// The host group a create goes to: the one named, else the daemon's only one.
async fn the_group(c: &ApiClient, group: Option<String>) -> Result<String> {
    if let Some(g) = group {
        return Ok(g);
    }
    let groups: Vec<HostGroupInfo> = c.json(Method::GET, "/hostgroup", None).await?;
    match groups.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => bail!("the daemon has no host groups"),
        _ => bail!(
            "the daemon has several host groups ({}): name one, e.g. `slicer vm add {}`",
            groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", "),
            groups[0].name
        ),
    }
}

/// `vm add`'s tags (with --name as a name= tag) and SSH keys (read from files when given so).
fn tags_and_keys(a: &mut AddArgs) -> Result<(Vec<String>, Vec<String>)> {
    let mut tags = std::mem::take(&mut a.tag);
    if let Some(n) = a.name.take() {
        if tags.iter().any(|t| t.starts_with("name=")) {
            bail!("give the name with --name or with --tag name=..., not both");
        }
        tags.push(format!("name={n}"));
    }
    let ssh_keys = a.ssh_keys.iter().map(|k| ssh_key_arg(k)).collect::<Result<Vec<_>>>()?;
    Ok((tags, ssh_keys))
}

/// The body of `vm add`'s create, from the rest of its flags.
fn create_request(a: &mut AddArgs, tags: Vec<String>, ssh_keys: Vec<String>) -> Result<CreateNodeRequest> {
    let userdata = match (a.userdata.take(), a.userdata_file.take()) {
        (Some(u), None) => Some(u),
        (None, Some(f)) => Some(std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give --userdata or --userdata-file, not both"),
    };
    let ram_bytes = match (a.ram_gb, a.ram_mb, a.ram_bytes) {
        (Some(g), None, None) => Some(g << 30),
        (None, Some(m), None) => Some(m << 20),
        (None, None, b) => b,
        _ => bail!("give one of --ram-gb, --ram-mb and --ram-bytes"),
    };
    Ok(CreateNodeRequest {
        cpus: a.cpus,
        ram_bytes,
        tags,
        userdata,
        secrets: a.secrets.take(),
        ssh_keys,
        persistent: Some(a.persistent),
        ..Default::default()
    })
}

/// `vm add`: creates the VM, then with --shell opens a shell in it (its exit code).
async fn add(c: &ApiClient, json: bool, mut a: AddArgs) -> Result<i32> {
    let (tags, ssh_keys) = tags_and_keys(&mut a)?;
    let group = the_group(c, a.group.take()).await?;
    let req = create_request(&mut a, tags, ssh_keys)?;
    let wait = a.wait || a.shell;
    let mut q = vec![];
    if a.wait_userdata {
        q.push(("wait", "userdata".to_string()));
    } else if wait {
        q.push(("wait", "agent".to_string()));
    }
    if wait || a.wait_userdata {
        q.push(("timeout", a.timeout));
    }
    let resp: CreateNodeResponse = c
        .json(
            Method::POST,
            &format!("/hostgroup/{group}/nodes?{}", query(&q)),
            Some(&serde_json::to_value(&req)?),
        )
        .await?;
    if json {
        print_json(&resp)?;
    } else {
        println!("VM created");
        println!("Hostname:   {}", resp.hostname);
        println!("Group:      {}", resp.hostgroup);
        println!("IP:         {}", if resp.ip.is_empty() { "-" } else { &resp.ip });
        println!("Persistent: {}", resp.persistent);
        println!("Created:    {}", resp.created_at);
    }
    if a.shell {
        return crate::ws::shell(c, &resp.hostname, &query(&[("uid", "0".to_string())]), None).await;
    }
    Ok(0)
}

/// `vm ready`: polls the VM's health until its agent (or its userdata) is done.
async fn ready(c: &ApiClient, json: bool, name: &str, userdata: bool, timeout: &str, interval: &str) -> Result<()> {
    let timeout = crate::guest::duration(timeout, "--timeout")?;
    let interval = crate::guest::duration(interval, "--interval")?.max(std::time::Duration::from_millis(10));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(h) = c
            .json::<HealthResponse>(Method::GET, &format!("/vm/{name}/health"), None)
            .await
        {
            if h.agent_uptime > 0 && !userdata {
                break;
            }
            if userdata && h.userdata_ran {
                match h.userdata_exit_code {
                    Some(0) | None => break,
                    Some(code) => {
                        bail!("{name}: userdata exited with code {code} (see /var/log/slicer-userdata.log in the VM)")
                    }
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("{name} was not ready within {timeout:?}");
        }
        tokio::time::sleep(interval).await;
    }
    if json {
        #[derive(serde::Serialize)]
        struct Ready<'a> {
            hostname: &'a str,
            ready: bool,
        }
        print_json(&Ready {
            hostname: name,
            ready: true,
        })?;
    } else {
        println!("{name} is ready");
    }
    Ok(())
}

/// A commit id as a path segment, or an error naming it.
fn commit_id(id: &str) -> Result<&str> {
    if id.is_empty() || id.contains(['/', '\\', '?', '#', '%', '\0']) || id.contains("..") {
        bail!("{id:?} is not a commit id (see `slicer vm commit list`)");
    }
    Ok(id)
}

/// `vm commit list`.
async fn commit_list(c: &ApiClient, json: bool, cache_key: Option<String>, tags: Vec<String>) -> Result<()> {
    let mut q: Vec<(&str, String)> = tags.into_iter().map(|t| ("tag", t)).collect();
    if let Some(k) = cache_key {
        q.push(("cache_key", k));
    }
    let list: Vec<slicer_api::CommitInfo> = c.json(Method::GET, &format!("/vm/commits?{}", query(&q)), None).await?;
    if json {
        return print_json(&list);
    }
    println!(
        "{:<22} {:<20} {:<24} {:<16} TAGS",
        "COMMIT", "SOURCE", "CREATED", "CACHE KEY"
    );
    for i in list {
        println!(
            "{:<22} {:<20} {:<24} {:<16} {}",
            i.commit_id,
            i.source_hostname,
            i.created_at,
            i.cache_key.as_deref().unwrap_or("-"),
            i.tags.join(",")
        );
    }
    Ok(())
}

/// `vm commit delete`.
async fn commit_delete(c: &ApiClient, json: bool, id: &str) -> Result<()> {
    let id = commit_id(id)?;
    let r: slicer_api::CommitDeleted = c.json(Method::DELETE, &format!("/vm/commits/{id}"), None).await?;
    if json {
        print_json(&r)
    } else {
        println!("commit {} deleted", r.commit_id);
        Ok(())
    }
}

/// `vm commit NAME`.
async fn commit(
    c: &ApiClient,
    json: bool,
    name: &str,
    cache_key: Option<String>,
    tags: Vec<String>,
    live: bool,
) -> Result<()> {
    let body = serde_json::to_value(slicer_api::CommitRequest {
        tags,
        labels: Default::default(),
        cache_key,
        live: live.then_some(true),
    })?;
    let r: slicer_api::CommitResponse = c.json(Method::POST, &format!("/vm/{name}/commit"), Some(&body)).await?;
    if json {
        print_json(&r)
    } else {
        println!("commit_id={}", r.commit_id);
        Ok(())
    }
}

/// `vm fork`.
async fn fork(c: &ApiClient, json: bool, f: ForkArgs) -> Result<()> {
    let ForkArgs {
        commit,
        mut tags,
        name,
        wait,
        allow,
        no_allow,
        drop,
        count,
    } = f;
    let commit = commit_id(&commit)?;
    if count.is_some() && name.is_some() {
        bail!("--name names one VM: leave it out with --count");
    }
    if let Some(n) = name {
        tags.push(format!("name={n}"));
    }
    let network = (!allow.is_empty() || no_allow || !drop.is_empty()).then(|| slicer_api::NetworkOverride {
        allow: (!allow.is_empty() || no_allow).then_some(allow),
        drop: (!drop.is_empty()).then_some(drop),
    });
    let body = serde_json::to_value(slicer_api::ForkRequest {
        tags,
        network,
        count,
        ..Default::default()
    })?;
    let wait = if wait { "agent" } else { "none" };
    let path = format!("/vm/commits/{commit}/fork?wait={wait}");
    let forks: Vec<slicer_api::ForkResponse> = match count {
        Some(_) => c.json(Method::POST, &path, Some(&body)).await?,
        None => vec![c.json(Method::POST, &path, Some(&body)).await?],
    };
    for r in &forks {
        if json {
            print_json(r)?;
        } else {
            println!("{}", r.hostname);
        }
    }
    Ok(())
}

/// `vm export-disk` (`slicer disk export`): the disk into a temporary file beside `output`,
/// renamed once complete.
async fn export_disk(c: &ApiClient, json: bool, name: &str, output: &Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let resp = c.call(Method::GET, &format!("/vm/{name}/disk"), None, empty()).await?;
    let tmp = output.with_extension(format!("part{}", std::process::id()));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut body = resp.into_body();
    let mut n = 0u64;
    let written: Result<()> = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                n += data.len() as u64;
                f.write_all(&data).await?;
            }
        }
        f.flush().await?;
        f.sync_all().await?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e.context(format!("exporting the disk of {name}")));
    }
    tokio::fs::rename(&tmp, output)
        .await
        .with_context(|| format!("writing {}", output.display()))?;
    if !json {
        println!("{} ({} MiB, qcow2)", output.display(), n >> 20);
        Ok(())
    } else {
        print_json(&serde_json::json!({"hostname": name, "output": output, "bytes": n, "format": "qcow2"}))
    }
}

/// `vm relaunch`.
async fn relaunch(c: &ApiClient, json: bool, name: &str) -> Result<()> {
    let r: slicer_api::CreateNodeResponse = c.json(Method::POST, &format!("/vm/{name}/relaunch"), None).await?;
    if json {
        return print_json(&r);
    }
    println!(
        "VM {} relaunched ({})",
        r.hostname,
        if r.ip.is_empty() { "-" } else { &r.ip }
    );
    Ok(())
}

/// `vm delete`: in the group given, else the VM's own.
async fn delete(c: &ApiClient, json: bool, name: &str, group: Option<String>) -> Result<()> {
    let group = match group {
        Some(g) => g,
        None => {
            let d: VmDescription = c.json(Method::GET, &format!("/vm/{name}"), None).await?;
            d.node.hostgroup
        }
    };
    let r: DeleteResponse = c
        .json(Method::DELETE, &format!("/hostgroup/{group}/nodes/{name}"), None)
        .await?;
    if !r.error.is_empty() {
        bail!("{}", r.error);
    }
    if json {
        print_json(&r)
    } else {
        println!("{} ({name}, disk removed: {})", r.message, r.disk_removed);
        Ok(())
    }
}

/// `vm logs`.
async fn logs(c: &ApiClient, json: bool, name: &str, lines: usize) -> Result<()> {
    let l: LogsResponse = c
        .json(Method::GET, &format!("/vm/{name}/logs?lines={lines}"), None)
        .await?;
    if json {
        print_json(&l)
    } else {
        // Console text comes from the guest: escaped on a terminal, raw into a pipe.
        println!("{}", crate::term::stdout_text(&l.content));
        Ok(())
    }
}

/// `vm health`.
async fn health(c: &ApiClient, json: bool, name: &str) -> Result<()> {
    let h: HealthResponse = c.json(Method::GET, &format!("/vm/{name}/health"), None).await?;
    if json {
        return print_json(&h);
    }
    println!(
        "{:<20} {:<14} {:<14} {:<14} USERDATA RAN",
        "HOSTNAME", "AGENT UPTIME", "SYSTEM UPTIME", "AGENT VERSION"
    );
    println!(
        "{:<20} {:<14} {:<14} {:<14} {}",
        h.hostname,
        format!("{:.1}s", h.agent_uptime as f64 / 1e9),
        format!("{:.1}s", h.system_uptime as f64 / 1e9),
        crate::term::stdout_text(&h.agent_version),
        h.userdata_ran
    );
    Ok(())
}

/// `vm tags`: shows the tags, or changes them when given --add, --remove or --replace.
async fn tags(
    c: &ApiClient,
    json: bool,
    name: &str,
    add: Vec<String>,
    remove: Vec<String>,
    replace: Vec<String>,
) -> Result<()> {
    let t: TagsResponse = if add.is_empty() && remove.is_empty() && replace.is_empty() {
        c.json(Method::GET, &format!("/vm/{name}/tags"), None).await?
    } else {
        let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
        let body = slicer_api::TagsPatch {
            add: some(add),
            remove: some(remove),
            replace: some(replace),
        };
        c.json(
            Method::PATCH,
            &format!("/vm/{name}/tags"),
            Some(&serde_json::to_value(&body)?),
        )
        .await?
    };
    if json {
        return print_json(&t);
    }
    for tag in t.tags {
        println!("{tag}");
    }
    Ok(())
}

async fn exec(c: &ApiClient, name: &str, run_as: RunAs, shell: Option<String>, command: Vec<String>) -> Result<i32> {
    let stdin = !std::io::stdin().is_terminal();
    let q = run_as
        .apply(ExecQuery {
            cmd: command[0].clone(),
            args: command[1..].to_vec(),
            shell,
            stdin,
            stdio: Some("base64".into()),
            ..Default::default()
        })
        .to_pairs();
    let body: Body = if stdin {
        let (tx, body) = channel_body();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut input = std::io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(Ok(bytes::Bytes::copy_from_slice(&buf[..n]))).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        body
    } else {
        empty()
    };
    let resp = c
        .call(
            Method::POST,
            &format!("/vm/{name}/exec?{}", query(&q)),
            Some("application/octet-stream"),
            body,
        )
        .await?;
    let mut stream = resp.into_body().into_data_stream();
    let mut buf = slicer_api::lines::LineBuf::new();
    let mut code = 0;
    while let Some(chunk) = stream.try_next().await? {
        buf.push(&chunk);
        while let Some(line) = buf.next_line() {
            let f: ExecFrame = serde_json::from_slice(line).context("invalid exec frame")?;
            if !f.error.is_empty() {
                eprintln!("error: {}", crate::term::stderr_text(&f.error));
                return Ok(f.exit_code.unwrap_or(1).max(1));
            }
            let data = f.payload().unwrap_or_default();
            match f.r#type.as_str() {
                "stdout" => std::io::stdout().write_all(&data)?,
                "stderr" => std::io::stderr().write_all(&data)?,
                "exit" => code = f.exit_code.unwrap_or(0),
                _ => {}
            }
        }
    }
    std::io::stdout().flush()?;
    Ok(code)
}

fn channel_body() -> (tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (tx, http_body_util::StreamBody::new(stream.map_ok(hyper_frame)).boxed())
}

fn hyper_frame(b: bytes::Bytes) -> http_body::Frame<bytes::Bytes> {
    http_body::Frame::data(b)
}

/// `NAME:/path` → (NAME, /path); a local path → None.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (name, path) = spec.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && !name.starts_with('.')).then_some((name, path))
}

/// `vm cp`: exactly one side is `NAME:/path` (NAME a hostname or a VM's name).
async fn cp(c: &ApiClient, src: &str, dst: &str, opts: CpOpts) -> Result<()> {
    let resolved = |spec: &str| {
        let c = c.clone();
        let spec = spec.to_string();
        async move {
            match remote(&spec) {
                Some((name, path)) => Ok::<_, anyhow::Error>(format!("{}:{path}", resolve(&c, name).await?)),
                None => Ok(spec),
            }
        }
    };
    let (src, dst) = (resolved(src).await?, resolved(dst).await?);
    let (src, dst) = (src.as_str(), dst.as_str());
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => upload(c, src, name, path, opts).await,
        (Some((name, path)), None) => download(c, name, path, dst, opts).await,
        _ => bail!("give exactly one side as NAME:/path, e.g. `slicer vm cp ./f sandbox-1:/tmp/f`"),
    }
}

/// `vm cp LOCAL NAME:/path`: the file, or the directory as a tar.
async fn upload(c: &ApiClient, src: &str, name: &str, path: &str, opts: CpOpts) -> Result<()> {
    let CpOpts {
        mode,
        recursive,
        uid,
        gid,
        permissions,
        exclude,
    } = opts;
    let local = PathBuf::from(src);
    let meta = std::fs::metadata(&local).with_context(|| format!("{}", local.display()))?;
    let tar = mode.as_deref() == Some("tar") || recursive || meta.is_dir();
    // `dir/.` copies the directory's contents into the destination (as `cp -r dir/.`).
    let contents = tar && (src.ends_with("/.") || src.ends_with('/'));
    let source_name = std::fs::canonicalize(&local)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let base = CopyQuery {
        path: path.to_string(),
        uid: Some(uid),
        gid,
        permissions,
        ..Default::default()
    };
    let ct = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    // SlicerVM's cp-v1 first (the guest places the copy as `cp` would), then the
    // legacy modes for a daemon that answers "invalid mode".
    let v1 = CopyQuery {
        mode: Some(if tar { "cp-v1-tar" } else { "cp-v1-binary" }.into()),
        source_type: Some(if tar { "directory" } else { "file" }.into()),
        source_name: (!source_name.is_empty()).then_some(source_name),
        copy_contents: contents,
        ..base.clone()
    }
    .to_pairs();
    let body = upload_body(local.clone(), tar, exclude.clone());
    match c
        .call(Method::POST, &format!("/vm/{name}/cp?{}", query(&v1)), Some(ct), body)
        .await
    {
        Err(e) if e.to_string().contains("invalid mode: cp-v1") => {
            let legacy = CopyQuery {
                mode: Some(if tar { "tar" } else { "binary" }.into()),
                ..base
            }
            .to_pairs();
            let body = upload_body(local, tar, exclude);
            c.call(
                Method::POST,
                &format!("/vm/{name}/cp?{}", query(&legacy)),
                Some(ct),
                body,
            )
            .await?;
        }
        r => {
            r?;
        }
    }
    Ok(())
}

/// `vm cp NAME:/path LOCAL`: a file, or with --mode tar / -r a directory.
async fn download(c: &ApiClient, name: &str, path: &str, dst: &str, opts: CpOpts) -> Result<()> {
    let tar = opts.mode.as_deref() == Some("tar") || opts.recursive;
    // As `cp`: into an existing local directory, under the source's name.
    let base = path.trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    let placed;
    let dst = if Path::new(dst).is_dir() && !base.is_empty() && base != "~" && base != "." {
        placed = Path::new(dst).join(base).to_string_lossy().into_owned();
        placed.as_str()
    } else {
        dst
    };
    let q = CopyQuery {
        path: path.to_string(),
        mode: Some(if tar { "tar" } else { "binary" }.into()),
        ..Default::default()
    }
    .to_pairs();
    let resp = c
        .call(Method::GET, &format!("/vm/{name}/cp?{}", query(&q)), None, empty())
        .await?;
    let mut stream = resp.into_body().into_data_stream();
    if tar {
        return unpack(stream, path, PathBuf::from(dst), &opts.exclude).await;
    }
    let mut f = std::fs::File::create(dst).with_context(|| format!("creating {dst}"))?;
    while let Some(chunk) = stream.try_next().await? {
        f.write_all(&chunk)?;
    }
    Ok(())
}

/// Unpacks the tar `stream` into `dest` (see [`crate::untar`]: the archive is the guest's),
/// but what `exclude` leaves out; patterns naming paths under the guest's `src` are taken
/// relative to it.
async fn unpack<S, E>(mut stream: S, src: &str, dest: PathBuf, exclude: &[String]) -> Result<()>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::error::Error + Send + Sync + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
    let rules = crate::untar::exclude_rules(src, exclude)?;
    let umask = crate::untar::process_umask();
    let unpack = std::thread::spawn(move || -> Result<()> {
        let r = ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        crate::untar::unpack(r, &dest, &rules, umask)
    });
    while let Some(chunk) = stream.try_next().await? {
        if tx.send(chunk).is_err() {
            break;
        }
    }
    drop(tx);
    unpack.join().map_err(|_| anyhow::anyhow!("unpack thread panicked"))?
}

/// The body of an upload: the file, or the directory as a tar without what `exclude` and its
/// .slicerignore leave out, streamed from a thread.
fn upload_body(local: PathBuf, tar: bool, exclude: Vec<String>) -> Body {
    let (tx, body) = channel_body();
    std::thread::spawn(move || {
        let mut w = ChannelWriter { tx: tx.clone() };
        let res = if tar {
            let mut b = tar::Builder::new(&mut w);
            b.follow_symlinks(false);
            let ignored = ignore_rules(&local, &exclude, true);
            ignored
                .and_then(|gi| append_tree(&mut b, &local, &gi))
                .and_then(|_| b.finish())
        } else {
            std::fs::File::open(&local).and_then(|mut f| std::io::copy(&mut f, &mut w).map(|_| ()))
        };
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    body
}

/// The exclude rules of a copy: `--exclude` patterns, plus `root`'s .slicerignore when asked,
/// both with gitignore's syntax (`**`, a trailing `/` for directories, `!` to re-include).
/// Written by the `ignore` crate (ripgrep's), which implements exactly that syntax.
fn ignore_rules(root: &Path, exclude: &[String], slicerignore: bool) -> std::io::Result<ignore::gitignore::Gitignore> {
    let mut b = ignore::gitignore::GitignoreBuilder::new(root);
    if slicerignore && root.join(".slicerignore").is_file() {
        if let Some(e) = b.add(root.join(".slicerignore")) {
            return Err(std::io::Error::other(format!(".slicerignore: {e}")));
        }
    }
    for p in exclude {
        b.add_line(None, p)
            .map_err(|e| std::io::Error::other(format!("--exclude {p:?}: {e}")))?;
    }
    b.build().map_err(std::io::Error::other)
}

/// Appends the tree under `root` (entries relative to it) minus what `gi` ignores.
fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    root: &Path,
    gi: &ignore::gitignore::Gitignore,
) -> std::io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(&rel))?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let ft = e.file_type()?;
            if gi.matched(&r, ft.is_dir()).is_ignore() {
                continue;
            }
            if ft.is_dir() {
                b.append_dir(&r, e.path())?;
                stack.push(r);
            } else {
                b.append_path_with_name(e.path(), &r)?;
            }
        }
    }
    Ok(())
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))?;
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}
