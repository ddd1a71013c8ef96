//! The WebChat's own API: search (accents, other channels, newest first, hostile queries),
//! message actions (regenerate, edit and resend), exports (one conversation as Markdown and
//! JSON, everything as streamed JSON) through the whole router on a real SQLite file, and
//! `my-claw backup` run beside a live server with the real model streaming an answer.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

use my_claw::db::memory::{self, MessageStatus, NewMessage};
use my_claw::domain::{ChannelKind, ConversationId, Role};
use my_claw::gateway::{self, AppState};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};

use crate::gateway::SseReader;
use crate::util::{self, Server, ServerOptions};

const TOKEN: &str = "webchat-api-test-token-0123456789";

/// Answers `echo <n>: <last user message>` (n counts the calls), so a test can see which
/// prompt was answered, and by which call.
struct EchoProvider {
    calls: AtomicUsize,
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
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Chunk::Text(format!("echo {call}: {last}")))).await;
                let usage = Usage { prompt_tokens: 10, completion_tokens: 3, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }
}

struct App {
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn app() -> App {
    let provider = Arc::new(EchoProvider { calls: AtomicUsize::new(0) });
    let (state, dir) =
        crate::util::in_process_state(provider, TOKEN, 1 << 20, Default::default()).await;
    App { state, _dir: dir }
}

/// One request through the whole router (auth, limits, handlers), without a socket.
async fn call(
    app: &App,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
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
    let headers = response.headers().clone();
    let bytes = tokio::time::timeout(
        Duration::from_secs(20),
        axum::body::to_bytes(response.into_body(), 64 << 20),
    )
    .await
    .expect("body within 20 s")
    .expect("body");
    (status, headers, bytes.to_vec())
}

async fn get_json(app: &App, path: &str) -> (StatusCode, Value) {
    let (status, _, bytes) = call(app, Method::GET, path, None).await;
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// The JSON events of a complete SSE body.
fn sse_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|block| {
            let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data:")).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .map(|data| serde_json::from_str(data.trim()).expect("event JSON"))
        .collect()
}

async fn store(app: &App, conversation: ConversationId, role: Role, text: &str) -> i64 {
    memory::add_message(&app.state.pool, &NewMessage::plain(conversation, role, text))
        .await
        .expect("store message")
        .0
}

fn snippet_marks(result: &Value) -> Vec<String> {
    result["snippet"]
        .as_array()
        .expect("snippet parts")
        .iter()
        .filter(|p| p["mark"] == true)
        .map(|p| p["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn search_folds_accents_covers_every_channel_and_ranks_newest_first() {
    let app = app().await;
    let pool = &app.state.pool;
    let older = memory::create_webchat_conversation(pool, Some("Paris")).await.unwrap().id;
    let older_id = store(&app, older, Role::User, "Un café au lait à Paris, l'été dernier.").await;
    let whatsapp =
        memory::get_or_create_conversation(pool, ChannelKind::WhatsApp, "33612345678", Some("WA"))
            .await
            .unwrap()
            .id;
    let wa_id = store(&app, whatsapp, Role::User, "Remind me to buy tomatoes tomorrow").await;
    let newer = memory::create_webchat_conversation(pool, Some("Morning")).await.unwrap().id;
    let newer_id = store(&app, newer, Role::Assistant, "A **cafe** crème, then work.").await;

    // No accent typed, accents stored (and the other way round), newest first.
    let (status, found) = get_json(&app, "/api/search?q=cafe").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let results = found["results"].as_array().unwrap();
    let ids: Vec<i64> = results.iter().map(|r| r["message_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [newer_id, older_id], "{found}");
    assert_eq!(results[0]["conversation_title"], "Morning");
    assert_eq!(results[1]["conversation_id"], older.0);
    assert_eq!(snippet_marks(&results[1]), ["café"], "{found}");
    let (_, ete) = get_json(&app, "/api/search?q=ETE").await;
    assert_eq!(ete["results"][0]["message_id"], older_id, "French elision and case: {ete}");
    let (_, creme) = get_json(&app, "/api/search?q=cr%C3%A8me%20caf%C3%A9").await;
    assert_eq!(creme["results"].as_array().unwrap().len(), 1, "{creme}");

    // A WhatsApp conversation is searched like the others, and a word can be half typed.
    let (_, tomato) = get_json(&app, "/api/search?q=tomat").await;
    let hit = &tomato["results"][0];
    assert_eq!(hit["message_id"], wa_id, "{tomato}");
    assert_eq!(hit["channel"], "whatsapp", "{tomato}");
    assert_eq!(snippet_marks(hit), ["tomatoes"], "{tomato}");

    // FTS syntax is searched as text; a query with no word is a clear 400.
    for hostile in ["%22cafe", "NEAR(", "cafe%20OR", "content:cafe", "cafe%20AND%20(x"] {
        let (status, body) = get_json(&app, &format!("/api/search?q={hostile}")).await;
        assert_eq!(status, StatusCode::OK, "{hostile}: {body}");
    }
    // Each refusal names the field at fault (QA pass 13).
    let (status, body) = get_json(&app, "/api/search?q=%2A%2A%2A").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(body["error"]["param"], "q", "{body}");
    let (status, body) = get_json(&app, &format!("/api/search?q={}", "a".repeat(201))).await;
    assert_eq!((status, &body["error"]["param"]), (StatusCode::BAD_REQUEST, &json!("q")));
    for limit in ["abc", "0"] {
        let (status, body) = get_json(&app, &format!("/api/search?q=cafe&limit={limit}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], "limit", "{body}");
    }

    // Deleting a conversation takes its messages out of the index.
    let (status, _, _) =
        call(&app, Method::DELETE, &format!("/api/conversations/{}", newer.0), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, after) = get_json(&app, "/api/search?q=cafe").await;
    let ids: Vec<i64> = after["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [older_id], "{after}");
}

/// Thai writes tone marks after their letter: `ที่` ("at") is not `ที`, which `ทีม` ("team")
/// holds, and a mark stays with its letter in the snippet (a mark alone after `</mark>`
/// shows as a dotted circle).
#[tokio::test]
async fn search_keeps_the_tone_marks_of_thai_words() {
    let app = app().await;
    let pool = &app.state.pool;
    let thai = memory::create_webchat_conversation(pool, Some("ไทย")).await.unwrap().id;
    store(&app, thai, Role::User, "ทีมฟุตบอล").await;
    let at_home = store(&app, thai, Role::Assistant, "ไปที่บ้าน").await;
    let (status, found) = get_json(&app, "/api/search?q=%E0%B8%97%E0%B8%B5%E0%B9%88").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let results = found["results"].as_array().unwrap();
    let ids: Vec<i64> = results.iter().map(|r| r["message_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [at_home], "{found}");
    assert_eq!(snippet_marks(&results[0]), ["ที่"], "{found}");
    // Typed without its tone mark, the word is found inside, marked with the mark.
    let (_, bare) = get_json(&app, "/api/search?q=%E0%B8%97%E0%B8%B5").await;
    let marks: Vec<Vec<String>> =
        bare["results"].as_array().unwrap().iter().map(snippet_marks).collect();
    assert_eq!(marks, [vec!["ที่".to_string()], vec!["ที".to_string()]], "{bare}");
}

#[tokio::test]
async fn regenerate_replaces_the_last_answer_and_edit_resends_the_last_message() {
    let app = app().await;
    let (status, _, body) =
        call(&app, Method::POST, "/api/chat", Some(json!({"message": "hello there"}))).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&body);
    let conversation = events[0]["conversation_id"].as_i64().expect("meta first");
    assert!(events.last().unwrap()["message_id"].is_i64(), "done last: {events:?}");
    let messages_path = format!("/api/conversations/{conversation}/messages");

    // Regenerate: the old answer is replaced by a new one to the same message.
    let (status, _, body) = call(
        &app,
        Method::POST,
        &format!("/api/conversations/{conversation}/regenerate"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&body);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"meta"), "{events:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{events:?}");
    let (_, history) = get_json(&app, &messages_path).await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    assert_eq!(messages[1]["content"], "echo 2: hello there", "a new answer replaced the old one");

    // Edit: the last user message changes, what followed goes, the new text is answered.
    let (status, _, body) = call(
        &app,
        Method::POST,
        &format!("/api/conversations/{conversation}/edit"),
        Some(json!({"message": "bonjour, ça va ?", "tier": "main"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sse_events(&body).last().unwrap()["type"], "done");
    let (_, history) = get_json(&app, &messages_path).await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["bonjour, ça va ?", "echo 3: bonjour, ça va ?"]);

    // Bad requests get our error shape and change nothing.
    let edit_path = format!("/api/conversations/{conversation}/edit");
    for (path, body, expected) in [
        (edit_path.as_str(), json!({"message": "  "}), StatusCode::BAD_REQUEST),
        (edit_path.as_str(), json!({"message": "x", "tier": "huge"}), StatusCode::BAD_REQUEST),
        ("/api/conversations/999999/regenerate", json!({}), StatusCode::NOT_FOUND),
        ("/api/conversations/abc/regenerate", json!({}), StatusCode::BAD_REQUEST),
    ] {
        let (status, _, bytes) = call(&app, Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, expected, "{path} {body}: {}", String::from_utf8_lossy(&bytes));
        let error: Value = serde_json::from_slice(&bytes).expect("JSON error");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    let (_, unchanged) = get_json(&app, &messages_path).await;
    assert_eq!(unchanged["messages"], history["messages"]);

    // A WhatsApp conversation is answered on WhatsApp: not regenerated from the page.
    let whatsapp = memory::get_or_create_conversation(
        &app.state.pool,
        ChannelKind::WhatsApp,
        "33600000000",
        None,
    )
    .await
    .unwrap()
    .id;
    store(&app, whatsapp, Role::User, "hi").await;
    let path = format!("/api/conversations/{}/regenerate", whatsapp.0);
    let (status, _, _) = call(&app, Method::POST, &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The page names the message it acts on: an edit or a regenerate aimed at an exchange that
/// is no longer the last (the page showed a message the server never stored, or another tab
/// went on) is refused with 409 and changes nothing; the ids come from the chat stream.
#[tokio::test]
async fn edit_and_regenerate_of_a_message_that_is_no_longer_last_are_refused() {
    let app = app().await;
    let (status, _, body) =
        call(&app, Method::POST, "/api/chat", Some(json!({"message": "first question"}))).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&body);
    let conversation = events[0]["conversation_id"].as_i64().expect("meta first");
    let first_question = events[0]["user_message_id"].as_i64().expect("meta names the message");
    let first_answer = events.last().unwrap()["message_id"].as_i64().expect("done last");
    let messages_path = format!("/api/conversations/{conversation}/messages");
    let (_, history) = get_json(&app, &messages_path).await;
    assert_eq!(history["messages"][0]["id"], first_question, "{history}");

    // Another client goes on: the page that saw only the first exchange is now behind.
    let body = json!({"conversation_id": conversation, "message": "second question"});
    let (status, _, bytes) = call(&app, Method::POST, "/api/chat", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let second = sse_events(&bytes);
    let second_question = second[0]["user_message_id"].as_i64().expect("meta names it");
    let second_answer = second.last().unwrap()["message_id"].as_i64().expect("done last");
    assert!(second_question > first_answer, "{second:?}");
    let (_, before) = get_json(&app, &messages_path).await;

    let edit_path = format!("/api/conversations/{conversation}/edit");
    let regenerate_path = format!("/api/conversations/{conversation}/regenerate");
    for (path, body) in [
        (&edit_path, json!({"message": "first, edited", "message_id": first_question})),
        (&regenerate_path, json!({"message_id": first_answer})),
        // The question is stored but its answer follows it: it is not the last message.
        (&regenerate_path, json!({"message_id": second_question})),
    ] {
        let (status, _, bytes) = call(&app, Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path} {body}");
        let error: Value = serde_json::from_slice(&bytes).expect("JSON error");
        assert_eq!(error["error"]["code"], "conflict", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("is not") && !message.contains('\n'), "{message}");
    }
    let (_, after) = get_json(&app, &messages_path).await;
    assert_eq!(after["messages"], before["messages"], "a refused action changes nothing");

    // The messages the page shows last are accepted, and the stream names them again.
    let body = json!({"message_id": second_answer});
    let (status, _, bytes) = call(&app, Method::POST, &regenerate_path, Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&bytes);
    assert_eq!(events[0]["user_message_id"], second_question, "{events:?}");
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");
    let body = json!({"message": "second, edited", "message_id": second_question});
    let (status, _, bytes) = call(&app, Method::POST, &edit_path, Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    // The edited message has a new id, which the stream names.
    let new_id = sse_events(&bytes)[0]["user_message_id"].as_i64().unwrap();
    assert!(new_id > second_question, "{new_id}");
    let (_, edited) = get_json(&app, &messages_path).await;
    assert_eq!(edited["messages"][2]["id"], new_id);
    // Another tab still showing the old message cannot edit it again unawares (it used to
    // pass, the id being the same, and replace the first tab's edit and its answer).
    let (status, _, _) = call(&app, Method::POST, &edit_path, Some(body)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let texts: Vec<&str> = edited["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts[..3], ["first question", "echo 1: first question", "second, edited"]);
    assert_eq!(texts.len(), 4, "{texts:?}");
}

/// An export says "stopped" only of an answer the user stopped: one a failure or a
/// shutdown cut short says why, in both formats, and a local answer written after a
/// remote got the prompt names that host (QA pass 14).
#[tokio::test]
async fn exports_say_why_an_answer_ended_early_and_where_its_prompt_went() {
    let app = app().await;
    let pool = &app.state.pool;
    let conversation = memory::create_webchat_conversation(pool, None).await.unwrap().id;
    let answer = |text: &str| NewMessage {
        status: MessageStatus::Partial,
        tier: Some("code".into()),
        provider: Some("local".into()),
        model: Some("main.gguf".into()),
        ..NewMessage::plain(conversation, Role::Assistant, text)
    };
    memory::add_answer(pool, &answer("stopped by me"), &[], None).await.unwrap();
    let stall = "timed out: Z.ai stream stalled for 5s";
    memory::add_answer(pool, &answer("cut by a stall"), &[], Some(stall)).await.unwrap();
    let fell_back = NewMessage {
        status: MessageStatus::Complete,
        host: Some("127.0.0.1:8000".into()),
        ..answer("written by main")
    };
    memory::add_answer(pool, &fell_back, &[], None).await.unwrap();

    let path = format!("/api/conversations/{}/export?format=md", conversation.0);
    let (status, _, body) = call(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let markdown = String::from_utf8(body).unwrap();
    assert_eq!(markdown.matches("stopped before the end").count(), 1, "{markdown}");
    assert!(markdown.contains(&format!("· cut short: {stall}\n\ncut by a stall")), "{markdown}");
    let sent = "on this machine after the prompt was sent to 127.0.0.1:8000";
    assert!(markdown.contains(sent), "{markdown}");

    let path = format!("/api/conversations/{}/export?format=json", conversation.0);
    let (_, _, body) = call(&app, Method::GET, &path, None).await;
    let document: Value = serde_json::from_slice(&body).expect("export JSON");
    let errors: Vec<&Value> = document["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.get("error").unwrap_or(&Value::Null))
        .collect();
    assert_eq!(errors, [&Value::Null, &json!(stall), &Value::Null]);
}

#[tokio::test]
async fn exports_download_a_500_message_conversation_as_markdown_and_json() {
    let app = app().await;
    let pool = &app.state.pool;
    let conversation =
        memory::create_webchat_conversation(pool, Some("Trip to Lyon: the plan")).await.unwrap().id;
    for n in 0..500 {
        let role = if n % 2 == 0 { Role::User } else { Role::Assistant };
        store(&app, conversation, role, &format!("message number {n} | with a table cell")).await;
    }
    let other = memory::create_webchat_conversation(pool, None).await.unwrap().id;
    store(&app, other, Role::User, "the other conversation").await;

    let path = format!("/api/conversations/{}/export?format=json", conversation.0);
    let (status, headers, body) = call(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let disposition = headers[header::CONTENT_DISPOSITION].to_str().unwrap();
    let expected_name = format!("my-claw-{}-trip-to-lyon-the-plan", conversation.0);
    assert_eq!(disposition, format!("attachment; filename=\"{expected_name}.json\""));
    let document: Value = serde_json::from_slice(&body).expect("export JSON");
    assert_eq!(document["conversation"]["title"], "Trip to Lyon: the plan");
    let messages = document["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 500);
    for (n, m) in messages.iter().enumerate() {
        assert_eq!(m["content"], format!("message number {n} | with a table cell"));
    }

    let path = format!("/api/conversations/{}/export?format=md", conversation.0);
    let (status, headers, body) = call(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/markdown"));
    assert_eq!(
        headers[header::CONTENT_DISPOSITION].to_str().unwrap(),
        format!("attachment; filename=\"{expected_name}.md\"")
    );
    let markdown = String::from_utf8(body).unwrap();
    assert!(markdown.starts_with("# Trip to Lyon: the plan\n"), "{}", &markdown[..200]);
    assert_eq!(markdown.matches("\n**You** · ").count(), 250);
    assert_eq!(markdown.matches("\n**Assistant** · ").count(), 250);
    for n in [0, 1, 250, 499] {
        assert!(markdown.contains(&format!("\nmessage number {n} | with")), "message {n}");
    }

    let (status, body) =
        get_json(&app, &format!("/api/conversations/{}/export?format=pdf", conversation.0)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "format", "{body}");
    let (status, _) = get_json(&app, "/api/conversations/424242/export?format=md").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Everything, streamed: both conversations with all their messages.
    let (status, headers, body) = call(&app, Method::GET, "/api/export", None).await;
    assert_eq!(status, StatusCode::OK);
    let disposition = headers[header::CONTENT_DISPOSITION].to_str().unwrap();
    assert!(disposition.starts_with("attachment; filename=\"my-claw-export-"), "{disposition}");
    let all: Value = serde_json::from_slice(&body).expect("a complete JSON document");
    assert_eq!(all["format"], "my-claw.export");
    let conversations = all["conversations"].as_array().unwrap();
    let counts: Vec<(i64, usize)> = conversations
        .iter()
        .map(|c| (c["id"].as_i64().unwrap(), c["messages"].as_array().unwrap().len()))
        .collect();
    assert_eq!(counts, [(conversation.0, 500), (other.0, 1)]);
    assert_eq!(conversations[1]["messages"][0]["content"], "the other conversation");
}

#[tokio::test]
async fn exports_say_where_each_answer_was_written_as_the_ledger_recorded_it() {
    let app = app().await;
    let pool = &app.state.pool;
    let conversation = memory::create_webchat_conversation(pool, Some("Ledger")).await.unwrap().id;
    store(&app, conversation, Role::User, "where were you?").await;
    // A model server on this machine's loopback, then Z.ai.
    let answers = [
        ("fast", "openai", "qwen3-32b", "127.0.0.1:8000", false),
        ("reason", "zai", "glm-4.7", "api.z.ai", true),
    ];
    for (tier, provider, model, host, left) in answers {
        let message = NewMessage {
            tier: Some(tier.into()),
            provider: Some(provider.into()),
            model: Some(model.into()),
            host: Some(host.into()),
            left_machine: left,
            ..NewMessage::plain(conversation, Role::Assistant, format!("from {host}"))
        };
        memory::add_message(pool, &message).await.expect("store answer");
    }

    let path = format!("/api/conversations/{}/export?format=md", conversation.0);
    let (status, _, body) = call(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let markdown = String::from_utf8(body).unwrap();
    assert!(
        markdown.contains("**Assistant (fast · qwen3-32b, on this machine (127.0.0.1:8000))**"),
        "{markdown}"
    );
    assert!(
        markdown.contains("**Assistant (reason · glm-4.7, outside this machine (api.z.ai))**"),
        "{markdown}"
    );

    let path = format!("/api/conversations/{}/export?format=json", conversation.0);
    let (status, _, body) = call(&app, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    let document: Value = serde_json::from_slice(&body).expect("export JSON");
    let ledger: Vec<(Value, Value)> = document["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["host"].clone(), m["left_machine"].clone()))
        .collect();
    assert_eq!(
        ledger,
        [
            (Value::Null, json!(false)),
            (json!("127.0.0.1:8000"), json!(false)),
            (json!("api.z.ai"), json!(true))
        ]
    );
}

/// The backup runs as its own process beside a live server whose engine is writing an
/// answer, like `my-claw backup` from a shell or a timer on a running installation.
#[tokio::test]
async fn backup_while_an_answer_streams_is_consistent_private_and_restores() {
    let mut envs = util::smollm2_env();
    envs.push(("REPLY_MAX_TOKENS".into(), "200".into()));
    envs.push(("CONTEXT_SIZE".into(), "4096".into()));
    let server_envs = envs.clone();
    let server = tokio::task::spawn_blocking(move || {
        Server::start(ServerOptions { envs: server_envs, data_dir: None })
    })
    .await
    .expect("server start");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();

    // Some history, then an answer that is still streaming when the backup starts.
    let mut conversation = None;
    for text in ["Bonjour ! Un café ?", "Say one word."] {
        let mut body = json!({ "message": text, "tier": "main" });
        if let Some(id) = conversation {
            body["conversation_id"] = json!(id);
        }
        let response = http
            .post(server.url("/api/chat"))
            .bearer_auth(&server.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        let meta = reader.next_json(Duration::from_secs(60)).await.expect("meta");
        conversation = meta["conversation_id"].as_i64();
        while reader.next_json(Duration::from_secs(120)).await.is_some() {}
    }
    let conversation = conversation.expect("a conversation id");
    let response = http
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"message": "Write a long story about a lighthouse keeper.",
                      "conversation_id": conversation}))
        .send()
        .await
        .unwrap();
    let mut streaming = SseReader::new(response);
    loop {
        let event = streaming.next_json(Duration::from_secs(60)).await.expect("an event");
        if event["type"] == "token" {
            break;
        }
    }
    let path = format!("/api/conversations/{conversation}/messages");
    let committed: Value = http
        .get(server.url(&path))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let committed: Vec<(i64, String)> = committed["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_i64().unwrap(), m["content"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(committed.len(), 5, "two turns and the streaming turn's message: {committed:?}");

    let out_dir = tempfile::tempdir().unwrap();
    let backup = out_dir.path().join("my-claw-backup.db");
    let data_dir = server.data_dir.display().to_string();
    let backup_arg = backup.display().to_string();
    let run = tokio::task::spawn_blocking({
        let cwd = out_dir.path().to_path_buf();
        move || util::run_binary(&["backup", &backup_arg], &[("DATA_DIR", data_dir.as_str())], &cwd)
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("integrity ok"), "{stdout}");
    // The answer was still streaming while the copy was taken.
    let still = streaming.next_json(Duration::from_secs(60)).await.expect("the stream goes on");
    assert!(still["type"] == "token" || still["type"] == "done", "{still}");
    while streaming.next_json(Duration::from_secs(120)).await.is_some() {}

    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup is private");
    let backup_arg = backup.display().to_string();
    let data_dir = server.data_dir.display().to_string();
    let again = util::run_binary(
        &["backup", backup_arg.as_str()],
        &[("DATA_DIR", data_dir.as_str())],
        out_dir.path(),
    );
    assert!(!again.status.success(), "a backup never overwrites a file");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Restore as the README says: stop, put the copy in place as my-claw.db, start.
    let restored_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&backup, restored_dir.path().join("my-claw.db")).unwrap();
    let restored_path = restored_dir.path().to_path_buf();
    let restored = tokio::task::spawn_blocking(move || {
        Server::start(ServerOptions { envs, data_dir: Some(restored_path) })
    })
    .await
    .expect("restored server start");
    let health: Value = http
        .get(restored.url("/api/health"))
        .bearer_auth(&restored.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["database"]["ok"], true, "{health}");
    assert!(health["database"]["migration_version"].as_i64() >= Some(3), "{health}");
    let messages: Value = http
        .get(restored.url(&path))
        .bearer_auth(&restored.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let restored_ids: HashSet<(i64, String)> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_i64().unwrap(), m["content"].as_str().unwrap().to_string()))
        .collect();
    for message in &committed {
        assert!(restored_ids.contains(message), "{message:?} is in the restored copy");
    }
    // The search index came along.
    let found: Value = http
        .get(restored.url("/api/search?q=cafe"))
        .bearer_auth(&restored.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["results"][0]["conversation_id"], conversation, "{found}");
}

/// "Export all" from one my-claw imports into another with every message and its ledger;
/// a second import of the same file, or an import back where it came from, adds nothing.
/// Other applications' exports (ChatGPT's here) become conversations that search finds;
/// anything else gets a 400 saying what is expected, and a file over the limit a 413.
#[tokio::test]
async fn an_export_imports_into_another_my_claw_once() {
    let source = app().await;
    let pool = &source.state.pool;
    let trip = memory::create_webchat_conversation(pool, Some("Trip to Lyon")).await.unwrap().id;
    for n in 0..40 {
        let role = if n % 2 == 0 { Role::User } else { Role::Assistant };
        store(&source, trip, role, &format!("trip message {n}")).await;
    }
    let whatsapp =
        memory::get_or_create_conversation(pool, ChannelKind::WhatsApp, "33612345678", None)
            .await
            .unwrap()
            .id;
    store(&source, whatsapp, Role::User, "from the phone").await;
    let (status, _, exported) = call(&source, Method::GET, "/api/export", None).await;
    assert_eq!(status, StatusCode::OK);
    let exported: Value = serde_json::from_slice(&exported).unwrap();

    let target = app().await;
    let (status, _, body) =
        call(&target, Method::POST, "/api/import", Some(exported.clone())).await;
    let summary: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["format"], "my-claw");
    assert_eq!((summary["imported"].as_u64(), summary["messages"].as_u64()), (Some(2), Some(41)));
    let (_, _, copied) = call(&target, Method::GET, "/api/export", None).await;
    let copied: Value = serde_json::from_slice(&copied).unwrap();
    let texts = |document: &Value| -> Vec<Vec<(String, String)>> {
        document["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| (m["role"].to_string(), m["content"].to_string()))
                    .collect()
            })
            .collect()
    };
    assert_eq!(texts(&copied), texts(&exported));
    let titles: Vec<&Value> =
        copied["conversations"].as_array().unwrap().iter().map(|c| &c["title"]).collect();
    assert_eq!(titles, [&json!("Trip to Lyon"), &Value::Null]);
    // Every imported conversation is a WebChat one, to go on with.
    let channels: HashSet<&str> = copied["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, HashSet::from(["webchat"]));

    for app in [&target, &source] {
        let (status, _, body) =
            call(app, Method::POST, "/api/import", Some(exported.clone())).await;
        let again: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(
            (again["imported"].as_u64(), again["already_there"].as_u64()),
            (Some(0), Some(2)),
            "{again}"
        );
    }

    let chatgpt = json!([{
        "id": "g1", "title": "Sourdough", "create_time": 1_700_000_000.0, "current_node": "a",
        "mapping": {
            "u": {"parent": null, "message": {"author": {"role": "user"},
                "content": {"content_type": "text", "parts": ["How long should sourdough proof?"]}}},
            "a": {"parent": "u", "message": {"author": {"role": "assistant"},
                "content": {"content_type": "text", "parts": ["Four to twelve hours."]}}}
        }
    }]);
    let (status, _, body) = call(&target, Method::POST, "/api/import", Some(chatgpt)).await;
    let summary: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["format"], "chatgpt");
    let id = summary["conversations"][0]["id"].as_i64().unwrap();
    let (_, found) = get_json(&target, "/api/search?q=sourdough").await;
    assert_eq!(found["results"][0]["conversation_id"], id, "{found}");

    let (status, _, body) =
        call(&target, Method::POST, "/api/import", Some(json!({"hello": "world"}))).await;
    let refused: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"]["param"], "file");
    assert!(refused["error"]["message"].as_str().unwrap().starts_with("unrecognized file"));

    // Over the import's own limit (far above MAX_BODY_BYTES, which it replaces), sent in
    // pieces: refused once the limit is passed.
    let piece = axum::body::Bytes::from(vec![b' '; 1 << 20]);
    let pieces = my_claw::gateway::import::IMPORT_MAX_BYTES / piece.len() + 1;
    let huge = futures::stream::iter(
        std::iter::repeat_n(piece, pieces).map(Ok::<_, std::convert::Infallible>),
    );
    let (status, body) = import_stream(&target, Body::from_stream(huge)).await;
    let refused: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("256 MiB"), "{refused}");

    // One import at a time: a second one while a file is still arriving is refused, and
    // the next goes through once the first has ended.
    let opening = futures::stream::once(async {
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(b"["))
    });
    let slow = futures::StreamExt::chain(opening, futures::stream::pending());
    let first = tokio::spawn({
        let router = gateway::router(target.state.clone());
        async move { import_stream_with(router, Body::from_stream(slow)).await }
    });
    // The first import takes its turn and waits for the rest of its file.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first.is_finished(), "the first import ended: {:?}", first.await);
    let (status, body) = import_stream(&target, Body::from(r#"[]"#)).await;
    let refused: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("another import"));
    first.abort();
    let _ = first.await;
    let (status, body) = import_stream(&target, Body::from(r#"[]"#)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    let anonymous = Request::builder()
        .method(Method::POST)
        .uri("/api/import")
        .body(Body::from(exported.to_string()))
        .unwrap();
    let response = gateway::router(target.state.clone()).oneshot(anonymous).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// `POST /api/import` with `body` as it is (a stream, a file never read whole here).
async fn import_stream(app: &App, body: Body) -> (StatusCode, Vec<u8>) {
    import_stream_with(gateway::router(app.state.clone()), body).await
}

async fn import_stream_with(router: axum::Router, body: Body) -> (StatusCode, Vec<u8>) {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/import")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(body)
        .expect("request");
    let response = router.oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, bytes.to_vec())
}

/// Another process holding the database's write lock past the busy timeout (a backup tool,
/// `sqlite3` left in a transaction) is a state that passes: a 503 that says so, with
/// `Retry-After`, not a 500 "internal error" (QA pass 10).
#[tokio::test]
async fn a_database_locked_by_another_process_answers_503() {
    use sqlx::Connection;
    let app = app().await;
    let conversation =
        memory::create_webchat_conversation(&app.state.pool, Some("before")).await.unwrap().id;
    let url = format!("sqlite://{}", app.state.data_dir.join("my-claw.db").display());
    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
    let path = format!("/api/conversations/{}", conversation.0);
    let (status, headers, body) =
        call(&app, Method::PATCH, &path, Some(json!({"title": "after"}))).await;
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("database is busy"), "{error}");
    assert!(headers.contains_key(header::RETRY_AFTER));
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let (status, _, _) = call(&app, Method::PATCH, &path, Some(json!({"title": "after"}))).await;
    assert_eq!(status, StatusCode::OK, "writes again once the lock is gone");
}
