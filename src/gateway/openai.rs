//! The OpenAI-compatible API: `POST /v1/chat/completions` (streamed or not) and
//! `GET /v1/models`, so existing clients can use my-claw. `model` is a tier name. These calls
//! are stateless: the messages given are the whole prompt, and nothing is stored.
//!
//! Tools speak OpenAI's wire format: `tools`, `tool_choice`, `parallel_tool_calls` and
//! `response_format` in, `tool_calls` out (whole, or as streaming deltas), `role: "tool"`
//! messages back in. Client-declared tools are only offered to the model and its calls
//! returned to the client: this module never executes a tool nor touches the `ToolRegistry`
//! (that is the assistant's loop, for my-claw's own tools). A `tool_choice` or
//! `response_format` the tier's provider cannot enforce (Z.ai) is refused with a 400, never
//! weakened.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::stream::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{ChatTurn, Role, ToolCall};
use crate::gateway::chat::{
    check_message_length, parse_tier, sse_event, timings_json, TimingsJson,
};
use crate::gateway::error::{ApiError, ApiJson, ApiPath};
use crate::gateway::events::shutdown_requested;
use crate::gateway::stop::{parse_stop, StopMatcher};
use crate::gateway::AppState;
use crate::llm::router::Tier;
use crate::llm::{
    Capabilities, Chunk, ChunkStream, FinishReason, GenerationParams, LlmError, LlmRequest,
    ResponseFormat, ToolChoice, ToolSpec, ToolUse, Usage,
};

/// Largest reply a client may ask for.
const MAX_MAX_TOKENS: u32 = 32_768;

/// Most tools one request may declare (OpenAI's own limit).
const MAX_TOOLS: usize = 128;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(post_chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
}

/// Body of `POST /v1/chat/completions`. Each sampling field listed here is honoured or, when
/// it cannot be, refused with a 400 naming it unless it asks for nothing (`logit_bias: {}`);
/// fields not listed at all are ignored, as OpenAI-style servers commonly do.
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
    /// Honoured by the local engine, as llama.cpp applies it (every token among the last 64,
    /// the prompt's included, is lowered); remote tiers are not sent it.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Not supported: only `0` (OpenAI's default, which many clients send) is accepted.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported: only an empty object is accepted.
    #[serde(default)]
    pub logit_bias: Option<Value>,
    /// Not supported: only `false` is accepted (and `top_logprobs` only `0`).
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// A string or up to 4 strings; the answer ends before the first (see `stop.rs`).
    #[serde(default)]
    pub stop: Option<Value>,
    /// OpenAI's end-user id for abuse monitoring: accepted and ignored, as OpenAI allows
    /// (there is one user here).
    #[serde(default)]
    pub user: Option<String>,
    /// Only `n = 1` is supported.
    #[serde(default)]
    pub n: Option<u32>,
    /// The tools (functions) the model may call, in OpenAI's shape. Read by hand (see
    /// `tool_use`) so that each mistake gets a message naming the field.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Whether one answer may hold several calls (true by default, as on OpenAI).
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {…}}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// OpenAI's deprecated function calling: refused with a pointer to `tools`, because
    /// ignoring it would silently answer without the functions the client declared.
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
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
    /// On assistant messages: the calls it made, `[{id, type: "function", function: {name,
    /// arguments}}]`.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// On tool messages: the call this message answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
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
    /// `null` when the answer is only tool calls, as on OpenAI.
    content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut>,
}

/// A whole tool call in a non-streamed answer.
#[derive(Debug, Serialize)]
struct ToolCallOut {
    id: String,
    r#type: &'static str,
    function: FunctionOut,
}

#[derive(Debug, Serialize)]
struct FunctionOut {
    name: String,
    /// JSON text, as the model wrote it (OpenAI sends a string, not an object).
    arguments: String,
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
    /// On the finish chunk: the answer's timings, as a non-streamed answer has them (and as
    /// llama.cpp's server puts them on its last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    timings: Option<TimingsJson>,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallDelta>,
}

/// A piece of a tool call in a stream. As on OpenAI, a call's first delta has its index, id,
/// type and name with empty arguments, and later deltas the index and argument text only;
/// clients concatenate the `arguments` of equal `index`.
#[derive(Debug, Serialize)]
struct ToolCallDelta {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    r#type: Option<&'static str>,
    function: FunctionDelta,
}

