//! The forward pass for Qwen3 and Llama on candle tensors, for any candle device: CUDA in
//! production (`DEVICE=cuda`), candle's CPU device in the tests that check it against our
//! own kernels (`model.rs`). Weights stay in their GGUF block formats as `QMatMul`s on the
//! device (candle's `mmvq`/`mmq` kernels on CUDA); each sequence's keys and values live in a
//! `DeviceCache` on the same device, apart from the model, so the worker keeps several and
//! batches them exactly as it does on the CPU. Knows no tokenizer, scheduling or settings.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use crate::llm::engine::model::{check_chunk, KvType, Logits, ModelConfig, RopeStyle, SeqBatch};

/// How a GPU runs decode steps (`GPU_DECODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuDecode {
    /// The fused step (`kernels::cuda_decode`) on candle's `mmvq` matrix kernels and the
    /// two-pass RMSNorm: what `FusedOwn` falls back to, and to compare with it.
    Fused,
    /// The default: the fused step with our matrix kernels for Q4_K, Q6_K and Q8_0 (when
    /// they agree with candle's at load; `mmvq` for the other formats) and the one-pass
    /// RMSNorm. On an H200 it decoded the Qwen3-8B shape at 286 tok/s where `Fused` did 236.
    FusedOwn,
    /// `FusedOwn` with our matrix kernels launched as programmatic dependents of the kernel
    /// before each (compute capability 9.0 on): their blocks start, and load their first
    /// weights, while the small kernel before them runs. Not yet measured on a GPU.
    FusedOwnPdl,
    /// candle's ops: to compare, or to step around a problem with the fused step.
    Ops,
}

impl GpuDecode {
    /// The setting's value: `fused`, `fused-own`, `fused-own-pdl` or `ops` (any case).
    pub fn from_setting(value: &str) -> Option<GpuDecode> {
        match value.trim().to_ascii_lowercase().as_str() {
            "fused" => Some(GpuDecode::Fused),
            "fused-own" => Some(GpuDecode::FusedOwn),
            "fused-own-pdl" => Some(GpuDecode::FusedOwnPdl),
            "ops" => Some(GpuDecode::Ops),
            _ => None,
        }
    }

    /// The setting's value, and the decode path's name where it ran as asked.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuDecode::Fused => "fused",
            GpuDecode::FusedOwn => "fused-own",
            GpuDecode::FusedOwnPdl => "fused-own-pdl",
            GpuDecode::Ops => "ops",
        }
    }
}

/// The decode path of GPU models loaded from now on: `GpuDecode` as a number.
static GPU_DECODE: std::sync::atomic::AtomicU8 =
    std::sync::atomic::AtomicU8::new(GpuDecode::FusedOwn as u8);

