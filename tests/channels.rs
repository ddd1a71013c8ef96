//! Channel tests: the WhatsApp and Nextcloud Talk clients against local stand-ins for the
//! Graph API and for Nextcloud (axum on 127.0.0.1); the real gateway, queue worker and
//! assistant in this process over a scripted model (busy engine, bad batches, stops while
//! sending, logs); and the real `my-claw` binary with the real small model behind signed
//! webhooks: answers, deduplication, crash recovery, rejections. Owns no production code;
//! payload samples live in `tests/data/`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::SqlitePool;

use my_claw::assistant::{AgentConfig, Assistant, AssistantConfig};
use my_claw::channels::nextcloud::{self, Nextcloud};
use my_claw::channels::queue::{self, QueueConfig, FAILURE_REPLY, UNSUPPORTED_REPLY};
use my_claw::channels::whatsapp::{self, WhatsApp};
use my_claw::channels::{markup, split};
use my_claw::channels::{Accepted, Channel, ChannelError, Channels, Progress, RetryPolicy};
use my_claw::config::{NextcloudSettings, Secret, WhatsAppSettings};
use my_claw::db::inbound::{self, QueueStatus};
use my_claw::db::memory;
use my_claw::domain::{ChannelKind, Role};
use my_claw::gateway::AppState;
use my_claw::llm::router::{Router as ModelRouter, Tier};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};
use my_claw::retry::Backoff;

use crate::util::{repo_path, smollm2_env, Server, ServerOptions};

const APP_SECRET: &str = "test-app-secret-5f1c";
const VERIFY_TOKEN: &str = "verify-me-please";
const ACCESS_TOKEN: &str = "EAAG-test-access-token";
const PHONE_NUMBER_ID: &str = "106540352242922";
const USER_NUMBER: &str = "16505551234";
/// PROTOCOLS.md §2.5: 64 × "a" and 4 × "0123456789abcdef".
const TALK_SECRET: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const TALK_RANDOM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const ROOM: &str = "n3xtc10ud";
/// How long a real-model answer may take on a loaded 2-core machine.
const ANSWER_LIMIT: Duration = Duration::from_secs(180);

// --- stand-ins ------------------------------------------------------------------------------

/// One request a stand-in received.
#[derive(Debug, Clone)]
struct Recorded {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Recorded {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("stand-in got JSON")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Graph,
    Talk,
}

/// A webhook to post: its URL and body.
type Webhook = (String, Vec<u8>);

/// A stand-in server that records every request and answers from a script, else with the
/// service's normal success answer.
#[derive(Clone)]
struct StandIn {
    kind: Kind,
    base: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<VecDeque<(u16, String)>>>,
    /// Delay before answering a WhatsApp mark-as-read (holds the worker before generating).
    read_delay: Arc<Mutex<Duration>>,
    /// Delay before answering the next message send, after recording it (holds the sender
    /// in the middle of a send); used once.
    send_delay: Arc<Mutex<Option<Duration>>>,
    /// Message sends answered at once before `send_delay` holds one (0: the next is held).
    sends_before_delay: Arc<AtomicUsize>,
    /// A WhatsApp webhook (URL, body) that the next message send posts, signed, and waits
    /// to see answered before the send itself is answered: a status report that overtakes
    /// the answer to the send request; used once.
    webhook_before_send: Arc<Mutex<Option<Webhook>>>,
    /// The HTTP status each `webhook_before_send` got (0: no answer).
    webhooks_answered: Arc<Mutex<Vec<u16>>>,
}

impl StandIn {
    async fn start(kind: Kind) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stand_in = StandIn {
            kind,
            base: format!("http://{addr}"),
            requests: Arc::default(),
            script: Arc::default(),
            read_delay: Arc::new(Mutex::new(Duration::ZERO)),
            send_delay: Arc::default(),
            sends_before_delay: Arc::default(),
            webhook_before_send: Arc::default(),
            webhooks_answered: Arc::default(),
        };
        let state = stand_in.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move { state.answer(uri, headers, body).await }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        stand_in
    }

    async fn answer(&self, uri: Uri, headers: HeaderMap, body: Bytes) -> axum::response::Response {
        let is_read = self.kind == Kind::Graph
            && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["status"] == "read");
        if is_read {
            let delay = *self.read_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
        }
        let n = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(Recorded { path: uri.path().to_string(), headers, body: body.to_vec() });
            requests.len()
        };
        let webhook = if is_read { None } else { self.webhook_before_send.lock().unwrap().take() };
        if let Some((url, webhook)) = webhook {
            let answered = client()
                .post(url)
                .header("content-type", "application/json")
                .header("X-Hub-Signature-256", whatsapp::sign(APP_SECRET, &webhook))
                .body(webhook)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            self.webhooks_answered.lock().unwrap().push(answered);
        }
        if !is_read {
            let hold = {
                let mut delay = self.send_delay.lock().unwrap();
                let let_through = delay.is_some()
                    && self
                        .sends_before_delay
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                if let_through {
                    None
                } else {
                    delay.take()
                }
            };
            if let Some(hold) = hold {
                tokio::time::sleep(hold).await;
            }
        }
        let scripted = if is_read { None } else { self.script.lock().unwrap().pop_front() };
        let (status, body) = match (scripted, self.kind) {
            (Some(answer), _) => answer,
            (None, Kind::Graph) if is_read => (200, json!({"success": true}).to_string()),
            (None, Kind::Graph) => (
                200,
                json!({"messaging_product": "whatsapp",
                       "contacts": [{"input": USER_NUMBER, "wa_id": USER_NUMBER}],
                       "messages": [{"id": format!("wamid.OUT{n}")}]})
                .to_string(),
            ),
            (None, Kind::Talk) => (
                201,
                json!({"ocs": {"meta": {"status": "ok", "statuscode": 201}, "data": null}})
                    .to_string(),
            ),
        };
        let status = StatusCode::from_u16(status).expect("status");
        (status, [("content-type", "application/json")], body).into_response()
    }

    fn script(&self, answers: &[(u16, Value)]) {
        let mut script = self.script.lock().unwrap();
        for (status, body) in answers {
            script.push_back((*status, body.to_string()));
        }
    }

    fn all(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// WhatsApp text messages (not read receipts), or Talk bot messages.
    fn messages(&self) -> Vec<Recorded> {
        self.all()
            .into_iter()
            .filter(|r| match self.kind {
                Kind::Graph => r.json()["status"] != "read",
                Kind::Talk => r.path.ends_with("/message"),
            })
            .collect()
    }
}

fn graph_error(code: i64) -> Value {
    json!({"error": {"message": format!("(#{code}) error"), "type": "OAuthException", "code": code,
                     "error_data": {"messaging_product": "whatsapp", "details": "details here"},
                     "fbtrace_id": "AbC"}})
}

// --- helpers --------------------------------------------------------------------------------

fn data(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!("tests/data/{name}"))).expect("test payload")
}

async fn fresh_pool() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = my_claw::db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .expect("open db");
    (dir, pool)
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        pair_rate_delay: Duration::from_millis(20),
    }
}

fn whatsapp_settings(api_base: &str, template: Option<&str>) -> WhatsAppSettings {
    WhatsAppSettings {
        verify_token: Secret::new(VERIFY_TOKEN),
        app_secret: Secret::new(APP_SECRET),
        access_token: Secret::new(ACCESS_TOKEN),
        phone_number_id: PHONE_NUMBER_ID.into(),
        api_base: format!("{api_base}/v26.0"),
        allowed_numbers: vec![USER_NUMBER.into()],
        template_name: template.map(str::to_string),
    }
}

fn nextcloud_settings(url: &str, allowed: Option<Vec<String>>) -> NextcloudSettings {
    NextcloudSettings {
        url: url.into(),
        bot_secret: Secret::new(TALK_SECRET),
        allowed_users: allowed,
    }
}

/// Waits (bounded) until `check` holds.
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

/// Waits (bounded) until no queue row is pending or being processed: from then on the
/// worker has nothing left that could send anything.
async fn wait_for_idle_queue(pool: &SqlitePool) {
    let started = Instant::now();
    while started.elapsed() < ANSWER_LIMIT {
        let counts = inbound::counts(pool).await.expect("queue counts");
        if counts.pending + counts.retrying + counts.processing == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the inbound queue did not become idle in {ANSWER_LIMIT:?}");
}

fn server_env(graph: Option<&StandIn>, talk: Option<&StandIn>) -> Vec<(String, String)> {
    let mut env = smollm2_env();
    let mut set = |k: &str, v: String| env.push((k.to_string(), v));
    set("REPLY_MAX_TOKENS", "24".into());
    // No tools: SmolLM2 offered them sometimes opens a call, which 24 tokens cut before
    // it closes, and the answer is then rightly a failure (no text); these tests are about
    // the channel path, tools have their own (`agent::`, `reminders::`).
    set("TOOLS", "none".into());
    set("LOG", "info,my_claw=debug".into());
    if let Some(graph) = graph {
        set("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into());
        set("WHATSAPP_APP_SECRET", APP_SECRET.into());
        set("WHATSAPP_ACCESS_TOKEN", ACCESS_TOKEN.into());
        set("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID.into());
        set("WHATSAPP_API_BASE", format!("{}/v26.0", graph.base));
        set("WHATSAPP_ALLOWED_NUMBERS", format!("+{USER_NUMBER}"));
    }
    if let Some(talk) = talk {
        set("NEXTCLOUD_URL", talk.base.clone());
        set("NEXTCLOUD_BOT_SECRET", TALK_SECRET.into());
        set("NEXTCLOUD_ALLOWED_USERS", "users/ada-lovelace".into());
    }
    env
}

/// Starts the real binary (blocking start, bounded by the util helper).
fn start_server(env: Vec<(String, String)>, data_dir: Option<PathBuf>) -> Server {
    tokio::task::block_in_place(|| Server::start(ServerOptions { envs: env, data_dir }))
}

async fn open_db(data_dir: &Path) -> SqlitePool {
    my_claw::db::connect(&format!("sqlite://{}", data_dir.join("my-claw.db").display()))
        .await
        .expect("open the server's database")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

async fn post_whatsapp(server: &Server, body: &[u8], signature: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .post(server.url("/api/webhook/whatsapp"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    request.send().await.expect("post whatsapp webhook")
}

async fn post_whatsapp_signed(server: &Server, body: &[u8]) -> reqwest::Response {
    post_whatsapp(server, body, Some(&whatsapp::sign(APP_SECRET, body))).await
}

async fn post_talk(
    server: &Server,
    body: &[u8],
    random: &str,
    signature: &str,
) -> reqwest::Response {
    client()
        .post(server.url("/api/webhook/nextcloud"))
        .header("content-type", "application/json")
        .header("OCS-APIRequest", "true")
        .header("X-Nextcloud-Talk-Backend", "https://cloud.example.org/")
        .header("X-Nextcloud-Talk-Random", random)
        .header("X-Nextcloud-Talk-Signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .expect("post talk webhook")
}

/// Signs like Nextcloud, with a random of its shape (64 chars, may hold `+` and `/`).
async fn post_talk_signed(server: &Server, body: &[u8]) -> reqwest::Response {
    let random = format!("{}+/{}", &TALK_RANDOM[..31], hex::encode(rand::random::<[u8; 16]>()));
    post_talk(server, body, &random, &nextcloud::sign(TALK_SECRET, &random, body)).await
}

fn whatsapp_text(id: &str, from: &str, text: &str) -> Vec<u8> {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": [{"profile": {"name": "Tester"}, "wa_id": from}],
            "messages": [{"from": from, "id": id, "timestamp": chrono::Utc::now().timestamp().to_string(),
                          "type": "text", "text": {"body": text}}]}}]}]})
    .to_string()
    .into_bytes()
}

fn whatsapp_status(id: &str, status: &str, errors: Value) -> Vec<u8> {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "statuses": [{"id": id, "status": status, "timestamp": "1750857384",
                          "recipient_id": USER_NUMBER, "errors": errors}]}}]}]})
    .to_string()
    .into_bytes()
}

fn talk_create(message_id: &str, actor: &str, text: &str) -> Vec<u8> {
    let content = json!({"message": text, "parameters": []}).to_string();
    json!({"type": "Create",
           "actor": {"type": "Person", "id": actor, "name": "Someone"},
           "object": {"type": "Note", "id": message_id, "name": "message", "content": content,
                      "mediaType": "text/markdown"},
           "target": {"type": "Collection", "id": ROOM, "name": "world"}})
    .to_string()
    .into_bytes()
}

/// The stored answer came from the local SmolLM2 file, complete, and is not the apology the
/// worker sends when the model fails.
fn assert_answered_by_the_real_model(answer: &memory::StoredMessage) {
    assert_eq!(answer.role, Role::Assistant);
    assert_eq!(answer.status, memory::MessageStatus::Complete, "{answer:?}");
    assert_eq!(answer.provider.as_deref(), Some("local"), "{answer:?}");
    assert!(answer.model.as_deref().unwrap_or_default().contains("SmolLM2"), "{answer:?}");
    assert!(!answer.content.trim().is_empty());
    assert_ne!(answer.content, FAILURE_REPLY);
}

// --- clients against stand-ins (no model) ------------------------------------------------------

