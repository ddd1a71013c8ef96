//! Conversation history over HTTP: list, messages (with the privacy ledger of each answer),
//! rename and delete (which first takes the conversation's scheduled jobs off it, through
//! the scheduler when one runs). Storage is `db::memory`'s; this module only shapes the JSON.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, patch};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};

use crate::cron::CronHandle;
use crate::db::memory::{self, Conversation, ConversationSummary, StoredMessage};
use crate::domain::{ConversationId, ToolRound};
use crate::gateway::error::{query_limit, ApiError, ApiJson, ApiPath, ApiQuery};
use crate::gateway::AppState;

/// Most conversations one list answer carries.
const MAX_CONVERSATIONS: i64 = 500;
/// Most messages one history answer carries (the newest ones).
const MAX_MESSAGES: i64 = 2000;
/// Longest accepted title, in characters.
const MAX_TITLE_CHARS: usize = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", get(list_conversations))
        .route("/api/conversations/{id}", patch(rename_conversation).delete(delete_conversation))
        .route("/api/conversations/{id}/messages", get(list_messages))
}

#[derive(Debug, Serialize)]
pub struct ConversationJson {
    pub id: i64,
    /// `webchat`, `whatsapp` or `nextcloud`: only WebChat conversations accept new messages
    /// from the page.
    pub channel: &'static str,
    pub title: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_count: Option<i64>,
    /// Whether any answer in it came from a provider outside this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_machine: Option<bool>,
    /// In the list: whether an answer is being written in it now, whoever asked for it (a
    /// page, a scheduled job, a channel message); a page follows it through
    /// `GET /api/conversations/{id}/live` once it has started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answering: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct MessageJson {
    pub id: i64,
    pub role: &'static str,
    pub content: String,
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// `complete`, `partial` (stopped or failed mid-way) or `error`.
    pub status: &'static str,
    /// Whether producing this message sent the conversation outside the machine.
    pub left_machine: bool,
    /// The host that produced an answer (`gpu-box:8000`, `api.z.ai`); absent in-process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub created_at: i64,
    /// Why an answer failed, as its page said when it happened; absent when it completed or
    /// the user stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How an answer sent on WhatsApp or Talk fared (`sending`, `sent`, `delivered`, `read`,
    /// `failed`, `unknown`), and why it failed; absent for what no channel carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_error: Option<String>,
    /// The tools the assistant used for this answer, round by round (empty when none):
    /// shown compactly by the page, and part of the privacy ledger.
    pub tool_rounds: Vec<ToolRoundJson>,
}

/// One round of tool use: the text written before the calls, the calls, their results.
#[derive(Debug, Serialize)]
pub struct ToolRoundJson {
    pub text: String,
    pub calls: Vec<ToolCallJson>,
    pub results: Vec<ToolResultJson>,
}

#[derive(Debug, Serialize)]
pub struct ToolCallJson {
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it.
    pub arguments: String,
}

#[derive(Debug, Serialize)]
pub struct ToolResultJson {
    pub call_id: String,
    pub content: String,
    pub is_error: bool,
}

