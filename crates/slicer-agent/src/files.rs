//! File transfer routes: single files as raw bytes, directory trees as tar streams.
//! Disk I/O runs on blocking threads fed through bounded channels, so HTTP/2 flow control
//! reaches the disk.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use slicer_agent_proto::{FileWritten, PathQuery, HEADER_MODE, HEADER_SIZE};
use tokio::sync::mpsc;

use crate::server::{json, query, ApiError, Body};

const CHUNK: usize = 256 * 1024;

/// A request's path: absolute, or `~`/`~/x` in the home of `uid` (absent: the default user);
/// `..` is refused.
pub fn target_path_for(raw: &str, uid: Option<u32>) -> Result<PathBuf, ApiError> {
    let account = crate::user::resolve(Some(uid.unwrap_or(slicer_agent_proto::DEFAULT_USER)), None);
    account.expand(raw).map(PathBuf::from)
}

pub fn target_path(raw: &str) -> Result<PathBuf, ApiError> {
    target_path_for(raw, None)
}

/// cp-v1 placement of a write to `dest`: an existing directory receives the copy under
/// `source_name` (unless a directory's contents merge into it). Returns the target and whether
/// the copy merges into an existing directory.
fn place(dest: PathBuf, q: &PathQuery, dir_copy: bool) -> Result<(PathBuf, bool), ApiError> {
    let Some(name) = &q.source_name else {
        return Ok((dest, dir_copy));
    };
    if name.is_empty() || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(ApiError::bad_request(format!("invalid source_name {name:?}")));
    }
    match fs::metadata(&dest) {
        Ok(m) if m.is_dir() && dir_copy && q.copy_contents => Ok((dest, true)),
        Ok(m) if m.is_dir() => Ok((dest.join(name), false)),
        Ok(_) if dir_copy => Err(ApiError::bad_request(format!(
            "{} exists and is not a directory",
            dest.display()
        ))),
        _ => Ok((dest, false)),
    }
}

/// The owner a write gives its files: the query's (the default user for the sentinel), or
/// none (they stay the agent's, root's).
fn owner(q: &PathQuery) -> Option<(u32, u32)> {
    if q.uid.is_none() && q.gid.is_none() {
        return None;
    }
    let a = crate::user::resolve(Some(q.uid.unwrap_or(0)), q.gid);
    Some((a.uid, a.gid))
}

/// `create_dir_all` that gives each directory it creates to `owner`, so that a user can write
/// where a copy made directories for them.
fn create_dirs(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), ApiError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.exists()).collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => chown(d, owner).map_err(|e| ApiError::io("setting owner", &e))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ApiError::io(&format!("creating {}", d.display()), &e)),
        }
    }
    Ok(())
}

pub fn parse_mode(mode: &Option<String>, default: u32) -> Result<u32, ApiError> {
    match mode {
        None => Ok(default),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|v| *v <= 0o7777)
            .ok_or_else(|| ApiError::bad_request(format!("invalid mode {m:?}: expected octal such as 0644"))),
    }
}

/// Feeds the request body's data frames to a blocking consumer.
fn pump_body(mut body: Incoming) -> (mpsc::Receiver<Bytes>, tokio::task::JoinHandle<Result<(), ApiError>>) {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let task = tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if tx.send(data).await.is_err() {
                    break;
                }
            }
        }
        Ok(())
    });
    (rx, task)
}

struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let b = self.buf.split().freeze();
            self.tx
                .blocking_send(Ok(b))
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "host stopped reading"))?;
        }
        Ok(())
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn chown(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    match owner {
        Some((u, g)) => std::os::unix::fs::lchown(path, Some(u), Some(g)),
        None => Ok(()),
    }
}

/// `PUT /v1/file`: writes the body to `path` atomically (temporary file + rename).
pub async fn put_file(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let (path, _) = place(target_path_for(&q.path, q.uid)?, &q, false)?;
    let mode = parse_mode(&q.mode, 0o644)?;
    let owner = owner(&q);
    let (rx, pump) = pump_body(req.into_body());
    let p = path.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
        let parent = p.parent().unwrap_or(Path::new("/"));
        create_dirs(parent, owner)?;
        if p.is_dir() {
            return Err(ApiError::bad_request(format!("{} is a directory", p.display())));
        }
        let tmp = parent.join(format!(
            ".slicer-tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| ApiError::io(&format!("creating {}", tmp.display()), &e))?;
            // Write the received chunks as they are: no extra copy through a small buffer.
            let mut rx = rx;
            let mut n = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                f.write_all(&chunk).map_err(|e| ApiError::io("writing file", &e))?;
                n += chunk.len() as u64;
            }
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| ApiError::io("setting mode", &e))?;
            chown(&tmp, owner).map_err(|e| ApiError::io("setting owner", &e))?;
            Ok(n)
        })();
        match result {
            Ok(n) => {
                fs::rename(&tmp, &p).map_err(|e| ApiError::io(&format!("replacing {}", p.display()), &e))?;
                Ok(n)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("writer task: {e}")))?;
    // A body error (the host aborted the upload) wins over a short write.
    pump.await
        .map_err(|e| ApiError::internal(format!("body task: {e}")))??;
    let bytes = written?;
    Ok(json(
        StatusCode::OK,
        &FileWritten {
            path: path.display().to_string(),
            bytes,
        },
    ))
}

