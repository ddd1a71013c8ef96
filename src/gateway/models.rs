//! (placeholder until the router lands) `GET /api/models` and the model part of health.

use axum::Router;
use serde_json::Value;

use crate::gateway::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}

pub async fn tiers_json(_state: &AppState) -> Value {
    Value::Null
}

pub fn zai_json(_state: &AppState) -> Value {
    Value::Null
}
