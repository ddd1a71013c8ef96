//! Full-text search over every stored message (the FTS5 index of migration 0003, kept in
//! step with `messages` by triggers). User words become a literal FTS5 query, so no input is
//! ever parsed as FTS syntax. Read-only: it never changes a message.

use sqlx::SqlitePool;
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// Longest query accepted, in characters: a search box, not a document.
pub const MAX_QUERY_CHARS: usize = 200;

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
    // Snippets are made here from the rows returned, not by FTS5's `snippet()`, which was
    // computed for every match before the sort and costs the square of a message's
    // matches (5 s for 30 messages holding one word 5,000 times; now under 1 ms).
    let indexed = if fts.is_some() {
        " AND m.id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
    } else {
        ""
    };
    let substrings = " AND instr(lower(m.content), ?) > 0".repeat(literal.len());
    let sql = format!(
        "SELECT m.id AS message_id, m.conversation_id, c.title AS conversation_title, \
                c.channel, m.role, m.created_at, m.content \
         FROM messages m \
         JOIN conversations c ON c.id = m.conversation_id \
         WHERE 1{indexed}{substrings} \
         ORDER BY m.created_at DESC, m.id DESC LIMIT ? OFFSET ?"
    );
    // `instr` also finds a substring word inside a longer one (`a+` in `DATA+`): those rows
    // are dropped here (`substring_matches`), so the rows are read a page at a time until
    // `limit` are kept or none are left.
    let page = if literal.is_empty() { limit } else { limit.saturating_mul(4).max(64) };
    let mut rows = Vec::new();
    let mut offset = 0i64;
    loop {
        let mut query = sqlx::query_as::<_, HitRow>(&sql);
        if let Some(fts) = &fts {
            query = query.bind(fts);
        }
        for word in &literal {
            query = query.bind(word);
        }
        let batch = query.bind(page).bind(offset).fetch_all(pool).await?;
        let read = batch.len() as i64;
        rows.extend(batch.into_iter().filter(|row| {
            literal.is_empty() || {
                let lowered = row.content.to_ascii_lowercase();
                literal.iter().all(|word| substring_matches(&lowered, word).next().is_some())
            }
        }));
        if rows.len() as i64 >= limit || read < page {
            break;
        }
        offset += read;
    }
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let terms = Terms::of(input, literal);
    Ok(rows
        .into_iter()
        .map(|row| SearchHit {
            snippet: snippet(&row.content, &terms),
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
    content: String,
}

/// The FTS5 query for the words of `input` the index can find: each word a quoted string
/// (quotes doubled inside), all required, the last one a prefix. Words with no letter or
/// digit are dropped (they would tokenize to nothing), and so are those looked for as
/// substrings; `None` when no word is left.
pub fn fts_query(input: &str) -> Option<String> {
    let words = indexed_words(input);
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

/// The words of `input` the index can find: with a letter or a digit (others tokenize to
/// nothing), and not looked for as substrings.
fn indexed_words(input: &str) -> Vec<String> {
    query_words(input)
        .filter(|w| w.chars().any(char::is_alphanumeric) && !needs_substring(w))
        .collect()
}

/// The words of `input` looked for as substrings, without the punctuation around them and
/// with ASCII letters in lower case (as SQLite's `lower` does).
fn substring_words(input: &str) -> Vec<String> {
    query_words(input)
        .filter(|w| needs_substring(w))
        .map(|w| {
            let kept = w.trim_matches(|c: char| !c.is_alphanumeric() && c != '+' && c != '#');
            kept.to_ascii_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// The words of what the user typed. Control characters separate words: FTS5 reads a NUL
/// as the end of the query (a 500 for `a%00b`), and no message is searched for them.
fn query_words(input: &str) -> impl Iterator<Item = String> + '_ {
    input
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
}

/// Whether the index cannot find `word`. Its tokenizer (unicode61) splits text at spaces
/// and symbols: a run of a script written without spaces is one token (a whole Chinese
/// sentence), so a word inside it is never found; and the symbols of `C++`, `C#` or `g++`
/// are dropped, so `C++` would find every word that starts with c.
fn needs_substring(word: &str) -> bool {
    let symbol_name = word
        .chars()
        .zip(word.chars().skip(1))
        .any(|(before, c)| before.is_alphanumeric() && (c == '+' || c == '#'));
    word.chars().any(unspaced_script) || symbol_name
}

/// Whether `c` belongs to a script written without spaces between words.
fn unspaced_script(c: char) -> bool {
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
}

/// Where `word` (lower case, from `substring_words`) occurs in `lowered` (the text with
/// ASCII letters in lower case) as a word of its own: an edge that is a letter or digit of
/// a script written with spaces must not continue a longer word of such a script there
/// (`a+` is not found in `data+`, nor `c++` in `abc++`, but `iphone价格` is in
/// `买iphone价格`); an edge in a script without spaces (`天气` inside `今天天气很好`) or a
/// symbol (`c++11`) may.
fn substring_matches<'a>(lowered: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    let spaced = |c: char| c.is_alphanumeric() && !unspaced_script(c);
    let first = word.chars().next().filter(|&c| spaced(c));
    let last = word.chars().next_back().filter(|&c| spaced(c));
    lowered.match_indices(word).map(|(at, _)| at).filter(move |&at| {
        let before = lowered[..at].chars().next_back();
        let after = lowered[at + word.len()..].chars().next();
        let joins =
            |edge: Option<char>, next: Option<char>| edge.is_some() && next.is_some_and(spaced);
        !joins(first, before) && !joins(last, after)
    })
}

/// Characters a snippet keeps before its first match, and in all: about what FTS5's
/// 16-token snippets held.
const SNIPPET_BEFORE: usize = 30;
const SNIPPET_CHARS: usize = 120;

/// What a snippet marks: the indexed words as the index compares them (`folded`), the
/// last one's last token a prefix, and the words looked for as substrings.
struct Terms {
    tokens: Vec<String>,
    prefix: Option<String>,
    substrings: Vec<String>,
}

impl Terms {
    fn of(input: &str, substrings: Vec<String>) -> Terms {
        let words = indexed_words(input);
        let mut tokens = Vec::new();
        let mut prefix = None;
        for (i, word) in words.iter().enumerate() {
            let mut word_tokens: Vec<String> = tokens_of(word).map(|(_, t)| folded(t)).collect();
            if i + 1 == words.len() {
                prefix = word_tokens.pop();
            }
            tokens.extend(word_tokens);
        }
        Terms { tokens, prefix, substrings }
    }

    fn matches(&self, token: &str) -> bool {
        let token = folded(token);
        self.tokens.contains(&token) || self.prefix.as_ref().is_some_and(|p| token.starts_with(p))
    }
}

/// The words of `text` as the index splits it (unicode61: runs of letters, digits and the
/// marks on them), with their byte offsets.
fn tokens_of(text: &str) -> impl Iterator<Item = (usize, &str)> + '_ {
    let is_token = |c: char| c.is_alphanumeric() || is_combining_mark(c);
    let mut rest = text.char_indices().peekable();
    std::iter::from_fn(move || {
        let (start, _) = rest.find(|&(_, c)| is_token(c))?;
        let mut end = text.len();
        while let Some(&(at, c)) = rest.peek() {
            if !is_token(c) {
                end = at;
                break;
            }
            rest.next();
        }
        Some((start, &text[start..end]))
    })
}

/// A word as the index compares it (`remove_diacritics 2`): without its diacritics, in
/// lower case, so that `cafe` marks `Café`.
fn folded(word: &str) -> String {
    word.nfd().filter(|&c| !is_combining_mark(c)).flat_map(char::to_lowercase).collect()
}

/// The text around the first match, every match inside marked, `…` where the text goes on.
/// Linear in the text: FTS5's own snippet took seconds on a message that repeats a word
/// thousands of times, and counted a 16,000-letter run as one token.
fn snippet(content: &str, terms: &Terms) -> Vec<SnippetPart> {
    let mut matches: Vec<(usize, usize)> = Vec::new();
    if !terms.tokens.is_empty() || terms.prefix.is_some() {
        let hits = tokens_of(content).filter(|(_, token)| terms.matches(token));
        matches.extend(hits.map(|(at, token)| (at, at + token.len())));
    }
    if !terms.substrings.is_empty() {
        // ASCII lowering keeps every byte offset, so matches in `lowered` are in `content`.
        let lowered = content.to_ascii_lowercase();
        for word in &terms.substrings {
            matches.extend(substring_matches(&lowered, word).map(|at| (at, at + word.len())));
        }
    }
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

    /// The snippet of `content` for the query `input`.
    fn snippet_for(content: &str, input: &str) -> String {
        marked(&snippet(content, &Terms::of(input, substring_words(input))))
    }

    #[test]
    fn snippets_mark_every_match_around_the_first() {
        let said = "今天天气很好, and C++ too; 天气!";
        assert_eq!(snippet_for(said, "天气 c++"), "今天[天气]很好, and [C++] too; [天气]!");
        // Indexed words too, as the index compares them: folded, the last one a prefix.
        let french = "Un CAFÉ au lait, des cafés, une cafetière; caf.";
        let all = "Un [CAFÉ] au lait, des [cafés], une [cafetière]; caf.";
        assert_eq!(snippet_for(french, "cafe"), all);
        let whole = "Un [CAFÉ] au [lait], des cafés, une cafetière; caf.";
        assert_eq!(snippet_for(french, "cafe lait"), whole, "only the last word is a prefix");
        assert_eq!(
            snippet_for(french, "lait caf"),
            "Un [CAFÉ] au [lait], des [cafés], une [cafetière]; [caf]."
        );
        assert_eq!(snippet_for("I write C++ daily", "write C++"), "I [write] [C++] daily");
        assert_eq!(snippet_for("node.js and node", "node.js"), "[node].[js] and [node]");
        // A long text is cut around the first match, with … where it goes on.
        let text = format!("{}天气{}", "前".repeat(100), "后".repeat(300));
        let expected = format!("…{}[天气]{}…", "前".repeat(30), "后".repeat(88));
        assert_eq!(snippet_for(&text, "天气"), expected);
        let text = format!("{} qqtail {}", "x".repeat(15_990), "x".repeat(500));
        let expected = format!("…{} [qqtail] {}…", "x".repeat(29), "x".repeat(83));
        assert_eq!(snippet_for(&text, "qqtail"), expected);
        // A match longer than the window stays in it.
        let run = "天".repeat(16_000);
        assert_eq!(snippet_for(&run, "天"), format!("[{}]…", "天".repeat(SNIPPET_CHARS)));
        // Matches of two words that overlap make one mark.
        assert_eq!(snippet_for("天气很好", "天气 气很"), "[天气很]好");
        // No match found here (the index tokenizes some scripts otherwise): the beginning.
        assert_eq!(snippet_for("nothing to mark", "zebra"), "nothing to mark");
    }

    #[test]
    fn a_message_that_repeats_a_word_is_marked_in_its_window() {
        // FTS5's snippet took 7 s on this text (quadratic in the matches); this is linear.
        let text = "qqbig ".repeat(40_000);
        let parts = snippet(&text, &Terms::of("qqbig", Vec::new()));
        let expected = format!("{}…", "[qqbig] ".repeat(20));
        assert_eq!(marked(&parts), expected);
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
    fn substring_words_match_as_words_of_their_own() {
        let at = |text: &str, word: &str| -> Vec<usize> {
            substring_matches(&text.to_ascii_lowercase(), word).collect()
        };
        assert_eq!(at("DATA+ and an A+, (a+)", "a+"), [13, 18]);
        assert_eq!(at("abc++ c++11 C++", "c++"), [6, 12], "a symbol edge may go on");
        assert_eq!(at("C#, c#.net, abc#", "c#"), [0, 4]);
        // Scripts without spaces: a word is found inside a run, and Latin joined to it.
        assert_eq!(at("今天天气很好", "天气"), [6]);
        assert_eq!(at("iphone价格 and xiphone价格", "iphone价格"), [0]);
        assert_eq!(at("买iphone价格", "iphone价格"), [3], "after a CJK letter");
        assert_eq!(snippet_for("DATA+ or an A+", "a+"), "DATA+ or an [A+]");
    }

    /// A substring word inside longer words in many newer messages does not hide an older
    /// real match: the rows `instr` finds are read a page at a time until enough are kept.
    #[tokio::test]
    async fn substring_words_inside_longer_words_are_not_matches() {
        use crate::db::memory::{self, NewMessage};
        use crate::domain::Role;
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let add = |text: String| {
            let pool = pool.clone();
            async move {
                let message = NewMessage::plain(conv, Role::User, &text);
                memory::add_message(&pool, &message).await.unwrap().0
            }
        };
        let real = add("She got an A+ in maths.".to_string()).await;
        for i in 0..150 {
            add(format!("DATA+ record {i}")).await;
        }
        let hits = search_messages(&pool, "a+", 2).await.unwrap();
        assert_eq!(hits.iter().map(|h| h.message_id).collect::<Vec<_>>(), [real]);
        assert_eq!(search_messages(&pool, "data+", 200).await.unwrap().len(), 150);
        assert_eq!(search_messages(&pool, "data+", 3).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn control_characters_in_a_query_separate_words() {
        use crate::db::memory::{self, NewMessage};
        use crate::domain::Role;
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let message = NewMessage::plain(conv, Role::User, "write every day");
        memory::add_message(&pool, &message).await.unwrap();
        // `a\0b` was a database error (FTS5 reads the NUL as the query's end).
        for query in ["write\0day", "\0write", "write\0", "a\0b", "天\0write", "C++\0"] {
            let result = search_messages(&pool, query, 10).await;
            assert!(result.is_ok(), "{query:?}: {result:?}");
        }
        assert_eq!(search_messages(&pool, "write\0day", 10).await.unwrap().len(), 1);
        assert!(matches!(search_messages(&pool, "\0", 10).await, Err(SearchError::NoWords)));
    }

    #[tokio::test]
    async fn a_common_word_returns_the_newest_with_their_snippets() {
        use crate::db::memory::{self, NewMessage};
        use crate::domain::Role;
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let mut ids = Vec::new();
        for n in 0..40 {
            let message = NewMessage::plain(conv, Role::User, format!("weather report {n}"));
            ids.push(memory::add_message(&pool, &message).await.unwrap().0);
        }
        let hits = search_messages(&pool, "weather", 3).await.unwrap();
        let got: Vec<(i64, String)> =
            hits.iter().map(|h| (h.message_id, marked(&h.snippet))).collect();
        let expected: Vec<(i64, String)> =
            [39, 38, 37].iter().map(|&n| (ids[n], format!("[weather] report {n}"))).collect();
        assert_eq!(got, expected);
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
