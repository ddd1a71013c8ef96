//! The agent loop (issue 15) through the real HTTP stack and the real SQLite file, with a
//! scripted model that emits tool calls and then text: calls run through the registry and
//! their results reach the model's next request; the rounds are stored with the answer,
//! returned by the conversation API and the export, streamed as named SSE events, and shown
//! to the model in later turns; `AGENT_MAX_STEPS` bounds a model that always calls; malformed
//! calls get error results; an answer that claims a reminder no call created is corrected;
//! an unknown name in `TOOLS` stops the start. The WhatsApp case (final text only) lives in
//! `channels.rs`, beside the Graph API stand-in, and uses `ToolModel` and `Echo` from here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use my_claw::assistant::AgentConfig;
use my_claw::correction::REMINDER_CORRECTION;
use my_claw::domain::{ChannelKind, ChatTurn, Role, ToolCall};
use my_claw::gateway::{self};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, ToolChoice,
    Usage,
};
use my_claw::tools::{Tool, ToolContext, ToolError, ToolRegistry};

use crate::util::run_binary;

const TOKEN: &str = "agent-test-token-0123456789abcdef";

// --- A scripted model that calls tools ------------------------------------------------------

/// Decides what the model sends for its `n`th request (0-based): text pieces and calls.
type Script = dyn Fn(&LlmRequest, usize) -> (Vec<String>, Vec<ToolCall>) + Send + Sync;

/// A model stand-in: each request is recorded, then answered with the chunks `script`
/// gives, `Chunk::ToolCall`s after the text, and `Done` with `ToolCalls` when it called.
pub struct ToolModel {
    script: Box<Script>,
    requests: Mutex<Vec<LlmRequest>>,
}

impl ToolModel {
    pub fn new(
        script: impl Fn(&LlmRequest, usize) -> (Vec<String>, Vec<ToolCall>) + Send + Sync + 'static,
    ) -> Arc<ToolModel> {
        Arc::new(ToolModel { script: Box::new(script), requests: Mutex::new(Vec::new()) })
    }

    pub fn requests(&self) -> Vec<LlmRequest> {
        self.requests.lock().unwrap().clone()
    }
}

/// A `ToolCall` with JSON arguments.
pub fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
    ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() }
}

/// `Arc<ToolModel>` as the provider the router holds.
pub struct Scripted(pub Arc<ToolModel>);

impl Provider for Scripted {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "tools.gguf".into(),
            host: None,
            leaves_machine: false,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let n = {
            let mut requests = self.0.requests.lock().unwrap();
            requests.push(request.clone());
            requests.len() - 1
        };
        let (texts, calls) = (self.0.script)(&request, n);
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                let finish =
                    if calls.is_empty() { FinishReason::Stop } else { FinishReason::ToolCalls };
                let n_chunks = (texts.len() + calls.len()) as u32;
                for text in texts {
                    if tx.send(Ok(Chunk::Text(text))).await.is_err() {
                        return;
                    }
                }
                for call in calls {
                    if tx.send(Ok(Chunk::ToolCall(call))).await.is_err() {
                        return;
                    }
                }
                let usage =
                    Usage { prompt_tokens: 100, completion_tokens: n_chunks, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish })).await;
            });
            Ok(rx)
        })
    }
}

// --- Test tools -----------------------------------------------------------------------------

/// `echo`: returns its `text`; records the context of every call.
#[derive(Default)]
pub struct Echo {
    pub contexts: Mutex<Vec<ToolContext>>,
}

impl Tool for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }
    fn description(&self) -> String {
        "Repeats its text.".into()
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    }
    fn mutates(&self) -> bool {
        false
    }
    fn call<'a>(
        &'a self,
        context: &'a ToolContext,
        arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        self.contexts.lock().unwrap().push(context.clone());
        Box::pin(async move {
            match arguments.get("text").and_then(Value::as_str) {
                Some(text) => Ok(Value::String(text.to_string())),
                None => Err(ToolError::InvalidArguments("`text` is required".into())),
            }
        })
    }
}

/// A stand-in `reminders_create` (the real one is the reminders part's): succeeds unless its
/// `when` is `never`, and counts the calls.
#[derive(Default)]
struct FakeReminders {
    calls: AtomicUsize,
}

