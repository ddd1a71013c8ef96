//! One streaming client for every OpenAI-compatible chat server: Z.ai (PROTOCOLS.md §3) and
//! the remote tiers (vLLM, llama-server, Ollama, SGLang on another host). It owns the
//! request body (messages, sampling, tools, `response_format`), SSE parsing, `tool_calls`
//! accumulation, error bodies, bounded retries, timeouts, the `/models` probe and the
//! classification of a host as loopback or not. It never forwards `reasoning_content`, never
//! logs the API key (every error it gives out has the key redacted, whatever the server
//! echoed), says whether a failed request may have reached the server, fails an answer that
//! says nothing (so the router can fall back), and knows nothing about tiers or fallback
//! (that is `router.rs`). The `reqwest::Client` (with its connect timeout) comes from
//! `app.rs`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::Secret;
use crate::domain::{Role, ToolCall};
use crate::llm::{
    Capabilities, Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Probe, Provider,
    ProviderInfo, ResponseFormat, ToolChoice, Usage,
};
use crate::retry::Backoff;

/// The server's flavour of the protocol: what to send besides the OpenAI fields and how to
/// read its error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Z.ai: `thinking`, `do_sample`, temperature in [0, 1], business error codes, only
    /// `tool_choice: "auto"` and `response_format: json_object` (PROTOCOLS.md §3.3), no
    /// `/models` endpoint.
    Zai,
    /// A self-hosted OpenAI-compatible server: `stream_options.include_usage`, Qwen3's
    /// `chat_template_kwargs.enable_thinking`, every `tool_choice`, `parallel_tool_calls`.
    OpenAi,
}

/// Everything one OpenAI-compatible endpoint needs.
#[derive(Clone)]
pub struct OpenAiCompatConfig {
    pub dialect: Dialect,
    /// Without a trailing slash, e.g. `http://gpu-box:8000/v1`; `/chat/completions` and
    /// `/models` are appended.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<Secret>,
    pub model: String,
    /// Whether the model thinks; the reasoning is never shown.
    pub thinking: bool,
    /// Limit for the response headers, every try and the pauses between them included (a
    /// retry whose pause would pass it is not made), and then for each wait for more of the
    /// stream (a server that stalls is given up on).
    pub timeout: Duration,
    /// Tries for retryable failures before the first token (1 means no retry).
    pub max_attempts: u32,
    /// Pause before the second try; doubled for each further one.
    pub retry_backoff: Duration,
}

// Hand-written so that the key can never reach a log through `{:?}`, even if `Secret`
// changed: only whether one is set is shown.
impl std::fmt::Debug for OpenAiCompatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiCompatConfig")
            .field("dialect", &self.dialect)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("model", &self.model)
            .field("thinking", &self.thinking)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl OpenAiCompatConfig {
    /// A remote tier: no retry (the router falls back to `main` at once instead).
    pub fn remote(
        base_url: &str,
        api_key: Option<Secret>,
        model: &str,
        thinking: bool,
        timeout: Duration,
    ) -> Self {
        OpenAiCompatConfig {
            dialect: Dialect::OpenAi,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            model: model.to_string(),
            thinking,
            timeout,
            max_attempts: 1,
            retry_backoff: Duration::from_millis(500),
        }
    }

    /// How the endpoint is named in messages: `Z.ai`, or the remote's host.
    fn label(&self) -> String {
        match self.dialect {
            Dialect::Zai => "Z.ai".to_string(),
            Dialect::OpenAi => {
                host_of(&self.base_url).unwrap_or_else(|| "the remote server".to_string())
            }
        }
    }
}

/// The host of `base_url` as the ledger records it: `gpu-box:8000`, `[::1]:8000`,
/// `api.z.ai` (the port only when the URL names one; never the user info or the path).
pub fn host_of(base_url: &str) -> Option<String> {
    let url = reqwest::Url::parse(base_url).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// Whether a request to `host` (a name or an address, optionally with `:port` or IPv6
/// brackets) stays on this machine: only `localhost`, `127.0.0.0/8` and `::1` (also as an
/// IPv4-mapped address) do. A private-range address is another machine on the network, and
/// any other name may resolve anywhere: both leave the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    // `[::1]:8000` → `::1`; `127.0.0.1:8000` → `127.0.0.1`; a bare IPv6 address has colons
    // but no brackets and parses whole.
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if host.parse::<IpAddr>().is_ok() {
        host
    } else {
        host.rsplit_once(':').map_or(host, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        })
    };
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => bare.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// The longest wait between tries, ours or one the server asks for; a longer `Retry-After`
/// ends the tries (the router can fall back to a local tier instead).
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The longest the `/models` probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One failed try, with the wait the server asked for.
struct Failed {
    error: LlmError,
    retry_after: Option<Duration>,
}

impl From<LlmError> for Failed {
    fn from(error: LlmError) -> Self {
        Failed { error, retry_after: None }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Streams chat completions from an OpenAI-compatible server.
pub struct OpenAiCompatProvider {
    client: reqwest::Client,
    config: OpenAiCompatConfig,
    host: Option<String>,
    label: String,
}

impl std::fmt::Debug for OpenAiCompatProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiCompatProvider").field("config", &self.config).finish()
    }
}

impl OpenAiCompatProvider {
    pub fn new(client: reqwest::Client, config: OpenAiCompatConfig) -> Self {
        let host = host_of(&config.base_url);
        let label = config.label();
        OpenAiCompatProvider { client, config, host, label }
    }

    pub fn config(&self) -> &OpenAiCompatConfig {
        &self.config
    }

    fn post(&self, url: &str) -> reqwest::RequestBuilder {
        let mut builder = self.client.post(url).header("Accept", "text/event-stream");
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        if self.config.dialect == Dialect::Zai {
            builder = builder.header("Accept-Language", "en-US,en");
        }
        builder
    }