#[tokio::test]
async fn whatsapp_send_converts_markup_splits_and_retries_throttling() {
    let graph = StandIn::start(Kind::Graph).await;
    let (_dir, pool) = fresh_pool().await;
    let wa = WhatsApp::new(whatsapp_settings(&graph.base, None), reqwest::Client::new(), pool)
        .with_retry(fast_retry());
    // Throughput limit on the first try, pair rate limit on the second, then accepted.
    graph.script(&[(400, graph_error(130429)), (400, graph_error(131056))]);
    let paragraph = format!("**Bold** start. {}", "Words in a sentence. ".repeat(120));
    let text = format!("{paragraph}\n\n{paragraph}");
    let ids = wa.send_text(USER_NUMBER, &text).await.expect("sent after retries");
    assert_eq!(ids.len(), 2, "{} chars must take two messages", text.chars().count());
    let requests = graph.all();
    assert_eq!(requests.len(), 4, "two throttled tries, then two parts");
    for r in &requests {
        assert_eq!(r.path, format!("/v26.0/{PHONE_NUMBER_ID}/messages"));
        assert_eq!(r.header("authorization"), format!("Bearer {ACCESS_TOKEN}"));
        let body = r.json();
        assert_eq!(body["messaging_product"], "whatsapp");
        assert_eq!(body["to"], USER_NUMBER);
        assert_eq!(body["type"], "text");
        assert!(body["text"]["body"].as_str().unwrap().chars().count() <= 4096);
    }
    let first = requests[2].json();
    assert!(first["text"]["body"].as_str().unwrap().starts_with("*Bold* start."));
    assert_eq!(ids, ["wamid.OUT3", "wamid.OUT4"]);
}

