//! `my-claw --bench`: throughput of the local engine on this machine, through the same
//! `EngineHandle` the server uses. Optionally compares with candle-transformers' own
//! quantized model on the same file, or measures the aggregate decode rate of several
//! simultaneous streams (`--parallel`). It owns no model code and touches no database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;

use crate::domain::{ChatTurn, Role};
use crate::llm::engine::device::{cpu_name, ComputeDevice};
use crate::llm::engine::gguf::{self, Architecture};
use crate::llm::engine::kernels::attention::KV_PAGE;
use crate::llm::engine::model::{KvType, ModelConfig};
use crate::llm::engine::{EngineConfig, EngineHandle, ModelInfo, RequestOptions};
use crate::llm::{Chunk, GenerationParams, LlmRequest, Usage};

/// Options of `my-claw --bench` / `my-claw bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// GGUF model file to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// CPU threads for the kernels (default: one per available core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt lengths to measure prefill at (comma list or repeated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![128usize, 512])]
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated per run (end-of-turn tokens are ignored so every run is this long).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
    /// Measured runs per case; the median is reported, after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Context size of the engine.
    #[arg(long, default_value_t = 4096)]
    pub n_ctx: usize,
    /// Turns of the conversation whose time to first token is measured.
    #[arg(long, default_value_t = 10)]
    pub turns: usize,
    /// Also time candle-transformers' quantized model on the same file and prompts.
    #[arg(long)]
    pub compare_reference: bool,
    /// Measure only the aggregate decode rate of this many simultaneous streams (a comma
    /// list, e.g. `1,2,4`), each generating `--gen-tokens` after a short prompt.
    /// 1 to 64 streams each.
    #[arg(long, value_delimiter = ',',
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub parallel: Vec<usize>,
    /// KV cache storage: `f16` or `f32`.
    #[arg(long, default_value = "f16")]
    pub kv_type: String,
}

/// Run the benchmark; prints a table (or JSON) and saves the JSON under `data_dir/bench/`.
/// Async: it runs inside the caller's tokio runtime; the model runs on the engine thread.
pub async fn run(args: &BenchArgs, data_dir: &Path, device: &ComputeDevice) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        // Our kernels read this when the model loads. candle (the reference model only)
        // sizes its pools from the variables the first time one of its kernels runs, which
        // is after this point: nothing has touched candle yet in a bench process.
        crate::llm::engine::kernels::set_default_threads(threads);
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let threads = crate::llm::engine::kernels::default_threads();
    let report = if args.parallel.is_empty() {
        measure(args, threads, device).await?
    } else {
        measure_parallel(args, threads, device).await?
    };
    let json_text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    if args.json {
        println!("{json_text}");
    } else if args.parallel.is_empty() {
        print_table(&report);
    } else {
        print_parallel_table(&report);
    }
    save_report(data_dir, &json_text);
    Ok(())
}