impl Tool for FakeReminders {
    fn name(&self) -> &'static str {
        "reminders_create"
    }
    fn description(&self) -> String {
        "Creates a reminder.".into()
    }
    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {"when": {"type": "string"}}, "required": ["when"]})
    }
    fn mutates(&self) -> bool {
        true
    }
    fn call<'a>(
        &'a self,
        _context: &'a ToolContext,
        arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match arguments.get("when").and_then(Value::as_str) {
                Some("never") => Err(ToolError::Failed("that time never comes".into())),
                Some(when) => Ok(json!({"created": true, "when": when})),
                None => Err(ToolError::InvalidArguments("`when` is required".into())),
            }
        })
    }
}

// --- The app --------------------------------------------------------------------------------

struct TestApp {
    base: String,
    echo: Arc<Echo>,
    reminders: Arc<FakeReminders>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn test_app(model: Arc<ToolModel>, max_steps: usize) -> TestApp {
    let provider: Arc<dyn Provider> = Arc::new(Scripted(model.clone()));
    let echo = Arc::new(Echo::default());
    let reminders = Arc::new(FakeReminders::default());
    let mut tools = ToolRegistry::new();
    tools.register(echo.clone());
    tools.register(reminders.clone());
    let agent = AgentConfig { tools, max_steps };
    let (state, dir) = crate::util::in_process_state(provider, TOKEN, 64 << 10, agent).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, gateway::router(state)).await;
    });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    TestApp { base: format!("http://{addr}"), echo, reminders, http, _dir: dir }
}

/// One SSE event: its `event:` name (if any) and its `data:` JSON.
#[derive(Debug)]
struct Sse {
    name: Option<String>,
    data: Value,
}

impl TestApp {
    /// `POST /api/chat` and every event of the answer (the stream ends with the turn).
    async fn chat(&self, body: Value) -> Vec<Sse> {
        let response = self
            .http
            .post(format!("{}/api/chat", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("POST /api/chat");
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("the SSE body");
        text.split("\n\n")
            .filter_map(|block| {
                let mut name = None;
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event:") {
                        name = Some(n.trim().to_string());
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                (!data.is_empty()).then(|| Sse {
                    name,
                    data: serde_json::from_str(&data.join("\n")).expect("JSON data"),
                })
            })
            .collect()
    }

    async fn get(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.expect("JSON")
    }

    async fn messages(&self, conversation_id: i64) -> Vec<Value> {
        let list = self.get(&format!("/api/conversations/{conversation_id}/messages")).await;
        list["messages"].as_array().expect("messages").clone()
    }
}

fn of_type<'a>(events: &'a [Sse], kind: &str) -> Vec<&'a Sse> {
    events.iter().filter(|e| e.data["type"] == kind).collect()
}

fn conversation_of(events: &[Sse]) -> i64 {
    of_type(events, "meta")[0].data["conversation_id"].as_i64().expect("conversation id")
}

fn answer_text(events: &[Sse]) -> String {
    of_type(events, "token").iter().map(|e| e.data["text"].as_str().unwrap()).collect()
}

fn texts(pieces: &[&str]) -> Vec<String> {
    pieces.iter().map(|p| p.to_string()).collect()
}

// --- Tests ----------------------------------------------------------------------------------

