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
use crate::llm::{Chunk, GenerationParams, LlmError, LlmRequest};

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
        let n_system = system_turns(&args).len();
        let mut stdout = std::io::stdout();
        if let Some(answer) =
            answer_fitting(&engine, &mut history, n_system, &params, &mut stdout).await?
        {
            history.push(ChatTurn::new(Role::Assistant, answer));
        }
    }
    Ok(())
}

/// Answers the last turn of `history` (the user's). While the engine says the prompt does
/// not fit its context, the oldest exchange after the `n_system` system turns is dropped
/// and the prompt asked again, so a long session goes on instead of ending with the error
/// (and every turn of it lost). A message that does not fit even alone is taken back out of
/// the history with a line on stderr: `None`, and the session goes on.
async fn answer_fitting(
    engine: &EngineHandle,
    history: &mut Vec<ChatTurn>,
    n_system: usize,
    params: &GenerationParams,
    out: &mut dyn Write,
) -> anyhow::Result<Option<String>> {
    let mut dropped = 0;
    loop {
        let request = LlmRequest {
            messages: history.clone(),
            params: params.clone(),
            tools: Default::default(),
        };
        let error = match stream_answer(engine, request, out).await {
            Ok(answer) => {
                if dropped > 0 {
                    eprintln!(
                        "[{dropped} older message(s) left out: they no longer fit the context]"
                    );
                }
                return Ok(Some(answer));
            }
            Err(error) => error,
        };
        let overflow =
            matches!(error.downcast_ref::<LlmError>(), Some(LlmError::ContextOverflow { .. }));
        if !overflow {
            return Err(error);
        }
        // The turns between the system prompt and the new message: the oldest goes, with
        // the answer that followed it.
        if history.len() > n_system + 1 {
            let mut n = 1;
            if history.get(n_system + 1).is_some_and(|t| t.role == Role::Assistant)
                && history.len() > n_system + 2
            {
                n = 2;
            }
            history.drain(n_system..n_system + n);
            dropped += n;
            continue;
        }
        history.pop();
        eprintln!("[not answered: {error:#}; send something shorter, or /reset]");
        return Ok(None);
    }
}

fn system_turns(args: &ChatArgs) -> Vec<ChatTurn> {
    args.system.iter().map(|s| ChatTurn::new(Role::System, s.clone())).collect()
}

/// Print the answer to `stdout` as it streams; returns its full text.
async fn stream_answer(
    engine: &EngineHandle,
    request: LlmRequest,
    stdout: &mut dyn Write,
) -> anyhow::Result<String> {
    let mut stream = engine.submit(request)?;
    let mut answer = String::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::engine::EngineConfig;

    fn user(text: String) -> ChatTurn {
        ChatTurn::new(Role::User, text)
    }

    /// A session longer than the context goes on: the oldest exchanges are left out of the
    /// prompt and every question is answered (before, the first prompt over the context
    /// ended `my-claw chat` with the error, and the whole conversation was gone); a message
    /// too long even alone is taken back and the next one is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_longer_than_the_context_goes_on_without_its_oldest_turns() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let config = EngineConfig { n_ctx: 256, ..EngineConfig::for_model(path) };
        let engine = EngineHandle::spawn(config).await.expect("the small model loads");
        let params = GenerationParams::greedy(12);
        let system = ChatTurn::new(Role::System, "You answer in a few words.");
        let mut history = vec![system.clone()];
        let question = |i: usize| format!("Question {i}: {}", "what colour is the sea? ".repeat(6));
        for i in 0..10 {
            history.push(user(question(i)));
            let answer = answer_fitting(&engine, &mut history, 1, &params, &mut std::io::sink())
                .await
                .unwrap_or_else(|e| panic!("question {i}: {e:#}"))
                .unwrap_or_else(|| panic!("question {i} was not answered"));
            history.push(ChatTurn::new(Role::Assistant, answer));
        }
        assert_eq!(history[0], system);
        assert_eq!(history[history.len() - 2].content, question(9));
        assert!(history.len() < 21, "the oldest turns were left out: {}", history.len());
        assert!(history.iter().all(|t| t.content != question(0)));

        let too_long = user("the sea is very large and deep. ".repeat(80));
        history.push(too_long.clone());
        let answer =
            answer_fitting(&engine, &mut history, 1, &params, &mut std::io::sink()).await.unwrap();
        assert_eq!(answer, None);
        assert!(!history.contains(&too_long), "taken back out of the history");
        history.push(user(question(10)));
        let answer =
            answer_fitting(&engine, &mut history, 1, &params, &mut std::io::sink()).await.unwrap();
        assert!(answer.is_some(), "the session goes on");
    }
}
