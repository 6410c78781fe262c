//! `/secrets`: create, list, update and delete secrets. Values go in (base64) and never come
//! out; every change reaches the running VMs allowed to have the secret, in the background
//! (see [`crate::manager::Manager::spread_secret`]): a handler waits at most [`SETTLE`] for
//! the guests that answer promptly, so a stuck guest never holds up the API.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;

use super::{JsonBody, Shared};
use crate::error::ApiErr;
use crate::manager::{now_rfc3339, settle_pushes};
use crate::secrets::{parse_permissions, valid_name, SecretInfo, MAX_SECRET};

use slicer_api::{CreateSecretRequest as CreateSecret, UpdateSecretRequest as UpdateSecret};

/// Longest a secret change waits for the guests it reaches before answering.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

fn decode(data: &str) -> Result<Vec<u8>, ApiErr> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiErr::bad_request(format!("data: not base64: {e}")))?;
    if v.len() > MAX_SECRET {
        return Err(ApiErr::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("data: a secret is at most {MAX_SECRET} bytes"),
        ));
    }
    Ok(v)
}

fn checked_name(name: &str) -> Result<(), ApiErr> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiErr::bad_request(format!(
            "name: {name:?} must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

pub async fn list(State(st): State<Shared>) -> Result<Json<Vec<SecretInfo>>, ApiErr> {
    Ok(Json(st.manager.secrets.list().map_err(ApiErr::internal)?))
}

pub async fn create(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateSecret>,
) -> Result<(StatusCode, Json<SecretInfo>), ApiErr> {
    checked_name(&b.name)?;
    let value = decode(&b.data)?;
    let permissions = parse_permissions(b.permissions.as_deref().unwrap_or("0600"))?;
    let m = &st.manager;
    let _guard = m.secrets_lock.lock().await;
    if m.secrets.info(&b.name).map_err(ApiErr::internal)?.is_some() {
        return Err(ApiErr::conflict(format!(
            "secret {:?} exists: update it with PATCH",
            b.name
        )));
    }
    let info = SecretInfo {
        name: b.name.clone(),
        size: value.len() as u64,
        permissions,
        uid: b.uid.unwrap_or(0),
        gid: b.gid.unwrap_or(0),
        modified_at: now_rfc3339(),
    };
    m.secrets.put(&info, &value).map_err(ApiErr::internal)?;
    let pushes = m.spread_secret(&info.name);
    drop(_guard);
    settle_pushes(pushes, SETTLE).await;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn update(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<UpdateSecret>,
) -> Result<Json<SecretInfo>, ApiErr> {
    checked_name(&name)?;
    let value = b.data.as_deref().map(decode).transpose()?;
    let permissions = b.permissions.as_deref().map(parse_permissions).transpose()?;
    let m = &st.manager;
    let _guard = m.secrets_lock.lock().await;
    let mut info = m
        .secrets
        .info(&name)
        .map_err(ApiErr::internal)?
        .ok_or_else(|| ApiErr::not_found(format!("secret {name:?} not found")))?;
    let value = match value {
        Some(v) => v,
        None => m.secrets.value(&name).map_err(ApiErr::internal)?,
    };
    info.size = value.len() as u64;
    if let Some(p) = permissions {
        info.permissions = p;
    }
    info.uid = b.uid.unwrap_or(info.uid);
    info.gid = b.gid.unwrap_or(info.gid);
    info.modified_at = now_rfc3339();
    m.secrets.put(&info, &value).map_err(ApiErr::internal)?;
    let pushes = m.spread_secret(&name);
    drop(_guard);
    settle_pushes(pushes, SETTLE).await;
    Ok(Json(info))
}

pub async fn delete(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<slicer_api::SecretDeleted>, ApiErr> {
    checked_name(&name)?;
    let m = &st.manager;
    let _guard = m.secrets_lock.lock().await;
    if m.secrets.info(&name).map_err(ApiErr::internal)?.is_none() {
        return Err(ApiErr::not_found(format!("secret {name:?} not found")));
    }
    m.secrets.remove(&name).map_err(ApiErr::internal)?;
    let pushes = m.spread_secret(&name);
    drop(_guard);
    settle_pushes(pushes, SETTLE).await;
    Ok(Json(slicer_api::SecretDeleted { name, deleted: true }))
}
