//! `GET /api/search?q=…`: every message of every channel matching the words typed, newest
//! first, with its conversation and a snippet whose matches are marked as separate parts
//! (never as HTML). The query itself is `db::search`'s business.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::db::search::{self, SearchError, SearchHit};
use crate::gateway::error::{query_limit, ApiError, ApiJson, ApiQuery};
use crate::gateway::AppState;

const DEFAULT_RESULTS: i64 = 30;
const MAX_RESULTS: i64 = 100;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/search", get(get_search))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    /// Kept as text so that a bad value gets a clear message.
    #[serde(default)]
    limit: Option<String>,
}

#[derive(Debug, Serialize)]
struct SearchResponse {
    query: String,
    results: Vec<SearchResultJson>,
}

#[derive(Debug, Serialize)]
struct SearchResultJson {
    message_id: i64,
    conversation_id: i64,
    conversation_title: Option<String>,
    channel: String,
    role: String,
    created_at: i64,
    snippet: Vec<SnippetPartJson>,
}

#[derive(Debug, Serialize)]
struct SnippetPartJson {
    text: String,
    /// Whether this part is a matched word.
    mark: bool,
}

async fn get_search(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<ApiJson<SearchResponse>, ApiError> {
    let limit = query_limit(query.limit.as_deref(), DEFAULT_RESULTS, MAX_RESULTS)?;
    let hits = match search::search_messages(&state.pool, &query.q, limit).await {
        Ok(hits) => hits,
        Err(SearchError::Db(e)) => return Err(e.into()),
        Err(e) => return Err(ApiError::BadParam { param: "q", message: e.to_string() }),
    };
    Ok(ApiJson(SearchResponse {
        query: query.q,
        results: hits.into_iter().map(result_json).collect(),
    }))
}

fn result_json(hit: SearchHit) -> SearchResultJson {
    SearchResultJson {
        message_id: hit.message_id,
        conversation_id: hit.conversation_id,
        conversation_title: hit.conversation_title,
        channel: hit.channel,
        role: hit.role,
        created_at: hit.created_at,
        snippet: hit
            .snippet
            .into_iter()
            .map(|p| SnippetPartJson { text: p.text, mark: p.mark })
            .collect(),
    }
}