#[derive(Debug, Serialize)]
struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    arguments: String,
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
    match Tier::from_name(&id) {
        Some(tier) => Ok(ApiJson(model_object(tier))),
        None => {
            Err(ApiError::ModelNotFound(format!("model `{id}` does not exist; use a tier name")))
        }
    }
}

async fn post_chat_completions(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    // An unknown model is OpenAI's 404 `model_not_found`, which clients recognise.
    let tier = parse_tier(&request.model).map_err(|e| ApiError::ModelNotFound(e.to_string()))?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(invalid("n", "only n = 1 is supported".into()));
    }
    let tools = tool_use(&request)?;
    let router = state.assistant.router();
    check_tier_can(tier, &tools, |t| router.capabilities(t))?;
    let mut messages = to_turns(&request.messages)?;
    // The persona is injected in every call on every channel, unless the client brings its
    // own system prompt (OpenAI clients usually do, and theirs must win).
    if !messages.iter().any(|m| m.role == Role::System) {
        let persona = state.assistant.persona().await?;
        messages.insert(0, ChatTurn::new(Role::System, persona.system_turn()));
    }
    let params = params_for(&request, state.reply_max_tokens)?;
    let stops = parse_stop(request.stop.as_ref()).map_err(|message| invalid("stop", message))?;
    let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let calls = CallFilter::new(&tools);
    let started = Instant::now();
    let routed =
        state.assistant.router().stream(tier, LlmRequest { messages, params, tools }).await?;
    let meta = ResponseMeta {
        id: format!("chatcmpl-{:024x}", rand::random::<u128>() >> 32),
        created: unix_secs(),
        model: tier.as_str().to_string(),
        fingerprint: format!("my-claw-{}-{}", routed.info.provider, routed.info.model),
        started,
    };
    let reader = AnswerReader::new(routed.stream, calls, StopMatcher::new(stops), started);
    if request.stream {
        let stream = completion_stream(reader, meta, include_usage);
        let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
        return Ok(sse.into_response());
    }
    collect_completion(reader, meta).await.map(IntoResponse::into_response)
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
            timings: None,
        }
    }
}

/// Refuses, with a 400 naming the field, a `tool_choice` or `response_format` that `tier`'s
/// provider cannot enforce (Z.ai takes only `auto` and `json_object`): sending it weakened
/// would break the client's contract silently, and falling back to `main` would answer from
/// another model than the one asked for. The message names the tiers that can.
fn check_tier_can(
    tier: Tier,
    tools: &ToolUse,
    capabilities: impl Fn(Tier) -> Capabilities,
) -> Result<(), ApiError> {
    let forced = match &tools.choice {
        ToolChoice::Required => Some("\"required\"".to_string()),
        ToolChoice::Function(name) => Some(format!("the function `{name}`")),
        ToolChoice::Auto | ToolChoice::None => None,
    };
    let schema = matches!(tools.response_format, ResponseFormat::JsonSchema { .. });
    let able = |can: fn(&Capabilities) -> bool| -> String {
        let tiers: Vec<&str> =
            Tier::ALL.iter().filter(|&&t| can(&capabilities(t))).map(|t| t.as_str()).collect();
        if tiers.is_empty() {
            "none".to_string()
        } else {
            tiers.join(", ")
        }
    };
    let own = capabilities(tier);
    if let Some(forced) = forced.filter(|_| !own.forced_tool_choice) {
        return Err(invalid(
            "tool_choice",
            format!(
                "tier `{tier}` cannot be made to call a tool (tool_choice {forced}): its \
                 provider supports only tool_choice \"auto\"; tiers that can: {}",
                able(|c| c.forced_tool_choice)
            ),
        ));
    }
    if schema && !own.json_schema {
        return Err(invalid(
            "response_format",
            format!(
                "tier `{tier}` cannot follow a JSON schema (response_format json_schema): its \
                 provider supports only json_object; tiers that can: {}",
                able(|c| c.json_schema)
            ),
        ));
    }
    Ok(())
}

