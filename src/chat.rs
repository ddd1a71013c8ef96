//! `my-claw chat`: a terminal REPL over the local engine, streaming answers and keeping the
//! conversation in memory. Piped input is read one prompt per line, so it can be scripted.
//! It uses the same `EngineHandle` as the server and stores nothing.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::EngineSettings;
use crate::domain::{ChatTurn, Role};
use crate::llm::engine::{EngineConfig, EngineHandle};
use crate::llm::{Chunk, GenerationParams, LlmRequest};

/// Options of `my-claw chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// GGUF model file to chat with.
    #[arg(long)]
    pub model: PathBuf,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// System prompt put before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Context size of the engine.
    #[arg(long, default_value_t = 8192)]
    pub n_ctx: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Run the REPL until end of input (or `/exit`). `/reset` starts a new conversation.
/// The engine follows the settings (`DEVICE`, `KV_CACHE_*`, …) but for `--n-ctx`.
pub async fn run(args: ChatArgs, engine: &EngineSettings) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let config = EngineConfig { n_ctx: args.n_ctx, ..engine.engine_config(args.model.clone()) };
    let engine = EngineHandle::spawn(config).await.context("cannot start the engine")?;
    if interactive {
        let info = engine.info();
        eprintln!(
            "{} ({}, {}), context {} tokens, loaded in {} ms. /reset starts over, /exit or Ctrl-D quits.",
            info.name, info.arch, info.quantization, info.n_ctx, info.load_ms
        );
    }
    let mut params = GenerationParams::qwen3_non_thinking(args.max_tokens);
    params.temperature = args.temperature;
    params.seed = args.seed;
    let mut history = system_turns(&args);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            let mut stdout = std::io::stdout();
            write!(stdout, "> ").and_then(|()| stdout.flush()).context("cannot write to stdout")?;
        }
        let Some(line) = lines.next_line().await.context("cannot read stdin")? else { break };
        let prompt = line.trim();
        match prompt {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = system_turns(&args);
                continue;
            }
            _ => {}
        }
        history.push(ChatTurn::new(Role::User, prompt));
        let request = LlmRequest {
            messages: history.clone(),
            params: params.clone(),
            tools: Default::default(),
        };
        let answer = stream_answer(&engine, request).await?;
        history.push(ChatTurn::new(Role::Assistant, answer));
    }
    Ok(())
}

fn system_turns(args: &ChatArgs) -> Vec<ChatTurn> {
    args.system.iter().map(|s| ChatTurn::new(Role::System, s.clone())).collect()
}

/// Print the answer as it streams; returns its full text.
async fn stream_answer(engine: &EngineHandle, request: LlmRequest) -> anyhow::Result<String> {
    let mut stream = engine.submit(request)?;
    let mut answer = String::new();
    let mut stdout = std::io::stdout();
    while let Some(item) = stream.recv().await {
        match item? {
            Chunk::Text(piece) => {
                // `print!` panics when stdout is a closed pipe (`chat | head`): an error ends
                // the command with one line instead.
                write!(stdout, "{piece}")
                    .and_then(|()| stdout.flush())
                    .context("cannot write to stdout")?;
                answer.push_str(&piece);
            }
            Chunk::Notice { message, .. } => eprintln!("[{message}]"),
            Chunk::Accepted { .. } => {}
            // The terminal chat offers no tools.
            Chunk::ToolCall(_) => {}
            Chunk::Done { usage, .. } => {
                writeln!(stdout).context("cannot write to stdout")?;
                tracing::debug!(?usage, "answer done");
                return Ok(answer.trim().to_string());
            }
        }
    }
    anyhow::bail!("the engine stopped during the answer")
}
