//! Splits a long reply into messages a channel accepts (WhatsApp: 4096 characters, Talk:
//! 32000), cutting on paragraph, then line, then sentence, then word boundaries. Pure text
//! code: no wire format and no I/O.

/// Splits `text` into parts of at most `max_chars` characters (Unicode scalar values, which
/// is how both WhatsApp and PHP's `mb_strlen` count). Parts are trimmed; empty parts are
/// dropped. A single word longer than `max_chars` is cut where it must be.
pub fn split_message(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(1);
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.chars().count() <= max_chars {
            parts.push(rest.to_string());
            break;
        }
        // Byte offset just past the first `max_chars` characters.
        let limit = rest.char_indices().nth(max_chars).map(|(i, _)| i).unwrap_or(rest.len());
        let window = &rest[..limit];
        let cut = best_cut(window);
        let (head, tail) = rest.split_at(cut);
        let head = head.trim_end();
        if !head.is_empty() {
            parts.push(head.to_string());
        }
        rest = tail.trim_start();
    }
    parts
}

/// The characters a part may need for the fence lines `close_code_blocks` adds around it
/// (`"```\n"` before, `"\n```"` after): a text with a code block is cut this much shorter.
const FENCE_ROOM: usize = 8;

/// `channels::parts_after`, for a channel that shows fenced code blocks (WhatsApp): the
/// parts of `text` after byte `from`, at most `max_chars` each once `close_code_blocks` has
/// closed and reopened the blocks a cut falls in (a text with a block is cut `FENCE_ROOM`
/// shorter; any other is cut as `parts_after` cuts it).
pub fn parts_after_keeping_code(
    text: &str,
    from: usize,
    max_chars: usize,
) -> Result<Vec<(String, usize)>, super::ChannelError> {
    let fences = fence_starts(text);
    if fences.is_empty() {
        return super::parts_after(text, from, max_chars);
    }
    let parts = super::parts_after(text, from, max_chars - FENCE_ROOM)?;
    Ok(close_code_blocks(&fences, parts))
}

/// The parts cut from `text` (each with the byte offset in `text` where it ends, as
/// `channels::parts_after` gives them) as they are sent. A cut inside a fenced code block
/// would leave one message with a block that never closes and the next with code outside
/// any block: neither shows as code, and the code's `*` and `_` turn into bold and italics.
/// So a part that ends inside a block gets a closing fence line, and the next one opens it
/// again; a part that is only the block's closing fence joins the part before it (already
/// closed). The ends stay offsets in `text`: what was sent is recorded the same way. The
/// cut must leave `FENCE_ROOM` characters for the fences; `fences` are `fence_starts(text)`.
fn close_code_blocks(fences: &[usize], parts: Vec<(String, usize)>) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::with_capacity(parts.len());
    let mut previous_open = false;
    for (part, end) in parts {
        let start = end - part.len();
        let mut body = part.as_str();
        let mut open_at_start = in_code_block(fences, start);
        if open_at_start {
            let (first, rest) = body.split_once('\n').unwrap_or((body, ""));
            let rest = rest.trim_start();
            if first.trim() == "```" {
                // The block closes on this part's first line (a bare fence: nothing of the
                // text is left out with it); the fence added to the part before closed it
                // already.
                match out.last_mut() {
                    Some(previous) if rest.is_empty() && previous_open => {
                        previous.1 = end;
                        previous_open = false;
                        continue;
                    }
                    // An earlier try sent the part before (a record from before this rule):
                    // the lone fence goes as it is, there is nothing else to send.
                    _ if rest.is_empty() => open_at_start = false,
                    _ => {
                        body = rest;
                        open_at_start = false;
                    }
                }
            }
        }
        let mut open_at_end = in_code_block(fences, end);
        if open_at_end {
            // The block opened on the part's last line, a bare fence (so it was closed
            // before that line): the next part opens it, this one leaves the fence out.
            if let Some((before, last)) = body.rsplit_once('\n') {
                if last.trim() == "```" && !before.trim().is_empty() {
                    body = before.trim_end();
                    open_at_end = false;
                }
            }
        }
        let mut sent = String::with_capacity(body.len() + FENCE_ROOM);
        if open_at_start {
            sent.push_str("```\n");
        }
        sent.push_str(body);
        if open_at_end {
            sent.push_str("\n```");
        }
        previous_open = open_at_end;
        out.push((sent, end));
    }
    out
}

/// The byte offsets in `text` where its fence lines begin (at their first non-blank
/// character): lines that start with three backticks, read as
/// `markup::markdown_to_whatsapp` reads them.
fn fence_starts(text: &str) -> Vec<usize> {
    let mut fences = Vec::new();
    let mut line_start = 0;
    for line in text.split('\n') {
        if is_fence(line) {
            fences.push(line_start + (line.len() - line.trim_start().len()));
        }
        line_start += line.len() + 1;
    }
    fences
}

