//! Conversations that never end: one turn at a time per conversation (in order, never
//! cancelled by the next message), the stop endpoint, refused requests that leave nothing
//! behind (regenerate and edit included, which change the history only once the model
//! accepted the new prompt), trimming through the fallback, and the history window that moves in steps so the
//! model's KV state is reused and the next window is prepared ahead. The HTTP tests serve
//! the real gateway on 127.0.0.1 over the real SQLite file with a scripted model (fast and
//! deterministic); one runs the real binary with the real SmolLM2 model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use my_claw::assistant::{Assistant, AssistantConfig, Event, WindowPolicy};
use my_claw::config::Secret;
use my_claw::db::drafts;
use my_claw::domain::{ChannelKind, ChatTurn, ConversationId, Inbound, Role};
use my_claw::gateway::{self, AppState};
use my_claw::llm::router::{Router as ModelRouter, Tier};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};

use crate::gateway::SseReader;
use crate::util::{self, Server, ServerOptions};

const TOKEN: &str = "conversations-test-token-0123456789";
const EVENT_WAIT: Duration = Duration::from_secs(20);

// --- A scripted model -----------------------------------------------------------------------

/// What the scripted model saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Stream(Vec<ChatTurn>),
    Warm(Vec<ChatTurn>),
}

/// A model stand-in. It answers `answer to <last message>` one word per text chunk. When
/// `gated`, each answer waits for one permit of `gate` before its `Done`, so a test decides
/// when an answer ends. A prompt longer than `context_chars` characters (all turns summed)
/// is refused with `ContextOverflow`, like the engine; `refuse` refuses everything.
struct ScriptedModel {
    gated: bool,
    gate: Arc<Semaphore>,
    context_chars: Mutex<usize>,
    refuse: Mutex<Option<LlmError>>,
    /// An error that ends the answer after its text, instead of its end.
    fail: Mutex<Option<LlmError>>,
    /// Each answer waits for a permit of `gate` before its first word, after a `queued`
    /// notice, as a request waits behind the engine's other sequences (or a model load).
    hold_before_text: Mutex<bool>,
    calls: Mutex<Vec<Call>>,
}

impl ScriptedModel {
    fn new(gated: bool) -> Arc<ScriptedModel> {
        Arc::new(ScriptedModel {
            gated,
            gate: Arc::new(Semaphore::new(0)),
            context_chars: Mutex::new(usize::MAX),
            refuse: Mutex::new(None),
            fail: Mutex::new(None),
            hold_before_text: Mutex::new(false),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn prompts(&self) -> Vec<Vec<ChatTurn>> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Stream(m) => Some(m),
                Call::Warm(_) => None,
            })
            .collect()
    }

    /// Lets one waiting (or the next) answer end.
    fn release_one(&self) {
        self.gate.add_permits(1);
    }
}

fn answer_for(messages: &[ChatTurn]) -> String {
    let last = messages.last().map(|m| m.content.as_str()).unwrap_or_default();
    format!("answer to {last}")
}

/// A shared model as the `Provider` the router holds.
struct Shared(Arc<ScriptedModel>);

impl Provider for Shared {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "scripted.gguf".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let model = self.0.clone();
        Box::pin(async move {
            if let Some(err) = model.refuse.lock().unwrap().clone() {
                return Err(err);
            }
            let n_chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
            let n_ctx = *model.context_chars.lock().unwrap();
            if n_chars > n_ctx {
                return Err(LlmError::ContextOverflow { n_tokens: n_chars, answer_room: 0, n_ctx });
            }
            model.calls.lock().unwrap().push(Call::Stream(request.messages.clone()));
            let answer = answer_for(&request.messages);
            let (tx, rx) = mpsc::channel(64);
            let hold = *model.hold_before_text.lock().unwrap();
            tokio::spawn(async move {
                if hold {
                    let queued = Chunk::Notice {
                        kind: "queued".into(),
                        message: "waiting for the model: 1 answer ahead".into(),
                    };
                    if tx.send(Ok(queued)).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        permit = model.gate.acquire() => match permit {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        },
                        _ = tx.closed() => return,
                    }
                }
                let words: Vec<String> = answer
                    .split(' ')
                    .enumerate()
                    .map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") })
                    .collect();
                let n_words = words.len() as u32;
                for word in words {
                    if tx.send(Ok(Chunk::Text(word))).await.is_err() {
                        return;
                    }
                }
                let failure = model.fail.lock().unwrap().clone();
                if let Some(err) = failure {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                if model.gated {
                    // Ends when the test allows it, or when the reader goes away (a stop).
                    tokio::select! {
                        permit = model.gate.acquire() => match permit {
                            Ok(permit) => permit.forget(),
                            Err(_) => return,
                        },
                        _ = tx.closed() => return,
                    }
                }
                let usage = Usage {
                    prompt_tokens: n_chars as u32,
                    completion_tokens: n_words,
                    ..Usage::default()
                };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }

    fn warm(&self, request: LlmRequest) -> BoxFuture<'_, Result<(), LlmError>> {
        self.0.calls.lock().unwrap().push(Call::Warm(request.messages));
        Box::pin(async { Ok(()) })
    }
}

// --- The real gateway over a socket ----------------------------------------------------------

struct TestApp {
    base: String,
    pool: sqlx::SqlitePool,
    model: Arc<ScriptedModel>,
    assistant: Arc<Assistant>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn test_app(model: Arc<ScriptedModel>) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("conversations.db").display());
    let pool = my_claw::db::connect(&url).await.expect("open the database");
    let provider: Arc<dyn Provider> = Arc::new(Shared(model.clone()));
    let router = ModelRouter::with_providers(provider, HashMap::new(), Tier::Main);
    let assistant = Arc::new(Assistant::new(
        pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
    ));
    let state = AppState {
        pool: pool.clone(),
        assistant: assistant.clone(),
        webchat_token: Secret::new(TOKEN),
        started_at: Instant::now(),
        data_dir: Arc::new(dir.path().to_path_buf()),
        max_body_bytes: 64 << 10,
        reply_max_tokens: 64,
        channels: my_claw::channels::Channels::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, gateway::router(state)).await;
    });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    TestApp { base: format!("http://{addr}"), pool, model, assistant, http, _dir: dir }
}

impl TestApp {
    /// `POST /api/chat`; the status and, on 200, the event stream.
    async fn chat(&self, body: Value) -> (u16, Result<SseReader, Value>) {
        self.post_stream("/api/chat", body).await
    }

