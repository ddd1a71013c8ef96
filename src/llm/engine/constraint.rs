//! Constrained decoding on the local engine (llguidance): the per-model token environment
//! (`TokenEnv`, built once from our GGUF tokenizer) and the per-sequence `Constraint` that
//! turns a request's `ToolUse` into a token mask before sampling and follows each sampled
//! token after it. Tool calls are generated under a grammar (one of the offered names, that
//! tool's JSON Schema for its arguments, the `<tool_call>` tags), `response_format` under its
//! schema. It owns no sampling maths (sampling.rs), no text emission or tool-call parsing
//! (template.rs, llm/toolcall.rs) and no model code.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::llm::engine::tokenizer::GgufTokenizer;
use crate::llm::{LlmError, ResponseFormat, ToolChoice, ToolSpec, ToolUse};

/// The tags around a call, as Qwen3's template writes them (Hermes style).
const OPEN: &[u8] = b"<tool_call>";
const CLOSE: &str = "</tool_call>";
/// What every call's text starts with after the opening tag: the grammar's fixed prefix
/// (`"\n"`, then `{"name": "` with the compact separators below).
const CALL_PREFIX: &[u8] = b"\n{\"name\": \"";

/// The JSON layout the model must write: no free whitespace (a small model can otherwise
/// pad forever), and the separators of Python's `json.dumps`, which is what Qwen3's template
/// renders calls with (`{"name": "x", "arguments": {...}}`), so KV reuse holds.
fn compact_json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// Everything about one model's vocabulary the constraints need; shared by every request
/// of that model.
pub struct TokenEnv {
    factory: ParserFactory,
    tok_env: TokEnv,
    /// Rows of the trie (the GGUF token list); logits past it are never allowed.
    vocab_size: usize,
    stop_ids: Vec<u32>,
    /// `<tool_call>` / `</tool_call>` when they are single special tokens (Qwen3).
    open_id: Option<u32>,
    close_id: Option<u32>,
    /// `<think>` / `</think>` when they are special tokens (Qwen3).
    think_ids: Option<(u32, u32)>,
    /// `overruns[k]`: the tokens that, after the free text ends with `k` bytes of
    /// `<tool_call>`, complete the tag and go on with bytes no call starts with. Forbidden
    /// in free text, so the text trigger (SmolLM2) always leaves the call to the grammar.
    overruns: Vec<Vec<u32>>,
    build_ms: f64,
}

impl std::fmt::Debug for TokenEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEnv")
            .field("vocab_size", &self.vocab_size)
            .field("open_id", &self.open_id)
            .field("close_id", &self.close_id)
            .field("build_ms", &self.build_ms)
            .finish_non_exhaustive()
    }
}

