//! The REST API (routes, status codes and JSON shapes of SlicerVM's API).

mod bg;
mod commits;
mod cp;
pub mod error;
mod exec;
mod fs;
mod mcp;
mod proxy;
mod secrets;
mod stats;
pub mod time;
mod watch;
mod wire;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use slicer_api::{
    CreateNodeRequest, HealthResponse, HostGroupInfo, Info, LogsResponse, NetworkInfo, Node, Policy, TagsPatch,
    TagsResponse, VmDescription,
};

use crate::api::error::ApiErr;
use crate::manager::{Manager, Wait};

pub struct AppState {
    pub manager: Arc<Manager>,
    /// Bearer token; `None` when auth is off.
    pub token: Option<String>,
}

pub type Shared = Arc<AppState>;

/// A relay of guest lines (background logs, watch events) that drops this many lines in a row
/// yields to the runtime: lines already read come back without an await, so a guest's flood
/// of dropped lines would otherwise hold a worker thread.
const YIELD_EVERY: u32 = 64;

/// Largest JSON request body; streamed bodies (exec stdin, cp) have no limit.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Longest a route may take to answer (its head: a streamed body is not cut) unless it is in
/// [`UNTIMED`]; past it the answer is 503 `{"error": ...}`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Routes that wait by design before they answer, each with its own bound: create
/// (`wait`/`timeout`), restore (`wait`/`timeout`), exec (a buffered exec runs the command to
/// its end; output is capped), cp (the transfer itself), wait-exit (`timeout`, at most 600 s).
pub const UNTIMED: &[(&str, &str)] = &[
    ("POST", "/hostgroup/{group}/nodes"),
    ("POST", "/vm/{hostname}/restore"),
    ("POST", "/vm/commits/{id}/fork"),
    ("GET", "/vm/{hostname}/disk"),
    ("POST", "/vm/{hostname}/exec"),
    ("POST", "/vm/{hostname}/cp"),
    ("GET", "/vm/{hostname}/cp"),
    ("GET", "/vm/{hostname}/exec/{id}/wait-exit"),
];

/// A router being built and every (method, path) it serves, recorded by the same call that adds
/// the route: [`methods`] reads the list back (docs/openapi.yaml and the tests are checked
/// against it), so the two cannot drift.
struct Routes {
    router: Router<Shared>,
    served: Vec<(Method, &'static str)>,
}

impl Routes {
    fn new() -> Routes {
        Routes {
            router: Router::new(),
            served: Vec::new(),
        }
    }

    /// Serves `method path` with `handler` (a path given again gains the method).
    fn on<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Routes
    where
        H: axum::handler::Handler<T, Shared>,
        T: 'static,
    {
        // Only the constants below reach this: GET, HEAD, POST, PATCH and DELETE.
        let filter = axum::routing::MethodFilter::try_from(method.clone()).expect("a method axum routes");
        self.router = self.router.route(path, axum::routing::on(filter, handler));
        self.served.push((method, path));
        self
    }
    fn get<H: axum::handler::Handler<T, Shared>, T: 'static>(self, path: &'static str, handler: H) -> Routes {
        self.on(Method::GET, path, handler)
    }
    fn head<H: axum::handler::Handler<T, Shared>, T: 'static>(self, path: &'static str, handler: H) -> Routes {
        self.on(Method::HEAD, path, handler)
    }
    fn post<H: axum::handler::Handler<T, Shared>, T: 'static>(self, path: &'static str, handler: H) -> Routes {
        self.on(Method::POST, path, handler)
    }
    fn patch<H: axum::handler::Handler<T, Shared>, T: 'static>(self, path: &'static str, handler: H) -> Routes {
        self.on(Method::PATCH, path, handler)
    }
    fn delete<H: axum::handler::Handler<T, Shared>, T: 'static>(self, path: &'static str, handler: H) -> Routes {
        self.on(Method::DELETE, path, handler)
    }
}