    /// Tries once or more until the answer has started: retryable failures before the
    /// first token are retried with the shared backoff (`crate::retry`, honouring
    /// `Retry-After`), as long as the next try starts within `timeout` of the first: a
    /// longer wait is not made, so the router can fall back instead of leaving the user in
    /// silence. Others are returned at once. Every error has the key redacted and says
    /// whether any try may have reached the server.
    async fn start(&self, request: LlmRequest) -> Result<ChunkStream, LlmError> {
        if let Some(refusal) = self.unsupported(&request) {
            return Err(refusal);
        }
        let body = request_body(&self.config, &request);
        let tools_offered = !request.tools.offered().is_empty();
        let started = Instant::now();
        let limit = self.config.timeout;
        let backoff = Backoff { base: self.config.retry_backoff, cap: RETRY_CAP };
        let max_attempts = self.config.max_attempts.max(1);
        let what = match self.config.dialect {
            Dialect::Zai => "z.ai request",
            Dialect::OpenAi => "remote model request",
        };
        let mut sent = false;
        let mut attempt = 1;
        loop {
            let left = limit.saturating_sub(started.elapsed());
            let failed = match self.try_start(&body, tools_offered, started, left).await {
                Ok(stream) => return Ok(stream),
                Err(failed) => failed,
            };
            let Failed { error, retry_after } = failed;
            sent |= error.prompt_may_have_left();
            let mut error = with_sent(scrub(error, self.config.api_key.as_ref()), sent);
            let retryable = matches!(error, LlmError::Cloud { retryable: true, .. });
            if retryable && attempt < max_attempts {
                let wait = crate::retry::wait_before_retry(backoff, attempt, retry_after);
                match wait.filter(|wait| started.elapsed() + *wait < limit) {
                    Some(wait) => {
                        tracing::warn!(
                            attempt,
                            error = ?error.to_string(),
                            ?wait,
                            "{what}: failed, retrying"
                        );
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                        continue;
                    }
                    None => {
                        let asked = wait.or(retry_after).unwrap_or_default();
                        error = with_note(
                            error,
                            &format!(
                                "not retried: a retry in {}s would pass the {}s limit for the \
                                 first answer",
                                asked.as_secs_f32(),
                                limit.as_secs_f32()
                            ),
                        );
                    }
                }
            }
            tracing::warn!(attempt, error = ?error.to_string(), "{what}: failed");
            return Err(error);
        }
    }

    /// A request this server cannot serve as asked, refused before anything is sent: Z.ai
    /// takes only `tool_choice: "auto"` and `response_format: json_object`, and a stricter
    /// contract weakened silently would break the caller's.
    fn unsupported(&self, request: &LlmRequest) -> Option<LlmError> {
        let capabilities = self.capabilities();
        let tools = &request.tools;
        let forced = matches!(tools.choice, ToolChoice::Required | ToolChoice::Function(_));
        if forced && !tools.offered().is_empty() && !capabilities.forced_tool_choice {
            return Some(LlmError::InvalidRequest(format!(
                "{} supports only tool_choice \"auto\": it cannot be made to call a tool",
                self.label
            )));
        }
        let schema = matches!(tools.response_format, ResponseFormat::JsonSchema { .. });
        if schema && !capabilities.json_schema {
            return Some(LlmError::InvalidRequest(format!(
                "{} supports only response_format json_object: it cannot follow a JSON schema",
                self.label
            )));
        }
        None
    }

    /// One try: the request, the response headers within `left`, then the stream up to its
    /// first output, so that every failure before it is still an `Err` the router can act
    /// on.
    async fn try_start(
        &self,
        body: &Value,
        tools_offered: bool,
        started: Instant,
        left: Duration,
    ) -> Result<ChunkStream, Failed> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let timeout = self.config.timeout;
        let label = self.label.clone();
        let send = self.post(&url).json(body).send();
        let response = match tokio::time::timeout(left, send).await {
            Err(_) => {
                return Err(LlmError::Timeout(format!(
                    "{label} sent no response within {}s",
                    timeout.as_secs_f32()
                ))
                .into())
            }
            Ok(Err(e)) => return Err(transport_error(&label, e).into()),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = crate::retry::retry_after_header(response.headers());
            let text = match tokio::time::timeout(timeout, response.text()).await {
                Ok(Ok(text)) => text,
                _ => String::new(),
            };
            return Err(Failed {
                error: http_error(self.config.dialect, status.as_u16(), &text),
                retry_after,
            });
        }

        let mut reader = SseReader::new(Box::pin(response.bytes_stream()), timeout, label);
        let mut state = StreamState::new(self.config.dialect, tools_offered);
        // Read until the first output (reasoning deltas come first and are dropped; tool
        // calls are complete only at the end). An answer that ends before any is no
        // answer: a failure like any other before the first token.
        let first = loop {
            let step = match reader.next_event().await? {
                None if state.finish.is_some() => Step { out: state.flush_calls(), done: true },
                None => return Err(early_end().into()),
                Some(event) => state.apply(event)?,
            };
            if !step.out.is_empty() {
                break step;
            }
            if step.done {
                return Err(state.said_nothing().into());
            }
        };
        let key = self.config.api_key.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let ttft_ms = started.elapsed().as_millis() as u64;
            let mut step = first;
            let failed = |err: LlmError| Err(scrub(err, key.as_ref()));
            loop {
                for chunk in std::mem::take(&mut step.out) {
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                if step.done {
                    let _ = tx.send(Ok(state.done(ttft_ms, started))).await;
                    return;
                }
                // A closed receiver means the user left: returning drops the response,
                // which closes the connection and stops the generation upstream, even
                // while the server is silent.
                let event = tokio::select! {
                    event = reader.next_event() => event,
                    _ = tx.closed() => return,
                };
                step = match event {
                    Ok(Some(event)) => match state.apply(event) {
                        Ok(step) => step,
                        Err(err) => {
                            let _ = tx.send(failed(err)).await;
                            return;
                        }
                    },
                    // A stream that ends after `finish_reason` but without `[DONE]` is
                    // complete; one that ends before it was cut.
                    Ok(None) if state.finish.is_some() => {
                        Step { out: state.flush_calls(), done: true }
                    }
                    Ok(None) => {
                        let _ = tx.send(failed(early_end())).await;
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(failed(err)).await;
                        return;
                    }
                };
            }
        });
        Ok(rx)
    }

    /// `GET {base}/models`: whether the server answers and lists our model.
    async fn probe_models(&self) -> Probe {
        let url = format!("{}/models", self.config.base_url);
        let mut builder = self.client.get(&url);
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key.expose());
        }
        let timeout = self.config.timeout.min(PROBE_TIMEOUT);
        let response = match tokio::time::timeout(timeout, builder.send()).await {
            Err(_) => {
                return Probe {
                    reachable: false,
                    model_listed: None,
                    error: Some(format!("no answer within {}s", timeout.as_secs_f32())),
                }
            }
            Ok(Err(e)) => {
                return Probe {
                    reachable: false,
                    model_listed: None,
                    error: Some(redact(
                        &crate::llm::router::describe(&transport_error(&self.label, e)),
                        self.config.api_key.as_ref(),
                    )),
                }
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let text = match tokio::time::timeout(timeout, response.text()).await {
            Ok(Ok(text)) => text,
            _ => String::new(),
        };
        if !status.is_success() {
            let error = http_error(self.config.dialect, status.as_u16(), &text);
            return Probe {
                reachable: true,
                model_listed: None,
                error: Some(format!(
                    "{}/models: {}",
                    self.label,
                    redact(&crate::llm::router::describe(&error), self.config.api_key.as_ref())
                )),
            };
        }
        let ids: Option<Vec<String>> = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
            v.get("data").and_then(Value::as_array).map(|models| {
                models
                    .iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                    .collect()
            })
        });
        match ids {
            None => Probe {
                reachable: true,
                model_listed: None,
                error: Some(format!("{}/models: not an OpenAI model list", self.label)),
            },
            Some(ids) if ids.contains(&self.config.model) => {
                Probe { reachable: true, model_listed: Some(true), error: None }
            }
            Some(ids) => Probe {
                reachable: true,
                model_listed: Some(false),
                error: Some(redact(
                    &format!(
                        "{} does not list {} (it lists: {})",
                        self.label,
                        self.config.model,
                        if ids.is_empty() { "nothing".to_string() } else { ids.join(", ") }
                    ),
                    self.config.api_key.as_ref(),
                )),
            },
        }
    }
}

