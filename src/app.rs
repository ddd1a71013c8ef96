//! Wiring only: builds the pool, the model router, the assistant, the channels and the
//! HTTP gateway from the validated settings, and runs them until SIGINT/SIGTERM. This is
//! the one place that names concrete implementations.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use rand::RngCore;

use crate::assistant::{AgentConfig, Assistant, AssistantConfig};
use crate::channels::nextcloud::Nextcloud;
use crate::channels::whatsapp::WhatsApp;
use crate::channels::{Channel, Channels};
use crate::config::{Config, EngineSettings, RouterSettings, Secret, Settings};
use crate::gateway::{self, AppState};
use crate::llm::engine::gguf;
use crate::llm::engine::{EngineHandle, LoadProgress};
use crate::llm::hub::ModelSpec;
use crate::llm::pool::ModelLoader;
use crate::llm::providers::local::LocalProvider;
use crate::llm::providers::openai_compat::{OpenAiCompatConfig, OpenAiCompatProvider};
use crate::llm::providers::zai::{ZaiConfig, ZaiProvider};
use crate::llm::router::{plan_tiers, PlanSource, Router, RouterParts, Tier};
use crate::llm::{LlmError, Provider};
use crate::tools::reminders::SchedulerSlot;

/// Conversations whose next window is prefilled after a restart.
const WARM_RECENT_CONVERSATIONS: usize = 4;

/// How long a shutdown waits for stopped WebChat answers whose page left to be stored.
const SHUTDOWN_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// my-claw: a private personal assistant in one binary.
///
/// Runs Qwen3 GGUF models in-process on its own CPU kernels, routes between local tiers and Z.ai with
/// fallback to local, and serves the WebChat, the WhatsApp and Nextcloud Talk webhooks, and
/// scheduled jobs. Every option can also be set as an environment variable or in `.env`.
#[derive(Debug, clap::Parser)]
#[command(name = "my-claw", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the server: HTTP gateway, WebChat, webhooks and scheduler (the default).
    Serve,
    /// Chat with a local model in the terminal (reads one prompt per line when piped).
    Chat(crate::chat::ChatArgs),
    /// Measure load time, prefill and decode throughput on this machine (`--bench` too).
    Bench(crate::bench::BenchArgs),
    /// Write a Qwen3-shaped GGUF with random weights, for throughput benchmarks only.
    BenchModel(crate::bench_model::BenchModelArgs),
    /// Time to first token and reused KV per turn of one long conversation.
    BenchConversation(crate::bench_conversation::BenchConversationArgs),
    /// Check that a model gives the same greedy tokens on the GPU (`--device cuda`) as on
    /// our CPU kernels; without a GPU, on candle's CPU device.
    DeviceCheck(crate::device_check::DeviceCheckArgs),
    /// Write a consistent copy of the database to FILE while the server runs.
    Backup(crate::backup::BackupArgs),
    /// Print a link that signs a browser in once, within ten minutes: its code is written
    /// into the database, so neither the token nor a request to the server is needed (the
    /// link never holds the token).
    SignInLink,
    /// Download and list model files.
    #[command(subcommand)]
    Models(crate::models::ModelsCommand),
}

