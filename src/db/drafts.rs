//! Answers being written (migration 0011): the text so far of each, saved while it streams,
//! so that a process killed mid-answer (kill -9, a power loss) loses at most the last moment
//! of it; `recover`, at start-up, stores each one left over as its conversation's answer.
//! Pure storage: which answers have drafts and when they are saved is the assistant's
//! business, and the finished answer removes its draft through `memory::add_answer`.

use sqlx::SqlitePool;

use crate::db::memory::{self, MessageStatus, NewMessage};
use crate::db::now_ms;
use crate::domain::{ConversationId, Role, ToolRound};

/// Why a recovered answer ends where it does (its `failure`, which the page shows).
pub const INTERRUPTED_REASON: &str =
    "my-claw stopped while this answer was being written (a crash, a kill or a power loss)";

/// The answer being written in one conversation, as far as it got.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub conversation_id: ConversationId,
    /// The answer's own text so far (after its tool rounds, if any).
    pub content: String,
    /// The rounds of tool calls it finished.
    pub tool_rounds: Vec<ToolRound>,
    /// The privacy ledger, as for a stored answer (see `memory::NewMessage`).
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub host: Option<String>,
    pub left_machine: bool,
    /// When the answer started (Unix milliseconds).
    pub started_at: i64,
}

/// Saves `draft` as the answer being written in its conversation, replacing the one saved
/// before. One statement: it needs no transaction of its own.
pub async fn save(pool: &SqlitePool, draft: &Draft) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO answer_drafts (conversation_id, content, tool_rounds, tier, provider, model,
                                    host, left_machine, started_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (conversation_id) DO UPDATE SET
             content = excluded.content, tool_rounds = excluded.tool_rounds,
             tier = excluded.tier, provider = excluded.provider, model = excluded.model,
             host = excluded.host, left_machine = excluded.left_machine,
             started_at = excluded.started_at, updated_at = excluded.updated_at",
    )
    .bind(draft.conversation_id.0)
    .bind(&draft.content)
    .bind(memory::rounds_to_json(&draft.tool_rounds))
    .bind(&draft.tier)
    .bind(&draft.provider)
    .bind(&draft.model)
    .bind(&draft.host)
    .bind(draft.left_machine)
    .bind(draft.started_at)
    .bind(now_ms())
    .execute(pool)
    .await?;
    Ok(())
}

/// The draft of a conversation's answer, if one is saved.
pub async fn get(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<Option<Draft>, sqlx::Error> {
    let row: Option<DraftRow> = sqlx::query_as(&format!(
        "SELECT {DRAFT_COLUMNS} FROM answer_drafts WHERE conversation_id = ?1"
    ))
    .bind(conversation_id.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| row.into_draft().0))
}

/// Removes the draft of an answer that ends without being stored (stopped before it wrote
/// anything); false when there was none.
pub async fn discard(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    discard_in(&mut conn, conversation_id).await
}

