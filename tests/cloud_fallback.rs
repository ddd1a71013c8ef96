//! Cloud and remote tiers that fail after the prompt was sent, or answer nothing: the
//! privacy ledger of a fallback (the prompt left even though `main` wrote the answer), empty
//! and unreadable streams, `Retry-After` bounded by the timeout, the key redacted from what
//! a server says, and `/v1` refusing what Z.ai cannot enforce. Stand-ins on 127.0.0.1 speak
//! Z.ai's and OpenAI's documented protocol, reached through the production clients
//! (`ZaiProvider`, `OpenAiCompatProvider`); `main` is a scripted local model. Owns no
//! production code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

use my_claw::assistant::{AgentConfig, Assistant, AssistantConfig};
use my_claw::config::Secret;
use my_claw::domain::{ChatTurn, Role, ToolCall};
use my_claw::gateway::{self, AppState};
use my_claw::llm::providers::openai_compat::{OpenAiCompatConfig, OpenAiCompatProvider};
use my_claw::llm::providers::zai::{ZaiConfig, ZaiProvider};
use my_claw::llm::router::{Routed, Router, Tier};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, GenerationParams, LlmError, LlmRequest, Provider,
    ProviderInfo, Usage,
};

use crate::util;

const TOKEN: &str = "cloud-fallback-test-token-0123";
const ZAI_KEY: &str = "zai-key-5f2c9a71d0e4-do-not-show";

// --- the local `main` ------------------------------------------------------------------------

/// What the scripted main model answers.
#[derive(Clone, Copy)]
enum MainScript {
    /// "local answer".
    Text,
    /// Only a call of `get_weather`, whatever was offered.
    OnlyCall,
}

struct LocalMain {
    script: MainScript,
}

impl Provider for LocalMain {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "main.gguf".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, _request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let script = self.script;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            let (chunk, finish) = match script {
                MainScript::Text => (Chunk::Text("local answer".into()), FinishReason::Stop),
                MainScript::OnlyCall => (
                    Chunk::ToolCall(ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: "{}".into(),
                    }),
                    FinishReason::ToolCalls,
                ),
            };
            let _ = tx.try_send(Ok(chunk));
            let _ = tx.try_send(Ok(Chunk::Done { usage: Usage::default(), finish }));
            Ok(rx)
        })
    }
}

// --- the stand-in ----------------------------------------------------------------------------

type Answer = dyn Fn(usize) -> Response + Send + Sync;

/// A chat-completions server that answers request number `n` (0-based) with `answer(n)`.
struct StandIn {
    answer: Box<Answer>,
    requests: AtomicUsize,
}

async fn chat(State(state): State<Arc<StandIn>>) -> Response {
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    (state.answer)(n)
}

/// Serves `answer` at `{base}/chat/completions`; returns the base and the stand-in.
async fn stand_in(
    answer: impl Fn(usize) -> Response + Send + Sync + 'static,
) -> (String, Arc<StandIn>) {
    let state = Arc::new(StandIn { answer: Box::new(answer), requests: AtomicUsize::new(0) });
    let app = axum::Router::new()
        .route("/api/paas/v4/chat/completions", post(chat))
        .route("/v1/chat/completions", post(chat))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/api/paas/v4"), state)
}

/// A loopback base where nothing listens: bound, then released.
fn refused_base() -> String {
    let (listener, addr) = util::bound_listener();
    drop(listener);
    format!("http://{addr}/api/paas/v4")
}

fn host_of(base: &str) -> String {
    base.trim_start_matches("http://").split('/').next().unwrap().to_string()
}

