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
    pub fn internal(e: impl std::fmt::Display) -> ApiErr {
        ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
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
