//! Loaded local models: each GGUF file loads on first use (or on `preload`), tiers that name
//! the same file share one loaded instance, the total stays within a memory budget by
//! evicting the least recently used idle model, and idle models unload after a keep-alive.
//! It owns no tier policy (that is `router.rs`) and never touches a loaded model itself:
//! loading goes through a `ModelLoader` (the engine in production, fakes in tests). A request
//! that waits for a load of more than `LOAD_NOTICE_AFTER` is told so, with the progress.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::llm::engine::LoadProgress;
use crate::llm::{
    forward_chunks, Chunk, ChunkStream, LlmError, LlmRequest, Provider, ProviderInfo,
};

/// Loads one model file and returns it as a provider. Dropping every clone of the returned
/// provider must free the model. The production loader (an engine worker per file) is
/// built in `app.rs`.
pub trait ModelLoader: Send + Sync {
    fn load(&self, path: PathBuf) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>>;

    /// `load`, reporting how far it has read the file into `progress` (loaders that cannot
    /// tell report nothing).
    fn load_with_progress(
        &self,
        path: PathBuf,
        progress: Arc<LoadProgress>,
    ) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
        let _ = progress;
        self.load(path)
    }
}

/// How long a request waits for a model load before its stream starts with a `loading`
/// notice (then one per second with the progress). Loads shorter than this answer as
/// before: load errors and `ContextOverflow` come back from `stream` itself, so callers can
/// still trim or fall back; after it, they arrive as the stream's error.
pub const LOAD_NOTICE_AFTER: Duration = Duration::from_millis(500);

/// Limits of the pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Total for loaded models; `None` means no limit.
    pub memory_budget_bytes: Option<u64>,
    /// Unload a model unused for this long; `None` means never.
    pub keep_alive: Option<Duration>,
    /// Added to each file's size to estimate a loaded model's memory: the engine's KV
    /// bound (`KV_CACHE_MEMORY`), which covers running and kept sequences alike.
    pub per_model_overhead_bytes: u64,
}

/// Where one model file stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelState {
    NotLoaded,
    Loading,
    /// `active` is the number of answers being streamed from it right now.
    Loaded {
        active: usize,
    },
    /// The last load failed; the next request tries again.
    Failed(String),
}

/// One model file as the pool sees it, for `/api/models` and `/api/health`.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub path: PathBuf,
    pub state: ModelState,
    pub estimated_bytes: u64,
    /// How long ago it last served (or finished serving) a request.
    pub idle_for: Option<Duration>,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct ModelPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    config: PoolConfig,
    loader: Arc<dyn ModelLoader>,
    slots: Mutex<HashMap<PathBuf, Arc<Slot>>>,
}

struct Slot {
    path: PathBuf,
    /// The progress of the load in flight (or the last one).
    progress: Mutex<Arc<LoadProgress>>,
    /// Held while this file loads: requests for this file wait for it, others do not.
    load_lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<SlotState>,
}