/// `GET /v1/file`: streams a regular file.
pub async fn get_file(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let path = target_path(&q.path)?;
    let mut f = fs::File::open(&path).map_err(|e| ApiError::io(&path.display().to_string(), &e))?;
    let meta = f.metadata().map_err(|e| ApiError::io("stat", &e))?;
    if !meta.is_file() {
        return Err(ApiError::bad_request(format!(
            "{} is not a regular file (use tar for directories)",
            path.display()
        )));
    }
    let (tx, body) = slicer_agent_proto::body::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(Ok(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(body));
    let h = resp.headers_mut();
    h.insert(
        HEADER_MODE,
        HeaderValue::from_str(&format!("{:o}", meta.permissions().mode() & 0o7777)).expect("octal digits"),
    );
    h.insert(HEADER_SIZE, HeaderValue::from(meta.len()));
    Ok(resp)
}

/// `PUT /v1/tar`: unpacks a tar stream into directory `path` (created if missing).
pub async fn put_tar(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let (dest, merge) = place(target_path_for(&q.path, q.uid)?, &q, true)?;
    let owner = owner(&q);
    // cp-v1 replaces a directory whole: unpack beside it, then swap.
    let swap = q.source_name.is_some() && !merge;
    let d = if swap {
        let parent = dest.parent().unwrap_or(Path::new("/"));
        parent.join(format!(
            ".slicer-tmp-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    } else {
        dest.clone()
    };
    let (rx, pump) = pump_body(req.into_body());
    let (staged, target) = (d.clone(), dest.clone());
    let unpacked = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
        create_dirs(&d, owner)?;
        let mut ar = tar::Archive::new(ChannelReader { rx, cur: Bytes::new() });
        ar.set_preserve_permissions(true);
        ar.set_preserve_mtime(true);
        ar.set_overwrite(true);
        let mut total = 0u64;
        let entries = ar
            .entries()
            .map_err(|e| ApiError::bad_request(format!("reading tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ApiError::bad_request(format!("reading tar: {e}")))?;
            total += entry.size();
            let rel = entry.path().map(|p| p.into_owned()).unwrap_or_default();
            // Owner: the query's, else the archive's when it has one (many writers leave the
            // numeric fields empty; then the files stay root's).
            let entry_owner = owner.or_else(|| {
                let h = entry.header();
                Some((h.uid().ok()? as u32, h.gid().ok()? as u32))
            });
            let ok = entry
                .unpack_in(&d)
                .map_err(|e| ApiError::io(&format!("unpacking {}", rel.display()), &e))?;
            if ok {
                chown(&d.join(&rel), entry_owner).map_err(|e| ApiError::io("setting owner", &e))?;
            }
        }
        Ok(total)
    })
    .await
    .map_err(|e| ApiError::internal(format!("unpack task: {e}")))?;
    let pumped = pump
        .await
        .map_err(|e| ApiError::internal(format!("body task: {e}")))
        .and_then(|r| r);
    let bytes = match (unpacked, pumped) {
        (Ok(n), Ok(())) => n,
        (Err(e), _) | (_, Err(e)) => {
            if swap {
                let _ = fs::remove_dir_all(&staged);
            }
            return Err(e);
        }
    };
    if swap {
        replace_dir(&staged, &target).map_err(|e| ApiError::io(&format!("replacing {}", target.display()), &e))?;
    }
    Ok(json(
        StatusCode::OK,
        &FileWritten {
            path: dest.display().to_string(),
            bytes,
        },
    ))
}

/// Puts the directory `staged` in the place of `target` (which may not exist): the old one
/// is moved aside, the new one renamed in, then the old one removed.
fn replace_dir(staged: &Path, target: &Path) -> io::Result<()> {
    let old = staged.with_extension("old");
    let had = match fs::rename(target, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            let _ = fs::remove_dir_all(staged);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(staged, target) {
        if had {
            let _ = fs::rename(&old, target);
        }
        let _ = fs::remove_dir_all(staged);
        return Err(e);
    }
    if had {
        let _ = fs::remove_dir_all(&old).or_else(|_| fs::remove_file(&old));
    }
    Ok(())
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let r = rel.join(&name);
        out.push(r.clone());
        if fs::symlink_metadata(root.join(&r))?.is_dir() {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

/// `GET /v1/tar`: streams directory `path` as a tar (entries relative to it; symlinks kept).
pub async fn get_tar(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let root = target_path(&q.path)?;
    let meta = fs::metadata(&root).map_err(|e| ApiError::io(&root.display().to_string(), &e))?;
    if !meta.is_dir() {
        return Err(ApiError::bad_request(format!("{} is not a directory", root.display())));
    }
    let mut list = Vec::new();
    walk(&root, Path::new(""), &mut list).map_err(|e| ApiError::io(&format!("listing {}", root.display()), &e))?;
    let (tx, body) = slicer_agent_proto::body::channel(8);
    tokio::task::spawn_blocking(move || {
        let w = ChannelWriter {
            tx: tx.clone(),
            buf: BytesMut::new(),
        };
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        let res = (|| -> io::Result<()> {
            for rel in &list {
                b.append_path_with_name(root.join(rel), rel)?;
            }
            b.finish()?;
            b.get_mut().flush()
        })();
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(Response::new(BodyExt::boxed(body)))
}