/// Set the decode path of GPU models loaded from now on (`GPU_DECODE`).
pub fn set_gpu_decode(decode: GpuDecode) {
    GPU_DECODE.store(decode as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The name of a fused step's path: `fused` also where our kernels were asked for
/// (`fused-own`) but disagreed with the measured ones at load.
#[cfg(feature = "cuda")]
fn fused_path(plan: &crate::llm::engine::kernels::cuda_decode::DecodePlan) -> &'static str {
    use crate::llm::engine::kernels::cuda_decode::StepKernels;
    match plan.step_kernels() {
        StepKernels::Own => GpuDecode::FusedOwn.as_str(),
        StepKernels::OwnPdl => GpuDecode::FusedOwnPdl.as_str(),
        StepKernels::Candle => GpuDecode::Fused.as_str(),
    }
}

#[cfg(feature = "cuda")]
fn gpu_decode() -> GpuDecode {
    let value = GPU_DECODE.load(std::sync::atomic::Ordering::Relaxed);
    [GpuDecode::Fused, GpuDecode::FusedOwn, GpuDecode::FusedOwnPdl, GpuDecode::Ops]
        .into_iter()
        .find(|d| *d as u8 == value)
        .unwrap_or(GpuDecode::FusedOwn)
}

/// Positions a cache grows by at least: growth copies the cache, so it is rare, and parked
/// caches are trimmed to this grain.
const CACHE_GRAIN: usize = 256;

/// The keys and values of one sequence on the device: per layer, one `(kv_heads, capacity,
/// head_dim)` tensor each for keys and values. The capacity grows (by copying, at least
/// doubling) as the sequence does, up to `max_tokens`.
#[derive(Debug)]
pub struct DeviceCache {
    /// `(keys, values)` per layer; empty until the first position is stored.
    layers: Vec<(Tensor, Tensor)>,
    n_layer: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    capacity: usize,
    n_tokens: usize,
    max_tokens: usize,
}

impl DeviceCache {
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

    /// Forget every position from `n_tokens` on; the memory stays for the next tokens.
    pub fn truncate(&mut self, n_tokens: usize) {
        self.n_tokens = self.n_tokens.min(n_tokens);
    }

    /// Device memory held (what the memory bound must see).
    pub fn bytes(&self) -> u64 {
        (self.capacity
            * self.n_layer
            * 2
            * self.n_kv_heads
            * self.head_dim
            * self.dtype.size_in_bytes()) as u64
    }

    /// Give back the memory past the stored positions (to the grain), for a parked cache.
    pub fn shrink_to_fit(&mut self) -> candle_core::Result<()> {
        let keep = grain(self.n_tokens).min(self.max_tokens);
        if keep < self.capacity {
            self.resize(keep)?;
        }
        Ok(())
    }

    /// A new cache holding a copy of the first `n_tokens` positions.
    pub fn clone_prefix(&self, n_tokens: usize) -> candle_core::Result<DeviceCache> {
        // Tensors are shared handles: the copy starts on this cache's tensors, and `resize`
        // moves the kept positions into tensors of its own.
        let mut copy = DeviceCache {
            layers: self.layers.clone(),
            n_layer: self.n_layer,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
            capacity: self.capacity,
            n_tokens: n_tokens.min(self.n_tokens),
            max_tokens: self.max_tokens,
        };
        copy.resize(grain(copy.n_tokens).min(self.max_tokens))?;
        Ok(copy)
    }

    fn zeros(&self) -> candle_core::Result<Tensor> {
        Tensor::zeros((self.n_kv_heads, self.capacity, self.head_dim), self.dtype, &self.device)
    }

    /// Make room for `n_new` more positions.
    fn reserve_for(&mut self, n_new: usize) -> candle_core::Result<()> {
        let needed = self.n_tokens + n_new;
        if needed <= self.capacity {
            return Ok(());
        }
        let target = grain(needed.max(2 * self.capacity)).min(self.max_tokens);
        self.resize(target.max(needed))
    }

    /// Reallocate every layer to `capacity` positions, keeping the stored ones.
    fn resize(&mut self, capacity: usize) -> candle_core::Result<()> {
        let old = std::mem::take(&mut self.layers);
        self.capacity = capacity;
        if capacity == 0 {
            return Ok(());
        }
        let kept = self.n_tokens.min(capacity);
        for l in 0..self.n_layer {
            let (k, v) = (self.zeros()?, self.zeros()?);
            if let Some((old_k, old_v)) = old.get(l) {
                if kept > 0 {
                    k.slice_set(&old_k.narrow(1, 0, kept)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old_v.narrow(1, 0, kept)?.contiguous()?, 1, 0)?;
                }
            }
            self.layers.push((k, v));
        }
        Ok(())
    }
}

fn grain(n: usize) -> usize {
    n.div_ceil(CACHE_GRAIN) * CACHE_GRAIN
}

/// A loaded model on a candle device.
pub struct CandleModel {
    config: ModelConfig,
    device: Device,
    /// Looked up row by row (`QTensor::embedding`); also the output head when tied.
    token_embd: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: QMatMul,
    /// `(max_positions, head_dim / 2)` f32 tables, computed in f64 like `model.rs`'s.
    cos: Tensor,
    sin: Tensor,
    vocab_size: usize,
    weight_bytes: u64,
    kv_dtype: DType,
    /// The fused decode step on a GPU (`kernels::cuda_decode`); `None` on candle's CPU
    /// device, with `GPU_DECODE=ops`, or for a model it cannot run (f32 KV, a format
    /// without an `mmvq` kernel, an unusual head width).
    #[cfg(feature = "cuda")]
    fused: Option<std::sync::Mutex<crate::llm::engine::kernels::cuda_decode::DecodePlan>>,
}

struct Layer {
    attn_norm: Tensor,
    /// Queries, keys and values.
    qkv: Projection,
    attn_output: QMatMul,
    /// Qwen3's per-head norms; the query's carries the attention scale `1/√d` too.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate and up.
    gate_up: Projection,
    ffn_down: QMatMul,
}

/// Several matrices applied to the same input. Those stored in the same block format are
/// stacked into one matrix at load, so a decode step quantizes the input once and runs one
/// kernel for them: on a GPU, where a step is a sequence of small kernels, fewer kernels is
/// what makes it faster.
struct Projection {
    /// Each group: one (possibly stacked) matrix and the widths of its parts, in order.
    groups: Vec<(QMatMul, Vec<usize>)>,
}

impl Projection {
    /// The products of `x` with every part, in the order they were loaded. A part of a
    /// stacked product is a view of its columns (contiguous for one row).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut parts = Vec::new();
        for (matrix, widths) in &self.groups {
            let y = matrix.forward(x)?;
            if widths.len() == 1 {
                parts.push(y);
                continue;
            }
            let mut at = 0;
            for &width in widths {
                parts.push(y.narrow(D::Minus1, at, width)?);
                at += width;
            }
        }
        Ok(parts)
    }
}

