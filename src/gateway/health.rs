//! `GET /api/health`: is the assistant usable? Anonymous callers get only `status`; with the
//! bearer token the answer details the database, each model tier, Z.ai, the last bench and the
//! inbound channel queue (pending, retrying, failed…).
//!
//! `ok` (200) when the database can be read and can take a write; `degraded` (503) when it
//! can be read but not written (a full disk, a read-only file): history, search and exports
//! still work, but every chat and every webhook message would be refused, so a monitor that
//! only looks at the status code must see it; `unavailable` (503) when it cannot be read.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use crate::gateway::auth::has_valid_token;
use crate::gateway::AppState;

#[derive(Serialize)]
struct Anonymous {
    status: &'static str,
}

#[derive(Serialize)]
struct Detailed {
    status: &'static str,
    version: &'static str,
    uptime_secs: u64,
    database: DatabaseHealth,
    models: Value,
    zai: Value,
    last_bench: Option<Value>,
    /// The inbound channel queue; `None` when it cannot be read.
    inbound_queue: Option<QueueHealth>,
}

/// Channel messages by state: nothing sits unanswered without showing here.
#[derive(Serialize)]
struct QueueHealth {
    pending: i64,
    retrying: i64,
    processing: i64,
    failed: i64,
    rejected: i64,
    delivery_unknown: i64,
}

#[derive(Serialize)]
struct DatabaseHealth {
    /// Readable and writable.
    ok: bool,
    /// Can take a write now (`false` too when it cannot even be read).
    writable: bool,
    migration_version: Option<i64>,
    /// Why it cannot be read, or else why it cannot be written.
    error: Option<String>,
}

pub async fn get_health(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let db = crate::db::health(&state.pool).await;
    let (status_code, status) = match &db {
        Ok(h) if h.write_error.is_none() => (StatusCode::OK, "ok"),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    if !has_valid_token(&headers, &state.webchat_token) {
        return (status_code, Json(Anonymous { status })).into_response();
    }
    let database = match db {
        Ok(h) => DatabaseHealth {
            ok: h.write_error.is_none(),
            writable: h.write_error.is_none(),
            migration_version: Some(h.migration_version),
            error: h.write_error,
        },
        Err(e) => DatabaseHealth {
            ok: false,
            writable: false,
            migration_version: None,
            error: Some(e.to_string()),
        },
    };
    let body = Detailed {
        status,
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started_at.elapsed().as_secs(),
        database,
        models: crate::gateway::models::tiers_json(&state).await,
        zai: crate::gateway::models::zai_json(&state),
        last_bench: read_last_bench(&state.data_dir),
        inbound_queue: crate::db::inbound::counts(&state.pool).await.ok().map(|c| QueueHealth {
            pending: c.pending,
            retrying: c.retrying,
            processing: c.processing,
            failed: c.failed,
            rejected: c.rejected,
            delivery_unknown: c.delivery_unknown,
        }),
    };
    (status_code, Json(body)).into_response()
}

/// The last `--bench` result saved on this machine, if any.
fn read_last_bench(data_dir: &std::path::Path) -> Option<Value> {
    let text = std::fs::read_to_string(data_dir.join("bench").join("last.json")).ok()?;
    serde_json::from_str(&text).ok()
}
