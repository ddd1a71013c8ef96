//! Tiers (fast/smart/main local, code/reason cloud, any but main on a remote
//! OpenAI-compatible server), what answers each one, and the fallback policy: cloud tiers
//! without a key, and cloud or remote tiers failing before their first token, answer from
//! `main` with a notice, and a fallback says whether the prompt had already been sent (the
//! privacy ledger records that host); local tiers whose named file is missing use a GGUF
//! found in `MODELS_DIR`. It keeps each remote's health (reachable, model listed, last error) and
//! probes it lazily, never at start-up.
//! It owns no HTTP, SQL or model code and names no concrete provider: tier values arrive
//! checked from `config.rs`, and `app.rs` hands over the model loader and the cloud providers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use crate::config::RouterSettings;
use crate::llm::hub::{self, ModelSpec};
use crate::llm::pool::{ModelLoader, ModelPool, ModelState, PoolConfig};
use crate::llm::{Capabilities, ChunkStream, LlmError, LlmRequest, Probe, Provider, ProviderInfo};

/// How old a remote's last check may be before a status request starts a new one.
const PROBE_EVERY: Duration = Duration::from_secs(60);

crate::domain::named_enum! {
    /// A model tier the user can pick, by its stored and wire name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Tier {
        Fast = "fast",
        Smart = "smart",
        Main = "main",
        Code = "code",
        Reason = "reason",
    }
}

impl Tier {
    pub const ALL: [Tier; 5] = [Tier::Fast, Tier::Smart, Tier::Main, Tier::Code, Tier::Reason];

    /// A tier as a person typed it (a setting, an API field, a model id): case and
    /// surrounding spaces do not matter. `parse` is the exact match of a name as stored.
    pub fn from_name(s: &str) -> Option<Tier> {
        Tier::parse(&s.trim().to_ascii_lowercase())
    }

    /// The environment variable that sets this tier's model.
    pub fn env_var(self) -> &'static str {
        match self {
            Tier::Fast => "MODEL_FAST",
            Tier::Smart => "MODEL_SMART",
            Tier::Main => "MODEL_MAIN",
            Tier::Code => "MODEL_CODE",
            Tier::Reason => "MODEL_REASON",
        }
    }

    /// Whether a cloud model on this tier thinks: `reason` does (the reasoning is never
    /// shown), every other tier answers directly for latency.
    pub fn cloud_thinking(self) -> bool {
        self == Tier::Reason
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An answer that has started, and who gives it.
pub struct Routed {
    pub stream: ChunkStream,
    /// The tier that was asked for.
    pub tier: Tier,
    /// Who really answers (after any fallback): for the privacy ledger and the UI.
    pub info: ProviderInfo,
    /// `(kind, message)` pairs to show before the answer, e.g. `("fallback", "Z.ai
    /// unavailable (HTTP 401: …) after the prompt was sent: answered by main (…)")`. They are
    /// not repeated inside `stream`.
    pub notices: Vec<(String, String)>,
    /// A network provider that may have received the prompt but failed before answering,
    /// so that `info`'s provider (main) answers instead: the prompt went there all the same.
    /// `None` when only `info`'s provider got it.
    pub sent_to: Option<PromptSent>,
}

/// Where a prompt went that the answerer did not write: the host of a provider that got it
/// (or may have) and then failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSent {
    pub host: Option<String>,
    /// Whether that host is off this machine (a server on loopback is not).
    pub leaves_machine: bool,
}

impl Routed {
    /// Whether this answer's prompt left the machine, for the privacy ledger: the answerer
    /// is off the machine, or a provider that failed after it was sent is.
    pub fn leaves_machine(&self) -> bool {
        self.info.leaves_machine || self.sent_to.as_ref().is_some_and(|sent| sent.leaves_machine)
    }

    /// The host the ledger records: the answerer's own when it is off the machine or has
    /// one, else that of the failed provider the prompt was sent to (on loopback too: the
    /// ledger names every host a prompt went to, off the machine or not).
    pub fn host(&self) -> Option<String> {
        match &self.sent_to {
            Some(sent) if sent.leaves_machine && !self.info.leaves_machine => sent.host.clone(),
            Some(sent) if self.info.host.is_none() => sent.host.clone(),
            _ => self.info.host.clone(),
        }
    }
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("tier", &self.tier)
            .field("info", &self.info)
            .field("notices", &self.notices)
            .field("sent_to", &self.sent_to)
            .finish_non_exhaustive()
    }
}

