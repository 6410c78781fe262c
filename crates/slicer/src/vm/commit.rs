//! Commits, forks and disk exports.

use std::path::Path;

use anyhow::{bail, Context, Result};
use http_body_util::BodyExt;
use slicer_api::ApiClient;

use super::{print_json, CommitCmd, ForkArgs, VmCmd};

/// `vm commit …`: list, delete, or commit a VM.
pub(super) async fn run(c: &ApiClient, json: bool, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Commit {
            sub: Some(CommitCmd::List { cache_key, tags }),
            ..
        } => commit_list(c, json, cache_key, tags).await,
        VmCmd::Commit {
            sub: Some(CommitCmd::Delete { id }),
            ..
        } => commit_delete(c, json, &id).await,
        VmCmd::Commit {
            name,
            cache_key,
            tags,
            live,
            ..
        } => {
            let name = name.context("which VM? slicer vm commit NAME")?;
            commit(c, json, &name, cache_key, tags, live).await
        }
        _ => bail!("not a commit command"),
    }
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
    let list = c.list_commits(&q).await?;
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
    let r = c.delete_commit(id).await?;
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
    let body = slicer_api::CommitRequest {
        tags,
        labels: Default::default(),
        cache_key,
        live: live.then_some(true),
    };
    let r = c.commit_vm(name, &body).await?;
    if json {
        print_json(&r)
    } else {
        println!("commit_id={}", r.commit_id);
        Ok(())
    }
}

/// `vm fork`.
pub(super) async fn fork(c: &ApiClient, json: bool, f: ForkArgs) -> Result<()> {
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
    let body = slicer_api::ForkRequest {
        tags,
        network,
        count,
        ..Default::default()
    };
    let wait = if wait { "agent" } else { "none" };
    let forks = c.fork_commit(commit, &body, &[("wait", wait.into())]).await?;
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
pub(super) async fn export_disk(c: &ApiClient, json: bool, name: &str, output: &Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let resp = c.export_disk(name).await?;
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
