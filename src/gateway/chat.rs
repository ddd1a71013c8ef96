//! `POST /api/chat`: one WebChat turn answered as Server-Sent Events, and
//! `POST /api/chat/{conversation_id}/stop`. This module only translates between HTTP and
//! `Assistant` events; storing, prompting and routing are the assistant's business.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::post;
use axum::Router;
use futures::stream::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::assistant::{Assistant, Event};
use crate::config::MAX_MESSAGE_CHARS;
use crate::domain::{ChannelKind, ConversationId, Inbound};
use crate::gateway::error::{ApiError, ApiJson, ApiPath};
use crate::gateway::events::shutdown_requested;
use crate::gateway::live;
use crate::gateway::AppState;
use crate::llm::router::Tier;
use crate::llm::{FinishReason, Usage};

/// A 400 naming `field` (request field `param`) when `text` is longer than
/// `MAX_MESSAGE_CHARS` characters.
pub fn check_message_length(param: &'static str, field: &str, text: &str) -> Result<(), ApiError> {
    // Counting stops just past the limit, so a huge text costs no more than a long one.
    let chars = text.chars().take(MAX_MESSAGE_CHARS + 1).count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(ApiError::BadParam {
            param,
            message: format!(
                "{field} is longer than {MAX_MESSAGE_CHARS} characters; send a shorter one"
            ),
        });
    }
    Ok(())
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/chat", post(post_chat))
        .route("/api/chat/{conversation_id}/stop", post(post_stop))
}

/// Body of `POST /api/chat`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation to continue; a new one is created when absent.
    #[serde(default)]
    pub conversation_id: Option<i64>,
    pub message: String,
    /// A tier name (`fast`, `smart`, `main`, `code`, `reason`); the default tier when absent.
    #[serde(default)]
    pub tier: Option<String>,
}

/// One `data:` object of the chat stream, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    Meta {
        conversation_id: i64,
        tier: String,
        provider: String,
        model: String,
        /// Whether this answer is produced outside the machine (the privacy ledger).
        leaves_machine: bool,
        /// The host of a network provider (`gpu-box:8000`); absent in-process.
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// The stored id of the user message this answer is written for (the one just sent,
        /// edited or answered again), so a page can act on it later; absent when unknown.
        #[serde(skip_serializing_if = "Option::is_none")]
        user_message_id: Option<i64>,
    },
    Token {
        text: String,
    },
    Notice {
        kind: String,
        message: String,
    },
    /// The model called a tool (sent as the named SSE event `tool_call`). `arguments` is
    /// the model's JSON text: untrusted, shown as text only.
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
    /// A tool call's result (the named SSE event `tool_result`), before the model goes on.
    ToolResult {
        call_id: String,
        name: String,
        content: String,
        is_error: bool,
    },
    /// The answer's end. `message_id` is the stored answer's, or `null` when it was stopped
    /// before it wrote anything (or ran a tool) and nothing was stored: the question is then
    /// the conversation's last message, unanswered.
    Done {
        message_id: Option<i64>,
        finish: &'static str,
        usage: UsageJson,
        timings: TimingsJson,
    },
    Error {
        message: String,
        partial_message_id: Option<i64>,
    },
}

#[derive(Debug, Serialize)]
pub struct UsageJson {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Serialize)]
pub struct TimingsJson {
    pub prefill_ms: u64,
    pub decode_ms: u64,
    pub ttft_ms: u64,
    pub total_ms: u64,
    /// Decode speed of this answer; 0 when nothing was decoded.
    pub decode_tok_s: f64,
}

#[derive(Debug, Serialize)]
struct StopResponse {
    stopped: bool,
}

/// Starts a turn and streams its events. Validation errors are plain JSON errors (400/404)
/// because no stream has started yet; failures after that arrive as an `error` event.
async fn post_chat(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    if crate::domain::is_blank(&request.message) {
        return Err(ApiError::BadParam {
            param: "message",
            message: "message must not be empty".into(),
        });
    }
    // Checked before anything is stored: a rejected message leaves no trace.
    check_message_length("message", "message", &request.message)?;
    let tier = match request.tier.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name) => Some(parse_tier(name)?),
    };
    let conversation_key = match request.conversation_id {
        Some(id) => id.to_string(),
        None => String::new(),
    };
    let inbound = Inbound {
        channel: ChannelKind::WebChat,
        conversation_key,
        sender: "webchat".into(),
        text: request.message,
        external_id: None,
    };
    let events = state
        .assistant
        .start(inbound, tier)
        .await
        .map_err(|e| ApiError::from(e).about_prompt(Some("message")))?;
    Ok(answer_sse(&state, events))
}

