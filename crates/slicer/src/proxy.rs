//! `slicer proxy ...`: `up` runs the proxy of a host group (its own process); the rest talks to
//! the daemon's `/proxy/v1` admin API.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use slicer_api::{
    AddProxyAllowRequest, ApiClient, CreateProxyClientRequest, CreateProxySecretRequest, RemoveProxyAllowByTupleRequest,
};

use crate::vm::Conn;

/// Largest secret value (the daemon's bound too).
pub const MAX_VALUE: u64 = 64 << 10;

#[derive(Subcommand)]
pub enum ProxyCmd {
    /// Run the proxy of a host group (HTTP on ADDR:3128, HTTPS on ADDR:3129) until stopped.
    Up(UpArgs),
    /// Proxy clients (identified by the token in their proxy URL).
    Client {
        #[command(subcommand)]
        cmd: ClientCmd,
    },
    /// Upstream credentials the proxy injects.
    Secret {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// Allow a client to reach a host (rules are tried in order; no match is a deny).
    Allow(AllowArgs),
    /// Remove a client's rules for a host (all of them, or the one matching --path/--method/...).
    Revoke(RevokeArgs),
    /// A client's rules.
    Rules { client: String },
    /// Rules that would allow what the client was denied, as `slicer proxy allow` lines.
    Suggest { client: String },
}

#[derive(Args)]
pub struct UpArgs {
    #[arg(long)]
    hostgroup: String,
    /// The address guests reach the proxy at (an IP; a CIDR sets the adapter's prefix).
    #[arg(long)]
    bind: String,
    /// A range the proxy never connects to (repeatable), e.g. your LAN and 127.0.0.1/32.
    #[arg(long = "deny-cidr")]
    deny_cidr: Vec<String>,
    /// strict: deny unknown CONNECTs at once; audit: log the first request, then deny.
    #[arg(long, default_value = "strict", value_parser = ["strict", "audit"])]
    mode: String,
    /// The daemon's data directory (default SLICER_DATA_DIR or /var/lib/slicer).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Extra CA (PEM) the proxy trusts for upstreams.
    #[arg(long)]
    upstream_ca: Option<PathBuf>,
    /// Test only: resolve host names from this file (`IP name...` lines) instead of DNS.
    #[arg(long, hide = true)]
    hosts_file: Option<PathBuf>,
    /// Client connections held at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
}

#[derive(Subcommand)]
pub enum ClientCmd {
    /// Create a client and print its token (shown only now): `PROXY_TOKEN=$(slicer proxy client create NAME)`.
    Create {
        name: String,
        /// Register this token instead of minting one (at least 16 characters; the SDK's
        /// `setToken`). `--token` stays the API's token, as in every command.
        #[arg(long = "set-token", value_name = "TOKEN")]
        set_token: Option<String>,
    },
    #[command(alias = "ls")]
    List,
    /// Delete a client, its tokens and its rules.
    #[command(alias = "rm")]
    Delete { name: String },
    /// Remove a client's rules for a host.
    Revoke(RevokeArgs),
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Store an upstream credential for a host.
    Create {
        name: String,
        #[arg(long)]
        host: String,
        /// bearer (Authorization: Bearer VALUE) or basic (VALUE is user:password).
        #[arg(long = "type", default_value = "bearer")]
        kind: String,
        #[arg(long, conflicts_with = "value_file")]
        value: Option<String>,
        /// Read the value from this file (trailing whitespace dropped).
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Replace a secret of the same name.
        #[arg(long)]
        force: bool,
    },
    #[command(alias = "ls")]
    List,
    #[command(alias = "rm")]
    Delete { name: String },
}

#[derive(Args)]
pub struct AllowArgs {
    client: String,
    /// Exact host, *.suffix or *.
    #[arg(long)]
    host: String,
    /// Exact path, * or prefix/* (repeatable; none: any path).
    #[arg(long = "path")]
    paths: Vec<String>,
    /// HTTP method (repeatable; none: any).
    #[arg(long = "method")]
    methods: Vec<String>,
    /// Port (repeatable; none: 80 and 443).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// How long the rule lasts: 3600, 90s, 15m, 1h, 2d.
    #[arg(long)]
    ttl: Option<String>,
    /// Inject this secret on matching requests.
    #[arg(long)]
    secret: Option<String>,
    /// Splice TCP without terminating TLS (no secret, methods or paths).
    #[arg(long)]
    passthrough: bool,
}

#[derive(Args)]
pub struct RevokeArgs {
    client: String,
    #[arg(long)]
    host: String,
    /// With any of these, only the rule with exactly these paths/methods/ports/passthrough goes.
    #[arg(long = "path")]
    paths: Vec<String>,
    #[arg(long = "method")]
    methods: Vec<String>,
    #[arg(long = "port")]
    ports: Vec<u16>,
    #[arg(long)]
    passthrough: bool,
    #[arg(long)]
    secret: Option<String>,
}

/// `--ttl`: seconds, or a number with s, m, h or d.
pub fn parse_ttl(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("--ttl {s:?}: give seconds or a number with s, m, h or d (e.g. 3600, 15m, 1h)"))?;
    n.checked_mul(mult).context("--ttl: too long")
}

