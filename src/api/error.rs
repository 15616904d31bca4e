//! Failures as HTTP answers: the engine's error body (docs/json.md
//! "error") with a status picked from its stable code; and the JSON body
//! extractor that refuses bad input the same way.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::engine::{Code, Error};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
}

/// The HTTP status of an engine error code.
pub fn status_of(code: Code) -> StatusCode {
    match code {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::StateConflict => StatusCode::CONFLICT,
        Code::InvalidInput | Code::ConfirmationRequired => StatusCode::BAD_REQUEST,
        // The request was understood; this host or snapshot cannot do it.
        Code::KernelMismatch
        | Code::CpuIncompatible
        | Code::SnapshotUnsupported
        | Code::SnapshotDamaged
        | Code::SetupFailed => StatusCode::UNPROCESSABLE_ENTITY,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Image => StatusCode::BAD_GATEWAY,
        Code::SecretLeak | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    fn plain(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: json!({"error": {"code": code.as_str(), "message": message.into()}}),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::plain(StatusCode::BAD_REQUEST, Code::InvalidInput, message)
    }

    pub fn unauthorized(message: &str) -> ApiError {
        ApiError::plain(StatusCode::UNAUTHORIZED, Code::InvalidInput, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::plain(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError {
            status: status_of(e.code()),
            body: e.to_json(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// A JSON request body, whatever its Content-Type (curl's `-d` sends a
/// form type). An empty body is `{}`, so every field may default. Bad
/// JSON, an unknown field or a bad value is a 400 naming it; a body over
/// the limit is a 413.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let status = r.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::plain(
                    status,
                    Code::InvalidInput,
                    format!("request body is over {} bytes", super::BODY_LIMIT),
                )
            } else {
                ApiError::plain(status, Code::InvalidInput, r.body_text())
            }
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))
    }
}