impl From<ToolRound> for ToolRoundJson {
    fn from(round: ToolRound) -> Self {
        ToolRoundJson {
            text: round.text,
            calls: round
                .calls
                .into_iter()
                .map(|c| ToolCallJson { id: c.id, name: c.name, arguments: c.arguments })
                .collect(),
            results: round
                .results
                .into_iter()
                .map(|r| ToolResultJson {
                    call_id: r.call_id,
                    content: r.content,
                    is_error: r.is_error,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ConversationList {
    conversations: Vec<ConversationJson>,
}

#[derive(Debug, Serialize)]
struct MessageList {
    conversation: ConversationJson,
    messages: Vec<MessageJson>,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    /// Kept as text so that a bad value gets a message naming it.
    limit: Option<String>,
}

impl ListQuery {
    fn limit(&self, max: i64) -> Result<i64, ApiError> {
        query_limit(self.limit.as_deref(), max, max)
    }
}

#[derive(Debug, Deserialize)]
struct RenameRequest {
    title: String,
}

async fn list_conversations(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiJson<ConversationList>, ApiError> {
    let limit = query.limit(MAX_CONVERSATIONS)?;
    let summaries = memory::list_conversations(&state.pool, limit).await?;
    let conversations = summaries
        .into_iter()
        .map(|summary| {
            let id = summary.conversation.id;
            // The assistant's turn covers every answer, from before its prompt is read until
            // it is stored; `live` every answer from its first event until its last one is
            // read (a page's relay can read on a moment after the turn is passed on).
            let live = state.assistant.live();
            let answering = live.is_running(id) || state.assistant.turns_queued(id) > 0;
            ConversationJson { answering: Some(answering), ..summary_json(summary) }
        })
        .collect();
    Ok(ApiJson(ConversationList { conversations }))
}

async fn list_messages(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ApiJson<MessageList>, ApiError> {
    let conversation = find_conversation(&state, parse_id(&id)?).await?;
    let limit = query.limit(MAX_MESSAGES)?;
    let messages = memory::history(&state.pool, conversation.id, limit).await?;
    Ok(ApiJson(MessageList {
        conversation: conversation_json(conversation),
        messages: messages.into_iter().map(message_json).collect(),
    }))
}

async fn rename_conversation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<RenameRequest>,
) -> Result<ApiJson<ConversationJson>, ApiError> {
    let id = parse_id(&id)?;
    let title = request.title.trim();
    // A title of control or invisible characters only (a NUL) shows as nothing in the list.
    if crate::domain::is_blank(title) {
        return Err(ApiError::BadParam {
            param: "title",
            message: "title must not be empty".into(),
        });
    }
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::BadParam {
            param: "title",
            message: format!("title is longer than {MAX_TITLE_CHARS} characters"),
        });
    }
    if !memory::rename_conversation(&state.pool, ConversationId(id), title).await? {
        return Err(not_found(id));
    }
    state.assistant.announce_renamed(ConversationId(id));
    let conversation = find_conversation(&state, id).await?;
    Ok(ApiJson(conversation_json(conversation)))
}

async fn delete_conversation(
    State(state): State<AppState>,
    cron: Option<Extension<CronHandle>>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    // An answer still streaming into it is stopped and stored first (it would otherwise
    // fail to store into a conversation that is gone), and none starts until it is gone.
    let _hold = state.assistant.quiesce(ConversationId(id)).await;
    // Its scheduled jobs first: none may fire into it while it goes, or keep its id.
    if let Some(Extension(cron)) = cron {
        cron.detach_conversation(ConversationId(id)).await?;
    }
    let conversation = find_conversation(&state, id).await?;
    if !memory::delete_conversation(&state.pool, ConversationId(id)).await? {
        return Err(not_found(id));
    }
    // The texts of its channel messages, kept in the inbound queue for answering them, go
    // with it (their ids stay, so a redelivery is still recognised).
    if conversation.channel != crate::domain::ChannelKind::WebChat {
        let key = &conversation.external_key;
        crate::db::inbound::forget_conversation_payloads(&state.pool, conversation.channel, key)
            .await?;
    }
    state.assistant.announce_deleted(ConversationId(id));
    Ok(StatusCode::NO_CONTENT)
}

async fn find_conversation(state: &AppState, id: i64) -> Result<Conversation, ApiError> {
    match memory::get_conversation(&state.pool, ConversationId(id)).await? {
        Some(conversation) => Ok(conversation),
        None => Err(not_found(id)),
    }
}

/// Parses a conversation id from the path, with an error in our JSON shape.
pub fn parse_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .map_err(|_| ApiError::BadRequest(format!("`{text}` is not a conversation id")))
}

/// The 404 of conversation `id`.
pub fn not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("conversation {id} does not exist"))
}

fn conversation_json(c: Conversation) -> ConversationJson {
    ConversationJson {
        id: c.id.0,
        channel: c.channel.as_str(),
        title: c.title,
        created_at: c.created_at,
        updated_at: c.updated_at,
        message_count: None,
        left_machine: None,
        answering: None,
    }
}

fn summary_json(s: ConversationSummary) -> ConversationJson {
    ConversationJson {
        message_count: Some(s.message_count),
        left_machine: Some(s.left_machine),
        ..conversation_json(s.conversation)
    }
}

fn message_json(m: StoredMessage) -> MessageJson {
    // Decided when the answer was written (see migration 0006), like the list's badge.
    let left_machine = m.left_machine;
    MessageJson {
        id: m.id.0,
        role: m.role.as_str(),
        content: m.content,
        tier: m.tier,
        provider: m.provider,
        model: m.model,
        status: m.status.as_str(),
        left_machine,
        host: m.host,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
        created_at: m.created_at,
        error: m.failure,
        delivery_status: m.delivery_status,
        delivery_error: m.delivery_error,
        tool_rounds: m.tool_rounds.into_iter().map(ToolRoundJson::from).collect(),
    }
}
