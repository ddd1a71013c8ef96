//! `stop` and the sampling fields of `/v1/chat/completions`, over a real socket on
//! 127.0.0.1: the answer is cut before the first stop sequence (however the model's pieces
//! split it), the sequence is never sent, `finish_reason` is `stop`, the model request is
//! cancelled rather than generating on, and a stream never sends text it would have to take
//! back. A scripted model streams fixed pieces and records whether its receiver was dropped
//! and what it was asked. Owns only these tests; tools are tests/openai_tools.rs's.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use my_claw::domain::ToolCall;
use my_claw::gateway::listener::ConnectionLimits;
use my_claw::gateway::{self};
use my_claw::llm::{
    Chunk, ChunkStream, FinishReason, LlmError, LlmRequest, Provider, ProviderInfo, Usage,
};

const TOKEN: &str = "v1-stop-test-token-0123456789";

/// How many filler pieces the model writes after its script when nobody stops it: far more
/// than a test waits for (one every 5 ms, 10 s in all).
const FILLER_PIECES: usize = 2000;

/// Streams its pieces, then (unless `finite`) filler text for a long time, then `Done`.
/// Records the requests, how many chunks the receiver took, and when the receiver was
/// dropped (the request cancelled).
struct PiecesModel {
    pieces: Vec<Chunk>,
    finite: bool,
    requests: Mutex<Vec<LlmRequest>>,
    sent: AtomicUsize,
    cancelled: AtomicBool,
}

impl PiecesModel {
    fn new(pieces: Vec<Chunk>, finite: bool) -> Arc<Self> {
        Arc::new(Self {
            pieces,
            finite,
            requests: Mutex::new(Vec::new()),
            sent: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
        })
    }

    /// Waits (bounded) until the model saw its receiver dropped.
    async fn wait_cancelled(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.cancelled.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the model request was not cancelled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn last_request(&self) -> LlmRequest {
        self.requests.lock().unwrap().last().cloned().expect("the model was asked")
    }
}

struct Pieces(Arc<PiecesModel>);

impl Provider for Pieces {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".into(),
            model: "pieces".into(),
            host: None,
            leaves_machine: false,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        self.0.requests.lock().unwrap().push(request);
        let model = self.0.clone();
        Box::pin(async move {
            // A small buffer, as between the engine and the gateway: a model that goes on
            // generating after a stop is seen going on.
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let filler = (0..if model.finite { 0 } else { FILLER_PIECES })
                    .map(|_| Chunk::Text(" more".into()));
                let chunks: Vec<Chunk> = model.pieces.iter().cloned().chain(filler).collect();
                let calls = chunks.iter().any(|c| matches!(c, Chunk::ToolCall(_)));
                let n = chunks.len() as u32;
                for chunk in chunks {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if tx.send(Ok(chunk)).await.is_err() {
                        model.cancelled.store(true, Ordering::SeqCst);
                        return;
                    }
                    model.sent.fetch_add(1, Ordering::SeqCst);
                }
                let finish = if calls { FinishReason::ToolCalls } else { FinishReason::Stop };
                let usage = Usage { prompt_tokens: 20, completion_tokens: n, ..Usage::default() };
                let _ = tx.send(Ok(Chunk::Done { usage, finish })).await;
            });
            Ok(rx)
        })
    }
}

fn text(pieces: &[&str]) -> Vec<Chunk> {
    pieces.iter().map(|p| Chunk::Text(p.to_string())).collect()
}

fn call(id: &str) -> Chunk {
    Chunk::ToolCall(ToolCall { id: id.into(), name: "lookup".into(), arguments: "{}".into() })
}

/// The gateway with `model` behind every tier, served on 127.0.0.1 until the test ends.
struct TestServer {
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn serve(model: &Arc<PiecesModel>) -> TestServer {
    let provider: Arc<dyn Provider> = Arc::new(Pieces(model.clone()));
    let (state, dir) =
        crate::util::in_process_state(provider, TOKEN, 1 << 20, Default::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let limits = ConnectionLimits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
    };
    tokio::spawn(gateway::listener::serve(
        listener,
        gateway::router(state),
        limits,
        std::future::pending(),
    ));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    TestServer { base: format!("http://{addr}"), http, _dir: dir }
}

impl TestServer {
    async fn post(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }

    async fn complete(&self, body: Value) -> Value {
        let response = self.post(&body).await;
        assert_eq!(response.status(), 200);
        response.json().await.expect("a JSON completion")
    }

    /// The chunks of a streamed answer, checking that it ends with `[DONE]`.
    async fn stream(&self, mut body: Value) -> Vec<Value> {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = self.post(&body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.expect("the SSE body").replace("\r\n", "\n");
        let payloads: Vec<&str> = text
            .split("\n\n")
            .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
            .collect();
        assert_eq!(payloads.last(), Some(&"[DONE]"), "{text}");
        payloads[..payloads.len() - 1]
            .iter()
            .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("bad chunk {p}: {e}")))
            .collect()
    }

    /// The message and `param` of the 400 the body gets, in OpenAI's error shape.
    async fn refused(&self, body: Value) -> (String, Value) {
        let response = self.post(&body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.expect("the JSON error shape");
        assert_eq!(error["error"]["code"], "bad_request", "{error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        let message = error["error"]["message"].as_str().expect("a message").to_string();
        (message, error["error"]["param"].clone())
    }
}

fn ask(extra: Value) -> Value {
    let mut body = json!({"model": "main", "messages": [{"role": "user", "content": "Hi"}]});
    for (key, value) in extra.as_object().expect("an object") {
        body[key] = value.clone();
    }
    body
}

/// The content deltas of a stream, one string per chunk that had content.
fn deltas(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn finish_of(chunks: &[Value]) -> Vec<&str> {
    chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect()
}

fn usage_of(chunks: &[Value]) -> &Value {
    &chunks.last().expect("chunks")["usage"]
}

#[tokio::test]
async fn a_stop_sequence_ends_the_answer_before_it_and_cancels_the_model() {
    // The sequence `\n\n` spans two pieces; the model would write for seconds more.
    let model = PiecesModel::new(text(&["Hello", " world.", "\n", "\nUser:", " hi"]), false);
    let server = serve(&model).await;
    let completion = server.complete(ask(json!({"stop": ["\n\n", "###"]}))).await;
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["content"], "Hello world.", "{completion}");
    assert_eq!(choice["finish_reason"], "stop");
    // The tokens generated up to the one that completed the sequence.
    assert_eq!(completion["usage"]["completion_tokens"], 4, "{completion}");
    model.wait_cancelled().await;
    assert!(model.sent.load(Ordering::SeqCst) < 20, "the model went on after the stop");

    // A string works as a one-element array.
    let model = PiecesModel::new(text(&["one, two, ", "three"]), false);
    let server = serve(&model).await;
    let completion = server.complete(ask(json!({"stop": "three"}))).await;
    assert_eq!(completion["choices"][0]["message"]["content"], "one, two, ");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    model.wait_cancelled().await;
}

#[tokio::test]
async fn a_stream_never_sends_text_it_would_take_back() {
    // `END` arrives as `E`, `N`, `D` in three pieces: nothing of it may be sent.
    let model = PiecesModel::new(text(&["The E", "xample. ", "Now E", "N", "D", " of it"]), false);
    let server = serve(&model).await;
    let chunks = server.stream(ask(json!({"stop": ["END"]}))).await;
    let sent = deltas(&chunks);
    assert_eq!(sent.concat(), "The Example. Now ", "{chunks:?}");
    // Only a possible start of the sequence was held back: `E` until `x` ruled it out.
    assert_eq!(sent, ["The ", "Example. ", "Now "], "{chunks:?}");
    assert_eq!(finish_of(&chunks), ["stop"]);
    assert_eq!(usage_of(&chunks)["completion_tokens"], 5, "{chunks:?}");
    model.wait_cancelled().await;

    // No sequence matched: what was held back comes out before the end, nothing is lost.
    let model = PiecesModel::new(text(&["Almost EN"]), true);
    let server = serve(&model).await;
    let chunks = server.stream(ask(json!({"stop": ["END"]}))).await;
    assert_eq!(deltas(&chunks), ["Almost ", "EN"], "{chunks:?}");
    assert_eq!(finish_of(&chunks), ["stop"]);
    assert_eq!(usage_of(&chunks)["prompt_tokens"], 20, "the model's own usage: {chunks:?}");
    assert!(!model.cancelled.load(Ordering::SeqCst));
    let completion = server.complete(ask(json!({"stop": ["END"]}))).await;
    assert_eq!(completion["choices"][0]["message"]["content"], "Almost EN");
}

#[tokio::test]
async fn stop_sequences_apply_to_text_never_inside_or_across_tool_calls() {
    let tools = json!([{"type": "function", "function": {"name": "lookup"}}]);
    // Text held back as a possible start (`EN`) is sent before the call; after the call a
    // new stretch of text begins, so `EN` + `D` across it is no match.
    let model = PiecesModel::new(
        vec![Chunk::Text("Checking EN".into()), call("call_1"), Chunk::Text("D".into())],
        true,
    );
    let server = serve(&model).await;
    let chunks = server.stream(ask(json!({"stop": "END", "tools": tools}))).await;
    assert_eq!(deltas(&chunks).concat(), "Checking END", "{chunks:?}");
    let call_index = chunks.iter().position(|c| c["choices"][0]["delta"]["tool_calls"].is_array());
    let en_index = chunks.iter().position(|c| c["choices"][0]["delta"]["content"] == "EN");
    assert!(en_index.is_some() && en_index < call_index, "held text, then the call: {chunks:?}");
    assert_eq!(finish_of(&chunks), ["tool_calls"]);

    // A sequence after a call ends the answer; the call stays and the client is told to
    // run it.
    let model = PiecesModel::new(
        vec![call("call_1"), Chunk::Text("Then STOP here".into()), Chunk::Text("x".into())],
        false,
    );
    let server = serve(&model).await;
    let completion = server.complete(ask(json!({"stop": "STOP", "tools": tools}))).await;
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["content"], "Then ", "{completion}");
    assert_eq!(choice["message"]["tool_calls"][0]["id"], "call_1", "{completion}");
    assert_eq!(choice["finish_reason"], "tool_calls");
    model.wait_cancelled().await;
}

#[tokio::test]
async fn malformed_stop_and_unsupported_sampling_fields_get_a_400_naming_them() {
    let model = PiecesModel::new(text(&["ok"]), true);
    let server = serve(&model).await;
    let cases = [
        (json!({"stop": ""}), "stop sequences must not be empty", "stop"),
        (json!({"stop": ["a", ""]}), "stop sequences must not be empty", "stop"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop has 5 sequences; at most 4", "stop"),
        (json!({"stop": ["a", 1]}), "stop[1] must be a string", "stop[1]"),
        (json!({"stop": 42}), "stop must be a string or an array", "stop"),
        (json!({"frequency_penalty": 0.5}), "frequency_penalty is not", "frequency_penalty"),
        (json!({"logit_bias": {"42": 10}}), "logit_bias is not supported", "logit_bias"),
        (json!({"logit_bias": [1]}), "logit_bias must be an object", "logit_bias"),
        (json!({"presence_penalty": 2.5}), "presence_penalty must be", "presence_penalty"),
        (json!({"logprobs": true}), "logprobs and top_logprobs are not supported", "logprobs"),
        (json!({"top_logprobs": 3}), "logprobs and top_logprobs are not supported", "logprobs"),
        (json!({"top_p": 0}), "top_p must be in (0, 1]", "top_p"),
        (
            json!({"max_completion_tokens": 0}),
            "max_tokens (or max_completion_tokens) must be",
            "max_tokens",
        ),
        (json!({"n": 2}), "only n = 1 is supported", "n"),
        (json!({"tools": {}}), "tools must be an array", "tools"),
        (json!({"tool_choice": "always"}), "tool_choice `always` is not supported", "tool_choice"),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
            "response_format.type",
        ),
        (json!({"messages": []}), "messages must not be empty", "messages"),
    ];
    for (extra, expected, param) in cases {
        let (message, named) = server.refused(ask(extra.clone())).await;
        assert!(message.starts_with(expected), "{extra}: `{message}`");
        assert_eq!(named, param, "{extra}: `{message}`");
    }
    // Fields of the wrong type or range, which serde refuses, are named too (QA pass 11),
    // nested ones by their path; a missing field by its name.
    let cases = [
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"messages": [{"role": "user", "content": "Hi"}, {"role": 7}]}), "messages[1].role"),
    ];
    for (extra, param) in cases {
        let (message, named) = server.refused(ask(extra.clone())).await;
        assert!(message.starts_with("invalid JSON body"), "{extra}: `{message}`");
        assert_eq!(named, param, "{extra}: `{message}`");
    }
    let (message, named) = server.refused(json!({"model": "main"})).await;
    assert!(message.contains("missing field `messages`"), "{message}");
    assert_eq!(named, "messages");
    // A body that is not a request at all names no field.
    let response = server.post(&json!([1, 2])).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.expect("the JSON error shape");
    assert_eq!(error["error"]["param"], Value::Null, "{error}");
    assert_eq!(model.requests.lock().unwrap().len(), 0, "no refused request reached the model");
}

