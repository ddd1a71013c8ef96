//! Model router tests: fallback without a key, the Z.ai client against a stand-in speaking
//! the documented stream format, downloads against a hub stand-in serving the endpoints
//! hf-hub uses with the real small GGUF, and the memory budget with the real engine.
//! Every server is a real socket on 127.0.0.1; axum is used only here, for stand-ins.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use my_claw::app::build_router;
use my_claw::config::{RouterSettings, Secret, TierModel};
use my_claw::domain::{ChatTurn, Role};
use my_claw::llm::hub::{self, DownloadProgress, HubConfig, HubError};
use my_claw::llm::providers::zai::{ZaiConfig, ZaiProvider};
use my_claw::llm::router::{Router, Tier, TierState};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, GenerationParams, LlmError, LlmRequest, Provider,
    ProviderInfo, Usage,
};

use crate::util::{engine_settings, smollm2_path};

// --- helpers --------------------------------------------------------------------------------

/// Serves `app` on an ephemeral loopback port and returns its base URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn request(text: &str) -> LlmRequest {
    LlmRequest {
        messages: vec![
            ChatTurn::new(Role::System, "You are helpful."),
            ChatTurn::new(Role::User, text),
        ],
        params: GenerationParams::greedy(8),
        tools: Default::default(),
    }
}

/// A request for the real small model: two tokens are enough to prove who answers, and
/// keep the test short on a 2-core machine.
fn short_request() -> LlmRequest {
    LlmRequest {
        messages: vec![ChatTurn::new(Role::User, "Hi")],
        params: GenerationParams::greedy(2),
        tools: Default::default(),
    }
}

/// Reads a stream to its end (bounded): the text, whether it ended with `Done`, and the
/// error that ended it, if any.
async fn collect(mut stream: ChunkStream) -> (String, Option<Usage>, Option<LlmError>) {
    let mut text = String::new();
    let mut usage = None;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(60), stream.recv())
            .await
            .expect("stream stalled");
        match item {
            None => return (text, usage, None),
            Some(Ok(Chunk::Text(t))) => text.push_str(&t),
            Some(Ok(Chunk::Notice { .. } | Chunk::Accepted { .. })) => {}
            Some(Ok(Chunk::ToolCall(call))) => panic!("no tools were offered, got {call:?}"),
            Some(Ok(Chunk::Done { usage: u, .. })) => usage = Some(u),
            Some(Err(err)) => return (text, usage, Some(err)),
        }
    }
}

/// A local stand-in that answers "local answer".
struct FakeLocal;

impl Provider for FakeLocal {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "fake-main.gguf".into(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        Box::pin(async move {
            assert!(!request.params.thinking, "the local fallback must not think");
            let (tx, rx) = mpsc::channel(4);
            let _ = tx.try_send(Ok(Chunk::Text("local answer".into())));
            let _ = tx
                .try_send(Ok(Chunk::Done { usage: Usage::default(), finish: FinishReason::Stop }));
            Ok(rx)
        })
    }
}

fn tier_model(tier: Tier, value: &str) -> TierModel {
    TierModel::parse(tier, value).expect("a valid tier value")
}

fn router_settings(models_dir: &Path) -> RouterSettings {
    RouterSettings {
        model_fast: tier_model(Tier::Fast, "qwen3:4b"),
        model_smart: tier_model(Tier::Smart, "qwen3:8b"),
        model_main: tier_model(Tier::Main, "qwen3:14b"),
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
        remote: Default::default(),
    }
}

/// A link (or copy) of the real small model under another name, so that two paths name
/// two pool entries.
fn link_model(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    if std::fs::hard_link(smollm2_path(), &path).is_err() {
        std::fs::copy(smollm2_path(), &path).expect("copy the model");
    }
    path
}

// --- fallback without a key ----------------------------------------------------------------