/// A value quoted for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b','))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `slicer proxy allow` line of a rule request.
pub fn allow_line(r: &AddProxyAllowRequest) -> String {
    let mut l = format!(
        "slicer proxy allow {} --host {}",
        shell_quote(&r.client),
        shell_quote(&r.host)
    );
    for p in &r.paths {
        l.push_str(&format!(" --path {}", shell_quote(p)));
    }
    for m in &r.methods {
        l.push_str(&format!(" --method {}", shell_quote(m)));
    }
    for p in &r.ports {
        l.push_str(&format!(" --port {p}"));
    }
    if !r.secret.is_empty() {
        l.push_str(&format!(" --secret {}", shell_quote(&r.secret)));
    }
    if r.ttl_seconds > 0 {
        l.push_str(&format!(" --ttl {}", r.ttl_seconds));
    }
    if r.passthrough {
        l.push_str(" --passthrough");
    }
    l
}

/// Reads `--value-file` once: at most 64 KiB, trailing whitespace and newlines dropped.
fn read_value_file(p: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(p).with_context(|| format!("--value-file {}", p.display()))?;
    let mut buf = Vec::new();
    f.take(MAX_VALUE + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", p.display()))?;
    if buf.len() as u64 > MAX_VALUE {
        bail!("--value-file {}: a secret is at most {MAX_VALUE} bytes", p.display());
    }
    let text = String::from_utf8(buf).with_context(|| format!("--value-file {}: not UTF-8 text", p.display()))?;
    let v = text.trim_end().to_string();
    if v.is_empty() {
        bail!("--value-file {} is empty", p.display());
    }
    Ok(v)
}

pub fn run(cmd: ProxyCmd, conn: Conn) -> Result<()> {
    // `up` sets up as root and drops before any thread exists: no runtime of ours around it.
    if let ProxyCmd::Up(a) = cmd {
        return up(a);
    }
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async {
        let c = conn.client()?;
        admin(&c, cmd, conn.json()).await
    })
}