/// Every route, without middleware: (those open to all, those that need the token).
fn routes() -> (Routes, Routes) {
    let public = Routes::new().get("/healthz", healthz).head("/healthz", healthz);
    let authed = Routes::new()
        .get("/info", info)
        .get("/hostgroup", hostgroups)
        .get("/hostgroup/{group}/nodes", group_nodes)
        .post("/hostgroup/{group}/nodes", create)
        .delete("/hostgroup/{group}/nodes/{hostname}", delete)
        .get("/nodes", nodes)
        .get("/devices", nodes)
        .get("/vm/{hostname}", describe)
        .get("/vm/{hostname}/tags", tags)
        .patch("/vm/{hostname}/tags", patch_tags)
        .post("/vm/{hostname}/exec", exec::exec)
        .get("/vm/{hostname}/exec", bg::list)
        .get("/vm/{hostname}/exec/{id}", bg::info)
        .delete("/vm/{hostname}/exec/{id}", bg::reap)
        .get("/vm/{hostname}/exec/{id}/logs", bg::logs)
        .post("/vm/{hostname}/exec/{id}/kill", bg::kill)
        .get("/vm/{hostname}/exec/{id}/wait-exit", bg::wait_exit)
        .post("/vm/{hostname}/cp", cp::upload)
        .get("/vm/{hostname}/cp", cp::download)
        .get("/vm/{hostname}/logs", logs)
        .get("/vm/{hostname}/health", health)
        .head("/vm/{hostname}/health", health_head)
        .post("/vm/{hostname}/shutdown", shutdown)
        .post("/vm/{hostname}/pause", pause)
        .post("/vm/{hostname}/resume", resume)
        .post("/vm/{hostname}/relaunch", relaunch)
        .get("/vm/{hostname}/fs/readdir", fs::readdir)
        .get("/vm/{hostname}/fs/stat", fs::stat)
        .post("/vm/{hostname}/fs/mkdir", fs::mkdir)
        .delete("/vm/{hostname}/fs/remove", fs::remove)
        .get("/vm/{hostname}/fs/watch", watch::watch)
        .get("/vm/{hostname}/forward", ws::forward)
        .get("/vm/{hostname}/shell", ws::shell)
        .get("/metrics", metrics)
        .get("/secrets", secrets::list)
        .post("/secrets", secrets::create)
        .patch("/secrets/{name}", secrets::update)
        .delete("/secrets/{name}", secrets::delete)
        .get("/nodes/stats", stats::all)
        .get("/node/{hostname}/stats", stats::one)
        .post("/vm/{hostname}/commit", commits::commit)
        .get("/vm/{hostname}/disk", commits::export_disk)
        .get("/vm/commits", commits::list)
        .delete("/vm/commits/{id}", commits::delete)
        .post("/vm/commits/{id}/fork", commits::fork)
        .post("/vm/{hostname}/suspend", suspend)
        .post("/vm/{hostname}/restore", restore)
        .get("/proxy/v1/clients", proxy::list_clients)
        .post("/proxy/v1/clients", proxy::create_client)
        .get("/proxy/v1/clients/{name}", proxy::client_rules)
        .delete("/proxy/v1/clients/{name}", proxy::delete_client)
        .get("/proxy/v1/clients/{name}/suggest", proxy::suggest)
        .get("/proxy/v1/secrets", proxy::list_secrets)
        .post("/proxy/v1/secrets", proxy::create_secret)
        .delete("/proxy/v1/secrets/{name}", proxy::delete_secret)
        .post("/proxy/v1/allows", proxy::add_allow)
        .post("/proxy/v1/allows/revoke", proxy::revoke)
        .delete("/proxy/v1/allows/{client}/{host}", proxy::remove_host);
    (public, authed)
}

/// Every (method, path) the router serves, in the order [`router`] adds them.
pub fn methods() -> Vec<(Method, &'static str)> {
    let (public, authed) = routes();
    public.served.into_iter().chain(authed.served).collect()
}

/// The REST API and `/mcp` (whose tools call the REST API in-process).
pub fn router(state: Shared) -> Router {
    mcp::with_mcp(rest_router(state.clone()), state)
}

/// The REST API alone.
pub fn rest_router(state: Shared) -> Router {
    let (public, authed) = routes();
    let authed = authed
        .router
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    public
        .router
        .merge(authed)
        .route_layer(axum::middleware::from_fn_with_state(REQUEST_TIMEOUT, deadline))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), count_request))
        .fallback(|| async { ApiErr::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiErr::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") })
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(catch_panic))
        .with_state(state)
}