impl CandleModel {
    /// Upload every tensor the forward pass needs from an opened GGUF file to `device`.
    /// The caller has checked the architecture, read `config` from the metadata and made
    /// sure the weights fit (`weight_bytes_of`).
    pub fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        config: ModelConfig,
        device: &Device,
    ) -> candle_core::Result<CandleModel> {
        let (e, d) = (config.n_embd, config.head_dim);
        if d % 2 != 0 {
            candle_core::bail!("head width {d} is not even")
        }
        if config.n_head_kv == 0 || !config.n_head.is_multiple_of(config.n_head_kv) {
            candle_core::bail!("{} query heads over {} KV heads", config.n_head, config.n_head_kv)
        }
        let mut loader = Loader { content, reader, device, bytes: 0 };
        let token_embd = Arc::new(loader.qtensor("token_embd.weight", None)?);
        let (vocab_size, width) = token_embd.shape().dims2()?;
        if width != e {
            candle_core::bail!("token_embd.weight has width {width}, expected {e}")
        }
        let (q_width, kv_width) = (config.n_head * d, config.n_head_kv * d);
        let scale = 1.0 / (d as f64).sqrt();
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let name = |what: &str| format!("blk.{i}.{what}.weight");
            let (q_norm, k_norm) = match config.qk_norm {
                true => (
                    // The attention scale folded into the query's norm: one op fewer.
                    Some((loader.vector(&name("attn_q_norm"), d)? * scale)?),
                    Some(loader.vector(&name("attn_k_norm"), d)?),
                ),
                false => (None, None),
            };
            let n_ff = match content.tensor_infos.get(&name("ffn_gate")) {
                Some(info) => info.shape.dims2()?.0,
                None => candle_core::bail!("tensor {} is missing", name("ffn_gate")),
            };
            layers.push(Layer {
                attn_norm: loader.vector(&name("attn_norm"), e)?,
                qkv: loader.projection(&[
                    (&name("attn_q"), (q_width, e)),
                    (&name("attn_k"), (kv_width, e)),
                    (&name("attn_v"), (kv_width, e)),
                ])?,
                attn_output: loader.matmul(&name("attn_output"), (e, q_width))?,
                q_norm,
                k_norm,
                ffn_norm: loader.vector(&name("ffn_norm"), e)?,
                gate_up: loader
                    .projection(&[(&name("ffn_gate"), (n_ff, e)), (&name("ffn_up"), (n_ff, e))])?,
                ffn_down: loader.matmul(&name("ffn_down"), (e, n_ff))?,
            });
        }
        let output_norm = loader.vector("output_norm.weight", e)?;
        // Tied embeddings: no output.weight; the embedding table is the output head.
        let output = if content.tensor_infos.contains_key("output.weight") {
            loader.matmul("output.weight", (vocab_size, e))?
        } else {
            QMatMul::from_arc(token_embd.clone())?
        };
        let (cos, sin) = rope_tables(d, config.rope_freq_base, config.max_positions, device)?;
        let weight_bytes = loader.bytes;
        let kv_dtype = match config.kv_type {
            KvType::F16 => DType::F16,
            KvType::F32 => DType::F32,
        };
        let model = CandleModel {
            config,
            device: device.clone(),
            token_embd,
            layers,
            output_norm,
            output,
            cos,
            sin,
            vocab_size,
            weight_bytes,
            kv_dtype,
            #[cfg(feature = "cuda")]
            fused: None,
        };
        #[cfg(feature = "cuda")]
        let model = {
            let mut model = model;
            if let Device::Cuda(cuda) = device {
                model.fused = model.fused_plan(cuda)?.map(std::sync::Mutex::new);
            }
            model
        };
        Ok(model)
    }

    /// The fused decode step for this model, when it can and should have one. A model it
    /// cannot run keeps candle's ops, with the reason logged.
    #[cfg(feature = "cuda")]
    fn fused_plan(
        &self,
        cuda: &candle_core::CudaDevice,
    ) -> candle_core::Result<Option<crate::llm::engine::kernels::cuda_decode::DecodePlan>> {
        use crate::llm::engine::kernels::cuda_decode::{
            DecodePlan, Dims, LayerWeights, StepKernels,
        };
        let step_kernels = match gpu_decode() {
            GpuDecode::Ops => {
                tracing::info!("decode on the GPU through candle's ops (GPU_DECODE=ops)");
                return Ok(None);
            }
            GpuDecode::Fused => StepKernels::Candle,
            GpuDecode::FusedOwn => StepKernels::Own,
            GpuDecode::FusedOwnPdl => StepKernels::OwnPdl,
        };
        let why_not = |reason: String| {
            tracing::warn!(%reason, "decode on the GPU through candle's ops: no fused step");
            Ok(None)
        };
        if self.kv_dtype != DType::F16 {
            return why_not("the fused step keeps keys and values in f16".to_string());
        }
        // The fused step calls the block-format kernels directly: every matrix must be one.
        let quantized = |m: &QMatMul| match m {
            QMatMul::QTensor(t) => Some(t.clone()),
            _ => None,
        };
        let stacked = |p: &Projection| p.groups.iter().map(|(m, _)| quantized(m)).collect();
        let mut weights = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (Some(qkv), Some(gate_up), Some(attn_output), Some(ffn_down)) = (
                stacked(&layer.qkv),
                stacked(&layer.gate_up),
                quantized(&layer.attn_output),
                quantized(&layer.ffn_down),
            ) else {
                return why_not("a matrix is not in a block format".to_string());
            };
            weights.push(LayerWeights {
                attn_norm: &layer.attn_norm,
                qkv,
                q_norm: layer.q_norm.as_ref(),
                k_norm: layer.k_norm.as_ref(),
                attn_output,
                ffn_norm: &layer.ffn_norm,
                gate_up,
                ffn_down,
            });
        }
        let Some(output) = quantized(&self.output) else {
            return why_not("the output matrix is not in a block format".to_string());
        };
        // The feed-forward width: the gate's rows, the first part of `gate_up`.
        let Some((_, widths)) = self.layers.first().and_then(|l| l.gate_up.groups.first()) else {
            return why_not("a model without layers".to_string());
        };
        let (cfg, n_ff) = (&self.config, widths[0]);
        let dims = Dims {
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            n_kv: cfg.n_head_kv,
            head_dim: cfg.head_dim,
            n_ff,
            vocab: self.vocab_size,
            max_positions: cfg.max_positions,
            eps: cfg.rms_norm_eps as f32,
            q_scale: match cfg.qk_norm {
                true => 1.0,
                false => 1.0 / (cfg.head_dim as f32).sqrt(),
            },
            neox: cfg.rope_style == RopeStyle::Neox,
        };
        match DecodePlan::new(
            cuda,
            dims,
            &weights,
            &self.output_norm,
            &output,
            &self.cos,
            &self.sin,
            step_kernels,
        ) {
            Ok(plan) => {
                tracing::info!(
                    buffers = plan.buffer_bytes(),
                    path = fused_path(&plan),
                    "decode on the GPU through the fused kernels"
                );
                Ok(Some(plan))
            }
            Err(e) => why_not(e.to_string()),
        }
    }

    /// Bytes the weights of `content` take on a device (their stored sizes), to check
    /// before loading that they fit.
    pub fn weight_bytes_of(content: &gguf_file::Content) -> u64 {
        content
            .tensor_infos
            .values()
            .map(|info| {
                let n = info.shape.elem_count();
                (n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64
            })
            .sum()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How decode steps run (`GpuDecode::as_str`): `fused` (the GPU's fused step on
    /// candle's `mmvq`), `fused-own` (the fused step with our Q4_K/Q6_K/Q8_0 matrix
    /// kernels), `fused-own-pdl` (those launched as programmatic dependents) or `ops`
    /// (candle's ops).
    pub fn decode_path(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if let Some(fused) = &self.fused {
            // A step that panicked leaves the plan's kernels as they were: they are chosen
            // once, at load.
            return fused_path(&fused.lock().unwrap_or_else(|e| e.into_inner()));
        }
        GpuDecode::Ops.as_str()
    }

    /// Device memory the weights hold.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// An empty cache for one sequence of at most `max_tokens` positions.
    pub fn new_cache(&self, max_tokens: usize) -> DeviceCache {
        DeviceCache {
            layers: Vec::new(),
            n_layer: self.config.n_layer,
            n_kv_heads: self.config.n_head_kv,
            head_dim: self.config.head_dim,
            dtype: self.kv_dtype,
            device: self.device.clone(),
            capacity: 0,
            n_tokens: 0,
            max_tokens: max_tokens.min(self.config.max_positions),
        }
    }

    /// Run `tokens` at positions `cache.len()..`, append their K/V and return the logits
    /// (tests and tools; the worker batches through `forward_batch`).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut DeviceCache,
        logits: Logits,
    ) -> candle_core::Result<Tensor> {
        let mut out = Vec::new();
        self.forward_batch(&mut [SeqBatch { tokens, cache, logits: Some(logits) }], &mut out)?;
        let rows = out.len() / self.vocab_size;
        Tensor::from_vec(out, (rows, self.vocab_size), &Device::Cpu)
    }

    /// Run several sequences in one pass, as `Model::forward_batch` does: their rows share
    /// every matrix product; RoPE and the KV store use each row's own position and attention
    /// reads each sequence's own cache. `out` gets the requested logits rows, sequence after
    /// sequence.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqBatch<'_, DeviceCache>],
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        if seqs.is_empty() {
            candle_core::bail!("a batch takes at least one sequence")
        }
        for seq in seqs.iter() {
            if seq.tokens.is_empty() {
                candle_core::bail!("forward called with no tokens")
            }
            if seq.cache.dtype != self.kv_dtype || seq.cache.n_layer != self.config.n_layer {
                candle_core::bail!("the cache was made for another model")
            }
            check_chunk(seq.tokens, seq.cache.len(), seq.cache.max_tokens, self.vocab_size)?;
        }
        for seq in seqs.iter_mut() {
            seq.cache.reserve_for(seq.tokens.len())?;
        }
        #[cfg(feature = "cuda")]
        if let Some(fused) = &self.fused {
            use crate::llm::engine::kernels::cuda_decode::MAX_ROWS;
            if seqs.len() <= MAX_ROWS && seqs.iter().all(|seq| seq.tokens.len() == 1) {
                return self.fused_step(fused, seqs, out);
            }
        }
        let cfg = &self.config;
        let (d, n_head, n_kv) = (cfg.head_dim, cfg.n_head, cfg.n_head_kv);
        let group = n_head / n_kv;
        let n_rows: usize = seqs.iter().map(|seq| seq.tokens.len()).sum();
        let dev = &self.device;
        let eps = cfg.rms_norm_eps as f32;

        let ids: Vec<u32> = seqs.iter().flat_map(|seq| seq.tokens.iter().copied()).collect();
        let mut x = self.token_embd.embedding(&Tensor::from_vec(ids, n_rows, dev)?)?;
        let positions: Vec<u32> = seqs
            .iter()
            .flat_map(|seq| (seq.cache.len()..seq.cache.len() + seq.tokens.len()).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(positions, n_rows, dev)?;
        // One row per token, as a batch of one-position sequences for candle's RoPE.
        let cos = self.cos.index_select(&positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&positions, 0)?.unsqueeze(1)?;
        // Per sequence: (first row, tokens, start position, causal mask for a chunk).
        let mut spans = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for seq in seqs.iter() {
            let (t, start) = (seq.tokens.len(), seq.cache.len());
            let mask = match t {
                1 => None,
                _ => Some(causal_mask(t, start, dev)?),
            };
            spans.push((row, t, start, mask));
            row += t;
        }
        // Qwen3 scales queries in their norm's weights (see `load`); Llama here.
        let scale = match cfg.qk_norm {
            true => None,
            false => Some(1.0 / (d as f64).sqrt()),
        };

        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let [mut q, mut k, v]: [Tensor; 3] = match layer.qkv.forward(&h)?.try_into() {
                Ok(parts) => parts,
                Err(_) => candle_core::bail!("the attention projection has three parts"),
            };
            // Views of a stacked product are contiguous for one row; copied otherwise.
            let v = v.contiguous()?.reshape((n_rows, n_kv, d))?;
            if let (Some(q_norm), Some(k_norm)) = (&layer.q_norm, &layer.k_norm) {
                let (q_rows, k_rows) = (q.contiguous()?, k.contiguous()?);
                q = candle_nn::ops::rms_norm(&q_rows.reshape((n_rows * n_head, d))?, q_norm, eps)?;
                k = candle_nn::ops::rms_norm(&k_rows.reshape((n_rows * n_kv, d))?, k_norm, eps)?;
            }
            let q = self.rope(&q.reshape((n_rows, n_head, 1, d))?, &cos, &sin)?;
            let k = self.rope(&k.reshape((n_rows, n_kv, 1, d))?, &cos, &sin)?;
            let (q, k) = (q.squeeze(2)?, k.squeeze(2)?);

            let mut contexts = Vec::with_capacity(seqs.len());
            for (seq, (row, t, start, mask)) in seqs.iter_mut().zip(&spans) {
                let (row, t, start) = (*row, *t, *start);
                let (cache_k, cache_v) = &seq.cache.layers[l];
                // Store this chunk's keys and values at its positions: (kv_heads, t, d).
                let k_new = k.narrow(0, row, t)?.transpose(0, 1)?.to_dtype(self.kv_dtype)?;
                let v_new = v.narrow(0, row, t)?.transpose(0, 1)?.to_dtype(self.kv_dtype)?;
                cache_k.slice_set(&k_new.contiguous()?, 1, start)?;
                cache_v.slice_set(&v_new.contiguous()?, 1, start)?;
                let len = start + t;
                let keys = cache_k.narrow(1, 0, len)?;
                let values = cache_v.narrow(1, 0, len)?;
                // Grouped-query attention without copying the keys: the query heads that
                // share a KV head are stacked as rows of one product, (kv_heads, group·t, d).
                let q_s = q.narrow(0, row, t)?.transpose(0, 1)?;
                let q_s = match scale {
                    Some(scale) => (q_s * scale)?,
                    None => q_s,
                };
                let q_s =
                    q_s.contiguous()?.reshape((n_kv, group * t, d))?.to_dtype(self.kv_dtype)?;
                let mut scores = q_s.matmul(&keys.t()?)?.to_dtype(DType::F32)?;
                if let Some(mask) = mask {
                    scores = scores
                        .reshape((n_kv, group, t, len))?
                        .broadcast_add(mask)?
                        .reshape((n_kv, group * t, len))?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.kv_dtype)?;
                let context = probs
                    .matmul(&values)?
                    .reshape((n_head, t, d))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((t, n_head * d))?
                    .to_dtype(DType::F32)?;
                contexts.push(context);
            }
            let context = match contexts.len() {
                1 => contexts.pop().expect("one context"),
                _ => Tensor::cat(&contexts, 0)?,
            };
            x = (x + layer.attn_output.forward(&context)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let [gate, up]: [Tensor; 2] = match layer.gate_up.forward(&h)?.try_into() {
                Ok(parts) => parts,
                Err(_) => candle_core::bail!("the feed-forward projection has two parts"),
            };
            let act = (candle_nn::ops::silu(&gate)? * up)?;
            x = (x + layer.ffn_down.forward(&act)?)?;
        }
        for seq in seqs.iter_mut() {
            seq.cache.n_tokens += seq.tokens.len();
        }

        // The output head, only for the rows whose logits were asked for.
        let mut wanted = Vec::new();
        for (seq, (row, t, _, _)) in seqs.iter().zip(&spans) {
            let first = match seq.logits {
                None => continue,
                Some(Logits::Last) => row + t - 1,
                Some(Logits::All) => *row,
            };
            wanted.extend((first..row + t).map(|r| r as u32));
        }
        out.clear();
        if wanted.is_empty() {
            return Ok(());
        }
        let n_out = wanted.len();
        let rows = x.index_select(&Tensor::from_vec(wanted, n_out, dev)?, 0)?;
        let normed = candle_nn::ops::rms_norm(&rows, &self.output_norm, eps)?;
        let logits = self.output.forward(&normed)?.to_dtype(DType::F32)?;
        out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// One token for each sequence through the fused kernels: the embeddings are looked up
    /// with candle's op, everything else is `DecodePlan::step`.
    #[cfg(feature = "cuda")]
    fn fused_step(
        &self,
        fused: &std::sync::Mutex<crate::llm::engine::kernels::cuda_decode::DecodePlan>,
        seqs: &mut [SeqBatch<'_, DeviceCache>],
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        use crate::llm::engine::kernels::cuda_decode::Row;
        let ids: Vec<u32> = seqs.iter().map(|seq| seq.tokens[0]).collect();
        let n = ids.len();
        let x = self.token_embd.embedding(&Tensor::from_vec(ids, n, &self.device)?)?;
        let rows: Vec<Row<'_>> = seqs
            .iter()
            .map(|seq| Row { position: seq.cache.len(), caches: &seq.cache.layers })
            .collect();
        let mut plan = fused
            .lock()
            .map_err(|_| candle_core::Error::Msg("the fused decode step panicked".to_string()))?;
        // Every row's logits, straight into `out`; the rows nobody asked for (rare) are
        // dropped after.
        plan.step(&x, &rows, out)?;
        drop(rows);
        if seqs.iter().any(|seq| seq.logits.is_none()) {
            let (all, vocab) = (std::mem::take(out), self.vocab_size);
            for (row, seq) in all.chunks_exact(vocab).zip(seqs.iter()) {
                if seq.logits.is_some() {
                    out.extend_from_slice(row);
                }
            }
        }
        for seq in seqs.iter_mut() {
            seq.cache.n_tokens += 1;
        }
        Ok(())
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.rope_style {
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin),
        }
    }
}

/// `(t, start + t)`: row `i` (position `start + i`) sees keys `0..=start + i`.
fn causal_mask(t: usize, start: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let len = start + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..len).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(mask, (t, len), dev)
}

/// cos/sin of `position * inv_freq[i]` in f64, stored as f32, uploaded once.
fn rope_tables(
    head_dim: usize,
    base: f32,
    n_positions: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> =
        (0..half).map(|i| 1.0 / (base as f64).powf((2 * i) as f64 / head_dim as f64)).collect();
    let mut cos = Vec::with_capacity(n_positions * half);
    let mut sin = Vec::with_capacity(n_positions * half);
    for pos in 0..n_positions {
        for freq in &inv_freq {
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (n_positions, half), device)?,
        Tensor::from_vec(sin, (n_positions, half), device)?,
    ))
}

