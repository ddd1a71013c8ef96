//! The tokenizer built from a GGUF's `tokenizer.ggml.*` metadata (byte-level BPE, PROTOCOLS.md
//! §5), its stop tokens, and UTF-8-safe stream decoding. No tokenizer.json is needed at run
//! time; this module reads metadata only and never touches weights or the chat template.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel as ByteLevelPre;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use crate::llm::LlmError;

/// The `qwen2` pre-tokenizer regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`, PROTOCOLS.md §5.3):
/// the HF Qwen2 pattern with `(?i:…)` spelled out. Digits are split one at a time.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `token_type` values (llama.cpp `llama_token_type`) that are plain vocabulary.
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_BYTE: i64 = 6;

/// A byte-level BPE tokenizer rebuilt from GGUF metadata, plus the ids the engine needs.
///
/// Cheap to share: the per-token byte table used by `StreamDecoder` is behind an `Arc`.
#[derive(Clone)]
pub struct GgufTokenizer {
    tokenizer: Tokenizer,
    token_bytes: Arc<TokenBytes>,
    /// Ids whose type is not NORMAL or BYTE (control, user-defined, unused) plus BOS, UNK
    /// and EOS, sorted: matched atomically by `encode`, never spelled out by grammars.
    special_ids: Vec<u32>,
    stop_ids: Vec<u32>,
    bos_id: Option<u32>,
    eos_id: u32,
    add_bos: bool,
    vocab_size: usize,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("stop_ids", &self.stop_ids)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer the way mistral.rs does (PROTOCOLS.md §5.2): vocabulary and merges
    /// into a `tokenizers` BPE, the pre-tokenizer chosen by `tokenizer.ggml.pre` (an unknown
    /// profile is an error, never a guess), a ByteLevel decoder, and every token whose type
    /// is not NORMAL or BYTE registered as a special added token so it is matched atomically.
    ///
    /// Errors are `LlmError::BadModel` with the path `GGUF metadata`; `ModelFile::tokenizer`
    /// puts the real file path in instead.
    pub fn from_gguf(content: &Content) -> Result<Self, LlmError> {
        let started = Instant::now();
        let meta = &content.metadata;
        let model = match meta.get("tokenizer.ggml.model") {
            Some(Value::String(model)) => model.as_str(),
            Some(other) => return Err(bad(format!("`tokenizer.ggml.model` is {other:?}"))),
            None => return Err(bad("missing metadata key `tokenizer.ggml.model`".to_string())),
        };
        if model != "gpt2" {
            return Err(bad(format!(
                "unsupported tokenizer model `{model}` (supported: gpt2, i.e. byte-level BPE)"
            )));
        }
        let tokens = string_array(meta, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(bad("`tokenizer.ggml.tokens` is empty".to_string()));
        }
        let token_types = match meta.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(value) => int_array(value, "tokenizer.ggml.token_type")?,
        };
        if token_types.len() != tokens.len() {
            return Err(bad(format!(
                "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                token_types.len(),
                tokens.len()
            )));
        }
        let merges = string_array(meta, "tokenizer.ggml.merges")?;
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (merge_idx, merge) in merges.iter().enumerate() {
            match merge.split_once(' ') {
                Some((left, right)) if !left.is_empty() && !right.is_empty() => {
                    merge_pairs.push((left.to_string(), right.to_string()))
                }
                _ => return Err(bad(format!("merge {merge_idx} `{merge}` is not `left right`"))),
            }
        }

