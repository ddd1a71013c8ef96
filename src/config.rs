//! Configuration from CLI flags, environment variables and `.env`, validated once at start.
//! This module only parses and validates: it opens no pool and builds no client (that is
//! `app.rs`). Secrets are wrapped in `Secret`, whose `Debug` prints `***`.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::llm::engine::device::{ComputeDevice, DeviceSetting};
use crate::llm::hub::ModelSpec;
use crate::llm::router::Tier;

/// Longest message a person may send, in characters (about 4,000 tokens): a chat message
/// on `/api/chat` or `/v1/chat/completions`, and the limit the channels answer to. A longer
/// one would hold the engine for minutes on a CPU and crowd the history out of the context.
pub const MAX_MESSAGE_CHARS: usize = 16_000;
/// The smallest `CONTEXT_SIZE` accepted: a system prompt with tools and an answer fit.
pub const MIN_CONTEXT_SIZE: usize = 2048;

/// A secret string (token, key). `Debug` and `Display` print `***` so that a logged config
/// never leaks it; use `expose` where the value is really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` equals the secret, in time that depends on neither value: both
    /// sides are hashed first, so even their lengths do not show. The one way secrets are
    /// compared in this crate (bearer token, webhook verify token, cron secret).
    pub fn matches(&self, candidate: &str) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let expected = Sha256::digest(self.0.as_bytes());
        let given = Sha256::digest(candidate.as_bytes());
        bool::from(expected.as_slice().ct_eq(given.as_slice()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Every setting of the server, as given on the command line or in the environment.
/// Flags are global so that `my-claw --bind …` and `my-claw serve --bind …` both work.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    // --- Server ---------------------------------------------------------------------------
    /// Address to listen on. Loopback by default: expose it deliberately (reverse proxy).
    #[arg(long, env = "BIND", default_value = "127.0.0.1:3000", global = true)]
    pub bind: String,

    /// Directory for the SQLite database, the generated WebChat token and bench results.
    #[arg(long, env = "DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,

    /// SQLite URL; defaults to `sqlite://<DATA_DIR>/my-claw.db`.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Directory holding GGUF model files.
    #[arg(long, env = "MODELS_DIR", default_value = "./models", global = true)]
    pub models_dir: PathBuf,

    /// Bearer token for the WebChat and the API: 16+ visible ASCII characters, no spaces.
    /// Generated and saved in DATA_DIR when unset.
    #[arg(long, env = "WEBCHAT_TOKEN", global = true, hide_env_values = true)]
    pub webchat_token: Option<Secret>,

    /// How many recent messages of a conversation go into the prompt.
    #[arg(long, env = "HISTORY_MESSAGES", default_value_t = 20, global = true)]
    pub history_messages: usize,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024, global = true)]
    pub max_body_bytes: usize,

    /// Time a client has to send a request's headers, counted from when its connection opens
    /// or its previous answer ends; also how long an idle kept-alive connection stays open.
    #[arg(long, env = "REQUEST_HEADER_TIMEOUT", default_value = "20s", global = true)]
    pub request_header_timeout: String,

    /// Time a client has to send a whole request body once its headers are in.
    #[arg(long, env = "REQUEST_BODY_TIMEOUT", default_value = "30s", global = true)]
    pub request_body_timeout: String,

    /// Log filter (tracing EnvFilter syntax); RUST_LOG is used when LOG is unset.
    #[arg(long = "log", env = "LOG", global = true)]
    pub log: Option<String>,

    // --- Local engine ---------------------------------------------------------------------
    /// Context size in tokens for local models (capped by the model's own).
    #[arg(long, env = "CONTEXT_SIZE", default_value_t = 32768, global = true)]
    pub context_size: usize,

    /// CPU threads for local inference (default: one per core).
    #[arg(long, env = "ENGINE_THREADS", global = true)]
    pub engine_threads: Option<usize>,

    /// Instruction set of our CPU kernels: auto (the best this CPU has), or a lower one
    /// to compare against (portable, avx2, avx512-vnni-256, avx512-vnni, amx).
    #[arg(long, env = "ENGINE_ISA", default_value = "auto", global = true)]
    pub engine_isa: String,

    /// Requests that may wait for a free engine slot (they are told their position); one
    /// more gets 503. A cap against abuse, not the normal path.
    #[arg(long, env = "ENGINE_QUEUE", default_value_t = 64, global = true)]
    pub engine_queue: usize,

    /// Sequences one loaded model serves at once, batched into each step.
    #[arg(long, env = "ENGINE_PARALLEL", default_value_t = 4, global = true)]
    pub engine_parallel: usize,

    /// Storage of the KV cache: `f16` (half the memory) or `f32` (exact).
    #[arg(long, env = "KV_CACHE_TYPE", default_value = "f16", global = true)]
    pub kv_cache_type: String,

    /// Where local models run: `auto` (the first GPU when this binary has CUDA and one is
    /// visible, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "DEVICE", default_value = "auto", global = true)]
    pub device: String,

    /// GPU memory for loaded models (weights and KV bound), e.g. `20GiB`; least recently
    /// used is evicted. Default: what the GPU has free at start, less 2 GiB.
    #[arg(long, env = "GPU_MEMORY_BUDGET", global = true)]
    pub gpu_memory_budget: Option<String>,

    /// How a GPU runs decode steps: `fused-own` (our fused kernels, about ten launches per
    /// layer, with our own Q4_K/Q6_K/Q8_0 matrix kernels and a one-pass RMSNorm), `fused`
    /// (the same around candle's matrix kernels and the two-pass RMSNorm), `fused-own-pdl`
    /// (`fused-own` with our matrix kernels starting while the kernel before them finishes;
    /// not yet measured) or `ops` (candle's ops, about thirty per layer; to compare, or to
    /// step around a problem).
    #[arg(long, env = "GPU_DECODE", default_value = "fused-own", global = true)]
    pub gpu_decode: String,

    /// Conversations whose KV state the engine keeps for reuse.
    #[arg(long, env = "KV_CACHE_SEQUENCES", default_value_t = 8, global = true)]
    pub kv_cache_sequences: usize,

    /// Memory for KV state per loaded model (running and kept), e.g. `4GiB`; counts in
    /// `MODEL_MEMORY_BUDGET`.
    #[arg(long, env = "KV_CACHE_MEMORY", default_value = "4GiB", global = true)]
    pub kv_cache_memory: String,

    /// Most tokens the model writes in one call: a reply's text, or one round of tool calls
    /// (an answer that uses tools makes up to AGENT_MAX_STEPS + 1 calls).
    #[arg(long, env = "REPLY_MAX_TOKENS", default_value_t = 1024, global = true)]
    pub reply_max_tokens: u32,

    // --- Model tiers and router -----------------------------------------------------------
    /// Local tier `fast`: a model name (`qwen3:4b`), a `.gguf` path, `zai:<model>`, or
    /// `openai:<base URL>#<model>` for an OpenAI-compatible server.
    #[arg(long, env = "MODEL_FAST", default_value = "qwen3:4b", global = true)]
    pub model_fast: String,

    /// Local tier `smart`.
    #[arg(long, env = "MODEL_SMART", default_value = "qwen3:8b", global = true)]
    pub model_smart: String,

    /// Local tier `main`, also the fallback for cloud tiers.
    #[arg(long, env = "MODEL_MAIN", default_value = "qwen3:14b", global = true)]
    pub model_main: String,

    /// Cloud tier `code` (thinking disabled).
    #[arg(long, env = "MODEL_CODE", default_value = "zai:glm-4.7", global = true)]
    pub model_code: String,

    /// Cloud tier `reason` (thinking enabled, reasoning never shown).
    #[arg(long, env = "MODEL_REASON", default_value = "zai:glm-4.7", global = true)]
    pub model_reason: String,

    /// Tier used when a request names none.
    #[arg(long, env = "DEFAULT_TIER", default_value = "main", global = true)]
    pub default_tier: String,

    /// Total memory for loaded local models, e.g. `16GiB`; least recently used is evicted.
    #[arg(long, env = "MODEL_MEMORY_BUDGET", global = true)]
    pub model_memory_budget: Option<String>,

    /// Unload an idle local model after this long, e.g. `30m`, `2h`, `0` for never.
    #[arg(long, env = "MODEL_KEEP_ALIVE", default_value = "30m", global = true)]
    pub model_keep_alive: String,

    /// Load the `main` tier's model at start instead of on first use.
    #[arg(long, env = "PRELOAD", default_value_t = false, global = true)]
    pub preload: bool,

    /// Z.ai API key; without it cloud tiers fall back to `main`.
    #[arg(long, env = "ZAI_API_KEY", global = true, hide_env_values = true)]
    pub zai_api_key: Option<Secret>,

    /// Z.ai base URL (general endpoint; the coding plan uses `/api/coding/paas/v4`).
    #[arg(
        long,
        env = "ZAI_BASE_URL",
        default_value = "https://api.z.ai/api/paas/v4",
        global = true
    )]
    pub zai_base_url: String,

    /// Seconds to wait for Z.ai to connect and to send its first byte.
    #[arg(long, env = "ZAI_TIMEOUT_SECS", default_value_t = 20, global = true)]
    pub zai_timeout_secs: u64,

    // --- Remote tiers (OpenAI-compatible servers) -----------------------------------------
    /// API key of tier `fast` when it names `openai:<base URL>#<model>` (optional).
    #[arg(long, env = "MODEL_FAST_API_KEY", global = true, hide_env_values = true)]
    pub model_fast_api_key: Option<Secret>,

    /// API key of a remote `smart` tier (optional).
    #[arg(long, env = "MODEL_SMART_API_KEY", global = true, hide_env_values = true)]
    pub model_smart_api_key: Option<Secret>,

    /// API key of a remote `code` tier (optional).
    #[arg(long, env = "MODEL_CODE_API_KEY", global = true, hide_env_values = true)]
    pub model_code_api_key: Option<Secret>,

    /// API key of a remote `reason` tier (optional).
    #[arg(long, env = "MODEL_REASON_API_KEY", global = true, hide_env_values = true)]
    pub model_reason_api_key: Option<Secret>,

    /// Time a remote server has to accept the connection, e.g. `5s`.
    #[arg(long, env = "REMOTE_CONNECT_TIMEOUT", default_value = "5s", global = true)]
    pub remote_connect_timeout: String,

    /// Time a remote server has to send its first byte (and the longest pause mid-stream)
    /// before the tier falls back to `main`, e.g. `60s`.
    #[arg(long, env = "REMOTE_FIRST_BYTE_TIMEOUT", default_value = "60s", global = true)]
    pub remote_first_byte_timeout: String,

    /// Hugging Face endpoint for model downloads.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co", global = true)]
    pub hf_endpoint: String,

    /// Hugging Face token for model downloads.
    #[arg(long, env = "HF_TOKEN", global = true, hide_env_values = true)]
    pub hf_token: Option<Secret>,

    // --- WhatsApp (Meta Cloud API) --------------------------------------------------------
    /// Token you choose and enter in the Meta app's webhook settings.
    #[arg(long, env = "WHATSAPP_VERIFY_TOKEN", global = true, hide_env_values = true)]
    pub whatsapp_verify_token: Option<Secret>,

    /// App Secret (App Dashboard → App Settings → Basic); signs webhook payloads.
    #[arg(long, env = "WHATSAPP_APP_SECRET", global = true, hide_env_values = true)]
    pub whatsapp_app_secret: Option<Secret>,

    /// Permanent (system user) access token for the Graph API.
    #[arg(long, env = "WHATSAPP_ACCESS_TOKEN", global = true, hide_env_values = true)]
    pub whatsapp_access_token: Option<Secret>,

    /// Sending phone number id.
    #[arg(long, env = "WHATSAPP_PHONE_NUMBER_ID", global = true)]
    pub whatsapp_phone_number_id: Option<String>,

    /// Graph API base including its version.
    #[arg(
        long,
        env = "WHATSAPP_API_BASE",
        default_value = "https://graph.facebook.com/v26.0",
        global = true
    )]
    pub whatsapp_api_base: String,

    /// Comma-separated phone numbers allowed to talk to the assistant.
    #[arg(long, env = "WHATSAPP_ALLOWED_NUMBERS", global = true)]
    pub whatsapp_allowed_numbers: Option<String>,

    /// Approved template sent by cron jobs outside the 24-hour window.
    #[arg(long, env = "WHATSAPP_TEMPLATE_NAME", global = true)]
    pub whatsapp_template_name: Option<String>,

    // --- Nextcloud Talk -------------------------------------------------------------------
    /// Nextcloud base URL, e.g. `https://cloud.example.org`.
    #[arg(long, env = "NEXTCLOUD_URL", global = true)]
    pub nextcloud_url: Option<String>,

    /// Bot secret given to `occ talk:bot:install` (40-128 characters).
    #[arg(long, env = "NEXTCLOUD_BOT_SECRET", global = true, hide_env_values = true)]
    pub nextcloud_bot_secret: Option<Secret>,

    /// Comma-separated actor ids (`users/alice`) allowed to talk to the assistant.
    #[arg(long, env = "NEXTCLOUD_ALLOWED_USERS", global = true)]
    pub nextcloud_allowed_users: Option<String>,

    // --- Cron -----------------------------------------------------------------------------
    /// Secret for the `X-Cron-Secret` header of `/api/cron` (16+ visible ASCII characters, no
    /// spaces); the endpoint is off when unset.
    #[arg(long, env = "CRON_SECRET", global = true, hide_env_values = true)]
    pub cron_secret: Option<Secret>,

    /// Default time zone of cron jobs (IANA name). Deprecated: set TIMEZONE, which cron
    /// follows when this is unset.
    #[arg(long, env = "CRON_TIMEZONE", global = true)]
    pub cron_timezone: Option<String>,

    /// How late a one-shot job (a reminder, a job for one date) may still run when its time
    /// went by while my-claw was stopped (`30m`, `24h`; `0`: never late). Later ones are
    /// disabled with the reason, shown in Schedules.
    #[arg(long, env = "CRON_LATE_LIMIT", default_value = "24h", global = true)]
    pub cron_late_limit: String,

    // --- Agent (issue 15) -----------------------------------------------------------------
    /// Tools the assistant may call: `all`, `none`, or a comma-separated list of tool names
    /// (`current_time,reminders_create`).
    #[arg(long, env = "TOOLS", default_value = "all", global = true)]
    pub tools: String,

    /// Most rounds of tool calls in one answer, after which the model answers in text (1-20).
    #[arg(long, env = "AGENT_MAX_STEPS", default_value_t = 5, global = true)]
    pub agent_max_steps: usize,
    // --- Time zone (issue 15) ---------------------------------------------------------------
    /// The user's time zone (IANA name, e.g. Europe/Paris): the `current_time` tool,
    /// reminders, and cron jobs without a zone. The system's when unset (`TZ`, else
    /// /etc/timezone, else the /etc/localtime link, else UTC).
    #[arg(long, env = "TIMEZONE", global = true)]
    pub timezone: Option<String>,
}