#[tokio::test]
async fn a_tool_call_runs_and_its_result_reaches_the_next_request_and_later_turns() {
    let model = ToolModel::new(|request, n| match n {
        0 => (texts(&["Let me ", "check."]), vec![call("call_a", "echo", r#"{"text":"pong"}"#)]),
        1 => (texts(&["The echo ", "said pong."]), vec![]),
        _ => {
            let last = request.messages.last().unwrap().content.clone();
            (vec![format!("answer to {last}")], vec![])
        }
    });
    let app = test_app(model.clone(), 5).await;

    let events = app.chat(json!({"message": "ping"})).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.data["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["meta", "token", "token", "tool_call", "tool_result", "token", "token", "done"],
        "{events:?}"
    );
    let tool_call = &of_type(&events, "tool_call")[0];
    assert_eq!(tool_call.name.as_deref(), Some("tool_call"), "a named SSE event");
    assert_eq!(tool_call.data["id"], "call_a");
    assert_eq!(tool_call.data["name"], "echo");
    assert_eq!(tool_call.data["arguments"], r#"{"text":"pong"}"#);
    let result = &of_type(&events, "tool_result")[0];
    assert_eq!(result.name.as_deref(), Some("tool_result"));
    assert_eq!(
        (&result.data["call_id"], &result.data["name"], &result.data["content"]),
        (&json!("call_a"), &json!("echo"), &json!("pong"))
    );
    assert_eq!(result.data["is_error"], false);
    let done = &of_type(&events, "done")[0].data;
    assert_eq!(done["finish"], "stop");
    // Both model calls count: 3 chunks then 2.
    assert_eq!(done["usage"]["completion_tokens"], 5);
    let id = conversation_of(&events);

    // The tools were offered, and the second request continued with the round.
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let offered: Vec<&str> = requests[0].tools.offered().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(offered, ["echo", "reminders_create"]);
    assert_eq!(requests[0].tools.choice, ToolChoice::Auto);
    let second = &requests[1].messages;
    let n = second.len();
    assert_eq!(second[..n - 2], requests[0].messages[..], "the first prompt, then the round");
    assert_eq!(
        second[n - 2..],
        [
            ChatTurn::assistant_calls(
                "Let me check.",
                vec![call("call_a", "echo", r#"{"text":"pong"}"#)]
            ),
            ChatTurn::tool_result("call_a", "pong"),
        ]
    );
    // The tool ran for this conversation, on its channel.
    let contexts = app.echo.contexts.lock().unwrap().clone();
    assert_eq!(contexts.len(), 1);
    assert_eq!(contexts[0].conversation_id.0, id);
    assert_eq!(contexts[0].channel, ChannelKind::WebChat);
    assert_eq!(contexts[0].conversation_key, id.to_string());

    // Stored: one answer row with its final text and its round (the ledger of tool use).
    let messages = app.messages(id).await;
    assert_eq!(messages.len(), 2, "one answer is one message: {messages:?}");
    let answer = &messages[1];
    assert_eq!(answer["content"], "The echo said pong.");
    assert_eq!((&answer["provider"], &answer["model"]), (&json!("local"), &json!("tools.gguf")));
    assert_eq!(
        answer["tool_rounds"],
        json!([{"text": "Let me check.",
                "calls": [{"id": "call_a", "name": "echo", "arguments": "{\"text\":\"pong\"}"}],
                "results": [{"call_id": "call_a", "content": "pong", "is_error": false}]}])
    );
    assert_eq!(messages[0]["tool_rounds"], json!([]));
    // The export carries them too.
    let export = app.get(&format!("/api/conversations/{id}/export?format=json")).await;
    assert_eq!(export["messages"][1]["tool_rounds"][0]["calls"][0]["name"], "echo");

    // A later turn's prompt holds the earlier round, exactly as the model produced it: the
    // last request of turn 1 is a prefix of turn 2's (so its KV state is reused).
    let events = app.chat(json!({"conversation_id": id, "message": "again"})).await;
    assert_eq!(answer_text(&events), "answer to again");
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    let third = &requests[2].messages;
    assert_eq!(third[..requests[1].messages.len()], requests[1].messages[..]);
    assert_eq!(
        third[requests[1].messages.len()..],
        [ChatTurn::new(Role::Assistant, "The echo said pong."), ChatTurn::new(Role::User, "again"),]
    );
    assert_eq!(app.messages(id).await.len(), 4);
}

#[tokio::test]
async fn agent_max_steps_bounds_a_model_that_always_calls() {
    // It calls even when told not to: the assistant stops asking all the same.
    let model = ToolModel::new(|_, n| {
        (vec![format!("step {n}")], vec![call(&format!("call_{n}"), "echo", r#"{"text":"again"}"#)])
    });
    let app = test_app(model.clone(), 2).await;
    let events = app.chat(json!({"message": "loop forever"})).await;
    assert_eq!(of_type(&events, "tool_call").len(), 2, "{events:?}");
    assert_eq!(of_type(&events, "tool_result").len(), 2);
    let done = &of_type(&events, "done")[0].data;
    assert_eq!(done["finish"], "stop");

    let requests = model.requests();
    assert_eq!(requests.len(), 3, "two rounds with tools, then one plain call");
    assert_eq!(requests[1].tools.choice, ToolChoice::Auto);
    assert_eq!(requests[2].tools.choice, ToolChoice::None);
    assert!(requests[2].tools.offered().is_empty());
    let messages = app.messages(conversation_of(&events)).await;
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1]["content"], "step 2");
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(messages[1]["tool_rounds"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn malformed_calls_get_error_results_and_the_answer_goes_on() {
    let model = ToolModel::new(|_, n| match n {
        0 => (
            vec![],
            vec![
                call("call_x", "no_such_tool", "{}"),
                call("call_y", "echo", r#"{"text":"#),
                call("", "echo", "[1, 2]"),
                call("call_z", "echo", r#"{"nope": 1}"#),
            ],
        ),
        _ => (texts(&["Sorry, ", "that failed."]), vec![]),
    });
    let app = test_app(model.clone(), 5).await;
    let events = app.chat(json!({"message": "break things"})).await;
    let results: Vec<&Value> = of_type(&events, "tool_result").iter().map(|e| &e.data).collect();
    assert_eq!(results.len(), 4, "{events:?}");
    for (result, expected) in results.iter().zip([
        "unknown tool `no_such_tool`",
        "not valid JSON",
        "must be a JSON object",
        "`text` is required",
    ]) {
        assert_eq!(result["is_error"], true, "{result}");
        let content: Value = serde_json::from_str(result["content"].as_str().unwrap()).unwrap();
        assert!(content["error"].as_str().unwrap().contains(expected), "{content}");
    }
    // The call without an id got one, and its result names it.
    let calls: Vec<&Value> = of_type(&events, "tool_call").iter().map(|e| &e.data).collect();
    let fresh = calls[2]["id"].as_str().unwrap();
    assert!(fresh.starts_with("call_") && results[2]["call_id"] == fresh, "{calls:?}");
    assert_eq!(answer_text(&events), "Sorry, that failed.");
    assert_eq!(of_type(&events, "done").len(), 1);

    // The model read the four error results.
    let second = &model.requests()[1].messages;
    let tool_turns: Vec<&ChatTurn> = second.iter().filter(|t| t.role == Role::Tool).collect();
    assert_eq!(tool_turns.len(), 4);
    assert!(tool_turns[0].content.contains("unknown tool"));
    let messages = app.messages(conversation_of(&events)).await;
    assert_eq!(messages[1]["content"], "Sorry, that failed.");
    assert_eq!(messages[1]["tool_rounds"][0]["results"][1]["is_error"], true);
}

#[tokio::test]
async fn a_reminder_claim_without_a_created_reminder_is_corrected() {
    // The request's last user message picks the script.
    let model = ToolModel::new(|request, _| {
        let last = request.messages.last().unwrap();
        if last.role == Role::Tool {
            return (texts(&["I've set a reminder for 9."]), vec![]);
        }
        match last.content.as_str() {
            "claim only" => (texts(&["Done, ", "I'll remind you at 9."]), vec![]),
            "create it" => (vec![], vec![call("call_r", "reminders_create", r#"{"when":"9:00"}"#)]),
            "fail it" => (vec![], vec![call("call_f", "reminders_create", r#"{"when":"never"}"#)]),
            _ => (texts(&["Rappel créé."]), vec![]),
        }
    });
    let app = test_app(model.clone(), 5).await;

    // No call at all: corrected, as a notice and in the stored text.
    let events = app.chat(json!({"message": "claim only"})).await;
    let notices = of_type(&events, "notice");
    assert_eq!(notices.len(), 1, "{events:?}");
    assert_eq!(notices[0].data["kind"], "correction");
    assert_eq!(notices[0].data["message"], REMINDER_CORRECTION);
    let id = conversation_of(&events);
    let messages = app.messages(id).await;
    assert_eq!(
        messages[1]["content"],
        format!("Done, I'll remind you at 9.\n\n{REMINDER_CORRECTION}")
    );

    // A successful `reminders_create` in the turn: the claim is true, nothing added.
    let events = app.chat(json!({"conversation_id": id, "message": "create it"})).await;
    assert!(of_type(&events, "notice").is_empty(), "{events:?}");
    assert_eq!(app.reminders.calls.load(Ordering::SeqCst), 1);
    let messages = app.messages(id).await;
    assert_eq!(messages[3]["content"], "I've set a reminder for 9.");

    // The call failed: the claim is false again.
    let events = app.chat(json!({"conversation_id": id, "message": "fail it"})).await;
    assert_eq!(of_type(&events, "notice")[0].data["kind"], "correction");
    let messages = app.messages(id).await;
    assert!(messages[5]["content"].as_str().unwrap().ends_with(REMINDER_CORRECTION));

    // French, and the earlier success does not count for a later turn.
    let events = app.chat(json!({"conversation_id": id, "message": "en français"})).await;
    assert_eq!(of_type(&events, "notice")[0].data["kind"], "correction");
    let messages = app.messages(id).await;
    assert_eq!(messages[7]["content"], format!("Rappel créé.\n\n{REMINDER_CORRECTION}"));
}

#[test]
fn an_unknown_tool_name_stops_the_start_with_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let out = run_binary(
        &["serve"],
        &[
            ("DATA_DIR", data_dir.to_str().unwrap()),
            ("BIND", "127.0.0.1:0"),
            ("TOOLS", "current_time,no_such_tool"),
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // (`current_time` is known once the reminders part registers it.)
    assert!(stderr.contains("TOOLS=current_time,no_such_tool: unknown tool(s) "), "{stderr}");
    assert!(stderr.contains("`no_such_tool`"), "{stderr}");
    assert!(stderr.contains("the known tools are:"), "{stderr}");

    for (name, value, expected) in [
        ("AGENT_MAX_STEPS", "0", "AGENT_MAX_STEPS=0: must be between 1 and 20"),
        ("AGENT_MAX_STEPS", "21", "AGENT_MAX_STEPS=21"),
        ("TOOLS", "Current.Time", "TOOLS=Current.Time: `Current.Time` is not a tool name"),
    ] {
        let out = run_binary(
            &["serve"],
            &[("DATA_DIR", data_dir.to_str().unwrap()), (name, value)],
            dir.path(),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// The model's time before its first chunk in `SlowPrefill` (what prefill takes).
const PREFILL: Duration = Duration::from_millis(300);
/// The prefill of `SlowPrefill`'s second call when it hangs: it says it took the call, as
/// the local engine does, then writes after this long.
const SECOND_PREFILL: Duration = Duration::from_millis(200);

/// Calls `echo` in its first round, after `PREFILL`, and reports usage as the engine does
/// (its time to first token counted from when it got the request); in the next round it
/// writes two pieces and then, when the user asked it to `hang`, waits until it is stopped.
struct SlowPrefill;

impl Provider for SlowPrefill {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "slow.gguf".into(),
            host: None,
            leaves_machine: false,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let after_tools = request.messages.iter().any(|m| m.role == Role::Tool);
        let hang = request.messages.iter().any(|m| m.content.contains("hang"));
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(64);
            if !after_tools {
                // As the local provider does, resolve once the first chunk is ready.
                tokio::time::sleep(PREFILL).await;
                for text in ["Let me ", "check."] {
                    let _ = tx.send(Ok(Chunk::Text(text.into()))).await;
                }
                let call = call("call_a", "echo", r#"{"text":"pong"}"#);
                let _ = tx.send(Ok(Chunk::ToolCall(call))).await;
                let usage = Usage {
                    prompt_tokens: 100,
                    completion_tokens: 3,
                    prefill_ms: PREFILL.as_millis() as u64,
                    ttft_ms: PREFILL.as_millis() as u64,
                    ..Usage::default()
                };
                let done = Chunk::Done { usage, finish: FinishReason::ToolCalls };
                let _ = tx.send(Ok(done)).await;
                return Ok(rx);
            }
            tokio::spawn(async move {
                if hang {
                    let _ = tx.send(Ok(Chunk::Accepted { prompt_tokens: 110 })).await;
                    tokio::time::sleep(SECOND_PREFILL).await;
                }
                for text in ["The echo ", "said pong"] {
                    let _ = tx.send(Ok(Chunk::Text(text.into()))).await;
                }
                if hang {
                    tx.closed().await;
                    return;
                }
                let usage = Usage { prompt_tokens: 120, completion_tokens: 2, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }
}

/// The `done` event's timings are one clock from the request: the time to first token
/// covers the prefill before it, and the total is never less. A stopped answer reports what
/// is known: the prompt of the model call that finished, the tokens of every call, its
/// time to first token, and the unfinished call's prefill and decode as its stream saw them.
#[tokio::test]
async fn done_timings_cover_the_whole_answer_and_a_stopped_one_reports_what_is_known() {
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Echo::default()));
    let agent = AgentConfig { tools, max_steps: 5 };
    let (state, _dir) =
        crate::util::in_process_state(Arc::new(SlowPrefill), TOKEN, 64 << 10, agent).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, gateway::router(state)).await;
    });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let chat = |message: &str| {
        http.post(format!("http://{addr}/api/chat"))
            .bearer_auth(TOKEN)
            .json(&json!({"message": message}))
            .send()
    };
    let wait = Duration::from_secs(20);
    let prefill_ms = PREFILL.as_millis() as u64;

    // A whole answer: one call with tools, one without.
    let mut reader = crate::gateway::SseReader::new(chat("ping").await.expect("POST /api/chat"));
    let done = loop {
        let event = reader.next_json(wait).await.expect("a done event");
        if event["type"] == "done" {
            break event;
        }
    };
    let (ttft_ms, total_ms) = (&done["timings"]["ttft_ms"], &done["timings"]["total_ms"]);
    assert_eq!(done["finish"], "stop", "{done}");
    assert!(ttft_ms.as_u64().unwrap() >= prefill_ms, "{done}");
    assert!(total_ms.as_u64().unwrap() >= ttft_ms.as_u64().unwrap(), "{done}");
    assert_eq!(done["usage"]["prompt_tokens"], 120, "the last call's prompt: {done}");

    // Stopped in its second model call, after the first one finished.
    let mut reader =
        crate::gateway::SseReader::new(chat("ping and hang").await.expect("POST /api/chat"));
    let meta = reader.next_json(wait).await.expect("meta");
    let id = meta["conversation_id"].as_i64().expect("a conversation id");
    let mut text = String::new();
    while !text.ends_with("said pong") {
        let event = reader.next_json(wait).await.expect("the answer's events");
        if event["type"] == "token" {
            text.push_str(event["text"].as_str().unwrap());
        }
    }
    // The unfinished call decodes for at least this long before it is stopped.
    let decoding = Duration::from_millis(150);
    tokio::time::sleep(decoding).await;
    let stop = http
        .post(format!("http://{addr}/api/chat/{id}/stop"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST stop");
    assert_eq!(stop.json::<Value>().await.unwrap(), json!({"stopped": true}));
    let done = loop {
        let event = reader.next_json(wait).await.expect("a done event");
        if event["type"] == "done" {
            break event;
        }
    };
    assert_eq!(done["finish"], "cancelled", "{done}");
    let usage = &done["usage"];
    assert_eq!(usage["prompt_tokens"], 110, "the unfinished call's prompt, as it said: {done}");
    assert_eq!(usage["completion_tokens"], 3 + 2, "3 reported, 2 pieces received: {done}");
    let timings = &done["timings"];
    let (ttft_ms, total_ms) = (&timings["ttft_ms"], &timings["total_ms"]);
    assert!(ttft_ms.as_u64().unwrap() >= prefill_ms, "{done}");
    assert!(total_ms.as_u64().unwrap() >= ttft_ms.as_u64().unwrap(), "{done}");
    // The finished call's prefill as it reported it, plus the unfinished one's from its
    // `Accepted` to its first text; its decode from there to the stop (no call reported one).
    let second_prefill_ms = SECOND_PREFILL.as_millis() as u64;
    let prefill = timings["prefill_ms"].as_u64().unwrap();
    assert!(prefill >= prefill_ms + second_prefill_ms, "{done}");
    assert!(prefill < prefill_ms + second_prefill_ms + 5_000, "{done}");
    assert!(timings["decode_ms"].as_u64().unwrap() >= decoding.as_millis() as u64, "{done}");

    // The stored answer keeps the prompt's size it learned.
    let response = http
        .get(format!("http://{addr}/api/conversations/{id}/messages"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET messages");
    let messages: Value = response.json().await.expect("JSON");
    let answer = &messages["messages"][1];
    assert_eq!(answer["status"], "partial", "{answer}");
    assert_eq!((&answer["prompt_tokens"], &answer["completion_tokens"]), (&json!(110), &json!(5)));
}

/// The characters of a prompt's messages: their text, calls and result ids.
fn prompt_chars(request: &LlmRequest) -> usize {
    request
        .messages
        .iter()
        .map(|turn| {
            let calls: usize =
                turn.tool_calls.iter().map(|c| c.id.len() + c.name.len() + c.arguments.len()).sum();
            turn.content.len() + calls + turn.tool_call_id.as_ref().map_or(0, String::len)
        })
        .sum()
}

/// A remote model's call with 5 MB of arguments (QA sent one to `reminders_create`): the call
/// is not run, its result is an error saying why, and what the answer keeps of it (the
/// `tool_call` event, the stored `tool_rounds`, the next prompts) is a short cut of the
/// arguments, never the whole.
#[tokio::test]
async fn a_call_with_huge_arguments_is_refused_and_kept_short() {
    const HUGE: usize = 5_000_000;
    let model = ToolModel::new(|request, _| {
        let last = request.messages.last().unwrap();
        match (last.role, last.content.as_str()) {
            (Role::User, "set it") => {
                let arguments = json!({"when": "x".repeat(HUGE)}).to_string();
                (vec![], vec![call("call_big", "reminders_create", &arguments)])
            }
            (Role::Tool, _) => (texts(&["That was too long."]), vec![]),
            _ => (texts(&["Fine."]), vec![]),
        }
    });
    let app = test_app(model.clone(), 5).await;
    let events = app.chat(json!({"message": "set it"})).await;

    let tool_call = &of_type(&events, "tool_call")[0].data;
    assert_eq!(
        (&tool_call["id"], &tool_call["name"]),
        (&json!("call_big"), &json!("reminders_create"))
    );
    let arguments = tool_call["arguments"].as_str().unwrap();
    assert!(arguments.len() < 1_000, "{} bytes streamed", arguments.len());
    // Still a JSON object (servers parse earlier calls' arguments), saying what was cut.
    let kept: Value = serde_json::from_str(arguments).expect("JSON arguments");
    let cut = kept["arguments_cut"].as_str().unwrap();
    assert!(cut.starts_with(r#"{"when":"xxx"#), "{cut}");
    assert!(cut.ends_with(&format!("… ({} characters cut)", HUGE + 11 - 200)), "{cut}");

    let result = &of_type(&events, "tool_result")[0].data;
    assert_eq!((&result["call_id"], &result["is_error"]), (&json!("call_big"), &json!(true)));
    let error: Value = serde_json::from_str(result["content"].as_str().unwrap()).unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(error.contains("over the limit of 16000: it was not run"), "{error}");
    assert_eq!(app.reminders.calls.load(Ordering::SeqCst), 0, "not run");
    assert_eq!(answer_text(&events), "That was too long.");

    // The next request of the turn, and the stored rounds, are small.
    let requests = model.requests();
    assert!(prompt_chars(&requests[1]) < 10_000, "{} characters", prompt_chars(&requests[1]));
    let id = conversation_of(&events);
    let messages = app.messages(id).await;
    let rounds = &messages[1]["tool_rounds"];
    assert!(rounds.to_string().len() < 2_000, "{} bytes stored", rounds.to_string().len());
    assert_eq!(rounds[0]["calls"][0]["arguments"], arguments);

    // So is the next turn's prompt, which holds the round.
    let events = app.chat(json!({"conversation_id": id, "message": "ok"})).await;
    assert_eq!(answer_text(&events), "Fine.");
    let requests = model.requests();
    let next = requests.last().unwrap();
    assert!(next.messages.iter().any(|t| t.tool_calls.iter().any(|c| c.arguments == arguments)));
    assert!(prompt_chars(next) < 10_000, "{} characters", prompt_chars(next));
}

/// An answer never ends before it says something: a model that still calls tools when no
/// more are offered, after `AGENT_MAX_STEPS` rounds, and writes nothing, fails with that
/// reason (kept as partial, with its rounds), instead of an empty complete answer; one that
/// writes nothing at all fails too.
#[tokio::test]
async fn a_model_that_only_calls_tools_fails_instead_of_answering_nothing() {
    let model = ToolModel::new(|request, n| {
        let asked = request.messages.iter().rev().find(|t| t.role == Role::User).unwrap();
        match asked.content.as_str() {
            "say nothing" => (vec![], vec![]),
            _ => (vec![], vec![call(&format!("call_{n}"), "echo", r#"{"text":"again"}"#)]),
        }
    });
    let app = test_app(model.clone(), 2).await;
    let events = app.chat(json!({"message": "loop forever"})).await;
    assert_eq!(of_type(&events, "tool_call").len(), 2, "{events:?}");
    assert!(of_type(&events, "done").is_empty(), "{events:?}");
    let error = &of_type(&events, "error")[0].data;
    let reason = "the model kept calling tools after its last allowed step (AGENT_MAX_STEPS = 2)";
    assert_eq!(error["message"], reason);
    assert_eq!(model.requests().len(), 3, "two rounds, then the last step without tools");
    let id = conversation_of(&events);
    let messages = app.messages(id).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    let answer = &messages[1];
    assert_eq!((&answer["status"], &answer["error"]), (&json!("partial"), &json!(reason)));
    assert_eq!(error["partial_message_id"], answer["id"]);
    assert_eq!(answer["tool_rounds"].as_array().unwrap().len(), 2);

    let events = app.chat(json!({"conversation_id": id, "message": "say nothing"})).await;
    let error = &of_type(&events, "error")[0].data;
    assert_eq!(error["message"], "the model ended its answer without writing anything");
    let messages = app.messages(id).await;
    assert_eq!(messages[3]["status"], "error", "{:?}", messages[3]);
}

/// A call with no name (and no id) is answered, not dropped: the model asked for something
/// and reads an error result saying what was wrong.
#[tokio::test]
async fn a_call_without_a_name_gets_an_error_result() {
    let model = ToolModel::new(|_, n| match n {
        0 => (vec![], vec![call("", "", r#"{"text":"hi"}"#)]),
        _ => (texts(&["I named no tool."]), vec![]),
    });
    let app = test_app(model.clone(), 5).await;
    let events = app.chat(json!({"message": "call nothing"})).await;
    let tool_call = &of_type(&events, "tool_call")[0].data;
    assert!(tool_call["id"].as_str().unwrap().starts_with("call_"), "{tool_call}");
    let result = &of_type(&events, "tool_result")[0].data;
    assert_eq!((&result["call_id"], &result["is_error"]), (&tool_call["id"], &json!(true)));
    assert!(result["content"].as_str().unwrap().contains("names no tool"), "{result}");
    let second = &model.requests()[1].messages;
    assert!(second.last().unwrap().content.contains("names no tool"));
    assert_eq!(answer_text(&events), "I named no tool.");
}

/// A model that asks for 300 reminders in one reply (a remote one did) gets 16 made: every
/// call is answered, and those past `MAX_CALLS_PER_ROUND` are not run and say why.
#[tokio::test]
async fn one_round_runs_at_most_max_calls_per_round() {
    use my_claw::assistant::MAX_CALLS_PER_ROUND;
    const ASKED: usize = 300;
    let model = ToolModel::new(|_, n| match n {
        0 => {
            let calls = (0..ASKED)
                .map(|i| call(&format!("call_{i}"), "reminders_create", r#"{"when":"soon"}"#))
                .collect();
            (vec![], calls)
        }
        _ => (texts(&["Some were made."]), vec![]),
    });
    let app = test_app(model.clone(), 5).await;
    let events = app.chat(json!({"message": "remind me 300 times"})).await;
    assert_eq!(app.reminders.calls.load(Ordering::SeqCst), MAX_CALLS_PER_ROUND);
    let results = of_type(&events, "tool_result");
    assert_eq!(results.len(), ASKED, "every call is answered");
    for (i, result) in results.iter().enumerate() {
        let content = result.data["content"].as_str().unwrap();
        let refused = content.contains(&format!("not run: at most {MAX_CALLS_PER_ROUND} calls"));
        assert_eq!(refused, i >= MAX_CALLS_PER_ROUND, "call {i}: {content}");
        assert_eq!(result.data["is_error"], i >= MAX_CALLS_PER_ROUND, "call {i}");
    }
    assert_eq!(answer_text(&events), "Some were made.");
    let second = &model.requests()[1].messages;
    assert_eq!(second.iter().filter(|t| t.role == Role::Tool).count(), ASKED);
}