/// Every error is `{"error": ...}`: axum's own rejections (a path segment that is not UTF-8,
/// say) answer plain text, which this turns into our shape with the same status and words.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(resp.status().is_client_error() || resp.status().is_server_error()) || is_json {
        return resp;
    }
    let status = resp.status();
    // Rejection texts are short; anything longer is cut rather than buffered.
    let text = match axum::body::to_bytes(resp.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let text = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiErr::new(status, text).into_response()
}

/// A handler that panics answers 500 `{"error": ...}` and is logged; the daemon, its other
/// requests and every VM go on (tokio would otherwise drop the connection without an answer).
/// A bug, never an expected answer: the fuzz test fails on any 500.
async fn catch_panic(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    let route = format!("{} {}", req.method(), req.uri().path());
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(route, panic = %slicer_agent_client::GuestText(&what), "a request handler panicked");
            ApiErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (a bug: see the daemon's log)",
            )
            .into_response()
        }
    }
}

/// Answers 503 when a route not in [`UNTIMED`] takes longer than `limit` to answer. The
/// handler is dropped; the manager's lifecycle operations run detached and finish anyway.
async fn deadline(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    let untimed = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|p| UNTIMED.contains(&(req.method().as_str(), p.as_str())));
    if untimed {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the request did not finish within {limit:?}; try again later"),
        )
        .into_response(),
    }
}

/// Counts and times every request to a known route (by its template, not its path).
async fn count_request(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().as_str().to_string();
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    st.manager
        .count_request(method, route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn metrics(State(st): State<Shared>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.manager.metrics_text(),
    )
        .into_response()
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(expected) = &st.token {
        let given = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::auth::token_matches(expected, given) {
            return ApiErr::new(StatusCode::UNAUTHORIZED, "missing or invalid bearer token").into_response();
        }
    }
    // The connection holds its slot against sockets without the token (crate::serve).
    if let Some(m) = req.extensions().get::<crate::serve::ConnMark>() {
        m.trust();
    }
    next.run(req).await
}

/// A JSON body with our error shape: 400 for malformed JSON, 413 over the size limit.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Default> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiErr;
    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiErr> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BODY)
            .await
            .map_err(|_| {
                ApiErr::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("JSON body: larger than {MAX_JSON_BODY} bytes, or it could not be read"),
                )
            })?;
        if bytes.is_empty() {
            return Ok(JsonBody(T::default()));
        }
        // Every body is an object; serde would also read a struct from an array of its fields.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiErr::bad_request("invalid JSON body: an object {...} is expected"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiErr::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Query pairs in order (keys may repeat, as `args` and `env` do).
