//! The forward pass for Qwen3 and Llama on candle ops, with a KV cache we own.
//! Weights stay quantized (`QMatMul`); the model itself is immutable, so every sequence's
//! `KvCache` lives apart from it and the worker can keep several. No tokenizer, no threads.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::llm::engine::gguf::{Architecture, HyperParams};

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `i` with `i + d/2` (GPT-NeoX; llama.cpp's `LLAMA_ROPE_TYPE_NEOX`, used by qwen3).
    Neox,
    /// Pairs `2i` with `2i + 1` (llama.cpp's `NORM` type: its converter permutes q/k for
    /// llama, so GGUF llama weights expect the interleaved form).
    Interleaved,
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
}

impl ModelConfig {
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

/// The KV state of one sequence: per layer, rows of `(n_head_kv, 2 * head_dim)` floats with
/// K then V for each head, one row per position. That interleaved layout is what candle's
/// fused single-query attention kernel reads, so decode needs no copy of the cache.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Vec<f32>>,
    n_tokens: usize,
    row_len: usize,
    max_tokens: usize,
}

/// Growth step of a cache, in positions. Large steps keep reallocations rare; the `Vec`
/// keeps its capacity, so decode never copies the cache once a step is reserved.
const CACHE_GROWTH_TOKENS: usize = 512;

impl KvCache {
    /// Positions stored.
    pub fn len(&self) -> usize {
        self.n_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.n_tokens == 0
    }

    /// Forget every position from `n_tokens` on (used to reuse a shared prefix).
    pub fn truncate(&mut self, n_tokens: usize) {
        if n_tokens < self.n_tokens {
            for layer in &mut self.layers {
                layer.truncate(n_tokens * self.row_len);
            }
            self.n_tokens = n_tokens;
        }
    }

    /// Bytes held, counting reserved capacity (what the memory bound must see).
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|l| (l.capacity() * std::mem::size_of::<f32>()) as u64).sum()
    }

    /// Release the growth slack, for a cache that is parked and may not grow again soon.
    pub fn shrink_to_fit(&mut self) {
        for layer in &mut self.layers {
            layer.shrink_to_fit();
        }
    }

    fn reserve_for(&mut self, n_new: usize) {
        let needed = self.n_tokens + n_new;
        let capacity_tokens = self.layers.first().map_or(0, |l| l.capacity() / self.row_len);
        if needed <= capacity_tokens {
            return;
        }
        let target = needed
            .max(capacity_tokens * 2)
            .max(CACHE_GROWTH_TOKENS)
            .next_multiple_of(CACHE_GROWTH_TOKENS)
            .min(self.max_tokens.max(needed));
        for layer in &mut self.layers {
            layer.reserve_exact(target * self.row_len - layer.len());
        }
    }
}

/// A loaded model: quantized weights, f32 norms and RoPE tables.
pub struct Model {
    config: ModelConfig,
    /// Kept quantized: only the looked-up rows are dequantized.
    token_embd: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: QMatMul,
    rope: Rope,
    vocab_size: usize,
}