/// A configuration problem, phrased so that a person can act on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The validated configuration handed to `app.rs`, split per component.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub models_dir: PathBuf,
    pub webchat_token: Option<Secret>,
    pub history_messages: usize,
    pub max_body_bytes: usize,
    /// See `Config::request_header_timeout`: also the idle limit of a connection.
    pub request_header_timeout: Duration,
    pub request_body_timeout: Duration,
    pub log: Option<String>,
    pub engine: EngineSettings,
    pub router: RouterSettings,
    pub whatsapp: Option<WhatsAppSettings>,
    pub nextcloud: Option<NextcloudSettings>,
    pub cron: CronSettings,
    pub agent: AgentSettings,
    /// `TIMEZONE`; `None` means the system's (`cron::schedule::system_timezone`).
    pub timezone: Option<chrono_tz::Tz>,
}

/// The agent loop's settings (issue 15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    pub tools: ToolSelection,
    pub max_steps: usize,
}

/// Which tools are enabled (`TOOLS`). Names are checked against the registry in `app.rs`,
/// the one place that knows which tools exist (`ToolSelection::check_known`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolSelection {
    All,
    None,
    /// These names, deduplicated, in the order given.
    Only(Vec<String>),
}

impl ToolSelection {
    /// Parses `TOOLS`: `all`, `none` (any case), or a comma list of tool names
    /// (`[a-z0-9_]`, at most 64 characters each).
    pub fn parse(value: &str) -> Result<ToolSelection, ConfigError> {
        let trimmed = value.trim();
        if trimmed.eq_ignore_ascii_case("all") {
            return Ok(ToolSelection::All);
        }
        if trimmed.eq_ignore_ascii_case("none") || trimmed.is_empty() {
            return Ok(ToolSelection::None);
        }
        let mut names: Vec<String> = Vec::new();
        for name in trimmed.split(',').map(str::trim) {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                return Err(bad(format!(
                    "TOOLS={value}: `{name}` is not a tool name (use all, none, or names such \
                     as current_time,reminders_create separated by commas)"
                )));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        Ok(ToolSelection::Only(names))
    }

    /// Whether the tool `name` is enabled.
    pub fn enables(&self, name: &str) -> bool {
        match self {
            ToolSelection::All => true,
            ToolSelection::None => false,
            ToolSelection::Only(names) => names.iter().any(|n| n == name),
        }
    }

    /// An error naming every listed tool that is not in `known`, with the known ones.
    pub fn check_known(&self, known: &[&str]) -> Result<(), ConfigError> {
        let ToolSelection::Only(names) = self else {
            return Ok(());
        };
        let unknown: Vec<&str> =
            names.iter().map(String::as_str).filter(|n| !known.contains(n)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
        Err(bad(format!(
            "TOOLS={}: unknown tool(s) {}; the known tools are: {known}",
            names.join(","),
            unknown.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        )))
    }
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub context_size: usize,
    /// `None`: one per core.
    pub threads: Option<usize>,
    /// `None`: the best instruction set the CPU has (`ENGINE_ISA`).
    pub isa: Option<crate::llm::engine::kernels::Isa>,
    pub queue_capacity: usize,
    /// Sequences batched together per loaded model.
    pub parallel: usize,
    pub kv_cache_sequences: usize,
    pub kv_cache_max_bytes: u64,
    pub kv_type: crate::llm::engine::model::KvType,
    /// How GPU decode steps run (`GPU_DECODE`).
    pub gpu_decode: crate::llm::engine::candle_model::GpuDecode,
    pub reply_max_tokens: u32,
    /// Where local models run (`DEVICE`), opened at start.
    pub device: ComputeDevice,
}

impl EngineSettings {
    /// The engine configuration for one model file under these settings.
    pub fn engine_config(&self, model_path: PathBuf) -> crate::llm::engine::EngineConfig {
        crate::llm::engine::EngineConfig {
            model_path,
            n_ctx: self.context_size,
            queue_capacity: self.queue_capacity,
            parallel: self.parallel,
            kv_cache_sequences: self.kv_cache_sequences,
            kv_cache_max_bytes: self.kv_cache_max_bytes,
            kv_type: self.kv_type,
            device: self.device.clone(),
        }
    }
}

/// GPU memory left out of the default budget: the CUDA context, cuBLAS's workspace, the
/// activations of a forward pass, and each loaded model's fused decode buffers and CUDA
/// graphs (the Qwen3-8B shape's bench peaked 36 MB higher with them than without, on an
/// H200).
pub const GPU_MEMORY_MARGIN: u64 = 2 << 30;

/// One tier's model, checked: the value as written (shown in status and messages) and what
/// it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierModel {
    pub configured: String,
    pub spec: ModelSpec,
}

impl TierModel {
    /// Parses the value of `tier`'s variable (`MODEL_FAST=…`). A `.gguf` path must name an
    /// existing file; `main` must be local, since it answers when the cloud cannot. The
    /// error is one line that names the variable.
    pub fn parse(tier: Tier, value: &str) -> Result<TierModel, ConfigError> {
        let var = tier.env_var();
        let spec = ModelSpec::parse(value).map_err(|e| bad(format!("{var}={value}: {e}")))?;
        match &spec {
            ModelSpec::Zai(_) | ModelSpec::Remote(_) if tier == Tier::Main => {
                return Err(bad(format!(
                    "{var}={value}: main must be a local model, it is the fallback when Z.ai \
                     or a remote server cannot answer"
                )));
            }
            ModelSpec::File(path) if !path.is_file() => {
                return Err(bad(format!("{var}={value}: no such model file")));
            }
            _ => {}
        }
        Ok(TierModel { configured: value.trim().to_string(), spec })
    }
}

#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub model_fast: TierModel,
    pub model_smart: TierModel,
    pub model_main: TierModel,
    pub model_code: TierModel,
    pub model_reason: TierModel,
    pub default_tier: Tier,
    pub memory_budget_bytes: Option<u64>,
    /// `None` means never unload.
    pub keep_alive: Option<Duration>,
    pub preload: bool,
    pub zai_api_key: Option<Secret>,
    pub zai_base_url: String,
    pub zai_timeout: Duration,
    pub hf_endpoint: String,
    pub hf_token: Option<Secret>,
    pub models_dir: PathBuf,
    /// Keys and timeouts of tiers served by OpenAI-compatible servers.
    pub remote: RemoteSettings,
}

