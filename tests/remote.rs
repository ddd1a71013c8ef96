//! Remote tiers (issue 18): a tier pointed at a local stand-in that speaks the OpenAI
//! streaming protocol on 127.0.0.1, reached through the production client built by
//! `app.rs`. The router in this process: streaming without reasoning, tool calls,
//! cancellation, the `/models` check, and fallback to `main` on a stalled first byte, a 5xx
//! and a refused connection. The real binary with the real small model as `main`:
//! `/api/chat`, `/v1/chat/completions`, a WhatsApp reply (Graph API stand-in), the ledger of
//! a loopback remote, `/api/models`, and a key that never reaches the logs. Owns no
//! production code; no traffic leaves 127.0.0.1.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};

use my_claw::app::build_router;
use my_claw::config::{RemoteSettings, RouterSettings, Secret, TierModel};
use my_claw::domain::{ChatTurn, Role};
use my_claw::llm::router::{Router, Tier, TierState};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, GenerationParams, LlmError, LlmRequest, ToolChoice, ToolSpec,
    ToolUse,
};

use crate::util::{engine_settings, smollm2_env, smollm2_path, Server, ServerOptions};

const REMOTE_MODEL: &str = "Qwen/Qwen3-32B";
const REMOTE_KEY: &str = "sk-remote-7c1e0f-never-logged";

// --- the OpenAI-compatible stand-in -----------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Reasoning deltas, then "Hello world", usage and `[DONE]`; a tool call when tools are
    /// offered; a text answer after a tool result.
    Normal,
    /// Sends nothing for 30 s.
    Stall,
    /// HTTP 500 with vLLM's error body.
    ServerError,
    /// One text delta, then one more every 20 ms until the client goes away.
    Endless,
    /// Two calls of `get_weather` in one answer, both with `index: 0` (as Ollama's OpenAI
    /// API streams them).
    SharedIndex,
}

struct StandIn {
    mode: Mode,
    /// The model its `/v1/models` lists.
    listed: String,
    requests: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<String>>,
    /// Set when an `Endless` body is dropped (the client closed the connection).
    closed: AtomicBool,
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn delta(delta: Value) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": REMOTE_MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
}

fn finish(reason: &str) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": REMOTE_MODEL, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn event_stream(parts: Vec<String>) -> Response {
    let stream = futures::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The chunks of a streamed answer that calls `get_weather` for Paris, split the way vLLM
/// streams arguments.
fn tool_call_answer() -> Vec<String> {
    let call = |fragment: Value| sse(&delta(json!({"tool_calls": [fragment]})));
    vec![
        sse(&delta(json!({"role": "assistant", "content": ""}))),
        call(json!({"index": 0, "id": "call_remote_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}})),
        call(json!({"index": 0, "function": {"arguments": "{\"city\": "}})),
        call(json!({"index": 0, "function": {"arguments": "\"Paris\"}"}})),
        sse(&finish("tool_calls")),
        sse(&json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                    "model": REMOTE_MODEL, "choices": [],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}})),
        "data: [DONE]\n\n".to_string(),
    ]
}

/// Two calls streamed the way Ollama streams them: each whole in one fragment, both with
/// `index: 0`.
fn shared_index_answer() -> Vec<String> {
    let call = |fragment: Value| sse(&delta(json!({"tool_calls": [fragment]})));
    vec![
        call(json!({"index": 0, "id": "call_paris", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})),
        call(json!({"index": 0, "id": "call_rome", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}})),
        sse(&finish("tool_calls")),
        "data: [DONE]\n\n".to_string(),
    ]
}

fn text_answer(text: &[&str]) -> Vec<String> {
    let mut parts = vec![
        sse(&delta(json!({"role": "assistant", "content": ""}))),
        sse(&delta(json!({"reasoning_content": "SECRET-REASONING "}))),
        sse(&delta(json!({"reasoning_content": "more thoughts"}))),
    ];
    parts.extend(text.iter().map(|t| sse(&delta(json!({"content": t})))));
    parts.push(sse(&finish("stop")));
    parts.push(sse(&json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                           "created": 1, "model": REMOTE_MODEL, "choices": [],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 2,
                                     "total_tokens": 14}})));
    parts.push("data: [DONE]\n\n".to_string());
    parts
}

