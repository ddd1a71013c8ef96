//! Channel webhooks: `/api/webhook/whatsapp` (GET verification, POST notifications) and
//! `/api/webhook/nextcloud` (POST bot events). Public routes: they authenticate by signature
//! over the raw body, never by the bearer token. They only verify, parse and store (through
//! `channels`), then answer; the queue worker does the rest. No SQL and no model here.
//!
//! Responses: 404 when the channel is not configured; 401 for a missing or bad signature;
//! 400 for a body that is not JSON; 413 above `MAX_BODY_BYTES`; 500 when storing failed
//! (Meta then redelivers); 200 otherwise, including for payloads that are ignored.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::channels::ChannelError;
use crate::domain::ChannelKind;
use crate::gateway::error::ApiError;
use crate::gateway::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/webhook/whatsapp", get(verify_whatsapp).post(receive_whatsapp))
        .route("/api/webhook/nextcloud", post(receive_nextcloud))
}

/// Meta's subscription handshake: echo `hub.challenge` as plain text when the mode is
/// `subscribe` and the verify token matches; 403 otherwise.
async fn verify_whatsapp(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(channel) = state.channels.get(ChannelKind::WhatsApp) else {
        return not_configured(ChannelKind::WhatsApp);
    };
    match channel.handshake(&query) {
        Ok(challenge) => {
            tracing::info!("whatsapp: webhook verified by Meta");
            (StatusCode::OK, [("content-type", "text/plain; charset=utf-8")], challenge)
                .into_response()
        }
        Err(_) => {
            tracing::warn!("whatsapp: webhook verification refused (wrong mode or verify token)");
            ApiError::Forbidden("verification failed".into()).into_response()
        }
    }
}

/// Meta's notifications: verified over the raw body, stored durably, then acknowledged.
async fn receive_whatsapp(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, ChannelKind::WhatsApp, headers, body).await
}

/// Talk bot events: verified over random ‖ raw body, stored, acknowledged at once (Talk
/// waits 5 s and never retries).
async fn receive_nextcloud(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    receive(state, ChannelKind::Nextcloud, headers, body).await
}

/// One path for every channel: the signature over the raw bytes first, then parsing, then
/// storing; 200 only once what the body carries is durable. One unreadable message of a
/// batch is stored as `rejected` by the channel's parser and does not fail the batch.
async fn receive(
    state: AppState,
    kind: ChannelKind,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(channel) = state.channels.get(kind).cloned() else {
        return not_configured(kind);
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(rejection),
    };
    if !channel.verify(&headers, &body) {
        tracing::warn!(channel = %kind, "webhook with a missing or bad signature, rejected");
        return ApiError::BadSignature.into_response();
    }
    let intakes = match channel.parse(&headers, &body) {
        Ok(intakes) => intakes,
        Err(ChannelError::BadPayload(reason)) => {
            // The reason never quotes the body (`lenient::describe_json_error`).
            tracing::warn!(channel = %kind, reason = ?reason, "signed webhook body unreadable");
            return ApiError::BadRequest("body is not a notification".into()).into_response();
        }
        Err(e) => {
            return ApiError::Internal(format!("reading a {kind} webhook: {e}")).into_response()
        }
    };
    match state.channels.store(&state.pool, kind, &intakes).await {
        Ok(accepted) => {
            tracing::debug!(channel = %kind, ?accepted, "webhook stored");
            StatusCode::OK.into_response()
        }
        // Not acknowledged: Meta redelivers, and the unique message ids keep that safe.
        Err(e) => ApiError::Internal(format!("storing a {kind} webhook: {e}")).into_response(),
    }
}

fn not_configured(channel: ChannelKind) -> Response {
    ApiError::NotFound(format!("the {channel} channel is not configured")).into_response()
}

fn body_rejected(rejection: BytesRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge.into_response();
    }
    ApiError::BadRequest(format!("unreadable body: {}", rejection.body_text())).into_response()
}