crate::domain::named_enum! {
    /// How a tier is doing, for `GET /api/models` and `/api/health`, by its wire name.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum TierState {
        /// Local file present, not loaded yet (loads on first use).
        Present = "present",
        Loading = "loading",
        Loaded = "loaded",
        /// The last load failed (the message is in `detail`); the next request tries again.
        LoadFailed = "load_failed",
        /// No file at all: the tier cannot answer until a model is pulled.
        Missing = "missing",
        /// Cloud model with a key, last call fine (or none yet).
        CloudReady = "configured",
        /// Cloud tier answered by `main`: no key, or the last call failed.
        CloudFallback = "falling_back",
        /// A ready-made provider (tests, injected fakes).
        Ready = "ready",
    }
}

/// One tier's status. Plain data: the gateway turns it into JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    pub tier: Tier,
    /// The configured value, e.g. `qwen3:8b` or `zai:glm-4.7`.
    pub configured: String,
    pub state: TierState,
    /// Who answers this tier now (after stand-ins and fallback); `None` when nobody can.
    pub answered_by: Option<ProviderInfo>,
    /// The local file used, if any.
    pub file: Option<PathBuf>,
    /// The file this tier wanted when another one stands in for it, e.g.
    /// `Qwen3-8B-Q4_K_M.gguf`.
    pub stand_in_for: Option<String>,
    /// A command that would fix a missing or stood-in model.
    pub pull_command: Option<String>,
    /// One sentence for people.
    pub detail: String,
    /// A tier on an OpenAI-compatible server: its health.
    pub remote: Option<RemoteStatus>,
    /// A loaded local model: where it runs and the memory it holds.
    pub device: Option<crate::llm::DeviceUse>,
}

/// A remote tier's server as last seen, for `/api/models` and `/api/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// The configured base URL (`None` for an injected provider).
    pub base_url: Option<String>,
    pub host: Option<String>,
    pub model: String,
    pub leaves_machine: bool,
    /// Whether the server answered the last check or call; `None` before any.
    pub reachable: Option<bool>,
    /// Whether its `/models` lists the model; `None` when not known.
    pub model_listed: Option<bool>,
    pub last_error: Option<(String, SystemTime)>,
    pub last_success: Option<SystemTime>,
    /// When `/models` was last checked.
    pub checked_at: Option<SystemTime>,
}

/// The cloud side, for `/api/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZaiStatus {
    /// A key is set and at least one tier uses Z.ai.
    pub configured: bool,
    pub base_url: String,
    /// Cloud tiers answer from `main` right now (no key, or the last call failed).
    pub fallback_active: bool,
    /// Why, in a sentence, when `fallback_active`.
    pub reason: Option<String>,
    pub last_error: Option<(String, SystemTime)>,
    pub last_success: Option<SystemTime>,
}

/// Where a tier's answer comes from, as planned from the settings (no file is loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierPlan {
    pub tier: Tier,
    pub configured: String,
    pub spec: ModelSpec,
    pub source: PlanSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanSource {
    /// A local file; `stand_in_for` names the missing file it replaces.
    File { path: PathBuf, stand_in_for: Option<String>, pull_command: Option<String> },
    /// The named file is missing and `MODELS_DIR` holds no GGUF at all.
    Missing { wanted: String, pull_command: String },
    /// Z.ai; `has_key` false means it answers from `main`.
    Zai { model: String, has_key: bool },
    /// An OpenAI-compatible server.
    Remote { base_url: String, model: String },
}

/// Resolves every tier against `MODELS_DIR` without loading anything. The values were
/// checked by `Config::validate`; the one error left is a `.gguf` file removed since then.
pub fn plan_tiers(settings: &RouterSettings) -> Result<Vec<TierPlan>, LlmError> {
    let models_dir = settings.models_dir.as_path();
    let available = hub::find_gguf_files(models_dir);
    let mut plans = Vec::with_capacity(Tier::ALL.len());
    for tier in Tier::ALL {
        let configured = settings.tier_model(tier);
        let value = configured.configured.as_str();
        let spec = configured.spec.clone();
        let source = match &spec {
            ModelSpec::Zai(model) => {
                PlanSource::Zai { model: model.clone(), has_key: settings.zai_api_key.is_some() }
            }
            ModelSpec::Remote(remote) => PlanSource::Remote {
                base_url: remote.base_url.clone(),
                model: remote.model.clone(),
            },
            ModelSpec::File(path) => {
                if !path.is_file() {
                    return Err(LlmError::BadModel {
                        path: path.display().to_string(),
                        reason: format!("{} names this file but it does not exist", tier.env_var()),
                    });
                }
                PlanSource::File { path: path.clone(), stand_in_for: None, pull_command: None }
            }
            ModelSpec::Qwen3(model) => {
                let wanted = models_dir.join(model.file_name());
                if wanted.is_file() {
                    PlanSource::File { path: wanted, stand_in_for: None, pull_command: None }
                } else {
                    match pick_stand_in(&available) {
                        Some(path) => PlanSource::File {
                            path,
                            stand_in_for: Some(model.file_name()),
                            pull_command: Some(model.pull_command()),
                        },
                        None => PlanSource::Missing {
                            wanted: model.file_name(),
                            pull_command: model.pull_command(),
                        },
                    }
                }
            }
        };
        plans.push(TierPlan { tier, configured: value.to_string(), spec, source });
    }
    Ok(plans)
}

