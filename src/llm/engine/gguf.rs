//! Opening and checking GGUF files before any weight is loaded: magic, version, architecture,
//! the hyper-parameters the forward pass needs, tensor presence and file bounds.
//! It reads only the header; it never builds tensors (that is `model.rs`) nor a tokenizer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::GgmlDType;

use crate::llm::engine::tokenizer::GgufTokenizer;
use crate::llm::LlmError;

crate::domain::named_enum! {
    /// The model families the engine has a forward pass for, by their
    /// `general.architecture` value (also the prefix of the hyper-parameter keys).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Architecture {
        Qwen3 = "qwen3",
        Llama = "llama",
    }
}

/// The hyper-parameters read from `{arch}.*` metadata, already checked for consistency.
#[derive(Debug, Clone, PartialEq)]
pub struct HyperParams {
    pub arch: Architecture,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head dimension of queries and keys (`attention.key_length`, else n_embd / n_head).
    pub head_dim: usize,
    pub n_ff: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    /// The context the model was trained for (`{arch}.context_length`).
    pub context_length: usize,
    /// Rows of `token_embd.weight`, which is what the logits are over.
    pub vocab_size: usize,
}

/// An opened, checked GGUF file: its parsed header and the open file to read tensors from.
#[derive(Debug)]
pub struct ModelFile {
    pub path: PathBuf,
    pub file_size: u64,
    pub content: Content,
    pub file: File,
    pub hparams: HyperParams,
    /// A llama.cpp-style label such as `Q4_K_M` or `Q4_1` (see `quantization_label`).
    pub quantization: String,
    /// `general.name`, else the file stem.
    pub name: String,
}

impl ModelFile {
    /// Builds the tokenizer from this file's `tokenizer.ggml.*` metadata; errors name the file.
    pub fn tokenizer(&self) -> Result<GgufTokenizer, LlmError> {
        GgufTokenizer::from_gguf(&self.content).map_err(|err| match err {
            LlmError::BadModel { reason, .. } => bad(&self.path, reason),
            other => other,
        })
    }
}

/// Opens `path`, parses its GGUF header and checks everything the engine relies on, so that a
/// bad file fails here with one sentence naming the file and the reason.
pub fn open(path: &Path) -> Result<ModelFile, LlmError> {
    let started = Instant::now();
    let model = read_checked(path)?;
    tracing::info!(
        path = %path.display(),
        file_size_mb = model.file_size / (1024 * 1024),
        n_tensors = model.content.tensor_infos.len(),
        quantization = %model.quantization,
        arch = model.hparams.arch.as_str(),
        n_layer = model.hparams.n_layer,
        n_embd = model.hparams.n_embd,
        vocab_size = model.hparams.vocab_size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "opened GGUF model file"
    );
    Ok(model)
}

/// `open`'s checks, keeping nothing: what `serve` runs at start on every local model file,
/// so a bad one (a download cut short, an unsupported architecture) stops the start with
/// the reason instead of failing the first answer. Reads the header only (metadata and
/// tensor table: tens of milliseconds for a large vocabulary), never tensor data.
pub fn check(path: &Path) -> Result<(), LlmError> {
    read_checked(path).map(|_| ())
}

fn read_checked(path: &Path) -> Result<ModelFile, LlmError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) => return Err(bad(path, format!("cannot open: {err}"))),
    };
    let file_size = match file.metadata() {
        Ok(meta) if meta.is_file() => meta.len(),
        Ok(_) => return Err(bad(path, "not a regular file".to_string())),
        Err(err) => return Err(bad(path, format!("cannot read metadata: {err}"))),
    };
    check_magic_and_version(path, &mut file, file_size)?;

    // Candle bounds-checks lengths against the file size, but its messages are terse; wrap them
    // in one sentence that says the header itself is unreadable.
    let content = {
        let mut reader = BufReader::new(&mut file);
        match Content::read(&mut reader) {
            Ok(content) => content,
            Err(err) => {
                let message = err.to_string();
                let detail = first_line(&message);
                return Err(bad(path, format!("corrupt or truncated GGUF header ({detail})")));
            }
        }
    };

    check_tensor_bounds(path, &content, file_size)?;
    let hparams = read_hparams(path, &content)?;
    check_required_tensors(path, &content, &hparams)?;
    let quantization = quantization_label(&content);
    let name = match content.metadata.get("general.name") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        _ => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    if let Err(err) = file.seek(SeekFrom::Start(0)) {
        return Err(bad(path, format!("cannot seek: {err}")));
    }
    Ok(ModelFile {
        path: path.to_path_buf(),
        file_size,
        content,
        file,
        hparams,
        quantization,
        name,
    })
}

