//! `my-claw bench-conversation`: one long conversation through the real `Assistant` (a fresh
//! SQLite file, the local engine, no HTTP), measuring time to first token and reused KV
//! tokens per turn with the stepping history window and with the old sliding one. It owns
//! no model or SQL code and never touches the server's data directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::assistant::{Assistant, AssistantConfig, Event, WindowPolicy};
use crate::bench::median;
use crate::config::EngineSettings;
use crate::domain::{ChannelKind, Inbound};
use crate::llm::engine::gguf;
use crate::llm::engine::tokenizer::GgufTokenizer;
use crate::llm::engine::{EngineConfig, EngineHandle};
use crate::llm::providers::local::LocalProvider;
use crate::llm::router::{Router, Tier};
use crate::llm::Provider;

/// Options of `my-claw bench-conversation`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchConversationArgs {
    /// GGUF model file to converse with.
    #[arg(long)]
    pub model: PathBuf,
    /// Turns of the conversation.
    #[arg(long, default_value_t = 40)]
    pub turns: usize,
    /// The history window (`HISTORY_MESSAGES`).
    #[arg(long, default_value_t = 20)]
    pub history_messages: usize,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 120)]
    pub answer_tokens: u32,
    /// Idle time between an answer and the next message (when the next window is prepared).
    #[arg(long, default_value_t = 3000)]
    pub pause_ms: u64,
    /// Which window to measure: `stepping` (the default policy), `sliding` (the window moves
    /// one message a turn and nothing is prepared: the behaviour before), or `both`.
    #[arg(long, default_value = "both")]
    pub window: String,
    /// Context size of the engine.
    #[arg(long, default_value_t = 8192)]
    pub n_ctx: usize,
}

/// One measured turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnReport {
    pub turn: usize,
    pub user_tokens: usize,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    /// From the engine's receipt of the request to its first text.
    pub engine_ttft_ms: u64,
    /// From the message handed to the assistant to its first text (includes waiting for the
    /// engine, e.g. behind idle work that had not finished).
    pub ttft_ms: u64,
}

/// The engine follows the settings (`DEVICE`, `KV_CACHE_*`, …) but for `--n-ctx`.
pub async fn run(args: &BenchConversationArgs, engine: &EngineSettings) -> anyhow::Result<()> {
    let policies: Vec<(&str, WindowPolicy)> = match args.window.as_str() {
        "stepping" => vec![("stepping", WindowPolicy::stepping(args.history_messages))],
        "sliding" => vec![("sliding", WindowPolicy::sliding(args.history_messages))],
        "both" => vec![
            ("stepping", WindowPolicy::stepping(args.history_messages)),
            ("sliding", WindowPolicy::sliding(args.history_messages)),
        ],
        other => anyhow::bail!("--window {other}: expected stepping, sliding or both"),
    };
    let model_file =
        gguf::open(&args.model).with_context(|| format!("cannot read {}", args.model.display()))?;
    let tokenizer = model_file.tokenizer().context("cannot build the tokenizer")?;
    let messages = user_messages(&tokenizer, args.turns)?;
    println!(
        "conversation benchmark: {} turns, HISTORY_MESSAGES={}, answers ≤ {} tokens, {} ms pause \
         between turns, user messages of {}–{} tokens, context {}",
        args.turns,
        args.history_messages,
        args.answer_tokens,
        args.pause_ms,
        messages.iter().map(|(_, n)| *n).min().unwrap_or(0),
        messages.iter().map(|(_, n)| *n).max().unwrap_or(0),
        args.n_ctx
    );
    println!("model {}, CPU {}", args.model.display(), crate::llm::engine::device::cpu_name());
    let mut summaries = Vec::new();
    for (name, policy) in policies {
        println!();
        println!(
            "window {name}: at least {} messages, steps of {}, next window prepared: {}",
            policy.min_messages, policy.step, policy.warm
        );
        let reports = run_policy(args, policy, &messages, engine).await?;
        summaries.push((name, summarize(&reports, args.history_messages)));
    }
    println!();
    for (name, summary) in summaries {
        println!("{name:>8}: {summary}");
    }
    Ok(())
}

