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

/// Longest arguments a call may have, in characters: the message limit
/// (`config::MAX_MESSAGE_CHARS`), as a call is the model writing to a tool. The largest
/// legitimate arguments of the built-in tools are far smaller (a reminder's 1,000-character
/// text, escaped, with its time: about 2,100). A call over it is not run (see
/// `ToolRegistry::call`), and the answer keeps only its `kept_call` form.
pub const MAX_ARGUMENT_CHARS: usize = 16_000;
/// Longest result the model reads, in characters (about 8,000 tokens): the list of a
/// conversation's 100 reminders fits when their texts are a sentence each. A longer result
/// keeps its beginning and says how much was cut.
pub const MAX_RESULT_CHARS: usize = 32_000;
/// How much of oversized arguments the answer keeps: enough to see what the call was.
const KEPT_ARGUMENT_CHARS: usize = 200;
/// Longest tool name (as OpenAI-style providers require); a longer one is no tool's.
const MAX_NAME_CHARS: usize = 64;

/// Why a call failed. The model reads the message as the call's result.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ToolError {
    #[error("unknown tool `{0}`")]
    UnknownTool(String),
    #[error("the call names no tool: its `name` is empty")]
    NoName,
    #[error(
        "the call's arguments are {0} characters, over the limit of {MAX_ARGUMENT_CHARS}: it \
         was not run"
    )]
    ArgumentsTooLong(usize),
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

    /// Runs `call` and always returns a result: a call with no name or an unknown tool,
    /// arguments over `MAX_ARGUMENT_CHARS`, that are not a JSON object or that the tool's
    /// schema does not name (when it says `"additionalProperties": false`), or the tool's own
    /// failure become an error result the model reads, so a malformed call never ends the
    /// turn. A result over `MAX_RESULT_CHARS` is cut.
    pub async fn call(&self, context: &ToolContext, call: &ToolCall) -> ToolResult {
        let n_chars = count_chars(&call.arguments, MAX_ARGUMENT_CHARS + 1);
        let outcome = match self.get(&call.name) {
            _ if call.name.trim().is_empty() => Err(ToolError::NoName),
            None => Err(ToolError::UnknownTool(cut_text(&call.name, MAX_NAME_CHARS))),
            Some(_) if n_chars > MAX_ARGUMENT_CHARS => {
                Err(ToolError::ArgumentsTooLong(call.arguments.chars().count()))
            }
            Some(tool) => match parse_arguments(&call.arguments)
                .and_then(|arguments| known_arguments(&tool.parameters(), arguments))
            {
                Ok(arguments) => tool.call(context, arguments).await,
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(value) => ToolResult {
                call_id: call.id.clone(),
                content: cut_result(match value {
                    serde_json::Value::String(text) => text,
                    other => other.to_string(),
                }),
                is_error: false,
            },
            Err(e) => error_result(&call.id, &e),
        }
    }
}

/// `call` as an answer keeps it (stored, streamed, and in later prompts): itself, or with
/// arguments over `MAX_ARGUMENT_CHARS` replaced by their first `KEPT_ARGUMENT_CHARS`
/// characters and how many were cut. The replacement is a JSON object, as a call's
/// arguments must be: OpenAI-compatible servers parse those of earlier calls (vLLM answers
/// 400 to a prompt whose history holds arguments that are not JSON).
/// Arguments that are not a JSON object (a remote model's `{"text":`) are kept as the text
/// of one, `{"arguments_unreadable": …}`, and blank ones as `{}`, for the same reason.
/// A name longer than `MAX_NAME_CHARS` (no tool's) is cut the same way.
pub fn kept_call(call: &ToolCall) -> ToolCall {
    let arguments = if count_chars(&call.arguments, MAX_ARGUMENT_CHARS + 1) > MAX_ARGUMENT_CHARS {
        let kept = cut_text(&call.arguments, KEPT_ARGUMENT_CHARS);
        serde_json::json!({ "arguments_cut": kept }).to_string()
    } else if call.arguments.trim().is_empty() {
        "{}".to_string()
    } else if parse_arguments(&call.arguments).is_err() {
        serde_json::json!({ "arguments_unreadable": call.arguments }).to_string()
    } else {
        call.arguments.clone()
    };
    ToolCall { id: call.id.clone(), name: cut_text(&call.name, MAX_NAME_CHARS), arguments }
}