/// `discard` inside the caller's transaction (the one that stores the finished answer).
pub(crate) async fn discard_in(
    conn: &mut sqlx::SqliteConnection,
    conversation_id: ConversationId,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM answer_drafts WHERE conversation_id = ?1")
        .bind(conversation_id.0)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Stores every draft left over by a process that stopped while writing answers as its
/// conversation's answer, and removes the drafts, in one transaction: the text so far as a
/// `partial` answer with `reason` as its failure, or, when it had neither text nor tool
/// rounds yet, an `error` answer saying the question was not answered. Dated when the draft
/// was last saved. Returns how many were stored. Only for start-up, before anything
/// answers: a draft being written by a running process would be stored twice.
pub async fn recover(pool: &SqlitePool, reason: &str) -> Result<u64, sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let rows: Vec<DraftRow> = sqlx::query_as(&format!(
        "SELECT {DRAFT_COLUMNS} FROM answer_drafts ORDER BY started_at, conversation_id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let mut stored = 0;
    for row in rows {
        let (draft, saved_at) = row.into_draft();
        let unanswered = draft.content.trim().is_empty() && draft.tool_rounds.is_empty();
        let (status, content) = if unanswered {
            (MessageStatus::Error, memory::no_answer_text(reason))
        } else {
            (MessageStatus::Partial, draft.content)
        };
        let message = NewMessage {
            conversation_id: draft.conversation_id,
            role: Role::Assistant,
            content,
            tier: draft.tier,
            provider: draft.provider,
            model: draft.model,
            // Neither is known: the engine reports them when an answer ends.
            prompt_tokens: None,
            completion_tokens: None,
            status,
            external_id: None,
            host: draft.host,
            left_machine: draft.left_machine,
        };
        memory::insert_message(&mut tx, &message, &draft.tool_rounds, Some(reason), saved_at)
            .await?;
        stored += 1;
    }
    sqlx::query("DELETE FROM answer_drafts").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(stored)
}

const DRAFT_COLUMNS: &str = "conversation_id, content, tool_rounds, tier, provider, model, host, \
     left_machine, started_at, updated_at";

#[derive(sqlx::FromRow)]
struct DraftRow {
    conversation_id: i64,
    content: String,
    tool_rounds: Option<String>,
    tier: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    host: Option<String>,
    left_machine: bool,
    started_at: i64,
    updated_at: i64,
}

impl DraftRow {
    /// The draft, and when it was last saved.
    fn into_draft(self) -> (Draft, i64) {
        let draft = Draft {
            conversation_id: ConversationId(self.conversation_id),
            content: self.content,
            tool_rounds: memory::rounds_from_json(self.tool_rounds.as_deref()),
            tier: self.tier,
            provider: self.provider,
            model: self.model,
            host: self.host,
            left_machine: self.left_machine,
            started_at: self.started_at,
        };
        (draft, self.updated_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::db::fresh_test_db as fresh;
    use crate::db::memory::{add_answer, add_message, create_webchat_conversation, history};
    use crate::domain::{ToolCall, ToolResult};

    fn draft(conversation_id: ConversationId, content: &str) -> Draft {
        Draft {
            conversation_id,
            content: content.into(),
            tool_rounds: Vec::new(),
            tier: Some("main".into()),
            provider: Some("openai".into()),
            model: Some("qwen3-14b".into()),
            host: Some("gpu-box:8000".into()),
            left_machine: true,
            started_at: 1_000,
        }
    }

    #[tokio::test]
    async fn a_draft_is_saved_again_in_place_and_read_back() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        assert_eq!(get(&pool, conv.id).await.unwrap(), None);
        save(&pool, &draft(conv.id, "Once")).await.unwrap();
        let mut later = draft(conv.id, "Once upon a time");
        later.tool_rounds = vec![ToolRound {
            text: "Let me look.".into(),
            calls: vec![ToolCall {
                id: "c1".into(),
                name: "current_time".into(),
                arguments: "{}".into(),
            }],
            results: vec![ToolResult {
                call_id: "c1".into(),
                content: "9:00".into(),
                is_error: false,
            }],
        }];
        save(&pool, &later).await.unwrap();
        assert_eq!(get(&pool, conv.id).await.unwrap(), Some(later));
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM answer_drafts")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1, "one row per conversation");
        assert!(discard(&pool, conv.id).await.unwrap());
        assert!(!discard(&pool, conv.id).await.unwrap());
    }

    /// Storing the answer removes its draft in the same transaction; a user message does not.
    #[tokio::test]
    async fn storing_the_answer_removes_its_draft() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        save(&pool, &draft(conv.id, "The answer so")).await.unwrap();
        add_message(&pool, &NewMessage::plain(conv.id, Role::User, "hello")).await.unwrap();
        assert!(get(&pool, conv.id).await.unwrap().is_some());
        let answer = NewMessage::plain(conv.id, Role::Assistant, "The answer so far, complete.");
        add_answer(&pool, &answer, &[], None).await.unwrap();
        assert_eq!(get(&pool, conv.id).await.unwrap(), None);
        assert_eq!(recover(&pool, INTERRUPTED_REASON).await.unwrap(), 0);
        assert_eq!(history(&pool, conv.id, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn deleting_a_conversation_deletes_its_draft() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        save(&pool, &draft(conv.id, "text")).await.unwrap();
        assert!(memory::delete_conversation(&pool, conv.id).await.unwrap());
        assert_eq!(get(&pool, conv.id).await.unwrap(), None);
        // And a draft for a conversation that is gone cannot be saved.
        assert!(save(&pool, &draft(conv.id, "text")).await.is_err());
    }

    /// Left-over drafts become stored answers with their ledger: partial with the text so
    /// far, or failed when there was no text yet; then they are gone.
    #[tokio::test]
    async fn recovery_stores_each_draft_as_its_conversations_answer() {
        let (_dir, pool) = fresh().await;
        let written = create_webchat_conversation(&pool, None).await.unwrap();
        let waiting = create_webchat_conversation(&pool, None).await.unwrap();
        let with_rounds = create_webchat_conversation(&pool, None).await.unwrap();
        for conv in [&written, &waiting, &with_rounds] {
            add_message(&pool, &NewMessage::plain(conv.id, Role::User, "tell me")).await.unwrap();
        }
        save(&pool, &draft(written.id, "Once upon a time")).await.unwrap();
        save(&pool, &draft(waiting.id, "")).await.unwrap();
        let mut round = draft(with_rounds.id, "");
        round.tool_rounds =
            vec![ToolRound { text: String::new(), calls: Vec::new(), results: Vec::new() }];
        save(&pool, &round).await.unwrap();

        assert_eq!(recover(&pool, INTERRUPTED_REASON).await.unwrap(), 3);
        let answer = |id| {
            let pool = pool.clone();
            async move { history(&pool, id, 10).await.unwrap().pop().expect("an answer") }
        };
        let partial = answer(written.id).await;
        assert_eq!(partial.role, Role::Assistant);
        assert_eq!(partial.status, MessageStatus::Partial);
        assert_eq!(partial.content, "Once upon a time");
        assert_eq!(partial.failure.as_deref(), Some(INTERRUPTED_REASON));
        assert_eq!(
            (partial.tier.as_deref(), partial.provider.as_deref(), partial.model.as_deref()),
            (Some("main"), Some("openai"), Some("qwen3-14b"))
        );
        assert_eq!((partial.host.as_deref(), partial.left_machine), (Some("gpu-box:8000"), true));
        assert_eq!((partial.prompt_tokens, partial.completion_tokens), (None, None));

        let failed = answer(waiting.id).await;
        assert_eq!(failed.status, MessageStatus::Error);
        assert_eq!(failed.content, memory::no_answer_text(INTERRUPTED_REASON));
        assert_eq!(failed.failure.as_deref(), Some(INTERRUPTED_REASON));

        // Tool rounds that ran are kept (what they did is undone by a regenerate).
        let rounds = answer(with_rounds.id).await;
        assert_eq!(rounds.status, MessageStatus::Partial);
        assert_eq!(rounds.tool_rounds.len(), 1);

        // Nothing is left to recover a second time.
        assert_eq!(recover(&pool, INTERRUPTED_REASON).await.unwrap(), 0);
        assert_eq!(history(&pool, written.id, 10).await.unwrap().len(), 2);
    }

    /// Opening the database leaves drafts alone: another process opening a live server's
    /// database (a test, a tool) must not store the answers it is writing (only the server,
    /// before it serves, recovers them).
    #[tokio::test]
    async fn opening_the_database_leaves_drafts_to_the_server() {
        let (dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        add_message(&pool, &NewMessage::plain(conv.id, Role::User, "tell me")).await.unwrap();
        save(&pool, &draft(conv.id, "So far")).await.unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let second = crate::db::connect(&url).await.unwrap();
        assert!(get(&second, conv.id).await.unwrap().is_some(), "the draft is still there");
        assert_eq!(history(&second, conv.id, 10).await.unwrap().len(), 1);
    }
}
