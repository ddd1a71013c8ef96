//! The WebChat's message actions: `POST /api/conversations/{id}/regenerate` (the last answer
//! is replaced by a new one) and `POST /api/conversations/{id}/edit` (the last user message
//! is replaced and its answer with it). Both stream like `/api/chat`. Both take the optional
//! `message_id` of the message the client means, and answer 409 when the conversation has
//! moved on (a page that shows a message the server never stored must not edit the exchange
//! before it) or while another answer is being written in it. The history changes only once
//! the model accepted the new prompt, so a refused request (409, 503, …) changes nothing:
//! that is `Assistant::revise`; this module only translates HTTP.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::routing::post;
use axum::Router;
use futures::stream::Stream;
use serde::Deserialize;

use crate::assistant::{Revision, RevisionError};
use crate::db::memory;
use crate::db::message_edits::EditError;
use crate::domain::{ChannelKind, ConversationId, MessageId};
use crate::gateway::chat::{answer_sse, check_message_length, parse_tier};
use crate::gateway::conversations::parse_id;
use crate::gateway::error::{ApiError, ApiJson, ApiPath};
use crate::gateway::AppState;
use crate::llm::router::Tier;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations/{id}/regenerate", post(post_regenerate))
        .route("/api/conversations/{id}/edit", post(post_edit))
}

/// Body of `regenerate`.
#[derive(Debug, Deserialize)]
struct RegenerateRequest {
    #[serde(default)]
    tier: Option<String>,
    /// The answer to replace, which must still be the conversation's last message (or the
    /// last user message, when its answer was never stored); any last answer when absent.
    #[serde(default)]
    message_id: Option<i64>,
}

/// Body of `edit`: the new text of the last user message.
#[derive(Debug, Deserialize)]
struct EditRequest {
    message: String,
    #[serde(default)]
    tier: Option<String>,
    /// The user message to replace, which must still be the last one; any when absent.
    #[serde(default)]
    message_id: Option<i64>,
}

async fn post_regenerate(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<RegenerateRequest>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let conversation_id = webchat_conversation(&state, &id).await?;
    let tier = tier(request.tier.as_deref())?;
    let revision = Revision::Regenerate { expected: request.message_id.map(MessageId) };
    // The prompt is the stored history: no field of the request holds it.
    let events = state
        .assistant
        .revise(conversation_id, revision, tier)
        .await
        .map_err(|e| revision_error(e).about_prompt(None))?;
    Ok(answer_sse(&state, events))
}

async fn post_edit(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<EditRequest>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let conversation_id = webchat_conversation(&state, &id).await?;
    let tier = tier(request.tier.as_deref())?;
    let text = request.message.trim();
    if crate::domain::is_blank(text) {
        return Err(ApiError::BadParam {
            param: "message",
            message: "message must not be empty".into(),
        });
    }
    check_message_length("message", "message", text)?;
    let revision =
        Revision::Edit { text: text.to_string(), expected: request.message_id.map(MessageId) };
    let events = state
        .assistant
        .revise(conversation_id, revision, tier)
        .await
        .map_err(|e| revision_error(e).about_prompt(Some("message")))?;
    Ok(answer_sse(&state, events))
}

/// The conversation of the path, which must exist and be a WebChat one: the others are
/// answered on their own channel, where an edited history would not be seen.
async fn webchat_conversation(state: &AppState, id: &str) -> Result<ConversationId, ApiError> {
    let id = ConversationId(parse_id(id)?);
    match memory::get_conversation(&state.pool, id).await? {
        Some(c) if c.channel == ChannelKind::WebChat => Ok(id),
        Some(c) => Err(ApiError::BadRequest(format!(
            "conversation {} is a {} conversation: only WebChat answers can be regenerated or edited",
            id.0, c.channel
        ))),
        None => Err(ApiError::NotFound(format!("conversation {} does not exist", id.0))),
    }
}

fn tier(name: Option<&str>) -> Result<Option<Tier>, ApiError> {
    match name.map(str::trim) {
        None | Some("") => Ok(None),
        Some(name) => Ok(Some(parse_tier(name)?)),
    }
}

fn revision_error(e: RevisionError) -> ApiError {
    match e {
        RevisionError::Busy => ApiError::Conflict(e.to_string()),
        RevisionError::Edit(EditError::NoUserMessage) => ApiError::BadRequest(e.to_string()),
        RevisionError::Edit(EditError::NotLast { .. }) => ApiError::Conflict(e.to_string()),
        RevisionError::Edit(EditError::Db(e)) => e.into(),
        RevisionError::Turn(e) => e.into(),
    }
}
