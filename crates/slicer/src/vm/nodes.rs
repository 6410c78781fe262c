//! VMs: list, create, wait until ready, delete, relaunch, logs, health and tags.

use anyhow::{bail, Context, Result};
use slicer_api::{ApiClient, CreateNodeRequest, NodeFilter, TagsResponse};

use super::{human_bytes, print_json, print_nodes, ssh_key_arg, AddArgs};

/// `vm list`.
pub(super) async fn list(c: &ApiClient, json: bool, filter: NodeFilter) -> Result<()> {
    let nodes = c.list_nodes(&filter).await?;
    if json {
        print_json(&nodes)?;
    } else {
        print_nodes(&nodes);
    }
    Ok(())
}

/// `vm group`.
pub(super) async fn groups(c: &ApiClient, json: bool) -> Result<()> {
    let groups = c.hostgroups().await?;
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
    let groups = c.hostgroups().await?;
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
pub(super) async fn add(c: &ApiClient, json: bool, mut a: AddArgs) -> Result<i32> {
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
    let resp = c.create_node(&group, &req, &q).await?;
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
        return crate::ws::shell(c, &resp.hostname, &[("uid", "0".to_string())], None).await;
    }
    Ok(0)
}

/// `vm ready`: polls the VM's health until its agent (or its userdata) is done.
pub(super) async fn ready(
    c: &ApiClient,
    json: bool,
    name: &str,
    userdata: bool,
    timeout: &str,
    interval: &str,
) -> Result<()> {
    let timeout = crate::guest::duration(timeout, "--timeout")?;
    let interval = crate::guest::duration(interval, "--interval")?.max(std::time::Duration::from_millis(10));
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(h) = c.vm_health(name).await {
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

/// `vm relaunch`.
pub(super) async fn relaunch(c: &ApiClient, json: bool, name: &str) -> Result<()> {
    let r = c.relaunch_vm(name).await?;
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
pub(super) async fn delete(c: &ApiClient, json: bool, name: &str, group: Option<String>) -> Result<()> {
    let group = match group {
        Some(g) => g,
        None => c.describe_vm(name).await?.node.hostgroup,
    };
    let r = c.delete_node(&group, name).await?;
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
pub(super) async fn logs(c: &ApiClient, json: bool, name: &str, lines: usize) -> Result<()> {
    let l = c.vm_logs(name, lines).await?;
    if json {
        print_json(&l)
    } else {
        // Console text comes from the guest: escaped on a terminal, raw into a pipe.
        println!("{}", crate::term::stdout_text(&l.content));
        Ok(())
    }
}

/// `vm health`.
pub(super) async fn health(c: &ApiClient, json: bool, name: &str) -> Result<()> {
    let h = c.vm_health(name).await?;
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
pub(super) async fn tags(
    c: &ApiClient,
    json: bool,
    name: &str,
    add: Vec<String>,
    remove: Vec<String>,
    replace: Vec<String>,
) -> Result<()> {
    let t: TagsResponse = if add.is_empty() && remove.is_empty() && replace.is_empty() {
        c.vm_tags(name).await?
    } else {
        let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
        let body = slicer_api::TagsPatch {
            add: some(add),
            remove: some(remove),
            replace: some(replace),
        };
        c.patch_vm_tags(name, &body).await?
    };
    if json {
        return print_json(&t);
    }
    for tag in t.tags {
        println!("{tag}");
    }
    Ok(())
}
