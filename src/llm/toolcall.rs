//! The streaming `<tool_call>` parser of the local engine: it is fed the answer text piece by
//! piece (after the think filter) and gives back answer text and complete tool calls, in
//! order, so a call never reaches the user as raw tags. It also owns `new_call_id`, the id
//! every call gets. Text only: it knows no tokens, no model, no tools registry.
//!
//! The format is Qwen3's (Hermes-style), which `engine::template` renders for every local
//! model: `<tool_call>\n{"name": "…", "arguments": {…}}\n</tool_call>`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::ToolCall;

/// Opens a call in the model's output (one token in Qwen3's vocabulary, id 151657).
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Closes a call (one token in Qwen3's vocabulary, id 151658).
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// A fresh tool-call id (`call_` and 24 random alphanumerics, as OpenAI's look).
pub fn new_call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// What the parser recognised, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Answer text to show.
    Text(String),
    /// A well-formed call.
    Call(ToolCall),
    /// A call the model opened but got wrong: its JSON is not an object with a string
    /// `name` and an object or string `arguments`, or the stream ended inside it without a
    /// usable call. `call` is still a `ToolCall` (fresh id, the name if one could be read,
    /// else empty; as `arguments` the raw text of the call's `arguments` member, or of the
    /// whole call when that cannot be read: never a valid call), so the agent loop runs it
    /// through the registry like any call and the model reads an error result (unknown
    /// tool, or arguments that are not valid JSON) instead of the turn failing. `reason`
    /// says what was wrong, for logs.
    Malformed { call: ToolCall, reason: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Outside any call.
    #[default]
    Text,
    /// After `<tool_call>`, collecting the call until `</tool_call>`.
    InCall,
    /// Just after `</tool_call>`: whitespace is dropped until other text arrives.
    AfterCall,
}

/// Splits a streamed answer into text and tool calls.
///
/// - Tags are recognised wherever the pieces split them; text is held back only while it
///   could be the start of `<tool_call>`, plus a run of trailing whitespace (it belongs to
///   the call's layout if a call follows: the template writes `text\n<tool_call>`, so the
///   text before a call is kept without that whitespace, and re-rendering a stored round
///   gives back what the model wrote).
/// - Whitespace right after `</tool_call>` (between calls, before the end) is dropped.
/// - Text that only looks like a tag prefix (`<tool` then something else) is released.
#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    state: State,
    /// Unreleased text (a possible tag prefix or trailing whitespace), or the call so far.
    held: String,
    calls: usize,
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many calls (well-formed or malformed) it has given so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Consumes one piece of answer text; returns what it completes (often nothing, or one
    /// `Text`).
    pub fn push(&mut self, piece: &str) -> Vec<Parsed> {
        self.held.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Text => match self.held.find(TOOL_CALL_OPEN) {
                    Some(pos) => {
                        let text = self.held[..pos].trim_end();
                        push_text(&mut out, text);
                        self.held.drain(..pos + TOOL_CALL_OPEN.len());
                        self.state = State::InCall;
                    }
                    None => {
                        let tag = partial_tag_suffix(&self.held, TOOL_CALL_OPEN);
                        let before_tag = &self.held[..self.held.len() - tag];
                        let emit_to = before_tag.trim_end().len();
                        push_text(&mut out, &self.held[..emit_to]);
                        self.held.drain(..emit_to);
                        return out;
                    }
                },
                State::InCall => match close_tag_outside_strings(&self.held) {
                    Some(pos) => {
                        self.calls += 1;
                        out.push(parse_call(&self.held[..pos], true));
                        self.held.drain(..pos + TOOL_CALL_CLOSE.len());
                        self.state = State::AfterCall;
                    }
                    None => return out,
                },
                State::AfterCall => {
                    let rest = self.held.trim_start().len();
                    self.held.drain(..self.held.len() - rest);
                    if self.held.is_empty() {
                        return out;
                    }
                    self.state = State::Text;
                }
            }
        }
    }

    /// Ends the stream: held-back text (a lone `<`, trailing whitespace) comes out as text;
    /// a call still open becomes a `Call` if what it holds is a complete call (the model
    /// stopped right before `</tool_call>`), else `Malformed`.
    pub fn finish(&mut self) -> Vec<Parsed> {
        let held = std::mem::take(&mut self.held);
        let state = std::mem::take(&mut self.state);
        let mut out = Vec::new();
        match state {
            State::Text => push_text(&mut out, &held),
            State::InCall => {
                self.calls += 1;
                out.push(parse_call(&held, false));
            }
            State::AfterCall => {}
        }
        out
    }
}

