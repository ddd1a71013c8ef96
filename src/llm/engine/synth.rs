//! Writes GGUF files with random weights and real metadata keys: small ones through candle
//! (so the Qwen3 forward pass can be tested where no real Qwen3 weights can be had), and
//! full-size files with the tensor table of the official Qwen3 GGUFs, streamed tensor by
//! tensor, for throughput benchmarks. The vocabulary metadata is supplied by the caller;
//! this module knows nothing of tokenizers, and the container format is `gguf_write`.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use crate::llm::engine::gguf_write::{self, StreamWriter, TensorEntry};

/// The shape and storage types of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// `qwen3` or `llama`.
    pub arch: String,
    /// Cutting this down keeps the first layers' types: tests write reduced copies of the
    /// official shapes this way.
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
    /// `general.name`.
    pub name: String,
    /// `general.size_label`, such as `4B`.
    pub size_label: Option<String>,
    /// `general.file_type`, llama.cpp's `llama_ftype` (15 for Q4_K_M, 7 for Q8_0).
    pub file_type: Option<u32>,
}

/// The official Qwen3 GGUF files `official_qwen3` imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qwen3Shape {
    B4,
    B8,
    B14,
}

impl Qwen3Shape {
    pub const ALL: [Qwen3Shape; 3] = [Qwen3Shape::B4, Qwen3Shape::B8, Qwen3Shape::B14];

    /// From the command-line spelling, `qwen3-4b`, `qwen3-8b` or `qwen3-14b`.
    pub fn parse(s: &str) -> Option<Qwen3Shape> {
        Qwen3Shape::ALL.into_iter().find(|shape| shape.label() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            Qwen3Shape::B4 => "qwen3-4b",
            Qwen3Shape::B8 => "qwen3-8b",
            Qwen3Shape::B14 => "qwen3-14b",
        }
    }

    fn size_label(self) -> &'static str {
        match self {
            Qwen3Shape::B4 => "4B",
            Qwen3Shape::B8 => "8B",
            Qwen3Shape::B14 => "14B",
        }
    }
}

/// The llama.cpp quantization mixes of the official files.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMix {
    Q4_K_M,
    Q8_0,
}

impl QuantMix {
    pub const ALL: [QuantMix; 2] = [QuantMix::Q4_K_M, QuantMix::Q8_0];