fn event_stream(parts: &[&str]) -> Response {
    let parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
    let stream = futures::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn data(value: Value) -> String {
    format!("data: {value}\n\n")
}

fn delta(delta: Value, finish: Option<&str>) -> String {
    data(json!({"id": "1", "created": 1, "model": "glm-4.7",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}))
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    (status, [("content-type", "application/json")], body).into_response()
}

fn zai(base: &str, timeout: Duration) -> Arc<dyn Provider> {
    let mut config = ZaiConfig::new(base, Secret::new(ZAI_KEY), "glm-4.7", false, timeout);
    config.retry_backoff = Duration::from_millis(10);
    let client =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap();
    Arc::new(ZaiProvider::new(client, config))
}

/// A router whose `code` tier is `code`, answered by `main` when it fails.
fn code_router(code: Arc<dyn Provider>, main: MainScript) -> Router {
    let providers = HashMap::from([(Tier::Code, code)]);
    Router::with_providers(Arc::new(LocalMain { script: main }), providers, Tier::Main)
}

fn request() -> LlmRequest {
    LlmRequest::new(
        vec![ChatTurn::new(Role::System, "You are helpful."), ChatTurn::new(Role::User, "Hi")],
        GenerationParams::greedy(16),
    )
}

async fn text_of(routed: Routed) -> String {
    let mut stream = routed.stream;
    let mut text = String::new();
    while let Some(item) =
        tokio::time::timeout(Duration::from_secs(20), stream.recv()).await.expect("the stream ends")
    {
        if let Ok(Chunk::Text(t)) = item {
            text.push_str(&t);
        }
    }
    text
}

// --- the gateway in this process -------------------------------------------------------------

struct App {
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn gateway_app(router: Router) -> App {
    let main = Arc::new(LocalMain { script: MainScript::Text });
    let (mut state, dir) =
        util::in_process_state(main, TOKEN, 1 << 20, AgentConfig::default()).await;
    state.assistant = Arc::new(Assistant::with_agent(
        state.pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
        AgentConfig::default(),
    ));
    App { state, _dir: dir }
}

async fn call(app: &App, method: Method, path: &str, body: Option<Value>) -> (StatusCode, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
    let body = match body {
        Some(value) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(value.to_string())
        }
        None => Body::empty(),
    };
    let response = gateway::router(app.state.clone())
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let bytes = tokio::time::timeout(
        Duration::from_secs(30),
        axum::body::to_bytes(response.into_body(), 16 << 20),
    )
    .await
    .expect("body within 30 s")
    .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn call_json(
    app: &App,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, text) = call(app, method, path, body).await;
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// The `data:` payloads of an SSE body, `[DONE]` left out.
fn events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]" && !d.is_empty())
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

/// One WebChat turn on tier `code`: its events, and the stored answer and conversation.
async fn webchat_turn(app: &App) -> (Vec<Value>, Value, Value) {
    let (status, body) = call(
        app,
        Method::POST,
        "/api/chat",
        Some(json!({"message": "write a loop", "tier": "code"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = events(&body);
    assert_eq!(events[0]["type"], "meta", "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");
    let id = events[0]["conversation_id"].as_i64().expect("conversation id");
    let path = format!("/api/conversations/{id}/messages");
    let (_, history) = call_json(app, Method::GET, &path, None).await;
    let answer = history["messages"][1].clone();
    let (_, list) = call_json(app, Method::GET, "/api/conversations", None).await;
    let conversation = list["conversations"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == id))
        .cloned()
        .expect("listed");
    (events, answer, conversation)
}

fn notice(events: &[Value]) -> String {
    let notice = events.iter().find(|e| e["type"] == "notice").expect("a notice");
    assert_eq!(notice["kind"], "fallback", "{notice}");
    notice["message"].as_str().unwrap().to_string()
}

// --- 1 and 4: the ledger of a fallback, and the key ------------------------------------------

#[tokio::test]
async fn a_zai_401_is_answered_by_main_and_the_ledger_says_the_prompt_left() {
    let (base, stand_in) = stand_in(|_| {
        error(StatusCode::UNAUTHORIZED, "1001", &format!("Invalid API key: {ZAI_KEY}"))
    })
    .await;
    let host = host_of(&base);
    let app = gateway_app(code_router(zai(&base, Duration::from_secs(5)), MainScript::Text)).await;
    let (events, answer, conversation) = webchat_turn(&app).await;
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1, "a 401 is not retried");

    // Main wrote the answer, but Z.ai got the prompt: the ledger says it left, and where.
    let meta = &events[0];
    assert_eq!(meta["provider"], "local", "{meta}");
    assert_eq!(meta["model"], "main.gguf", "{meta}");
    assert_eq!(meta["leaves_machine"], true, "{meta}");
    assert_eq!(meta["host"], host.as_str(), "{meta}");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "local answer");
    let message = notice(&events);
    assert!(message.contains("Z.ai unavailable (HTTP 401, code 1001"), "{message}");
    assert!(message.contains("after the prompt was sent"), "{message}");
    assert!(message.contains("answered by main (main.gguf)"), "{message}");
    // What the server said is shown, without our key.
    assert!(message.contains("Invalid API key: ***"), "{message}");
    assert!(!message.contains(ZAI_KEY), "{message}");

    assert_eq!(answer["content"], "local answer", "{answer}");
    assert_eq!(answer["provider"], "local", "{answer}");
    assert_eq!(answer["left_machine"], true, "{answer}");
    assert_eq!(answer["host"], host.as_str(), "{answer}");
    assert_eq!(conversation["left_machine"], true, "{conversation}");

    let id = meta["conversation_id"].as_i64().unwrap();
    let (status, markdown) =
        call(&app, Method::GET, &format!("/api/conversations/{id}/export?format=md"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(markdown.contains(&format!("after the prompt was sent to {host}")), "{markdown}");

    let (_, health) = call_json(&app, Method::GET, "/api/health", None).await;
    let last_error = health["zai"]["last_error"].as_str().expect("a last error").to_string();
    assert!(last_error.contains("Invalid API key: ***"), "{health}");
    assert!(!health.to_string().contains(ZAI_KEY), "{health}");
}

#[tokio::test]
async fn a_refused_zai_connection_keeps_the_prompt_on_the_machine() {
    let app =
        gateway_app(code_router(zai(&refused_base(), Duration::from_secs(5)), MainScript::Text))
            .await;
    let (events, answer, conversation) = webchat_turn(&app).await;
    let meta = &events[0];
    assert_eq!(meta["provider"], "local", "{meta}");
    assert_eq!(meta["leaves_machine"], false, "nothing was written: {meta}");
    assert!(meta["host"].is_null(), "{meta}");
    let message = notice(&events);
    assert!(message.contains("Z.ai unavailable (connection"), "{message}");
    assert!(!message.contains("after the prompt was sent"), "{message}");
    assert_eq!(answer["left_machine"], false, "{answer}");
    assert!(answer["host"].is_null(), "{answer}");
    assert_eq!(conversation["left_machine"], false, "{conversation}");
}

// --- 2: an empty answer is no answer ---------------------------------------------------------

#[tokio::test]
async fn empty_and_unreadable_streams_fall_back_to_main_saying_why() {
    let thinking = delta(json!({"reasoning_content": "let me think"}), None);
    let stop = delta(json!({}), Some("stop"));
    let length = data(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 9, "completion_tokens": 16}}));
    let done = "data: [DONE]\n\n".to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![done.clone()], "(answered nothing)"),
        (vec!["data: <html>oops\n\n".into(), done.clone()], "not JSON: `<html>oops`"),
        (vec![thinking.clone(), stop.clone(), done.clone()], "thought, then answered nothing"),
        (
            vec![thinking.clone(), thinking.clone(), length.clone(), done.clone()],
            "spent its whole length limit (16 tokens) thinking",
        ),
    ];
    for (parts, why) in cases {
        let answer = parts.clone();
        let (base, stand_in) =
            stand_in(move |_| event_stream(&answer.iter().map(String::as_str).collect::<Vec<_>>()))
                .await;
        let router = code_router(zai(&base, Duration::from_secs(5)), MainScript::Text);
        let routed = router.stream(Tier::Code, request()).await.expect("fell back");
        assert_eq!(routed.info.provider, "local", "{why}: {routed:?}");
        assert!(routed.leaves_machine(), "{why}: the prompt was sent");
        let (kind, message) = &routed.notices[0];
        assert_eq!(kind, "fallback");
        assert!(message.contains(why), "{why}: {message}");
        assert!(message.contains("after the prompt was sent: answered by main"), "{message}");
        assert_eq!(text_of(routed).await, "local answer");
        assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1, "{why}: not retried");
    }

    // A remote OpenAI-compatible server too: on loopback, so the prompt stayed.
    let (base, _stand_in) = stand_in(|_| event_stream(&["data: [DONE]\n\n"])).await;
    let base = base.replace("/api/paas/v4", "/v1");
    let config = OpenAiCompatConfig::remote(&base, None, "qwen", false, Duration::from_secs(5));
    let remote = Arc::new(OpenAiCompatProvider::new(reqwest::Client::new(), config));
    let routed = code_router(remote, MainScript::Text).stream(Tier::Code, request()).await.unwrap();
    assert_eq!(routed.info.provider, "local");
    assert!(!routed.leaves_machine(), "a loopback server is this machine");
    assert!(routed.notices[0].1.contains("answered nothing"), "{:?}", routed.notices);
}

