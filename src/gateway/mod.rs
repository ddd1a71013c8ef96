//! The HTTP gateway: the only module that knows axum. It merges one router per feature,
//! puts the bearer-token check in front of `/api/*` and `/v1/*`, answers unknown routes and
//! methods in the API's JSON error shape, limits body sizes and traces requests. Handlers
//! are free `async fn`s over `AppState`.

pub mod auth;
pub mod chat;
pub mod conversations;
pub mod cron;
pub mod error;
pub mod events;
pub mod export;
pub mod health;
pub mod import;
pub mod listener;
pub mod live;
pub mod message_actions;
pub mod models;
pub mod openai;
pub mod search;
pub mod settings;
pub mod sign_in;
pub mod stop;
pub mod webchat;
pub mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{middleware, Router};
use sqlx::SqlitePool;
use tower_http::trace::TraceLayer;

use crate::assistant::Assistant;
use crate::config::Secret;
use crate::gateway::error::ApiError;

/// Everything a handler may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: SqlitePool,
    pub assistant: Arc<Assistant>,
    pub webchat_token: Secret,
    pub started_at: Instant,
    pub data_dir: Arc<PathBuf>,
    pub max_body_bytes: usize,
    /// Reply length when a `/v1` client sets none (`REPLY_MAX_TOKENS`).
    pub reply_max_tokens: u32,
    pub channels: crate::channels::Channels,
}

/// The whole HTTP surface of my-claw.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .merge(chat::router())
        .merge(conversations::router())
        .merge(cron::router())
        .merge(events::router())
        .merge(models::router())
        .merge(settings::router())
        .merge(openai::router())
        .merge(search::router())
        .merge(export::router())
        .merge(import::router())
        .merge(message_actions::router())
        .merge(live::router())
        .merge(sign_in::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token))
        // `route_layer` guards the routes' methods, not their 405 fallback: that one checks
        // the token itself, so a caller without it learns no more than from any other
        // protected route.
        .method_not_allowed_fallback(protected_method_not_allowed);
    let public = Router::new()
        .route("/api/health", get(health::get_health))
        .merge(webchat::router())
        .merge(sign_in::public_router())
        .merge(cron::trigger_router())
        .merge(webhooks::router())
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .merge(public)
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(error::log_internal_errors))
        .layer(middleware::from_fn(error::add_retry_after))
        // Spans carry the path only: query strings can hold secrets (`hub.verify_token`,
        // the WebChat `?token=` link), and logs must never show them.
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::extract::Request| {
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

/// Any path no route serves, with or without a token: a 404 in the API's error shape that
/// says only that, so it tells no caller which routes exist or what they would need.
async fn not_found() -> ApiError {
    ApiError::NotFound("not found".into())
}

/// A public route asked with a method it does not serve (axum adds the `Allow` header).
async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A protected route asked with a method it does not serve: 401 without the token, as the
/// route's own methods answer, else 405.
async fn protected_method_not_allowed(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> ApiError {
    if auth::has_valid_token(&headers, &state.webchat_token) {
        ApiError::MethodNotAllowed
    } else {
        ApiError::Unauthorized
    }
}
