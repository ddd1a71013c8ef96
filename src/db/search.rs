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
pub async fn search_messages(
    pool: &SqlitePool,
    input: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, SearchError> {
    if input.chars().count() > MAX_QUERY_CHARS {
        return Err(SearchError::TooLong);
    }
    let Some(query) = fts_query(input) else {
        return Err(SearchError::NoWords);
    };
    let rows: Vec<HitRow> = sqlx::query_as(
        "SELECT m.id AS message_id, m.conversation_id, c.title AS conversation_title,
                c.channel, m.role, m.created_at,
                snippet(messages_fts, 0, char(2), char(3), '…', 16) AS snippet
         FROM messages_fts
         JOIN messages m ON m.id = messages_fts.rowid
         JOIN conversations c ON c.id = m.conversation_id
         WHERE messages_fts MATCH ?1
         ORDER BY m.created_at DESC, m.id DESC
         LIMIT ?2",
    )
    .bind(&query)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| SearchHit {
            message_id: row.message_id,
            conversation_id: row.conversation_id,
            conversation_title: row.conversation_title,
            channel: row.channel,
            role: row.role,
            created_at: row.created_at,
            snippet: snippet_parts(&row.snippet),
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
    snippet: String,
}

/// The FTS5 query for what a user typed: each word a quoted string (quotes doubled inside),
/// all required, the last one a prefix. Words with no letter or digit are dropped (they
/// would tokenize to nothing); `None` when no word is left.
pub fn fts_query(input: &str) -> Option<String> {
    let words: Vec<&str> =
        input.split_whitespace().filter(|w| w.chars().any(char::is_alphanumeric)).collect();
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