/// Which of the model's tool calls reach the client, and their indices. The request's
/// contract holds whatever the provider does: no calls when no tools were offered (a request
/// without tools answers exactly as before tools existed) and at most one call when
/// `parallel_tool_calls` is false.
struct CallFilter {
    offered: bool,
    parallel: bool,
    sent: u32,
    /// A call dropped because no tools were offered: an answer of only such calls is no
    /// answer, and fails rather than reach the client empty.
    unoffered: Option<String>,
}

impl CallFilter {
    fn new(tools: &ToolUse) -> Self {
        Self {
            offered: !tools.offered().is_empty(),
            parallel: tools.parallel,
            sent: 0,
            unoffered: None,
        }
    }

    /// The index of `call` in the answer, or `None` when it is not to be sent.
    fn admit(&mut self, call: &ToolCall) -> Option<u32> {
        if !self.offered || (!self.parallel && self.sent > 0) {
            tracing::debug!(tool = %call.name, "a tool call outside the request's contract is dropped");
            if !self.offered {
                self.unoffered.get_or_insert_with(|| call.name.clone());
            }
            return None;
        }
        self.sent += 1;
        Some(self.sent - 1)
    }

    /// The answer's `finish_reason`: `length` when the limit cut it (a call it cut is
    /// incomplete, as OpenAI's would be), else `tool_calls` whenever a call was sent.
    fn finish_reason(&self, finish: FinishReason) -> &'static str {
        match finish {
            FinishReason::Length => "length",
            _ if self.sent > 0 => "tool_calls",
            // Calls the filter dropped leave a plain answer.
            FinishReason::ToolCalls => "stop",
            other => finish_reason(other),
        }
    }
}

/// A call's id as sent: the provider's, or a fresh one if it gave none, since clients
/// answer calls by id.
fn call_id(call: &ToolCall) -> String {
    if call.id.is_empty() {
        crate::tools::new_call_id()
    } else {
        call.id.clone()
    }
}

/// One part of the answer as the client is to see it.
enum Part {
    Text(String),
    Call {
        index: u32,
        call: ToolCall,
    },
    /// The last part of an answer that ended well.
    End {
        usage: Usage,
        finish: &'static str,
    },
    /// The last part of an answer that failed.
    Failed(LlmError),
}

/// The model's answer as the client sees it: tool calls through the `CallFilter`, text
/// through the `StopMatcher`. When a stop sequence matches, the model stream is dropped at
/// once, which cancels the request: the local engine stops at its next token, a remote
/// tier's connection is closed.
///
/// Stop sequences apply to the answer's text only, never inside a tool call: a call is
/// generated whole (under its schema's grammar on local models) and cutting its arguments
/// would hand the client broken JSON. A call ends the stretch of text before it, so text
/// held back as a possible start of a sequence is released before the call, and a sequence
/// is never matched across one. A call sent before a stop sequence matched stays in the
/// answer, and `finish_reason` is then `tool_calls`, so the client still runs it.
struct AnswerReader {
    /// `None` once the answer has ended (or been cancelled by a stop sequence).
    stream: Option<ChunkStream>,
    filter: CallFilter,
    stop: StopMatcher,
    pending: VecDeque<Part>,
    started: Instant,
    /// Text chunks received: the local engine sends one per generated token that has text,
    /// so this is the completion count of an answer a stop sequence cut short (it misses
    /// the tokens of tool calls, which the engine only counts at the end).
    n_text: u32,
    /// The prompt's size, as the local engine said when it took the request.
    prompt_tokens: u32,
    ttft_ms: Option<u64>,
    /// SIGINT or SIGTERM: the graceful shutdown waits for open responses, and an answer
    /// can take minutes, so the answer ends there (`None` once it fired).
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What a `/v1` answer cut by a shutdown ends with: the stream's error event, or a 503.
const SHUTTING_DOWN: &str = "my-claw is shutting down: the answer was cut short";

impl AnswerReader {
    fn new(stream: ChunkStream, filter: CallFilter, stop: StopMatcher, started: Instant) -> Self {
        Self {
            stream: Some(stream),
            filter,
            stop,
            pending: VecDeque::new(),
            started,
            n_text: 0,
            prompt_tokens: 0,
            ttft_ms: None,
            shutdown: Some(Box::pin(shutdown_requested())),
        }
    }

