//! Chat templates rendered in Rust (no Jinja): Qwen3's ChatML with its think block and plain
//! ChatML for Llama-architecture models (SmolLM2), plus `ThinkFilter`, which strips
//! `<think>…</think>` from streamed output. Strings only: no tokens, no model state.

use crate::domain::{ChatTurn, Role};
use crate::llm::engine::gguf::Architecture;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
/// What Qwen3's template appends after the generation prompt when thinking is off.
const EMPTY_THINK_BLOCK: &str = "<think>\n\n</think>\n\n";

/// Which template a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// Qwen3's official template (llama.cpp `models/templates/Qwen-Qwen3-0.6B.jinja`, the
    /// same as the HF one), without tools.
    Qwen3,
    /// Plain ChatML with no think block (SmolLM2 and other Llama-architecture files).
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

/// Renders `turns` and the generation prompt (`<|im_start|>assistant\n`, followed for Qwen3
/// with `thinking == false` by the empty `<think>\n\n</think>\n\n` block, the "hard switch").
///
/// Prefix stability, which the engine's KV reuse relies on: rendering turns `1..n` and then
/// `1..n` + (assistant answer, user turn) gives strings that agree up to the end of the
/// `<|im_start|>assistant\n` of the earlier generation prompt. After that they differ for
/// Qwen3 with thinking off: the generated turn had `<think>\n\n</think>\n\n` in the context,
/// but the official template renders earlier assistant turns without any think block (their
/// reasoning is dropped). The engine settles this by longest-common-prefix matching on
/// tokens; this renderer stays exact to the official template rather than hiding that.
/// For `ChatMl` the earlier rendering (prompt included) is a pure prefix of the later one.
///
/// `thinking` is ignored for `ChatMl`. Unlike SmolLM2's own template, `ChatMl` injects no
/// default system turn: the assistant always sends its persona as the system turn.
pub fn render(format: ChatFormat, turns: &[ChatTurn], thinking: bool) -> String {
    let capacity = turns.iter().map(|t| t.content.len() + 32).sum::<usize>() + 64;
    let mut out = String::with_capacity(capacity);
    match format {
        ChatFormat::ChatMl => {
            for turn in turns {
                push_turn(&mut out, turn.role, &turn.content);
            }
            out.push_str("<|im_start|>assistant\n");
        }
        ChatFormat::Qwen3 => {
            render_qwen3_turns(&mut out, turns);
            out.push_str("<|im_start|>assistant\n");
            if !thinking {
                out.push_str(EMPTY_THINK_BLOCK);
            }
        }
    }
    out
}

fn push_turn(out: &mut String, role: Role, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role.as_str());
    out.push('\n');
    out.push_str(content);
    out.push_str("<|im_end|>\n");
}

/// The turn loop of the official Qwen3 template, step by step (tools aside).
fn render_qwen3_turns(out: &mut String, turns: &[ChatTurn]) {
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
        match turn.role {
            Role::System | Role::User => push_turn(out, turn.role, &turn.content),
            // TODO(issue 15): the official template's `<tool_response>` grouping.
            Role::Tool => push_turn(out, Role::User, &turn.content),
            Role::Assistant => {
                let (reasoning, content) = split_reasoning(&turn.content);
                out.push_str("<|im_start|>assistant\n");
                let is_last = turn_idx + 1 == turns.len();
                if turn_idx > last_query_idx && (is_last || !reasoning.is_empty()) {
                    out.push_str("<think>\n");
                    out.push_str(reasoning.trim_matches('\n'));
                    out.push_str("\n</think>\n\n");
                    out.push_str(content.trim_start_matches('\n'));
                } else {
                    out.push_str(content);
                }
                out.push_str("<|im_end|>\n");
            }
        }
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

    fn turn(role: Role, content: &str) -> ChatTurn {
        ChatTurn::new(role, content)
    }

    fn check(format: ChatFormat, turns: &[ChatTurn], thinking: bool, expected: &str) {
        assert_eq!(render(format, turns, thinking), expected);
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
        let rendered = render(ChatFormat::ChatMl, &second, false);
        assert!(rendered.starts_with(&format!("{expected}Hello!<|im_end|>\n")), "{rendered}");
    }

    #[test]
    fn qwen3_next_turn_shares_the_prefix_up_to_the_assistant_header() {
        let first = [turn(Role::System, "S"), turn(Role::User, "Hi")];
        let prompt = render(ChatFormat::Qwen3, &first, false);
        let in_context = format!("{prompt}Hello!<|im_end|>");
        let mut second = first.to_vec();
        second.push(turn(Role::Assistant, "Hello!"));
        second.push(turn(Role::User, "More"));
        let next = render(ChatFormat::Qwen3, &second, false);
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
}
