//! The typed client: one method of [`ApiClient`] per route of the daemon, taking the route's
//! path parameters, query and body and returning its wire type. Paths come from
//! [`crate::routes`]. Streaming routes (exec, cp, a disk export, background logs, watch) return
//! the response for the caller to read; a WebSocket route (shell, forward) is a path in
//! [`crate::routes`] for the caller's WebSocket client.

use http::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::client::{empty, full, ApiClient, ApiError, Body, Incoming};
use crate::query::{CopyQuery, ExecQuery};
use crate::routes::{self, with_query};
use crate::*;

/// Query pairs (a route's filters and options), percent-encoded by the client.
pub type Pairs<'a> = &'a [(&'a str, String)];

/// A streamed answer: its status was 2xx, its body is for the caller to read.
pub type Streamed = http::Response<Incoming>;

/// `GET /nodes` (and a group's nodes): which VMs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFilter {
    /// A `KEY=VALUE` tag every VM listed has.
    pub tag: Option<String>,
    /// A tag prefix every VM listed has a tag with.
    pub tag_prefix: Option<String>,
}

impl NodeFilter {
    /// The filter as query pairs.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        q.extend(self.tag.clone().map(|t| ("tag", t)));
        q.extend(self.tag_prefix.clone().map(|t| ("tag_prefix", t)));
        q
    }
}