#[tokio::test]
async fn an_empty_zai_answer_is_not_stored_as_a_complete_answer() {
    let (base, _stand_in) = stand_in(|_| event_stream(&["data: [DONE]\n\n"])).await;
    let app = gateway_app(code_router(zai(&base, Duration::from_secs(5)), MainScript::Text)).await;
    let (events, answer, _) = webchat_turn(&app).await;
    assert!(notice(&events).contains("answered nothing"), "{events:?}");
    assert_eq!(answer["content"], "local answer", "{answer}");
    assert_eq!(answer["status"], "complete", "{answer}");
}

// --- 3: Retry-After within the timeout -------------------------------------------------------

fn too_many(retry_after: &'static str) -> impl Fn(usize) -> Response + Send + Sync {
    move |_| {
        let mut response = error(StatusCode::TOO_MANY_REQUESTS, "1302", "concurrency too high");
        response.headers_mut().insert("retry-after", retry_after.parse().unwrap());
        response
    }
}

#[tokio::test]
async fn a_retry_after_past_the_timeout_falls_back_at_once() {
    for retry_after in ["30", "10"] {
        let (base, stand_in) = stand_in(too_many(retry_after)).await;
        let router = code_router(zai(&base, Duration::from_secs(5)), MainScript::Text);
        let started = Instant::now();
        let routed = router.stream(Tier::Code, request()).await.expect("fell back");
        // Generous: without the bound this waits 10 s or 30 s before main starts.
        assert!(started.elapsed() < Duration::from_secs(8), "took {:?}", started.elapsed());
        assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1, "Retry-After: {retry_after}");
        assert_eq!(routed.info.provider, "local");
        let (kind, message) = &routed.notices[0];
        assert_eq!(kind, "fallback");
        assert!(message.contains("HTTP 429, code 1302"), "{message}");
        assert!(
            message.contains(&format!("not retried: a retry in {retry_after}s would pass the 5s")),
            "{message}"
        );
        assert_eq!(text_of(routed).await, "local answer");
    }

    // A wait that fits is still made: three tries, then main.
    let (base, stand_in) = stand_in(too_many("1")).await;
    let router = code_router(zai(&base, Duration::from_secs(20)), MainScript::Text);
    let routed = router.stream(Tier::Code, request()).await.expect("fell back");
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 3);
    assert!(!routed.notices[0].1.contains("not retried"), "{:?}", routed.notices);
}