struct SlotState {
    loaded: Option<Arc<dyn Provider>>,
    /// Memory counted against the budget (loading or loaded).
    reserved: bool,
    loading: bool,
    estimate: u64,
    active: usize,
    last_used: Instant,
    last_error: Option<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short locks cannot leave the data half-updated in a way
    // that matters more than stopping the server, so poisoning is ignored.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelPool {
    /// Creates the pool and, when there is a keep-alive and a tokio runtime, the background
    /// task that unloads idle models. The task ends when the pool is dropped.
    pub fn new(config: PoolConfig, loader: Arc<dyn ModelLoader>) -> ModelPool {
        let inner = Arc::new(PoolInner { config, loader, slots: Mutex::new(HashMap::new()) });
        if let Some(keep_alive) = inner.config.keep_alive {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(unload_idle_loop(Arc::downgrade(&inner), keep_alive));
                }
                Err(_) => tracing::warn!("no tokio runtime: idle models will not be unloaded"),
            }
        }
        ModelPool { inner }
    }

    /// A provider for one model file that loads it on first use. Cheap; create as many as
    /// needed: every provider for the same path shares one loaded model.
    pub fn provider(&self, path: &Path) -> Arc<dyn Provider> {
        self.slot(path);
        Arc::new(PooledProvider { pool: self.clone(), path: path.to_path_buf() })
    }

    /// Loads a file now (the `PRELOAD` setting); fails as a first request would.
    pub async fn preload(&self, path: &Path) -> Result<(), LlmError> {
        let (_provider, _lease) = self.acquire(path).await?;
        Ok(())
    }

    /// The state of every file the pool knows, sorted by path.
    pub fn status(&self) -> Vec<ModelStatus> {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        let mut out: Vec<ModelStatus> = slots.iter().map(|slot| slot.status()).collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// The state of one file (`NotLoaded` if the pool has never seen it).
    pub fn state(&self, path: &Path) -> ModelState {
        let slot = lock(&self.inner.slots).get(&slot_key(path)).cloned();
        slot.map(|s| s.status().state).unwrap_or(ModelState::NotLoaded)
    }

    /// The device and memory of `path`'s model when it is loaded.
    pub fn device(&self, path: &Path) -> Option<crate::llm::DeviceUse> {
        let slot = lock(&self.inner.slots).get(&slot_key(path)).cloned()?;
        let provider = lock(&slot.state).loaded.clone()?;
        provider.device()
    }

    /// Unloads every idle model unused for at least `idle_for` and returns how many.
    /// The background task calls this; tests may too.
    pub fn unload_idle(&self, idle_for: Duration) -> usize {
        self.inner.unload_idle(idle_for)
    }

    fn slot(&self, path: &Path) -> Arc<Slot> {
        let mut slots = lock(&self.inner.slots);
        slots
            .entry(slot_key(path))
            .or_insert_with(|| {
                Arc::new(Slot {
                    path: path.to_path_buf(),
                    progress: Mutex::new(Arc::new(LoadProgress::default())),
                    load_lock: Arc::new(tokio::sync::Mutex::new(())),
                    state: Mutex::new(SlotState {
                        loaded: None,
                        reserved: false,
                        loading: false,
                        estimate: 0,
                        active: 0,
                        last_used: Instant::now(),
                        last_error: None,
                    }),
                })
            })
            .clone()
    }

    /// The loaded model for `path`, loading it if needed, with a lease that marks it busy
    /// (not evictable) until dropped.
    async fn acquire(&self, path: &Path) -> Result<(Arc<dyn Provider>, Lease), LlmError> {
        let slot = self.slot(path);
        if let Some(found) = slot.try_use() {
            return Ok(found);
        }
        // Only requests for this file wait here; other files load or answer meanwhile.
        let loading = slot.load_lock.clone().lock_owned().await;
        if let Some(found) = slot.try_use() {
            return Ok(found);
        }
        let estimate = self.estimate(path)?;
        let evicted = self.reserve(&slot, estimate)?;
        for (evicted_path, provider) in evicted {
            tracing::info!(path = %evicted_path.display(), "unloading model to stay within the memory budget");
            drop(provider);
        }
        // The load runs in its own task, holding the per-file lock, so that a request that
        // goes away mid-load (the user closed the page) neither wastes the load nor
        // leaves the file marked as loading.
        let loader = self.inner.loader.clone();
        let load_slot = slot.clone();
        let progress = Arc::new(LoadProgress::default());
        *lock(&slot.progress) = progress.clone();
        let task = tokio::spawn(async move {
            let _loading = loading;
            let path = load_slot.path.clone();
            let started = Instant::now();
            tracing::info!(path = %path.display(), "loading model");
            let result = loader.load_with_progress(path.clone(), progress).await;
            let mut state = lock(&load_slot.state);
            state.loading = false;
            state.last_used = Instant::now();
            match result {
                Ok(provider) => {
                    tracing::info!(path = %path.display(), ms = started.elapsed().as_millis() as u64, "model loaded");
                    state.loaded = Some(provider);
                    state.last_error = None;
                    Ok(())
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "model failed to load");
                    state.reserved = false;
                    state.last_error = Some(err.to_string());
                    Err(err)
                }
            }
        });
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(join) => {
                let mut state = lock(&slot.state);
                state.loading = false;
                state.reserved = false;
                return Err(LlmError::Unavailable(format!("model load task failed: {join}")));
            }
        }
        // Evicted or unloaded between the load and now (a very short idle window): say so
        // rather than loop.
        slot.try_use().ok_or_else(|| {
            LlmError::Unavailable(format!("{} was unloaded right after loading", path.display()))
        })
    }

    fn estimate(&self, path: &Path) -> Result<u64, LlmError> {
        let size = std::fs::metadata(path)
            .map_err(|e| LlmError::BadModel {
                path: path.display().to_string(),
                reason: format!("cannot read the file: {e}"),
            })?
            .len();
        Ok(size + self.inner.config.per_model_overhead_bytes)
    }

    /// Counts `estimate` for `slot` against the budget, choosing least recently used idle
    /// models to unload when it does not fit. Returns them for the caller to drop outside
    /// the locks.
    fn reserve(&self, slot: &Arc<Slot>, estimate: u64) -> Result<Vec<Unloaded>, LlmError> {
        let slots = lock(&self.inner.slots);
        let mut evicted = Vec::new();
        if let Some(budget) = self.inner.config.memory_budget_bytes {
            if estimate > budget {
                return Err(LlmError::Unavailable(format!(
                    "{} needs about {} (file and KV cache), more than the memory budget of {} \
                     (MODEL_MEMORY_BUDGET, or GPU_MEMORY_BUDGET when models run on a GPU)",
                    slot.path.display(),
                    human_bytes(estimate),
                    human_bytes(budget)
                )));
            }
            let mut used = 0u64;
            let mut idle: Vec<(Instant, Arc<Slot>)> = Vec::new();
            for other in slots.values() {
                if Arc::ptr_eq(other, slot) {
                    continue;
                }
                let state = lock(&other.state);
                if state.reserved {
                    used += state.estimate;
                    if state.loaded.is_some() && state.active == 0 && !state.loading {
                        idle.push((state.last_used, other.clone()));
                    }
                }
            }
            idle.sort_by_key(|(last_used, _)| *last_used);
            let mut idle = idle.into_iter();
            while used + estimate > budget {
                let Some((_, victim)) = idle.next() else {
                    // Put nothing back: nothing was taken from the victims yet.
                    return Err(LlmError::Unavailable(format!(
                        "not enough room in the memory budget of {} for {} while other \
                         models are loading or answering; try again when they finish",
                        human_bytes(budget),
                        slot.path.display()
                    )));
                };
                let victim_estimate = lock(&victim.state).estimate;
                used = used.saturating_sub(victim_estimate);
                evicted.push(victim);
            }
        }
        // Commit: take the victims' models and reserve this one.
        let mut taken = Vec::new();
        for victim in evicted {
            let mut state = lock(&victim.state);
            if state.active > 0 {
                // It started answering since it was chosen: keep it; the budget is
                // exceeded until it goes idle and the next load or the keep-alive evicts it.
                tracing::warn!(path = %victim.path.display(), "model became busy while being evicted; memory budget exceeded for now");
                continue;
            }
            if let Some(provider) = state.loaded.take() {
                state.reserved = false;
                taken.push((victim.path.clone(), provider));
            }
        }
        let mut state = lock(&slot.state);
        state.reserved = true;
        state.loading = true;
        state.estimate = estimate;
        drop(state);
        drop(slots);
        Ok(taken)
    }
}