/// Whether a fenced code block is open at a byte: an odd number of the text's fence lines
/// (`fence_starts`) begin before it.
fn in_code_block(fences: &[usize], at: usize) -> bool {
    fences.partition_point(|&fence| fence < at) % 2 == 1
}

fn is_fence(line: &str) -> bool {
    line.trim_start().starts_with("```")
}

/// The byte offset in `window` where a part should end. Prefers the latest paragraph break,
/// then line break, then sentence end, then space, as long as it keeps the part at least a
/// quarter full (so that a break near the start does not produce a tiny message).
fn best_cut(window: &str) -> usize {
    let floor = window.len() / 4;
    let candidates = [
        window.rfind("\n\n").map(|i| i + 2),
        window.rfind('\n').map(|i| i + 1),
        last_sentence_end(window),
        // Whitespace may be wider than one byte (no-break space, ideographic space).
        window.char_indices().rev().find(|(_, c)| c.is_whitespace()).map(|(i, c)| i + c.len_utf8()),
    ];
    candidates.into_iter().flatten().find(|cut| *cut > floor).unwrap_or(window.len())
}

/// Just after the last `.`, `!`, `?`, `…` (or CJK full stop) that is followed by whitespace.
fn last_sentence_end(window: &str) -> Option<usize> {
    let mut best = None;
    let mut chars = window.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let is_end = matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？');
        if !is_end {
            continue;
        }
        let after = i + c.len_utf8();
        match chars.peek() {
            Some((_, next)) if next.is_whitespace() => best = Some(after),
            None if matches!(c, '。' | '！' | '？') => best = Some(after),
            _ => {}
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, max: usize, expected: &[&str]) {
        let got = split_message(input, max);
        assert_eq!(got, expected, "input {input:?} max {max}");
        for part in &got {
            assert!(part.chars().count() <= max, "part too long: {part:?}");
        }
    }

    #[test]
    fn short_text_is_one_part() {
        check("hello", 10, &["hello"]);
        check("  hello \n", 10, &["hello"]);
        check("", 10, &[]);
    }

    #[test]
    fn prefers_paragraphs_then_lines_then_sentences_then_words() {
        check("aaaa bbbb.\n\ncccc dddd", 15, &["aaaa bbbb.", "cccc dddd"]);
        check("aaaa bbbb\ncccc dddd", 15, &["aaaa bbbb", "cccc dddd"]);
        check("One two. Three four five.", 16, &["One two.", "Three four five."]);
        check("alpha beta gamma delta", 12, &["alpha beta", "gamma delta"]);
        check("abcdefghij", 4, &["abcd", "efgh", "ij"]);
    }

    #[test]
    fn a_break_too_early_is_not_used() {
        // The paragraph break is in the first quarter: cutting there would send "a".
        check("a\n\nbbbbbbbbbbbb cccccccccc", 20, &["a\n\nbbbbbbbbbbbb", "cccccccccc"]);
    }

    #[test]
    fn counts_characters_not_bytes() {
        let text = "é".repeat(10);
        check(&text, 5, &["ééééé", "ééééé"]);
        let emoji = "👋 ".repeat(6);
        let parts = split_message(&emoji, 4);
        assert!(parts.iter().all(|p| p.chars().count() <= 4));
        assert_eq!(parts.concat().replace(' ', ""), "👋".repeat(6));
    }

    #[test]
    fn never_panics_and_never_loses_text() {
        let pieces = ["é", "👋", " ", "\u{a0}", "\u{3000}", "\n", "\n\n", ". ", "。", "ab", "?"];
        let mut seed = 7u64;
        for _ in 0..300 {
            let mut text = String::new();
            for _ in 0..60 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            for max in [1, 2, 3, 5, 8, 13] {
                let parts = split_message(&text, max);
                assert!(parts.iter().all(|p| p.chars().count() <= max && !p.is_empty()));
                let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
                assert_eq!(squash(&parts.concat()), squash(&text), "{text:?} max {max}");
            }
        }
    }

    #[test]
    fn wide_whitespace_is_a_safe_cut() {
        check("ab\u{3000}cd\u{a0}ef", 4, &["ab", "cd", "ef"]);
        check("東京は\u{3000}日本の首都です。大阪", 8, &["東京は", "日本の首都です。", "大阪"]);
    }

    /// What is sent of `text` cut at `max` characters (fences included).
    fn sent(text: &str, max: usize) -> Vec<(String, usize)> {
        parts_after_keeping_code(text, 0, max).unwrap()
    }

    /// `close_code_blocks` on parts already cut.
    fn closed(text: &str, parts: Vec<(String, usize)>) -> Vec<(String, usize)> {
        close_code_blocks(&fence_starts(text), parts)
    }

    /// A code block longer than a message: every message that holds some of it shows it as
    /// a block (its fences pair up), no message is over the limit, and nothing of the text
    /// is lost or repeated. Before, the first message ended in an open block and the next
    /// held the rest of the code as prose (`a_b * c_d` in italics and bold on WhatsApp).
    #[test]
    fn a_code_block_cut_in_two_stays_a_code_block_in_each_part() {
        let code: String = (0..40).map(|i| format!("let v{i} = a_b * c_d;\n")).collect();
        let text = format!("Here is the code:\n\n```rust\n{code}```\nThat is all.");
        let parts = sent(&text, 200);
        assert!(parts.len() >= 4, "{parts:?}");
        for (i, (part, _)) in parts.iter().enumerate() {
            assert!(part.chars().count() <= 200, "part {i} too long: {part:?}");
            let fences = part.split('\n').filter(|line| is_fence(line)).count();
            assert_eq!(fences % 2, 0, "part {i} leaves a block open: {part:?}");
        }
        assert!(parts[1].0.starts_with("```\nlet v"), "{:?}", parts[1].0);
        assert!(parts[0].0.ends_with("\n```"), "{:?}", parts[0].0);
        // The ends are the plain cut's: what is recorded as sent points into `text`.
        let plain = crate::channels::parts_after(&text, 0, 200 - FENCE_ROOM).unwrap();
        let ends: Vec<usize> = parts.iter().map(|p| p.1).collect();
        assert_eq!(ends, plain.iter().map(|p| p.1).collect::<Vec<_>>());
        // Without the fences added, the parts are the text.
        let words = |s: &str| {
            s.split_whitespace().filter(|w| !w.starts_with("```")).collect::<Vec<_>>().join(" ")
        };
        let joined: Vec<String> = parts.iter().map(|(p, _)| words(p)).collect();
        assert_eq!(joined.join(" "), words(&text));
        // Text without a code block is cut as before, at the full limit.
        let prose = "A sentence that goes on. ".repeat(30);
        let plain = crate::channels::parts_after(&prose, 0, 200).unwrap();
        assert_eq!(sent(&prose, 200), plain);
    }

    /// A cut just before a block's closing fence: the fence is not a message of its own (the
    /// part before is closed already); a cut just after an opening fence leaves the fence to
    /// the next part.
    #[test]
    fn a_lone_fence_is_never_a_message_of_its_own() {
        let text = "```\naaaaaaa\n```";
        assert_eq!(
            crate::channels::parts_after(text, 0, 12).unwrap(),
            [("```\naaaaaaa".to_string(), 11), ("```".to_string(), 15)]
        );
        assert_eq!(sent(text, 20), [("```\naaaaaaa\n```".to_string(), 15)]);
        // Going on after a part an earlier try sent (the fence alone is what is left).
        let rest = parts_after_keeping_code(text, 11, 20).unwrap();
        assert_eq!(rest, [("```".to_string(), 15)]);

        let text = "Intro\n```\nxxxxxxxx\n```";
        let parts = vec![("Intro\n```".to_string(), 9), ("xxxxxxxx\n```".to_string(), 22)];
        assert_eq!(
            closed(text, parts),
            [("Intro".to_string(), 9), ("```\nxxxxxxxx\n```".to_string(), 22)]
        );
    }

    #[test]
    fn code_blocks_never_break_the_limit_or_lose_text() {
        let pieces = ["```", "```py", "\n", "\n\n", "x", "ab", " ", ". ", "é", "*_"];
        // What is sent is the text, cut, plus fences (only bare fence lines are ever left
        // out): without backticks and whitespace, the same characters in the same order.
        let squash =
            |s: &str| -> String { s.chars().filter(|c| *c != '`' && !c.is_whitespace()).collect() };
        let mut seed = 5u64;
        for _ in 0..400 {
            let mut text = String::new();
            for _ in 0..50 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            for max in [12, 13, 17, 30] {
                let parts = sent(&text, max);
                let mut last_end = 0;
                for (part, end) in &parts {
                    assert!(!part.is_empty() && part.chars().count() <= max, "{text:?} {max}");
                    assert!(*end > last_end || last_end == 0, "{text:?} {max}");
                    last_end = *end;
                }
                let joined: String = parts.iter().map(|(p, _)| squash(p)).collect();
                assert_eq!(joined, squash(&text), "{text:?} {max}");
            }
        }
    }

    #[test]
    fn whatsapp_sized_split_keeps_every_word() {
        let paragraph = "This is a sentence that goes on. ".repeat(40);
        let text = format!("{paragraph}\n\n{paragraph}\n\n{paragraph}\n\n{paragraph}");
        let parts = split_message(&text, 4096);
        assert!(parts.len() >= 2);
        assert!(parts.iter().all(|p| p.chars().count() <= 4096));
        let rejoined: Vec<&str> = parts.iter().flat_map(|p| p.split_whitespace()).collect();
        let original: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(rejoined, original);
    }
}