/// An answer whose code block is longer than one WhatsApp message: each message that holds
/// some of the code shows it as a block (its ``` lines pair up, the code's `*` and `_` stay
/// as they are), every message is within 4096 characters, and nothing is lost. Before, the
/// first message ended in a block that never closed and the second held the rest of the
/// code as prose, with its `_` and `*` read as italics and bold.
#[tokio::test]
async fn a_code_block_longer_than_a_whatsapp_message_stays_code_in_every_part() {
    let graph = StandIn::start(Kind::Graph).await;
    let (_dir, pool) = fresh_pool().await;
    let wa = WhatsApp::new(whatsapp_settings(&graph.base, None), reqwest::Client::new(), pool)
        .with_retry(fast_retry());
    let code: String =
        (0..250).map(|i| format!("total_{i} = price_{i} * count_{i}  # step {i}\n")).collect();
    let text = format!("Here is the **script**:\n\n```python\n{code}```\n\nRun it with *care*.");
    assert!(code.chars().count() > 8_192, "the code must take three messages");
    let ids = wa.send_text(USER_NUMBER, &text).await.expect("sent");
    let bodies: Vec<String> = graph
        .messages()
        .iter()
        .map(|r| r.json()["text"]["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), bodies.len());
    assert!(bodies.len() >= 3, "{}", bodies.len());
    for (i, body) in bodies.iter().enumerate() {
        assert!(body.chars().count() <= 4096, "part {i}: {} chars", body.chars().count());
        let fences = body.lines().filter(|l| l.trim_start().starts_with("```")).count();
        assert_eq!(fences % 2, 0, "part {i} leaves its code block open:\n{body}");
    }
    assert!(bodies[0].starts_with("Here is the *script*:"), "{}", bodies[0]);
    assert!(bodies[1].starts_with("```\ntotal_"), "{}", &bodies[1][..40]);
    assert!(bodies.last().unwrap().ends_with("Run it with _care_."));
    // Every line of code went out once, untouched.
    let sent_code: Vec<&str> =
        bodies.iter().flat_map(|b| b.lines()).filter(|l| l.starts_with("total_")).collect();
    assert_eq!(sent_code, code.lines().collect::<Vec<_>>());
}

#[tokio::test]
async fn whatsapp_expired_token_and_closed_window_are_not_retried() {
    let graph = StandIn::start(Kind::Graph).await;
    let (_dir, pool) = fresh_pool().await;
    let wa = WhatsApp::new(whatsapp_settings(&graph.base, None), reqwest::Client::new(), pool)
        .with_retry(fast_retry());
    graph.script(&[(401, graph_error(190))]);
    let err = wa.send_text(USER_NUMBER, "hi").await.unwrap_err();
    assert!(matches!(err, ChannelError::TokenExpired { code: 190, .. }), "{err:?}");
    assert!(err.to_string().contains("WHATSAPP_ACCESS_TOKEN"), "{err}");
    assert_eq!(graph.all().len(), 1);

    graph.script(&[(400, graph_error(131047))]);
    let err = wa.send_text(USER_NUMBER, "hi").await.unwrap_err();
    assert!(matches!(err, ChannelError::OutsideWindow { .. }), "{err:?}");
    assert!(err.to_string().contains("131047"), "{err}");
    assert_eq!(graph.all().len(), 2);

    // A 429 that is not a Graph error (no code to key on) is a rate limit: retried, and
    // the message goes out (it was failed for good, never to be sent again).
    graph.script(&[(429, json!("Too Many Requests"))]);
    let ids = wa.send_text(USER_NUMBER, "after the limit").await.expect("retried");
    assert_eq!(ids.len(), 1);
    assert_eq!(graph.all().len(), 4);

    // Server errors are retried until the policy gives up.
    graph.script(&[(500, json!({})), (502, json!({})), (503, json!({})), (500, json!({}))]);
    let err = wa.send_text(USER_NUMBER, "hi").await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(graph.all().len(), 8);
}

#[tokio::test]
async fn whatsapp_proactive_delivery_follows_the_24_hour_window() {
    let graph = StandIn::start(Kind::Graph).await;
    let (_dir, pool) = fresh_pool().await;
    let http = reqwest::Client::new();
    let plain = WhatsApp::new(whatsapp_settings(&graph.base, None), http.clone(), pool.clone());
    let channels = Channels { whatsapp: Some(Arc::new(plain)), ..Channels::default() };

    // Never wrote: no template configured, so nothing is sent.
    assert!(!channels.whatsapp_window_open(USER_NUMBER).await.unwrap());
    let err = channels
        .deliver(ChannelKind::WhatsApp, USER_NUMBER, "Reminder", Progress::unrecorded())
        .await
        .unwrap_err();
    assert!(matches!(err, ChannelError::OutsideWindow { .. }), "{err:?}");
    assert!(graph.all().is_empty());

    // With a template, the template goes out with the text as its parameter.
    let templated = WhatsApp::new(
        whatsapp_settings(&graph.base, Some("daily_note:fr")),
        http.clone(),
        pool.clone(),
    );
    let receipt = templated
        .deliver(USER_NUMBER, "**Rappel** :\nacheter du pain", Progress::unrecorded())
        .await
        .unwrap();
    assert!(receipt.via_template);
    let body = graph.all()[0].json();
    assert_eq!(body["type"], "template");
    assert_eq!(body["template"]["name"], "daily_note");
    assert_eq!(body["template"]["language"]["code"], "fr");
    assert_eq!(
        body["template"]["components"][0]["parameters"][0]["text"],
        "*Rappel* : acheter du pain"
    );

    // A message to another number of the same Meta app is not ours: nothing is stored.
    let wa = channels.get(ChannelKind::WhatsApp).unwrap();
    let other_number = String::from_utf8(whatsapp_text("wamid.OTHER", USER_NUMBER, "hello"))
        .unwrap()
        .replace(PHONE_NUMBER_ID, "999000999");
    let intakes = wa.parse(&HeaderMap::new(), other_number.as_bytes()).unwrap();
    let accepted = channels.store(&pool, ChannelKind::WhatsApp, &intakes).await.unwrap();
    assert_eq!(accepted, Accepted::default());
    assert!(inbound::list(&pool).await.unwrap().is_empty());

    // The user writes: the window opens and free-form text is sent.
    let body = whatsapp_text("wamid.IN1", USER_NUMBER, "hello");
    let intakes = wa.parse(&HeaderMap::new(), &body).unwrap();
    let accepted = channels.store(&pool, ChannelKind::WhatsApp, &intakes).await.unwrap();
    assert_eq!(accepted.queued, 1);
    assert!(channels.whatsapp_window_open(&format!("+{USER_NUMBER}")).await.unwrap());
    let receipt = channels
        .deliver(ChannelKind::WhatsApp, USER_NUMBER, "Reminder", Progress::unrecorded())
        .await
        .unwrap();
    assert!(!receipt.via_template);
    assert_eq!(receipt.external_ids.len(), 1);
    assert_eq!(graph.all()[1].json()["text"]["body"], "Reminder");

    // WebChat has no outbound delivery; Talk is not configured here.
    assert!(matches!(
        channels.deliver(ChannelKind::WebChat, "1", "x", Progress::unrecorded()).await,
        Err(ChannelError::NotDeliverable(_))
    ));
    assert!(matches!(
        channels.deliver(ChannelKind::Nextcloud, ROOM, "x", Progress::unrecorded()).await,
        Err(ChannelError::NotConfigured(_))
    ));
}

/// Checks a Talk reply the way Nextcloud's BotController does.
fn assert_signed_talk_reply(r: &Recorded) {
    assert_eq!(r.header("ocs-apirequest"), "true");
    assert_eq!(r.header("accept"), "application/json");
    assert!(r.header("content-type").starts_with("application/json"));
    let random = r.header("x-nextcloud-talk-bot-random");
    assert!(random.len() >= 32, "random too short: {random:?}");
    let message = r.json()["message"].as_str().expect("message").to_string();
    let expected = nextcloud::sign(TALK_SECRET, random, message.as_bytes());
    assert_eq!(r.header("x-nextcloud-talk-bot-signature").to_lowercase(), expected);
    let reference = r.json()["referenceId"].as_str().unwrap_or_default().to_string();
    assert_eq!(reference.len(), 64, "referenceId {reference:?}");
}

#[tokio::test]
async fn nextcloud_reply_is_signed_split_and_threaded() {
    let talk = StandIn::start(Kind::Talk).await;
    let nc = Nextcloud::new(nextcloud_settings(&talk.base, None), reqwest::Client::new())
        .with_retry(fast_retry());
    let paragraph = "Une phrase en français, avec des accents é à ü. ".repeat(400);
    let text = format!("{paragraph}\n\n{paragraph}");
    assert!(text.chars().count() > 32_000);
    let references = nc.send_message(ROOM, &text, Some(1567)).await.expect("sent");
    let requests = talk.messages();
    assert_eq!(requests.len(), 2);
    assert_eq!(references.len(), 2);
    for (r, reference) in requests.iter().zip(&references) {
        assert_eq!(r.path, format!("/ocs/v2.php/apps/spreed/api/v1/bot/{ROOM}/message"));
        assert_signed_talk_reply(r);
        assert_eq!(r.json()["referenceId"], reference.as_str());
        assert!(r.json()["message"].as_str().unwrap().chars().count() <= 32_000);
    }
    assert_eq!(requests[0].json()["replyTo"], 1567);
    assert!(requests[1].json().get("replyTo").is_none());

    // The protocol vector, through the production signer.
    assert_eq!(
        nextcloud::sign(TALK_SECRET, TALK_RANDOM, "Bonjour 👋".as_bytes()),
        "a84642a1195a7d18abf1a72321e7151b2c609860432dee46285065a87ff7d610"
    );
}

#[tokio::test]
async fn nextcloud_errors_are_explained_and_only_server_errors_retried() {
    let talk = StandIn::start(Kind::Talk).await;
    let nc = Nextcloud::new(nextcloud_settings(&talk.base, None), reqwest::Client::new())
        .with_retry(fast_retry());
    for (status, needle) in
        [(401, "NEXTCLOUD_BOT_SECRET"), (404, "conversation not found"), (429, "brute-force")]
    {
        let before = talk.all().len();
        talk.script(&[(status, json!({}))]);
        let err = nc.send_message(ROOM, "hello", Some(1)).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{status}: {err}");
        assert_eq!(talk.all().len(), before + 1, "{status} must not be retried");
    }
    // A 413 on a long part: sent again in 1000-character pieces.
    let before = talk.all().len();
    talk.script(&[(413, json!({}))]);
    let long = "word ".repeat(500);
    let references = nc.send_message(ROOM, &long, Some(7)).await.expect("resent smaller");
    assert_eq!(references.len(), 3);
    let sent = &talk.all()[before..];
    assert_eq!(sent.len(), 4);
    assert_eq!(sent[1].json()["replyTo"], 7);
    assert!(sent[1..].iter().all(|r| r.json()["message"].as_str().unwrap().len() <= 1000));
    // A 503 then success.
    talk.script(&[(503, json!({}))]);
    nc.send_message(ROOM, "again", None).await.expect("retried");
}

/// Talk answers 400 to a `replyTo` naming a message the room no longer has (it expired, or
/// the history was cleared while the answer was written): the answer still goes out, once,
/// without the reply link, instead of being failed for good and never reaching the room.
/// A 400 without `replyTo` is still not retried.
#[tokio::test]
async fn a_talk_answer_to_a_message_that_is_gone_is_posted_without_the_reply_link() {
    let talk = StandIn::start(Kind::Talk).await;
    let nc = Nextcloud::new(nextcloud_settings(&talk.base, None), reqwest::Client::new())
        .with_retry(fast_retry());
    talk.script(&[(400, json!({"ocs": {"meta": {"status": "failure", "statuscode": 400}}}))]);
    let references =
        nc.send_message(ROOM, "Here is your answer.", Some(1567)).await.expect("posted");
    let requests = talk.messages();
    assert_eq!(requests.len(), 2, "the refused reply, then the same text without replyTo");
    assert_eq!(requests[0].json()["replyTo"], 1567);
    assert!(requests[1].json().get("replyTo").is_none());
    assert_eq!(requests[1].json()["message"], "Here is your answer.");
    assert_signed_talk_reply(&requests[1]);
    assert_eq!(references, [requests[1].json()["referenceId"].as_str().unwrap().to_string()]);

    talk.script(&[(400, json!({}))]);
    let err = nc.send_message(ROOM, "No reply link here.", None).await.unwrap_err();
    assert!(matches!(err, ChannelError::Nextcloud { status: 400, .. }), "{err:?}");
    assert_eq!(talk.messages().len(), 3, "a 400 without replyTo is not sent again");
}

// --- the real binary and the real model --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_webhook_end_to_end_with_the_real_model() {
    let graph = StandIn::start(Kind::Graph).await;
    let server = start_server(server_env(Some(&graph), None), None);

    // Verification handshake.
    let verify = |token: &str| {
        server.url(&format!(
            "/api/webhook/whatsapp?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444"
        ))
    };
    let ok = client().get(verify(VERIFY_TOKEN)).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(ok.text().await.unwrap(), "1158201444");
    assert_eq!(client().get(verify("wrong")).send().await.unwrap().status(), 403);

    // Meta's sample, with `\u00e9` escapes, signed over the raw bytes.
    let body = data("whatsapp_text.json");
    let response = post_whatsapp_signed(&server, &body).await;
    assert_eq!(response.status(), 200, "{}", server.output());
    wait_until(ANSWER_LIMIT, "the answer at the Graph stand-in", || !graph.messages().is_empty())
        .await;

    let all = graph.all();
    let read = &all[0].json();
    assert_eq!(read["status"], "read", "mark-as-read comes first: {all:?}");
    assert_eq!(read["typing_indicator"]["type"], "text");
    let wamid = "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=";
    assert_eq!(read["message_id"], wamid);
    let reply = &graph.messages()[0];
    assert_eq!(reply.header("authorization"), format!("Bearer {ACCESS_TOKEN}"));
    let reply_body = reply.json();
    assert_eq!(reply_body["to"], USER_NUMBER);
    assert!(!reply_body["text"]["body"].as_str().unwrap().trim().is_empty());

    // Meta redelivers the same notification: acknowledged, not answered again. The 200
    // comes once the delivery is stored, so once it is there and the queue holds nothing
    // left to answer, no second answer can follow.
    assert_eq!(post_whatsapp_signed(&server, &body).await.status(), 200);
    let pool = open_db(&server.data_dir).await;
    wait_for_idle_queue(&pool).await;
    assert_eq!(graph.messages().len(), 1, "a redelivery was answered twice");
    let row = inbound::get(&pool, ChannelKind::WhatsApp, wamid).await.unwrap().unwrap();
    assert_eq!(row.status, QueueStatus::Done, "{row:?}");
    assert_eq!(inbound::list(&pool).await.unwrap().len(), 1);
    let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, USER_NUMBER, None)
        .await
        .unwrap();
    let history = memory::history(&pool, conv.id, 10).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0].content, "Does it come in another color? Café");
    assert_eq!(history[0].external_id.as_deref(), Some(wamid));
    assert_eq!(history[1].role, Role::Assistant);
    // The real model answered (not the failure apology), and that answer was sent.
    assert_answered_by_the_real_model(&history[1]);
    assert_eq!(
        reply_body["text"]["body"].as_str().unwrap(),
        markup::markdown_to_whatsapp(history[1].content.trim())
    );
    let sent_id = history[1].external_id.clone().expect("answer has its wamid");
    assert_eq!(history[1].delivery_status.as_deref(), Some("sent"));
    let last = inbound::last_inbound_at(&pool, ChannelKind::WhatsApp, USER_NUMBER).await.unwrap();
    assert_eq!(last, Some(1_749_416_383_000));

    // Delivery reports: forward only; a failure is recorded with its code.
    let delivered = whatsapp_status(&sent_id, "read", json!([]));
    assert_eq!(post_whatsapp_signed(&server, &delivered).await.status(), 200);
    let failed = String::from_utf8(data("whatsapp_status_failed.json"))
        .unwrap()
        .replace("wamid.SENT1", &sent_id);
    assert_eq!(post_whatsapp_signed(&server, failed.as_bytes()).await.status(), 200);
    let answer = memory::get_message(&pool, history[1].id).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("failed"));
    assert!(answer.delivery_error.as_deref().unwrap().starts_with("131047 Re-engagement message"));

    // An image gets the polite "text only" answer, without the model.
    assert_eq!(post_whatsapp_signed(&server, &data("whatsapp_image.json")).await.status(), 200);
    wait_until(Duration::from_secs(30), "the text-only reply", || graph.messages().len() == 2)
        .await;
    assert_eq!(graph.messages()[1].json()["text"]["body"], UNSUPPORTED_REPLY);
    let image = inbound::get(&pool, ChannelKind::WhatsApp, "wamid.IMG").await.unwrap().unwrap();
    assert_eq!(image.status, QueueStatus::Done);
    if std::env::var_os("SHOW_SERVER_LOG").is_some() {
        eprintln!("{}", server.output());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nextcloud_webhook_end_to_end_with_the_real_model() {
    let talk = StandIn::start(Kind::Talk).await;
    let server = start_server(server_env(None, Some(&talk)), None);

    // PHP's escaping (`\/`, `\u00e9`) in the body; the signature covers the raw bytes.
    let body = data("nextcloud_create.json");
    let response =
        post_talk(&server, &body, TALK_RANDOM, &nextcloud::sign(TALK_SECRET, TALK_RANDOM, &body))
            .await;
    assert_eq!(response.status(), 200, "{}", server.output());
    wait_until(ANSWER_LIMIT, "the answer at the Talk stand-in", || !talk.messages().is_empty())
        .await;

    let reply = &talk.messages()[0];
    assert_eq!(reply.path, format!("/ocs/v2.php/apps/spreed/api/v1/bot/{ROOM}/message"));
    assert_signed_talk_reply(reply);
    let reply_body = reply.json();
    assert_eq!(reply_body["replyTo"], 1567);
    assert!(!reply_body["message"].as_str().unwrap().trim().is_empty());

    // The same message delivered again (fresh random and signature): answered once.
    assert_eq!(post_talk_signed(&server, &body).await.status(), 200);
    // Join is recorded; reactions are accepted and ignored.
    assert_eq!(post_talk_signed(&server, &data("nextcloud_join.json")).await.status(), 200);
    let like = json!({"type": "Like", "actor": {"type": "Person", "id": "users/ada-lovelace"},
                      "object": {"type": "Note", "id": "1567"}, "content": "👍",
                      "target": {"type": "Collection", "id": ROOM}});
    assert_eq!(post_talk_signed(&server, like.to_string().as_bytes()).await.status(), 200);
    let pool = open_db(&server.data_dir).await;
    wait_for_idle_queue(&pool).await;
    assert_eq!(talk.messages().len(), 1, "a redelivery was answered twice");

    let rows = inbound::list(&pool).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0].external_id.as_str(), rows[0].status),
        ("1567", QueueStatus::Done),
        "{rows:?}\n{}",
        server.output()
    );
    assert!(rows[1].external_id.starts_with("join:"));
    assert_eq!(rows[1].status, QueueStatus::Done);
    let conv = memory::get_or_create_conversation(&pool, ChannelKind::Nextcloud, ROOM, None)
        .await
        .unwrap();
    let history = memory::history(&pool, conv.id, 10).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0].content, "hi @world, café at 5/6 ? see notes.md");
    assert_answered_by_the_real_model(&history[1]);
    assert_eq!(reply_body["message"].as_str().unwrap(), history[1].content.trim());
    assert_eq!(history[1].external_id.as_deref(), reply_body["referenceId"].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_rejections_store_and_send_nothing() {
    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let mut env = server_env(Some(&graph), Some(&talk));
    env.push(("MAX_BODY_BYTES".into(), "4096".into()));
    let server = start_server(env, None);

    // WhatsApp.
    let body = data("whatsapp_text.json");
    let good = whatsapp::sign(APP_SECRET, &body);
    assert_eq!(post_whatsapp(&server, &body, None).await.status(), 401);
    assert_eq!(post_whatsapp(&server, &body, Some("sha256=00")).await.status(), 401);
    assert_eq!(
        post_whatsapp(&server, &body, Some(&whatsapp::sign("wrong", &body))).await.status(),
        401
    );
    assert_eq!(
        post_whatsapp(&server, &body, Some(good.trim_start_matches("sha256="))).await.status(),
        401
    );
    // Re-serialising turns `\u00e9` into UTF-8: the original signature no longer matches.
    let value: Value = serde_json::from_slice(&body).unwrap();
    let reserialised = serde_json::to_vec(&value).unwrap();
    assert_ne!(reserialised, body);
    let response = post_whatsapp(&server, &reserialised, Some(&good)).await;
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "bad_signature");
    assert_eq!(post_whatsapp_signed(&server, b"{not json").await.status(), 400);
    let unknown = json!({"object": "page", "entry": [{"id": "1", "changes": []}]}).to_string();
    assert_eq!(post_whatsapp_signed(&server, unknown.as_bytes()).await.status(), 200);
    let big = whatsapp_text("wamid.BIG", USER_NUMBER, &"x".repeat(5000));
    assert_eq!(post_whatsapp_signed(&server, &big).await.status(), 413);
    let stranger = whatsapp_text("wamid.STRANGER", "33699999999", "let me in");
    assert_eq!(post_whatsapp_signed(&server, &stranger).await.status(), 200);

    // Nextcloud Talk.
    let body = data("nextcloud_create.json");
    let signature = nextcloud::sign(TALK_SECRET, TALK_RANDOM, &body);
    let no_headers = client().post(server.url("/api/webhook/nextcloud")).body(body.clone()).send();
    assert_eq!(no_headers.await.unwrap().status(), 401);
    assert_eq!(post_talk(&server, &body, TALK_RANDOM, &"0".repeat(64)).await.status(), 401);
    assert_eq!(post_talk(&server, &body, &TALK_RANDOM[1..], &signature).await.status(), 401);
    let value: Value = serde_json::from_slice(&body).unwrap();
    let reserialised = serde_json::to_vec(&value).unwrap();
    assert_eq!(post_talk(&server, &reserialised, TALK_RANDOM, &signature).await.status(), 401);
    assert_eq!(post_talk_signed(&server, b"[1, 2").await.status(), 400);
    let big = talk_create("9001", "users/ada-lovelace", &"y".repeat(5000));
    assert_eq!(post_talk_signed(&server, &big).await.status(), 413);
    let system = json!({"type": "Activity", "actor": {"type": "Person", "id": "users/ada-lovelace"},
                        "object": {"type": "Note", "id": "9002", "name": "call_started", "content": "{}"},
                        "target": {"type": "Collection", "id": ROOM}});
    // Uppercase hex is accepted (Nextcloud lowercases before comparing).
    let system = system.to_string().into_bytes();
    let upper = nextcloud::sign(TALK_SECRET, TALK_RANDOM, &system).to_uppercase();
    assert_eq!(post_talk(&server, &system, TALK_RANDOM, &upper).await.status(), 200);
    let from_bot = talk_create("9003", "bots/bot-123", "beep");
    assert_eq!(post_talk_signed(&server, &from_bot).await.status(), 200);
    let from_mallory = talk_create("9004", "users/mallory", "let me in");
    assert_eq!(post_talk_signed(&server, &from_mallory).await.status(), 200);

    // Every answer above came after its rows were stored: with nothing pending or being
    // processed, nothing can be sent any more.
    let pool = open_db(&server.data_dir).await;
    wait_for_idle_queue(&pool).await;
    assert!(graph.all().is_empty(), "something was sent to WhatsApp: {:?}", graph.all());
    assert!(talk.all().is_empty(), "something was sent to Talk: {:?}", talk.all());
    assert!(memory::list_conversations(&pool, 10).await.unwrap().is_empty());
    // Disallowed senders leave only a marker row, without their message.
    let rows = inbound::list(&pool).await.unwrap();
    let summary: Vec<(&str, QueueStatus, &str)> =
        rows.iter().map(|r| (r.external_id.as_str(), r.status, r.payload.as_str())).collect();
    assert_eq!(
        summary,
        [("wamid.STRANGER", QueueStatus::Ignored, "{}"), ("9004", QueueStatus::Ignored, "{}")]
    );
    assert_eq!(
        inbound::last_inbound_at(&pool, ChannelKind::WhatsApp, "33699999999").await.unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_message_is_answered_after_kill_9_and_restart() {
    let graph = StandIn::start(Kind::Graph).await;
    // The read receipt is held for 3 s, so the worker is still before the model when the
    // process is killed right after the webhook's 200.
    *graph.read_delay.lock().unwrap() = Duration::from_secs(3);
    let data_dir = tempfile::tempdir().expect("temp dir");
    let env = server_env(Some(&graph), None);
    let mut first = start_server(env.clone(), Some(data_dir.path().to_path_buf()));
    let body = whatsapp_text("wamid.CRASH", USER_NUMBER, "Say hello.");
    let response = post_whatsapp_signed(&first, &body).await;
    assert_eq!(response.status(), 200);
    first.kill_9();
    assert!(graph.messages().is_empty(), "answered before the kill; the test proves nothing");

    let second = start_server(env, Some(data_dir.path().to_path_buf()));
    wait_until(ANSWER_LIMIT, "the answer after the restart", || !graph.messages().is_empty()).await;
    let pool = open_db(data_dir.path()).await;
    wait_for_idle_queue(&pool).await;
    assert_eq!(graph.messages().len(), 1, "{}", second.output());
    let row = inbound::get(&pool, ChannelKind::WhatsApp, "wamid.CRASH").await.unwrap().unwrap();
    assert_eq!(row.status, QueueStatus::Done);
    // One complete attempt, after one interrupted by the kill (unless the kill landed before
    // the worker had claimed the row at all).
    assert!(matches!(row.attempts, 1 | 2), "{row:?}");
    let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, USER_NUMBER, None)
        .await
        .unwrap();
    let history = memory::history(&pool, conv.id, 10).await.unwrap();
    assert_eq!(history.iter().filter(|m| m.role == Role::User).count(), 1, "{history:?}");
    assert_eq!(history.len(), 2, "{history:?}");
    assert_answered_by_the_real_model(&history[1]);
    drop(second);
}

// --- in-process: the real gateway, queue worker and assistant over a scripted model ----------

/// Decides a call: (question, times asked before, questions answered so far) → a refusal.
type Script = dyn Fn(&str, usize, &[String]) -> Option<LlmError> + Send + Sync;

/// A model stand-in behind the real `Assistant` and router: answers `echo: <question>`, or
/// `QueueFull` (the engine is busy) or `ContextOverflow` as `script` decides for each call
/// (the question and how many times it was asked before). It counts the streams running at
/// once and the questions it answered, in order.
struct ScriptedEngine {
    script: Box<Script>,
    asked: Mutex<std::collections::HashMap<String, usize>>,
    answered: Arc<Mutex<Vec<String>>>,
    calls: AtomicUsize,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    delay: Duration,
}

impl ScriptedEngine {
    fn new(
        script: impl Fn(&str, usize, &[String]) -> Option<LlmError> + Send + Sync + 'static,
    ) -> Arc<ScriptedEngine> {
        Arc::new(ScriptedEngine {
            script: Box::new(script),
            asked: Mutex::default(),
            answered: Arc::default(),
            calls: AtomicUsize::new(0),
            active: Arc::default(),
            max_active: Arc::default(),
            delay: Duration::from_millis(30),
        })
    }
}

impl Provider for ScriptedEngine {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "scripted".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let question = request.messages.last().map(|m| m.content.clone()).unwrap_or_default();
        let before = {
            let mut asked = self.asked.lock().unwrap();
            let n = asked.entry(question.clone()).or_insert(0);
            *n += 1;
            *n - 1
        };
        let refusal = {
            let answered = self.answered.lock().unwrap();
            (self.script)(&question, before, &answered)
        };
        let (answered, active, max_active, delay) =
            (self.answered.clone(), self.active.clone(), self.max_active.clone(), self.delay);
        Box::pin(async move {
            if let Some(error) = refusal {
                return Err(error);
            }
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let _ = tx.send(Ok(Chunk::Text(format!("echo: {question}")))).await;
                answered.lock().unwrap().push(question);
                active.fetch_sub(1, Ordering::SeqCst);
                let usage = Usage { prompt_tokens: 10, completion_tokens: 3, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }
}

/// The gateway (real HTTP on 127.0.0.1), the queue worker and the assistant in this process,
/// over a scripted model, with WhatsApp and Talk clients pointed at stand-ins.
struct InProcess {
    base: String,
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    worker: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

const IN_PROCESS_TOKEN: &str = "in-process-token-0123456789";

fn queue_config() -> QueueConfig {
    QueueConfig {
        busy_backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(100) },
        ..QueueConfig::default()
    }
}

async fn in_process(
    graph: &StandIn,
    talk: Option<&StandIn>,
    engine: Arc<ScriptedEngine>,
    allowed: &[&str],
) -> InProcess {
    in_process_with(graph, talk, engine, allowed, AgentConfig::default(), whatsapp::REQUEST_TIMEOUT)
        .await
}

/// `in_process` with any model, the tools of `agent`, and clients that wait at most
/// `request_timeout` for each answer of the Graph and Talk stand-ins.
async fn in_process_with(
    graph: &StandIn,
    talk: Option<&StandIn>,
    engine: Arc<dyn Provider>,
    allowed: &[&str],
    agent: AgentConfig,
    request_timeout: Duration,
) -> InProcess {
    let (dir, pool) = fresh_pool().await;
    let router = ModelRouter::with_providers(engine, std::collections::HashMap::new(), Tier::Main);
    let assistant = Arc::new(Assistant::with_agent(
        pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 32 },
        agent,
    ));
    let mut settings = whatsapp_settings(&graph.base, None);
    settings.allowed_numbers = allowed.iter().map(|n| n.to_string()).collect();
    let http = reqwest::Client::new();
    let mut list: Vec<Arc<dyn Channel>> = vec![Arc::new(
        WhatsApp::new(settings, http.clone(), pool.clone())
            .with_retry(fast_retry())
            .with_request_timeout(request_timeout),
    )];
    if let Some(talk) = talk {
        let nc = Nextcloud::new(
            nextcloud_settings(&talk.base, Some(vec!["users/ada-lovelace".into()])),
            http,
        )
        .with_retry(fast_retry())
        .with_request_timeout(request_timeout);
        list.push(Arc::new(nc));
    }
    let channels = Channels::new(list);
    let state = AppState {
        pool: pool.clone(),
        assistant: assistant.clone(),
        webchat_token: Secret::new(IN_PROCESS_TOKEN),
        started_at: Instant::now(),
        data_dir: Arc::new(dir.path().to_path_buf()),
        max_body_bytes: 1 << 20,
        reply_max_tokens: 32,
        channels: channels.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, my_claw::gateway::router(state)).await;
    });
    let worker =
        queue::spawn_worker(pool.clone(), assistant.clone(), channels.clone(), queue_config());
    InProcess { base, pool, assistant, channels, worker, _dir: dir }
}

