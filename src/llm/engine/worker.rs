//! The engine thread: owns the model, runs one sequence at a time, reuses KV state.
//! It is the only owner of the candle model; it talks to callers only through the request
//! queue and each request's chunk channel, and knows nothing of HTTP or storage.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::llm::engine::gguf;
use crate::llm::engine::model::{KvCache, Logits, Model, ModelConfig};
use crate::llm::engine::sampling::Sampler;
use crate::llm::engine::template::{self, ChatFormat, ThinkFilter};
use crate::llm::engine::tokenizer::GgufTokenizer;
use crate::llm::engine::{EngineConfig, ModelInfo, RequestOptions, SharedStats};
use crate::llm::{Chunk, FinishReason, LlmError, LlmRequest, Usage};

/// One queued request and where its answer goes.
pub(crate) struct EngineRequest {
    pub(crate) request: LlmRequest,
    pub(crate) options: RequestOptions,
    pub(crate) reply: mpsc::Sender<Result<Chunk, LlmError>>,
    pub(crate) received: Instant,
}

/// Prompts are prefilled in slices of this many tokens: it bounds the activations' memory
/// (a 4B model's FFN activations are 39 KB per token) and lets a cancelled request stop
/// between slices.
const PREFILL_CHUNK: usize = 512;

/// Thread body: load, report readiness, then serve until every handle is gone.
pub(crate) fn run(
    config: EngineConfig,
    queue: std_mpsc::Receiver<EngineRequest>,
    ready: oneshot::Sender<Result<ModelInfo, LlmError>>,
    stats: Arc<SharedStats>,
) {
    let loaded = catch_unwind(AssertUnwindSafe(|| Engine::load(&config, stats)));
    let mut engine = match loaded {
        Ok(Ok((engine, info))) => {
            if ready.send(Ok(info)).is_err() {
                return;
            }
            engine
        }
        Ok(Err(err)) => {
            let _ = ready.send(Err(err));
            return;
        }
        Err(panic) => {
            let _ = ready.send(Err(LlmError::BadModel {
                path: config.model_path.display().to_string(),
                reason: format!("loading panicked: {}", panic_message(panic.as_ref())),
            }));
            return;
        }
    };
    // `recv` fails once every `EngineHandle` is dropped and the queue is drained.
    while let Ok(job) = queue.recv() {
        let reply = job.reply.clone();
        let outcome = catch_unwind(AssertUnwindSafe(|| engine.handle(job)));
        let err = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => err,
            Err(panic) => {
                tracing::error!(panic = %panic_message(panic.as_ref()), "engine request panicked");
                LlmError::Inference(format!(
                    "the engine panicked: {}",
                    panic_message(panic.as_ref())
                ))
            }
        };
        let _ = reply.blocking_send(Err(err));
    }
    tracing::info!("engine stopped: every handle was dropped");
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "unknown panic".to_string(),
    }
}

/// A finished sequence whose KV state is kept: `tokens` are exactly the positions in
/// `cache`.
struct CachedSequence {
    tokens: Vec<u32>,
    cache: KvCache,
}

struct Engine {
    model: Model,
    /// Logits of the last forward pass, reused from step to step.
    logits: Vec<f32>,
    tokenizer: GgufTokenizer,
    format: ChatFormat,
    n_ctx: usize,
    /// Least recently used first.
    cached: Vec<CachedSequence>,
    max_sequences: usize,
    max_bytes: u64,
    stats: Arc<SharedStats>,
}