/// Sets `closed` when dropped: hyper drops a response body when its client goes away.
struct DropFlag(Arc<StandIn>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
    }
}

async fn chat(State(state): State<Arc<StandIn>>, headers: HeaderMap, body: String) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    state.bodies.lock().unwrap().push(body.clone());
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    state.auth.lock().unwrap().push(auth.to_string());
    match state.mode {
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        Mode::ServerError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            json!({"object": "error", "message": "CUDA out of memory", "type": "InternalServerError",
                   "code": 500})
            .to_string(),
        )
            .into_response(),
        Mode::Endless => {
            let flag = DropFlag(state.clone());
            let first = futures::stream::once(async {
                Ok::<_, std::io::Error>(Bytes::from(sse(&delta(json!({"content": "tick "})))))
            });
            let rest = futures::stream::unfold(flag, |flag| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let piece = Bytes::from(sse(&delta(json!({"content": "tick "}))));
                Some((Ok::<_, std::io::Error>(piece), flag))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(futures::StreamExt::chain(first, rest)))
                .unwrap()
        }
        Mode::SharedIndex => event_stream(shared_index_answer()),
        Mode::Normal => {
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            let after_tool = messages.last().is_some_and(|m| m["role"] == "tool");
            let has_tools = body["tools"].as_array().is_some_and(|t| !t.is_empty());
            if after_tool {
                event_stream(text_answer(&["It is sunny", " in Paris."]))
            } else if has_tools {
                event_stream(tool_call_answer())
            } else {
                event_stream(text_answer(&["Hello", " world"]))
            }
        }
    }
}

async fn models(State(state): State<Arc<StandIn>>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": state.listed, "object": "model", "owned_by": "vllm"}
    ]}))
    .into_response()
}

/// Starts a stand-in and returns its `/v1` base URL.
async fn stand_in(mode: Mode, listed: &str) -> (String, Arc<StandIn>) {
    let state = Arc::new(StandIn {
        mode,
        listed: listed.to_string(),
        requests: AtomicUsize::new(0),
        bodies: Mutex::default(),
        auth: Mutex::default(),
        closed: AtomicBool::new(false),
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), state)
}

/// A loopback address where nothing listens: bound, then released.
fn refused_base() -> String {
    let (listener, addr) = crate::util::bound_listener();
    drop(listener);
    format!("http://{addr}/v1")
}

// --- the router in this process -------------------------------------------------------------

fn tier_model(tier: Tier, value: &str) -> TierModel {
    TierModel::parse(tier, value).expect("a valid tier value")
}

/// Settings whose `main` is the real small model and whose `smart` tier is the remote at
/// `base`, with `first_byte` as its first-byte timeout.
fn remote_settings(models_dir: &Path, base: &str, first_byte: Duration) -> RouterSettings {
    let main = smollm2_path().display().to_string();
    RouterSettings {
        model_fast: tier_model(Tier::Fast, &main),
        model_smart: tier_model(Tier::Smart, &format!("openai:{base}#{REMOTE_MODEL}")),
        model_main: tier_model(Tier::Main, &main),
        model_code: tier_model(Tier::Code, "zai:glm-4.7"),
        model_reason: tier_model(Tier::Reason, "zai:glm-4.7"),
        default_tier: Tier::Main,
        memory_budget_bytes: None,
        keep_alive: None,
        preload: false,
        zai_api_key: None,
        zai_base_url: "http://127.0.0.1:9".into(),
        zai_timeout: Duration::from_secs(5),
        hf_endpoint: "http://127.0.0.1:9".into(),
        hf_token: None,
        models_dir: models_dir.to_path_buf(),
        remote: RemoteSettings {
            api_keys: vec![(Tier::Smart, Secret::new(REMOTE_KEY))],
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: first_byte,
        },
    }
}

fn remote_router(base: &str, first_byte: Duration) -> Router {
    let dir = crate::util::repo_path("models");
    build_router(
        &remote_settings(&dir, base, first_byte),
        &engine_settings(),
        &reqwest::Client::new(),
    )
    .expect("router")
}

fn request(max_tokens: u32) -> LlmRequest {
    LlmRequest::new(
        vec![ChatTurn::new(Role::System, "You are helpful."), ChatTurn::new(Role::User, "Hi")],
        GenerationParams::greedy(max_tokens),
    )
}