/// What tiers naming `openai:<base URL>#<model>` need besides their value.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteSettings {
    /// `MODEL_<TIER>_API_KEY`, per tier; a tier without one sends no `Authorization`.
    pub api_keys: Vec<(Tier, Secret)>,
    /// `REMOTE_CONNECT_TIMEOUT`.
    pub connect_timeout: Duration,
    /// `REMOTE_FIRST_BYTE_TIMEOUT`: the headers and first event, and each later pause.
    pub first_byte_timeout: Duration,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        RemoteSettings {
            api_keys: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
        }
    }
}

impl RemoteSettings {
    /// The API key of `tier`, if one is set.
    pub fn api_key(&self, tier: Tier) -> Option<&Secret> {
        self.api_keys.iter().find(|(t, _)| *t == tier).map(|(_, key)| key)
    }
}

impl RouterSettings {
    /// The model configured for `tier`.
    pub fn tier_model(&self, tier: Tier) -> &TierModel {
        match tier {
            Tier::Fast => &self.model_fast,
            Tier::Smart => &self.model_smart,
            Tier::Main => &self.model_main,
            Tier::Code => &self.model_code,
            Tier::Reason => &self.model_reason,
        }
    }
}

#[derive(Debug, Clone)]
pub struct WhatsAppSettings {
    pub verify_token: Secret,
    pub app_secret: Secret,
    pub access_token: Secret,
    pub phone_number_id: String,
    pub api_base: String,
    pub allowed_numbers: Vec<String>,
    pub template_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NextcloudSettings {
    pub url: String,
    pub bot_secret: Secret,
    pub allowed_users: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct CronSettings {
    pub secret: Option<Secret>,
    pub timezone: Option<String>,
    /// How a job's message is offered again to a channel that fails in a way that may heal.
    pub delivery: DeliveryPatience,
    /// How late a missed one-shot may still run (`CRON_LATE_LIMIT`); zero: never late.
    pub late_limit: Duration,
}

/// A job's message meets a channel outage (a 5xx, a rate limit, the network): after the
/// client's own quick retries it is offered again, `first_wait` then doubling up to
/// `max_wait`, until `give_up_after` has gone by since the first try. A short outage of
/// Meta or Nextcloud must not cost a reminder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryPatience {
    pub first_wait: Duration,
    pub max_wait: Duration,
    pub give_up_after: Duration,
}

impl Default for DeliveryPatience {
    fn default() -> Self {
        Self {
            first_wait: Duration::from_secs(10),
            max_wait: Duration::from_secs(120),
            give_up_after: Duration::from_secs(15 * 60),
        }
    }
}

impl Config {
    /// Checks every setting once and turns the raw strings into typed settings. Touches
    /// no file: the commands that write under the data directory make it ready themselves
    /// (`ensure_writable_dir`), so `backup` or `sign-in-link` never create one.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let bind = parse_bind(&self.bind)?;
        let database_url = match &self.database_url {
            Some(url) => {
                validate_database_url(url)?;
                url.clone()
            }
            None => format!("sqlite://{}", self.data_dir.join("my-claw.db").display()),
        };
        if self.history_messages == 0 || self.history_messages > 1000 {
            return Err(bad(format!(
                "HISTORY_MESSAGES={}: must be between 1 and 1000",
                self.history_messages
            )));
        }
        if self.max_body_bytes < 1024 {
            return Err(bad(format!(
                "MAX_BODY_BYTES={}: must be at least 1024",
                self.max_body_bytes
            )));
        }
        // The persona and the tool definitions alone take about 750 Qwen3 tokens: below this
        // every conversation would be refused as over the context.
        if self.context_size < MIN_CONTEXT_SIZE {
            return Err(bad(format!(
                "CONTEXT_SIZE={}: must be at least {MIN_CONTEXT_SIZE} (the system prompt and tool \
                 definitions alone take about 750 tokens, and the answer needs room)",
                self.context_size
            )));
        }
        if let Some(threads) = self.engine_threads {
            if threads == 0 || threads > 1024 {
                return Err(bad(format!("ENGINE_THREADS={threads}: must be between 1 and 1024")));
            }
        }
        let isa = crate::llm::engine::kernels::Isa::from_setting(&self.engine_isa).map_err(bad)?;
        let Some(gpu_decode) =
            crate::llm::engine::candle_model::GpuDecode::from_setting(&self.gpu_decode)
        else {
            let value = &self.gpu_decode;
            return Err(bad(format!(
                "GPU_DECODE={value}: must be fused, fused-own, fused-own-pdl or ops"
            )));
        };
        if self.engine_queue == 0 {
            return Err(bad("ENGINE_QUEUE=0: must be at least 1"));
        }
        let max_parallel = crate::llm::engine::kernels::attention::MAX_BATCH_SEQS;
        if self.engine_parallel == 0 || self.engine_parallel > max_parallel {
            return Err(bad(format!(
                "ENGINE_PARALLEL={}: must be between 1 and {max_parallel}",
                self.engine_parallel
            )));
        }
        let Some(kv_type) = crate::llm::engine::model::KvType::from_setting(&self.kv_cache_type)
        else {
            return Err(bad(format!("KV_CACHE_TYPE={}: must be f16 or f32", self.kv_cache_type)));
        };
        let webchat_token = match &self.webchat_token {
            Some(token) => Some(header_secret("WEBCHAT_TOKEN", token)?),
            None => None,
        };
        let cron_secret = match &self.cron_secret {
            Some(secret) => Some(header_secret("CRON_SECRET", secret)?),
            None => None,
        };
        let kv_cache_max_bytes = parse_size(&self.kv_cache_memory)
            .map_err(|e| bad(format!("KV_CACHE_MEMORY={}: {e}", self.kv_cache_memory)))?;
        let mut memory_budget_bytes = match &self.model_memory_budget {
            Some(s) => {
                Some(parse_size(s).map_err(|e| bad(format!("MODEL_MEMORY_BUDGET={s}: {e}")))?)
            }
            None => None,
        };
        let Some(device_setting) = DeviceSetting::parse(&self.device) else {
            return Err(bad(format!(
                "DEVICE={}: unknown device (use auto, cpu, cuda or cuda:N)",
                self.device
            )));
        };
        let gpu_budget = match &self.gpu_memory_budget {
            Some(s) => Some(parse_size(s).map_err(|e| bad(format!("GPU_MEMORY_BUDGET={s}: {e}")))?),
            None => None,
        };
        // Opened here, once: a GPU that was asked for and cannot be had stops the start
        // with one line (exit code 2), like any other bad setting.
        let device = ComputeDevice::open(device_setting).map_err(|e| bad(e.to_string()))?;
        if device.is_gpu() {
            // On a GPU the weights and KV state live in its memory: that is what the
            // models' budget bounds (and evicts least recently used against).
            let free = device.info().memory_free_bytes.unwrap_or(0);
            memory_budget_bytes =
                Some(gpu_budget.unwrap_or_else(|| free.saturating_sub(GPU_MEMORY_MARGIN)));
        }
        let request_header_timeout =
            parse_timeout("REQUEST_HEADER_TIMEOUT", &self.request_header_timeout)?;
        let request_body_timeout =
            parse_timeout("REQUEST_BODY_TIMEOUT", &self.request_body_timeout)?;
        if let Some(filter) = &self.log {
            // `EnvFilter::new` would drop a bad directive silently and log less than asked.
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
                return Err(bad(format!("LOG={filter}: invalid filter ({e})")));
            }
        }
        if self.zai_timeout_secs == 0 {
            return Err(bad("ZAI_TIMEOUT_SECS=0: must be at least 1"));
        }
        if self.reply_max_tokens == 0 {
            return Err(bad("REPLY_MAX_TOKENS=0: must be at least 1"));
        }
        let late_limit = parse_duration(&self.cron_late_limit)
            .map_err(|e| bad(format!("CRON_LATE_LIMIT={}: {e}", self.cron_late_limit)))?
            .unwrap_or(Duration::ZERO);
        let keep_alive = parse_duration(&self.model_keep_alive)
            .map_err(|e| bad(format!("MODEL_KEEP_ALIVE={}: {e}", self.model_keep_alive)))?;
        for (name, value) in
            [("ZAI_BASE_URL", &self.zai_base_url), ("HF_ENDPOINT", &self.hf_endpoint)]
        {
            validate_http_url(value).map_err(|e| bad(format!("{name}={value}: {e}")))?;
        }
        if let Some(tz) = &self.cron_timezone {
            if tz.parse::<chrono_tz::Tz>().is_err() {
                return Err(bad(format!(
                    "CRON_TIMEZONE={tz}: unknown time zone (use an IANA name such as Europe/Paris)"
                )));
            }
        }
        let timezone = match self.timezone.as_deref().map(str::trim).filter(|tz| !tz.is_empty()) {
            Some(tz) => Some(tz.parse::<chrono_tz::Tz>().map_err(|_| {
                bad(format!(
                    "TIMEZONE={tz}: unknown time zone (use an IANA name such as Europe/Paris or \
                     UTC)"
                ))
            })?),
            None => None,
        };

