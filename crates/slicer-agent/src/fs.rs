//! Filesystem routes: list a directory, stat a path, make a directory, remove a path. Each
//! runs on a blocking thread; paths must be absolute.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use slicer_agent_proto::{FsEntry, MkdirRequest, PathQuery, RemoveQuery};

use crate::files::{parse_mode, target_path};
use crate::server::{json, json_body, query, ApiError, Body};

/// Longest directory listing answered (entries beyond it are an error, not a silent cut).
const MAX_ENTRIES: usize = 100_000;

fn entry(name: String, md: &std::fs::Metadata) -> FsEntry {
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    FsEntry {
        name,
        kind: kind.into(),
        size: md.len(),
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        mode: md.permissions().mode() & 0o7777,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
}

pub async fn readdir(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let entries = blocking(move || {
        let dir = target_path(&q.path)?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| ApiError::io(&q.path, &e))? {
            let e = e.map_err(|e| ApiError::io(&q.path, &e))?;
            // An entry removed meanwhile is skipped.
            let Ok(md) = e.path().symlink_metadata() else { continue };
            out.push(entry(e.file_name().to_string_lossy().into_owned(), &md));
            if out.len() > MAX_ENTRIES {
                return Err(ApiError::bad_request(format!(
                    "{} has more than {MAX_ENTRIES} entries",
                    q.path
                )));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    })
    .await?;
    Ok(json(StatusCode::OK, &entries))
}

pub async fn stat(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: PathQuery = query(&req)?;
    let e = blocking(move || {
        let p = target_path(&q.path)?;
        let md = p.symlink_metadata().map_err(|e| ApiError::io(&q.path, &e))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        Ok(entry(name, &md))
    })
    .await?;
    Ok(json(StatusCode::OK, &e))
}

pub async fn mkdir(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let r: MkdirRequest = json_body(req, 64 * 1024, "mkdir request").await?;
    let mode = parse_mode(&r.mode, 0o755)?;
    let e = blocking(move || {
        let p = target_path(&r.path)?;
        std::fs::DirBuilder::new()
            .recursive(r.recursive)
            .mode(mode)
            .create(&p)
            .map_err(|e| ApiError::io(&r.path, &e))?;
        let md = p.symlink_metadata().map_err(|e| ApiError::io(&r.path, &e))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(entry(name, &md))
    })
    .await?;
    Ok(json(StatusCode::OK, &e))
}

pub async fn remove(req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q: RemoveQuery = query(&req)?;
    blocking(move || {
        let p = target_path(&q.path)?;
        if p == Path::new("/") {
            return Err(ApiError::bad_request("refusing to remove /"));
        }
        let md = p.symlink_metadata().map_err(|e| ApiError::io(&q.path, &e))?;
        let r = if md.is_dir() {
            if q.recursive {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_dir(p)
            }
        } else {
            std::fs::remove_file(p)
        };
        r.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTEMPTY) {
                ApiError::conflict(format!(
                    "{} is a directory that is not empty: pass recursive=true",
                    q.path
                ))
            } else {
                ApiError::io(&q.path, &e)
            }
        })
    })
    .await?;
    Ok(json(StatusCode::OK, &serde_json::json!({ "removed": true })))
}