impl PoolInner {
    fn unload_idle(&self, idle_for: Duration) -> usize {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let mut unloaded = Vec::new();
        for slot in slots {
            let mut state = lock(&slot.state);
            if state.loaded.is_some()
                && state.active == 0
                && !state.loading
                && state.last_used.elapsed() >= idle_for
            {
                if let Some(provider) = state.loaded.take() {
                    state.reserved = false;
                    unloaded.push((slot.path.clone(), provider));
                }
            }
        }
        let count = unloaded.len();
        for (path, provider) in unloaded {
            tracing::info!(path = %path.display(), "unloading idle model");
            drop(provider);
        }
        count
    }
}

/// A model taken out of the pool, to be dropped (freed) outside the locks.
type Unloaded = (PathBuf, Arc<dyn Provider>);

/// One entry per file, however it is spelled (`./models/x.gguf`, `models/x.gguf`, a
/// symbolic link): tiers naming the same file share one loaded model.
fn slot_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Wakes a few times per keep-alive period and unloads what has been idle long enough.
async fn unload_idle_loop(pool: Weak<PoolInner>, keep_alive: Duration) {
    let tick = (keep_alive / 4).clamp(Duration::from_millis(20), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.unload_idle(keep_alive);
    }
}

impl Slot {
    /// The loaded model with a new lease, if it is loaded.
    fn try_use(self: &Arc<Self>) -> Option<(Arc<dyn Provider>, Lease)> {
        let mut state = lock(&self.state);
        let provider = state.loaded.clone()?;
        state.active += 1;
        state.last_used = Instant::now();
        Some((provider, Lease { slot: self.clone() }))
    }