// --- 5: `/v1` on a Z.ai tier -----------------------------------------------------------------

fn with_tools(extra: Value) -> Value {
    let mut body = json!({
        "model": "code",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn v1_refuses_what_zai_cannot_enforce_and_names_the_field() {
    let (base, stand_in) = stand_in(|_| {
        event_stream(&[&delta(json!({"content": "ok"}), Some("stop")), "data: [DONE]\n\n"])
    })
    .await;
    let app = gateway_app(code_router(zai(&base, Duration::from_secs(5)), MainScript::Text)).await;
    let refused = [
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            "tool_choice",
        ),
        (
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "w", "schema": {"type": "object"}}}}),
            "response_format",
        ),
    ];
    for (extra, param) in refused {
        let (status, body) =
            call_json(&app, Method::POST, "/v1/chat/completions", Some(with_tools(extra))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("tier `code`"), "{message}");
        assert!(message.contains("tiers that can: fast, smart, main"), "{message}");
    }
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 0, "nothing was sent");

    // What Z.ai does support goes through.
    for extra in
        [json!({"tool_choice": "auto"}), json!({"response_format": {"type": "json_object"}})]
    {
        let (status, body) =
            call_json(&app, Method::POST, "/v1/chat/completions", Some(with_tools(extra))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "ok", "{body}");
    }
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 2);

    // A cloud tier without a key is answered by main, which can.
    let app = app_without_zai().await;
    let (status, body) = call_json(
        &app,
        Method::POST,
        "/v1/chat/completions",
        Some(with_tools(json!({"tool_choice": "required"}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn app_without_zai() -> App {
    let main = Arc::new(LocalMain { script: MainScript::Text });
    gateway_app(Router::with_providers(main, HashMap::new(), Tier::Main)).await
}

#[tokio::test]
async fn v1_without_tools_never_returns_an_empty_answer_for_a_tool_call() {
    // Z.ai answers a request without tools with only a call: no answer, so main answers.
    let tool_call = delta(
        json!({"tool_calls": [{"index": 0, "id": "call_z", "type": "function",
                               "function": {"name": "get_weather", "arguments": "{}"}}]}),
        None,
    );
    let finish = delta(json!({}), Some("tool_calls"));
    let (base, stand_in) =
        stand_in(move |_| event_stream(&[&tool_call, &finish, "data: [DONE]\n\n"])).await;
    let app = gateway_app(code_router(zai(&base, Duration::from_secs(5)), MainScript::Text)).await;
    let body = json!({"model": "code", "messages": [{"role": "user", "content": "hi"}]});
    let (status, completion) =
        call_json(&app, Method::POST, "/v1/chat/completions", Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1);
    let message = &completion["choices"][0]["message"];
    assert_eq!(message, &json!({"role": "assistant", "content": "local answer"}), "{completion}");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    // Any model answering only with calls nobody offered tools for: an error, not "".
    let main = Arc::new(LocalMain { script: MainScript::OnlyCall });
    let app = gateway_app(Router::with_providers(main, HashMap::new(), Tier::Main)).await;
    let body = json!({"model": "main", "messages": [{"role": "user", "content": "hi"}]});
    let (status, error) =
        call_json(&app, Method::POST, "/v1/chat/completions", Some(body.clone())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    let text = error["error"]["message"].as_str().unwrap();
    assert!(text.contains("only with a call of `get_weather`"), "{text}");
    assert!(text.contains("offered no tools"), "{text}");
    let mut body = body;
    body["stream"] = json!(true);
    let (status, stream) = call(&app, Method::POST, "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = events(&stream);
    assert!(chunks.iter().all(|c| c["choices"][0]["finish_reason"].is_null()), "{chunks:?}");
    let last = chunks.last().unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("offered no tools"), "{last}");
}