#[tokio::test]
async fn without_key_code_is_answered_by_main() {
    let router = Router::with_providers(Arc::new(FakeLocal), HashMap::new(), Tier::Main);
    let routed = router.stream(Tier::Code, request("write a loop")).await.expect("answered");
    assert_eq!(routed.tier, Tier::Code);
    assert_eq!(routed.info.provider, "local");
    assert!(!routed.info.leaves_machine);
    assert_eq!(routed.notices.len(), 1);
    assert_eq!(routed.notices[0].0, "fallback");
    assert!(routed.notices[0].1.contains("answered by main"), "{:?}", routed.notices);
    let (text, usage, err) = collect(routed.stream).await;
    assert_eq!(text, "local answer");
    assert!(usage.is_some() && err.is_none());
    let zai = router.zai_status();
    assert!(!zai.configured && zai.fallback_active);
}

#[tokio::test]
async fn without_key_code_is_answered_by_the_real_model_through_the_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = link_model(dir.path(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    let settings = router_settings(dir.path());
    let router =
        build_router(&settings, &engine_settings(), &reqwest::Client::new()).expect("router");

    // Offline default: every local tier stands in with the only GGUF there.
    let status = router.status().await;
    let fast = &status[0];
    assert_eq!(fast.tier, Tier::Fast);
    assert_eq!(fast.state, TierState::Present);
    assert_eq!(fast.stand_in_for.as_deref(), Some("Qwen3-4B-Q4_K_M.gguf"));
    assert_eq!(fast.file.as_deref(), Some(file.as_path()));
    let code = &status[3];
    assert_eq!(code.state, TierState::CloudFallback);
    assert_eq!(code.answered_by.as_ref().map(|i| i.provider.as_str()), Some("local"));

    let routed = router.stream(Tier::Code, short_request()).await.expect("answered");
    assert_eq!(routed.info.provider, "local");
    assert_eq!(routed.info.model, "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(!routed.info.leaves_machine);
    let (text, usage, err) = collect(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    assert!(usage.is_some(), "no Done chunk");
    assert!(!text.is_empty());
    let main = &router.status().await[2];
    assert_eq!(main.state, TierState::Loaded, "{main:?}");
}

#[tokio::test]
async fn empty_models_dir_starts_and_reports_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router =
        build_router(&router_settings(dir.path()), &engine_settings(), &reqwest::Client::new())
            .expect("starts without any model");
    let status = router.status().await;
    assert_eq!(status[1].state, TierState::Missing);
    assert_eq!(status[1].pull_command.as_deref(), Some("my-claw models pull qwen3:8b-q4_k_m"));
    let err = router.stream(Tier::Code, request("hi")).await.unwrap_err().to_string();
    assert!(err.contains("fallback model (main) is unavailable"), "{err}");

    // An unknown value is a configuration error (one line, exit 2): see
    // `foundation::bad_tier_settings_exit_with_one_clear_line`.
    let err = TierModel::parse(Tier::Smart, "llama3").expect_err("unknown value rejected");
    assert!(err.to_string().contains("MODEL_SMART=llama3"), "{err}");
}

// --- Z.ai stand-in --------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum ZaiMode {
    Normal,
    Balance1113,
    ServerError,
    Stall,
    ErrorEventMidStream,
    ErrorDataMidStream,
}

struct ZaiStandIn {
    mode: ZaiMode,
    requests: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
    auth: Mutex<Vec<String>>,
}

fn sse(data: &Value) -> String {
    format!("data: {data}\n\n")
}

fn delta(field: &str, text: &str) -> Value {
    json!({"id": "1", "created": 1, "model": "glm-4.7",
           "choices": [{"index": 0, "delta": {field: text}}]})
}

async fn zai_chat(
    State(state): State<Arc<ZaiStandIn>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    state.bodies.lock().unwrap().push(serde_json::from_str(&body).unwrap_or(Value::Null));
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    state.auth.lock().unwrap().push(auth.to_string());
    let event_stream = |parts: Vec<String>| {
        let stream = futures::stream::iter(parts.into_iter().map(Ok::<_, std::io::Error>));
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(stream))
            .unwrap()
    };
    match state.mode {
        ZaiMode::Normal => event_stream(vec![
            sse(&delta("role", "assistant")),
            sse(&delta("reasoning_content", "SECRET-REASONING ")),
            sse(&delta("reasoning_content", "more thoughts")),
            sse(&delta("content", "Hello")),
            sse(&delta("content", " world")),
            sse(&json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}})),
            "data: [DONE]\n\n".to_string(),
        ]),
        ZaiMode::Balance1113 => (
            StatusCode::TOO_MANY_REQUESTS,
            [("content-type", "application/json")],
            json!({"error": {"code": "1113", "message": "Insufficient balance or no resource package. Please recharge."}}).to_string(),
        )
            .into_response(),
        ZaiMode::ServerError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": {"code": "500", "message": "internal error"}}).to_string(),
        )
            .into_response(),
        ZaiMode::Stall => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            StatusCode::OK.into_response()
        }
        ZaiMode::ErrorEventMidStream => event_stream(vec![
            sse(&delta("content", "Partial ")),
            sse(&delta("content", "answer")),
            "event: error\ndata: {\"error\":{\"code\":\"1234\",\"message\":\"network hiccup\"}}\n\n"
                .to_string(),
        ]),
        ZaiMode::ErrorDataMidStream => event_stream(vec![
            sse(&delta("content", "Partial")),
            sse(&json!({"error": {"code": "1312", "message": "model overloaded"}})),
        ]),
    }
}