impl Provider for OpenAiCompatProvider {
    fn info(&self) -> ProviderInfo {
        let (provider, leaves_machine) = match self.config.dialect {
            Dialect::Zai => ("zai", true),
            Dialect::OpenAi => ("openai", !self.host.as_deref().is_some_and(is_loopback_host)),
        };
        ProviderInfo {
            provider: provider.to_string(),
            model: self.config.model.clone(),
            leaves_machine,
            host: self.host.clone(),
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        Box::pin(self.start(request))
    }

    fn capabilities(&self) -> Capabilities {
        match self.config.dialect {
            // PROTOCOLS.md §3.3: only `tool_choice: "auto"`, and `json_object` as the one
            // structured format.
            Dialect::Zai => Capabilities { forced_tool_choice: false, json_schema: false },
            Dialect::OpenAi => Capabilities::ALL,
        }
    }

    fn probe(&self) -> BoxFuture<'_, Option<Probe>> {
        Box::pin(async move {
            match self.config.dialect {
                // Z.ai has no model-listing endpoint (PROTOCOLS.md §3.2).
                Dialect::Zai => None,
                Dialect::OpenAi => Some(self.probe_models().await),
            }
        })
    }
}

/// The JSON body: the OpenAI fields, an explicit `max_tokens`, the tools offered, and what
/// the dialect adds.
pub fn request_body(config: &OpenAiCompatConfig, request: &LlmRequest) -> Value {
    let messages: Vec<Value> = request.messages.iter().map(message_json).collect();
    let params = &request.params;
    let mut body = json!({
        "model": config.model,
        "messages": messages,
        "stream": true,
        "max_tokens": params.max_tokens.max(1),
    });
    match config.dialect {
        Dialect::Zai => {
            body["thinking"] =
                json!({ "type": if config.thinking { "enabled" } else { "disabled" } });
            // Z.ai takes temperature in [0, 1] and top_p in (0, 1]; greedy is
            // `do_sample: false`.
            if params.temperature <= 0.0 {
                body["do_sample"] = json!(false);
            } else {
                body["temperature"] = json!(params.temperature.min(1.0));
                body["top_p"] = json!(params.top_p.clamp(0.01, 1.0));
            }
        }
        Dialect::OpenAi => {
            body["stream_options"] = json!({ "include_usage": true });
            body["temperature"] = json!(params.temperature.max(0.0));
            if params.temperature > 0.0 {
                body["top_p"] = json!(params.top_p.clamp(0.01, 1.0));
            }
            if let Some(seed) = params.seed {
                body["seed"] = json!(seed);
            }
            // Sent only when asked for: 0 is every server's default. (Z.ai's API has no
            // `presence_penalty` and no `seed`: its dialect leaves both out.)
            if params.presence_penalty != 0.0 {
                body["presence_penalty"] = json!(params.presence_penalty);
            }
            // Qwen3 (and other hybrid models) on vLLM, SGLang and llama-server read this
            // from the chat template; servers that do not know it ignore it.
            body["chat_template_kwargs"] = json!({ "enable_thinking": config.thinking });
        }
    }
    let tools = &request.tools;
    let offered = tools.offered();
    if !offered.is_empty() {
        body["tools"] = offered
            .iter()
            .map(|tool| {
                json!({"type": "function", "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                }})
            })
            .collect();
        match config.dialect {
            // Z.ai supports only `auto` (PROTOCOLS.md §3.3); `start` refuses a stricter
            // choice before anything is sent (`OpenAiCompatProvider::unsupported`).
            Dialect::Zai => body["tool_choice"] = json!("auto"),
            Dialect::OpenAi => {
                body["tool_choice"] = match &tools.choice {
                    ToolChoice::Auto | ToolChoice::None => json!("auto"),
                    ToolChoice::Required => json!("required"),
                    ToolChoice::Function(name) => {
                        json!({"type": "function", "function": {"name": name}})
                    }
                };
                body["parallel_tool_calls"] = json!(tools.parallel);
            }
        }
    }
    match (&tools.response_format, config.dialect) {
        (ResponseFormat::Text, _) => {}
        (ResponseFormat::JsonObject, _) | (ResponseFormat::JsonSchema { .. }, Dialect::Zai) => {
            // Z.ai knows `json_object` only; `start` refuses a schema before anything is
            // sent, so only a body built for inspection gets here with one.
            body["response_format"] = json!({"type": "json_object"});
        }
        (ResponseFormat::JsonSchema { name, schema }, Dialect::OpenAi) => {
            body["response_format"] = json!({"type": "json_schema", "json_schema": {
                "name": name, "schema": schema, "strict": true,
            }});
        }
    }
    body
}

/// One chat turn in OpenAI's shape: assistant turns carry their `tool_calls`, tool turns
/// the `tool_call_id` they answer.
fn message_json(turn: &crate::domain::ChatTurn) -> Value {
    let role = match turn.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut message = json!({ "role": role, "content": turn.content });
    if !turn.tool_calls.is_empty() {
        if turn.content.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = turn
            .tool_calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function", "function": {
                    "name": call.name, "arguments": call.arguments,
                }})
            })
            .collect();
    }
    if let Some(id) = &turn.tool_call_id {
        message["tool_call_id"] = json!(id);
    }
    message
}

/// Whether a Z.ai business code is worth retrying (PROTOCOLS.md §3.6): concurrency and
/// frequency limits, transient traffic limits, overload, internal errors.
pub fn is_retryable_code(code: &str) -> bool {
    matches!(code, "1302" | "1303" | "1305" | "1312" | "500" | "503")
}

/// Turns a non-2xx response into `LlmError::Cloud` with the error code when there is one.
fn http_error(dialect: Dialect, status: u16, body: &str) -> LlmError {
    let (code, message) = parse_error_body(body);
    let retryable = match (&code, dialect) {
        (Some(code), Dialect::Zai) => {
            is_retryable_code(code) || (status >= 500 && !code.starts_with('1'))
        }
        // A bare 429 or 5xx without a business code is a transient limit or outage; the
        // codes of other servers (`model_not_found`, `400`) say nothing more.
        _ => status == 429 || status >= 500,
    };
    let message = message.unwrap_or_else(|| {
        let snippet: String = body.chars().take(200).collect();
        if snippet.trim().is_empty() {
            "no error message".to_string()
        } else {
            snippet
        }
    });
    LlmError::Cloud { status: Some(status), code, message, retryable, sent: true }
}

