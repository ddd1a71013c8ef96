//! Chat templates rendered in Rust (no Jinja): Qwen3's ChatML with its think block and its
//! tools block, `<tool_call>` and `<tool_response>` rendering (byte for byte the official
//! template, checked against it with minijinja in the tests), the same without think block
//! for Llama-architecture models (SmolLM2), plus `ThinkFilter`, which strips
//! `<think>…</think>` from streamed output. Strings only: no tokens, no model state; the
//! parsing of tool calls out of the stream is `llm::toolcall`'s.

use serde_json::Value;

use crate::domain::{ChatTurn, Role};
use crate::llm::engine::gguf::Architecture;
use crate::llm::ToolSpec;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
/// What Qwen3's template appends after the generation prompt when thinking is off.
const EMPTY_THINK_BLOCK: &str = "<think>\n\n</think>\n\n";

/// Which template a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// Qwen3's official template (llama.cpp `models/templates/Qwen-Qwen3-0.6B.jinja`, the
    /// same as the HF one), tools included.
    Qwen3,
    /// ChatML with no think block (SmolLM2 and other Llama-architecture files), with the
    /// same Hermes-style tools block, `<tool_call>` and `<tool_response>` rendering as Qwen3,
    /// so small models see the one tool format the engine parses.
    ChatMl,
}

impl ChatFormat {
    pub fn for_arch(arch: Architecture) -> Self {
        match arch {
            Architecture::Qwen3 => ChatFormat::Qwen3,
            Architecture::Llama => ChatFormat::ChatMl,
        }
    }
}

/// The tools block's text before the tool signatures (Qwen3's template, verbatim).
const TOOLS_HEADER: &str =
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
/// The tools block's text after the tool signatures, closing the system turn.
const TOOLS_FOOTER: &str =
    "\n</tools>\n\nFor each function call, return a json object with function \
name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";

/// Renders `turns`, the offered `tools` and the generation prompt (`<|im_start|>assistant\n`,
/// followed for Qwen3 with `thinking == false` by the empty `<think>\n\n</think>\n\n` block,
/// the "hard switch").
///
/// With tools, the system turn is the first turn's system prompt (if any), a blank line and
/// the `# Tools` block listing each tool as `{"type": "function", "function": {...}}` JSON
/// formatted as HF transformers' `tojson` does (`json.dumps`, see `python_json`). Assistant
/// turns show their calls as `<tool_call>` blocks (arguments printed as they are: they are
/// JSON text), and consecutive `Tool` turns become one user turn of `<tool_response>` blocks.
///
/// Prefix stability, which the engine's KV reuse relies on: rendering turns `1..n` and then
/// `1..n` + (assistant answer, user turn) gives strings that agree up to the end of the
/// `<|im_start|>assistant\n` of the earlier generation prompt. After that they differ for
/// Qwen3 with thinking off: the generated turn had `<think>\n\n</think>\n\n` in the context,
/// but the official template renders earlier assistant turns without any think block (their
/// reasoning is dropped) — except the turns of a tool loop after the last user query, which
/// keep theirs. The engine settles this by longest-common-prefix matching on tokens; this
/// renderer stays exact to the official template rather than hiding that. For `ChatMl` the
/// earlier rendering (prompt included) is a pure prefix of the later one. The same tools
/// must be offered in both renderings: they sit in the first turn.
///
/// `thinking` is ignored for `ChatMl`. Unlike SmolLM2's own template, `ChatMl` injects no
/// default system turn: the assistant always sends its persona as the system turn.
pub fn render(
    format: ChatFormat,
    turns: &[ChatTurn],
    tools: &[ToolSpec],
    thinking: bool,
) -> String {
    let capacity = turns.iter().map(|t| t.content.len() + 32).sum::<usize>() + 64;
    let mut out = String::with_capacity(capacity);
    render_turns(&mut out, format, turns, tools);
    out.push_str("<|im_start|>assistant\n");
    if format == ChatFormat::Qwen3 && !thinking {
        out.push_str(EMPTY_THINK_BLOCK);
    }
    out
}

fn push_turn(out: &mut String, role: Role, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role.as_str());
    out.push('\n');
    push_text(out, content);
    out.push_str("<|im_end|>\n");
}

/// How every control token of our chat formats begins (`<|im_start|>`, `<|im_end|>`,
/// `<|endoftext|>`), and the same text as the model must read it inside a message.
const CONTROL_OPEN: &str = "<|";
const CONTROL_OPEN_AS_TEXT: &str = "<\u{200B}|";

