//! `POST|GET /vm/{h}/cp`: files as raw bytes (`mode=binary`) or directories as tar
//! (`mode=tar`), streamed both ways.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::TryStreamExt;

use super::{query_one, query_pairs, Shared};
use crate::error::ApiErr;

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

#[derive(PartialEq)]
enum Mode {
    Binary,
    Tar,
}

fn mode(pairs: &[(String, String)]) -> Result<Mode, ApiErr> {
    match query_one(pairs, "mode") {
        None | Some("") | Some("binary") => Ok(Mode::Binary),
        Some("tar") => Ok(Mode::Tar),
        Some(o) => Err(ApiErr::bad_request(format!("invalid mode: {o}"))),
    }
}

pub async fn upload(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
    body: Body,
) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let path = guest_path(&pairs)?;
    let mode = mode(&pairs)?;
    let perms = match query_one(&pairs, "permissions") {
        None | Some("") => None,
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
    let running = st.manager.active(&hostname)?;
    let reader = tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let agent = running.vm.agent();
    let bytes = match mode {
        Mode::Binary => agent.upload_file(&path, perms, owner, reader).await,
        Mode::Tar => agent.upload_tar(&path, owner, reader).await,
    }
    .map_err(ApiErr::agent)?;
    Ok(Json(slicer_api::CopyResponse { hostname, path, bytes }).into_response())
}

pub async fn download(State(st): State<Shared>, Path(hostname): Path<String>, q: RawQuery) -> Result<Response, ApiErr> {
    let pairs = query_pairs(&q.0);
    let path = guest_path(&pairs)?;
    let mode = mode(&pairs)?;
    let running = st.manager.active(&hostname)?;
    let agent = running.vm.agent();
    let dl = match mode {
        Mode::Binary => agent.download_file(&path).await,
        Mode::Tar => agent.download_tar(&path).await,
    }
    .map_err(ApiErr::agent)?;
    let file_mode = dl.mode;
    let stream = futures_util::stream::unfold((dl, running), |(mut dl, r)| async move {
        match dl.chunk().await {
            Ok(Some(b)) => Some((Ok::<_, std::io::Error>(b), (dl, r))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), (dl, r))),
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
