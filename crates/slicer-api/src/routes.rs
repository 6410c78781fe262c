//! Every route of the daemon's REST API, by name: one function per route builds its path (each
//! path segment escaped by [`seg`], the one place that does it), and [`ROUTES`] lists each
//! (method, path pattern) as the daemon's router spells it. The daemon's tests check that the
//! router and docs/openapi.yaml serve no route this list lacks.
//!
//! A query string goes on with [`with_query`] (pairs, e.g. from [`crate::query`]).

/// Every (method, path pattern) the daemon serves, as its router spells them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("HEAD", "/healthz"),
    ("GET", "/info"),
    ("GET", "/hostgroup"),
    ("GET", "/hostgroup/{group}/nodes"),
    ("POST", "/hostgroup/{group}/nodes"),
    ("DELETE", "/hostgroup/{group}/nodes/{hostname}"),
    ("GET", "/nodes"),
    ("GET", "/devices"),
    ("GET", "/vm/{hostname}"),
    ("GET", "/vm/{hostname}/tags"),
    ("PATCH", "/vm/{hostname}/tags"),
    ("POST", "/vm/{hostname}/exec"),
    ("GET", "/vm/{hostname}/exec"),
    ("GET", "/vm/{hostname}/exec/{id}"),
    ("DELETE", "/vm/{hostname}/exec/{id}"),
    ("GET", "/vm/{hostname}/exec/{id}/logs"),
    ("POST", "/vm/{hostname}/exec/{id}/kill"),
    ("GET", "/vm/{hostname}/exec/{id}/wait-exit"),
    ("POST", "/vm/{hostname}/cp"),
    ("GET", "/vm/{hostname}/cp"),
    ("GET", "/vm/{hostname}/logs"),
    ("GET", "/vm/{hostname}/health"),
    ("HEAD", "/vm/{hostname}/health"),
    ("POST", "/vm/{hostname}/shutdown"),
    ("POST", "/vm/{hostname}/pause"),
    ("POST", "/vm/{hostname}/resume"),
    ("POST", "/vm/{hostname}/relaunch"),
    ("GET", "/vm/{hostname}/fs/readdir"),
    ("GET", "/vm/{hostname}/fs/stat"),
    ("POST", "/vm/{hostname}/fs/mkdir"),
    ("DELETE", "/vm/{hostname}/fs/remove"),
    ("GET", "/vm/{hostname}/fs/watch"),
    ("GET", "/vm/{hostname}/forward"),
    ("GET", "/vm/{hostname}/shell"),
    ("GET", "/metrics"),
    ("GET", "/secrets"),
    ("POST", "/secrets"),
    ("PATCH", "/secrets/{name}"),
    ("DELETE", "/secrets/{name}"),
    ("GET", "/nodes/stats"),
    ("GET", "/node/{hostname}/stats"),
    ("POST", "/vm/{hostname}/commit"),
    ("GET", "/vm/{hostname}/disk"),
    ("GET", "/vm/commits"),
    ("DELETE", "/vm/commits/{id}"),
    ("POST", "/vm/commits/{id}/fork"),
    ("POST", "/vm/{hostname}/suspend"),
    ("POST", "/vm/{hostname}/restore"),
    ("GET", "/proxy/v1/clients"),
    ("POST", "/proxy/v1/clients"),
    ("GET", "/proxy/v1/clients/{name}"),
    ("DELETE", "/proxy/v1/clients/{name}"),
    ("GET", "/proxy/v1/clients/{name}/suggest"),
    ("GET", "/proxy/v1/secrets"),
    ("POST", "/proxy/v1/secrets"),
    ("DELETE", "/proxy/v1/secrets/{name}"),
    ("POST", "/proxy/v1/allows"),
    ("POST", "/proxy/v1/allows/revoke"),
    ("DELETE", "/proxy/v1/allows/{client}/{host}"),
];