/// Runs the selected mode. Configuration errors come back as `ConfigError` (exit code 2).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.config.validate()?;
    init_tracing(settings.log.as_deref());
    let command = cli.command.unwrap_or(Command::Serve);
    // Only the server creates the data directory up front: a mistyped DATA_DIR given to
    // `backup` or `sign-in-link` must not leave an empty one behind, and `bench` makes it
    // only to save a report it has measured, so a bench that fails (a missing model) leaves
    // nothing either.
    if matches!(command, Command::Serve) {
        // Headers only (milliseconds): a model file that cannot be used stops the start
        // before anything is created.
        check_model_files(&settings.router).context("cannot set up the model tiers")?;
        crate::config::ensure_writable_dir(&settings.data_dir)?;
        // Every conversation and phone number lives under DATA_DIR: only our user may list
        // or read it, whatever the umask, including a directory made by an older version.
        crate::db::set_private_mode(&settings.data_dir, 0o700).with_context(|| {
            format!("cannot make the data directory {} private", settings.data_dir.display())
        })?;
    }
    if let Some(threads) = settings.engine.threads {
        crate::llm::engine::kernels::set_default_threads(threads);
    }
    if let Some(isa) = settings.engine.isa {
        crate::llm::engine::kernels::set_isa_limit(isa);
    }
    crate::llm::engine::candle_model::set_gpu_decode(settings.engine.gpu_decode);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let on_gpu = settings.engine.device.is_gpu();
    let result = match command {
        Command::Serve => runtime.block_on(serve(settings)),
        Command::Chat(args) => runtime.block_on(crate::chat::run(args, &settings.engine)),
        Command::Bench(args) => {
            let data_dir = settings.data_dir.clone();
            runtime.block_on(crate::bench::run(&args, &data_dir, &settings.engine.device))
        }
        Command::Models(cmd) => runtime.block_on(crate::models::run(cmd, &settings.router)),
        Command::BenchModel(args) => crate::bench_model::run(&args),
        Command::BenchConversation(args) => {
            runtime.block_on(crate::bench_conversation::run(&args, &settings.engine))
        }
        Command::DeviceCheck(args) => crate::device_check::run(&args, &settings.engine.device),
        Command::SignInLink => {
            let made = runtime.block_on(crate::sign_in_link::run(&settings))?;
            println!("{}", made.link);
            eprintln!("{}", made.note());
            Ok(())
        }
        Command::Backup(args) => {
            let summary = runtime.block_on(crate::backup::run(&args, &settings.database_url))?;
            println!(
                "backup written to {}: {} conversations, {} messages, integrity ok",
                args.file.display(),
                summary.conversations,
                summary.messages
            );
            Ok(())
        }
    };
    // On a GPU, the engine threads must free their models before the driver's exit
    // handlers tear the context down (a CUDA `chat` crashed at exit without this). The
    // engine handles went with the runtime; the wait is bounded because the server's
    // scheduler and reminder tools hold each other (and so an engine handle) until exit.
    drop(runtime);
    if on_gpu && !crate::llm::engine::wait_for_engines(Duration::from_secs(10)) {
        tracing::warn!("an engine thread was still running at exit");
    }
    result
}

fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let asked = filter.map(str::to_string).or_else(|| std::env::var("RUST_LOG").ok());
    let filter = EnvFilter::try_new(log_directives(asked.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr (stdout carries the ready message); colours only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Reads the header of every local model file the tiers use (`gguf::check`), so that a bad
/// one, above all a download cut short, stops the start naming the file and what is wrong
/// instead of failing the first answer. Headers only: no tensor data is read, and nothing
/// is loaded.
fn check_model_files(settings: &RouterSettings) -> anyhow::Result<()> {
    let mut paths: Vec<PathBuf> = plan_tiers(settings)?
        .into_iter()
        .filter_map(|plan| match plan.source {
            PlanSource::File { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths.iter().try_for_each(|path| gguf::check(path))?;
    Ok(())
}

/// A value that does not parse (`CONTEXT_SIZE=abc`), as one line naming the variable and
/// its flag: `CONTEXT_SIZE=abc (--context-size): invalid digit found in string`. `None` for
/// every other command-line error (help, unknown flags), which clap prints itself.
pub fn bad_value_line(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(error.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        return None;
    }
    let text = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // `--context-size <CONTEXT_SIZE>`: the value name is the variable's. A positional
    // argument (`<FILE>`) is no setting: clap's own message names it well.
    let arg = text(ContextKind::InvalidArg).filter(|arg| !arg.starts_with('<'))?;
    let value = text(ContextKind::InvalidValue).unwrap_or_default();
    let (flag, name) = match arg.split_once(" <") {
        Some((flag, name)) => (flag.to_string(), name.trim_end_matches('>').to_string()),
        None => (arg.clone(), arg.trim_start_matches('-').replace('-', "_").to_uppercase()),
    };
    let reason = match std::error::Error::source(error) {
        Some(source) => source.to_string(),
        None => match error.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) if !valid.is_empty() => {
                format!("expected one of {}", valid.join(", "))
            }
            _ if value.is_empty() => "a value is required".to_string(),
            _ => "not a valid value".to_string(),
        },
    };
    Some(format!("{name}={value} ({flag}): {reason}"))
}

/// The log filter: what was asked (`LOG`, else `RUST_LOG`, else `info`), with the
/// tokenizers crate held at `warn` unless named: at `trace` it logs every character of every
/// prompt it normalises, which would put the conversations in the log.
fn log_directives(asked: Option<&str>) -> String {
    let asked = asked.map(str::trim).filter(|a| !a.is_empty()).unwrap_or("info");
    if asked.contains("tokenizers") {
        asked.to_string()
    } else {
        format!("{asked},tokenizers=warn")
    }
}

/// Builds every component and serves until a shutdown signal.
/// A lock file beside the database (`my-claw.db.lock`) makes it one server's: a second
/// `serve` on it (a second systemd unit, a copy started by hand, another DATA_DIR with the
/// same DATABASE_URL) would store the first one's answers in progress as interrupted and
/// run every job twice. The file holds the owner's process id, to name it.
fn lock_database(database_url: &str) -> anyhow::Result<Option<std::fs::File>> {
    let database = crate::db::export::database_file(database_url)
        .with_context(|| format!("cannot read DATABASE_URL {database_url}"))?;
    if database.as_os_str().is_empty() || database == Path::new(":memory:") {
        return Ok(None);
    }
    let mut path = database.clone().into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    let mut options = crate::db::private_file_options();
    options.read(true).write(true).create(true).truncate(false);
    let mut file =
        options.open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let owner = std::fs::read_to_string(&path).unwrap_or_default();
            let owner = match owner.trim() {
                pid if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("process {pid}")
                }
                _ => "another process".to_string(),
            };
            anyhow::bail!(
                "another my-claw ({owner}) is serving from {}: stop it first, or give this one \
                 its own DATA_DIR",
                database.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
    file.set_len(0).and_then(|()| writeln!(file, "{}", std::process::id())).ok();
    Ok(Some(file))
}

pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Held until the process ends (the kernel lets go of it on any exit, `kill -9` too).
    let _one_server = lock_database(&settings.database_url)?;
    let pool = crate::db::connect(&settings.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", settings.database_url))?;
    // Before anything serves, every draft is an answer the last process was writing when it
    // stopped: it is stored as that answer, cut short.
    let recovered = crate::db::drafts::recover(&pool, crate::db::drafts::INTERRUPTED_REASON)
        .await
        .context("cannot store the answers the last stop interrupted")?;
    if recovered > 0 {
        tracing::warn!(
            answers = recovered,
            "answers interrupted by the last stop stored as partial"
        );
    }
    let (token, token_source) = ensure_webchat_token(&settings)?;
    // Before anything starts: an unknown name in `TOOLS` is a configuration error. The
    // reminders tools get the scheduler once it runs (it needs the assistant, which needs
    // its tools first).
    let scheduler = SchedulerSlot::default();
    let agent = AgentConfig {
        tools: tool_registry(&settings, &pool, scheduler.clone())?,
        max_steps: settings.agent.max_steps,
    };

    let http = reqwest::Client::builder()
        .user_agent(concat!("my-claw/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let router =
        Router::build(&settings.router, router_parts(&settings.router, &settings.engine, &http))
            .await
            .context("cannot set up the model tiers")?;
    // Remote tiers' servers are checked in the background: start-up never waits for them.
    {
        let router = router.clone();
        tokio::spawn(async move { router.probe_remotes().await });
    }
    let assistant = Arc::new(Assistant::with_agent(
        pool.clone(),
        Arc::new(router),
        AssistantConfig {
            history_messages: settings.history_messages,
            reply_max_tokens: settings.engine.reply_max_tokens,
        },
        agent,
    ));
    // After a restart, the next windows of the most recently active conversations are
    // prefilled in idle time (each uses two of the engine's kept sequences: the live window
    // and the next prefix), so their next answers start from a warm cache.
    {
        let assistant = assistant.clone();
        tokio::spawn(async move {
            match assistant.warm_recent(WARM_RECENT_CONVERSATIONS).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(conversations = n, "prepared recent conversations"),
                Err(e) => tracing::warn!(error = %e, "could not prepare recent conversations"),
            }
        });
    }

    // Channel clients, and the inbound queue worker (it first recovers unfinished messages).
    let mut channel_list: Vec<Arc<dyn Channel>> = Vec::new();
    if let Some(settings) = &settings.whatsapp {
        channel_list.push(Arc::new(WhatsApp::new(settings.clone(), http.clone(), pool.clone())));
    }
    if let Some(settings) = &settings.nextcloud {
        channel_list.push(Arc::new(Nextcloud::new(settings.clone(), http.clone())));
    }
    let channels = Channels::new(channel_list);
    channels.start(pool.clone(), assistant.clone());
    // Scheduled jobs: each enabled job is scheduled from now (runs missed while the process
    // was down are not replayed).
    let cron =
        crate::cron::start(pool.clone(), assistant.clone(), channels.clone(), &settings.cron)
            .await
            .context("cannot start the scheduler")?;
    scheduler.set(cron.clone());
    let live = assistant.live().clone();
    let shutdown_assistant = assistant.clone();
    let state = AppState {
        pool: pool.clone(),
        assistant,
        webchat_token: token.clone(),
        started_at: Instant::now(),
        data_dir: Arc::new(settings.data_dir.clone()),
        max_body_bytes: settings.max_body_bytes,
        reply_max_tokens: settings.engine.reply_max_tokens,
        channels,
    };
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.bind))?;
    let addr = listener.local_addr().context("listener has no address")?;
    announce(addr, &pool, token_source, &settings.data_dir).await;

    let limits = gateway::listener::ConnectionLimits {
        header_timeout: settings.request_header_timeout,
        body_timeout: settings.request_body_timeout,
    };
    let app = gateway::cron::attach(gateway::router(state), cron.clone());
    gateway::listener::serve(
        listener,
        app,
        limits,
        shutdown_signal(cron.clone(), shutdown_assistant),
    )
    .await;
    // Answers whose page left were stopped by the same signal: they are stored first.
    live.wait_idle(SHUTDOWN_ANSWER_WAIT).await;
    cron.shutdown().await;
    // In-flight requests have finished; closing the pool waits for their writes.
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The tools the assistant may call: every built-in tool, then only those `TOOLS` enables.
/// A name in `TOOLS` that no built-in tool has is a start-up error listing the known ones.
pub fn tool_registry(
    settings: &Settings,
    pool: &sqlx::SqlitePool,
    scheduler: SchedulerSlot,
) -> anyhow::Result<crate::tools::ToolRegistry> {
    let timezone = settings.timezone.unwrap_or_else(crate::cron::schedule::system_timezone);
    let mut registry = crate::tools::ToolRegistry::new();
    for tool in crate::tools::builtin_tools(timezone, scheduler, pool.clone()) {
        registry.register(tool);
    }
    let known = registry.names();
    settings.agent.tools.check_known(&known)?;
    registry.retain(|name| settings.agent.tools.enables(name));
    if !registry.is_empty() {
        tracing::info!(tools = ?registry.names(), %timezone, "tools enabled");
    }
    Ok(registry)
}

/// The model router as the server builds it (without `PRELOAD`): local tiers load through
/// the engine, cloud tiers with a key talk to Z.ai.
pub fn build_router(
    settings: &RouterSettings,
    engine: &EngineSettings,
    http: &reqwest::Client,
) -> Result<Router, LlmError> {
    Router::from_settings(settings, router_parts(settings, engine, http))
}

/// The concrete parts of the router: the engine loader and one Z.ai client per cloud tier
/// (none without `ZAI_API_KEY`, so those tiers answer from `main`).
fn router_parts(
    settings: &RouterSettings,
    engine: &EngineSettings,
    http: &reqwest::Client,
) -> RouterParts {
    let mut cloud: HashMap<Tier, Arc<dyn Provider>> = HashMap::new();
    if let Some(key) = &settings.zai_api_key {
        for tier in Tier::ALL {
            if let ModelSpec::Zai(model) = &settings.tier_model(tier).spec {
                let config = ZaiConfig::new(
                    &settings.zai_base_url,
                    key.clone(),
                    model,
                    tier.cloud_thinking(),
                    settings.zai_timeout,
                );
                cloud.insert(tier, Arc::new(ZaiProvider::new(http.clone(), config)));
            }
        }
    }
    // Remote tiers: one OpenAI-compatible client each, with its own connect timeout (a
    // GPU box on the LAN answers in milliseconds or not at all).
    for tier in Tier::ALL {
        if let ModelSpec::Remote(remote) = &settings.tier_model(tier).spec {
            let config = OpenAiCompatConfig::remote(
                &remote.base_url,
                settings.remote.api_key(tier).cloned(),
                &remote.model,
                tier.cloud_thinking(),
                settings.remote.first_byte_timeout,
            );
            let client = reqwest::Client::builder()
                .user_agent(concat!("my-claw/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(settings.remote.connect_timeout)
                .build()
                // Only a broken TLS back-end fails here; the shared client then serves.
                .unwrap_or_else(|_| http.clone());
            cloud.insert(tier, Arc::new(OpenAiCompatProvider::new(client, config)));
        }
    }
    RouterParts {
        loader: Arc::new(EngineLoader { settings: engine.clone() }),
        per_model_overhead_bytes: engine.kv_cache_max_bytes,
        cloud,
    }
}

/// The production model loader: one engine worker per file, with the engine settings.
struct EngineLoader {
    settings: EngineSettings,
}

impl ModelLoader for EngineLoader {
    fn load(&self, path: PathBuf) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
        self.load_with_progress(path, Arc::new(LoadProgress::default()))
    }

    fn load_with_progress(
        &self,
        path: PathBuf,
        progress: Arc<LoadProgress>,
    ) -> BoxFuture<'static, Result<Arc<dyn Provider>, LlmError>> {
        let config = self.settings.engine_config(path);
        Box::pin(async move {
            let handle = EngineHandle::spawn_with_progress(config, progress).await?;
            let provider: Arc<dyn Provider> = Arc::new(LocalProvider::new(handle));
            Ok(provider)
        })
    }
}

/// Where the WebChat token came from: the start message tells the user where to find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    /// `WEBCHAT_TOKEN`: no file is read or written.
    Setting,
    /// `DATA_DIR/webchat_token`, saved by an earlier start.
    SavedFile,
    /// Generated by this start and saved in `DATA_DIR/webchat_token`.
    Generated,
}

/// The token saved in `path`, when it holds one (16+ characters once trimmed).
fn saved_token(path: &Path) -> Option<Secret> {
    let saved = std::fs::read_to_string(path).ok()?;
    let saved = saved.trim();
    (saved.len() >= 16).then(|| Secret::new(saved))
}

/// The WebChat token: from the configuration, else from `DATA_DIR/webchat_token`, else a
/// new random one saved there with mode 600.
fn ensure_webchat_token(settings: &Settings) -> anyhow::Result<(Secret, TokenSource)> {
    if let Some(token) = &settings.webchat_token {
        return Ok((token.clone(), TokenSource::Setting));
    }
    let path = settings.data_dir.join("webchat_token");
    if let Some(saved) = saved_token(&path) {
        // A file copied in or left by an older version may be readable by others.
        crate::db::set_private_mode(&path, 0o600)
            .with_context(|| format!("cannot make {} private", path.display()))?;
        return Ok((saved, TokenSource::SavedFile));
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_private_file(&path, token.as_bytes())
        .with_context(|| format!("cannot save the WebChat token to {}", path.display()))?;
    Ok((Secret::new(token), TokenSource::Generated))
}

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file =
        crate::db::private_file_options().write(true).create(true).truncate(true).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

async fn announce(addr: SocketAddr, pool: &sqlx::SqlitePool, source: TokenSource, data_dir: &Path) {
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    tracing::info!(%addr, "listening");
    // The first line names the address really bound (`BIND=127.0.0.1:0` picks a free port):
    // scripts and the tests read it.
    println!("my-claw is ready at http://{host}/");
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        // For the person at the terminal: a link that signs in once, within ten minutes,
        // and never holds the token (it stays in the browser's history). Under systemd or
        // with output redirected no link is printed: stdout ends in a journal or a log file.
        // A code that cannot be written (a full disk) costs the link, not the start.
        let lifetime = crate::gateway::sign_in::CODE_LIFETIME;
        match crate::db::sign_in::issue(pool, lifetime).await {
            Ok(code) => println!(
                "Open this link to sign in (it works once, for {} minutes): {}",
                lifetime.as_secs() / 60,
                sign_in_url(&host, code.expose())
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot write a sign-in code: make a link later with `my-claw sign-in-link`"
            ),
        }
    }
    let token_file = data_dir.join("webchat_token");
    match source {
        // The file is neither read nor written then: naming it would send the user looking
        // for a token that is not there.
        TokenSource::Setting => println!("Sign in with the token set in WEBCHAT_TOKEN."),
        TokenSource::SavedFile => {
            println!("Sign in with the token saved in {}.", token_file.display())
        }
        TokenSource::Generated => println!(
            "A WebChat token was generated and saved in {} (mode 600): sign in with it, or \
             get a one-time link with `my-claw sign-in-link`.",
            token_file.display()
        ),
    }
}

/// The page's address with a one-time sign-in code (see `gateway::sign_in`).
pub fn sign_in_url(host: &str, code: &str) -> String {
    format!("http://{host}/?code={code}")
}

async fn shutdown_signal(cron: crate::cron::CronHandle, assistant: Arc<Assistant>) {
    crate::gateway::events::shutdown_requested().await;
    // Answers stopped from here on say the shutdown cut them; a job's answer would hold the
    // graceful shutdown as long as it takes.
    assistant.shutting_down();
    cron.halt();
    tracing::info!("shutting down: finishing in-flight requests (a second signal exits at once)");
    // The graceful shutdown stops answers and waits for the rest within bounds; a person
    // who presses Ctrl-C again wants out now. What SQLite committed stays (as after a kill).
    tokio::spawn(async {
        crate::gateway::events::shutdown_requested().await;
        tracing::warn!("second signal: exiting without waiting for in-flight requests");
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_bad_setting_is_one_line_and_an_empty_file_is_left_to_clap() {
        use clap::Parser;
        let error = |args: &[&str]| Cli::try_parse_from(args).expect_err("a parse error");
        let bad = error(&["my-claw", "serve", "--context-size", "abc"]);
        let line = bad_value_line(&bad).expect("one line");
        assert_eq!(line, "CONTEXT_SIZE=abc (--context-size): invalid digit found in string");
        // `backup ""` used to print "<FILE>= (<FILE>): expected one of ".
        let empty = error(&["my-claw", "backup", ""]);
        assert_eq!(bad_value_line(&empty), None);
        let said = empty.to_string();
        assert!(said.contains("<FILE>") && !said.contains("expected one of"), "{said}");
    }

    /// Whether `target` logs at `level` under the filter made from `asked`.
    fn logs(asked: Option<&str>, target_is_tokenizers: bool, level: tracing::Level) -> bool {
        let filter = tracing_subscriber::EnvFilter::new(log_directives(asked));
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            if target_is_tokenizers {
                match level {
                    tracing::Level::TRACE => {
                        tracing::enabled!(target: "tokenizers::normalizer", tracing::Level::TRACE)
                    }
                    _ => tracing::enabled!(target: "tokenizers::normalizer", tracing::Level::WARN),
                }
            } else {
                tracing::enabled!(target: "my_claw::assistant", tracing::Level::TRACE)
            }
        })
    }

    #[test]
    fn trace_logging_never_includes_the_tokenizers_prompt_characters() {
        for asked in [Some("trace"), Some("my_claw=trace,trace"), None, Some("  ")] {
            assert!(!logs(asked, true, tracing::Level::TRACE), "{asked:?}");
            assert!(logs(asked, true, tracing::Level::WARN), "its warnings stay: {asked:?}");
        }
        assert!(logs(Some("trace"), false, tracing::Level::TRACE), "ours still trace");
        // Named explicitly, it is what the user asked for.
        assert!(logs(Some("info,tokenizers=trace"), true, tracing::Level::TRACE));
    }
}
