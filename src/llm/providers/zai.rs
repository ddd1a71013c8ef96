//! `Provider` for the Z.ai (GLM) OpenAI-compatible streaming API (PROTOCOLS.md §3): request
//! body, SSE parsing, business error codes, bounded retries and timeouts. It never forwards
//! `reasoning_content`, never logs the API key, and knows nothing about tiers or fallback
//! (that is `router.rs`). The `reqwest::Client` comes from `app.rs`.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::config::Secret;
use crate::domain::Role;
use crate::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};
use crate::retry::{Backoff, Verdict};

/// Everything one Z.ai tier needs.
#[derive(Debug, Clone)]
pub struct ZaiConfig {
    /// `ZAI_BASE_URL` without a trailing slash, e.g. `https://api.z.ai/api/paas/v4`.
    pub base_url: String,
    pub api_key: Secret,
    /// e.g. `glm-4.7`.
    pub model: String,
    /// Sent as `thinking: {"type": "enabled"|"disabled"}`; the reasoning is never shown.
    pub thinking: bool,
    /// Limit for the response headers, and then for each wait for more of the stream.
    pub timeout: Duration,
    /// Tries for retryable failures before the first token (1 means no retry).
    pub max_attempts: u32,
    /// Pause before the second try; doubled for each further one.
    pub retry_backoff: Duration,
}

impl ZaiConfig {
    /// A tier's settings with the default retry policy: 3 tries, 500 ms then 1 s apart.
    pub fn new(
        base_url: &str,
        api_key: Secret,
        model: &str,
        thinking: bool,
        timeout: Duration,
    ) -> Self {
        ZaiConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            model: model.to_string(),
            thinking,
            timeout,
            max_attempts: 3,
            retry_backoff: Duration::from_millis(500),
        }
    }
}

/// The longest wait between tries, ours or one Z.ai asks for; a longer `Retry-After` ends
/// the tries (the router can fall back to a local tier instead).
const RETRY_CAP: Duration = Duration::from_secs(30);

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

/// Streams chat completions from Z.ai.
pub struct ZaiProvider {
    client: reqwest::Client,
    config: ZaiConfig,
}

impl ZaiProvider {
    pub fn new(client: reqwest::Client, config: ZaiConfig) -> Self {
        ZaiProvider { client, config }
    }

    pub fn config(&self) -> &ZaiConfig {
        &self.config
    }

    /// Tries once or more until the answer has started: retryable failures before the
    /// first token are retried with the shared backoff (`crate::retry`, honouring Z.ai's
    /// `Retry-After`); others are returned at once.
    async fn start(&self, request: LlmRequest) -> Result<ChunkStream, LlmError> {
        let body = request_body(&self.config, &request);
        let started = Instant::now();
        let backoff = Backoff { base: self.config.retry_backoff, cap: RETRY_CAP };
        crate::retry::run(
            "z.ai request",
            self.config.max_attempts,
            backoff,
            || self.try_start(&body, started),
            |failed: &Failed| match failed.error {
                LlmError::Cloud { retryable: true, .. } => {
                    Verdict::Retry { at_least: failed.retry_after }
                }
                _ => Verdict::Stop,
            },
        )
        .await
        .map_err(|failed| failed.error)
    }

    async fn try_start(&self, body: &Value, started: Instant) -> Result<ChunkStream, Failed> {
        let url = format!("{}/chat/completions", self.config.base_url);
        let timeout = self.config.timeout;
        let send = self
            .client
            .post(&url)
            .bearer_auth(self.config.api_key.expose())
            .header("Accept-Language", "en-US,en")
            .header("Accept", "text/event-stream")
            .json(body)
            .send();
        let response = match tokio::time::timeout(timeout, send).await {
            Err(_) => {
                return Err(LlmError::Timeout(format!(
                    "Z.ai sent no response within {}s",
                    timeout.as_secs_f32()
                ))
                .into())
            }
            Ok(Err(e)) => return Err(transport_error(&e).into()),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = crate::retry::retry_after_header(response.headers());
            let text = match tokio::time::timeout(timeout, response.text()).await {
                Ok(Ok(text)) => text,
                _ => String::new(),
            };
            return Err(Failed { error: http_error(status.as_u16(), &text), retry_after });
        }

        let mut reader = SseReader::new(Box::pin(response.bytes_stream()), timeout);
        let mut state = StreamState::default();
        // Read until the first answer text (reasoning deltas come first and are dropped), so
        // that every failure before the first token is still an `Err` the router can act on.
        let first = loop {
            match reader.next_event().await? {
                None => return Err(early_end().into()),
                Some(event) => match state.apply(event)? {
                    Step::Text(text) => break Some(text),
                    Step::Done => break None,
                    Step::Nothing => {}
                },
            }
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let ttft_ms = started.elapsed().as_millis() as u64;
            if let Some(text) = first {
                if tx.send(Ok(Chunk::Text(text))).await.is_err() {
                    return;
                }
            } else {
                let _ = tx.send(Ok(state.done(ttft_ms, started))).await;
                return;
            }
            loop {
                let event = match reader.next_event().await {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        // A stream that ends after `finish_reason` but without `[DONE]`
                        // is complete; one that ends before it was cut.
                        let item = if state.finish.is_some() {
                            Ok(state.done(ttft_ms, started))
                        } else {
                            Err(early_end())
                        };
                        let _ = tx.send(item).await;
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err)).await;
                        return;
                    }
                };
                let item = match state.apply(event) {
                    Ok(Step::Text(text)) => Ok(Chunk::Text(text)),
                    Ok(Step::Nothing) => continue,
                    Ok(Step::Done) => {
                        let _ = tx.send(Ok(state.done(ttft_ms, started))).await;
                        return;
                    }
                    Err(err) => Err(err),
                };
                let is_err = item.is_err();
                // A closed receiver means the user left: dropping the response here closes
                // the connection, which stops the generation upstream.
                if tx.send(item).await.is_err() || is_err {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

impl Provider for ZaiProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "zai".to_string(),
            model: self.config.model.clone(),
            leaves_machine: true,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        Box::pin(self.start(request))
    }
}

