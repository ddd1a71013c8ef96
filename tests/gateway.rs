//! Gateway tests. Router tests call `gateway::router(state).oneshot(req)` with no socket and
//! a fake model (auth, validation, JSON shapes); the real-socket tests run the real binary
//! with the real SmolLM2 model and read its Server-Sent Events (streaming, stop, client
//! disconnect, the OpenAI-compatible API and the official `openai` Python client).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

use my_claw::assistant::{Assistant, AssistantConfig};
use my_claw::gateway::{self, AppState};
use my_claw::llm::router::{Router as ModelRouter, Tier};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};

use crate::util::{self, Server, ServerOptions};

const TOKEN: &str = "gateway-test-token-0123456789";
const MAX_BODY: usize = 4096;

// --- A fake model and an in-process state ---------------------------------------------------

/// Answers `echo: <last user message>` word by word, and remembers the last prompt.
struct EchoProvider {
    delay: Duration,
    last_request: Arc<Mutex<Option<LlmRequest>>>,
}

impl Provider for EchoProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "echo-model".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let last = request.messages.last().map(|m| m.content.clone()).unwrap_or_default();
        *self.last_request.lock().unwrap() = Some(request);
        let delay = self.delay;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let words: Vec<String> =
                    format!("echo: {last}").split(' ').map(|w| format!("{w} ")).collect();
                let n = words.len() as u32;
                for word in words {
                    tokio::time::sleep(delay).await;
                    if tx.send(Ok(Chunk::Text(word))).await.is_err() {
                        return;
                    }
                }
                let usage = Usage { prompt_tokens: 10, completion_tokens: n, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }
}

struct TestApp {
    state: AppState,
    last_request: Arc<Mutex<Option<LlmRequest>>>,
    _dir: tempfile::TempDir,
}

async fn test_app() -> TestApp {
    let last_request = Arc::new(Mutex::new(None));
    let provider =
        EchoProvider { delay: Duration::from_millis(5), last_request: last_request.clone() };
    let (state, dir) =
        util::in_process_state(Arc::new(provider), TOKEN, MAX_BODY, Default::default()).await;
    TestApp { state, last_request, _dir: dir }
}

/// One request through the whole router (auth, limits, handlers), without a socket.
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(text) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(text.to_string())
        }
        None => Body::empty(),
    };
    let response = gateway::router(app.state.clone())
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = tokio::time::timeout(
        Duration::from_secs(20),
        axum::body::to_bytes(response.into_body(), 16 << 20),
    )
    .await
    .expect("body within 20 s")
    .expect("body");
    (status, headers, bytes.to_vec())
}

async fn call_json(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    let (status, _, bytes) = call(app, method, path, Some(TOKEN), body.as_deref()).await;
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}

