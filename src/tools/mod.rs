//! Tools the assistant can call during a turn: the `Tool` trait, the context a call runs in,
//! and `ToolRegistry`, which offers the enabled tools to the model and runs the calls it
//! makes. Built-in tools are registered in `app.rs`; adding one is one file here. This
//! module knows nothing of models, prompts, HTTP or wire formats: a tool that needs the
//! database or the scheduler is handed them when `app.rs` builds it.

// Built-in tools (issue 15, reminders helper).
mod builtin;
pub mod current_time;
pub mod reminders;

pub use builtin::builtin_tools;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::domain::{ChannelKind, ConversationId, ToolCall, ToolResult, ToolRound};
use crate::llm::ToolSpec;

/// Who asked: the conversation, channel and sender a call runs for. A tool that writes
/// back (a reminder) writes only here, never to an address taken from its arguments.
#[derive(Debug, Clone)]
pub struct ToolContext {
    pub conversation_id: ConversationId,
    pub channel: ChannelKind,
    /// The channel's key of the conversation (phone number, Talk room token, or the WebChat
    /// conversation id as text). Personal: never logged.
    pub conversation_key: String,
}

/// Why a call failed. The model reads the message as the call's result.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    #[error("{0}")]
    Failed(String),
}

/// Something the model can call.
pub trait Tool: Send + Sync {
    /// The name the model calls it by (`[a-z0-9_]`, at most 64 characters, as OpenAI-style
    /// providers require).
    fn name(&self) -> &'static str;
    /// What it does and when to use it, for the model.
    fn description(&self) -> String;
    /// Its parameters as a JSON Schema object.
    fn parameters(&self) -> serde_json::Value;
    /// Whether a call changes anything (creates, cancels); read-only tools return false.
    fn mutates(&self) -> bool;
    /// Runs one call with its parsed arguments; the result is what the model reads.
    fn call<'a>(
        &'a self,
        context: &'a ToolContext,
        arguments: serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, ToolError>>;
    /// Undoes what a successful call did, when the answer that made it is replaced
    /// (regenerate, edit): `result` is the call's result as stored. Returns whether there was
    /// something left to undo. Tools whose calls change nothing keep this default.
    fn undo<'a>(
        &'a self,
        _context: &'a ToolContext,
        _result: &'a str,
    ) -> BoxFuture<'a, Result<bool, ToolError>> {
        Box::pin(async { Ok(false) })
    }
}

/// The tools a turn may use, in registration order.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: Vec<Arc<dyn Tool>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.iter().map(|t| t.name())).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool; a second tool with the same name replaces the first.
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.retain(|t| t.name() != tool.name());
        self.tools.push(tool);
    }

    /// Keeps only the tools `enabled` accepts (the `TOOLS` setting).
    pub fn retain(&mut self, enabled: impl Fn(&str) -> bool) {
        self.tools.retain(|t| enabled(t.name()));
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.tools.iter().map(|t| t.name()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.iter().find(|t| t.name() == name)
    }

    /// What the model is offered.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .iter()
            .map(|t| ToolSpec {
                name: t.name().to_string(),
                description: t.description(),
                parameters: t.parameters(),
            })
            .collect()
    }

    /// Undoes the successful calls of `rounds` (the tool use of an answer being replaced),
    /// newest first; returns how many had an effect left to undo. A failure is logged and
    /// the rest go on: the replacement must not wait on it.
    pub async fn undo(&self, context: &ToolContext, rounds: &[ToolRound]) -> usize {
        let mut undone = 0;
        for round in rounds.iter().rev() {
            for result in round.results.iter().rev().filter(|r| !r.is_error) {
                let call = round.calls.iter().find(|c| c.id == result.call_id);
                let Some(tool) = call.and_then(|c| self.get(&c.name)) else { continue };
                match tool.undo(context, &result.content).await {
                    Ok(true) => undone += 1,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(tool = tool.name(), error = %e, "undoing a replaced call failed")
                    }
                }
            }
        }
        undone
    }

    /// Runs `call` and always returns a result: an unknown tool, arguments that are not a
    /// JSON object, or the tool's own failure become an error result the model reads, so a
    /// malformed call never ends the turn.
    pub async fn call(&self, context: &ToolContext, call: &ToolCall) -> ToolResult {
        let outcome = match self.get(&call.name) {
            None => Err(ToolError::UnknownTool(call.name.clone())),
            Some(tool) => match parse_arguments(&call.arguments) {
                Ok(arguments) => tool.call(context, arguments).await,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(value) => ToolResult {
                call_id: call.id.clone(),
                content: match value {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                },
                is_error: false,
            },
            Err(e) => ToolResult {
                call_id: call.id.clone(),
                content: serde_json::json!({ "error": e.to_string() }).to_string(),
                is_error: true,
            },
        }
    }
}