        let default_tier = Tier::from_name(&self.default_tier).ok_or_else(|| {
            bad(format!(
                "DEFAULT_TIER={}: unknown tier (use fast, smart, main, code or reason)",
                self.default_tier
            ))
        })?;
        let model_fast = TierModel::parse(Tier::Fast, &self.model_fast)?;
        let model_smart = TierModel::parse(Tier::Smart, &self.model_smart)?;
        let model_main = TierModel::parse(Tier::Main, &self.model_main)?;
        let model_code = TierModel::parse(Tier::Code, &self.model_code)?;
        let model_reason = TierModel::parse(Tier::Reason, &self.model_reason)?;
        let remote = self.remote_settings(&[
            (Tier::Fast, &model_fast),
            (Tier::Smart, &model_smart),
            (Tier::Code, &model_code),
            (Tier::Reason, &model_reason),
        ])?;

        let tools = ToolSelection::parse(&self.tools)?;
        if self.agent_max_steps == 0 || self.agent_max_steps > 20 {
            return Err(bad(format!(
                "AGENT_MAX_STEPS={}: must be between 1 and 20",
                self.agent_max_steps
            )));
        }
        let agent = AgentSettings { tools, max_steps: self.agent_max_steps };

        let whatsapp = self.whatsapp_settings()?;
        let nextcloud = self.nextcloud_settings()?;
        Ok(Settings {
            bind,
            database_url,
            webchat_token,
            history_messages: self.history_messages,
            max_body_bytes: self.max_body_bytes,
            request_header_timeout,
            request_body_timeout,
            log: self.log,
            engine: EngineSettings {
                context_size: self.context_size,
                threads: self.engine_threads,
                isa,
                queue_capacity: self.engine_queue,
                parallel: self.engine_parallel,
                kv_cache_sequences: self.kv_cache_sequences,
                kv_cache_max_bytes,
                kv_type,
                gpu_decode,
                reply_max_tokens: self.reply_max_tokens,
                device,
            },
            router: RouterSettings {
                model_fast,
                model_smart,
                model_main,
                model_code,
                model_reason,
                default_tier,
                memory_budget_bytes,
                keep_alive,
                preload: self.preload,
                zai_api_key: self.zai_api_key.filter(|k| !k.expose().is_empty()),
                zai_base_url: self.zai_base_url.trim_end_matches('/').to_string(),
                zai_timeout: Duration::from_secs(self.zai_timeout_secs),
                hf_endpoint: self.hf_endpoint.trim_end_matches('/').to_string(),
                hf_token: self.hf_token,
                models_dir: self.models_dir.clone(),
                remote,
            },
            whatsapp,
            nextcloud,
            agent,
            // Cron follows TIMEZONE unless the older CRON_TIMEZONE overrides it.
            cron: CronSettings {
                secret: cron_secret,
                timezone: self.cron_timezone.or(timezone.map(|tz| tz.name().to_string())),
                delivery: DeliveryPatience::default(),
                late_limit,
            },
            timezone,
            data_dir: self.data_dir,
            models_dir: self.models_dir,
        })
    }

    /// The remote tiers' keys and timeouts. A key for a tier that is not remote is a
    /// mistake worth stopping for: it would otherwise be ignored without a word.
    fn remote_settings(&self, tiers: &[(Tier, &TierModel)]) -> Result<RemoteSettings, ConfigError> {
        let connect_timeout =
            parse_timeout("REMOTE_CONNECT_TIMEOUT", &self.remote_connect_timeout)?;
        let first_byte_timeout =
            parse_timeout("REMOTE_FIRST_BYTE_TIMEOUT", &self.remote_first_byte_timeout)?;
        let keys = [
            (Tier::Fast, &self.model_fast_api_key),
            (Tier::Smart, &self.model_smart_api_key),
            (Tier::Code, &self.model_code_api_key),
            (Tier::Reason, &self.model_reason_api_key),
        ];
        let mut api_keys = Vec::new();
        for (tier, key) in keys {
            let Some(key) = key.as_ref().filter(|k| !k.expose().is_empty()) else {
                continue;
            };
            let is_remote = tiers
                .iter()
                .any(|(t, model)| *t == tier && matches!(model.spec, ModelSpec::Remote(_)));
            if !is_remote {
                return Err(bad(format!(
                    "{}_API_KEY is set but {} does not name a remote server \
                     (openai:<base URL>#<model>)",
                    tier.env_var(),
                    tier.env_var()
                )));
            }
            api_keys.push((tier, key.clone()));
        }
        Ok(RemoteSettings { api_keys, connect_timeout, first_byte_timeout })
    }

    fn whatsapp_settings(&self) -> Result<Option<WhatsAppSettings>, ConfigError> {
        let any_set = self.whatsapp_verify_token.is_some()
            || self.whatsapp_app_secret.is_some()
            || self.whatsapp_access_token.is_some()
            || self.whatsapp_phone_number_id.is_some();
        if !any_set {
            return Ok(None);
        }
        let missing: Vec<&str> = [
            ("WHATSAPP_VERIFY_TOKEN", self.whatsapp_verify_token.is_none()),
            ("WHATSAPP_APP_SECRET", self.whatsapp_app_secret.is_none()),
            ("WHATSAPP_ACCESS_TOKEN", self.whatsapp_access_token.is_none()),
            ("WHATSAPP_PHONE_NUMBER_ID", self.whatsapp_phone_number_id.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, is_missing)| is_missing.then_some(name))
        .collect();
        if !missing.is_empty() {
            return Err(bad(format!(
                "WhatsApp is partly configured: also set {}",
                missing.join(", ")
            )));
        }
        validate_http_url(&self.whatsapp_api_base)
            .map_err(|e| bad(format!("WHATSAPP_API_BASE={}: {e}", self.whatsapp_api_base)))?;
        let allowed_numbers: Vec<String> = split_list(self.whatsapp_allowed_numbers.as_deref())
            .into_iter()
            .map(|n| n.trim_start_matches('+').to_string())
            .collect();
        // Meta sends numbers as bare digits (E.164 without `+`): anything else would never
        // match, and the person would be refused without a clue.
        if let Some(wrong) = allowed_numbers
            .iter()
            .find(|n| !(6..=15).contains(&n.len()) || !n.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(bad(format!(
                "WHATSAPP_ALLOWED_NUMBERS: `{wrong}` is not a phone number (international \
                 format, digits only, e.g. 33612345678)"
            )));
        }
        // No country code starts with 0: a leading 0 is a dialling prefix (00, or a national
        // trunk 0) that Meta never sends, so such an entry could never match.
        if let Some(wrong) = allowed_numbers.iter().find(|n| n.starts_with('0')) {
            return Err(bad(format!(
                "WHATSAPP_ALLOWED_NUMBERS: `{wrong}` starts with 0, which no international \
                 number does; write the country code without the 00 or national 0 prefix, \
                 e.g. 33612345678"
            )));
        }
        Ok(Some(WhatsAppSettings {
            verify_token: self.whatsapp_verify_token.clone().expect("checked above"),
            app_secret: self.whatsapp_app_secret.clone().expect("checked above"),
            access_token: self.whatsapp_access_token.clone().expect("checked above"),
            phone_number_id: self.whatsapp_phone_number_id.clone().expect("checked above"),
            api_base: self.whatsapp_api_base.trim_end_matches('/').to_string(),
            allowed_numbers,
            template_name: self.whatsapp_template_name.clone(),
        }))
    }

    fn nextcloud_settings(&self) -> Result<Option<NextcloudSettings>, ConfigError> {
        match (&self.nextcloud_url, &self.nextcloud_bot_secret) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(bad("NEXTCLOUD_URL is set: also set NEXTCLOUD_BOT_SECRET")),
            (None, Some(_)) => Err(bad("NEXTCLOUD_BOT_SECRET is set: also set NEXTCLOUD_URL")),
            (Some(url), Some(secret)) => {
                validate_http_url(url).map_err(|e| bad(format!("NEXTCLOUD_URL={url}: {e}")))?;
                let len = secret.expose().len();
                if !(40..=128).contains(&len) {
                    return Err(bad(format!(
                        "NEXTCLOUD_BOT_SECRET: must be 40 to 128 characters (Nextcloud's rule), got {len}"
                    )));
                }
                let allowed = split_list(self.nextcloud_allowed_users.as_deref());
                // Talk sends actor ids as `<type>/<id>` (`users/alice`); a bare user name
                // could never match, and that user would be ignored without a clue.
                if let Some(wrong) = allowed.iter().find(|u| !is_talk_actor_id(u)) {
                    return Err(bad(format!(
                        "NEXTCLOUD_ALLOWED_USERS: `{wrong}` is not a Talk actor id; write the \
                         actor type, a slash and the id, e.g. users/{}",
                        wrong.rsplit('/').next().filter(|id| !id.is_empty()).unwrap_or("alice")
                    )));
                }
                Ok(Some(NextcloudSettings {
                    url: url.trim_end_matches('/').to_string(),
                    bot_secret: secret.clone(),
                    allowed_users: (!allowed.is_empty()).then_some(allowed),
                }))
            }
        }
    }
}