impl ApiClient {
    /// A call with a JSON body (if any) whose answer is JSON.
    pub async fn call_json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| ApiError::Other(e.to_string()))?;
        self.json(method, path_and_query, body.as_ref()).await
    }

    /// A call without a body whose answer is JSON.
    async fn get_json<T: DeserializeOwned>(&self, method: Method, path_and_query: &str) -> Result<T, ApiError> {
        self.json(method, path_and_query, None).await
    }

    /// A call whose (2xx) answer is text; the text.
    pub async fn call_text(&self, method: Method, path_and_query: &str) -> Result<String, ApiError> {
        use http_body_util::BodyExt;
        let resp = self.call(method, path_and_query, None, empty()).await?;
        let raw = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::Other(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Result<serde_json::Value, ApiError> {
        self.get_json(Method::GET, &routes::healthz()).await
    }

    /// `GET /info`.
    pub async fn info(&self) -> Result<Info, ApiError> {
        self.get_json(Method::GET, &routes::info()).await
    }

    /// `GET /metrics` (Prometheus text).
    pub async fn metrics(&self) -> Result<String, ApiError> {
        self.call_text(Method::GET, &routes::metrics()).await
    }

    /// `GET /hostgroup`.
    pub async fn hostgroups(&self) -> Result<Vec<HostGroupInfo>, ApiError> {
        self.get_json(Method::GET, &routes::hostgroups()).await
    }

    /// `GET /hostgroup/{group}/nodes`.
    pub async fn group_nodes(&self, group: &str, filter: &NodeFilter) -> Result<Vec<Node>, ApiError> {
        let path = with_query(routes::group_nodes(group), &filter.to_pairs());
        self.get_json(Method::GET, &path).await
    }

    /// `POST /hostgroup/{group}/nodes`: creates a VM (`query`: `wait`, `timeout`).
    pub async fn create_node(
        &self,
        group: &str,
        req: &CreateNodeRequest,
        query: Pairs<'_>,
    ) -> Result<CreateNodeResponse, ApiError> {
        let path = with_query(routes::group_nodes(group), query);
        self.call_json(Method::POST, &path, Some(req)).await
    }

    /// `DELETE /hostgroup/{group}/nodes/{hostname}`.
    pub async fn delete_node(&self, group: &str, hostname: &str) -> Result<DeleteResponse, ApiError> {
        self.get_json(Method::DELETE, &routes::group_node(group, hostname))
            .await
    }

    /// `GET /nodes`.
    pub async fn list_nodes(&self, filter: &NodeFilter) -> Result<Vec<Node>, ApiError> {
        self.get_json(Method::GET, &with_query(routes::nodes(), &filter.to_pairs()))
            .await
    }

    /// `GET /vm/{hostname}`.
    pub async fn describe_vm(&self, hostname: &str) -> Result<VmDescription, ApiError> {
        self.get_json(Method::GET, &routes::vm(hostname)).await
    }

    /// `GET /vm/{hostname}` whatever its status (to tell "no such VM" from other answers).
    pub async fn describe_vm_raw(&self, hostname: &str) -> Result<Streamed, ApiError> {
        self.send(Method::GET, &routes::vm(hostname), None, empty()).await
    }

    /// `GET /vm/{hostname}/tags`.
    pub async fn vm_tags(&self, hostname: &str) -> Result<TagsResponse, ApiError> {
        self.get_json(Method::GET, &routes::vm_tags(hostname)).await
    }

    /// `PATCH /vm/{hostname}/tags`.
    pub async fn patch_vm_tags(&self, hostname: &str, patch: &TagsPatch) -> Result<TagsResponse, ApiError> {
        self.call_json(Method::PATCH, &routes::vm_tags(hostname), Some(patch))
            .await
    }

    /// `POST /vm/{hostname}/exec`: the exec's answer (NDJSON frames, or a buffered exec's JSON)
    /// to read; `stdin` is the command's input when `q.stdin`.
    pub async fn vm_exec(&self, hostname: &str, q: &ExecQuery, stdin: Body) -> Result<Streamed, ApiError> {
        let path = with_query(routes::vm_exec(hostname), &q.to_pairs());
        self.call(Method::POST, &path, Some("application/octet-stream"), stdin)
            .await
    }

    /// `POST /vm/{hostname}/exec?background=true`: starts a background exec.
    pub async fn vm_exec_background(&self, hostname: &str, q: &ExecQuery) -> Result<ExecStarted, ApiError> {
        let q = ExecQuery {
            background: true,
            ..q.clone()
        };
        let path = with_query(routes::vm_exec(hostname), &q.to_pairs());
        self.get_json(Method::POST, &path).await
    }

    /// `GET /vm/{hostname}/exec`: the background execs.
    pub async fn list_execs(&self, hostname: &str) -> Result<Vec<ExecInfo>, ApiError> {
        self.get_json(Method::GET, &routes::vm_exec(hostname)).await
    }

    /// `GET /vm/{hostname}/exec/{id}`.
    pub async fn exec_info(&self, hostname: &str, id: &str) -> Result<ExecInfo, ApiError> {
        self.get_json(Method::GET, &routes::vm_exec_id(hostname, id)).await
    }

    /// `DELETE /vm/{hostname}/exec/{id}`.
    pub async fn reap_exec(&self, hostname: &str, id: &str) -> Result<ExecReaped, ApiError> {
        self.get_json(Method::DELETE, &routes::vm_exec_id(hostname, id)).await
    }

    /// `GET /vm/{hostname}/exec/{id}/logs` (`query`: `follow`, `from_id`): NDJSON frames to read.
    pub async fn exec_logs(&self, hostname: &str, id: &str, query: Pairs<'_>) -> Result<Streamed, ApiError> {
        let path = with_query(routes::vm_exec_logs(hostname, id), query);
        self.call(Method::GET, &path, None, empty()).await
    }

    /// `POST /vm/{hostname}/exec/{id}/kill`.
    pub async fn kill_exec(&self, hostname: &str, id: &str, req: &ExecKillRequest) -> Result<ExecKilled, ApiError> {
        self.call_json(Method::POST, &routes::vm_exec_kill(hostname, id), Some(req))
            .await
    }

    /// `GET /vm/{hostname}/exec/{id}/wait-exit?timeout=SECS`.
    pub async fn wait_exec(&self, hostname: &str, id: &str, timeout_secs: u64) -> Result<ExecWaitExit, ApiError> {
        let path = with_query(
            routes::vm_exec_wait_exit(hostname, id),
            &[("timeout", timeout_secs.to_string())],
        );
        self.get_json(Method::GET, &path).await
    }

    /// `POST /vm/{hostname}/cp`: uploads `body` (a file, or a tar: `content_type` says which).
    pub async fn cp_upload(
        &self,
        hostname: &str,
        q: &CopyQuery,
        content_type: &str,
        body: Body,
    ) -> Result<Streamed, ApiError> {
        let path = with_query(routes::vm_cp(hostname), &q.to_pairs());
        self.call(Method::POST, &path, Some(content_type), body).await
    }

    /// `GET /vm/{hostname}/cp`: the file or tar stream to read.
    pub async fn cp_download(&self, hostname: &str, q: &CopyQuery) -> Result<Streamed, ApiError> {
        let path = with_query(routes::vm_cp(hostname), &q.to_pairs());
        self.call(Method::GET, &path, None, empty()).await
    }

    /// `GET /vm/{hostname}/logs?lines=N`: the console's last lines.
    pub async fn vm_logs(&self, hostname: &str, lines: usize) -> Result<LogsResponse, ApiError> {
        let path = with_query(routes::vm_logs(hostname), &[("lines", lines.to_string())]);
        self.get_json(Method::GET, &path).await
    }

    /// `GET /vm/{hostname}/health`.
    pub async fn vm_health(&self, hostname: &str) -> Result<HealthResponse, ApiError> {
        self.get_json(Method::GET, &routes::vm_health(hostname)).await
    }

    /// `POST /vm/{hostname}/shutdown` (`reboot`: `?action=reboot`): the daemon's text answer.
    pub async fn shutdown_vm(&self, hostname: &str, reboot: bool) -> Result<String, ApiError> {
        let action = if reboot { "reboot" } else { "shutdown" };
        let path = with_query(routes::vm_shutdown(hostname), &[("action", action.into())]);
        self.call_text(Method::POST, &path).await
    }

    /// `POST /vm/{hostname}/pause`: the daemon's text answer.
    pub async fn pause_vm(&self, hostname: &str) -> Result<String, ApiError> {
        self.call_text(Method::POST, &routes::vm_pause(hostname)).await
    }

    /// `POST /vm/{hostname}/resume`: the daemon's text answer.
    pub async fn resume_vm(&self, hostname: &str) -> Result<String, ApiError> {
        self.call_text(Method::POST, &routes::vm_resume(hostname)).await
    }

    /// `POST /vm/{hostname}/suspend`: the daemon's text answer.
    pub async fn suspend_vm(&self, hostname: &str) -> Result<String, ApiError> {
        self.call_text(Method::POST, &routes::vm_suspend(hostname)).await
    }

    /// `POST /vm/{hostname}/restore` (`query`: `wait`, `timeout`): the daemon's text answer.
    pub async fn restore_vm(&self, hostname: &str, query: Pairs<'_>) -> Result<String, ApiError> {
        self.call_text(Method::POST, &with_query(routes::vm_restore(hostname), query))
            .await
    }

    /// `POST /vm/{hostname}/relaunch`.
    pub async fn relaunch_vm(&self, hostname: &str) -> Result<CreateNodeResponse, ApiError> {
        self.get_json(Method::POST, &routes::vm_relaunch(hostname)).await
    }

    /// `GET /vm/{hostname}/fs/readdir?path=P`.
    pub async fn fs_readdir(&self, hostname: &str, path: &str) -> Result<Vec<FsEntry>, ApiError> {
        let p = with_query(routes::vm_fs_readdir(hostname), &[("path", path.into())]);
        self.get_json(Method::GET, &p).await
    }

    /// `GET /vm/{hostname}/fs/stat?path=P`.
    pub async fn fs_stat(&self, hostname: &str, path: &str) -> Result<FsEntry, ApiError> {
        let p = with_query(routes::vm_fs_stat(hostname), &[("path", path.into())]);
        self.get_json(Method::GET, &p).await
    }

    /// `POST /vm/{hostname}/fs/mkdir`.
    pub async fn fs_mkdir(&self, hostname: &str, req: &MkdirRequest) -> Result<FsEntry, ApiError> {
        self.call_json(Method::POST, &routes::vm_fs_mkdir(hostname), Some(req))
            .await
    }

    /// `DELETE /vm/{hostname}/fs/remove` (`query`: `path`, `recursive`).
    pub async fn fs_remove(&self, hostname: &str, query: Pairs<'_>) -> Result<serde_json::Value, ApiError> {
        self.get_json(Method::DELETE, &with_query(routes::vm_fs_remove(hostname), query))
            .await
    }

    /// `GET /vm/{hostname}/fs/watch` (`query`: what to watch): NDJSON events to read.
    pub async fn fs_watch(&self, hostname: &str, query: Pairs<'_>) -> Result<Streamed, ApiError> {
        let path = with_query(routes::vm_fs_watch(hostname), query);
        self.call(Method::GET, &path, None, empty()).await
    }

    /// `GET /secrets`.
    pub async fn list_secrets(&self) -> Result<Vec<SecretInfo>, ApiError> {
        self.get_json(Method::GET, &routes::secrets()).await
    }

    /// `POST /secrets`.
    pub async fn create_secret(&self, req: &CreateSecretRequest) -> Result<SecretInfo, ApiError> {
        self.call_json(Method::POST, &routes::secrets(), Some(req)).await
    }

    /// `PATCH /secrets/{name}`.
    pub async fn update_secret(&self, name: &str, req: &UpdateSecretRequest) -> Result<SecretInfo, ApiError> {
        self.call_json(Method::PATCH, &routes::secret(name), Some(req)).await
    }

    /// `DELETE /secrets/{name}`.
    pub async fn delete_secret(&self, name: &str) -> Result<SecretDeleted, ApiError> {
        self.get_json(Method::DELETE, &routes::secret(name)).await
    }

    /// `GET /nodes/stats`.
    pub async fn nodes_stats(&self) -> Result<Vec<NodeStats>, ApiError> {
        self.get_json(Method::GET, &routes::nodes_stats()).await
    }

    /// `GET /node/{hostname}/stats` (a list of one).
    pub async fn node_stats(&self, hostname: &str) -> Result<Vec<NodeStats>, ApiError> {
        self.get_json(Method::GET, &routes::node_stats(hostname)).await
    }

    /// `POST /vm/{hostname}/commit`.
    pub async fn commit_vm(&self, hostname: &str, req: &CommitRequest) -> Result<CommitResponse, ApiError> {
        self.call_json(Method::POST, &routes::vm_commit(hostname), Some(req))
            .await
    }

    /// `GET /vm/{hostname}/disk`: the qcow2 stream to read.
    pub async fn export_disk(&self, hostname: &str) -> Result<Streamed, ApiError> {
        self.call(Method::GET, &routes::vm_disk(hostname), None, empty()).await
    }

    /// `GET /vm/commits` (`query`: `tag`s, `cache_key`).
    pub async fn list_commits(&self, query: Pairs<'_>) -> Result<Vec<CommitInfo>, ApiError> {
        self.get_json(Method::GET, &with_query(routes::commits(), query)).await
    }

    /// `DELETE /vm/commits/{id}`.
    pub async fn delete_commit(&self, id: &str) -> Result<CommitDeleted, ApiError> {
        self.get_json(Method::DELETE, &routes::commit(id)).await
    }

    /// `POST /vm/commits/{id}/fork` (`query`: `wait`, `timeout`): the forks (one unless
    /// `req.count` is given, when the daemon answers a list).
    pub async fn fork_commit(
        &self,
        id: &str,
        req: &ForkRequest,
        query: Pairs<'_>,
    ) -> Result<Vec<ForkResponse>, ApiError> {
        let path = with_query(routes::commit_fork(id), query);
        Ok(match req.count {
            Some(_) => self.call_json(Method::POST, &path, Some(req)).await?,
            None => vec![self.call_json(Method::POST, &path, Some(req)).await?],
        })
    }

    /// `GET /proxy/v1/clients`.
    pub async fn list_proxy_clients(&self) -> Result<Vec<ProxyClient>, ApiError> {
        self.get_json(Method::GET, &routes::proxy_clients()).await
    }

    /// `POST /proxy/v1/clients`.
    pub async fn create_proxy_client(&self, req: &CreateProxyClientRequest) -> Result<ProxyClientCreated, ApiError> {
        self.call_json(Method::POST, &routes::proxy_clients(), Some(req)).await
    }

    /// `GET /proxy/v1/clients/{name}`: the client's allow rules.
    pub async fn proxy_client_rules(&self, name: &str) -> Result<Vec<ProxyAllowRule>, ApiError> {
        self.get_json(Method::GET, &routes::proxy_client(name)).await
    }

    /// `DELETE /proxy/v1/clients/{name}`.
    pub async fn delete_proxy_client(&self, name: &str) -> Result<(), ApiError> {
        self.call(Method::DELETE, &routes::proxy_client(name), None, empty())
            .await
            .map(drop)
    }

    /// `GET /proxy/v1/clients/{name}/suggest`: rules that would allow what was refused.
    pub async fn suggest_proxy_allows(&self, name: &str) -> Result<Vec<AddProxyAllowRequest>, ApiError> {
        self.get_json(Method::GET, &routes::proxy_client_suggest(name)).await
    }

    /// `GET /proxy/v1/secrets`.
    pub async fn list_proxy_secrets(&self) -> Result<Vec<ProxySecret>, ApiError> {
        self.get_json(Method::GET, &routes::proxy_secrets()).await
    }

    /// `POST /proxy/v1/secrets`.
    pub async fn create_proxy_secret(&self, req: &CreateProxySecretRequest) -> Result<ProxySecret, ApiError> {
        self.call_json(Method::POST, &routes::proxy_secrets(), Some(req)).await
    }

    /// `DELETE /proxy/v1/secrets/{name}`.
    pub async fn delete_proxy_secret(&self, name: &str) -> Result<(), ApiError> {
        self.call(Method::DELETE, &routes::proxy_secret(name), None, empty())
            .await
            .map(drop)
    }

    /// `POST /proxy/v1/allows`.
    pub async fn add_proxy_allow(&self, req: &AddProxyAllowRequest) -> Result<ProxyAllowRule, ApiError> {
        self.call_json(Method::POST, &routes::proxy_allows(), Some(req)).await
    }

    /// `POST /proxy/v1/allows/revoke`: removes the rule matching the whole tuple.
    pub async fn revoke_proxy_allow(&self, req: &RemoveProxyAllowByTupleRequest) -> Result<(), ApiError> {
        let body = serde_json::to_vec(req).map_err(|e| ApiError::Other(e.to_string()))?;
        self.call(
            Method::POST,
            &routes::proxy_allows_revoke(),
            Some("application/json"),
            full(body),
        )
        .await
        .map(drop)
    }

    /// `DELETE /proxy/v1/allows/{client}/{host}`: removes every rule of `client` for `host`.
    pub async fn remove_proxy_allow(&self, client: &str, host: &str) -> Result<(), ApiError> {
        self.call(Method::DELETE, &routes::proxy_allow(client, host), None, empty())
            .await
            .map(drop)
    }
}
