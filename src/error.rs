//! The one error type at the HTTP boundary.
//!
//! Every failure a client can see is an [`ApiError`], and every `ApiError`
//! renders as RFC 9457 `application/problem+json`. Server-side detail of a
//! 5xx is logged here and never sent to the client. Storage failures arrive
//! as [`EngineError`](crate::engine::EngineError) and become 503 with
//! `Retry-After`, so a Redis outage is never reported as a client mistake.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineError;

/// `Result` alias used by every handler and service function.
pub type ApiResult<T> = Result<T, ApiError>;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct FieldError {
    /// Where the problem is: a body path (`tokens.input`), a query or path
    /// parameter name, or a header name.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document, as sent on the wire.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem type (`about:blank` for plain HTTP statuses).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// Human-readable explanation of this occurrence.
    pub detail: String,
    /// The invalid fields, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("invalid request: {}", summarize(.0))]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("request timed out")]
    Timeout,
    /// The time limit passed while the request's body was still arriving.
    #[error("the request body did not arrive within the time limit ({0} s)")]
    BodyTimeout(u64),
    #[error("internal error: {0}")]
    Internal(String),
}

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    /// A 422 for a single field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document for this error. 5xx detail stays server-side.
    pub fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            Self::Internal(_) => "the server failed to handle this request".to_owned(),
            Self::Unavailable(_) => "storage is unavailable; retry shortly".to_owned(),
            Self::Timeout => "the request did not complete in time; retry shortly".to_owned(),
            other => other.to_string(),
        };
        let (kind, errors) = match self {
            Self::Validation(errors) => ("/problems/validation", Some(errors.clone())),
            Self::Unavailable(_) | Self::Timeout => ("/problems/unavailable", None),
            Self::Conflict(_) => ("/problems/conflict", None),
            _ => ("about:blank", None),
        };
        Problem {
            kind: kind.to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

impl From<EngineError> for ApiError {
    /// Counted as an engine error of a request (`op="request"`).
    fn from(err: EngineError) -> Self {
        metrics::counter!("attune_engine_errors_total", "op" => "request").increment(1);
        match err {
            EngineError::Unavailable(msg) => Self::Unavailable(msg),
            EngineError::Corrupt(msg) | EngineError::Refused(msg) => Self::Internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(msg) => tracing::error!(error = %msg, "internal error"),
            Self::Unavailable(msg) => {
                if let Some(unlogged) = UNAVAILABLE_WARNINGS.admit() {
                    tracing::warn!(error = %msg, unlogged, "storage unavailable");
                }
            }
            Self::Timeout => {
                if let Some(unlogged) = TIMEOUT_WARNINGS.admit() {
                    tracing::warn!(unlogged, "request timed out");
                }
            }
            _ => {}
        }
        metrics::counter!("attune_http_errors_total", "status" => self.status().as_str().to_owned())
            .increment(1);
        let status = self.status();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"attune-telemetry\""),
            );
        }
        response
    }
}

/// While storage is down every request fails the same way: its 503s, and
/// apart from them its timeouts, are logged at most once per
/// [`Throttle::EVERY_MS`], each line with how many went unlogged since the
/// one before (`unlogged`). Every one is counted in
/// `attune_http_errors_total` all the same.
static UNAVAILABLE_WARNINGS: Throttle = Throttle::new();
static TIMEOUT_WARNINGS: Throttle = Throttle::new();

struct Throttle {
    /// When a line was last let through (ms on the process's monotonic
    /// clock), `i64::MIN` before the first.
    last_ms: std::sync::atomic::AtomicI64,
    unlogged: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const EVERY_MS: i64 = 10_000;

    const fn new() -> Self {
        Self {
            last_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            unlogged: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether to log now, and how many went unlogged before it.
    fn admit(&self) -> Option<u64> {
        static START: std::sync::LazyLock<std::time::Instant> =
            std::sync::LazyLock::new(std::time::Instant::now);
        let now = i64::try_from(START.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.admit_at(now)
    }

    fn admit_at(&self, now_ms: i64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        let due = now_ms.saturating_sub(last) >= Self::EVERY_MS;
        // Of several at once, one logs.
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.unlogged.swap(0, Relaxed))
        } else {
            self.unlogged.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn outage_warnings_are_logged_once_per_interval_with_a_count() {
        let throttle = Throttle::new();
        assert_eq!(throttle.admit_at(5), Some(0));
        assert_eq!(throttle.admit_at(6), None);
        assert_eq!(throttle.admit_at(9_000), None);
        assert_eq!(throttle.admit_at(10_005), Some(2));
        assert_eq!(throttle.admit_at(10_006), None);
        assert_eq!(throttle.admit_at(60_000), Some(1));
    }
}
