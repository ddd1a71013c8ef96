//! The forward pass for Qwen3 and Llama on our own kernels (`kernels`): weights stay in
//! their GGUF block formats, activations live in buffers allocated once and reused, and
//! each sequence's keys and values sit in a paged `KvCache` (f16 or f32) apart from the
//! model, so the worker can keep several. `forward_batch` runs several sequences in one
//! pass (each weight block read once for all their rows). Knows no tokenizer or scheduling;
//! its threads are the kernels' shared pool.

use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use half::f16;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use crate::llm::engine::gguf::{Architecture, HyperParams};
use crate::llm::engine::kernels::attention::{
    self, AttnSeq, KvElem, KvView, KV_PAGE, MAX_BATCH_SEQS,
};
use crate::llm::engine::kernels::{self, Acts, Isa, Product, QMatrix, ThreadPool, WeightType};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `i` with `i + d/2` (GPT-NeoX; llama.cpp's `LLAMA_ROPE_TYPE_NEOX`, used by qwen3).
    Neox,
    /// Pairs `2i` with `2i + 1` (llama.cpp's `NORM` type: its converter permutes q/k for
    /// llama, so GGUF llama weights expect the interleaved form).
    Interleaved,
}

crate::domain::named_enum! {
    /// How keys and values are stored in the cache.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum KvType {
        /// IEEE half: half the memory and reads of f32; the default (`KV_CACHE_TYPE=f16`).
        F16 = "f16",
        /// Exact f32 (`KV_CACHE_TYPE=f32`).
        F32 = "f32",
    }
}

impl KvType {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    /// From a setting as typed (`KV_CACHE_TYPE`, `--kv-type`): case and spaces do not matter.
    pub fn from_setting(text: &str) -> Option<KvType> {
        KvType::parse(&text.trim().to_ascii_lowercase())
    }
}

/// The shape of a model, as read from the GGUF metadata by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub rope_style: RopeStyle,
    /// Qwen3 normalises each query and key head before RoPE.
    pub qk_norm: bool,
    /// Positions the RoPE tables cover; also the largest cache a sequence may have.
    pub max_positions: usize,
    /// Threads the matrix products and attention run on (the shared pool of that size).
    pub threads: usize,
    /// Storage of the KV cache.
    pub kv_type: KvType,
}

impl ModelConfig {
    /// Bytes one cached position takes (all layers, keys and values).
    pub fn cache_bytes_per_token(&self) -> u64 {
        (self.n_layer * self.n_head_kv * 2 * self.head_dim * self.kv_type.bytes()) as u64
    }

    /// The forward pass's view of a checked GGUF: the architecture decides the RoPE pairing
    /// (NeoX halves for Qwen3; interleaved pairs for Llama, whose GGUF q/k are permuted)
    /// and whether q/k heads are normalised.
    pub fn from_hparams(hp: &HyperParams, max_positions: usize) -> ModelConfig {
        let (rope_style, qk_norm) = match hp.arch {
            Architecture::Qwen3 => (RopeStyle::Neox, true),
            Architecture::Llama => (RopeStyle::Interleaved, false),
        };
        ModelConfig {
            n_layer: hp.n_layer,
            n_embd: hp.n_embd,
            n_head: hp.n_head,
            n_head_kv: hp.n_head_kv,
            head_dim: hp.head_dim,
            rope_freq_base: hp.rope_freq_base,
            rms_norm_eps: hp.rms_norm_eps,
            rope_style,
            qk_norm,
            max_positions,
            threads: kernels::default_threads(),
            kv_type: KvType::F16,
        }
    }
}

/// Which logits `forward` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's: shape `(1, vocab)`.
    Last,
    /// Every position's: shape `(n_tokens, vocab)` (tests compare them).
    All,
}

