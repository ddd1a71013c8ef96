//! `my-claw models pull NAME` and `my-claw models list`: download an official Qwen3 GGUF
//! with a progress line, and show the files in `MODELS_DIR` with their size, quantization
//! and the tiers that use them. Terminal output only; the work is in `llm::hub` and the tier
//! plan in `llm::router`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::RouterSettings;
use crate::llm::engine::gguf;
use crate::llm::hub::{self, DownloadProgress, HubConfig, ModelSpec};
use crate::llm::pool::human_bytes;
use crate::llm::router::{plan_tiers, PlanSource};
use crate::llm::LlmError;

/// `my-claw models …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ModelsCommand {
    /// Download a model into MODELS_DIR, e.g. `qwen3:8b` or `qwen3:14b-q8_0`.
    Pull { name: String },
    /// List the GGUF files in MODELS_DIR and the tiers that use them.
    List,
}

pub async fn run(cmd: ModelsCommand, settings: &RouterSettings) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::Pull { name } => pull(&name, settings).await,
        ModelsCommand::List => list(settings),
    }
}

async fn pull(name: &str, settings: &RouterSettings) -> anyhow::Result<()> {
    let spec = ModelSpec::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ModelSpec::Qwen3(model) = spec else {
        bail!("only Qwen3 names can be pulled (qwen3:4b, qwen3:8b, qwen3:14b, optionally with a quantization such as qwen3:8b-q8_0)");
    };
    std::fs::create_dir_all(&settings.models_dir)
        .with_context(|| format!("cannot create {}", settings.models_dir.display()))?;
    let config =
        HubConfig::new(&settings.hf_endpoint, settings.hf_token.clone(), &settings.models_dir);
    let final_path = settings.models_dir.join(model.file_name());
    if final_path.is_file() {
        println!(
            "{} is already there ({})",
            final_path.display(),
            human_bytes(file_len(&final_path))
        );
        return Ok(());
    }
    eprintln!("downloading {} from {}/{}", model.file_name(), config.endpoint, model.repo());
    let line = Arc::new(ProgressLine::new());
    let reporter = line.clone();
    let path = hub::pull(&config, &model, Arc::new(move |p| reporter.update(p)))
        .await
        .with_context(|| format!("pulling {}", model.name()))?;
    line.finish();
    println!("{} ({})", path.display(), human_bytes(file_len(&path)));
    Ok(())
}

fn list(settings: &RouterSettings) -> anyhow::Result<()> {
    let plans = plan_tiers(settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files = hub::find_gguf_files(&settings.models_dir);
    println!("models in {}:", settings.models_dir.display());
    if files.is_empty() {
        println!("  (no GGUF file)");
    }
    for file in &files {
        let summary = hub::read_gguf_summary(file);
        let (quant, arch) = match &summary {
            Ok(s) => (s.quantization.clone(), s.architecture.clone().unwrap_or_else(|| "?".into())),
            Err(e) => ("unreadable".to_string(), e.clone()),
        };
        let tiers: Vec<String> = plans
            .iter()
            .filter_map(|plan| match &plan.source {
                PlanSource::File { path, stand_in_for, .. } if same_file(path, file) => {
                    Some(match stand_in_for {
                        Some(wanted) => format!("{} (standing in for {wanted})", plan.tier),
                        None => plan.tier.to_string(),
                    })
                }
                _ => None,
            })
            .collect();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!(
            "  {name}  {}  {quant}  {arch}  tiers: {}",
            human_bytes(file_len(file)),
            if tiers.is_empty() { "-".to_string() } else { tiers.join(", ") }
        );
        // The checks `serve` runs at start (a download cut short, a missing tensor), said
        // here before a start is refused for them.
        if summary.is_ok() {
            if let Err(LlmError::BadModel { reason, .. }) = gguf::check(file) {
                println!("    cannot be used: {reason}");
            }
        }
    }
    println!("tiers:");
    for plan in &plans {
        let what = match &plan.source {
            PlanSource::File { path, stand_in_for: None, .. } => path.display().to_string(),
            PlanSource::File { path, stand_in_for: Some(wanted), pull_command } => format!(
                "{} standing in for {wanted} (missing; `{}`)",
                path.display(),
                pull_command.as_deref().unwrap_or_default()
            ),
            PlanSource::Missing { wanted, pull_command } => {
                format!("MISSING {wanted} (`{pull_command}`)")
            }
            PlanSource::Zai { model, has_key: true } => format!("Z.ai {model}"),
            PlanSource::Zai { model, has_key: false } => {
                format!("Z.ai {model}, no ZAI_API_KEY: answered by main")
            }
            PlanSource::Remote { base_url, model } => format!("{model} on {base_url}"),
        };
        println!("  {:<7}{:<16} {what}", plan.tier.as_str(), plan.configured);
        // A tier's own file (MODEL_MAIN=/elsewhere/x.gguf) is not in the listing above.
        if let PlanSource::File { path, .. } = &plan.source {
            match gguf::check(path) {
                Ok(()) => {}
                Err(LlmError::BadModel { reason, .. }) => {
                    println!("         cannot be used: {reason}")
                }
                Err(e) => println!("         cannot be used: {e}"),
            }
        }
    }
    Ok(())
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A one-line progress display on stderr, redrawn at most ten times a second.
struct ProgressLine {
    state: Mutex<(Instant, Option<Instant>, u64)>,
}

impl ProgressLine {
    fn new() -> Self {
        ProgressLine { state: Mutex::new((Instant::now(), None, 0)) }
    }

    fn update(&self, progress: DownloadProgress) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (started, last_draw, first_bytes) = &mut *state;
        if last_draw.is_some_and(|t| t.elapsed() < Duration::from_millis(100))
            && progress.downloaded < progress.total
        {
            return;
        }
        if last_draw.is_none() {
            // Bytes kept from an interrupted earlier download do not count for the speed.
            *first_bytes = progress.downloaded;
        }
        *last_draw = Some(Instant::now());
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = progress.downloaded.saturating_sub(*first_bytes) as f64 / secs;
        let percent = if progress.total > 0 {
            progress.downloaded as f64 * 100.0 / progress.total as f64
        } else {
            0.0
        };
        let retry = if progress.attempt > 1 {
            format!(" (try {})", progress.attempt)
        } else {
            String::new()
        };
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r  {percent:5.1}%  {} / {}  {}/s{retry}   ",
            human_bytes(progress.downloaded),
            human_bytes(progress.total),
            human_bytes(rate as u64)
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        eprintln!();
    }
}