/// Where `</tool_call>` closes the call: its first occurrence outside a JSON string. Inside
/// a string it is argument text (a model under the grammar may write it in a string value,
/// and without this the call would be cut there and come out malformed).
fn close_tag_outside_strings(held: &str) -> Option<usize> {
    let (mut in_string, mut escaped) = (false, false);
    for (pos, byte) in held.bytes().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if byte == b'"' {
            in_string = true;
        } else if held[pos..].starts_with(TOOL_CALL_CLOSE) {
            return Some(pos);
        }
    }
    None
}

/// A call's outcome from its body (the text between the tags).
fn parse_call(body: &str, closed: bool) -> Parsed {
    match parse_body(body) {
        Ok(call) => Parsed::Call(call),
        Err(reason) => {
            let reason = if closed {
                reason
            } else {
                format!("the answer ended inside a tool call ({reason})")
            };
            let call = ToolCall {
                id: new_call_id(),
                name: lenient_name(body).unwrap_or_default(),
                arguments: malformed_arguments(body),
            };
            Parsed::Malformed { call, reason }
        }
    }
}

fn push_text(out: &mut Vec<Parsed>, text: &str) {
    if !text.is_empty() {
        out.push(Parsed::Text(text.to_string()));
    }
}

/// The JSON a call holds. `arguments` is borrowed raw, so the call keeps the model's own
/// text (spacing, key order) and renders back exactly as it was generated.
#[derive(Deserialize)]
struct RawCall<'a> {
    name: String,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
}

/// A call's body: `{"name": "…", "arguments": …}` with an object or a string (JSON text,
/// taken decoded) as arguments; missing arguments count as `{}`.
fn parse_body(body: &str) -> Result<ToolCall, String> {
    let body = body.trim();
    let raw: RawCall<'_> = match serde_json::from_str(body) {
        Ok(raw) => raw,
        Err(err) => return Err(format!("not a JSON object with a string `name`: {err}")),
    };
    let arguments = match raw.arguments.map(RawValue::get) {
        None => "{}".to_string(),
        Some(text) if text.starts_with('{') => text.to_string(),
        Some(text) if text.starts_with('"') => match serde_json::from_str::<String>(text) {
            Ok(decoded) => decoded,
            Err(err) => return Err(format!("`arguments` is not a valid string: {err}")),
        },
        Some(text) => return Err(format!("`arguments` must be an object, not `{text}`")),
    };
    if raw.name.is_empty() {
        return Err("`name` is empty".to_string());
    }
    Ok(ToolCall { id: new_call_id(), name: raw.name, arguments })
}

/// The `arguments` a malformed call is given: the raw text of its `arguments` member when
/// the body is a JSON object (so a wrong `arguments` such as `[1]` is what the tool
/// registry rejects, never the whole object, which it could take for arguments), else the
/// whole body as written.
fn malformed_arguments(body: &str) -> String {
    let body = body.trim();
    match serde_json::from_str::<BTreeMap<String, &RawValue>>(body) {
        Ok(members) => match members.get("arguments") {
            Some(raw) => raw.get().to_string(),
            None => body.to_string(),
        },
        Err(_) => body.to_string(),
    }
}