/// The KV state of one sequence: per layer, pages of `KV_PAGE` positions holding keys and
/// values in the model's `KvType` (`kernels::attention` defines the layout; only one of the
/// two page lists is used). Pages are allocated as the sequence reaches them and never
/// move, so decode never copies the cache.
#[derive(Debug)]
pub struct KvCache {
    f32_layers: Vec<Vec<Box<[f32]>>>,
    f16_layers: Vec<Vec<Box<[f16]>>>,
    kv_type: KvType,
    n_tokens: usize,
    max_tokens: usize,
    page_values: usize,
}

impl KvCache {
    fn empty(kv_type: KvType, n_layer: usize, max_tokens: usize, page_values: usize) -> KvCache {
        let layers = |used: bool| if used { n_layer } else { 0 };
        KvCache {
            f32_layers: vec![Vec::new(); layers(kv_type == KvType::F32)],
            f16_layers: vec![Vec::new(); layers(kv_type == KvType::F16)],
            kv_type,
            n_tokens: 0,
            max_tokens,
            page_values,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// The most positions this cache may hold.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Forget every position from `n_tokens` on (used to reuse a shared prefix). The pages
    /// stay, to be overwritten by the next tokens.
    pub fn truncate(&mut self, n_tokens: usize) {
        self.n_tokens = self.n_tokens.min(n_tokens);
    }

    /// Bytes held by the allocated pages (what the memory bound must see).
    pub fn bytes(&self) -> u64 {
        let pages: usize = match self.kv_type {
            KvType::F32 => self.f32_layers.iter().map(Vec::len).sum(),
            KvType::F16 => self.f16_layers.iter().map(Vec::len).sum(),
        };
        (pages * self.page_values * self.kv_type.bytes()) as u64
    }

    /// Release pages past the stored positions, for a cache that is parked.
    pub fn shrink_to_fit(&mut self) {
        let keep = self.n_tokens.div_ceil(KV_PAGE);
        self.f32_layers.iter_mut().for_each(|layer| layer.truncate(keep));
        self.f16_layers.iter_mut().for_each(|layer| layer.truncate(keep));
    }

    /// A new cache holding a copy of the first `n_tokens` positions (whole pages are
    /// copied): a stored conversation shares its prefix with a new sequence and keeps its
    /// own state.
    pub fn clone_prefix(&self, n_tokens: usize) -> KvCache {
        let n_tokens = n_tokens.min(self.n_tokens);
        let pages = n_tokens.div_ceil(KV_PAGE);
        let copy = |layer: &Vec<Box<[f32]>>| layer[..pages].to_vec();
        let copy16 = |layer: &Vec<Box<[f16]>>| layer[..pages].to_vec();
        KvCache {
            f32_layers: self.f32_layers.iter().map(copy).collect(),
            f16_layers: self.f16_layers.iter().map(copy16).collect(),
            kv_type: self.kv_type,
            n_tokens,
            max_tokens: self.max_tokens,
            page_values: self.page_values,
        }
    }

    /// Make sure pages exist for `n_new` more positions.
    fn reserve_for(&mut self, n_new: usize) {
        let needed = (self.n_tokens + n_new).div_ceil(KV_PAGE);
        let page_values = self.page_values;
        for layer in &mut self.f32_layers {
            while layer.len() < needed {
                layer.push(vec![0f32; page_values].into_boxed_slice());
            }
        }
        for layer in &mut self.f16_layers {
            while layer.len() < needed {
                layer.push(vec![f16::ZERO; page_values].into_boxed_slice());
            }
        }
    }
}

/// The page lists of a cache for one storage type (the forward pass is generic over it).
trait CacheElem: KvElem {
    fn layers(cache: &KvCache) -> &[Vec<Box<[Self]>>];
    fn layers_mut(cache: &mut KvCache) -> &mut [Vec<Box<[Self]>>];
}

impl CacheElem for f32 {
    fn layers(cache: &KvCache) -> &[Vec<Box<[f32]>>] {
        &cache.f32_layers
    }
    fn layers_mut(cache: &mut KvCache) -> &mut [Vec<Box<[f32]>>] {
        &mut cache.f32_layers
    }
}

impl CacheElem for f16 {
    fn layers(cache: &KvCache) -> &[Vec<Box<[f16]>>] {
        &cache.f16_layers
    }
    fn layers_mut(cache: &mut KvCache) -> &mut [Vec<Box<[f16]>>] {
        &mut cache.f16_layers
    }
}

/// A sequence's KV state as `Model::forward_batch` reads it: a `KvCache`, or a cache that
/// holds one (the backend's `Cache`, whose variant the backend checks before the pass). It
/// lets the backend hand its batch over as it is, with no per-step allocation.
pub trait KernelCache {
    fn kv(&self) -> &KvCache;
    fn kv_mut(&mut self) -> &mut KvCache;
}

impl KernelCache for KvCache {
    fn kv(&self) -> &KvCache {
        self
    }
    fn kv_mut(&mut self) -> &mut KvCache {
        self
    }
}

/// One sequence's part of `Model::forward_batch` (and of `CandleModel`'s, with its cache).
pub struct SeqBatch<'a, C = KvCache> {
    /// Tokens to run at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
    /// Which of its logits to return; `None` for none (a prefill chunk that is not the
    /// prompt's last).
    pub logits: Option<Logits>,
}

/// A loaded model: weights in their block formats, f32 norms and RoPE tables, the thread
/// pool, and the activation buffers (`Scratch`) that every forward pass reuses.
pub struct Model {
    config: ModelConfig,
    /// Kept quantized: only the looked-up rows are dequantized.
    token_embd: QMatrix,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// `None` when the embeddings are tied: the product then uses `token_embd`.
    output: Option<QMatrix>,
    rope: Rope,
    vocab_size: usize,
    pool: Arc<ThreadPool>,
    isa: Isa,
    scratch: Mutex<Scratch>,
}

struct Layer {
    attn_norm: Vec<f32>,
    attn_q: QMatrix,
    attn_k: QMatrix,
    attn_v: QMatrix,
    attn_output: QMatrix,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn_gate: QMatrix,
    ffn_up: QMatrix,
    ffn_down: QMatrix,
}

/// Activation buffers, grown to the largest batch seen and then reused: a decode step
/// allocates nothing.
#[derive(Default)]
struct Scratch {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: Acts,
}

/// Resize `buf` to `len` (contents are overwritten by the caller).
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..]
}

