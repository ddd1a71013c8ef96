//! Changes to the end of a conversation for the WebChat's message actions: drop the last
//! answer (regenerate) and replace the last user message (edit and resend). Each is one
//! write transaction that first checks the message the client meant is still the one it
//! acts on; building the new answer is the assistant's job.

use sqlx::SqlitePool;

use crate::db::now_ms;
use crate::domain::{ConversationId, MessageId};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the conversation has no message of yours to answer")]
    NoUserMessage,
    /// The client named a message that is no longer the one the action would change: the
    /// conversation moved on (another tab, a channel) or the page showed a message that was
    /// never stored. Nothing was changed.
    #[error("message {id} is no longer {what} in this conversation; reload it and try again")]
    NotLast { id: i64, what: &'static str },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Deletes every message after the last user message (the answer to regenerate, with any
/// error or partial text), and returns how many went. `expected`, when given, must be the
/// conversation's last message (the answer the client shows last, or its own message when
/// no answer was stored): otherwise nothing is deleted and `NotLast` comes back.
pub async fn drop_last_answer(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    expected: Option<MessageId>,
) -> Result<u64, EditError> {
    // One write transaction: a message stored between the check and the delete (another
    // tab, a scheduled job) waits for it instead of slipping in between.
    let mut tx = crate::db::begin_write(pool).await?;
    let (last_user, last): (Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT MAX(CASE WHEN role = 'user' THEN id END), MAX(id)
         FROM messages WHERE conversation_id = ?1",
    )
    .bind(conversation_id.0)
    .fetch_one(&mut *tx)
    .await?;
    let Some(last_user) = last_user else {
        return Err(EditError::NoUserMessage);
    };
    if let Some(expected) = expected {
        if last != Some(expected.0) {
            return Err(EditError::NotLast { id: expected.0, what: "the last message" });
        }
    }
    // Only answers after the last user message go: a user message is never deleted.
    let done = sqlx::query(
        "DELETE FROM messages WHERE conversation_id = ?1 AND role <> 'user' AND id > ?2",
    )
    .bind(conversation_id.0)
    .bind(last_user)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

/// Replaces the text of the last user message and deletes every message after it.
/// `expected`, when given, must be that message: otherwise nothing changes and `NotLast`
/// comes back.
pub async fn replace_last_user_message(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    content: &str,
    expected: Option<MessageId>,
) -> Result<MessageId, EditError> {
    let mut tx = crate::db::begin_write(pool).await?;
    // The UPDATE comes first so the transaction takes the write lock at once.
    let edited: Option<i64> = sqlx::query_scalar(
        "UPDATE messages SET content = ?2
         WHERE id = (SELECT MAX(id) FROM messages WHERE conversation_id = ?1 AND role = 'user')
           AND (?3 IS NULL OR id = ?3)
         RETURNING id",
    )
    .bind(conversation_id.0)
    .bind(content)
    .bind(expected.map(|id| id.0))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(edited) = edited else {
        return match expected {
            Some(id) if has_user_message(&mut tx, conversation_id).await? => {
                Err(EditError::NotLast { id: id.0, what: "your last message" })
            }
            _ => Err(EditError::NoUserMessage),
        };
    };
    sqlx::query("DELETE FROM messages WHERE conversation_id = ?1 AND id > ?2")
        .bind(conversation_id.0)
        .bind(edited)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE conversations SET updated_at = ?1 WHERE id = ?2")
        .bind(now_ms())
        .bind(conversation_id.0)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(MessageId(edited))
}

async fn has_user_message(
    tx: &mut sqlx::SqliteConnection,
    conversation_id: ConversationId,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS(SELECT 1 FROM messages WHERE conversation_id = ?1 AND role = 'user')",
    )
    .bind(conversation_id.0)
    .fetch_one(tx)
    .await
}

/// The id of the conversation's last user message: the one an answer that starts now is
/// written for (the chat stream's `meta` event names it).
pub async fn last_user_message_id(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<Option<MessageId>, sqlx::Error> {
    let id: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(id) FROM messages WHERE conversation_id = ?1 AND role = 'user'",
    )
    .bind(conversation_id.0)
    .fetch_one(pool)
    .await?;
    Ok(id.map(MessageId))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::memory::{self, NewMessage};
    use crate::db::search::search_messages;
    use crate::domain::Role;

    #[tokio::test]
    async fn edit_replaces_the_last_user_message_and_drops_what_followed() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        for (role, text) in [
            (Role::User, "first question"),
            (Role::Assistant, "first answer"),
            (Role::User, "second qestion"),
            (Role::Assistant, "second answer"),
        ] {
            memory::add_message(&pool, &NewMessage::plain(conv, role, text)).await.unwrap();
        }
        replace_last_user_message(&pool, conv, "second question, fixed", None).await.unwrap();
        let history = memory::history(&pool, conv, 10).await.unwrap();
        let texts: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["first question", "first answer", "second question, fixed"]);
        // The search index follows the edit (update trigger) and the deletion.
        assert_eq!(search_messages(&pool, "qestion", 10).await.unwrap().len(), 0);
        assert_eq!(search_messages(&pool, "fixed", 10).await.unwrap().len(), 1);
        assert_eq!(search_messages(&pool, "second answer", 10).await.unwrap().len(), 0);

        assert_eq!(drop_last_answer(&pool, conv, None).await.unwrap(), 0);
        memory::add_message(&pool, &NewMessage::plain(conv, Role::Assistant, "new")).await.unwrap();
        assert_eq!(drop_last_answer(&pool, conv, None).await.unwrap(), 1);
        assert_eq!(memory::history(&pool, conv, 10).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_conversation_without_user_messages_is_refused() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let dropped = drop_last_answer(&pool, conv, Some(MessageId(1))).await;
        assert!(matches!(dropped, Err(EditError::NoUserMessage)));
        let edit = replace_last_user_message(&pool, conv, "x", Some(MessageId(1))).await;
        assert!(matches!(edit, Err(EditError::NoUserMessage)));
    }

    #[tokio::test]
    async fn an_action_on_a_message_that_is_no_longer_last_changes_nothing() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        let add = |role, text: &'static str| {
            let pool = pool.clone();
            async move { memory::add_message(&pool, &NewMessage::plain(conv, role, text)).await }
        };
        let first_question = add(Role::User, "first question").await.unwrap();
        let first_answer = add(Role::Assistant, "first answer").await.unwrap();
        let second_question = add(Role::User, "second question").await.unwrap();
        assert_eq!(last_user_message_id(&pool, conv).await.unwrap(), Some(second_question));

        // The page still shows the first exchange as the last one.
        let edit = replace_last_user_message(&pool, conv, "changed", Some(first_question)).await;
        assert!(matches!(edit, Err(EditError::NotLast { .. })), "{edit:?}");
        let drop = drop_last_answer(&pool, conv, Some(first_answer)).await;
        assert!(matches!(drop, Err(EditError::NotLast { .. })), "{drop:?}");
        let history = memory::history(&pool, conv, 10).await.unwrap();
        let texts: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["first question", "first answer", "second question"]);

        // The last message itself: a question whose answer was never stored is answered
        // again with nothing dropped, and an edit of it goes through.
        assert_eq!(drop_last_answer(&pool, conv, Some(second_question)).await.unwrap(), 0);
        let edited =
            replace_last_user_message(&pool, conv, "second, edited", Some(second_question));
        assert_eq!(edited.await.unwrap(), second_question);
        let second_answer = add(Role::Assistant, "second answer").await.unwrap();
        assert_eq!(drop_last_answer(&pool, conv, Some(second_answer)).await.unwrap(), 1);
    }
}