impl TokenEnv {
    /// Builds the token trie from our tokenizer: each id's bytes (GPT-2 byte-level decoded),
    /// special tokens marked as such (a grammar admits them only where it names them), the
    /// stop ids as end-of-sequence. Costly on a large vocabulary (see `build_ms`): the
    /// engine builds it once, on the first request that needs it.
    pub fn new(tokenizer: &GgufTokenizer) -> Result<TokenEnv, LlmError> {
        let started = Instant::now();
        let n_tokens = tokenizer.vocab_size();
        let mut words = Vec::with_capacity(n_tokens);
        for id in 0..n_tokens as u32 {
            let bytes = tokenizer.token_bytes(id).unwrap_or_default();
            if tokenizer.is_special(id) {
                let mut word = Vec::with_capacity(bytes.len() + 1);
                word.push(TokTrie::SPECIAL_TOKEN_MARKER);
                word.extend_from_slice(bytes);
                words.push(word);
            } else {
                words.push(bytes.to_vec());
            }
        }
        let info = TokRxInfo {
            vocab_size: n_tokens as u32,
            tok_eos: tokenizer.eos_id(),
            tok_bos: tokenizer.bos_id(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let stop_ids = tokenizer.stop_ids().to_vec();
        // The trie asserts on malformed vocabularies: a bad model file is an error, not a
        // dead engine thread.
        let built = catch_unwind(AssertUnwindSafe(|| {
            TokTrie::from(&info, &words).with_eos_tokens(&stop_ids)
        }));
        let trie = match built {
            Ok(trie) => trie,
            Err(_) => return Err(bad_vocab("cannot build the token trie".to_string())),
        };
        let tok_env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = match ParserFactory::new_simple(&tok_env) {
            Ok(factory) => factory,
            Err(err) => return Err(bad_vocab(format!("cannot prepare the grammar engine: {err}"))),
        };
        factory.quiet();
        let special = |text: &str| tokenizer.token_id(text).filter(|&id| tokenizer.is_special(id));
        let open_id = special("<tool_call>");
        let close_id = special(CLOSE);
        let think_ids = special("<think>").zip(special("</think>"));
        let overruns = overruns(tokenizer, &words);
        let build_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(n_tokens, build_ms, ?open_id, "built the constrained-decoding token env");
        Ok(TokenEnv {
            factory,
            tok_env,
            vocab_size: n_tokens,
            stop_ids,
            open_id,
            close_id,
            think_ids,
            overruns,
            build_ms,
        })
    }

    /// How long `new` took, in milliseconds.
    pub fn build_ms(&self) -> f64 {
        self.build_ms
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of `<tool_call>` when it is one special token (Qwen3), `None` when the tag is
    /// text (SmolLM2).
    pub fn tool_call_token(&self) -> Option<u32> {
        self.open_id
    }

    /// Compiles a Lark grammar into a fresh matcher; a grammar or schema error is the
    /// request's fault.
    fn matcher(&self, lark: String) -> Result<Matcher, LlmError> {
        let created = catch_unwind(AssertUnwindSafe(|| {
            self.factory.create_parser(TopLevelGrammar::from_lark(lark))
        }));
        match created {
            Ok(Ok(parser)) => {
                let matcher = Matcher::new(Ok(parser));
                match matcher.get_error() {
                    Some(err) => Err(invalid(err)),
                    None => Ok(matcher),
                }
            }
            Ok(Err(err)) => Err(invalid(format!("{err:#}"))),
            Err(_) => Err(invalid("the grammar engine failed on this schema".to_string())),
        }
    }

    /// The lark token for a tag: its special token when there is one, else its text.
    fn tag(&self, id: Option<u32>, text: &str) -> String {
        match id {
            Some(id) => format!("<[{id}]>"),
            None => format!("{text:?}"),
        }
    }
}

fn bad_vocab(reason: String) -> LlmError {
    LlmError::BadModel { path: "GGUF vocabulary".to_string(), reason }
}

fn invalid(reason: String) -> LlmError {
    LlmError::InvalidRequest(format!("cannot constrain the answer: {reason}"))
}

/// Next state of a matcher for `<tool_call>` given one more byte; `<` occurs only at the
/// start of the tag, so a mismatch restarts at 0 or 1.
fn open_step(state: usize, byte: u8) -> usize {
    if byte == OPEN[state] {
        state + 1
    } else if byte == OPEN[0] {
        1
    } else {
        0
    }
}

fn overruns(tokenizer: &GgufTokenizer, words: &[Vec<u8>]) -> Vec<Vec<u32>> {
    let mut lists = vec![Vec::new(); OPEN.len()];
    for (id, bytes) in words.iter().enumerate() {
        if tokenizer.is_special(id as u32) || !bytes.contains(&b'>') {
            continue;
        }
        for (k, list) in lists.iter_mut().enumerate() {
            let mut state = k;
            for (idx, &byte) in bytes.iter().enumerate() {
                state = open_step(state, byte);
                if state == OPEN.len() {
                    if !CALL_PREFIX.starts_with(&bytes[idx + 1..]) {
                        list.push(id as u32);
                    }
                    break;
                }
            }
        }
    }
    lists
}

/// Where a constrained sequence is.
enum State {
    /// Free text; a `<tool_call>` (the special token, or the text ending `matched` bytes
    /// in) starts a call under `Constraint::call`. Nothing is constrained inside thinking.
    Free { matched: usize, in_think: bool },
    /// Under a grammar; when it is complete, free text again (`then_free`) or end of turn.
    /// (Boxed: a matcher is large next to the other states.)
    Grammar { matcher: Box<Matcher>, then_free: bool },
    /// Only an end-of-turn token.
    EndOfTurn,
}

/// The constraint of one sequence. `mask` before each sampling, `commit` after it.
pub struct Constraint {
    env: Arc<TokenEnv>,
    /// The grammar of one call after its opening tag (tool choice `auto`), compiled once
    /// and cloned at each call.
    call: Option<Matcher>,
    parallel: bool,
    state: State,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Free { .. } => "free",
            State::Grammar { .. } => "grammar",
            State::EndOfTurn => "end of turn",
        };
        f.debug_struct("Constraint").field("state", &state).finish_non_exhaustive()
    }
}

impl Constraint {
    /// Whether `tools` constrains the answer at all; when not, no token env is needed.
    pub fn needed(tools: &ToolUse) -> bool {
        tools.response_format != ResponseFormat::Text
            || !tools.offered().is_empty()
            || matches!(tools.choice, ToolChoice::Required | ToolChoice::Function(_))
    }

