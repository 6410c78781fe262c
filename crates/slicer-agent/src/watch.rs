//! `POST /v1/fs/watch`: inotify on the given paths (optionally whole trees, including
//! directories created later), streamed as NDJSON [`WatchEvent`] lines until the host leaves.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use slicer_agent_proto::{WatchEvent, WatchRequest};
use tokio::io::unix::AsyncFd;

use crate::server::{json_body, ApiError, Body};

/// Most directories watched by one request.
const MAX_WATCHES: usize = 8192;

struct Ino(Inotify);

impl AsRawFd for Ino {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
}

struct Watches {
    ino: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    recursive: bool,
}

impl Watches {
    fn add(&mut self, path: &Path) -> Result<(), ApiError> {
        if self.dirs.len() >= MAX_WATCHES {
            return Err(ApiError::bad_request(format!(
                "more than {MAX_WATCHES} directories to watch"
            )));
        }
        let wd = self
            .ino
            .add_watch(path, mask())
            .map_err(|e| ApiError::io(&path.display().to_string(), &e.into()))?;
        self.dirs.insert(wd, path.to_path_buf());
        if self.recursive && path.is_dir() {
            if let Ok(rd) = std::fs::read_dir(path) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        // A directory that vanished meanwhile is simply not watched.
                        let _ = self.add(&e.path());
                    }
                }
            }
        }
        Ok(())
    }
}

/// `POST /v1/watch`: watches the paths asked for (directories below them too, with
/// `recursive`) and streams one JSON line per change until the host goes away.
pub async fn handle(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let w: WatchRequest = json_body(req, 64 * 1024, "watch request").await?;
    if w.paths.is_empty() {
        return Err(ApiError::bad_request("no paths to watch"));
    }
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| ApiError::io("inotify", &e.into()))?;
    let mut watches = Watches {
        ino,
        dirs: HashMap::new(),
        recursive: w.recursive,
    };
    for p in &w.paths {
        watches.add(&crate::files::target_path(p)?)?;
    }
    let Watches { ino, dirs, recursive } = watches;
    // SAFETY: the AsyncFd owns the inotify instance for its whole life.
    let afd = unsafe { AsyncFd::register(Ino(ino)) }
        .map_err(|e| ApiError::io("inotify", &std::io::Error::other(e.to_string())))?;
    let (tx, body) = slicer_agent_proto::body::channel(16);
    tokio::spawn(forward_events(afd, dirs, recursive, tx));
    let mut resp = Response::new(BodyExt::boxed(body));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// Reads inotify events and sends them as [`WatchEvent`]s until the host goes away or the
/// instance fails; new directories in a recursive watch are watched as they appear.
async fn forward_events(
    afd: AsyncFd<Ino>,
    mut dirs: HashMap<WatchDescriptor, PathBuf>,
    recursive: bool,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    loop {
        let mut guard = tokio::select! {
            g = afd.readable() => match g { Ok(g) => g, Err(_) => return },
            _ = tx.closed() => return,
        };
        let events = match guard.try_io(|a| a.get_ref().0.read_events().map_err(std::io::Error::from)) {
            Ok(Ok(ev)) => ev,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        for ev in events {
            let flags = ev.mask;
            if flags.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                let e = WatchEvent {
                    kind: "overflow".into(),
                    timestamp_ms: crate::exec::now_ms(),
                    ..Default::default()
                };
                if send(&tx, &e).await.is_err() {
                    return;
                }
                continue;
            }
            let Some(dir) = dirs.get(&ev.wd).cloned() else { continue };
            let path = match &ev.name {
                Some(n) => dir.join(n),
                None => dir.clone(),
            };
            let is_dir = flags.contains(AddWatchFlags::IN_ISDIR);
            let Some(kind) = event_kind(flags) else { continue };
            // A new directory in a watched tree is watched too.
            if kind == "create" && is_dir && recursive && dirs.len() < MAX_WATCHES {
                if let Ok(wd) = afd.get_ref().0.add_watch(&path, mask()) {
                    dirs.insert(wd, path.clone());
                }
            }
            let size = std::fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
            let e = WatchEvent {
                kind: kind.into(),
                path: path.to_string_lossy().into_owned(),
                is_dir,
                size,
                timestamp_ms: crate::exec::now_ms(),
            };
            if send(&tx, &e).await.is_err() {
                return;
            }
        }
    }
}

/// What an inotify event means on the wire (`None`: not reported).
fn event_kind(flags: AddWatchFlags) -> Option<&'static str> {
    Some(
        if flags.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            "create"
        } else if flags.intersects(AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CLOSE_WRITE) {
            "write"
        } else if flags.contains(AddWatchFlags::IN_MOVED_FROM) {
            "rename"
        } else if flags.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
            "remove"
        } else if flags.contains(AddWatchFlags::IN_ATTRIB) {
            "chmod"
        } else {
            return None;
        },
    )
}

async fn send(tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>, e: &WatchEvent) -> Result<(), ()> {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    tx.send(Ok(Bytes::from(v))).await.map_err(|_| ())
}