pub fn query_pairs(raw: &Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

pub use exec::{BUFFERED_BUDGET, MAX_BUFFERED_JSON};
pub use slicer_api::query::one as query_one;

pub fn query_bool(pairs: &[(String, String)], key: &str) -> Result<bool, ApiErr> {
    slicer_api::query::flag(pairs, key).map_err(ApiErr::bad_request)
}

pub use slicer_api::parse_go_duration;

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn info() -> Json<Info> {
    Json(Info {
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit: option_env!("SLICER_GIT_COMMIT").unwrap_or("unknown").into(),
        platform: "linux".into(),
        arch: "amd64".into(),
    })
}

async fn hostgroups(State(st): State<Shared>) -> Json<Vec<HostGroupInfo>> {
    Json(
        st.manager
            .groups()
            .iter()
            .map(|g| HostGroupInfo {
                name: g.name.clone(),
                count: g.count,
                ram_bytes: g.ram_bytes,
                cpus: g.cpus,
                arch: "x86_64".into(),
                gpu_count: 0,
                image: g.image.clone(),
            })
            .collect(),
    )
}

/// VMs as listed on the wire.
fn nodes_of(vms: Vec<crate::manager::VmInfo>) -> Vec<Node> {
    vms.into_iter().map(Node::from).collect()
}

fn filter_nodes(nodes: Vec<Node>, q: &RawQuery) -> Result<Vec<Node>, ApiErr> {
    let pairs = query_pairs(&q.0);
    let tag = query_one(&pairs, "tag");
    let prefix = query_one(&pairs, "tag_prefix");
    if tag.is_some() && prefix.is_some() {
        return Err(ApiErr::bad_request("give tag or tag_prefix, not both"));
    }
    Ok(nodes
        .into_iter()
        .filter(|n| match (tag, prefix) {
            (Some(t), _) => n.tags.iter().any(|x| x == t),
            (_, Some(p)) => n.tags.iter().any(|x| x.starts_with(p)),
            _ => true,
        })
        .collect())
}

async fn nodes(State(st): State<Shared>, q: RawQuery) -> Result<Json<Vec<Node>>, ApiErr> {
    Ok(Json(filter_nodes(nodes_of(st.manager.list(None)?), &q)?))
}

async fn group_nodes(
    State(st): State<Shared>,
    Path(group): Path<String>,
    q: RawQuery,
) -> Result<Json<Vec<Node>>, ApiErr> {
    st.manager.group(&group)?;
    Ok(Json(filter_nodes(nodes_of(st.manager.list(Some(&group))?), &q)?))
}

async fn create(
    State(st): State<Shared>,
    Path(group): Path<String>,
    q: RawQuery,
    JsonBody(req): JsonBody<CreateNodeRequest>,
) -> Result<(StatusCode, Json<slicer_api::CreateNodeResponse>), ApiErr> {
    let pairs = query_pairs(&q.0);
    let wait = match query_one(&pairs, "wait") {
        None | Some("") => None,
        Some("agent") => Some(Wait::Agent),
        Some("userdata") => Some(Wait::Userdata),
        Some(o) => {
            return Err(ApiErr::bad_request(format!(
                "query wait: {o:?} is not agent or userdata"
            )))
        }
    };
    let timeout = query_timeout(&pairs)?;
    let resp = st.manager.create(&group, req, wait, timeout).await?;
    Ok((StatusCode::CREATED, Json(slicer_api::CreateNodeResponse::from(resp))))
}

async fn delete(
    State(st): State<Shared>,
    Path((group, hostname)): Path<(String, String)>,
) -> Result<Json<slicer_api::DeleteResponse>, ApiErr> {
    st.manager.group(&group)?;
    let rec = st.manager.record(&hostname)?;
    if rec.host_group != group {
        return Err(ApiErr::not_found(format!(
            "VM {hostname:?} not found in host group {group:?}"
        )));
    }
    Ok(Json(st.manager.delete(&hostname, false).await?.into()))
}

async fn describe(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<VmDescription>, ApiErr> {
    let rec = st.manager.record(&hostname)?;
    let g = st.manager.group(&rec.host_group).ok();
    let policy = Policy {
        allow: g.map(|g| g.allow.clone()).unwrap_or_default(),
        drop: g.map(|g| g.drop.clone()).unwrap_or_default(),
    };
    let (allow, drop) = st.manager.effective_policy(&rec);
    let overridden = rec.net_allow.is_some() || rec.net_drop.is_some();
    let lineage = st.manager.lineage(&rec.hostname)?;
    Ok(Json(VmDescription {
        node: st.manager.vm_info(&rec).into(),
        storage: "image".into(),
        storage_size: rec.storage_size.unwrap_or(0),
        image: rec.image.clone(),
        start_mode: st.manager.start_mode(&hostname).map(wire::start_mode),
        commit_id: lineage.0,
        parent_commit_id: lineage.1,
        network: NetworkInfo {
            mode: g.map_or(slicer_api::NetworkMode::None, |g| g.network_mode),
            policy_source: if overridden { "override" } else { "host_group" }.into(),
            host_group: policy,
            r#override: overridden.then(|| slicer_api::NetworkOverride {
                allow: rec.net_allow.clone(),
                drop: rec.net_drop.clone(),
            }),
            effective: Policy { allow, drop },
        },
    }))
}