impl Engine {
    fn load(
        config: &EngineConfig,
        stats: Arc<SharedStats>,
    ) -> Result<(Engine, ModelInfo), LlmError> {
        let started = Instant::now();
        let mut file = gguf::open(&config.model_path)?;
        let tokenizer = file.tokenizer()?;
        let hp = file.hparams.clone();
        let n_ctx = config.n_ctx.min(hp.context_length).max(2);
        let format = ChatFormat::for_arch(hp.arch);
        let model_config = ModelConfig::from_hparams(&hp, n_ctx);
        let mut reader = std::io::BufReader::new(&mut file.file);
        let model = match Model::load(&file.content, &mut reader, model_config) {
            Ok(model) => model,
            Err(err) => {
                return Err(LlmError::BadModel {
                    path: file.path.display().to_string(),
                    reason: format!("cannot load the weights: {err}"),
                })
            }
        };
        let load_ms = started.elapsed().as_millis() as u64;
        let info = ModelInfo {
            name: file.name.clone(),
            path: file.path.clone(),
            arch: hp.arch.as_str().to_string(),
            quantization: file.quantization.clone(),
            file_size: file.file_size,
            n_ctx,
            load_ms,
        };
        tracing::info!(model = %info.name, arch = %info.arch, n_ctx, load_ms, "model loaded");
        let engine = Engine {
            model,
            logits: Vec::new(),
            tokenizer,
            format,
            n_ctx,
            cached: Vec::new(),
            max_sequences: config.kv_cache_sequences,
            max_bytes: config.kv_cache_max_bytes,
            stats,
        };
        Ok((engine, info))
    }

    /// Run one request to its end, streaming into `job.reply`. An `Err` is sent by the
    /// caller; everything else (text, `Done`) is sent here.
    fn handle(&mut self, job: EngineRequest) -> Result<(), LlmError> {
        let EngineRequest { request, options, reply, received } = job;
        if reply.is_closed() {
            return Ok(());
        }
        let params = &request.params;
        let prompt_text = template::render(self.format, &request.messages, params.thinking);
        let prompt = match self.tokenizer.encode(&prompt_text) {
            Ok(tokens) => tokens,
            Err(err) => return Err(LlmError::Inference(format!("tokenizing the prompt: {err}"))),
        };
        if prompt.is_empty() {
            return Err(LlmError::Inference("the prompt is empty".to_string()));
        }
        // At least one position must stay free for the answer.
        if prompt.len() >= self.n_ctx {
            return Err(LlmError::ContextOverflow { n_tokens: prompt.len(), n_ctx: self.n_ctx });
        }

        let (mut cache, n_cached) = self.take_cache(&prompt, options.reuse_cache);
        let prefill_started = Instant::now();
        let mut prefilled = false;
        for chunk in prompt[n_cached..].chunks(PREFILL_CHUNK) {
            if reply.is_closed() {
                return Ok(());
            }
            self.forward(chunk, &mut cache)?;
            prefilled = true;
        }
        if !prefilled {
            return Err(LlmError::Inference("nothing to prefill".to_string()));
        }
        let prefill_ms = prefill_started.elapsed().as_millis() as u64;
        let prefill_secs = prefill_started.elapsed().as_secs_f64();

        let mut sampler = Sampler::new(params);
        let mut decoder = self.tokenizer.stream_decoder();
        let mut think_filter = ThinkFilter::new();
        let mut sequence = prompt.clone();
        let mut n_generated: u32 = 0;
        let mut first_text_at = None;
        let decode_started = Instant::now();
        let finish = loop {
            let recent_from = sequence.len().saturating_sub(params.repeat_last_n);
            let token = sampler.sample(&mut self.logits, &sequence[recent_from..]);
            if !options.ignore_stop && self.tokenizer.stop_ids().contains(&token) {
                break FinishReason::Stop;
            }
            n_generated += 1;
            let piece = match decoder.push(token) {
                Ok(piece) => piece.unwrap_or_default(),
                Err(err) => return Err(LlmError::Inference(format!("decoding: {err}"))),
            };
            let text = think_filter.push(&piece);
            if !text.is_empty() {
                first_text_at.get_or_insert_with(Instant::now);
                if reply.blocking_send(Ok(Chunk::Text(text))).is_err() {
                    break FinishReason::Cancelled;
                }
            }
            if n_generated >= params.max_tokens {
                break FinishReason::Length;
            }
            // Feeding the token takes one more position, which must fit in the context.
            if sequence.len() + 1 > self.n_ctx {
                break FinishReason::Length;
            }
            if reply.is_closed() {
                break FinishReason::Cancelled;
            }
            self.forward(&[token], &mut cache)?;
            sequence.push(token);
        };
        let decode_secs = decode_started.elapsed().as_secs_f64();
        let decode_ms = decode_started.elapsed().as_millis() as u64;
        // `sequence` now holds exactly the positions in `cache`.
        self.put_cache(sequence, cache, options.reuse_cache);

        if finish != FinishReason::Cancelled {
            let mut tail = think_filter.push(&decoder.finish());
            tail.push_str(&think_filter.finish());
            if !tail.is_empty() {
                first_text_at.get_or_insert_with(Instant::now);
                let _ = reply.blocking_send(Ok(Chunk::Text(tail)));
            }
        }
        let n_prefilled = prompt.len() - n_cached;
        let decode_steps = n_generated.saturating_sub(1) as f64;
        let prefill_tok_s = rate(n_prefilled as f64, prefill_secs);
        let decode_tok_s = rate(decode_steps, decode_secs);
        self.stats.record_request(prefill_tok_s, decode_tok_s);
        let ttft_ms = first_text_at.unwrap_or_else(Instant::now).duration_since(received);
        let usage = Usage {
            prompt_tokens: prompt.len() as u32,
            cached_tokens: n_cached as u32,
            completion_tokens: n_generated,
            prefill_ms,
            decode_ms,
            ttft_ms: ttft_ms.as_millis() as u64,
        };
        tracing::debug!(?usage, ?finish, prefill_tok_s, decode_tok_s, "request done");
        let _ = reply.blocking_send(Ok(Chunk::Done { usage, finish }));
        Ok(())
    }

