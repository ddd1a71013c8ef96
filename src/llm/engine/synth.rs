//! Writes small GGUF files with random weights and real metadata keys, so the Qwen3 forward
//! pass can be tested (and benchmarked) where no real Qwen3 weights can be had. The
//! vocabulary metadata is supplied by the caller; this module knows nothing of tokenizers.

use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The shape and storage types of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// `qwen3` or `llama`.
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f32,
    /// Storage type of `token_embd.weight` (also the output projection when tied).
    pub embd_type: GgmlDType,
    /// Per-layer storage type of each matmul weight, cycled over layers, in the order
    /// attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down.
    pub layer_types: Vec<[GgmlDType; 7]>,
    /// Write a separate `output.weight` (else embeddings are tied, as in small Qwen3s).
    pub output_type: Option<GgmlDType>,
    /// Write `general.dtype = 0`, which makes candle-transformers' `quantized_qwen3`
    /// build its RoPE tables in f32 instead of f16, so a comparison with it measures the
    /// forward pass rather than the reference's rounding of positions.
    pub reference_f32_rope: bool,
    pub seed: u64,
}

impl SynthSpec {
    /// A 2-layer Qwen3 small enough for tests (≈ 21 MB, most of it the 151 936-row
    /// embedding table) that still exercises GQA, q/k norms, a head width different from
    /// `n_embd / n_head`, tied embeddings and several quantization types.
    pub fn tiny_qwen3() -> SynthSpec {
        use GgmlDType::*;
        SynthSpec {
            arch: "qwen3".to_string(),
            n_layer: 2,
            n_embd: 128,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 64,
            n_ff: 256,
            vocab_size: 151_936,
            context_length: 40_960,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            embd_type: Q8_0,
            // Q4_K/Q6_K need rows that are a multiple of 256, so they go where the input
            // width is 256 (attn_output, ffn_down).
            layer_types: vec![
                [Q8_0, Q8_0, Q8_0, Q4K, Q8_0, Q8_0, Q4K],
                [Q4_0, Q5_0, Q8_0, Q6K, Q4_1, Q8_0, Q5K],
            ],
            output_type: None,
            reference_f32_rope: true,
            seed: 0x5eed,
        }
    }

    /// Shape of Qwen3-4B (36 layers, 2560 wide, 32/8 heads of 128, 9728 FFN) stored as
    /// Q4_K with Q6_K for the value and FFN-down projections, the way Q4_K_M files mix
    /// them. For benchmarking at the product's real size.
    pub fn qwen3_4b_q4_k_m() -> SynthSpec {
        use GgmlDType::*;
        SynthSpec {
            n_layer: 36,
            n_embd: 2560,
            n_head: 32,
            n_head_kv: 8,
            head_dim: 128,
            n_ff: 9728,
            embd_type: Q4K,
            layer_types: vec![[Q4K, Q4K, Q6K, Q4K, Q4K, Q4K, Q6K]],
            reference_f32_rope: false,
            ..SynthSpec::tiny_qwen3()
        }
    }
}

/// Write a GGUF model at `path` with random weights, `spec`'s hyper-parameters under the
/// real llama.cpp metadata keys, and the given tokenizer metadata (`tokenizer.ggml.*`).
pub fn write_model(
    path: &Path,
    spec: &SynthSpec,
    tokenizer_metadata: &[(String, Value)],
) -> candle_core::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut writer = BufWriter::new(file);
    write_model_to(&mut writer, spec, tokenizer_metadata)?;
    writer.flush()?;
    Ok(())
}