/// Appends text that comes from a message, a tool or a tool result. The prompt is tokenized
/// with its control tokens recognised, so a message spelling `<|im_end|>` would end its
/// turn there and the text after it could pose as a system or assistant turn; a zero-width
/// space inside each `<|` keeps such text as plain text (the stored message is unchanged).
fn push_text(out: &mut String, text: &str) {
    if text.contains(CONTROL_OPEN) {
        out.push_str(&text.replace(CONTROL_OPEN, CONTROL_OPEN_AS_TEXT));
    } else {
        out.push_str(text);
    }
}

/// The turn loop of the official Qwen3 template, step by step. `ChatMl` follows the same
/// steps without the think-block rules (its assistant turns are shown as they are).
fn render_turns(out: &mut String, format: ChatFormat, turns: &[ChatTurn], tools: &[ToolSpec]) {
    let leading_system = turns.first().filter(|turn| turn.role == Role::System);
    if !tools.is_empty() {
        out.push_str("<|im_start|>system\n");
        if let Some(system) = leading_system {
            push_text(out, &system.content);
            out.push_str("\n\n");
        }
        out.push_str(TOOLS_HEADER);
        for tool in tools {
            out.push('\n');
            push_tool_json(out, tool);
        }
        out.push_str(TOOLS_FOOTER);
    } else if let Some(system) = leading_system {
        push_turn(out, Role::System, &system.content);
    }

    // The last "real" user query: a user turn that is not only a tool response. Assistant
    // turns after it (a tool loop, or a trailing partial answer) keep their think block.
    let last_query_idx = turns
        .iter()
        .rposition(|turn| {
            turn.role == Role::User
                && !(turn.content.starts_with("<tool_response>")
                    && turn.content.ends_with("</tool_response>"))
        })
        .unwrap_or(turns.len().saturating_sub(1));

    for (turn_idx, turn) in turns.iter().enumerate() {
        let is_last = turn_idx + 1 == turns.len();
        match turn.role {
            // The leading system turn was rendered above.
            Role::System if turn_idx == 0 => {}
            Role::System | Role::User => push_turn(out, turn.role, &turn.content),
            Role::Tool => {
                if turn_idx == 0 || turns[turn_idx - 1].role != Role::Tool {
                    out.push_str("<|im_start|>user");
                }
                out.push_str("\n<tool_response>\n");
                push_text(out, &turn.content);
                out.push_str("\n</tool_response>");
                if is_last || turns[turn_idx + 1].role != Role::Tool {
                    out.push_str("<|im_end|>\n");
                }
            }
            Role::Assistant => {
                out.push_str("<|im_start|>assistant\n");
                let content = match format {
                    ChatFormat::ChatMl => {
                        push_text(out, &turn.content);
                        turn.content.as_str()
                    }
                    ChatFormat::Qwen3 => {
                        let (reasoning, content) = split_reasoning(&turn.content);
                        if turn_idx > last_query_idx && (is_last || !reasoning.is_empty()) {
                            out.push_str("<think>\n");
                            push_text(out, reasoning.trim_matches('\n'));
                            out.push_str("\n</think>\n\n");
                            push_text(out, content.trim_start_matches('\n'));
                        } else {
                            push_text(out, content);
                        }
                        content
                    }
                };
                for (call_idx, call) in turn.tool_calls.iter().enumerate() {
                    // The template tests the answer text before its `lstrip`, as here.
                    if call_idx > 0 || !content.is_empty() {
                        out.push('\n');
                    }
                    out.push_str("<tool_call>\n{\"name\": \"");
                    push_text(out, &call.name);
                    out.push_str("\", \"arguments\": ");
                    push_text(out, &call.arguments);
                    out.push_str("}\n</tool_call>");
                }
                out.push_str("<|im_end|>\n");
            }
        }
    }
}

/// One tool as the template's `tool | tojson` prints it, for a tool given in OpenAI's
/// `{"type": "function", "function": {"name", "description", "parameters"}}` shape.
fn push_tool_json(out: &mut String, tool: &ToolSpec) {
    out.push_str("{\"type\": \"function\", \"function\": {\"name\": ");
    push_text(out, &python_json(&Value::String(tool.name.clone())));
    out.push_str(", \"description\": ");
    push_text(out, &python_json(&Value::String(tool.description.clone())));
    out.push_str(", \"parameters\": ");
    push_text(out, &python_json(&tool.parameters));
    out.push_str("}}");
}

/// `value` as HF transformers' `tojson` filter prints it: Python's
/// `json.dumps(value, ensure_ascii=False)`, i.e. `", "` and `": "` separators, non-ASCII
/// kept, the same string escapes as serde_json (`\n`, `\"`, `\u001f`…), floats as Python's
/// `repr`. Object keys come in the `Value`'s own order, the order they were given in (serde_json
/// is built with `preserve_order`, named in Cargo.toml), as Python keeps a dict's order.
pub fn python_json(value: &Value) -> String {
    let mut out = String::with_capacity(64);
    push_python_json(&mut out, value);
    out
}