    fn status(&self) -> ModelStatus {
        let state = lock(&self.state);
        let model_state = if state.loading {
            ModelState::Loading
        } else if state.loaded.is_some() {
            ModelState::Loaded { active: state.active }
        } else if let Some(err) = &state.last_error {
            ModelState::Failed(err.clone())
        } else {
            ModelState::NotLoaded
        };
        ModelStatus {
            path: self.path.clone(),
            state: model_state,
            estimated_bytes: state.estimate,
            idle_for: (state.loaded.is_some() && state.active == 0)
                .then(|| state.last_used.elapsed()),
        }
    }
}

/// Marks a model busy while an answer streams from it; dropping it marks it idle again.
struct Lease {
    slot: Arc<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = lock(&self.slot.state);
        state.active = state.active.saturating_sub(1);
        state.last_used = Instant::now();
    }
}

/// A `Provider` for one file of the pool: loads on first use, keeps the model busy while
/// its answer streams.
struct PooledProvider {
    pool: ModelPool,
    path: PathBuf,
}

impl Provider for PooledProvider {
    fn info(&self) -> ProviderInfo {
        ProviderInfo {
            provider: "local".to_string(),
            model: self.file_name(),
            leaves_machine: false,
            host: None,
        }
    }

    fn stream(&self, request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
        Box::pin(async move {
            let slot = self.pool.slot(&self.path);
            if let Some((provider, lease)) = slot.try_use() {
                return answer(provider, lease, request).await;
            }
            // A load is needed: it runs in its own task. Short loads answer as if the model
            // had been there; a longer one starts the stream with notices meanwhile.
            let pool = self.pool.clone();
            let path = self.path.clone();
            let mut load = tokio::spawn(async move { pool.acquire(&path).await });
            if let Ok(joined) = tokio::time::timeout(LOAD_NOTICE_AFTER, &mut load).await {
                let (provider, lease) = joined_load(joined)?;
                return answer(provider, lease, request).await;
            }
            let (tx, rx) = mpsc::channel(64);
            let name = self.file_name();
            let progress = lock(&slot.progress).clone();
            let _ = tx.try_send(Ok(loading_notice(&name, progress.fraction())));
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(1));
                ticker.tick().await;
                let joined = loop {
                    tokio::select! {
                        joined = &mut load => break joined,
                        _ = ticker.tick() => {
                            let notice = loading_notice(&name, progress.fraction());
                            if tx.send(Ok(notice)).await.is_err() {
                                // The reader left; the load goes on in its own task.
                                return;
                            }
                        }
                    }
                };
                let started = match joined_load(joined) {
                    Ok((provider, lease)) => {
                        provider.stream(request).await.map(|upstream| (upstream, lease))
                    }
                    Err(err) => Err(err),
                };
                match started {
                    Ok((upstream, lease)) => forward(upstream, lease, tx),
                    Err(err) => {
                        let _ = tx.send(Err(err)).await;
                    }
                }
            });
            Ok(rx)
        })
    }

    fn warm(&self, request: LlmRequest) -> BoxFuture<'_, Result<(), LlmError>> {
        Box::pin(async move {
            // Warming loads the model if needed (after a restart, the recent conversations
            // are warmed); the lease keeps it from being evicted meanwhile.
            let (provider, _lease) = self.pool.acquire(&self.path).await?;
            provider.warm(request).await
        })
    }
}