    /// From the command-line spelling, `q4_k_m` or `q8_0`.
    pub fn parse(s: &str) -> Option<QuantMix> {
        QuantMix::ALL.into_iter().find(|quant| quant.label() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            QuantMix::Q4_K_M => "q4_k_m",
            QuantMix::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `LLAMA_FTYPE_MOSTLY_Q4_K_M` and `LLAMA_FTYPE_MOSTLY_Q8_0`.
    fn file_type(self) -> u32 {
        match self {
            QuantMix::Q4_K_M => 15,
            QuantMix::Q8_0 => 7,
        }
    }
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
                [Q4_0, Q5_0, Q8_0, Q6K, Q4_1, Q5_1, Q5K],
            ],
            output_type: None,
            reference_f32_rope: true,
            seed: 0x5eed,
            name: "synthetic-qwen3".to_string(),
            size_label: None,
            file_type: None,
        }
    }

    /// A 2-layer Llama for checking a device's Llama path (`bench-model --tiny-llama`):
    /// interleaved RoPE pairs, no q/k norms, the attention scale on the queries, three
    /// query heads per KV head (as SmolLM2), head width 64, several quantization types.
    pub fn tiny_llama() -> SynthSpec {
        use GgmlDType::*;
        SynthSpec {
            arch: "llama".to_string(),
            n_embd: 384,
            n_head: 6,
            n_head_kv: 2,
            n_ff: 512,
            // The K-quants need an input width that is a multiple of 256: ffn_down only.
            layer_types: vec![
                [Q8_0, Q8_0, Q8_0, Q8_0, Q4_0, Q8_0, Q4K],
                [Q4_1, Q5_0, Q8_0, Q5_1, Q8_0, Q4_1, Q6K],
            ],
            name: "synthetic-llama".to_string(),
            ..SynthSpec::tiny_qwen3()
        }
    }

    /// The tensor table of the official Qwen3 GGUF of that size and quantization: the
    /// hyper-parameters of its config.json, and the types llama.cpp's `llama-quantize`
    /// picks. Q8_0 stores every matrix as Q8_0. Q4_K_M stores matrices as Q4_K except
    /// `output.weight` (or `token_embd.weight` when it doubles as the output) in Q6_K, and
    /// `attn_v` and `ffn_down` in Q6_K on the layers `use_more_bits` picks.
    pub fn official_qwen3(shape: Qwen3Shape, quant: QuantMix) -> SynthSpec {
        use GgmlDType::*;
        // (layers, width, query heads, FFN width, tied embeddings), from config.json.
        let (n_layer, n_embd, n_head, n_ff, tied) = match shape {
            Qwen3Shape::B4 => (36, 2560, 32, 9728, true),
            Qwen3Shape::B8 => (36, 4096, 32, 12_288, false),
            Qwen3Shape::B14 => (40, 5120, 40, 17_408, false),
        };
        let (embd_type, output_type, layer_types) = match quant {
            QuantMix::Q8_0 => (Q8_0, Q8_0, vec![[Q8_0; 7]]),
            QuantMix::Q4_K_M => {
                let layer_types = (0..n_layer)
                    .map(|layer| {
                        let more = if use_more_bits(layer, n_layer) { Q6K } else { Q4K };
                        [Q4K, Q4K, more, Q4K, Q4K, Q4K, more]
                    })
                    .collect();
                (if tied { Q6K } else { Q4K }, Q6K, layer_types)
            }
        };
        let size_label = shape.size_label();
        SynthSpec {
            arch: "qwen3".to_string(),
            n_layer,
            n_embd,
            n_head,
            n_head_kv: 8,
            head_dim: 128,
            n_ff,
            vocab_size: 151_936,
            context_length: 40_960,
            rope_freq_base: 1_000_000.0,
            rms_norm_eps: 1e-6,
            embd_type,
            layer_types,
            output_type: if tied { None } else { Some(output_type) },
            reference_f32_rope: false,
            seed: 0x5eed,
            name: format!("Qwen3-{size_label} (random weights, benchmark only)"),
            size_label: Some(size_label.to_string()),
            file_type: Some(quant.file_type()),
        }
    }
}

/// How a planned tensor's random values are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// `token_embd` and `output`: one row per token.
    Vocab,
    /// A layer's matrix, stored (out, in).
    Layer,
    /// A norm weight, f32.
    Norm,
}

/// One tensor of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub entry: TensorEntry,
    pub role: TensorRole,
}

/// Every tensor of `spec`'s model, in the order `write_model` generates them:
/// `token_embd`, each layer's seven matrices then its norms, `output_norm`, `output`.
pub fn tensor_plan(spec: &SynthSpec) -> Vec<PlannedTensor> {
    let planned = |name: String, dims: Vec<usize>, dtype, role| PlannedTensor {
        entry: TensorEntry { name, dims, dtype },
        role,
    };
    let mut plan = vec![planned(
        "token_embd.weight".to_string(),
        vec![spec.vocab_size, spec.n_embd],
        spec.embd_type,
        TensorRole::Vocab,
    )];
    let q_width = spec.n_head * spec.head_dim;
    let kv_width = spec.n_head_kv * spec.head_dim;
    for layer in 0..spec.n_layer {
        let types = spec.layer_types[layer % spec.layer_types.len()];
        // (name, rows, columns): weights are stored (out, in).
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
            let name = format!("blk.{layer}.{name}.weight");
            plan.push(planned(name, vec![rows, cols], dtype, TensorRole::Layer));
        }
        let mut norms = vec![("attn_norm", spec.n_embd), ("ffn_norm", spec.n_embd)];
        if spec.arch == "qwen3" {
            norms.push(("attn_q_norm", spec.head_dim));
            norms.push(("attn_k_norm", spec.head_dim));
        }
        for (name, width) in norms {
            let name = format!("blk.{layer}.{name}.weight");
            plan.push(planned(name, vec![width], GgmlDType::F32, TensorRole::Norm));
        }
    }
    plan.push(planned(
        "output_norm.weight".to_string(),
        vec![spec.n_embd],
        GgmlDType::F32,
        TensorRole::Norm,
    ));
    if let Some(dtype) = spec.output_type {
        plan.push(planned(
            "output.weight".to_string(),
            vec![spec.vocab_size, spec.n_embd],
            dtype,
            TensorRole::Vocab,
        ));
    }
    plan
}

