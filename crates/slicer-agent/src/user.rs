//! Who a command or a file belongs to: accounts read from /etc/passwd and /etc/group directly
//! (the agent is static and avoids NSS), the image's default user, `~` in paths.

use slicer_agent_proto::DEFAULT_USER;

use crate::server::ApiError;

/// Default users in order of preference: Slicer's images have `ubuntu`, older ones `slicer`.
const DEFAULT_NAMES: &[&str] = &["ubuntu", "slicer"];
/// `PATH` after a login, as Debian's /etc/profile sets it.
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games";
/// Supplementary groups beyond this are ignored (the kernel's NGROUPS_MAX is 65536).
const MAX_GROUPS: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub name: Option<String>,
    pub home: String,
    pub shell: String,
    /// Supplementary groups (from /etc/group), the primary one included.
    pub groups: Vec<u32>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7)
}

fn from_passwd(f: &[&str]) -> Option<Account> {
    Some(Account {
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        name: Some(f[0].to_string()),
        home: if f[5].is_empty() { "/".into() } else { f[5].to_string() },
        shell: f[6].to_string(),
        groups: Vec::new(),
    })
}

fn groups_of(group_text: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut out = vec![primary];
    for l in group_text.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
            if let Ok(g) = f[2].parse() {
                if !out.contains(&g) && out.len() < MAX_GROUPS {
                    out.push(g);
                }
            }
        }
    }
    out
}

/// Resolves an account from the two files' texts (split out for tests).
fn resolve_in(passwd: &str, group: &str, uid: Option<u32>, gid: Option<u32>) -> Account {
    let entry = match uid {
        Some(DEFAULT_USER) => DEFAULT_NAMES.iter().find_map(|n| {
            passwd_entries(passwd)
                .find(|f| f[0] == *n)
                .and_then(|f| from_passwd(&f))
        }),
        Some(u) => passwd_entries(passwd)
            .filter_map(|f| from_passwd(&f))
            .find(|a| a.uid == u),
        None => None,
    };
    let uid = match uid {
        Some(DEFAULT_USER) | None => entry.as_ref().map(|a| a.uid).unwrap_or(0),
        Some(u) => u,
    };
    let mut acct = entry.unwrap_or_else(|| {
        let root = passwd_entries(passwd)
            .filter_map(|f| from_passwd(&f))
            .find(|a| a.uid == 0 && uid == 0);
        root.unwrap_or(Account {
            uid,
            gid: uid,
            name: None,
            home: if uid == 0 { "/root".into() } else { "/".into() },
            shell: "/bin/sh".into(),
            groups: Vec::new(),
        })
    });
    if let Some(g) = gid {
        acct.gid = g;
    }
    acct.groups = match &acct.name {
        Some(n) => groups_of(group, n, acct.gid),
        None => vec![acct.gid],
    };
    if acct.shell.is_empty() || acct.shell.ends_with("/nologin") || acct.shell.ends_with("/false") {
        acct.shell = "/bin/sh".into();
    }
    acct
}

/// The account for a request's `uid`/`gid`: none is root, [`DEFAULT_USER`] the image's
/// default user, any other number that uid (known to /etc/passwd or not).
pub fn resolve(uid: Option<u32>, gid: Option<u32>) -> Account {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(&passwd, &group, uid, gid)
}