    /// The constraint `tools` puts on an answer, or `None` when it puts none (no tools
    /// offered and free text). `thinking`: Qwen3's thinking block may come first, free.
    ///
    /// - `response_format` JSON: the whole answer is that JSON, then end of turn (with
    ///   tools offered under `auto`, a tool call instead is allowed too).
    /// - tools under `auto`: free text; once the model opens `<tool_call>`, the call is
    ///   `{"name": <an offered name>, "arguments": <its schema>}` then `</tool_call>`;
    ///   then free text again when `parallel`, else end of turn.
    /// - `required`: the answer is one call (several when `parallel`, separated by a newline
    ///   as Qwen3's template writes them), then end of turn.
    /// - a named function: exactly one call of it, then end of turn (calling the same tool
    ///   again and again until the length limit is what small models otherwise do).
    ///
    /// Errors (`LlmError::InvalidRequest`): a named function that is not offered, `required`
    /// without tools, a schema the grammar engine cannot compile.
    pub fn for_request(
        tools: &ToolUse,
        thinking: bool,
        env: &Arc<TokenEnv>,
    ) -> Result<Option<Constraint>, LlmError> {
        let offered = tools.offered();
        let answer = match &tools.response_format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(json!({"type": "object"})),
            ResponseFormat::JsonSchema { schema, .. } => Some(schema.clone()),
        };
        let (calls, forced): (&[ToolSpec], bool) = match &tools.choice {
            ToolChoice::Function(name) => match offered.iter().find(|t| t.name == *name) {
                Some(tool) => (std::slice::from_ref(tool), true),
                None => {
                    return Err(LlmError::InvalidRequest(format!(
                        "tool_choice names the function `{name}`, which is not among the tools"
                    )))
                }
            },
            ToolChoice::Required if offered.is_empty() => {
                return Err(LlmError::InvalidRequest(
                    "tool_choice `required` needs at least one tool".to_string(),
                ))
            }
            ToolChoice::Required => (offered, true),
            ToolChoice::Auto | ToolChoice::None => (offered, false),
        };
        if !forced && answer.is_none() && calls.is_empty() {
            return Ok(None);
        }
        let call_json = if calls.is_empty() { String::new() } else { call_rules(calls)? };
        let close = env.tag(env.close_id, CLOSE);
        if !forced && answer.is_none() {
            // Free text with a trigger: this grammar starts after the opening tag.
            let call =
                env.matcher(format!("start: \"\\n\" call_json \"\\n\" {close}\n{call_json}"))?;
            return Ok(Some(Constraint {
                env: env.clone(),
                call: Some(call),
                parallel: tools.parallel,
                state: State::Free { matched: 0, in_think: false },
            }));
        }
        let mut rules = call_json;
        if !calls.is_empty() {
            let open = env.tag(env.open_id, "<tool_call>");
            rules.push_str(&format!("call: {open} \"\\n\" call_json \"\\n\" {close}\n"));
            let one = matches!(tools.choice, ToolChoice::Function(_));
            let more = if tools.parallel && !one { " (\"\\n\" call)*" } else { "" };
            rules.push_str(&format!("calls: call{more}\n"));
        }
        let body = match &answer {
            Some(schema) if !forced => {
                rules.push_str(&format!("answer: %json {}\n", compact_schema(schema)?));
                if calls.is_empty() {
                    "answer"
                } else {
                    "answer | calls"
                }
            }
            _ => "calls",
        };
        let think = match env.think_ids {
            Some((open, close)) if thinking => {
                rules.push_str(&format!("think: <[{open}]> /(.|\\n)*/ <[{close}]> /\\n*/\n"));
                "think? "
            }
            _ => "",
        };
        let matcher = env.matcher(format!("start: {think}body\nbody: {body}\n{rules}"))?;
        Ok(Some(Constraint {
            env: env.clone(),
            call: None,
            parallel: tools.parallel,
            state: State::Grammar { matcher: Box::new(matcher), then_free: false },
        }))
    }

