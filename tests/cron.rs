//! Cron tests: scheduled jobs driven through the HTTP API of an in-process server on
//! 127.0.0.1 (a fast fake model, the real WhatsApp client against a local Graph API
//! stand-in), and one test of the real binary with the real small model. Loops are bounded;
//! jobs fire every one or two seconds, so the timing tests take a few seconds each. That a
//! job did NOT run is proved by the scheduler's own report of how far it has looked
//! (`CronHandle::checked_through`), kept moving by a job that fires every second, never by
//! sleeping. Jobs that fire every second or two are refused in production (the shortest
//! interval is one minute); these servers allow them (`ShortestInterval::OneSecond`) unless a
//! test is about that rule.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use chrono::{DateTime, Datelike, Timelike, Utc};
use futures::future::BoxFuture;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::SqlitePool;
use tokio::sync::mpsc;

use my_claw::assistant::{Assistant, AssistantConfig, Change};
use my_claw::channels::whatsapp::WhatsApp;
use my_claw::channels::{Channel, Channels, RetryPolicy};
use my_claw::config::{CronSettings, Secret, WhatsAppSettings};
use my_claw::cron::{CronHandle, NewReminder, ShortestInterval};
use my_claw::db::inbound::{self, ContactSeen, NewInbound, QueueStatus};
use my_claw::db::memory;
use my_claw::domain::{ChannelKind, ConversationId, Role};
use my_claw::gateway::{self, AppState};
use my_claw::llm::router::{Router as ModelRouter, Tier};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};

use crate::util::{smollm2_env, Server, ServerOptions};

pub(crate) const TOKEN: &str = "cron-test-token-0123456789";
const CRON_SECRET: &str = "cron-secret-for-tests-42";
/// Delivery retries in milliseconds, so an outage of the stand-in costs a test little.
const PATIENCE: my_claw::config::DeliveryPatience = my_claw::config::DeliveryPatience {
    first_wait: Duration::from_millis(100),
    max_wait: Duration::from_millis(200),
    give_up_after: Duration::from_secs(3),
};
/// How late a missed one-shot may still run (the production default).
const LATE_LIMIT: Duration = Duration::from_secs(24 * 3600);
pub(crate) const USER_NUMBER: &str = "16505551234";
pub(crate) const QUIET_NUMBER: &str = "33612345678";
const EVERY_2S: &str = "*/2 * * * * *";
/// The clock job's schedule: it keeps the scheduling loop looking every second.
const EVERY_1S: &str = "* * * * * *";
/// A schedule that will not fire during a test (midnight on the first of January).
const YEARLY: &str = "0 0 1 1 *";
/// Bound on waits for something scheduled every two seconds, on a loaded machine.
pub(crate) const FIRE_LIMIT: Duration = Duration::from_secs(30);

// --- a fake model and a Graph API stand-in ----------------------------------------------------

/// Answers `echo: <last user message>` after `delay`.
struct EchoProvider {
    delay: Duration,
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
        let delay = self.delay;
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Ok(Chunk::Text(format!("echo: {last}")))).await;
                let done = Chunk::Done { usage: Usage::default(), finish: FinishReason::Stop };
                let _ = tx.send(Ok(done)).await;
            });
            Ok(rx)
        })
    }
}

/// A Graph API stand-in: records message posts and answers from a script, else with
/// success and a fresh wamid.
#[derive(Clone, Default)]
pub(crate) struct Graph {
    base: String,
    posts: Arc<Mutex<Vec<Value>>>,
    script: Arc<Mutex<VecDeque<(u16, Value)>>>,
}

impl Graph {
    pub(crate) async fn start() -> Graph {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let graph = Graph {
            base: format!("http://{}", listener.local_addr().expect("addr")),
            ..Graph::default()
        };
        let state = graph.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
            let state = state.clone();
            async move { state.answer(uri, body) }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        graph
    }

    fn answer(&self, uri: Uri, body: Bytes) -> axum::response::Response {
        assert!(uri.path().ends_with("/messages"), "unexpected Graph path {}", uri.path());
        let body: Value = serde_json::from_slice(&body).expect("Graph got JSON");
        let n = {
            let mut posts = self.posts.lock().unwrap();
            posts.push(body);
            posts.len()
        };
        let (status, answer) = self.script.lock().unwrap().pop_front().unwrap_or_else(|| {
            let ok = json!({"messaging_product": "whatsapp",
                            "contacts": [{"input": USER_NUMBER, "wa_id": USER_NUMBER}],
                            "messages": [{"id": format!("wamid.CRON{n}")}]});
            (200, ok)
        });
        let status = StatusCode::from_u16(status).expect("status");
        (status, [("content-type", "application/json")], answer.to_string()).into_response()
    }

    pub(crate) fn posts(&self) -> Vec<Value> {
        self.posts.lock().unwrap().clone()
    }