struct Layer {
    attn_norm: Tensor,
    attn_q: QMatMul,
    attn_k: QMatMul,
    attn_v: QMatMul,
    attn_output: QMatMul,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn_gate: QMatMul,
    ffn_up: QMatMul,
    ffn_down: QMatMul,
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
    /// checked the architecture and read `config` from the metadata.
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        config: ModelConfig,
    ) -> candle_core::Result<Model> {
        let device = Device::Cpu;
        let mut tensor = |name: &str| content.tensor(reader, name, &device);
        let token_embd = Arc::new(tensor("token_embd.weight")?);
        let (vocab_size, embd) = token_embd.shape().dims2()?;
        if embd != config.n_embd {
            candle_core::bail!("token_embd.weight has width {embd}, expected {}", config.n_embd)
        }
        let mut layers = Vec::with_capacity(config.n_layer);
        for layer_idx in 0..config.n_layer {
            let mut qmm = |what: &str| -> candle_core::Result<QMatMul> {
                QMatMul::from_qtensor(tensor(&format!("blk.{layer_idx}.{what}.weight"))?)
            };
            let attn_q = qmm("attn_q")?;
            let attn_k = qmm("attn_k")?;
            let attn_v = qmm("attn_v")?;
            let attn_output = qmm("attn_output")?;
            let ffn_gate = qmm("ffn_gate")?;
            let ffn_up = qmm("ffn_up")?;
            let ffn_down = qmm("ffn_down")?;
            let mut norm = |what: &str| -> candle_core::Result<Tensor> {
                tensor(&format!("blk.{layer_idx}.{what}.weight"))?.dequantize(&device)
            };
            let attn_norm = norm("attn_norm")?;
            let ffn_norm = norm("ffn_norm")?;
            let (q_norm, k_norm) = if config.qk_norm {
                (Some(norm("attn_q_norm")?), Some(norm("attn_k_norm")?))
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm,
                attn_q,
                attn_k,
                attn_v,
                attn_output,
                q_norm,
                k_norm,
                ffn_norm,
                ffn_gate,
                ffn_up,
                ffn_down,
            });
        }
        let output_norm = tensor("output_norm.weight")?.dequantize(&device)?;
        // Tied embeddings: small models (and some Qwen3 files) have no output.weight and
        // project with the embedding table itself.
        let output = if content.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(tensor("output.weight")?)?
        } else {
            QMatMul::from_arc(token_embd.clone())?
        };
        let rope = Rope::new(config.head_dim, config.rope_freq_base, config.max_positions);
        Ok(Model { config, token_embd, layers, output_norm, output, rope, vocab_size })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// An empty cache for one sequence of at most `max_tokens` positions (capped by the
    /// RoPE tables). Memory is reserved as the sequence grows, in large steps.
    pub fn new_cache(&self, max_tokens: usize) -> KvCache {
        KvCache {
            layers: vec![Vec::new(); self.config.n_layer],
            n_tokens: 0,
            row_len: self.config.n_head_kv * 2 * self.config.head_dim,
            max_tokens: max_tokens.min(self.config.max_positions),
        }
    }

    /// Bytes one cached position takes (all layers).
    pub fn cache_bytes_per_token(&self) -> u64 {
        (self.config.n_layer * self.config.n_head_kv * 2 * self.config.head_dim * 4) as u64
    }

    /// Run `tokens` at positions `cache.len()..`, append their K/V to `cache` and return
    /// logits. Works for any split: a whole prompt, one decode step, or a prefill after
    /// decode steps (the next turn of a conversation).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> candle_core::Result<Tensor> {
        let n_tokens = tokens.len();
        if n_tokens == 0 {
            candle_core::bail!("forward called with no tokens")
        }
        let start = cache.len();
        if start + n_tokens > cache.max_tokens {
            candle_core::bail!(
                "sequence of {} positions exceeds the cache size {}",
                start + n_tokens,
                cache.max_tokens
            )
        }
        cache.reserve_for(n_tokens);
        let ids = Tensor::from_slice(tokens, n_tokens, &Device::Cpu)?;
        let mut hidden = self.token_embd.embedding(&ids)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.attn_norm, self.eps())?;
            let attn = self.attention(layer, &normed, start, layer_cache)?;
            hidden = (hidden + attn)?;
            let normed = candle_nn::ops::rms_norm(&hidden, &layer.ffn_norm, self.eps())?;
            let gate = layer.ffn_gate.forward(&normed)?.silu()?;
            let up = layer.ffn_up.forward(&normed)?;
            let mlp = layer.ffn_down.forward(&(gate * up)?)?;
            hidden = (hidden + mlp)?;
        }
        cache.n_tokens = start + n_tokens;
        let hidden = match logits {
            Logits::Last => hidden.narrow(0, n_tokens - 1, 1)?,
            Logits::All => hidden,
        };
        let hidden = candle_nn::ops::rms_norm(&hidden, &self.output_norm, self.eps())?;
        self.output.forward(&hidden)
    }

    fn eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// Self-attention of `x` (`(n_tokens, n_embd)`, already normed) at positions
    /// `start..start + n_tokens`, appending this layer's K/V to `kv`.
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        start: usize,
        kv: &mut Vec<f32>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (n_tokens, _) = x.dims2()?;
        let head_dim = cfg.head_dim;
        let q = layer.attn_q.forward(x)?.reshape((n_tokens, cfg.n_head, head_dim))?;
        let k = layer.attn_k.forward(x)?.reshape((n_tokens, cfg.n_head_kv, head_dim))?;
        let v = layer.attn_v.forward(x)?;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(q_norm), Some(k_norm)) => (
                candle_nn::ops::rms_norm(&q, q_norm, self.eps())?,
                candle_nn::ops::rms_norm(&k, k_norm, self.eps())?,
            ),
            _ => (q, k),
        };
        let mut q = q.flatten_all()?.to_vec1::<f32>()?;
        let mut k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        self.rope.apply(&mut q, cfg.n_head, start, cfg.rope_style);
        self.rope.apply(&mut k, cfg.n_head_kv, start, cfg.rope_style);
        // Append rows `[k_h0, v_h0, k_h1, v_h1, …]`; capacity was reserved by the caller.
        for (k_row, v_row) in k.chunks_exact(head_dim).zip(v.chunks_exact(head_dim)) {
            kv.extend_from_slice(k_row);
            kv.extend_from_slice(v_row);
        }
        let kv_len = start + n_tokens;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let context = if n_tokens == 1 {
            // Decode: candle's fused kernel reads our cache in place.
            candle_nn::attention::cpu_flash::causal::causal_decode_f32_interleaved(
                &q,
                kv,
                cfg.n_head,
                cfg.n_head_kv,
                head_dim,
                kv_len,
                scale,
            )?
            .reshape((1, cfg.n_head * head_dim))?
        } else {
            // Prefill: batched matmuls (gemm) beat the row-by-row flash kernel here. Query
            // heads of one KV group are adjacent, so (n_head, T, D) reshapes to
            // (n_head_kv, group * T, D) and each group shares its keys without copies.
            let group = cfg.n_head / cfg.n_head_kv;
            let q = Tensor::from_vec(q, (n_tokens, cfg.n_head, head_dim), &Device::Cpu)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((cfg.n_head_kv, group * n_tokens, head_dim))?;
            let kv =
                Tensor::from_slice(&kv[..], (kv_len, cfg.n_head_kv, 2 * head_dim), &Device::Cpu)?;
            let keys = kv.narrow(2, 0, head_dim)?.transpose(0, 1)?.contiguous()?;
            let values = kv.narrow(2, head_dim, head_dim)?.transpose(0, 1)?.contiguous()?;
            let scores = (q.matmul(&keys.t()?)? * scale as f64)?;
            // Query `t` sees keys up to `start + t`: the causal mask shifted by the cache.
            let mask: Vec<f32> = (0..n_tokens)
                .flat_map(|t| {
                    (0..kv_len).map(move |s| if s > start + t { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n_tokens, kv_len), &Device::Cpu)?;
            let scores = scores
                .reshape((cfg.n_head_kv, group, n_tokens, kv_len))?
                .broadcast_add(&mask)?
                .reshape((cfg.n_head_kv, group * n_tokens, kv_len))?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            // (n_head_kv, group * T, D) → (n_head, T, D) → (T, n_head * D)
            probs
                .matmul(&values)?
                .reshape((cfg.n_head, n_tokens, head_dim))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n_tokens, cfg.n_head * head_dim))?
        };
        layer.attn_output.forward(&context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cache_grows_in_steps_and_truncates() {
        let mut cache =
            KvCache { layers: vec![Vec::new(); 2], n_tokens: 0, row_len: 8, max_tokens: 4096 };
        cache.reserve_for(3);
        assert_eq!(cache.layers[0].capacity(), CACHE_GROWTH_TOKENS * 8);
        let before = cache.bytes();
        cache.reserve_for(100);
        assert_eq!(cache.bytes(), before, "no reallocation inside a reserved step");
        for layer in &mut cache.layers {
            layer.extend(std::iter::repeat_n(1.0, 10 * 8));
        }
        cache.n_tokens = 10;
        cache.truncate(4);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.layers[1].len(), 32);
    }
}