#[tokio::test]
async fn honoured_sampling_fields_reach_the_model_and_neutral_ones_pass() {
    let model = PiecesModel::new(text(&["ok"]), true);
    let server = serve(&model).await;
    let completion = server
        .complete(ask(json!({
            "temperature": 0.3, "top_p": 0.5, "seed": 7, "presence_penalty": 0.75,
            "max_completion_tokens": 33, "max_tokens": 99,
            // Asking for nothing: OpenAI's defaults, which many clients always send.
            "frequency_penalty": 0, "logit_bias": {}, "logprobs": false, "top_logprobs": 0,
            "user": "someone", "stop": null
        })))
        .await;
    assert_eq!(completion["choices"][0]["message"]["content"], "ok", "{completion}");
    let params = model.last_request().params;
    assert_eq!((params.temperature, params.top_p, params.seed), (0.3, 0.5, Some(7)));
    assert_eq!(params.presence_penalty, 0.75);
    // `max_completion_tokens` is the newer name and wins over `max_tokens`.
    assert_eq!(params.max_tokens, 33);
}

/// SIGTERM ends `/v1` answers instead of waiting for them (a long answer on a CPU takes
/// minutes, and systemd kills after 30 s): a stream ends with an error event saying why,
/// then `[DONE]`; a request waiting for its whole answer gets a 503. The model is a slow
/// server on loopback whose answer would go on for seconds. Before, the shutdown waited for
/// every answer to end (84 s for one 6,000-token answer in QA).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_v1_answers_with_a_reason() {
    let slow = crate::util::slow_model().await;
    let envs = vec![("MODEL_FAST".to_string(), slow)];
    let mut server = tokio::task::block_in_place(|| {
        crate::util::Server::start(crate::util::ServerOptions { envs, data_dir: None })
    });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let request = |stream: bool| {
        client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&server.token)
            .json(&json!({"model": "fast", "stream": stream,
                          "messages": [{"role": "user", "content": "Count."}]}))
            .send()
    };
    let whole = tokio::spawn(request(false));
    let mut streamed = request(true).await.expect("the stream starts");
    assert_eq!(streamed.status(), 200);
    let mut body = String::new();
    while body.matches("\"content\":\"").count() < 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(20), streamed.chunk())
            .await
            .expect("a chunk within 20 s")
            .expect("the stream")
            .expect("more of the stream");
        body.push_str(&String::from_utf8_lossy(&chunk));
    }

    let code = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "clean exit within 15 s:\n{}", server.output());
    while let Some(chunk) = streamed.chunk().await.expect("the rest of the stream") {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(body.contains("my-claw is shutting down"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(
        !body.contains("\"finish_reason\":\"stop\""),
        "the answer did not end by itself: {body}"
    );
    assert!(!body.contains(&format!("\"{}\\n\"", crate::util::SLOW_NUMBERS)), "{body}");

    let whole = whole.await.unwrap().expect("an answer");
    assert_eq!(whole.status(), 503);
    let error: Value = whole.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("shutting down"), "{error}");
}