/// The largest GGUF in `MODELS_DIR`: the likeliest to be a real model rather than a toy, and
/// a single choice means every stood-in tier shares one loaded instance.
fn pick_stand_in(available: &[PathBuf]) -> Option<PathBuf> {
    available.iter().max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).cloned()
}

/// Decides who answers each tier. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    tiers: Vec<TierEntry>,
    default_tier: Tier,
    pool: Option<ModelPool>,
    zai_base_url: String,
    zai_has_key: bool,
    zai_health: Mutex<ZaiHealth>,
}

#[derive(Default)]
struct ZaiHealth {
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
}

struct TierEntry {
    tier: Tier,
    configured: String,
    route: Route,
    /// The pooled file behind a local route, for its load state.
    file: Option<PathBuf>,
    stand_in_for: Option<String>,
    pull_command: Option<String>,
    /// Set for a tier on an OpenAI-compatible server.
    remote: Option<RemoteEntry>,
}

/// A remote tier's health, updated by its calls and by `/models` checks.
struct RemoteEntry {
    base_url: Option<String>,
    health: Mutex<RemoteHealth>,
    /// A check is running: a second status request does not start another.
    probing: AtomicBool,
}

impl RemoteEntry {
    fn new(base_url: Option<String>) -> Self {
        RemoteEntry { base_url, health: Mutex::default(), probing: AtomicBool::new(false) }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, RemoteHealth> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_call(&self, outcome: Result<(), (&str, &LlmError)>) {
        let mut health = self.health();
        let now = SystemTime::now();
        match outcome {
            Ok(()) => {
                health.reachable = Some(true);
                health.last_success = Some(now);
                health.last_ok = Some(now);
            }
            Err((message, err)) => {
                health.last_error = Some((message.to_string(), now));
                health.reachable = match err {
                    // An HTTP status, or a connection that was made (an empty answer, a
                    // stream cut short), means the server is there, only unwell.
                    LlmError::Cloud { status: Some(_), .. }
                    | LlmError::Cloud { sent: true, .. } => Some(true),
                    LlmError::Cloud { sent: false, .. } => Some(false),
                    _ => health.reachable,
                };
            }
        }
    }

    fn record_probe(&self, probe: Probe) {
        let mut health = self.health();
        let now = SystemTime::now();
        health.checked_at = Some(now);
        health.reachable = Some(probe.reachable);
        health.model_listed = probe.model_listed;
        match probe.error {
            Some(error) => health.last_error = Some((error, now)),
            None => health.last_ok = Some(now),
        }
    }

    /// The last event was a failure.
    fn failing(&self) -> bool {
        let health = self.health();
        match (&health.last_error, health.last_ok) {
            (Some((_, failed_at)), Some(ok_at)) => *failed_at > ok_at,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

#[derive(Default)]
struct RemoteHealth {
    reachable: Option<bool>,
    model_listed: Option<bool>,
    last_error: Option<(String, SystemTime)>,
    last_success: Option<SystemTime>,
    /// The last good news: a call that started or a check without error.
    last_ok: Option<SystemTime>,
    checked_at: Option<SystemTime>,
}

enum Route {
    /// A local model, a Z.ai model with a key, or an injected provider.
    Provider(Arc<dyn Provider>),
    /// A cloud tier without a key: `main` answers.
    CloudWithoutKey { model: String },
    /// No model file: nobody can answer.
    Missing { wanted: String, pull_command: String },
}

/// What the router is built from besides the settings: the concrete parts, which `app.rs`
/// makes (the engine loader and the Z.ai clients in production, fakes in tests).
pub struct RouterParts {
    /// Loads a local model file into a provider.
    pub loader: Arc<dyn ModelLoader>,
    /// Memory added to each model file's size in the budget (the KV cache bound).
    pub per_model_overhead_bytes: u64,
    /// The provider of each cloud tier that can reach its cloud (a key is set), and of each
    /// remote tier; a cloud tier missing here answers from `main` with a notice.
    pub cloud: HashMap<Tier, Arc<dyn Provider>>,
}

impl Router {
    /// What `app.rs` calls: `from_settings`, then `preload` when `PRELOAD` is set (so a
    /// bad main model fails the start).
    pub async fn build(settings: &RouterSettings, parts: RouterParts) -> Result<Router, LlmError> {
        let router = Router::from_settings(settings, parts)?;
        if settings.preload {
            router.preload().await?;
        }
        Ok(router)
    }

    /// Builds the router from the checked settings and the parts `app.rs` made: warns loudly
    /// about stand-ins and missing files, and sets up lazy loading. Nothing is loaded or
    /// downloaded here; see `preload`.
    pub fn from_settings(
        settings: &RouterSettings,
        parts: RouterParts,
    ) -> Result<Router, LlmError> {
        let RouterParts { loader, per_model_overhead_bytes, mut cloud } = parts;
        let plans = plan_tiers(settings)?;
        let default_tier = settings.default_tier;
        let pool = ModelPool::new(
            PoolConfig {
                memory_budget_bytes: settings.memory_budget_bytes,
                keep_alive: settings.keep_alive,
                per_model_overhead_bytes,
            },
            loader,
        );
        let mut tiers = Vec::with_capacity(plans.len());
        for plan in plans {
            let mut entry = TierEntry {
                tier: plan.tier,
                configured: plan.configured.clone(),
                route: Route::Missing { wanted: String::new(), pull_command: String::new() },
                file: None,
                stand_in_for: None,
                pull_command: None,
                remote: None,
            };
            match plan.source {
                PlanSource::File { path, stand_in_for, pull_command } => {
                    if let Some(wanted) = &stand_in_for {
                        tracing::warn!(
                            "{}={}: {wanted} is not in {}; {} STANDS IN for it (answers will \
                             be far worse). Download the real model with `{}`",
                            plan.tier.env_var(),
                            plan.configured,
                            settings.models_dir.display(),
                            path.display(),
                            pull_command.as_deref().unwrap_or("my-claw models pull")
                        );
                    }
                    entry.route = Route::Provider(pool.provider(&path));
                    entry.file = Some(path);
                    entry.stand_in_for = stand_in_for;
                    entry.pull_command = pull_command;
                }
                PlanSource::Missing { wanted, pull_command } => {
                    tracing::warn!(
                        "{}={}: {wanted} is not in {} and there is no other GGUF there; tier \
                         {} cannot answer. Download it with `{pull_command}`",
                        plan.tier.env_var(),
                        plan.configured,
                        settings.models_dir.display(),
                        plan.tier
                    );
                    entry.pull_command = Some(pull_command.clone());
                    entry.route = Route::Missing { wanted, pull_command };
                }
                PlanSource::Zai { model, has_key } => match cloud.remove(&plan.tier) {
                    Some(provider) if has_key => entry.route = Route::Provider(provider),
                    _ => entry.route = Route::CloudWithoutKey { model },
                },
                PlanSource::Remote { base_url, model } => {
                    let Some(provider) = cloud.remove(&plan.tier) else {
                        return Err(LlmError::Unavailable(format!(
                            "{}: no client was built for {model} at {base_url}",
                            plan.tier.env_var()
                        )));
                    };
                    entry.route = Route::Provider(provider);
                    entry.remote = Some(RemoteEntry::new(Some(base_url)));
                }
            }
            tiers.push(entry);
        }
        let without_key: Vec<&str> = tiers
            .iter()
            .filter(|t| matches!(t.route, Route::CloudWithoutKey { .. }))
            .map(|t| t.tier.as_str())
            .collect();
        if !without_key.is_empty() {
            tracing::warn!(
                "ZAI_API_KEY is not set: tier(s) {} answer from the local main model",
                without_key.join(", ")
            );
        }
        let zai_has_key = settings.zai_api_key.is_some();
        Ok(Router {
            inner: Arc::new(Inner {
                tiers,
                default_tier,
                pool: Some(pool),
                zai_base_url: settings.zai_base_url.clone(),
                zai_has_key,
                zai_health: Mutex::new(ZaiHealth::default()),
            }),
        })
    }

    /// A router over ready-made providers, for tests of the assistant and the gateway.
    /// `main` answers the `main` tier and is the fallback. Tiers absent from `providers`
    /// behave as unconfigured: `fast`/`smart` answer from `main` directly, `code`/`reason`
    /// answer from `main` with the no-key fallback notice.
    pub fn with_providers(
        main: Arc<dyn Provider>,
        providers: HashMap<Tier, Arc<dyn Provider>>,
        default_tier: Tier,
    ) -> Router {
        let mut zai_has_key = false;
        let tiers = Tier::ALL
            .iter()
            .map(|&tier| {
                let mut remote = None;
                let route = match (tier, providers.get(&tier)) {
                    (Tier::Main, _) => Route::Provider(main.clone()),
                    (_, Some(provider)) => {
                        let info = provider.info();
                        if info.provider == "openai" {
                            remote = Some(RemoteEntry::new(None));
                        } else {
                            zai_has_key |= info.leaves_machine;
                        }
                        Route::Provider(provider.clone())
                    }
                    (Tier::Code | Tier::Reason, None) => {
                        Route::CloudWithoutKey { model: "glm-4.7".to_string() }
                    }
                    (_, None) => Route::Provider(main.clone()),
                };
                TierEntry {
                    tier,
                    configured: "provided".to_string(),
                    route,
                    file: None,
                    stand_in_for: None,
                    pull_command: None,
                    remote,
                }
            })
            .collect();
        Router {
            inner: Arc::new(Inner {
                tiers,
                default_tier,
                pool: None,
                zai_base_url: String::new(),
                zai_has_key,
                zai_health: Mutex::new(ZaiHealth::default()),
            }),
        }
    }

    pub fn default_tier(&self) -> Tier {
        self.inner.default_tier
    }

    /// Loads the `main` tier's model now (the `PRELOAD` setting), so a bad file fails the
    /// start instead of the first request.
    pub async fn preload(&self) -> Result<(), LlmError> {
        let entry = self.entry(Tier::Main);
        match (&self.inner.pool, &entry.file) {
            (Some(pool), Some(path)) => pool.preload(path).await,
            _ => match &entry.route {
                Route::Missing { wanted, pull_command } => Err(LlmError::Unavailable(format!(
                    "cannot preload main: {wanted} is missing; run `{pull_command}`"
                ))),
                _ => Ok(()),
            },
        }
    }

    /// Starts an answer on `tier`. Cloud failures before the first token fall back to
    /// `main` with a notice; a failure after tokens arrives as an `Err` item in the stream.
    pub async fn stream(&self, tier: Tier, request: LlmRequest) -> Result<Routed, LlmError> {
        let entry = self.entry(tier);
        match &entry.route {
            Route::Missing { wanted, pull_command } => Err(LlmError::Unavailable(format!(
                "tier {tier} has no model: {wanted} is not in the models directory and there \
                 is no other GGUF there; run `{pull_command}`"
            ))),
            Route::CloudWithoutKey { model } => {
                let reason = format!("Z.ai is not configured (no ZAI_API_KEY) for {model}");
                self.answer_from_main(tier, request, &reason).await
            }
            Route::Provider(provider) => {
                let info = provider.info();
                // Anything over the network (Z.ai, a remote server, even on loopback) can
                // fail on its own; the in-process engine's failures are not a fallback case.
                if !info.leaves_machine && info.host.is_none() {
                    let stream = provider.stream(request).await?;
                    return Ok(Routed { stream, tier, info, notices: Vec::new(), sent_to: None });
                }
                match provider.stream(request.clone()).await {
                    Ok(stream) => {
                        match &entry.remote {
                            Some(remote) => remote.record_call(Ok(())),
                            None => self.record_cloud(Ok(())),
                        }
                        Ok(Routed { stream, tier, info, notices: Vec::new(), sent_to: None })
                    }
                    Err(err) => {
                        // Only a connection never made proves the prompt stayed; the ledger
                        // and the notice say when it may have gone.
                        let sent = err.prompt_may_have_left();
                        let reason = format!(
                            "{} unavailable ({}){}",
                            cloud_name(&info),
                            describe(&err),
                            if sent { " after the prompt was sent" } else { "" }
                        );
                        tracing::warn!(tier = %tier, "{reason}; falling back to main");
                        match &entry.remote {
                            Some(remote) => remote.record_call(Err((reason.as_str(), &err))),
                            None => self.record_cloud(Err(&reason)),
                        }
                        let mut routed = self.answer_from_main(tier, request, &reason).await?;
                        if sent {
                            routed.sent_to = Some(PromptSent {
                                host: info.host.clone(),
                                leaves_machine: info.leaves_machine,
                            });
                        }
                        Ok(routed)
                    }
                }
            }
        }
    }

    /// What `tier`'s provider enforces of a request's tool use (`tool_choice`,
    /// `response_format`), so that `/v1` can refuse what it cannot do rather than weaken it.
    /// A cloud tier without a key is answered by `main`, so it has main's; a tier without a
    /// model fails anyway and claims everything.
    pub fn capabilities(&self, tier: Tier) -> Capabilities {
        match &self.entry(tier).route {
            Route::Provider(provider) => provider.capabilities(),
            Route::CloudWithoutKey { .. } if tier != Tier::Main => self.capabilities(Tier::Main),
            Route::CloudWithoutKey { .. } | Route::Missing { .. } => Capabilities::ALL,
        }
    }

    /// Hands `request`'s prompt to whoever answers `tier` locally, to prepare its KV state in
    /// idle time (see `Provider::warm`). Cloud tiers without a key warm `main`, which answers
    /// them; cloud providers and missing models have nothing to prepare. The provider gets
    /// the request when this is called, not when the future is first polled, so a caller
    /// can hand it over before telling anyone that its turn has ended.
    pub fn warm(&self, tier: Tier, mut request: LlmRequest) -> BoxFuture<'_, Result<(), LlmError>> {
        let nothing_to_do: BoxFuture<'_, Result<(), LlmError>> = Box::pin(async { Ok(()) });
        match &self.entry(tier).route {
            Route::Provider(provider) => provider.warm(request),
            Route::CloudWithoutKey { .. } => match &self.entry(Tier::Main).route {
                Route::Provider(main) => {
                    // The same setting `answer_from_main` uses, so the prompts match.
                    request.params.thinking = false;
                    main.warm(request)
                }
                _ => nothing_to_do,
            },
            Route::Missing { .. } => nothing_to_do,
        }
    }

    /// Every tier's state, in `Tier::ALL` order.
    pub async fn status(&self) -> Vec<TierStatus> {
        self.probe_stale_remotes();
        let main_answerer = self.answerer(Tier::Main);
        let zai = self.zai_status();
        self.inner
            .tiers
            .iter()
            .map(|entry| {
                let mut status = TierStatus {
                    tier: entry.tier,
                    configured: entry.configured.clone(),
                    state: TierState::Ready,
                    answered_by: self.answerer(entry.tier),
                    file: entry.file.clone(),
                    stand_in_for: entry.stand_in_for.clone(),
                    pull_command: entry.pull_command.clone(),
                    detail: String::new(),
                    remote: None,
                    device: None,
                };
                match &entry.route {
                    Route::Missing { wanted, pull_command } => {
                        status.state = TierState::Missing;
                        status.detail = format!("{wanted} is missing; run `{pull_command}`");
                    }
                    Route::CloudWithoutKey { model } => {
                        status.state = TierState::CloudFallback;
                        status.answered_by = main_answerer.clone();
                        status.detail = format!(
                            "{model} on Z.ai is not configured (no ZAI_API_KEY): answered by main"
                        );
                    }
                    Route::Provider(provider) => {
                        let info = provider.info();
                        if let Some(remote) = &entry.remote {
                            let failing = remote.failing();
                            let health = remote.health();
                            let server = cloud_name(&info);
                            let place = if info.leaves_machine {
                                "leaves this machine"
                            } else {
                                "on this machine (loopback)"
                            };
                            if failing {
                                status.state = TierState::CloudFallback;
                                status.detail = format!(
                                    "{} on {server} ({place}); the last call or check failed, \
                                     so it falls back to main when it fails: {}",
                                    info.model,
                                    health.last_error.as_ref().map_or("", |(m, _)| m.as_str())
                                );
                            } else {
                                status.state = TierState::CloudReady;
                                status.detail = format!("{} on {server} ({place})", info.model);
                            }
                            status.remote = Some(RemoteStatus {
                                base_url: remote.base_url.clone(),
                                host: info.host.clone(),
                                model: info.model.clone(),
                                leaves_machine: info.leaves_machine,
                                reachable: health.reachable,
                                model_listed: health.model_listed,
                                last_error: health.last_error.clone(),
                                last_success: health.last_success,
                                checked_at: health.checked_at,
                            });
                        } else if info.leaves_machine {
                            if zai.fallback_active {
                                status.state = TierState::CloudFallback;
                                status.detail = format!(
                                    "{} on {}; the last call failed, so it fell back to main: {}",
                                    info.model,
                                    cloud_name(&info),
                                    zai.reason.clone().unwrap_or_default()
                                );
                            } else {
                                status.state = TierState::CloudReady;
                                status.detail = format!("{} on {}", info.model, cloud_name(&info));
                            }
                        } else if let (Some(pool), Some(path)) = (&self.inner.pool, &entry.file) {
                            status.device = pool.device(path);
                            let (state, detail) = match pool.state(path) {
                                ModelState::NotLoaded => {
                                    (TierState::Present, "loads on first use".to_string())
                                }
                                ModelState::Loading => (TierState::Loading, "loading".to_string()),
                                ModelState::Loaded { active } => (
                                    TierState::Loaded,
                                    format!("loaded, {active} answer(s) streaming"),
                                ),
                                ModelState::Failed(err) => {
                                    (TierState::LoadFailed, format!("last load failed: {err}"))
                                }
                            };
                            status.state = state;
                            status.detail = match &entry.stand_in_for {
                                Some(wanted) => format!(
                                    "{} stands in for {wanted} (missing); {detail}",
                                    path.display()
                                ),
                                None => format!("{}: {detail}", path.display()),
                            };
                        } else {
                            status.detail = format!("{} ({})", info.model, info.provider);
                        }
                    }
                }
                status
            })
            .collect()
    }

    /// Whether Z.ai is configured, whether cloud tiers fall back now, and the last error.
    pub fn zai_status(&self) -> ZaiStatus {
        let uses_zai = self.inner.tiers.iter().any(|t| match &t.route {
            Route::CloudWithoutKey { .. } => true,
            Route::Provider(p) => t.remote.is_none() && p.info().leaves_machine,
            Route::Missing { .. } => false,
        });
        let health = self.inner.zai_health.lock().unwrap_or_else(|e| e.into_inner());
        let configured = self.inner.zai_has_key && uses_zai;
        let failing = match (&health.last_error, health.last_success) {
            (Some((_, failed_at)), Some(ok_at)) => *failed_at > ok_at,
            (Some(_), None) => true,
            _ => false,
        };
        let (fallback_active, reason) = if !uses_zai {
            (false, None)
        } else if !configured {
            (true, Some("ZAI_API_KEY is not set: cloud tiers answer from main".to_string()))
        } else if failing {
            (true, health.last_error.as_ref().map(|(msg, _)| msg.clone()))
        } else {
            (false, None)
        };
        ZaiStatus {
            configured,
            base_url: self.inner.zai_base_url.clone(),
            fallback_active,
            reason,
            last_error: health.last_error.clone(),
            last_success: health.last_success,
        }
    }

    /// Checks every remote tier's server now (`/models`: reachable, model listed) and
    /// records what it found; the tiers are checked side by side.
    pub async fn probe_remotes(&self) {
        let checks = self.inner.tiers.iter().filter(|e| e.remote.is_some()).map(|e| e.tier);
        futures::future::join_all(checks.map(|tier| self.probe_tier(tier))).await;
    }

    /// Checks one remote tier's server and records the result. Runs even while a
    /// background check is under way, so that a caller of `probe_remotes` sees a result.
    async fn probe_tier(&self, tier: Tier) {
        let entry = self.entry(tier);
        let (Some(remote), Route::Provider(provider)) = (&entry.remote, &entry.route) else {
            return;
        };
        if let Some(probe) = provider.probe().await {
            if let Some(error) = &probe.error {
                tracing::warn!(tier = %tier, "remote check: {error}");
            }
            remote.record_probe(probe);
        }
    }

    /// Starts, in the background, a check of every remote tier not checked for a while:
    /// status requests never wait for a remote server.
    fn probe_stale_remotes(&self) {
        for entry in &self.inner.tiers {
            let Some(remote) = &entry.remote else { continue };
            let stale = remote
                .health()
                .checked_at
                .and_then(|at| at.elapsed().ok())
                .is_none_or(|age| age >= PROBE_EVERY);
            if !stale {
                continue;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { continue };
            if remote.probing.swap(true, Ordering::AcqRel) {
                continue;
            }
            let router = self.clone();
            let tier = entry.tier;
            runtime.spawn(async move {
                router.probe_tier(tier).await;
                if let Some(remote) = &router.entry(tier).remote {
                    remote.probing.store(false, Ordering::Release);
                }
            });
        }
    }

    fn entry(&self, tier: Tier) -> &TierEntry {
        &self.inner.tiers[tier.index()]
    }

    /// Who answers `tier` when nothing fails.
    fn answerer(&self, tier: Tier) -> Option<ProviderInfo> {
        match &self.entry(tier).route {
            Route::Provider(provider) => Some(provider.info()),
            Route::CloudWithoutKey { .. } => self.answerer(Tier::Main),
            Route::Missing { .. } => None,
        }
    }

    async fn answer_from_main(
        &self,
        tier: Tier,
        mut request: LlmRequest,
        reason: &str,
    ) -> Result<Routed, LlmError> {
        let unavailable = |why: String| {
            LlmError::Unavailable(format!(
                "{reason}, and the fallback model (main) is unavailable too: {why}"
            ))
        };
        let main = match &self.entry(Tier::Main).route {
            Route::Provider(provider) => provider.clone(),
            Route::Missing { wanted, pull_command } => {
                return Err(unavailable(format!("{wanted} is missing; run `{pull_command}`")))
            }
            Route::CloudWithoutKey { .. } => {
                return Err(unavailable("main is not a local model".to_string()))
            }
        };
        // Local Qwen3 answers without thinking (the product's setting), whatever the cloud
        // tier would have used.
        request.params.thinking = false;
        let info = main.info();
        let stream = match main.stream(request).await {
            Ok(stream) => stream,
            // These describe the request or main's load, not a missing fallback: the caller
            // trims history on an overflow (and the retry falls back again, with its
            // notice) or waits and retries a full queue, exactly as on the direct path; a
            // request main cannot serve as asked (a schema it cannot compile) is the
            // client's to fix (400), not an outage.
            Err(
                err @ (LlmError::ContextOverflow { .. }
                | LlmError::QueueFull
                | LlmError::InvalidRequest(_)),
            ) => return Err(err),
            Err(err) => return Err(unavailable(err.to_string())),
        };
        let notice = format!("{reason}: answered by main ({})", info.model);
        let notices = vec![("fallback".to_string(), notice)];
        Ok(Routed { stream, tier, info, notices, sent_to: None })
    }

    fn record_cloud(&self, outcome: Result<(), &str>) {
        let mut health = self.inner.zai_health.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => health.last_success = Some(SystemTime::now()),
            Err(message) => health.last_error = Some((message.to_string(), SystemTime::now())),
        }
    }
}

fn cloud_name(info: &ProviderInfo) -> String {
    match (info.provider.as_str(), &info.host) {
        ("zai", _) => "Z.ai".to_string(),
        ("openai", Some(host)) => host.clone(),
        (other, _) => other.to_string(),
    }
}

/// A short cause for notices: `HTTP 429, code 1113: Insufficient balance…`.
pub fn describe(err: &LlmError) -> String {
    match err {
        LlmError::Cloud { status, code, message, .. } => {
            let mut parts = Vec::new();
            if let Some(status) = status {
                parts.push(format!("HTTP {status}"));
            }
            if let Some(code) = code {
                parts.push(format!("code {code}"));
            }
            if parts.is_empty() {
                message.clone()
            } else {
                format!("{}: {message}", parts.join(", "))
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_round_trip() {
        for tier in Tier::ALL {
            assert_eq!(Tier::parse(tier.as_str()), Some(tier));
        }
        assert_eq!(Tier::from_name(" Code "), Some(Tier::Code));
        assert_eq!(Tier::parse(" Code "), None, "stored names are exact");
        assert_eq!(Tier::from_name("turbo"), None);
        assert!(Tier::Reason.cloud_thinking());
        assert!(!Tier::Code.cloud_thinking());
    }

    #[test]
    fn describe_names_status_and_code() {
        let err = LlmError::Cloud {
            status: Some(429),
            code: Some("1113".into()),
            message: "insufficient balance".into(),
            retryable: false,
            sent: true,
        };
        assert_eq!(describe(&err), "HTTP 429, code 1113: insufficient balance");
    }

    #[test]
    fn a_prompt_sent_before_a_fallback_is_in_the_ledger() {
        let main = ProviderInfo {
            provider: "local".into(),
            model: "main.gguf".into(),
            leaves_machine: false,
            host: None,
        };
        let (_tx, stream) = tokio::sync::mpsc::channel(1);
        let mut routed =
            Routed { stream, tier: Tier::Code, info: main, notices: Vec::new(), sent_to: None };
        assert!(!routed.leaves_machine());
        assert_eq!(routed.host(), None);
        // A loopback server got it: still on the machine, with that server named.
        routed.sent_to =
            Some(PromptSent { host: Some("127.0.0.1:8000".into()), leaves_machine: false });
        assert!(!routed.leaves_machine());
        assert_eq!(routed.host().as_deref(), Some("127.0.0.1:8000"), "named, as README says");
        routed.sent_to = Some(PromptSent { host: Some("api.z.ai".into()), leaves_machine: true });
        assert!(routed.leaves_machine());
        assert_eq!(routed.host().as_deref(), Some("api.z.ai"));

        let refused = |sent| LlmError::Cloud {
            status: None,
            code: None,
            message: "connection refused".into(),
            retryable: true,
            sent,
        };
        assert!(!refused(false).prompt_may_have_left());
        assert!(refused(true).prompt_may_have_left());
        assert!(LlmError::Timeout("no first byte".into()).prompt_may_have_left(), "unsure: sent");
        assert!(!LlmError::InvalidRequest("tool_choice".into()).prompt_may_have_left());
    }
}
