//! `POST|GET /vm/{h}/cp`: files as raw bytes (`mode=binary`) or directories as tar
//! (`mode=tar`), streamed both ways.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;

use slicer_api::query::CopyQuery;

use super::{query_one, query_pairs, Shared};
use crate::api::error::ApiErr;
use crate::manager::Upload;

pub(super) fn guest_path(pairs: &[(String, String)]) -> Result<String, ApiErr> {
    let p = query_one(pairs, "path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiErr::bad_request("query path is required"))?;
    // `~` is the home of the user the request acts as: the agent expands it.
    if !(p.starts_with('/') || p == "~" || p.starts_with("~/")) {
        return Err(ApiErr::bad_request(format!(
            "query path: {p:?} must be absolute (or ~, ~/...)"
        )));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(ApiErr::bad_request(format!("query path: {p:?} must not contain '..'")));
    }
    Ok(p.to_string())
}

#[derive(PartialEq, Clone, Copy)]
enum Mode {
    Binary,
    Tar,
    /// Download only: a file as binary, a directory as tar (the answer's headers say which).
    Recursive,
}

/// The mode, and whether it is one of SlicerVM's versioned `cp-v1-*` modes.
fn mode(q: &CopyQuery, upload: bool) -> Result<(Mode, bool), ApiErr> {
    match q.mode.as_deref() {
        None | Some("" | "binary") => Ok((Mode::Binary, false)),
        Some("tar") => Ok((Mode::Tar, false)),
        Some("cp-v1-binary") => Ok((Mode::Binary, true)),
        Some("cp-v1-tar") => Ok((Mode::Tar, true)),
        Some("cp-v1-recursive") if !upload => Ok((Mode::Recursive, true)),
        // The message old agents give: SDKs fall back to the legacy modes on it.
        Some(o) => Err(ApiErr::bad_request(format!("invalid mode: {o}"))),
    }
}

/// cp-v1 placement of an upload: `source_name` and `copy_contents`.
fn placement(q: &CopyQuery, mode: Mode) -> Result<Option<(String, bool)>, ApiErr> {
    let want = if mode == Mode::Tar { "directory" } else { "file" };
    if let Some(t) = q.source_type.as_deref().filter(|t| !t.is_empty()) {
        if t != want {
            return Err(ApiErr::bad_request(format!(
                "query source_type: {t:?} does not match the mode (a {want})"
            )));
        }
    }
    // The guest's agent checks that the name is one path component (400 otherwise).
    Ok(q.source_name.clone().map(|name| (name, q.copy_contents)))
}

pub async fn upload(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
    body: Body,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let path = guest_path(&pairs)?;
    let q = CopyQuery::from_pairs(&pairs).map_err(ApiErr::bad_request)?;
    let (mode, v1) = mode(&q, true)?;
    let placed = if v1 { placement(&q, mode)? } else { None };
    let perms = match q.permissions.as_deref() {
        None => None,
        Some(p) => Some(
            u32::from_str_radix(p.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| ApiErr::bad_request(format!("query permissions: {p:?} is not octal such as 0644")))?,
        ),
    };
    let owner = match super::exec::identity(&pairs)? {
        (Some(u), g) => Some((u, g)),
        (None, _) => None,
    };
    let reader = tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let up = Upload {
        tar: mode == Mode::Tar,
        path,
        placed,
        mode: perms,
        owner,
    };
    let written = st.manager.copy_in(&hostname, &up, Box::pin(reader)).await?;
    let (bytes, path) = (written.bytes, written.path);
    Ok(Json(slicer_api::CopyResponse { hostname, path, bytes }).into_response())
}

pub async fn download(State(st): State<Shared>, Path(hostname): Path<String>, q: RawQuery) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let path = guest_path(&pairs)?;
    let q = CopyQuery::from_pairs(&pairs).map_err(ApiErr::bad_request)?;
    let (mut mode, _) = mode(&q, false)?;
    if mode == Mode::Recursive {
        let e = st.manager.fs_stat(&hostname, &path).await?;
        mode = if e.kind == "directory" { Mode::Tar } else { Mode::Binary };
    }
    let dl = st.manager.copy_out(&hostname, &path, mode == Mode::Tar).await?;
    let file_mode = dl.mode;
    let stream = futures_util::stream::unfold(dl, |mut dl| async move {
        match dl.chunk().await {
            Ok(Some(b)) => Some((Ok::<_, std::io::Error>(b), dl)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), dl)),
        }
    });
    let mut resp = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let h = resp.headers_mut();
    let name = std::path::Path::new(&path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let b64name = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, name.as_bytes());
    if let Ok(v) = HeaderValue::from_str(&b64name) {
        h.insert("x-slicer-source-name-base64", v);
    }
    if mode == Mode::Tar {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
        h.insert("x-slicer-source-type", HeaderValue::from_static("directory"));
    } else {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert("x-slicer-source-type", HeaderValue::from_static("file"));
        if let Some(m) = file_mode {
            if let Ok(v) = HeaderValue::from_str(&format!("{m:04o}")) {
                h.insert("x-slicer-file-mode", v);
            }
        }
    }
    Ok(resp)
}
