//! Converts a Hugging Face Qwen3 `tokenizer.json` (+ `tokenizer_config.json`) into the
//! `tokenizer.*` GGUF metadata llama.cpp's converter writes, so tests and `bench-model` can
//! write Qwen3-shaped GGUF files. It produces metadata only: no tensors, no model keys.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::llm::LlmError;

/// Rows of the Qwen3 embedding table (`vocab_size` in every Qwen3 config.json, 0.6B to 32B):
/// ids past the tokenizer's own vocabulary are filled with `[PAD{id}]` entries.
pub const QWEN3_VOCAB_SIZE: usize = 151_936;
/// `<|endoftext|>`: Qwen3's BOS (never prepended) and padding token.
pub const QWEN3_BOS_ID: u32 = 151_643;
/// `<|im_end|>`: Qwen3's EOS.
pub const QWEN3_EOS_ID: u32 = 151_645;

/// llama.cpp `llama_token_type` values.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_UNUSED: i32 = 5;

/// The `tokenizer.*` key/value pairs llama.cpp's converter writes for a Qwen3 GGUF:
/// `tokenizer.ggml.{model, pre, tokens, token_type, merges, bos_token_id, eos_token_id,
/// padding_token_id, add_bos_token}` and, when a `tokenizer_config.json` sits next to
/// `tokenizer_json` and has one, `tokenizer.chat_template`.
///
/// Token types follow `convert_hf_to_gguf.py`: an added token is CONTROL (3) when it is
/// special or looks special (`<|…|>`, e.g. the non-special `<|fim_prefix|>`), else
/// USER_DEFINED (4, e.g. `<think>`); padding entries are UNUSED (5); the rest NORMAL (1).
pub fn qwen3_tokenizer_metadata(tokenizer_json: &Path) -> Result<Vec<(String, Value)>, LlmError> {
    let bad =
        |reason: String| LlmError::BadModel { path: tokenizer_json.display().to_string(), reason };
    let text = match std::fs::read_to_string(tokenizer_json) {
        Ok(text) => text,
        Err(err) => return Err(bad(format!("cannot read: {err}"))),
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(json) => json,
        Err(err) => return Err(bad(format!("not valid JSON: {err}"))),
    };
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!("model.type is {}, expected \"BPE\"", model["type"])));
    }
    let Some(vocab) = model["vocab"].as_object() else {
        return Err(bad("model.vocab is not an object".to_string()));
    };

    // id → (token, type). Added tokens override the base vocabulary, as in HF.
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::with_capacity(vocab.len() + 32);
    for (token, id) in vocab {
        let Some(id) = id.as_u64() else {
            return Err(bad(format!("model.vocab[{token:?}] is not an id")));
        };
        by_id.insert(id as usize, (token.clone(), TOKEN_TYPE_NORMAL));
    }
    let no_added = Vec::new();
    let added = json["added_tokens"].as_array().unwrap_or(&no_added);
    for added_token in added {
        let (Some(id), Some(content)) =
            (added_token["id"].as_u64(), added_token["content"].as_str())
        else {
            return Err(bad(format!("added token {added_token} lacks an id or content")));
        };
        let special = added_token["special"].as_bool().unwrap_or(false);
        let looks_special = content.starts_with("<|") && content.ends_with("|>");
        let token_type =
            if special || looks_special { TOKEN_TYPE_CONTROL } else { TOKEN_TYPE_USER_DEFINED };
        by_id.insert(id as usize, (content.to_string(), token_type));
    }
    let max_id = by_id.keys().copied().max().unwrap_or(0);
    if max_id >= QWEN3_VOCAB_SIZE {
        return Err(bad(format!(
            "token id {max_id} does not fit the Qwen3 vocabulary of {QWEN3_VOCAB_SIZE}"
        )));
    }
    let mut tokens = Vec::with_capacity(QWEN3_VOCAB_SIZE);
    let mut token_types = Vec::with_capacity(QWEN3_VOCAB_SIZE);
    for id in 0..QWEN3_VOCAB_SIZE {
        match by_id.remove(&id) {
            Some((token, token_type)) => {
                tokens.push(Value::String(token));
                token_types.push(Value::I32(token_type));
            }
            None => {
                tokens.push(Value::String(format!("[PAD{id}]")));
                token_types.push(Value::I32(TOKEN_TYPE_UNUSED));
            }
        }
    }
    for (id, special) in [(QWEN3_BOS_ID, "<|endoftext|>"), (QWEN3_EOS_ID, "<|im_end|>")] {
        if !matches!(&tokens[id as usize], Value::String(t) if t == special) {
            return Err(bad(format!("token {id} is not {special}: not a Qwen3 vocabulary")));
        }
    }

    // tokenizer.json has two merge spellings: "a b" strings (older) and ["a", "b"] pairs.
    let Some(merges_json) = model["merges"].as_array() else {
        return Err(bad("model.merges is not an array".to_string()));
    };
    let mut merges = Vec::with_capacity(merges_json.len());
    for (merge_idx, merge) in merges_json.iter().enumerate() {
        let joined = match merge {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => match (pair.first(), pair.get(1), pair.len()) {
                (Some(serde_json::Value::String(a)), Some(serde_json::Value::String(b)), 2) => {
                    format!("{a} {b}")
                }
                _ => return Err(bad(format!("merge {merge_idx} is not a pair of strings"))),
            },
            _ => return Err(bad(format!("merge {merge_idx} is neither a string nor a pair"))),
        };
        merges.push(Value::String(joined));
    }

    let str_value = |s: &str| Value::String(s.to_string());
    let mut metadata = vec![
        ("tokenizer.ggml.model".to_string(), str_value("gpt2")),
        ("tokenizer.ggml.pre".to_string(), str_value("qwen2")),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(token_types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(QWEN3_BOS_ID)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(QWEN3_EOS_ID)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(QWEN3_BOS_ID)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ];
    if let Some(template) = read_chat_template(tokenizer_json)? {
        metadata.push(("tokenizer.chat_template".to_string(), Value::String(template)));
    }
    Ok(metadata)
}