    pub(crate) fn texts_to(&self, number: &str) -> Vec<String> {
        self.posts()
            .into_iter()
            .filter(|p| p["to"] == number && p["type"] == "text")
            .map(|p| p["text"]["body"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

// --- an in-process server ---------------------------------------------------------------------

pub(crate) struct App {
    pub(crate) base: String,
    pub(crate) pool: SqlitePool,
    pub(crate) assistant: Arc<Assistant>,
    pub(crate) cron: CronHandle,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The in-process servers let jobs fire every second (see the module header).
const TEST_INTERVAL: ShortestInterval = ShortestInterval::OneSecond;

pub(crate) struct Options {
    delay: Duration,
    secret: Option<&'static str>,
    template: Option<&'static str>,
    /// Whether WhatsApp is configured (Nextcloud Talk never is here).
    whatsapp: bool,
    /// Answer with this model instead of the echo one, through an assistant whose turns may
    /// call the built-in tools (`current_time`, `reminders_*` in Europe/Paris), as the
    /// server wires them.
    pub(crate) agent: Option<Arc<dyn my_claw::llm::Provider>>,
    /// How often a job may run: every second here, unless a test is about the rule.
    shortest_interval: ShortestInterval,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            delay: Duration::from_millis(10),
            secret: None,
            template: None,
            whatsapp: true,
            agent: None,
            shortest_interval: TEST_INTERVAL,
        }
    }
}

impl App {
    /// The whole gateway with the scheduler attached, on a real socket, with WhatsApp
    /// pointed at `graph`.
    pub(crate) async fn start(graph: &Graph, options: Options) -> App {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("cron.db").display());
        let pool = my_claw::db::connect(&url).await.expect("open the database");
        let provider: Arc<dyn my_claw::llm::Provider> = match &options.agent {
            Some(model) => model.clone(),
            None => Arc::new(EchoProvider { delay: options.delay }),
        };
        let models = ModelRouter::with_providers(provider, HashMap::new(), Tier::Main);
        // The built-in tools get the scheduler once it runs, as in `app.rs`.
        let scheduler = my_claw::tools::reminders::SchedulerSlot::default();
        let mut tools = my_claw::tools::ToolRegistry::new();
        if options.agent.is_some() {
            let zone = chrono_tz::Tz::Europe__Paris;
            for tool in my_claw::tools::builtin_tools(zone, scheduler.clone(), pool.clone()) {
                tools.register(tool);
            }
        }
        let assistant = Arc::new(Assistant::with_agent(
            pool.clone(),
            Arc::new(models),
            AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
            my_claw::assistant::AgentConfig { tools, max_steps: 5 },
        ));
        let whatsapp = WhatsAppSettings {
            verify_token: Secret::new("verify-token"),
            app_secret: Secret::new("app-secret"),
            access_token: Secret::new("access-token"),
            phone_number_id: "106540352242922".into(),
            api_base: format!("{}/v26.0", graph.base),
            allowed_numbers: vec![USER_NUMBER.into(), format!("+{QUIET_NUMBER}")],
            template_name: options.template.map(str::to_string),
        };
        let retry = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            pair_rate_delay: Duration::from_millis(10),
        };
        let client =
            WhatsApp::new(whatsapp, reqwest::Client::new(), pool.clone()).with_retry(retry);
        let mut list: Vec<Arc<dyn Channel>> = Vec::new();
        if options.whatsapp {
            list.push(Arc::new(client));
        }
        let channels = Channels::new(list);
        let settings = CronSettings {
            secret: options.secret.map(Secret::new),
            timezone: Some("UTC".into()),
            delivery: PATIENCE,
            late_limit: LATE_LIMIT,
        };
        let cron = my_claw::cron::start_with(
            pool.clone(),
            assistant.clone(),
            channels.clone(),
            &settings,
            options.shortest_interval,
        )
        .await
        .expect("start the scheduler");
        scheduler.set(cron.clone());
        let state = AppState {
            pool: pool.clone(),
            assistant: assistant.clone(),
            webchat_token: Secret::new(TOKEN),
            started_at: Instant::now(),
            data_dir: Arc::new(dir.path().to_path_buf()),
            max_body_bytes: 64 * 1024,
            reply_max_tokens: 64,
            channels,
        };
        let app = gateway::cron::attach(gateway::router(state), cron.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        App { base, pool, assistant, cron, http, _dir: dir }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub(crate) async fn create(&self, job: Value) -> Value {
        let (status, body) = self.call(Method::POST, "/api/cron/jobs", Some(job)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    async fn update(&self, id: i64, changes: Value) -> Value {
        let (status, body) =
            self.call(Method::PUT, &format!("/api/cron/jobs/{id}"), Some(changes)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn runs(&self, id: i64) -> Vec<Value> {
        let (status, body) =
            self.call(Method::GET, &format!("/api/cron/jobs/{id}/runs"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["runs"].as_array().cloned().unwrap_or_default()
    }

    async fn finished_runs(&self, id: i64) -> Vec<Value> {
        let runs = self.runs(id).await;
        runs.into_iter().filter(|r| r["outcome"] != "running").collect()
    }

    /// Waits (bounded) until a job has at least `n` finished runs, and returns them.
    async fn wait_runs(&self, id: i64, n: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let runs = self.finished_runs(id).await;
            if runs.len() >= n {
                return runs;
            }
            assert!(
                started.elapsed() < FIRE_LIMIT,
                "job {id}: {} of {n} runs: {runs:?}",
                runs.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits (bounded) until no run of the job is in progress.
    async fn wait_idle(&self, id: i64) {
        let started = Instant::now();
        while self.runs(id).await.iter().any(|r| r["outcome"] == "running") {
            assert!(started.elapsed() < FIRE_LIMIT, "job {id} kept running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until the scheduler has looked at every occurrence up to `until`: a
    /// run it started for any of them has its history row by then. Its report moves each
    /// time an enabled job fires; `start_clock` makes sure one fires every second.
    pub(crate) async fn scheduler_passed(&self, until: DateTime<Utc>) {
        let mut checked = self.cron.checked_through();
        let waited = tokio::time::timeout(FIRE_LIMIT, checked.wait_for(|t| *t >= until)).await;
        assert!(matches!(waited, Ok(Ok(_))), "the scheduler did not look up to {until}");
    }

    /// A job that fires every second into a conversation of its own.
    async fn start_clock(&self) -> i64 {
        let conversation = self.webchat_conversation().await;
        id_of(&self.create(webchat_job("clock", EVERY_1S, conversation)).await)
    }

    /// A new scheduler over the same database (UTC, no channels), as after a restart of the
    /// process; the caller shut the first one down.
    async fn restart_scheduler(&self) -> my_claw::cron::CronHandle {
        self.restart_scheduler_with(TEST_INTERVAL).await
    }

    /// `restart_scheduler`, with jobs allowed to run as often as `shortest_interval` says.
    async fn restart_scheduler_with(
        &self,
        shortest_interval: ShortestInterval,
    ) -> my_claw::cron::CronHandle {
        let settings = CronSettings {
            secret: None,
            timezone: Some("UTC".into()),
            delivery: PATIENCE,
            late_limit: LATE_LIMIT,
        };
        my_claw::cron::start_with(
            self.pool.clone(),
            self.assistant.clone(),
            Channels::default(),
            &settings,
            shortest_interval,
        )
        .await
        .expect("restart the scheduler")
    }

    pub(crate) async fn webchat_conversation(&self) -> i64 {
        memory::create_webchat_conversation(&self.pool, Some("cron test")).await.unwrap().id.0
    }

    pub(crate) async fn assistant_messages(&self, conversation_id: i64) -> Vec<String> {
        let path = format!("/api/conversations/{conversation_id}/messages");
        let (status, body) = self.call(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "assistant")
            .map(|m| m["content"].as_str().unwrap().to_string())
            .collect()
    }

    /// Records that `number` wrote just now, which opens WhatsApp's 24-hour window.
    pub(crate) async fn user_wrote(&self, number: &str) {
        let item = NewInbound {
            channel: ChannelKind::WhatsApp,
            external_id: &format!("wamid.IN-{number}"),
            payload: "{}",
            status: QueueStatus::Ignored,
            note: Some("test: opens the window"),
        };
        let contact = ContactSeen {
            channel: ChannelKind::WhatsApp,
            address: number,
            display_name: None,
            at_ms: my_claw::db::now_ms(),
        };
        inbound::enqueue(&self.pool, &item, Some(&contact)).await.expect("record contact");
    }
}

pub(crate) fn webchat_job(name: &str, schedule: &str, conversation_id: i64) -> Value {
    json!({"name": name, "schedule": schedule, "prompt": format!("ping from {name}"),
           "channel": "webchat", "target": conversation_id.to_string()})
}

fn whatsapp_job(name: &str, schedule: &str, number: &str) -> Value {
    json!({"name": name, "schedule": schedule, "prompt": format!("ping from {name}"),
           "channel": "whatsapp", "target": format!("+{number}")})
}

pub(crate) fn id_of(job: &Value) -> i64 {
    job["id"].as_i64().expect("job id")
}

pub(crate) fn error_message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or_default().to_string()
}

// --- tests --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_every_two_seconds_delivers_to_webchat_and_whatsapp_until_disabled() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    app.user_wrote(USER_NUMBER).await;
    let mut events = app.assistant.subscribe();

    // Created while the server runs: scheduled at once, on the local `main` tier by default.
    let web = app.create(webchat_job("web", EVERY_2S, conversation)).await;
    let wa = app.create(whatsapp_job("wa", EVERY_2S, USER_NUMBER)).await;
    assert_eq!(web["tier"], "main");
    assert_eq!(wa["target"], USER_NUMBER, "numbers are stored as WhatsApp ids");
    assert_eq!(web["effective_timezone"], "UTC");
    let now = my_claw::db::now_ms();
    let next = web["next_run"].as_i64().expect("next_run");
    assert!(next > now - 1000 && next <= now + 2500, "next_run {next} vs now {now}");

    let web_runs = app.wait_runs(id_of(&web), 2).await;
    let wa_runs = app.wait_runs(id_of(&wa), 2).await;
    for run in web_runs.iter().chain(&wa_runs) {
        assert_eq!(run["outcome"], "delivered", "{run}");
        assert!(run["message_id"].is_i64(), "{run}");
        assert!(run["duration_ms"].is_i64(), "{run}");
    }
    let answers = app.assistant_messages(conversation).await;
    assert!(answers.len() >= 2, "{answers:?}");
    assert!(answers[0].starts_with("echo: [scheduled: web] ping from web"), "{answers:?}");
    let texts = graph.texts_to(USER_NUMBER);
    assert!(texts.len() >= 2, "{:?}", graph.posts());
    assert!(texts[0].contains("ping from wa"), "{texts:?}");

    // The stored answers were announced, which is how an open WebChat page sees them.
    let mut announced = false;
    while let Ok(event) = events.try_recv() {
        announced |= event.conversation_id.0 == conversation
            && matches!(event.change, Change::Stored { role: Role::Assistant, .. });
    }
    assert!(announced, "no live event for the WebChat conversation");

    // The job shows its last run; the WhatsApp answer carries its wamid for status updates.
    let (_, shown) = app.call(Method::GET, &format!("/api/cron/jobs/{}", id_of(&wa)), None).await;
    assert_eq!(shown["last_outcome"], "delivered", "{shown}");
    assert!(shown["last_run"].is_i64(), "{shown}");
    let message_id = wa_runs[0]["message_id"].as_i64().unwrap();
    let stored = memory::get_message(&app.pool, my_claw::domain::MessageId(message_id))
        .await
        .unwrap()
        .expect("stored answer");
    assert!(stored.external_id.as_deref().is_some_and(|id| id.starts_with("wamid.CRON")));

    // Disabling stops both at once, without a restart.
    for job in [&web, &wa] {
        let disabled = app.update(id_of(job), json!({"enabled": false})).await;
        assert_eq!(disabled["enabled"], false);
        assert!(disabled["next_run"].is_null(), "{disabled}");
    }
    let disabled_at = Utc::now();
    app.start_clock().await;
    app.wait_idle(id_of(&web)).await;
    app.wait_idle(id_of(&wa)).await;
    let web_count = app.runs(id_of(&web)).await.len();
    let wa_count = app.runs(id_of(&wa)).await.len();
    let posts = graph.posts().len();
    // Two occurrences of theirs have passed since they were disabled.
    app.scheduler_passed(disabled_at + chrono::Duration::seconds(4)).await;
    assert_eq!(app.runs(id_of(&web)).await.len(), web_count, "disabled web job ran");
    assert_eq!(app.runs(id_of(&wa)).await.len(), wa_count, "disabled whatsapp job ran");
    assert_eq!(graph.posts().len(), posts, "disabled job still sent to WhatsApp");

    // Enabling brings it back.
    app.update(id_of(&web), json!({"enabled": true})).await;
    app.wait_runs(id_of(&web), web_count + 1).await;
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_schedule_takes_effect_without_a_restart() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let job = app.create(webchat_job("edit", YEARLY, conversation)).await;
    let id = id_of(&job);
    app.start_clock().await;
    app.scheduler_passed(Utc::now() + chrono::Duration::seconds(2)).await;
    assert!(app.runs(id).await.is_empty(), "a yearly job ran");

    let edited = app.update(id, json!({"schedule": EVERY_2S})).await;
    assert_eq!(edited["schedule"], EVERY_2S);
    assert_eq!(edited["prompt"], "ping from edit", "a partial edit keeps the other fields");
    app.wait_runs(id, 2).await;

    // A time zone change moves the next run; back to yearly, it stops.
    let edited = app.update(id, json!({"schedule": "0 8 * * *", "timezone": "Asia/Tokyo"})).await;
    let next = edited["next_run"].as_i64().unwrap();
    let next = chrono::DateTime::from_timestamp_millis(next).unwrap();
    assert_eq!(next.format("%H:%M").to_string(), "23:00", "08:00 in Tokyo is 23:00 UTC");
    assert_eq!(edited["effective_timezone"], "Asia/Tokyo");
    let reset = app.update(id, json!({"timezone": null})).await;
    assert!(reset["timezone"].is_null());
    assert_eq!(reset["effective_timezone"], "UTC");
    let edited_at = Utc::now();
    app.wait_idle(id).await;
    let count = app.runs(id).await.len();
    app.scheduler_passed(edited_at + chrono::Duration::seconds(4)).await;
    assert_eq!(app.runs(id).await.len(), count, "the old schedule still fired");
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_job_never_runs_twice_at_once() {
    let graph = Graph::start().await;
    let options = Options { delay: Duration::from_millis(2500), ..Options::default() };
    let app = App::start(&graph, options).await;
    let conversation = app.webchat_conversation().await;
    // Every second, with answers that take two and a half.
    let job = app.create(webchat_job("slow", "* * * * * *", conversation)).await;
    let id = id_of(&job);
    let runs = app.wait_runs(id, 2).await;
    app.update(id, json!({"enabled": false})).await;
    app.wait_idle(id).await;
    let mut spans: Vec<(i64, i64)> = app
        .runs(id)
        .await
        .iter()
        .map(|r| {
            let start = r["started_at"].as_i64().unwrap();
            (start, start + r["duration_ms"].as_i64().unwrap())
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "runs overlap: {spans:?} ({runs:?})");
    }
    // Run-now is refused while a run is in progress.
    app.update(id, json!({"schedule": YEARLY, "enabled": true})).await;
    let path = format!("/api/cron/jobs/{id}/run");
    let first = {
        let request = app.http.post(format!("{}{path}", app.base)).bearer_auth(TOKEN);
        tokio::spawn(request.send())
    };
    let started = Instant::now();
    loop {
        let running = app.runs(id).await.iter().any(|r| r["outcome"] == "running");
        if running {
            break;
        }
        assert!(started.elapsed() < FIRE_LIMIT, "run-now did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = app.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_message(&body).contains("already running"), "{body}");
    let first = first.await.unwrap().expect("first run-now");
    assert_eq!(first.status().as_u16(), 200);
    app.cron.shutdown().await;
}

/// A channel outage (here: the Graph API answering 500 to three rounds of the client's
/// quick retries) does not cost a job's message: it is offered again with backoff and
/// delivered once the channel is back, exactly once. Before, the run failed after the
/// client's own retries, and a one-shot reminder was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_channel_outage_delays_a_jobs_message_and_never_loses_it() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    app.user_wrote(USER_NUMBER).await;
    let job = app.create(whatsapp_job("outage", YEARLY, USER_NUMBER)).await;
    // The test client tries twice per delivery: three deliveries meet the outage.
    let outage = json!({"error": {"message": "(#1) An unknown error occurred",
                                  "type": "OAuthException", "code": 1}});
    for _ in 0..6 {
        graph.script.lock().unwrap().push_back((500, outage.clone()));
    }
    let path = format!("/api/cron/jobs/{}/run", id_of(&job));
    let (status, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["outcome"], "delivered", "{run}");
    assert_eq!(graph.texts_to(USER_NUMBER).len(), 7, "six refused posts, then one delivered");
    let answer = my_claw::domain::MessageId(run["message_id"].as_i64().expect("the answer"));
    let answer = memory::get_message(&app.pool, answer).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("sent"), "{answer:?}");
    // The API shows how the channel took it.
    let path_of = |id: ConversationId| format!("/api/conversations/{}/messages", id.0);
    let (_, shown) = app.call(Method::GET, &path_of(answer.conversation_id), None).await;
    let shown = shown["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(shown["delivery_status"], "sent", "{shown}");

    // An outage longer than the patience fails the run, saying the channel could not take it.
    for _ in 0..100 {
        graph.script.lock().unwrap().push_back((500, outage.clone()));
    }
    let (_, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    let reason = run["error"].as_str().unwrap_or_default();
    assert!(reason.contains("whatsapp could not take the message"), "{reason}");
    let (_, shown) = app.call(Method::GET, &path_of(answer.conversation_id), None).await;
    let shown = shown["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(shown["delivery_status"], "failed", "{shown}");
    assert!(shown["delivery_error"].as_str().unwrap().contains("http 500"), "{shown}");
    graph.script.lock().unwrap().clear();
    app.cron.shutdown().await;
}

/// A job's long answer (three WhatsApp parts) whose second part meets an outage: it is
/// `sending` before it leaves and while the outage lasts, with the first part's id recorded
/// as soon as it went; `deliver_patiently` then offers only what did not go out, so the user
/// gets each part once, in order, and the answer is `sent` with every part's id. Before, each
/// new offer sent the whole text again, and the answer was not `sending` during the send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_jobs_message_is_resumed_from_the_part_that_failed() {
    let paragraph =
        |i: usize| format!("Part {i} of the job's answer. {}", "Some words. ".repeat(250));
    let text = (0..3).map(paragraph).collect::<Vec<_>>().join("\n\n");
    let parts = my_claw::channels::split::split_message(
        &my_claw::channels::markup::markdown_to_whatsapp(&text),
        my_claw::channels::whatsapp::MAX_TEXT_CHARS,
    );
    assert_eq!(parts.len(), 3, "the answer must take three messages");
    let model = crate::agent::ToolModel::new(move |_, _| (vec![text.clone()], vec![]));
    let agent: Arc<dyn my_claw::llm::Provider> = Arc::new(crate::agent::Scripted(model));
    let graph = Graph::start().await;
    let app = App::start(&graph, Options { agent: Some(agent), ..Options::default() }).await;
    app.user_wrote(USER_NUMBER).await;
    let job = app.create(whatsapp_job("long", YEARLY, USER_NUMBER)).await;
    // The first part goes through; the test client tries twice per offer, so three offers
    // meet the outage; the fourth sends the last two parts.
    let sent = |wamid: &str| json!({"messaging_product": "whatsapp", "messages": [{"id": wamid}]});
    let outage = json!({"error": {"message": "(#1) An unknown error occurred",
                                  "type": "OAuthException", "code": 1}});
    {
        let mut script = graph.script.lock().unwrap();
        script.push_back((200, sent("wamid.J0")));
        script.extend((0..6).map(|_| (500, outage.clone())));
        script.push_back((200, sent("wamid.J1")));
        script.push_back((200, sent("wamid.J2")));
    }
    let path = format!("/api/cron/jobs/{}/run", id_of(&job));
    let run = {
        let app_base = app.base.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{app_base}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("run now")
                .json::<Value>()
                .await
                .expect("the run")
        })
    };

    // During the outage: the first part is recorded, and the answer is still being sent.
    let target = job["target"].as_str().unwrap().to_string();
    let started = Instant::now();
    let answer = loop {
        assert!(started.elapsed() < FIRE_LIMIT, "the first part was never recorded");
        let conversation =
            memory::find_conversation(&app.pool, ChannelKind::WhatsApp, &target).await.unwrap();
        let answer = match conversation {
            Some(c) => memory::history(&app.pool, c.id, 10).await.unwrap().into_iter().nth(1),
            None => None,
        };
        if let Some(answer) = answer {
            let recorded = memory::message_parts(&app.pool, answer.id).await.unwrap();
            if !recorded.is_empty() {
                let ids: Vec<&str> = recorded.iter().map(|p| p.external_id.as_str()).collect();
                assert_eq!(ids, ["wamid.J0"], "caught after the outage ended: {recorded:?}");
                let now = memory::get_message(&app.pool, answer.id).await.unwrap().unwrap();
                assert_eq!(now.delivery_status.as_deref(), Some("sending"), "during the send");
                break answer;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    let run = run.await.expect("the run-now call");
    assert_eq!(run["outcome"], "delivered", "{run}");
    assert_eq!(run["message_id"].as_i64(), Some(answer.id.0));
    let mut expected = vec![parts[0].clone()];
    expected.extend(std::iter::repeat_n(parts[1].clone(), 7));
    expected.push(parts[2].clone());
    let texts = graph.texts_to(USER_NUMBER);
    assert_eq!(texts.len(), expected.len(), "{} posts", texts.len());
    assert!(texts == expected, "a part was sent again, or out of order");
    let answer = memory::get_message(&app.pool, answer.id).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("sent"), "{answer:?}");
    assert_eq!(answer.external_id.as_deref(), Some("wamid.J0"));
    let recorded = memory::message_parts(&app.pool, answer.id).await.unwrap();
    let ids: Vec<(i64, &str)> =
        recorded.iter().map(|p| (p.index, p.external_id.as_str())).collect();
    assert_eq!(ids, [(0, "wamid.J0"), (1, "wamid.J1"), (2, "wamid.J2")]);
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_records_history_and_why_a_channel_refused() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;

    // WebChat: run now answers with the finished run; the history lists it.
    let web = app.create(webchat_job("now", YEARLY, conversation)).await;
    let (status, run) =
        app.call(Method::POST, &format!("/api/cron/jobs/{}/run", id_of(&web)), None).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["outcome"], "delivered", "{run}");
    assert_eq!(run["job_id"], web["id"]);
    assert_eq!(app.assistant_messages(conversation).await.len(), 1);
    let history = app.runs(id_of(&web)).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["id"], run["id"]);

    // WhatsApp outside the 24-hour window, with no template: failed, and why, before the
    // model is asked for an answer nobody could receive.
    let quiet = app.create(whatsapp_job("quiet", YEARLY, QUIET_NUMBER)).await;
    let path = format!("/api/cron/jobs/{}/run", id_of(&quiet));
    let (_, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    let reason = run["error"].as_str().unwrap_or_default();
    assert!(reason.contains("24-hour") && reason.contains("nothing was asked"), "{reason}");
    assert!(run["message_id"].is_null(), "the model answered anyway: {run}");
    assert!(graph.texts_to(QUIET_NUMBER).is_empty());
    let chat = memory::find_conversation(&app.pool, ChannelKind::WhatsApp, QUIET_NUMBER).await;
    assert!(chat.unwrap().is_none(), "the prompt was stored for nobody");

    // Inside the window, the Graph API refuses: its reason is recorded on the job too.
    app.user_wrote(QUIET_NUMBER).await;
    let refusal = json!({"error": {"message": "(#131026) Message undeliverable",
                                   "type": "OAuthException", "code": 131026,
                                   "error_data": {"details": "receiver incapable"}}});
    graph.script.lock().unwrap().push_back((400, refusal));
    let (_, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    let reason = run["error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("whatsapp refused the message") && reason.contains("131026"),
        "{reason}"
    );
    let (_, shown) =
        app.call(Method::GET, &format!("/api/cron/jobs/{}", id_of(&quiet)), None).await;
    assert_eq!(shown["last_outcome"], "failed");
    assert_eq!(shown["last_error"], run["error"]);
    // The stored answer says it never left.
    let answer = my_claw::domain::MessageId(run["message_id"].as_i64().expect("answer kept"));
    let answer = memory::get_message(&app.pool, answer).await.unwrap().unwrap();
    assert_eq!(answer.delivery_status.as_deref(), Some("failed"), "{answer:?}");
    assert!(answer.delivery_error.as_deref().unwrap_or_default().contains("131026"));

    // The next try goes through; the history is newest first.
    let (_, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(run["outcome"], "delivered", "{run}");
    let history = app.runs(id_of(&quiet)).await;
    let outcomes: Vec<&str> = history.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["delivered", "failed", "failed"]);
    assert!(history[2]["error"].as_str().unwrap().contains("24-hour"));

    // Old runs are pruned from the newest down.
    let quiet_id = my_claw::db::cron::CronJobId(id_of(&quiet));
    let pruned = my_claw::db::cron::prune_runs(&app.pool, quiet_id, 1).await.unwrap();
    assert_eq!(pruned, 2);
    assert_eq!(app.runs(id_of(&quiet)).await[0]["id"], history[0]["id"]);

    // A job whose channel is no longer configured (saved before the configuration
    // changed) fails at once, without asking the model.
    let spec = my_claw::db::cron::JobSpec {
        name: "talk".into(),
        schedule: YEARLY.into(),
        timezone: None,
        prompt: "hi".into(),
        channel: ChannelKind::Nextcloud,
        target: "room42".into(),
        tier: None,
        enabled: true,
        kind: my_claw::db::cron::JobKind::Prompt,
        conversation_id: None,
    };
    let talk = my_claw::db::cron::insert_job(&app.pool, &spec).await.unwrap();
    let path = format!("/api/cron/jobs/{}/run", talk.id.0);
    let (_, run) = app.call(Method::POST, &path, None).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains("nextcloud is not configured"), "{run}");
    assert!(run["message_id"].is_null(), "{run}");

    // Likewise a job for a number that left WHATSAPP_ALLOWED_NUMBERS since it was made:
    // nothing is sent to it, and the model is not asked.
    let posts_before = graph.posts().len();
    let gone = my_claw::db::cron::JobSpec {
        name: "to a number no longer allowed".into(),
        channel: ChannelKind::WhatsApp,
        target: "33799999999".into(),
        ..spec
    };
    let gone = my_claw::db::cron::insert_job(&app.pool, &gone).await.unwrap();
    // It wrote within the day (while it was allowed): only the allow-list stops the send.
    app.user_wrote("33799999999").await;
    let (_, run) = app.call(Method::POST, &format!("/api/cron/jobs/{}/run", gone.id.0), None).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains("WHATSAPP_ALLOWED_NUMBERS"), "{run}");
    assert!(run["message_id"].is_null(), "{run}");
    assert_eq!(graph.posts().len(), posts_before, "nothing was sent");
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_window_the_configured_template_is_sent() {
    let graph = Graph::start().await;
    let options = Options { template: Some("daily_digest"), ..Options::default() };
    let app = App::start(&graph, options).await;
    let job = app.create(whatsapp_job("digest", YEARLY, QUIET_NUMBER)).await;
    let (_, run) =
        app.call(Method::POST, &format!("/api/cron/jobs/{}/run", id_of(&job)), None).await;
    assert_eq!(run["outcome"], "delivered", "{run}");
    assert!(run["error"].as_str().unwrap_or_default().contains("template"), "{run}");
    let posts = graph.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["type"], "template");
    assert_eq!(posts[0]["template"]["name"], "daily_digest");
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_400_with_what_is_wrong() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let good = webchat_job("good", "0 8 * * *", conversation);
    let with = |field: &str, value: Value| {
        let mut job = good.clone();
        job[field] = value;
        job
    };
    let without = |field: &str| {
        let mut job = good.clone();
        job.as_object_mut().unwrap().remove(field);
        job
    };
    let cases = [
        (with("schedule", json!("0 25 * * *")), "hour field `25`"),
        (with("schedule", json!("61 * * * *")), "minute field `61`"),
        (with("schedule", json!("* * *")), "has 3 fields"),
        (with("schedule", json!("0 0 30 2 *")), "never happens"),
        (
            with("schedule", json!("0 8 W * *")),
            "field `W` is not valid (1-31, L, or a day with W such as 15W)",
        ),
        (without("schedule"), "`schedule` is required"),
        (with("timezone", json!("Europe/Atlantis")), "unknown time zone"),
        (without("target"), "`target` is required"),
        (with("target", json!("  ")), "`target` is required"),
        (with("target", json!("999999")), "no WebChat conversation"),
        (with("channel", json!("telegram")), "unknown channel"),
        (without("channel"), "`channel` is required"),
        (with("tier", json!("huge")), "unknown tier"),
        (without("prompt"), "`prompt` is required"),
        // Nothing to read (a chat message of it is refused too): it was stored, and the
        // model was asked a NUL at every run.
        (with("prompt", json!("\u{0}")), "`prompt` is required"),
        (with("prompt", json!(" \u{200b}\u{1b} ")), "`prompt` is required"),
        (
            json!({"channel": "whatsapp", "target": "not a number", "schedule": "@daily",
                "prompt": "hi"}),
            "not a WhatsApp number",
        ),
        (json!("not an object"), "invalid JSON body"),
        (with("kind", json!("reminder")), "a reminder is made by asking the assistant"),
        (with("target", json!("0")), "not a WebChat conversation id"),
    ];
    for (job, expected) in cases {
        let (status, body) = app.call(Method::POST, "/api/cron/jobs", Some(job.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{job} -> {body}");
        assert!(error_message(&body).contains(expected), "{job}: {body}");
    }
    let (_, list) = app.call(Method::GET, "/api/cron/jobs", None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "nothing was stored");

    // A bad edit changes nothing.
    let job = app.create(good.clone()).await;
    let path = format!("/api/cron/jobs/{}", id_of(&job));
    let (status, body) = app.call(Method::PUT, &path, Some(json!({"schedule": "every day"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app.call(Method::PUT, &path, Some(json!({"kind": "reminder"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_message(&body).contains("kind cannot be changed"), "{body}");
    let (_, shown) = app.call(Method::GET, &path, None).await;
    assert_eq!(shown["schedule"], "0 8 * * *");
    // The whole job sent back, as a client that edits what it was shown does, is fine.
    let mut whole = shown.clone();
    whole["name"] = json!("renamed");
    let renamed = app.update(id_of(&job), whole).await;
    assert_eq!((&renamed["name"], &renamed["kind"]), (&json!("renamed"), &json!("prompt")));

    // Unknown and malformed ids, and no token at all.
    let (status, _) = app.call(Method::GET, "/api/cron/jobs/4242", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.call(Method::DELETE, "/api/cron/jobs/4242", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.call(Method::POST, "/api/cron/jobs/abc/run", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let anonymous = app.http.get(format!("{}/api/cron/jobs", app.base)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    // The description says the same things.
    let path_of = |expression: &str| {
        format!("/api/cron/describe?expression={}", expression.replace(' ', "%20"))
    };
    let (status, body) = app.call(Method::GET, &path_of("0 8 * * MOON"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body).contains("day-of-week"), "{body}");

    // Delete removes the job and its history.
    let (status, _) = app.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_unreachable_targets_get_a_clear_400_and_store_nothing() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let good = webchat_job("good", "0 8 * * *", conversation);
    let with = |field: &str, value: Value| {
        let mut job = good.clone();
        job[field] = value;
        job
    };
    let whatsapp_chat =
        memory::get_or_create_conversation(&app.pool, ChannelKind::WhatsApp, USER_NUMBER, None)
            .await
            .unwrap();
    let cases = [
        (with("prompt", json!("p".repeat(4001))), "`prompt` is longer than 4000 characters"),
        (with("name", json!("n".repeat(101))), "`name` is longer than 100 characters"),
        (
            with("schedule", json!(format!("0 8 * * {}", "1,".repeat(20_000)))),
            "longer than 200 characters",
        ),
        (with("target", json!("9".repeat(65))), "`target` is longer than 64 characters"),
        (with("timezone", json!("Z".repeat(5000))), "unknown time zone"),
        (
            json!({"schedule": "@daily", "prompt": "hi", "channel": "nextcloud",
                   "target": "room42"}),
            "Nextcloud Talk is not configured",
        ),
        (whatsapp_job("stranger", "@daily", "447700900123"), "not in WHATSAPP_ALLOWED_NUMBERS"),
        (with("target", json!(whatsapp_chat.id.0.to_string())), "no WebChat conversation"),
    ];
    for (job, expected) in cases {
        let (status, body) = app.call(Method::POST, "/api/cron/jobs", Some(job.clone())).await;
        let shown: String = job.to_string().chars().take(120).collect();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{shown} -> {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{body}");
        let message = error_message(&body);
        assert!(message.contains(expected), "{shown}: {message}");
        assert!(message.len() < 400, "the error echoes the input: {message}");
    }
    let (_, list) = app.call(Method::GET, "/api/cron/jobs", None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "nothing was stored");

    // At the limits, and to an allowed number, a job is accepted.
    let mut at_limits = with("prompt", json!("p".repeat(4000)));
    at_limits["name"] = json!("n".repeat(100));
    let at_limits = app.create(at_limits).await;
    assert_eq!(at_limits["prompt"].as_str().unwrap().len(), 4000);
    let allowed = app.create(whatsapp_job("quiet", "@daily", QUIET_NUMBER)).await;
    assert_eq!(allowed["target"], QUIET_NUMBER);

    // An edit is checked the same way, and a refused one changes nothing.
    let path = format!("/api/cron/jobs/{}", id_of(&allowed));
    for (changes, expected) in [
        (json!({"target": "+447700900123"}), "not in WHATSAPP_ALLOWED_NUMBERS"),
        (json!({"channel": "nextcloud", "target": "room42"}), "Nextcloud Talk is not configured"),
        (json!({"prompt": "p".repeat(4001)}), "`prompt` is longer than 4000 characters"),
    ] {
        let (status, body) = app.call(Method::PUT, &path, Some(changes)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error_message(&body).contains(expected), "{body}");
    }
    let (_, shown) = app.call(Method::GET, &path, None).await;
    assert_eq!(shown["target"], QUIET_NUMBER, "{shown}");
    assert_eq!(shown["channel"], "whatsapp", "{shown}");
    app.cron.shutdown().await;

    // Without WhatsApp configured, a WhatsApp target is refused, even an allowed number.
    let app = App::start(&graph, Options { whatsapp: false, ..Options::default() }).await;
    let (status, body) = app
        .call(Method::POST, "/api/cron/jobs", Some(whatsapp_job("wa", "@daily", USER_NUMBER)))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_message(&body).contains("WhatsApp is not configured"), "{body}");
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_paths_and_bodies_get_the_json_error_shape() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let job = app.create(webchat_job("shape", YEARLY, conversation)).await;
    let id = id_of(&job);
    let (status, body) =
        app.call(Method::GET, &format!("/api/cron/jobs/{id}/runs?limit=5"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cases = [
        (Method::GET, format!("/api/cron/jobs/{id}/runs?limit=abc"), None, "`abc` is not a num"),
        (Method::GET, format!("/api/cron/jobs/{id}/runs?limit=1e99"), None, "not a number"),
        (Method::GET, format!("/api/cron/jobs/{id}/runs?limit=0"), None, "must be at least 1"),
        (Method::GET, "/api/cron/jobs/abc".to_string(), None, "`abc` is not a job id"),
        (Method::GET, "/api/cron/jobs/%FF".to_string(), None, "invalid path"),
        (Method::GET, "/api/cron/jobs/abc/runs".to_string(), None, "not a job id"),
        (Method::DELETE, "/api/cron/jobs/abc".to_string(), None, "not a job id"),
        (Method::GET, "/api/cron/describe".to_string(), None, "`expression` is required"),
        (Method::GET, "/api/cron/describe?expression=".to_string(), None, "empty"),
        (
            Method::PUT,
            format!("/api/cron/jobs/{id}"),
            Some(json!({"enabled": "yes"})),
            "`enabled` must be true or false",
        ),
        (Method::POST, "/api/cron/jobs".to_string(), Some(json!([1, 2])), "invalid JSON body"),
    ];
    for (method, path, body, expected) in cases {
        let (status, answer) = app.call(method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{method} {path}: {answer}");
        assert!(error_message(&answer).contains(expected), "{method} {path}: {answer}");
    }
    // A body that is not JSON at all.
    let response = app
        .http
        .put(format!("{}/api/cron/jobs/{id}", app.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let answer: Value = response.json().await.expect("a JSON error body");
    assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
    app.cron.shutdown().await;
}

/// Each 400 of the jobs API names the request field it is about in `param`, as OpenAI's
/// errors do, so a client (or the page) can point at the field: body fields on a create or an
/// edit, query fields of the history and of the describer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_of_a_job_names_its_field_in_param() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let other = app.webchat_conversation().await;
    let job = app.create(webchat_job("fields", YEARLY, conversation)).await;
    let id = id_of(&job);
    let reminder = app
        .cron
        .create_reminder(NewReminder {
            text: "water the plants".into(),
            schedule: YEARLY.into(),
            timezone: chrono_tz::UTC,
            channel: ChannelKind::WebChat,
            target: conversation.to_string(),
            conversation_id: ConversationId(conversation),
        })
        .await
        .expect("reminder");
    let base = webchat_job("fields", YEARLY, conversation);
    let with = |field: &str, value: Value| {
        let mut job = base.clone();
        job[field] = value;
        job
    };
    let mut no_channel = base.clone();
    no_channel.as_object_mut().unwrap().remove("channel");
    let creates = [
        (with("schedule", json!("0 25 * * *")), "schedule"),
        (with("schedule", json!(" ")), "schedule"),
        (with("schedule", json!("0 0 30 2 *")), "schedule"),
        (with("schedule", json!("at 2001-01-02 03:04")), "schedule"),
        (with("schedule", json!("1,".repeat(150))), "schedule"),
        (with("timezone", json!("Mars/Olympus")), "timezone"),
        (with("prompt", json!("   ")), "prompt"),
        (with("prompt", json!("p".repeat(4001))), "prompt"),
        (with("name", json!("n".repeat(101))), "name"),
        (with("channel", json!("telegram")), "channel"),
        (no_channel, "channel"),
        (
            json!({"schedule": YEARLY, "prompt": "x", "channel": "nextcloud", "target": "room1"}),
            "channel",
        ),
        (with("target", json!("kitchen")), "target"),
        (with("target", json!("")), "target"),
        (with("target", json!("999999")), "target"),
        (whatsapp_job("wa", YEARLY, "15550000000"), "target"),
        (with("tier", json!("huge")), "tier"),
        (with("kind", json!("reminder")), "kind"),
    ];
    let job_path = format!("/api/cron/jobs/{id}");
    let reminder_path = format!("/api/cron/jobs/{}", reminder.job.id.0);
    let mut cases: Vec<(Method, String, Option<Value>, &str)> = creates
        .into_iter()
        .map(|(body, param)| (Method::POST, "/api/cron/jobs".to_string(), Some(body), param))
        .collect();
    for (body, param) in [
        (json!({"schedule": "61 * * * *"}), "schedule"),
        (json!({"timezone": "Paris"}), "timezone"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"tier": "gpt-9"}), "tier"),
        (json!({"target": "0"}), "target"),
        (json!({"kind": "reminder"}), "kind"),
    ] {
        cases.push((Method::PUT, job_path.clone(), Some(body), param));
    }
    cases.push((
        Method::PUT,
        reminder_path.clone(),
        Some(json!({"target": other.to_string()})),
        "target",
    ));
    cases.push((Method::PUT, reminder_path, Some(json!({"channel": "whatsapp"})), "channel"));
    for (query, param) in [
        ("/api/cron/describe", "expression"),
        ("/api/cron/describe?expression=%40often", "expression"),
        ("/api/cron/describe?expression=%40daily&timezone=Mars%2FOlympus", "timezone"),
    ] {
        cases.push((Method::GET, query.to_string(), None, param));
    }
    for limit in ["many", "0", "-3"] {
        cases.push((Method::GET, format!("/api/cron/jobs/{id}/runs?limit={limit}"), None, "limit"));
    }
    // A field of the wrong type, which serde would not name.
    cases.push((Method::PUT, job_path.clone(), Some(json!({"enabled": "yes"})), "enabled"));
    cases.push((
        Method::POST,
        "/api/cron/jobs".into(),
        Some(with("schedule", json!(5))),
        "schedule",
    ));
    for (method, path, body, param) in cases {
        let shown = body.as_ref().map(Value::to_string).unwrap_or_default();
        let shown: String = shown.chars().take(120).collect();
        let (status, answer) = app.call(method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path} {shown}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["param"], param, "{method} {path} {shown}: {answer}");
        assert_eq!(error["type"], "invalid_request_error", "{answer}");
        assert_eq!(error["code"], "bad_request", "{answer}");
        assert!(!error_message(&answer).is_empty(), "{answer}");
    }
    // Nothing was made or changed by the refusals.
    let (_, list) = app.call(Method::GET, "/api/cron/jobs", None).await;
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(2), "{list}");
    let (_, unchanged) = app.call(Method::GET, &job_path, None).await;
    assert_eq!(unchanged["schedule"], YEARLY, "{unchanged}");
    app.cron.shutdown().await;
}

/// A job that fires several times a minute would keep the local model busy (a prompt job) or
/// flood its conversation (a reminder): the API refuses one that is enabled, saying the
/// shortest interval, while a fixed seconds field (once a minute) is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_at_most_once_a_minute() {
    let graph = Graph::start().await;
    let options = Options { shortest_interval: ShortestInterval::OneMinute, ..Options::default() };
    let app = App::start(&graph, options).await;
    let conversation = app.webchat_conversation().await;
    let refused = |answer: &Value| {
        assert_eq!(answer["error"]["param"], "schedule", "{answer}");
        let message = error_message(answer);
        assert!(message.contains("the shortest interval between a job's runs is one minute"));
    };
    for schedule in ["* * * * * *", "*/5 * * * * *", "0,30 * * * * *"] {
        let job = webchat_job("fast", schedule, conversation);
        let (status, answer) = app.call(Method::POST, "/api/cron/jobs", Some(job)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{schedule}: {answer}");
        refused(&answer);
    }
    let (_, answer) = app
        .call(
            Method::POST,
            "/api/cron/jobs",
            Some(webchat_job("fast", "*/5 * * * * *", conversation)),
        )
        .await;
    assert!(error_message(&answer).contains("every 5 seconds"), "{answer}");
    let once = app.create(webchat_job("once a minute", "30 * * * * *", conversation)).await;
    assert_eq!(once["enabled"], true, "{once}");
    let (status, answer) = app
        .call(
            Method::PUT,
            &format!("/api/cron/jobs/{}", id_of(&once)),
            Some(json!({"schedule": "*/10 * * * * *"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    refused(&answer);
    // Disabled too, on create and on edit: no job could ever run on it (a QA pass found
    // such a job saved, then impossible to enable).
    let mut paused = webchat_job("paused", "* * * * * *", conversation);
    paused["enabled"] = json!(false);
    let (status, answer) = app.call(Method::POST, "/api/cron/jobs", Some(paused)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    refused(&answer);
    let path = format!("/api/cron/jobs/{}", id_of(&once));
    let fast = json!({"schedule": "*/5 * * * * *", "enabled": false});
    let (status, answer) = app.call(Method::PUT, &path, Some(fast)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    refused(&answer);
    let (_, kept) = app.call(Method::GET, &path, None).await;
    assert_eq!((&kept["schedule"], &kept["enabled"]), (&json!("30 * * * * *"), &json!(true)));
    // The editor hears it as the schedule is typed.
    let (status, answer) =
        app.call(Method::GET, "/api/cron/describe?expression=*%2F5+*+*+*+*+*", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["param"], "expression", "{answer}");
    // A reminder too: no model, but a message every few seconds is no reminder.
    let reminder = app
        .cron
        .create_reminder(NewReminder {
            text: "breathe".into(),
            schedule: "*/10 * * * * *".into(),
            timezone: chrono_tz::UTC,
            channel: ChannelKind::WebChat,
            target: conversation.to_string(),
            conversation_id: ConversationId(conversation),
        })
        .await;
    let error = reminder.expect_err("a reminder every 10 seconds").to_string();
    assert!(error.contains("shortest interval between a job's runs is one minute"), "{error}");
    app.cron.shutdown().await;
}

/// Jobs stored with such a schedule (before the rule, or written around the API) do not stop
/// the start: they are loaded, and disabled with the reason as their last error, which the
/// Schedules panel shows; the other jobs run on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_job_firing_every_second_is_disabled_at_start_saying_why() {
    let graph = Graph::start().await;
    let options = Options { shortest_interval: ShortestInterval::OneMinute, ..Options::default() };
    let app = App::start(&graph, options).await;
    let conversation = app.webchat_conversation().await;
    app.cron.shutdown().await;
    let stored = |name: &str, schedule: &str, kind: my_claw::db::cron::JobKind| {
        let spec = my_claw::db::cron::JobSpec {
            name: name.into(),
            schedule: schedule.into(),
            timezone: None,
            prompt: format!("ping from {name}"),
            channel: ChannelKind::WebChat,
            target: conversation.to_string(),
            tier: None,
            enabled: true,
            kind,
            conversation_id: (kind == my_claw::db::cron::JobKind::Reminder)
                .then_some(ConversationId(conversation)),
        };
        let pool = app.pool.clone();
        async move { my_claw::db::cron::insert_job(&pool, &spec).await.expect("a stored job").id }
    };
    use my_claw::db::cron::JobKind;
    let every_second = stored("every second", "* * * * * *", JobKind::Prompt).await;
    let every_5s = stored("nag", "*/5 * * * * *", JobKind::Reminder).await;
    let daily = stored("daily", "0 8 * * *", JobKind::Prompt).await;
    let unreadable = stored("unreadable", "garbage", JobKind::Prompt).await;

    let restarted = app.restart_scheduler_with(ShortestInterval::OneMinute).await;
    for id in [every_second, every_5s] {
        let view = restarted.get(id).await.unwrap();
        assert!(!view.job.enabled, "{view:?}");
        assert!(view.next_run.is_none(), "{view:?}");
        let why = view.job.last_error.clone().unwrap_or_default();
        assert!(why.starts_with("disabled at start: `"), "{why}");
        assert!(why.contains("the shortest interval between a job's runs is one minute"), "{why}");
        // Changing the schedule does not enable it again: the user does.
        assert!(why.ends_with("; change its schedule, then enable it"), "{why}");
        // The API shows it, as the Schedules panel does.
        let (_, shown) = app.call(Method::GET, &format!("/api/cron/jobs/{}", id.0), None).await;
        assert_eq!(shown["enabled"], false, "{shown}");
        assert_eq!(shown["last_error"], why.as_str(), "{shown}");
    }
    let view = restarted.get(daily).await.unwrap();
    assert!(view.job.enabled && view.job.last_error.is_none(), "{view:?}");
    assert!(view.next_run.is_some(), "{view:?}");
    // One whose schedule cannot be read is disabled too, rather than shown enabled with no
    // next run and no word of why (a QA pass found it only in the log).
    let view = restarted.get(unreadable).await.unwrap();
    assert!(!view.job.enabled && view.next_run.is_none(), "{view:?}");
    let why = view.job.last_error.clone().unwrap_or_default();
    assert!(why.starts_with("disabled at start: its schedule `garbage` cannot be read: "), "{why}");
    assert!(why.ends_with("; change its schedule, then enable it"), "{why}");
    restarted.shutdown().await;

    // Such a job can be disabled (again) and deleted; any other edit must change its schedule.
    for id in [every_second, unreadable] {
        let path = format!("/api/cron/jobs/{}", id.0);
        let (status, answer) = app.call(Method::PUT, &path, Some(json!({"enabled": false}))).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["enabled"], false, "{answer}");
        assert!(answer["last_error"].as_str().unwrap().starts_with("disabled at start"));
        for edit in [json!({"name": "renamed"}), json!({"enabled": true})] {
            let (status, answer) = app.call(Method::PUT, &path, Some(edit)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            assert_eq!(answer["error"]["param"], "schedule", "{answer}");
            let message = error_message(&answer);
            assert!(message.contains("Change this job's schedule in the same edit"), "{message}");
        }
    }
    // A new schedule and enabled: the reason it was disabled goes with it.
    let path = format!("/api/cron/jobs/{}", every_second.0);
    let fixed = app.update(every_second.0, json!({"schedule": "0 9 * * *", "enabled": true})).await;
    assert_eq!(fixed["enabled"], true, "{fixed}");
    assert_eq!(fixed["last_error"], Value::Null, "{fixed}");
    let (status, _) = app.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) =
        app.call(Method::DELETE, &format!("/api/cron/jobs/{}", every_5s.0), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// A job's answer being written into a WebChat conversation makes the conversation list say
/// `answering` (the page's "answering…" badge, after a reload too), as a WebChat answer does;
/// before, only answers a page had asked for did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_answer_being_written_is_answering_in_the_conversation_list() {
    let slow = crate::util::slow_model().await;
    let envs = vec![("MODEL_FAST".to_string(), slow)];
    let server =
        tokio::task::block_in_place(|| Server::start(ServerOptions { envs, data_dir: None }));
    let db_url = format!("sqlite://{}", server.data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&db_url).await.expect("open the server's database");
    let conversation =
        memory::create_webchat_conversation(&pool, Some("counting")).await.unwrap().id.0;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let answering = || {
        let request = http.get(server.url("/api/conversations")).bearer_auth(&server.token);
        async move {
            let list: Value = request.send().await.unwrap().json().await.unwrap();
            let entry = list["conversations"]
                .as_array()
                .and_then(|all| all.iter().find(|c| c["id"] == conversation).cloned())
                .unwrap_or_else(|| panic!("conversation {conversation} in {list}"));
            entry["answering"].as_bool().unwrap_or_else(|| panic!("`answering` in {entry}"))
        }
    };
    assert!(!answering().await, "answering before the run");
    let run_now = run_counting_job_until_it_writes(&server, &http, &pool, conversation).await;
    assert!(answering().await, "the job's answer is not `answering` in the list");
    let run: Value = run_now.await.unwrap().expect("an answer to Run now").json().await.unwrap();
    assert_eq!(run["outcome"], "delivered", "{run}\n{}", server.output());
    assert!(!answering().await, "still answering once the run is over");
}

/// A job's answer can be followed from the WebChat while it is written, as a WebChat answer
/// can: a page that sees `answering` in the list asks `/live`, which replays the answer from
/// its `meta` and goes on as it is written to its `done`, naming the stored message; the
/// text streamed is the text stored. Before, only answers a page had asked for were
/// published there: the list said `answering` and `/live` said 204 until the answer was
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_answer_is_followed_live_from_its_start_while_it_is_written() {
    let slow = crate::util::slow_model().await;
    let envs = vec![("MODEL_FAST".to_string(), slow)];
    let server =
        tokio::task::block_in_place(|| Server::start(ServerOptions { envs, data_dir: None }));
    let db_url = format!("sqlite://{}", server.data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&db_url).await.expect("open the server's database");
    let conversation =
        memory::create_webchat_conversation(&pool, Some("counting")).await.unwrap().id.0;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let run_now = start_counting_job(&server, &http, conversation).await;

    // As the page does: the list says `answering`, then `/live` is asked (again while the
    // turn has not sent its first event yet), until the answer is over.
    let started = Instant::now();
    loop {
        let list: Value = http
            .get(server.url("/api/conversations"))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entry = list["conversations"]
            .as_array()
            .and_then(|all| all.iter().find(|c| c["id"] == conversation).cloned())
            .unwrap_or_else(|| panic!("conversation {conversation} in {list}"));
        if entry["answering"] == true {
            break;
        }
        assert!(!run_now.is_finished(), "the run ended and was never `answering`");
        assert!(started.elapsed() < Duration::from_secs(30), "never `answering`: {entry}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let live_url = server.url(&format!("/api/conversations/{conversation}/live"));
    let followed = loop {
        let response = http.get(&live_url).bearer_auth(&server.token).send().await.unwrap();
        match response.status().as_u16() {
            200 => break response,
            204 => {}
            status => panic!("/live answered {status}\n{}", server.output()),
        }
        assert!(
            !run_now.is_finished(),
            "the job's answer was never followable: /live said 204 until it was stored"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "/live never followed the answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let body = tokio::time::timeout(Duration::from_secs(60), followed.text())
        .await
        .expect("the followed answer ends")
        .expect("read /live");
    let run: Value = run_now.await.unwrap().expect("an answer to Run now").json().await.unwrap();
    assert_eq!(run["outcome"], "delivered", "{run}\n{}", server.output());

    let events: Vec<Value> = body
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).expect("a JSON event"))
        .collect();
    let first = events.first().unwrap_or_else(|| panic!("no events: {body}"));
    assert_eq!(first["type"], "meta", "{body}");
    assert_eq!(first["conversation_id"], conversation, "{body}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "done", "{body}");
    let message_id = last["message_id"].as_i64().unwrap_or_else(|| panic!("{last}"));
    assert_eq!(run["message_id"], message_id, "{run}\n{body}");
    let tokens: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    // Followed while written: what came after the replay came piece by piece.
    assert!(tokens.len() > 1, "the whole answer came in the replay: {body}");
    let stored = memory::get_message(&pool, my_claw::domain::MessageId(message_id))
        .await
        .unwrap()
        .expect("the stored answer");
    assert_eq!(stored.conversation_id.0, conversation);
    assert_eq!(stored.role, Role::Assistant);
    assert_eq!(tokens.concat(), stored.content, "{body}");
    assert!(stored.content.contains(&format!("{}\n", crate::util::SLOW_NUMBERS)), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_describes_schedules_and_the_page_has_no_describer_of_its_own() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let describe = |expression: &str, timezone: Option<&str>| {
        let mut url = reqwest::Url::parse(&format!("{}/api/cron/describe", app.base)).unwrap();
        url.query_pairs_mut().append_pair("expression", expression);
        if let Some(timezone) = timezone {
            url.query_pairs_mut().append_pair("timezone", timezone);
        }
        let request = app.http.get(url).bearer_auth(TOKEN);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let weekdays = describe("30 7 * * 1-5", Some("Europe/Paris")).await;
    assert_eq!(
        weekdays["description"], "every weekday (Monday to Friday) at 07:30 Europe/Paris",
        "{weekdays}"
    );
    assert_eq!(weekdays["timezone"], "Europe/Paris");
    let runs = weekdays["next_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{weekdays}");
    for run in runs {
        let at = DateTime::from_timestamp_millis(run.as_i64().unwrap()).unwrap();
        let paris = at.with_timezone(&chrono_tz::Europe::Paris);
        assert_eq!(paris.format("%H:%M").to_string(), "07:30", "{at}");
        assert!(!matches!(paris.format("%a").to_string().as_str(), "Sat" | "Sun"), "{at}");
        assert!(at > Utc::now());
    }
    // The default zone when none is given; no zone where it does not matter.
    let daily = describe("@daily", None).await;
    assert_eq!(daily["description"], "every day at 00:00 UTC", "{daily}");
    assert_eq!(daily["timezone"], "UTC");
    let fast = describe("*/5 * * * * *", Some("Asia/Tokyo")).await;
    assert_eq!(fast["description"], "every 5 seconds", "{fast}");
    // 7 is Sunday in every form: `7L` was refused as never happening, and `1L,7L` ran on
    // the last Mondays only.
    for expression in ["0 9 * * 7L", "0 9 * * 1L,7L"] {
        let last = describe(expression, Some("UTC")).await;
        let runs: Vec<DateTime<Utc>> = last["next_runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|run| DateTime::from_timestamp_millis(run.as_i64().unwrap()).unwrap())
            .collect();
        assert!(runs.iter().any(|at| at.weekday() == chrono::Weekday::Sun), "{last}");
        for at in runs {
            let next_week = at + chrono::Duration::days(7);
            assert_ne!(next_week.month(), at.month(), "{expression}: not the last, {at}");
        }
    }
    let last_sunday = describe("0 9 * * 7L", Some("UTC")).await;
    assert_eq!(last_sunday["description"], "on the last Sunday of every month at 09:00 UTC");

    // Jobs carry their description, in their own zone.
    let mut job = webchat_job("words", "0 9 * * 1,3,5", conversation);
    job["timezone"] = json!("America/New_York");
    let job = app.create(job).await;
    assert_eq!(
        job["description"], "every Monday, Wednesday and Friday at 09:00 America/New_York",
        "{job}"
    );
    let (_, list) = app.call(Method::GET, "/api/cron/jobs", None).await;
    assert_eq!(list["jobs"][0]["description"], job["description"], "{list}");

    // One describer: the page shows what the API says and has no copy of the rules.
    let script = std::fs::read_to_string(crate::util::repo_path("static/cron.js")).unwrap();
    assert!(script.contains("/api/cron/describe"), "the page asks the API");
    assert!(script.contains("job.description"), "the list shows the API's words");
    for copy in ["Monday", "weekday (", "@hourly\":", "ordinal"] {
        assert!(!script.contains(copy), "static/cron.js describes schedules itself: {copy}");
    }
    app.cron.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_needs_the_secret_and_runs_only_due_jobs() {
    let graph = Graph::start().await;
    let options = Options { secret: Some(CRON_SECRET), ..Options::default() };
    let app = App::start(&graph, options).await;
    let conversation = app.webchat_conversation().await;
    // Due: its daily time was two minutes ago, and it was created (back-dated) before that.
    let two_minutes_ago = chrono::Utc::now() - chrono::Duration::minutes(2);
    let schedule = two_minutes_ago.format("%M %H * * *").to_string();
    let due = app.create(webchat_job("due", &schedule, conversation)).await;
    let not_due = app.create(webchat_job("not due", YEARLY, conversation)).await;
    let day_ago = my_claw::db::now_ms() - 86_400_000;
    sqlx::query("UPDATE cron_jobs SET created_at = ?1, updated_at = ?1")
        .bind(day_ago)
        .execute(&app.pool)
        .await
        .unwrap();

    let trigger = |secret: Option<&str>, method: Method| {
        let mut request = app.http.request(method, format!("{}/api/cron", app.base));
        if let Some(secret) = secret {
            request = request.header("X-Cron-Secret", secret);
        }
        request.send()
    };
    for (secret, method) in [
        (None, Method::POST),
        (Some("wrong"), Method::POST),
        (Some(""), Method::GET),
        (Some(&CRON_SECRET[..CRON_SECRET.len() - 1]), Method::GET),
    ] {
        let response = trigger(secret, method).await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "secret {secret:?}");
    }
    // A trigger writes the rows of the runs it starts before it answers.
    assert!(app.runs(id_of(&due)).await.is_empty(), "a refused trigger ran a job");

    let response = trigger(Some(CRON_SECRET), Method::POST).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["started"], json!([id_of(&due)]), "{body}");
    let runs = app.wait_runs(id_of(&due), 1).await;
    assert_eq!(runs[0]["outcome"], "delivered");
    assert!(app.runs(id_of(&not_due)).await.is_empty());

    // That occurrence has run: triggering again (GET works too) starts nothing.
    let response = trigger(Some(CRON_SECRET), Method::GET).await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["started"], json!([]), "{body}");
    app.cron.shutdown().await;

    // Without CRON_SECRET the trigger is off.
    let app = App::start(&graph, Options::default()).await;
    let response = trigger_without_secret_config(&app).await;
    assert_eq!(response, 404);
    app.cron.shutdown().await;
}

async fn trigger_without_secret_config(app: &App) -> u16 {
    let response = app
        .http
        .post(format!("{}/api/cron", app.base))
        .header("X-Cron-Secret", CRON_SECRET)
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_missed_runs_are_not_replayed_and_next_run_is_computed() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    let two_minutes_ago = chrono::Utc::now() - chrono::Duration::minutes(2);
    let schedule = two_minutes_ago.format("%M %H * * *").to_string();
    let job = app.create(webchat_job("missed", &schedule, conversation)).await;
    let id = my_claw::db::cron::CronJobId(id_of(&job));
    // As if the process had died during a run, before the occurrence it then missed.
    sqlx::query("UPDATE cron_jobs SET created_at = ?1, updated_at = ?1")
        .bind(my_claw::db::now_ms() - 86_400_000)
        .execute(&app.pool)
        .await
        .unwrap();
    my_claw::db::cron::start_run(&app.pool, id, my_claw::db::now_ms() - 3_600_000).await.unwrap();
    app.cron.shutdown().await;

    let restarted_at = Utc::now();
    let restarted = app.restart_scheduler().await;
    let view = restarted.get(id).await.unwrap();
    let next = view.next_run.expect("next run");
    let expected = two_minutes_ago + chrono::Duration::days(1);
    assert_eq!(
        next.format("%Y-%m-%d %H:%M").to_string(),
        expected.format("%Y-%m-%d %H:%M").to_string()
    );
    assert_eq!(view.job.last_outcome, Some(my_claw::db::cron::RunOutcome::Failed));
    assert!(view.job.last_error.as_deref().unwrap_or_default().contains("interrupted"));
    // The restarted scheduler has set its jobs: a replay would have started by then.
    let mut checked = restarted.checked_through();
    let looked = tokio::time::timeout(FIRE_LIMIT, checked.wait_for(|t| *t >= restarted_at)).await;
    assert!(matches!(looked, Ok(Ok(_))), "the restarted scheduler never looked at its jobs");
    let runs = restarted.runs(id, 10).await.unwrap();
    assert_eq!(runs.len(), 1, "the missed occurrence was replayed: {runs:?}");
    assert_eq!(runs[0].outcome, my_claw::db::cron::RunOutcome::Failed);
    restarted.shutdown().await;
}

/// A one-shot reminder for `due` into WebChat conversation `conversation`, written as if a day
/// ago (so `due` went by after it was made), with the scheduler stopped.
async fn reminder_made_yesterday(
    app: &App,
    conversation: i64,
    what: &str,
    due: chrono::DateTime<Utc>,
) -> my_claw::db::cron::CronJob {
    let spec = my_claw::db::cron::JobSpec {
        name: what.into(),
        schedule: due.format("at %Y-%m-%d %H:%M").to_string(),
        timezone: Some("UTC".into()),
        prompt: what.into(),
        channel: ChannelKind::WebChat,
        target: conversation.to_string(),
        tier: None,
        enabled: true,
        kind: my_claw::db::cron::JobKind::Reminder,
        conversation_id: Some(ConversationId(conversation)),
    };
    let job = my_claw::db::cron::insert_job(&app.pool, &spec).await.unwrap();
    sqlx::query("UPDATE cron_jobs SET created_at = ?1, updated_at = ?1 WHERE id = ?2")
        .bind(my_claw::db::now_ms() - 86_400_000)
        .bind(job.id.0)
        .execute(&app.pool)
        .await
        .unwrap();
    job
}

/// A one-shot has no later occurrence: missed while the process was stopped, it runs once at
/// the restart, and a reminder then says when it was due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reminder_missed_while_stopped_comes_at_the_restart_saying_it_is_late() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    app.cron.shutdown().await;
    // Set yesterday for two hours ago (UTC), as if the process had been stopped since.
    let due = (Utc::now() - chrono::Duration::hours(2)).with_second(0).unwrap();
    reminder_made_yesterday(&app, conversation, "water the plants", due).await;

    let restarted = app.restart_scheduler().await;
    let started = Instant::now();
    let posted = loop {
        if let Some(post) = app.assistant_messages(conversation).await.pop() {
            break post;
        }
        assert!(started.elapsed() < FIRE_LIMIT, "the missed reminder never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let expected = format!(
        "⏰ Reminder: water the plants\n\n(Sent late: it was due {}, while my-claw was not running.)",
        due.format("%A %-d %B at %H:%M")
    );
    assert_eq!(posted, expected);
    restarted.shutdown().await;
}

/// A one-shot whose run a stop interrupted has no run left: it ends as a failed run does,
/// disabled with the reason, visible, and is not run again (its message may have left).
/// Before, it stayed enabled with no next run, and could not be re-enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_interrupted_by_a_stop_is_disabled_with_the_reason() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    app.cron.shutdown().await;
    let due = (Utc::now() - chrono::Duration::minutes(5)).with_second(0).unwrap();
    let job = reminder_made_yesterday(&app, conversation, "call the plumber", due).await;
    // Its run started at its time, and the process died during it.
    my_claw::db::cron::start_run(&app.pool, job.id, due.timestamp_millis()).await.unwrap();

    let restarted = app.restart_scheduler().await;
    let view = restarted.get(job.id).await.unwrap();
    assert!(!view.job.enabled, "{view:?}");
    assert!(view.job.last_error.as_deref().unwrap_or_default().contains("interrupted"), "{view:?}");
    // Disabled, it is not run again (the scheduler holds only enabled jobs).
    assert_eq!(view.next_run, None, "{view:?}");
    assert_eq!(restarted.runs(job.id, 10).await.unwrap().len(), 1);
    assert!(app.assistant_messages(conversation).await.is_empty());
    restarted.shutdown().await;
}

/// A one-shot missed by more than `CRON_LATE_LIMIT` (the process was stopped for days) is
/// not run: a reminder or a morning briefing days late would be noise. It ends disabled,
/// with a failed run saying when it was due and why it did not run. Before, it ran however
/// late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_missed_by_more_than_the_late_limit_is_disabled_not_run() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let conversation = app.webchat_conversation().await;
    app.cron.shutdown().await;
    let due = (Utc::now() - chrono::Duration::hours(30)).with_second(0).unwrap();
    let job = reminder_made_yesterday(&app, conversation, "renew the passport", due).await;
    // Made the day before it was due.
    sqlx::query("UPDATE cron_jobs SET created_at = ?1, updated_at = ?1 WHERE id = ?2")
        .bind(due.timestamp_millis() - 86_400_000)
        .bind(job.id.0)
        .execute(&app.pool)
        .await
        .unwrap();

    let restarted = app.restart_scheduler().await;
    let view = restarted.get(job.id).await.unwrap();
    assert!(!view.job.enabled, "{view:?}");
    let error = view.job.last_error.clone().unwrap_or_default();
    assert!(error.starts_with("missed: it was due "), "{error}");
    assert!(error.contains("CRON_LATE_LIMIT"), "{error}");
    assert_eq!(view.next_run, None, "{view:?}");
    let runs = restarted.runs(job.id, 10).await.unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].error.as_deref(), Some(error.as_str()), "{runs:?}");
    // Nothing was posted, neither now nor after a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(app.assistant_messages(conversation).await.is_empty());
    restarted.shutdown().await;
}

/// The real binary and the real small model: a job created over HTTP answers in a WebChat
/// conversation, and the page's live events announce the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_job_answers_in_an_open_webchat_conversation() {
    let mut env = smollm2_env();
    env.push(("REPLY_MAX_TOKENS".into(), "16".into()));
    env.push(("CRON_TIMEZONE".into(), "Europe/Paris".into()));
    let server =
        tokio::task::block_in_place(|| Server::start(ServerOptions { envs: env, data_dir: None }));
    let db_url = format!("sqlite://{}", server.data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&db_url).await.expect("open the server's database");
    let conversation =
        memory::create_webchat_conversation(&pool, Some("morning")).await.unwrap().id.0;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();

    // The page's live events stream, open before the job exists.
    let events = http
        .get(server.url("/api/events"))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("open /api/events");
    assert_eq!(events.status().as_u16(), 200);
    let mut events = events.bytes_stream();

    // Once a minute (the shortest interval), a few seconds from now.
    let second = (Utc::now() + chrono::Duration::seconds(4)).second();
    let job = json!({"name": "greeting", "schedule": format!("{second} * * * * *"),
                     "prompt": "Say hello in three words.", "channel": "webchat",
                     "target": conversation.to_string()});
    let response = http
        .post(server.url("/api/cron/jobs"))
        .bearer_auth(&server.token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "{}", server.output());
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["effective_timezone"], "Europe/Paris");
    let id = id_of(&job);

    // Wait (bounded) for the announcement of the stored answer.
    let wanted = format!("\"conversation_id\":{conversation},");
    let mut seen = String::new();
    let started = Instant::now();
    while !(seen.contains(&wanted) && seen.contains("\"role\":\"assistant\"")) {
        let left = Duration::from_secs(240).saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "no live event for the answer: {seen}\n{}", server.output());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("events stream ended: {other:?}\n{}", server.output()),
        }
    }
    let disable = http
        .put(server.url(&format!("/api/cron/jobs/{id}")))
        .bearer_auth(&server.token)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(disable.status().as_u16(), 200);

    // Wait for the run to be recorded, then check the stored answer and its ledger.
    let mut run = Value::Null;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let runs: Value = http
            .get(server.url(&format!("/api/cron/jobs/{id}/runs")))
            .bearer_auth(&server.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(done) =
            runs["runs"].as_array().unwrap().iter().rev().find(|r| r["outcome"] != "running")
        {
            run = done.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(run["outcome"], "delivered", "{run}\n{}", server.output());
    let message_id = my_claw::domain::MessageId(run["message_id"].as_i64().unwrap());
    let answer = memory::get_message(&pool, message_id).await.unwrap().expect("answer");
    assert_eq!(answer.role, Role::Assistant);
    assert_eq!(answer.conversation_id.0, conversation);
    assert!(!answer.content.trim().is_empty());
    assert_eq!(answer.provider.as_deref(), Some("local"));
    assert_eq!(answer.tier.as_deref(), Some("main"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_conversation_disables_its_jobs_and_deletes_its_reminders() {
    let graph = Graph::start().await;
    let app = App::start(&graph, Options::default()).await;
    let (doomed, kept) = (app.webchat_conversation().await, app.webchat_conversation().await);
    // Typed with a leading zero: stored as the id it means.
    let mut job = webchat_job("doomed", EVERY_2S, doomed);
    job["target"] = json!(format!("0{doomed}"));
    let doomed_job = app.create(job).await;
    assert_eq!(doomed_job["target"], doomed.to_string(), "{doomed_job}");
    let kept_job = app.create(webchat_job("kept", YEARLY, kept)).await;
    let reminder = app
        .cron
        .create_reminder(NewReminder {
            text: "call the plumber".into(),
            schedule: YEARLY.into(),
            timezone: chrono_tz::UTC,
            channel: ChannelKind::WebChat,
            target: doomed.to_string(),
            conversation_id: ConversationId(doomed),
        })
        .await
        .expect("reminder");

    let (status, body) =
        app.call(Method::DELETE, &format!("/api/conversations/{doomed}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    let path = format!("/api/cron/jobs/{}", id_of(&doomed_job));
    let (_, shown) = app.call(Method::GET, &path, None).await;
    assert_eq!(shown["enabled"], false, "{shown}");
    assert!(shown["next_run"].is_null(), "still scheduled: {shown}");
    let why = shown["last_error"].as_str().unwrap_or_default();
    assert!(why.contains(&format!("conversation {doomed} was deleted")), "{shown}");
    let (_, other) =
        app.call(Method::GET, &format!("/api/cron/jobs/{}", id_of(&kept_job)), None).await;
    assert_eq!(other["enabled"], true, "another conversation's job was touched: {other}");
    let (status, _) =
        app.call(Method::GET, &format!("/api/cron/jobs/{}", reminder.job.id.0), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the reminder outlived its conversation");

    // The disabled job can still be edited, but not enabled towards a missing conversation.
    let renamed =
        app.update(id_of(&doomed_job), json!({"name": "orphan", "schedule": YEARLY})).await;
    assert_eq!(renamed["name"], "orphan", "{renamed}");
    let (status, body) = app.call(Method::PUT, &path, Some(json!({"enabled": true}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_message(&body).contains("no WebChat conversation"), "{body}");
    // Pointed at a conversation that exists, it runs again.
    let moved =
        app.update(id_of(&doomed_job), json!({"target": kept.to_string(), "enabled": true})).await;
    assert_eq!(moved["enabled"], true, "{moved}");
    assert!(!moved["next_run"].is_null(), "{moved}");
    app.cron.shutdown().await;
}

/// A shutdown stops a job's answer instead of waiting for it (an answer can take minutes on
/// a CPU, and systemd kills after 30 s): "Run now" answers with a failed run that says why,
/// the cut text stays in its WebChat conversation, and the process exits cleanly. Before,
/// the run held the shutdown until its answer ended, and was reported delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_stops_a_running_jobs_answer() {
    let slow = crate::util::slow_model().await;
    let envs = vec![("MODEL_FAST".to_string(), slow)];
    let mut server =
        tokio::task::block_in_place(|| Server::start(ServerOptions { envs, data_dir: None }));
    let db_url = format!("sqlite://{}", server.data_dir.join("my-claw.db").display());
    let pool = my_claw::db::connect(&db_url).await.expect("open the server's database");
    let conversation =
        memory::create_webchat_conversation(&pool, Some("counting")).await.unwrap().id.0;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    // The answer is being written when the signal comes.
    let run_now = run_counting_job_until_it_writes(&server, &http, &pool, conversation).await;
    let code = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "clean exit within 15 s:\n{}", server.output());
    let run: Value = run_now.await.unwrap().expect("an answer to Run now").json().await.unwrap();
    assert_eq!(run["outcome"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap().contains("shutting down"), "{run}");
    let stored = memory::history(&pool, ConversationId(conversation), 10).await.unwrap();
    let answer = stored.last().expect("the cut answer");
    assert_eq!(answer.role, Role::Assistant);
    assert!(!answer.content.contains(&format!("{}\n", crate::util::SLOW_NUMBERS)), "{answer:?}");
}

/// Creates a job asking the slow stand-in model to count into `conversation` and runs it
/// now: the handle to Run now's answer.
async fn start_counting_job(
    server: &Server,
    http: &reqwest::Client,
    conversation: i64,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let job = json!({"name": "count", "schedule": "0 9 * * *", "prompt": "Count.",
                     "channel": "webchat", "target": conversation.to_string(), "tier": "fast"});
    let response = http
        .post(server.url("/api/cron/jobs"))
        .bearer_auth(&server.token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201, "{}", server.output());
    let id = id_of(&response.json().await.unwrap());
    let run_now = tokio::spawn(
        http.post(server.url(&format!("/api/cron/jobs/{id}/run")))
            .bearer_auth(&server.token)
            .send(),
    );
    run_now
}

/// Creates a job asking the slow stand-in model to count into `conversation`, runs it now,
/// and returns once its answer is being written (its draft holds text), with the handle to
/// Run now's answer.
async fn run_counting_job_until_it_writes(
    server: &Server,
    http: &reqwest::Client,
    pool: &sqlx::SqlitePool,
    conversation: i64,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let run_now = start_counting_job(server, http, conversation).await;
    let started = Instant::now();
    while my_claw::db::drafts::get(pool, ConversationId(conversation))
        .await
        .unwrap()
        .is_none_or(|draft| draft.content.len() < 4)
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no answer being written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run_now
}