/// The llama.cpp name of a tensor type (`Q4_K`, not candle's `Q4K`).
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A label for the file's quantization. The dominant weight type (by bytes, over matrices)
/// decides; `general.file_type` refines it (`Q4_K` → `Q4_K_M`) only when it agrees, because
/// re-quantising tools sometimes copy a stale `file_type` from their input.
pub fn quantization_label(content: &Content) -> String {
    let mut bytes_by_type: HashMap<GgmlDType, u64> = HashMap::new();
    for info in content.tensor_infos.values() {
        if info.shape.rank() >= 2 {
            *bytes_by_type.entry(info.ggml_dtype).or_default() += tensor_size(info);
        }
    }
    // Ties are broken by name so the label does not depend on hash order.
    let dominant = bytes_by_type
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| dtype_name(*b.0).cmp(dtype_name(*a.0))))
        .map(|(dtype, _)| dtype_name(*dtype));
    let from_file_type =
        content.metadata.get("general.file_type").and_then(value_as_u64).and_then(file_type_name);
    match (dominant, from_file_type) {
        (Some(dominant), Some(label)) if label.starts_with(dominant) => label.to_string(),
        (Some(dominant), _) => dominant.to_string(),
        (None, Some(label)) => label.to_string(),
        (None, None) => "unknown".to_string(),
    }
}

