//! Bearer-token authentication for `/api/*` and `/v1/*`. The token is compared with
//! `Secret::matches` (constant time, lengths hidden); the answer to a bad token never says
//! which part was wrong.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::gateway::error::ApiError;
use crate::gateway::AppState;

/// Middleware: rejects a request without `Authorization: Bearer <WEBCHAT_TOKEN>` with 401.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !has_valid_token(request.headers(), &state.webchat_token) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// Whether the headers carry the expected bearer token.
pub fn has_valid_token(headers: &HeaderMap, expected: &Secret) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    expected.matches(given.trim())
}

/// Compares two byte strings without an early exit on the first differing byte.
/// Superseded by `Secret::matches`; kept only until `gateway/cron.rs` switches to it (then
/// delete this function).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret here (tokens have a fixed, public format); content is.
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn check(header: Option<&str>, expected: bool) {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert(AUTHORIZATION, HeaderValue::from_str(h).unwrap());
        }
        let expected_token = Secret::new("0123456789abcdef0123");
        assert_eq!(has_valid_token(&headers, &expected_token), expected, "{header:?}");
    }

    #[test]
    fn bearer_token_checks() {
        check(Some("Bearer 0123456789abcdef0123"), true);
        check(Some("bearer 0123456789abcdef0123"), true);
        check(Some("Bearer 0123456789abcdef0124"), false);
        check(Some("Bearer 0123456789abcdef012"), false);
        check(Some("Basic 0123456789abcdef0123"), false);
        check(Some("0123456789abcdef0123"), false);
        check(None, false);
    }
}