impl InProcess {
    async fn post_whatsapp(&self, body: &[u8]) -> reqwest::Response {
        client()
            .post(format!("{}/api/webhook/whatsapp", self.base))
            .header("content-type", "application/json")
            .header("X-Hub-Signature-256", whatsapp::sign(APP_SECRET, body))
            .body(body.to_vec())
            .send()
            .await
            .expect("post whatsapp webhook")
    }

    async fn post_talk(&self, body: &[u8]) -> reqwest::Response {
        client()
            .post(format!("{}/api/webhook/nextcloud", self.base))
            .header("content-type", "application/json")
            .header("X-Nextcloud-Talk-Random", TALK_RANDOM)
            .header("X-Nextcloud-Talk-Signature", nextcloud::sign(TALK_SECRET, TALK_RANDOM, body))
            .body(body.to_vec())
            .send()
            .await
            .expect("post talk webhook")
    }

    async fn health_queue(&self) -> Value {
        let health: Value = client()
            .get(format!("{}/api/health", self.base))
            .bearer_auth(IN_PROCESS_TOKEN)
            .send()
            .await
            .expect("health")
            .json()
            .await
            .expect("health json");
        health["inbound_queue"].clone()
    }

    /// Waits (bounded) until the WhatsApp row of `external_id` is in a final state, and
    /// returns it.
    async fn final_row(&self, external_id: &str) -> inbound::QueueEntry {
        self.final_row_of(ChannelKind::WhatsApp, external_id).await
    }

    /// `final_row` for the row of `external_id` on `channel`.
    async fn final_row_of(&self, channel: ChannelKind, external_id: &str) -> inbound::QueueEntry {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            let row = inbound::get(&self.pool, channel, external_id).await.unwrap();
            if let Some(row) =
                row.filter(|r| !matches!(r.status, QueueStatus::Pending | QueueStatus::Processing))
            {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("row {external_id} did not reach a final state");
    }
}

/// A WhatsApp notification carrying several raw message objects at once.
fn whatsapp_batch(messages: &[String]) -> Vec<u8> {
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550783881","phone_number_id":"{PHONE_NUMBER_ID}"}},"contacts":[{{"profile":{{"name":"Tester"}},"wa_id":"{USER_NUMBER}"}}],"messages":[{}]}}}}]}}]}}"#,
        messages.join(",")
    )
    .into_bytes()
}

fn raw_text_message(id: &str, from: &str, text: &str) -> String {
    json!({"from": from, "id": id, "timestamp": chrono::Utc::now().timestamp().to_string(),
           "type": "text", "text": {"body": text}})
    .to_string()
}

#[tokio::test]
async fn talk_room_token_and_phone_number_id_stay_one_path_segment() {
    // A room token from a signed webhook must not walk out of the bot API path.
    let talk = StandIn::start(Kind::Talk).await;
    let nc = Nextcloud::new(nextcloud_settings(&talk.base, None), reqwest::Client::new())
        .with_retry(fast_retry());
    nc.send_message("../../../../evil?x=", "hello", None).await.expect("sent");
    let sent = talk.all();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].path,
        "/ocs/v2.php/apps/spreed/api/v1/bot/..%2F..%2F..%2F..%2Fevil%3Fx%3D/message"
    );
    // `..` alone cannot be encoded safely (URL parsers resolve `%2E%2E` too): refused.
    assert!(nc.send_message("..", "hello", None).await.is_err());
    assert_eq!(talk.all().len(), 1);

    // The same for WhatsApp's phone number id, in the Graph API path.
    let graph = StandIn::start(Kind::Graph).await;
    let (_dir, pool) = fresh_pool().await;
    let mut settings = whatsapp_settings(&graph.base, None);
    settings.phone_number_id = "1/../../me?fields=x".into();
    let wa = WhatsApp::new(settings, reqwest::Client::new(), pool).with_retry(fast_retry());
    wa.send_text(USER_NUMBER, "hi").await.expect("sent");
    assert_eq!(graph.all()[0].path, "/v26.0/1%2F..%2F..%2Fme%3Ffields%3Dx/messages");
}

/// Collects what the fmt subscriber writes, for assertions on log lines.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime: every task of this test runs on the thread whose default
// subscriber captures the logs.
#[tokio::test]
async fn logs_never_carry_personal_ids_or_forged_lines() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, Some(&talk), engine, &[USER_NUMBER]).await;

    // A Talk actor id with a newline and a fake log line, not in the allow-list.
    let forged = "users/mallory\nINFO my_claw: forged line";
    let body = talk_create("4242", forged, "hello");
    assert_eq!(app.post_talk(&body).await.status(), 200);
    // A stranger's number, and a message whose `from` has the wrong type: serde's message
    // would quote the number.
    let batch = whatsapp_batch(&[
        raw_text_message("wamid.STRANGER", "33699999999", "let me in"),
        r#"{"from": 33612345678, "id": "wamid.BADTYPE", "type": "text", "text": {"body": "x"}}"#
            .to_string(),
    ]);
    assert_eq!(app.post_whatsapp(&batch).await.status(), 200);
    // A signed Talk body that is not an activity: the parse error must not quote it.
    let junk = br#"{"type": "Create", "actor": 33655555555}"#;
    assert_eq!(app.post_talk(junk).await.status(), 400);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("actor not in NEXTCLOUD_ALLOWED_USERS"), "{text}");
    assert!(text.contains("…line"), "the actor id is redacted the one way: {text}");
    for secret in ["mallory", "33699999999", "33612345678", "33655555555"] {
        assert!(!text.contains(secret), "{secret} is in the logs:\n{text}");
    }
    for line in text.lines() {
        assert!(!line.trim_start().starts_with("INFO my_claw: forged"), "forged line: {text}");
    }
    let row = inbound::get(&app.pool, ChannelKind::WhatsApp, "wamid.BADTYPE").await.unwrap();
    let note = row.expect("rejected row").last_error.unwrap_or_default();
    assert!(note.contains("invalid type") && !note.contains("33612345678"), "{note}");
}

#[tokio::test]
async fn a_bad_message_in_a_batch_is_rejected_and_the_rest_answered() {
    let graph = StandIn::start(Kind::Graph).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine, &[USER_NUMBER]).await;
    let deep = format!(
        r#"{{"from":"{USER_NUMBER}","id":"wamid.DEEP","type":"text","text":{{"body":{}"x"{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    // Meta's batch: a good message, a lone surrogate, a too-deep field, a wrong type, a good
    // one. The signature covers the raw bytes as sent. The first two bad ones name their
    // (allowed) sender, who is told; the third names no sender that can be read.
    let batch = whatsapp_batch(&[
        raw_text_message("wamid.GOOD1", USER_NUMBER, "first"),
        format!(
            r#"{{"from":"{USER_NUMBER}","id":"wamid.SURROGATE","type":"text","text":{{"body":"a \ud800 b"}}}}"#
        ),
        deep,
        r#"{"from":["16505551234"],"id":"wamid.TYPE","type":"text"}"#.to_string(),
        raw_text_message("wamid.GOOD2", USER_NUMBER, "second"),
    ]);
    let response = app.post_whatsapp(&batch).await;
    assert_eq!(response.status(), 200, "the batch is acknowledged, so Meta does not redeliver it");
    for bad in ["wamid.SURROGATE", "wamid.DEEP", "wamid.TYPE"] {
        let row = app.final_row(bad).await;
        assert_eq!(row.status, QueueStatus::Rejected, "{row:?}");
        assert!(row.last_error.as_deref().unwrap().starts_with("unreadable message"));
        // Nothing of the unreadable content is kept.
        assert!(!row.payload.contains("\\ud800") && !row.payload.contains("[["), "{row:?}");
    }
    assert_eq!(app.final_row("wamid.TYPE").await.payload, "{}");
    assert_eq!(app.final_row("wamid.GOOD1").await.status, QueueStatus::Done);
    assert_eq!(app.final_row("wamid.GOOD2").await.status, QueueStatus::Done);
    let mut replies: Vec<(String, String)> = graph
        .messages()
        .iter()
        .map(|r| {
            let json = r.json();
            let body = json["text"]["body"].as_str().unwrap().to_string();
            let tag = json["biz_opaque_callback_data"].as_str().unwrap_or_default();
            (tag.trim_start_matches("my-claw:answer-to:").to_string(), body)
        })
        .collect();
    replies.sort();
    let unreadable = queue::UNREADABLE_REPLY.to_string();
    let expected = [
        ("wamid.DEEP", unreadable.as_str()),
        ("wamid.GOOD1", "echo: first"),
        ("wamid.GOOD2", "echo: second"),
        ("wamid.SURROGATE", unreadable.as_str()),
    ];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(c, b)| (c.to_string(), b.to_string())).collect();
    assert_eq!(replies, expected, "each readable sender is answered once");
    // A redelivery of the same batch changes nothing.
    assert_eq!(app.post_whatsapp(&batch).await.status(), 200);
    assert_eq!(inbound::list(&app.pool).await.unwrap().len(), 5);
    assert_eq!(app.health_queue().await["rejected"], 3);
}