/// The `data:` payloads of a complete SSE body.
fn sse_payloads(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn error_message(value: &Value) -> String {
    value["error"]["message"].as_str().unwrap_or_default().to_string()
}

// --- Router tests (no socket) ---------------------------------------------------------------

#[tokio::test]
async fn api_and_v1_require_the_bearer_token() {
    let app = test_app().await;
    let protected = [
        (Method::GET, "/api/conversations", None),
        (Method::GET, "/api/conversations/1/messages", None),
        (Method::PATCH, "/api/conversations/1", Some(r#"{"title":"x"}"#)),
        (Method::DELETE, "/api/conversations/1", None),
        (Method::POST, "/api/chat", Some(r#"{"message":"hi"}"#)),
        (Method::POST, "/api/chat/1/stop", None),
        (Method::GET, "/api/models", None),
        (Method::GET, "/api/settings/persona", None),
        (Method::PUT, "/api/settings/persona", Some(r#"{"persona_name":"x","system_prompt":""}"#)),
        (Method::GET, "/api/events", None),
        (Method::GET, "/v1/models", None),
        (Method::POST, "/v1/chat/completions", Some(r#"{"model":"main","messages":[]}"#)),
    ];
    for (method, path, body) in protected {
        for token in [None, Some("wrong-token-0123456789abcd"), Some("")] {
            let (status, _, bytes) = call(&app, method.clone(), path, token, body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}");
            let value: Value = serde_json::from_slice(&bytes).expect("401 body is JSON");
            assert_eq!(value["error"]["code"], "unauthorized", "{method} {path}");
            assert_eq!(value["error"]["type"], "authentication_error", "{method} {path}");
        }
    }
    // Nothing reached the model.
    assert!(app.last_request.lock().unwrap().is_none());
    // The page itself and the minimal health are public.
    let (status, _, _) = call(&app, Method::GET, "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&app, Method::GET, "/api/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"status": "ok"}));
}

/// The app served by the real listener (hyper, its limits and middleware) on 127.0.0.1.
async fn serve_on_a_socket(app: &TestApp) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = my_claw::gateway::listener::ConnectionLimits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
    };
    let router = gateway::router(app.state.clone());
    tokio::spawn(gateway::listener::serve(listener, router, limits, std::future::pending()));
    addr
}

/// Unknown paths and wrong methods, over a real socket: the JSON error shape of every other
/// error. A path no route serves says only "not found", token or not; a protected route
/// asked with another method answers 401 without the token (as its own methods do), 405
/// with it; a public one 405; both with `Allow`.
#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_in_the_json_error_shape() {
    let app = test_app().await;
    let addr = serve_on_a_socket(&app).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let send = |method: Method, path: &'static str, token: Option<&'static str>| {
        let mut request = http.request(method, format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
            let content_type = response.headers().get("content-type").cloned();
            let body = response.text().await.expect("a body");
            assert_eq!(
                content_type.as_ref().and_then(|v| v.to_str().ok()),
                Some("application/json"),
                "{path}: {status} {body}"
            );
            let body: Value = serde_json::from_str(&body).expect("a JSON body");
            (status, allow, body)
        }
    };

    let not_found = json!({"error": {"code": "not_found", "message": "not found",
        "type": "invalid_request_error", "param": null}});
    for token in [None, Some("wrong-token-0123456789abcd"), Some(TOKEN)] {
        for (method, path) in [
            (Method::GET, "/nope"),
            (Method::GET, "/api/nope"),
            (Method::POST, "/api/conversations/1/nope"),
            (Method::GET, "/v1/nope"),
            (Method::DELETE, "/v1/chat/completions/1"),
            (Method::GET, "/index.html/x"),
        ] {
            let (status, _, body) = send(method.clone(), path, token).await;
            assert_eq!((status, &body), (404, &not_found), "{method} {path} with {token:?}");
        }
    }

    // A protected route with another method: 401 without the token, 405 with it.
    for token in [None, Some("wrong-token-0123456789abcd")] {
        let (status, _, body) = send(Method::GET, "/v1/chat/completions", token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let (status, allow, body) = send(Method::GET, "/v1/chat/completions", Some(TOKEN)).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(
        body,
        json!({"error": {"code": "method_not_allowed", "message": "method not allowed",
            "type": "invalid_request_error", "param": null}})
    );
    assert_eq!(allow.as_deref(), Some("POST"));
    let (status, allow, _) = send(Method::PUT, "/api/conversations", Some(TOKEN)).await;
    assert_eq!(status, 405);
    assert!(allow.is_some_and(|a| a.contains("GET")));

    // A public route with another method.
    let (status, allow, body) = send(Method::POST, "/api/health", None).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert!(allow.is_some_and(|a| a.contains("GET")));
    assert!(app.last_request.lock().unwrap().is_none(), "nothing reached the model");
}

#[tokio::test]
async fn chat_rejects_bad_requests_with_clear_messages() {
    let app = test_app().await;
    // The field at fault is named in `param` where there is one (QA passes 11 and 13).
    let cases: [(&str, StatusCode, &str, Value); 9] = [
        (r#"{"message": "hi""#, StatusCode::BAD_REQUEST, "invalid JSON body", Value::Null),
        (
            r#"{"tier": "main"}"#,
            StatusCode::BAD_REQUEST,
            "missing field `message`",
            json!("message"),
        ),
        (r#"{"message": 42}"#, StatusCode::BAD_REQUEST, "invalid JSON body", json!("message")),
        (
            r#"{"message": "  \n "}"#,
            StatusCode::BAD_REQUEST,
            "message must not be empty",
            json!("message"),
        ),
        (
            r#"{"message": "\u0000"}"#,
            StatusCode::BAD_REQUEST,
            "message must not be empty",
            json!("message"),
        ),
        (
            r#"{"message": "\u200b\u200b \ufeff"}"#,
            StatusCode::BAD_REQUEST,
            "message must not be empty",
            json!("message"),
        ),
        (
            r#"{"message": "hi", "tier": "turbo"}"#,
            StatusCode::BAD_REQUEST,
            "unknown tier `turbo`: expected one of fast, smart, main, code, reason",
            json!("tier"),
        ),
        (r#"{"message": "hi", "conversation_id": 999}"#, StatusCode::NOT_FOUND, "999", Value::Null),
        (
            r#"{"message": "hi", "conversation_id": "x"}"#,
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            json!("conversation_id"),
        ),
    ];
    for (body, expected_status, expected_message, param) in cases {
        let (status, _, bytes) =
            call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(body)).await;
        let value: Value = serde_json::from_slice(&bytes).expect("error body is JSON");
        assert_eq!(status, expected_status, "{body}: {value}");
        assert!(error_message(&value).contains(expected_message), "{body}: {value}");
        assert_eq!(value["error"]["param"], param, "{body}: {value}");
    }
    // A body without a JSON content type is refused the same way.
    let request = Request::post("/api/chat")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::from(r#"{"message":"hi"}"#))
        .unwrap();
    let response = gateway::router(app.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(app.last_request.lock().unwrap().is_none(), "no bad request reached the model");
}

/// An address or headers over the server's limits get a 414 or 431 in the JSON error shape
/// through the real listener (hyper's own answers have no body), and requests just under
/// them are served.
#[tokio::test]
async fn over_long_addresses_and_headers_get_json_414_and_431() {
    use my_claw::gateway::listener::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_URI_BYTES};
    let app = test_app().await;
    let addr = serve_on_a_socket(&app).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let get = |query_len: usize, headers: Vec<(String, String)>| {
        let path = format!("/api/health?q={}", "a".repeat(query_len));
        let mut request = http.get(format!("http://{addr}{path}"));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.expect("an answer");
            let status = response.status().as_u16();
            (status, response.text().await.expect("a body"))
        }
    };
    let code = |body: &str| -> String {
        let value: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON: {body}"));
        value["error"]["code"].as_str().unwrap_or_default().to_string()
    };
    let many = |n: usize| (0..n).map(|i| (format!("x-extra-{i}"), "1".to_string())).collect();
    let big = |len: usize| vec![("x-big".to_string(), "b".repeat(len))];

    // "/api/health?q=" is 14 bytes.
    let (status, body) = get(MAX_URI_BYTES - 14, Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(MAX_URI_BYTES - 13, Vec::new()).await;
    assert_eq!((status, code(&body).as_str()), (414, "uri_too_long"), "{body}");

    // reqwest adds a few of its own (host, accept); 90 extra stay under the count.
    let (status, body) = get(1, many(MAX_HEADERS - 10)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(1, many(MAX_HEADERS + 1)).await;
    assert_eq!((status, code(&body).as_str()), (431, "headers_too_large"), "{body}");
    assert!(body.contains("at most 100 headers"), "{body}");
    let (status, body) = get(1, big(MAX_HEADER_BYTES - 1024)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(1, big(MAX_HEADER_BYTES + 1)).await;
    assert_eq!((status, code(&body).as_str()), (431, "headers_too_large"), "{body}");
    // Past hyper's read buffer (about 400 KiB) hyper answers a bodiless 431 itself; not
    // asserted: it closes the connection while the client may still be writing.
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let app = test_app().await;
    let big = json!({ "message": "x".repeat(MAX_BODY * 2) }).to_string();
    for path in ["/api/chat", "/api/settings/persona", "/v1/chat/completions"] {
        let method = if path.ends_with("persona") { Method::PUT } else { Method::POST };
        let (status, _, bytes) = call(&app, method, path, Some(TOKEN), Some(&big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
        let value: Value = serde_json::from_slice(&bytes).expect("413 body is JSON");
        assert_eq!(value["error"]["code"], "payload_too_large", "{path}");
    }
}

#[tokio::test]
async fn over_long_messages_and_personas_get_400_and_store_nothing() {
    use my_claw::config::MAX_MESSAGE_CHARS;
    use my_claw::gateway::settings::{MAX_NAME_CHARS, MAX_SYSTEM_PROMPT_CHARS};
    let mut app = test_app().await;
    // Room for the texts themselves: the limits under test are in characters, not bytes.
    app.state.max_body_bytes = 1 << 20;

    // Persona: a name or a system prompt one character too long is refused, and the stored
    // persona stays what it was.
    let long_name = "n".repeat(MAX_NAME_CHARS + 1);
    let long_prompt = "é".repeat(MAX_SYSTEM_PROMPT_CHARS + 1);
    for (update, expected) in [
        (json!({"persona_name": long_name, "system_prompt": "x"}), "persona_name is longer"),
        (json!({"persona_name": "Pince", "system_prompt": long_prompt}), "the limit is 8000"),
    ] {
        let (status, err) =
            call_json(&app, Method::PUT, "/api/settings/persona", Some(update)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert!(error_message(&err).contains(expected), "{err}");
        let (_, persona) = call_json(&app, Method::GET, "/api/settings/persona", None).await;
        assert_eq!(persona["persona_name"], "Claw", "unchanged after a refused update");
    }
    let at_limit = "é".repeat(MAX_SYSTEM_PROMPT_CHARS);
    let update = json!({"persona_name": "Pince", "system_prompt": at_limit});
    let (status, saved) = call_json(&app, Method::PUT, "/api/settings/persona", Some(update)).await;
    assert_eq!(status, StatusCode::OK, "a prompt at the limit is accepted: {saved}");

    // Chat: one character past the limit (multi-byte, so bytes are not what is counted) is
    // a 400 before anything is stored or reaches the model.
    let too_long = "é".repeat(MAX_MESSAGE_CHARS + 1);
    let (status, err) =
        call_json(&app, Method::POST, "/api/chat", Some(json!({"message": too_long}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(error_message(&err).contains("longer than 16000 characters"), "{err}");
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(list["conversations"], json!([]), "nothing stored: {list}");
    let body = json!({"model": "main", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": too_long},
    ]});
    let (status, err) = call_json(&app, Method::POST, "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(error_message(&err).contains("messages[1].content is longer than"), "{err}");
    assert!(app.last_request.lock().unwrap().is_none(), "nothing reached the model");

    // At the limit it is answered and stored.
    let at_limit = "é".repeat(MAX_MESSAGE_CHARS);
    let body = json!({"message": at_limit}).to_string();
    let (status, _, _) = call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(&body)).await;
    assert_eq!(status, StatusCode::OK);
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(list["conversations"].as_array().map(Vec::len), Some(1), "{list}");
}

/// A model whose engine queue is always full.
struct BusyProvider;

impl Provider for BusyProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "busy-model".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, _request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        Box::pin(async { Err(LlmError::QueueFull) })
    }
}

#[tokio::test]
async fn every_503_says_when_to_retry() {
    let mut app = test_app().await;
    let router = ModelRouter::with_providers(Arc::new(BusyProvider), HashMap::new(), Tier::Main);
    app.state.assistant = Arc::new(Assistant::new(
        app.state.pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
    ));
    let body = json!({"model": "main", "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, bytes) =
        call(&app, Method::POST, "/v1/chat/completions", Some(TOKEN), Some(&body.to_string()))
            .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&bytes));
    let value: Value = serde_json::from_slice(&bytes).expect("our JSON error shape");
    assert_eq!(value["error"]["code"], "unavailable");
    let retry = headers.get(header::RETRY_AFTER).expect("Retry-After on a busy engine");
    assert!(retry.to_str().unwrap().parse::<u64>().unwrap() > 0);

    // Health made by its own handler: the database is gone.
    app.state.pool.close().await;
    let (status, headers, _) = call(&app, Method::GET, "/api/health", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER), "Retry-After on health: {headers:?}");
}

/// A database that can be read but not written: health says so (503 `degraded`, the
/// reason in the detailed answer) where it said `ok` while every chat was refused for a full
/// disk. A real full file system is not available in a test: SQLite's own page limit
/// (`PRAGMA max_page_count`, on every connection of the pool) makes the database file
/// unable to grow, after a VACUUM empties its free list and messages fill its pages, which
/// SQLite reports exactly as a full disk (SQLITE_FULL). The disk's side of the probe is
/// tested in `db::tests` under a file size limit.
#[tokio::test]
async fn health_is_degraded_when_the_database_cannot_take_a_write() {
    use my_claw::db::memory::{self, NewMessage};
    use my_claw::domain::Role;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    let mut app = test_app().await;
    let (status, value) = call_json(&app, Method::GET, "/api/health", None).await;
    assert_eq!(status, StatusCode::OK, "{value}");
    assert_eq!(value["status"], "ok");
    assert_eq!(value["database"]["writable"], true, "{value}");

    let file = app.state.pool.connect_options().get_filename().to_path_buf();
    sqlx::query("VACUUM").execute(&app.state.pool).await.expect("vacuum");
    app.state.pool.close().await;
    let options = SqliteConnectOptions::new()
        .filename(&file)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        // Clamped to the file's current size: not one page more.
        .pragma("max_page_count", "1");
    let pool = SqlitePoolOptions::new().connect_with(options).await.expect("reopen");
    let conversation = memory::create_webchat_conversation(&pool, Some("filler")).await;
    // Large messages until one does not fit, then smaller ones into what is left of the
    // pages, so that not even a short message fits.
    if let Ok(conversation) = conversation {
        for size in [2000, 400, 80, 16, 1] {
            for n in 0.. {
                let text = format!("{n} {}", "x".repeat(size));
                let message = NewMessage::plain(conversation.id, Role::User, text);
                if memory::add_message(&pool, &message).await.is_err() {
                    break;
                }
            }
        }
    }
    let provider =
        EchoProvider { delay: Duration::from_millis(5), last_request: app.last_request.clone() };
    let router = ModelRouter::with_providers(Arc::new(provider), HashMap::new(), Tier::Main);
    app.state.assistant = Arc::new(Assistant::new(
        pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
    ));
    app.state.pool = pool;

    // The state health must match: a chat is refused for the full disk.
    let (status, _, body) =
        call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(r#"{"message": "hello"}"#)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("disk that holds the database is full"), "{body}");
    // The refused chat left no empty conversation behind (QA pass 10).
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    let titles: Vec<&Value> =
        list["conversations"].as_array().unwrap().iter().map(|c| &c["title"]).collect();
    assert_eq!(titles, [&json!("filler")], "{list}");

    let (status, headers, bytes) = call(&app, Method::GET, "/api/health", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key(header::RETRY_AFTER), "{headers:?}");
    let value: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(value, json!({"status": "degraded"}));

    let (status, value) = call_json(&app, Method::GET, "/api/health", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{value}");
    assert_eq!(value["status"], "degraded", "{value}");
    let database = &value["database"];
    assert_eq!(database["ok"], false, "{value}");
    assert_eq!(database["writable"], false, "{value}");
    // Reads still work: the migration version is there.
    assert!(database["migration_version"].as_i64().is_some(), "{value}");
    let error = database["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot take a write") && error.contains("full"), "{error}");
}

#[tokio::test]
async fn chat_streams_meta_tokens_and_done_then_history_shows_the_ledger() {
    let app = test_app().await;
    let (status, headers, body) = call(
        &app,
        Method::POST,
        "/api/chat",
        Some(TOKEN),
        Some(r#"{"message": "hello there", "tier": "fast"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let content_type = headers.get(header::CONTENT_TYPE).unwrap().to_str().unwrap();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let events: Vec<Value> =
        sse_payloads(&body).iter().map(|d| serde_json::from_str(d).expect("JSON event")).collect();
    assert_eq!(events[0]["type"], "meta", "{events:?}");
    assert_eq!(events[0]["tier"], "fast");
    assert_eq!(events[0]["provider"], "local");
    assert_eq!(events[0]["model"], "echo-model");
    assert_eq!(events[0]["leaves_machine"], false);
    let conversation_id = events[0]["conversation_id"].as_i64().expect("conversation id");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text.trim(), "echo: hello there");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done", "{events:?}");
    assert_eq!(done["finish"], "stop");
    assert_eq!(done["usage"]["prompt_tokens"], 10);
    assert_eq!(done["usage"]["completion_tokens"], 3);
    assert!(done["usage"]["cached_tokens"].is_u64());
    assert!(done["timings"]["total_ms"].is_u64());
    // The persona went in as the system turn.
    let prompt = app.last_request.lock().unwrap().clone().expect("a prompt");
    assert!(prompt.messages[0].content.starts_with("You are Claw"), "{:?}", prompt.messages);

    let (status, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(status, StatusCode::OK);
    let conv = &list["conversations"][0];
    assert_eq!(conv["id"], conversation_id);
    assert_eq!(conv["channel"], "webchat");
    assert_eq!(conv["title"], "hello there");
    assert_eq!(conv["message_count"], 2);
    assert_eq!(conv["left_machine"], false);

    let path = format!("/api/conversations/{conversation_id}/messages");
    let (status, history) = call_json(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "hello there");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"].as_str().unwrap().trim(), "echo: hello there");
    assert_eq!(messages[1]["tier"], "fast");
    assert_eq!(messages[1]["provider"], "local");
    assert_eq!(messages[1]["model"], "echo-model");
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(messages[1]["left_machine"], false);
    assert_eq!(messages[1]["id"], done["message_id"]);

    // A second turn continues the same conversation, with the history in the prompt.
    let body = json!({"message": "again", "conversation_id": conversation_id}).to_string();
    let (status, _, bytes) = call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(&body)).await;
    assert_eq!(status, StatusCode::OK);
    let first: Value = serde_json::from_str(&sse_payloads(&bytes)[0]).unwrap();
    assert_eq!(first["conversation_id"], conversation_id);
    let prompt = app.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(prompt.messages.len(), 4, "system + 3 turns: {:?}", prompt.messages);

    // The code tier has no Z.ai key here: main answers, and the stream says so.
    let body = json!({"message": "hi", "conversation_id": conversation_id, "tier": "code"});
    let (_, _, bytes) =
        call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(&body.to_string())).await;
    let events: Vec<Value> =
        sse_payloads(&bytes).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let notice = events.iter().find(|e| e["type"] == "notice").expect("a fallback notice");
    assert_eq!(notice["kind"], "fallback");
    assert!(notice["message"].as_str().unwrap().contains("ZAI_API_KEY"), "{notice}");
}

#[tokio::test]
async fn conversations_can_be_renamed_and_deleted() {
    let app = test_app().await;
    let (_, _, bytes) =
        call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(r#"{"message":"first"}"#)).await;
    let meta: Value = serde_json::from_str(&sse_payloads(&bytes)[0]).unwrap();
    let id = meta["conversation_id"].as_i64().unwrap();
    let path = format!("/api/conversations/{id}");

    let (status, renamed) =
        call_json(&app, Method::PATCH, &path, Some(json!({"title": "  Groceries  "}))).await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    assert_eq!(renamed["title"], "Groceries");
    assert_eq!(renamed["id"], id);
    // Nothing to read is no title either: a NUL showed as a blank entry in the list.
    for blank in [" ", "\u{0}", "\u{200b}\u{1b}"] {
        let (status, err) =
            call_json(&app, Method::PATCH, &path, Some(json!({"title": blank}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{blank:?}: {err}");
        assert!(error_message(&err).contains("title must not be empty"), "{err}");
        assert_eq!(err["error"]["param"], "title", "{err}");
    }
    let (status, _) =
        call_json(&app, Method::PATCH, "/api/conversations/4242", Some(json!({"title": "x"})))
            .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, err) = call_json(&app, Method::GET, "/api/conversations/abc/messages", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&err).contains("not a conversation id"), "{err}");
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(list["conversations"][0]["title"], "Groceries");
    let (_, list) = call_json(&app, Method::GET, "/api/conversations?limit=1", None).await;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
    let (status, err) = call_json(&app, Method::GET, "/api/conversations?limit=lots", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&err).contains("limit `lots` is not a number"), "{err}");

    let (status, _) = call_json(&app, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call_json(&app, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call_json(&app, Method::GET, &format!("{path}/messages"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(list["conversations"], json!([]));
    // Stopping a conversation that does not exist is a 404 (as following it is); one with
    // nothing running is not an error (`conversations::` tests).
    let (status, _) = call_json(&app, Method::POST, "/api/chat/4242/stop", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call_json(&app, Method::POST, "/api/chat/-1/stop", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn persona_round_trips_and_reaches_the_prompt() {
    let app = test_app().await;
    let (status, persona) = call_json(&app, Method::GET, "/api/settings/persona", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(persona["persona_name"], "Claw");
    assert_eq!(persona["system_prompt"], persona["default_system_prompt"]);

    let update = json!({"persona_name": "Pince", "system_prompt": "You are {name}, terse."});
    let (status, saved) = call_json(&app, Method::PUT, "/api/settings/persona", Some(update)).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    assert_eq!(saved["persona_name"], "Pince");
    assert_eq!(saved["system_prompt"], "You are {name}, terse.");
    let (_, persona) = call_json(&app, Method::GET, "/api/settings/persona", None).await;
    assert_eq!(persona["persona_name"], "Pince");

    for blank in [" ", "\u{0}"] {
        let (status, err) = call_json(
            &app,
            Method::PUT,
            "/api/settings/persona",
            Some(json!({"persona_name": blank, "system_prompt": "x"})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{blank:?}: {err}");
        assert!(error_message(&err).contains("persona_name must not be empty"));
        assert_eq!(err["error"]["param"], "persona_name", "{err}");
    }

    call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(r#"{"message":"hi"}"#)).await;
    let prompt = app.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(prompt.messages[0].content, "You are Pince, terse.");
    // The OpenAI API injects it too when the client sends no system message.
    let body = json!({"model": "main", "messages": [{"role": "user", "content": "hi"}]});
    let (status, _) = call_json(&app, Method::POST, "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let prompt = app.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(prompt.messages[0].content, "You are Pince, terse.");
}

#[tokio::test]
async fn models_lists_every_tier_with_its_state() {
    let app = test_app().await;
    let (status, models) = call_json(&app, Method::GET, "/api/models", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["default_tier"], "main");
    let tiers = models["tiers"].as_array().unwrap();
    let names: Vec<&str> = tiers.iter().map(|t| t["tier"].as_str().unwrap()).collect();
    assert_eq!(names, ["fast", "smart", "main", "code", "reason"]);
    for tier in tiers {
        assert_eq!(tier["available"], true, "{tier}");
        assert_eq!(tier["model"], "echo-model", "{tier}");
        assert!(tier["detail"].is_string());
    }
    assert_eq!(tiers[3]["fallback_to"], "main");
    assert_eq!(tiers[3]["state"], "falling_back");
    assert_eq!(tiers[2]["fallback_to"], Value::Null);
}

#[tokio::test]
async fn openai_api_with_a_fake_model() {
    let app = test_app().await;
    let (status, models) = call_json(&app, Method::GET, "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fast", "smart", "main", "code", "reason"]);
    let (status, _) = call_json(&app, Method::GET, "/v1/models/gpt-4", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let body = json!({
        "model": "smart",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "ping pong"}]}
        ]
    });
    let (status, completion) =
        call_json(&app, Method::POST, "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{completion}");
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "smart");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        completion["choices"][0]["message"]["content"].as_str().unwrap().trim(),
        "echo: ping pong"
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    assert_eq!(completion["usage"]["total_tokens"], 13);
    // The client's own system prompt wins over the persona; nothing was stored.
    let prompt = app.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(prompt.messages[0].content, "Be brief.");
    assert_eq!(prompt.messages.len(), 2);
    let (_, list) = call_json(&app, Method::GET, "/api/conversations", None).await;
    assert_eq!(list["conversations"], json!([]));

    let body = json!({
        "model": "main", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "a b"}]
    });
    let (status, headers, bytes) =
        call(&app, Method::POST, "/v1/chat/completions", Some(TOKEN), Some(&body.to_string()))
            .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/event-stream"));
    let payloads = sse_payloads(&bytes);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text.trim(), "echo: a b");
    let finish = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    // The finish chunk carries the answer's timings, as a non-streamed answer does.
    let timings = &finish["timings"];
    assert!(timings["total_ms"].as_u64().unwrap() >= timings["ttft_ms"].as_u64().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per response");

    let unknown = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]});
    let (status, err) = call_json(&app, Method::POST, "/v1/chat/completions", Some(unknown)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(err["error"]["code"], "model_not_found", "{err}");
    assert_eq!(err["error"]["type"], "invalid_request_error", "{err}");
    assert!(error_message(&err).contains("unknown tier `gpt-4o`"), "{err}");
    let (status, err) = call_json(&app, Method::GET, "/v1/models/gpt-4o", None).await;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("model_not_found")));
    let cases = [
        (json!({"model": "main", "messages": []}), "messages must not be empty"),
        (json!({"model": "main", "messages": [{"role": "tool", "content": "x"}]}), "role `tool`"),
        (
            json!({"model": "main", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}]}), "missing field `model`"),
    ];
    for (body, expected) in cases {
        let (status, err) =
            call_json(&app, Method::POST, "/v1/chat/completions", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert!(error_message(&err).contains(expected), "{body}: {err}");
    }
}

#[tokio::test]
async fn events_stream_reports_messages_as_they_are_stored() {
    let app = test_app().await;
    let request = Request::get("/api/events")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let response = gateway::router(app.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let mut buffer = String::new();
    let mut events: Vec<Value> = Vec::new();
    let mut sent = false;
    let mut renamed = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.iter().any(|e| e["type"] == "renamed") {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(remaining, body.next())
            .await
            .expect("events within 20 s")
            .expect("stream open")
            .expect("chunk");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(cut) = buffer.find("\n\n") {
            let block: String = buffer.drain(..cut + 2).collect();
            events.extend(
                sse_payloads(block.as_bytes()).iter().map(|d| serde_json::from_str(d).unwrap()),
            );
        }
        if !sent && events.iter().any(|e| e["type"] == "ready") {
            // A message stored by anyone (here: a chat turn) shows up on the stream.
            sent = true;
            call(&app, Method::POST, "/api/chat", Some(TOKEN), Some(r#"{"message":"live"}"#)).await;
        }
        let stored = events.iter().filter(|e| e["type"] == "message").count();
        if !renamed && stored == 2 {
            // A rename in another tab reaches the open pages too.
            renamed = true;
            let id =
                events.iter().find(|e| e["type"] == "message").unwrap()["conversation_id"].clone();
            let path = format!("/api/conversations/{id}");
            let body = r#"{"title":"renamed elsewhere"}"#;
            let (status, _, _) = call(&app, Method::PATCH, &path, Some(TOKEN), Some(body)).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
    assert_eq!(events[0], json!({"type": "ready"}));
    let messages: Vec<&Value> = events.iter().filter(|e| e["type"] == "message").collect();
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[0]["conversation_id"], messages[1]["conversation_id"]);
    assert!(messages[1]["message_id"].as_i64() > messages[0]["message_id"].as_i64());
    let renamed = events.iter().find(|e| e["type"] == "renamed").unwrap();
    assert_eq!(
        renamed,
        &json!({"type": "renamed", "conversation_id": messages[0]["conversation_id"]})
    );
}

#[tokio::test]
async fn webchat_page_is_embedded_and_served_with_a_strict_policy() {
    let app = test_app().await;
    let (status, headers, body) = call(&app, Method::GET, "/", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
    let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
    let html = String::from_utf8(body).unwrap();
    for needle in [
        r#"<script src="/chat.js" defer>"#,
        r#"<script src="/cron.js" defer>"#,
        r#"<section id="cron-panel" class="panel" hidden></section>"#,
        ">Schedules</button>",
        r#"id="persona-panel""#,
        r#"id="model-select""#,
        r#"id="stop""#,
    ] {
        assert!(html.contains(needle), "index.html lacks {needle}");
    }
    for (path, kind) in [
        ("/chat.js", "text/javascript"),
        ("/chat.css", "text/css"),
        ("/cron.js", "text/javascript"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let (status, headers, _) = call(&app, Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}");
    }
    // Model output must never be parsed as HTML by the page.
    let js = include_str!("../static/chat.js");
    for forbidden in [".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
        assert!(!js.contains(forbidden), "chat.js uses {forbidden}");
    }
}

// --- Real socket, connection limits ---------------------------------------------------------

/// How a raw connection ended: when the server closed it, and what it had answered.
struct Closed {
    after: Duration,
    answer: String,
}

/// Reads from `stream` until the server closes it (end of stream or reset), bounded by
/// `limit`; panics when it stays open that long.
fn wait_closed(mut stream: std::net::TcpStream, started: Instant, limit: Duration) -> Closed {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(started.elapsed() < limit, "still open after {limit:?}");
            }
            Err(_) => break, // reset by the server: closed too
        }
    }
    Closed { after: started.elapsed(), answer: String::from_utf8_lossy(&answer).into_owned() }
}

#[test]
fn stalled_connections_are_closed_within_the_limits() {
    use std::io::Write;
    use std::net::TcpStream;
    let limit = Duration::from_secs(1);
    let envs = vec![
        ("REQUEST_HEADER_TIMEOUT".to_string(), "1s".to_string()),
        ("REQUEST_BODY_TIMEOUT".to_string(), "1s".to_string()),
    ];
    let server = Server::start(ServerOptions::with_envs(envs));
    // Generous for a loaded machine, and far below the minutes such connections lasted.
    let bound = Duration::from_secs(8);
    let connect = || TcpStream::connect(server.addr).expect("connect");

    let mut waiters = Vec::new();
    // Connections that never send a byte, and one that stops inside its headers.
    for i in 0..6 {
        let mut stream = connect();
        if i == 5 {
            stream.write_all(b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        let started = Instant::now();
        waiters
            .push(("no request", std::thread::spawn(move || wait_closed(stream, started, bound))));
    }
    // Connections that send one byte of a 100 KB body, on a protected and a public route.
    for path in ["/api/chat", "/api/settings/persona"] {
        let mut stream = connect();
        let method = if path.ends_with("persona") { "PUT" } else { "POST" };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{",
            server.token
        );
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        waiters.push((
            "partial body",
            std::thread::spawn(move || wait_closed(stream, started, bound)),
        ));
    }
    for (what, waiter) in waiters {
        let closed = waiter.join().expect("waiter");
        assert!(closed.after < bound, "{what}: open for {:?}", closed.after);
        if what == "partial body" {
            // It waited for the body, then said why it gave up.
            assert!(
                closed.after >= limit - Duration::from_millis(100),
                "{what}: {:?}",
                closed.after
            );
            assert!(closed.answer.starts_with("HTTP/1.1 408"), "{what}: {}", closed.answer);
            assert!(closed.answer.contains("request_timeout"), "{what}: {}", closed.answer);
        }
    }

    // A kept-alive connection is closed once idle for the limit after its answer.
    let mut stream = connect();
    stream.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let closed = wait_closed(stream, Instant::now(), bound);
    assert!(closed.answer.starts_with("HTTP/1.1 200"), "{}", closed.answer);
    assert!(
        closed.after >= limit - Duration::from_millis(100),
        "closed too early: {:?}",
        closed.after
    );
}

// --- Real socket, real binary, real model ----------------------------------------------------
// --- Real socket, real binary, real model ----------------------------------------------------

/// Real-model tests share two CPU cores with everything else: one at a time keeps their
/// timing checks meaningful.
pub(crate) static REAL_MODEL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The reply limit in the stop tests: an answer that is not really stopped keeps the
/// engine busy for thousands of tokens (40 s and more even at llama.cpp's speed here).
const STOP_TEST_MAX_TOKENS: u32 = 6000;

/// A prompt that makes SmolLM2 write for a long time.
const LONG_PROMPT: &str = "Count from 1 to 1000, one number per line, with no other text.";

pub(crate) fn real_server(reply_max_tokens: u32) -> Server {
    let mut envs = util::smollm2_env();
    envs.push(("REPLY_MAX_TOKENS".into(), reply_max_tokens.to_string()));
    envs.push(("CONTEXT_SIZE".into(), "8192".into()));
    Server::start(ServerOptions { envs, data_dir: None })
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("http client")
}

/// Reads Server-Sent Events from a live response, with a deadline on each event.
pub struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> SseReader {
        SseReader { response, buffer: Vec::new() }
    }

    /// The next `data:` payload; `None` when the stream ends.
    pub async fn next_data(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(cut) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..cut + 2).collect();
                let block = String::from_utf8(block).expect("SSE events are UTF-8");
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|l| l.strip_prefix(' ').unwrap_or(l))
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(data.join("\n"));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.extend_from_slice(&bytes),
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => panic!("SSE stream failed: {e}"),
                Err(_) => panic!("no SSE event within {limit:?}"),
            }
        }
    }

    pub async fn next_json(&mut self, limit: Duration) -> Option<Value> {
        let data = self.next_data(limit).await?;
        Some(serde_json::from_str(&data).unwrap_or_else(|e| panic!("bad event {data}: {e}")))
    }

    /// The next event of the answer itself: `loading` notices (sent while the model loads,
    /// which takes longer on a busy machine) are skipped.
    pub async fn next_answer_json(&mut self, limit: Duration) -> Option<Value> {
        loop {
            let event = self.next_json(limit).await?;
            if !(event["type"] == "notice" && event["kind"] == "loading") {
                return Some(event);
            }
        }
    }
}

async fn start_chat(server: &Server, body: Value) -> SseReader {
    let response = http()
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&body)
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    SseReader::new(response)
}

async fn get_json(server: &Server, path: &str) -> Value {
    let response = http().get(server.url(path)).bearer_auth(&server.token).send().await.unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

#[tokio::test]
async fn real_model_streams_an_answer_over_sse_and_stores_it() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(24);
    let started = Instant::now();
    let mut reader =
        start_chat(&server, json!({"message": "Write one sentence about cats."})).await;
    let meta = reader.next_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(meta["type"], "meta");
    assert_eq!(meta["tier"], "main");
    assert_eq!(meta["provider"], "local");
    assert!(meta["model"].as_str().unwrap().contains("SmolLM2"), "{meta}");
    assert_eq!(meta["leaves_machine"], false);
    let conversation_id = meta["conversation_id"].as_i64().unwrap();
    let mut tokens = Vec::new();
    let mut token_times = Vec::new();
    let done = loop {
        let event = reader.next_answer_json(Duration::from_secs(60)).await.expect("done event");
        match event["type"].as_str().unwrap() {
            "token" => {
                tokens.push(event["text"].as_str().unwrap().to_string());
                token_times.push(started.elapsed());
            }
            "done" => break event,
            other => panic!("unexpected {other}: {event}"),
        }
    };
    assert!(reader.next_data(Duration::from_secs(5)).await.is_none(), "the stream ends");
    assert!(tokens.len() >= 3, "several token events: {tokens:?}");
    // Streaming, not one block at the end: the tokens arrived over time.
    assert!(token_times.last().unwrap() > token_times.first().unwrap());
    let usage = &done["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 20, "{done}");
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion), "{done}");
    assert!(done["finish"] == "stop" || done["finish"] == "length", "{done}");
    assert!(done["timings"]["decode_ms"].is_u64() && done["timings"]["ttft_ms"].is_u64());
    // One clock from the request: the time to first token (prefill included) is part of
    // the total.
    let ttft_ms = done["timings"]["ttft_ms"].as_u64().unwrap();
    assert!(ttft_ms > 0 && done["timings"]["total_ms"].as_u64().unwrap() >= ttft_ms, "{done}");

    let history =
        get_json(&server, &format!("/api/conversations/{conversation_id}/messages")).await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    let answer = &messages[1];
    assert_eq!(answer["content"].as_str().unwrap(), tokens.concat());
    assert_eq!(answer["tier"], "main");
    assert_eq!(answer["provider"], "local");
    assert_eq!(answer["model"], meta["model"]);
    assert_eq!(answer["status"], "complete");
    assert_eq!(answer["left_machine"], false);
    assert_eq!(answer["id"], done["message_id"]);

    // The `code` tier without a Z.ai key: the local model answers, the stream says why, and
    // the ledger records that nothing left the machine.
    let body = json!({"message": "And dogs?", "conversation_id": conversation_id, "tier": "code"});
    let mut reader = start_chat(&server, body).await;
    let meta = reader.next_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(meta["tier"], "code");
    assert_eq!(meta["provider"], "local");
    let notice = reader.next_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(notice["type"], "notice", "{notice}");
    assert_eq!(notice["kind"], "fallback");
    let (_, done) = read_answer_rest(&mut reader).await;
    assert_eq!(done["type"], "done", "{done}");
    let models = get_json(&server, "/api/models").await;
    assert_eq!(models["tiers"][2]["state"], "loaded", "{models}");
}

/// Reads the rest of an answer once `meta` has been read; returns the text and the final
/// (`done` or `error`) event.
async fn read_answer_rest(reader: &mut SseReader) -> (String, Value) {
    let mut text = String::new();
    loop {
        let event = reader.next_json(Duration::from_secs(60)).await.expect("stream ended early");
        match event["type"].as_str().unwrap() {
            "token" => text.push_str(event["text"].as_str().unwrap()),
            "notice" => {}
            _ => return (text, event),
        }
    }
}

/// After a stop, the engine must be free at once. The probe is a 3-token completion; the
/// engine measures its time to first token from the moment it was queued, so
/// `ttft - prefill` is the time it waited for the engine (plus a decode step and, on this
/// shared 2-core machine, scheduling noise of a few seconds). Had the stopped answer kept
/// running, that wait would be the rest of a 6000-token answer: 40 s at the very least.
async fn assert_engine_is_free(server: &Server) {
    let body = json!({
        "model": "main", "max_tokens": 3,
        "messages": [{"role": "user", "content": "Say hi."}]
    });
    // Timed here, by the wall clock: the engine's own `prefill_ms` of the probe starts when
    // it takes the probe, after the stopped answer is done with it, so it cannot tell (a
    // prefill of 6,000 tokens that went on for 90 s after its stop passed that way). A
    // 50-token prompt and 3 tokens take under a second; what a stopped answer that kept
    // running costs is its whole prompt or answer, a minute and more.
    let started = Instant::now();
    let completion = completion(server, &body).await;
    let waited_ms = started.elapsed().as_millis();
    let ttft_ms = completion["timings"]["ttft_ms"].as_u64().unwrap();
    eprintln!("after the stop: the probe took {waited_ms} ms (its ttft {ttft_ms} ms)");
    assert!(
        waited_ms < 15_000,
        "the next request took {waited_ms} ms (its ttft {ttft_ms} ms): the stopped answer \
         kept the engine"
    );
}

/// A non-streamed `/v1/chat/completions` answer, which must be a 200.
async fn completion(server: &Server, body: &Value) -> Value {
    let response = http()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&server.token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The stored answer of a conversation, once it is there (bounded wait).
/// `POST /api/chat/{id}/stop`.
async fn post_stop(server: &Server, conversation_id: i64) -> reqwest::Response {
    http()
        .post(server.url(&format!("/api/chat/{conversation_id}/stop")))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("POST stop")
}

async fn stored_answer(server: &Server, conversation_id: i64) -> Value {
    let path = format!("/api/conversations/{conversation_id}/messages");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let history = get_json(server, &path).await;
        if let Some(answer) =
            history["messages"].as_array().unwrap().iter().find(|m| m["role"] == "assistant")
        {
            return answer.clone();
        }
        assert!(Instant::now() < deadline, "no stored answer: {history}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn real_model_stop_endpoint_stops_the_engine() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(STOP_TEST_MAX_TOKENS);
    let mut reader = start_chat(&server, json!({"message": LONG_PROMPT})).await;
    let meta = reader.next_json(Duration::from_secs(60)).await.unwrap();
    let conversation_id = meta["conversation_id"].as_i64().unwrap();
    let mut text = String::new();
    let mut n_tokens = 0;
    // Stop right after the first tokens, long before SmolLM2 could end by itself.
    while n_tokens < 2 {
        let event = reader.next_answer_json(Duration::from_secs(60)).await.unwrap();
        assert_eq!(event["type"], "token", "the answer ended before it could be stopped: {event}");
        text.push_str(event["text"].as_str().unwrap());
        n_tokens += 1;
    }
    let response = post_stop(&server, conversation_id).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"stopped": true}));
    let stopped_at = Instant::now();
    let done = loop {
        let event = reader.next_json(Duration::from_secs(10)).await.expect("a done event");
        match event["type"].as_str().unwrap() {
            "token" => text.push_str(event["text"].as_str().unwrap()),
            _ => break event,
        }
    };
    assert!(stopped_at.elapsed() < Duration::from_secs(10), "the stream ended promptly");
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish"], "cancelled");
    // Stopped in its first model call: its tokens and time to first token are known.
    let ttft_ms = done["timings"]["ttft_ms"].as_u64().unwrap();
    assert!(ttft_ms > 0 && done["timings"]["total_ms"].as_u64().unwrap() >= ttft_ms, "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() >= 2, "{done}");
    // The engine said the prompt's size when it took the request.
    let prompt_tokens = done["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 10, "{done}");
    assert!(reader.next_data(Duration::from_secs(5)).await.is_none(), "the stream ends");

    let answer = stored_answer(&server, conversation_id).await;
    assert_eq!(answer["status"], "partial", "{answer}");
    assert_eq!(answer["content"].as_str().unwrap(), text);
    assert_eq!(answer["prompt_tokens"], prompt_tokens, "{answer}");
    assert!(answer.get("error").is_none(), "stopped, not failed: {answer}");
    assert!(!text.is_empty());
    assert_engine_is_free(&server).await;
}

/// An answer runs from when the model takes its prompt, before reading it: the page gets
/// `meta` at once, so a long prompt's reading can be stopped (and followed, and outlives
/// the page), and the stopped answer knows its prompt's size. Before, `meta` came with the
/// first token, and a stop sent before it found nothing to stop. Stopped before its first
/// word, it stores nothing (before, an empty `partial` answer).
#[tokio::test]
async fn real_model_answer_can_be_stopped_while_its_prompt_is_read() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(64);
    // About 6,200 tokens: a minute and more of prefill on these machines (2 cores), where
    // the stop takes milliseconds to arrive.
    let long = format!("{}\nWhat was the first word?", "lorem ipsum dolor sit amet ".repeat(550));
    let mut reader = start_chat(&server, json!({"message": long})).await;
    let meta = reader.next_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(meta["type"], "meta", "{meta}");
    let conversation_id = meta["conversation_id"].as_i64().unwrap();
    let response = post_stop(&server, conversation_id).await;
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"stopped": true}));
    let done = loop {
        let event = reader.next_json(Duration::from_secs(60)).await.expect("a done event");
        if event["type"] != "notice" {
            break event;
        }
    };
    assert_eq!((&done["type"], &done["finish"]), (&json!("done"), &json!("cancelled")), "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 0, "stopped before its first token: {done}");
    assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 3000, "{done}");
    // Nothing was written, so nothing is stored: the question stays, unanswered, with no
    // empty answer after it.
    assert_eq!(done["message_id"], Value::Null, "{done}");
    let history =
        get_json(&server, &format!("/api/conversations/{conversation_id}/messages")).await;
    let roles: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user"], "{history}");
    assert_engine_is_free(&server).await;
}

/// A stop sequence on `/v1` cancels the real engine: the answer ends before the sequence
/// with `finish_reason: "stop"`, and the engine is free at once although the request allowed
/// 6000 tokens of counting.
#[tokio::test]
async fn real_model_stop_sequence_on_v1_stops_the_engine() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(STOP_TEST_MAX_TOKENS);
    let body = json!({
        "model": "main", "temperature": 0, "stop": ["5"],
        "messages": [{"role": "user", "content": LONG_PROMPT}]
    });
    let completion = completion(&server, &body).await;
    let choice = &completion["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(choice["finish_reason"], "stop", "{completion}");
    assert!(!content.contains('5'), "{completion}");
    let completion_tokens = completion["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..STOP_TEST_MAX_TOKENS as u64).contains(&completion_tokens), "{completion}");
    // Cancelled before its end, it still knows its prompt's size.
    assert!(completion["usage"]["prompt_tokens"].as_u64().unwrap() > 10, "{completion}");
    assert_engine_is_free(&server).await;
}

/// An OpenAI client that disconnects mid-stream stops its answer: the engine is free at once.
#[tokio::test]
async fn real_model_v1_client_disconnect_stops_the_engine() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(STOP_TEST_MAX_TOKENS);
    let body = json!({
        "model": "main", "stream": true, "max_tokens": STOP_TEST_MAX_TOKENS,
        "messages": [{"role": "user", "content": LONG_PROMPT}]
    });
    let response = http()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&server.token)
        .json(&body)
        .send()
        .await
        .expect("POST /v1/chat/completions");
    assert_eq!(response.status(), 200);
    let mut reader = SseReader::new(response);
    let mut pieces = 0;
    while pieces < 3 {
        let chunk = reader.next_json(Duration::from_secs(60)).await.expect("a chunk");
        if chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
            pieces += 1;
        }
        assert!(chunk["choices"][0]["finish_reason"].is_null(), "ended early: {chunk}");
    }
    drop(reader);
    assert_engine_is_free(&server).await;
}

/// A WebChat answer is written to its end when its page goes away (a reload, a closed tab):
/// only Stop stops it. (A `/v1` client that disconnects stops its answer: see
/// `real_model_v1_client_disconnect_stops_the_engine`.)
#[tokio::test]
async fn real_model_webchat_answer_outlives_its_client() {
    const REPLY_TOKENS: u32 = 48;
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(REPLY_TOKENS);
    let mut reader = start_chat(&server, json!({"message": LONG_PROMPT})).await;
    let meta = reader.next_json(Duration::from_secs(60)).await.unwrap();
    let conversation_id = meta["conversation_id"].as_i64().unwrap();
    for _ in 0..2 {
        let event = reader.next_answer_json(Duration::from_secs(60)).await.unwrap();
        assert_eq!(event["type"], "token", "the answer ended before the client left: {event}");
    }
    // The client leaves: the connection closes.
    drop(reader);
    let answer = stored_answer(&server, conversation_id).await;
    // Not stopped (that is `partial`): written to its end, the reply budget or the model's
    // own end of turn (sampling decides which), after the two tokens the client read.
    assert_eq!(answer["status"], "complete", "{answer}");
    let tokens = answer["completion_tokens"].as_u64().unwrap();
    assert!((3..=REPLY_TOKENS as u64).contains(&tokens), "{answer}");
}

#[tokio::test]
async fn real_model_server_shuts_down_promptly_with_open_streams() {
    let _one_at_a_time = REAL_MODEL.lock().await;
    // `fast` is a model server on loopback that writes slowly (for the answer whose page
    // leaves: its length must not depend on sampling); `main` is the real model.
    let slow = util::slow_model().await;
    let mut envs = util::smollm2_env();
    envs.push(("REPLY_MAX_TOKENS".into(), STOP_TEST_MAX_TOKENS.to_string()));
    envs.push(("CONTEXT_SIZE".into(), "8192".into()));
    envs.push(("MODEL_FAST".into(), slow));
    let mut server = Server::start(ServerOptions { envs, data_dir: None });
    // An open live-events stream and an answer in the middle of a long reply: neither may
    // hold the graceful shutdown.
    let events = http()
        .get(server.url("/api/events"))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("GET /api/events");
    let mut events = SseReader::new(events);
    let ready = events.next_json(Duration::from_secs(20)).await.unwrap();
    assert_eq!(ready["type"], "ready");
    // An answer whose page left: it is stopped and stored before the process exits.
    let mut left = start_chat(&server, json!({"message": LONG_PROMPT, "tier": "fast"})).await;
    let meta = left.next_json(Duration::from_secs(60)).await.unwrap();
    let left_conversation = meta["conversation_id"].as_i64().unwrap();
    let token = left.next_answer_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(token["type"], "token", "{token}");
    drop(left);
    let mut chat = start_chat(&server, json!({"message": LONG_PROMPT})).await;
    assert_eq!(chat.next_json(Duration::from_secs(60)).await.unwrap()["type"], "meta");
    let token = chat.next_answer_json(Duration::from_secs(60)).await.unwrap();
    assert_eq!(token["type"], "token", "{token}");

    let code = server.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "clean exit within 15 s:\n{}", server.output());
    let done = loop {
        let event = chat.next_json(Duration::from_secs(5)).await.expect("a final event");
        if event["type"] != "token" {
            break event;
        }
    };
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish"], "cancelled", "the answer was stopped and stored: {done}");
    let url = format!("sqlite://{}", server.data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("open the database");
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT role, status FROM messages WHERE conversation_id = ?1 ORDER BY id")
            .bind(left_conversation)
            .fetch_all(&pool)
            .await
            .expect("read the messages");
    let expected = [("user", "complete"), ("assistant", "partial")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(r, s)| (r.to_string(), s.to_string())).collect();
    assert_eq!(stored, expected, "the answer whose page left was stored at shutdown");
    // With the reason: the shutdown cut it, not the user (the page says so after a reload).
    let failures: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT failure FROM messages WHERE role = 'assistant' AND status = 'partial'",
    )
    .fetch_all(&pool)
    .await
    .expect("read the failures");
    assert_eq!(failures.len(), 2, "both answers were cut: {failures:?}");
    for failure in failures {
        assert_eq!(failure.as_deref(), Some(my_claw::assistant::SHUTDOWN_REASON));
    }
}

/// The virtual environment with the official `openai` package (the version pinned in
/// tests/openai_client/requirements.txt), made by `scripts/install-deps.sh test` or else
/// here, once, under the target directory (`target/tmp/openai-venv`).
pub(crate) fn openai_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin/python");
    let requirements = util::repo_path("tests/openai_client/requirements.txt");
    let pinned = std::fs::read_to_string(&requirements)
        .expect("tests/openai_client/requirements.txt")
        .lines()
        .find_map(|l| l.strip_prefix("openai==").map(str::to_string))
        .expect("requirements.txt pins openai==VERSION");
    let check = format!("import openai, sys; sys.exit(openai.__version__ != {pinned:?})");
    let ready = |python: &PathBuf| {
        Command::new(python).args(["-c", &check]).status().is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return python;
    }
    let status = Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "cannot create {}: install python3-venv (apt-get install -y python3-venv)",
        venv.display()
    );
    let output = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements)
        .output()
        .expect("run pip");
    assert!(
        output.status.success() && ready(&python),
        "pip install openai failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    python
}

#[tokio::test]
async fn openai_python_client_streams_a_completion_from_v1() {
    let python = tokio::task::spawn_blocking(openai_python).await.unwrap();
    let _one_at_a_time = REAL_MODEL.lock().await;
    let server = real_server(64);
    let script = util::repo_path("tests/openai_client.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(server.url("/v1"))
        .arg(&server.token)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
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
    let result: Value = serde_json::from_str(stdout.trim()).expect("the script prints JSON");
    assert_eq!(result["models"], json!(["fast", "smart", "main", "code", "reason"]));
    assert!(result["content_chunks"].as_u64().unwrap() >= 2, "{result}");
    assert!(!result["text"].as_str().unwrap().trim().is_empty(), "{result}");
    assert!(result["finish"] == "stop" || result["finish"] == "length", "{result}");
    assert!(result["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{result}");
    assert!(!result["non_stream_text"].as_str().unwrap().is_empty(), "{result}");
    assert_eq!(result["unknown_model_status"], 404, "{result}");
    assert_eq!(result["bad_key_status"], 401, "{result}");
}
