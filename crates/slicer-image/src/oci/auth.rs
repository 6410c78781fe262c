//! Registry credentials from a docker-style `config.json` (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`): the `auths` map with `auth` (base64 `user:password`) or
//! `username`/`password`, or an `identitytoken`. Credential helpers (`credsStore`,
//! `credHelpers`) run programs and are not supported: such a registry is pulled anonymously and
//! the log says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The default place of the docker config file.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

/// Keys a registry may be listed under.
fn keys(registry: &str) -> Vec<String> {
    let mut k = vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
        format!("https://{registry}/v1/"),
        format!("https://{registry}/v2/"),
    ];
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        k.extend([
            "https://index.docker.io/v1/".into(),
            "docker.io".into(),
            "index.docker.io".into(),
        ]);
    }
    k
}

/// The credentials for `registry` in the config file at `path` (missing file: anonymous).
pub fn lookup(path: Option<&Path>, registry: &str) -> Result<RegistryAuth, String> {
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let raw = match std::fs::read(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    if raw.len() > 1 << 20 {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let cfg: DockerConfig =
        serde_json::from_slice(&raw).map_err(|e| format!("{} is not a docker config file: {e}", path.display()))?;
    let Some(entry) = keys(registry).iter().find_map(|k| cfg.auths.get(k)) else {
        if let Some(store) = &cfg.creds_store {
            tracing::warn!(
                registry,
                store,
                "credential helpers are not supported; pulling anonymously"
            );
        }
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(t) = &entry.identitytoken {
        return Ok(RegistryAuth::Bearer(t.clone()));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    if let Some(a) = &entry.auth {
        let dec = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|_| format!("{}: auths.{registry}.auth is not base64", path.display()))?;
        let s =
            String::from_utf8(dec).map_err(|_| format!("{}: auths.{registry}.auth is not UTF-8", path.display()))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| format!("{}: auths.{registry}.auth is not user:password", path.display()))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auth_and_user_password_forms() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"},
                "https://index.docker.io/v1/":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(lookup(Some(&p), "127.0.0.1:5000").unwrap(), RegistryAuth::Basic(u, pw) if u == "user" && pw == "pass")
        );
        assert!(matches!(lookup(Some(&p), "docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "u"));
        assert!(matches!(lookup(Some(&p), "other:1").unwrap(), RegistryAuth::Anonymous));
        assert!(matches!(
            lookup(Some(&d.path().join("none")), "x").unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::write(&p, "not json").unwrap();
        assert!(lookup(Some(&p), "x").unwrap_err().contains("not a docker config"));
    }
}