/// Reads `{"error": {"code": "1113", "message": "…"}}`, or vLLM's flat
/// `{"object": "error", "message": "…", "code": 400}`; the code may be a string or a number.
fn parse_error_body(body: &str) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return (None, None);
    };
    parse_error_value(value.get("error").unwrap_or(&value))
}

fn parse_error_value(error: &Value) -> (Option<String>, Option<String>) {
    let code = match error.get("code") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = match error {
        Value::String(s) => Some(s.clone()),
        _ => error.get("message").and_then(Value::as_str).map(str::to_string),
    };
    (code, message)
}

/// A request that failed in the client: a connection that could not be made (refused, no
/// route, a connect timeout: nothing was written, `sent: false`), or one lost or timed out
/// after it was made, when the request may have been read. The URL is left out (it may hold
/// user info).
fn transport_error(label: &str, err: reqwest::Error) -> LlmError {
    let err = err.without_url();
    let sent = !err.is_connect();
    let cause = std::error::Error::source(&err).map(|s| format!(" ({s})")).unwrap_or_default();
    if err.is_timeout() && sent {
        return LlmError::Timeout(format!("{label}: {err}{cause}"));
    }
    // Connection failures are transient as far as we can tell: retried where the config
    // allows more than one try.
    LlmError::Cloud {
        status: None,
        code: None,
        message: format!("connection to {label} failed{cause}"),
        retryable: true,
        sent,
    }
}

fn early_end() -> LlmError {
    LlmError::Cloud {
        status: None,
        code: None,
        message: "the stream ended before the answer was complete".to_string(),
        retryable: true,
        sent: true,
    }
}

/// `text` with every occurrence of the API key replaced by `***`: servers echo a bad key
/// back ("Invalid API key: sk-…"), and what they say goes to logs, notices and
/// `/api/health`. The `Authorization` value is `Bearer <key>`, so it is covered too.
fn redact(text: &str, key: Option<&Secret>) -> String {
    match key.map(Secret::expose).filter(|key| !key.is_empty()) {
        Some(key) if text.contains(key) => text.replace(key, "***"),
        _ => text.to_string(),
    }
}

/// `err` with the API key redacted from its text: the one gate every error of this client
/// passes before anyone sees it.
fn scrub(err: LlmError, key: Option<&Secret>) -> LlmError {
    let clean = |text: String| redact(&text, key);
    match err {
        LlmError::Cloud { status, code, message, retryable, sent } => LlmError::Cloud {
            status,
            code: code.map(clean),
            message: clean(message),
            retryable,
            sent,
        },
        LlmError::Timeout(message) => LlmError::Timeout(clean(message)),
        LlmError::Unavailable(message) => LlmError::Unavailable(clean(message)),
        LlmError::Inference(message) => LlmError::Inference(clean(message)),
        LlmError::InvalidRequest(message) => LlmError::InvalidRequest(clean(message)),
        other => other,
    }
}

/// `err` saying that the prompt may have reached the server when an earlier try did.
fn with_sent(err: LlmError, earlier: bool) -> LlmError {
    match err {
        LlmError::Cloud { status, code, message, retryable, sent } => {
            LlmError::Cloud { status, code, message, retryable, sent: sent || earlier }
        }
        other => other,
    }
}

/// `err` with `note` added to its message (why no further try was made).
fn with_note(err: LlmError, note: &str) -> LlmError {
    match err {
        LlmError::Cloud { status, code, message, retryable, sent } => {
            LlmError::Cloud { status, code, message: format!("{message}; {note}"), retryable, sent }
        }
        LlmError::Timeout(message) => LlmError::Timeout(format!("{message}; {note}")),
        other => other,
    }
}

/// One server-sent event: its `event:` name (empty for the default) and joined `data:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Incremental SSE parser: feed bytes, take complete events. Handles `\n` and `\r\n`,
/// comments (`:`), multi-line `data:` and events split across network reads.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.buffer.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buffer.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    events.push(SseEvent {
                        event: std::mem::take(&mut self.event),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => self.data.push(value.to_string()),
                "event" => self.event = value.to_string(),
                _ => {}
            }
        }
        events
    }

    /// What is left when the connection closes: a last event without its blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            let mut events = self.push(&rest);
            events.extend(self.push(b"\n\n"));
            return events.into_iter().next();
        }
        if self.data.is_empty() && self.event.is_empty() {
            return None;
        }
        Some(SseEvent {
            event: std::mem::take(&mut self.event),
            data: std::mem::take(&mut self.data).join("\n"),
        })
    }
}

struct SseReader<S> {
    bytes: S,
    parser: SseParser,
    queue: std::collections::VecDeque<SseEvent>,
    timeout: Duration,
    label: String,
    ended: bool,
}

impl<S, B> SseReader<S>
where
    S: futures::Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    fn new(bytes: S, timeout: Duration, label: String) -> Self {
        SseReader {
            bytes,
            parser: SseParser::default(),
            queue: Default::default(),
            timeout,
            label,
            ended: false,
        }
    }

    /// The next event; `None` at the end of the body. Each wait is bounded by `timeout`,
    /// so a stalled stream becomes `Timeout` instead of hanging the turn.
    async fn next_event(&mut self) -> Result<Option<SseEvent>, LlmError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout(self.timeout, self.bytes.next()).await {
                Err(_) => {
                    return Err(LlmError::Timeout(format!(
                        "{} stream stalled for {}s",
                        self.label,
                        self.timeout.as_secs_f32()
                    )))
                }
                Ok(None) => {
                    self.ended = true;
                    self.queue.extend(self.parser.finish());
                }
                Ok(Some(Err(e))) => {
                    let e = e.without_url();
                    if e.is_timeout() {
                        return Err(LlmError::Timeout(format!("{} stream: {e}", self.label)));
                    }
                    return Err(LlmError::Cloud {
                        status: None,
                        code: None,
                        message: format!("connection lost: {e}"),
                        retryable: true,
                        sent: true,
                    });
                }
                Ok(Some(Ok(bytes))) => {
                    let events = self.parser.push(bytes.as_ref());
                    self.queue.extend(events);
                }
            }
        }
    }
}

/// What one event means for the turn: chunks to pass on (text, complete tool calls), and
/// whether the stream is over.
#[derive(Debug, Default, PartialEq)]
struct Step {
    out: Vec<Chunk>,
    done: bool,
}

/// A tool call being streamed in fragments.
#[derive(Debug, Default)]
struct PartialCall {
    id: String,
    name: String,
    arguments: String,
}

/// Usage, finish reason and unfinished tool calls seen so far in one stream.
#[derive(Debug)]
struct StreamState {
    dialect: Dialect,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    /// By the `index` the server gives each call, then by arrival among the calls that
    /// share one (see `add_call_fragments`).
    calls: BTreeMap<(u64, u32), PartialCall>,
    /// Whether any tool call was passed on.
    made_calls: bool,
    /// Whether the request offered tools: a call without them is no answer.
    tools_offered: bool,
    /// Whether any answer text was passed on.
    wrote_text: bool,
    /// Whether the model sent reasoning (never passed on), to say why an answer is empty.
    reasoned: bool,
}