/// The `name` of a call whose JSON is broken, if a `"name": "…"` can still be read.
fn lenient_name(body: &str) -> Option<String> {
    let after_key = &body[body.find("\"name\"")? + "\"name\"".len()..];
    let value = after_key.trim_start().strip_prefix(':')?.trim_start();
    serde_json::Deserializer::from_str(value).into_iter::<String>().next()?.ok()
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

    /// Feeds `pieces`, then ends the stream; merges adjacent texts and blanks call ids.
    fn parse(pieces: &[&str]) -> Vec<Parsed> {
        let mut parser = ToolCallParser::new();
        let mut items: Vec<Parsed> = pieces.iter().flat_map(|p| parser.push(p)).collect();
        items.extend(parser.finish());
        let mut merged: Vec<Parsed> = Vec::new();
        for item in items {
            match (merged.last_mut(), item) {
                (Some(Parsed::Text(last)), Parsed::Text(text)) => last.push_str(&text),
                (_, Parsed::Call(call)) => {
                    assert!(call.id.starts_with("call_") && call.id.len() == 29, "{}", call.id);
                    merged.push(Parsed::Call(ToolCall { id: String::new(), ..call }));
                }
                (_, Parsed::Malformed { call, reason }) => {
                    assert!(call.id.starts_with("call_"), "{}", call.id);
                    let call = ToolCall { id: String::new(), ..call };
                    merged.push(Parsed::Malformed { call, reason });
                }
                (_, item) => merged.push(item),
            }
        }
        merged
    }

    fn text(text: &str) -> Parsed {
        Parsed::Text(text.to_string())
    }

    fn call(name: &str, arguments: &str) -> Parsed {
        Parsed::Call(ToolCall { id: String::new(), name: name.into(), arguments: arguments.into() })
    }

    const TWO_CALLS: &str = "Let me check. ⏰\n<tool_call>\n{\"name\": \"current_time\", \
        \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"reminders_create\", \
        \"arguments\": {\"text\": \"appeler le plombier\", \"at\": \"09:00\"}}\n</tool_call>";

    fn two_calls_expected() -> Vec<Parsed> {
        vec![
            text("Let me check. ⏰"),
            call("current_time", "{}"),
            call("reminders_create", r#"{"text": "appeler le plombier", "at": "09:00"}"#),
        ]
    }

    #[test]
    fn two_calls_with_text_before_come_out_whole_and_in_order() {
        assert_eq!(parse(&[TWO_CALLS]), two_calls_expected());
    }

    #[test]
    fn tags_split_at_every_byte_position_give_the_same_items() {
        let input = format!("{TWO_CALLS}\n\nDone, «voilà».");
        let mut expected = two_calls_expected();
        expected.push(text("Done, «voilà»."));
        let cuts: Vec<usize> = (0..=input.len()).filter(|&i| input.is_char_boundary(i)).collect();
        for &a in &cuts {
            assert_eq!(parse(&[&input[..a], &input[a..]]), expected, "cut at {a}");
        }
        // Three pieces, with the second cut inside or around the first call's tags.
        let first_close = input.find(TOOL_CALL_CLOSE).unwrap();
        for &a in cuts.iter().filter(|&&a| a < first_close + 16) {
            for &b in cuts.iter().filter(|&&b| b >= a && b < first_close + 16) {
                let got = parse(&[&input[..a], &input[a..b], &input[b..]]);
                assert_eq!(got, expected, "cuts at {a}, {b}");
            }
        }
        // One character at a time.
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(parse(&refs), expected);
    }

    #[test]
    fn no_raw_tag_is_ever_released_as_text() {
        let input = format!("a{TWO_CALLS}b");
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let mut parser = ToolCallParser::new();
        let mut shown = String::new();
        for piece in &chars {
            for item in parser.push(piece) {
                if let Parsed::Text(t) = item {
                    shown.push_str(&t);
                }
            }
        }
        assert!(!shown.contains('<') && !shown.contains("tool_call"), "{shown}");
        assert_eq!(parser.calls(), 2);
    }

    #[test]
    fn text_around_and_between_calls() {
        let c = "<tool_call>{\"name\": \"a\", \"arguments\": {\"x\": 1}}</tool_call>";
        assert_eq!(
            parse(&[&format!("before {c} middle {c}  after")]),
            vec![
                text("before"),
                call("a", r#"{"x": 1}"#),
                text("middle"),
                call("a", r#"{"x": 1}"#),
                text("after")
            ]
        );
        // Only a call: no text at all.
        assert_eq!(parse(&[c, "\n"]), vec![call("a", r#"{"x": 1}"#)]);
    }

    #[test]
    fn text_that_only_resembles_a_tag_is_released() {
        assert_eq!(parse(&["use <tool", "s> here"]), vec![text("use <tools> here")]);
        assert_eq!(
            parse(&["a <b>bold</b> <tool_cal", "l"]),
            vec![text("a <b>bold</b> <tool_call")]
        );
        let mut parser = ToolCallParser::new();
        assert_eq!(parser.push("x <tool"), vec![text("x")]);
        assert_eq!(parser.push("box>"), vec![text(" <toolbox>")]);
        // Whitespace is held only until text follows it.
        assert_eq!(parser.push(" \n"), vec![]);
        assert_eq!(parser.push("y"), vec![text(" \ny")]);
    }

    #[test]
    fn a_lone_angle_bracket_or_whitespace_at_the_end_is_text() {
        assert_eq!(parse(&["1 ", "<"]), vec![text("1 <")]);
        assert_eq!(parse(&["<"]), vec![text("<")]);
        assert_eq!(parse(&["ok\n"]), vec![text("ok\n")]);
        assert_eq!(parse(&[]), vec![]);
    }

    #[test]
    fn string_and_missing_arguments() {
        assert_eq!(
            parse(&[r#"<tool_call>{"name": "a", "arguments": "{\"x\": \"é\"}"}</tool_call>"#]),
            vec![call("a", r#"{"x": "é"}"#)]
        );
        assert_eq!(
            parse(&[r#"<tool_call>{"name": "current_time"}</tool_call>"#]),
            vec![call("current_time", "{}")]
        );
    }

    fn malformed(pieces: &[&str]) -> (ToolCall, String) {
        let items = parse(pieces);
        match items.as_slice() {
            [Parsed::Malformed { call, reason }] => (call.clone(), reason.clone()),
            other => panic!("expected one malformed call, got {other:?}"),
        }
    }

    #[test]
    fn malformed_calls_become_calls_the_loop_answers_with_an_error() {
        let (c, reason) = malformed(&[
            r#"<tool_call>{"name": "reminders_create", "arguments": {"at": 9</tool_call>"#,
        ]);
        assert_eq!(c.name, "reminders_create");
        assert_eq!(c.arguments, r#"{"name": "reminders_create", "arguments": {"at": 9"#);
        assert!(reason.contains("not a JSON object"), "{reason}");
        assert!(serde_json::from_str::<serde_json::Value>(&c.arguments).is_err());

        let (c, reason) = malformed(&["<tool_call>\n[1, 2]\n</tool_call>"]);
        assert_eq!((c.name.as_str(), c.arguments.as_str()), ("", "[1, 2]"));
        assert!(reason.contains("not a JSON object"), "{reason}");

        let (c, reason) = malformed(&[r#"<tool_call>{"name": "a", "arguments": [1]}</tool_call>"#]);
        // The registry is handed the wrong arguments, never the call object itself.
        assert_eq!((c.name.as_str(), c.arguments.as_str()), ("a", "[1]"));
        assert!(reason.contains("must be an object"), "{reason}");

        let (_, reason) = malformed(&[r#"<tool_call>{"name": 3, "arguments": {}}</tool_call>"#]);
        assert!(reason.contains("not a JSON object"), "{reason}");
        let (_, reason) = malformed(&[r#"<tool_call>{"name": "", "arguments": {}}</tool_call>"#]);
        assert!(reason.contains("empty"), "{reason}");
    }

    #[test]
    fn a_close_tag_inside_a_json_string_is_argument_text() {
        let input = "<tool_call>\n{\"name\": \"note\", \"arguments\": {\"text\": \"a </tool_call> \\\" b\"}}\n</tool_call>";
        for split in 0..=input.len() {
            if !input.is_char_boundary(split) {
                continue;
            }
            let items = parse(&[&input[..split], &input[split..]]);
            assert_eq!(
                items,
                [call("note", "{\"text\": \"a </tool_call> \\\" b\"}")],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_unterminated_call_at_the_end_of_the_stream() {
        let (c, reason) = malformed(&["<tool_call>\n{\"name\": \"current_ti"]);
        assert_eq!(c.arguments, "{\"name\": \"current_ti");
        assert!(reason.contains("ended inside a tool call"), "{reason}");
        // The text before it still comes out, first.
        let items = parse(&["Sure.\n<tool_call>\n{\"name\": \"current_ti"]);
        assert_eq!(items[0], text("Sure."));
        assert!(matches!(&items[1..], [Parsed::Malformed { .. }]), "{items:?}");
        // A complete call whose closing tag never came is still a call.
        assert_eq!(
            parse(&["<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n"]),
            vec![call("a", "{}")]
        );
        let mut parser = ToolCallParser::new();
        assert_eq!(parser.push("<tool_call>"), vec![]);
        assert!(matches!(parser.finish().as_slice(), [Parsed::Malformed { .. }]));
        assert_eq!(parser.calls(), 1);
    }

    #[test]
    fn call_ids_look_like_openai_ones_and_differ() {
        let (a, b) = (new_call_id(), new_call_id());
        assert!(a.starts_with("call_") && a.len() == 29 && a != b);
    }
}