/// The error result of call `call_id`: `{"error": "…"}`.
pub fn error_result(call_id: &str, error: &ToolError) -> ToolResult {
    ToolResult {
        call_id: call_id.to_string(),
        content: serde_json::json!({ "error": error.to_string() }).to_string(),
        is_error: true,
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

/// The arguments whose names the tool's schema gives, when the schema says
/// `"additionalProperties": false`: another name is an error naming it and the known ones.
fn known_arguments(
    schema: &serde_json::Value,
    arguments: serde_json::Value,
) -> Result<serde_json::Value, ToolError> {
    if schema.get("additionalProperties") != Some(&serde_json::Value::Bool(false)) {
        return Ok(arguments);
    }
    let known = schema.get("properties").and_then(|p| p.as_object());
    let is_known = |name: &str| known.is_some_and(|k| k.contains_key(name));
    let unknown: Vec<String> = arguments
        .as_object()
        .into_iter()
        .flat_map(|object| object.keys())
        .filter(|name| !is_known(name))
        .map(|name| format!("`{}`", cut_text(name, 40)))
        .collect();
    if unknown.is_empty() {
        return Ok(arguments);
    }
    let names: Vec<String> =
        known.into_iter().flat_map(|k| k.keys()).map(|name| format!("`{name}`")).collect();
    let allowed = if names.is_empty() {
        "this tool takes no arguments".to_string()
    } else {
        format!("the arguments are {}", names.join(", "))
    };
    Err(ToolError::InvalidArguments(format!(
        "unknown argument{} {}: {allowed}",
        if unknown.len() == 1 { "" } else { "s" },
        unknown.join(", ")
    )))
}

/// A result the model reads: at most `MAX_RESULT_CHARS` characters and how many were cut.
fn cut_result(text: String) -> String {
    if count_chars(&text, MAX_RESULT_CHARS + 1) <= MAX_RESULT_CHARS {
        return text;
    }
    cut_text(&text, MAX_RESULT_CHARS)
}

/// The first `keep` characters of `text`, and, when there were more, `… (N characters cut)`.
fn cut_text(text: &str, keep: usize) -> String {
    match text.char_indices().nth(keep) {
        None => text.to_string(),
        Some((end, _)) => {
            let n_cut = text[end..].chars().count();
            format!("{}… ({n_cut} characters cut)", &text[..end])
        }
    }
}

/// The characters of `text`, counting no further than `limit`.
fn count_chars(text: &str, limit: usize) -> usize {
    text.chars().take(limit).count()
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

    /// `repeat`: `text` repeated `times` times; its schema allows nothing else.
    struct Repeat;

    impl Tool for Repeat {
        fn name(&self) -> &'static str {
            "repeat"
        }
        fn description(&self) -> String {
            "Repeats its text.".into()
        }
        fn parameters(&self) -> serde_json::Value {
            serde_json::json!({
                "type": "object",
                "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
                "additionalProperties": false
            })
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
                let text = arguments["text"].as_str().unwrap_or_default();
                let times = arguments["times"].as_u64().unwrap_or(1) as usize;
                Ok(serde_json::Value::String(text.repeat(times)))
            })
        }
    }

    fn registry() -> ToolRegistry {
        let mut registry = ToolRegistry::new();
        registry.register(Arc::new(Echo));
        registry.register(Arc::new(Repeat));
        registry
    }

    fn error_of(result: &ToolResult) -> String {
        assert!(result.is_error, "{}", result.content);
        let parsed: serde_json::Value = serde_json::from_str(&result.content).unwrap();
        parsed["error"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn arguments_over_the_limit_are_not_run_and_kept_cut() {
        let registry = registry();
        // At the limit: run.
        let text = "é".repeat(MAX_ARGUMENT_CHARS - 11);
        let at_limit = call("echo", &serde_json::json!({ "text": text }).to_string());
        assert_eq!(at_limit.arguments.chars().count(), MAX_ARGUMENT_CHARS);
        assert_eq!(registry.call(&context(), &at_limit).await.content, text);
        assert_eq!(kept_call(&at_limit), at_limit);

        // One more: refused, and what is kept is short, JSON, and says how much was cut.
        let text = "é".repeat(MAX_ARGUMENT_CHARS - 10);
        let over = call("echo", &serde_json::json!({ "text": text }).to_string());
        let error = error_of(&registry.call(&context(), &over).await);
        assert_eq!(
            error,
            format!(
                "the call's arguments are {} characters, over the limit of 16000: it was not run",
                MAX_ARGUMENT_CHARS + 1
            )
        );
        let kept = kept_call(&over);
        assert_eq!((kept.id.as_str(), kept.name.as_str()), ("call_1", "echo"));
        let arguments: serde_json::Value = serde_json::from_str(&kept.arguments).unwrap();
        let expected = format!(
            "{{\"text\":\"{}… ({} characters cut)",
            "é".repeat(200 - 9),
            MAX_ARGUMENT_CHARS + 1 - 200
        );
        assert_eq!(arguments, serde_json::json!({ "arguments_cut": expected }));

        // A name no tool has is cut in the error and in what is kept.
        let long_name = call(&"n".repeat(5_000), "{}");
        let error = error_of(&registry.call(&context(), &long_name).await);
        assert_eq!(error, format!("unknown tool `{}… (4936 characters cut)`", "n".repeat(64)));
        assert_eq!(kept_call(&long_name).name.chars().count(), 64 + 23);
    }

    #[test]
    fn arguments_that_are_not_a_json_object_are_kept_as_the_text_of_one() {
        for text in [r#"{"text":"#, "[1, 2]", "not json", "\"a string\""] {
            let kept = kept_call(&call("echo", text));
            let arguments: serde_json::Value = serde_json::from_str(&kept.arguments).unwrap();
            assert_eq!(arguments, serde_json::json!({ "arguments_unreadable": text }), "{text}");
        }
        assert_eq!(kept_call(&call("echo", " ")).arguments, "{}");
        let fine = call("echo", r#"{"text": "hi"}"#);
        assert_eq!(kept_call(&fine), fine, "a JSON object is kept as written");
    }

    #[tokio::test]
    async fn results_over_the_limit_are_cut() {
        let registry = registry();
        let fits =
            call("repeat", &format!(r#"{{"text": "ab", "times": {}}}"#, MAX_RESULT_CHARS / 2));
        assert_eq!(registry.call(&context(), &fits).await.content.len(), MAX_RESULT_CHARS);
        let big = call("repeat", r#"{"text": "ab", "times": 1000000}"#);
        let result = registry.call(&context(), &big).await;
        assert!(!result.is_error);
        let cut = 2_000_000 - MAX_RESULT_CHARS;
        assert!(result.content.ends_with(&format!("ab… ({cut} characters cut)")));
        assert!(result.content.chars().count() < MAX_RESULT_CHARS + 30);
    }

    #[tokio::test]
    async fn arguments_the_schema_does_not_name_are_refused_when_it_says_so() {
        let registry = registry();
        let error = error_of(
            &registry.call(&context(), &call("repeat", r#"{"text":"a","admin":true}"#)).await,
        );
        assert_eq!(
            error,
            "invalid arguments: unknown argument `admin`: the arguments are `text`, `times`"
        );
        // A schema without `additionalProperties: false` takes more.
        let ok = registry.call(&context(), &call("echo", r#"{"text":"a","admin":true}"#)).await;
        assert_eq!((ok.content.as_str(), ok.is_error), ("a", false));
    }

    #[tokio::test]
    async fn a_call_without_a_name_is_an_error_result() {
        for name in ["", "  "] {
            let error = error_of(&registry().call(&context(), &call(name, "{}")).await);
            assert_eq!(error, "the call names no tool: its `name` is empty");
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