    /// The next part, in order; `None` after the `End` or `Failed` part.
    async fn next(&mut self) -> Option<Part> {
        loop {
            if let Some(part) = self.pending.pop_front() {
                return Some(part);
            }
            let stream = self.stream.as_mut()?;
            let received = match self.shutdown.as_mut() {
                Some(signal) => tokio::select! {
                    chunk = stream.recv() => Some(chunk),
                    _ = signal => None,
                },
                None => Some(stream.recv().await),
            };
            let Some(received) = received else {
                // Dropping the model stream (in `end`) stops the engine at its next token.
                self.shutdown = None;
                self.release_held();
                self.end(Part::Failed(LlmError::Unavailable(SHUTTING_DOWN.into())));
                continue;
            };
            match received {
                Some(Ok(Chunk::Text(text))) => self.text(&text),
                Some(Ok(Chunk::ToolCall(call))) => {
                    if let Some(index) = self.filter.admit(&call) {
                        self.release_held();
                        self.pending.push_back(Part::Call { index, call });
                    }
                }
                Some(Ok(Chunk::Notice { .. })) => {}
                Some(Ok(Chunk::Accepted { prompt_tokens })) => self.prompt_tokens = prompt_tokens,
                Some(Ok(Chunk::Done { usage, finish })) => {
                    self.release_held();
                    match self.filter.unoffered.take().filter(|_| self.n_text == 0) {
                        // Only calls nobody offered tools for: no answer to give.
                        Some(name) => self.end(Part::Failed(LlmError::Unavailable(format!(
                            "the model answered only with a call of `{name}`, but the request \
                             offered no tools: there is no answer to return"
                        )))),
                        None => {
                            let finish = self.filter.finish_reason(finish);
                            self.end(Part::End { usage, finish });
                        }
                    }
                }
                Some(Err(e)) => {
                    self.release_held();
                    self.end(Part::Failed(e));
                }
                None => {
                    let e = LlmError::Inference("the model stream ended unexpectedly".into());
                    self.end(Part::Failed(e));
                }
            }
        }
    }

    fn text(&mut self, text: &str) {
        self.n_text += 1;
        let elapsed_ms = self.started.elapsed().as_millis() as u64;
        self.ttft_ms.get_or_insert(elapsed_ms);
        let release = self.stop.push(text);
        if !release.text.is_empty() {
            self.pending.push_back(Part::Text(release.text));
        }
        if release.stopped {
            // The engine reports its usage only in `Done`, which a cancelled request never
            // sends: what is known here is the tokens received, the first one's time, and
            // the prompt's size when the local engine said it on taking the request (a
            // remote server says it only at the end: 0).
            let usage = Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.n_text,
                ttft_ms: self.ttft_ms.unwrap_or(elapsed_ms),
                ..Usage::default()
            };
            let finish = self.filter.finish_reason(FinishReason::Stop);
            // Dropping the stream here is the cancellation.
            self.end(Part::End { usage, finish });
        }
    }

    /// Sends what the stop matcher held back as a possible start of a sequence.
    fn release_held(&mut self) {
        let held = self.stop.flush();
        if !held.is_empty() {
            self.pending.push_back(Part::Text(held));
        }
    }

    fn end(&mut self, last: Part) {
        self.stream = None;
        self.pending.push_back(last);
    }
}

async fn collect_completion(
    mut reader: AnswerReader,
    meta: ResponseMeta,
) -> Result<ApiJson<Completion>, ApiError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    let (usage, finish) = loop {
        match reader.next().await {
            Some(Part::Text(t)) => text.push_str(&t),
            Some(Part::Call { call, .. }) => calls.push(ToolCallOut {
                id: call_id(&call),
                r#type: "function",
                function: FunctionOut { name: call.name, arguments: call.arguments },
            }),
            Some(Part::End { usage, finish }) => break (usage, finish),
            Some(Part::Failed(e)) => return Err(e.into()),
            None => return Err(ApiError::Internal("the answer ended without its end".into())),
        }
    };
    // OpenAI sends `content: null` beside calls when the model wrote no text; a plain
    // answer keeps its string, even an empty one.
    let content = if text.is_empty() && !calls.is_empty() { None } else { Some(text) };
    Ok(ApiJson(Completion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint,
        choices: vec![CompletionChoice {
            index: 0,
            message: MessageOut { role: "assistant", content, tool_calls: calls },
            finish_reason: finish,
            logprobs: None,
        }],
        usage: usage_out(&usage),
        timings: timings_json(&usage, meta.started.elapsed().as_millis() as u64),
    }))
}

