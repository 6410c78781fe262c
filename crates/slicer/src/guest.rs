//! Client commands for the rest of the guest surface: `vm bg …` (background execs), `vm top`
//! (stats) and `secret …`.

use std::io::Write;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Subcommand;
use slicer_api::{ApiClient, CreateSecretRequest, ExecFrame, ExecKillRequest, FrameType, UpdateSecretRequest};

#[derive(Subcommand)]
pub enum BgCmd {
    /// Start a command in the background; prints `exec_id=<id>` (with --json the answer).
    /// Forms: `-- prog args...` runs prog directly; `-c prog -a arg -a arg` the same;
    /// `-s /bin/bash -- "line"` runs the line through that shell.
    #[command(alias = "start")]
    Exec {
        name: String,
        /// The program (instead of after `--`).
        #[arg(short = 'c', long = "cmd")]
        cmd: Option<String>,
        /// An argument of the program (repeatable).
        #[arg(short = 'a', long = "arg", allow_hyphen_values = true)]
        arg: Vec<String>,
        /// Run the command line through this shell.
        #[arg(short = 's', long)]
        shell: Option<String>,
        /// Output kept in the guest: bytes, or with K/M/G (binary units), e.g. 4M.
        #[arg(long)]
        ring_bytes: Option<String>,
        #[command(flatten)]
        run_as: crate::vm::RunAs,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List a VM's background execs.
    List { name: String },
    /// An exec's state: command, pid, running, exit code, bytes written and dropped.
    Info { name: String, id: String },
    /// Print an exec's output (replayed from the guest's ring).
    Logs {
        name: String,
        id: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long, default_value_t = 0)]
        from_id: u64,
    },
    /// Signal an exec's process group (TERM escalates to KILL after the grace).
    Kill {
        name: String,
        id: String,
        #[arg(long, default_value = "TERM")]
        signal: String,
        /// Time before TERM becomes KILL (Go duration, e.g. 5s).
        #[arg(long, default_value = "5s")]
        grace: String,
    },
    /// Wait for an exec to end; exits with its exit code (124 when it still runs).
    Wait {
        name: String,
        id: String,
        /// Go duration (e.g. 10m) or seconds; at most 10m.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Forget a finished exec.
    #[command(alias = "rm")]
    Remove { name: String, id: String },
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Store a secret (from a file, or from --value): `secret create NAME --value V` or
    /// `secret create --name NAME --value V`.
    Create {
        #[arg(required_unless_present = "name_flag")]
        name: Option<String>,
        #[arg(long = "name", conflicts_with = "name")]
        name_flag: Option<String>,
        #[arg(long, conflicts_with = "value")]
        from_file: Option<std::path::PathBuf>,
        #[arg(long)]
        value: Option<String>,
        #[arg(long, default_value = "0600")]
        permissions: String,
        #[arg(long, default_value_t = 0)]
        uid: u32,
        #[arg(long, default_value_t = 0)]
        gid: u32,
    },
    /// List secrets (values are never shown).
    #[command(alias = "ls")]
    List,
    /// Change a secret's value or ownership.
    Update {
        #[arg(required_unless_present = "name_flag")]
        name: Option<String>,
        #[arg(long = "name", conflicts_with = "name")]
        name_flag: Option<String>,
        #[arg(long, conflicts_with = "value")]
        from_file: Option<std::path::PathBuf>,
        #[arg(long)]
        value: Option<String>,
        #[arg(long)]
        permissions: Option<String>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        gid: Option<u32>,
    },
    /// Delete a secret (from the guests too).
    #[command(alias = "rm", alias = "remove")]
    Delete { name: String },
}

fn value_of(from_file: Option<std::path::PathBuf>, value: Option<String>) -> Result<Option<String>> {
    let raw = match (from_file, value) {
        (Some(f), _) => Some(std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?),
        (None, Some(v)) => Some(v.into_bytes()),
        (None, None) => None,
    };
    Ok(raw.map(|r| base64::engine::general_purpose::STANDARD.encode(r)))
}

