//! The guest side of the manager: the [`Guest`] capability of a machine (`port`), the
//! manager's guest operations for the API (`ops`), and what the manager does inside a new
//! guest itself (here): CA certificates, SSH keys, the proxy environment and userdata.

use slicer_agent_client::{AgentError, Output};

use super::*;

mod ops;
pub mod port;

pub use ops::ExecStart;

/// Why a step the manager takes inside a new guest (CA certificates, SSH keys, the proxy
/// environment) failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The guest's agent predates CA installation.
    #[error(
        "the image's slicer-agent is older than this daemon and cannot install CAs: rebuild the image (`slicer image build`) or pull it again"
    )]
    OldAgent,
    /// The step's script failed in the guest (its stderr as the guest wrote it).
    #[error("exit {code:?}: {stderr}")]
    Script { code: Option<i32>, stderr: String },
}

/// A setup script's output as success or [`SetupError::Script`].
fn script_result(out: Output) -> Result<(), SetupError> {
    match out.status.code {
        Some(0) => Ok(()),
        code => Err(SetupError::Script {
            code,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
    }
}
pub use port::{Duplex, Guest, GuestInput, GuestStream, Process, Upload};

/// The whole of exec `req` (start to exit, its output buffered) within `deadline`. Past it the
/// exec's stream is dropped, which makes the agent kill the command's process group.
pub(super) async fn exec_within(
    vm: &dyn Machine,
    what: &'static str,
    req: &ExecRequest,
    stdin: Option<bytes::Bytes>,
    deadline: Duration,
) -> Result<Output, AgentError> {
    tokio::time::timeout(deadline, vm.guest().exec_output(req, stdin))
        .await
        .unwrap_or(Err(AgentError::Deadline { what, after: deadline }))
}

/// Installs the host group's CA bundle (`Group::ca_bundle`) in the guest's trust stores. The
/// agent keeps what it has: a guest that has them already (a restart, a fork, a template's
/// guest) changes nothing.
pub(super) async fn install_ca(vm: &dyn Machine, pem: &str) -> Result<(), SetupError> {
    let done = match tokio::time::timeout(GUEST_CALL_DEADLINE, vm.guest().install_ca(pem))
        .await
        .unwrap_or(Err(AgentError::Deadline {
            what: "the CA installation",
            after: GUEST_CALL_DEADLINE,
        })) {
        Ok(done) => done,
        Err(AgentError::Remote { status: 404, kind, .. }) if kind == "not_found" => return Err(SetupError::OldAgent),
        Err(e) => return Err(e.into()),
    };
    if !done.added.is_empty() {
        tracing::debug!("VM {}: CA certificates {:?} installed", vm.name(), done.added);
    }
    Ok(())
}

/// Adds `keys` (checked by `config::check_ssh_keys`) to the default user's
/// ~/.ssh/authorized_keys, keeping the lines already there: a restart re-adds the config's
/// keys without duplicating them, and keys the user added stay. It runs as that user (the
/// agent resolves who that is), so what it makes is theirs.
pub(super) async fn authorize_ssh_keys(vm: &dyn Machine, keys: &[String]) -> Result<(), SetupError> {
    let script = r#"set -e; umask 077; mkdir -p "$HOME/.ssh"; f="$HOME/.ssh/authorized_keys"; touch "$f"
while IFS= read -r k; do grep -qxF -- "$k" "$f" || printf '%s\n' "$k" >> "$f"; done"#;
    let mut input = keys.join("\n");
    input.push('\n');
    let req = ExecRequest {
        uid: Some(slicer_agent_proto::DEFAULT_USER),
        ..ExecRequest::argv(["/bin/sh", "-c", script])
    };
    let out = exec_within(
        vm,
        "the SSH key installation",
        &req,
        Some(input.into()),
        GUEST_CALL_DEADLINE,
    )
    .await?;
    script_result(out)
}

/// Writes a proxy-bound VM's login environment (`KEY=value` lines: the proxy URL with its
/// token) to /etc/slicer/proxy.env, /etc/profile.d/slicer-proxy.sh (login shells) and
/// /etc/environment (PAM sessions: SSH, systemd's logins), replacing earlier proxy lines.
pub(super) async fn write_proxy_env(vm: &dyn Machine, env: &str) -> Result<(), SetupError> {
    let script = r#"set -e; umask 022; mkdir -p /etc/slicer /etc/profile.d
cat > /etc/slicer/proxy.env.new; mv /etc/slicer/proxy.env.new /etc/slicer/proxy.env
{ echo '# Written by slicer: this VM reaches the internet through Slicer Proxy.'
  sed "s/^\([A-Za-z_]*\)=\(.*\)$/export \1='\2'/" /etc/slicer/proxy.env; } > /etc/profile.d/slicer-proxy.sh.new
mv /etc/profile.d/slicer-proxy.sh.new /etc/profile.d/slicer-proxy.sh
touch /etc/environment
{ grep -v -E '^(HTTP_PROXY|HTTPS_PROXY|http_proxy|https_proxy|NO_PROXY|no_proxy)=' /etc/environment || true
  cat /etc/slicer/proxy.env; } > /etc/environment.slicer-new
mv /etc/environment.slicer-new /etc/environment"#;
    let req = ExecRequest::argv(["/bin/sh", "-c", script]);
    let out = exec_within(
        vm,
        "writing the proxy environment",
        &req,
        Some(env.to_string().into()),
        GUEST_CALL_DEADLINE,
    )
    .await?;
    script_result(out)
}

pub(super) const USERDATA_LOG: &str = "/var/log/slicer-userdata.log";

/// Runs userdata as root, once per disk: /etc/slicer/userdata-ran holds its exit code, and a
/// disk that has it (a restarted, committed or forked VM) reports that code without running it
/// again. `TARGET_USER` names the image's default user, as on SlicerVM.
pub(super) async fn run_userdata(vm: &dyn Machine, script: &str) -> i32 {
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
    let target_user = match exec_within(vm, "who the default user is", &whoami, None, GUEST_CALL_DEADLINE).await {
        Ok(out) if out.status.code == Some(0) => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => "root".to_string(),
    };
    let up = Upload {
        tar: false,
        path: path.to_string(),
        placed: None,
        mode: Some(0o700),
        owner: None,
    };
    let upload = vm
        .guest()
        .upload(&up, Box::pin(std::io::Cursor::new(script.as_bytes().to_vec())));
    let uploaded = tokio::time::timeout(GUEST_CALL_DEADLINE, upload)
        .await
        .unwrap_or(Err(AgentError::Deadline {
            what: "the userdata's upload",
            after: GUEST_CALL_DEADLINE,
        }));
    if let Err(e) = uploaded {
        tracing::warn!("uploading userdata to {}: {}", vm.name(), GuestText(&e));
        return -1;
    }
    let run = ExecRequest {
        env: vec![("TARGET_USER".into(), target_user)],
        ..ExecRequest::argv(["/bin/sh", "-c", &cmd])
    };
    match exec_within(vm, "the userdata", &run, None, USERDATA_DEADLINE).await {
        Ok(out) => out.status.shell_code(),
        Err(AgentError::Deadline { after, .. }) => {
            tracing::warn!(
                "userdata in {} ran for {after:?}: killed, recorded as exit code {USERDATA_TIMED_OUT}",
                vm.name()
            );
            USERDATA_TIMED_OUT
        }
        Err(e) => {
            tracing::warn!("running userdata in {}: {}", vm.name(), GuestText(&e));
            -1
        }
    }
}

/// The last lines of the userdata log (at most 4 KiB of it), for an error message.
pub(super) async fn userdata_log_tail(vm: &dyn Machine) -> String {
    let req = ExecRequest::argv(["tail", "-c", "4096", USERDATA_LOG]);
    match exec_within(vm, "the userdata log's tail", &req, None, GUEST_CALL_DEADLINE).await {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().rev().take(20).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("(could not read it: {e})"),
    }
}