#[tokio::test]
async fn a_stop_while_sending_never_sends_the_answer_twice() {
    let graph = StandIn::start(Kind::Graph).await;
    // The Graph API holds the answer's send: the process "stops" while it is in flight.
    *graph.send_delay.lock().unwrap() = Some(Duration::from_secs(60));
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine.clone(), &[USER_NUMBER]).await;
    let body = whatsapp_text("wamid.SENDING", USER_NUMBER, "Say hello.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    wait_until(Duration::from_secs(60), "the send at the Graph stand-in", || {
        !graph.messages().is_empty()
    })
    .await;
    // The stop: the worker and every send it runs end here, as with kill -9 (the database
    // keeps what was committed).
    app.worker.abort();
    wait_until(Duration::from_secs(10), "the first worker to stop", || app.worker.is_finished())
        .await;

    // The next run recovers the row and finds the answer recorded as `sending`.
    let second = queue::spawn_worker(
        app.pool.clone(),
        app.assistant.clone(),
        app.channels.clone(),
        queue_config(),
    );
    let row = app.final_row("wamid.SENDING").await;
    assert_eq!(row.status, QueueStatus::DeliveryUnknown, "{row:?}");
    assert_eq!(graph.messages().len(), 1, "the answer was sent twice");
    // "Typing" was shown while the first run generated, not again for an answer that is
    // never going to be sent.
    let typing =
        graph.all().iter().filter(|r| r.json()["typing_indicator"]["type"] == "text").count();
    assert_eq!(typing, 1, "a typing indicator for an answer that is not sent");
    assert_eq!(engine.calls.load(Ordering::SeqCst), 1, "the answer was generated twice");
    let conv =
        memory::get_or_create_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER, None)
            .await
            .unwrap();
    let history = memory::history(&app.pool, conv.id, 10).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1].delivery_status.as_deref(), Some("unknown"));
    assert!(history[1].delivery_error.as_deref().unwrap().contains("not sent again"));
    assert_eq!(app.health_queue().await["delivery_unknown"], 1);

    // The held send carried the question's id; when Meta did accept it, its status report
    // brings it back and the answer's fate is known after all.
    let held = graph.messages()[0].json();
    assert_eq!(held["biz_opaque_callback_data"], "my-claw:answer-to:wamid.SENDING");
    let late =
        String::from_utf8(whatsapp_status("wamid.LATE", "delivered", json!([]))).unwrap().replace(
            r#""recipient_id""#,
            r#""biz_opaque_callback_data":"my-claw:answer-to:wamid.SENDING","recipient_id""#,
        );
    assert_eq!(app.post_whatsapp(late.as_bytes()).await.status(), 200);
    let answer = memory::get_message(&app.pool, history[1].id).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("delivered"));
    assert_eq!(answer.external_id.as_deref(), Some("wamid.LATE"));
    let row = inbound::get(&app.pool, ChannelKind::WhatsApp, "wamid.SENDING").await.unwrap();
    assert_eq!(row.unwrap().status, QueueStatus::Done);
    assert_eq!(graph.messages().len(), 1);
    second.abort();
}

