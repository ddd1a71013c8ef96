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
