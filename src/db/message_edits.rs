//! Changes to the end of a conversation for the WebChat's message actions: read the last
//! exchange a regenerate or an edit starts from, drop the last answer (regenerate) and
//! replace the last user message (edit and resend). Each change is one write transaction
//! that first checks the exchange is still the one the prompt was built from and the message
//! the client meant is still the one it acts on. The assistant makes the change inside the
//! conversation's turn once the model accepted the new prompt; building the answer is its
//! job. A message posted without a model (a reminder firing, `provider` NULL) is not part of
//! an answer: neither action deletes it.

use sqlx::{SqliteConnection, SqlitePool};

use crate::db::memory::rounds_from_json;
use crate::db::now_ms;
use crate::domain::{ConversationId, MessageId, ToolRound};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the conversation has no message of yours to answer")]
    NoUserMessage,
    /// The client named a message that is no longer the one the action would change: the
    /// conversation moved on (another tab, a channel) or the page showed a message that was
    /// never stored. Nothing was changed.
    #[error(
        "message {id} is not {what} in this conversation (it changed meanwhile, in another tab or \
         window, or never was); reload it and try again"
    )]
    NotLast { id: i64, what: &'static str },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The end of a conversation that a message action starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastExchange {
    /// The last user message: the one answered again, or edited.
    pub user_message_id: MessageId,
    /// How many messages come before it (its index in the conversation).
    pub n_before: i64,
    /// The conversation's last message (the user message itself when nothing followed it).
    pub last_message_id: MessageId,
}

impl LastExchange {
    /// Regenerate: `expected`, when given, must be the conversation's last message (the
    /// answer the client shows last, or its own message when no answer was stored).
    pub fn check_regenerate(&self, expected: Option<MessageId>) -> Result<(), EditError> {
        match expected {
            Some(id) if id != self.last_message_id => {
                Err(EditError::NotLast { id: id.0, what: "the last message" })
            }
            _ => Ok(()),
        }
    }

    /// Edit: `expected`, when given, must be the last user message.
    pub fn check_edit(&self, expected: Option<MessageId>) -> Result<(), EditError> {
        match expected {
            Some(id) if id != self.user_message_id => {
                Err(EditError::NotLast { id: id.0, what: "your last message" })
            }
            _ => Ok(()),
        }
    }
}