/// Saves a measured report under `data_dir/bench/`; a failure is a warning, the report was
/// printed. The data directory is made here, private like the server makes it, and not
/// before: a bench that fails (a missing model) leaves no directory behind.
fn save_report(data_dir: &Path, json_text: &str) {
    let prepared = crate::config::ensure_writable_dir(data_dir)
        .map_err(|e| e.to_string())
        .and_then(|()| crate::db::set_private_mode(data_dir, 0o700).map_err(|e| e.to_string()));
    if let Err(err) = prepared {
        tracing::warn!(%err, "cannot save the bench report");
        return;
    }
    let dir = data_dir.join("bench");
    if let Err(err) = std::fs::create_dir_all(&dir) {
        tracing::warn!(path = %dir.display(), %err, "cannot save the bench report");
        return;
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let path = dir.join(format!("bench-{stamp}.json"));
    // `last.json` is what `/api/health` shows as this machine's latest result.
    for path in [path, dir.join("last.json")] {
        if let Err(err) = std::fs::write(&path, json_text) {
            tracing::warn!(path = %path.display(), %err, "cannot save the bench report");
        }
    }
}

async fn measure(
    args: &BenchArgs,
    threads: usize,
    device: &ComputeDevice,
) -> anyhow::Result<serde_json::Value> {
    let runs = args.runs.max(1);
    let config = bench_config(args, 1, device)?;
    let peak = PeakDeviceMemory::start(device);
    let engine = EngineHandle::spawn(config).await.context("cannot start the engine")?;
    let info = engine.info().clone();
    // The tokenizer of the same file sizes the prompts exactly.
    let model_file = gguf::open(&args.model)?;
    let tokenizer = model_file.tokenizer()?;
    let arch = model_file.hparams.arch;

    let fixed = RequestOptions { ignore_stop: true, reuse_cache: false };
    let mut prefill_tok_s = BTreeMap::new();
    let mut decode_by_prompt = BTreeMap::new();
    let mut ttft_ms = BTreeMap::new();
    let mut prompts = BTreeMap::new();
    // A short prompt first: decode there is "decode at empty context".
    let mut lengths = vec![0usize];
    lengths.extend(args.prompt_tokens.iter().copied());
    for &n_tokens in &lengths {
        let text = filler_text(&tokenizer, n_tokens);
        let request = user_request(&text, args.gen_tokens);
        let mut samples = Vec::new();
        for run_idx in 0..=runs {
            let usage = complete(&engine, request.clone(), fixed).await?.1;
            if run_idx > 0 {
                samples.push(usage);
            }
        }
        let prompt_len = samples[0].prompt_tokens;
        let key = if n_tokens == 0 { "short".to_string() } else { n_tokens.to_string() };
        prompts.insert(key.clone(), (prompt_len, text));
        let decode = median(samples.iter().map(decode_rate).collect());
        decode_by_prompt.insert(key.clone(), round1(decode));
        if n_tokens > 0 {
            let prefill = median(
                samples.iter().map(|u| rate(u.prompt_tokens as f64, u.prefill_ms)).collect(),
            );
            prefill_tok_s.insert(key.clone(), round1(prefill));
            ttft_ms.insert(key, median(samples.iter().map(|u| u.ttft_ms as f64).collect()));
        }
    }
    let decode_tok_s = decode_by_prompt.get("short").copied().unwrap_or_default();
    // The KV cache of the longest sequence measured (whole pages).
    let per_token = ModelConfig::from_hparams(&model_file.hparams, 0).cache_bytes_per_token();
    let longest =
        prompts.values().map(|(n, _)| *n as usize).max().unwrap_or(0) + args.gen_tokens as usize;
    let kv_cache_bytes = (longest.div_ceil(KV_PAGE) * KV_PAGE) as u64 * per_token;

    let turn_answer_tokens = args.gen_tokens.min(32);
    let turn_ttft = conversation(&engine, args.turns, turn_answer_tokens, true).await?;
    let turn_ttft_no_reuse = conversation(&engine, args.turns, turn_answer_tokens, false).await?;
    // Peak RSS before the reference model (if any) is loaded into this process.
    let peak_rss_mb = peak_rss_mb();
    let peak_device_mb = peak.stop();
    let stats = engine.stats();
    drop(engine);
    // The constrained decoder's per-token mask next to the decode step it precedes.
    let mask = crate::llm::engine::constraint::measure_mask_cost(&tokenizer, runs.max(3))?;
    let decode_step_us = if decode_tok_s > 0.0 { 1e6 / decode_tok_s } else { 0.0 };
    let constraint = json!({
        "token_env_ms": round1(mask.token_env_ms),
        "mask_us_in_call": round1(mask.call_mask_us),
        "mask_us_free_text": round1(mask.free_mask_us),
        "call_tokens": mask.call_tokens,
        "free_tokens": mask.free_tokens,
        "decode_step_us": round1(decode_step_us),
        "mask_share_of_step_in_call": if decode_step_us > 0.0 {
            (mask.call_mask_us / decode_step_us * 1000.0).round() / 1000.0
        } else {
            0.0
        },
    });

    let reference = if args.compare_reference {
        let path = args.model.clone();
        let gen = args.gen_tokens as usize;
        let cases: Vec<(String, Vec<u32>)> = prompts
            .iter()
            .filter(|(key, _)| key.as_str() != "short")
            .map(|(key, (_, text))| {
                let rendered = crate::llm::engine::template::render(
                    crate::llm::engine::template::ChatFormat::for_arch(arch),
                    &[ChatTurn::new(Role::User, text.clone())],
                    &[],
                    false,
                );
                (key.clone(), tokenizer.encode(&rendered).unwrap_or_default())
            })
            .collect();
        let result =
            tokio::task::spawn_blocking(move || reference_bench(&path, arch, &cases, gen, runs))
                .await
                .context("the reference benchmark panicked")??;
        Some(result)
    } else {
        None
    };

    let mut report = with_model_fields(
        &info,
        threads,
        json!({
            "n_ctx": info.n_ctx,
            "gen_tokens": args.gen_tokens,
            "runs": runs,
            "load_ms": info.load_ms,
            "prompt_tokens_actual": prompts.iter().map(|(k, v)| (k.clone(), v.0)).collect::<BTreeMap<_, _>>(),
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
            "decode_tok_s_by_prompt": decode_by_prompt,
            "ttft_ms": ttft_ms,
            "peak_rss_mb": peak_rss_mb,
            "peak_device_memory_mb": peak_device_mb,
            "kv_cache_mb": (kv_cache_bytes as f64 / 1e6).round(),
            "rss_ratio": (peak_rss_mb as f64 * 1048576.0 / (info.file_size + kv_cache_bytes) as f64
                * 100.0)
                .round()
                / 100.0,
            "turn_ttft_ms": turn_ttft,
            "turn_ttft_no_reuse_ms": turn_ttft_no_reuse,
            "engine_requests_served": stats.requests_served,
            "constraint": constraint,
        }),
    );
    if let (Some(reference), Some(object)) = (reference, report.as_object_mut()) {
        object.insert("reference".to_string(), reference);
    }
    Ok(report)
}

fn bench_config(
    args: &BenchArgs,
    parallel: usize,
    device: &ComputeDevice,
) -> anyhow::Result<EngineConfig> {
    let Some(kv_type) = KvType::from_setting(&args.kv_type) else {
        anyhow::bail!("--kv-type {}: must be f16 or f32", args.kv_type)
    };
    Ok(EngineConfig {
        model_path: args.model.clone(),
        n_ctx: args.n_ctx,
        queue_capacity: 64,
        parallel,
        kv_cache_sequences: 4,
        kv_cache_max_bytes: 8 << 30,
        kv_type,
        device: device.clone(),
    })
}

/// Aggregate decode rate of 1, 2, 4… simultaneous streams on one engine (continuous
/// batching): every stream gets its own short prompt and generates `gen_tokens` tokens; all
/// are submitted at once, so they are prefilled in the same step and decode together. The
/// rate is the decode tokens of all streams over the longest stream's decode time.
///
/// The stream counts take turns (a round runs each once; `runs` rounds after a warm-up
/// round), so that a machine whose speed drifts over tens of seconds (shared hosts) slows
/// every count alike; each rate is the median over the rounds, and each ratio to one
/// stream the median of the rounds' own ratios.
async fn measure_parallel(
    args: &BenchArgs,
    threads: usize,
    device: &ComputeDevice,
) -> anyhow::Result<serde_json::Value> {
    let runs = args.runs.max(1);
    let counts: Vec<usize> = args.parallel.iter().map(|&n| n.max(1)).collect();
    let most = counts.iter().copied().max().unwrap_or(1);
    let peak = PeakDeviceMemory::start(device);
    let engine = EngineHandle::spawn(bench_config(args, most, device)?)
        .await
        .context("cannot start the engine")?;
    let info = engine.info().clone();
    let fixed = RequestOptions { ignore_stop: true, reuse_cache: false };
    // samples[round][i]: the rate of `counts[i]` streams in that round.
    let mut samples: Vec<Vec<f64>> = Vec::new();
    for run_idx in 0..=runs {
        let mut round = Vec::new();
        for &streams in &counts {
            let requests = (0..streams).map(|i| {
                let question = QUESTIONS[(i + run_idx) % QUESTIONS.len()];
                complete(&engine, user_request(question, args.gen_tokens), fixed)
            });
            let results = futures::future::join_all(requests).await;
            let mut tokens = 0.0;
            let mut longest_ms = 0u64;
            for result in results {
                let usage = result?.1;
                tokens += usage.completion_tokens.saturating_sub(1) as f64;
                longest_ms = longest_ms.max(usage.decode_ms);
            }
            round.push(rate(tokens, longest_ms));
        }
        // The first round warms up.
        if run_idx > 0 {
            samples.push(round);
        }
    }
    let one = counts.iter().position(|&n| n == 1);
    let mut aggregate = BTreeMap::new();
    let mut per_stream = BTreeMap::new();
    let mut speedup = BTreeMap::new();
    for (i, &streams) in counts.iter().enumerate() {
        let total = median(samples.iter().map(|round| round[i]).collect());
        aggregate.insert(streams.to_string(), round1(total));
        per_stream.insert(streams.to_string(), round1(total / streams as f64));
        let ratio = one.map_or(0.0, |o| {
            median(
                samples
                    .iter()
                    .filter(|round| round[o] > 0.0)
                    .map(|round| round[i] / round[o])
                    .collect(),
            )
        });
        speedup.insert(streams.to_string(), (ratio * 100.0).round() / 100.0);
    }
    Ok(with_model_fields(
        &info,
        threads,
        json!({
            "kv_type": args.kv_type,
            "gen_tokens": args.gen_tokens,
            "runs": runs,
            "load_ms": info.load_ms,
            "parallel_decode_tok_s": aggregate,
            "parallel_decode_tok_s_per_stream": per_stream,
            "parallel_speedup": speedup,
            "parallel_rounds": samples
                .iter()
                .map(|round| round.iter().map(|&r| round1(r)).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            "peak_rss_mb": peak_rss_mb(),
            "peak_device_memory_mb": peak.stop(),
        }),
    ))
}

/// `fields` plus what every report carries: which model, on which CPU and kernels.
fn with_model_fields(
    info: &ModelInfo,
    threads: usize,
    mut fields: serde_json::Value,
) -> serde_json::Value {
    let model = json!({
        "model_file": info.path.display().to_string(),
        "model_name": info.name,
        "arch": info.arch,
        "quantization": info.quantization,
        "file_size_mb": (info.file_size as f64 / 1e6).round(),
        "threads": threads,
        "isa": crate::llm::engine::kernels::Isa::detect().name(),
        "cpu_model": cpu_name(),
        "device": info.device.id,
        "device_name": info.device.name,
        "decode_path": info.decode_path,
        "weights_mb": (info.weight_bytes as f64 / 1e6).round(),
    });
    if let (Some(fields), serde_json::Value::Object(model)) = (fields.as_object_mut(), model) {
        fields.extend(model);
    }
    fields
}

fn print_parallel_table(report: &serde_json::Value) {
    let get = |key: &str| report.get(key).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "model      {} ({}, {}, {} MB), KV {}",
        get("model_file"),
        get("arch"),
        get("quantization"),
        get("file_size_mb"),
        get("kv_type")
    );
    print_device_line(&get);
    println!();
    println!("{:<10} {:>16} {:>16} {:>10}", "streams", "decode tok/s", "per stream", "vs 1");
    let aggregate = get("parallel_decode_tok_s");
    let per_stream = get("parallel_decode_tok_s_per_stream");
    let speedup = get("parallel_speedup");
    let mut keys: Vec<String> =
        aggregate.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    keys.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
    for key in keys {
        let cell = |v: &serde_json::Value| v.get(&key).map_or("-".to_string(), |x| x.to_string());
        println!(
            "{:<10} {:>16} {:>16} {:>10}",
            key,
            cell(&aggregate),
            cell(&per_stream),
            cell(&speedup)
        );
    }
}

/// Send one request and wait for its end: the text and the usage.
async fn complete(
    engine: &EngineHandle,
    request: LlmRequest,
    options: RequestOptions,
) -> anyhow::Result<(String, Usage)> {
    let mut stream = engine.submit_with(request, options)?;
    let mut text = String::new();
    while let Some(item) = stream.recv().await {
        match item? {
            Chunk::Text(piece) => text.push_str(&piece),
            // The benchmark offers no tools.
            Chunk::Notice { .. } | Chunk::ToolCall(_) | Chunk::Accepted { .. } => {}
            Chunk::Done { usage, .. } => return Ok((text, usage)),
        }
    }
    anyhow::bail!("the engine stopped before finishing a request")
}

/// Time to first token of each turn of a conversation with short questions.
async fn conversation(
    engine: &EngineHandle,
    turns: usize,
    answer_tokens: u32,
    reuse: bool,
) -> anyhow::Result<Vec<u64>> {
    let options = RequestOptions { ignore_stop: false, reuse_cache: reuse };
    let mut messages = vec![ChatTurn::new(Role::System, "You are a concise, helpful assistant.")];
    let mut ttfts = Vec::with_capacity(turns);
    for turn in 0..turns {
        messages.push(ChatTurn::new(Role::User, QUESTIONS[turn % QUESTIONS.len()]));
        let request = LlmRequest {
            messages: messages.clone(),
            params: GenerationParams::greedy(answer_tokens),
            tools: Default::default(),
        };
        let (answer, usage) = complete(engine, request, options).await?;
        ttfts.push(usage.ttft_ms);
        messages.push(ChatTurn::new(Role::Assistant, answer));
    }
    Ok(ttfts)
}

const QUESTIONS: [&str; 10] = [
    "What is the capital of France, and what is it famous for?",
    "Give me three tips to sleep better.",
    "How do I boil an egg so that the yolk stays soft?",
    "Explain in two sentences what a hash table is.",
    "Suggest a name for a grey cat.",
    "What should I pack for a weekend of hiking in the mountains?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why is the sky blue?",
    "Write a haiku about autumn rain.",
    "Summarise our conversation so far in one sentence.",
];

fn user_request(text: &str, max_tokens: u32) -> LlmRequest {
    LlmRequest {
        messages: vec![ChatTurn::new(Role::User, text)],
        params: GenerationParams::greedy(max_tokens),
        tools: Default::default(),
    }
}

/// User text that makes a rendered prompt of about `n_tokens` tokens (the template adds a
/// few more; the report gives the real counts). 0 gives a one-line prompt.
fn filler_text(
    tokenizer: &crate::llm::engine::tokenizer::GgufTokenizer,
    n_tokens: usize,
) -> String {
    const SENTENCE: &str = "The quick brown fox jumps over the lazy dog near the river bank. ";
    if n_tokens == 0 {
        return "Hello!".to_string();
    }
    let mut text = String::new();
    let target = n_tokens.saturating_sub(10).max(1);
    while tokenizer.encode(&text).map(|t| t.len()).unwrap_or(usize::MAX) < target {
        text.push_str(SENTENCE);
    }
    match tokenizer.encode(&text) {
        Ok(tokens) if tokens.len() > target => tokenizer.decode(&tokens[..target]).unwrap_or(text),
        _ => text,
    }
}

/// candle-transformers' `quantized_qwen3` / `quantized_llama` on the same tokens: greedy
/// decode of `gen` tokens after each prompt, median of `runs` after a warm-up.
fn reference_bench(
    path: &Path,
    arch: Architecture,
    cases: &[(String, Vec<u32>)],
    gen: usize,
    runs: usize,
) -> anyhow::Result<serde_json::Value> {
    use candle_core::{Device, Tensor};
    use candle_transformers::models::{quantized_llama, quantized_qwen3};

    enum Reference {
        Qwen3(quantized_qwen3::ModelWeights),
        Llama(quantized_llama::ModelWeights),
    }
    impl Reference {
        fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
            let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
            let logits = match self {
                Reference::Qwen3(m) => m.forward(&input, pos)?,
                Reference::Llama(m) => m.forward(&input, pos)?,
            };
            logits.flatten_all()?.to_vec1::<f32>()
        }
        fn reset(&mut self) {
            // quantized_llama restarts its cache whenever a forward starts at position 0.
            if let Reference::Qwen3(m) = self {
                m.clear_kv_cache()
            }
        }
    }

    let started = Instant::now();
    let mut file = std::fs::File::open(path).context("cannot open the model file")?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .context("reference: cannot read the GGUF header")?;
    let mut model = match arch {
        Architecture::Qwen3 => Reference::Qwen3(quantized_qwen3::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
        Architecture::Llama => Reference::Llama(quantized_llama::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?),
    };
    let load_ms = started.elapsed().as_millis() as u64;
    let mut prefill = BTreeMap::new();
    let mut decode = BTreeMap::new();
    for (key, tokens) in cases {
        if tokens.is_empty() {
            continue;
        }
        let mut prefill_rates = Vec::new();
        let mut decode_rates = Vec::new();
        for run_idx in 0..=runs {
            model.reset();
            let t0 = Instant::now();
            let logits = model.forward(tokens, 0)?;
            let prefill_secs = t0.elapsed().as_secs_f64();
            let mut next = crate::llm::engine::sampling::argmax(&logits);
            let t1 = Instant::now();
            for step in 0..gen.saturating_sub(1) {
                let logits = model.forward(&[next], tokens.len() + step)?;
                next = crate::llm::engine::sampling::argmax(&logits);
            }
            let decode_secs = t1.elapsed().as_secs_f64();
            if run_idx > 0 {
                prefill_rates.push(tokens.len() as f64 / prefill_secs);
                decode_rates.push(gen.saturating_sub(1) as f64 / decode_secs);
            }
        }
        prefill.insert(key.clone(), round1(median(prefill_rates)));
        decode.insert(key.clone(), round1(median(decode_rates)));
    }
    Ok(json!({
        "implementation": "candle-transformers 0.11.1",
        "load_ms": load_ms,
        "prefill_tok_s": prefill,
        "decode_tok_s_by_prompt": decode,
    }))
}

fn print_table(report: &serde_json::Value) {
    let get = |key: &str| report.get(key).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "model      {} ({}, {}, {} MB)",
        get("model_file"),
        get("arch"),
        get("quantization"),
        get("file_size_mb")
    );
    print_device_line(&get);
    println!(
        "load       {} ms    peak RSS {} MB ({}× of file + largest KV cache, {} MB)",
        get("load_ms"),
        get("peak_rss_mb"),
        get("rss_ratio"),
        get("kv_cache_mb")
    );
    println!();
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>10}",
        "prompt", "tokens", "prefill tok/s", "decode tok/s", "ttft ms"
    );
    let actual = get("prompt_tokens_actual");
    let decode = get("decode_tok_s_by_prompt");
    let prefill = get("prefill_tok_s");
    let ttft = get("ttft_ms");
    if let Some(keys) = decode.as_object() {
        for key in keys.keys() {
            let cell =
                |v: &serde_json::Value| v.get(key).map_or("-".to_string(), |x| x.to_string());
            println!(
                "{:<10} {:>14} {:>14} {:>14} {:>10}",
                key,
                cell(&actual),
                cell(&prefill),
                cell(&decode),
                cell(&ttft)
            );
        }
    }
    if let Some(reference) = report.get("reference") {
        println!();
        println!("reference (candle-transformers, same file and tokens):");
        let decode = reference.get("decode_tok_s_by_prompt").cloned().unwrap_or_default();
        let prefill = reference.get("prefill_tok_s").cloned().unwrap_or_default();
        if let Some(keys) = prefill.as_object() {
            for key in keys.keys() {
                let cell =
                    |v: &serde_json::Value| v.get(key).map_or("-".to_string(), |x| x.to_string());
                println!("{:<10} {:>14} {:>14} {:>14}", key, "", cell(&prefill), cell(&decode));
            }
        }
    }
    if let Some(constraint) = report.get("constraint") {
        let field = |key: &str| constraint.get(key).cloned().unwrap_or_default();
        println!();
        println!(
            "constraint mask µs/token   {} in a tool call, {} in free text; decode step {} µs \
             (token env built once in {} ms)",
            field("mask_us_in_call"),
            field("mask_us_free_text"),
            field("decode_step_us"),
            field("token_env_ms")
        );
    }
    println!();
    println!("turn ttft ms (KV reuse)     {}", get("turn_ttft_ms"));
    println!("turn ttft ms (no reuse)     {}", get("turn_ttft_no_reuse_ms"));
}

