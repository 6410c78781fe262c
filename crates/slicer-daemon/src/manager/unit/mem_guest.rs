//! An in-memory [`Guest`] for the unit tier: files in a map, a few scripted commands (the SSH
//! key installation, userdata and its helpers, `echo`, `cat`), and what the manager pushed
//! (CA bundles, execs) recorded for the tests to read.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use slicer_agent_client::{AgentError, ExecEvent, Output};
use slicer_agent_proto::{
    shell::ShellQuery, BgInfo, BgKill, BgKilled, BgLogsQuery, BgStart, BgStarted, BgWait, CaInstalled, ExecRequest,
    ExitStatus, FileWritten, FsEntry, GuestStats, Health, MkdirRequest, WatchRequest,
};
use tokio::io::AsyncReadExt;

use crate::manager::guest::port::{Duplex, GuestRead, GuestResult, GuestStream, Process};
use crate::manager::{BoxFut, Guest, Upload};

/// Where the fake guest keeps the default user's SSH keys.
pub const AUTHORIZED_KEYS: &str = "/home/ubuntu/.ssh/authorized_keys";

/// One file of the fake guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub data: Vec<u8>,
    pub mode: u32,
    pub owner: Option<(u32, Option<u32>)>,
}

#[derive(Default)]
pub struct MemGuest {
    pub files: Mutex<BTreeMap<String, File>>,
    pub dirs: Mutex<BTreeSet<String>>,
    /// Every exec asked for, with its stdin.
    pub execs: Mutex<Vec<(ExecRequest, Option<Bytes>)>>,
    /// CA bundles installed.
    pub cas: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_found(what: &str) -> AgentError {
    AgentError::Remote {
        status: 404,
        kind: "not_found".into(),
        message: format!("{what}: no such file or directory"),
    }
}

fn unsupported(what: &str) -> AgentError {
    AgentError::Protocol(format!("the fake guest has no {what}"))
}

fn exited(code: i32, stdout: impl Into<Vec<u8>>, stderr: impl Into<Vec<u8>>) -> Output {
    Output {
        stdout: stdout.into(),
        stderr: stderr.into(),
        status: ExitStatus {
            code: Some(code),
            signal: None,
        },
    }
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

impl MemGuest {
    /// A guest with the directories an image has (/etc/slicer, /var/log, the user's home).
    pub fn new() -> MemGuest {
        let g = MemGuest::default();
        let dirs = [
            "/etc",
            "/etc/slicer",
            "/var",
            "/var/log",
            "/run",
            "/tmp",
            "/home",
            "/home/ubuntu",
        ];
        lock(&g.dirs).extend(dirs.iter().map(|d| d.to_string()));
        g
    }

    pub fn file(&self, path: &str) -> Option<File> {
        lock(&self.files).get(path).cloned()
    }

    pub fn put(&self, path: &str, data: &[u8], mode: u32) {
        lock(&self.files).insert(
            path.to_string(),
            File {
                data: data.to_vec(),
                mode,
                owner: None,
            },
        );
    }

    /// Whether a file or directory is at `path`.
    pub fn entry_exists(&self, path: &str) -> bool {
        self.entry(path).is_some()
    }

    fn entry(&self, path: &str) -> Option<FsEntry> {
        let name = path.rsplit('/').next().unwrap_or_default().to_string();
        if let Some(f) = lock(&self.files).get(path) {
            return Some(FsEntry {
                name,
                kind: "file".into(),
                size: f.data.len() as u64,
                mtime_sec: 0,
                mtime_nsec: 0,
                mode: f.mode,
            });
        }
        lock(&self.dirs).contains(path).then(|| FsEntry {
            name,
            kind: "directory".into(),
            size: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
            mode: 0o755,
        })
    }

    /// What the scripted commands do. Anything else is a program the guest does not have.
    fn run(&self, req: &ExecRequest, stdin: Option<&[u8]>) -> GuestResult<Output> {
        lock(&self.execs).push((req.clone(), stdin.map(Bytes::copy_from_slice)));
        let argv: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        match argv.as_slice() {
            ["echo", rest @ ..] => Ok(exited(0, format!("{}\n", rest.join(" ")), "")),
            ["cat"] => Ok(exited(0, stdin.unwrap_or_default(), "")),
            ["false"] => Ok(exited(1, "", "")),
            ["id", "-un"] => Ok(exited(0, "ubuntu\n", "")),
            ["tail", "-c", _, path] => Ok(match self.file(path) {
                Some(f) => exited(0, f.data, ""),
                None => exited(1, "", format!("tail: cannot open '{path}'")),
            }),
            ["/bin/sh", "-c", script] if script.contains("authorized_keys") => Ok(self.authorize(stdin)),
            ["/bin/sh", "-c", script] if script.contains("userdata-ran") => Ok(self.userdata()),
            ["/bin/sh", "-c", _] => Ok(exited(0, "", "")),
            _ => Err(AgentError::Remote {
                status: 404,
                kind: "not_found".into(),
                message: format!("exec {:?}: executable file not found", argv.first().unwrap_or(&"")),
            }),
        }
    }

    /// The SSH key script: each line of stdin added once.
    fn authorize(&self, stdin: Option<&[u8]>) -> Output {
        let mut files = lock(&self.files);
        let f = files.entry(AUTHORIZED_KEYS.to_string()).or_insert(File {
            data: Vec::new(),
            mode: 0o600,
            owner: None,
        });
        let mut text = String::from_utf8_lossy(&f.data).into_owned();
        for k in String::from_utf8_lossy(stdin.unwrap_or_default()).lines() {
            if !k.is_empty() && !text.lines().any(|l| l == k) {
                text.push_str(k);
                text.push('\n');
            }
        }
        f.data = text.into_bytes();
        exited(0, "", "")
    }

    /// The userdata script: runs once (the guard file holds its code), logging to its log. It
    /// "exits" with the code of its last `exit N` line (0 without one).
    fn userdata(&self) -> Output {
        let guard = "/etc/slicer/userdata-ran";
        if let Some(f) = self.file(guard) {
            let code = String::from_utf8_lossy(&f.data).trim().parse().unwrap_or(0);
            return exited(code, "", "");
        }
        let script = self.file("/etc/slicer/userdata.sh").map(|f| f.data).unwrap_or_default();
        let code = String::from_utf8_lossy(&script)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("exit ")?.trim().parse().ok())
            .next_back()
            .unwrap_or(0);
        self.put(
            super::super::guest::USERDATA_LOG,
            format!("userdata ran, exit {code}\n").as_bytes(),
            0o644,
        );
        self.put(guard, format!("{code}\n").as_bytes(), 0o644);
        exited(code, "", "")
    }
}

impl Guest for MemGuest {
    fn health(&self) -> BoxFut<'_, GuestResult<Health>> {
        Box::pin(async {
            Ok(Health {
                agent_version: "fake".into(),
                agent_uptime_ns: 1,
                system_uptime_ns: 1,
                pid1: false,
                hostname: "fake".into(),
            })
        })
    }
    fn exec<'a>(&'a self, req: &'a ExecRequest) -> BoxFut<'a, GuestResult<Process>> {
        Box::pin(async move {
            let out = self.run(req, None)?;
            let mut events = VecDeque::new();
            if !out.stdout.is_empty() {
                events.push_back(ExecEvent::Stdout(out.stdout.into()));
            }
            if !out.stderr.is_empty() {
                events.push_back(ExecEvent::Stderr(out.stderr.into()));
            }
            events.push_back(ExecEvent::Exit(out.status));
            Ok(Process::new(1000, 0, None, Box::new(events)))
        })
    }
    fn exec_output<'a>(&'a self, req: &'a ExecRequest, stdin: Option<Bytes>) -> BoxFut<'a, GuestResult<Output>> {
        Box::pin(async move { self.run(req, stdin.as_deref()) })
    }
    fn upload<'a>(&'a self, up: &'a Upload, mut data: GuestRead) -> BoxFut<'a, GuestResult<FileWritten>> {
        Box::pin(async move {
            let mut buf = Vec::new();
            data.read_to_end(&mut buf).await?;
            let path = match &up.placed {
                Some((name, false)) => format!("{}/{name}", up.path),
                _ => up.path.clone(),
            };
            if !lock(&self.dirs).contains(parent(&path)) && parent(&path) != "/" {
                return Err(not_found(parent(&path)));
            }
            let bytes = buf.len() as u64;
            let file = File {
                data: buf,
                mode: up.mode.unwrap_or(0o644),
                owner: up.owner,
            };
            lock(&self.files).insert(path.clone(), file);
            Ok(FileWritten { path, bytes })
        })
    }
    fn download_file<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move {
            let f = self.file(path).ok_or_else(|| not_found(path))?;
            Ok(GuestStream::of(Some(f.mode), [Bytes::from(f.data)]))
        })
    }
    fn download_tar<'a>(&'a self, _dir: &'a str) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async { Err(unsupported("tar")) })
    }
    fn readdir<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<Vec<FsEntry>>> {
        Box::pin(async move {
            if !lock(&self.dirs).contains(path) {
                return Err(not_found(path));
            }
            let mut names: BTreeSet<String> = lock(&self.files).keys().cloned().collect();
            names.extend(lock(&self.dirs).iter().cloned());
            Ok(names
                .iter()
                .filter(|n| n.as_str() != path && parent(n) == path)
                .filter_map(|n| self.entry(n))
                .collect())
        })
    }
    fn stat<'a>(&'a self, path: &'a str) -> BoxFut<'a, GuestResult<FsEntry>> {
        Box::pin(async move { self.entry(path).ok_or_else(|| not_found(path)) })
    }
    fn mkdir<'a>(&'a self, req: &'a MkdirRequest) -> BoxFut<'a, GuestResult<FsEntry>> {
        Box::pin(async move {
            let mut dirs = lock(&self.dirs);
            let mut p = req.path.as_str();
            if !req.recursive && !dirs.contains(parent(p)) && parent(p) != "/" {
                return Err(not_found(parent(p)));
            }
            while !p.is_empty() && p != "/" {
                dirs.insert(p.to_string());
                p = parent(p);
            }
            drop(dirs);
            self.entry(&req.path).ok_or_else(|| not_found(&req.path))
        })
    }
    fn remove<'a>(&'a self, path: &'a str, recursive: bool) -> BoxFut<'a, GuestResult<()>> {
        Box::pin(async move {
            let under = format!("{path}/");
            let mut files = lock(&self.files);
            if files.remove(path).is_some() {
                return Ok(());
            }
            let mut dirs = lock(&self.dirs);
            if !dirs.contains(path) {
                return Err(not_found(path));
            }
            let has = files.keys().any(|k| k.starts_with(&under)) || dirs.iter().any(|d| d.starts_with(&under));
            if has && !recursive {
                return Err(AgentError::Remote {
                    status: 409,
                    kind: "not_empty".into(),
                    message: format!("{path}: directory not empty"),
                });
            }
            files.retain(|k, _| !k.starts_with(&under));
            dirs.retain(|d| d != path && !d.starts_with(&under));
            Ok(())
        })
    }
    fn watch<'a>(&'a self, _req: &'a WatchRequest) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async { Err(unsupported("watch")) })
    }
    fn shell<'a>(&'a self, _q: &'a ShellQuery) -> BoxFut<'a, GuestResult<Duplex>> {
        Box::pin(async { Err(unsupported("shell")) })
    }
    fn forward<'a>(&'a self, _target: &'a str) -> BoxFut<'a, GuestResult<Duplex>> {
        Box::pin(async { Err(unsupported("forward")) })
    }
    fn stats(&self) -> BoxFut<'_, GuestResult<GuestStats>> {
        Box::pin(async {
            Ok(GuestStats {
                hostname: "fake".into(),
                cpus: 2,
                ..Default::default()
            })
        })
    }
    fn install_ca<'a>(&'a self, pem: &'a str) -> BoxFut<'a, GuestResult<CaInstalled>> {
        Box::pin(async move {
            lock(&self.cas).push(pem.to_string());
            Ok(CaInstalled::default())
        })
    }
    fn bg_start<'a>(&'a self, _start: &'a BgStart) -> BoxFut<'a, GuestResult<BgStarted>> {
        Box::pin(async {
            Err(AgentError::Remote {
                status: 503,
                kind: "busy".into(),
                message: "the fake guest's ring budget is used up".into(),
            })
        })
    }
    fn bg_list(&self) -> BoxFut<'_, GuestResult<Vec<BgInfo>>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn bg_info<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<BgInfo>> {
        Box::pin(async move { Err(not_found(id)) })
    }
    fn bg_kill<'a>(&'a self, id: &'a str, _k: &'a BgKill) -> BoxFut<'a, GuestResult<BgKilled>> {
        Box::pin(async move { Err(not_found(id)) })
    }
    fn bg_wait<'a>(&'a self, id: &'a str, _timeout_secs: u64) -> BoxFut<'a, GuestResult<BgWait>> {
        Box::pin(async move { Err(not_found(id)) })
    }
    fn bg_reap<'a>(&'a self, id: &'a str) -> BoxFut<'a, GuestResult<()>> {
        Box::pin(async move { Err(not_found(id)) })
    }
    fn bg_logs<'a>(&'a self, id: &'a str, _q: &'a BgLogsQuery) -> BoxFut<'a, GuestResult<GuestStream>> {
        Box::pin(async move { Err(not_found(id)) })
    }
}
