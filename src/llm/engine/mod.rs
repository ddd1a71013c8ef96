//! The in-process inference engine: one worker thread per loaded model owns it and serves up
//! to `parallel` sequences at once (continuous batching); callers talk to it through
//! `EngineHandle`. Nothing here knows HTTP, SQL or channels.

pub mod backend;
pub mod candle_model;
pub mod constraint;
pub mod device;
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::llm::engine::device::{ComputeDevice, DeviceInfo};
use crate::llm::engine::model::KvType;
use crate::llm::{ChunkStream, LlmError, LlmRequest};

/// What the engine needs to start. Built by `app.rs` (or `--bench`, `chat`) from the config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Context size in tokens (prompt and answer); capped by the model's `context_length`.
    /// KV pages are allocated as a sequence grows, never for the whole context up front.
    pub n_ctx: usize,
    /// Requests that may wait for a free slot; one more gets `QueueFull` (a hard cap
    /// against abuse: waiting requests are told their position instead). A request that
    /// finds a slot free does not count, however soon after another it arrives; while the
    /// KV memory bound holds requests back from free slots, those count as slots.
    pub queue_capacity: usize,
    /// Sequences decoded together in one batched step (`ENGINE_PARALLEL`).
    pub parallel: usize,
    /// How many recent sequences keep their KV state for reuse by the next turn.
    pub kv_cache_sequences: usize,
    /// Memory bound of all KV state, kept and running, in bytes. A request waits for room
    /// unless nothing else runs.
    pub kv_cache_max_bytes: u64,
    /// Storage of keys and values (`KV_CACHE_TYPE`).
    pub kv_type: KvType,
    /// Where the model runs (`DEVICE`), opened once at start and shared by every model.
    pub device: ComputeDevice,
}

impl EngineConfig {
    /// The product's defaults for a model file: 32768-token context, 4 parallel sequences,
    /// up to 64 waiting, f16 KV state of 8 conversations within 4 GiB.
    pub fn for_model(model_path: PathBuf) -> EngineConfig {
        EngineConfig {
            model_path,
            n_ctx: 32_768,
            queue_capacity: 64,
            parallel: 4,
            kv_cache_sequences: 8,
            kv_cache_max_bytes: 4 << 30,
            kv_type: KvType::F16,
            device: ComputeDevice::Kernels,
        }
    }
}

/// How far a model load has read its file; shared with whoever waits for the load, to show
/// progress.
#[derive(Debug, Default)]
pub struct LoadProgress {
    read_bytes: AtomicU64,
    total_bytes: AtomicU64,
}

