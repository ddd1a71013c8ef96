//! Full-text search over every stored message (the FTS5 index of migration 0003, kept in
//! step with `messages` by triggers). User words become a literal FTS5 query, so no input is
//! ever parsed as FTS syntax. Read-only: it never changes a message.

use sqlx::SqlitePool;

/// Longest query accepted, in characters: a search box, not a document.
pub const MAX_QUERY_CHARS: usize = 200;

/// Marks around each match in a snippet. Control characters that a message almost never
/// holds; were one there, the worst outcome is a misplaced highlight, never markup.
const MARK_START: char = '\u{2}';
const MARK_END: char = '\u{3}';

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search for at least one word")]
    NoWords,
    #[error("the search is longer than {MAX_QUERY_CHARS} characters")]
    TooLong,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// One matching message, with its conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub message_id: i64,
    pub conversation_id: i64,
    pub conversation_title: Option<String>,
    pub channel: String,
    pub role: String,
    pub created_at: i64,
    /// The text around the matches; `mark` parts are the matched words.
    pub snippet: Vec<SnippetPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnippetPart {
    pub text: String,
    pub mark: bool,
}

/// Messages matching every word of `input`, newest first. The last word also matches as a
/// prefix, so results come while the user is still typing it.
///
/// Words the index cannot find (`needs_substring`: Chinese, Japanese, Thai…, `C++`) are
/// looked for as substrings of the text, ASCII letters in any case. Such a search reads
/// every message the indexed words leave (all of them when there are none): a scan of
/// the text, fast at a person's scale of messages.
pub async fn search_messages(
    pool: &SqlitePool,
    input: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, SearchError> {
    if input.chars().count() > MAX_QUERY_CHARS {
        return Err(SearchError::TooLong);
    }
    let fts = fts_query(input);
    let literal = substring_words(input);
    if fts.is_none() && literal.is_empty() {
        return Err(SearchError::NoWords);
    }
    let columns = "SELECT m.id AS message_id, m.conversation_id, \
                   c.title AS conversation_title, c.channel, m.role, m.created_at";
    let order = "ORDER BY m.created_at DESC, m.id DESC LIMIT ?";
    let sql = if literal.is_empty() {
        format!(
            "{columns}, snippet(messages_fts, 0, char(2), char(3), '…', 16) AS snippet \
             FROM messages_fts \
             JOIN messages m ON m.id = messages_fts.rowid \
             JOIN conversations c ON c.id = m.conversation_id \
             WHERE messages_fts MATCH ? {order}"
        )
    } else {
        let indexed = if fts.is_some() {
            "AND m.id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
        } else {
            ""
        };
        let substrings = " AND instr(lower(m.content), ?) > 0".repeat(literal.len());
        format!(
            "{columns}, m.content AS snippet \
             FROM messages m \
             JOIN conversations c ON c.id = m.conversation_id \
             WHERE 1 {indexed}{substrings} {order}"
        )
    };
    let mut query = sqlx::query_as::<_, HitRow>(&sql);
    if let Some(fts) = &fts {
        query = query.bind(fts);
    }
    for word in &literal {
        query = query.bind(word);
    }
    let rows = query.bind(limit).fetch_all(pool).await?;
    Ok(rows
        .into_iter()
        .map(|row| SearchHit {
            snippet: if literal.is_empty() {
                snippet_parts(&row.snippet)
            } else {
                substring_snippet(&row.snippet, &literal)
            },
            message_id: row.message_id,
            conversation_id: row.conversation_id,
            conversation_title: row.conversation_title,
            channel: row.channel,
            role: row.role,
            created_at: row.created_at,
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct HitRow {
    message_id: i64,
    conversation_id: i64,
    conversation_title: Option<String>,
    channel: String,
    role: String,
    created_at: i64,
    /// FTS5's snippet, or the whole text when words are looked for as substrings.
    snippet: String,
}

/// The FTS5 query for the words of `input` the index can find: each word a quoted string
/// (quotes doubled inside), all required, the last one a prefix. Words with no letter or
/// digit are dropped (they would tokenize to nothing), and so are those looked for as
/// substrings; `None` when no word is left.
pub fn fts_query(input: &str) -> Option<String> {
    let words: Vec<&str> = input
        .split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric) && !needs_substring(w))
        .collect();
    let last = words.len().checked_sub(1)?;
    let terms: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(i, word)| {
            let quoted = format!("\"{}\"", word.replace('"', "\"\""));
            if i == last {
                quoted + "*"
            } else {
                quoted
            }
        })
        .collect();
    Some(terms.join(" "))
}

/// The words of `input` looked for as substrings, without the punctuation around them and
/// with ASCII letters in lower case (as SQLite's `lower` does).
fn substring_words(input: &str) -> Vec<String> {
    input
        .split_whitespace()
        .filter(|w| needs_substring(w))
        .map(|w| {
            let kept = w.trim_matches(|c: char| !c.is_alphanumeric() && c != '+' && c != '#');
            kept.to_ascii_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Whether the index cannot find `word`. Its tokenizer (unicode61) splits text at spaces
/// and symbols: a run of a script written without spaces is one token (a whole Chinese
/// sentence), so a word inside it is never found; and the symbols of `C++`, `C#` or `g++`
/// are dropped, so `C++` would find every word that starts with c.
fn needs_substring(word: &str) -> bool {
    let unspaced = word.chars().any(|c| {
        matches!(c as u32,
            0x0E00..=0x0EFF          // Thai, Lao
            | 0x1000..=0x109F        // Myanmar
            | 0x1780..=0x17FF        // Khmer
            | 0x3040..=0x30FF        // Hiragana, Katakana
            | 0x31F0..=0x31FF        // Katakana extensions
            | 0x3400..=0x4DBF        // CJK extension A
            | 0x4E00..=0x9FFF        // CJK unified ideographs
            | 0xAC00..=0xD7AF        // Hangul syllables (particles join the word)
            | 0xF900..=0xFAFF        // CJK compatibility ideographs
            | 0xFF66..=0xFF9F        // half-width Katakana
            | 0x20000..=0x3FFFF) // CJK extensions B and later
    });
    let symbol_name = word
        .chars()
        .zip(word.chars().skip(1))
        .any(|(before, c)| before.is_alphanumeric() && (c == '+' || c == '#'));
    unspaced || symbol_name
}

/// Characters a substring snippet keeps before its first match, and in all: about what
/// FTS5's 16-token snippets hold.
const SNIPPET_BEFORE: usize = 30;
const SNIPPET_CHARS: usize = 120;

/// The text around the first match of any of `words` (lowercased as `substring_words`
/// does), every match inside marked, `…` where the text goes on.
fn substring_snippet(content: &str, words: &[String]) -> Vec<SnippetPart> {
    // ASCII lowering keeps every byte offset, so matches in `lowered` are in `content`.
    let lowered = content.to_ascii_lowercase();
    let mut matches: Vec<(usize, usize)> = words
        .iter()
        .flat_map(|w| lowered.match_indices(w.as_str()).map(|(at, m)| (at, at + m.len())))
        .collect();
    matches.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in matches {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let first = merged.first().map_or(0, |m| m.0);
    let from = content[..first].char_indices().rev().nth(SNIPPET_BEFORE - 1).map_or(0, |(i, _)| i);
    let to =
        content[from..].char_indices().nth(SNIPPET_CHARS).map_or(content.len(), |(i, _)| from + i);
    let to = to.max(merged.first().map_or(0, |m| m.1));
    let mut parts = Vec::new();
    let mut push = |text: &str, mark: bool| {
        if !text.is_empty() {
            parts.push(SnippetPart { text: text.to_string(), mark });
        }
    };
    let mut at = from;
    let mut lead = if from > 0 { "…".to_string() } else { String::new() };
    for (start, end) in merged.into_iter().filter(|m| m.1 > from && m.0 < to) {
        let (start, end) = (start.max(from), end.min(to));
        lead.push_str(&content[at..start]);
        push(&lead, false);
        lead.clear();
        push(&content[start..end], true);
        at = end;
    }
    lead.push_str(&content[at..to]);
    if to < content.len() {
        lead.push('…');
    }
    push(&lead, false);
    parts
}

/// Splits a snippet with our marks into plain and marked parts.
fn snippet_parts(snippet: &str) -> Vec<SnippetPart> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut mark = false;
    for ch in snippet.chars() {
        let switch_to = match ch {
            MARK_START => Some(true),
            MARK_END => Some(false),
            _ => None,
        };
        match switch_to {
            Some(next) => {
                if !current.is_empty() {
                    parts.push(SnippetPart { text: std::mem::take(&mut current), mark });
                }
                mark = next;
            }
            None => current.push(ch),
        }
    }
    if !current.is_empty() {
        parts.push(SnippetPart { text: current, mark });
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<&str>) {
        assert_eq!(fts_query(input).as_deref(), expected, "{input:?}");
    }

    #[test]
    fn user_words_become_literal_terms() {
        check("café", Some("\"café\"*"));
        check("  tomato   soup ", Some("\"tomato\" \"soup\"*"));
        check("NOT OR AND", Some("\"NOT\" \"OR\" \"AND\"*"));
        check("say \"hi\"", Some("\"say\" \"\"\"hi\"\"\"*"));
        check("a* (b) -c ^d", Some("\"a*\" \"(b)\" \"-c\" \"^d\"*"));
        check("*** ---", None);
        check("", None);
    }

    #[test]
    fn words_the_index_cannot_find_are_left_to_the_substring_search() {
        check("write C++", Some("\"write\"*"));
        check("天气 weather", Some("\"weather\"*"));
        check("天气", None);
        check("#work c", Some("\"#work\" \"c\"*"));
        let words = |input: &str| substring_words(input);
        assert_eq!(words("I like C++, C# and g++; an A+"), ["c++", "c#", "g++", "a+"]);
        assert_eq!(words("今天 天气，好吗？ hello"), ["今天", "天气，好吗"].map(String::from));
        assert_eq!(
            words("ภาษาไทย カタカナ 날씨가 ok"),
            ["ภาษาไทย", "カタカナ", "날씨가"].map(String::from)
        );
        assert!(words("café #tag +1 (b) a-b").is_empty());
    }

    fn marked(parts: &[SnippetPart]) -> String {
        parts
            .iter()
            .map(|p| if p.mark { format!("[{}]", p.text) } else { p.text.clone() })
            .collect()
    }

    #[test]
    fn substring_snippets_mark_every_match_around_the_first() {
        let words = ["天气".to_string(), "c++".to_string()];
        let parts = substring_snippet("今天天气很好, and C++ too; 天气!", &words);
        assert_eq!(marked(&parts), "今天[天气]很好, and [C++] too; [天气]!");
        // A long text is cut around the first match, with … where it goes on.
        let text = format!("{}天气{}", "前".repeat(100), "后".repeat(300));
        let snippet = marked(&substring_snippet(&text, &words));
        assert_eq!(snippet, format!("…{}[天气]{}…", "前".repeat(30), "后".repeat(88)));
        // Matches of two words that overlap make one mark.
        let parts = substring_snippet("天气很好", &["天气".to_string(), "气很".to_string()]);
        assert_eq!(marked(&parts), "[天气很]好");
    }

    #[tokio::test]
    async fn chinese_words_and_cpp_are_found_inside_text() {
        use crate::db::memory::{self, NewMessage};
        use crate::domain::Role;
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let mut ids = Vec::new();
        for text in [
            "今天天气很好，我们去公园吧。",
            "I write C++ every day.",
            "A c program, not the other one.",
            "明天的天气 will be cold, says the weather report.",
        ] {
            let message = NewMessage::plain(conv, Role::User, text);
            ids.push(memory::add_message(&pool, &message).await.unwrap().0);
        }
        let found = |query: &'static str| {
            let pool = pool.clone();
            async move {
                let hits = search_messages(&pool, query, 10).await.unwrap();
                hits.into_iter().map(|h| (h.message_id, marked(&h.snippet))).collect::<Vec<_>>()
            }
        };
        assert_eq!(
            found("天气").await,
            [
                (ids[3], "明天的[天气] will be cold, says the weather report.".to_string()),
                (ids[0], "今天[天气]很好，我们去公园吧。".to_string()),
            ]
        );
        assert_eq!(found("公园").await, [(ids[0], "今天天气很好，我们去[公园]吧。".to_string())]);
        assert_eq!(found("c++").await, [(ids[1], "I write [C++] every day.".to_string())]);
        // Indexed words and substrings together: every word must match.
        assert_eq!(found("天气 report").await.len(), 1);
        assert_eq!(found("天气 wea").await.len(), 1, "the last indexed word is a prefix");
        assert!(found("天气 program").await.is_empty());
        assert!(found("雪").await.is_empty());
    }

    #[test]
    fn snippets_split_into_marked_parts() {
        let parts = snippet_parts("a \u{2}café\u{3} au \u{2}lait\u{3}");
        let got: Vec<(&str, bool)> = parts.iter().map(|p| (p.text.as_str(), p.mark)).collect();
        assert_eq!(got, [("a ", false), ("café", true), (" au ", false), ("lait", true)]);
    }

    #[tokio::test]
    async fn hostile_queries_are_searched_literally() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        for query in ["\"", "NEAR(", "a OR", "col:x", "*", "\"unterminated", "x AND (y"] {
            let result = search_messages(&pool, query, 10).await;
            assert!(matches!(result, Ok(_) | Err(SearchError::NoWords)), "{query:?}: {result:?}");
        }
    }
}