#[tokio::test]
async fn an_over_long_message_gets_a_short_reply_without_the_engine() {
    let graph = StandIn::start(Kind::Graph).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine.clone(), &[USER_NUMBER]).await;
    let long = "word ".repeat(1000);
    let body = whatsapp_text("wamid.LONG", USER_NUMBER, long.trim());
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let row = app.final_row("wamid.LONG").await;
    assert_eq!(row.status, QueueStatus::Rejected, "{row:?}");
    assert!(row.last_error.as_deref().unwrap().contains("4999 characters"), "{row:?}");
    // The message is kept in the row, not lost.
    assert!(row.payload.contains("word word"));
    let replies = graph.messages();
    assert_eq!(replies.len(), 1);
    let reply = replies[0].json()["text"]["body"].as_str().unwrap().to_string();
    assert!(reply.contains("4999 characters") && reply.contains("4000"), "{reply}");
    assert_eq!(engine.calls.load(Ordering::SeqCst), 0, "the engine was asked");
    assert!(memory::list_conversations(&app.pool, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_engine_every_one_of_20_messages_answered_once_in_order() {
    let graph = StandIn::start(Kind::Graph).await;
    // Every question is refused twice with `QueueFull` before it is answered.
    let engine = ScriptedEngine::new(|_, before, _| (before < 2).then_some(LlmError::QueueFull));
    let numbers = ["33600000001", "33600000002", "33600000003", "33600000004"];
    let app = in_process(&graph, None, engine.clone(), &numbers).await;
    for i in 0..20 {
        let from = numbers[i % numbers.len()];
        let body = whatsapp_text(&format!("wamid.BUSY{i}"), from, &format!("question {i}"));
        assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    }
    wait_until(Duration::from_secs(120), "20 answers", || graph.messages().len() >= 20).await;
    for i in 0..20 {
        let row = app.final_row(&format!("wamid.BUSY{i}")).await;
        assert_eq!(row.status, QueueStatus::Done, "{row:?}");
        assert!(row.retries >= 2, "{row:?}");
    }
    let sent: Vec<(String, String)> = graph
        .messages()
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["to"].as_str().unwrap().to_string(),
                body["text"]["body"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(sent.len(), 20, "{sent:?}");
    for (n, number) in numbers.iter().enumerate() {
        // Each conversation's answers, in the order its questions came.
        let theirs: Vec<&str> =
            sent.iter().filter(|(to, _)| to == number).map(|(_, text)| text.as_str()).collect();
        let expected: Vec<String> = (0..20)
            .filter(|i| i % numbers.len() == n)
            .map(|i| format!("echo: question {i}"))
            .collect();
        assert_eq!(theirs, expected, "{number}");
        let conv =
            memory::get_or_create_conversation(&app.pool, ChannelKind::WhatsApp, number, None)
                .await
                .unwrap();
        let history = memory::history(&app.pool, conv.id, 50).await.unwrap();
        assert_eq!(history.len(), 10, "each question stored once, each answer once: {history:?}");
    }
    assert!(
        engine.max_active.load(Ordering::SeqCst) >= 2,
        "different conversations were never answered at once"
    );
    let queue = app.health_queue().await;
    assert_eq!(
        (queue["failed"].as_i64(), queue["pending"].as_i64(), queue["retrying"].as_i64()),
        (Some(0), Some(0), Some(0)),
        "{queue}"
    );
}

/// Four WebChat streams and twenty WhatsApp messages from four numbers arrive at once at
/// the real binary with the real model (four engine slots): every message is answered once,
/// each conversation in the order its messages came, and nothing is left failed or waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_webchat_streams_and_20_whatsapp_messages_at_once_are_all_answered() {
    let graph = StandIn::start(Kind::Graph).await;
    let numbers = ["33600000001", "33600000002", "33600000003", "33600000004"];
    let mut env = server_env(Some(&graph), None);
    env.retain(|(key, _)| key != "WHATSAPP_ALLOWED_NUMBERS" && key != "LOG");
    env.push(("WHATSAPP_ALLOWED_NUMBERS".into(), numbers.map(|n| format!("+{n}")).join(",")));
    env.push(("ENGINE_PARALLEL".into(), "4".into()));
    let server = start_server(env, None);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();

    let chats = (0..4).map(|i| {
        let request = http
            .post(server.url("/api/chat"))
            .bearer_auth(&server.token)
            .json(&json!({"message": format!("Name one animal that starts with the letter {}.", ["B", "C", "D", "F"][i])}));
        async move {
            let response = request.send().await.expect("POST /api/chat");
            assert_eq!(response.status(), 200);
            let mut reader = crate::gateway::SseReader::new(response);
            let mut events = Vec::new();
            while let Some(event) = reader.next_json(ANSWER_LIMIT).await {
                events.push(event);
            }
            events
        }
    });
    // One sender per number, each posting its five messages one after the other (a post
    // returns once the message is stored, so this is the order they came in), all at once.
    let posts = numbers.iter().enumerate().map(|(n, number)| {
        let server = &server;
        async move {
            let mut statuses = Vec::new();
            for i in (0..20).filter(|i| i % 4 == n) {
                let body =
                    whatsapp_text(&format!("wamid.LOAD{i}"), number, &format!("question {i}"));
                statuses.push(post_whatsapp_signed(server, &body).await.status());
            }
            statuses
        }
    });
    let (streams, statuses) =
        tokio::join!(futures::future::join_all(chats), futures::future::join_all(posts));
    let statuses: Vec<_> = statuses.into_iter().flatten().collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    for events in &streams {
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(kinds.first(), Some(&"meta"), "{events:?}");
        assert_eq!(kinds.iter().filter(|k| **k == "done").count(), 1, "{events:?}");
        assert!(kinds.contains(&"token"), "{events:?}");
        assert!(!kinds.contains(&"error"), "{events:?}");
        let done = events.iter().find(|e| e["type"] == "done").unwrap();
        assert_ne!(done["finish"], "cancelled", "{done}");
        let id = events[0]["conversation_id"].as_i64().expect("conversation id");
        let page: Value = http
            .get(server.url(&format!("/api/conversations/{id}/messages")))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let stored = page["messages"].as_array().unwrap();
        let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant"], "{stored:?}");
        assert_eq!(stored[1]["status"], "complete", "{stored:?}");
    }

    wait_until(ANSWER_LIMIT, "20 WhatsApp answers", || graph.messages().len() >= 20).await;
    let pool = open_db(&server.data_dir).await;
    wait_for_idle_queue(&pool).await;
    assert_eq!(graph.messages().len(), 20, "each message answered once");
    for (n, number) in numbers.iter().enumerate() {
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, number, None)
            .await
            .unwrap();
        let history = memory::history(&pool, conv.id, 50).await.unwrap();
        let questions: Vec<&str> =
            history.iter().filter(|m| m.role == Role::User).map(|m| m.content.as_str()).collect();
        let expected: Vec<String> =
            (0..20).filter(|i| i % 4 == n).map(|i| format!("question {i}")).collect();
        assert_eq!(questions, expected, "{number}: in the order they came");
        assert_eq!(history.len(), 10, "{number}: each answered once: {history:?}");
        for pair in history.chunks(2) {
            assert_eq!(pair[0].role, Role::User, "{history:?}");
            assert_answered_by_the_real_model(&pair[1]);
        }
        let sent = graph.messages().iter().filter(|r| r.json()["to"] == *number).count();
        assert_eq!(sent, 5, "{number}");
    }
    for i in 0..20 {
        let row = inbound::get(&pool, ChannelKind::WhatsApp, &format!("wamid.LOAD{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.status, QueueStatus::Done, "{row:?}");
    }
}

#[tokio::test]
async fn a_busy_conversation_does_not_hold_the_others() {
    let graph = StandIn::start(Kind::Graph).await;
    // The engine stays busy for A's question until B's has been answered.
    let engine = ScriptedEngine::new(|question, _, answered| {
        (question == "from A" && !answered.iter().any(|q| q == "from B"))
            .then_some(LlmError::QueueFull)
    });
    let (a, b) = ("33600000001", "33600000002");
    let app = in_process(&graph, None, engine, &[a, b]).await;
    assert_eq!(app.post_whatsapp(&whatsapp_text("wamid.A", a, "from A")).await.status(), 200);
    // A is refused at least once before B even arrives.
    let started = Instant::now();
    while inbound::get(&app.pool, ChannelKind::WhatsApp, "wamid.A").await.unwrap().unwrap().retries
        == 0
    {
        assert!(started.elapsed() < Duration::from_secs(30), "A was never tried");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.post_whatsapp(&whatsapp_text("wamid.B", b, "from B")).await.status(), 200);
    assert_eq!(app.final_row("wamid.A").await.status, QueueStatus::Done);
    assert_eq!(app.final_row("wamid.B").await.status, QueueStatus::Done);
    let order: Vec<String> =
        graph.messages().iter().map(|r| r.json()["to"].as_str().unwrap().to_string()).collect();
    assert_eq!(order, [b, a]);
}

#[tokio::test]
async fn a_message_too_large_for_the_model_gets_a_reply_saying_so() {
    let graph = StandIn::start(Kind::Graph).await;
    let engine = ScriptedEngine::new(|question, _, _| {
        question.starts_with("enormous").then_some(LlmError::ContextOverflow {
            n_tokens: 9000,
            answer_room: 0,
            n_ctx: 8192,
        })
    });
    let app = in_process(&graph, None, engine, &[USER_NUMBER]).await;
    let body = whatsapp_text("wamid.HUGE", USER_NUMBER, "enormous question");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let row = app.final_row("wamid.HUGE").await;
    assert_eq!(row.status, QueueStatus::Failed, "{row:?}");
    assert!(row.last_error.as_deref().unwrap().contains("the user was told"), "{row:?}");
    assert_eq!(row.retries, 0, "a permanent failure is not retried");
    let replies = graph.messages();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].json()["text"]["body"], queue::TOO_LARGE_REPLY);
    assert_eq!(app.health_queue().await["failed"], 1);
}

/// The model refuses a message for good (too large even alone) while the Graph API is down
/// for longer than the quick retries: the reply saying so waits for the API like an answer
/// would, and reaches the user once it is back. Before, the row failed at once with
/// "telling the user failed" and the user never heard anything.
#[tokio::test]
async fn a_refusal_met_by_a_channel_outage_still_reaches_the_user() {
    let graph = StandIn::start(Kind::Graph).await;
    let outage: Vec<(u16, Value)> = (0..6).map(|_| (503, graph_error(1))).collect();
    graph.script(&outage);
    let engine = ScriptedEngine::new(|question, _, _| {
        question.starts_with("enormous").then_some(LlmError::ContextOverflow {
            n_tokens: 9000,
            answer_room: 0,
            n_ctx: 8192,
        })
    });
    let app = in_process(&graph, None, engine, &[USER_NUMBER]).await;
    let body = whatsapp_text("wamid.HUGE2", USER_NUMBER, "enormous question");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let row = app.final_row("wamid.HUGE2").await;
    assert_eq!(row.status, QueueStatus::Failed, "{row:?}");
    assert!(row.retries >= 1, "waited for the channel: {row:?}");
    assert!(row.last_error.as_deref().unwrap().contains("the user was told"), "{row:?}");
    let replies = graph.messages();
    assert_eq!(replies.len(), 7, "six refused tries, then the reply");
    assert!(replies.iter().all(|r| r.json()["text"]["body"] == queue::TOO_LARGE_REPLY));
}

// --- issue 15: the agent loop on a channel -------------------------------------------------

#[tokio::test]
async fn whatsapp_gets_only_the_final_text_of_an_answer_that_used_tools() {
    use crate::agent::{call, Echo, Scripted, ToolModel};

    let graph = StandIn::start(Kind::Graph).await;
    let model = ToolModel::new(|_, n| match n {
        0 => (vec!["Checking the echo…".into()], vec![call("call_1", "echo", r#"{"text":"hi"}"#)]),
        _ => (vec!["The echo says hi.".into()], vec![]),
    });
    let echo = Arc::new(Echo::default());
    let mut tools = my_claw::tools::ToolRegistry::new();
    tools.register(echo.clone());
    let agent = AgentConfig { tools, max_steps: 5 };
    let engine: Arc<dyn Provider> = Arc::new(Scripted(model.clone()));
    let app =
        in_process_with(&graph, None, engine, &[USER_NUMBER], agent, whatsapp::REQUEST_TIMEOUT)
            .await;

    let body = whatsapp_batch(&[raw_text_message("wamid.TOOLS", USER_NUMBER, "echo hi")]);
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    assert_eq!(app.final_row("wamid.TOOLS").await.status, QueueStatus::Done);
    let bodies: Vec<String> = graph
        .messages()
        .iter()
        .map(|r| r.json()["text"]["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(bodies, ["The echo says hi."], "the text before the call is not sent");

    // The tool ran for this WhatsApp conversation, and the answer keeps its round.
    let contexts = echo.contexts.lock().unwrap().clone();
    assert_eq!(contexts.len(), 1);
    assert_eq!(contexts[0].channel, ChannelKind::WhatsApp);
    assert_eq!(contexts[0].conversation_key, USER_NUMBER);
    let conversation = memory::find_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER)
        .await
        .unwrap()
        .expect("the conversation");
    let stored = memory::history(&app.pool, conversation.id, 10).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].content, "The echo says hi.");
    assert_eq!(stored[1].tool_rounds.len(), 1);
    assert_eq!(stored[1].tool_rounds[0].calls[0].name, "echo");
    assert_eq!(stored[1].tool_rounds[0].results[0].content, "hi");
}

#[tokio::test]
async fn an_outage_longer_than_the_quick_retries_is_waited_out_not_dropped() {
    let graph = StandIn::start(Kind::Graph).await;
    // Six server errors: the four quick tries of the first send all fail, and the queue's
    // next try of the message gets two more before the Graph API is back.
    let outage: Vec<(u16, Value)> = (0..6).map(|_| (500, graph_error(1))).collect();
    graph.script(&outage);
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine.clone(), &[USER_NUMBER]).await;
    let body = whatsapp_text("wamid.OUTAGE", USER_NUMBER, "Say hello.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);

    let row = app.final_row("wamid.OUTAGE").await;
    assert_eq!(row.status, QueueStatus::Done, "{row:?}");
    assert!(row.retries >= 1, "answered without going back to the queue: {row:?}");
    let sends = graph.messages();
    assert_eq!(sends.len(), 7, "six failed sends, then the one that went through");
    let texts: Vec<Value> = sends.iter().map(|s| s.json()["text"]["body"].clone()).collect();
    assert!(texts.iter().all(|t| *t == texts[0]), "every try sent the same answer: {texts:?}");
    assert_eq!(engine.calls.load(Ordering::SeqCst), 1, "the answer was generated again");
    let conv =
        memory::get_or_create_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER, None)
            .await
            .unwrap();
    let history = memory::history(&app.pool, conv.id, 10).await.unwrap();
    assert_eq!(history.len(), 2, "the question or the answer was stored twice: {history:?}");
    assert_eq!(history[1].delivery_status.as_deref(), Some("sent"), "{:?}", history[1]);
    assert_eq!(history[1].delivery_error, None, "the outage's error outlived the delivery");
    // The stand-in numbers its answers by request (read receipts included): the last one.
    let last_id = format!("wamid.OUT{}", graph.all().len());
    assert_eq!(history[1].external_id.as_deref(), Some(last_id.as_str()));

    // An error that does not heal (an expired token) is not retried: the row fails at once.
    graph.script(&[(401, graph_error(190))]);
    let body = whatsapp_text("wamid.TOKEN", USER_NUMBER, "Again.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let row = app.final_row("wamid.TOKEN").await;
    assert_eq!(row.status, QueueStatus::Failed, "{row:?}");
    assert_eq!(row.retries, 0, "{row:?}");
    assert_eq!(graph.messages().len(), 8);
}

/// The Graph API and Talk read the answer's request but do not answer within the client's
/// timeout: the message may have been delivered, so it is never sent again (on either
/// channel); the answer's delivery is `unknown` with a reason that says what happened. A
/// connection that cannot be made is different: nothing left, so it is retried.
#[tokio::test]
async fn a_send_without_an_answer_is_never_sent_again() {
    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    // Each stand-in holds the first send well past the clients' 1 s, then accepts it.
    *graph.send_delay.lock().unwrap() = Some(Duration::from_secs(4));
    *talk.send_delay.lock().unwrap() = Some(Duration::from_secs(4));
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process_with(
        &graph,
        Some(&talk),
        engine.clone(),
        &[USER_NUMBER],
        AgentConfig::default(),
        Duration::from_secs(1),
    )
    .await;
    let body = whatsapp_text("wamid.SLOW", USER_NUMBER, "slow meta");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    assert_eq!(
        app.post_talk(&talk_create("777", "users/ada-lovelace", "slow talk")).await.status(),
        200
    );

    for (channel, id, service) in [
        (ChannelKind::WhatsApp, "wamid.SLOW", "the WhatsApp API"),
        (ChannelKind::Nextcloud, "777", "the Nextcloud Talk bot API"),
    ] {
        let row = app.final_row_of(channel, id).await;
        assert_eq!(row.status, QueueStatus::DeliveryUnknown, "{row:?}");
        let reason = row.last_error.unwrap_or_default();
        let expected = format!("no answer from {service} within 1 s");
        assert!(reason.contains(&expected) && reason.contains("not resending"), "{reason}");
        assert_eq!(row.retries, 0, "put back in the queue to be sent again: {reason}");
        let key = if channel == ChannelKind::WhatsApp { USER_NUMBER } else { ROOM };
        let conv = memory::find_conversation(&app.pool, channel, key).await.unwrap().unwrap();
        let history = memory::history(&app.pool, conv.id, 10).await.unwrap();
        assert_eq!(history.len(), 2, "{history:?}");
        assert_eq!(history[1].delivery_status.as_deref(), Some("unknown"), "{:?}", history[1]);
        assert!(history[1].delivery_error.as_deref().unwrap().contains(&expected));
    }
    // Every request is recorded as it arrives: once the rows are final nothing more leaves.
    assert_eq!(graph.messages().len(), 1, "the WhatsApp answer was sent twice");
    assert_eq!(talk.messages().len(), 1, "the Talk answer was sent twice");
    assert_eq!(app.health_queue().await["delivery_unknown"], 2);
    assert_eq!(engine.calls.load(Ordering::SeqCst), 2);

    // No connection at all: nothing was sent, the error says so and may be retried.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (_dir, pool) = fresh_pool().await;
    let wa = WhatsApp::new(whatsapp_settings(&base, None), reqwest::Client::new(), pool)
        .with_retry(fast_retry());
    let err = wa.send_text(USER_NUMBER, "hi").await.unwrap_err();
    assert!(matches!(err, ChannelError::Transport(_)) && err.is_retryable(), "{err:?}");
}

/// Three paragraphs of plain words, each about `chars` characters long and naming its
/// number and `channel`: an answer its channel sends in three parts.
fn long_answer(channel: &str, chars: usize) -> String {
    let words = "Words in a sentence. ".repeat(chars / 21);
    let paragraphs: Vec<String> =
        (0..3).map(|i| format!("Part {i} of the {channel} answer. {}", words.trim_end())).collect();
    paragraphs.join("\n\n")
}

/// A model that answers a question naming Talk with `long_answer("talk", 25_000)` and any
/// other with `long_answer("whatsapp", 3_000)`: three parts on either channel.
fn long_answer_model() -> Arc<crate::agent::ToolModel> {
    crate::agent::ToolModel::new(|request, _| {
        let question = request.messages.last().map(|m| m.content.as_str()).unwrap_or_default();
        let text = if question.contains("talk") {
            long_answer("talk", 25_000)
        } else {
            long_answer("whatsapp", 3_000)
        };
        (vec![text], vec![])
    })
}

/// The parts WhatsApp and Talk cut `long_answer_model`'s answers into.
fn long_answer_parts() -> (Vec<String>, Vec<String>) {
    let whatsapp_text = markup::markdown_to_whatsapp(&long_answer("whatsapp", 3_000));
    let whatsapp = split::split_message(&whatsapp_text, whatsapp::MAX_TEXT_CHARS);
    let talk = split::split_message(&long_answer("talk", 25_000), nextcloud::MAX_MESSAGE_CHARS);
    assert_eq!((whatsapp.len(), talk.len()), (3, 3), "the answers must take three parts");
    (whatsapp, talk)
}

/// The Graph API's answer to an accepted message.
fn graph_sent(wamid: &str) -> Value {
    json!({"messaging_product": "whatsapp",
           "contacts": [{"input": USER_NUMBER, "wa_id": USER_NUMBER}],
           "messages": [{"id": wamid}]})
}

/// Talk's answer to an accepted bot message.
fn talk_posted() -> Value {
    json!({"ocs": {"meta": {"status": "ok", "statuscode": 201}, "data": null}})
}

/// The stored answer of the conversation `key` on `channel` (its second message).
async fn stored_answer(
    pool: &SqlitePool,
    channel: ChannelKind,
    key: &str,
) -> memory::StoredMessage {
    let conv = memory::find_conversation(pool, channel, key).await.unwrap().expect("conversation");
    let history = memory::history(pool, conv.id, 10).await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    history[1].clone()
}

/// The recorded parts of the answer `id`: their ids, first part first, numbered from 0.
async fn recorded_parts(pool: &SqlitePool, id: my_claw::domain::MessageId) -> Vec<String> {
    let parts = memory::message_parts(pool, id).await.unwrap();
    let indexes: Vec<i64> = parts.iter().map(|p| p.index).collect();
    assert_eq!(indexes, (0..parts.len() as i64).collect::<Vec<_>>(), "{parts:?}");
    parts.into_iter().map(|p| p.external_id).collect()
}

/// A long answer whose second part meets an outage (503 to all the client's quick tries) on
/// WhatsApp and on Talk: the queue's next try of the message sends only the parts that did
/// not go out, so the user gets each part once, in order; each part's id is recorded as it
/// went, and the answer is `sent` once the last one is. Before, the next try sent the whole
/// answer again, the first part a second time.
#[tokio::test]
async fn a_long_answer_is_resent_only_from_the_part_that_failed() {
    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let (whatsapp_parts, talk_parts) = long_answer_parts();
    let outage = || (0..fast_retry().max_attempts).map(|_| (503, json!({})));
    let mut graph_script = vec![(200, graph_sent("wamid.P0"))];
    graph_script.extend(outage());
    graph_script.extend([(200, graph_sent("wamid.P1")), (200, graph_sent("wamid.P2"))]);
    graph.script(&graph_script);
    let mut talk_script = vec![(201, talk_posted())];
    talk_script.extend(outage());
    talk.script(&talk_script);
    let model = long_answer_model();
    let engine: Arc<dyn Provider> = Arc::new(crate::agent::Scripted(model.clone()));
    let app = in_process_with(
        &graph,
        Some(&talk),
        engine,
        &[USER_NUMBER],
        AgentConfig::default(),
        whatsapp::REQUEST_TIMEOUT,
    )
    .await;
    let body = whatsapp_text("wamid.LONG503", USER_NUMBER, "A long whatsapp answer, please.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let question = talk_create("778", "users/ada-lovelace", "A long talk answer, please.");
    assert_eq!(app.post_talk(&question).await.status(), 200);

    let tries = fast_retry().max_attempts as usize;
    for (channel, id, stand_in, parts) in [
        (ChannelKind::WhatsApp, "wamid.LONG503", &graph, &whatsapp_parts),
        (ChannelKind::Nextcloud, "778", &talk, &talk_parts),
    ] {
        let row = app.final_row_of(channel, id).await;
        assert_eq!(row.status, QueueStatus::Done, "{row:?}");
        assert!(row.retries >= 1, "answered without going back to the queue: {row:?}");
        // Part 0 once, part 1 refused by every quick try and then accepted, part 2.
        let mut expected = vec![parts[0].clone()];
        expected.extend(std::iter::repeat_n(parts[1].clone(), tries + 1));
        expected.push(parts[2].clone());
        let field = if channel == ChannelKind::WhatsApp { "/text/body" } else { "/message" };
        let sent: Vec<String> = stand_in
            .messages()
            .iter()
            .map(|r| r.json().pointer(field).and_then(Value::as_str).unwrap().to_string())
            .collect();
        assert_eq!(sent.len(), expected.len(), "{channel}: {} sends", sent.len());
        assert!(sent == expected, "{channel}: a part was sent again, or out of order");
    }

    // WhatsApp: each part carries the question's id, and each part's wamid is recorded.
    let requests = graph.messages();
    for r in &requests {
        assert_eq!(r.json()["biz_opaque_callback_data"], "my-claw:answer-to:wamid.LONG503");
    }
    let answer = stored_answer(&app.pool, ChannelKind::WhatsApp, USER_NUMBER).await;
    assert_eq!(answer.delivery_status.as_deref(), Some("sent"), "{answer:?}");
    assert_eq!(answer.delivery_error, None, "the outage's error outlived the delivery");
    assert_eq!(answer.external_id.as_deref(), Some("wamid.P0"));
    assert_eq!(recorded_parts(&app.pool, answer.id).await, ["wamid.P0", "wamid.P1", "wamid.P2"]);
    // Delivery reports reach the answer through any part.
    let report = whatsapp_status("wamid.P2", "read", json!([]));
    assert_eq!(app.post_whatsapp(&report).await.status(), 200);
    let answer = memory::get_message(&app.pool, answer.id).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("read"));

    // Talk: only the message's first part replies to the question, the resumed one does not;
    // each part's reference id is recorded.
    let requests = talk.messages();
    requests.iter().for_each(assert_signed_talk_reply);
    assert_eq!(requests[0].json()["replyTo"], 778);
    assert!(requests[1..].iter().all(|r| r.json().get("replyTo").is_none()));
    let answer = stored_answer(&app.pool, ChannelKind::Nextcloud, ROOM).await;
    assert_eq!(answer.delivery_status.as_deref(), Some("sent"), "{answer:?}");
    let accepted = [&requests[0], &requests[tries + 1], &requests[tries + 2]];
    let references: Vec<String> =
        accepted.iter().map(|r| r.json()["referenceId"].as_str().unwrap().to_string()).collect();
    assert_eq!(recorded_parts(&app.pool, answer.id).await, references);
    assert_eq!(model.requests().len(), 2, "an answer was generated again");
}

/// A long answer whose second part gets no answer within the client's timeout (it may have
/// been delivered): neither that part nor the first is sent again, nor the third at all; the
/// answer's delivery is `unknown`, and the first part's id is recorded, where its delivery
/// reports find the answer. Before, the id of the part that went out was lost.
#[tokio::test]
async fn a_long_answer_whose_second_part_times_out_is_never_resent() {
    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let (whatsapp_parts, talk_parts) = long_answer_parts();
    graph.script(&[(200, graph_sent("wamid.T0"))]);
    for stand_in in [&graph, &talk] {
        *stand_in.send_delay.lock().unwrap() = Some(Duration::from_secs(4));
        stand_in.sends_before_delay.store(1, Ordering::SeqCst);
    }
    let model = long_answer_model();
    let engine: Arc<dyn Provider> = Arc::new(crate::agent::Scripted(model.clone()));
    let app = in_process_with(
        &graph,
        Some(&talk),
        engine,
        &[USER_NUMBER],
        AgentConfig::default(),
        Duration::from_secs(1),
    )
    .await;
    let body = whatsapp_text("wamid.LONGSLOW", USER_NUMBER, "A long whatsapp answer, slowly.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let question = talk_create("779", "users/ada-lovelace", "A long talk answer, slowly.");
    assert_eq!(app.post_talk(&question).await.status(), 200);

    for (channel, id, key, stand_in, parts) in [
        (ChannelKind::WhatsApp, "wamid.LONGSLOW", USER_NUMBER, &graph, &whatsapp_parts),
        (ChannelKind::Nextcloud, "779", ROOM, &talk, &talk_parts),
    ] {
        let row = app.final_row_of(channel, id).await;
        assert_eq!(row.status, QueueStatus::DeliveryUnknown, "{row:?}");
        assert_eq!(row.retries, 0, "put back in the queue to be sent again: {row:?}");
        let field = if channel == ChannelKind::WhatsApp { "/text/body" } else { "/message" };
        let sent: Vec<String> = stand_in
            .messages()
            .iter()
            .map(|r| r.json().pointer(field).and_then(Value::as_str).unwrap().to_string())
            .collect();
        assert!(sent == parts[..2], "{channel}: {} sends, not the first two parts", sent.len());
        let answer = stored_answer(&app.pool, channel, key).await;
        assert_eq!(answer.delivery_status.as_deref(), Some("unknown"), "{answer:?}");
        assert!(answer.delivery_error.as_deref().unwrap().contains("no answer from"));
        let first = stand_in.messages()[0].json();
        let first_id = match channel {
            ChannelKind::WhatsApp => "wamid.T0".to_string(),
            _ => first["referenceId"].as_str().unwrap().to_string(),
        };
        assert_eq!(recorded_parts(&app.pool, answer.id).await, std::slice::from_ref(&first_id));
        assert_eq!(answer.external_id.as_deref(), Some(first_id.as_str()));
    }
    assert_eq!(app.health_queue().await["delivery_unknown"], 2);
    assert_eq!(model.requests().len(), 2, "an answer was generated again");
}

/// A message whose handling a stop interrupted three times (as `kill -9` during its
/// generation would) is given up without asking the model again, and its sender is told,
/// on WhatsApp and on Talk; a warning says so without the number, the actor or the text.
// Current-thread runtime: the worker's tasks run on the thread whose subscriber captures the
// logs.
#[tokio::test]
async fn a_message_given_up_after_three_stops_gets_a_reply_and_a_warning() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, Some(&talk), engine.clone(), &[USER_NUMBER]).await;
    // The stopped process: no worker while the rows are stored and claimed.
    app.worker.abort();
    wait_until(Duration::from_secs(10), "the first worker to stop", || app.worker.is_finished())
        .await;
    let stored = [
        (ChannelKind::WhatsApp, whatsapp_text("wamid.POISON", USER_NUMBER, "poison essay")),
        (ChannelKind::Nextcloud, talk_create("4711", "users/ada-lovelace", "poison essay")),
    ];
    for (kind, body) in &stored {
        let channel = app.channels.get(*kind).unwrap();
        let intakes = channel.parse(&HeaderMap::new(), body).unwrap();
        assert_eq!(app.channels.store(&app.pool, *kind, &intakes).await.unwrap().queued, 1);
    }
    // Claimed and interrupted three times: two recoveries put the rows back, and the third
    // stop leaves them in `processing` for the next start.
    for round in 0..3 {
        if round > 0 {
            let recovered = inbound::recover(&app.pool, queue::MAX_INTERRUPTED).await.unwrap();
            assert_eq!(recovered.requeued, 2);
        }
        for _ in 0..2 {
            inbound::claim_next(&app.pool).await.unwrap().expect("a row to claim");
        }
    }

    let second = queue::spawn_worker(
        app.pool.clone(),
        app.assistant.clone(),
        app.channels.clone(),
        queue_config(),
    );
    for (kind, id) in [(ChannelKind::WhatsApp, "wamid.POISON"), (ChannelKind::Nextcloud, "4711")] {
        // The row is final (failed) from the recovery on; its reason says the user was told
        // once the reply went.
        let told = |row: &inbound::QueueEntry| {
            row.last_error.as_deref().is_some_and(|r| r.ends_with("(the user was told)"))
        };
        let started = Instant::now();
        let row = loop {
            let row = app.final_row_of(kind, id).await;
            if told(&row) || started.elapsed() > Duration::from_secs(30) {
                break row;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(row.status, QueueStatus::Failed, "{row:?}");
        let reason = row.last_error.clone().unwrap_or_default();
        assert!(reason.contains("3 times") && told(&row), "{reason}");
    }
    let whatsapp: Vec<Value> =
        graph.messages().iter().map(|r| r.json()["text"]["body"].clone()).collect();
    assert_eq!(whatsapp, [queue::INTERRUPTED_REPLY]);
    let talk_sent: Vec<Value> =
        talk.messages().iter().map(|r| r.json()["message"].clone()).collect();
    assert_eq!(talk_sent, [queue::INTERRUPTED_REPLY]);
    assert_eq!(talk.messages()[0].json()["replyTo"], 4711);
    assert_eq!(engine.calls.load(Ordering::SeqCst), 0, "the model was asked again");

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> =
        text.lines().filter(|l| l.contains("WARN") && l.contains("given up")).collect();
    assert_eq!(warnings.len(), 2, "{text}");
    for personal in [USER_NUMBER, "ada-lovelace", "poison essay", ROOM] {
        assert!(!text.contains(personal), "{personal} is in the logs:\n{text}");
    }
    second.abort();
}

/// The queue is not an archive of the user's texts: a deleted conversation's rows lose
/// theirs at once (`forget_conversation_payloads`, for the conversation delete), and rows
/// finished over a week ago lose theirs at the next start. The message ids stay, so a
/// redelivery is still recognised and not answered twice.
#[tokio::test]
async fn finished_queue_rows_do_not_keep_the_users_text() {
    let graph = StandIn::start(Kind::Graph).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let other = "33600000009";
    let app = in_process(&graph, None, engine, &[USER_NUMBER, other]).await;
    let mine = whatsapp_text("wamid.PRIVATE", USER_NUMBER, "my private words");
    let theirs = whatsapp_text("wamid.OLD", other, "old private words");
    for body in [&mine, &theirs] {
        assert_eq!(app.post_whatsapp(body).await.status(), 200);
    }
    for id in ["wamid.PRIVATE", "wamid.OLD"] {
        let row = app.final_row(id).await;
        assert_eq!(row.status, QueueStatus::Done, "{row:?}");
        assert!(row.payload.contains("private words"), "{row:?}");
    }

    // Deleting the conversation through the API takes its texts out of the queue.
    let conversation = memory::find_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER)
        .await
        .unwrap()
        .expect("the conversation");
    let deleted = client()
        .delete(format!("{}/api/conversations/{}", app.base, conversation.id.0))
        .bearer_auth(IN_PROCESS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(app.final_row("wamid.PRIVATE").await.payload, "{}");
    assert!(app.final_row("wamid.OLD").await.payload.contains("old private words"));

    // Eight days later, a restart.
    let eight_days_ago = chrono::Utc::now().timestamp_millis() - 8 * 24 * 3600 * 1000;
    sqlx::query("UPDATE inbound_queue SET processed_at = ?1 WHERE external_id = 'wamid.OLD'")
        .bind(eight_days_ago)
        .execute(&app.pool)
        .await
        .unwrap();
    app.worker.abort();
    let second = queue::spawn_worker(
        app.pool.clone(),
        app.assistant.clone(),
        app.channels.clone(),
        queue_config(),
    );
    let started = Instant::now();
    while app.final_row("wamid.OLD").await.payload != "{}" {
        assert!(started.elapsed() < Duration::from_secs(30), "the old text is still stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Redeliveries of both are still recognised.
    for body in [&mine, &theirs] {
        assert_eq!(app.post_whatsapp(body).await.status(), 200);
    }
    wait_for_idle_queue(&app.pool).await;
    assert_eq!(graph.messages().len(), 2, "a redelivery was answered again");
    assert_eq!(inbound::list(&app.pool).await.unwrap().len(), 2);
    second.abort();
}

/// Allow-list entries that could never match what Meta or Talk send stop the start with one
/// line that names the variable and the fix (exit code 2), instead of ignoring the user.
#[test]
fn allow_list_entries_that_never_match_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let whatsapp = [
        ("WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN),
        ("WHATSAPP_APP_SECRET", APP_SECRET),
        ("WHATSAPP_ACCESS_TOKEN", ACCESS_TOKEN),
        ("WHATSAPP_PHONE_NUMBER_ID", PHONE_NUMBER_ID),
        ("WHATSAPP_ALLOWED_NUMBERS", "0033612345678"),
    ];
    let talk = [
        ("NEXTCLOUD_URL", "https://cloud.example.org"),
        ("NEXTCLOUD_BOT_SECRET", TALK_SECRET),
        ("NEXTCLOUD_ALLOWED_USERS", "alice"),
    ];
    let cases: [(&[(&str, &str)], &str); 2] = [
        (&whatsapp, "WHATSAPP_ALLOWED_NUMBERS: `0033612345678` starts with 0"),
        (&talk, "NEXTCLOUD_ALLOWED_USERS: `alice` is not a Talk actor id"),
    ];
    for (envs, expected) in cases {
        // Spawned with a deadline: a start that accepts the entry would serve forever.
        let mut child = std::process::Command::new(crate::util::binary())
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATA_DIR", data_dir)
            .envs(envs.iter().copied())
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run my-claw");
        let started = Instant::now();
        while child.try_wait().expect("wait for my-claw").is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("my-claw started with {envs:?} instead of refusing it");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("my-claw output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one clear line expected:\n{stderr}");
        assert!(lines[0].contains(expected), "expected `{expected}` in `{}`", lines[0]);
    }
}

/// A WhatsApp message with `"id": ""` is unreadable, not a deduplication key: its sender is
/// told (it is not answered by the model), and a later message without an id is told too
/// instead of being dropped as a "redelivery"; a real redelivery is still recognised.
#[tokio::test]
async fn a_whatsapp_message_without_an_id_is_told_and_never_a_dedup_key() {
    let graph = StandIn::start(Kind::Graph).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine.clone(), &[USER_NUMBER]).await;
    let first = whatsapp_batch(&[
        raw_text_message("", USER_NUMBER, "no id, first"),
        raw_text_message("wamid.WITHID", USER_NUMBER, "with an id"),
    ]);
    assert_eq!(app.post_whatsapp(&first).await.status(), 200);
    let later = whatsapp_batch(&[raw_text_message("", USER_NUMBER, "no id, later")]);
    assert_eq!(app.post_whatsapp(&later).await.status(), 200);
    // Meta delivers the later one again: the same bytes, the same row.
    assert_eq!(app.post_whatsapp(&later).await.status(), 200);
    wait_for_idle_queue(&app.pool).await;

    let rows = inbound::list(&app.pool).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    let without_id: Vec<&inbound::QueueEntry> =
        rows.iter().filter(|r| r.external_id != "wamid.WITHID").collect();
    for row in &without_id {
        assert!(row.external_id.starts_with("no-id:"), "{row:?}");
        assert_eq!(row.status, QueueStatus::Rejected, "{row:?}");
        assert!(row.last_error.as_deref().unwrap().contains("without an id"), "{row:?}");
        assert!(!row.payload.contains("no id,"), "the unreadable text is kept: {row:?}");
    }
    assert_ne!(without_id[0].external_id, without_id[1].external_id);
    let mut bodies: Vec<String> = graph
        .messages()
        .iter()
        .map(|r| r.json()["text"]["body"].as_str().unwrap().to_string())
        .collect();
    bodies.sort();
    let mut expected =
        vec![queue::UNREADABLE_REPLY.to_string(), queue::UNREADABLE_REPLY.to_string()];
    expected.push("echo: with an id".into());
    expected.sort();
    assert_eq!(bodies, expected);
    assert_eq!(engine.calls.load(Ordering::SeqCst), 1, "a message without an id was answered");
}

/// A Talk webhook signed with a random shorter than 32 characters (Nextcloud always sends
/// 64) is refused like a bad signature, and nothing is stored; 32 characters are enough.
#[tokio::test]
async fn talk_webhook_with_a_short_random_is_refused() {
    let graph = StandIn::start(Kind::Graph).await;
    let talk = StandIn::start(Kind::Talk).await;
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, Some(&talk), engine, &[USER_NUMBER]).await;
    let post = |random: String, message_id: &str| {
        let body = talk_create(message_id, "users/ada-lovelace", "hello");
        let signature = nextcloud::sign(TALK_SECRET, &random, &body);
        client()
            .post(format!("{}/api/webhook/nextcloud", app.base))
            .header("content-type", "application/json")
            .header("X-Nextcloud-Talk-Random", random)
            .header("X-Nextcloud-Talk-Signature", signature)
            .body(body)
            .send()
    };
    for (random, id) in [(String::new(), "501"), ("r".into(), "502"), ("r".repeat(31), "503")] {
        let response = post(random.clone(), id).await.expect("post talk webhook");
        assert_eq!(response.status(), 401, "random of {} characters", random.len());
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "bad_signature");
    }
    assert!(inbound::list(&app.pool).await.unwrap().is_empty());
    assert_eq!(post("r".repeat(32), "504").await.expect("post").status(), 200);
    assert_eq!(app.final_row_of(ChannelKind::Nextcloud, "504").await.status, QueueStatus::Done);
}

/// Meta's `failed` report of an answer overtakes the answer to our send request: the Graph
/// stand-in posts it, signed, to the real webhook and waits for the 200 before it answers
/// the send with the answer's wamid. The report is kept until the wamid is recorded, and the
/// stored answer ends `failed` with Meta's error. Before, the report found no message and was
/// dropped, and the answer showed `sent` for ever though it never arrived. The report carries
/// no `biz_opaque_callback_data` (as for a cron or reminder message, which are sent untagged),
/// so `confirm_reply_delivery` cannot find the answer either.
#[tokio::test]
async fn a_failed_report_that_overtakes_the_send_still_fails_the_answer() {
    let graph = StandIn::start(Kind::Graph).await;
    graph.script(&[(200, graph_sent("wamid.OVERTAKEN"))]);
    let engine = ScriptedEngine::new(|_, _, _| None);
    let app = in_process(&graph, None, engine, &[USER_NUMBER]).await;
    let errors = json!([{"code": 131026, "title": "Message undeliverable",
                         "message": "Message undeliverable",
                         "error_data": {"details": "The recipient cannot receive it."}}]);
    let report = whatsapp_status("wamid.OVERTAKEN", "failed", errors);
    *graph.webhook_before_send.lock().unwrap() =
        Some((format!("{}/api/webhook/whatsapp", app.base), report));
    let body = whatsapp_text("wamid.QOVERTAKE", USER_NUMBER, "Say hello.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);

    let row = app.final_row("wamid.QOVERTAKE").await;
    assert_eq!(row.status, QueueStatus::Done, "{row:?}");
    assert_eq!(*graph.webhooks_answered.lock().unwrap(), [200], "the report was not taken first");
    assert_eq!(graph.messages().len(), 1);
    let answer = stored_answer(&app.pool, ChannelKind::WhatsApp, USER_NUMBER).await;
    assert_eq!(answer.external_id.as_deref(), Some("wamid.OVERTAKEN"));
    assert_eq!(answer.delivery_status.as_deref(), Some("failed"), "{answer:?}");
    assert_eq!(
        answer.delivery_error.as_deref(),
        Some("131026 Message undeliverable: The recipient cannot receive it.")
    );
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM early_deliveries")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, 0, "the report stayed kept once applied");
    app.worker.abort();
}

/// Meta's `delivered` report of an answer's first part, tagged with the question's id,
/// overtakes the answer to its send (the Graph stand-in posts it, signed, before answering);
/// the second part then meets an outage (503 to every quick try). The answer is being sent
/// by this process, so the report is kept for the part's wamid rather than taken for one a
/// stopped process left: the answer goes back to the queue, its second part is sent again
/// and accepted, and only then is the answer `delivered`. Before, the tagged report moved
/// the answer out of `sending` at once, the outage's retry found it `delivered`, and the
/// second part never went out.
#[tokio::test]
async fn a_tagged_report_that_overtakes_a_send_in_flight_waits_for_every_part() {
    let graph = StandIn::start(Kind::Graph).await;
    let paragraph =
        |i: usize| format!("Part {i} of the early answer. {}", "Words in a sentence. ".repeat(150));
    let text = format!("{}\n\n{}", paragraph(0).trim_end(), paragraph(1).trim_end());
    let parts =
        split::split_message(&markup::markdown_to_whatsapp(&text), whatsapp::MAX_TEXT_CHARS);
    assert_eq!(parts.len(), 2, "the answer must take two parts");
    let tries = fast_retry().max_attempts as usize;
    let mut script = vec![(200, graph_sent("wamid.EARLY0"))];
    script.extend((0..tries).map(|_| (503, json!({}))));
    script.push((200, graph_sent("wamid.EARLY1")));
    graph.script(&script);
    let model = crate::agent::ToolModel::new(move |_, _| (vec![text.clone()], vec![]));
    let engine: Arc<dyn Provider> = Arc::new(crate::agent::Scripted(model.clone()));
    let app = in_process_with(
        &graph,
        None,
        engine,
        &[USER_NUMBER],
        AgentConfig::default(),
        whatsapp::REQUEST_TIMEOUT,
    )
    .await;
    let report = String::from_utf8(whatsapp_status("wamid.EARLY0", "delivered", json!([])))
        .unwrap()
        .replace(
            r#""recipient_id""#,
            r#""biz_opaque_callback_data":"my-claw:answer-to:wamid.QEARLY","recipient_id""#,
        );
    *graph.webhook_before_send.lock().unwrap() =
        Some((format!("{}/api/webhook/whatsapp", app.base), report.into_bytes()));
    let body = whatsapp_text("wamid.QEARLY", USER_NUMBER, "A long answer, please.");
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);

    let row = app.final_row("wamid.QEARLY").await;
    assert_eq!(row.status, QueueStatus::Done, "{row:?}");
    assert!(row.retries >= 1, "answered without going back to the queue: {row:?}");
    assert_eq!(*graph.webhooks_answered.lock().unwrap(), [200], "the report was not taken first");
    // Part 0 once, part 1 refused by every quick try and then accepted.
    let sent: Vec<String> = graph
        .messages()
        .iter()
        .map(|r| r.json()["text"]["body"].as_str().unwrap().to_string())
        .collect();
    let mut expected = vec![parts[0].clone()];
    expected.extend(std::iter::repeat_n(parts[1].clone(), tries + 1));
    assert_eq!(
        sent.len(),
        expected.len(),
        "{} sends: the second part was not sent again",
        sent.len()
    );
    assert!(sent == expected, "a part was sent again, or out of order");
    let answer = stored_answer(&app.pool, ChannelKind::WhatsApp, USER_NUMBER).await;
    assert_eq!(answer.delivery_status.as_deref(), Some("delivered"), "{answer:?}");
    assert_eq!(answer.delivery_error, None, "the outage's error outlived the delivery");
    assert_eq!(answer.external_id.as_deref(), Some("wamid.EARLY0"));
    assert_eq!(recorded_parts(&app.pool, answer.id).await, ["wamid.EARLY0", "wamid.EARLY1"]);
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM early_deliveries")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(kept, 0, "the report stayed kept once applied");
    assert_eq!(model.requests().len(), 1, "the answer was generated again");
    app.worker.abort();
}

/// A model that writes "Zorvathi had a family of" and then: for a question with "stop me",
/// waits (at most 30 s) for its answer to be stopped; with "fail me", fails; else ends the
/// sentence. `written` is set once the assistant has taken the first text.
struct CutModel {
    written: Arc<std::sync::atomic::AtomicBool>,
}

const CUT_TEXT: &str = "Zorvathi had a family of";

impl Provider for CutModel {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "cut".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        let question = request.messages.last().map(|m| m.content.clone()).unwrap_or_default();
        let written = self.written.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Chunk::Text(CUT_TEXT.into()))).await;
                if question.contains("stop me") || question.contains("fail me") {
                    // The assistant took the text: it is part of the answer.
                    let started = Instant::now();
                    while tx.capacity() < tx.max_capacity() && started.elapsed() < ANSWER_LIMIT {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    written.store(true, Ordering::SeqCst);
                }
                if question.contains("stop me") {
                    let _ = tokio::time::timeout(Duration::from_secs(30), tx.closed()).await;
                    return;
                }
                if question.contains("fail me") {
                    let _ = tx.send(Err(LlmError::Inference("the model crashed".into()))).await;
                    return;
                }
                let _ = tx.send(Ok(Chunk::Text(" five.".into()))).await;
                let usage = Usage { prompt_tokens: 10, completion_tokens: 6, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish: FinishReason::Stop })).await;
            });
            Ok(rx)
        })
    }
}

