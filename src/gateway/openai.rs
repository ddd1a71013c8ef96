//! (placeholder: being written) gateway feature `openai`.

use axum::Router;

use crate::gateway::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
}
