//! API errors: a status code and a message, answered as `{"error": "..."}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug)]
pub struct ApiErr {
    pub status: StatusCode,
    pub message: String,
}

impl ApiErr {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiErr {
        ApiErr {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::CONFLICT, m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::FORBIDDEN, m)
    }
    pub fn timeout(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::REQUEST_TIMEOUT, m)
    }
    /// 503: the host cannot take more right now (its capacity budget is used up).
    pub fn unavailable(m: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, m)
    }
    /// A failure of the host side (see [`crate::manager::Error::host`] for how the host's
    /// own state, a full disk or a busy database, is told apart from a bug).
    pub fn internal(e: impl Into<crate::manager::HostCause>) -> ApiErr {
        ApiErr::from(crate::manager::Error::host(e))
    }
    /// Maps an error of the guest agent: its own 4xx stay client errors.
    pub fn agent(e: slicer_agent_client::AgentError) -> ApiErr {
        match &e {
            slicer_agent_client::AgentError::Remote { status, .. } if (400..500).contains(status) => ApiErr::new(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
                e.to_string(),
            ),
            _ => ApiErr::new(StatusCode::BAD_GATEWAY, format!("guest agent: {e}")),
        }
    }
}

/// The one place a domain failure becomes an HTTP status.
impl From<crate::manager::Error> for ApiErr {
    fn from(e: crate::manager::Error) -> ApiErr {
        use crate::manager::{Error, HostFault};
        let text = e.to_string();
        match e {
            Error::Invalid(m) => ApiErr::bad_request(m),
            Error::NotFound(m) => ApiErr::not_found(m),
            Error::Conflict(m) => ApiErr::conflict(m),
            Error::Forbidden(m) => ApiErr::forbidden(m),
            Error::Timeout(m) => ApiErr::timeout(m),
            Error::Unavailable(m) => ApiErr::unavailable(m),
            Error::UserdataFailed(m) => ApiErr::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            Error::Guest(e) => ApiErr::agent(e),
            Error::Host {
                fault: HostFault::DiskFull,
                ..
            } => ApiErr::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!("the host's data disk is full; nothing was changed: {text}"),
            ),
            Error::Host {
                fault: HostFault::StateBusy,
                ..
            } => ApiErr::unavailable(format!(
                "the state database is busy (locked by another process); try again: {text}"
            )),
            Error::Host {
                fault: HostFault::Other,
                ..
            } => ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, text),
        }
    }
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiErr {}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(slicer_api::ErrorResponse { error: self.message }),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_state_errors_get_their_own_status() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(ApiErr::internal(io).status, StatusCode::INSUFFICIENT_STORAGE);
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert_eq!(ApiErr::internal(busy).status, StatusCode::SERVICE_UNAVAILABLE);
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        assert_eq!(ApiErr::internal(full).status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(
            ApiErr::internal(crate::manager::HostCause::msg("boom")).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