/// QA pass 14: Stop pressed in the WebChat on a WhatsApp conversation while its answer is
/// written (`POST /api/chat/{id}/stop`) sends the text written so far with a last line saying
/// it was stopped, not the cut-off text as if it were the whole answer; an answer that failed
/// half-way says it failed; a complete answer is sent as written. The stored answers keep
/// their text as written. Before, the stopped and the failed text went out bare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_whatsapp_answer_is_sent_saying_it_was_stopped() {
    let graph = StandIn::start(Kind::Graph).await;
    let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let engine: Arc<dyn Provider> = Arc::new(CutModel { written: written.clone() });
    let app = in_process_with(
        &graph,
        None,
        engine,
        &[USER_NUMBER],
        AgentConfig::default(),
        whatsapp::REQUEST_TIMEOUT,
    )
    .await;
    let bodies = || -> Vec<String> {
        graph
            .messages()
            .iter()
            .map(|r| r.json()["text"]["body"].as_str().unwrap().to_string())
            .collect()
    };
    let last_answer = |pool: SqlitePool| async move {
        let conv = memory::find_conversation(&pool, ChannelKind::WhatsApp, USER_NUMBER)
            .await
            .unwrap()
            .expect("the conversation");
        let history = memory::history(&pool, conv.id, 20).await.unwrap();
        history.last().expect("an answer").clone()
    };

    // Stopped from the WebChat half-way.
    let body = whatsapp_batch(&[raw_text_message("wamid.STOP", USER_NUMBER, "stop me")]);
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    wait_until(Duration::from_secs(30), "the model wrote its first text", || {
        written.load(Ordering::SeqCst)
    })
    .await;
    // The assistant appends the text it took before it can see a stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conv = memory::find_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER)
        .await
        .unwrap()
        .expect("the conversation");
    let stopped: Value = tokio::time::timeout(
        Duration::from_secs(30),
        client()
            .post(format!("{}/api/chat/{}/stop", app.base, conv.id.0))
            .bearer_auth(IN_PROCESS_TOKEN)
            .send(),
    )
    .await
    .expect("stop answers in time")
    .expect("post stop")
    .json()
    .await
    .expect("stop json");
    assert_eq!(stopped["stopped"], true, "{stopped}");
    assert_eq!(app.final_row("wamid.STOP").await.status, QueueStatus::Done);
    assert_eq!(bodies(), [format!("{CUT_TEXT}\n\n{}", queue::STOPPED_MARK)]);
    let answer = last_answer(app.pool.clone()).await;
    assert_eq!(answer.content, CUT_TEXT, "the stored answer is the text as written");
    assert_eq!(answer.status, memory::MessageStatus::Partial);
    assert_eq!(answer.failure, None);
    assert_eq!(answer.delivery_status.as_deref(), Some("sent"));

    // A complete answer has no mark.
    let body = whatsapp_batch(&[raw_text_message("wamid.WHOLE", USER_NUMBER, "tell me all")]);
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    assert_eq!(app.final_row("wamid.WHOLE").await.status, QueueStatus::Done);
    assert_eq!(bodies()[1..], [format!("{CUT_TEXT} five.")]);

    // An answer that failed half-way says so, and its row keeps the failure.
    let body = whatsapp_batch(&[raw_text_message("wamid.FAIL", USER_NUMBER, "fail me")]);
    assert_eq!(app.post_whatsapp(&body).await.status(), 200);
    let row = app.final_row("wamid.FAIL").await;
    assert_eq!(row.status, QueueStatus::Failed, "{row:?}");
    assert_eq!(bodies()[2..], [format!("{CUT_TEXT}\n\n{}", queue::FAILED_MARK)]);
    let answer = last_answer(app.pool.clone()).await;
    assert_eq!(answer.content, CUT_TEXT);
    assert_eq!(answer.status, memory::MessageStatus::Partial);
    assert!(answer.failure.is_some(), "{answer:?}");
    app.worker.abort();
}