pub async fn secret(c: &ApiClient, cmd: SecretCmd, json: bool) -> Result<i32> {
    match cmd {
        SecretCmd::Create {
            name,
            name_flag,
            from_file,
            value,
            permissions,
            uid,
            gid,
        } => {
            let name = name.or(name_flag).unwrap_or_default();
            let Some(data) = value_of(from_file, value)? else {
                bail!("give the value with --from-file PATH or --value TEXT");
            };
            let body = CreateSecretRequest {
                name: name.clone(),
                data,
                permissions: Some(permissions),
                uid: Some(uid),
                gid: Some(gid),
            };
            let v = c.create_secret(&body).await?;
            print_or(json, &v, &format!("secret {name} created"))?;
        }
        SecretCmd::Update {
            name,
            name_flag,
            from_file,
            value,
            permissions,
            uid,
            gid,
        } => {
            let name = name.or(name_flag).unwrap_or_default();
            let body = UpdateSecretRequest {
                data: value_of(from_file, value)?,
                permissions,
                uid,
                gid,
            };
            let v = c.update_secret(&name, &body).await?;
            print_or(json, &v, &format!("secret {name} updated"))?;
        }
        SecretCmd::Delete { name } => {
            let v = c.delete_secret(&name).await?;
            print_or(json, &v, &format!("secret {name} deleted"))?;
        }
        SecretCmd::List => {
            let v = c.list_secrets().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<32} {:>8} {:<6} {:>6} {:>6} MODIFIED",
                    "NAME", "SIZE", "MODE", "UID", "GID"
                );
                for s in v {
                    println!(
                        "{:<32} {:>8} {:<6} {:>6} {:>6} {}",
                        crate::term::stdout_text(&s.name),
                        s.size,
                        s.permissions,
                        s.uid,
                        s.gid,
                        s.modified_at
                    );
                }
            }
        }
    }
    Ok(0)
}

fn print_or<T: serde::Serialize>(json: bool, v: &T, text: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

impl BgCmd {
    /// The VM the command acts on.
    pub fn vm_arg(&mut self) -> &mut String {
        match self {
            BgCmd::Exec { name, .. }
            | BgCmd::List { name }
            | BgCmd::Info { name, .. }
            | BgCmd::Logs { name, .. }
            | BgCmd::Kill { name, .. }
            | BgCmd::Wait { name, .. }
            | BgCmd::Remove { name, .. } => name,
        }
    }
}

pub async fn bg(c: &ApiClient, cmd: BgCmd, json: bool) -> Result<i32> {
    match cmd {
        BgCmd::Exec {
            name,
            cmd,
            arg,
            shell,
            ring_bytes,
            run_as,
            command,
        } => {
            let (program, args) = match (cmd, command.split_first()) {
                (Some(p), None) => (p, arg),
                (None, Some((p, rest))) if arg.is_empty() => (p.clone(), rest.to_vec()),
                (Some(_), Some(_)) => bail!("give the program with -c or after --, not both"),
                (None, Some(_)) => bail!("-a goes with -c: `-c prog -a arg`, or put the arguments after --"),
                (None, None) => bail!("no command: `vm bg exec NAME -- prog args` (or -c prog -a arg)"),
            };
            let q = run_as.apply(slicer_api::query::ExecQuery {
                cmd: program,
                args,
                shell,
                background: true,
                ring_bytes: ring_bytes.as_deref().map(parse_size).transpose()?,
                ..Default::default()
            });
            let v = c.vm_exec_background(&name, &q).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("exec_id={}", v.exec_id);
            }
        }
        BgCmd::Info { name, id } => {
            let v = c.exec_info(&name, &id).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        BgCmd::List { name } => bg_list(c, &name, json).await?,
        BgCmd::Logs {
            name,
            id,
            follow,
            from_id,
        } => return bg_logs(c, &name, &id, follow, from_id, json).await,
        BgCmd::Kill {
            name,
            id,
            signal,
            grace,
        } => bg_kill(c, &name, &id, signal, &grace, json).await?,
        BgCmd::Wait { name, id, timeout } => return bg_wait(c, &name, &id, &timeout, json).await,
        BgCmd::Remove { name, id } => {
            let v = c.reap_exec(&name, &id).await?;
            print_or(json, &v, &format!("{id} reaped"))?;
        }
    }
    Ok(0)
}

/// `vm bg list`.
async fn bg_list(c: &ApiClient, name: &str, json: bool) -> Result<()> {
    let v = c.list_execs(name).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>7} {:<8} {:>5} {:<25} COMMAND",
        "EXEC", "PID", "RUNNING", "EXIT", "STARTED"
    );
    for e in v {
        println!(
            "{:<20} {:>7} {:<8} {:>5} {:<25} {} {}",
            e.exec_id,
            e.pid,
            e.running,
            e.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            e.started_at,
            crate::term::stdout_text(&e.command),
            crate::term::stdout_text(&e.args.join(" "))
        );
    }
    Ok(())
}