/// The conversation's last exchange, or `NoUserMessage` when it has no user message.
pub async fn last_exchange(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<LastExchange, EditError> {
    let mut conn = pool.acquire().await?;
    read_last_exchange(&mut conn, conversation_id).await
}

/// Deletes the answer after the last user message (the message a model wrote there, with
/// any error or partial text; a reminder posted there stays), and returns how many messages
/// went. In one write transaction that first checks that `exchange` is still the
/// conversation's last exchange (its user message the last one, and no message added since
/// it was read) and that `expected` passes `LastExchange::check_regenerate`: otherwise
/// nothing is deleted and `NotLast` comes back.
pub async fn drop_last_answer(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    exchange: &LastExchange,
    expected: Option<MessageId>,
) -> Result<u64, EditError> {
    // One write transaction: a message stored between the check and the delete (another
    // tab, a scheduled job) waits for it instead of slipping in between.
    let mut tx = crate::db::begin_write(pool).await?;
    let now = read_last_exchange(&mut tx, conversation_id).await?;
    now.check_regenerate(expected)?;
    if now != *exchange {
        let id = expected.unwrap_or(exchange.last_message_id);
        return Err(EditError::NotLast { id: id.0, what: "the last message" });
    }
    let dropped = delete_answer_after(&mut tx, conversation_id, exchange.user_message_id).await?;
    tx.commit().await?;
    Ok(dropped)
}

/// Replaces the last user message with one of text `content` and deletes the answer after
/// it (every message after it but the reminders posted there); returns the new message's
/// id. In one write transaction that first checks that `exchange`'s user message is still
/// the conversation's last one and that `expected` passes `LastExchange::check_edit`:
/// otherwise nothing changes and `NotLast` comes back. The edited message gets a new id, so
/// a page that still shows the old one (another tab) cannot edit it again unawares: its
/// `message_id` no longer names the last user message.
pub async fn replace_last_user_message(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    exchange: &LastExchange,
    content: &str,
    expected: Option<MessageId>,
) -> Result<MessageId, EditError> {
    let mut tx = crate::db::begin_write(pool).await?;
    let now = read_last_exchange(&mut tx, conversation_id).await?;
    now.check_edit(expected)?;
    if now.user_message_id != exchange.user_message_id {
        let id = expected.unwrap_or(exchange.user_message_id);
        return Err(EditError::NotLast { id: id.0, what: "your last message" });
    }
    let old = exchange.user_message_id;
    // The answer goes first: the new message comes after the old one, where the answer's
    // delete would take it too.
    delete_answer_after(&mut tx, conversation_id, old).await?;
    let now = now_ms();
    let edited: i64 = sqlx::query_scalar(
        "INSERT INTO messages (conversation_id, role, content, status, external_id, created_at)
         SELECT conversation_id, role, ?2, status, external_id, ?3 FROM messages WHERE id = ?1
         RETURNING id",
    )
    .bind(old.0)
    .bind(content)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    // What was kept after the old message (a reminder posted there) moves after the new
    // one, in its order, so the conversation reads as before.
    sqlx::query(&format!(
        "INSERT INTO messages ({MOVED_COLUMNS})
         SELECT {MOVED_COLUMNS} FROM messages WHERE conversation_id = ?1 AND id > ?2 AND id < ?3
         ORDER BY id"
    ))
    .bind(conversation_id.0)
    .bind(old.0)
    .bind(edited)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM messages WHERE conversation_id = ?1 AND id >= ?2 AND id < ?3")
        .bind(conversation_id.0)
        .bind(old.0)
        .bind(edited)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE conversations SET updated_at = ?1 WHERE id = ?2")
        .bind(now)
        .bind(conversation_id.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(MessageId(edited))
}

/// Every column of a message but its id: what moves when a message is written again later.
const MOVED_COLUMNS: &str =
    "conversation_id, role, content, tier, provider, model, prompt_tokens, \
     completion_tokens, status, external_id, delivery_status, delivery_error, created_at, \
     tool_rounds, host, left_machine, failure";

/// The messages of the answer after user message `?2` in conversation `?1`: every message
/// after it but the ones posted without a model (a reminder firing there).
const ANSWER_AFTER: &str =
    "conversation_id = ?1 AND id > ?2 AND NOT (role = 'assistant' AND provider IS NULL)";

/// The tool rounds of the answer a regenerate or an edit of `user_message` would delete
/// (what `delete_answer_after` deletes), oldest first: what that answer did, so that the
/// caller can undo it (a reminder it set).
pub async fn answer_rounds_after(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    user_message: MessageId,
) -> Result<Vec<ToolRound>, sqlx::Error> {
    let sql = format!("SELECT tool_rounds FROM messages WHERE {ANSWER_AFTER} ORDER BY id");
    let stored: Vec<Option<String>> = sqlx::query_scalar(&sql)
        .bind(conversation_id.0)
        .bind(user_message.0)
        .fetch_all(pool)
        .await?;
    Ok(stored.iter().flat_map(|text| rounds_from_json(text.as_deref())).collect())
}

async fn read_last_exchange(
    conn: &mut SqliteConnection,
    conversation_id: ConversationId,
) -> Result<LastExchange, EditError> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT u.id,
                (SELECT COUNT(*) FROM messages WHERE conversation_id = ?1 AND id < u.id),
                (SELECT MAX(id) FROM messages WHERE conversation_id = ?1)
         FROM messages u WHERE u.conversation_id = ?1 AND u.role = 'user'
         ORDER BY u.id DESC LIMIT 1",
    )
    .bind(conversation_id.0)
    .fetch_optional(conn)
    .await?;
    match row {
        Some((user, n_before, last)) => Ok(LastExchange {
            user_message_id: MessageId(user),
            n_before,
            last_message_id: MessageId(last),
        }),
        None => Err(EditError::NoUserMessage),
    }
}