/// The chunk stream: a role chunk, content and tool-call chunks, a finish chunk, optionally
/// a usage chunk, then `[DONE]`. Dropping it (the client left) drops the model stream, which
/// stops the engine at its next token.
fn completion_stream(
    reader: AnswerReader,
    meta: ResponseMeta,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = meta.chunk(
        Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() },
        None,
    );
    let start = futures::stream::iter([Ok(sse_event(&first))]);
    let body = futures::stream::unfold(Some((reader, meta)), move |state| async move {
        let (mut reader, meta) = state?;
        let events: Vec<SseEvent> = match reader.next().await? {
            Part::Text(t) => {
                let delta = Delta { content: Some(t), ..Delta::default() };
                let events = vec![sse_event(&meta.chunk(delta, None))];
                return Some((events, Some((reader, meta))));
            }
            Part::Call { index, call } => {
                let events = tool_call_deltas(index, call)
                    .into_iter()
                    .map(|d| sse_event(&meta.chunk(d, None)))
                    .collect();
                return Some((events, Some((reader, meta))));
            }
            Part::End { usage, finish } => {
                let mut last = meta.chunk(Delta::default(), Some(finish));
                let total_ms = meta.started.elapsed().as_millis() as u64;
                last.timings = Some(timings_json(&usage, total_ms));
                let mut out = vec![sse_event(&last)];
                if include_usage {
                    let mut chunk = meta.chunk(Delta::default(), None);
                    chunk.choices.clear();
                    chunk.usage = Some(usage_out(&usage));
                    out.push(sse_event(&chunk));
                }
                out
            }
            Part::Failed(e) => vec![sse_event(&StreamError {
                error: StreamErrorDetail {
                    message: e.to_string(),
                    r#type: "server_error",
                    code: None,
                },
            })],
        };
        let mut events = events;
        // The terminator OpenAI clients wait for, after the last chunk or an error.
        events.push(SseEvent::default().data("[DONE]"));
        Some((events, None))
    });
    let body = futures::StreamExt::flat_map(body, |events| {
        futures::stream::iter(events.into_iter().map(Ok))
    });
    futures::StreamExt::chain(start, body)
}

/// The deltas of one complete call, in OpenAI's order: the header (index, id, type, name,
/// empty arguments), then the arguments. Our providers hand over whole calls, so the
/// arguments come as one fragment; clients accumulate fragments of any size the same way.
fn tool_call_deltas(index: u32, call: ToolCall) -> [Delta; 2] {
    let header = ToolCallDelta {
        index,
        id: Some(call_id(&call)),
        r#type: Some("function"),
        function: FunctionDelta { name: Some(call.name), arguments: String::new() },
    };
    let arguments = ToolCallDelta {
        index,
        id: None,
        r#type: None,
        function: FunctionDelta { name: None, arguments: call.arguments },
    };
    [header, arguments].map(|d| Delta { tool_calls: vec![d], ..Delta::default() })
}

/// A 400 about the request field `param`, which OpenAI's clients read from the error. Our
/// messages begin with the path they are about (`messages[1].role …`, `tools[0].function.name
/// …`): a path inside `param` is named whole, as serde's own errors name theirs.
fn invalid(param: &'static str, message: String) -> ApiError {
    let lead: String = message
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
        .collect();
    let path = lead.trim_end_matches('.');
    match path.strip_prefix(param) {
        Some(rest) if rest.starts_with(['[', '.']) => {
            ApiError::BadShape { param: Some(path.to_string()), message }
        }
        _ => ApiError::BadParam { param, message },
    }
}