    /// Logits of the last position of `tokens`, appending to `cache`. The logits buffer is
    /// the engine's own and reused, so a decode step allocates nothing here.
    fn forward(&mut self, tokens: &[u32], cache: &mut KvCache) -> Result<(), LlmError> {
        self.model
            .forward_into(tokens, cache, Logits::Last, &mut self.logits)
            .map_err(|err| LlmError::Inference(format!("forward pass: {err}")))
    }

    /// The cache to continue from: the kept sequence sharing the longest prefix with
    /// `prompt` (cut back to that prefix), else a fresh one. At least one prompt token is
    /// always left to prefill, because its logits are needed.
    fn take_cache(&mut self, prompt: &[u32], reuse: bool) -> (KvCache, usize) {
        let best = if reuse {
            self.cached
                .iter()
                .enumerate()
                .map(|(idx, seq)| (idx, common_prefix(&seq.tokens, prompt)))
                .max_by_key(|&(_, shared)| shared)
                .filter(|&(_, shared)| shared > 0)
        } else {
            None
        };
        match best {
            Some((idx, shared)) => {
                let mut seq = self.cached.remove(idx);
                let keep = shared.min(prompt.len() - 1);
                seq.cache.truncate(keep);
                self.publish_cache_stats();
                (seq.cache, keep)
            }
            None => (self.model.new_cache(self.n_ctx), 0),
        }
    }

    /// Keep a finished sequence as the most recent, then evict the least recent ones until
    /// both bounds hold.
    fn put_cache(&mut self, tokens: Vec<u32>, cache: KvCache, reuse: bool) {
        if !reuse || self.max_sequences == 0 {
            return;
        }
        self.cached.push(CachedSequence { tokens, cache });
        while self.cached.len() > self.max_sequences
            || (!self.cached.is_empty() && self.cached_bytes() > self.max_bytes)
        {
            self.cached.remove(0);
        }
        self.publish_cache_stats();
    }

    fn cached_bytes(&self) -> u64 {
        self.cached.iter().map(|seq| seq.cache.bytes()).sum()
    }

    fn publish_cache_stats(&self) {
        self.stats.record_cache(self.cached.len(), self.cached_bytes());
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn rate(count: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        count / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_shared_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
