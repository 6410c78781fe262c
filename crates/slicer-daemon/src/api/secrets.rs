//! `/secrets`: create, list, update and delete secrets. Values go in (base64) and never come
//! out; every change reaches the running VMs allowed to have the secret, in the background
//! (see [`crate::manager::Manager::spread_secret`]): a handler waits at most [`SETTLE`] for
//! the guests that answer promptly, so a stuck guest never holds up the API.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;

use super::{JsonBody, Shared};
use crate::api::error::ApiErr;
use crate::api::time::now_rfc3339;
use crate::manager::{settle_pushes, SecretChange};
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
    Ok(Json(st.manager.list_secrets()?))
}

pub async fn create(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateSecret>,
) -> Result<(StatusCode, Json<SecretInfo>), ApiErr> {
    checked_name(&b.name)?;
    let value = decode(&b.data)?;
    let permissions = parse_permissions(b.permissions.as_deref().unwrap_or("0600"))?;
    let info = SecretInfo {
        name: b.name.clone(),
        size: value.len() as u64,
        permissions,
        uid: b.uid.unwrap_or(0),
        gid: b.gid.unwrap_or(0),
        modified_at: now_rfc3339(),
    };
    let (info, pushes) = st.manager.create_secret(info, &value).await?;
    settle_pushes(pushes, SETTLE).await;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn update(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<UpdateSecret>,
) -> Result<Json<SecretInfo>, ApiErr> {
    checked_name(&name)?;
    let change = SecretChange {
        value: b.data.as_deref().map(decode).transpose()?,
        permissions: b.permissions.as_deref().map(parse_permissions).transpose()?,
        uid: b.uid,
        gid: b.gid,
    };
    let (info, pushes) = st.manager.update_secret(&name, change).await?;
    settle_pushes(pushes, SETTLE).await;
    Ok(Json(info))
}

pub async fn delete(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<slicer_api::SecretDeleted>, ApiErr> {
    checked_name(&name)?;
    let pushes = st.manager.delete_secret(&name).await?;
    settle_pushes(pushes, SETTLE).await;
    Ok(Json(slicer_api::SecretDeleted { name, deleted: true }))
}