impl PooledProvider {
    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn loading_notice(name: &str, fraction: f64) -> Chunk {
    let message = if fraction > 0.0 {
        format!("loading {name}: {:.0}%", fraction * 100.0)
    } else {
        format!("loading {name}")
    };
    Chunk::Notice { kind: "loading".to_string(), message }
}

type Acquired = (Arc<dyn Provider>, Lease);

fn joined_load(
    joined: Result<Result<Acquired, LlmError>, tokio::task::JoinError>,
) -> Result<Acquired, LlmError> {
    match joined {
        Ok(acquired) => acquired,
        Err(join) => Err(LlmError::Unavailable(format!("model load task failed: {join}"))),
    }
}

/// Start the answer on a loaded model and forward it into a new stream.
async fn answer(
    provider: Arc<dyn Provider>,
    lease: Lease,
    request: LlmRequest,
) -> Result<ChunkStream, LlmError> {
    let upstream = provider.stream(request).await?;
    let (tx, rx) = mpsc::channel(64);
    forward(upstream, lease, tx);
    Ok(rx)
}

/// Forward an answer, holding the lease while it streams (so the model is not evicted or
/// unloaded under it). A reader that leaves ends the forwarding at once (`forward_chunks`),
/// which drops the upstream receiver and stops the engine's sequence.
fn forward(upstream: ChunkStream, lease: Lease, tx: mpsc::Sender<Result<Chunk, LlmError>>) {
    tokio::spawn(async move {
        let _lease = lease;
        forward_chunks(upstream, tx).await;
    });
}

/// `1.5 GiB`, `98.4 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Chunk;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts loads and live models; answers "ok".
    struct FakeLoader {
        loads: AtomicUsize,
        live: Arc<AtomicUsize>,
        delay: Duration,
    }

    struct FakeModel {
        live: Arc<AtomicUsize>,
    }

    impl Drop for FakeModel {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Provider for FakeModel {
        fn info(&self) -> ProviderInfo {
            ProviderInfo {
                provider: "local".into(),
                model: "fake".into(),
                leaves_machine: false,
                host: None,
            }
        }
        fn stream(&self, _request: LlmRequest) -> BoxFuture<'_, Result<ChunkStream, LlmError>> {
            Box::pin(async {
                let (tx, rx) = mpsc::channel(4);
                let _ = tx.try_send(Ok(Chunk::Text("ok".into())));
                Ok(rx)
            })
        }
    }