/// Deletes what follows `user_message` but the messages posted without a model: the answer
/// (with any error or partial text). A user message is never deleted (`user_message` is the
/// conversation's last), and a reminder that fired there is not part of the answer.
async fn delete_answer_after(
    conn: &mut SqliteConnection,
    conversation_id: ConversationId,
    user_message: MessageId,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!("DELETE FROM messages WHERE {ANSWER_AFTER}"))
        .bind(conversation_id.0)
        .bind(user_message.0)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::memory::{self, NewMessage};
    use crate::db::search::search_messages;
    use crate::domain::Role;

    /// Stores a message: a user's, an answer (a model wrote it: `provider` set) or a post
    /// (an assistant message without a model, as a reminder firing stores it).
    async fn add(pool: &SqlitePool, conv: ConversationId, kind: &str, text: &str) -> MessageId {
        let message = match kind {
            "user" => NewMessage::plain(conv, Role::User, text),
            "answer" => NewMessage {
                provider: Some("local".into()),
                model: Some("m.gguf".into()),
                ..NewMessage::plain(conv, Role::Assistant, text)
            },
            "post" => NewMessage::plain(conv, Role::Assistant, text),
            other => panic!("unknown message kind {other}"),
        };
        memory::add_message(pool, &message).await.unwrap()
    }

    async fn texts(pool: &SqlitePool, conv: ConversationId) -> Vec<String> {
        let history = memory::history(pool, conv, 20).await.unwrap();
        history.into_iter().map(|m| m.content).collect()
    }

    #[tokio::test]
    async fn edit_replaces_the_last_user_message_and_drops_its_answer() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        add(&pool, conv, "user", "first question").await;
        add(&pool, conv, "answer", "first answer").await;
        let second = add(&pool, conv, "user", "second qestion").await;
        add(&pool, conv, "answer", "second answer").await;
        let exchange = last_exchange(&pool, conv).await.unwrap();
        assert_eq!((exchange.user_message_id, exchange.n_before), (second, 2));

        let edited =
            replace_last_user_message(&pool, conv, &exchange, "second question, fixed", None);
        let edited = edited.await.unwrap();
        assert!(edited > second, "a new id, never one used before: {edited:?}");
        let expected = ["first question", "first answer", "second question, fixed"];
        assert_eq!(texts(&pool, conv).await, expected);
        // A page that still shows the old message (another tab) cannot edit it unawares.
        let exchange = last_exchange(&pool, conv).await.unwrap();
        let stale = replace_last_user_message(&pool, conv, &exchange, "again", Some(second));
        assert!(matches!(stale.await, Err(EditError::NotLast { .. })));
        // The search index follows the edit (update trigger) and the deletion.
        assert_eq!(search_messages(&pool, "qestion", 10).await.unwrap().len(), 0);
        assert_eq!(search_messages(&pool, "fixed", 10).await.unwrap().len(), 1);
        assert_eq!(search_messages(&pool, "second answer", 10).await.unwrap().len(), 0);

        assert_eq!(exchange.last_message_id, edited, "nothing follows the edited message");
        assert_eq!(drop_last_answer(&pool, conv, &exchange, None).await.unwrap(), 0);
        add(&pool, conv, "answer", "new").await;
        let exchange = last_exchange(&pool, conv).await.unwrap();
        assert_eq!(drop_last_answer(&pool, conv, &exchange, None).await.unwrap(), 1);
        assert_eq!(texts(&pool, conv).await, expected);
    }

    #[tokio::test]
    async fn a_reminder_posted_after_the_last_user_message_is_kept() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        add(&pool, conv, "user", "remind me at nine").await;
        add(&pool, conv, "answer", "(no answer: the model failed)").await;
        add(&pool, conv, "answer", "Done, at nine.").await;
        let reminder = add(&pool, conv, "post", "Reminder: call Anna").await;

        // The page shows the reminder last: it names it, and the answers before it go.
        let exchange = last_exchange(&pool, conv).await.unwrap();
        assert_eq!(exchange.last_message_id, reminder);
        let dropped = drop_last_answer(&pool, conv, &exchange, Some(reminder)).await.unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(texts(&pool, conv).await, ["remind me at nine", "Reminder: call Anna"]);

        add(&pool, conv, "answer", "Done.").await;
        let exchange = last_exchange(&pool, conv).await.unwrap();
        replace_last_user_message(&pool, conv, &exchange, "remind me at ten", None).await.unwrap();
        assert_eq!(texts(&pool, conv).await, ["remind me at ten", "Reminder: call Anna"]);
    }

    #[tokio::test]
    async fn a_conversation_without_user_messages_is_refused() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        assert!(matches!(last_exchange(&pool, conv).await, Err(EditError::NoUserMessage)));
        add(&pool, conv, "post", "Reminder: stretch").await;
        assert!(matches!(last_exchange(&pool, conv).await, Err(EditError::NoUserMessage)));
    }

    #[tokio::test]
    async fn an_action_on_a_message_that_is_no_longer_last_changes_nothing() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let first_question = add(&pool, conv, "user", "first question").await;
        let first_answer = add(&pool, conv, "answer", "first answer").await;
        let second_question = add(&pool, conv, "user", "second question").await;
        let exchange = last_exchange(&pool, conv).await.unwrap();
        assert_eq!(exchange.user_message_id, second_question);

        // The page still shows the first exchange as the last one.
        let edit = exchange.check_edit(Some(first_question));
        assert!(matches!(edit, Err(EditError::NotLast { .. })), "{edit:?}");
        let edit =
            replace_last_user_message(&pool, conv, &exchange, "changed", Some(first_question));
        assert!(matches!(edit.await, Err(EditError::NotLast { .. })));
        let drop = exchange.check_regenerate(Some(first_answer));
        assert!(matches!(drop, Err(EditError::NotLast { .. })), "{drop:?}");
        let drop = drop_last_answer(&pool, conv, &exchange, Some(first_answer)).await;
        assert!(matches!(drop, Err(EditError::NotLast { .. })), "{drop:?}");
        let before = ["first question", "first answer", "second question"];
        assert_eq!(texts(&pool, conv).await, before);

        // The exchange a prompt was built from moved on before the change: refused too.
        add(&pool, conv, "answer", "second answer").await;
        let drop = drop_last_answer(&pool, conv, &exchange, None).await;
        assert!(matches!(drop, Err(EditError::NotLast { .. })), "{drop:?}");
        let third = add(&pool, conv, "user", "third question").await;
        let edit = replace_last_user_message(&pool, conv, &exchange, "changed", None).await;
        assert!(matches!(edit, Err(EditError::NotLast { .. })), "{edit:?}");
        let history = texts(&pool, conv).await;
        assert_eq!(history[3..], ["second answer", "third question"]);

        // The last message itself: a question whose answer was never stored is answered
        // again with nothing dropped, and an edit of it goes through.
        let exchange = last_exchange(&pool, conv).await.unwrap();
        assert_eq!(exchange.check_regenerate(Some(third)).ok(), Some(()));
        assert_eq!(drop_last_answer(&pool, conv, &exchange, Some(third)).await.unwrap(), 0);
        let edited =
            replace_last_user_message(&pool, conv, &exchange, "third, edited", Some(third));
        assert!(edited.await.unwrap() > third);
        let third_answer = add(&pool, conv, "answer", "third answer").await;
        let exchange = last_exchange(&pool, conv).await.unwrap();
        let dropped = drop_last_answer(&pool, conv, &exchange, Some(third_answer)).await;
        assert_eq!(dropped.unwrap(), 1);
    }
}