/// Shortest bearer token or shared secret accepted (`WEBCHAT_TOKEN`, `CRON_SECRET`): both
/// guard endpoints that may be reachable from outside, so both get the same floor.
pub const MIN_SECRET_CHARS: usize = 16;

/// A secret that clients send in an HTTP header (`Authorization: Bearer`, `X-Cron-Secret`),
/// trimmed as it will be compared: the server trims what a client sends (HTTP drops the
/// spaces around a header value), so untrimmed spaces in the setting could never match and
/// spaces would count towards the minimum length. Inside, only visible ASCII is allowed:
/// a header cannot carry control characters, and the server reads only ASCII header values.
fn header_secret(name: &str, secret: &Secret) -> Result<Secret, ConfigError> {
    let value = secret.expose().trim();
    // The value itself is never shown: the message names the variable and the rule.
    if let Some(c) = value.chars().find(|c| !c.is_ascii_graphic()) {
        let what = if c.is_whitespace() { "a space" } else { "a control or non-ASCII character" };
        return Err(bad(format!(
            "{name}: contains {what}; use only visible ASCII characters (it is sent in an HTTP \
             header)"
        )));
    }
    if value.len() < MIN_SECRET_CHARS {
        return Err(bad(format!(
            "{name}: must be at least {MIN_SECRET_CHARS} characters, not counting spaces \
             around it"
        )));
    }
    Ok(Secret::new(value))
}

