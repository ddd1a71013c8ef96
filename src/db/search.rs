//! Full-text search over every stored message (the FTS5 word index of migration 0003 and
//! the trigram index of 0014, kept in step with `messages` by triggers). User words become
//! literal FTS5 queries, so no input is ever parsed as FTS syntax. Read-only: it never
//! changes a message.

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
/// Words the word index cannot find (`needs_substring`: Chinese, Japanese, Thai…, `C++`)
/// are looked for as substrings of the text, ASCII letters in any case, through the trigram
/// index when they have three characters or more (a scan of the messages the other words
/// leave otherwise). A Latin word of three letters or more (`glued_words`) is also found
/// glued to such text (`python` in `我用Python写代码`, which the word index holds as one
/// token), through the trigram index.
pub async fn search_messages(
    pool: &SqlitePool,
    input: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, SearchError> {
    if input.chars().count() > MAX_QUERY_CHARS {
        return Err(SearchError::TooLong);
    }
    let words = indexed_words(input);
    let literal = substring_words(input);
    if words.is_empty() && literal.is_empty() {
        return Err(SearchError::NoWords);
    }
    // The indexed words that may also be glued to unspaced text are each looked for in
    // either index; the others together in the word index, as before.
    let glued = glued_words(&words);
    let plain: Vec<String> = words
        .iter()
        .enumerate()
        .filter(|(i, _)| !glued.iter().any(|g| g.index == *i))
        .map(|(_, w)| w.clone())
        .collect();
    let fts = fts_terms(&plain, !glued.iter().any(|g| g.prefix));
    // Snippets are made here from the rows returned, not by FTS5's `snippet()`, which was
    // computed for every match before the sort and costs the square of a message's
    // matches (5 s for 30 messages holding one word 5,000 times; now under 1 ms).
    let mut conditions = String::new();
    let mut binds: Vec<String> = Vec::new();
    if let Some(fts) = fts {
        conditions
            .push_str(" AND m.id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)");
        binds.push(fts);
    }
    for g in &glued {
        conditions.push_str(
            " AND (m.id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?) \
             OR m.id IN (SELECT rowid FROM messages_trigram WHERE messages_trigram MATCH ?))",
        );
        binds.push(fts_term(&words[g.index], g.prefix));
        binds.push(fts_term(&g.token, false));
    }
    for word in &literal {
        // The trigram index narrows the rows to those holding the word (in any case) when
        // it holds every message that can: those with text written without spaces, which
        // a word of such text is found in only. `instr` is exact about the case of letters
        // (only ASCII ones are lowered).
        if word.chars().count() >= 3 && word.chars().any(unspaced_script) {
            conditions.push_str(
                " AND m.id IN (SELECT rowid FROM messages_trigram WHERE messages_trigram MATCH ?)",
            );
            binds.push(fts_term(word, false));
        }
        conditions.push_str(" AND instr(lower(m.content), ?) > 0");
        binds.push(word.clone());
    }
    let sql = format!(
        "SELECT m.id AS message_id, m.conversation_id, c.title AS conversation_title, \
                c.channel, m.role, m.created_at, m.content \
         FROM messages m \
         JOIN conversations c ON c.id = m.conversation_id \
         WHERE 1{conditions} \
         ORDER BY m.created_at DESC, m.id DESC LIMIT ? OFFSET ?"
    );
    // `instr` and the trigram index also find a word inside a longer one (`a+` in `DATA+`,
    // `python` in `pythons`): those rows are dropped here (`substring_matches`,
    // `GluedWord::found`), so the rows are read a page at a time until `limit` are kept or
    // none are left.
    let checked = !literal.is_empty() || !glued.is_empty();
    let page = if checked { limit.saturating_mul(4).max(64) } else { limit };
    let mut rows = Vec::new();
    let mut offset = 0i64;
    loop {
        let mut query = sqlx::query_as::<_, HitRow>(&sql);
        for value in &binds {
            query = query.bind(value);
        }
        let batch = query.bind(page).bind(offset).fetch_all(pool).await?;
        let read = batch.len() as i64;
        rows.extend(batch.into_iter().filter(|row| {
            !checked || {
                let lowered = row.content.to_ascii_lowercase();
                literal.iter().all(|word| substring_matches(&lowered, word).next().is_some())
                    && glued.iter().all(|g| g.found(&row.content, &lowered))
            }
        }));
        if rows.len() as i64 >= limit || read < page {
            break;
        }
        offset += read;
    }
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let glued_marks = glued.into_iter().map(|g| (g.token, g.prefix)).collect();
    let terms = Terms { glued: glued_marks, ..Terms::of(input, literal) };
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

/// `words` (the words of a query the word index can find, `indexed_words`) as an FTS5
/// query: each word a quoted string (quotes doubled inside), all required, the last one a
/// prefix when `prefix_last`; `None` when there is none.
fn fts_terms(words: &[String], prefix_last: bool) -> Option<String> {
    let last = words.len().checked_sub(1)?;
    let terms: Vec<String> =
        words.iter().enumerate().map(|(i, w)| fts_term(w, prefix_last && i == last)).collect();
    Some(terms.join(" "))
}

/// One word as a literal FTS5 term: a quoted string (quotes doubled inside), a prefix when
/// `prefix`.
fn fts_term(word: &str, prefix: bool) -> String {
    let quoted = format!("\"{}\"", word.replace('"', "\"\""));
    if prefix {
        quoted + "*"
    } else {
        quoted
    }
}

/// An indexed word that may also stand glued to text written without spaces, where the
/// word index cannot see it (`我用Python写代码` is one token there, and the message is in
/// the trigram index): one token of three ASCII letters or digits or more (the trigram
/// index needs three characters), `index` its place among the indexed words, `token` in
/// lower case, `prefix` when it is the last of them (a prefix, as the word index takes it).
struct GluedWord {
    index: usize,
    token: String,
    prefix: bool,
}

impl GluedWord {
    /// Whether a row that either index returned holds the word: as the word index compares
    /// it (a token equal to it, folded, or starting with it when it is the last word), or
    /// as a word of its own in the text (`lowered`: ASCII letters in lower case) whose
    /// edges may be letters of a script without spaces, and after it anything when it is
    /// the last word. The trigram index also returns rows where it is only part of a longer
    /// Latin word (`python` in `pythons`, `xpython`): those are not matches.
    fn found(&self, content: &str, lowered: &str) -> bool {
        edge_matches(lowered, &self.token, self.prefix).next().is_some()
            || tokens_of(content).any(|(_, token)| {
                let folded = folded(token);
                folded == self.token || (self.prefix && folded.starts_with(&self.token))
            })
    }
}

/// The indexed words (`indexed_words`) that `GluedWord` describes.
fn glued_words(words: &[String]) -> Vec<GluedWord> {
    words
        .iter()
        .enumerate()
        .filter_map(|(index, word)| {
            let mut tokens = tokens_of(word);
            let (_, token) = tokens.next()?;
            let single = tokens.next().is_none();
            let ascii = token.len() >= 3 && token.bytes().all(|b| b.is_ascii_alphanumeric());
            let prefix = index + 1 == words.len();
            (single && ascii).then(|| GluedWord {
                index,
                token: token.to_ascii_lowercase(),
                prefix,
            })
        })
        .collect()
}

/// The words of `input` the index can find: with a letter or a digit (others tokenize to
/// nothing: dropped), and not looked for as substrings.
fn indexed_words(input: &str) -> Vec<String> {
    query_words(input)
        .filter(|w| w.chars().any(char::is_alphanumeric) && !needs_substring(w))
        .collect()
}

/// The words of `input` looked for as substrings, without the punctuation around them and
/// with ASCII letters in lower case (as SQLite's `lower` does). The combining marks at a
/// word's end are part of it: Thai writes tone marks (`่` in `ที่`, "at") after the letter
/// they sit on, and without them `ที่` was looked for as `ที`, which `ทีม` ("team") holds.
fn substring_words(input: &str) -> Vec<String> {
    let kept = |c: char| c.is_alphanumeric() || c == '+' || c == '#';
    query_words(input)
        .filter(|w| needs_substring(w))
        .map(|w| {
            let word = w.trim_start_matches(|c: char| !kept(c));
            let word = word.trim_end_matches(|c: char| !kept(c) && !is_combining_mark(c));
            word.to_ascii_lowercase()
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

/// Whether `c` belongs to a script written without spaces between words. Migration 0014's
/// triggers test the same ranges in SQL (which messages the trigram index holds):
/// `tests::the_trigram_index_takes_the_messages_of_unspaced_scripts` keeps them equal.
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
    edge_matches(lowered, word, false)
}

/// `substring_matches`, where with `prefix` the word may go on after its end (the last word
/// of a query).
fn edge_matches<'a>(
    lowered: &'a str,
    word: &'a str,
    prefix: bool,
) -> impl Iterator<Item = usize> + 'a {
    let spaced = |c: char| c.is_alphanumeric() && !unspaced_script(c);
    let first = word.chars().next().filter(|&c| spaced(c));
    let last = word.chars().next_back().filter(|&c| spaced(c));
    lowered.match_indices(word).map(|(at, _)| at).filter(move |&at| {
        let before = lowered[..at].chars().next_back();
        let after = lowered[at + word.len()..].chars().next();
        let joins =
            |edge: Option<char>, next: Option<char>| edge.is_some() && next.is_some_and(spaced);
        !joins(first, before) && (prefix || !joins(last, after))
    })
}

/// Characters a snippet keeps before its first match, and in all: about what FTS5's
/// 16-token snippets held.
const SNIPPET_BEFORE: usize = 30;
const SNIPPET_CHARS: usize = 120;

/// What a snippet marks: the indexed words as the index compares them (`folded`), the
/// last one's last token a prefix, the words looked for as substrings, and the indexed
/// words that may be glued to unspaced text (`GluedWord`), each with whether it is a prefix.
struct Terms {
    tokens: Vec<String>,
    prefix: Option<String>,
    substrings: Vec<String>,
    glued: Vec<(String, bool)>,
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
        Terms { tokens, prefix, substrings, glued: Vec::new() }
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
    if !terms.substrings.is_empty() || !terms.glued.is_empty() {
        // ASCII lowering keeps every byte offset, so matches in `lowered` are in `content`.
        let lowered = content.to_ascii_lowercase();
        for word in &terms.substrings {
            matches.extend(substring_matches(&lowered, word).map(|at| (at, at + word.len())));
        }
        for (word, prefix) in &terms.glued {
            let found = edge_matches(&lowered, word, *prefix);
            matches.extend(found.map(|at| (at, at + word.len())));
        }
    }
    // A match ends after the combining marks on its last letter (`ที` in `ที่นี่`, a
    // word typed without its tone mark): a mark cut from its letter would show on its own.
    for (_, end) in &mut matches {
        *end += content[*end..]
            .chars()
            .take_while(|&c| is_combining_mark(c))
            .map(char::len_utf8)
            .sum::<usize>();
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
        assert_eq!(fts_terms(&indexed_words(input), true).as_deref(), expected, "{input:?}");
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

    /// A fresh database holding `texts` as messages of one conversation, and their ids.
    async fn messages(texts: &[&str]) -> (tempfile::TempDir, SqlitePool, Vec<i64>) {
        use crate::db::memory::{self, NewMessage};
        use crate::domain::Role;
        let (dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let mut ids = Vec::new();
        for text in texts {
            let message = NewMessage::plain(conv, Role::User, *text);
            ids.push(memory::add_message(&pool, &message).await.unwrap().0);
        }
        (dir, pool, ids)
    }

    /// The hits for `query` (at most 10), as ids and marked snippets.
    async fn found_in(pool: &SqlitePool, query: &str) -> Vec<(i64, String)> {
        let hits = search_messages(pool, query, 10).await.unwrap();
        hits.into_iter().map(|h| (h.message_id, marked(&h.snippet))).collect()
    }

    #[tokio::test]
    async fn chinese_words_and_cpp_are_found_inside_text() {
        let (_dir, pool, ids) = messages(&[
            "今天天气很好，我们去公园吧。",
            "I write C++ every day.",
            "A c program, not the other one.",
            "明天的天气 will be cold, says the weather report.",
        ])
        .await;
        let found = |query: &'static str| found_in(&pool, query);
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

    /// The word index holds `我用Python写代码` as one token: Latin words glued to text
    /// without spaces are found through the trigram index, as words of their own.
    #[tokio::test]
    async fn latin_words_glued_to_unspaced_text_are_found() {
        let (_dir, pool, ids) = messages(&[
            "我用Python写代码，很方便。",
            "买iPhone了吗？",
            "xpython is not it",
            "Python code, plain.",
            "今天天气很好",
            "東京2024年の夏",
        ])
        .await;
        let found = |query: &'static str| found_in(&pool, query);
        // With a word looked for as a substring (the two marks touch: one).
        assert_eq!(
            found("python 写代码").await,
            [(ids[0], "我用[Python写代码]，很方便。".to_string())]
        );
        assert_eq!(
            found("python code").await,
            [(ids[3], "[Python] [code], plain.".to_string())],
            "not the last word: no prefix; `code` is in the plain message only"
        );
        // The last word is a prefix, glued too; `xpython` is still not a match.
        assert_eq!(
            found("python").await.into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            [ids[3], ids[0]]
        );
        assert_eq!(found("iph").await, [(ids[1], "买[iPh]one了吗？".to_string())]);
        assert_eq!(found("IPHONE").await, [(ids[1], "买[iPhone]了吗？".to_string())]);
        assert!(found("thon").await.is_empty(), "inside a Latin word, glued or not");
        assert_eq!(found("2024").await, [(ids[5], "東京[2024]年の夏".to_string())]);
        // Words of three characters or more without spaces go through the trigram index.
        assert_eq!(found("天气很好").await, [(ids[4], "今天[天气很好]".to_string())]);
    }

    /// Characters on both sides of every edge of `unspaced_script`'s ranges, and a few
    /// others: what the trigram index's triggers and fill must tell apart as it does.
    fn probes() -> Vec<char> {
        let mut probes = vec!['a', 'é', 'Ж', 'ا', '😀'];
        for c in 1..=0x40000u32 {
            let (Some(before), Some(at)) = (char::from_u32(c - 1), char::from_u32(c)) else {
                continue;
            };
            if unspaced_script(before) != unspaced_script(at) {
                probes.extend([before, at]);
            }
        }
        assert!(probes.len() >= 20, "{probes:?}");
        probes
    }

    /// Whether the message `id`, holding `x{c}y`, is in the trigram index.
    async fn in_trigram_index(pool: &SqlitePool, id: i64, c: char) -> bool {
        let term = fts_term(&format!("x{c}y"), false);
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT rowid FROM messages_trigram WHERE messages_trigram MATCH ?")
                .bind(term)
                .fetch_all(pool)
                .await
                .unwrap();
        ids.contains(&id)
    }

    /// The trigram index holds exactly the messages with a character of `unspaced_script`,
    /// as stored (the insert trigger) and as edited (the update trigger); deleted ones
    /// leave it.
    #[tokio::test]
    async fn the_trigram_index_takes_the_messages_of_unspaced_scripts() {
        use crate::db::memory;
        let probes = probes();
        let texts: Vec<String> = probes.iter().map(|c| format!("x{c}y")).collect();
        let (_dir, pool, ids) =
            messages(&texts.iter().map(String::as_str).collect::<Vec<_>>()).await;
        for (&c, &id) in probes.iter().zip(&ids) {
            let indexed = in_trigram_index(&pool, id, c).await;
            assert_eq!(indexed, unspaced_script(c), "U+{:04X} as stored", c as u32);
        }
        let edited = ids[0];
        for &c in &probes {
            sqlx::query("UPDATE messages SET content = ? WHERE id = ?")
                .bind(format!("x{c}y"))
                .bind(edited)
                .execute(&pool)
                .await
                .unwrap();
            let indexed = in_trigram_index(&pool, edited, c).await;
            assert_eq!(indexed, unspaced_script(c), "U+{:04X} as edited", c as u32);
        }
        let conversation: i64 = sqlx::query_scalar("SELECT conversation_id FROM messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        memory::delete_conversation(&pool, crate::domain::ConversationId(conversation))
            .await
            .unwrap();
        let cjk: Vec<i64> =
            sqlx::query_scalar("SELECT rowid FROM messages_trigram WHERE messages_trigram MATCH ?")
                .bind(fts_term("x一y", false))
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(cjk.is_empty(), "a deleted message left the index: {cjk:?}");
    }

    /// Messages stored before the trigram index (migration 0014) are in it as the triggers
    /// would have put them: a database of the version before, migrated, finds a Latin word
    /// glued to Chinese in an old message, and holds exactly the old messages with
    /// characters of `unspaced_script`.
    #[tokio::test]
    async fn the_trigram_index_holds_the_messages_from_before_it() {
        use std::str::FromStr;

        use sqlx::migrate::Migrator;
        use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

        use crate::db::MIGRATOR;
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        let before = Migrator {
            migrations: std::borrow::Cow::Owned(
                MIGRATOR.migrations.iter().filter(|m| m.version < 14).cloned().collect(),
            ),
            ..Migrator::DEFAULT
        };
        let options = SqliteConnectOptions::from_str(&url).unwrap().create_if_missing(true);
        let old = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        before.run(&old).await.unwrap();
        sqlx::query(
            "INSERT INTO conversations (id, channel, external_key, title, created_at, updated_at)
             VALUES (1, 'webchat', 'w1', 'one', 1, 1)",
        )
        .execute(&old)
        .await
        .unwrap();
        let probes = probes();
        let mut texts = vec!["我用Python写代码".to_string(), "xpython".to_string()];
        texts.extend(probes.iter().map(|c| format!("x{c}y")));
        for (i, text) in texts.iter().enumerate() {
            sqlx::query(
                "INSERT INTO messages (id, conversation_id, role, content, created_at)
                 VALUES (?, 1, 'user', ?, ?)",
            )
            .bind(i as i64 + 1)
            .bind(text)
            .bind(i as i64 + 1)
            .execute(&old)
            .await
            .unwrap();
        }
        old.close().await;
        let pool = crate::db::connect(&url).await.expect("migrate to the newest version");
        let hits = search_messages(&pool, "python", 10).await.unwrap();
        assert_eq!(hits.iter().map(|h| h.message_id).collect::<Vec<_>>(), [1]);
        for (i, &c) in probes.iter().enumerate() {
            let indexed = in_trigram_index(&pool, i as i64 + 3, c).await;
            assert_eq!(indexed, unspaced_script(c), "U+{:04X} from before", c as u32);
        }
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

    /// Thai writes tone marks after their letter: a word keeps the marks at its end (`ที่`,
    /// "at", is not `ที`, which `ทีม`, "team", holds), and a mark is never cut from its
    /// letter in a snippet.
    #[tokio::test]
    async fn combining_marks_at_the_end_of_a_word_are_part_of_it() {
        assert_eq!(substring_words("ที่ (ที่นี่)"), ["ที่", "ที่นี่"].map(String::from));
        assert_eq!(snippet_for("อยู่ที่นี่", "ที่นี่"), "อยู่[ที่นี่]");
        assert_eq!(snippet_for("อยู่ที่นี่", "ที"), "อยู่[ที่]นี่", "typed without its mark");
        let (_dir, pool, ids) = messages(&["ทีมฟุตบอล", "ไปที่บ้าน"]).await;
        assert_eq!(found_in(&pool, "ที่").await, [(ids[1], "ไป[ที่]บ้าน".to_string())]);
        assert_eq!(found_in(&pool, "ที่บ้าน").await, [(ids[1], "ไป[ที่บ้าน]".to_string())]);
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
