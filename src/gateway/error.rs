//! `ApiError`: every handler error becomes a JSON body `{"error": {"code", "message",
//! "type", "param"}}` with the right status (`type` and `param` as OpenAI's errors have them,
//! so its clients read ours); it is the only error shape of the HTTP API, and the extractor
//! wrappers here (`ApiJson`, `ApiQuery`, `ApiPath`) give rejections that shape too. 5xx
//! answers carry generic text; their cause is attached as a response extension and logged by
//! a middleware, never inside the conversion. Every 503 says when to retry (`Retry-After`).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::llm::LlmError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// A bad value of the request field `param` (a 400 whose `param` names it).
    #[error("{message}")]
    BadParam { param: &'static str, message: String },
    /// A body or query string that does not fit the request's shape, with the field serde
    /// stopped at when it names one (`max_tokens`, `messages[0].role`, `limit`).
    #[error("{message}")]
    BadShape { param: Option<String>, message: String },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A missing or wrong shared secret other than the bearer token (`X-Cron-Secret`).
    #[error("{0}")]
    WrongSecret(String),
    /// A webhook whose signature is missing or does not match its body.
    #[error("missing or invalid signature")]
    BadSignature,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// A `/v1` request for a model that is not one of ours (OpenAI's `model_not_found`).
    #[error("{0}")]
    ModelNotFound(String),
    /// The prompt and the room for its answer do not fit the model's context (OpenAI's
    /// `context_length_exceeded`, a 400), and the request field that holds the prompt:
    /// `/v1`'s `messages`, the WebChat API's `message` (`ApiError::about_prompt`), none
    /// where the prompt is stored history (regenerate).
    #[error("{message}")]
    ContextTooLong { message: String, param: Option<&'static str> },
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than this server accepts (MAX_BODY_BYTES)")]
    PayloadTooLarge,
    /// A body over a route's own limit (an import file), saying which.
    #[error("{0}")]
    TooLarge(String),
    #[error("the request body did not arrive in time (REQUEST_BODY_TIMEOUT)")]
    RequestTimeout,
    /// A request line whose path and query are longer than this server reads.
    #[error("the request's address is longer than {0} bytes")]
    UriTooLong(usize),
    /// Request headers over this server's limits (their count or their total size).
    #[error("{0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

/// The cause of a 5xx, kept out of the body and logged by `log_internal_errors`.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    r#type: &'a str,
    param: Option<&'a str>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_)
            | ApiError::BadParam { .. }
            | ApiError::BadShape { .. }
            | ApiError::ContextTooLong { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::WrongSecret(_) | ApiError::BadSignature => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge | ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) | ApiError::BadParam { .. } | ApiError::BadShape { .. } => {
                "bad_request"
            }
            ApiError::Unauthorized | ApiError::WrongSecret(_) => "unauthorized",
            ApiError::BadSignature => "bad_signature",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "conflict",
            ApiError::NotFound(_) => "not_found",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::ContextTooLong { .. } => "context_length_exceeded",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge | ApiError::TooLarge(_) => "payload_too_large",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// OpenAI's error `type`, from the status as its API gives it.
    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            status if status.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The same error where the prompt is a WebChat request's one `message` (or, with
    /// `None`, stored history the request does not carry), not `/v1`'s `messages`.
    pub fn about_prompt(self, field: Option<&'static str>) -> ApiError {
        match self {
            ApiError::ContextTooLong { message, .. } => {
                ApiError::ContextTooLong { message, param: field }
            }
            other => other,
        }
    }

    /// The request field a 400 is about, as OpenAI's `param`.
    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadParam { param, .. } => Some(param),
            ApiError::BadShape { param, .. } => param.as_deref(),
            // The prompt is what does not fit.
            ApiError::ContextTooLong { param, .. } => *param,
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                r#type: self.kind(),
                param: self.param(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::Internal(cause) = self {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    /// A database that is busy (another process holds its write lock past the busy
    /// timeout, or every connection is taken) or on a full disk is a state that passes:
    /// a 503 that says which, with `Retry-After`. Anything else is a fault of ours.
    fn from(e: sqlx::Error) -> Self {
        // SQLite's primary result code: the low byte of the extended one sqlx reports.
        let primary = e
            .as_database_error()
            .and_then(|d| d.code())
            .and_then(|code| code.parse::<i32>().ok())
            .map(|code| code & 0xff);
        match (&e, primary) {
            // SQLITE_BUSY, SQLITE_LOCKED.
            (_, Some(5 | 6)) | (sqlx::Error::PoolTimedOut, _) => ApiError::Unavailable(
                "the database is busy (another process is writing to it); try again shortly".into(),
            ),
            // SQLITE_FULL.
            (_, Some(13)) => ApiError::Unavailable(
                "the disk that holds the database is full: nothing was stored".into(),
            ),
            _ => ApiError::Internal(format!("database: {e}")),
        }
    }
}

impl From<crate::error::Error> for ApiError {
    fn from(e: crate::error::Error) -> Self {
        match e {
            crate::error::Error::Db(e) => e.into(),
            crate::error::Error::Llm(e) => e.into(),
            crate::error::Error::NotFound(m) => ApiError::NotFound(m),
            crate::error::Error::Invalid(m) => ApiError::BadRequest(m),
        }
    }
}

impl From<LlmError> for ApiError {
    fn from(e: LlmError) -> Self {
        match e {
            // A model file that cannot be used is the server's state, not a fault of the
            // request: the reason (which file, what is wrong) is the answer, as at start.
            LlmError::QueueFull
            | LlmError::EngineStopped
            | LlmError::Unavailable(_)
            | LlmError::BadModel { .. } => ApiError::Unavailable(e.to_string()),
            LlmError::ContextOverflow { .. } => {
                ApiError::ContextTooLong { message: e.to_string(), param: Some("messages") }
            }
            LlmError::UnknownModel(_) | LlmError::InvalidRequest(_) => {
                ApiError::BadRequest(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// `axum::Json` whose rejection is our `ApiError`, so bad payloads get our error shape.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match &rejection {
            JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return ApiError::PayloadTooLarge;
            }
            JsonRejection::JsonDataError(e) => {
                if let Some(found) = serde_path_error(e) {
                    return invalid_json(found);
                }
            }
            _ => {}
        }
        ApiError::BadShape {
            param: None,
            message: format!("invalid JSON body: {}", without_type_names(&rejection.body_text())),
        }
    }
}

/// A JSON value of the wrong shape, naming the field serde stopped at (see `field_of`).
pub fn invalid_json(error: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    // serde reads a struct from a list too, field by field in order: a list at the top is
    // no request at all, whatever its first element says.
    if error.path().to_string().starts_with('[') {
        return ApiError::BadShape {
            param: None,
            message: "invalid JSON body: expected a JSON object, not a list".into(),
        };
    }
    ApiError::BadShape {
        param: field_of(error),
        message: format!("invalid JSON body: {}", without_type_names(&error.to_string())),
    }
}

/// The error serde gave for a body of the wrong shape, found in the rejection's chain of
/// causes (axum deserialises through `serde_path_to_error`, which keeps the path).
fn serde_path_error(
    rejection: &axum::extract::rejection::JsonDataError,
) -> Option<&serde_path_to_error::Error<serde_json::Error>> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> =
        std::error::Error::source(rejection);
    while let Some(error) = cause {
        if let Some(found) = error.downcast_ref::<serde_path_to_error::Error<serde_json::Error>>() {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

/// The request field an error is about, as OpenAI's `param` names it: the path serde was
/// at (`max_tokens`, `messages[0].role`, an unknown field's own path), or for a missing
/// field that field under the path (`messages[0].content`). `None` for the body as a whole
/// (not an object, say).
fn field_of(error: &serde_path_to_error::Error<serde_json::Error>) -> Option<String> {
    let path = error.path().to_string();
    let path = (path != ".").then_some(path);
    let inner = error.inner().to_string();
    // A missing or repeated field is reported at the object that holds it.
    let missing = ["missing field `", "duplicate field `"].iter().find_map(|prefix| {
        let rest = inner.strip_prefix(prefix)?;
        Some(rest[..rest.find('`')?].to_string())
    });
    match (path, missing) {
        (Some(path), Some(field)) => Some(format!("{path}.{field}")),
        (None, Some(field)) => Some(field),
        (path, None) => path,
    }
}

/// serde names our Rust types in its messages ("expected struct JobRequest"): a caller
/// reads "a JSON object" instead.
fn without_type_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("struct ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "struct ".len()..];
        let name_end =
            after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        if name_end == 0 {
            out.push_str("struct ");
        } else {
            out.push_str("a JSON object");
        }
        rest = &after[name_end..];
    }
    out.push_str(rest);
    out
}

/// A list's `?limit=`: `default` when absent, at most `max` (a larger one gets `max`, so a
/// client asking for "everything" gets the most there is); anything but a whole number of
/// at least 1 is refused naming `limit`. Kept as text by the query types so that a bad
/// value gets this message rather than serde's.
pub fn query_limit(text: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    let Some(text) = text else { return Ok(default) };
    let shown: String = text.chars().take(32).collect();
    let digits = text.trim();
    match digits.parse::<i64>() {
        Ok(limit) if limit >= 1 => Ok(limit.min(max)),
        // Past i64 but still a whole number: over the maximum, so the maximum.
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(max),
        Ok(_) => Err(ApiError::BadParam {
            param: "limit",
            message: format!("limit `{shown}` must be at least 1"),
        }),
        Err(_) => Err(ApiError::BadParam {
            param: "limit",
            message: format!("limit `{shown}` is not a number"),
        }),
    }
}

/// `axum::extract::Query` whose rejection is our `ApiError` (`?limit=abc` gets our shape).
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        // serde_urlencoded keeps no path: a field it names (`duplicate field `limit``,
        // `unknown field …`) is the parameter at fault.
        let text = rejection.body_text();
        let param = text
            .split_once("field `")
            .and_then(|(_, rest)| Some(rest[..rest.find('`')?].to_string()));
        let detail = text.strip_prefix("Failed to deserialize query string: ").unwrap_or(&text);
        ApiError::BadShape { param, message: format!("invalid query string: {detail}") }
    }
}

/// `axum::extract::Path` whose rejection is our `ApiError`.
#[derive(Debug, Clone, Copy, Default, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(format!("invalid path: {}", rejection.body_text()))
    }
}

/// Seconds a client is asked to wait after a 503: the engine queue drains and a model loads
/// in about this time, and retrying sooner only adds load.
pub const RETRY_AFTER_SECS: u64 = 10;

/// Middleware: every 503, whoever made it (a handler, health, a webhook), carries
/// `Retry-After`, so clients and Meta's redelivery back off instead of hammering.
pub async fn add_retry_after(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(RETRY_AFTER)
    {
        response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

/// Middleware: logs the hidden cause of 5xx answers.
pub async fn log_internal_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        tracing::error!(%path, %cause, "request failed");
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_errors_name_no_rust_type() {
        assert_eq!(
            without_type_names("invalid type: sequence, expected struct JobRequest at line 1"),
            "invalid type: sequence, expected a JSON object at line 1"
        );
        assert_eq!(without_type_names("missing field `name`"), "missing field `name`");
        assert_eq!(without_type_names("a struct  b"), "a struct  b");
    }

    use super::*;

    #[test]
    fn a_limit_is_a_whole_number_from_one_and_a_large_one_gets_the_most() {
        assert_eq!(query_limit(None, 50, 200).unwrap(), 50);
        assert_eq!(query_limit(Some(" 7 "), 50, 200).unwrap(), 7);
        assert_eq!(query_limit(Some("100000"), 50, 200).unwrap(), 200);
        assert_eq!(query_limit(Some("99999999999999999999"), 50, 200).unwrap(), 200);
        for bad in ["0", "-1", "abc", "", "1.5", "-99999999999999999999"] {
            let error = query_limit(Some(bad), 50, 200).unwrap_err();
            assert_eq!((error.status(), error.param()), (StatusCode::BAD_REQUEST, Some("limit")));
        }
    }

    #[test]
    fn a_json_value_of_the_wrong_shape_names_its_field() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            role: String,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            messages: Vec<Inner>,
            max_tokens: Option<u32>,
        }
        let param = |body: serde_json::Value| {
            let error = serde_path_to_error::deserialize::<_, Outer>(body).unwrap_err();
            invalid_json(&error).param().map(str::to_string)
        };
        let messages = serde_json::json!([{"role": "user"}]);
        assert_eq!(
            param(serde_json::json!({"messages": messages, "max_tokens": -1})).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param(serde_json::json!({"messages": [{"role": "user"}, {"role": 7}]})).as_deref(),
            Some("messages[1].role")
        );
        assert_eq!(
            param(serde_json::json!({"messages": [{"role": "user"}, {}]})).as_deref(),
            Some("messages[1].role"),
            "a missing field under a path"
        );
        assert_eq!(param(serde_json::json!({})).as_deref(), Some("messages"));
        assert_eq!(
            param(serde_json::json!({"messages": messages, "n": 2})).as_deref(),
            Some("n"),
            "an unknown field"
        );
        assert_eq!(param(serde_json::json!([1])), None, "not an object");
        let error = serde_path_to_error::deserialize::<_, Outer>(serde_json::json!([1]));
        let message = invalid_json(&error.unwrap_err()).to_string();
        assert!(!message.contains("Outer"), "no Rust type in {message}");
        assert!(message.ends_with("expected a JSON object, not a list"), "{message}");
        // A field given twice (only text can say it twice) is named at its object.
        let text = r#"{"messages": [{"role": "user", "role": "user"}]}"#;
        let mut json = serde_json::Deserializer::from_str(text);
        let error = serde_path_to_error::deserialize::<_, Outer>(&mut json).unwrap_err();
        assert_eq!(invalid_json(&error).param(), Some("messages[0].role"));
    }

    #[test]
    fn a_query_string_error_names_the_parameter_serde_names() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Query {
            limit: Option<String>,
        }
        let uri: axum::http::Uri = "/x?limit=1&limit=2".parse().unwrap();
        let rejection = axum::extract::Query::<Query>::try_from_uri(&uri).unwrap_err();
        let error = ApiError::from(rejection);
        assert_eq!((error.status(), error.param()), (StatusCode::BAD_REQUEST, Some("limit")));
        assert_eq!(error.to_string(), "invalid query string: duplicate field `limit`");
    }

    #[test]
    fn a_prompt_over_the_context_is_openais_context_length_exceeded() {
        let overflow = LlmError::ContextOverflow { n_tokens: 500, answer_room: 128, n_ctx: 512 };
        let error = ApiError::from(overflow);
        assert_eq!(
            (error.status(), error.code()),
            (StatusCode::BAD_REQUEST, "context_length_exceeded")
        );
        assert!(error.to_string().contains("room for a 128-token answer"), "{error}");
        assert_eq!((error.kind(), error.param()), ("invalid_request_error", Some("messages")));
        // The WebChat API's prompt is one `message`, or stored history (regenerate).
        let webchat = error.about_prompt(Some("message"));
        assert_eq!((webchat.code(), webchat.param()), ("context_length_exceeded", Some("message")));
        assert_eq!(webchat.about_prompt(None).param(), None);
        let busy = ApiError::from(LlmError::QueueFull).about_prompt(Some("message"));
        assert_eq!((busy.kind(), busy.param()), ("server_error", None));
        let unknown = ApiError::ModelNotFound("unknown tier `gpt-4o`".into());
        assert_eq!((unknown.status(), unknown.code()), (StatusCode::NOT_FOUND, "model_not_found"));
    }
}
