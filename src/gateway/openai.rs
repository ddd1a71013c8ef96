//! The OpenAI-compatible API: `POST /v1/chat/completions` (streamed or not) and
//! `GET /v1/models`, so existing clients can use my-claw. `model` is a tier name. These calls
//! are stateless: the messages given are the whole prompt, and nothing is stored.

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::stream::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{ChatTurn, Role};
use crate::gateway::chat::{
    check_message_length, parse_tier, sse_event, timings_json, TimingsJson,
};
use crate::gateway::error::{ApiError, ApiJson, ApiPath};
use crate::gateway::AppState;
use crate::llm::router::{Routed, Tier};
use crate::llm::{Chunk, FinishReason, GenerationParams, LlmRequest, Usage};

/// Largest reply a client may ask for.
const MAX_MAX_TOKENS: u32 = 32_768;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(post_chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
}

/// Body of `POST /v1/chat/completions`; fields we do not use are ignored, as OpenAI-style
/// servers commonly do.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Only `n = 1` is supported.
    #[serde(default)]
    pub n: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    /// A string, or an array of content parts of which the `text` ones are used.
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

#[derive(Debug, Serialize)]
struct ModelObject {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Debug, Serialize)]
struct Completion {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<CompletionChoice>,
    usage: UsageOut,
    /// Not in OpenAI's schema (clients ignore it); llama.cpp's server adds the same kind of
    /// field. Tells where the time went, e.g. waiting for the engine versus prefill.
    timings: TimingsJson,
}

#[derive(Debug, Serialize)]
struct CompletionChoice {
    index: u32,
    message: MessageOut,
    finish_reason: &'static str,
    logprobs: Option<()>,
}

#[derive(Debug, Serialize)]
struct MessageOut {
    role: &'static str,
    content: String,
}

#[derive(Debug, Serialize)]
struct CompletionChunk {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    system_fingerprint: String,
    choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice {
    index: u32,
    delta: Delta,
    finish_reason: Option<&'static str>,
    logprobs: Option<()>,
}

#[derive(Debug, Default, Serialize)]
struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize)]
struct PromptTokensDetails {
    cached_tokens: u32,
}

/// An error inside a stream, in OpenAI's shape.
#[derive(Debug, Serialize)]
struct StreamError {
    error: StreamErrorDetail,
}

#[derive(Debug, Serialize)]
struct StreamErrorDetail {
    message: String,
    r#type: &'static str,
    code: Option<&'static str>,
}

async fn list_models() -> ApiJson<ModelList> {
    let data = Tier::ALL.iter().map(|&tier| model_object(tier)).collect();
    ApiJson(ModelList { object: "list", data })
}

async fn get_model(ApiPath(id): ApiPath<String>) -> Result<ApiJson<ModelObject>, ApiError> {
    match Tier::parse(&id) {
        Some(tier) => Ok(ApiJson(model_object(tier))),
        None => Err(ApiError::NotFound(format!("model `{id}` does not exist; use a tier name"))),
    }
}

async fn post_chat_completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let tier = parse_tier(&request.model)?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::BadRequest("only n = 1 is supported".into()));
    }
    let mut messages = to_turns(&request.messages)?;
    // The persona is injected in every call on every channel, unless the client brings its
    // own system prompt (OpenAI clients usually do, and theirs must win).
    if !messages.iter().any(|m| m.role == Role::System) {
        let persona = state.assistant.persona().await?;
        messages.insert(0, ChatTurn::new(Role::System, persona.system_turn()));
    }
    let params = params_for(&request, state.reply_max_tokens)?;
    let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let started = Instant::now();
    let routed = state
        .assistant
        .router()
        .stream(tier, LlmRequest { messages, params, tools: Default::default() })
        .await?;
    let meta = ResponseMeta {
        id: format!("chatcmpl-{:024x}", rand::random::<u128>() >> 32),
        created: unix_secs(),
        model: tier.as_str().to_string(),
        fingerprint: format!("my-claw-{}-{}", routed.info.provider, routed.info.model),
        started,
    };
    if request.stream {
        let stream = completion_stream(routed, meta, include_usage);
        let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
        return Ok(sse.into_response());
    }
    collect_completion(routed, meta).await.map(IntoResponse::into_response)
}

/// Who and what a response is, repeated in every chunk.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    started: Instant,
}

impl ResponseMeta {
    fn chunk(&self, delta: Delta, finish: Option<&'static str>) -> CompletionChunk {
        CompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices: vec![ChunkChoice { index: 0, delta, finish_reason: finish, logprobs: None }],
            usage: None,
        }
    }
}

