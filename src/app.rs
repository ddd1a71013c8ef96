//! Wiring only: builds the pool, the model router, the assistant, the channels and the
//! HTTP gateway from the validated settings, and runs them until SIGINT/SIGTERM. This is
//! the one place that names concrete implementations.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::RngCore;

use crate::assistant::{Assistant, AssistantConfig};
use crate::config::{Config, Secret, Settings};
use crate::gateway::{self, AppState};

/// my-claw: a private personal assistant in one binary.
///
/// Runs Qwen3 GGUF models in-process (candle), routes between local tiers and Z.ai with
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
    /// Write a consistent copy of the database to FILE while the server runs.
    Backup(crate::backup::BackupArgs),
    /// Download and list model files.
    #[command(subcommand)]
    Models(crate::models::ModelsCommand),
}

/// Runs the selected mode. Configuration errors come back as `ConfigError` (exit code 2).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.config.validate()?;
    init_tracing(settings.log.as_deref());
    if let Some(threads) = settings.engine.threads {
        crate::llm::engine::kernels::set_default_threads(threads);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(settings)),
        Command::Chat(args) => runtime.block_on(crate::chat::run(args)),
        Command::Bench(args) => {
            let data_dir = settings.data_dir.clone();
            runtime.block_on(crate::bench::run(&args, &data_dir))
        }
        Command::Models(cmd) => runtime.block_on(crate::models::run(cmd, &settings.router)),
        Command::BenchModel(args) => crate::bench_model::run(&args),
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
    }
}

fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = filter
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Logs go to stderr (stdout carries the ready message); colours only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Builds every component and serves until a shutdown signal.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let pool = crate::db::connect(&settings.database_url)
        .await
        .with_context(|| format!("cannot open the database {}", settings.database_url))?;
    let (token, generated) = ensure_webchat_token(&settings)?;

    let http = reqwest::Client::builder()
        .user_agent(concat!("my-claw/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")?;
    let router =
        crate::llm::router::Router::build(&settings.router, &settings.engine, http.clone())
            .await
            .context("cannot set up the model tiers")?;
    let assistant = Arc::new(Assistant::new(
        pool.clone(),
        Arc::new(router),
        AssistantConfig {
            history_messages: settings.history_messages,
            reply_max_tokens: settings.engine.reply_max_tokens,
        },
    ));

    // Channel clients, and the inbound queue worker (it first recovers unfinished messages).
    let channels = crate::channels::Channels::start(
        settings.whatsapp.as_ref(),
        settings.nextcloud.as_ref(),
        http.clone(),
        pool.clone(),
        assistant.clone(),
    );
    // Scheduled jobs: each enabled job is scheduled from now (runs missed while the process
    // was down are not replayed).
    let cron =
        crate::cron::start(pool.clone(), assistant.clone(), channels.clone(), &settings.cron)
            .await
            .context("cannot start the scheduler")?;
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
    announce(addr, &token, generated, &settings.data_dir);

    axum::serve(listener, gateway::cron::attach(gateway::router(state), cron.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server error")?;
    cron.shutdown().await;
    // In-flight requests have finished; closing the pool waits for their writes.
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The WebChat token: from the configuration, else from `DATA_DIR/webchat_token`, else a
/// new random one saved there with mode 600. Returns whether it was generated now.
fn ensure_webchat_token(settings: &Settings) -> anyhow::Result<(Secret, bool)> {
    if let Some(token) = &settings.webchat_token {
        return Ok((token.clone(), false));
    }
    let path = settings.data_dir.join("webchat_token");
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim();
        if saved.len() >= 16 {
            return Ok((Secret::new(saved), false));
        }
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_private_file(&path, token.as_bytes())
        .with_context(|| format!("cannot save the WebChat token to {}", path.display()))?;
    Ok((Secret::new(token), true))
}

fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn announce(addr: SocketAddr, token: &Secret, generated: bool, data_dir: &Path) {
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };
    tracing::info!(%addr, "listening");
    if generated {
        // Printed once, on the start that created the token, and never logged.
        println!("my-claw is ready. Open this link (it signs you in):");
        println!("  http://{host}/?token={}", token.expose());
        println!("The token is saved in {}.", data_dir.join("webchat_token").display());
    } else {
        println!(
            "my-claw is ready at http://{host}/ (token: WEBCHAT_TOKEN or {})",
            data_dir.join("webchat_token").display()
        );
    }
}

async fn shutdown_signal() {
    crate::gateway::events::shutdown_requested().await;
    tracing::info!("shutting down: finishing in-flight requests");
}