/// The JSON body: OpenAI fields Z.ai accepts, an explicit `max_tokens`, and `thinking`.
pub fn request_body(config: &ZaiConfig, request: &LlmRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|turn| {
            let role = match turn.role {
                Role::System => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            json!({ "role": role, "content": turn.content })
        })
        .collect();
    let params = &request.params;
    let mut body = json!({
        "model": config.model,
        "messages": messages,
        "stream": true,
        "max_tokens": params.max_tokens.max(1),
        "thinking": { "type": if config.thinking { "enabled" } else { "disabled" } },
    });
    // Z.ai takes temperature in [0, 1] and top_p in (0, 1]; greedy is `do_sample: false`.
    if params.temperature <= 0.0 {
        body["do_sample"] = json!(false);
    } else {
        body["temperature"] = json!(params.temperature.min(1.0));
        body["top_p"] = json!(params.top_p.clamp(0.01, 1.0));
    }
    body
}

/// Whether a Z.ai business code is worth retrying (PROTOCOLS.md §3.6): concurrency and
/// frequency limits, transient traffic limits, overload, internal errors.
pub fn is_retryable_code(code: &str) -> bool {
    matches!(code, "1302" | "1303" | "1305" | "1312" | "500" | "503")
}

/// Turns a non-2xx response into `LlmError::Cloud` with the business code when there is one.
fn http_error(status: u16, body: &str) -> LlmError {
    let (code, message) = parse_error_body(body);
    let retryable = match &code {
        Some(code) => is_retryable_code(code) || (status >= 500 && !code.starts_with("1")),
        // A bare 429 or 5xx without a business code is a transient limit or outage.
        None => status == 429 || status >= 500,
    };
    let message = message.unwrap_or_else(|| {
        let snippet: String = body.chars().take(200).collect();
        if snippet.trim().is_empty() {
            "no error message".to_string()
        } else {
            snippet
        }
    });
    LlmError::Cloud { status: Some(status), code, message, retryable }
}

/// Reads `{"error": {"code": "1113", "message": "…"}}`; the code may be a string or a number.
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
    let message = error.get("message").and_then(Value::as_str).map(str::to_string);
    (code, message)
}

fn transport_error(err: &reqwest::Error) -> LlmError {
    if err.is_timeout() {
        return LlmError::Timeout(format!("Z.ai: {err}"));
    }
    // Connection failures are transient as far as we can tell: retry them a little.
    LlmError::Cloud {
        status: None,
        code: None,
        message: format!("connection failed: {err}"),
        retryable: true,
    }
}