/// The arguments of a call: a JSON object (an empty or blank text counts as `{}`).
fn parse_arguments(text: &str) -> Result<serde_json::Value, ToolError> {
    if text.trim().is_empty() {
        return Ok(serde_json::json!({}));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        Ok(_) => Err(ToolError::InvalidArguments("the arguments must be a JSON object".into())),
        Err(e) => Err(ToolError::InvalidArguments(format!("not valid JSON ({e})"))),
    }
}

/// A fresh tool-call id; it lives with the parser that gives local calls their ids (llm/
/// must not import this module).
pub use crate::llm::toolcall::new_call_id;

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Tool for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn description(&self) -> String {
            "Repeats its text.".into()
        }
        fn parameters(&self) -> serde_json::Value {
            serde_json::json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
        }
        fn mutates(&self) -> bool {
            false
        }
        fn call<'a>(
            &'a self,
            _context: &'a ToolContext,
            arguments: serde_json::Value,
        ) -> BoxFuture<'a, Result<serde_json::Value, ToolError>> {
            Box::pin(async move {
                match arguments.get("text").and_then(|t| t.as_str()) {
                    Some(text) => Ok(serde_json::Value::String(text.to_string())),
                    None => Err(ToolError::InvalidArguments("`text` is required".into())),
                }
            })
        }
    }

    fn context() -> ToolContext {
        ToolContext {
            conversation_id: ConversationId(1),
            channel: ChannelKind::WebChat,
            conversation_key: "1".into(),
        }
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall { id: "call_1".into(), name: name.into(), arguments: arguments.into() }
    }

    #[tokio::test]
    async fn calls_run_and_every_failure_becomes_an_error_result() {
        let mut registry = ToolRegistry::new();
        registry.register(Arc::new(Echo));
        let ok = registry.call(&context(), &call("echo", r#"{"text":"hi"}"#)).await;
        assert_eq!(
            (ok.content.as_str(), ok.is_error, ok.call_id.as_str()),
            ("hi", false, "call_1")
        );

        for (name, arguments, expected) in [
            ("nope", "{}", "unknown tool `nope`"),
            ("echo", "{\"text\":", "not valid JSON"),
            ("echo", "[1]", "must be a JSON object"),
            ("echo", "", "`text` is required"),
        ] {
            let result = registry.call(&context(), &call(name, arguments)).await;
            assert!(result.is_error, "{name} {arguments}");
            assert!(result.content.contains(expected), "{}", result.content);
            let parsed: serde_json::Value = serde_json::from_str(&result.content).unwrap();
            assert!(parsed["error"].is_string());
        }
    }

    #[test]
    fn the_registry_offers_what_it_keeps() {
        let mut registry = ToolRegistry::new();
        registry.register(Arc::new(Echo));
        registry.register(Arc::new(Echo));
        assert_eq!(registry.names(), ["echo"]);
        assert_eq!(registry.specs()[0].parameters["required"][0], "text");
        registry.retain(|name| name != "echo");
        assert!(registry.is_empty() && registry.specs().is_empty());
    }

    #[test]
    fn call_ids_look_like_openai_ones_and_differ() {
        let (a, b) = (new_call_id(), new_call_id());
        assert!(a.starts_with("call_") && a.len() == 29 && a != b);
    }
}
