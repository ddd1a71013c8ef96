//! One-time sign-in codes. A sign-in link carries a code, never the WebChat token: a link
//! stays in the browser's history, the terminal's scrollback and wherever it was pasted,
//! and the token, which opens everything, must not. A code signs in once, within
//! `CODE_LIFETIME`: the page exchanges it at `POST /api/sign-in` for the token, which it
//! keeps as it keeps a typed one.
//!
//! Owns the two endpoints that issue and redeem codes; the codes live in the database
//! (`db::sign_in`), where `my-claw sign-in-link` writes them too. Must not check bearer
//! tokens itself (`auth.rs` guards the issuing endpoint like every protected route).

use std::time::Duration;

use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::gateway::error::{ApiError, ApiJson};
use crate::gateway::AppState;

/// How long a code can be redeemed after it was issued.
pub const CODE_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// `POST /api/sign-in` (public): the page's exchange of a code for the token.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/api/sign-in", post(post_sign_in))
}

/// `POST /api/sign-in/codes` (behind the token): a new code, for a client that holds the
/// token and wants a link for another device.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/sign-in/codes", post(post_code))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Redeem {
    code: String,
}

#[derive(Serialize)]
struct Token<'a> {
    token: &'a str,
}

#[derive(Serialize)]
struct Issued<'a> {
    code: &'a str,
    expires_in_seconds: u64,
}

async fn post_sign_in(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Redeem>,
) -> Result<Response, ApiError> {
    // Spent once, whoever else tries it at the same moment (see `db::sign_in::redeem`).
    if !crate::db::sign_in::redeem(&state.pool, body.code.trim()).await? {
        return Err(ApiError::WrongSecret(
            "this sign-in link was already used or has expired (a link works once, for 10 \
             minutes): sign in with the token, or make a new link with `my-claw sign-in-link`"
                .into(),
        ));
    }
    Ok(no_store(ApiJson(Token { token: state.webchat_token.expose() })))
}

async fn post_code(State(state): State<AppState>) -> Result<Response, ApiError> {
    let code = crate::db::sign_in::issue(&state.pool, CODE_LIFETIME).await?;
    Ok(no_store(ApiJson(Issued {
        code: code.expose(),
        expires_in_seconds: CODE_LIFETIME.as_secs(),
    })))
}

/// Answers carrying a secret are never kept by a cache.
fn no_store(body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