fn early_end() -> LlmError {
    LlmError::Cloud {
        status: None,
        code: None,
        message: "the stream ended before the answer was complete".to_string(),
        retryable: true,
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
    ended: bool,
}

impl<S, B> SseReader<S>
where
    S: futures::Stream<Item = reqwest::Result<B>> + Unpin,
    B: AsRef<[u8]>,
{
    fn new(bytes: S, timeout: Duration) -> Self {
        SseReader {
            bytes,
            parser: SseParser::default(),
            queue: Default::default(),
            timeout,
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
                        "Z.ai stream stalled for {}s",
                        self.timeout.as_secs_f32()
                    )))
                }
                Ok(None) => {
                    self.ended = true;
                    self.queue.extend(self.parser.finish());
                }
                Ok(Some(Err(e))) => {
                    if e.is_timeout() {
                        return Err(LlmError::Timeout(format!("Z.ai stream: {e}")));
                    }
                    return Err(LlmError::Cloud {
                        status: None,
                        code: None,
                        message: format!("connection lost: {e}"),
                        retryable: true,
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

/// What one event means for the turn.
#[derive(Debug, PartialEq)]
enum Step {
    Text(String),
    Done,
    Nothing,
}

/// Usage and finish reason seen so far in one stream.
#[derive(Debug, Default)]
struct StreamState {
    usage: Option<Usage>,
    finish: Option<FinishReason>,
}

impl StreamState {
    /// Interprets one event: answer text, the end, or an error (both error shapes the
    /// official SDK checks: `event: error` and `data: {"error": …}`). Reasoning is dropped.
    fn apply(&mut self, event: SseEvent) -> Result<Step, LlmError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Step::Done);
        }
        let value: Option<Value> = serde_json::from_str(data).ok();
        if event.event == "error" || value.as_ref().is_some_and(|v| v.get("error").is_some()) {
            let (code, message) = match &value {
                Some(v) => parse_error_value(v.get("error").unwrap_or(v)),
                None => (None, None),
            };
            let retryable = code.as_deref().is_some_and(is_retryable_code);
            let message = message.unwrap_or_else(|| {
                if data.is_empty() {
                    "error event without details".to_string()
                } else {
                    data.chars().take(200).collect()
                }
            });
            return Err(LlmError::Cloud { status: None, code, message, retryable });
        }
        let Some(value) = value else {
            // Unknown non-JSON data (keep-alives from proxies): ignore it.
            return Ok(Step::Nothing);
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
        let mut text = String::new();
        if let Some(choices) = value.get("choices").and_then(Value::as_array) {
            for choice in choices {
                // Only `content` is answer text; `reasoning_content` never leaves here.
                if let Some(content) = choice.pointer("/delta/content").and_then(Value::as_str) {
                    text.push_str(content);
                }
                match choice.get("finish_reason").and_then(Value::as_str) {
                    None => {}
                    Some("length") => self.finish = Some(FinishReason::Length),
                    Some("sensitive") => {
                        return Err(LlmError::Cloud {
                            status: None,
                            code: Some("1301".to_string()),
                            message: "the answer was blocked by Z.ai's content filter".to_string(),
                            retryable: false,
                        })
                    }
                    Some("network_error") => {
                        return Err(LlmError::Cloud {
                            status: None,
                            code: None,
                            message: "Z.ai reported an inference error".to_string(),
                            retryable: true,
                        })
                    }
                    Some(_) => self.finish = Some(FinishReason::Stop),
                }
            }
        }
        if text.is_empty() {
            Ok(Step::Nothing)
        } else {
            Ok(Step::Text(text))
        }
    }

    fn done(&mut self, ttft_ms: u64, started: Instant) -> Chunk {
        let mut usage = self.usage.take().unwrap_or_default();
        usage.ttft_ms = ttft_ms;
        usage.decode_ms = (started.elapsed().as_millis() as u64).saturating_sub(ttft_ms);
        Chunk::Done { usage, finish: self.finish.unwrap_or(FinishReason::Stop) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn reasoning_is_dropped_and_errors_are_read() {
        let mut state = StreamState::default();
        let reasoning = r#"{"choices":[{"index":0,"delta":{"reasoning_content":"secret"}}]}"#;
        assert_eq!(state.apply(event(reasoning)).unwrap(), Step::Nothing);
        let content = r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert_eq!(state.apply(event(content)).unwrap(), Step::Text("Hi".into()));
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}"#;
        assert_eq!(state.apply(event(last)).unwrap(), Step::Nothing);
        assert_eq!(state.apply(event("[DONE]")).unwrap(), Step::Done);
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
    fn http_errors_keep_the_string_code() {
        let body = r#"{"error":{"code":"1113","message":"Insufficient balance"}}"#;
        let LlmError::Cloud { status, code, message, retryable } = http_error(429, body) else {
            panic!()
        };
        assert_eq!((status, code.as_deref(), retryable), (Some(429), Some("1113"), false));
        assert_eq!(message, "Insufficient balance");
        assert!(matches!(
            http_error(429, r#"{"error":{"code":"1302","message":"x"}}"#),
            LlmError::Cloud { retryable: true, .. }
        ));
        assert!(matches!(http_error(503, "<html>"), LlmError::Cloud { retryable: true, .. }));
        assert!(matches!(
            http_error(401, r#"{"error":{"code":"1001","message":"x"}}"#),
            LlmError::Cloud { retryable: false, .. }
        ));
    }
}