/// Whether `value` has the shape of a Talk actor id: a lowercase type (`users`, `guests`,
/// `emails`, `federated_users`, …), a slash and a non-empty id.
fn is_talk_actor_id(value: &str) -> bool {
    value.split_once('/').is_some_and(|(kind, id)| {
        !kind.is_empty()
            && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            && !id.trim().is_empty()
    })
}

fn split_list(value: Option<&str>) -> Vec<String> {
    value
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses `BIND`, resolving host names such as `localhost`.
pub fn parse_bind(value: &str) -> Result<SocketAddr, ConfigError> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(bad(format!("BIND={value}: expected host:port, e.g. 127.0.0.1:3000")));
    };
    if port.parse::<u16>().is_err() {
        return Err(bad(format!("BIND={value}: invalid port")));
    }
    if host.is_empty() {
        return Err(bad(format!("BIND={value}: missing host, e.g. 127.0.0.1:{port}")));
    }
    match value.to_socket_addrs() {
        Ok(mut addrs) => {
            addrs.next().ok_or_else(|| bad(format!("BIND={value}: host resolves to no address")))
        }
        Err(e) => Err(bad(format!("BIND={value}: cannot resolve host ({e})"))),
    }
}

/// Creates the data directory when missing and checks that it is writable.
pub fn ensure_writable_dir(dir: &Path) -> Result<(), ConfigError> {
    // Created private (700) from the start: it holds the database and the WebChat token.
    // `app.rs` narrows a directory that already existed.
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| bad(format!("DATA_DIR={}: cannot create directory ({e})", dir.display())))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok")
        .map_err(|e| bad(format!("DATA_DIR={}: directory is not writable ({e})", dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn validate_database_url(url: &str) -> Result<(), ConfigError> {
    let rest =
        url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).ok_or_else(|| {
            bad(format!("DATABASE_URL={url}: must start with sqlite:// (only SQLite is supported)"))
        })?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        return Err(bad(format!("DATABASE_URL={url}: missing database file path")));
    }
    Ok(())
}

fn validate_http_url(value: &str) -> Result<(), String> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("missing host".into());
    }
    Ok(())
}