    impl ModelLoader for FakeLoader {
        fn load(&self, path: PathBuf) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let live = self.live.clone();
            let delay =
                if path.to_string_lossy().contains("slow") { self.delay } else { Duration::ZERO };
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                live.fetch_add(1, Ordering::SeqCst);
                let model: Arc<dyn Provider> = Arc::new(FakeModel { live });
                Ok(model)
            })
        }
    }

    fn files(dir: &Path, names: &[&str], size: usize) -> Vec<PathBuf> {
        names
            .iter()
            .map(|name| {
                let path = dir.join(name);
                std::fs::write(&path, vec![0u8; size]).unwrap();
                path
            })
            .collect()
    }

    fn request() -> LlmRequest {
        LlmRequest {
            messages: vec![],
            params: crate::llm::GenerationParams::greedy(4),
            tools: Default::default(),
        }
    }

    #[tokio::test]
    async fn shares_evicts_lru_and_unloads_idle() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &["a.gguf", "b.gguf", "c.gguf"], 1000);
        let live = Arc::new(AtomicUsize::new(0));
        let loader = Arc::new(FakeLoader {
            loads: AtomicUsize::new(0),
            live: live.clone(),
            delay: Duration::ZERO,
        });
        let pool = ModelPool::new(
            PoolConfig {
                memory_budget_bytes: Some(2500),
                keep_alive: None,
                per_model_overhead_bytes: 100,
            },
            loader.clone(),
        );
        let a1 = pool.provider(&paths[0]);
        let a2 = pool.provider(&paths[0]);
        a1.stream(request()).await.unwrap();
        a2.stream(request()).await.unwrap();
        assert_eq!(loader.loads.load(Ordering::SeqCst), 1, "same file, one load");
        pool.provider(&paths[1]).stream(request()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // a is now least recently used: loading c evicts it, not b.
        pool.provider(&paths[2]).stream(request()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.state(&paths[0]), ModelState::NotLoaded);
        assert!(matches!(pool.state(&paths[1]), ModelState::Loaded { .. }));
        assert_eq!(live.load(Ordering::SeqCst), 2);
        assert_eq!(pool.unload_idle(Duration::ZERO), 2);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn idle_models_unload_after_keep_alive_and_paths_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &["a.gguf"], 10);
        let live = Arc::new(AtomicUsize::new(0));
        let loader = Arc::new(FakeLoader {
            loads: AtomicUsize::new(0),
            live: live.clone(),
            delay: Duration::ZERO,
        });
        let pool = ModelPool::new(
            PoolConfig {
                memory_budget_bytes: None,
                keep_alive: Some(Duration::from_millis(60)),
                per_model_overhead_bytes: 0,
            },
            loader.clone(),
        );
        pool.provider(&paths[0]).stream(request()).await.unwrap();
        let other_spelling = dir.path().join(".").join("a.gguf");
        pool.provider(&other_spelling).stream(request()).await.unwrap();
        assert_eq!(loader.loads.load(Ordering::SeqCst), 1, "one file, one load");
        let mut waited = 0;
        while pool.state(&paths[0]) != ModelState::NotLoaded && waited < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += 1;
        }
        assert_eq!(pool.state(&paths[0]), ModelState::NotLoaded);
        assert_eq!(live.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_slow_load_does_not_block_another_model() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &["slow.gguf", "quick.gguf"], 10);
        let loader = Arc::new(FakeLoader {
            loads: AtomicUsize::new(0),
            live: Arc::new(AtomicUsize::new(0)),
            delay: Duration::from_secs(30),
        });
        let pool = ModelPool::new(
            PoolConfig { memory_budget_bytes: None, keep_alive: None, per_model_overhead_bytes: 0 },
            loader,
        );
        let slow = pool.provider(&paths[0]);
        let slow_task = tokio::spawn(async move { slow.stream(request()).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.state(&paths[0]), ModelState::Loading);
        let quick = tokio::time::timeout(
            Duration::from_secs(5),
            pool.provider(&paths[1]).stream(request()),
        )
        .await;
        assert!(quick.expect("quick model waited behind the slow load").is_ok());
        slow_task.abort();
    }

    #[tokio::test]
    async fn over_budget_model_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &["big.gguf"], 1000);
        let loader = Arc::new(FakeLoader {
            loads: AtomicUsize::new(0),
            live: Arc::new(AtomicUsize::new(0)),
            delay: Duration::ZERO,
        });
        let pool = ModelPool::new(
            PoolConfig {
                memory_budget_bytes: Some(500),
                keep_alive: None,
                per_model_overhead_bytes: 0,
            },
            loader,
        );
        let err = pool.provider(&paths[0]).stream(request()).await.unwrap_err().to_string();
        assert!(err.contains("MODEL_MEMORY_BUDGET"), "{err}");
    }

    /// Reads 40% of a "file" at once, then takes 2.5 s for the rest.
    struct ProgressLoader;

    impl ModelLoader for ProgressLoader {
        fn load(&self, path: PathBuf) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
            self.load_with_progress(path, Arc::new(LoadProgress::default()))
        }

        fn load_with_progress(
            &self,
            _path: PathBuf,
            progress: Arc<LoadProgress>,
        ) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
            Box::pin(async move {
                progress.set_total(100);
                progress.add_read(40);
                tokio::time::sleep(Duration::from_millis(2500)).await;
                progress.add_read(60);
                let model: Arc<dyn Provider> =
                    Arc::new(FakeModel { live: Arc::new(AtomicUsize::new(1)) });
                Ok(model)
            })
        }
    }

    #[tokio::test]
    async fn a_slow_load_streams_loading_notices_with_progress_then_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let paths = files(dir.path(), &["slow.gguf"], 10);
        let pool = ModelPool::new(
            PoolConfig { memory_budget_bytes: None, keep_alive: None, per_model_overhead_bytes: 0 },
            Arc::new(ProgressLoader),
        );
        let mut stream = pool.provider(&paths[0]).stream(request()).await.unwrap();
        let mut chunks = Vec::new();
        while let Some(item) = stream.recv().await {
            chunks.push(item.unwrap());
        }
        let loading = |c: &Chunk| matches!(c, Chunk::Notice { kind, .. } if kind == "loading");
        assert!(loading(&chunks[0]), "{chunks:?}");
        assert!(
            chunks.iter().any(|c| matches!(c, Chunk::Notice { message, .. }
                if message == "loading slow.gguf: 40%")),
            "{chunks:?}"
        );
        assert_eq!(chunks.last(), Some(&Chunk::Text("ok".into())), "then the answer");
        assert!(matches!(pool.state(&paths[0]), ModelState::Loaded { .. }));
        // Loaded now: the next request gets the answer with no notice.
        let mut again = pool.provider(&paths[0]).stream(request()).await.unwrap();
        assert_eq!(again.recv().await.unwrap().unwrap(), Chunk::Text("ok".into()));
    }
}
