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
use axum::{Json, Router};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::channels::{nextcloud, whatsapp};
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
    let Some(wa) = &state.channels.whatsapp else {
        return not_configured("whatsapp");
    };
    let mode = query.get("hub.mode").map(String::as_str);
    let token = query.get("hub.verify_token").map(String::as_str).unwrap_or_default();
    let challenge = query.get("hub.challenge");
    let token_ok: bool = token.as_bytes().ct_eq(wa.verify_token().as_bytes()).into();
    match (mode, challenge) {
        (Some("subscribe"), Some(challenge)) if token_ok => {
            tracing::info!("whatsapp: webhook verified by Meta");
            (StatusCode::OK, [("content-type", "text/plain; charset=utf-8")], challenge.clone())
                .into_response()
        }
        _ => {
            tracing::warn!("whatsapp: webhook verification refused (wrong mode or verify token)");
            reject(StatusCode::FORBIDDEN, "forbidden", "verification failed")
        }
    }
}

/// Meta's notifications: verified over the raw body, stored durably, then acknowledged.
async fn receive_whatsapp(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(wa) = state.channels.whatsapp.clone() else {
        return not_configured("whatsapp");
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(rejection),
    };
    let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
    if !whatsapp::verify_signature(wa.app_secret(), signature, &body) {
        tracing::warn!(
            present = signature.is_some(),
            "whatsapp: webhook with a bad signature, rejected"
        );
        return reject(StatusCode::UNAUTHORIZED, "bad_signature", "missing or invalid signature");
    }
    let notification = match whatsapp::parse_notification(&body) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "whatsapp: signed webhook body is not a notification");
            return reject(StatusCode::BAD_REQUEST, "bad_request", "body is not a notification");
        }
    };
    match wa.accept(&notification).await {
        Ok(accepted) => {
            tracing::debug!(?accepted, "whatsapp: webhook stored");
            if accepted.queued > 0 {
                state.channels.wake_worker();
            }
            StatusCode::OK.into_response()
        }
        // Not acknowledged: Meta redelivers, and the unique wamid keeps that safe.
        Err(e) => ApiError::Internal(format!("storing a whatsapp webhook: {e}")).into_response(),
    }
}

/// Talk bot events: verified over random ‖ raw body, stored, acknowledged at once (Talk
/// waits 5 s and never retries).
async fn receive_nextcloud(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(nc) = state.channels.nextcloud.clone() else {
        return not_configured("nextcloud");
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(rejection),
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(random), Some(signature)) =
        (header("x-nextcloud-talk-random"), header("x-nextcloud-talk-signature"))
    else {
        tracing::warn!("nextcloud: webhook without signature headers, rejected");
        return reject(StatusCode::UNAUTHORIZED, "bad_signature", "missing or invalid signature");
    };
    if !nextcloud::verify_signature(nc.bot_secret(), random, signature, &body) {
        tracing::warn!("nextcloud: webhook with a bad signature, rejected");
        return reject(StatusCode::UNAUTHORIZED, "bad_signature", "missing or invalid signature");
    }
    let activity = match nextcloud::parse_activity(&body) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "nextcloud: signed webhook body is not an activity");
            return reject(StatusCode::BAD_REQUEST, "bad_request", "body is not an activity");
        }
    };
    match nc.accept(&state.pool, &activity, random).await {
        Ok(accepted) => {
            tracing::debug!(?accepted, "nextcloud: webhook stored");
            if accepted == nextcloud::Accepted::Queued {
                state.channels.wake_worker();
            }
            StatusCode::OK.into_response()
        }
        Err(e) => ApiError::Internal(format!("storing a nextcloud webhook: {e}")).into_response(),
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: &'static str,
}

/// Our JSON error shape, for the answers `ApiError` has no variant for (signatures).
fn reject(status: StatusCode, code: &'static str, message: &'static str) -> Response {
    (status, Json(ErrorBody { error: ErrorDetail { code, message } })).into_response()
}

fn not_configured(channel: &'static str) -> Response {
    ApiError::NotFound(format!("the {channel} channel is not configured")).into_response()
}

fn body_rejected(rejection: BytesRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge.into_response();
    }
    ApiError::BadRequest(format!("unreadable body: {}", rejection.body_text())).into_response()
}
