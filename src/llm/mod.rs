//! Models: the `Provider` trait every answer source implements, the request and chunk
//! types, and `LlmError`. This module tree never imports axum, sqlx or `channels`.

pub mod engine;
pub mod hub;
pub mod pool;
pub mod providers;
pub mod router;
pub mod toolcall;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::domain::{ChatTurn, ToolCall};

/// Sampling and length settings for one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: u32,
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: f64,
    pub presence_penalty: f32,
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: Option<u64>,
    /// Qwen3 thinking mode. Off by default: the template renders the empty think block.
    pub thinking: bool,
}

impl GenerationParams {
    /// The Qwen3 model card's non-thinking settings (temperature 0.7, top-p 0.8, top-k 20,
    /// min-p 0).
    pub fn qwen3_non_thinking(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.7,
            top_k: 20,
            top_p: 0.8,
            min_p: 0.0,
            presence_penalty: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
            thinking: false,
        }
    }

    /// Deterministic greedy decoding, used by tests and the benchmark.
    pub fn greedy(max_tokens: u32) -> Self {
        Self { temperature: 0.0, ..Self::qwen3_non_thinking(max_tokens) }
    }
}

/// A tool the model may call: its name, what it does, and its parameters as a JSON Schema
/// object (OpenAI's `function` shape).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// Whether and which tool the model must call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides (the default when tools are given).
    #[default]
    Auto,
    /// No tool call: the tools are not offered.
    None,
    /// At least one tool call, of any offered tool.
    Required,
    /// A call of this tool.
    Function(String),
}

/// The shape the answer text must have (OpenAI's `response_format`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat {
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema { name: String, schema: serde_json::Value },
}

/// The tools offered to the model and the constraints on its answer. Local models generate
/// a tool call's arguments under the tool's schema (constrained decoding), so a call they
/// make is always valid JSON for a known tool; remote providers get the OpenAI fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's `parallel_tool_calls`, true by default).
    pub parallel: bool,
    pub response_format: ResponseFormat,
}

impl ToolUse {
    /// Offers `tools` with `auto` choice and parallel calls allowed.
    pub fn offer(tools: Vec<ToolSpec>) -> Self {
        Self { tools, parallel: true, ..Self::default() }
    }

    /// The tools actually offered: none when the choice is `None`.
    pub fn offered(&self) -> &[ToolSpec] {
        if self.choice == ToolChoice::None {
            &[]
        } else {
            &self.tools
        }
    }
}

/// One generation request: the full prompt as chat turns (system first), its settings, and
/// the tools offered.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub messages: Vec<ChatTurn>,
    pub params: GenerationParams,
    pub tools: ToolUse,
}

impl LlmRequest {
    /// A request with no tools and free text.
    pub fn new(messages: Vec<ChatTurn>, params: GenerationParams) -> Self {
        Self { messages, params, tools: ToolUse::default() }
    }
}

/// Token accounting and timings of one finished generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV state was reused from an earlier turn (not re-prefilled).
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub prefill_ms: u64,
    pub decode_ms: u64,
    /// Time from request receipt to the first text delta.
    pub ttft_ms: u64,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    /// The answer ended with tool calls (sent as `Chunk::ToolCall` before `Done`).
    ToolCalls,
}

/// What a provider streams back.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// A piece of answer text (always valid UTF-8, never reasoning, never tool-call markup).
    Text(String),
    /// A complete tool call, recognised in the model's output (or the provider's
    /// `tool_calls`); its arguments are JSON text.
    ToolCall(ToolCall),
    /// Something the user should be told that is not answer text (fallback, trimming).
    Notice { kind: String, message: String },
    /// The local engine took the request (its prompt fits the context): sent first, before
    /// the prompt is read, so a caller knows the answer has begun (it can be stopped,
    /// followed, stored) and the prompt's size even when it stops the answer early.
    Accepted { prompt_tokens: u32 },
    /// The last chunk of a successful generation.
    Done { usage: Usage, finish: FinishReason },
}

/// The stream a provider returns; an `Err` item ends it.
pub type ChunkStream = mpsc::Receiver<Result<Chunk, LlmError>>;

/// Forwards `upstream` into `tx` until either ends. A reader that leaves (`tx` closed)
/// ends it at once, not at upstream's next chunk: dropping `upstream` is what stops the
/// engine's sequence, and while the engine reads a long prompt it sends nothing for
/// seconds or minutes (a 6,000-token prompt read on for 90 s after its answer was
/// stopped, holding the engine from every other request).
pub async fn forward_chunks(mut upstream: ChunkStream, tx: mpsc::Sender<Result<Chunk, LlmError>>) {
    loop {
        tokio::select! {
            item = upstream.recv() => {
                let Some(item) = item else { break };
                if tx.send(item).await.is_err() {
                    break;
                }
            }
            () = tx.closed() => break,
        }
    }
}

