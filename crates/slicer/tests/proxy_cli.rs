//! `slicer proxy ...` as Slicer's docs type it, in the real binary against a real daemon (no
//! VMs): clients, secrets (from a file), allow, rules, revoke in both forms, suggest, and the
//! failure forms with what to do.

mod common;

use common::{fails, ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "full tier: needs root and built images (scripts/test.sh runs it)"]
async fn proxy_admin_session() {
    let dir = tempfile::Builder::new().prefix("slicer-proxy-cli-").tempdir().unwrap();
    let d = dir.path();
    let (_daemon, url) = common::up_box(d).await;
    let url = url.as_str();

    // PROXY_TOKEN=$(slicer proxy client create reviewfn)
    let token = ok(d, url, &["proxy", "client", "create", "reviewfn"]);
    let token = token.trim();
    assert!(
        token.starts_with("spt_") && !token.contains(char::is_whitespace),
        "{token:?}"
    );
    ok(
        d,
        url,
        &["proxy", "client", "create", "ci", "--set-token", "ci-literal-token-123"],
    );
    fails(d, url, &["proxy", "client", "create", "ci"], "exists");
    let list = ok(d, url, &["proxy", "client", "list"]);
    assert!(
        list.contains("reviewfn") && list.contains("ci") && !list.contains(token),
        "{list}"
    );

    // Secrets: from a file (trailing newline dropped), never shown.
    std::fs::write(d.join("key"), "sk-file-secret-value\n\n").unwrap();
    ok(
        d,
        url,
        &[
            "proxy",
            "secret",
            "create",
            "openai",
            "--host",
            "api.openai.com",
            "--value-file",
            "./key",
        ],
    );
    fails(
        d,
        url,
        &[
            "proxy",
            "secret",
            "create",
            "x",
            "--host",
            "h.io",
            "--type",
            "oauth-claude",
            "--value",
            "v",
        ],
        "not supported",
    );
    fails(d, url, &["proxy", "secret", "create", "x", "--host", "h.io"], "--value");
    std::fs::write(d.join("big"), vec![b'a'; 65 << 10]).unwrap();
    fails(
        d,
        url,
        &[
            "proxy",
            "secret",
            "create",
            "x",
            "--host",
            "h.io",
            "--value-file",
            "./big",
        ],
        "at most",
    );
    let secrets = ok(d, url, &["proxy", "secret", "list"]);
    assert!(secrets.contains("openai") && !secrets.contains("sk-file"), "{secrets}");
    let json = ok(d, url, &["proxy", "secret", "list", "--json"]);
    assert!(!json.contains("sk-file"), "{json}");

    // Rules.
    ok(
        d,
        url,
        &[
            "proxy",
            "allow",
            "reviewfn",
            "--host",
            "api.openai.com",
            "--path",
            "/v1/*",
            "--method",
            "POST",
            "--secret",
            "openai",
        ],
    );
    ok(
        d,
        url,
        &["proxy", "allow", "reviewfn", "--host", "*.github.com", "--ttl", "1h"],
    );
    ok(
        d,
        url,
        &[
            "proxy",
            "allow",
            "reviewfn",
            "--host",
            "db.internal",
            "--port",
            "5432",
            "--passthrough",
        ],
    );
    fails(
        d,
        url,
        &["proxy", "allow", "reviewfn", "--host", "*.github.com"],
        "already has this rule",
    );
    fails(
        d,
        url,
        &["proxy", "allow", "nobody", "--host", "a.io"],
        "slicer proxy client create nobody",
    );
    fails(
        d,
        url,
        &["proxy", "allow", "reviewfn", "--host", "a.io", "--ttl", "soon"],
        "--ttl",
    );
    let rules = ok(d, url, &["proxy", "rules", "reviewfn"]);
    let lines: Vec<&str> = rules.lines().collect();
    assert_eq!(lines.len(), 4, "{rules}");
    assert!(lines[1].contains("api.openai.com") && lines[1].contains("/v1/*") && lines[1].contains("openai"));
    assert!(lines[3].contains("db.internal") && lines[3].contains("5432") && lines[3].ends_with("yes"));

    // Revoke: a tuple, then every rule of a host (both spellings).
    fails(
        d,
        url,
        &[
            "proxy",
            "revoke",
            "reviewfn",
            "--host",
            "api.openai.com",
            "--method",
            "GET",
        ],
        "no such rule",
    );
    ok(
        d,
        url,
        &[
            "proxy",
            "client",
            "revoke",
            "reviewfn",
            "--host",
            "api.openai.com",
            "--path",
            "/v1/*",
            "--method",
            "POST",
        ],
    );
    ok(d, url, &["proxy", "revoke", "reviewfn", "--host", "*.github.com"]);
    fails(
        d,
        url,
        &["proxy", "revoke", "reviewfn", "--host", "*.github.com"],
        "no such rule",
    );
    assert_eq!(ok(d, url, &["proxy", "rules", "reviewfn"]).lines().count(), 2);

    // Nothing denied yet: nothing to suggest (said on stderr).
    assert_eq!(ok(d, url, &["proxy", "suggest", "reviewfn"]), "");
    fails(d, url, &["proxy", "suggest", "nobody"], "not found");

    ok(d, url, &["proxy", "secret", "delete", "openai"]);
    fails(d, url, &["proxy", "secret", "delete", "openai"], "not found");
    ok(d, url, &["proxy", "client", "delete", "reviewfn"]);
    fails(d, url, &["proxy", "rules", "reviewfn"], "not found");
    // `proxy up` is a command now (its server may be a placeholder in this build).
    let help = ok(d, url, &["proxy", "up", "--help"]);
    assert!(
        help.contains("--hostgroup") && help.contains("--deny-cidr") && !help.contains("--hosts-file"),
        "{help}"
    );
}