        // Special ids come from untrusted metadata: bounds-check them against the vocabulary.
        let n_tokens = tokens.len();
        let bos_id = opt_token_id(meta, "tokenizer.ggml.bos_token_id", n_tokens)?;
        let unk_id = opt_token_id(meta, "tokenizer.ggml.unknown_token_id", n_tokens)?;
        let eos_id = match opt_token_id(meta, "tokenizer.ggml.eos_token_id", n_tokens)? {
            Some(id) => id,
            None => return Err(bad("missing metadata key `tokenizer.ggml.eos_token_id`".into())),
        };
        let add_bos = match meta.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(add_bos)) => *add_bos,
            _ => false,
        };
        let pre = match meta.get("tokenizer.ggml.pre") {
            Some(Value::String(pre)) => Some(pre.as_str()),
            _ => None,
        };
        let profile = PreProfile::select(pre)?;

        let vocab: Vocab =
            tokens.iter().enumerate().map(|(id, token)| (token.clone(), id as u32)).collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merge_pairs)
            .ignore_merges(profile.ignore_merges());
        if let Some(unk_id) = unk_id {
            builder = builder.unk_token(tokens[unk_id as usize].clone());
        }
        let bpe = match builder.build() {
            Ok(bpe) => bpe,
            Err(err) => return Err(bad(format!("cannot build the BPE model: {err}"))),
        };
        let mut tokenizer = Tokenizer::new(bpe);
        if profile.nfc() {
            if let Err(err) = tokenizer.with_normalizer(Some(NFC)) {
                return Err(bad(format!("cannot set the NFC normalizer: {err}")));
            }
        }
        tokenizer.with_pre_tokenizer(Some(profile.pre_tokenizer()?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        // The ByteLevel post-processor only adjusts offsets; it adds no BOS (see `encode`).
        tokenizer.with_post_processor(Some(ByteLevelProcessor::new(false, false, false)));

        let mut special_ids: Vec<u32> = token_types
            .iter()
            .enumerate()
            .filter(|(_, ty)| !matches!(**ty, TOKEN_TYPE_NORMAL | TOKEN_TYPE_BYTE))
            .map(|(id, _)| id as u32)
            .collect();
        special_ids.extend(bos_id.iter().chain(unk_id.iter()).chain([eos_id].iter()));
        special_ids.sort_unstable();
        special_ids.dedup();
        let specials: Vec<AddedToken> = special_ids
            .iter()
            .map(|&id| AddedToken::from(tokens[id as usize].clone(), true))
            .collect();
        if let Err(err) = tokenizer.add_special_tokens(specials) {
            return Err(bad(format!("cannot register the special tokens: {err}")));
        }

        let token_bytes = Arc::new(TokenBytes::new(&tokenizer, n_tokens));
        let mut stop_ids = Vec::new();
        for id in [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
            .into_iter()
            .flatten()
            .chain([eos_id])
        {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        tracing::info!(
            n_tokens,
            n_merges = merges.len(),
            n_special = special_ids.len(),
            pre = pre.unwrap_or("(none)"),
            ?stop_ids,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built tokenizer from GGUF metadata"
        );
        Ok(Self {
            tokenizer,
            token_bytes,
            special_ids,
            stop_ids,
            bos_id,
            eos_id,
            add_bos,
            vocab_size: n_tokens,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`, `<think>`…)
    /// become their single id. BOS is prepended only when the GGUF sets
    /// `tokenizer.ggml.add_bos_token = true`, which Qwen3 and SmolLM2 do not.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        let encoding = match self.tokenizer.encode_fast(text, false) {
            Ok(encoding) => encoding,
            Err(err) => return Err(LlmError::Inference(format!("tokenizer encode: {err}"))),
        };
        let ids = encoding.get_ids();
        match self.bos_id {
            Some(bos_id) if self.add_bos => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(bos_id);
                with_bos.extend_from_slice(ids);
                Ok(with_bos)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Text of `ids`, special tokens included (`skip_special_tokens = false`). Invalid UTF-8
    /// (a sequence cut mid-character) comes out as U+FFFD, as in `tokenizers`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        match self.tokenizer.decode(ids, false) {
            Ok(text) => Ok(text),
            Err(err) => Err(LlmError::Inference(format!("tokenizer decode: {err}"))),
        }
    }

    /// Ids that end a generation: `<|im_end|>` and `<|endoftext|>` when the vocabulary has
    /// them, plus the GGUF `eos_token_id`, in that order without duplicates.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The id of a token given by its exact vocabulary string (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The bytes token `id` decodes to (a special token: its text), for the constrained
    /// decoder's token trie.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id)
    }

    /// Whether `id` is a special token (not NORMAL or BYTE, or BOS/UNK/EOS): text never
    /// spells it out, and a grammar admits it only where it names it.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.binary_search(&id).is_ok()
    }

    /// Length of `tokenizer.ggml.tokens` (Qwen3: 151936, padding entries included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether `encode` prepends BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// A fresh incremental decoder. It is owned (it shares the byte table through an `Arc`),
    /// so the worker can keep it next to the tokenizer without borrowing.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder { token_bytes: Arc::clone(&self.token_bytes), pending: Vec::new() }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Turns generated ids into text as they arrive, emitting only complete UTF-8.
///
/// Byte-level BPE splits a character such as an emoji across several tokens; decoding each
/// token alone would yield U+FFFD. This keeps the bytes of an unfinished character until it
/// is complete. The concatenation of every `push` result and `finish` equals
/// `GgufTokenizer::decode` of all the ids.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    token_bytes: Arc<TokenBytes>,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds one token; returns the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, LlmError> {
        match self.token_bytes.get(id) {
            Some(bytes) => self.pending.extend_from_slice(bytes),
            None => {
                return Err(LlmError::Inference(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.token_bytes.len()
                )))
            }
        }
        let text = self.take_complete();
        Ok(if text.is_empty() { None } else { Some(text) })
    }

    /// Flushes what is left (an unfinished character becomes U+FFFD) and resets the decoder.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// Emits the longest decodable prefix. Bytes that can never become valid are replaced by
    /// U+FFFD exactly as `String::from_utf8_lossy` would, so the output matches `decode`.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    // The prefix was just validated, so this cannot fail.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match err.error_len() {
                        // An unfinished character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(n_invalid) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n_invalid);
                        }
                    }
                }
            }
        }
    }
}

/// The raw bytes each token id decodes to, flattened (offsets into one buffer).
#[derive(Debug)]
struct TokenBytes {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
}

impl TokenBytes {
    /// Mirrors the ByteLevel decoder: a token whose every char is in the GPT-2 byte alphabet
    /// maps char by char to bytes; any other token (e.g. an added token with a real space)
    /// is its UTF-8 text as is.
    fn new(tokenizer: &Tokenizer, n_tokens: usize) -> Self {
        let char_to_byte = gpt2_char_to_byte();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n_tokens + 1);
        offsets.push(0);
        for id in 0..n_tokens {
            if let Some(token) = tokenizer.id_to_token(id as u32) {
                let mapped: Option<Vec<u8>> =
                    token.chars().map(|c| char_to_byte.get(&c).copied()).collect();
                match mapped {
                    Some(mapped) => bytes.extend_from_slice(&mapped),
                    None => bytes.extend_from_slice(token.as_bytes()),
                }
            }
            offsets.push(bytes.len());
        }
        Self { bytes, offsets }
    }

    fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    fn get(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        if id >= self.len() {
            return None;
        }
        Some(&self.bytes[self.offsets[id]..self.offsets[id + 1]])
    }
}

/// GPT-2's `bytes_to_unicode` inverted: printable bytes stand for themselves, the other 68
/// bytes are shifted to U+0100 and up, in byte order.
fn gpt2_char_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut n_shifted = 0u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(byte)
        } else {
            n_shifted += 1;
            char::from_u32(255 + n_shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, byte);
    }
    map
}

/// Pre-tokenizer profiles named by `tokenizer.ggml.pre`, each matching the HF tokenizer.json
/// of the model family (llama.cpp's `llama-vocab.cpp` uses the same regexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreProfile {
    /// Qwen2 / Qwen2.5 / Qwen3: NFC, the qwen2 regex, one digit per piece.
    Qwen2,
    /// SmolLM / StarCoder: every digit isolated, then GPT-2's byte-level regex.
    SmolLm,
    /// Plain GPT-2 byte-level regex.
    Gpt2,
}

impl PreProfile {
    fn select(pre: Option<&str>) -> Result<Self, LlmError> {
        match pre {
            Some("qwen2") => Ok(PreProfile::Qwen2),
            Some("smollm") | Some("starcoder") => Ok(PreProfile::SmolLm),
            // Old converters wrote no `pre` for GPT-2-style models: the GPT-2 regex is what
            // llama.cpp falls back to for them too.
            Some("gpt2") | Some("default") | None => Ok(PreProfile::Gpt2),
            Some(other) => Err(bad(format!(
                "unsupported pre-tokenizer `{other}` in `tokenizer.ggml.pre` (supported: qwen2, \
                 smollm, starcoder, gpt2); refusing to guess its split rules"
            ))),
        }
    }

    /// The HF Qwen2 tokenizer.json has an NFC normalizer; matching it is what parity needs.
    fn nfc(self) -> bool {
        self == PreProfile::Qwen2
    }

    fn ignore_merges(self) -> bool {
        false
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, LlmError> {
        Ok(match self {
            PreProfile::Qwen2 => {
                let split = match Split::new(
                    SplitPattern::Regex(REGEX_QWEN2.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                ) {
                    Ok(split) => split,
                    Err(err) => return Err(bad(format!("cannot compile the qwen2 regex: {err}"))),
                };
                Sequence::new(vec![split.into(), ByteLevelPre::new(false, false, false).into()])
                    .into()
            }
            // `ByteLevel` with `use_regex` applies GPT-2's own regex, exactly as the HF
            // tokenizer.json of these models does.
            PreProfile::SmolLm => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevelPre::new(false, true, true).into(),
            ])
            .into(),
            PreProfile::Gpt2 => ByteLevelPre::new(false, true, true).into(),
        })
    }
}

fn bad(reason: String) -> LlmError {
    LlmError::BadModel { path: "GGUF metadata".to_string(), reason }
}

fn string_array(meta: &HashMap<String, Value>, key: &str) -> Result<Vec<String>, LlmError> {
    let values = match meta.get(key) {
        Some(Value::Array(values)) => values,
        Some(_) => return Err(bad(format!("`{key}` is not an array"))),
        None => return Err(bad(format!("missing metadata key `{key}`"))),
    };
    let mut strings = Vec::with_capacity(values.len());
    for (idx, value) in values.iter().enumerate() {
        match value {
            Value::String(s) => strings.push(s.clone()),
            other => return Err(bad(format!("`{key}`[{idx}] is not a string ({other:?})"))),
        }
    }
    Ok(strings)
}

fn value_as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v as i64),
        Value::I8(v) => Some(v as i64),
        Value::U16(v) => Some(v as i64),
        Value::I16(v) => Some(v as i64),
        Value::U32(v) => Some(v as i64),
        Value::I32(v) => Some(v as i64),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn int_array(value: &Value, key: &str) -> Result<Vec<i64>, LlmError> {
    let values = match value {
        Value::Array(values) => values,
        _ => return Err(bad(format!("`{key}` is not an array"))),
    };
    values
        .iter()
        .enumerate()
        .map(|(idx, v)| {
            value_as_i64(v).ok_or_else(|| bad(format!("`{key}`[{idx}] is not an integer ({v:?})")))
        })
        .collect()
}

fn opt_token_id(
    meta: &HashMap<String, Value>,
    key: &str,
    n_tokens: usize,
) -> Result<Option<u32>, LlmError> {
    let Some(value) = meta.get(key) else { return Ok(None) };
    match value_as_i64(value) {
        Some(id) if id >= 0 && (id as u64) < n_tokens as u64 => Ok(Some(id as u32)),
        _ => Err(bad(format!("`{key}` = {value:?} is not a token id below {n_tokens}"))),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file;

    use super::*;

    /// A toy byte-level vocabulary: all 256 byte symbols, a few merges and ChatML specials.
    fn toy_content(pre: Option<&str>, extra_tokens: &[(&str, i32)]) -> Content {
        let char_to_byte = gpt2_char_to_byte();
        let mut byte_chars: Vec<(u8, char)> = char_to_byte.iter().map(|(c, b)| (*b, *c)).collect();
        byte_chars.sort();
        let mut tokens: Vec<String> = byte_chars.iter().map(|(_, c)| c.to_string()).collect();
        let mut types = vec![1i32; tokens.len()];
        for (merged, _) in [("he", 0), ("ll", 0), ("hell", 0), ("hello", 0)] {
            tokens.push(merged.to_string());
            types.push(1);
        }
        for (token, ty) in [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3)]
            .iter()
            .chain(extra_tokens)
        {
            tokens.push(token.to_string());
            types.push(*ty);
        }
        let merges = ["h e", "l l", "he ll", "hell o"];
        let mut metadata = HashMap::new();
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        metadata.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        if let Some(pre) = pre {
            metadata.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        }
        let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap() as u32;
        metadata.insert("tokenizer.ggml.tokens".into(), strings(tokens));
        metadata.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        metadata.insert(
            "tokenizer.ggml.merges".into(),
            strings(merges.iter().map(|s| s.to_string()).collect()),
        );
        metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(eos));
        Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn byte_table_is_gpt2() {
        let map = gpt2_char_to_byte();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'A'], b'A');
        assert_eq!(map[&'\u{100}'], 0);
    }

    #[test]
    fn toy_encode_decode_and_specials() {
        let tok = GgufTokenizer::from_gguf(&toy_content(Some("qwen2"), &[])).unwrap();
        let hello = tok.token_id("hello").unwrap();
        let im_start = tok.token_id("<|im_start|>").unwrap();
        let im_end = tok.token_id("<|im_end|>").unwrap();
        let eot = tok.token_id("<|endoftext|>").unwrap();
        let ids = tok.encode("<|im_start|>hello<|im_end|>").unwrap();
        assert_eq!(ids, vec![im_start, hello, im_end]);
        assert_eq!(tok.decode(&ids).unwrap(), "<|im_start|>hello<|im_end|>");
        assert_eq!(tok.stop_ids(), &[im_end, eot]);
        assert!(!tok.add_bos());
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let tok = GgufTokenizer::from_gguf(&toy_content(Some("qwen2"), &[])).unwrap();
        // "é😀" is 2 + 4 bytes; the toy vocabulary has no multi-byte merges, so each byte
        // is one token.
        let ids = tok.encode("é😀!").unwrap();
        assert_eq!(ids.len(), 7);
        let mut decoder = tok.stream_decoder();
        let mut pieces = Vec::new();
        for id in &ids {
            if let Some(text) = decoder.push(*id).unwrap() {
                pieces.push(text);
            }
        }
        assert_eq!(pieces, ["é", "😀", "!"]);
        assert_eq!(decoder.finish(), "");

        // A lone continuation byte can never complete: it becomes U+FFFD like in `decode`.
        let stray = tok.encode("\u{80}").unwrap()[1];
        let mut decoder = tok.stream_decoder();
        assert_eq!(decoder.push(stray).unwrap().as_deref(), Some("\u{fffd}"));
        // An unfinished character at the end is flushed lossily.
        let first_of_emoji = ids[2];
        assert_eq!(decoder.push(first_of_emoji).unwrap(), None);
        assert_eq!(decoder.finish(), "\u{fffd}");
        assert_eq!(tok.decode(&[first_of_emoji]).unwrap(), "\u{fffd}");
        assert!(decoder.push(u32::MAX).is_err());
    }

    #[test]
    fn unknown_pre_is_refused() {
        let err = GgufTokenizer::from_gguf(&toy_content(Some("deepseek-llm"), &[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model file GGUF metadata: unsupported pre-tokenizer `deepseek-llm` in \
             `tokenizer.ggml.pre` (supported: qwen2, smollm, starcoder, gpt2); refusing to guess \
             its split rules"
        );
        // A missing `pre` on a gpt2 model falls back to the GPT-2 regex.
        assert!(GgufTokenizer::from_gguf(&toy_content(None, &[])).is_ok());
    }

    #[test]
    fn user_defined_tokens_are_atomic() {
        let tok =
            GgufTokenizer::from_gguf(&toy_content(Some("smollm"), &[("<think>", 4)])).unwrap();
        let think = tok.token_id("<think>").unwrap();
        let ids = tok.encode("hello<think>hello").unwrap();
        assert_eq!(ids[1], think);
        assert_eq!(ids.len(), 3);
    }

    #[test]
    fn bad_eos_id_is_refused() {
        let mut content = toy_content(Some("qwen2"), &[]);
        content.metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1_000_000));
        let msg = GgufTokenizer::from_gguf(&content).unwrap_err().to_string();
        assert!(msg.contains("`tokenizer.ggml.eos_token_id` = U32(1000000)"), "{msg}");
    }
}