/// A router whose `code` and `reason` tiers talk to a Z.ai stand-in in `mode`.
async fn zai_router(mode: ZaiMode, timeout: Duration) -> (Router, Arc<ZaiStandIn>) {
    let state = Arc::new(ZaiStandIn {
        mode,
        requests: AtomicUsize::new(0),
        bodies: Mutex::new(Vec::new()),
        auth: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/api/paas/v4/chat/completions", post(zai_chat))
        .with_state(state.clone());
    let base = format!("{}/api/paas/v4", serve(app).await);
    let client =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(2)).build().unwrap();
    let provider = |thinking: bool| {
        let mut config =
            ZaiConfig::new(&base, Secret::new("zai-test-key"), "glm-4.7", thinking, timeout);
        config.retry_backoff = Duration::from_millis(10);
        Arc::new(ZaiProvider::new(client.clone(), config)) as Arc<dyn Provider>
    };
    let providers = HashMap::from([(Tier::Code, provider(false)), (Tier::Reason, provider(true))]);
    (Router::with_providers(Arc::new(FakeLocal), providers, Tier::Main), state)
}

#[tokio::test]
async fn zai_streams_the_answer_without_reasoning() {
    let (router, stand_in) = zai_router(ZaiMode::Normal, Duration::from_secs(5)).await;
    let routed = router.stream(Tier::Reason, request("think hard")).await.expect("answered");
    assert_eq!(routed.info.provider, "zai");
    assert!(routed.info.leaves_machine);
    assert!(routed.notices.is_empty());
    let (text, usage, err) = collect(routed.stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, "Hello world");
    assert!(!text.contains("SECRET"));
    let usage = usage.expect("Done");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 2));

    let routed = router.stream(Tier::Code, request("code")).await.expect("answered");
    let _ = collect(routed.stream).await;
    let bodies = stand_in.bodies.lock().unwrap().clone();
    assert_eq!(bodies[0]["thinking"]["type"], "enabled", "reason thinks");
    assert_eq!(bodies[1]["thinking"]["type"], "disabled", "code does not");
    assert_eq!(bodies[0]["stream"], true);
    assert_eq!(bodies[0]["max_tokens"], 8);
    assert_eq!(bodies[0]["model"], "glm-4.7");
    assert_eq!(bodies[0]["messages"][1]["role"], "user");
    assert_eq!(stand_in.auth.lock().unwrap()[0], "Bearer zai-test-key");
    assert!(!router.zai_status().fallback_active);
}