/// cos/sin of `position * inv_freq[i]`, computed in f64 and stored in f32, one row of
/// `head_dim / 2` values per position. f32 (not f16) keeps positions distinct far past 2048.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half_dim: usize,
}

impl Rope {
    fn new(head_dim: usize, base: f32, n_positions: usize) -> Rope {
        let half_dim = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half_dim)
            .map(|i| 1.0 / (base as f64).powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(n_positions * half_dim);
        let mut sin = Vec::with_capacity(n_positions * half_dim);
        for pos in 0..n_positions {
            for freq in &inv_freq {
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope { cos, sin, half_dim }
    }

    /// Rotate every head of `rows` (laid out `(n_tokens, n_heads, head_dim)`) in place; token
    /// `t` sits at position `start + t`.
    fn apply(&self, rows: &mut [f32], n_heads: usize, start: usize, style: RopeStyle) {
        let head_dim = 2 * self.half_dim;
        for (t, token) in rows.chunks_exact_mut(n_heads * head_dim).enumerate() {
            let table = (start + t) * self.half_dim;
            let cos = &self.cos[table..table + self.half_dim];
            let sin = &self.sin[table..table + self.half_dim];
            for head in token.chunks_exact_mut(head_dim) {
                match style {
                    RopeStyle::Neox => {
                        let (lo, hi) = head.split_at_mut(self.half_dim);
                        for (((x, y), c), s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                            let (a, b) = (*x, *y);
                            *x = a * c - b * s;
                            *y = b * c + a * s;
                        }
                    }
                    RopeStyle::Interleaved => {
                        for ((pair, c), s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                            let (a, b) = (pair[0], pair[1]);
                            pair[0] = a * c - b * s;
                            pair[1] = a * s + b * c;
                        }
                    }
                }
            }
        }
    }
}

impl Model {
    /// Load every tensor the forward pass needs from an opened GGUF file. The caller has
    /// checked the architecture and read `config` from the metadata. Each matrix's blocks
    /// are read straight into the buffer the kernels use (no intermediate copy), so the
    /// resident size is the weights' size.
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        config: ModelConfig,
    ) -> candle_core::Result<Model> {
        let mut loader = Loader { content, reader };
        let token_embd = loader.matrix("token_embd.weight")?;
        let vocab_size = token_embd.rows();
        if token_embd.cols() != config.n_embd {
            candle_core::bail!(
                "token_embd.weight has width {}, expected {}",
                token_embd.cols(),
                config.n_embd
            )
        }
        if config.head_dim > attention::MAX_HEAD_DIM || !config.head_dim.is_multiple_of(8) {
            candle_core::bail!("head width {} is not supported", config.head_dim)
        }
        if config.n_head_kv == 0
            || !config.n_head.is_multiple_of(config.n_head_kv)
            || config.n_head / config.n_head_kv > attention::MAX_GROUP
        {
            candle_core::bail!("{} query heads over {} KV heads", config.n_head, config.n_head_kv)
        }
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let name = |what: &str| format!("blk.{i}.{what}.weight");
            let (q_norm, k_norm) = if config.qk_norm {
                (
                    Some(loader.vector(&name("attn_q_norm"), config.head_dim)?),
                    Some(loader.vector(&name("attn_k_norm"), config.head_dim)?),
                )
            } else {
                (None, None)
            };
            let q_width = config.n_head * config.head_dim;
            let kv_width = config.n_head_kv * config.head_dim;
            let layer = Layer {
                attn_norm: loader.vector(&name("attn_norm"), config.n_embd)?,
                attn_q: loader.shaped(&name("attn_q"), q_width, config.n_embd)?,
                attn_k: loader.shaped(&name("attn_k"), kv_width, config.n_embd)?,
                attn_v: loader.shaped(&name("attn_v"), kv_width, config.n_embd)?,
                attn_output: loader.shaped(&name("attn_output"), config.n_embd, q_width)?,
                q_norm,
                k_norm,
                ffn_norm: loader.vector(&name("ffn_norm"), config.n_embd)?,
                ffn_gate: loader.matrix(&name("ffn_gate"))?,
                ffn_up: loader.matrix(&name("ffn_up"))?,
                ffn_down: loader.matrix(&name("ffn_down"))?,
            };
            let n_ff = layer.ffn_gate.rows();
            if layer.ffn_gate.cols() != config.n_embd
                || (layer.ffn_up.rows(), layer.ffn_up.cols()) != (n_ff, config.n_embd)
                || (layer.ffn_down.rows(), layer.ffn_down.cols()) != (config.n_embd, n_ff)
            {
                candle_core::bail!("layer {i}: feed-forward shapes do not agree")
            }
            layers.push(layer);
        }
        let output_norm = loader.vector("output_norm.weight", config.n_embd)?;
        // Tied embeddings: small models (and some Qwen3 files) have no output.weight and
        // project with the embedding table itself.
        let output = if content.tensor_infos.contains_key("output.weight") {
            Some(loader.shaped("output.weight", vocab_size, config.n_embd)?)
        } else {
            None
        };
        let rope = Rope::new(config.head_dim, config.rope_freq_base, config.max_positions);
        let pool = ThreadPool::shared(config.threads);
        Ok(Model {
            config,
            token_embd,
            layers,
            output_norm,
            output,
            rope,
            vocab_size,
            pool,
            isa: Isa::detect(),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// An empty cache for one sequence of at most `max_tokens` positions (capped by the
    /// RoPE tables). Pages are allocated as the sequence grows.
    pub fn new_cache(&self, max_tokens: usize) -> KvCache {
        KvCache::empty(
            self.config.kv_type,
            self.config.n_layer,
            max_tokens.min(self.config.max_positions),
            attention::page_values(self.config.n_head_kv, self.config.head_dim),
        )
    }

    /// Run `tokens` at positions `cache.len()..`, append their K/V to `cache` and return
    /// logits as a tensor (tests and tools; the worker uses `forward_into`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> candle_core::Result<Tensor> {
        let mut out = Vec::new();
        self.forward_into(tokens, cache, logits, &mut out)?;
        let rows = out.len() / self.vocab_size;
        Tensor::from_vec(out, (rows, self.vocab_size), &Device::Cpu)
    }

    /// Run `tokens` at positions `cache.len()..`, append their K/V to `cache` and write the
    /// logits into `out` (one row of `vocab_size` per returned position). Works for any
    /// split: a whole prompt, one decode step, or a prefill after decode steps (the next
    /// turn of a conversation). With a reused `out`, a decode step allocates nothing.
    pub fn forward_into(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        self.forward_batch(&mut [SeqBatch { tokens, cache, logits: Some(logits) }], out)
    }

    /// Run several sequences in one pass: their rows are stacked into one activation
    /// matrix, so every matrix product reads each weight block once for all of them; RoPE
    /// and the KV store use each row's own position and attention reads each sequence's
    /// own pages. Each row's arithmetic is the same as when its sequence runs alone (the
    /// kernels quantize and reduce per row), so batching does not change results. `out`
    /// gets the requested logits rows, sequence after sequence.
    pub fn forward_batch<C: KernelCache>(
        &self,
        seqs: &mut [SeqBatch<'_, C>],
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        if seqs.is_empty() || seqs.len() > MAX_BATCH_SEQS {
            candle_core::bail!("a batch takes 1 to {MAX_BATCH_SEQS} sequences, not {}", seqs.len())
        }
        for seq in seqs.iter() {
            if seq.tokens.is_empty() {
                candle_core::bail!("forward called with no tokens")
            }
            let cache = seq.cache.kv();
            if cache.kv_type != self.config.kv_type {
                candle_core::bail!(
                    "the cache stores {:?}, the model {:?}",
                    cache.kv_type,
                    self.config.kv_type
                )
            }
            check_chunk(seq.tokens, cache.len(), cache.max_tokens, self.vocab_size)?;
        }
        for seq in seqs.iter_mut() {
            seq.cache.kv_mut().reserve_for(seq.tokens.len());
        }
        match self.config.kv_type {
            KvType::F32 => self.forward_typed::<f32, C>(seqs, out),
            KvType::F16 => self.forward_typed::<f16, C>(seqs, out),
        }
        Ok(())
    }

    fn forward_typed<T: CacheElem, C: KernelCache>(
        &self,
        seqs: &mut [SeqBatch<'_, C>],
        out: &mut Vec<f32>,
    ) {
        let cfg = &self.config;
        let n_rows: usize = seqs.iter().map(|seq| seq.tokens.len()).sum();
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let (e, d) = (cfg.n_embd, cfg.head_dim);
        let (q_width, kv_width) = (cfg.n_head * d, cfg.n_head_kv * d);
        let hidden = sized(&mut s.hidden, n_rows * e);
        let all_tokens = seqs.iter().flat_map(|seq| seq.tokens.iter());
        for (row, &token) in hidden.chunks_exact_mut(e).zip(all_tokens) {
            self.token_embd.dequantize_row(token as usize, row);
        }
        let (pool, isa) = (&*self.pool, self.isa);
        let scale = 1.0 / (d as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let normed = sized(&mut s.normed, n_rows * e);
            rms_norm(&s.hidden, &layer.attn_norm, self.eps(), normed);
            let weights = [&layer.attn_q, &layer.attn_k, &layer.attn_v];
            s.acts.prepare(normed, n_rows, e, &weights);
            let q = sized(&mut s.q, n_rows * q_width);
            let k = sized(&mut s.k, n_rows * kv_width);
            let v = sized(&mut s.v, n_rows * kv_width);
            kernels::matmul_many(
                pool,
                isa,
                &s.acts,
                &mut [
                    Product { w: &layer.attn_q, out: &mut *q },
                    Product { w: &layer.attn_k, out: &mut *k },
                    Product { w: &layer.attn_v, out: &mut *v },
                ],
            );
            if let (Some(q_norm), Some(k_norm)) = (&layer.q_norm, &layer.k_norm) {
                rms_norm_in_place(q, q_norm, self.eps());
                rms_norm_in_place(k, k_norm, self.eps());
            }
            // RoPE and the KV store at each sequence's own positions.
            let mut row = 0;
            for seq in seqs.iter_mut() {
                let (n, start) = (seq.tokens.len(), seq.cache.kv().n_tokens);
                let q_rows = &mut q[row * q_width..(row + n) * q_width];
                self.rope.apply(q_rows, cfg.n_head, start, cfg.rope_style);
                let k_rows = &mut k[row * kv_width..(row + n) * kv_width];
                self.rope.apply(k_rows, cfg.n_head_kv, start, cfg.rope_style);
                let pages = &mut T::layers_mut(seq.cache.kv_mut())[l];
                let v_rows = &v[row * kv_width..(row + n) * kv_width];
                for (t, (k_row, v_row)) in
                    k_rows.chunks_exact(kv_width).zip(v_rows.chunks_exact(kv_width)).enumerate()
                {
                    let pos = start + t;
                    attention::store_kv(
                        &mut pages[pos / KV_PAGE],
                        cfg.n_head_kv,
                        d,
                        pos,
                        k_row,
                        v_row,
                    );
                }
                row += n;
            }
            let context = sized(&mut s.context, n_rows * q_width);
            // A fixed array, not a Vec: a decode step allocates nothing.
            let attn: [AttnSeq<'_, T>; MAX_BATCH_SEQS] = std::array::from_fn(|i| {
                let (pages, start, n_tokens) = match seqs.get(i) {
                    Some(seq) => {
                        let cache: &KvCache = seq.cache.kv();
                        (&T::layers(cache)[l][..], cache.n_tokens, seq.tokens.len())
                    }
                    None => (&[][..], 0, 0),
                };
                AttnSeq {
                    kv: KvView { pages, n_kv_heads: cfg.n_head_kv, head_dim: d },
                    start,
                    n_tokens,
                }
            });
            attention::attention_batch(
                pool,
                isa,
                q,
                &attn[..seqs.len()],
                cfg.n_head,
                scale,
                context,
            );
            s.acts.prepare(context, n_rows, q_width, &[&layer.attn_output]);
            let projected = sized(&mut s.projected, n_rows * e);
            kernels::matmul(pool, isa, &s.acts, &layer.attn_output, projected);
            add_in_place(&mut s.hidden, projected);

            // Feed-forward block (SwiGLU).
            let normed = sized(&mut s.normed, n_rows * e);
            rms_norm(&s.hidden, &layer.ffn_norm, self.eps(), normed);
            s.acts.prepare(normed, n_rows, e, &[&layer.ffn_gate, &layer.ffn_up]);
            let n_ff = layer.ffn_gate.rows();
            let gate = sized(&mut s.gate, n_rows * n_ff);
            let up = sized(&mut s.up, n_rows * n_ff);
            kernels::matmul_many(
                pool,
                isa,
                &s.acts,
                &mut [
                    Product { w: &layer.ffn_gate, out: &mut *gate },
                    Product { w: &layer.ffn_up, out: &mut *up },
                ],
            );
            kernels::activation::silu_mul(isa, gate, up);
            s.acts.prepare(gate, n_rows, n_ff, &[&layer.ffn_down]);
            let projected = sized(&mut s.projected, n_rows * e);
            kernels::matmul(pool, isa, &s.acts, &layer.ffn_down, projected);
            add_in_place(&mut s.hidden, projected);
        }
        for seq in seqs.iter_mut() {
            seq.cache.kv_mut().n_tokens += seq.tokens.len();
        }

        // The output head, only for the rows whose logits were asked for.
        let wanted = |seq: &SeqBatch<'_, C>| match seq.logits {
            None => 0,
            Some(Logits::Last) => 1,
            Some(Logits::All) => seq.tokens.len(),
        };
        let n_out: usize = seqs.iter().map(wanted).sum();
        out.resize(n_out * self.vocab_size, 0.0);
        if n_out == 0 {
            return;
        }
        let normed = sized(&mut s.normed, n_out * e);
        let (mut row, mut at) = (0, 0);
        for seq in seqs.iter() {
            let n = seq.tokens.len();
            for r in row + n - wanted(seq)..row + n {
                let dst = &mut normed[at * e..(at + 1) * e];
                rms_norm(&s.hidden[r * e..(r + 1) * e], &self.output_norm, self.eps(), dst);
                at += 1;
            }
            row += n;
        }
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        s.acts.prepare(normed, n_out, e, &[head]);
        kernels::matmul(pool, isa, &s.acts, head, out);
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }
}

/// What every forward pass checks of one sequence's chunk before running it: it fits the
/// cache (`stored` positions held of at most `max_tokens`) and every token is in the
/// vocabulary.
pub(crate) fn check_chunk(
    tokens: &[u32],
    stored: usize,
    max_tokens: usize,
    vocab_size: usize,
) -> candle_core::Result<()> {
    let end = stored + tokens.len();
    if end > max_tokens {
        candle_core::bail!("sequence of {end} positions exceeds the cache size {max_tokens}")
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        candle_core::bail!("token {bad} is outside the vocabulary of {vocab_size}")
    }
    Ok(())
}

/// `out[t] = x[t] / rms(x[t]) * weight` for each row of `weight.len()` values.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let inv = inv_rms(row, eps);
        for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// `rms_norm` of every `weight.len()`-wide piece of `x`, in place (Qwen3's per-head q/k norm).
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let inv = inv_rms(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v *= inv * w;
        }
    }
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    // Eight partial sums: vectorisable, and closer to the exact sum than one running total.
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for i in 0..8 {
            lanes[i] += chunk[i] * chunk[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    let mean = (lanes.iter().sum::<f32>() + tail) / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Reads tensors of one GGUF file for `Model::load`.
struct Loader<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
}

impl<R: Read + Seek> Loader<'_, R> {
    /// A matrix `(rows, cols)` in its stored format when the kernels have one, else widened
    /// to f32.
    fn matrix(&mut self, name: &str) -> candle_core::Result<QMatrix> {
        let info = match self.content.tensor_infos.get(name) {
            Some(info) => info,
            None => candle_core::bail!("tensor {name} is missing"),
        };
        let (rows, cols) = match info.shape.dims() {
            [rows, cols] => (*rows, *cols),
            dims => candle_core::bail!("tensor {name} has shape {dims:?}, expected a matrix"),
        };
        let kind = WeightType::from_ggml(info.ggml_dtype).filter(|t| cols % t.block_len() == 0);
        match kind {
            Some(ty) => {
                let len = rows * ty.row_bytes(cols);
                let mut bytes = vec![0u8; len];
                let at = self.content.tensor_data_offset + info.offset;
                self.reader.seek(SeekFrom::Start(at))?;
                self.reader.read_exact(&mut bytes)?;
                QMatrix::from_bytes(ty, rows, cols, bytes)
                    .map_err(|e| candle_core::Error::Msg(format!("tensor {name}: {e}")))
            }
            None => {
                // No kernel for this storage type (F16, Q2_K, …): widen once at load.
                let tensor = self.content.tensor(self.reader, name, &Device::Cpu)?;
                let floats = tensor.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(QMatrix::from_f32(rows, cols, floats))
            }
        }
    }

    /// A matrix that must have this shape.
    fn shaped(&mut self, name: &str, rows: usize, cols: usize) -> candle_core::Result<QMatrix> {
        let m = self.matrix(name)?;
        if (m.rows(), m.cols()) != (rows, cols) {
            candle_core::bail!("tensor {name} is {}x{}, expected {rows}x{cols}", m.rows(), m.cols())
        }
        Ok(m)
    }

    /// A vector of `len` values (norm weights), as f32.
    fn vector(&mut self, name: &str, len: usize) -> candle_core::Result<Vec<f32>> {
        let tensor = match self.content.tensor_infos.contains_key(name) {
            true => self.content.tensor(self.reader, name, &Device::Cpu)?,
            false => candle_core::bail!("tensor {name} is missing"),
        };
        let values = tensor.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        if values.len() != len {
            candle_core::bail!("tensor {name} has {} values, expected {len}", values.len())
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_type_settings_ignore_case_and_spaces_and_name_their_type() {
        for (text, expected) in
            [("f16", Some(KvType::F16)), (" F32 ", Some(KvType::F32)), ("bf16", None)]
        {
            assert_eq!(KvType::from_setting(text), expected, "{text:?}");
        }
        assert_eq!(KvType::F16.as_str(), "f16");
        assert_eq!(KvType::parse(KvType::F32.as_str()), Some(KvType::F32));
    }

    #[test]
    fn rope_neox_and_interleaved_rotate_the_right_pairs() {
        let rope = Rope::new(4, 10000.0, 4);
        // Position 1: angles are 1 and 0.01 for the two frequency pairs.
        let (c0, s0) = (1f32.cos(), 1f32.sin());
        let mut neox = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut neox, 1, 1, RopeStyle::Neox);
        assert!((neox[0] - c0).abs() < 1e-6 && (neox[2] - s0).abs() < 1e-6, "{neox:?}");
        let mut inter = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut inter, 1, 1, RopeStyle::Interleaved);
        assert!((inter[0] - c0).abs() < 1e-6 && (inter[1] - s0).abs() < 1e-6, "{inter:?}");
        // Position 0 is the identity.
        let mut same = vec![0.5, -1.0, 2.0, 3.0];
        rope.apply(&mut same, 1, 0, RopeStyle::Neox);
        assert_eq!(same, vec![0.5, -1.0, 2.0, 3.0]);
    }

    #[test]
    fn cache_pages_are_allocated_on_demand_and_kept_on_truncate() {
        let page_values = attention::page_values(2, 8);
        let mut cache = KvCache::empty(KvType::F32, 3, 4096, page_values);
        cache.reserve_for(3);
        assert_eq!(cache.bytes(), (3 * page_values * 4) as u64, "one page per layer");
        let first_page = cache.f32_layers[0][0].as_ptr();
        cache.n_tokens = 3;
        cache.reserve_for(KV_PAGE);
        assert_eq!(cache.f32_layers[0].len(), 2, "a second page once past {KV_PAGE} positions");
        assert_eq!(cache.f32_layers[0][0].as_ptr(), first_page, "pages never move");
        cache.n_tokens = KV_PAGE + 3;
        let copy = cache.clone_prefix(KV_PAGE + 1);
        assert_eq!((copy.len(), copy.f32_layers[2].len()), (KV_PAGE + 1, 2));
        assert_eq!(copy.f32_layers[0][1][..], cache.f32_layers[0][1][..]);
        assert_ne!(copy.f32_layers[0][0].as_ptr(), first_page, "a copy, not a share");
        cache.truncate(4);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.f32_layers[1].len(), 2, "truncate keeps pages for reuse");
        cache.shrink_to_fit();
        assert_eq!(cache.f32_layers[1].len(), 1);
        // f16 pages: half the bytes for the same positions.
        let mut half = KvCache::empty(KvType::F16, 3, 4096, page_values);
        half.reserve_for(3);
        assert_eq!(half.bytes(), (3 * page_values * 2) as u64);
        assert!(half.f32_layers.is_empty());
    }

    #[test]
    fn rms_norm_matches_the_definition() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0f32, 2.0, 1.0, 1.0, 1.0];
        let mut out = [0f32; 10];
        rms_norm(&x, &w, 0.0, &mut out);
        let rms = (25.0f32 / 5.0).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
        assert!(out[5..].iter().zip(&w).all(|(o, w)| (o - w).abs() < 1e-6));
    }
}