fn up(a: UpArgs) -> Result<()> {
    let mode = match a.mode.as_str() {
        "audit" => slicer_proxy::control::Mode::Audit,
        "strict" => slicer_proxy::control::Mode::Strict,
        other => bail!(
            "--mode {other:?}: use strict (deny unknown CONNECTs at once) or audit (log the first request, then deny)"
        ),
    };
    let opts = slicer_proxy::server::UpOptions {
        group: a.hostgroup,
        bind: a.bind,
        deny_cidrs: a.deny_cidr,
        mode,
        data_dir: crate::data_dir(a.data_dir),
        base_dir: std::env::current_dir().context("the current directory")?,
        hosts_file: a.hosts_file,
        upstream_ca: a.upstream_ca,
        max_connections: a.max_connections,
    };
    slicer_proxy::server::run(opts)?;
    Ok(())
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn revoke_request(r: RevokeArgs) -> (bool, RemoveProxyAllowByTupleRequest) {
    let tuple =
        !r.paths.is_empty() || !r.methods.is_empty() || !r.ports.is_empty() || r.passthrough || r.secret.is_some();
    (
        tuple,
        RemoveProxyAllowByTupleRequest {
            client: r.client,
            host: r.host,
            secret: r.secret.unwrap_or_default(),
            methods: r.methods,
            paths: r.paths,
            ports: r.ports,
            passthrough: r.passthrough,
        },
    )
}

async fn revoke(c: &ApiClient, r: RevokeArgs) -> Result<()> {
    let (tuple, req) = revoke_request(r);
    if tuple {
        c.revoke_proxy_allow(&req).await?;
    } else {
        c.remove_proxy_allow(&req.client, &req.host).await?;
    }
    eprintln!("revoked: {} {}", req.client, req.host);
    Ok(())
}

/// `slicer proxy …` but `up`: calls to the daemon's proxy API.
async fn admin(c: &ApiClient, cmd: ProxyCmd, json: bool) -> Result<()> {
    match cmd {
        ProxyCmd::Up(_) => unreachable!("handled by run"),
        ProxyCmd::Client { cmd } => client_cmd(c, cmd, json).await?,
        ProxyCmd::Revoke(r) => revoke(c, r).await?,
        ProxyCmd::Secret { cmd } => secret_cmd(c, cmd, json).await?,
        ProxyCmd::Allow(a) => allow(c, a, json).await?,
        ProxyCmd::Rules { client } => rules(c, &client, json).await?,
        ProxyCmd::Suggest { client } => {
            let rules = c.suggest_proxy_allows(&client).await?;
            if json {
                return print_json(&rules);
            }
            if rules.is_empty() {
                eprintln!("nothing to suggest: no denial of {client} that its rules still deny");
            }
            for r in &rules {
                println!("{}", allow_line(r));
            }
        }
    }
    Ok(())
}

/// `slicer proxy client …`.
async fn client_cmd(c: &ApiClient, cmd: ClientCmd, json: bool) -> Result<()> {
    match cmd {
        ClientCmd::Create { name, set_token } => {
            let out = c
                .create_proxy_client(&CreateProxyClientRequest { name, token: set_token })
                .await?;
            if json {
                print_json(&out)?;
            } else {
                println!("{}", out.token);
            }
        }
        ClientCmd::List => {
            let list = c.list_proxy_clients().await?;
            if json {
                return print_json(&list);
            }
            println!("{:<32} CREATED", "NAME");
            for cl in list {
                println!("{:<32} {}", cl.name, cl.created_at);
            }
        }
        ClientCmd::Delete { name } => {
            c.delete_proxy_client(&name).await?;
            eprintln!("deleted proxy client {name}");
        }
        ClientCmd::Revoke(r) => revoke(c, r).await?,
    }
    Ok(())
}

/// `slicer proxy secret …`.
async fn secret_cmd(c: &ApiClient, cmd: SecretCmd, json: bool) -> Result<()> {
    match cmd {
        SecretCmd::Create {
            name,
            host,
            kind,
            value,
            value_file,
            force,
        } => {
            let (value, source_file) = match (value, value_file) {
                (Some(v), None) => (v, String::new()),
                (None, Some(f)) => (read_value_file(&f)?, f.display().to_string()),
                _ => bail!("give the secret's value with --value V or --value-file FILE"),
            };
            let req = CreateProxySecretRequest {
                name,
                host,
                kind,
                value,
                source_file,
                force,
            };
            let out = c.create_proxy_secret(&req).await?;
            if json {
                print_json(&out)?;
            } else {
                eprintln!("stored proxy secret {} for {} ({})", out.name, out.host, out.kind);
            }
        }
        SecretCmd::List => {
            let list = c.list_proxy_secrets().await?;
            if json {
                return print_json(&list);
            }
            println!("{:<24} {:<32} {:<7} UPDATED", "NAME", "HOST", "TYPE");
            for s in list {
                println!(
                    "{:<24} {:<32} {:<7} {}",
                    s.name,
                    s.host,
                    s.kind,
                    s.updated_at.unwrap_or(s.created_at)
                );
            }
        }
        SecretCmd::Delete { name } => {
            c.delete_proxy_secret(&name).await?;
            eprintln!("deleted proxy secret {name}");
        }
    }
    Ok(())
}

/// `slicer proxy allow`.
async fn allow(c: &ApiClient, a: AllowArgs, json: bool) -> Result<()> {
    let req = AddProxyAllowRequest {
        client: a.client,
        host: a.host,
        secret: a.secret.unwrap_or_default(),
        methods: a.methods,
        paths: a.paths,
        ports: a.ports,
        ttl_seconds: a.ttl.as_deref().map(parse_ttl).transpose()?.unwrap_or(0),
        passthrough: a.passthrough,
    };
    let out = c.add_proxy_allow(&req).await?;
    if json {
        print_json(&out)
    } else {
        eprintln!(
            "allowed {} to {}{}",
            req.client,
            out.host,
            out.expires.map(|e| format!(" until {e}")).unwrap_or_default()
        );
        Ok(())
    }
}

/// `slicer proxy rules CLIENT`: the client's allow rules, one a line.
async fn rules(c: &ApiClient, client: &str, json: bool) -> Result<()> {
    let rules = c.proxy_client_rules(client).await?;
    if json {
        return print_json(&rules);
    }
    let or_any = |v: Vec<String>| if v.is_empty() { "*".to_string() } else { v.join(",") };
    println!(
        "{:<3} {:<32} {:<12} {:<24} {:<10} {:<12} {:<20} PASSTHROUGH",
        "#", "HOST", "METHODS", "PATHS", "PORTS", "SECRET", "EXPIRES"
    );
    for (i, r) in rules.into_iter().enumerate() {
        let ports = if r.ports.is_empty() {
            "80,443".to_string()
        } else {
            r.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
        };
        println!(
            "{:<3} {:<32} {:<12} {:<24} {:<10} {:<12} {:<20} {}",
            i + 1,
            r.host,
            or_any(r.methods),
            or_any(r.paths),
            ports,
            if r.secret.is_empty() { "-" } else { &r.secret },
            r.expires.as_deref().unwrap_or("never"),
            if r.passthrough { "yes" } else { "no" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_and_quoting() {
        assert_eq!(parse_ttl("3600").unwrap(), 3600);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("15m").unwrap(), 900);
        assert_eq!(parse_ttl("2d").unwrap(), 172800);
        assert!(parse_ttl("soon").is_err() && parse_ttl("0").is_err() && parse_ttl("").is_err());
        assert_eq!(shell_quote("api.example.com"), "api.example.com");
        assert_eq!(shell_quote("*.example.com"), "'*.example.com'");
        assert_eq!(shell_quote("/a b'c"), r"'/a b'\''c'");
        let line = allow_line(&AddProxyAllowRequest {
            client: "c".into(),
            host: "h.io".into(),
            paths: vec!["/v1/*".into()],
            methods: vec!["GET".into()],
            ports: vec![8443],
            ..Default::default()
        });
        assert_eq!(
            line,
            "slicer proxy allow c --host h.io --path '/v1/*' --method GET --port 8443"
        );
    }
}