fn push_python_json(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(int), _, _) => out.push_str(&int.to_string()),
            (None, Some(int), _) => out.push_str(&int.to_string()),
            (None, None, Some(float)) => out.push_str(&python_float(float)),
            _ => out.push_str(&n.to_string()),
        },
        // serde_json escapes exactly the characters Python's encoder escapes with
        // `ensure_ascii=False` (`"`, `\`, controls; `\u00XX` in lowercase hex).
        Value::String(text) => out.push_str(&Value::String(text.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (idx, item) in items.iter().enumerate() {
                if idx > 0 {
                    out.push_str(", ");
                }
                push_python_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (idx, (key, item)) in map.iter().enumerate() {
                if idx > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(": ");
                push_python_json(out, item);
            }
            out.push('}');
        }
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation when
/// the decimal exponent is in -4..16 (with at least one decimal, `1.0`), else scientific
/// with a signed two-digit-or-more exponent (`1e+16`, `2.5e-05`).
fn python_float(value: f64) -> String {
    if !value.is_finite() {
        // Not representable in a `serde_json::Value`; Python would write these names.
        return if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if value == 0.0 || (-4..16).contains(&exponent) {
        let positional = format!("{value}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs())
    }
}

/// The template's `content.split('</think>')[-1].lstrip('\n')` and
/// `content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n')`:
/// returns (reasoning, answer).
fn split_reasoning(content: &str) -> (&str, &str) {
    if !content.contains(THINK_CLOSE) {
        return ("", content);
    }
    let answer = content.rsplit(THINK_CLOSE).next().unwrap_or("").trim_start_matches('\n');
    let before = content.split(THINK_CLOSE).next().unwrap_or("").trim_end_matches('\n');
    let reasoning = before.rsplit(THINK_OPEN).next().unwrap_or("").trim_start_matches('\n');
    (reasoning, answer)
}

/// Streaming removal of `<think>…</think>` blocks and the newlines right after them.
///
/// Feed it text deltas with `push`; it returns what can be shown now, holding back only a
/// possible partial tag at the end of a delta (so tags split across deltas are caught).
/// Reasoning that is never closed is never shown. `finish` returns held-back visible text.
#[derive(Debug, Clone, Default)]
pub struct ThinkFilter {
    state: FilterState,
    /// Text not yet classified: a possible tag prefix, or unread reasoning.
    held: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum FilterState {
    /// Outside any think block.
    #[default]
    Visible,
    /// Inside `<think>…`, waiting for `</think>`.
    Thinking,
    /// Just after `</think>`: newlines are dropped until other text arrives.
    AfterThink,
}

impl ThinkFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes one delta and returns the visible text it completes (possibly empty).
    pub fn push(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        let mut out = String::new();
        loop {
            match self.state {
                FilterState::Visible => match self.held.find(THINK_OPEN) {
                    Some(pos) => {
                        out.push_str(&self.held[..pos]);
                        self.held.drain(..pos + THINK_OPEN.len());
                        self.state = FilterState::Thinking;
                    }
                    None => {
                        let keep = partial_tag_suffix(&self.held, THINK_OPEN);
                        let emit_to = self.held.len() - keep;
                        out.push_str(&self.held[..emit_to]);
                        self.held.drain(..emit_to);
                        return out;
                    }
                },
                FilterState::Thinking => match self.held.find(THINK_CLOSE) {
                    Some(pos) => {
                        self.held.drain(..pos + THINK_CLOSE.len());
                        self.state = FilterState::AfterThink;
                    }
                    None => {
                        let keep = partial_tag_suffix(&self.held, THINK_CLOSE);
                        self.held.drain(..self.held.len() - keep);
                        return out;
                    }
                },
                FilterState::AfterThink => {
                    let trimmed = self.held.trim_start_matches(['\n', '\r']).len();
                    self.held.drain(..self.held.len() - trimmed);
                    if self.held.is_empty() {
                        return out;
                    }
                    self.state = FilterState::Visible;
                }
            }
        }
    }

    /// Ends the stream: returns visible text still held back (a lone `<thi` that never
    /// became a tag); unclosed reasoning is dropped.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        let state = std::mem::take(&mut self.state);
        match state {
            FilterState::Visible => rest,
            FilterState::Thinking | FilterState::AfterThink => String::new(),
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ToolCall;

    fn turn(role: Role, content: &str) -> ChatTurn {
        ChatTurn::new(role, content)
    }

    fn check(format: ChatFormat, turns: &[ChatTurn], thinking: bool, expected: &str) {
        assert_eq!(render(format, turns, &[], thinking), expected);
    }

    // Expected strings below were produced by rendering the official Qwen3 chat template
    // (tests/assets/qwen3/tokenizer_config.json) with Python's jinja2.

    #[test]
    fn qwen3_protocols_vector() {
        let turns = [turn(Role::System, "You are helpful."), turn(Role::User, "Hi")];
        check(
            ChatFormat::Qwen3,
            &turns,
            false,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n",
        );
        check(
            ChatFormat::Qwen3,
            &turns,
            true,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n",
        );
    }

    #[test]
    fn qwen3_history_drops_reasoning() {
        let turns = [
            turn(Role::System, "You are helpful."),
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "<think>\nreasoning here\n</think>\n\nHello! How can I help?"),
            turn(Role::User, "Tell me a joke"),
        ];
        check(
            ChatFormat::Qwen3,
            &turns,
            false,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello! How can I help?<|im_end|>\n\
             <|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        );
    }

    #[test]
    fn qwen3_multi_turn_without_system_and_late_system() {
        let turns = [
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "Plain answer"),
            turn(Role::User, "Tell me a joke"),
            turn(Role::Assistant, "Second"),
            turn(Role::User, "Third"),
        ];
        check(
            ChatFormat::Qwen3,
            &turns,
            false,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nPlain answer<|im_end|>\n\
             <|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\nSecond<|im_end|>\n\
             <|im_start|>user\nThird<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        );
        let turns = [
            turn(Role::System, "You are helpful."),
            turn(Role::User, "Hi"),
            turn(Role::System, "Late system"),
            turn(Role::User, "Tell me a joke"),
        ];
        check(
            ChatFormat::Qwen3,
            &turns,
            false,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>system\nLate system<|im_end|>\n<|im_start|>user\nTell me a joke<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n",
        );
    }

    #[test]
    fn qwen3_trailing_assistant_gets_a_think_block() {
        let turns = [
            turn(Role::System, "You are helpful."),
            turn(Role::User, "Hi"),
            turn(Role::Assistant, "Plain answer"),
        ];
        check(
            ChatFormat::Qwen3,
            &turns,
            false,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\nPlain answer<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n",
        );
    }

    #[test]
    fn chatml_has_no_think_block_and_extends_as_a_prefix() {
        let first = [turn(Role::System, "You are SmolLM."), turn(Role::User, "Hi")];
        let expected = "<|im_start|>system\nYou are SmolLM.<|im_end|>\n\
                        <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
        check(ChatFormat::ChatMl, &first, false, expected);
        check(ChatFormat::ChatMl, &first, true, expected);
        let mut second = first.to_vec();
        second.push(turn(Role::Assistant, "Hello!"));
        second.push(turn(Role::User, "How are you?"));
        let rendered = render(ChatFormat::ChatMl, &second, &[], false);
        assert!(rendered.starts_with(&format!("{expected}Hello!<|im_end|>\n")), "{rendered}");
    }

    #[test]
    fn qwen3_next_turn_shares_the_prefix_up_to_the_assistant_header() {
        let first = [turn(Role::System, "S"), turn(Role::User, "Hi")];
        let prompt = render(ChatFormat::Qwen3, &first, &[], false);
        let in_context = format!("{prompt}Hello!<|im_end|>");
        let mut second = first.to_vec();
        second.push(turn(Role::Assistant, "Hello!"));
        second.push(turn(Role::User, "More"));
        let next = render(ChatFormat::Qwen3, &second, &[], false);
        let stable = prompt.strip_suffix(EMPTY_THINK_BLOCK).unwrap();
        assert!(next.starts_with(stable));
        let common = in_context.chars().zip(next.chars()).take_while(|(a, b)| a == b).count();
        assert_eq!(common, stable.len());
    }

    #[test]
    fn split_reasoning_matches_the_template() {
        assert_eq!(split_reasoning("plain"), ("", "plain"));
        assert_eq!(split_reasoning("<think>\nR\n</think>\n\nA"), ("R", "A"));
        assert_eq!(split_reasoning("x<think>R1</think>y</think>\nA"), ("R1", "A"));
    }

    fn filter_all(pieces: &[&str]) -> String {
        let mut filter = ThinkFilter::new();
        let mut out: String = pieces.iter().map(|p| filter.push(p)).collect();
        out.push_str(&filter.finish());
        out
    }

    #[test]
    fn think_filter_strips_blocks_split_anywhere() {
        let text = "<think>\nLet me think.\n</think>\n\nHello <b>world</b>!";
        assert_eq!(filter_all(&[text]), "Hello <b>world</b>!");
        // Every possible split into three pieces gives the same visible text.
        let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &a in &cuts {
            for &b in cuts.iter().filter(|&&b| b >= a) {
                let got = filter_all(&[&text[..a], &text[a..b], &text[b..]]);
                assert_eq!(got, "Hello <b>world</b>!", "cuts at {a}, {b}");
            }
        }
        // One character at a time.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(filter_all(&refs), "Hello <b>world</b>!");
    }

    #[test]
    fn think_filter_edge_cases() {
        assert_eq!(filter_all(&["<think>\n\n</think>\n\n", "Answer"]), "Answer");
        assert_eq!(filter_all(&["A ", "<thi"]), "A <thi");
        assert_eq!(filter_all(&["before <think>never closed"]), "before ");
        assert_eq!(filter_all(&["a<think>x</think>b<think>y</think>\nc"]), "abc");
        assert_eq!(filter_all(&["no tags, just «text» 😀"]), "no tags, just «text» 😀");
        let mut filter = ThinkFilter::new();
        assert_eq!(filter.push("Hi <"), "Hi ");
        assert_eq!(filter.push("b>"), "<b>");
    }

    // ---- Tools: parity with the official template, rendered by minijinja ----

    /// The official Qwen3 chat template, as HF transformers compiles it (trim_blocks,
    /// lstrip_blocks, Python string methods, a `tojson` that is `json.dumps`).
    fn official_template() -> minijinja::Environment<'static> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/assets/qwen3/tokenizer_config.json");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let source = config["chat_template"].as_str().expect("chat_template").to_string();
        let mut env = minijinja::Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().unwrap());
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", |value: minijinja::Value| {
            let mut out = String::new();
            py_dumps(&value, &mut out);
            out
        });
        env.add_template_owned("qwen3", source).expect("the official template parses");
        env
    }

    /// Python's `json.dumps(value, ensure_ascii=False)` over minijinja values, written
    /// apart from `python_json` so the parity test does not check the code with itself.
    fn py_dumps(value: &minijinja::Value, out: &mut String) {
        use minijinja::value::ValueKind;
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => match value.as_i64() {
                Some(int) if value.is_integer() => out.push_str(&int.to_string()),
                _ => {
                    // Test data keeps floats in Python's positional range.
                    let float = f64::try_from(value.clone()).unwrap();
                    let text = float.to_string();
                    out.push_str(&text);
                    if !text.contains('.') {
                        out.push_str(".0");
                    }
                }
            },
            ValueKind::String => {
                out.push('"');
                for c in value.as_str().unwrap().chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        '\u{8}' => out.push_str("\\b"),
                        '\u{c}' => out.push_str("\\f"),
                        c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            ValueKind::Seq => {
                out.push('[');
                for (i, item) in value.try_iter().unwrap().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_dumps(&item, out);
                }
                out.push(']');
            }
            ValueKind::Map => {
                out.push('{');
                for (i, key) in value.try_iter().unwrap().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_dumps(&key, out);
                    out.push_str(": ");
                    py_dumps(&value.get_item(&key).unwrap(), out);
                }
                out.push('}');
            }
            other => panic!("tojson of a {other} value"),
        }
    }

    /// A JSON value as a minijinja value, keys in the JSON value's order (minijinja is
    /// built with `preserve_order` for the tests).
    fn jinja_value(value: &Value) -> minijinja::Value {
        match value {
            Value::Null => minijinja::Value::from(()),
            Value::Bool(b) => minijinja::Value::from(*b),
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(int), _) => minijinja::Value::from(int),
                (None, Some(float)) => minijinja::Value::from(float),
                _ => panic!("number {n}"),
            },
            Value::String(s) => minijinja::Value::from(s.as_str()),
            Value::Array(items) => items.iter().map(jinja_value).collect(),
            Value::Object(map) => {
                minijinja::Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), jinja_value(v))))
            }
        }
    }

    /// The official template's output for our turns and tools, given in OpenAI's message
    /// shape (tool calls as `{"type": "function", "function": {"name", "arguments"}}` with
    /// the arguments as JSON text, which the template prints as is).
    fn official(turns: &[ChatTurn], tools: &[ToolSpec], thinking: bool) -> String {
        let messages: Vec<Value> = turns
            .iter()
            .map(|turn| {
                let mut message =
                    serde_json::json!({"role": turn.role.as_str(), "content": turn.content});
                if !turn.tool_calls.is_empty() {
                    let calls: Vec<Value> = turn
                        .tool_calls
                        .iter()
                        .map(|c| {
                            serde_json::json!({"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}})
                        })
                        .collect();
                    message["tool_calls"] = Value::Array(calls);
                }
                message
            })
            .collect();
        // The wrapper's keys in OpenAI's order, as a client would send them.
        let tools: Vec<minijinja::Value> = tools
            .iter()
            .map(|tool| {
                let function = minijinja::Value::from_pairs(vec![
                    ("name", minijinja::Value::from(tool.name.as_str())),
                    ("description", minijinja::Value::from(tool.description.as_str())),
                    ("parameters", jinja_value(&tool.parameters)),
                ]);
                minijinja::Value::from_pairs(vec![
                    ("type", minijinja::Value::from("function")),
                    ("function", function),
                ])
            })
            .collect();
        let env = official_template();
        let template = env.get_template("qwen3").unwrap();
        let mut context = vec![
            ("messages", jinja_value(&Value::Array(messages))),
            ("add_generation_prompt", minijinja::Value::from(true)),
            ("enable_thinking", minijinja::Value::from(thinking)),
        ];
        if !tools.is_empty() {
            context.push(("tools", tools.into_iter().collect()));
        }
        template
            .render(minijinja::Value::from_pairs(context))
            .expect("render the official template")
    }

    fn tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec {
                name: "current_time".into(),
                description:
                    "L'heure «maintenant» in the user's\ttime zone, with \"quotes\" \\ 😀.".into(),
                parameters: serde_json::json!({"type": "object", "properties": {}}),
            },
            ToolSpec {
                name: "reminders_create".into(),
                description: "Create a one-shot or recurring reminder.".into(),
                parameters: serde_json::json!({
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "description": "What to say, e.g. «appeler»\n"},
                        "at": {"type": "string", "format": "date-time"},
                        "every": {"type": ["string", "null"], "enum": ["daily", "weekly", null]},
                        "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 0.5},
                        "urgent": {"type": "boolean", "default": false}
                    },
                    "required": ["text"],
                    "additionalProperties": false
                }),
            },
        ]
    }

    fn tool_call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall { id: id.into(), name: name.into(), arguments: arguments.into() }
    }

    /// Conversations covering every rule of the template's tool part.
    fn tool_conversations() -> Vec<(&'static str, Vec<ChatTurn>)> {
        let system = turn(Role::System, "Tu es mon assistant. Réponds en français 🙂");
        let ask = turn(Role::User, "Rappelle-moi demain à 9 h d'appeler le plombier");
        let one_call =
            ChatTurn::assistant_calls("", vec![tool_call("call_1", "current_time", "{}")]);
        let text_and_two_calls = ChatTurn::assistant_calls(
            "Je regarde l'heure puis je crée le rappel.",
            vec![
                tool_call("call_2", "current_time", "{}"),
                tool_call(
                    "call_3",
                    "reminders_create",
                    r#"{"text": "appeler le plombier", "at": "2026-11-27T09:00:00+01:00"}"#,
                ),
            ],
        );
        let two_calls_no_text = ChatTurn::assistant_calls(
            "",
            vec![
                tool_call("call_4", "current_time", "{}"),
                tool_call("call_5", "reminders_create", r#"{"text":"x"}"#),
            ],
        );
        let result = |id: &str, content: &str| ChatTurn::tool_result(id, content);
        let answer = turn(Role::Assistant, "C'est noté : demain à 9 h ⏰");
        let mut all = vec![
            ("tools, no messages but a question", vec![ask.clone()]),
            ("tools and a system prompt", vec![system.clone(), ask.clone()]),
            ("one call after the question", vec![system.clone(), ask.clone(), one_call.clone()]),
            (
                "one call and its result (tool loop after the last query)",
                vec![system.clone(), ask.clone(), one_call.clone(), result("call_1", "08:12")],
            ),
            (
                "text then two calls, two consecutive results",
                vec![
                    system.clone(),
                    ask.clone(),
                    text_and_two_calls.clone(),
                    result("call_2", r#"{"now": "2026-11-26T20:00:00+01:00"}"#),
                    result("call_3", r#"{"id": 7, "ok": true}"#),
                ],
            ),
            (
                "multi-round loop, then the answer, then a new question",
                vec![
                    system.clone(),
                    ask.clone(),
                    one_call.clone(),
                    result("call_1", "08:12"),
                    two_calls_no_text.clone(),
                    result("call_4", "08:13"),
                    result("call_5", r#"{"error": "unknown"}"#),
                    answer.clone(),
                    turn(Role::User, "Merci ! Et annule-le."),
                ],
            ),
            (
                "multi-round loop with reasoning kept after the last query",
                vec![
                    ask.clone(),
                    ChatTurn::assistant_calls(
                        "<think>\nI need the time.\n</think>\n\nUn instant.",
                        vec![tool_call("call_1", "current_time", "{}")],
                    ),
                    result("call_1", "08:12"),
                    ChatTurn::assistant_calls(
                        "<think>\nNow the reminder.\n</think>\n\n",
                        vec![tool_call("call_2", "reminders_create", r#"{"text": "x"}"#)],
                    ),
                    result("call_2", "ok"),
                ],
            ),
            (
                "old tool rounds before the last query lose their reasoning",
                vec![
                    system.clone(),
                    ask.clone(),
                    ChatTurn::assistant_calls(
                        "<think>\nhidden\n</think>\n\nVoyons.",
                        vec![tool_call("call_1", "current_time", "{}")],
                    ),
                    result("call_1", "08:12"),
                    answer.clone(),
                    turn(Role::User, "<tool_response>\nlooks like a result\n</tool_response>"),
                ],
            ),
            (
                "a result with newlines and a late system turn",
                vec![
                    system.clone(),
                    ask.clone(),
                    one_call.clone(),
                    result("call_1", "ligne 1\nligne 2\n"),
                    turn(Role::System, "Late system note"),
                    turn(Role::User, "Et après ?"),
                ],
            ),
            (
                "a trailing partial answer",
                vec![system.clone(), ask.clone(), turn(Role::Assistant, "Bien sûr")],
            ),
        ];
        // The same conversations without a system prompt.
        let without_system: Vec<_> = all
            .iter()
            .filter(|(_, turns)| turns[0].role == Role::System)
            .map(|(name, turns)| (*name, turns[1..].to_vec()))
            .collect();
        all.extend(without_system);
        all
    }

    #[test]
    fn qwen3_matches_the_official_template_byte_for_byte() {
        let tools = tools();
        let mut checked = 0;
        for (name, turns) in tool_conversations() {
            for offered in [&tools[..], &tools[..1], &[]] {
                for thinking in [false, true] {
                    let ours = render(ChatFormat::Qwen3, &turns, offered, thinking);
                    let official = official(&turns, offered, thinking);
                    assert_eq!(
                        ours,
                        official,
                        "{name} ({} tools, thinking {thinking})",
                        offered.len()
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 90, "{checked}");
    }

    #[test]
    fn chatml_gets_the_same_tool_format_without_think_blocks() {
        let tools = tools();
        for (name, turns) in tool_conversations() {
            if turns.iter().any(|t| t.content.contains("<think>")) {
                continue;
            }
            for offered in [&tools[..], &[]] {
                // Qwen3 with thinking on and no assistant turn after the last query renders
                // no think block at all: exactly what ChatML must be.
                let last_query = turns.iter().rposition(|t| t.role == Role::User).unwrap_or(0);
                if turns[last_query..].iter().any(|t| t.role == Role::Assistant) {
                    continue;
                }
                assert_eq!(
                    render(ChatFormat::ChatMl, &turns, offered, false),
                    official(&turns, offered, true),
                    "{name}"
                );
            }
        }
        // A tool loop: calls and grouped results, assistant text as it is.
        let turns = [
            turn(Role::User, "Time?"),
            ChatTurn::assistant_calls("Checking.", vec![tool_call("c1", "current_time", "{}")]),
            ChatTurn::tool_result("c1", "08:12"),
            ChatTurn::tool_result("c2", "ok"),
        ];
        assert_eq!(
            render(ChatFormat::ChatMl, &turns, &[], false),
            "<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\nChecking.\n<tool_call>\n\
             {\"name\": \"current_time\", \"arguments\": {}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\n08:12\n</tool_response>\n<tool_response>\nok\n\
             </tool_response><|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen3_tools_vector_rendered_by_python_jinja2() {
        // Produced by Python's jinja2 (ImmutableSandboxedEnvironment, trim_blocks and
        // lstrip_blocks, `tojson` = `json.dumps(x, ensure_ascii=False)`, as transformers
        // sets it up) over the official template; floats in both of Python's notations.
        let tools = [
            ToolSpec {
                name: "current_time".into(),
                description: "L'heure «now»\nin the user's zone.".into(),
                parameters: serde_json::json!({"properties": {}, "type": "object"}),
            },
            ToolSpec {
                name: "reminders_create".into(),
                description: "Create a reminder.".into(),
                parameters: serde_json::json!({"properties": {"at": {"description": "When",
                    "type": "string"}, "n": {"maximum": 1e16, "minimum": 0.5, "type": "integer"}},
                    "required": ["at"], "type": "object"}),
            },
        ];
        let turns = [
            turn(Role::System, "You are helpful."),
            turn(Role::User, "Remind me at 9"),
            ChatTurn::assistant_calls(
                "Sure.",
                vec![
                    tool_call("a", "current_time", "{}"),
                    tool_call("b", "reminders_create", r#"{"at": "09:00"}"#),
                ],
            ),
            ChatTurn::tool_result("a", r#"{"now": "08:00"}"#),
            ChatTurn::tool_result("b", r#"{"ok": true}"#),
        ];
        let expected = "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"current_time\", \"description\": \"L'heure «now»\\nin the user's zone.\", \"parameters\": {\"properties\": {}, \"type\": \"object\"}}}\n{\"type\": \"function\", \"function\": {\"name\": \"reminders_create\", \"description\": \"Create a reminder.\", \"parameters\": {\"properties\": {\"at\": {\"description\": \"When\", \"type\": \"string\"}, \"n\": {\"maximum\": 1e+16, \"minimum\": 0.5, \"type\": \"integer\"}}, \"required\": [\"at\"], \"type\": \"object\"}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nRemind me at 9<|im_end|>\n<|im_start|>assistant\nSure.\n<tool_call>\n{\"name\": \"current_time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"reminders_create\", \"arguments\": {\"at\": \"09:00\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"now\": \"08:00\"}\n</tool_response>\n<tool_response>\n{\"ok\": true}\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
        assert_eq!(render(ChatFormat::Qwen3, &turns, &tools, false), expected);
    }

    #[test]
    fn python_json_matches_json_dumps() {
        // Right-hand sides are Python's `json.dumps(x, ensure_ascii=False)`. Keys keep the
        // order they were given in, as a Python dict does (serde_json's `preserve_order`,
        // which llguidance enables for the whole build).
        let cases = [
            (
                serde_json::json!({"b": [1, 2.5, null, true], "a": {}}),
                r#"{"b": [1, 2.5, null, true], "a": {}}"#,
            ),
            (serde_json::json!("é\"\\\n\u{1}\u{7f}😀"), "\"é\\\"\\\\\\n\\u0001\u{7f}😀\""),
            (
                serde_json::json!([1e16, 1e15, 1e-5, 0.0001, -2.5e-7, 123456789.125, -0.0, 1.0]),
                "[1e+16, 1000000000000000.0, 1e-05, 0.0001, -2.5e-07, 123456789.125, -0.0, 1.0]",
            ),
            (serde_json::json!([]), "[]"),
            (serde_json::json!(-7), "-7"),
        ];
        for (value, expected) in cases {
            assert_eq!(python_json(&value), expected);
        }
    }

    #[test]
    fn the_prompt_with_tools_still_extends_as_a_prefix() {
        // A tool loop adds turns at the end only: the earlier prompt (ChatML) is a prefix.
        let tools = tools();
        let first = [turn(Role::System, "S"), turn(Role::User, "Time?")];
        let prompt = render(ChatFormat::ChatMl, &first, &tools, false);
        let mut second = first.to_vec();
        second.push(ChatTurn::assistant_calls("", vec![tool_call("c", "current_time", "{}")]));
        second.push(ChatTurn::tool_result("c", "08:12"));
        let next = render(ChatFormat::ChatMl, &second, &tools, false);
        let generated =
            "<tool_call>\n{\"name\": \"current_time\", \"arguments\": {}}\n</tool_call>";
        assert!(next.starts_with(&format!("{prompt}{generated}<|im_end|>\n")), "{next}");
    }

    #[test]
    fn qwen3_tool_tags_are_single_tokens_of_the_real_vocabulary() {
        use candle_core::quantized::gguf_file::{Content, VersionedMagic};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets/qwen3");
        let tokenizer_json = dir.join("tokenizer.json");
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(&tokenizer_json).unwrap()).unwrap();
        let added_id = |content: &str| {
            json["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["content"] == content)
                .and_then(|t| t["id"].as_u64())
                .unwrap_or_else(|| panic!("{content} is an added token")) as u32
        };
        let metadata =
            crate::llm::engine::vocab::qwen3_tokenizer_metadata(&tokenizer_json).unwrap();
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata: metadata.into_iter().collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        let tokenizer =
            crate::llm::engine::tokenizer::GgufTokenizer::from_gguf(&content).expect("tokenizer");

        let (_, turns) = tool_conversations().swap_remove(4);
        let text = render(ChatFormat::Qwen3, &turns, &tools(), false);
        let ids = tokenizer.encode(&text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text, "the prompt round-trips");
        for (tag, expected_id) in [
            ("<tool_call>", 151_657),
            ("</tool_call>", 151_658),
            ("<tool_response>", 151_665),
            ("</tool_response>", 151_666),
        ] {
            let id = added_id(tag);
            assert_eq!(id, expected_id, "{tag}");
            assert_eq!(tokenizer.token_id(tag), Some(id), "{tag}");
            // Every occurrence in the text is that one token (none spelled out in pieces).
            let in_text = text.matches(tag).count();
            let as_tokens = ids.iter().filter(|&&t| t == id).count();
            assert!(in_text >= 2, "{tag} appears in the test prompt");
            assert_eq!(as_tokens, in_text, "{tag}");
        }
    }
}