/// Everything a stream sends (bounded): chunks until the end, and the error that ended it.
async fn drain(mut stream: ChunkStream) -> (Vec<Chunk>, Option<LlmError>) {
    let mut chunks = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .expect("stream stalled");
        match item {
            None => return (chunks, None),
            Some(Ok(chunk)) => chunks.push(chunk),
            Some(Err(err)) => return (chunks, Some(err)),
        }
    }
}

fn text_of(chunks: &[Chunk]) -> String {
    chunks
        .iter()
        .filter_map(|c| match c {
            Chunk::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn remote_tier_streams_without_reasoning_and_sends_the_key() {
    let (base, stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let router = remote_router(&base, Duration::from_secs(5));
    let routed = router.stream(Tier::Smart, request(16)).await.expect("answered");
    let host = base.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    assert_eq!(routed.info.provider, "openai");
    assert_eq!(routed.info.model, REMOTE_MODEL);
    assert_eq!(routed.info.host.as_deref(), Some(host.as_str()));
    assert!(!routed.info.leaves_machine, "a server on 127.0.0.1 stays on the machine");
    assert!(routed.notices.is_empty(), "{:?}", routed.notices);
    let (chunks, err) = drain(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&chunks), "Hello world");
    let Some(Chunk::Done { usage, finish }) = chunks.last() else { panic!("{chunks:?}") };
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 2));
    assert_eq!(*finish, FinishReason::Stop);

    let body = stand_in.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["model"], REMOTE_MODEL);
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 16);
    assert_eq!(body["chat_template_kwargs"]["enable_thinking"], false);
    assert_eq!(body["messages"][1]["content"], "Hi");
    assert!(body.get("tools").is_none());
    assert_eq!(stand_in.auth.lock().unwrap()[0], format!("Bearer {REMOTE_KEY}"));
    let smart = &router.status().await[1];
    assert_eq!(smart.state, TierState::CloudReady, "{smart:?}");
    assert_eq!(smart.remote.as_ref().and_then(|r| r.reachable), Some(true));
}