fn bad(path: &Path, reason: String) -> LlmError {
    LlmError::BadModel { path: path.display().to_string(), reason }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// Reads the 8-byte preamble ourselves, because candle reports a wrong magic as a bare hex
/// number and accepts a byte-swapped magic that it then cannot parse.
fn check_magic_and_version(path: &Path, file: &mut File, file_size: u64) -> Result<(), LlmError> {
    let mut head = [0u8; 8];
    let n_read = match read_up_to(file, &mut head) {
        Ok(n) => n,
        Err(err) => return Err(bad(path, format!("cannot read: {err}"))),
    };
    if n_read < 4 || &head[..4] != b"GGUF" {
        let shown = escape_bytes(&head[..n_read.min(4)]);
        return Err(bad(
            path,
            format!("not a GGUF file (magic is \"{shown}\", expected \"GGUF\")"),
        ));
    }
    if n_read < 8 {
        return Err(bad(path, format!("truncated: the file has only {file_size} bytes")));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(1..=3).contains(&version) {
        return Err(bad(path, format!("unsupported GGUF version {version} (supported: 1 to 3)")));
    }
    match file.seek(SeekFrom::Start(0)) {
        Ok(_) => Ok(()),
        Err(err) => Err(bad(path, format!("cannot seek: {err}"))),
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Printable ASCII as is, anything else as `\xNN`, so the message stays one readable line.
fn escape_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' => format!("\\{}", b as char),
            0x20..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect()
}

fn tensor_size(info: &gguf_file::TensorInfo) -> u64 {
    let n_elems = info.shape.elem_count() as u64;
    let block_size = info.ggml_dtype.block_size() as u64;
    n_elems / block_size.max(1) * info.ggml_dtype.type_size() as u64
}

/// Every tensor's bytes must lie inside the file: a download cut short otherwise loads fine
/// and fails (or reads garbage) much later. A truncated file is told by how many bytes it
/// lacks (to the end of the last tensor) and the first tensor it cuts.
fn check_tensor_bounds(path: &Path, content: &Content, file_size: u64) -> Result<(), LlmError> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|name| content.tensor_infos[*name].offset);
    let data_end = |name: &String| {
        let info = &content.tensor_infos[name];
        content.tensor_data_offset.saturating_add(info.offset).saturating_add(tensor_size(info))
    };
    let needed = names.iter().map(|name| data_end(name)).max().unwrap_or(0);
    for name in names {
        let info = &content.tensor_infos[name];
        let block_size = info.ggml_dtype.block_size();
        if !info.shape.elem_count().is_multiple_of(block_size) {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` has {} elements, not a multiple of the {} block size {}",
                    info.shape.elem_count(),
                    dtype_name(info.ggml_dtype),
                    block_size
                ),
            ));
        }
        if data_end(name) > file_size {
            let missing = needed - file_size;
            return Err(bad(
                path,
                format!(
                    "truncated: {missing} byte{} missing (its tensors end at byte {needed}, the \
                     file has {file_size}; tensor `{name}` is the first cut short): was its \
                     download interrupted?",
                    if missing == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    Ok(())
}

fn value_as_u64(value: &Value) -> Option<u64> {
    match *value {
        Value::U8(v) => Some(v as u64),
        Value::U16(v) => Some(v as u64),
        Value::U32(v) => Some(v as u64),
        Value::U64(v) => Some(v),
        Value::I8(v) => u64::try_from(v).ok(),
        Value::I16(v) => u64::try_from(v).ok(),
        Value::I32(v) => u64::try_from(v).ok(),
        Value::I64(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

fn value_as_f64(value: &Value) -> Option<f64> {
    match *value {
        Value::F32(v) => Some(v as f64),
        Value::F64(v) => Some(v),
        _ => value_as_u64(value).map(|v| v as f64),
    }
}

/// llama.cpp's `llama_ftype` names, for the types candle can load.
fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// Typed access to `{arch}.*` keys with messages that name the key.
struct Keys<'a> {
    path: &'a Path,
    metadata: &'a HashMap<String, Value>,
    arch: &'static str,
}

impl Keys<'_> {
    fn get(&self, suffix: &str) -> Option<(String, &Value)> {
        let key = format!("{}.{suffix}", self.arch);
        self.metadata.get(&key).map(|value| (key, value))
    }

    fn missing(&self, suffix: &str) -> LlmError {
        bad(self.path, format!("missing metadata key `{}.{suffix}`", self.arch))
    }

    fn not_a(&self, key: &str, what: &str, value: &Value) -> LlmError {
        bad(self.path, format!("metadata key `{key}` is not {what} (found {value:?})"))
    }

    fn opt_usize(&self, suffix: &str) -> Result<Option<usize>, LlmError> {
        match self.get(suffix) {
            None => Ok(None),
            Some((key, value)) => match value_as_u64(value).and_then(|v| usize::try_from(v).ok()) {
                Some(v) if v > 0 => Ok(Some(v)),
                _ => Err(self.not_a(&key, "a positive integer", value)),
            },
        }
    }

    fn usize(&self, suffix: &str) -> Result<usize, LlmError> {
        match self.opt_usize(suffix)? {
            Some(v) => Ok(v),
            None => Err(self.missing(suffix)),
        }
    }

    fn opt_f64(&self, suffix: &str) -> Result<Option<f64>, LlmError> {
        match self.get(suffix) {
            None => Ok(None),
            Some((key, value)) => match value_as_f64(value) {
                Some(v) if v.is_finite() && v > 0.0 => Ok(Some(v)),
                _ => Err(self.not_a(&key, "a positive number", value)),
            },
        }
    }
}

fn read_hparams(path: &Path, content: &Content) -> Result<HyperParams, LlmError> {
    let arch_name = match content.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(bad(path, format!("`general.architecture` is not a string ({other:?})")))
        }
        None => return Err(bad(path, "missing metadata key `general.architecture`".to_string())),
    };
    let arch = match Architecture::parse(arch_name) {
        Some(arch) => arch,
        None => {
            return Err(bad(
                path,
                format!("unsupported architecture `{arch_name}` (supported: qwen3, llama)"),
            ))
        }
    };
    let keys = Keys { path, metadata: &content.metadata, arch: arch.as_str() };

    let n_layer = keys.usize("block_count")?;
    let n_embd = keys.usize("embedding_length")?;
    let n_head = keys.usize("attention.head_count")?;
    let n_head_kv = keys.opt_usize("attention.head_count_kv")?.unwrap_or(n_head);
    let n_ff = keys.usize("feed_forward_length")?;
    let default_rope_base = match arch {
        Architecture::Qwen3 => 1_000_000.0,
        Architecture::Llama => 10_000.0,
    };
    let rope_freq_base = keys.opt_f64("rope.freq_base")?.unwrap_or(default_rope_base) as f32;
    let rms_norm_eps = match keys.opt_f64("attention.layer_norm_rms_epsilon")? {
        Some(eps) => eps,
        None => return Err(keys.missing("attention.layer_norm_rms_epsilon")),
    };
    let context_length = keys.usize("context_length")?;
    let head_dim = match keys.opt_usize("attention.key_length")? {
        Some(head_dim) => head_dim,
        None if n_embd % n_head == 0 => n_embd / n_head,
        None => {
            return Err(bad(
                path,
                format!(
                    "embedding_length {n_embd} is not a multiple of head_count {n_head} and \
                     `{}.attention.key_length` is missing",
                    arch.as_str()
                ),
            ))
        }
    };
    if n_head % n_head_kv != 0 {
        return Err(bad(
            path,
            format!("head_count {n_head} is not a multiple of head_count_kv {n_head_kv}"),
        ));
    }

    // The embedding table is the ground truth for the vocabulary the logits cover; candle
    // reports GGUF dims reversed, so its shape is (vocab, n_embd).
    let vocab_size = match content.tensor_infos.get("token_embd.weight") {
        None => return Err(bad(path, "missing tensor `token_embd.weight`".to_string())),
        Some(info) => match info.shape.dims() {
            [n_vocab, width] if *width == n_embd && *n_vocab > 0 => *n_vocab,
            dims => {
                return Err(bad(
                    path,
                    format!(
                        "tensor `token_embd.weight` has shape {dims:?}, expected (vocab, {n_embd})"
                    ),
                ))
            }
        },
    };

    Ok(HyperParams {
        arch,
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        head_dim,
        n_ff,
        rope_freq_base,
        rms_norm_eps,
        context_length,
        vocab_size,
    })
}

/// The tensors the forward pass reads. `output.weight` is optional: without it the
/// embeddings are tied.
fn check_required_tensors(
    path: &Path,
    content: &Content,
    hparams: &HyperParams,
) -> Result<(), LlmError> {
    let mut per_layer = vec![
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    if hparams.arch == Architecture::Qwen3 {
        per_layer.extend(["attn_q_norm.weight", "attn_k_norm.weight"]);
    }
    let mut required = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    for layer_idx in 0..hparams.n_layer {
        required.extend(per_layer.iter().map(|suffix| format!("blk.{layer_idx}.{suffix}")));
    }
    match required.iter().find(|name| !content.tensor_infos.contains_key(name.as_str())) {
        Some(name) => Err(bad(
            path,
            format!(
                "missing tensor `{name}` (a {} model with {} layers needs it)",
                hparams.arch.as_str(),
                hparams.n_layer
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;

    /// A complete tiny model: 1 layer, n_embd 8, 2 heads, vocab 4, weights of `dtype`
    /// (a block-size-compatible width of 256 is used for k-quants).
    fn tiny_model(arch: &str, dtype: GgmlDType, extra: &[(&str, Value)]) -> (Vec<u8>, u64) {
        let width = if dtype.block_size() > 32 { 256 } else { 32 };
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("tiny".into())),
            (format!("{arch}.block_count"), Value::U32(1)),
            (format!("{arch}.embedding_length"), Value::U32(width as u32)),
            (format!("{arch}.attention.head_count"), Value::U32(2)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(1)),
            (format!("{arch}.feed_forward_length"), Value::U32(width as u32)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
            (format!("{arch}.context_length"), Value::U32(128)),
        ];
        for (key, value) in extra {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value.clone()));
        }
        let mat = |rows: usize| {
            let t = Tensor::zeros((rows, width), candle_core::DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&t, dtype).unwrap()
        };
        let vec1 = || {
            let t = Tensor::ones(width, candle_core::DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        let mut tensors: Vec<(String, QTensor)> =
            vec![("token_embd.weight".into(), mat(4)), ("output_norm.weight".into(), vec1())];
        for name in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        {
            tensors.push((format!("blk.0.{name}.weight"), mat(width)));
        }
        for name in ["attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"] {
            tensors.push((format!("blk.0.{name}.weight"), vec1()));
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut cursor = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut cursor, &meta_refs, &tensor_refs).unwrap();
        let bytes = cursor.into_inner();
        let len = bytes.len() as u64;
        (bytes, len)
    }

    fn write_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    /// Opens `bytes` as a file and returns the error message, which must name the file.
    fn open_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(&dir, "model.gguf", bytes);
        let err = open(&path).unwrap_err();
        assert!(matches!(err, LlmError::BadModel { .. }), "{err:?}");
        let msg = err.to_string();
        let prefix = format!("model file {}: ", path.display());
        assert!(msg.starts_with(&prefix), "{msg}");
        msg[prefix.len()..].to_string()
    }

    #[test]
    fn every_candle_quantization_opens() {
        let cases = [
            (GgmlDType::Q4_0, "Q4_0"),
            (GgmlDType::Q4_1, "Q4_1"),
            (GgmlDType::Q4K, "Q4_K"),
            (GgmlDType::Q5K, "Q5_K"),
            (GgmlDType::Q6K, "Q6_K"),
            (GgmlDType::Q8_0, "Q8_0"),
            (GgmlDType::F16, "F16"),
            (GgmlDType::F32, "F32"),
        ];
        for (dtype, label) in cases {
            for arch in ["qwen3", "llama"] {
                let (bytes, len) = tiny_model(arch, dtype, &[]);
                let dir = tempfile::tempdir().unwrap();
                let path = write_file(&dir, "m.gguf", &bytes);
                let model = open(&path).unwrap_or_else(|e| panic!("{label} {arch}: {e}"));
                assert_eq!(model.quantization, label);
                assert_eq!(model.file_size, len);
                assert_eq!(model.name, "tiny");
                assert_eq!(model.hparams.n_layer, 1);
                assert_eq!(model.hparams.n_head_kv, 1);
                assert_eq!(model.hparams.vocab_size, 4);
                assert_eq!(model.hparams.head_dim, model.hparams.n_embd / 2);
            }
        }
    }

    #[test]
    fn defaults_and_file_type_label() {
        let (bytes, _) = tiny_model(
            "qwen3",
            GgmlDType::Q4K,
            &[
                ("general.file_type", Value::U32(15)),
                ("qwen3.attention.key_length", Value::U32(128)),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let model = open(&write_file(&dir, "m.gguf", &bytes)).unwrap();
        assert_eq!(model.quantization, "Q4_K_M");
        assert_eq!(model.hparams.head_dim, 128);
        assert_eq!(model.hparams.rope_freq_base, 1_000_000.0);
        assert_eq!(model.hparams.arch, Architecture::Qwen3);

        // A stale file_type that disagrees with the weights is ignored.
        let stale = [("general.file_type", Value::U32(15))];
        let (bytes, _) = tiny_model("llama", GgmlDType::Q8_0, &stale);
        let model = open(&write_file(&dir, "n.gguf", &bytes)).unwrap();
        assert_eq!(model.quantization, "Q8_0");
        assert_eq!(model.hparams.rope_freq_base, 10_000.0);
    }

    #[test]
    fn not_a_gguf_file() {
        assert_eq!(
            open_err(b"\x7fELF\x02\x01\x01\0 and more"),
            r#"not a GGUF file (magic is "\x7fELF", expected "GGUF")"#
        );
        assert_eq!(open_err(b"{}"), r#"not a GGUF file (magic is "{}", expected "GGUF")"#);
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.gguf");
        let msg = open(&path).unwrap_err().to_string();
        assert!(msg.starts_with(&format!("model file {}: cannot open: ", path.display())), "{msg}");
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = tiny_model("llama", GgmlDType::F32, &[]).0;
        bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(open_err(&bytes), "unsupported GGUF version 7 (supported: 1 to 3)");
    }

    #[test]
    fn truncated_gguf() {
        let (bytes, len) = tiny_model("qwen3", GgmlDType::Q4_1, &[]);
        let cut = &bytes[..bytes.len() - 100];
        let msg = open_err(cut);
        let cut_len = len - 100;
        assert!(msg.starts_with("truncated: 100 bytes missing (its tensors end at byte "), "{msg}");
        assert!(msg.contains(&format!(", the file has {cut_len}; tensor `")), "{msg}");

        // Cut inside the header: candle's parse fails and we say so in one sentence.
        let msg = open_err(&bytes[..40]);
        assert!(msg.starts_with("corrupt or truncated GGUF header ("), "{msg}");
    }

    #[test]
    fn unsupported_architecture() {
        let (bytes, _) = tiny_model("gemma", GgmlDType::F32, &[]);
        assert_eq!(open_err(&bytes), "unsupported architecture `gemma` (supported: qwen3, llama)");
    }

    #[test]
    fn missing_key() {
        let (bytes, _) = tiny_model("llama", GgmlDType::F32, &[]);
        let content = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert!(content.metadata.contains_key("llama.feed_forward_length"));
        // Rewrite the file without the key (same tensors).
        let without = rewrite_without(&bytes, "llama.feed_forward_length");
        assert_eq!(open_err(&without), "missing metadata key `llama.feed_forward_length`");
        let without = rewrite_without(&bytes, "llama.attention.layer_norm_rms_epsilon");
        assert_eq!(
            open_err(&without),
            "missing metadata key `llama.attention.layer_norm_rms_epsilon`"
        );
    }

    #[test]
    fn missing_tensor() {
        let (bytes, _) = tiny_model("qwen3", GgmlDType::F32, &[]);
        let without = rewrite_without_tensor(&bytes, "blk.0.attn_q_norm.weight");
        assert_eq!(
            open_err(&without),
            "missing tensor `blk.0.attn_q_norm.weight` (a qwen3 model with 1 layers needs it)"
        );
    }

    fn rewrite(bytes: &[u8], skip_key: &str, skip_tensor: &str) -> Vec<u8> {
        let mut reader = std::io::Cursor::new(bytes);
        let content = Content::read(&mut reader).unwrap();
        let meta: Vec<(&str, &Value)> = content
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != skip_key)
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let mut tensors = Vec::new();
        for name in content.tensor_infos.keys().filter(|k| k.as_str() != skip_tensor) {
            tensors.push((name.as_str(), content.tensor(&mut reader, name, &Device::Cpu).unwrap()));
        }
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &meta, &tensor_refs).unwrap();
        out.into_inner()
    }

    fn rewrite_without(bytes: &[u8], key: &str) -> Vec<u8> {
        rewrite(bytes, key, "")
    }

    fn rewrite_without_tensor(bytes: &[u8], tensor: &str) -> Vec<u8> {
        rewrite(bytes, "", tensor)
    }
}