/// The order of tensors in a file written by `llama-quantize` (its loader's
/// `weight_name_comparer`): tensors outside the layers first, then layer by layer, by name
/// within each group.
pub fn llama_cpp_tensor_order(a: &str, b: &str) -> Ordering {
    let layer = |name: &str| -> i64 {
        let index = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next());
        index.and_then(|index| index.parse().ok()).unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
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

/// As `write_model`, to any seekable writer. The whole model is built in memory and
/// quantized by candle: for small models only (see `write_streaming` for real sizes).
pub fn write_model_to<W: Write + Seek>(
    writer: &mut W,
    spec: &SynthSpec,
    tokenizer_metadata: &[(String, Value)],
) -> candle_core::Result<()> {
    let metadata = model_metadata(spec, tokenizer_metadata);
    let mut rng = XorShift(spec.seed | 1);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for PlannedTensor { entry, role } in tensor_plan(spec) {
        let tensor = match role {
            // Embedding rows of unit-ish scale give logits of a few units through the tied
            // head.
            TensorRole::Vocab => {
                QTensor::quantize(&random_tensor(&mut rng, &entry.dims, 1.0)?, entry.dtype)?
            }
            // Scaled by 1/sqrt(in) so activations keep their size through the layers.
            TensorRole::Layer => {
                let scale = 1.7 / (entry.dims[1] as f32).sqrt();
                QTensor::quantize(&random_tensor(&mut rng, &entry.dims, scale)?, entry.dtype)?
            }
            TensorRole::Norm => norm_weight(&mut rng, entry.dims[0])?,
        };
        tensors.push((entry.name, tensor));
    }

    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(writer, &metadata_refs, &tensor_refs)
}

/// How far `write_streaming` has got, for a progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteProgress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Write `spec`'s model to `path` without ever holding more than a few MiB of it: the
/// header and tensor table first (in `llama-quantize`'s tensor order), then each tensor
/// generated as random blocks of its type, a chunk of rows at a time. The file is written
/// as `path` + `.part` and renamed into place once complete and synced; on error the part
/// file is removed. Dequantized matrix weights have a spread of 1/sqrt(columns) (rows of
/// unit norm), so activations stay bounded through any number of layers and logits come
/// out with unit spread. Supports F32, Q8_0, Q4_K and Q6_K (every official mix). Calls
/// `progress` after each chunk and returns the file size.
pub fn write_streaming(
    path: &Path,
    spec: &SynthSpec,
    tokenizer_metadata: &[(String, Value)],
    progress: &mut dyn FnMut(&WriteProgress),
) -> io::Result<u64> {
    let mut plan = tensor_plan(spec);
    plan.sort_by(|a, b| llama_cpp_tensor_order(&a.entry.name, &b.entry.name));
    if let Some(bad) = plan.iter().find(|p| !can_generate(p)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot generate `{}` as {:?}", bad.entry.name, bad.entry.dtype),
        ));
    }
    let metadata = model_metadata(spec, tokenizer_metadata);
    let entries: Vec<TensorEntry> = plan.iter().map(|p| p.entry.clone()).collect();
    let mut state = WriteProgress {
        tensors_done: 0,
        tensors_total: entries.len(),
        bytes_done: 0,
        bytes_total: gguf_write::file_size(&metadata, &entries)?,
    };

    let part = part_path(path)?;
    let file = match File::create(&part) {
        Ok(file) => file,
        Err(err) => return Err(at(&part, "cannot create", err)),
    };
    let data_bytes: u64 =
        entries.iter().map(|e| e.n_bytes().next_multiple_of(gguf_write::ALIGNMENT)).sum();
    let written = (|| {
        let out = BufWriter::with_capacity(1 << 20, file);
        let mut writer = StreamWriter::start(out, &metadata, &entries)?;
        // Progress counts the header, then each chunk as it is handed over.
        state.bytes_done = state.bytes_total - data_bytes;
        progress(&state);
        let mut rng = XorShift(spec.seed | 1);
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        for planned in &plan {
            let cols = *planned.entry.dims.last().unwrap_or(&1);
            let n_rows = planned.entry.dims.iter().product::<usize>() / cols;
            let row_bytes = (planned.entry.n_bytes() as usize) / n_rows;
            let rows_per_chunk = (CHUNK_BYTES / row_bytes).max(1);
            let mut row = 0;
            while row < n_rows {
                let n = rows_per_chunk.min(n_rows - row);
                chunk.clear();
                random_rows(&mut rng, planned, cols, n, &mut chunk);
                writer.write(&chunk)?;
                row += n;
                state.bytes_done += chunk.len() as u64;
                if row == n_rows {
                    state.tensors_done += 1;
                }
                progress(&state);
            }
        }
        let file = writer.finish()?.into_inner().map_err(|err| err.into_error())?;
        // Synced before the rename, so a full disk or a crash never leaves a short file
        // under the final name.
        file.sync_all()?;
        file.metadata().map(|meta| meta.len())
    })();
    match written {
        Ok(n_bytes) => match std::fs::rename(&part, path) {
            Ok(()) => Ok(n_bytes),
            Err(err) => {
                let _ = std::fs::remove_file(&part);
                Err(at(path, "cannot move the finished file to", err))
            }
        },
        Err(err) => {
            let _ = std::fs::remove_file(&part);
            Err(at(&part, "cannot write", err))
        }
    }
}