async fn tags(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<TagsResponse>, ApiErr> {
    let rec = st.manager.record(&hostname)?;
    Ok(Json(TagsResponse {
        hostname,
        tags: rec.tags,
    }))
}

async fn patch_tags(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    JsonBody(p): JsonBody<TagsPatch>,
) -> Result<Json<TagsResponse>, ApiErr> {
    let rec = st.manager.record(&hostname)?;
    let is_name = |t: &String| t.starts_with("name=");
    let tags = match (&p.replace, &p.add, &p.remove) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(ApiErr::bad_request("replace cannot be combined with add or remove"))
        }
        (Some(new), None, None) => {
            if new.iter().any(is_name) {
                return Err(ApiErr::bad_request("the name= tag is immutable: replace cannot set it"));
            }
            let mut t: Vec<String> = rec.tags.iter().filter(|t| is_name(t)).cloned().collect();
            t.extend(new.iter().cloned());
            t
        }
        (None, add, remove) => {
            let mut t = rec.tags.clone();
            if let Some(rm) = remove {
                if rm.iter().any(is_name) {
                    return Err(ApiErr::bad_request("the name= tag is immutable"));
                }
                t.retain(|x| !rm.contains(x));
            }
            for a in add.iter().flatten() {
                if is_name(a) && t.iter().any(is_name) {
                    return Err(ApiErr::bad_request("the name= tag is immutable"));
                }
                if !t.contains(a) {
                    t.push(a.clone());
                }
            }
            t
        }
    };
    if let Some(name) = crate::manager::vm_name(&tags) {
        if crate::manager::vm_name(&rec.tags) != Some(name) {
            st.manager.check_name(name, Some(&hostname))?;
        }
    }
    for t in &tags {
        if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
            return Err(ApiErr::bad_request(format!(
                "invalid tag {t:?}: 1-256 printable characters"
            )));
        }
    }
    st.manager.set_tags(&hostname, &tags)?;
    Ok(Json(TagsResponse { hostname, tags }))
}

async fn logs(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
) -> Result<Json<LogsResponse>, ApiErr> {
    st.manager.record(&hostname)?;
    let pairs = query_pairs(&q.0);
    let lines = match query_one(&pairs, "lines") {
        None => 20,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiErr::bad_request(format!("query lines: {v:?} is not a number >= 0")))?
            as usize,
    };
    // The console log is bounded and rotates (console.log.1 holds the older part): the tail
    // reads from the end of both, at most 2 MiB.
    let path = st.manager.console_log(&hostname);
    let want = if lines == 0 { usize::MAX } else { lines };
    let content = tokio::task::spawn_blocking(move || slicer_hypervisor::console::tail(&path, want))
        .await
        .map_err(ApiErr::internal)?;
    let take = content.lines().count();
    Ok(Json(LogsResponse {
        hostname,
        lines: take,
        content,
    }))
}

async fn health(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Json<HealthResponse>, ApiErr> {
    let rec = st.manager.record(&hostname)?;
    let h = st.manager.guest_health(&hostname).await?;
    Ok(Json(HealthResponse {
        hostname,
        agent_uptime: h.agent_uptime_ns as i64,
        agent_version: h.agent_version,
        system_uptime: h.system_uptime_ns as i64,
        userdata_ran: rec.userdata.is_none() || rec.userdata_ran,
        userdata_exit_code: rec.userdata_exit_code,
        ip: rec.ip.split('/').next().unwrap_or_default().to_string(),
    }))
}

async fn health_head(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<StatusCode, ApiErr> {
    st.manager.guest_health(&hostname).await?;
    Ok(StatusCode::OK)
}

async fn shutdown(State(st): State<Shared>, Path(hostname): Path<String>, q: RawQuery) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let reboot = match query_one(&pairs, "action") {
        None | Some("") | Some("shutdown") => false,
        Some("reboot") => true,
        Some(o) => {
            return Err(ApiErr::bad_request(format!(
                "query action: {o:?} is not shutdown or reboot"
            )))
        }
    };
    st.manager.shutdown(&hostname, reboot).await?;
    let mut h = HeaderMap::new();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        "text/plain".parse().expect("static header"),
    );
    Ok((StatusCode::OK, h, if reboot { "rebooting\n" } else { "shut down\n" }).into_response())
}