/// Medians of early and late turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub early_ttft_ms: f64,
    pub late_ttft_ms: f64,
    pub late_max_ttft_ms: u64,
    pub early_cached: f64,
    pub late_cached: f64,
    pub late_prompt: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ratio =
            if self.early_ttft_ms > 0.0 { self.late_ttft_ms / self.early_ttft_ms } else { 0.0 };
        write!(
            f,
            "ttft median early {:.0} ms, late {:.0} ms ({ratio:.2}×), slowest late {} ms; \
             cached tokens median early {:.0}, late {:.0} of {:.0}",
            self.early_ttft_ms,
            self.late_ttft_ms,
            self.late_max_ttft_ms,
            self.early_cached,
            self.late_cached,
            self.late_prompt
        )
    }
}

/// Early turns are those before the window first moves (the first turn, a cold prefill,
/// excluded); late turns are the second half of the conversation.
pub fn summarize(reports: &[TurnReport], history_messages: usize) -> Summary {
    // Turn t holds 2t - 1 messages: the window first moves once that exceeds the window.
    let last_early = history_messages.div_ceil(2).max(2);
    let early: Vec<&TurnReport> =
        reports.iter().filter(|r| r.turn >= 2 && r.turn <= last_early).collect();
    let late: Vec<&TurnReport> = reports.iter().filter(|r| r.turn > reports.len() / 2).collect();
    Summary {
        early_ttft_ms: median_of(&early, |r| r.ttft_ms as f64),
        late_ttft_ms: median_of(&late, |r| r.ttft_ms as f64),
        late_max_ttft_ms: late.iter().map(|r| r.ttft_ms).max().unwrap_or(0),
        early_cached: median_of(&early, |r| f64::from(r.cached_tokens)),
        late_cached: median_of(&late, |r| f64::from(r.cached_tokens)),
        late_prompt: median_of(&late, |r| f64::from(r.prompt_tokens)),
    }
}

