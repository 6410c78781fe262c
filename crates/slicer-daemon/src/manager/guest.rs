//! What the manager does inside a new guest through its agent: SSH keys and userdata.

use super::*;

/// Adds `keys` (checked by `config::check_ssh_keys`) to the default user's
/// ~/.ssh/authorized_keys, keeping the lines already there: a restart re-adds the config's
/// keys without duplicating them, and keys the user added stay. It runs as that user (the
/// agent resolves who that is), so what it makes is theirs.
pub(super) async fn authorize_ssh_keys(vm: &dyn Machine, keys: &[String]) -> anyhow::Result<()> {
    let script = r#"set -e; umask 077; mkdir -p "$HOME/.ssh"; f="$HOME/.ssh/authorized_keys"; touch "$f"
while IFS= read -r k; do grep -qxF -- "$k" "$f" || printf '%s\n' "$k" >> "$f"; done"#;
    let mut input = keys.join("\n");
    input.push('\n');
    let req = ExecRequest {
        uid: Some(slicer_agent_proto::DEFAULT_USER),
        ..ExecRequest::argv(["/bin/sh", "-c", script])
    };
    let out = vm.agent().exec_output(&req, Some(input.into())).await?;
    anyhow::ensure!(
        out.status.code == Some(0),
        "exit {:?}: {}",
        out.status.code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub(super) const USERDATA_LOG: &str = "/var/log/slicer-userdata.log";

/// Runs userdata as root, once per disk: /etc/slicer/userdata-ran holds its exit code, and a
/// disk that has it (a restarted, committed or forked VM) reports that code without running it
/// again. `TARGET_USER` names the image's default user, as on SlicerVM.
pub(super) async fn run_userdata(vm: &dyn Machine, script: &str) -> i32 {
    let agent = vm.agent();
    let path = "/etc/slicer/userdata.sh";
    let guard = "/etc/slicer/userdata-ran";
    let cmd = format!(
        "if [ -e {guard} ]; then read rc < {guard}; case \"$rc\" in ''|*[!0-9]*) rc=0;; esac; exit $rc; fi; \
         {path} > {USERDATA_LOG} 2>&1; rc=$?; echo $rc > {guard}; exit $rc"
    );
    // The default user's name, as the agent resolves it for requests without a uid.
    let whoami = ExecRequest {
        uid: Some(slicer_agent_proto::DEFAULT_USER),
        ..ExecRequest::argv(["id", "-un"])
    };
    let target_user = match agent.exec_output(&whoami, None).await {
        Ok(out) if out.status.code == Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "root".to_string(),
    };
    if let Err(e) = agent
        .upload_file(
            path,
            Some(0o700),
            None,
            std::io::Cursor::new(script.as_bytes().to_vec()),
        )
        .await
    {
        tracing::warn!("uploading userdata to {}: {e}", vm.name());
        return -1;
    }
    let run = ExecRequest {
        env: vec![("TARGET_USER".into(), target_user)],
        ..ExecRequest::argv(["/bin/sh", "-c", &cmd])
    };
    match agent.exec_output(&run, None).await {
        Ok(out) => out.status.shell_code(),
        Err(e) => {
            tracing::warn!("running userdata in {}: {e}", vm.name());
            -1
        }
    }
}

/// The last lines of the userdata log (at most 4 KiB of it), for an error message.
pub(super) async fn userdata_log_tail(vm: &dyn Machine) -> String {
    let req = ExecRequest::argv(["tail", "-c", "4096", USERDATA_LOG]);
    match vm.agent().exec_output(&req, None).await {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().rev().take(20).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("(could not read it: {e})"),
    }
}
