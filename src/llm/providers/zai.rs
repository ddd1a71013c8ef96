//! Z.ai (GLM) as a configuration of the OpenAI-compatible client (`openai_compat.rs`,
//! PROTOCOLS.md §3): the general or coding endpoint, the key, the model, thinking on or
//! off, and Z.ai's retry policy. The protocol itself (body, SSE, business error codes,
//! `reasoning_content` hiding, tool calls) lives in `openai_compat.rs`.

use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::Secret;
use crate::llm::providers::openai_compat::{Dialect, OpenAiCompatConfig, OpenAiCompatProvider};
use crate::llm::{Capabilities, ChunkStream, LlmError, LlmRequest, Probe, Provider, ProviderInfo};

pub use crate::llm::providers::openai_compat::{is_retryable_code, SseEvent, SseParser};

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
    /// Limit for the response headers, every try and the pauses between them included (a
    /// retry whose pause would pass it is not made), and then for each wait for more of the
    /// stream.
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

    /// The same settings for the shared client.
    pub fn compat(&self) -> OpenAiCompatConfig {
        OpenAiCompatConfig {
            dialect: Dialect::Zai,
            base_url: self.base_url.clone(),
            api_key: Some(self.api_key.clone()),
            model: self.model.clone(),
            thinking: self.thinking,
            timeout: self.timeout,
            max_attempts: self.max_attempts,
            retry_backoff: self.retry_backoff,
        }
    }
}

/// Streams chat completions from Z.ai.
pub struct ZaiProvider {
    inner: OpenAiCompatProvider,
}

impl ZaiProvider {
    pub fn new(client: reqwest::Client, config: ZaiConfig) -> Self {
        ZaiProvider { inner: OpenAiCompatProvider::new(client, config.compat()) }
    }

    pub fn config(&self) -> &OpenAiCompatConfig {
        self.inner.config()
    }
}

impl Provider for ZaiProvider {
    fn info(&self) -> ProviderInfo {
        self.inner.info()
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        self.inner.stream(request)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn probe(&self) -> BoxFuture<'_, Option<Probe>> {
        self.inner.probe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatTurn, Role};
    use crate::llm::providers::openai_compat::request_body;
    use crate::llm::{GenerationParams, ResponseFormat, ToolChoice, ToolSpec, ToolUse};

    #[test]
    fn zai_body_keeps_its_dialect() {
        let config = ZaiConfig::new(
            "https://api.z.ai/api/paas/v4/",
            Secret::new("k"),
            "glm-4.7",
            true,
            Duration::from_secs(5),
        );
        assert_eq!(config.base_url, "https://api.z.ai/api/paas/v4");
        let mut request =
            LlmRequest::new(vec![ChatTurn::new(Role::User, "hi")], GenerationParams::greedy(8));
        request.tools = ToolUse::offer(vec![ToolSpec {
            name: "current_time".into(),
            description: "Now".into(),
            parameters: serde_json::json!({"type": "object"}),
        }]);
        request.tools.choice = ToolChoice::Required;
        request.tools.response_format = ResponseFormat::JsonObject;
        let body = request_body(&config.compat(), &request);
        assert_eq!(body["thinking"]["type"], "enabled");
        assert_eq!(body["do_sample"], false);
        assert!(body.get("stream_options").is_none(), "Z.ai rejects stream_options");
        assert!(body.get("chat_template_kwargs").is_none());
        assert_eq!(body["tool_choice"], "auto", "Z.ai supports only auto");
        assert!(body.get("parallel_tool_calls").is_none());
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["response_format"]["type"], "json_object");
    }
}