/// One conversation with a fresh engine and a fresh database.
async fn run_policy(
    args: &BenchConversationArgs,
    policy: WindowPolicy,
    messages: &[(String, usize)],
    engine: &EngineSettings,
) -> anyhow::Result<Vec<TurnReport>> {
    let dir = ScratchDir::new()?;
    let url = format!("sqlite://{}", dir.0.join("bench-conversation.db").display());
    let pool = crate::db::connect(&url).await.context("cannot open the benchmark database")?;
    let config = EngineConfig { n_ctx: args.n_ctx, ..engine.engine_config(args.model.clone()) };
    let engine = EngineHandle::spawn(config).await.context("cannot start the engine")?;
    let provider: Arc<dyn Provider> = Arc::new(LocalProvider::new(engine));
    let router = Router::with_providers(provider, Default::default(), Tier::Main);
    let assistant = Assistant::with_window(
        pool.clone(),
        Arc::new(router),
        AssistantConfig {
            history_messages: args.history_messages,
            reply_max_tokens: args.answer_tokens,
        },
        policy,
    );
    let mut reports = Vec::with_capacity(messages.len());
    for (index, (text, user_tokens)) in messages.iter().enumerate() {
        let inbound = Inbound {
            channel: ChannelKind::WhatsApp,
            conversation_key: "bench".into(),
            sender: "bench".into(),
            text: text.clone(),
            external_id: None,
        };
        let sent = Instant::now();
        let mut events = assistant.start(inbound, None).await.context("the turn was refused")?;
        let mut first_text = None;
        let mut done = None;
        while let Some(event) = events.recv().await {
            match event {
                Event::Token(_) => {
                    first_text.get_or_insert_with(|| sent.elapsed());
                }
                Event::Done { usage, .. } => done = Some(usage),
                Event::Error { message, .. } => anyhow::bail!("turn {}: {message}", index + 1),
                Event::Meta { .. }
                | Event::Notice { .. }
                | Event::ToolCall { .. }
                | Event::ToolResult { .. } => {}
            }
        }
        let usage = done.with_context(|| format!("turn {} ended without an answer", index + 1))?;
        if index == 0 {
            println!("turn  user  prompt  cached  answer  ttft ms  engine ttft ms");
        }
        reports.push(TurnReport {
            turn: index + 1,
            user_tokens: *user_tokens,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            completion_tokens: usage.completion_tokens,
            engine_ttft_ms: usage.ttft_ms,
            ttft_ms: first_text.unwrap_or_else(|| sent.elapsed()).as_millis() as u64,
        });
        if let Some(report) = reports.last() {
            // One row as each turn ends: a run on a large model takes a while.
            println!("{}", turn_row(report));
        }
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    pool.close().await;
    Ok(reports)
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> anyhow::Result<ScratchDir> {
        let nonce: u64 = rand::random();
        let path = std::env::temp_dir().join(format!("my-claw-bench-conversation-{nonce:016x}"));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn turn_row(r: &TurnReport) -> String {
    format!(
        "{:>4}  {:>4}  {:>6}  {:>6}  {:>6}  {:>7}  {:>14}",
        r.turn,
        r.user_tokens,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.ttft_ms,
        r.engine_ttft_ms
    )
}

/// Deterministic user messages of 20–60 tokens of this model's tokenizer: plain words drawn
/// by a fixed linear congruential generator, so every run and both windows see the same
/// conversation.
pub fn user_messages(
    tokenizer: &GgufTokenizer,
    turns: usize,
) -> anyhow::Result<Vec<(String, usize)>> {
    const WORDS: [&str; 32] = [
        "garden", "tomorrow", "please", "remind", "recipe", "train", "weather", "meeting",
        "coffee", "book", "holiday", "price", "music", "doctor", "invoice", "birthday", "bicycle",
        "window", "letter", "market", "river", "summer", "question", "answer", "friend", "plan",
        "list", "kitchen", "evening", "quiet", "simple", "short",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state =
            state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut messages = Vec::with_capacity(turns);
    for turn in 0..turns {
        let target = 20 + next() % 41;
        let mut text = format!("Message {}:", turn + 1);
        let mut n_tokens = tokenizer.encode(&text)?.len();
        while n_tokens < target {
            text.push(' ');
            text.push_str(WORDS[next() % WORDS.len()]);
            n_tokens = tokenizer.encode(&text)?.len();
        }
        text.push('?');
        let n_tokens = tokenizer.encode(&text)?.len();
        messages.push((text, n_tokens));
    }
    Ok(messages)
}

fn median_of(rows: &[&TurnReport], value: impl Fn(&TurnReport) -> f64) -> f64 {
    median(rows.iter().map(|row| value(row)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(turn: usize, ttft_ms: u64, cached_tokens: u32) -> TurnReport {
        TurnReport {
            turn,
            user_tokens: 30,
            prompt_tokens: 1000,
            cached_tokens,
            completion_tokens: 100,
            engine_ttft_ms: ttft_ms,
            ttft_ms,
        }
    }

    #[test]
    fn early_turns_end_before_the_window_moves_and_late_turns_are_the_second_half() {
        // Turn 1 is a cold prefill, turns 2–10 hold at most 19 messages of a 20 window.
        let reports: Vec<TurnReport> =
            (1..=40).map(|t| report(t, if t <= 10 { 100 } else { 300 }, t as u32)).collect();
        let summary = summarize(&reports, 20);
        assert_eq!(summary.early_ttft_ms, 100.0);
        assert_eq!(summary.late_ttft_ms, 300.0);
        // Early: turns 2..=10 → cached 2..=10, median 6. Late: 21..=40 → median 30.5.
        assert_eq!(summary.early_cached, 6.0);
        assert_eq!(summary.late_cached, 30.5);
        assert!(summary.to_string().contains("(3.00×)"), "{summary}");
    }

    #[test]
    fn user_messages_are_deterministic_and_sized_with_the_real_vocabulary() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let tokenizer = gguf::open(&path).and_then(|f| f.tokenizer()).expect("SmolLM2");
        let first = user_messages(&tokenizer, 40).unwrap();
        assert_eq!(first, user_messages(&tokenizer, 40).unwrap());
        assert_eq!(first.len(), 40);
        for (text, n_tokens) in &first {
            // The question mark may add one token past the drawn size.
            assert!((20..=61).contains(n_tokens), "{n_tokens} tokens: {text}");
            assert_eq!(tokenizer.encode(text).unwrap().len(), *n_tokens);
        }
        let distinct: std::collections::HashSet<&String> = first.iter().map(|(t, _)| t).collect();
        assert_eq!(distinct.len(), 40);
    }
}