impl StreamState {
    fn new(dialect: Dialect, tools_offered: bool) -> Self {
        StreamState {
            dialect,
            usage: None,
            finish: None,
            calls: BTreeMap::new(),
            made_calls: false,
            tools_offered,
            wrote_text: false,
            reasoned: false,
        }
    }

    /// Why a stream that ended before any text or tool call is no answer: a failure before
    /// the first token, so the router can fall back.
    fn said_nothing(&self) -> LlmError {
        let message = match (self.finish, self.reasoned) {
            (Some(FinishReason::Length), true) => {
                match self.usage.as_ref().map(|u| u.completion_tokens).filter(|n| *n > 0) {
                    Some(n) => format!(
                        "spent its whole length limit ({n} tokens) thinking and answered nothing"
                    ),
                    None => "spent its whole length limit thinking and answered nothing".into(),
                }
            }
            (Some(FinishReason::Length), false) => {
                "reached its length limit and answered nothing".to_string()
            }
            (_, true) => "thought, then answered nothing".to_string(),
            (_, false) => "answered nothing".to_string(),
        };
        LlmError::Cloud { status: None, code: None, message, retryable: false, sent: true }
    }

    /// Interprets one event: answer text, tool-call fragments, the end, or an error (both
    /// error shapes the official SDK checks: `event: error` and `data: {"error": …}`).
    /// Reasoning is dropped.
    fn apply(&mut self, event: SseEvent) -> Result<Step, LlmError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Step { out: self.flush_calls(), done: true });
        }
        let value: Option<Value> = serde_json::from_str(data).ok();
        if event.event == "error" || value.as_ref().is_some_and(|v| v.get("error").is_some()) {
            let (code, message) = match &value {
                Some(v) => parse_error_value(v.get("error").unwrap_or(v)),
                None => (None, None),
            };
            let retryable =
                self.dialect == Dialect::Zai && code.as_deref().is_some_and(is_retryable_code);
            let message = message.unwrap_or_else(|| {
                if data.is_empty() {
                    "error event without details".to_string()
                } else {
                    data.chars().take(200).collect()
                }
            });
            return Err(LlmError::Cloud { status: None, code, message, retryable, sent: true });
        }
        let Some(value) = value else {
            // An event the protocol does not define (`event: ping`) or one without data
            // holds nothing to lose; unreadable data may have been part of the answer, and
            // skipping it would hand on a different answer than the model wrote.
            if data.is_empty() || !matches!(event.event.as_str(), "" | "message") {
                return Ok(Step::default());
            }
            let snippet: String = data.chars().take(80).collect();
            return Err(LlmError::Cloud {
                status: None,
                code: None,
                message: format!("sent an event that is not JSON: `{snippet}`"),
                retryable: false,
                sent: true,
            });
        };
        if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
            let number = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0) as u32;
            self.usage = Some(Usage {
                prompt_tokens: number(usage.get("prompt_tokens")),
                cached_tokens: number(usage.pointer("/prompt_tokens_details/cached_tokens")),
                completion_tokens: number(usage.get("completion_tokens")),
                ..Usage::default()
            });
        }
        let mut step = Step::default();
        let mut text = String::new();
        if let Some(choices) = value.get("choices").and_then(Value::as_array) {
            for choice in choices {
                // Only `content` is answer text; `reasoning_content` (and vLLM's
                // `reasoning`) never leaves here.
                if let Some(content) = choice.pointer("/delta/content").and_then(Value::as_str) {
                    text.push_str(content);
                }
                let delta = choice.get("delta");
                self.reasoned |= ["reasoning_content", "reasoning"].iter().any(|field| {
                    delta
                        .and_then(|d| d.get(*field))
                        .and_then(Value::as_str)
                        .is_some_and(|r| !r.is_empty())
                });
                if let Some(calls) = choice.pointer("/delta/tool_calls").and_then(Value::as_array) {
                    if self.tools_offered {
                        self.add_call_fragments(calls);
                    } else if !self.wrote_text && text.is_empty() {
                        // A call when none was offered, before any text: no answer to the
                        // request as asked (the router falls back). After text, the text
                        // is the answer and the call is dropped, as the request's contract
                        // says (no calls without tools).
                        let name = calls
                            .iter()
                            .find_map(|c| c.pointer("/function/name").and_then(Value::as_str))
                            .unwrap_or("a tool");
                        return Err(LlmError::Cloud {
                            status: None,
                            code: None,
                            message: format!(
                                "answered with a call of `{name}` although no tools were offered"
                            ),
                            retryable: false,
                            sent: true,
                        });
                    } else {
                        tracing::debug!("a tool call without tools offered is dropped");
                    }
                }
                match choice.get("finish_reason").and_then(Value::as_str) {
                    None => {}
                    Some("length") => self.finish = Some(FinishReason::Length),
                    Some("tool_calls") => self.finish = Some(FinishReason::ToolCalls),
                    Some("sensitive") => {
                        return Err(LlmError::Cloud {
                            status: None,
                            code: Some("1301".to_string()),
                            message: "the answer was blocked by Z.ai's content filter".to_string(),
                            retryable: false,
                            sent: true,
                        })
                    }
                    Some("network_error") => {
                        return Err(LlmError::Cloud {
                            status: None,
                            code: None,
                            message: "the server reported an inference error".to_string(),
                            retryable: true,
                            sent: true,
                        })
                    }
                    Some(_) => self.finish = Some(FinishReason::Stop),
                }
            }
        }
        if !text.is_empty() {
            self.wrote_text = true;
            step.out.push(Chunk::Text(text));
        }
        // The calls are complete once the answer has finished.
        if self.finish.is_some() {
            step.out.extend(self.flush_calls());
        }
        Ok(step)
    }

    /// Adds `delta.tool_calls` fragments: the first fragment of a call carries its id and
    /// name, the following ones more of its arguments. Some servers give every call of an
    /// answer the same `index` (Ollama's OpenAI API sends 0 for all of them): a fragment
    /// whose id, or name, differs from the one its index holds starts another call, instead
    /// of gluing its arguments to the first call's (`{"a":1}{"b":2}`: the first call would
    /// get an error result and the second would never run).
    fn add_call_fragments(&mut self, fragments: &[Value]) {
        for (position, fragment) in fragments.iter().enumerate() {
            let index = fragment.get("index").and_then(Value::as_u64).unwrap_or(position as u64);
            let id = fragment.get("id").and_then(Value::as_str).filter(|s| !s.is_empty());
            let name = fragment
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            // The newest call at this index, which a fragment continues unless it names
            // another.
            let mut key = (index, 0);
            if let Some((&newest, current)) =
                self.calls.range((index, 0)..=(index, u32::MAX)).next_back()
            {
                key = newest;
                let other_id = id.is_some_and(|id| !current.id.is_empty() && current.id != id);
                // A name repeated in every fragment of one call is the same name; a
                // different one, with no id to say otherwise, is another call.
                let other_name = id.is_none()
                    && name.is_some_and(|name| !current.name.is_empty() && current.name != name);
                if other_id || other_name {
                    key.1 += 1;
                }
            }
            let call = self.calls.entry(key).or_default();
            if let Some(id) = id {
                call.id = id.to_string();
            }
            if let Some(name) = name {
                if call.name.is_empty() {
                    call.name = name.to_string();
                }
            }
            match fragment.pointer("/function/arguments") {
                Some(Value::String(piece)) => call.arguments.push_str(piece),
                // Some servers send the arguments as an object, whole.
                Some(object @ Value::Object(_)) => call.arguments.push_str(&object.to_string()),
                _ => {}
            }
        }
    }

    /// The accumulated calls as complete `Chunk::ToolCall`s, in index order.
    fn flush_calls(&mut self) -> Vec<Chunk> {
        let calls = std::mem::take(&mut self.calls);
        let out: Vec<Chunk> = calls
            .into_values()
            // A call with arguments or an id but no name is still a call the model made: it
            // goes on, to get the assistant's "names no tool" error result rather than
            // vanish; only a fragment with nothing in it is noise.
            .filter(|call| {
                !call.name.is_empty() || !call.id.is_empty() || !call.arguments.trim().is_empty()
            })
            .map(|call| {
                Chunk::ToolCall(ToolCall {
                    id: if call.id.is_empty() { crate::tools::new_call_id() } else { call.id },
                    name: call.name,
                    arguments: if call.arguments.trim().is_empty() {
                        "{}".to_string()
                    } else {
                        call.arguments
                    },
                })
            })
            .collect();
        self.made_calls |= !out.is_empty();
        out
    }

    fn done(&mut self, ttft_ms: u64, started: Instant) -> Chunk {
        let mut usage = self.usage.take().unwrap_or_default();
        usage.ttft_ms = ttft_ms;
        usage.decode_ms = (started.elapsed().as_millis() as u64).saturating_sub(ttft_ms);
        // Some servers end a tool-calling answer with `stop`: the calls say what it was.
        let finish = match self.finish {
            _ if self.made_calls => FinishReason::ToolCalls,
            // …and calls that were not passed on (none offered) leave a plain answer.
            Some(FinishReason::ToolCalls) | None => FinishReason::Stop,
            Some(finish) => finish,
        };
        Chunk::Done { usage, finish }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{GenerationParams, ToolSpec, ToolUse};

    #[test]
    fn sse_parser_handles_split_reads_crlf_and_comments() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        let events =
            parser.push(b":1}\r\n\r\n: keep-alive\n\nevent: error\ndata: x\n\ndata: [DONE]");
        assert_eq!(
            events,
            vec![
                SseEvent { event: String::new(), data: "{\"a\":1}".into() },
                SseEvent { event: "error".into(), data: "x".into() },
            ]
        );
        assert_eq!(parser.finish(), Some(SseEvent { event: String::new(), data: "[DONE]".into() }));
    }

    fn event(data: &str) -> SseEvent {
        SseEvent { event: String::new(), data: data.into() }
    }

    fn text(s: &str) -> Step {
        Step { out: vec![Chunk::Text(s.into())], done: false }
    }

    #[test]
    fn reasoning_is_dropped_and_errors_are_read() {
        let mut state = StreamState::new(Dialect::Zai, true);
        let reasoning = r#"{"choices":[{"index":0,"delta":{"reasoning_content":"secret"}}]}"#;
        assert_eq!(state.apply(event(reasoning)).unwrap(), Step::default());
        let content = r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert_eq!(state.apply(event(content)).unwrap(), text("Hi"));
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}"#;
        assert_eq!(state.apply(event(last)).unwrap(), Step::default());
        assert_eq!(state.apply(event("[DONE]")).unwrap(), Step { out: vec![], done: true });
        let Chunk::Done { usage, finish } = state.done(1, Instant::now()) else { panic!() };
        assert_eq!((usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens), (5, 3, 2));
        assert_eq!(finish, FinishReason::Length);

        let err = state.apply(event(r#"{"error":{"code":"1305","message":"busy"}}"#)).unwrap_err();
        assert!(
            matches!(err, LlmError::Cloud { retryable: true, ref code, .. } if code.as_deref() == Some("1305"))
        );
        let err = state
            .apply(SseEvent {
                event: "error".into(),
                data: r#"{"code":1113,"message":"no"}"#.into(),
            })
            .unwrap_err();
        assert!(
            matches!(err, LlmError::Cloud { retryable: false, ref code, .. } if code.as_deref() == Some("1113"))
        );
    }

    #[test]
    fn tool_call_fragments_become_whole_calls_in_index_order() {
        let mut state = StreamState::new(Dialect::OpenAi, true);
        let frames = [
            r#"{"choices":[{"index":0,"delta":{"content":"Let me check."}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"current_time","arguments":""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"reminders_create","arguments":"{\"te"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"xt\": \"hi\"}"}}]}}]}"#,
        ];
        let mut out = Vec::new();
        for frame in frames {
            out.extend(state.apply(event(frame)).unwrap().out);
        }
        assert_eq!(out, vec![Chunk::Text("Let me check.".into())], "no call before the end");
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
        let step = state.apply(event(last)).unwrap();
        assert_eq!(
            step.out,
            vec![
                Chunk::ToolCall(ToolCall {
                    id: "call_a".into(),
                    name: "current_time".into(),
                    arguments: "{}".into()
                }),
                Chunk::ToolCall(ToolCall {
                    id: "call_b".into(),
                    name: "reminders_create".into(),
                    arguments: r#"{"text": "hi"}"#.into()
                }),
            ]
        );
        assert!(state.apply(event("[DONE]")).unwrap().done);
        assert!(matches!(
            state.done(0, Instant::now()),
            Chunk::Done { finish: FinishReason::ToolCalls, .. }
        ));
    }

    /// Ollama's OpenAI API gives every call of an answer `index: 0`: the calls stay apart
    /// (by their ids, or by their names when they have none), in the order they came, and
    /// a call whose fragments repeat its id and name is still one call.
    #[test]
    fn calls_that_share_an_index_stay_apart() {
        let mut state = StreamState::new(Dialect::OpenAi, true);
        let frames = [
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"file_write","arguments":"{\"path\":"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"file_write","arguments":"\"a\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_b","type":"function","function":{"name":"file_write","arguments":"{\"path\":\"b\"}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"type":"function","function":{"name":"current_time","arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":" "}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ];
        let mut out = Vec::new();
        for frame in frames {
            out.extend(state.apply(event(frame)).unwrap().out);
        }
        let calls: Vec<(String, String)> = out
            .iter()
            .map(|chunk| match chunk {
                Chunk::ToolCall(call) => (call.name.clone(), call.arguments.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            calls,
            [
                ("file_write".to_string(), r#"{"path":"a"}"#.to_string()),
                ("file_write".to_string(), r#"{"path":"b"}"#.to_string()),
                ("current_time".to_string(), "{} ".to_string()),
            ]
        );
        let Chunk::ToolCall(first) = &out[0] else { unreachable!() };
        let Chunk::ToolCall(second) = &out[1] else { unreachable!() };
        assert_eq!((first.id.as_str(), second.id.as_str()), ("call_a", "call_b"));
    }

    /// A call without a name reaches the assistant, which answers it with an error result
    /// the model reads (QA pass 13: it vanished here); an empty fragment does not.
    #[test]
    fn a_call_without_a_name_goes_on_and_an_empty_fragment_does_not() {
        let mut state = StreamState::new(Dialect::OpenAi, true);
        let frames = [
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"arguments":"{\"x\":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"type":"function","function":{"arguments":" "}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        ];
        let mut out = Vec::new();
        for frame in frames {
            out.extend(state.apply(event(frame)).unwrap().out);
        }
        let call =
            ToolCall { id: "call_a".into(), name: String::new(), arguments: r#"{"x":1}"#.into() };
        assert_eq!(out, vec![Chunk::ToolCall(call)]);
    }

    #[test]
    fn http_errors_keep_the_string_code() {
        let body = r#"{"error":{"code":"1113","message":"Insufficient balance"}}"#;
        let LlmError::Cloud { status, code, message, retryable, .. } =
            http_error(Dialect::Zai, 429, body)
        else {
            panic!()
        };
        assert_eq!((status, code.as_deref(), retryable), (Some(429), Some("1113"), false));
        assert_eq!(message, "Insufficient balance");
        assert!(matches!(
            http_error(Dialect::Zai, 429, r#"{"error":{"code":"1302","message":"x"}}"#),
            LlmError::Cloud { retryable: true, .. }
        ));
        assert!(matches!(
            http_error(Dialect::Zai, 503, "<html>"),
            LlmError::Cloud { retryable: true, .. }
        ));
        assert!(matches!(
            http_error(Dialect::Zai, 401, r#"{"error":{"code":"1001","message":"x"}}"#),
            LlmError::Cloud { retryable: false, .. }
        ));
        // vLLM's flat error body.
        let vllm = r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#;
        let LlmError::Cloud { message, retryable, .. } = http_error(Dialect::OpenAi, 404, vllm)
        else {
            panic!()
        };
        assert_eq!((message.as_str(), retryable), ("The model `x` does not exist.", false));
    }

    #[test]
    fn loopback_hosts_stay_and_everything_else_leaves() {
        for host in [
            "localhost",
            "LocalHost",
            "localhost.",
            "localhost:8000",
            "127.0.0.1",
            "127.0.0.1:8000",
            "127.8.9.10",
            "::1",
            "[::1]",
            "[::1]:8000",
            "::ffff:127.0.0.1",
            "[::ffff:127.0.0.1]:11434",
        ] {
            assert!(is_loopback_host(host), "{host} is loopback");
        }
        for host in [
            // Private ranges are other machines on the network.
            "10.0.0.5",
            "192.168.1.20:8000",
            "172.16.0.1",
            "100.64.0.1",
            "169.254.1.1",
            "fd00::1",
            "[fe80::1]:8000",
            // Public addresses and names.
            "8.8.8.8",
            "2001:db8::1",
            "api.z.ai",
            "gpu-box",
            "gpu-box:8000",
            "gpu-box.local",
            "localhost.example.com",
            "my-localhost",
            // Unspecified addresses are not a promise of loopback.
            "0.0.0.0",
            "::",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host} leaves the machine");
        }
    }

    #[test]
    fn host_of_keeps_host_and_port_only() {
        assert_eq!(host_of("http://gpu-box:8000/v1").as_deref(), Some("gpu-box:8000"));
        assert_eq!(host_of("https://api.z.ai/api/paas/v4").as_deref(), Some("api.z.ai"));
        assert_eq!(host_of("http://[::1]:8080/v1").as_deref(), Some("[::1]:8080"));
        assert_eq!(host_of("http://user:pw@10.0.0.2:8000/v1").as_deref(), Some("10.0.0.2:8000"));
        assert_eq!(host_of("http://127.1:8000/v1").as_deref(), Some("127.0.0.1:8000"));
    }

    fn remote(thinking: bool) -> OpenAiCompatConfig {
        OpenAiCompatConfig::remote(
            "http://gpu-box:8000/v1/",
            Some(Secret::new("sk-remote-key")),
            "Qwen/Qwen3-32B",
            thinking,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn remote_info_debug_and_body() {
        let config = remote(false);
        assert_eq!(config.base_url, "http://gpu-box:8000/v1");
        let provider = OpenAiCompatProvider::new(reqwest::Client::new(), config.clone());
        for shown in [format!("{config:?}"), format!("{provider:?}")] {
            assert!(!shown.contains("sk-remote-key"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        let info = provider.info();
        assert_eq!(info.provider, "openai");
        assert_eq!(info.host.as_deref(), Some("gpu-box:8000"));
        assert!(info.leaves_machine);

        let mut request = LlmRequest::new(
            vec![
                crate::domain::ChatTurn::new(Role::User, "time?"),
                crate::domain::ChatTurn::assistant_calls(
                    "",
                    vec![ToolCall {
                        id: "call_1".into(),
                        name: "current_time".into(),
                        arguments: "{}".into(),
                    }],
                ),
                crate::domain::ChatTurn::tool_result("call_1", "12:00"),
            ],
            GenerationParams::greedy(16),
        );
        request.tools = ToolUse::offer(vec![ToolSpec {
            name: "current_time".into(),
            description: "Now".into(),
            parameters: json!({"type": "object", "properties": {}}),
        }]);
        request.tools.choice = ToolChoice::Function("current_time".into());
        request.tools.parallel = false;
        request.tools.response_format =
            ResponseFormat::JsonSchema { name: "t".into(), schema: json!({"type": "object"}) };
        let body = request_body(&config, &request);
        assert_eq!(body["model"], "Qwen/Qwen3-32B");
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
        assert_eq!(body["temperature"], 0.0);
        assert!(body.get("thinking").is_none() && body.get("do_sample").is_none());
        assert_eq!(body["tools"][0]["function"]["name"], "current_time");
        assert_eq!(body["tool_choice"]["function"]["name"], "current_time");
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(body["response_format"]["json_schema"]["name"], "t");
        assert_eq!(body["messages"][1]["content"], Value::Null);
        assert_eq!(body["messages"][1]["tool_calls"][0]["id"], "call_1");
        assert_eq!(body["messages"][2]["role"], "tool");
        assert_eq!(body["messages"][2]["tool_call_id"], "call_1");

        // `none` offers nothing.
        request.tools.choice = ToolChoice::None;
        let body = request_body(&config, &request);
        assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
        assert!(body.get("seed").is_none() && body.get("presence_penalty").is_none(), "{body}");

        // Sampling fields a client asked for reach an OpenAI-compatible server; Z.ai's API
        // has neither `seed` nor `presence_penalty`.
        request.params.seed = Some(7);
        request.params.presence_penalty = 1.5;
        let body = request_body(&config, &request);
        assert_eq!(body["seed"], 7);
        assert_eq!(body["presence_penalty"], 1.5);
        let zai = OpenAiCompatConfig { dialect: Dialect::Zai, ..config };
        let body = request_body(&zai, &request);
        assert!(body.get("seed").is_none() && body.get("presence_penalty").is_none(), "{body}");
    }

    #[test]
    fn loopback_remote_stays_on_the_machine() {
        let config = OpenAiCompatConfig::remote(
            "http://127.0.0.1:8000/v1",
            None,
            "m",
            false,
            Duration::from_secs(1),
        );
        let info = OpenAiCompatProvider::new(reqwest::Client::new(), config).info();
        assert!(!info.leaves_machine);
        assert_eq!(info.host.as_deref(), Some("127.0.0.1:8000"));
    }

    #[test]
    fn the_key_is_redacted_from_every_error() {
        let key = Secret::new("sk-zai-0123456789");
        let body = r#"{"error":{"code":"1000","message":"Invalid API key: sk-zai-0123456789"}}"#;
        let err = scrub(http_error(Dialect::Zai, 401, body), Some(&key));
        let LlmError::Cloud { ref message, status, sent, .. } = err else { panic!("{err:?}") };
        assert_eq!(message, "Invalid API key: ***");
        assert_eq!((status, sent), (Some(401), true));
        // Raw text (no JSON), the `Authorization` value, a timeout's text: all redacted.
        let raw = scrub(
            http_error(Dialect::OpenAi, 401, "bad header Bearer sk-zai-0123456789"),
            Some(&key),
        );
        assert!(!raw.to_string().contains("sk-zai"), "{raw}");
        assert!(raw.to_string().contains("Bearer ***"), "{raw}");
        let timeout = scrub(LlmError::Timeout("sk-zai-0123456789 stalled".into()), Some(&key));
        assert_eq!(timeout.to_string(), "timed out: *** stalled");
        assert_eq!(redact("nothing here", Some(&key)), "nothing here");
        assert_eq!(redact("no key set", None), "no key set");
    }

    #[test]
    fn an_answer_without_text_or_calls_says_why_it_is_none() {
        let check = |frames: &[&str], expected: &str| {
            let mut state = StreamState::new(Dialect::Zai, false);
            for frame in frames {
                let step = state.apply(event(frame)).expect("no error");
                assert!(step.out.is_empty(), "{frame}: {step:?}");
            }
            let err = state.said_nothing();
            assert!(
                matches!(&err, LlmError::Cloud { retryable: false, sent: true, message, .. }
                    if message == expected),
                "{err:?}"
            );
        };
        let thinking = r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#;
        let stop = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let length = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":64}}"#;
        check(&["[DONE]"], "answered nothing");
        check(&[thinking, stop, "[DONE]"], "thought, then answered nothing");
        check(
            &[thinking, length, "[DONE]"],
            "spent its whole length limit (64 tokens) thinking and answered nothing",
        );
        check(&[length, "[DONE]"], "reached its length limit and answered nothing");
    }

    #[test]
    fn unreadable_events_are_errors_and_undefined_ones_are_skipped() {
        let mut state = StreamState::new(Dialect::OpenAi, false);
        let ping = SseEvent { event: "ping".into(), data: "hello".into() };
        assert_eq!(state.apply(ping).unwrap(), Step::default());
        assert_eq!(state.apply(event("")).unwrap(), Step::default());
        let err = state.apply(event("{not json")).unwrap_err();
        assert!(
            matches!(&err, LlmError::Cloud { retryable: false, message, .. }
                if message.contains("not JSON") && message.contains("{not json")),
            "{err:?}"
        );
    }

    #[test]
    fn a_call_without_tools_offered_is_no_answer_before_text_and_dropped_after() {
        let call = r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"get_weather","arguments":"{}"}}]}}]}"#;
        let mut state = StreamState::new(Dialect::Zai, false);
        let err = state.apply(event(call)).unwrap_err();
        assert!(err.to_string().contains("`get_weather` although no tools were offered"), "{err}");

        let mut state = StreamState::new(Dialect::Zai, false);
        let text = r#"{"choices":[{"index":0,"delta":{"content":"Sunny."}}]}"#;
        assert_eq!(
            state.apply(event(text)).unwrap(),
            Step { out: vec![Chunk::Text("Sunny.".into())], done: false }
        );
        assert_eq!(state.apply(event(call)).unwrap(), Step::default());
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#;
        assert!(state.apply(event(last)).unwrap().out.is_empty());
        // The dropped call leaves a plain answer.
        assert!(
            matches!(state.done(0, Instant::now()), Chunk::Done { finish: FinishReason::Stop, .. }),
            "{state:?}"
        );
    }

    #[test]
    fn zai_refuses_what_it_cannot_enforce_before_sending() {
        let zai = OpenAiCompatProvider::new(
            reqwest::Client::new(),
            OpenAiCompatConfig { dialect: Dialect::Zai, ..remote(false) },
        );
        assert_eq!(
            zai.capabilities(),
            Capabilities { forced_tool_choice: false, json_schema: false }
        );
        let mut request = LlmRequest::new(
            vec![crate::domain::ChatTurn::new(Role::User, "hi")],
            GenerationParams::greedy(8),
        );
        assert!(zai.unsupported(&request).is_none());
        request.tools = ToolUse::offer(vec![ToolSpec {
            name: "current_time".into(),
            description: "Now".into(),
            parameters: json!({"type": "object"}),
        }]);
        assert!(zai.unsupported(&request).is_none(), "auto is fine");
        request.tools.choice = ToolChoice::Required;
        let err = zai.unsupported(&request).expect("refused");
        assert!(matches!(&err, LlmError::InvalidRequest(m) if m.contains("tool_choice")), "{err}");
        assert!(!err.prompt_may_have_left());
        request.tools.choice = ToolChoice::Auto;
        request.tools.response_format =
            ResponseFormat::JsonSchema { name: "t".into(), schema: json!({"type": "object"}) };
        assert!(zai.unsupported(&request).is_some());
        request.tools.response_format = ResponseFormat::JsonObject;
        assert!(zai.unsupported(&request).is_none());

        let openai = OpenAiCompatProvider::new(reqwest::Client::new(), remote(false));
        assert_eq!(openai.capabilities(), Capabilities::ALL);
    }
}