/// `vm bg logs`: the exec's output to stdout and stderr (its frames with --json); the exit
/// code when the log reached its end.
async fn bg_logs(c: &ApiClient, name: &str, id: &str, follow: bool, from_id: u64, json: bool) -> Result<i32> {
    let q = [("follow", follow.to_string()), ("from_id", from_id.to_string())];
    let resp = c.exec_logs(name, id, &q).await?;
    let mut body = resp.into_body();
    let mut buf = slicer_api::lines::LineBuf::new();
    let mut code = 0;
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let Ok(data) = frame.context("reading logs")?.into_data() else {
            continue;
        };
        buf.push(&data);
        while let Some(line) = buf.next_line() {
            if json {
                std::io::stdout().write_all(line)?;
                continue;
            }
            if let Some(exit) = print_frame(line)? {
                code = exit;
            }
        }
    }
    Ok(code)
}

/// Writes one log frame's output where it belongs; an exit frame's code.
fn print_frame(line: &[u8]) -> Result<Option<i32>> {
    let Ok(f) = serde_json::from_slice::<ExecFrame>(line) else {
        return Ok(None);
    };
    let data = f.data.as_str();
    match f.r#type {
        Some(FrameType::Stdout) => std::io::stdout().write_all(data.as_bytes())?,
        Some(FrameType::Stderr) => std::io::stderr().write_all(data.as_bytes())?,
        Some(FrameType::Gap) => eprintln!(
            "[{}]",
            crate::term::stderr_text(if f.message.is_empty() {
                "output dropped"
            } else {
                &f.message
            })
        ),
        Some(FrameType::Exit) => return Ok(Some(f.exit_code.unwrap_or(1))),
        _ => {}
    }
    Ok(None)
}

/// `vm bg kill`.
async fn bg_kill(c: &ApiClient, name: &str, id: &str, signal: String, grace: &str, json: bool) -> Result<()> {
    let grace_ms = duration(grace, "--grace")?.as_millis() as u64;
    let body = ExecKillRequest {
        signal: Some(signal),
        grace_ms: Some(grace_ms),
    };
    let v = c.kill_exec(name, id, &body).await?;
    print_or(
        json,
        &v,
        &format!(
            "sent {} to {id}",
            if v.signal_sent.is_empty() {
                "nothing"
            } else {
                &v.signal_sent
            }
        ),
    )
}

/// `vm bg wait`: the exec's exit code, or 124 when it still runs after the timeout.
async fn bg_wait(c: &ApiClient, name: &str, id: &str, timeout: &str, json: bool) -> Result<i32> {
    let timeout = duration(timeout, "--timeout")?.as_secs().clamp(1, 600);
    let v = c.wait_exec(name, id, timeout).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if v.timed_out {
        eprintln!("{id} still runs after {timeout}s");
        return Ok(124);
    }
    Ok(v.exit_code.unwrap_or(1))
}

/// A Go duration (`5s`, `10m`) or a number of seconds.
pub fn duration(s: &str, flag: &str) -> Result<std::time::Duration> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(n));
    }
    slicer_api::parse_go_duration(s)
        .ok_or_else(|| anyhow::anyhow!("{flag}: {s:?} is not a duration such as 30s, 5m or 100ms"))
}

/// A size in bytes, or with a K/M/G suffix (binary units).
fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| anyhow::anyhow!("--ring-bytes: {s:?} is not a size such as 1048576 or 4M"))
}

fn mib(b: u64) -> String {
    format!("{}M", b >> 20)
}

/// `vm top`: one line of guest-measured numbers per VM.
pub async fn top(c: &ApiClient, only: Option<&str>, json: bool) -> Result<i32> {
    let mut v = c.nodes_stats().await?;
    if let Some(h) = only {
        v.retain(|n| n.hostname == h);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<16} {:>4} {:>5} {:>5} {:>5} {:>8} {:>8} {:>6} {:>8} UP",
        "HOST", "IP", "CPU", "L1", "L5", "L15", "MEM_USED", "MEM_FREE", "DISK%", "DISK_FREE"
    );
    for n in v {
        let ip = if n.ip.is_empty() { "-" } else { n.ip.as_str() };
        let Some(s) = &n.snapshot else {
            println!(
                "{:<20} {:<16} -    ({})",
                n.hostname,
                ip,
                crate::term::stdout_text(&n.error)
            );
            continue;
        };
        println!(
            "{:<20} {:<16} {:>4} {:>5.2} {:>5.2} {:>5.2} {:>8} {:>8} {:>5.1}% {:>8} {}",
            n.hostname,
            ip,
            s.total_cpus,
            s.load_avg1,
            s.load_avg5,
            s.load_avg15,
            mib(s.memory_used),
            mib(s.memory_available),
            s.disk_space_used_percent,
            mib(s.disk_space_free),
            crate::term::stdout_text(&s.uptime)
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(duration("10m", "--t").unwrap(), std::time::Duration::from_secs(600));
        assert_eq!(duration("30", "--t").unwrap(), std::time::Duration::from_secs(30));
        assert!(duration("soon", "--t").unwrap_err().to_string().contains("--t"));
    }
}
