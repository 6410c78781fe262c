//! `/vm/{h}/fs/…`: readdir, stat, mkdir and remove in the guest, through the agent, in
//! SlicerVM's shapes (`mtime` as RFC 3339, `mode` as an octal string).

use axum::extract::{Path, RawQuery, State};
use axum::Json;

use super::cp::guest_path;
use super::{query_one, query_pairs, JsonBody, Shared};
use crate::api::error::ApiErr;

use slicer_api::{FsEntry as Entry, MkdirRequest as MkdirBody};

fn entry(e: slicer_agent_proto::FsEntry) -> Entry {
    let mtime = crate::api::time::rfc3339_ns(i128::from(e.mtime_sec) * 1_000_000_000 + i128::from(e.mtime_nsec));
    Entry {
        name: e.name,
        kind: e.kind,
        size: e.size,
        mtime,
        mode: format!("{:04o}", e.mode),
    }
}

pub async fn readdir(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
) -> Result<Json<Vec<Entry>>, ApiErr> {
    let path = guest_path(&query_pairs(&q.0))?;
    let list = st.manager.fs_readdir(&hostname, &path).await?;
    Ok(Json(list.into_iter().map(entry).collect()))
}

pub async fn stat(State(st): State<Shared>, Path(hostname): Path<String>, q: RawQuery) -> Result<Json<Entry>, ApiErr> {
    let path = guest_path(&query_pairs(&q.0))?;
    Ok(Json(entry(st.manager.fs_stat(&hostname, &path).await?)))
}

pub async fn mkdir(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    JsonBody(b): JsonBody<MkdirBody>,
) -> Result<Json<Entry>, ApiErr> {
    if b.path.is_empty() {
        return Err(ApiErr::bad_request("body: path is required"));
    }
    let path = guest_path(&[("path".to_string(), b.path)])?;
    let req = slicer_agent_proto::MkdirRequest {
        path,
        recursive: b.recursive,
        mode: b.mode,
    };
    Ok(Json(entry(st.manager.fs_mkdir(&hostname, &req).await?)))
}

pub async fn remove(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    q: RawQuery,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let pairs = query_pairs(&q.0);
    let path = guest_path(&pairs)?;
    let recursive = match query_one(&pairs, "recursive") {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(o) => {
            return Err(ApiErr::bad_request(format!(
                "query recursive: {o:?} is not true or false"
            )))
        }
    };
    st.manager.fs_remove(&hostname, &path, recursive).await?;
    Ok(Json(serde_json::json!({ "path": path, "removed": true })))
}