/// The request's `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` as the
/// shared `ToolUse`, each checked with a message that names the offending field.
fn tool_use(request: &CompletionRequest) -> Result<ToolUse, ApiError> {
    if request.functions.is_some() || request.function_call.is_some() {
        return Err(invalid(
            "functions",
            "`functions` and `function_call` are deprecated and not supported; use `tools` and \
             `tool_choice`"
                .into(),
        ));
    }
    let tools = match &request.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_TOOLS {
                return Err(invalid(
                    "tools",
                    format!("tools has {} entries; at most {MAX_TOOLS} are allowed", items.len()),
                ));
            }
            let mut tools: Vec<ToolSpec> = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let tool = parse_tool(index, item)?;
                if tools.iter().any(|t| t.name == tool.name) {
                    return Err(invalid(
                        "tools",
                        format!(
                            "tools[{index}]: the function name `{}` is declared twice",
                            tool.name
                        ),
                    ));
                }
                tools.push(tool);
            }
            tools
        }
        Some(_) => return Err(invalid("tools", "tools must be an array".into())),
    };
    let choice = match &request.tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(value) => parse_tool_choice(value, &tools)?,
    };
    let response_format = match &request.response_format {
        None | Some(Value::Null) => ResponseFormat::Text,
        Some(value) => parse_response_format(value)?,
    };
    Ok(ToolUse {
        tools,
        choice,
        parallel: request.parallel_tool_calls.unwrap_or(true),
        response_format,
    })
}

/// OpenAI's rule for function and schema names: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One entry of `tools`: `{"type": "function", "function": {"name", "description",
/// "parameters", "strict"}}`. Parameters default to an object without properties, as on
/// OpenAI; given, they must be a JSON Schema object (of type `object` if it says a type).
fn parse_tool(index: usize, item: &Value) -> Result<ToolSpec, ApiError> {
    let bad = |what: String| invalid("tools", format!("tools[{index}]{what}"));
    let Some(object) = item.as_object() else {
        return Err(bad(" must be an object".into()));
    };
    match object.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(format!(".type `{other}` is not supported; only `function` tools are")))
        }
        None => return Err(bad(".type is missing; it must be `function`".into())),
    }
    let Some(function) = object.get("function").and_then(Value::as_object) else {
        return Err(bad(".function must be an object with a name".into()));
    };
    let name = match function.get("name") {
        Some(Value::String(name)) if valid_name(name) => name.clone(),
        Some(Value::String(name)) => {
            return Err(bad(format!(
                ".function.name `{name}` is invalid: use 1 to 64 letters, digits, `_` or `-`"
            )))
        }
        _ => return Err(bad(".function.name is missing or not a string".into())),
    };
    let description = match function.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(bad(".function.description must be a string".into())),
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) => {
            match schema.get("type") {
                None => {}
                Some(Value::String(t)) if t == "object" => {}
                Some(other) => {
                    return Err(bad(format!(
                        ".function.parameters must be a JSON Schema of type `object`, not \
                         {other}"
                    )))
                }
            }
            Value::Object(schema.clone())
        }
        Some(_) => {
            return Err(bad(".function.parameters must be a JSON Schema object".into()));
        }
    };
    if function.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
        return Err(bad(".function.strict must be a boolean".into()));
    }
    Ok(ToolSpec { name, description, parameters })
}

fn parse_tool_choice(value: &Value, tools: &[ToolSpec]) -> Result<ToolChoice, ApiError> {
    let choice = match value {
        Value::String(s) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "tool_choice `{other}` is not supported: use \"auto\", \"none\", \
                     \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                    ),
                ))
            }
        },
        Value::Object(object) => {
            let name = match (object.get("type").and_then(Value::as_str), object.get("function")) {
                (Some("function"), Some(function)) => {
                    function.get("name").and_then(Value::as_str).ok_or_else(|| {
                        invalid("tool_choice", "tool_choice.function.name is missing".into())
                    })?
                }
                _ => {
                    return Err(invalid(
                        "tool_choice",
                        "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \
                         \"function\", \"function\": {\"name\": …}}"
                            .into(),
                    ))
                }
            };
            if !tools.iter().any(|t| t.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice names the function `{name}`, which is not in tools"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        _ => {
            return Err(invalid("tool_choice", "tool_choice must be a string or an object".into()))
        }
    };
    if choice == ToolChoice::Required && tools.is_empty() {
        return Err(invalid(
            "tool_choice",
            "tool_choice is \"required\" but no tools are given".into(),
        ));
    }
    Ok(choice)
}