    /// Sets the logits of every token the constraint forbids now to -inf. Called after the
    /// penalties and before temperature and the top-k/top-p/min-p filters, so the sampler
    /// only ever picks an allowed token.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), LlmError> {
        match &mut self.state {
            State::Free { in_think: true, .. } => Ok(()),
            State::Free { matched, .. } => {
                for &id in &self.env.overruns[*matched] {
                    if let Some(logit) = logits.get_mut(id as usize) {
                        *logit = f32::NEG_INFINITY;
                    }
                }
                Ok(())
            }
            State::Grammar { matcher, .. } => {
                let mask = match matcher.compute_mask() {
                    Ok(mask) => mask,
                    Err(err) => return Err(failed(format!("{err:#}"))),
                };
                if apply_mask(&mask, logits) {
                    Ok(())
                } else {
                    Err(failed("the grammar allows no token here".to_string()))
                }
            }
            State::EndOfTurn => {
                let mut keep = Vec::with_capacity(self.env.stop_ids.len());
                for &id in &self.env.stop_ids {
                    keep.push(logits.get(id as usize).copied());
                }
                logits.fill(f32::NEG_INFINITY);
                for (&id, value) in self.env.stop_ids.iter().zip(keep) {
                    if let Some(value) = value {
                        logits[id as usize] = value;
                    }
                }
                Ok(())
            }
        }
    }

    /// Follows the sampled `token` (not an end-of-turn token: those end the sequence).
    /// An error means the token broke the constraint; the sequence must end with it.
    pub fn commit(&mut self, token: u32) -> Result<(), LlmError> {
        match &mut self.state {
            State::Free { matched, in_think } => {
                if let Some((open, close)) = self.env.think_ids {
                    if token == open || token == close {
                        *in_think = token == open;
                        *matched = 0;
                        return Ok(());
                    }
                }
                if *in_think {
                    return Ok(());
                }
                if Some(token) == self.env.open_id {
                    return self.start_call(&[]);
                }
                let trie = self.env.tok_env.tok_trie();
                if token as usize >= self.env.vocab_size || trie.is_special_token(token) {
                    *matched = 0;
                    return Ok(());
                }
                let bytes = trie.token(token).to_vec();
                for (idx, &byte) in bytes.iter().enumerate() {
                    *matched = open_step(*matched, byte);
                    if *matched == OPEN.len() {
                        return self.start_call(&bytes[idx + 1..]);
                    }
                }
                Ok(())
            }
            State::Grammar { matcher, then_free } => {
                if let Err(err) = matcher.consume_token(token) {
                    return Err(failed(format!("{err:#}")));
                }
                if matcher.is_stopped() {
                    let then_free = *then_free;
                    self.state = if then_free {
                        State::Free { matched: 0, in_think: false }
                    } else {
                        State::EndOfTurn
                    };
                }
                Ok(())
            }
            State::EndOfTurn => {
                Err(failed(format!("token {token} after the end of the constrained answer")))
            }
        }
    }

    /// Whether the sequence is inside a grammar (a tool call or a JSON answer) right now.
    pub fn in_grammar(&self) -> bool {
        matches!(self.state, State::Grammar { .. })
    }

    /// The opening tag was written: the call's grammar takes over, fed `rest` (the bytes
    /// the tag's last token carried past it, a prefix of every call by `overruns`).
    fn start_call(&mut self, rest: &[u8]) -> Result<(), LlmError> {
        let Some(call) = &self.call else {
            return Err(failed("a tool call opened where none is allowed".to_string()));
        };
        let mut matcher = call.clone();
        if !rest.is_empty() {
            let tokens = self.env.tok_env.tokenize_bytes(rest);
            if let Err(err) = matcher.consume_tokens(&tokens) {
                return Err(failed(format!("{err:#}")));
            }
        }
        self.state = State::Grammar { matcher: Box::new(matcher), then_free: self.parallel };
        Ok(())
    }
}