async fn collect_completion(
    mut routed: Routed,
    meta: ResponseMeta,
) -> Result<ApiJson<Completion>, ApiError> {
    let mut text = String::new();
    let (usage, finish) = loop {
        match routed.stream.recv().await {
            Some(Ok(Chunk::Text(t))) => text.push_str(&t),
            // TODO(issue 15): `tool_calls` in the answer.
            Some(Ok(Chunk::Notice { .. } | Chunk::ToolCall(_))) => {}
            Some(Ok(Chunk::Done { usage, finish })) => break (usage, finish),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ApiError::Internal("the model stream ended unexpectedly".into())),
        }
    };
    Ok(ApiJson(Completion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint,
        choices: vec![CompletionChoice {
            index: 0,
            message: MessageOut { role: "assistant", content: text },
            finish_reason: finish_reason(finish),
            logprobs: None,
        }],
        usage: usage_out(&usage),
        timings: timings_json(&usage, meta.started.elapsed().as_millis() as u64),
    }))
}

/// The chunk stream: a role chunk, content chunks, a finish chunk, optionally a usage
/// chunk, then `[DONE]`. Dropping it (the client left) drops the model stream, which stops
/// the engine at its next token.
fn completion_stream(
    routed: Routed,
    meta: ResponseMeta,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = meta.chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None);
    let start = futures::stream::iter([Ok(sse_event(&first))]);
    let state = Some((routed.stream, meta));
    let body = futures::stream::unfold(state, move |state| async move {
        let (mut stream, meta) = state?;
        loop {
            let events: Vec<SseEvent> = match stream.recv().await {
                Some(Ok(Chunk::Text(t))) => {
                    let delta = Delta { role: None, content: Some(t) };
                    return Some((vec![sse_event(&meta.chunk(delta, None))], Some((stream, meta))));
                }
                // TODO(issue 15): `tool_calls` deltas.
                Some(Ok(Chunk::Notice { .. } | Chunk::ToolCall(_))) => continue,
                Some(Ok(Chunk::Done { usage, finish })) => {
                    let mut out =
                        vec![sse_event(&meta.chunk(Delta::default(), Some(finish_reason(finish))))];
                    if include_usage {
                        let mut chunk = meta.chunk(Delta::default(), None);
                        chunk.choices.clear();
                        chunk.usage = Some(usage_out(&usage));
                        out.push(sse_event(&chunk));
                    }
                    out
                }
                Some(Err(e)) => vec![sse_event(&StreamError {
                    error: StreamErrorDetail {
                        message: e.to_string(),
                        r#type: "server_error",
                        code: None,
                    },
                })],
                None => vec![sse_event(&StreamError {
                    error: StreamErrorDetail {
                        message: "the model stream ended unexpectedly".into(),
                        r#type: "server_error",
                        code: None,
                    },
                })],
            };
            let mut events = events;
            // The terminator OpenAI clients wait for, after the last chunk or an error.
            events.push(SseEvent::default().data("[DONE]"));
            return Some((events, None));
        }
    });
    let body = futures::StreamExt::flat_map(body, |events| {
        futures::stream::iter(events.into_iter().map(Ok))
    });
    futures::StreamExt::chain(start, body)
}

/// OpenAI messages to chat turns. `developer` counts as `system`; tool messages are not
/// supported by our models and are refused rather than silently dropped.
fn to_turns(messages: &[MessageIn]) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::BadRequest("messages must not be empty".into()));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::BadRequest(format!(
                "messages[{index}].role `{other}` is not supported (use system, user or assistant)"
            )))
            }
        };
        let content = content_text(&message.content).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "messages[{index}].content must be a string or an array of text parts"
            ))
        })?;
        check_message_length(&format!("messages[{index}].content"), &content)?;
        turns.push(ChatTurn::new(role, content));
    }
    if turns.last().is_some_and(|t| t.role == Role::Assistant) {
        return Err(ApiError::BadRequest("the last message must not be from the assistant".into()));
    }
    Ok(turns)
}

fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => return None,
                }
            }
            Some(text)
        }
        _ => None,
    }
}

fn params_for(
    request: &CompletionRequest,
    default_max_tokens: u32,
) -> Result<GenerationParams, ApiError> {
    let max_tokens =
        request.max_completion_tokens.or(request.max_tokens).unwrap_or(default_max_tokens);
    if max_tokens == 0 || max_tokens > MAX_MAX_TOKENS {
        return Err(ApiError::BadRequest(format!(
            "max_tokens must be between 1 and {MAX_MAX_TOKENS}"
        )));
    }
    let mut params = GenerationParams::qwen3_non_thinking(max_tokens);
    if let Some(t) = request.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::BadRequest("temperature must be between 0 and 2".into()));
        }
        params.temperature = t;
    }
    if let Some(p) = request.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::BadRequest("top_p must be in (0, 1]".into()));
        }
        params.top_p = p;
    }
    if let Some(p) = request.presence_penalty {
        params.presence_penalty = p.clamp(-2.0, 2.0);
    }
    params.seed = request.seed;
    Ok(params)
}

fn model_object(tier: Tier) -> ModelObject {
    ModelObject { id: tier.as_str(), object: "model", created: 0, owned_by: "my-claw" }
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        // A cancelled generation only happens when the client left; nobody reads this.
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn usage_out(usage: &Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        total_tokens: usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: usage.cached_tokens },
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