#[tokio::test]
async fn zai_1113_falls_back_at_once() {
    let (router, stand_in) = zai_router(ZaiMode::Balance1113, Duration::from_secs(5)).await;
    let routed = router.stream(Tier::Code, request("code")).await.expect("fell back");
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1, "1113 is not retried");
    assert_eq!(routed.info.provider, "local");
    let (kind, message) = &routed.notices[0];
    assert_eq!(kind, "fallback");
    assert!(message.contains("Z.ai unavailable (HTTP 429, code 1113"), "{message}");
    assert!(message.contains("answered by main (fake-main.gguf)"), "{message}");
    assert_eq!(collect(routed.stream).await.0, "local answer");
    let zai = router.zai_status();
    assert!(zai.configured && zai.fallback_active);
    assert!(zai.last_error.expect("recorded").0.contains("1113"));
    let code = &router.status().await[3];
    assert_eq!(code.state, TierState::CloudFallback);
}

#[tokio::test]
async fn zai_5xx_falls_back_after_bounded_retries() {
    let (router, stand_in) = zai_router(ZaiMode::ServerError, Duration::from_secs(5)).await;
    let routed = router.stream(Tier::Code, request("code")).await.expect("fell back");
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 3, "three tries, then fallback");
    assert_eq!(routed.info.provider, "local");
    assert!(routed.notices[0].1.contains("HTTP 500"), "{:?}", routed.notices);
}

#[tokio::test]
async fn zai_stalled_first_byte_falls_back_after_the_timeout() {
    let (router, stand_in) = zai_router(ZaiMode::Stall, Duration::from_millis(300)).await;
    let started = Instant::now();
    let routed = router.stream(Tier::Code, request("code")).await.expect("fell back");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(stand_in.requests.load(Ordering::SeqCst), 1);
    assert_eq!(routed.info.provider, "local");
    assert!(routed.notices[0].1.contains("timed out"), "{:?}", routed.notices);
}

#[tokio::test]
async fn zai_error_mid_stream_ends_the_turn_after_the_partial_text() {
    for mode in [ZaiMode::ErrorEventMidStream, ZaiMode::ErrorDataMidStream] {
        let (router, _stand_in) = zai_router(mode, Duration::from_secs(5)).await;
        let routed = router.stream(Tier::Code, request("code")).await.expect("started");
        assert_eq!(routed.info.provider, "zai", "no fallback once text has streamed");
        let (text, usage, err) = collect(routed.stream).await;
        assert!(text.starts_with("Partial"), "{text}");
        assert!(usage.is_none());
        assert!(matches!(err, Some(LlmError::Cloud { .. })), "{err:?}");
    }
}

// --- hub stand-in ---------------------------------------------------------------------------

struct HubStandIn {
    file_name: String,
    content: Bytes,
    /// The etag advertised (the sha256 unless a test lies).
    etag: String,
    /// Cut the first ranged request that starts past 0 halfway through.
    cut_once: bool,
    cut_done: Mutex<bool>,
    ranges: Mutex<Vec<String>>,
    auth: Mutex<Vec<String>>,
}

fn parse_range(range: &str, len: usize) -> (usize, usize) {
    let spec = range.trim_start_matches("bytes=");
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    // hf-hub asks for one byte past the end on the last chunk; real servers clamp.
    let end = end.parse::<usize>().unwrap_or(len - 1).min(len - 1);
    (start, end)
}

async fn hub_resolve(
    State(state): State<Arc<HubStandIn>>,
    UrlPath((_org, _repo, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if file != state.file_name {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    }
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    state.auth.lock().unwrap().push(auth.to_string());
    let len = state.content.len();
    let range = headers.get("range").and_then(|v| v.to_str().ok()).unwrap_or("bytes=0-");
    state.ranges.lock().unwrap().push(range.to_string());
    let (start, end) = parse_range(range, len);
    let slice = state.content.slice(start..=end);
    let builder = Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("content-range", format!("bytes {start}-{end}/{len}"))
        .header("content-length", slice.len())
        .header("x-repo-commit", "0123456789abcdef0123456789abcdef01234567")
        .header("x-linked-etag", format!("\"{}\"", state.etag))
        .header("etag", "\"git-blob-id\"");
    let cut = start > 0 && state.cut_once && {
        let mut done = state.cut_done.lock().unwrap();
        !std::mem::replace(&mut *done, true)
    };
    if cut {
        // Send half the bytes, then fail the body: the connection is cut mid-chunk.
        let half = slice.slice(..slice.len() / 2);
        let parts: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("connection cut by the stand-in"))];
        return builder.body(Body::from_stream(futures::stream::iter(parts))).unwrap();
    }
    builder.body(Body::from(slice)).unwrap()
}