/// The SSE response that carries one answer's events (also used by the WebChat's
/// regenerate and edit actions). The answer is relayed by a task of its own
/// (`live::relay`): when the client disconnects, it is still written to its end and stored,
/// and other pages can follow it; Stop (`/api/chat/{id}/stop`) or a shutdown stops it.
pub fn answer_sse(
    state: &AppState,
    events: mpsc::Receiver<Event>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let forwarded = Box::pin(stop_on_shutdown(state.assistant.clone(), events));
    let relayed =
        tokio_stream::wrappers::ReceiverStream::new(live::relay(state.assistant.live(), forwarded));
    let stream = relayed.map(|event| {
        let event = chat_event(event);
        // Tool events also carry an SSE event name, so a client can listen to them alone;
        // every event keeps its `type` for readers of the plain `data:` lines.
        let name = match &event {
            ChatEvent::ToolCall { .. } => Some("tool_call"),
            ChatEvent::ToolResult { .. } => Some("tool_result"),
            _ => None,
        };
        let sse = sse_event(&event);
        Ok(match name {
            Some(name) => sse.event(name),
            None => sse,
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Forwards the events of one answer. The graceful shutdown waits for open responses, and
/// an answer on a slow machine can take minutes: on SIGINT/SIGTERM the answer is stopped
/// (stored as `partial`, ended with a `done` event) so the server exits promptly.
fn stop_on_shutdown(
    assistant: Arc<Assistant>,
    events: mpsc::Receiver<Event>,
) -> impl Stream<Item = Event> {
    let shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(shutdown_requested());
    let forward =
        Forward { assistant, events, shutdown: Some(shutdown), id: None, stopping: false };
    futures::stream::unfold(forward, |mut forward| async move {
        let event = forward.next().await?;
        Some((event, forward))
    })
}

/// The state of `stop_on_shutdown`'s stream.
struct Forward {
    assistant: Arc<Assistant>,
    events: mpsc::Receiver<Event>,
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    id: Option<ConversationId>,
    stopping: bool,
}

impl Forward {
    async fn next(&mut self) -> Option<Event> {
        loop {
            let received = match self.shutdown.as_mut() {
                Some(signal) => tokio::select! {
                    event = self.events.recv() => event,
                    _ = signal => {
                        self.shutdown = None;
                        self.stopping = true;
                        if let Some(id) = self.id {
                            self.assistant.shutting_down();
                            self.assistant.stop(id);
                        }
                        continue;
                    }
                },
                None => self.events.recv().await,
            };
            let event = received?;
            if let Event::Meta { conversation_id, .. } = &event {
                self.id = Some(*conversation_id);
                if self.stopping {
                    self.assistant.stop(*conversation_id);
                }
            }
            return Some(event);
        }
    }
}

/// Longest a stop request waits for the stopped answer to be stored.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Stops the running answer of a conversation and answers once it is stored (or, stopped
/// before it wrote anything, dropped), so the page's next action finds the conversation at
/// rest. `stopped` is false when nothing was running.
async fn post_stop(
    State(state): State<AppState>,
    ApiPath(conversation_id): ApiPath<String>,
) -> Result<ApiJson<StopResponse>, ApiError> {
    let id = ConversationId(crate::gateway::conversations::parse_id(&conversation_id)?);
    let stopped = state.assistant.stop_and_wait(id, STOP_WAIT).await;
    // Nothing stopped: `false`, unless there is no such conversation at all (as `/live`).
    if !stopped && crate::db::memory::get_conversation(&state.pool, id).await?.is_none() {
        return Err(crate::gateway::conversations::not_found(id.0));
    }
    Ok(ApiJson(StopResponse { stopped }))
}

/// Parses a tier name with an error that lists the valid ones.
pub fn parse_tier(name: &str) -> Result<Tier, ApiError> {
    Tier::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Tier::ALL.iter().map(|t| t.as_str()).collect();
        ApiError::BadParam {
            param: "tier",
            message: format!("unknown tier `{name}`: expected one of {}", names.join(", ")),
        }
    })
}

/// The wire form of an assistant event.
pub fn chat_event(event: Event) -> ChatEvent {
    match event {
        Event::Meta {
            conversation_id,
            tier,
            provider,
            model,
            host,
            leaves_machine,
            user_message_id,
        } => ChatEvent::Meta {
            conversation_id: conversation_id.0,
            tier: tier.as_str().to_string(),
            leaves_machine,
            provider,
            model,
            host,
            user_message_id: user_message_id.map(|id| id.0),
        },
        Event::Token(text) => ChatEvent::Token { text },
        Event::Notice { kind, message } => ChatEvent::Notice { kind, message },
        Event::ToolCall { call } => {
            ChatEvent::ToolCall { id: call.id, name: call.name, arguments: call.arguments }
        }
        Event::ToolResult { name, result } => ChatEvent::ToolResult {
            call_id: result.call_id,
            name,
            content: result.content,
            is_error: result.is_error,
        },
        Event::Done { message_id, usage, finish, total_ms } => ChatEvent::Done {
            message_id: message_id.map(|id| id.0),
            finish: finish_str(finish),
            timings: timings_json(&usage, total_ms),
            usage: UsageJson {
                prompt_tokens: usage.prompt_tokens,
                cached_tokens: usage.cached_tokens,
                completion_tokens: usage.completion_tokens,
            },
        },
        Event::Error { message, partial_message_id } => {
            ChatEvent::Error { message, partial_message_id: partial_message_id.map(|id| id.0) }
        }
    }
}

pub fn finish_str(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ToolCalls => "tool_calls",
    }
}

pub fn timings_json(usage: &Usage, total_ms: u64) -> TimingsJson {
    let decode_tok_s = if usage.decode_ms > 0 {
        f64::from(usage.completion_tokens) * 1000.0 / usage.decode_ms as f64
    } else {
        0.0
    };
    TimingsJson {
        prefill_ms: usage.prefill_ms,
        decode_ms: usage.decode_ms,
        ttft_ms: usage.ttft_ms,
        total_ms,
        decode_tok_s: (decode_tok_s * 10.0).round() / 10.0,
    }
}

/// Serializes one `data:` line. Our wire types always serialize; the fallback keeps the
/// stream well-formed even so.
pub fn sse_event<T: Serialize>(value: &T) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(json) => SseEvent::default().data(json),
        Err(_) => SseEvent::default().data(r#"{"type":"error","message":"serialization failed"}"#),
    }
}
