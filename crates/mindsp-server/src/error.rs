//! The HTTP error type: the one place where errors become status codes. Every error
//! body has the same shape, `{"error": {"code": "...", "message": "..."}}`, and the
//! codes are listed in `docs/API.md`. Internal details are logged, never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mindsp_core::Error;
use serde::Serialize;

/// An error answered to an HTTP client.
#[derive(Debug)]
pub enum ApiError {
    /// A domain error from the core.
    Core(Error),
    /// Anything the HTTP layer rejects itself before reaching the core.
    Http {
        /// Status to answer.
        status: StatusCode,
        /// Stable machine code.
        code: &'static str,
        /// Human explanation.
        message: String,
        /// Seconds to send in `Retry-After`, if any.
        retry_after: Option<u64>,
    },
}

impl ApiError {
    /// An HTTP-layer error.
    pub fn http(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Http {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to try again in `secs` seconds.
    pub fn retry_after(mut self, secs: u64) -> Self {
        if let Self::Http { retry_after, .. } = &mut self {
            *retry_after = Some(secs);
        }
        self
    }

    /// 401 with the given code.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::http(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 400 with the given code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::http(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self::Core(e)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, retry_after) = match &self {
            ApiError::Http {
                status,
                code,
                message,
                retry_after,
            } => (*status, *code, message.clone(), *retry_after),
            ApiError::Core(e) => {
                let status = match e {
                    Error::NotFound(_) => StatusCode::NOT_FOUND,
                    Error::Forbidden(_) => StatusCode::FORBIDDEN,
                    Error::Conflict { .. } => StatusCode::CONFLICT,
                    Error::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    Error::InvalidCredentials => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
                    tracing::error!(error = %e, "internal error");
                    "internal error".to_owned()
                } else {
                    e.to_string()
                };
                (status, e.code(), message, None)
            }
        };
        let mut response = (
            status,
            Json(Body {
                error: Detail {
                    code,
                    message: &message,
                },
            }),
        )
            .into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
