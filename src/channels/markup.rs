//! Markdown (what the models write) to WhatsApp markup (`*bold*`, `_italic_`, `~strike~`,
//! `` `code` `` and ```` ``` ```` blocks). Pure text code; code spans and fenced blocks are
//! copied unchanged because their content is not prose.

/// Converts the Markdown the models produce into WhatsApp's own markup.
///
/// - `**bold**` and `__bold__` become `*bold*`; `*italic*` becomes `_italic_`;
/// - `~~strike~~` becomes `~strike~`;
/// - `# Heading` lines become `*Heading*`;
/// - `* item` / `+ item` bullets become `- item` (a leading `*` would read as bold);
/// - `[text](url)` becomes `text (url)`;
/// - inline code and fenced code blocks are left as they are.
pub fn markdown_to_whatsapp(markdown: &str) -> String {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in markdown.split('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            in_fence = !in_fence;
            out.push(line.to_string());
            continue;
        }
        if in_fence {
            out.push(line.to_string());
            continue;
        }
        out.push(convert_line(line));
    }
    out.join("\n")
}

fn convert_line(line: &str) -> String {
    let indent_len = line.len() - line.trim_start().len();
    let (indent, body) = line.split_at(indent_len);
    // Headings: `#`..`######` followed by a space.
    let hashes = body.chars().take_while(|c| *c == '#').count();
    if (1..=6).contains(&hashes) && body[hashes..].starts_with(' ') {
        let title = body[hashes..].trim().trim_end_matches('#').trim_end();
        let inner = convert_inline(title);
        // Already bold (`# **Title**`) stays single-starred.
        if inner.starts_with('*') && inner.ends_with('*') && inner.len() > 1 {
            return format!("{indent}{inner}");
        }
        return format!("{indent}*{inner}*");
    }
    for bullet in ["* ", "+ "] {
        if let Some(item) = body.strip_prefix(bullet) {
            return format!("{indent}- {}", convert_inline(item));
        }
    }
    format!("{indent}{}", convert_inline(body))
}

fn convert_inline(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match span_at(&chars, i) {
            Some((converted, next)) => {
                out.push_str(&converted);
                i = next;
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

/// The converted span starting at `i` (code, link, emphasis) and the index after it, or
/// `None` when the character there starts nothing special.
fn span_at(chars: &[char], i: usize) -> Option<(String, usize)> {
    let c = chars[i];
    // Inline code: copied verbatim up to the closing backtick.
    if c == '`' {
        let end = find(chars, i + 1, &['`'])?;
        return Some((chars[i..=end].iter().collect(), end + 1));
    }
    // Links: [text](url).
    if c == '[' {
        let (label, url, next) = link_at(chars, i)?;
        let label = convert_inline(&label);
        let text = if label == url || label.is_empty() { url } else { format!("{label} ({url})") };
        return Some((text, next));
    }
    // Double markers: **bold**, __bold__, ~~strike~~.
    for (marker, replacement) in [(['*', '*'], '*'), (['_', '_'], '*'), (['~', '~'], '~')] {
        if chars[i..].starts_with(&marker) {
            if !opens(chars, i + 2) {
                return None;
            }
            let end = find(chars, i + 2, &marker)?;
            if end == i + 2 || chars[end - 1].is_whitespace() {
                return None;
            }
            let inner: String = chars[i + 2..end].iter().collect();
            return Some((
                format!("{replacement}{}{replacement}", convert_inline(&inner)),
                end + 2,
            ));
        }
    }
    // Single `*italic*` (but not a lone star such as `2 * 3`).
    if c == '*' && opens(chars, i + 1) {
        let end = find(chars, i + 1, &['*'])?;
        if chars[end - 1].is_whitespace() {
            return None;
        }
        let inner: String = chars[i + 1..end].iter().collect();
        return Some((format!("_{}_", convert_inline(&inner)), end + 1));
    }
    None
}

/// Whether a marker ending just before `at` can open a span (followed by a non-space).
fn opens(chars: &[char], at: usize) -> bool {
    chars.get(at).is_some_and(|c| !c.is_whitespace())
}

/// Index of the next occurrence of `pattern` at or after `from`.
fn find(chars: &[char], from: usize, pattern: &[char]) -> Option<usize> {
    if pattern.is_empty() || from >= chars.len() {
        return None;
    }
    (from..=chars.len().saturating_sub(pattern.len())).find(|&j| chars[j..].starts_with(pattern))
}

/// A `[label](url)` starting at `start`: (label, url, index after the closing paren).
fn link_at(chars: &[char], start: usize) -> Option<(String, String, usize)> {
    let close = find(chars, start + 1, &[']'])?;
    if chars.get(close + 1) != Some(&'(') {
        return None;
    }
    let end = find(chars, close + 2, &[')'])?;
    let label: String = chars[start + 1..close].iter().collect();
    let url: String = chars[close + 2..end].iter().collect();
    if url.is_empty() || url.contains(char::is_whitespace) {
        return None;
    }
    Some((label, url, end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(markdown_to_whatsapp(input), expected, "input {input:?}");
    }

    #[test]
    fn emphasis() {
        check("**bold**", "*bold*");
        check("__bold__", "*bold*");
        check("*italic*", "_italic_");
        check("_italic_", "_italic_");
        check("~~gone~~", "~gone~");
        check("a **b** c *d* e", "a *b* c _d_ e");
        check("**bold with *italic* inside**", "*bold with _italic_ inside*");
        check("2 * 3 * 4 = 24", "2 * 3 * 4 = 24");
        check("**unclosed", "**unclosed");
        check("snake_case_name stays", "snake_case_name stays");
    }

    #[test]
    fn headings_bullets_and_links() {
        check("# Title", "*Title*");
        check("### **Already bold**", "*Already bold*");
        check("#hashtag", "#hashtag");
        check("* one\n* two", "- one\n- two");
        check("  + nested **x**", "  - nested *x*");
        check("- kept", "- kept");
        check("1. first", "1. first");
        check("see [the docs](https://example.org/a_b)", "see the docs (https://example.org/a_b)");
        check("[https://x.org](https://x.org)", "https://x.org");
        check("[not a link] (x)", "[not a link] (x)");
    }

    #[test]
    fn code_is_left_alone() {
        check("use `**kwargs` here", "use `**kwargs` here");
        check(
            "```\nlet x = **y**;\n# not a title\n```\n**after**",
            "```\nlet x = **y**;\n# not a title\n```\n*after*",
        );
    }

    #[test]
    fn odd_input_never_panics() {
        let pieces =
            ["*", "**", "_", "__", "~~", "`", "[", "]", "(", ")", "#", " ", "\n", "é", "👋", "x"];
        let mut seed = 11u64;
        for _ in 0..2000 {
            let mut text = String::new();
            for _ in 0..24 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let _ = markdown_to_whatsapp(&text);
        }
    }

    #[test]
    fn non_ascii_survives() {
        check("**Été** à *Montréal* 👋", "*Été* à _Montréal_ 👋");
    }
}
