//! Commit and fork routes (cold, and live as an extension): `POST /vm/{h}/commit`, `GET /vm/commits`, `DELETE /vm/commits/{id}`,
//! `POST /vm/commits/{id}/fork`.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use slicer_api::{CommitDeleted, CommitInfo, CommitMode, CommitRequest, CommitResponse, ForkRequest, ForkResponse};

use super::{query_one, query_pairs, query_timeout, JsonBody, Shared};
use crate::api::error::ApiErr;
use crate::manager::CommitFilter;

pub async fn commit(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
    JsonBody(req): JsonBody<CommitRequest>,
) -> Result<(StatusCode, Json<CommitResponse>), ApiErr> {
    let rec = st.manager.record(&hostname)?;
    let made = st.manager.commit(&rec.hostname, req).await?;
    Ok((StatusCode::CREATED, Json(CommitResponse::from(made))))
}

pub async fn list(State(st): State<Shared>, q: RawQuery) -> Result<Json<Vec<CommitInfo>>, ApiErr> {
    let pairs = query_pairs(&q.0);
    let f = CommitFilter {
        tags: pairs
            .iter()
            .filter(|(k, _)| k == "tag")
            .map(|(_, v)| v.clone())
            .collect(),
        cache_key: query_one(&pairs, "cache_key")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        source: query_one(&pairs, "source")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        mode: match query_one(&pairs, "mode") {
            None | Some("") => None,
            Some("disk") => Some(CommitMode::Disk),
            Some("live") => Some(CommitMode::Live),
            Some(m) => return Err(ApiErr::bad_request(format!("query mode: {m:?} is not disk or live"))),
        },
    };
    Ok(Json(
        st.manager.commits(&f)?.into_iter().map(CommitInfo::from).collect(),
    ))
}

pub async fn delete(State(st): State<Shared>, Path(id): Path<String>) -> Result<Json<CommitDeleted>, ApiErr> {
    st.manager.delete_commit(&id).await?;
    Ok(Json(CommitDeleted {
        commit_id: id,
        status: "deleted".into(),
    }))
}

pub async fn fork(
    State(st): State<Shared>,
    Path(id): Path<String>,
    q: RawQuery,
    JsonBody(req): JsonBody<ForkRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiErr> {
    let pairs = query_pairs(&q.0);
    let wait = match query_one(&pairs, "wait") {
        None | Some("") | Some("agent") => true,
        Some("none") => false,
        Some(o) => return Err(ApiErr::bad_request(format!("query wait: {o:?} is not agent or none"))),
    };
    let timeout = query_timeout(&pairs)?;
    let many = req.count.is_some();
    let forks: Vec<ForkResponse> = st
        .manager
        .fork(&id, req, wait, timeout)
        .await?
        .into_iter()
        .map(ForkResponse::from)
        .collect();
    // With `count` the answer is an array (also of one); without, Slicer's single object.
    let body = match forks.first() {
        Some(one) if !many => serde_json::to_value(one),
        _ => serde_json::to_value(&forks),
    }
    .map_err(ApiErr::internal)?;
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /vm/{h}/disk` (slicer extension behind `slicer disk export`): a standalone qcow2.
pub async fn export_disk(
    State(st): State<Shared>,
    Path(hostname): Path<String>,
) -> Result<axum::response::Response, ApiErr> {
    use axum::response::IntoResponse;
    let rec = st.manager.record(&hostname)?;
    let (file, len) = st.manager.export_disk(&rec.hostname).await?;
    let stream = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 1 << 20);
    let mut resp = (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response();
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("static"),
    );
    h.insert(axum::http::header::CONTENT_LENGTH, len.into());
    Ok(resp)
}