impl LoadProgress {
    /// Fraction of the file read so far, 0 to 1 (0 until the size is known).
    pub fn fraction(&self) -> f64 {
        let total = self.total_bytes.load(Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        (self.read_bytes.load(Ordering::Relaxed) as f64 / total as f64).min(1.0)
    }

    pub(crate) fn set_total(&self, bytes: u64) {
        self.total_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
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
    /// Memory the weights hold where they run (the file's size on the CPU).
    pub weight_bytes: u64,
    /// The device it runs on, with its memory just after loading.
    pub device: DeviceInfo,
    /// How decode steps run: `kernels` (our CPU kernels), `fused` (the GPU's fused
    /// kernels) or `ops` (candle's ops).
    pub decode_path: &'static str,
}

/// Counters the worker updates as it goes (cheap to read from any thread).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub requests_served: u64,
    pub cached_sequences: u64,
    pub cached_bytes: u64,
    /// Sequences being prefilled or decoded now, and the most seen at once.
    pub active_sequences: u64,
    pub peak_active_sequences: u64,
    /// Requests waiting for a slot.
    pub waiting_requests: u64,
    /// Batched forward passes run (each decodes every active sequence once).
    pub steps: u64,
    /// Prompt tokens prefilled by `warm` requests in idle time.
    pub warm_tokens: u64,
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
    queue: std_mpsc::Sender<worker::Message>,
    /// Requests submitted and not yet done (`worker::Shared::in_flight`); capped at `limit`.
    in_flight: Arc<AtomicUsize>,
    warming: Arc<AtomicUsize>,
    /// Warm requests that may wait (`queue_capacity`).
    cap: usize,
    /// Requests that may be in flight: every slot taken and `queue_capacity` waiting.
    limit: usize,
    info: Arc<ModelInfo>,
    stats: Arc<SharedStats>,
    device: ComputeDevice,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Engine threads still running. A process waits for them before it ends
/// (`wait_for_engines`): a GPU model must free its memory before the driver tears the
/// context down at exit, or the thread touches a dead context and the process crashes.
static LIVE_ENGINES: Mutex<usize> = Mutex::new(0);
static ENGINE_ENDED: Condvar = Condvar::new();

/// Counts one engine thread from before it is spawned until its model is dropped.
struct LiveEngine;

impl LiveEngine {
    fn new() -> LiveEngine {
        *LIVE_ENGINES.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        LiveEngine
    }
}

impl Drop for LiveEngine {
    fn drop(&mut self) {
        let mut live = LIVE_ENGINES.lock().unwrap_or_else(|e| e.into_inner());
        *live = live.saturating_sub(1);
        ENGINE_ENDED.notify_all();
    }
}

/// Wait (at most `timeout`) until every engine thread has ended; their handles must be
/// gone. `true` when none is left.
pub fn wait_for_engines(timeout: Duration) -> bool {
    let live = LIVE_ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    let (live, _) = ENGINE_ENDED
        .wait_timeout_while(live, timeout, |live| *live > 0)
        .unwrap_or_else(|e| e.into_inner());
    *live == 0
}

/// Buffer of chunks between the worker and a slow reader; when it is full the worker waits
/// rather than dropping text.
const CHUNK_BUFFER: usize = 64;

impl EngineHandle {
    /// Start the worker thread and load the model on it. Resolves once the model is loaded,
    /// so a bad file fails here with `LlmError::BadModel`.
    pub async fn spawn(config: EngineConfig) -> Result<EngineHandle, LlmError> {
        EngineHandle::spawn_with_progress(config, Arc::new(LoadProgress::default())).await
    }

    /// `spawn`, reporting how much of the file has been read into `progress`.
    pub async fn spawn_with_progress(
        config: EngineConfig,
        progress: Arc<LoadProgress>,
    ) -> Result<EngineHandle, LlmError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        // Unbounded: the cap is on requests in flight (`in_flight`), which the worker counts
        // down as they end; the channel only hands them over.
        let (queue_tx, queue_rx) = std_mpsc::channel();
        let stats = Arc::new(SharedStats::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let cap = config.queue_capacity.max(1);
        let limit = cap + worker::slots(config.parallel);
        let shared =
            worker::Shared { stats: stats.clone(), in_flight: in_flight.clone(), progress };
        let path = config.model_path.display().to_string();
        let device = config.device.clone();
        let live = LiveEngine::new();
        let spawned =
            std::thread::Builder::new().name("my-claw-engine".to_string()).spawn(move || {
                worker::run(config, queue_rx, ready_tx, shared);
                // Only once the worker (and its model) is gone.
                drop(live);
            });
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
        Ok(EngineHandle {
            queue: queue_tx,
            in_flight,
            warming: Arc::new(AtomicUsize::new(0)),
            cap,
            limit,
            info: Arc::new(info),
            stats,
            device,
        })
    }

    /// Queue a request; the stream yields text deltas, then `Chunk::Done` (or one error).
    /// While every slot is busy it first yields `queued` notices with the position. Fails
    /// at once with `QueueFull` when every slot is taken and `queue_capacity` requests
    /// already wait. Requests the thread has not picked up yet count as taking the free
    /// slots first, so a burst on an idle engine is judged as if it had been admitted.
    pub fn submit(&self, request: LlmRequest) -> Result<ChunkStream, LlmError> {
        self.submit_with(request, RequestOptions::default())
    }

    /// `submit` with per-request switches (see `RequestOptions`).
    pub fn submit_with(
        &self,
        request: LlmRequest,
        options: RequestOptions,
    ) -> Result<ChunkStream, LlmError> {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(LlmError::QueueFull);
        }
        let (reply, stream) = mpsc::channel(CHUNK_BUFFER);
        let job = worker::EngineRequest { request, options, reply, received: Instant::now() };
        match self.queue.send(worker::Message::Generate(job)) {
            Ok(()) => Ok(stream),
            Err(_) => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                Err(LlmError::EngineStopped)
            }
        }
    }

    /// Prefill `request`'s prompt into the kept KV state without generating, at idle
    /// priority: it runs only while no request is running or waiting and yields at the next
    /// chunk boundary when one arrives (what it prefilled so far is kept). Resolves when the
    /// whole prompt is cached. At most `queue_capacity` warm requests wait at once.
    pub async fn warm(&self, request: LlmRequest) -> Result<(), LlmError> {
        if self.warming.fetch_add(1, Ordering::SeqCst) >= self.cap {
            self.warming.fetch_sub(1, Ordering::SeqCst);
            return Err(LlmError::QueueFull);
        }
        let (done, finished) = oneshot::channel();
        let sent = self.queue.send(worker::Message::Warm(worker::WarmRequest { request, done }));
        let result = match sent {
            Ok(()) => finished.await.unwrap_or(Err(LlmError::EngineStopped)),
            Err(_) => Err(LlmError::EngineStopped),
        };
        self.warming.fetch_sub(1, Ordering::SeqCst);
        result
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }

    /// The model's device as it is now (a GPU's memory changes as sequences come and go).
    pub fn device_now(&self) -> DeviceInfo {
        self.device.info()
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
    active_sequences: AtomicU64,
    peak_active_sequences: AtomicU64,
    waiting_requests: AtomicU64,
    steps: AtomicU64,
    warm_tokens: AtomicU64,
}

impl SharedStats {
    fn snapshot(&self) -> EngineStats {
        EngineStats {
            requests_served: self.requests_served.load(Ordering::Relaxed),
            cached_sequences: self.cached_sequences.load(Ordering::Relaxed),
            cached_bytes: self.cached_bytes.load(Ordering::Relaxed),
            active_sequences: self.active_sequences.load(Ordering::Relaxed),
            peak_active_sequences: self.peak_active_sequences.load(Ordering::Relaxed),
            waiting_requests: self.waiting_requests.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
            warm_tokens: self.warm_tokens.load(Ordering::Relaxed),
            last_prefill_tok_s: f64::from_bits(self.last_prefill_tok_s.load(Ordering::Relaxed)),
            last_decode_tok_s: f64::from_bits(self.last_decode_tok_s.load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn record_request(&self, prefill_tok_s: f64, decode_tok_s: f64) {
        self.requests_served.fetch_add(1, Ordering::Relaxed);
        self.last_prefill_tok_s.store(prefill_tok_s.to_bits(), Ordering::Relaxed);
        self.last_decode_tok_s.store(decode_tok_s.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn record_slots(&self, active: usize, waiting: usize) {
        self.active_sequences.store(active as u64, Ordering::Relaxed);
        self.peak_active_sequences.fetch_max(active as u64, Ordering::Relaxed);
        self.waiting_requests.store(waiting as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_step(&self) {
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_warm(&self, tokens: usize) {
        self.warm_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_cache(&self, sequences: usize, bytes: u64) {
        self.cached_sequences.store(sequences as u64, Ordering::Relaxed);
        self.cached_bytes.store(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatTurn, Role};
    use crate::llm::GenerationParams;

    /// A handle whose thread never picks anything up: what the handle decides alone, as in
    /// the instant before the engine admits a burst of requests.
    fn handle_without_thread(
        queue_capacity: usize,
        parallel: usize,
    ) -> (EngineHandle, std_mpsc::Receiver<worker::Message>) {
        let (queue, received) = std_mpsc::channel();
        let info = ModelInfo {
            name: "none".to_string(),
            path: PathBuf::from("none.gguf"),
            arch: "llama".to_string(),
            quantization: "Q4_0".to_string(),
            file_size: 0,
            n_ctx: 512,
            load_ms: 0,
            weight_bytes: 0,
            device: ComputeDevice::Kernels.info(),
            decode_path: "kernels",
        };
        let handle = EngineHandle {
            queue,
            in_flight: Arc::new(AtomicUsize::new(0)),
            warming: Arc::new(AtomicUsize::new(0)),
            cap: queue_capacity,
            limit: queue_capacity + worker::slots(parallel),
            info: Arc::new(info),
            stats: Arc::new(SharedStats::default()),
            device: ComputeDevice::Kernels,
        };
        (handle, received)
    }

    fn request() -> LlmRequest {
        LlmRequest {
            messages: vec![ChatTurn::new(Role::User, "Hi")],
            params: GenerationParams::greedy(4),
            tools: Default::default(),
        }
    }

    #[test]
    fn requests_not_yet_admitted_take_the_free_slots_before_the_queue() {
        for (queue_capacity, parallel) in [(1, 1), (1, 2), (2, 4)] {
            let (engine, _received) = handle_without_thread(queue_capacity, parallel);
            for n in 0..queue_capacity + parallel {
                let accepted = engine.submit(request());
                assert!(accepted.is_ok(), "request {n} of ({queue_capacity}, {parallel})");
            }
            let refused = engine.submit(request());
            assert!(matches!(refused, Err(LlmError::QueueFull)), "({queue_capacity}, {parallel})");
        }
    }
}