fn text(body: &'static str) -> Response {
    (StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn pause(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Response, ApiErr> {
    st.manager.set_paused(&hostname, true).await?;
    Ok(text("paused\n"))
}

async fn resume(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Response, ApiErr> {
    st.manager.set_paused(&hostname, false).await?;
    Ok(text("resumed\n"))
}

async fn suspend(State(st): State<Shared>, Path(hostname): Path<String>) -> Result<Response, ApiErr> {
    st.manager.suspend(&hostname).await?;
    Ok(text("suspended\n"))
}

async fn restore(State(st): State<Shared>, Path(hostname): Path<String>, q: RawQuery) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let wait = match query_one(&pairs, "wait") {
        None | Some("") | Some("none") => false,
        Some("agent") => true,
        Some(o) => return Err(ApiErr::bad_request(format!("query wait: {o:?} is not agent"))),
    };
    let timeout = query_timeout(&pairs)?;
    st.manager.restore(&hostname, wait, timeout).await?;
    Ok(text("restored\n"))
}

async fn relaunch(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
) -> Result<Json<slicer_api::CreateNodeResponse>, ApiErr> {
    Ok(Json(st.manager.relaunch(&hostname).await?.into()))
}

/// The items of a channel as a stream (for streamed response bodies).
pub fn receiver_stream<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The `timeout` query parameter (a Go duration; 5 minutes when absent).
pub(crate) fn query_timeout(pairs: &[(String, String)]) -> Result<Duration, ApiErr> {
    match query_one(pairs, "timeout") {
        None | Some("") => Ok(Duration::from_secs(300)),
        Some(t) => parse_go_duration(t)
            .ok_or_else(|| ApiErr::bad_request(format!("query timeout: {t:?} is not a duration such as 30s or 5m"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    /// Sends a GET and answers (status line, body).
    async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.lines().next().unwrap_or_default().to_string(), body.to_string())
    }

    #[tokio::test]
    async fn slow_routes_answer_503_unless_they_wait_by_design() {
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            "done"
        };
        let app = Router::new()
            .route("/vm/{hostname}/fs/stat", get(slow))
            .route("/vm/{hostname}/exec/{id}/wait-exit", get(slow))
            .route("/quick", get(|| async { "quick" }))
            .route_layer(axum::middleware::from_fn_with_state(
                Duration::from_millis(100),
                deadline,
            ));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(l, app).await });

        let t0 = std::time::Instant::now();
        let (status, body) = http_get(addr, "/vm/a/fs/stat").await;
        assert!(t0.elapsed() < Duration::from_millis(350), "{:?}", t0.elapsed());
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("did not finish within 100ms"),
            "{v}"
        );
        assert_eq!(http_get(addr, "/vm/a/exec/ex_1/wait-exit").await.0, "HTTP/1.1 200 OK");
        assert_eq!(http_get(addr, "/quick").await.0, "HTTP/1.1 200 OK");
        server.abort();
    }

    #[tokio::test]
    async fn json_bodies_stop_at_one_mib() {
        let req = |body: Vec<u8>| Request::builder().body(axum::body::Body::from(body)).unwrap();
        // An object of exactly the limit parses; one byte more is refused.
        let body = |n: usize| {
            let mut b = b"{\"a\":\"".to_vec();
            b.extend(std::iter::repeat_n(b'a', n - 8));
            b.extend_from_slice(b"\"}");
            b
        };
        let JsonBody(v) = JsonBody::<serde_json::Value>::from_request(req(body(MAX_JSON_BODY)), &())
            .await
            .unwrap();
        assert_eq!(v["a"].as_str().map(str::len), Some(MAX_JSON_BODY - 8));
        let Err(e) = JsonBody::<serde_json::Value>::from_request(req(b"[1]".to_vec()), &()).await else {
            panic!("an array was read as a body")
        };
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let Err(e) = JsonBody::<serde_json::Value>::from_request(req(b" \t\n".to_vec()), &()).await else {
            panic!("whitespace was read as a body")
        };
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let JsonBody(v) = JsonBody::<serde_json::Value>::from_request(req(Vec::new()), &())
            .await
            .unwrap();
        assert_eq!(v, serde_json::Value::Null, "an empty body is the default");
        let big = body(MAX_JSON_BODY + 1);
        let Err(e) = JsonBody::<serde_json::Value>::from_request(req(big), &()).await else {
            panic!("a body over 1 MiB was read")
        };
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("larger than 1048576 bytes"), "{}", e.message);
        let Err(e) = JsonBody::<serde_json::Value>::from_request(req(b"{nope".to_vec()), &()).await else {
            panic!("bad JSON was read")
        };
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn untimed_routes_are_routes() {
        let served = methods();
        for (m, p) in UNTIMED {
            assert!(served.iter().any(|(sm, sp)| sm == m && sp == p), "{m} {p}");
        }
    }

    #[test]
    fn no_route_is_added_twice() {
        let served = methods();
        let unique: std::collections::BTreeSet<_> = served.iter().map(|(m, p)| (m.as_str(), *p)).collect();
        assert_eq!(unique.len(), served.len());
    }
}