fn parse_response_format(value: &Value) -> Result<ResponseFormat, ApiError> {
    let bad = |message: &str| invalid("response_format", message.to_string());
    let Some(object) = value.as_object() else {
        return Err(bad("response_format must be an object with a type"));
    };
    match object.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let Some(spec) = object.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format.json_schema is missing: it must be an object with a name \
                     and a schema",
                ));
            };
            let name = match spec.get("name") {
                Some(Value::String(name)) if valid_name(name) => name.clone(),
                Some(Value::String(name)) => {
                    return Err(invalid(
                        "response_format",
                        format!(
                            "response_format.json_schema.name `{name}` is invalid: use 1 to 64 \
                         letters, digits, `_` or `-`"
                        ),
                    ))
                }
                _ => return Err(bad("response_format.json_schema.name is missing")),
            };
            let schema = match spec.get("schema") {
                Some(schema @ Value::Object(_)) => schema.clone(),
                None | Some(Value::Null) => {
                    return Err(bad("response_format.json_schema.schema is missing"))
                }
                Some(_) => {
                    return Err(bad(
                        "response_format.json_schema.schema must be a JSON Schema object",
                    ))
                }
            };
            if spec.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(bad("response_format.json_schema.strict must be a boolean"));
            }
            Ok(ResponseFormat::JsonSchema { name, schema })
        }
        Some(other) => Err(invalid(
            "response_format",
            format!(
                "response_format.type `{other}` is not supported: use text, json_object or \
             json_schema"
            ),
        )),
        None => Err(bad("response_format.type is missing")),
    }
}

/// OpenAI messages to chat turns. `developer` counts as `system`. An assistant message's
/// `tool_calls` become `ChatTurn::assistant_calls`, and each call must be answered by a
/// following `tool` message naming its id (OpenAI's rule: a prompt with a call but no result,
/// or a result for no call, is refused rather than shown to the model half-formed).
fn to_turns(messages: &[MessageIn]) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty".into()));
    }
    let mut turns = Vec::with_capacity(messages.len());
    // Ids of the latest assistant calls that still wait for their tool message, and the
    // index of that assistant message.
    let mut awaiting: Vec<String> = Vec::new();
    let mut calls_at = 0;
    for (index, message) in messages.iter().enumerate() {
        let role = match message.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(invalid(
                    "messages",
                    format!(
                        "messages[{index}].role `{other}` is not supported (use system, user, \
                     assistant or tool)"
                    ),
                ))
            }
        };
        if role != Role::Tool && !awaiting.is_empty() {
            return Err(unanswered(calls_at, &awaiting));
        }
        let content = content_text(&message.content).ok_or_else(|| {
            invalid(
                "messages",
                format!("messages[{index}].content must be a string or an array of text parts"),
            )
        })?;
        check_message_length("messages", &format!("messages[{index}].content"), &content)
            .map_err(|e| invalid("messages", e.to_string()))?;
        if message.tool_calls.as_ref().is_some_and(|c| !c.is_null()) && role != Role::Assistant {
            return Err(invalid(
                "messages",
                format!("messages[{index}]: only assistant messages may carry tool_calls"),
            ));
        }
        let turn = match role {
            Role::Tool => {
                let Some(id) = message.tool_call_id.as_deref().filter(|id| !id.is_empty()) else {
                    return Err(invalid(
                        "messages",
                        format!(
                            "messages[{index}]: a message with role `tool` needs a tool_call_id"
                        ),
                    ));
                };
                let Some(position) = awaiting.iter().position(|a| a == id) else {
                    return Err(invalid(
                        "messages",
                        format!(
                            "messages[{index}]: tool_call_id `{id}` does not answer a call of the \
                         assistant message before it"
                        ),
                    ));
                };
                awaiting.remove(position);
                ChatTurn::tool_result(id, content)
            }
            Role::Assistant => match message.tool_calls.as_ref().filter(|c| !c.is_null()) {
                Some(calls) => {
                    let calls = parse_tool_calls(index, calls)?;
                    awaiting = calls.iter().map(|c| c.id.clone()).collect();
                    calls_at = index;
                    ChatTurn::assistant_calls(content, calls)
                }
                None => ChatTurn::new(role, content),
            },
            _ => ChatTurn::new(role, content),
        };
        turns.push(turn);
    }
    if !awaiting.is_empty() {
        return Err(unanswered(calls_at, &awaiting));
    }
    if turns.last().is_some_and(|t| t.role == Role::Assistant) {
        return Err(invalid("messages", "the last message must not be from the assistant".into()));
    }
    Ok(turns)
}