/// As `write_model`, to any seekable writer.
pub fn write_model_to<W: Write + Seek>(
    writer: &mut W,
    spec: &SynthSpec,
    tokenizer_metadata: &[(String, Value)],
) -> candle_core::Result<()> {
    let arch = spec.arch.as_str();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.to_string())),
        ("general.name".into(), Value::String(format!("synthetic-{arch}"))),
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{arch}.block_count"), Value::U32(spec.n_layer as u32)),
        (format!("{arch}.context_length"), Value::U32(spec.context_length as u32)),
        (format!("{arch}.embedding_length"), Value::U32(spec.n_embd as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(spec.n_ff as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(spec.n_head as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(spec.n_head_kv as u32)),
        (format!("{arch}.attention.key_length"), Value::U32(spec.head_dim as u32)),
        (format!("{arch}.attention.value_length"), Value::U32(spec.head_dim as u32)),
        (format!("{arch}.rope.dimension_count"), Value::U32(spec.head_dim as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(spec.rope_freq_base)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(spec.rms_norm_eps)),
    ];
    if spec.reference_f32_rope {
        metadata.push(("general.dtype".into(), Value::U32(0)));
    }
    metadata.extend(tokenizer_metadata.iter().cloned());

    let mut rng = XorShift(spec.seed | 1);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // Embedding rows of unit-ish scale give logits of a few units through the tied head.
    let embd = random_tensor(&mut rng, &[spec.vocab_size, spec.n_embd], 1.0)?;
    tensors.push(("token_embd.weight".into(), QTensor::quantize(&embd, spec.embd_type)?));
    drop(embd);
    let q_width = spec.n_head * spec.head_dim;
    let kv_width = spec.n_head_kv * spec.head_dim;
    for layer in 0..spec.n_layer {
        let types = spec.layer_types[layer % spec.layer_types.len()];
        // (name, rows, columns); weights are stored (out, in) and scaled by 1/sqrt(in) so
        // activations keep their size through the layers.
        let shapes = [
            ("attn_q", q_width, spec.n_embd),
            ("attn_k", kv_width, spec.n_embd),
            ("attn_v", kv_width, spec.n_embd),
            ("attn_output", spec.n_embd, q_width),
            ("ffn_gate", spec.n_ff, spec.n_embd),
            ("ffn_up", spec.n_ff, spec.n_embd),
            ("ffn_down", spec.n_embd, spec.n_ff),
        ];
        for ((name, rows, cols), dtype) in shapes.into_iter().zip(types) {
            let scale = 1.7 / (cols as f32).sqrt();
            let weight = random_tensor(&mut rng, &[rows, cols], scale)?;
            tensors
                .push((format!("blk.{layer}.{name}.weight"), QTensor::quantize(&weight, dtype)?));
        }
        let mut norms = vec![("attn_norm", spec.n_embd), ("ffn_norm", spec.n_embd)];
        if arch == "qwen3" {
            norms.push(("attn_q_norm", spec.head_dim));
            norms.push(("attn_k_norm", spec.head_dim));
        }
        for (name, width) in norms {
            tensors.push((format!("blk.{layer}.{name}.weight"), norm_weight(&mut rng, width)?));
        }
    }
    tensors.push(("output_norm.weight".into(), norm_weight(&mut rng, spec.n_embd)?));
    if let Some(dtype) = spec.output_type {
        let output = random_tensor(&mut rng, &[spec.vocab_size, spec.n_embd], 1.0)?;
        tensors.push(("output.weight".into(), QTensor::quantize(&output, dtype)?));
    }

    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(writer, &metadata_refs, &tensor_refs)
}

/// A norm weight near 1 (exactly 1 would hide a missing or misplaced norm).
fn norm_weight(rng: &mut XorShift, width: usize) -> candle_core::Result<QTensor> {
    let values: Vec<f32> = (0..width).map(|_| 1.0 + 0.2 * rng.next_signed()).collect();
    QTensor::quantize(&Tensor::from_vec(values, width, &Device::Cpu)?, GgmlDType::F32)
}

fn random_tensor(rng: &mut XorShift, dims: &[usize], scale: f32) -> candle_core::Result<Tensor> {
    let count = dims.iter().product();
    let values: Vec<f32> = (0..count).map(|_| scale * rng.next_signed()).collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
}

/// xorshift64*: tens of millions of weights per file, deterministic from the seed, and no
/// dependency on a particular `rand` version's stream.
struct XorShift(u64);

impl XorShift {
    /// Uniform in [-1, 1).
    fn next_signed(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