#[tokio::test]
async fn remote_tool_calls_pass_through_both_ways() {
    let (base, stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let router = remote_router(&base, Duration::from_secs(5));
    let mut req = request(64);
    req.tools = ToolUse::offer(vec![ToolSpec {
        name: "get_weather".into(),
        description: "The weather in a city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}),
    }]);
    req.tools.choice = ToolChoice::Required;
    let routed = router.stream(Tier::Smart, req.clone()).await.expect("answered");
    let (chunks, err) = drain(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    let calls: Vec<_> = chunks
        .iter()
        .filter_map(|c| match c {
            Chunk::ToolCall(call) => Some(call.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0].id, "call_remote_1");
    assert_eq!(calls[0].name, "get_weather");
    let arguments: Value = serde_json::from_str(&calls[0].arguments).expect("JSON arguments");
    assert_eq!(arguments, json!({"city": "Paris"}));
    assert!(
        matches!(chunks.last(), Some(Chunk::Done { finish: FinishReason::ToolCalls, .. })),
        "{chunks:?}"
    );
    let body = stand_in.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["tools"][0]["type"], "function");
    assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(body["tool_choice"], "required");
    assert_eq!(body["parallel_tool_calls"], true);

    // The result goes back as a `tool` message naming the call; the answer is text.
    req.messages.push(ChatTurn::assistant_calls("", calls.clone()));
    req.messages.push(ChatTurn::tool_result("call_remote_1", "{\"sky\": \"sunny\"}"));
    let routed = router.stream(Tier::Smart, req).await.expect("answered");
    let (chunks, err) = drain(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&chunks), "It is sunny in Paris.");
    let body = stand_in.bodies.lock().unwrap()[1].clone();
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages[2]["tool_calls"][0]["id"], "call_remote_1");
    assert_eq!(messages[2]["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}");
    assert_eq!(messages[3]["role"], "tool");
    assert_eq!(messages[3]["tool_call_id"], "call_remote_1");
}

/// Ollama numbers every call of an answer 0: both calls come out whole, with their own ids
/// and arguments (they were glued into one call with `{..}{..}` arguments, which got an
/// error result, and the second call never ran).
#[tokio::test]
async fn calls_a_server_numbers_alike_stay_two_calls() {
    let (base, _stand_in) = stand_in(Mode::SharedIndex, REMOTE_MODEL).await;
    let router = remote_router(&base, Duration::from_secs(5));
    let mut req = request(64);
    req.tools = ToolUse::offer(vec![ToolSpec {
        name: "get_weather".into(),
        description: "The weather in a city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
    }]);
    let routed = router.stream(Tier::Smart, req).await.expect("answered");
    assert!(routed.notices.is_empty(), "{:?}", routed.notices);
    let (chunks, err) = drain(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    let calls: Vec<(String, String, Value)> = chunks
        .iter()
        .filter_map(|c| match c {
            Chunk::ToolCall(call) => Some((
                call.id.clone(),
                call.name.clone(),
                serde_json::from_str(&call.arguments).expect("each call's arguments are JSON"),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("call_paris".into(), "get_weather".into(), json!({"city": "Paris"})),
            ("call_rome".into(), "get_weather".into(), json!({"city": "Rome"})),
        ],
        "{chunks:?}"
    );
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection() {
    let (base, stand_in) = stand_in(Mode::Endless, REMOTE_MODEL).await;
    let router = remote_router(&base, Duration::from_secs(5));
    let mut routed = router.stream(Tier::Smart, request(10_000)).await.expect("answered");
    let first = tokio::time::timeout(Duration::from_secs(10), routed.stream.recv()).await;
    assert!(matches!(first, Ok(Some(Ok(Chunk::Text(_))))), "{first:?}");
    assert!(!stand_in.closed.load(Ordering::SeqCst));
    drop(routed);
    let started = Instant::now();
    while !stand_in.closed.load(Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(10), "the connection stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `smart` on `base` fails before its first token: `main` (the real small model) answers,
/// with a notice naming the cause; the tier shows it is falling back.
async fn assert_falls_back(base: &str, first_byte: Duration, cause: &str) -> Router {
    let router = remote_router(base, first_byte);
    let started = Instant::now();
    let routed = router.stream(Tier::Smart, request(2)).await.expect("fell back");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    assert_eq!(routed.tier, Tier::Smart);
    assert_eq!(routed.info.provider, "local");
    assert_eq!(routed.info.host, None);
    let (kind, message) = &routed.notices[0];
    assert_eq!(kind, "fallback");
    assert!(message.contains("127.0.0.1:"), "names the host: {message}");
    assert!(message.contains(cause), "{message}");
    assert!(message.contains("answered by main (SmolLM2"), "{message}");
    assert!(!message.contains(REMOTE_KEY));
    let (chunks, err) = drain(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    assert!(matches!(chunks.last(), Some(Chunk::Done { .. })));
    let smart = &router.status().await[1];
    assert_eq!(smart.state, TierState::CloudFallback, "{smart:?}");
    let remote = smart.remote.as_ref().expect("remote status");
    assert!(remote.last_error.as_ref().is_some_and(|(m, _)| m.contains(cause)), "{remote:?}");
    router
}

#[tokio::test]
async fn stalled_first_byte_falls_back_to_main() {
    let (base, stand_in) = stand_in(Mode::Stall, REMOTE_MODEL).await;
    assert_falls_back(&base, Duration::from_millis(300), "timed out").await;
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1, "no retry: main answers at once");
}

#[tokio::test]
async fn server_error_falls_back_to_main() {
    let (base, stand_in) = stand_in(Mode::ServerError, REMOTE_MODEL).await;
    assert_falls_back(&base, Duration::from_secs(5), "HTTP 500").await;
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refused_connection_falls_back_to_main() {
    let router = assert_falls_back(&refused_base(), Duration::from_secs(5), "connection").await;
    let smart = &router.status().await[1];
    assert_eq!(smart.remote.as_ref().and_then(|r| r.reachable), Some(false), "{smart:?}");
}

#[tokio::test]
async fn the_models_check_reports_reachability_and_the_listed_model() {
    let (base, _stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let router = remote_router(&base, Duration::from_secs(5));
    let before = router.status().await[1].remote.clone().expect("remote");
    assert_eq!(before.base_url.as_deref(), Some(base.as_str()));
    router.probe_remotes().await;
    let after = router.status().await[1].remote.clone().expect("remote");
    assert_eq!((after.reachable, after.model_listed), (Some(true), Some(true)), "{after:?}");
    assert!(after.checked_at.is_some() && after.last_error.is_none(), "{after:?}");

    let (other, _stand_in) = stand_in(Mode::Normal, "some-other-model").await;
    let router = remote_router(&other, Duration::from_secs(5));
    router.probe_remotes().await;
    let smart = &router.status().await[1];
    let remote = smart.remote.as_ref().expect("remote");
    assert_eq!((remote.reachable, remote.model_listed), (Some(true), Some(false)));
    let error = &remote.last_error.as_ref().expect("an error").0;
    assert!(error.contains("does not list Qwen/Qwen3-32B"), "{error}");
    assert!(error.contains("some-other-model"), "{error}");
    assert_eq!(smart.state, TierState::CloudFallback);

    let router = remote_router(&refused_base(), Duration::from_secs(5));
    router.probe_remotes().await;
    let remote = router.status().await[1].remote.clone().expect("remote");
    assert_eq!(remote.reachable, Some(false), "{remote:?}");
}

#[tokio::test]
async fn keys_never_show_in_debug_output() {
    let dir = crate::util::repo_path("models");
    let settings = remote_settings(&dir, "http://127.0.0.1:9/v1", Duration::from_secs(1));
    let shown = format!("{settings:?}");
    assert!(!shown.contains(REMOTE_KEY), "{shown}");
    assert!(shown.contains("***"), "{shown}");
}

// --- the real binary --------------------------------------------------------------------------

const APP_SECRET: &str = "test-app-secret-remote";
const PHONE_NUMBER_ID: &str = "106540352242922";
const USER_NUMBER: &str = "16505551234";

/// A Graph API stand-in: records every request and answers like Meta.
#[derive(Clone, Default)]
struct Graph {
    requests: Arc<Mutex<Vec<Value>>>,
}

async fn start_graph() -> (String, Graph) {
    let graph = Graph::default();
    let state = graph.clone();
    let app = axum::Router::new().fallback(move |_uri: Uri, body: Bytes| {
        let state = state.clone();
        async move {
            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            state.requests.lock().unwrap().push(value.clone());
            let answer = if value["status"] == "read" {
                json!({"success": true})
            } else {
                json!({"messaging_product": "whatsapp",
                       "contacts": [{"input": USER_NUMBER, "wa_id": USER_NUMBER}],
                       "messages": [{"id": "wamid.REMOTE1"}]})
            };
            axum::Json(answer).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), graph)
}

/// The real binary with `smart` (the default tier) on the stand-in at `base`, WhatsApp
/// talking to the Graph stand-in, and every log line kept.
fn start_server(base: &str, graph: &str) -> Server {
    let mut env = smollm2_env();
    env.retain(|(k, _)| k != "MODEL_SMART");
    let mut set = |k: &str, v: String| env.push((k.to_string(), v));
    set("MODEL_SMART", format!("openai:{base}#{REMOTE_MODEL}"));
    set("MODEL_SMART_API_KEY", REMOTE_KEY.into());
    set("DEFAULT_TIER", "smart".into());
    set("REPLY_MAX_TOKENS", "24".into());
    // The most verbose logs of our crate and of the HTTP client: the key must not be there.
    set("LOG", "debug,my_claw=trace".into());
    set("WHATSAPP_VERIFY_TOKEN", "verify-me-please".into());
    set("WHATSAPP_APP_SECRET", APP_SECRET.into());
    set("WHATSAPP_ACCESS_TOKEN", "EAAG-test-access-token".into());
    set("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID.into());
    set("WHATSAPP_API_BASE", format!("{graph}/v26.0"));
    set("WHATSAPP_ALLOWED_NUMBERS", USER_NUMBER.into());
    tokio::task::block_in_place(|| Server::start(ServerOptions::with_envs(env)))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

/// The `data:` payloads of a finished SSE body, `[DONE]` left out.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]" && !d.is_empty())
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

async fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

async fn open_db(data_dir: &Path) -> sqlx::SqlitePool {
    my_claw::db::connect(&format!("sqlite://{}", data_dir.join("my-claw.db").display()))
        .await
        .expect("open the server's database")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_tier_answers_webchat_v1_and_whatsapp_and_the_ledger_records_its_host() {
    let (base, stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let (graph_base, graph) = start_graph().await;
    let server = start_server(&base, &graph_base);
    let host = base.trim_start_matches("http://").trim_end_matches("/v1").to_string();

    // WebChat: the answer streams from the remote, marked as staying on the machine.
    let response = http()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"message": "Say hello"}))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    let meta = &events[0];
    assert_eq!(meta["type"], "meta", "{events:?}");
    assert_eq!(meta["tier"], "smart");
    assert_eq!(meta["provider"], "openai");
    assert_eq!(meta["model"], REMOTE_MODEL);
    assert_eq!(meta["host"], host.as_str());
    assert_eq!(meta["leaves_machine"], false);
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    // The assistant offers its own tools to the remote tier too: the stand-in calls
    // `get_weather`, which is not one of them, so the loop answers it with an error result
    // and the remote's next answer is the text.
    let call = events.iter().find(|e| e["type"] == "tool_call").expect("a tool_call event");
    assert_eq!(call["name"], "get_weather", "{events:?}");
    let result = events.iter().find(|e| e["type"] == "tool_result").expect("a tool_result");
    assert_eq!(result["is_error"], true, "{events:?}");
    assert_eq!(text, "It is sunny in Paris.");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done", "{events:?}");
    let conversation_id = meta["conversation_id"].as_i64().unwrap();
    let message_id = done["message_id"].as_i64().unwrap();

    // The ledger, through the API and in the database file.
    let conversation: Value = http()
        .get(server.url(&format!("/api/conversations/{conversation_id}/messages")))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let answer = conversation["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["id"] == message_id))
        .unwrap_or_else(|| panic!("the answer is listed: {conversation}"));
    assert_eq!(answer["provider"], "openai");
    assert_eq!(answer["host"], host.as_str());
    assert_eq!(answer["left_machine"], false);
    let pool = open_db(&server.data_dir).await;
    let stored = my_claw::db::memory::get_message(&pool, my_claw::domain::MessageId(message_id))
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored.content, "It is sunny in Paris.");
    assert_eq!(stored.provider.as_deref(), Some("openai"));
    assert_eq!(stored.model.as_deref(), Some(REMOTE_MODEL));
    assert_eq!(stored.tier.as_deref(), Some("smart"));
    assert_eq!(stored.host.as_deref(), Some(host.as_str()));
    assert!(!stored.left_machine);
    let conversations: Value = http()
        .get(server.url("/api/conversations"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conversations["conversations"][0]["left_machine"], false, "{conversations}");

    // `/v1/chat/completions`, streamed.
    let response = http()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&server.token)
        .json(&json!({"model": "smart", "stream": true,
                      "messages": [{"role": "user", "content": "Say hello"}]}))
        .send()
        .await
        .expect("POST /v1/chat/completions");
    assert_eq!(response.status(), 200);
    let chunks = sse_data(&response.text().await.unwrap());
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello world", "{chunks:?}");

    // A WhatsApp message is answered by the remote tier too.
    let body = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": [{"profile": {"name": "Tester"}, "wa_id": USER_NUMBER}],
            "messages": [{"from": USER_NUMBER, "id": "wamid.IN-REMOTE-1",
                          "timestamp": chrono::Utc::now().timestamp().to_string(),
                          "type": "text", "text": {"body": "Say hello"}}]}}]}]})
    .to_string();
    let response = http()
        .post(server.url("/api/webhook/whatsapp"))
        .header("content-type", "application/json")
        .header(
            "X-Hub-Signature-256",
            my_claw::channels::whatsapp::sign(APP_SECRET, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", server.output());
    let sent = |graph: &Graph| {
        graph
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["type"] == "text")
            .cloned()
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(60), "the reply at the Graph stand-in", || {
        !sent(&graph).is_empty()
    })
    .await;
    let reply = sent(&graph)[0].clone();
    assert_eq!(reply["to"], USER_NUMBER);
    assert_eq!(reply["text"]["body"], "It is sunny in Paris.");

    // Every call reached the stand-in with the key: two for the WebChat answer and two for
    // the WhatsApp one (a tool round each), one for `/v1` (no tools offered there).
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 5);
    assert!(stand_in.auth.lock().unwrap().iter().all(|a| *a == format!("Bearer {REMOTE_KEY}")));

    // `/api/models` and `/api/health` show the remote's state once it has been checked.
    let mut smart = Value::Null;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let models: Value = http()
            .get(server.url("/api/models"))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        smart = models["tiers"][1].clone();
        if !smart["remote"]["checked_at"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(smart["tier"], "smart");
    assert_eq!(smart["provider"], "openai");
    assert_eq!(smart["leaves_machine"], false);
    assert_eq!(smart["state"], "configured", "{smart}");
    let remote = &smart["remote"];
    assert_eq!(remote["reachable"], true, "{smart}");
    assert_eq!(remote["model_listed"], true, "{smart}");
    assert_eq!(remote["host"], host.as_str());
    assert_eq!(remote["base_url"], base.as_str());
    assert!(remote["last_error"].is_null(), "{smart}");
    let health: Value = http()
        .get(server.url("/api/health"))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["models"][1]["remote"]["reachable"], true, "{health}");

    let logs = server.output();
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "verbose logs were on");
    assert!(!logs.contains(REMOTE_KEY), "the remote key reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_remote_falls_back_through_the_api_with_a_notice_and_no_key_in_logs() {
    let (graph_base, _graph) = start_graph().await;
    let server = start_server(&refused_base(), &graph_base);
    let response = http()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"message": "Hi"}))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200);
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events[0]["provider"], "local", "{events:?}");
    assert_eq!(events[0]["leaves_machine"], false);
    let notice = events.iter().find(|e| e["type"] == "notice").expect("a notice");
    assert_eq!(notice["kind"], "fallback");
    assert!(notice["message"].as_str().unwrap().contains("answered by main"), "{notice}");
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");
    let logs = server.output();
    assert!(logs.contains("falling back to main"), "{logs}");
    assert!(!logs.contains(REMOTE_KEY), "the remote key reached the logs");
}