    /// A message action (`regenerate`, `edit`) on a conversation, answered like `chat`.
    async fn action(&self, id: i64, action: &str, body: Value) -> (u16, Result<SseReader, Value>) {
        self.post_stream(&format!("/api/conversations/{id}/{action}"), body).await
    }

    async fn post_stream(&self, path: &str, body: Value) -> (u16, Result<SseReader, Value>) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        if status == 200 {
            (status, Ok(SseReader::new(response)))
        } else {
            (status, Err(response.json().await.unwrap_or(Value::Null)))
        }
    }

    async fn stream(&self, body: Value) -> SseReader {
        match self.chat(body).await {
            (200, Ok(reader)) => reader,
            (status, Err(body)) => panic!("POST /api/chat answered {status}: {body}"),
            (status, Ok(_)) => panic!("POST /api/chat answered {status}"),
        }
    }

    async fn post_json(&self, path: &str) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    async fn messages(&self, conversation_id: i64) -> Vec<Value> {
        let page = self.get_json(&format!("/api/conversations/{conversation_id}/messages")).await;
        page["messages"].as_array().expect("messages").clone()
    }

    /// Waits (bounded) until `n` answers hold or wait for the conversation's turn.
    async fn wait_turns_queued(&self, conversation_id: i64, n: usize) {
        let deadline = Instant::now() + EVENT_WAIT;
        while self.assistant.turns_queued(ConversationId(conversation_id)) != n {
            assert!(Instant::now() < deadline, "never {n} turns queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Every remaining event of a stream, up to its end.
async fn rest(reader: &mut SseReader) -> Vec<Value> {
    let mut events = Vec::new();
    while let Some(event) = reader.next_json(EVENT_WAIT).await {
        events.push(event);
    }
    events
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn text_of(events: &[Value]) -> String {
    of_type(events, "token").iter().map(|e| e["text"].as_str().unwrap()).collect()
}

fn roles_and_status(messages: &[Value]) -> Vec<(String, String)> {
    messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap().into(), m["status"].as_str().unwrap().into()))
        .collect()
}

// --- One turn at a time per conversation ------------------------------------------------------

#[tokio::test]
async fn two_requests_on_one_conversation_are_both_answered_in_order() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut first = app.stream(json!({"message": "first question"})).await;
    let meta = first.next_json(EVENT_WAIT).await.expect("meta");
    assert_eq!(meta["type"], "meta", "{meta}");
    let id = meta["conversation_id"].as_i64().unwrap();

    // The first answer is held open; the second message arrives meanwhile.
    let mut second = app.stream(json!({"conversation_id": id, "message": "second question"})).await;
    let busy = second.next_json(EVENT_WAIT).await.expect("an event");
    assert_eq!(busy["type"], "notice", "{busy}");
    assert_eq!(busy["kind"], "busy", "{busy}");
    assert_eq!(app.model.prompts().len(), 1, "the second turn must not start yet");

    app.model.release_one();
    let mut first_events = vec![meta];
    first_events.extend(rest(&mut first).await);
    let done = of_type(&first_events, "done");
    assert_eq!(done.len(), 1, "{first_events:?}");
    assert_eq!(done[0]["finish"], "stop", "the first answer was not cancelled");
    assert_eq!(text_of(&first_events), "answer to first question");

    app.model.release_one();
    let second_events = rest(&mut second).await;
    assert_eq!(second_events[0]["type"], "meta", "{second_events:?}");
    assert_eq!(second_events[0]["conversation_id"], id);
    let done = of_type(&second_events, "done");
    assert_eq!(done.len(), 1, "{second_events:?}");
    assert_eq!(done[0]["finish"], "stop");

    // Both turns are in the history, in order, and the second prompt saw the first answer.
    let messages = app.messages(id).await;
    let contents = texts_of(&messages);
    assert_eq!(
        contents,
        [
            "first question",
            "answer to first question",
            "second question",
            "answer to second question"
        ]
    );
    assert!(messages.iter().all(|m| m["status"] == "complete"), "{messages:?}");
    let prompts = app.model.prompts();
    let second_prompt: Vec<&str> = prompts[1][1..].iter().map(|t| t.content.as_str()).collect();
    assert_eq!(second_prompt, &contents[..3]);
    assert_eq!(app.assistant.turns_queued(ConversationId(id)), 0, "the turn is given back");
}

/// Stop answers once the stopped answer is stored and its turn released, so what the page
/// does next (Regenerate right after Stop) finds the conversation at rest. Before, Stop
/// answered as soon as it had signalled, and a regenerate sent on its answer sometimes got
/// a 409 for an answer still being written.
#[tokio::test]
async fn stop_answers_once_the_stopped_answer_is_stored() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut page = app.stream(json!({"message": "tell me"})).await;
    let id = page.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let mut events = Vec::new();
    while text_of(&events) != "answer to tell me" {
        events.push(page.next_json(EVENT_WAIT).await.expect("a token"));
    }
    let stopped = app.post_json(&format!("/api/chat/{id}/stop")).await;
    assert_eq!(stopped, json!({"stopped": true}));
    assert_eq!(app.assistant.turns_queued(ConversationId(id)), 0, "still being stored");
    let messages = app.messages(id).await;
    assert_eq!(roles_and_status(&messages)[1], ("assistant".into(), "partial".into()));
    app.model.release_one();
    let (status, _) = app.action(id, "regenerate", json!({})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_stop_endpoint_stops_only_the_running_answer() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut first = app.stream(json!({"message": "tell me everything"})).await;
    let meta = first.next_json(EVENT_WAIT).await.expect("meta");
    let id = meta["conversation_id"].as_i64().unwrap();
    let mut second = app.stream(json!({"conversation_id": id, "message": "and then?"})).await;
    assert_eq!(second.next_json(EVENT_WAIT).await.unwrap()["kind"], "busy");

    // Stop once the running answer has streamed all its words (it then waits at the gate).
    let mut first_events = Vec::new();
    while text_of(&first_events) != "answer to tell me everything" {
        first_events.push(first.next_json(EVENT_WAIT).await.expect("a token"));
    }
    let stopped = app.post_json(&format!("/api/chat/{id}/stop")).await;
    assert_eq!(stopped, json!({"stopped": true}));
    first_events.extend(rest(&mut first).await);
    let done = of_type(&first_events, "done");
    assert_eq!(done.len(), 1, "{first_events:?}");
    assert_eq!(done[0]["finish"], "cancelled");
    assert_eq!(done[0]["usage"]["completion_tokens"], 5, "{first_events:?}");

    // The waiting message was not stopped: it is answered in full once released.
    let meta = second.next_json(EVENT_WAIT).await.expect("meta");
    assert_eq!(meta["type"], "meta", "{meta}");
    app.model.release_one();
    let second_events = rest(&mut second).await;
    let done = of_type(&second_events, "done");
    assert_eq!(done.len(), 1, "{second_events:?}");
    assert_eq!(done[0]["finish"], "stop");
    assert_eq!(text_of(&second_events), "answer to and then?");
    // Nothing runs any more.
    assert_eq!(app.post_json(&format!("/api/chat/{id}/stop")).await, json!({"stopped": false}));

    let messages = app.messages(id).await;
    let expected: Vec<(String, String)> = [
        ("user", "complete"),
        ("assistant", "partial"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    .iter()
    .map(|(r, s)| (r.to_string(), s.to_string()))
    .collect();
    assert_eq!(roles_and_status(&messages), expected);

    // The stopped answer records what it generated (one text piece per token here).
    let partial = &messages[1];
    assert_eq!(partial["content"], "answer to tell me everything");
    assert_eq!(partial["completion_tokens"], 5, "{partial}");
    assert_eq!(partial["prompt_tokens"], Value::Null, "unknown, not zero: {partial}");
}

/// Stop pressed while the answer still waits for the model (behind the engine's other
/// sequences, or a model load) stores nothing: before, it stored an empty `partial` answer,
/// an empty bubble in the page and an empty turn in every later prompt. The stream still
/// ends with `done` (`cancelled`, `message_id` null), the stop answers at once, and the
/// question, last and unanswered, is answered by a regenerate like any other.
#[tokio::test]
async fn an_answer_stopped_before_its_first_word_stores_no_empty_message() {
    let app = test_app(ScriptedModel::new(true)).await;
    *app.model.hold_before_text.lock().unwrap() = true;
    let mut page = app.stream(json!({"message": "are you there?"})).await;
    let meta = page.next_json(EVENT_WAIT).await.expect("meta");
    let id = meta["conversation_id"].as_i64().unwrap();
    let queued = page.next_json(EVENT_WAIT).await.expect("the queued notice");
    assert_eq!(queued["kind"], "queued", "{queued}");

    let asked = Instant::now();
    let stopped = app.post_json(&format!("/api/chat/{id}/stop")).await;
    assert_eq!(stopped, json!({"stopped": true}));
    assert!(asked.elapsed() < Duration::from_secs(5), "the stop took {:?}", asked.elapsed());
    assert_eq!(app.assistant.turns_queued(ConversationId(id)), 0, "the turn is given back");
    let events = rest(&mut page).await;
    assert!(of_type(&events, "token").is_empty(), "{events:?}");
    assert!(of_type(&events, "error").is_empty(), "{events:?}");
    let done = of_type(&events, "done");
    assert_eq!(done.len(), 1, "{events:?}");
    assert_eq!(done[0]["finish"], "cancelled", "{events:?}");
    assert_eq!(done[0]["message_id"], Value::Null, "nothing was stored: {events:?}");
    assert_eq!(done[0]["usage"]["completion_tokens"], 0, "{events:?}");

    let messages = app.messages(id).await;
    assert_eq!(roles_and_status(&messages), [("user".to_string(), "complete".to_string())]);
    assert_eq!(messages[0]["id"], meta["user_message_id"]);
    assert_eq!(drafts::get(&app.pool, ConversationId(id)).await.unwrap(), None);

    // The question is the last message: a regenerate that names it answers it, from a
    // prompt with no empty turn in it.
    *app.model.hold_before_text.lock().unwrap() = false;
    app.model.release_one();
    let body = json!({"message_id": meta["user_message_id"]});
    let (status, reader) = app.action(id, "regenerate", body).await;
    assert_eq!(status, 200, "{:?}", reader.err());
    let events = rest(&mut reader.unwrap()).await;
    assert_eq!(of_type(&events, "done")[0]["finish"], "stop", "{events:?}");
    let messages = app.messages(id).await;
    assert_eq!(texts_of(&messages), ["are you there?", "answer to are you there?"]);
    let prompts = app.model.prompts();
    let last = prompts.last().unwrap();
    let turns: Vec<&str> = last[1..].iter().map(|t| t.content.as_str()).collect();
    assert_eq!(turns, ["are you there?"]);
}

#[tokio::test]
async fn a_scheduled_run_into_a_busy_conversation_waits_for_its_turn() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut first = app.stream(json!({"message": "what is on today?"})).await;
    let meta = first.next_json(EVENT_WAIT).await.expect("meta");
    let id = meta["conversation_id"].as_i64().unwrap();

    // Cron goes through `Assistant::reply` like every channel.
    let assistant = app.assistant.clone();
    let cron = tokio::spawn(async move {
        let inbound = Inbound {
            channel: ChannelKind::WebChat,
            conversation_key: id.to_string(),
            sender: "cron".into(),
            text: "[scheduled: daily] summary please".into(),
            external_id: None,
        };
        assistant.reply(inbound, None).await
    });
    app.wait_turns_queued(id, 2).await;
    assert_eq!(app.model.prompts().len(), 1, "the scheduled turn waits");

    app.model.release_one();
    let first_events = rest(&mut first).await;
    assert_eq!(of_type(&first_events, "done")[0]["finish"], "stop", "{first_events:?}");
    app.model.release_one();
    let reply = tokio::time::timeout(EVENT_WAIT, cron).await.unwrap().unwrap().expect("reply");
    assert_eq!(reply.error, None);
    assert_eq!(reply.text, "answer to [scheduled: daily] summary please");
    let messages = app.messages(id).await;
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert!(messages.iter().all(|m| m["status"] == "complete"), "{messages:?}");
}

#[tokio::test]
async fn a_client_that_leaves_while_waiting_withdraws_its_message() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut first = app.stream(json!({"message": "a long answer please"})).await;
    let id = first.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let inbound = Inbound {
        channel: ChannelKind::WebChat,
        conversation_key: id.to_string(),
        sender: "webchat".into(),
        text: "never mind".into(),
        external_id: None,
    };
    let mut waiting = app.assistant.start(inbound, None).await.expect("accepted");
    let busy = waiting.recv().await.expect("a notice");
    assert!(matches!(&busy, Event::Notice { kind, .. } if kind == "busy"), "{busy:?}");
    assert_eq!(app.assistant.turns_queued(ConversationId(id)), 2);
    drop(waiting);
    app.wait_turns_queued(id, 1).await;

    app.model.release_one();
    let events = rest(&mut first).await;
    assert_eq!(of_type(&events, "done")[0]["finish"], "stop", "{events:?}");
    let messages = app.messages(id).await;
    assert_eq!(messages.len(), 2, "the withdrawn message was not stored: {messages:?}");
    assert_eq!(app.model.prompts().len(), 1, "and not answered");
    app.wait_turns_queued(id, 0).await;
}

#[tokio::test]
async fn deleting_a_conversation_stops_and_stores_its_answers_before_it_goes() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut first = app.stream(json!({"message": "a long answer please"})).await;
    let id = first.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let mut second = app.stream(json!({"conversation_id": id, "message": "and more"})).await;
    assert_eq!(second.next_json(EVENT_WAIT).await.unwrap()["kind"], "busy");
    let mut first_events = Vec::new();
    while text_of(&first_events) != "answer to a long answer please" {
        first_events.push(first.next_json(EVENT_WAIT).await.expect("a token"));
    }

    // An open page (another tab) learns of the deletion.
    let events = app
        .http
        .get(format!("{}/api/events", app.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /api/events");
    let mut events = SseReader::new(events);
    assert_eq!(events.next_json(EVENT_WAIT).await.unwrap()["type"], "ready");

    let response = app
        .http
        .delete(format!("{}/api/conversations/{id}", app.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 204);

    // The running answer ended as a stopped answer that was stored, not as a failure to
    // store into a conversation already gone.
    first_events.extend(rest(&mut first).await);
    assert!(of_type(&first_events, "error").is_empty(), "{first_events:?}");
    let done = of_type(&first_events, "done");
    assert_eq!(done.len(), 1, "{first_events:?}");
    assert_eq!(done[0]["finish"], "cancelled", "{first_events:?}");
    // The message that waited for its turn is told the conversation went, without an
    // answer started only to be stopped.
    let second_events = rest(&mut second).await;
    assert!(of_type(&second_events, "meta").is_empty(), "{second_events:?}");
    let error = of_type(&second_events, "error");
    assert_eq!(error.len(), 1, "{second_events:?}");
    assert!(error[0]["message"].as_str().unwrap().contains("was deleted"), "{second_events:?}");
    let gone = app
        .http
        .get(format!("{}/api/conversations/{id}/messages", app.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(gone.status(), 404);
    app.wait_turns_queued(id, 0).await;
    loop {
        let event = events.next_json(EVENT_WAIT).await.expect("the deletion, live");
        if event["type"] == "deleted" {
            assert_eq!(event["conversation_id"], id, "{event}");
            break;
        }
        assert_eq!(event["type"], "message", "{event}");
    }
}

#[tokio::test]
async fn an_answer_outlives_its_page_and_another_page_can_follow_it() {
    let app = test_app(ScriptedModel::new(true)).await;
    let live = |id: i64| {
        app.http.get(format!("{}/api/conversations/{id}/live", app.base)).bearer_auth(TOKEN).send()
    };
    let mut page = app.stream(json!({"message": "write a long story"})).await;
    let id = page.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let mut events = Vec::new();
    while text_of(&events) != "answer to write a long story" {
        events.push(page.next_json(EVENT_WAIT).await.expect("a token"));
    }
    // The page goes away (a reload): the answer is not stopped.
    drop(page);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The list says which conversations are being answered.
    let answering = |list: &Value| {
        let all = list["conversations"].as_array().unwrap();
        all.iter().find(|c| c["id"] == id).unwrap()["answering"].clone()
    };
    assert_eq!(answering(&app.get_json("/api/conversations").await), json!(true));

    // A page that comes (the reloaded one, another tab) follows it from its start.
    let response = live(id).await.expect("GET live");
    assert_eq!(response.status(), 200);
    let mut follower = SseReader::new(response);
    let meta = follower.next_json(EVENT_WAIT).await.expect("meta replayed");
    assert_eq!(meta["type"], "meta", "{meta}");
    assert_eq!(meta["conversation_id"], id);
    let text = follower.next_json(EVENT_WAIT).await.expect("the text so far");
    assert_eq!(text, json!({"type": "token", "text": "answer to write a long story"}));
    app.model.release_one();
    let rest = rest(&mut follower).await;
    let done = of_type(&rest, "done");
    assert_eq!(done.len(), 1, "{rest:?}");
    assert_eq!(done[0]["finish"], "stop", "written to its end: {rest:?}");

    let messages = app.messages(id).await;
    assert_eq!(roles_and_status(&messages)[1], ("assistant".into(), "complete".into()));
    assert_eq!(messages[1]["content"], "answer to write a long story");
    // Nothing runs any more.
    assert_eq!(live(id).await.expect("GET live").status(), 204);
    // A conversation that does not exist is no idle one (QA pass 14).
    assert_eq!(live(id + 1000).await.expect("GET live").status(), 404);
    assert_eq!(answering(&app.get_json("/api/conversations").await), json!(false));
    assert!(messages[1].get("error").is_none(), "complete, not failed: {}", messages[1]);
}

/// A failed answer keeps why it failed, so a page that loads it later says it again (not
/// only that it stopped before its end).
#[tokio::test]
async fn a_failed_answer_keeps_its_reason_for_a_page_that_loads_it_later() {
    let model = ScriptedModel::new(false);
    *model.fail.lock().unwrap() = Some(LlmError::Inference("the GPU fell off".into()));
    let app = test_app(model).await;
    let mut page = app.stream(json!({"message": "hello"})).await;
    let id = page.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let events = rest(&mut page).await;
    let error = of_type(&events, "error");
    assert_eq!(error.len(), 1, "{events:?}");
    let said = error[0]["message"].as_str().unwrap();
    assert!(said.contains("the GPU fell off"), "{said}");

    let messages = app.messages(id).await;
    assert_eq!(roles_and_status(&messages)[1], ("assistant".into(), "partial".into()));
    assert_eq!(messages[1]["content"], "answer to hello");
    assert_eq!(messages[1]["error"], said, "the reason the page was told");
}

// --- Refusals and trimming ---------------------------------------------------------------------

#[tokio::test]
async fn a_refused_request_stores_nothing_and_creates_no_conversation() {
    let app = test_app(ScriptedModel::new(false)).await;
    *app.model.refuse.lock().unwrap() = Some(LlmError::QueueFull);
    let (status, body) = app.chat(json!({"message": "hello?"})).await;
    assert_eq!(status, 503, "{:?}", body.err());
    let list = app.get_json("/api/conversations").await;
    assert_eq!(list["conversations"], json!([]), "no conversation was created");

    *app.model.refuse.lock().unwrap() = None;
    let mut reader = app.stream(json!({"message": "hello"})).await;
    let events = rest(&mut reader).await;
    let id = events[0]["conversation_id"].as_i64().unwrap();
    assert_eq!(app.messages(id).await.len(), 2);

    // A busy engine, then a message too large for the context even alone: neither is kept.
    *app.model.refuse.lock().unwrap() = Some(LlmError::QueueFull);
    let (status, _) = app.chat(json!({"conversation_id": id, "message": "again"})).await;
    assert_eq!(status, 503);
    *app.model.refuse.lock().unwrap() = None;
    *app.model.context_chars.lock().unwrap() = 500;
    let (status, body) = app.chat(json!({"conversation_id": id, "message": "x".repeat(600)})).await;
    assert_eq!(status, 400);
    // The request's field that does not fit: its one `message` (`/v1` says `messages`).
    let error = body.err().unwrap();
    assert_eq!(error["error"]["code"], "context_length_exceeded", "{error}");
    assert_eq!(error["error"]["param"], "message", "{error}");
    assert_eq!(app.messages(id).await.len(), 2, "the refused messages were not stored");
    let list = app.get_json("/api/conversations").await;
    assert_eq!(list["conversations"].as_array().unwrap().len(), 1);
}

/// Regenerate and edit change the stored history only once the model accepted the new
/// prompt: refused by a busy engine or a prompt that does not fit, they leave it as it was.
#[tokio::test]
async fn a_refused_regenerate_or_edit_changes_nothing() {
    let app = test_app(ScriptedModel::new(false)).await;
    let mut reader = app.stream(json!({"message": "first question"})).await;
    let id = rest(&mut reader).await[0]["conversation_id"].as_i64().unwrap();
    let mut reader = app.stream(json!({"conversation_id": id, "message": "second question"})).await;
    let answer = of_type(&rest(&mut reader).await, "done")[0]["message_id"].clone();
    let before = app.messages(id).await;
    assert_eq!(before.len(), 4);
    let question = before[2]["id"].clone();

    *app.model.refuse.lock().unwrap() = Some(LlmError::QueueFull);
    for (action, body) in [
        ("regenerate", json!({})),
        ("regenerate", json!({"message_id": answer})),
        ("edit", json!({"message": "changed"})),
        ("edit", json!({"message": "changed", "message_id": question})),
    ] {
        let (status, error) = app.action(id, action, body.clone()).await;
        assert_eq!(status, 503, "{action} {body}");
        assert_eq!(error.err().unwrap()["error"]["code"], "unavailable");
        assert_eq!(app.messages(id).await, before, "a refused {action} changes nothing");
    }

    // A new text too large for the context even alone: refused, nothing changed.
    *app.model.refuse.lock().unwrap() = None;
    *app.model.context_chars.lock().unwrap() = 500;
    let (status, error) = app.action(id, "edit", json!({"message": "x".repeat(600)})).await;
    assert_eq!(status, 400);
    let error = error.err().unwrap();
    assert_eq!(error["error"]["code"], "context_length_exceeded", "{error}");
    assert_eq!(error["error"]["param"], "message", "{error}");
    assert_eq!(app.messages(id).await, before, "a refused edit changes nothing");
    assert_eq!(app.model.prompts().len(), 2, "only the two answers were generated");

    // Accepted, the new answer replaces the old one.
    let (status, reader) = app.action(id, "regenerate", json!({"message_id": answer})).await;
    assert_eq!(status, 200);
    let events = rest(&mut reader.unwrap()).await;
    assert_eq!(events[0]["user_message_id"], question, "{events:?}");
    assert_eq!(of_type(&events, "done").len(), 1, "{events:?}");
    let after = app.messages(id).await;
    assert_eq!(after[..3], before[..3]);
    assert_eq!(after.len(), 4);
    assert_eq!(after[3]["content"], "answer to second question");
    assert_ne!(after[3]["id"], before[3]["id"], "a new answer");
}

/// While an answer is being written, regenerate and edit are refused at once (409) instead
/// of waiting and then changing the history under that answer or answering twice.
#[tokio::test]
async fn regenerate_or_edit_while_an_answer_streams_is_refused_and_changes_nothing() {
    let app = test_app(ScriptedModel::new(true)).await;
    app.model.release_one();
    let mut reader = app.stream(json!({"message": "first question"})).await;
    let id = rest(&mut reader).await[0]["conversation_id"].as_i64().unwrap();
    let mut streaming =
        app.stream(json!({"conversation_id": id, "message": "second question"})).await;
    let meta = streaming.next_json(EVENT_WAIT).await.expect("meta");
    assert_eq!(meta["type"], "meta", "{meta}");
    let question = meta["user_message_id"].clone();
    let before = app.messages(id).await;
    assert_eq!(before.len(), 3, "the streaming answer's question is stored: {before:?}");

    for (action, body) in [
        ("regenerate", json!({})),
        ("regenerate", json!({"message_id": question})),
        ("edit", json!({"message": "another question"})),
        ("edit", json!({"message": "another question", "message_id": question})),
    ] {
        let asked = tokio::time::timeout(Duration::from_secs(5), app.action(id, action, body));
        let (status, error) = asked.await.expect("answered at once, without waiting");
        assert_eq!(status, 409, "{action}");
        let error = error.err().unwrap();
        assert_eq!(error["error"]["code"], "conflict", "{error}");
        assert_eq!(
            error["error"]["message"],
            "an answer is being written in this conversation; stop it or wait for it"
        );
        assert_eq!(app.messages(id).await, before, "a refused {action} changes nothing");
    }
    assert_eq!(app.assistant.turns_queued(ConversationId(id)), 1, "nothing waits");

    // The streaming answer is stored as usual, under its own question, and nothing more.
    app.model.release_one();
    let events = rest(&mut streaming).await;
    assert_eq!(of_type(&events, "done")[0]["finish"], "stop", "{events:?}");
    let messages = app.messages(id).await;
    let contents = texts_of(&messages);
    assert_eq!(
        contents,
        [
            "first question",
            "answer to first question",
            "second question",
            "answer to second question"
        ]
    );
    assert_eq!(app.model.prompts().len(), 2, "no other answer was generated");
    app.wait_turns_queued(id, 0).await;
}

/// A reminder the scheduler posted after the last answer is not part of that answer: a
/// regenerate or an edit replaces the answer and keeps the reminder. The new prompt is the
/// conversation as the old answer saw it (the reminder came after the question).
#[tokio::test]
async fn a_reminder_posted_after_the_answer_survives_regenerate_and_edit() {
    let app = test_app(ScriptedModel::new(false)).await;
    let mut reader = app.stream(json!({"message": "remind me to call Anna"})).await;
    let events = rest(&mut reader).await;
    let id = events[0]["conversation_id"].as_i64().unwrap();
    let question = events[0]["user_message_id"].clone();
    let reminder = app.assistant.post(ConversationId(id), "Reminder: call Anna").await.unwrap();

    // The page shows the reminder last, so it names it.
    let body = json!({"message_id": reminder.0});
    let (status, reader) = app.action(id, "regenerate", body).await;
    assert_eq!(status, 200);
    let events = rest(&mut reader.unwrap()).await;
    assert_eq!(events[0]["user_message_id"], question, "{events:?}");
    assert_eq!(of_type(&events, "done").len(), 1, "{events:?}");
    let messages = app.messages(id).await;
    let contents = texts_of(&messages);
    assert_eq!(
        contents,
        ["remind me to call Anna", "Reminder: call Anna", "answer to remind me to call Anna"]
    );
    assert_eq!(messages[1]["id"], reminder.0, "the reminder itself, kept");
    let prompts = app.model.prompts();
    assert_eq!(prompts[1], prompts[0], "the regenerate saw what the first answer saw");

    let (status, reader) = app.action(id, "edit", json!({"message": "remind me at ten"})).await;
    assert_eq!(status, 200);
    let events = rest(&mut reader.unwrap()).await;
    let messages = app.messages(id).await;
    assert_eq!(events[0]["user_message_id"], messages[0]["id"], "the edited message, new");
    let contents = texts_of(&messages);
    assert_eq!(contents, ["remind me at ten", "Reminder: call Anna", "answer to remind me at ten"]);
    let prompts = app.model.prompts();
    let prompt: Vec<&str> = prompts[2][1..].iter().map(|t| t.content.as_str()).collect();
    assert_eq!(prompt, ["remind me at ten"], "the reminder came after the edited question");
}

#[tokio::test]
async fn an_overflow_through_the_fallback_trims_history_once_and_keeps_the_start() {
    let app = test_app(ScriptedModel::new(false)).await;
    // Four turns of fixed-size messages: user 100 characters, answers 110.
    let question = |i: usize| format!("q{i:02} {}", "x".repeat(96));
    let mut reader = app.stream(json!({"message": question(1)})).await;
    let id = rest(&mut reader).await[0]["conversation_id"].as_i64().unwrap();
    for i in 2..=4 {
        let mut reader = app.stream(json!({"conversation_id": id, "message": question(i)})).await;
        rest(&mut reader).await;
    }
    let last: usize = app.model.prompts()[3].iter().map(|t| t.content.len()).sum();
    // The next prompt (two messages more) no longer fits; the last one would.
    *app.model.context_chars.lock().unwrap() = last + 100;

    // `code` has no Z.ai key: main answers, and main's overflow must trim, not fail.
    let mut reader =
        app.stream(json!({"conversation_id": id, "message": question(5), "tier": "code"})).await;
    let events = rest(&mut reader).await;
    let kinds: Vec<&str> =
        of_type(&events, "notice").iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"history_trimmed"), "{events:?}");
    assert!(kinds.contains(&"fallback"), "the fallback notice is kept: {events:?}");
    assert_eq!(of_type(&events, "done").len(), 1, "{events:?}");
    assert_eq!(text_of(&events), format!("answer to {}", question(5)));

    // The next turn keeps the trimmed start: no second trim, and its prompt extends the
    // previous one (the model's KV state stays valid).
    let mut reader =
        app.stream(json!({"conversation_id": id, "message": question(6), "tier": "code"})).await;
    let events = rest(&mut reader).await;
    let kinds: Vec<&str> =
        of_type(&events, "notice").iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["fallback"], "{events:?}");
    let prompts = app.model.prompts();
    let (trimmed, next) = (&prompts[4], &prompts[5]);
    assert!(trimmed.len() < 10, "the window was trimmed: {} turns", trimmed.len());
    assert_eq!(&next[..trimmed.len()], &trimmed[..], "the next prompt extends the trimmed one");
}

// --- The window moves in steps, and the next one is prepared ----------------------------------

/// Runs `turns` turns through `Assistant::reply` on one WhatsApp conversation.
async fn run_turns(assistant: &Assistant, turns: usize) {
    for turn in 0..turns {
        let inbound = Inbound {
            channel: ChannelKind::WhatsApp,
            conversation_key: "33612345678".into(),
            sender: "33612345678".into(),
            text: format!("message number {turn}"),
            external_id: Some(format!("wamid.{turn}")),
        };
        let reply = assistant.reply(inbound, None).await.expect("answered");
        assert_eq!(reply.error, None);
    }
}

async fn assistant_over(
    pool: sqlx::SqlitePool,
    model: Arc<ScriptedModel>,
    window: WindowPolicy,
) -> Assistant {
    let provider: Arc<dyn Provider> = Arc::new(Shared(model));
    let router = ModelRouter::with_providers(provider, HashMap::new(), Tier::Main);
    let config = AssistantConfig { history_messages: window.min_messages, reply_max_tokens: 32 };
    Assistant::with_window(pool, Arc::new(router), config, window)
}

async fn fresh_pool(dir: &tempfile::TempDir) -> sqlx::SqlitePool {
    let url = format!("sqlite://{}", dir.path().join("window.db").display());
    my_claw::db::connect(&url).await.expect("open the database")
}

#[tokio::test]
async fn between_steps_each_prompt_extends_the_last_and_each_step_was_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new(false);
    let policy = WindowPolicy::stepping(6);
    assert_eq!((policy.step, policy.max_messages()), (4, 9));
    let assistant = assistant_over(fresh_pool(&dir).await, model.clone(), policy).await;
    run_turns(&assistant, 14).await;

    let calls = model.calls();
    let mut steps = 0;
    let mut last_prompt: Option<&Vec<ChatTurn>> = None;
    let mut last_warm: Option<&Vec<ChatTurn>> = None;
    for (turn, call) in calls.iter().enumerate() {
        let prompt = match call {
            Call::Warm(prefix) => {
                assert_eq!(prefix[0].role, Role::System, "a prefix starts with the persona");
                last_warm = Some(prefix);
                continue;
            }
            Call::Stream(prompt) => prompt,
        };
        // Window size: system + at most `max_messages` turns, the newest a user message.
        assert!(prompt.len() - 1 <= policy.max_messages(), "turn {turn}: {} turns", prompt.len());
        assert_eq!(prompt.last().unwrap().role, Role::User);
        if let Some(previous) = last_prompt {
            if prompt.starts_with(previous) {
                // Between steps: the whole previous prompt is reused.
                assert_eq!(prompt.len(), previous.len() + 2, "previous answer + new message");
            } else {
                // A step: the prepared prefix is everything but the new message.
                steps += 1;
                let warm = last_warm.expect("a prefix was prepared before the step");
                assert_eq!(&prompt[..prompt.len() - 1], &warm[..], "turn {turn}");
                assert!(
                    prompt.len() > policy.min_messages,
                    "turn {turn}: system + at least the minimum"
                );
            }
        }
        last_prompt = Some(prompt);
    }
    // 14 turns = 28 messages with steps of 4 from 10 on: the window stepped 5 times.
    assert_eq!(steps, 5, "{calls:#?}");
}

#[tokio::test]
async fn a_sliding_window_breaks_the_prefix_every_turn_and_warms_nothing() {
    // The control for the test above: with the old one-message slide, past the window
    // size no prompt starts with the previous one.
    let dir = tempfile::tempdir().unwrap();
    let model = ScriptedModel::new(false);
    let assistant =
        assistant_over(fresh_pool(&dir).await, model.clone(), WindowPolicy::sliding(6)).await;
    run_turns(&assistant, 8).await;
    let prompts = model.prompts();
    assert!(model.calls().iter().all(|c| matches!(c, Call::Stream(_))), "no warm calls");
    for pair in prompts[3..].windows(2) {
        let (previous, prompt) = (&pair[0], &pair[1]);
        assert_eq!(prompt.len(), 7, "system + 6 messages");
        assert!(!prompt.starts_with(previous));
        assert_ne!(prompt[1], previous[1], "the window moved by one message");
    }
}

#[tokio::test]
async fn after_a_restart_the_recent_conversations_are_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let policy = WindowPolicy::stepping(6);
    let before = ScriptedModel::new(false);
    let assistant = assistant_over(fresh_pool(&dir).await, before, policy).await;
    run_turns(&assistant, 7).await;
    drop(assistant);

    // A new process over the same file.
    let model = ScriptedModel::new(false);
    let assistant = assistant_over(fresh_pool(&dir).await, model.clone(), policy).await;
    assert_eq!(assistant.warm_recent(4).await.expect("warmed"), 1);
    run_turns(&assistant, 1).await;
    let calls = model.calls();
    let [Call::Warm(prefix), Call::Stream(prompt), ..] = &calls[..] else {
        panic!("a warm, then the turn: {calls:#?}");
    };
    assert_eq!(&prompt[..prompt.len() - 1], &prefix[..], "the next turn starts with the prefix");
    assert!(prefix.len() > 2, "{prefix:?}");
}