/// A connection timeout: a duration (`20s`, `1m`) of at most an hour; `0` is refused, since
/// a listener without limits is what these settings exist to prevent.
fn parse_timeout(name: &str, value: &str) -> Result<Duration, ConfigError> {
    match parse_duration(value) {
        Ok(Some(duration)) if duration <= Duration::from_secs(3600) => Ok(duration),
        Ok(Some(_)) => Err(bad(format!("{name}={value}: must be at most 1h"))),
        Ok(None) => Err(bad(format!(
            "{name}={value}: must be more than 0, a duration such as 20s (a connection without \
             this limit is what it prevents)"
        ))),
        Err(e) => Err(bad(format!("{name}={value}: {e}"))),
    }
}

/// Parses a size such as `4GiB`, `512MB`, `1.5G` or a plain number of bytes.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 =
        number.parse().map_err(|_| "expected a size such as 4GiB or 512MB".to_string())?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown unit `{other}` (use B, MB, MiB, GB, GiB…)")),
    };
    Ok((number * multiplier) as u64)
}

/// Parses a duration such as `30m`, `2h`, `45s`, `1h30m`; `0` means none.
pub fn parse_duration(value: &str) -> Result<Option<Duration>, String> {
    let value = value.trim();
    if value == "0" {
        return Ok(None);
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in value.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 =
            number.parse().map_err(|_| "expected a duration such as 30m or 2h".to_string())?;
        number.clear();
        total += match c {
            's' => n,
            'm' => n * 60,
            'h' => n * 3600,
            'd' => n * 86400,
            other => return Err(format!("unknown unit `{other}` (use s, m, h, d)")),
        };
    }
    if !number.is_empty() {
        // A bare number is seconds.
        total += number.parse::<u64>().map_err(|e| e.to_string())?;
    }
    // `0s` is `0`, however it is spelled (the two were once refused and accepted).
    if total == 0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_masked() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn tool_selection_parses_and_names_unknown_tools() {
        assert_eq!(ToolSelection::parse("all").unwrap(), ToolSelection::All);
        assert_eq!(ToolSelection::parse(" NONE ").unwrap(), ToolSelection::None);
        let only = ToolSelection::parse("current_time, reminders_list,current_time").unwrap();
        assert_eq!(only, ToolSelection::Only(vec!["current_time".into(), "reminders_list".into()]));
        assert!(only.enables("current_time") && !only.enables("reminders_create"));
        assert!(ToolSelection::All.enables("x") && !ToolSelection::None.enables("x"));
        let err = ToolSelection::parse("current_time,Reminders.Create").unwrap_err().to_string();
        assert!(
            err.starts_with("TOOLS=current_time,Reminders.Create: `Reminders.Create`"),
            "{err}"
        );
        assert!(ToolSelection::parse("a,,b").is_err());

        let known = ["current_time", "reminders_create"];
        assert!(only.check_known(&["current_time", "reminders_list"]).is_ok());
        let err = only.check_known(&known).unwrap_err().to_string();
        assert_eq!(
            err,
            "TOOLS=current_time,reminders_list: unknown tool(s) `reminders_list`; the known \
             tools are: current_time, reminders_create"
        );
        assert!(ToolSelection::All.check_known(&[]).is_ok());
    }

    #[test]
    fn bind_errors_say_what_is_wrong() {
        let check = |input: &str, expected: &str| {
            let err = parse_bind(input).unwrap_err().to_string();
            assert_eq!(err, expected, "input {input}");
        };
        check("localhost:99999", "BIND=localhost:99999: invalid port");
        check("127.0.0.1", "BIND=127.0.0.1: expected host:port, e.g. 127.0.0.1:3000");
        check(":3000", "BIND=:3000: missing host, e.g. 127.0.0.1:3000");
        assert_eq!(parse_bind("127.0.0.1:3000").unwrap().port(), 3000);
        assert!(parse_bind("localhost:3000").unwrap().ip().is_loopback());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 * 1024 * 1024 * 1024);
        assert_eq!(parse_size("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4 parsecs").is_err());
        assert_eq!(parse_duration("30m").unwrap(), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0").unwrap(), None);
        assert_eq!(parse_duration("0s").unwrap(), None, "0 however spelled");
        assert_eq!(parse_duration("0m0s").unwrap(), None);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn remote_settings_print_no_key() {
        let remote = RemoteSettings {
            api_keys: vec![(Tier::Smart, Secret::new("sk-very-secret-remote"))],
            ..RemoteSettings::default()
        };
        let shown = format!("{remote:?}");
        assert!(!shown.contains("sk-very-secret-remote") && shown.contains("***"), "{shown}");
        assert_eq!(remote.api_key(Tier::Smart).map(Secret::expose), Some("sk-very-secret-remote"));
        assert!(remote.api_key(Tier::Fast).is_none());
        let err = TierModel::parse(Tier::Main, "openai:http://gpu-box:8000/v1#m").unwrap_err();
        assert!(err.to_string().contains("main must be a local model"), "{err}");
    }

    #[test]
    fn header_secrets_are_trimmed_long_and_visible_ascii() {
        let check = |value: &str, expected: Result<&str, &str>| {
            let got = header_secret("CRON_SECRET", &Secret::new(value));
            match (got, expected) {
                (Ok(secret), Ok(want)) => assert_eq!(secret.expose(), want, "{value:?}"),
                (Err(e), Err(want)) => assert_eq!(e.to_string(), want, "{value:?}"),
                (got, _) => panic!("{value:?}: got {got:?}, expected {expected:?}"),
            }
        };
        let too_short =
            "CRON_SECRET: must be at least 16 characters, not counting spaces around it";
        let space = "CRON_SECRET: contains a space; use only visible ASCII characters (it is \
                     sent in an HTTP header)";
        let control = "CRON_SECRET: contains a control or non-ASCII character; use only \
                       visible ASCII characters (it is sent in an HTTP header)";
        check("0123456789abcdef", Ok("0123456789abcdef"));
        check("  0123456789abcdef\n", Ok("0123456789abcdef"));
        check("a", Err(too_short));
        check("", Err(too_short));
        check(&" ".repeat(20), Err(too_short));
        check("  0123456789abcde  ", Err(too_short));
        check("01234567 89abcdef", Err(space));
        check("01234567\t89abcdef", Err(space));
        check("01234567\u{7f}89abcdef", Err(control));
        check("0123456789abcdeé", Err(control));
    }

    /// The whole `validate` with only `envs` set (and a fresh data directory), as the
    /// binary would see them.
    fn validate_with(envs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            config: Config,
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let mut args = vec!["my-claw".to_string(), format!("--data-dir={}", data_dir.display())];
        for (name, value) in envs {
            let flag = name.to_ascii_lowercase().replace('_', "-");
            args.push(format!("--{flag}={value}"));
        }
        Cli::try_parse_from(args).expect("flags parse").config.validate()
    }

    #[test]
    fn webchat_token_and_cron_secret_are_checked_at_start() {
        let err = |envs: &[(&str, &str)]| validate_with(envs).unwrap_err().to_string();
        assert!(err(&[("CRON_SECRET", "a")]).starts_with("CRON_SECRET: must be at least 16"));
        let spaces = " ".repeat(20);
        assert!(err(&[("WEBCHAT_TOKEN", &spaces)]).starts_with("WEBCHAT_TOKEN: must be at least"));
        assert!(err(&[("WEBCHAT_TOKEN", "0123 4567 89ab cdef")])
            .starts_with("WEBCHAT_TOKEN: contains a space"));
        let settings = validate_with(&[
            ("WEBCHAT_TOKEN", " 0123456789abcdef0123 "),
            ("CRON_SECRET", "cron-secret-0123456789"),
        ])
        .expect("valid");
        assert_eq!(
            settings.webchat_token.as_ref().map(Secret::expose),
            Some("0123456789abcdef0123")
        );
        assert_eq!(
            settings.cron.secret.as_ref().map(Secret::expose),
            Some("cron-secret-0123456789")
        );
    }

    #[test]
    fn the_late_limit_of_missed_one_shots_is_a_duration() {
        let limit =
            |value: &str| validate_with(&[("CRON_LATE_LIMIT", value)]).map(|s| s.cron.late_limit);
        assert_eq!(validate_with(&[]).unwrap().cron.late_limit, Duration::from_secs(24 * 3600));
        assert_eq!(limit("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(limit("0").unwrap(), Duration::ZERO, "0: never run late");
        let err = limit("tomorrow").unwrap_err().to_string();
        assert!(err.starts_with("CRON_LATE_LIMIT=tomorrow: "), "{err}");
    }

    #[test]
    fn a_context_too_small_for_the_system_prompt_is_refused_at_start() {
        let err = validate_with(&[("CONTEXT_SIZE", "512")]).unwrap_err().to_string();
        assert!(err.starts_with("CONTEXT_SIZE=512: must be at least 2048"), "{err}");
        assert!(validate_with(&[("CONTEXT_SIZE", "2048")]).is_ok());
    }

    #[test]
    fn allow_lists_that_could_never_match_are_refused_at_start() {
        let whatsapp = |numbers: &str| {
            validate_with(&[
                ("WHATSAPP_VERIFY_TOKEN", "verify"),
                ("WHATSAPP_APP_SECRET", "app-secret"),
                ("WHATSAPP_ACCESS_TOKEN", "access-token"),
                ("WHATSAPP_PHONE_NUMBER_ID", "106540352242922"),
                ("WHATSAPP_ALLOWED_NUMBERS", numbers),
            ])
            .map(|s| s.whatsapp.expect("configured").allowed_numbers)
            .map_err(|e| e.to_string())
        };
        assert_eq!(whatsapp("+33612345678, 16505551234").unwrap(), ["33612345678", "16505551234"]);
        let err = whatsapp("33699999999,0033612345678").unwrap_err();
        assert!(
            err.starts_with("WHATSAPP_ALLOWED_NUMBERS: `0033612345678` starts with 0"),
            "{err}"
        );
        assert!(err.contains("e.g. 33612345678"), "{err}");
        assert!(whatsapp("0612345678").unwrap_err().contains("starts with 0"));
        assert!(whatsapp("+33 6 12 34 56 78").unwrap_err().contains("is not a phone number"));

        let talk = |users: &str| {
            validate_with(&[
                ("NEXTCLOUD_URL", "https://cloud.example.org"),
                ("NEXTCLOUD_BOT_SECRET", &"s".repeat(40)),
                ("NEXTCLOUD_ALLOWED_USERS", users),
            ])
            .map(|s| s.nextcloud.expect("configured").allowed_users)
            .map_err(|e| e.to_string())
        };
        let ok = talk("users/alice, federated_users/bob@cloud.example.org").unwrap();
        assert_eq!(ok.unwrap(), ["users/alice", "federated_users/bob@cloud.example.org"]);
        let err = talk("users/bob,alice").unwrap_err();
        assert_eq!(
            err,
            "NEXTCLOUD_ALLOWED_USERS: `alice` is not a Talk actor id; write the actor type, a \
             slash and the id, e.g. users/alice"
        );
        for wrong in ["users/", "/alice", "Users/alice"] {
            assert!(talk(wrong).unwrap_err().contains("is not a Talk actor id"), "{wrong}");
        }
    }

    #[test]
    fn database_url_must_be_sqlite() {
        assert!(validate_database_url("sqlite://data/x.db").is_ok());
        assert!(validate_database_url("sqlite:x.db?mode=rwc").is_ok());
        let err = validate_database_url("postgres://localhost/x").unwrap_err().to_string();
        assert!(err.contains("must start with sqlite://"), "{err}");
        assert!(validate_database_url("sqlite://").is_err());
    }
}