/// Errors at the model boundary. Callers match on them (e.g. `QueueFull` becomes 503).
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("the engine queue is full, try again shortly")]
    QueueFull,
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("model file {path}: {reason}")]
    BadModel { path: String, reason: String },
    /// The prompt, plus the room kept for its answer (`answer_room`, 0 for a prompt that is
    /// only prefilled), does not fit the context.
    #[error(
        "prompt is {n_tokens} tokens{}, over the context size of {n_ctx}",
        match answer_room {
            0 => String::new(),
            room => format!(", {} with room for a {room}-token answer", n_tokens + room),
        }
    )]
    ContextOverflow { n_tokens: usize, answer_room: usize, n_ctx: usize },
    #[error("unknown model or tier: {0}")]
    UnknownModel(String),
    #[error("model unavailable: {0}")]
    Unavailable(String),
    /// A model server over the network (Z.ai, or an OpenAI-compatible server, which may be
    /// on this machine's loopback) refused or failed: not called "cloud", which it may not be.
    /// `sent` says whether the request (the whole prompt) may have reached the server: false
    /// only when no connection was ever made, so nothing was written.
    #[error("remote model error{}: {message}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    Cloud {
        status: Option<u16>,
        code: Option<String>,
        message: String,
        retryable: bool,
        sent: bool,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("inference failed: {0}")]
    Inference(String),
    /// The request cannot be served as asked (e.g. a tool schema the constrained decoder
    /// cannot compile, `tool_choice` naming a tool that is not offered): a 400.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl LlmError {
    /// Whether a network provider that failed with this error may have received the prompt,
    /// for the privacy ledger: only a connection that was never made, or a request refused
    /// before it was sent, proves that it did not. When unsure: it may have.
    pub fn prompt_may_have_left(&self) -> bool {
        !matches!(self, LlmError::Cloud { sent: false, .. } | LlmError::InvalidRequest(_))
    }
}

/// What of a request's tool use a provider enforces rather than only asks for, so that a
/// caller with a contract to keep (`/v1`) can refuse what a tier cannot do instead of
/// weakening it silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `tool_choice` `required` and a named function.
    pub forced_tool_choice: bool,
    /// `response_format` `json_schema` (not only `json_object`).
    pub json_schema: bool,
}

impl Capabilities {
    /// Everything: the local engine (constrained decoding) and OpenAI-compatible servers
    /// (sent the OpenAI fields, which they enforce).
    pub const ALL: Capabilities = Capabilities { forced_tool_choice: true, json_schema: true };
}

/// Who a provider is, for the privacy ledger and the UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    /// `local`, `zai` or `openai` (a remote OpenAI-compatible server).
    pub provider: String,
    /// The model name as shown to the user (file name for local models).
    pub model: String,
    /// Whether a request to this provider leaves the machine: false for the in-process
    /// engine and for a server on loopback, true for every other host.
    pub leaves_machine: bool,
    /// The host a network provider talks to (`gpu-box:8000`, `api.z.ai`), for the ledger;
    /// `None` for the in-process engine. A provider with a host gets the router's fallback
    /// to `main` when it fails before its first token.
    pub host: Option<String>,
}

/// A loaded local model's device and memory, for `/api/health` and `/api/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUse {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The processor's or GPU's model name.
    pub device_name: String,
    /// The weights where they run.
    pub weights_bytes: u64,
    /// KV state kept for the next turns of conversations.
    pub kv_kept_bytes: u64,
    /// A GPU's memory in use now, by every process on it.
    pub device_memory_used_bytes: Option<u64>,
    pub device_memory_total_bytes: Option<u64>,
}

/// What a check of a network provider found, without generating anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The server answered at all.
    pub reachable: bool,
    /// Whether its model list (`/v1/models`) names the configured model; `None` when the
    /// list could not be read.
    pub model_listed: Option<bool>,
    /// What went wrong, in a sentence (never the key).
    pub error: Option<String>,
}

/// Anything that can answer a chat request with a token stream.
///
/// `stream` resolves once the answer has started (or failed before its first token), so
/// a caller can still fall back to another provider on early failures.
pub trait Provider: Send + Sync {
    fn info(&self) -> ProviderInfo;

    /// Where a loaded local model runs and the memory it holds; `None` for network
    /// providers.
    fn device(&self) -> Option<DeviceUse> {
        None
    }
    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>>;

    /// What of `ToolUse` this provider enforces; everything unless it says otherwise.
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// Prepares the KV state of `request`'s prompt in idle time, without generating, so a
    /// later request that starts with the same tokens only prefills what is new. Idle work
    /// yields to every real request. Providers without a local cache do nothing.
    fn warm(&self, request: LlmRequest) -> BoxFuture<'_, Result<(), LlmError>> {
        let _ = request;
        Box::pin(async { Ok(()) })
    }

    /// Checks a network provider (is it reachable, does it serve the model) without
    /// generating. Providers with nothing to check answer `None`.
    fn probe(&self) -> BoxFuture<'_, Option<Probe>> {
        Box::pin(async { None })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A reader that leaves while the engine sends nothing (reading a long prompt) ends the
    /// forwarding at once, and the engine's side sees its receiver gone.
    #[tokio::test]
    async fn forwarding_ends_when_the_reader_leaves_while_upstream_is_silent() {
        let (upstream_tx, upstream) = mpsc::channel(4);
        let (tx, rx) = mpsc::channel(4);
        let forwarding = tokio::spawn(forward_chunks(upstream, tx));
        upstream_tx.send(Ok(Chunk::Accepted { prompt_tokens: 9 })).await.unwrap();
        let mut rx = rx;
        assert!(matches!(rx.recv().await, Some(Ok(Chunk::Accepted { prompt_tokens: 9 }))));
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("the forwarding ends without another chunk")
            .unwrap();
        assert!(upstream_tx.is_closed(), "the engine's sender sees the reader gone");
    }
}
