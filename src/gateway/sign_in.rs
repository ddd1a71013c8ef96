//! One-time sign-in codes. A sign-in link carries a code, never the WebChat token: a link
//! stays in the browser's history, the terminal's scrollback and wherever it was pasted,
//! and the token, which opens everything, must not. A code signs in once, within
//! `CODE_LIFETIME`: the page exchanges it at `POST /api/sign-in` for the token, which it
//! keeps as it keeps a typed one.
//!
//! Owns the live codes (in memory only: a restart forgets them) and the two endpoints that
//! issue and redeem them. Must not check bearer tokens itself (`auth.rs` guards the issuing
//! endpoint like every protected route).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::gateway::error::{ApiError, ApiJson};
use crate::gateway::AppState;

/// How long a code can be redeemed after it was issued.
pub const CODE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Codes alive at once; issuing one more forgets the oldest. Bounds the memory an endless
/// stream of (authenticated) issue requests could take.
const MAX_LIVE_CODES: usize = 16;

/// The codes not yet redeemed. Cheap to clone; clones share the codes.
#[derive(Clone, Default)]
pub struct SignInCodes {
    live: Arc<Mutex<Vec<LiveCode>>>,
}

struct LiveCode {
    code: Secret,
    expires: Instant,
}

impl SignInCodes {
    /// A new code: 128 random bits as 32 hex characters, valid for `CODE_LIFETIME`.
    pub fn issue(&self) -> Secret {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let code = Secret::new(hex::encode(bytes));
        let mut live = self.lock();
        let now = Instant::now();
        live.retain(|c| c.expires > now);
        if live.len() >= MAX_LIVE_CODES {
            live.remove(0);
        }
        live.push(LiveCode { code: code.clone(), expires: now + CODE_LIFETIME });
        code
    }

    /// Whether `given` is a live code; a code that matches is spent. Every live code is
    /// compared (in constant time, `Secret::matches`), so the time taken says nothing of
    /// which one was close.
    pub fn redeem(&self, given: &str) -> bool {
        let mut live = self.lock();
        let now = Instant::now();
        live.retain(|c| c.expires > now);
        let mut found = None;
        for (i, c) in live.iter().enumerate() {
            if c.code.matches(given) {
                found = Some(i);
            }
        }
        match found {
            Some(i) => {
                live.remove(i);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<LiveCode>> {
        // Each update is one retain, push or remove: a panic elsewhere leaves it whole.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `POST /api/sign-in` (public): the page's exchange of a code for the token.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/api/sign-in", post(post_sign_in))
}

/// `POST /api/sign-in/codes` (behind the token): a new code, for `my-claw sign-in-link`.
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
    if !state.sign_in.redeem(body.code.trim()) {
        return Err(ApiError::WrongSecret(
            "this sign-in link was already used or has expired (a link works once, for 10 \
             minutes): sign in with the token, or make a new link with `my-claw sign-in-link`"
                .into(),
        ));
    }
    Ok(no_store(ApiJson(Token { token: state.webchat_token.expose() })))
}

async fn post_code(State(state): State<AppState>) -> Response {
    let code = state.sign_in.issue();
    no_store(ApiJson(Issued { code: code.expose(), expires_in_seconds: CODE_LIFETIME.as_secs() }))
}

/// Answers carrying a secret are never kept by a cache.
fn no_store(body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_signs_in_once() {
        let codes = SignInCodes::default();
        let first = codes.issue();
        let second = codes.issue();
        assert_eq!(first.expose().len(), 32);
        assert_ne!(first.expose(), second.expose());
        assert!(!codes.redeem("0123456789abcdef0123456789abcdef"));
        assert!(!codes.redeem(""));
        assert!(codes.redeem(first.expose()));
        assert!(!codes.redeem(first.expose()), "spent");
        assert!(codes.redeem(second.expose()), "the other code is still live");
    }

    #[test]
    fn expired_codes_and_the_oldest_beyond_the_bound_are_forgotten() {
        let codes = SignInCodes::default();
        let old = codes.issue();
        codes.lock()[0].expires = Instant::now() - Duration::from_secs(1);
        assert!(!codes.redeem(old.expose()), "expired");

        let issued: Vec<Secret> = (0..=MAX_LIVE_CODES).map(|_| codes.issue()).collect();
        assert_eq!(codes.lock().len(), MAX_LIVE_CODES);
        assert!(!codes.redeem(issued[0].expose()), "the oldest went");
        assert!(codes.redeem(issued[MAX_LIVE_CODES].expose()));
    }
}