/// The error for calls of the assistant message `index` that no tool message answers.
fn unanswered(index: usize, awaiting: &[String]) -> ApiError {
    invalid(
        "messages",
        format!(
            "messages[{index}]: the assistant's tool calls {} have no tool message answering them \
         (each call needs a `tool` message with its tool_call_id, right after the call)",
            awaiting.iter().map(|id| format!("`{id}`")).collect::<Vec<_>>().join(", ")
        ),
    )
}

/// An assistant message's `tool_calls`: `[{id, type: "function", function: {name,
/// arguments}}]`, with arguments as JSON text (OpenAI's shape; an object is accepted too and
/// written back as text).
fn parse_tool_calls(index: usize, calls: &Value) -> Result<Vec<ToolCall>, ApiError> {
    let bad = |what: String| invalid("messages", format!("messages[{index}].tool_calls{what}"));
    let Some(items) = calls.as_array() else {
        return Err(bad(" must be an array".into()));
    };
    let mut out: Vec<ToolCall> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let id = match item.get("id") {
            Some(Value::String(id)) if !id.is_empty() => id.clone(),
            _ => return Err(bad(format!("[{i}].id is missing or not a string"))),
        };
        if out.iter().any(|c| c.id == id) {
            return Err(bad(format!("[{i}].id `{id}` is used twice")));
        }
        match item.get("type").and_then(Value::as_str) {
            Some("function") | None => {}
            Some(other) => return Err(bad(format!("[{i}].type `{other}` is not `function`"))),
        }
        let function = item.get("function");
        let name = match function.and_then(|f| f.get("name")) {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => return Err(bad(format!("[{i}].function.name is missing or not a string"))),
        };
        let arguments = match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(text)) => text.clone(),
            Some(object @ Value::Object(_)) => object.to_string(),
            None | Some(Value::Null) => "{}".to_string(),
            Some(_) => return Err(bad(format!("[{i}].function.arguments must be a JSON string"))),
        };
        out.push(ToolCall { id, name, arguments });
    }
    Ok(out)
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
        return Err(invalid(
            "max_tokens",
            format!("max_tokens (or max_completion_tokens) must be between 1 and {MAX_MAX_TOKENS}"),
        ));
    }
    let mut params = GenerationParams::qwen3_non_thinking(max_tokens);
    if let Some(t) = request.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(invalid("temperature", "temperature must be between 0 and 2".into()));
        }
        params.temperature = t;
    }
    if let Some(p) = request.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", "top_p must be in (0, 1]".into()));
        }
        params.top_p = p;
    }
    if let Some(p) = request.presence_penalty {
        if !(-2.0..=2.0).contains(&p) {
            return Err(invalid(
                "presence_penalty",
                "presence_penalty must be between -2 and 2".into(),
            ));
        }
        params.presence_penalty = p;
    }
    // What the engine cannot do is refused rather than ignored: a client that asks for it
    // would otherwise get an answer made without it and never know. The neutral values
    // many clients send by default ask for nothing and pass.
    if request.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(invalid(
            "frequency_penalty",
            "frequency_penalty is not supported (leave it out or 0); presence_penalty is".into(),
        ));
    }
    match &request.logit_bias {
        None | Some(Value::Null) => {}
        Some(Value::Object(biases)) if biases.is_empty() => {}
        Some(Value::Object(_)) => {
            return Err(invalid(
                "logit_bias",
                "logit_bias is not supported (leave it out or {})".into(),
            ))
        }
        Some(_) => return Err(invalid("logit_bias", "logit_bias must be an object".into())),
    }
    if request.logprobs == Some(true) || request.top_logprobs.is_some_and(|n| n > 0) {
        return Err(invalid(
            "logprobs",
            "logprobs and top_logprobs are not supported (leave them out, false or 0)".into(),
        ));
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
