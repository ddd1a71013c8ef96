//! Changes to the end of a conversation for the WebChat's message actions: drop the last
//! answer (regenerate) and replace the last user message (edit and resend). Each is one
//! statement or one write transaction; building the new answer is the assistant's job.

use sqlx::SqlitePool;

use crate::db::now_ms;
use crate::domain::{ConversationId, MessageId};

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the conversation has no message of yours to answer")]
    NoUserMessage,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Deletes every message after the last user message (the answer to regenerate, with any
/// error or partial text), and returns how many went.
pub async fn drop_last_answer(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<u64, EditError> {
    let last_user: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(id) FROM messages WHERE conversation_id = ?1 AND role = 'user'",
    )
    .bind(conversation_id.0)
    .fetch_one(pool)
    .await?;
    if last_user.is_none() {
        return Err(EditError::NoUserMessage);
    }
    // One statement that finds the last user message again and deletes only answers after
    // it: a user message stored meanwhile (another tab) is never deleted.
    let done = sqlx::query(
        "DELETE FROM messages WHERE conversation_id = ?1 AND role <> 'user' AND id >
            (SELECT MAX(id) FROM messages WHERE conversation_id = ?1 AND role = 'user')",
    )
    .bind(conversation_id.0)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Replaces the text of the last user message and deletes every message after it.
pub async fn replace_last_user_message(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    content: &str,
) -> Result<MessageId, EditError> {
    let mut tx = crate::db::begin_write(pool).await?;
    // The UPDATE comes first so the transaction takes the write lock at once.
    let edited: Option<i64> = sqlx::query_scalar(
        "UPDATE messages SET content = ?2
         WHERE id = (SELECT MAX(id) FROM messages WHERE conversation_id = ?1 AND role = 'user')
         RETURNING id",
    )
    .bind(conversation_id.0)
    .bind(content)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(edited) = edited else {
        return Err(EditError::NoUserMessage);
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
        replace_last_user_message(&pool, conv, "second question, fixed").await.unwrap();
        let history = memory::history(&pool, conv, 10).await.unwrap();
        let texts: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["first question", "first answer", "second question, fixed"]);
        // The search index follows the edit (update trigger) and the deletion.
        assert_eq!(search_messages(&pool, "qestion", 10).await.unwrap().len(), 0);
        assert_eq!(search_messages(&pool, "fixed", 10).await.unwrap().len(), 1);
        assert_eq!(search_messages(&pool, "second answer", 10).await.unwrap().len(), 0);

        assert_eq!(drop_last_answer(&pool, conv).await.unwrap(), 0);
        memory::add_message(&pool, &NewMessage::plain(conv, Role::Assistant, "new")).await.unwrap();
        assert_eq!(drop_last_answer(&pool, conv).await.unwrap(), 1);
        assert_eq!(memory::history(&pool, conv, 10).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_conversation_without_user_messages_is_refused() {
        let (_dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        assert!(matches!(drop_last_answer(&pool, conv).await, Err(EditError::NoUserMessage)));
        let edit = replace_last_user_message(&pool, conv, "x").await;
        assert!(matches!(edit, Err(EditError::NoUserMessage)));
    }
}