fn failed(reason: String) -> LlmError {
    LlmError::Inference(format!("constrained decoding: {reason}"))
}

/// `-inf` for every logit the mask does not allow (and every row past it); whether any
/// stays allowed.
fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) -> bool {
    let words = mask.as_slice();
    let mut any = false;
    for (word_idx, chunk) in logits.chunks_mut(32).enumerate() {
        let word = words.get(word_idx).copied().unwrap_or(0);
        if word == u32::MAX && chunk.len() == 32 {
            any = true;
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if word >> bit & 1 == 0 {
                *logit = f32::NEG_INFINITY;
            } else {
                any = true;
            }
        }
    }
    any
}

/// `schema` with our JSON layout options (llguidance's `x-guidance`), as one line of JSON.
fn compact_schema(schema: &Value) -> Result<String, LlmError> {
    let Value::Object(object) = schema else {
        return Err(invalid(format!("the JSON schema must be an object, not {schema}")));
    };
    let mut object = object.clone();
    object.insert("x-guidance".to_string(), compact_json_options());
    Ok(Value::Object(object).to_string())
}

/// `call_json: t0 | t1 …`, one `%json` rule per tool: `name` a constant, `arguments` the
/// tool's schema (an object of any shape when it declares none).
fn call_rules(calls: &[ToolSpec]) -> Result<String, LlmError> {
    let mut rules = String::new();
    let alternatives: Vec<String> = (0..calls.len()).map(|idx| format!("t{idx}")).collect();
    rules.push_str(&format!("call_json: {}\n", alternatives.join(" | ")));
    for (idx, tool) in calls.iter().enumerate() {
        let mut definitions = serde_json::Map::new();
        let arguments = match &tool.parameters {
            Value::Null => json!({"type": "object"}),
            Value::Object(object) if object.is_empty() => json!({"type": "object"}),
            Value::Object(object) => {
                // Local `$ref`s (`#/$defs/…`) resolve against the root, which is now the
                // call object: the definitions move up with them.
                let mut object = object.clone();
                for key in ["$defs", "definitions"] {
                    if let Some(defs) = object.remove(key) {
                        definitions.insert(key.to_string(), defs);
                    }
                }
                Value::Object(object)
            }
            other => {
                return Err(invalid(format!(
                    "the parameters of tool `{}` must be a JSON Schema object, not {other}",
                    tool.name
                )))
            }
        };
        let mut schema = json!({
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        });
        if let Some(object) = schema.as_object_mut() {
            object.extend(definitions);
        }
        rules.push_str(&format!("t{idx}: %json {}\n", compact_schema(&schema)?));
    }
    Ok(rules)
}

/// What `measure_mask_cost` found: the token env's one-off build time and the median time
/// of one `mask` (compute and apply to a full logits row) per token, inside a tool call's
/// JSON and in free text (where only the trigger is watched).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskCost {
    pub token_env_ms: f64,
    pub call_mask_us: f64,
    pub free_mask_us: f64,
    pub call_tokens: usize,
    pub free_tokens: usize,
}