fn check_shape(t: QTensor, (rows, cols): (usize, usize)) -> candle_core::Result<QTensor> {
    match t.shape().dims() {
        [r, c] if (*r, *c) == (rows, cols) => Ok(t),
        dims => candle_core::bail!("a matrix is {dims:?}, expected [{rows}, {cols}]"),
    }
}

/// Reads tensors of one GGUF file onto the device for `CandleModel::load`, counting bytes.
struct Loader<'a, R> {
    content: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
    bytes: u64,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn qtensor(
        &mut self,
        name: &str,
        shape: Option<(usize, usize)>,
    ) -> candle_core::Result<QTensor> {
        if !self.content.tensor_infos.contains_key(name) {
            candle_core::bail!("tensor {name} is missing")
        }
        let t = self.content.tensor(self.reader, name, self.device)?;
        self.bytes += t.storage_size_in_bytes() as u64;
        match shape {
            Some(shape) => check_shape(t, shape)
                .map_err(|e| candle_core::Error::Msg(format!("tensor {name}: {e}"))),
            None => match t.shape().dims().len() {
                2 => Ok(t),
                _ => {
                    candle_core::bail!("tensor {name} has shape {:?}, expected a matrix", t.shape())
                }
            },
        }
    }

    /// The matrices `parts` (name, shape), all with the same input width, as a `Projection`:
    /// consecutive parts in the same block format are stacked row-wise into one matrix (the
    /// rows of a block-format matrix are independent runs of bytes, so stacking is
    /// concatenating them).
    fn projection(&mut self, parts: &[(&str, (usize, usize))]) -> candle_core::Result<Projection> {
        let mut groups: Vec<(Vec<u8>, GgmlDType, usize, Vec<usize>)> = Vec::new();
        for &(name, (rows, cols)) in parts {
            let Some(info) = self.content.tensor_infos.get(name) else {
                candle_core::bail!("tensor {name} is missing")
            };
            if info.shape.dims() != [rows, cols] {
                candle_core::bail!(
                    "tensor {name} has shape {:?}, expected [{rows}, {cols}]",
                    info.shape
                )
            }
            let dtype = info.ggml_dtype;
            let n_bytes = rows * cols / dtype.block_size() * dtype.type_size();
            let mut bytes = vec![0u8; n_bytes];
            self.reader.seek(SeekFrom::Start(self.content.tensor_data_offset + info.offset))?;
            self.reader.read_exact(&mut bytes)?;
            match groups.last_mut() {
                Some((data, ty, _, widths)) if *ty == dtype => {
                    data.extend_from_slice(&bytes);
                    widths.push(rows);
                }
                _ => groups.push((bytes, dtype, cols, vec![rows])),
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for (data, dtype, cols, widths) in groups {
            let rows = widths.iter().sum();
            let tensor = qtensor_from_ggml(dtype, &data, vec![rows, cols], self.device)?;
            self.bytes += tensor.storage_size_in_bytes() as u64;
            out.push((QMatMul::from_qtensor(tensor)?, widths));
        }
        Ok(Projection { groups: out })
    }

    fn matmul(&mut self, name: &str, shape: (usize, usize)) -> candle_core::Result<QMatMul> {
        QMatMul::from_qtensor(self.qtensor(name, Some(shape))?)
    }

    /// A vector of `len` values (norm weights), as f32 on the device.
    fn vector(&mut self, name: &str, len: usize) -> candle_core::Result<Tensor> {
        if !self.content.tensor_infos.contains_key(name) {
            candle_core::bail!("tensor {name} is missing")
        }
        let t = self.content.tensor(self.reader, name, self.device)?.dequantize(self.device)?;
        let t = t.flatten_all()?;
        if t.dim(D::Minus1)? != len {
            candle_core::bail!("tensor {name} has {} values, expected {len}", t.elem_count())
        }
        self.bytes += (len * 4) as u64;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::GpuDecode;

    #[test]
    fn gpu_decode_setting_names_round_trip() {
        for decode in
            [GpuDecode::Fused, GpuDecode::FusedOwn, GpuDecode::FusedOwnPdl, GpuDecode::Ops]
        {
            assert_eq!(GpuDecode::from_setting(decode.as_str()), Some(decode));
        }
        assert_eq!(GpuDecode::from_setting(" Fused-OWN "), Some(GpuDecode::FusedOwn));
        assert_eq!(GpuDecode::from_setting("own"), None);
        assert_eq!(GpuDecode::from_setting(""), None);
    }
}
