//! The in-process inference engine: one worker thread owns the candle model; callers talk
//! to it through `EngineHandle`. Nothing here knows HTTP, SQL or channels.

pub mod gguf;
pub mod gguf_write;
pub mod kernels;
pub mod model;
pub mod sampling;
pub mod synth;
pub mod template;
pub mod tokenizer;
pub mod vocab;
pub mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::llm::{ChunkStream, LlmError, LlmRequest};

/// What the engine needs to start. Built by `app.rs` (or `--bench`, `chat`) from the config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Context size in tokens (prompt and answer); capped by the model's `context_length`.
    pub n_ctx: usize,
    /// Requests that may wait while one is running; one more gets `QueueFull`.
    pub queue_capacity: usize,
    /// How many recent sequences keep their KV state for reuse by the next turn.
    pub kv_cache_sequences: usize,
    /// Memory bound of those kept KV states, in bytes.
    pub kv_cache_max_bytes: u64,
}

impl EngineConfig {
    /// The product's defaults for a model file: 32768-token context, a queue of 4, the
    /// KV state of 8 conversations within 4 GiB.
    pub fn for_model(model_path: PathBuf) -> EngineConfig {
        EngineConfig {
            model_path,
            n_ctx: 32_768,
            queue_capacity: 4,
            kv_cache_sequences: 8,
            kv_cache_max_bytes: 4 << 30,
        }
    }
}

/// What was loaded, for logs, `/api/health` and the bench.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub path: PathBuf,
    /// `qwen3` or `llama`.
    pub arch: String,
    /// llama.cpp-style label such as `Q4_K_M`.
    pub quantization: String,
    pub file_size: u64,
    /// The context size in force (the configured one, capped by the model's).
    pub n_ctx: usize,
    pub load_ms: u64,
}

/// Counters the worker updates as it goes (cheap to read from any thread).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub requests_served: u64,
    pub cached_sequences: u64,
    pub cached_bytes: u64,
    /// Prompt tokens per second of the last request's prefill (0 when nothing was new).
    pub last_prefill_tok_s: f64,
    /// Tokens per second of the last request's decode.
    pub last_decode_tok_s: f64,
}

/// Per-request switches that are not sampling settings; the bench uses them to measure
/// fixed-length runs and runs without KV reuse. The server uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestOptions {
    /// Keep generating through end-of-turn tokens until `max_tokens`.
    pub ignore_stop: bool,
    /// Look up and store KV state of earlier sequences.
    pub reuse_cache: bool,
}

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions { ignore_stop: false, reuse_cache: true }
    }
}

/// A cheap, cloneable handle to the engine thread. When the last clone is dropped, the
/// worker finishes what it has been given and exits, which frees the model.
#[derive(Clone)]
pub struct EngineHandle {
    queue: std_mpsc::SyncSender<worker::EngineRequest>,
    info: Arc<ModelInfo>,
    stats: Arc<SharedStats>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Buffer of chunks between the worker and a slow reader; when it is full the worker waits
/// rather than dropping text.
const CHUNK_BUFFER: usize = 64;

impl EngineHandle {
    /// Start the worker thread and load the model on it. Resolves once the model is loaded,
    /// so a bad file fails here with `LlmError::BadModel`.
    pub async fn spawn(config: EngineConfig) -> Result<EngineHandle, LlmError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (queue_tx, queue_rx) = std_mpsc::sync_channel(config.queue_capacity);
        let stats = Arc::new(SharedStats::default());
        let worker_stats = stats.clone();
        let path = config.model_path.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("my-claw-engine".to_string())
            .spawn(move || worker::run(config, queue_rx, ready_tx, worker_stats));
        if let Err(err) = spawned {
            return Err(LlmError::Unavailable(format!("cannot start the engine thread: {err}")));
        }
        let info = match ready_rx.await {
            Ok(Ok(info)) => info,
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                return Err(LlmError::BadModel {
                    path,
                    reason: "the engine thread died while loading the model".to_string(),
                })
            }
        };
        Ok(EngineHandle { queue: queue_tx, info: Arc::new(info), stats })
    }

    /// Queue a request; the stream yields text deltas, then `Chunk::Done` (or one error).
    /// A full queue fails at once with `QueueFull`.
    pub fn submit(&self, request: LlmRequest) -> Result<ChunkStream, LlmError> {
        self.submit_with(request, RequestOptions::default())
    }

    /// `submit` with per-request switches (see `RequestOptions`).
    pub fn submit_with(
        &self,
        request: LlmRequest,
        options: RequestOptions,
    ) -> Result<ChunkStream, LlmError> {
        let (reply, stream) = mpsc::channel(CHUNK_BUFFER);
        let job = worker::EngineRequest { request, options, reply, received: Instant::now() };
        match self.queue.try_send(job) {
            Ok(()) => Ok(stream),
            Err(std_mpsc::TrySendError::Full(_)) => Err(LlmError::QueueFull),
            Err(std_mpsc::TrySendError::Disconnected(_)) => Err(LlmError::EngineStopped),
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }
}

/// The atomics behind `EngineStats`; rates are stored as f64 bits.
#[derive(Debug, Default)]
pub(crate) struct SharedStats {
    requests_served: AtomicU64,
    cached_sequences: AtomicU64,
    cached_bytes: AtomicU64,
    last_prefill_tok_s: AtomicU64,
    last_decode_tok_s: AtomicU64,
}

impl SharedStats {
    fn snapshot(&self) -> EngineStats {
        EngineStats {
            requests_served: self.requests_served.load(Ordering::Relaxed),
            cached_sequences: self.cached_sequences.load(Ordering::Relaxed),
            cached_bytes: self.cached_bytes.load(Ordering::Relaxed),
            last_prefill_tok_s: f64::from_bits(self.last_prefill_tok_s.load(Ordering::Relaxed)),
            last_decode_tok_s: f64::from_bits(self.last_decode_tok_s.load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn record_request(&self, prefill_tok_s: f64, decode_tok_s: f64) {
        self.requests_served.fetch_add(1, Ordering::Relaxed);
        self.last_prefill_tok_s.store(prefill_tok_s.to_bits(), Ordering::Relaxed);
        self.last_decode_tok_s.store(decode_tok_s.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn record_cache(&self, sequences: usize, bytes: u64) {
        self.cached_sequences.store(sequences as u64, Ordering::Relaxed);
        self.cached_bytes.store(bytes, Ordering::Relaxed);
    }
}