/// The `chat_template` of the `tokenizer_config.json` beside `tokenizer_json`, if that file
/// exists (llama.cpp's converter likewise writes the key only when it finds a template).
fn read_chat_template(tokenizer_json: &Path) -> Result<Option<String>, LlmError> {
    let config_path = tokenizer_json.with_file_name("tokenizer_config.json");
    let text = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(LlmError::BadModel {
                path: config_path.display().to_string(),
                reason: format!("cannot read: {err}"),
            })
        }
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(config) => Ok(config["chat_template"].as_str().map(str::to_string)),
        Err(err) => Err(LlmError::BadModel {
            path: config_path.display().to_string(),
            reason: format!("not valid JSON: {err}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tokenizer(dir: &Path, added: &str, config: Option<&str>) -> std::path::PathBuf {
        let json = format!(
            r#"{{"model": {{"type": "BPE", "vocab": {{"a": 0, "b": 1, "ab": 2}},
                "merges": [["a", "b"]]}}, "added_tokens": [{added}]}}"#
        );
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        if let Some(config) = config {
            std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        }
        path
    }

    #[test]
    fn refuses_a_vocabulary_that_is_not_qwen3() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_tokenizer(dir.path(), "", None);
        let msg = qwen3_tokenizer_metadata(&path).unwrap_err().to_string();
        assert!(
            msg.ends_with("token 151643 is not <|endoftext|>: not a Qwen3 vocabulary"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn types_pads_and_template() {
        let dir = tempfile::tempdir().unwrap();
        let added = r#"{"id": 151643, "content": "<|endoftext|>", "special": true},
            {"id": 151645, "content": "<|im_end|>", "special": true},
            {"id": 151659, "content": "<|fim_prefix|>", "special": false},
            {"id": 151667, "content": "<think>", "special": false}"#;
        let path = write_tokenizer(dir.path(), added, Some(r#"{"chat_template": "T"}"#));
        let metadata = qwen3_tokenizer_metadata(&path).unwrap();
        let get = |key: &str| &metadata.iter().find(|(k, _)| k == key).unwrap().1;
        let Value::Array(tokens) = get("tokenizer.ggml.tokens") else { panic!() };
        let Value::Array(types) = get("tokenizer.ggml.token_type") else { panic!() };
        assert_eq!(tokens.len(), QWEN3_VOCAB_SIZE);
        let token = |id: usize| tokens[id].to_string().unwrap().clone();
        let ty = |id: usize| types[id].to_i32().unwrap();
        assert_eq!((token(2).as_str(), ty(2)), ("ab", 1));
        assert_eq!((token(3).as_str(), ty(3)), ("[PAD3]", 5));
        assert_eq!((token(151645).as_str(), ty(151645)), ("<|im_end|>", 3));
        assert_eq!((token(151659).as_str(), ty(151659)), ("<|fim_prefix|>", 3));
        assert_eq!((token(151667).as_str(), ty(151667)), ("<think>", 4));
        let Value::Array(merges) = get("tokenizer.ggml.merges") else { panic!() };
        assert_eq!(merges[0].to_string().unwrap(), "a b");
        assert_eq!(get("tokenizer.chat_template").to_string().unwrap(), "T");
        assert_eq!(get("tokenizer.ggml.pre").to_string().unwrap(), "qwen2");
        assert!(!get("tokenizer.ggml.add_bos_token").to_bool().unwrap());
    }
}