/// Where the daemon writes a proxy-bound VM's proxy settings (`KEY=VALUE` lines).
const PROXY_ENV: &str = "/etc/slicer/proxy.env";
/// The keys taken from it; anything else in the file is ignored.
const PROXY_KEYS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// The proxy variables in `path` (at most 16 KiB read; a missing file gives none).
fn proxy_env(path: &str) -> Vec<(String, String)> {
    use std::io::Read;
    let mut text = String::new();
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    if f.take(16 << 10).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| PROXY_KEYS.contains(k) && !v.bytes().any(|b| b.is_ascii_control()))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Account {
    /// The environment of a login shell of this account.
    pub fn login_env(&self) -> Vec<(String, String)> {
        let path = if self.uid == 0 { ROOT_PATH } else { USER_PATH };
        let mut env = vec![
            ("PATH".to_string(), path.to_string()),
            ("HOME".to_string(), self.home.clone()),
            ("SHELL".to_string(), self.shell.clone()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ];
        if let Some(n) = &self.name {
            env.push(("USER".into(), n.clone()));
            env.push(("LOGNAME".into(), n.clone()));
        }
        // What /etc/environment gives a login while slicer's CAs are installed.
        env.extend(crate::ca::env_vars(&crate::ca::Root::system()));
        // A proxy-bound VM: the proxy the daemon wrote for it.
        env.extend(proxy_env(PROXY_ENV));
        env
    }

    /// Expands `~` and `~/x` to this account's home. The result must be absolute and may not
    /// climb with `..` (a request names where it acts; it does not walk out of it).
    pub fn expand(&self, raw: &str) -> Result<String, ApiError> {
        if raw.is_empty() || raw.contains('\0') {
            return Err(ApiError::bad_request("path is empty or contains NUL"));
        }
        let p = if raw == "~" {
            self.home.clone()
        } else if let Some(rest) = raw.strip_prefix("~/") {
            format!("{}/{rest}", self.home.trim_end_matches('/'))
        } else {
            raw.to_string()
        };
        if !p.starts_with('/') {
            return Err(ApiError::bad_request(format!(
                "path {raw:?} is not absolute (or ~, ~/...)"
            )));
        }
        if p.split('/').any(|c| c == "..") {
            return Err(ApiError::bad_request(format!("path {raw:?} must not contain '..'")));
        }
        Ok(p)
    }

    /// Whether a child must change identity to become this account.
    pub fn differs_from_self(&self) -> bool {
        // SAFETY: geteuid/getegid have no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        self.uid != euid || self.gid != egid
    }

    /// Becomes this account. Only syscalls: call it between fork and exec.
    ///
    /// # Safety
    /// Async-signal-safe; `self` must have been built before the fork.
    pub unsafe fn become_in_child(&self) -> std::io::Result<()> {
        if libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
            || libc::setgid(self.gid) < 0
            || libc::setuid(self.uid) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        slicer:x:999:999::/home/slicer:/bin/sh\n\
        ubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:ubuntu\nubuntu:x:1000:\ndocker:x:998:ubuntu,slicer\n";

    #[test]
    fn default_user_prefers_ubuntu_then_slicer_then_root() {
        let a = resolve_in(PASSWD, GROUP, Some(DEFAULT_USER), None);
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/ubuntu"));
        assert_eq!(a.groups, vec![1000, 27, 998]);
        let no_ubuntu = PASSWD.replace("ubuntu:", "other:");
        let a = resolve_in(&no_ubuntu, GROUP, Some(DEFAULT_USER), None);
        assert_eq!((a.uid, a.name.as_deref()), (999, Some("slicer")));
        let only_root = "root:x:0:0:root:/root:/bin/bash\n";
        let a = resolve_in(only_root, "", Some(DEFAULT_USER), None);
        assert_eq!((a.uid, a.home.as_str()), (0, "/root"));
    }

    #[test]
    fn explicit_and_absent_uids() {
        let root = resolve_in(PASSWD, GROUP, None, None);
        assert_eq!((root.uid, root.home.as_str()), (0, "/root"));
        assert_eq!(resolve_in(PASSWD, GROUP, Some(0), None), root);
        let unknown = resolve_in(PASSWD, GROUP, Some(4242), Some(7));
        assert_eq!((unknown.uid, unknown.gid, unknown.home.as_str()), (4242, 7, "/"));
        assert_eq!(unknown.groups, vec![7]);
        // nologin shells are no use for a shell session.
        assert_eq!(resolve_in(PASSWD, GROUP, Some(1), None).shell, "/bin/sh");
    }

    #[test]
    fn proxy_environment_takes_only_proxy_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proxy.env");
        std::fs::write(
            &p,
            "HTTPS_PROXY=http://proxy:t@10.0.0.1:3128\nLD_PRELOAD=/x.so\nno_proxy=localhost\nbroken\n",
        )
        .unwrap();
        let env = proxy_env(p.to_str().unwrap());
        assert_eq!(
            env,
            vec![
                ("HTTPS_PROXY".to_string(), "http://proxy:t@10.0.0.1:3128".to_string()),
                ("no_proxy".to_string(), "localhost".to_string())
            ]
        );
        assert!(proxy_env("/nonexistent/proxy.env").is_empty());
    }

    #[test]
    fn login_environment() {
        let env = resolve_in(PASSWD, GROUP, Some(1000), None).login_env();
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOME"), Some("/home/ubuntu"));
        assert_eq!(get("USER"), Some("ubuntu"));
        assert_eq!(get("LOGNAME"), Some("ubuntu"));
        assert_eq!(get("PATH"), Some(USER_PATH));
        let root = resolve_in(PASSWD, GROUP, None, None).login_env();
        assert!(root.iter().any(|(k, v)| k == "PATH" && v.contains("sbin")));
    }

    #[test]
    fn tilde_expands_and_dotdot_is_refused() {
        let a = resolve_in(PASSWD, GROUP, Some(1000), None);
        assert_eq!(a.expand("~").unwrap(), "/home/ubuntu");
        assert_eq!(a.expand("~/x/y").unwrap(), "/home/ubuntu/x/y");
        assert_eq!(a.expand("/tmp").unwrap(), "/tmp");
        for bad in ["../..", "~/../etc", "/tmp/../etc", "relative", "~root", ""] {
            assert!(a.expand(bad).is_err(), "{bad}");
        }
    }
}
