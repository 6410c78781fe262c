//! The query parameters of exec and cp (SlicerVM puts them in the query string), typed: the
//! daemon reads them with `from_pairs`, the CLI writes them with `to_pairs`.

use std::str::FromStr;

/// The last value of `key` (a repeated parameter's last one wins).
pub fn one<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Every value of a repeatable parameter.
pub fn all(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
}

/// A boolean: absent is false; `""`, `true` and `1` are true; `false` and `0` false.
pub fn flag(pairs: &[(String, String)], key: &str) -> Result<bool, String> {
    match one(pairs, key) {
        None => Ok(false),
        Some("" | "true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        Some(v) => Err(format!("query {key}: {v:?} is not true or false")),
    }
}

/// A number, when given.
pub fn number<T: FromStr>(pairs: &[(String, String)], key: &str) -> Result<Option<T>, String> {
    one(pairs, key)
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().map_err(|_| format!("query {key}: {v:?} is not a number")))
        .transpose()
}

fn text(pairs: &[(String, String)], key: &str) -> Option<String> {
    one(pairs, key).map(str::to_string)
}

/// `POST /vm/{h}/exec`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecQuery {
    pub cmd: String,
    pub args: Vec<String>,
    /// `KEY=VALUE` each.
    pub env: Vec<String>,
    /// Absent: the image's default non-root user; 0: root.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cwd: Option<String>,
    /// Absent: `/bin/bash` (a background exec: none); `""`: the command runs directly.
    pub shell: Option<String>,
    pub stdin: bool,
    /// `text` or `base64`.
    pub stdio: Option<String>,
    pub buffered: bool,
    pub background: bool,
    pub ring_bytes: Option<u64>,
}

impl ExecQuery {
    pub fn from_pairs(p: &[(String, String)]) -> Result<ExecQuery, String> {
        Ok(ExecQuery {
            cmd: one(p, "cmd").unwrap_or_default().to_string(),
            args: all(p, "args"),
            env: all(p, "env"),
            uid: number(p, "uid")?,
            gid: number(p, "gid")?,
            cwd: text(p, "cwd").filter(|c| !c.is_empty()),
            shell: text(p, "shell"),
            stdin: flag(p, "stdin")?,
            stdio: text(p, "stdio").filter(|s| !s.is_empty()),
            buffered: flag(p, "buffered")?,
            background: flag(p, "background")?,
            ring_bytes: number(p, "ring_bytes")?,
        })
    }

    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("cmd", self.cmd.clone())];
        q.extend(self.args.iter().map(|a| ("args", a.clone())));
        q.extend(self.env.iter().map(|e| ("env", e.clone())));
        q.extend(self.uid.map(|u| ("uid", u.to_string())));
        q.extend(self.gid.map(|g| ("gid", g.to_string())));
        q.extend(self.cwd.clone().map(|c| ("cwd", c)));
        q.extend(self.shell.clone().map(|s| ("shell", s)));
        q.extend(self.stdio.clone().map(|s| ("stdio", s)));
        q.extend(self.ring_bytes.map(|r| ("ring_bytes", r.to_string())));
        for (key, on) in [
            ("stdin", self.stdin),
            ("buffered", self.buffered),
            ("background", self.background),
        ] {
            if on {
                q.push((key, "true".into()));
            }
        }
        q
    }
}

/// `POST` and `GET /vm/{h}/cp`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyQuery {
    /// Absolute, `~` or `~/x` in the guest.
    pub path: String,
    /// `binary`, `tar`, `cp-v1-binary`, `cp-v1-tar`, `cp-v1-recursive` (downloads).
    pub mode: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Octal, e.g. `0644`.
    pub permissions: Option<String>,
    /// cp-v1: the copy's own name, placed inside `path` when that is a directory.
    pub source_name: Option<String>,
    /// cp-v1: `file` or `directory`.
    pub source_type: Option<String>,
    /// cp-v1: merge a directory's contents into `path`.
    pub copy_contents: bool,
}

impl CopyQuery {
    pub fn from_pairs(p: &[(String, String)]) -> Result<CopyQuery, String> {
        let some = |k: &str| text(p, k).filter(|v| !v.is_empty());
        Ok(CopyQuery {
            path: one(p, "path").unwrap_or_default().to_string(),
            mode: some("mode"),
            uid: number(p, "uid")?,
            gid: number(p, "gid")?,
            permissions: some("permissions"),
            source_name: some("source_name"),
            source_type: some("source_type"),
            copy_contents: flag(p, "copy_contents")?,
        })
    }

    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("path", self.path.clone())];
        q.extend(self.mode.clone().map(|m| ("mode", m)));
        q.extend(self.uid.map(|u| ("uid", u.to_string())));
        q.extend(self.gid.map(|g| ("gid", g.to_string())));
        q.extend(self.permissions.clone().map(|p| ("permissions", p)));
        if self.mode.as_deref().is_some_and(|m| m.starts_with("cp-v1")) {
            q.push(("copy_semantics", "cp-v1".into()));
        }
        q.extend(self.source_name.clone().map(|n| ("source_name", n)));
        q.extend(self.source_type.clone().map(|t| ("source_type", t)));
        if self.copy_contents {
            q.push(("copy_contents", "true".into()));
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&'static str, String)]) -> Vec<(String, String)> {
        q.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn exec_and_copy_queries_round_trip() {
        let e = ExecQuery {
            cmd: "ls".into(),
            args: vec!["-la".into(), "a b".into()],
            env: vec!["A=1".into()],
            uid: Some(0),
            cwd: Some("~/x".into()),
            shell: Some(String::new()),
            stdin: true,
            background: true,
            ring_bytes: Some(4096),
            ..Default::default()
        };
        assert_eq!(ExecQuery::from_pairs(&pairs(&e.to_pairs())).unwrap(), e);
        let c = CopyQuery {
            path: "/srv".into(),
            mode: Some("cp-v1-tar".into()),
            uid: Some(1000),
            source_name: Some("proj".into()),
            source_type: Some("directory".into()),
            copy_contents: true,
            ..Default::default()
        };
        assert_eq!(CopyQuery::from_pairs(&pairs(&c.to_pairs())).unwrap(), c);
        let bad = pairs(&[("cmd", "x".into()), ("uid", "root".into())]);
        assert!(ExecQuery::from_pairs(&bad).unwrap_err().contains("uid"));
        let bad = pairs(&[("cmd", "x".into()), ("stdin", "maybe".into())]);
        assert!(ExecQuery::from_pairs(&bad).unwrap_err().contains("stdin"));
    }
}