/// Generated in chunks of about this many bytes: a few MiB bounds memory and still makes
/// large writes.
const CHUNK_BYTES: usize = 4 << 20;

fn part_path(path: &Path) -> io::Result<PathBuf> {
    match path.file_name() {
        Some(name) => {
            let mut part = name.to_os_string();
            part.push(".part");
            Ok(path.with_file_name(part))
        }
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )),
    }
}

fn at(path: &Path, what: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// The metadata both writers put in a file, in the order llama.cpp's tools leave it:
/// `general.*` and the hyper-parameters, the tokenizer, then what `llama-quantize` sets
/// last. `my_claw.synthetic` marks the file as random weights.
fn model_metadata(
    spec: &SynthSpec,
    tokenizer_metadata: &[(String, Value)],
) -> Vec<(String, Value)> {
    let arch = spec.arch.as_str();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.to_string())),
        ("general.type".into(), Value::String("model".to_string())),
        ("general.name".into(), Value::String(spec.name.clone())),
    ];
    if let Some(size_label) = &spec.size_label {
        metadata.push(("general.size_label".into(), Value::String(size_label.clone())));
    }
    metadata.extend([
        (format!("{arch}.block_count"), Value::U32(spec.n_layer as u32)),
        (format!("{arch}.context_length"), Value::U32(spec.context_length as u32)),
        (format!("{arch}.embedding_length"), Value::U32(spec.n_embd as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(spec.n_ff as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(spec.n_head as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(spec.n_head_kv as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(spec.rope_freq_base)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(spec.rms_norm_eps)),
        (format!("{arch}.attention.key_length"), Value::U32(spec.head_dim as u32)),
        (format!("{arch}.attention.value_length"), Value::U32(spec.head_dim as u32)),
    ]);
    // llama.cpp's Llama converter writes the RoPE width (candle's quantized_llama needs
    // it); its Qwen3 converter does not.
    if arch == "llama" {
        metadata.push((format!("{arch}.rope.dimension_count"), Value::U32(spec.head_dim as u32)));
    }
    if spec.reference_f32_rope {
        metadata.push(("general.dtype".into(), Value::U32(0)));
    }
    metadata.push(("my_claw.synthetic".into(), Value::Bool(true)));
    metadata.extend(tokenizer_metadata.iter().cloned());
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    if let Some(file_type) = spec.file_type {
        metadata.push(("general.file_type".into(), Value::U32(file_type)));
    }
    metadata
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer in between, get more bits for `attn_v` and `ffn_down` in Q4_K_M.
fn use_more_bits(layer: usize, n_layer: usize) -> bool {
    layer < n_layer / 8
        || layer >= 7 * n_layer / 8
        || (layer as i64 - (n_layer / 8) as i64) % 3 == 2
}

fn can_generate(planned: &PlannedTensor) -> bool {
    use GgmlDType::*;
    match planned.role {
        TensorRole::Norm => planned.entry.dtype == F32,
        TensorRole::Vocab | TensorRole::Layer => {
            matches!(planned.entry.dtype, F32 | Q8_0 | Q4K | Q6K)
        }
    }
}

/// Standard deviation of the integers `lo..=hi`, each equally likely.
fn uniform_std(lo: f32, hi: f32) -> f32 {
    let n = hi - lo + 1.0;
    ((n * n - 1.0) / 12.0).sqrt()
}

/// Root mean square of the integers `lo..=hi`, each equally likely.
fn uniform_rms(lo: f32, hi: f32) -> f32 {
    let mean = (lo + hi) / 2.0;
    (uniform_std(lo, hi).powi(2) + mean * mean).sqrt()
}

/// Append `n_rows` rows of random data of `planned`'s type and role. Quantized blocks are
/// made directly, with random quants and scales chosen so the dequantized values have the
/// spread the role asks for; their layouts follow ggml's `block_q8_0`, `block_q4_K` and
/// `block_q6_K`.
fn random_rows(
    rng: &mut XorShift,
    planned: &PlannedTensor,
    cols: usize,
    n_rows: usize,
    out: &mut Vec<u8>,
) {
    let std = 1.0 / (cols as f32).sqrt();
    let n_values = cols * n_rows;
    match (planned.role, planned.entry.dtype) {
        // A norm weight near 1 (exactly 1 would hide a missing or misplaced norm).
        (TensorRole::Norm, _) => {
            for _ in 0..n_values {
                out.extend_from_slice(&(1.0 + 0.2 * rng.next_signed()).to_le_bytes());
            }
        }
        (_, GgmlDType::F32) => {
            let scale = std * 3f32.sqrt();
            for _ in 0..n_values {
                out.extend_from_slice(&(scale * rng.next_signed()).to_le_bytes());
            }
        }
        (_, GgmlDType::Q8_0) => {
            // d * q, q in -127..=127 (-128 never comes out of ggml's quantizer).
            let d = f16::from_f32(std / uniform_std(-127.0, 127.0)).to_le_bytes();
            let mut qs = [0u8; 32];
            for _ in 0..n_values / 32 {
                rng.fill(&mut qs);
                for q in &mut qs {
                    if *q == 0x80 {
                        *q = 0x81;
                    }
                }
                out.extend_from_slice(&d);
                out.extend_from_slice(&qs);
            }
        }
        (_, GgmlDType::Q4K) => {
            // Eight sub-blocks of 32: d * sc * q - dmin * m, q in 0..=15. With m = sc and
            // dmin = 7.5 d each value is d * sc * (q - 7.5), centred on zero; sc in 32..=63.
            let d = f16::from_f32(std / (uniform_std(0.0, 15.0) * uniform_rms(32.0, 63.0)));
            let dmin = f16::from_f32(7.5 * d.to_f32());
            let mut random = [0u8; 8 + 128];
            for _ in 0..n_values / 256 {
                rng.fill(&mut random);
                let (sub_scales, qs) = random.split_at(8);
                let sc: [u8; 8] = std::array::from_fn(|j| 32 + (sub_scales[j] & 31));
                out.extend_from_slice(&d.to_le_bytes());
                out.extend_from_slice(&dmin.to_le_bytes());
                out.extend_from_slice(&pack_q4k_scales(&sc, &sc));
                out.extend_from_slice(qs);
            }
        }
        (_, GgmlDType::Q6K) => {
            // Sixteen sub-blocks of 16: d * sc * (q - 32), q in 0..=63 from 4 low bits (ql)
            // and 2 high bits (qh); |sc| in 64..=127, with a random sign (as ggml's own
            // quantizer leaves them) so that q - 32, which leans to -0.5, averages out.
            let d = f16::from_f32(std / (uniform_std(0.0, 63.0) * uniform_rms(64.0, 127.0)));
            let mut random = [0u8; 128 + 64 + 16];
            for _ in 0..n_values / 256 {
                rng.fill(&mut random);
                for scale in &mut random[192..] {
                    let magnitude = 64 + (*scale & 63) as i8;
                    let signed = if *scale & 0x80 == 0 { magnitude } else { -magnitude };
                    *scale = signed as u8;
                }
                out.extend_from_slice(&random);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
        (_, other) => unreachable!("can_generate let {other:?} through"),
    }
}

/// ggml's 12-byte packing of eight 6-bit scales and mins (`get_scale_min_k4` reads it):
/// bytes 0..4 hold scales 0..4 and the top bits of scales 4..8, bytes 4..8 the same for
/// the mins, bytes 8..12 the low nibbles of scales and mins 4..8.
fn pack_q4k_scales(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
        packed[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
        packed[j + 8] = (scales[j + 4] & 0xf) | ((mins[j + 4] & 0xf) << 4);
    }
    packed
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

/// xorshift64*: billions of weights per file, deterministic from the seed, and no
/// dependency on a particular `rand` version's stream.
struct XorShift(u64);

impl XorShift {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn next_signed(&mut self) -> f32 {
        let bits = self.next_u64() >> 40;
        (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Random bytes, eight per step.
    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let random = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&random[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{Content, TensorInfo, VersionedMagic};

    use super::*;
    use GgmlDType::*;

    /// The layers whose `attn_v` and `ffn_down` are Q6_K in llama.cpp's Q4_K_M, spelled out
    /// for 36 layers (first 4, every third from 6, last 5) and 40 (first 5, every third
    /// from 7, last 5).
    const MORE_BITS_36: [usize; 18] =
        [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35];
    const MORE_BITS_40: [usize; 20] =
        [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39];

    /// Every tensor's name, shape and type as llama.cpp's rules give them for the official
    /// file, and the total size within 3% of the published file's.
    fn check(shape: Qwen3Shape, quant: QuantMix, published_gb: f64) {
        // (layers, n_embd, q width, n_ff, tied) from each model's config.json.
        let (n_layer, n_embd, q_width, n_ff, tied) = match shape {
            Qwen3Shape::B4 => (36, 2560, 4096, 9728, true),
            Qwen3Shape::B8 => (36, 4096, 4096, 12_288, false),
            Qwen3Shape::B14 => (40, 5120, 5120, 17_408, false),
        };
        let more_bits: &[usize] = if n_layer == 36 { &MORE_BITS_36 } else { &MORE_BITS_40 };
        let q4km = quant == QuantMix::Q4_K_M;
        let matrix = |q4k_type| if q4km { q4k_type } else { Q8_0 };
        let vocab = 151_936;

        let mut expected: Vec<(String, Vec<usize>, GgmlDType)> = vec![
            ("token_embd.weight".into(), vec![vocab, n_embd], matrix(if tied { Q6K } else { Q4K })),
            ("output_norm.weight".into(), vec![n_embd], F32),
        ];
        if !tied {
            expected.push(("output.weight".into(), vec![vocab, n_embd], matrix(Q6K)));
        }
        for layer in 0..n_layer {
            let v_down = matrix(if more_bits.contains(&layer) { Q6K } else { Q4K });
            let tensors = [
                ("attn_norm", vec![n_embd], F32),
                ("attn_q", vec![q_width, n_embd], matrix(Q4K)),
                ("attn_k", vec![1024, n_embd], matrix(Q4K)),
                ("attn_v", vec![1024, n_embd], v_down),
                ("attn_output", vec![n_embd, q_width], matrix(Q4K)),
                ("attn_q_norm", vec![128], F32),
                ("attn_k_norm", vec![128], F32),
                ("ffn_norm", vec![n_embd], F32),
                ("ffn_gate", vec![n_ff, n_embd], matrix(Q4K)),
                ("ffn_up", vec![n_ff, n_embd], matrix(Q4K)),
                ("ffn_down", vec![n_embd, n_ff], v_down),
            ];
            for (name, dims, dtype) in tensors {
                expected.push((format!("blk.{layer}.{name}.weight"), dims, dtype));
            }
        }
        let spec = SynthSpec::official_qwen3(shape, quant);
        let mut planned: Vec<(String, Vec<usize>, GgmlDType)> = tensor_plan(&spec)
            .into_iter()
            .map(|p| (p.entry.name, p.entry.dims, p.entry.dtype))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        planned.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(planned, expected, "{shape:?} {quant:?}");

        let bytes: u64 = tensor_plan(&spec).iter().map(|p| p.entry.n_bytes()).sum();
        let ratio = bytes as f64 / (published_gb * 1e9);
        assert!((0.97..1.03).contains(&ratio), "{shape:?} {quant:?}: {bytes} bytes");
        assert_eq!(spec.file_type, Some(if q4km { 15 } else { 7 }));

        // The engine labels the file like the official one (`models list`, `--bench`).
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata: model_metadata(&spec, &[]).into_iter().collect(),
            tensor_infos: tensor_plan(&spec)
                .into_iter()
                .map(|p| {
                    let info = TensorInfo {
                        ggml_dtype: p.entry.dtype,
                        shape: p.entry.dims.into(),
                        offset: 0,
                    };
                    (p.entry.name, info)
                })
                .collect(),
            tensor_data_offset: 0,
        };
        let label = if q4km { "Q4_K_M" } else { "Q8_0" };
        assert_eq!(crate::llm::engine::gguf::quantization_label(&content), label);
    }

    #[test]
    fn official_tables() {
        check(Qwen3Shape::B4, QuantMix::Q4_K_M, 2.50);
        check(Qwen3Shape::B4, QuantMix::Q8_0, 4.28);
        check(Qwen3Shape::B8, QuantMix::Q4_K_M, 5.03);
        check(Qwen3Shape::B8, QuantMix::Q8_0, 8.71);
        check(Qwen3Shape::B14, QuantMix::Q4_K_M, 9.0);
        check(Qwen3Shape::B14, QuantMix::Q8_0, 15.7);
    }

    #[test]
    fn names_round_trip() {
        for shape in Qwen3Shape::ALL {
            assert_eq!(Qwen3Shape::parse(shape.label()), Some(shape));
        }
        for quant in QuantMix::ALL {
            assert_eq!(QuantMix::parse(quant.label()), Some(quant));
        }
        assert_eq!(Qwen3Shape::parse("qwen3-7b"), None);
        let spec = SynthSpec::official_qwen3(Qwen3Shape::B14, QuantMix::Q8_0);
        assert_eq!(spec.name, "Qwen3-14B (random weights, benchmark only)");
    }

    #[test]
    fn llama_cpp_order() {
        let mut names = vec![
            "blk.10.attn_k.weight",
            "token_embd.weight",
            "blk.2.ffn_up.weight",
            "blk.2.attn_q_norm.weight",
            "output.weight",
            "output_norm.weight",
            "blk.2.attn_q.weight",
        ];
        names.sort_by(|a, b| llama_cpp_tensor_order(a, b));
        assert_eq!(
            names,
            [
                "output.weight",
                "output_norm.weight",
                "token_embd.weight",
                "blk.2.attn_q.weight",
                "blk.2.attn_q_norm.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_k.weight",
            ]
        );
    }

    /// A model small enough for a unit test, with every block type the official mixes use.
    fn small_spec() -> SynthSpec {
        SynthSpec {
            n_layer: 2,
            n_embd: 256,
            n_head: 2,
            n_head_kv: 1,
            n_ff: 512,
            vocab_size: 300,
            embd_type: Q8_0,
            layer_types: vec![[Q4K, Q8_0, Q6K, F32, Q4K, Q4K, Q6K]],
            ..SynthSpec::official_qwen3(Qwen3Shape::B8, QuantMix::Q4_K_M)
        }
    }

    #[test]
    fn streamed_blocks_dequantize_to_the_intended_spread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.gguf");
        let spec = small_spec();
        let mut calls = Vec::new();
        let size = write_streaming(&path, &spec, &[], &mut |p| calls.push(*p)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        assert!(!dir.path().join("small.gguf.part").exists());
        let last = calls.last().unwrap();
        assert_eq!((last.tensors_done, last.tensors_total), (25, 25));
        assert!(last.bytes_done <= size && last.bytes_total == size, "{last:?}");

        let mut file = File::open(&path).unwrap();
        let content = Content::read(&mut file).unwrap();
        assert!(content.metadata["my_claw.synthetic"].to_bool().unwrap());
        assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), 15);
        let mut by_offset: Vec<_> = content.tensor_infos.iter().collect();
        by_offset.sort_by_key(|(_, info)| info.offset);
        let names: Vec<&str> = by_offset.iter().map(|(name, _)| name.as_str()).collect();
        let mut expected = names.clone();
        expected.sort_by(|a, b| llama_cpp_tensor_order(a, b));
        assert_eq!(names, expected);

        for (name, info) in by_offset {
            let values = content
                .tensor(&mut file, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}");
            let n = values.len() as f32;
            let mean = values.iter().sum::<f32>() / n;
            let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
            if name.ends_with("norm.weight") {
                assert!((mean - 1.0).abs() < 0.05 && std < 0.2, "{name}: {mean} ± {std}");
                continue;
            }
            let target = 1.0 / (*info.shape.dims().last().unwrap() as f32).sqrt();
            assert!(
                (std / target - 1.0).abs() < 0.05,
                "{name} {:?}: {std} vs {target}",
                info.ggml_dtype
            );
            assert!(mean.abs() < 0.05 * target, "{name}: mean {mean}");
        }
    }

    #[test]
    fn streaming_errors_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        // The tiny spec has Q4_0/Q5_0/Q5_K matrices, which the stream does not generate.
        let err = write_streaming(&path, &SynthSpec::tiny_qwen3(), &[], &mut |_| {}).unwrap_err();
        assert_eq!(err.to_string(), "cannot generate `blk.1.attn_k.weight` as Q5_0");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let missing = dir.path().join("no-such-dir").join("x.gguf");
        let err = write_streaming(&missing, &small_spec(), &[], &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().starts_with("cannot create "), "{err}");
        assert!(err.to_string().contains("x.gguf.part"), "{err}");
    }
}
