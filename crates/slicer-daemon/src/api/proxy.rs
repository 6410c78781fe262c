//! `/proxy/v1`: Slicer Proxy's admin API (clients, upstream secrets, allow rules) in SlicerVM's
//! shapes, and `GET /proxy/v1/clients/{name}/suggest` (a slicer extension). Every change
//! answers once it is stored and the running proxies acknowledged it (see [`crate::proxy`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use slicer_api::{
    AddProxyAllowRequest, CreateProxyClientRequest, CreateProxySecretRequest, ProxyAllowRule, ProxyClient,
    ProxyClientCreated, ProxySecret, RemoveProxyAllowByTupleRequest,
};

use super::{JsonBody, Shared};
use crate::api::error::ApiErr;

pub async fn list_clients(State(st): State<Shared>) -> Result<Json<Vec<ProxyClient>>, ApiErr> {
    Ok(Json(st.manager.proxy().clients()?))
}

pub async fn create_client(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateProxyClientRequest>,
) -> Result<(StatusCode, Json<ProxyClientCreated>), ApiErr> {
    Ok((StatusCode::CREATED, Json(st.manager.proxy().create_client(b).await?)))
}

pub async fn client_rules(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Vec<ProxyAllowRule>>, ApiErr> {
    Ok(Json(st.manager.proxy().client_rules(&name)?))
}

pub async fn delete_client(State(st): State<Shared>, Path(name): Path<String>) -> Result<StatusCode, ApiErr> {
    st.manager.proxy().delete_client(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn suggest(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Vec<AddProxyAllowRequest>>, ApiErr> {
    Ok(Json(st.manager.proxy().suggest(&name)?))
}

pub async fn list_secrets(State(st): State<Shared>) -> Result<Json<Vec<ProxySecret>>, ApiErr> {
    Ok(Json(st.manager.proxy().secrets()?))
}

pub async fn create_secret(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateProxySecretRequest>,
) -> Result<(StatusCode, Json<ProxySecret>), ApiErr> {
    Ok((StatusCode::CREATED, Json(st.manager.proxy().create_secret(b).await?)))
}

pub async fn delete_secret(State(st): State<Shared>, Path(name): Path<String>) -> Result<StatusCode, ApiErr> {
    st.manager.proxy().delete_secret(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn add_allow(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<AddProxyAllowRequest>,
) -> Result<(StatusCode, Json<ProxyAllowRule>), ApiErr> {
    Ok((StatusCode::CREATED, Json(st.manager.proxy().add_rule(b).await?)))
}

pub async fn remove_host(
    State(st): State<Shared>,
    Path((client, host)): Path<(String, String)>,
) -> Result<StatusCode, ApiErr> {
    st.manager.proxy().remove_host(&client, &host).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn revoke(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<RemoveProxyAllowByTupleRequest>,
) -> Result<StatusCode, ApiErr> {
    st.manager.proxy().revoke(b).await?;
    Ok(StatusCode::NO_CONTENT)
}