/// Decode rate of one run: the first token comes from the prefill, the rest from decode
/// steps.
fn decode_rate(usage: &Usage) -> f64 {
    rate(usage.completion_tokens.saturating_sub(1) as f64, usage.decode_ms)
}

fn rate(count: f64, millis: u64) -> f64 {
    if millis == 0 {
        0.0
    } else {
        count * 1000.0 / millis as f64
    }
}

/// The median of `values` (0 when empty); shared with `bench_conversation`.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() % 2 {
        0 => (values[mid - 1] + values[mid]) / 2.0,
        _ => values[mid],
    }
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// `VmHWM` of this process in MB (Linux; 0 elsewhere).
fn peak_rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Which processor ran the figures: the CPU with its kernels, or the GPU with its memory.
fn print_device_line(get: &dyn Fn(&str) -> serde_json::Value) {
    match get("device").as_str() {
        Some("cpu") | None => println!(
            "cpu        {} — {} threads, {} kernels",
            get("cpu_model"),
            get("threads"),
            get("isa")
        ),
        Some(device) => println!(
            "device     {device}: {} — {} MB of weights, peak device memory {} MB (host CPU {})",
            get("device_name"),
            get("weights_mb"),
            get("peak_device_memory_mb"),
            get("cpu_model")
        ),
    }
}

/// The most device memory in use (all processes, as the driver reports it) while a bench
/// runs, sampled every 20 ms; `null` on the CPU.
struct PeakDeviceMemory {
    peak: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PeakDeviceMemory {
    fn start(device: &ComputeDevice) -> PeakDeviceMemory {
        let peak = Arc::new(AtomicU64::new(0));
        let task = device.is_gpu().then(|| {
            let (device, peak) = (device.clone(), peak.clone());
            tokio::spawn(async move {
                loop {
                    if let Some(used) = device.info().memory_used_bytes() {
                        peak.fetch_max(used, Ordering::Relaxed);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
        });
        PeakDeviceMemory { peak, task }
    }

    /// The peak in MB, or `null` where there is no device memory to watch.
    fn stop(&self) -> serde_json::Value {
        match &self.task {
            Some(task) => {
                task.abort();
                json!((self.peak.load(Ordering::Relaxed) as f64 / 1e6).round())
            }
            None => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_rates() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(rate(50.0, 500), 100.0);
        assert_eq!(rate(1.0, 0), 0.0);
    }
}