async fn hub_info(State(state): State<Arc<HubStandIn>>) -> Response {
    axum::Json(json!({
        "sha": "0123456789abcdef0123456789abcdef01234567",
        "siblings": [{"rfilename": state.file_name}, {"rfilename": "README.md"}],
    }))
    .into_response()
}

async fn hub_stand_in(
    content: Bytes,
    file_name: &str,
    etag: Option<String>,
    cut_once: bool,
) -> (String, Arc<HubStandIn>) {
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
    let state = Arc::new(HubStandIn {
        file_name: file_name.to_string(),
        content,
        etag: etag.unwrap_or(sha),
        cut_once,
        cut_done: Mutex::new(false),
        ranges: Mutex::new(Vec::new()),
        auth: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/api/models/{org}/{repo}/revision/{rev}", get(hub_info))
        .route("/{org}/{repo}/resolve/{rev}/{file}", get(hub_resolve))
        .with_state(state.clone());
    (serve(app).await, state)
}

fn hub_config(endpoint: &str, models_dir: &Path) -> HubConfig {
    let mut config = HubConfig::new(endpoint, Some(Secret::new("hf-test-token")), models_dir);
    config.chunk_size = Some(16 << 20);
    config.retry_backoff = Duration::from_millis(10);
    config
}

/// Every file under `dir`, recursively (for "no half file left" checks).
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test]
async fn pull_reports_progress_resumes_and_verifies() {
    let content = Bytes::from(std::fs::read(smollm2_path()).expect("model"));
    let total = content.len() as u64;
    let (endpoint, stand_in) =
        hub_stand_in(content.clone(), "Qwen3-8B-Q4_K_M.gguf", None, true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let progress: Arc<Mutex<Vec<DownloadProgress>>> = Arc::default();
    let sink = progress.clone();
    let model = match hub::ModelSpec::parse("qwen3:8b").unwrap() {
        hub::ModelSpec::Qwen3(model) => model,
        other => panic!("{other:?}"),
    };
    let path = hub::pull(
        &hub_config(&endpoint, dir.path()),
        &model,
        Arc::new(move |p| sink.lock().unwrap().push(p)),
    )
    .await
    .expect("pulled");

    assert_eq!(path, dir.path().join("Qwen3-8B-Q4_K_M.gguf"));
    assert_eq!(std::fs::read(&path).unwrap().len() as u64, total);
    let summary = hub::read_gguf_summary(&path).expect("the final file loads");
    assert_eq!(summary.architecture.as_deref(), Some("llama"));
    assert_eq!(all_files(dir.path()), vec![path.clone()], "no partial or cache file left");

    let progress = progress.lock().unwrap().clone();
    assert!(progress.len() > 3, "progress reported: {progress:?}");
    let last = progress.last().unwrap();
    assert_eq!((last.downloaded, last.total), (total, total));
    assert!(progress.iter().any(|p| p.attempt == 2), "a second try after the cut");

    let ranges = stand_in.ranges.lock().unwrap().clone();
    let chunk = 16u64 << 20;
    let cut_range = format!("bytes={chunk}-{}", 2 * chunk - 1);
    assert_eq!(
        ranges.iter().filter(|r| **r == cut_range).count(),
        2,
        "the cut chunk was asked again: {ranges:?}"
    );
    // Resumed, not restarted: the first chunk was fetched once (plus the 1-byte probes).
    assert_eq!(
        ranges.iter().filter(|r| r.starts_with("bytes=0-") && *r != "bytes=0-0").count(),
        1,
        "{ranges:?}"
    );
    assert!(stand_in.auth.lock().unwrap().iter().all(|a| a == "Bearer hf-test-token"));
}

#[tokio::test]
async fn pull_rejects_a_checksum_mismatch_and_leaves_no_file() {
    let content = Bytes::from(std::fs::read(smollm2_path()).expect("model")).slice(..3 << 20);
    let wrong = "ab".repeat(32);
    let (endpoint, _stand_in) =
        hub_stand_in(content, "Qwen3-4B-Q4_K_M.gguf", Some(wrong.clone()), false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let err = hub::pull_file(
        &hub_config(&endpoint, dir.path()),
        "Qwen/Qwen3-4B-GGUF",
        "Qwen3-4B-Q4_K_M.gguf",
        Arc::new(|_| {}),
    )
    .await
    .expect_err("mismatch rejected");
    assert!(matches!(&err, HubError::Checksum { expected, .. } if *expected == wrong), "{err}");
    assert!(all_files(dir.path()).is_empty(), "left behind: {:?}", all_files(dir.path()));

    let err = hub::pull_file(
        &hub_config(&endpoint, dir.path()),
        "Qwen/Qwen3-4B-GGUF",
        "Qwen3-4B-Q9.gguf",
        Arc::new(|_| {}),
    )
    .await
    .expect_err("not in the repo");
    assert!(err.to_string().contains("GGUF files there: Qwen3-4B-Q4_K_M.gguf"), "{err}");
}

// --- memory budget --------------------------------------------------------------------------

#[tokio::test]
async fn a_second_model_past_the_budget_evicts_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = link_model(dir.path(), "first.gguf");
    let second = link_model(dir.path(), "second.gguf");
    let size = std::fs::metadata(&first).unwrap().len();
    let engine = engine_settings();
    let mut settings = router_settings(dir.path());
    settings.model_fast = tier_model(Tier::Fast, &first.display().to_string());
    settings.model_main = tier_model(Tier::Main, &second.display().to_string());
    // Room for one model (file and KV budget) but not two.
    settings.memory_budget_bytes = Some((size + engine.kv_cache_max_bytes) * 3 / 2);
    let router = build_router(&settings, &engine, &reqwest::Client::new()).expect("router");

    let routed = router.stream(Tier::Fast, short_request()).await.expect("fast answers");
    let (_, usage, err) = collect(routed.stream).await;
    assert!(usage.is_some() && err.is_none(), "{err:?}");
    assert_eq!(router.status().await[0].state, TierState::Loaded);

    let routed = router.stream(Tier::Main, short_request()).await.expect("main answers");
    let (_, usage, err) = collect(routed.stream).await;
    assert!(usage.is_some() && err.is_none(), "{err:?}");
    let status = router.status().await;
    assert_eq!(status[2].state, TierState::Loaded, "{:?}", status[2]);
    assert_eq!(status[0].state, TierState::Present, "first evicted: {:?}", status[0]);
}

// --- `my-claw models` -----------------------------------------------------------------------

#[tokio::test]
async fn models_pull_and_list_commands() {
    use my_claw::models::{run, ModelsCommand};
    let content = Bytes::from(std::fs::read(smollm2_path()).expect("model")).slice(..2 << 20);
    let (endpoint, stand_in) = hub_stand_in(content, "Qwen3-4B-Q8_0.gguf", None, false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    link_model(dir.path(), "SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut settings = router_settings(dir.path());
    settings.hf_endpoint = endpoint;
    settings.hf_token = Some(Secret::new("hf-test-token"));

    run(ModelsCommand::Pull { name: "qwen3:4b-q8_0".into() }, &settings).await.expect("pulled");
    assert!(dir.path().join("Qwen3-4B-Q8_0.gguf").is_file());
    assert!(stand_in.auth.lock().unwrap().iter().all(|a| a == "Bearer hf-test-token"));
    let err = run(ModelsCommand::Pull { name: "zai:glm-4.7".into() }, &settings).await.unwrap_err();
    assert!(err.to_string().contains("only Qwen3 names"), "{err:#}");
    run(ModelsCommand::List, &settings).await.expect("listed");
}