// --- Answers being written survive a crash -------------------------------------------------

/// Waits (bounded) until the draft of conversation `id` holds `text`.
async fn wait_draft(pool: &sqlx::SqlitePool, id: i64, text: &str) -> drafts::Draft {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let draft = drafts::get(pool, ConversationId(id)).await.expect("read the draft");
        match draft {
            Some(draft) if draft.content == text => return draft,
            other => assert!(Instant::now() < deadline, "the draft never held {text:?}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebChat answer's text is saved while it is written (also when the model then pauses),
/// with its ledger, and the draft goes once the answer is stored. A WhatsApp answer gets no
/// draft: after a restart the inbound queue answers its message again, and a recovered
/// draft would be taken for that answer and sent cut short.
#[tokio::test]
async fn a_webchat_answer_is_saved_as_it_is_written_and_a_channel_answer_is_not() {
    let app = test_app(ScriptedModel::new(true)).await;
    let mut page = app.stream(json!({"message": "tell me a story"})).await;
    let id = page.next_json(EVENT_WAIT).await.expect("meta")["conversation_id"].as_i64().unwrap();
    let mut events = Vec::new();
    while text_of(&events) != "answer to tell me a story" {
        events.push(page.next_json(EVENT_WAIT).await.expect("a token"));
    }
    // Every word is written and the model holds its end: the text is saved within a second
    // or so all the same.
    let draft = wait_draft(&app.pool, id, "answer to tell me a story").await;
    assert_eq!(
        (draft.tier.as_deref(), draft.provider.as_deref(), draft.model.as_deref()),
        (Some("main"), Some("local"), Some("scripted.gguf"))
    );
    assert_eq!((draft.host, draft.left_machine), (None, false));

    let assistant = app.assistant.clone();
    let whatsapp = tokio::spawn(async move {
        let inbound = Inbound {
            channel: ChannelKind::WhatsApp,
            conversation_key: "33612345678".into(),
            sender: "Ann".into(),
            text: "hello from the phone".into(),
            external_id: Some("wamid.DRAFT".into()),
        };
        assistant.reply(inbound, None).await
    });
    let conversation = loop {
        let found =
            my_claw::db::memory::find_conversation(&app.pool, ChannelKind::WhatsApp, "33612345678")
                .await
                .unwrap();
        if let Some(conversation) = found {
            break conversation;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Its words are written and it waits at the gate, longer than a draft would take.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(drafts::get(&app.pool, conversation.id).await.unwrap(), None);

    app.model.release_one();
    app.model.release_one();
    let events = rest(&mut page).await;
    assert_eq!(of_type(&events, "done")[0]["finish"], "stop", "{events:?}");
    let reply = tokio::time::timeout(EVENT_WAIT, whatsapp).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.text, "answer to hello from the phone");
    assert_eq!(drafts::get(&app.pool, ConversationId(id)).await.unwrap(), None, "stored: gone");
    assert_eq!(texts_of(&app.messages(id).await)[1], "answer to tell me a story");
}

/// An answer being written survives `kill -9`: what was streamed (all of it but the last
/// second at most) is there after the restart, as a partial answer that says why it ends
/// there, with its ledger, and it can be regenerated. Before, the conversation ended with
/// the question. The real binary, its model a stand-in on loopback that writes one number
/// every 75 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_being_written_survives_a_kill_9() {
    let slow = util::slow_model().await;
    let host = slow.split("http://").nth(1).unwrap().split('/').next().unwrap().to_string();
    let data = tempfile::tempdir().expect("temp dir");
    let options = || {
        let mut envs = util::smollm2_env();
        envs.push(("MODEL_FAST".into(), slow.clone()));
        ServerOptions { envs, data_dir: Some(data.path().to_path_buf()) }
    };
    let mut server = tokio::task::block_in_place(|| Server::start(options()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let response = http
        .post(server.url("/api/chat"))
        .bearer_auth(&server.token)
        .json(&json!({"message": "Count to eighty.", "tier": "fast"}))
        .send()
        .await
        .expect("POST /api/chat");
    assert_eq!(response.status(), 200);
    let mut page = SseReader::new(response);
    let meta = page.next_json(EVENT_WAIT).await.expect("meta");
    let id = meta["conversation_id"].as_i64().unwrap();
    let mut text = String::new();
    let read = |event: Value, text: &mut String| {
        assert_eq!(event["type"], "token", "the answer ended before the kill: {event}");
        text.push_str(event["text"].as_str().unwrap());
    };
    // Ten numbers in, then on for longer than a draft takes to be saved.
    while text.lines().count() < 10 {
        read(page.next_json(EVENT_WAIT).await.expect("a token"), &mut text);
    }
    let early = text.clone();
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        read(page.next_json(EVENT_WAIT).await.expect("a token"), &mut text);
    }
    server.kill_9();
    drop(page);

    let server = tokio::task::block_in_place(|| Server::start(options()));
    let path = format!("/api/conversations/{id}/messages");
    let response = http.get(server.url(&path)).bearer_auth(&server.token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let messages = response.json::<Value>().await.unwrap()["messages"].as_array().unwrap().clone();
    assert_eq!(
        roles_and_status(&messages)[..],
        [
            ("user".to_string(), "complete".to_string()),
            ("assistant".to_string(), "partial".to_string()),
        ],
        "{messages:?}"
    );
    let answer = &messages[1];
    let stored = answer["content"].as_str().unwrap();
    let whole: String = (1..=util::SLOW_NUMBERS).map(|n| format!("{n}\n")).collect();
    assert!(whole.starts_with(stored), "not the answer's start: {stored:?}");
    assert!(stored.starts_with(&early), "lost more than the last second: {stored:?} / {early:?}");
    assert!(
        stored.starts_with(&text) || text.starts_with(stored),
        "the streamed text {text:?} and the saved one {stored:?} differ"
    );
    assert_eq!(answer["error"], drafts::INTERRUPTED_REASON, "{answer}");
    assert_eq!((&answer["tier"], &answer["provider"]), (&json!("fast"), &json!("openai")));
    assert_eq!((&answer["host"], &answer["left_machine"]), (&json!(host), &json!(false)));

    // An ordinary partial answer now: it is regenerated like one.
    let response = http
        .post(server.url(&format!("/api/conversations/{id}/regenerate")))
        .bearer_auth(&server.token)
        .json(&json!({"message_id": answer["id"]}))
        .send()
        .await
        .expect("POST regenerate");
    assert_eq!(response.status(), 200);
    let mut again = SseReader::new(response);
    assert_eq!(again.next_json(EVENT_WAIT).await.expect("meta")["type"], "meta");
    let stop = http
        .post(server.url(&format!("/api/chat/{id}/stop")))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("POST stop");
    assert_eq!(stop.json::<Value>().await.unwrap(), json!({"stopped": true}));
}

// --- The real model ----------------------------------------------------------------------------

#[tokio::test]
async fn real_model_two_requests_on_one_conversation_are_both_answered_in_order() {
    let mut envs = util::smollm2_env();
    envs.push(("REPLY_MAX_TOKENS".into(), "48".into()));
    envs.push(("CONTEXT_SIZE".into(), "4096".into()));
    let server = Server::start(ServerOptions { envs, data_dir: None });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let chat = |body: Value| {
        let request = http.post(server.url("/api/chat")).bearer_auth(&server.token).json(&body);
        async move {
            let response = request.send().await.expect("POST /api/chat");
            assert_eq!(response.status(), 200);
            SseReader::new(response)
        }
    };
    let mut first = chat(json!({"message": "Write a long story about a lighthouse keeper."})).await;
    let meta = first.next_json(Duration::from_secs(120)).await.expect("meta");
    let id = meta["conversation_id"].as_i64().expect("conversation id");
    // The second message goes in while the first answer streams.
    let first_token = first.next_json(Duration::from_secs(120)).await.expect("an event");
    let second_sent_while_running = first_token["type"] == "token";
    let mut second = chat(json!({"conversation_id": id, "message": "Now summarise it."})).await;

    let mut first_events = vec![first_token];
    while let Some(event) = first.next_json(Duration::from_secs(120)).await {
        first_events.push(event);
    }
    let mut second_events = Vec::new();
    while let Some(event) = second.next_json(Duration::from_secs(120)).await {
        second_events.push(event);
    }
    let first_done = of_type(&first_events, "done");
    assert_eq!(first_done.len(), 1, "{first_events:?}");
    assert_ne!(first_done[0]["finish"], "cancelled", "the second message cancelled the first");
    let second_done = of_type(&second_events, "done");
    assert_eq!(second_done.len(), 1, "{second_events:?}");
    assert_ne!(second_done[0]["finish"], "cancelled");
    if second_sent_while_running {
        assert_eq!(second_events[0]["kind"], "busy", "{second_events:?}");
    }

    let response = http
        .get(server.url(&format!("/api/conversations/{id}/messages")))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    let page: Value = response.json().await.unwrap();
    let messages = page["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"], "{messages:?}");
    assert_eq!(messages[2]["content"], "Now summarise it.");
    assert!(messages.iter().all(|m| m["status"] == "complete"), "{messages:?}");
    // The second answer's prompt held the first answer: more prompt tokens, most reused.
    let usage = &second_done[0]["usage"];
    let first_usage = &first_done[0]["usage"];
    assert!(usage["prompt_tokens"].as_u64() > first_usage["prompt_tokens"].as_u64(), "{usage}");
    assert!(
        usage["cached_tokens"].as_u64().unwrap() > 0,
        "the first turn's KV was reused: {usage}"
    );
}

/// The texts of `messages` (as the messages API lists them), in order.
fn texts_of(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["content"].as_str().unwrap()).collect()
}