/// One path segment, percent-escaped: every byte but `A-Z a-z 0-9 - . _ ~` becomes `%XX`, so
/// a name can never add a segment, a query or a fragment to the path.
pub fn seg(s: &str) -> String {
    use std::fmt::Write;
    // A whole `.` or `..` would be a dot segment, which a proxy or server between us may
    // resolve: its dots are escaped too, so it stays a name.
    if s == "." || s == ".." {
        return s.replace('.', "%2E");
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `path?query` from pairs (percent-encoded); `path` alone when there are none.
pub fn with_query(path: String, pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return path;
    }
    format!("{path}?{}", crate::client::query(pairs))
}

/// `/healthz`.
pub fn healthz() -> String {
    "/healthz".into()
}

/// `/info`.
pub fn info() -> String {
    "/info".into()
}

/// `/metrics`.
pub fn metrics() -> String {
    "/metrics".into()
}

/// `/hostgroup`.
pub fn hostgroups() -> String {
    "/hostgroup".into()
}

/// `/hostgroup/{group}/nodes`.
pub fn group_nodes(group: &str) -> String {
    format!("/hostgroup/{}/nodes", seg(group))
}

/// `/hostgroup/{group}/nodes/{hostname}`.
pub fn group_node(group: &str, hostname: &str) -> String {
    format!("/hostgroup/{}/nodes/{}", seg(group), seg(hostname))
}

/// `/nodes`.
pub fn nodes() -> String {
    "/nodes".into()
}

/// `/devices` (the same list as `/nodes`).
pub fn devices() -> String {
    "/devices".into()
}

/// `/nodes/stats`.
pub fn nodes_stats() -> String {
    "/nodes/stats".into()
}

/// `/node/{hostname}/stats`.
pub fn node_stats(hostname: &str) -> String {
    format!("/node/{}/stats", seg(hostname))
}

/// `/vm/{hostname}`.
pub fn vm(hostname: &str) -> String {
    format!("/vm/{}", seg(hostname))
}

/// `/vm/{hostname}/{what}`: `what` is one of this module's constant tails.
fn vm_sub(hostname: &str, what: &str) -> String {
    format!("/vm/{}/{what}", seg(hostname))
}

/// `/vm/{hostname}/tags`.
pub fn vm_tags(hostname: &str) -> String {
    vm_sub(hostname, "tags")
}

/// `/vm/{hostname}/exec` (POST runs a command; GET lists background execs).
pub fn vm_exec(hostname: &str) -> String {
    vm_sub(hostname, "exec")
}

/// `/vm/{hostname}/exec/{id}`.
pub fn vm_exec_id(hostname: &str, id: &str) -> String {
    format!("/vm/{}/exec/{}", seg(hostname), seg(id))
}

/// `/vm/{hostname}/exec/{id}/logs`.
pub fn vm_exec_logs(hostname: &str, id: &str) -> String {
    format!("{}/logs", vm_exec_id(hostname, id))
}

/// `/vm/{hostname}/exec/{id}/kill`.
pub fn vm_exec_kill(hostname: &str, id: &str) -> String {
    format!("{}/kill", vm_exec_id(hostname, id))
}

/// `/vm/{hostname}/exec/{id}/wait-exit`.
pub fn vm_exec_wait_exit(hostname: &str, id: &str) -> String {
    format!("{}/wait-exit", vm_exec_id(hostname, id))
}

/// `/vm/{hostname}/cp` (POST uploads, GET downloads).
pub fn vm_cp(hostname: &str) -> String {
    vm_sub(hostname, "cp")
}

/// `/vm/{hostname}/logs`.
pub fn vm_logs(hostname: &str) -> String {
    vm_sub(hostname, "logs")
}

/// `/vm/{hostname}/health`.
pub fn vm_health(hostname: &str) -> String {
    vm_sub(hostname, "health")
}

/// `/vm/{hostname}/shutdown`.
pub fn vm_shutdown(hostname: &str) -> String {
    vm_sub(hostname, "shutdown")
}

/// `/vm/{hostname}/pause`.
pub fn vm_pause(hostname: &str) -> String {
    vm_sub(hostname, "pause")
}

/// `/vm/{hostname}/resume`.
pub fn vm_resume(hostname: &str) -> String {
    vm_sub(hostname, "resume")
}

/// `/vm/{hostname}/suspend`.
pub fn vm_suspend(hostname: &str) -> String {
    vm_sub(hostname, "suspend")
}

/// `/vm/{hostname}/restore`.
pub fn vm_restore(hostname: &str) -> String {
    vm_sub(hostname, "restore")
}

/// `/vm/{hostname}/relaunch`.
pub fn vm_relaunch(hostname: &str) -> String {
    vm_sub(hostname, "relaunch")
}

/// `/vm/{hostname}/fs/readdir`.
pub fn vm_fs_readdir(hostname: &str) -> String {
    vm_sub(hostname, "fs/readdir")
}

/// `/vm/{hostname}/fs/stat`.
pub fn vm_fs_stat(hostname: &str) -> String {
    vm_sub(hostname, "fs/stat")
}

/// `/vm/{hostname}/fs/mkdir`.
pub fn vm_fs_mkdir(hostname: &str) -> String {
    vm_sub(hostname, "fs/mkdir")
}

/// `/vm/{hostname}/fs/remove`.
pub fn vm_fs_remove(hostname: &str) -> String {
    vm_sub(hostname, "fs/remove")
}

/// `/vm/{hostname}/fs/watch`.
pub fn vm_fs_watch(hostname: &str) -> String {
    vm_sub(hostname, "fs/watch")
}

/// `/vm/{hostname}/forward` (a WebSocket).
pub fn vm_forward(hostname: &str) -> String {
    vm_sub(hostname, "forward")
}

/// `/vm/{hostname}/shell` (a WebSocket).
pub fn vm_shell(hostname: &str) -> String {
    vm_sub(hostname, "shell")
}

/// `/vm/{hostname}/commit`.
pub fn vm_commit(hostname: &str) -> String {
    vm_sub(hostname, "commit")
}

/// `/vm/{hostname}/disk`.
pub fn vm_disk(hostname: &str) -> String {
    vm_sub(hostname, "disk")
}

/// `/vm/commits`.
pub fn commits() -> String {
    "/vm/commits".into()
}

/// `/vm/commits/{id}`.
pub fn commit(id: &str) -> String {
    format!("/vm/commits/{}", seg(id))
}

/// `/vm/commits/{id}/fork`.
pub fn commit_fork(id: &str) -> String {
    format!("/vm/commits/{}/fork", seg(id))
}

/// `/secrets`.
pub fn secrets() -> String {
    "/secrets".into()
}

/// `/secrets/{name}`.
pub fn secret(name: &str) -> String {
    format!("/secrets/{}", seg(name))
}

/// `/proxy/v1/clients`.
pub fn proxy_clients() -> String {
    "/proxy/v1/clients".into()
}

/// `/proxy/v1/clients/{name}`.
pub fn proxy_client(name: &str) -> String {
    format!("/proxy/v1/clients/{}", seg(name))
}

/// `/proxy/v1/clients/{name}/suggest`.
pub fn proxy_client_suggest(name: &str) -> String {
    format!("/proxy/v1/clients/{}/suggest", seg(name))
}

/// `/proxy/v1/secrets`.
pub fn proxy_secrets() -> String {
    "/proxy/v1/secrets".into()
}

/// `/proxy/v1/secrets/{name}`.
pub fn proxy_secret(name: &str) -> String {
    format!("/proxy/v1/secrets/{}", seg(name))
}

/// `/proxy/v1/allows`.
pub fn proxy_allows() -> String {
    "/proxy/v1/allows".into()
}

/// `/proxy/v1/allows/revoke`.
pub fn proxy_allows_revoke() -> String {
    "/proxy/v1/allows/revoke".into()
}

/// `/proxy/v1/allows/{client}/{host}`.
pub fn proxy_allow(client: &str, host: &str) -> String {
    format!("/proxy/v1/allows/{}/{}", seg(client), seg(host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Each pattern's builder, called with `{name}` for each parameter (braces escaped, then
    /// put back), so the built path must equal the pattern.
    fn built() -> Vec<String> {
        let (h, g, i, n, c, o) = ("{hostname}", "{group}", "{id}", "{name}", "{client}", "{host}");
        vec![
            healthz(),
            info(),
            metrics(),
            hostgroups(),
            group_nodes(g),
            group_node(g, h),
            nodes(),
            devices(),
            nodes_stats(),
            node_stats(h),
            vm(h),
            vm_tags(h),
            vm_exec(h),
            vm_exec_id(h, i),
            vm_exec_logs(h, i),
            vm_exec_kill(h, i),
            vm_exec_wait_exit(h, i),
            vm_cp(h),
            vm_logs(h),
            vm_health(h),
            vm_shutdown(h),
            vm_pause(h),
            vm_resume(h),
            vm_suspend(h),
            vm_restore(h),
            vm_relaunch(h),
            vm_fs_readdir(h),
            vm_fs_stat(h),
            vm_fs_mkdir(h),
            vm_fs_remove(h),
            vm_fs_watch(h),
            vm_forward(h),
            vm_shell(h),
            vm_commit(h),
            vm_disk(h),
            commits(),
            commit(i),
            commit_fork(i),
            secrets(),
            secret(n),
            proxy_clients(),
            proxy_client(n),
            proxy_client_suggest(n),
            proxy_secrets(),
            proxy_secret(n),
            proxy_allows(),
            proxy_allows_revoke(),
            proxy_allow(c, o),
        ]
        .into_iter()
        .map(|p| p.replace("%7B", "{").replace("%7D", "}"))
        .collect()
    }

    #[test]
    fn every_route_has_a_builder_and_every_builder_a_route() {
        let patterns: BTreeSet<&str> = ROUTES.iter().map(|(_, p)| *p).collect();
        let built = built();
        let built: BTreeSet<&str> = built.iter().map(String::as_str).collect();
        assert_eq!(patterns, built);
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(vm("a/b?c#d"), "/vm/a%2Fb%3Fc%23d");
        assert_eq!(vm_exec_id("vm-1", "x y%"), "/vm/vm-1/exec/x%20y%25");
        assert_eq!(
            proxy_allow("c", "api.example.com"),
            "/proxy/v1/allows/c/api.example.com"
        );
        assert_eq!(seg("é"), "%C3%A9");
        assert_eq!(vm(".."), "/vm/%2E%2E");
        assert_eq!(vm_exec_id("vm-1", "."), "/vm/vm-1/exec/%2E");
        assert_eq!(seg("a..b"), "a..b");
        assert_eq!(with_query(nodes(), &[]), "/nodes");
        assert_eq!(
            with_query(nodes(), &[("tag", "name=a b".into())]),
            "/nodes?tag=name%3Da+b"
        );
    }
}