// --- the official `openai` Python client ------------------------------------------------------

/// Runs `tests/remote_openai_client.py` against the server's `/v1` (`smart` is the remote
/// tier) and returns what it printed.
async fn run_python_client(server: &Server, with_tools: bool) -> Value {
    let python: PathBuf = tokio::task::spawn_blocking(crate::gateway::openai_python).await.unwrap();
    let script = crate::util::repo_path("tests/remote_openai_client.py");
    let mut command = tokio::process::Command::new(&python);
    command.arg(&script).arg(server.url("/v1")).arg(&server.token).kill_on_drop(true);
    if with_tools {
        command.arg("--tools");
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the openai client finished within 120 s")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.output()
    );
    serde_json::from_str(stdout.trim()).expect("the script prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_streams_from_a_remote_tier() {
    let (base, _stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let (graph_base, _graph) = start_graph().await;
    let server = start_server(&base, &graph_base);
    let result = run_python_client(&server, false).await;
    assert_eq!(result["text"], "Hello world", "{result}");
    assert_eq!(result["finish"], "stop", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_tool_round_trip_through_a_remote_tier() {
    let (base, stand_in) = stand_in(Mode::Normal, REMOTE_MODEL).await;
    let (graph_base, _graph) = start_graph().await;
    let server = start_server(&base, &graph_base);
    let result = run_python_client(&server, true).await;
    assert_eq!(result["text"], "Hello world", "{result}");
    assert_eq!(result["tool_call"]["id"], "call_remote_1", "{result}");
    assert_eq!(result["tool_call"]["name"], "get_weather", "{result}");
    assert_eq!(result["tool_call"]["arguments"], json!({"city": "Paris"}), "{result}");
    assert_eq!(result["tool_finish"], "tool_calls", "{result}");
    assert_eq!(result["final_text"], "It is sunny in Paris.", "{result}");
    // The client's tools reached the remote server as OpenAI tools, and the result as a
    // `tool` message naming the call.
    let bodies = stand_in.bodies.lock().unwrap().clone();
    let with_tools = bodies.iter().find(|b| b["tools"].is_array()).expect("tools were sent");
    assert_eq!(with_tools["tools"][0]["function"]["name"], "get_weather");
    let last = bodies.last().unwrap()["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["role"], "tool");
    assert_eq!(last["tool_call_id"], "call_remote_1");
}