/// Replays a fixed answer (prose, then a `<tool_call>` with two tools offered under `auto`)
/// through a fresh `Constraint` `rounds` times, timing every `mask`; for `--bench`.
pub fn measure_mask_cost(tokenizer: &GgufTokenizer, rounds: usize) -> Result<MaskCost, LlmError> {
    let env = Arc::new(TokenEnv::new(tokenizer)?);
    let tools = ToolUse::offer(vec![
        ToolSpec {
            name: "reminders_create".to_string(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {
                "text": {"type": "string"},
                "at": {"type": "string", "description": "ISO 8601 time"},
                "repeat": {"enum": ["never", "daily", "weekly"]}},
                "required": ["text", "at"]}),
        },
        ToolSpec {
            name: "current_time".to_string(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {}}),
        },
    ]);
    let answer = "Sure, I will set that reminder for you right away so you do not forget. \
        <tool_call>\n{\"name\": \"reminders_create\", \"arguments\": {\"text\": \"Call the \
        plumber about the kitchen sink\", \"at\": \"2026-11-27T09:00:00+01:00\", \"repeat\": \
        \"never\"}}\n</tool_call>";
    let tokens = tokenizer.encode(answer)?;
    let mut logits = vec![0f32; env.vocab_size()];
    let (mut call_us, mut free_us) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let Some(mut constraint) = Constraint::for_request(&tools, false, &env)? else {
            return Err(failed("tools offered but no constraint".to_string()));
        };
        for &token in &tokens {
            logits.fill(0.0);
            let in_call = constraint.in_grammar();
            let started = Instant::now();
            constraint.mask(&mut logits)?;
            let micros = started.elapsed().as_secs_f64() * 1e6;
            if !logits.get(token as usize).is_some_and(|l| l.is_finite()) {
                return Err(failed(format!("the replayed token {token} was masked")));
            }
            if in_call {
                call_us.push(micros)
            } else {
                free_us.push(micros)
            }
            constraint.commit(token)?;
        }
    }
    let rounds = rounds.max(1);
    Ok(MaskCost {
        token_env_ms: env.build_ms(),
        call_tokens: call_us.len() / rounds,
        free_tokens: free_us.len() / rounds,
        call_mask_us: median(call_us),
        free_mask_us: median(free_us),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> GgufTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        crate::llm::engine::gguf::open(&path).expect("open SmolLM2").tokenizer().expect("tok")
    }

    fn env(tokenizer: &GgufTokenizer) -> Arc<TokenEnv> {
        static ENV: std::sync::OnceLock<Arc<TokenEnv>> = std::sync::OnceLock::new();
        ENV.get_or_init(|| Arc::new(TokenEnv::new(tokenizer).expect("token env"))).clone()
    }

    fn tool(name: &str, parameters: Value) -> ToolSpec {
        ToolSpec { name: name.to_string(), description: String::new(), parameters }
    }

    fn lookup() -> ToolSpec {
        tool(
            "lookup",
            json!({"type": "object", "properties": {"kind": {"enum": ["a", "b"]},
                "n": {"type": "integer"}}, "required": ["kind", "n"]}),
        )
    }

    fn allowed(constraint: &mut Constraint, vocab: usize) -> Vec<u32> {
        let mut logits = vec![0f32; vocab];
        constraint.mask(&mut logits).expect("mask");
        (0..vocab as u32).filter(|&i| logits[i as usize].is_finite()).collect()
    }

    /// Feeds `text`'s tokens, checking each was allowed.
    fn feed(constraint: &mut Constraint, tokenizer: &GgufTokenizer, text: &str) {
        for token in tokenizer.encode(text).unwrap() {
            let ok = allowed(constraint, tokenizer.vocab_size()).contains(&token);
            assert!(ok, "token {token} ({:?}) of {text:?}", tokenizer.decode(&[token]));
            constraint.commit(token).expect("commit");
        }
    }

    #[test]
    fn apply_mask_keeps_exactly_the_allowed_rows() {
        let mut mask = SimpleVob::alloc(40);
        mask.allow_token(3);
        mask.allow_token(33);
        let mut logits = vec![1f32; 45];
        assert!(apply_mask(&mask, &mut logits));
        let kept: Vec<usize> = (0..45).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, [3, 33], "rows past the mask are never allowed");
        assert!(!apply_mask(&SimpleVob::alloc(40), &mut [0f32; 40]));
    }

    #[test]
    fn smollm2_text_trigger_hands_the_call_to_the_grammar_then_ends_the_turn() {
        let tokenizer = smollm2();
        let env = env(&tokenizer);
        assert_eq!(env.tool_call_token(), None, "SmolLM2 spells the tag out");
        let vocab = tokenizer.vocab_size();
        // Completing the tag with bytes no call starts with is forbidden; `>` alone is fine.
        let gt = tokenizer.encode(">").unwrap()[0];
        assert!(!env.overruns[OPEN.len() - 1].contains(&gt));
        assert!(!env.overruns[OPEN.len() - 1].is_empty());
        let tools = ToolUse { parallel: false, ..ToolUse::offer(vec![lookup()]) };
        let mut constraint = Constraint::for_request(&tools, false, &env).unwrap().unwrap();
        feed(&mut constraint, &tokenizer, "Let me look. <tool_call>");
        assert!(constraint.in_grammar());
        let hello = tokenizer.encode("Hello").unwrap()[0];
        assert!(!allowed(&mut constraint, vocab).contains(&hello));
        feed(
            &mut constraint,
            &tokenizer,
            "\n{\"name\": \"lookup\", \"arguments\": {\"kind\": \"b\", \"n\": -12}}\n</tool_call>",
        );
        let mut stops = tokenizer.stop_ids().to_vec();
        stops.sort_unstable();
        assert_eq!(allowed(&mut constraint, vocab), stops, "not parallel: end of turn");
    }

    #[test]
    fn smollm2_the_grammar_refuses_what_the_schema_refuses() {
        let tokenizer = smollm2();
        let env = env(&tokenizer);
        let tools = ToolUse {
            choice: ToolChoice::Function("lookup".into()),
            ..ToolUse::offer(vec![lookup(), tool("other", json!({}))])
        };
        let mut constraint = Constraint::for_request(&tools, false, &env).unwrap().unwrap();
        feed(
            &mut constraint,
            &tokenizer,
            "<tool_call>\n{\"name\": \"lookup\", \"arguments\": {\"kind\": \"",
        );
        let vocab = tokenizer.vocab_size();
        let now = allowed(&mut constraint, vocab);
        let id = |t: &str| tokenizer.encode(t).unwrap()[0];
        assert!(now.contains(&id("a")) && now.contains(&id("b")));
        assert!(!now.contains(&id("c")), "not in the enum");
        // A refused token is an error, not a silent unconstrained continuation.
        assert!(constraint.commit(id("c")).is_err());
    }

    #[test]
    fn response_format_json_object_must_start_with_a_brace() {
        let tokenizer = smollm2();
        let env = env(&tokenizer);
        let tools = ToolUse { response_format: ResponseFormat::JsonObject, ..ToolUse::default() };
        let mut constraint = Constraint::for_request(&tools, false, &env).unwrap().unwrap();
        for token in allowed(&mut constraint, tokenizer.vocab_size()) {
            let bytes = tokenizer.token_bytes(token).unwrap();
            assert_eq!(bytes.first(), Some(&b'{'), "{:?}", String::from_utf8_lossy(bytes));
        }
        feed(&mut constraint, &tokenizer, "{\"a\": [1, true, null], \"b\": {\"c\": \"d\"}}");
        let mut stops = tokenizer.stop_ids().to_vec();
        stops.sort_unstable();
        assert_eq!(allowed(&mut constraint, tokenizer.vocab_size()), stops);
    }

    #[test]
    fn requests_the_grammar_cannot_serve_are_invalid_requests() {
        let tokenizer = smollm2();
        let env = env(&tokenizer);
        let invalid = |tools: ToolUse| match Constraint::for_request(&tools, false, &env) {
            Err(LlmError::InvalidRequest(message)) => message,
            other => panic!("expected InvalidRequest, got {other:?}"),
        };
        let message = invalid(ToolUse {
            choice: ToolChoice::Function("x".into()),
            ..ToolUse::offer(vec![lookup()])
        });
        assert!(message.contains("`x`"), "{message}");
        assert!(invalid(ToolUse { choice: ToolChoice::Required, ..ToolUse::default() })
            .contains("required"));
        let message = invalid(ToolUse::offer(vec![tool("bad", json!([1]))]));
        assert!(message.contains("tool `bad`"), "{message}");
        let schema = json!({"type": "object", "properties": {"x": {"type": "nonsense"}}});
        let format = ResponseFormat::JsonSchema { name: "s".into(), schema };
        let message = invalid(ToolUse { response_format: format, ..ToolUse::default() });
        assert!(message.starts_with("cannot constrain the answer: "), "{message}");
        // No tools and free text: no constraint at all.
        assert!(Constraint::for_request(&ToolUse::default(), false, &env).unwrap().is_none());
    }
}
