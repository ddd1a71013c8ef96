//! Writing imported conversations: each one, with all its messages, in one transaction, as a
//! WebChat conversation keyed by where it came from, so importing the same file twice adds
//! nothing the second time. Reading the files is the gateway's (`gateway/import.rs`); this
//! module only stores what it is given.

use sqlx::SqlitePool;

use crate::domain::{ChannelKind, ConversationId, Role};

/// A conversation read from an export, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedConversation {
    /// The WebChat key: the exported one for a my-claw WebChat conversation (so a
    /// conversation imported back where it came from is found), else `import:<source>:<id>`.
    pub key: String,
    /// The channel and key of a my-claw export's WhatsApp or Talk conversation: imported
    /// back where that conversation still is, it is already there.
    pub origin: Option<(String, String)>,
    pub title: Option<String>,
    pub created_at: i64,
    pub messages: Vec<ImportedMessage>,
}

/// One message of an imported conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedMessage {
    pub role: Role,
    pub content: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub tier: Option<String>,
    /// Where the answer came from: the exported provider, or the application it was
    /// exported from (`chatgpt`, `open-webui`).
    pub provider: Option<String>,
    pub model: Option<String>,
    /// `complete`, `partial` or `error`, as stored.
    pub status: &'static str,
    /// The `tool_rounds` JSON text of a my-claw answer.
    pub tool_rounds: Option<String>,
    pub host: Option<String>,
    pub left_machine: bool,
}

/// What storing one imported conversation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new conversation, with every message.
    Created(ConversationId),
    /// A conversation with that key was already there: nothing was written.
    AlreadyThere(ConversationId),
}

/// Stores `conversation` unless one with its key exists. The conversation's last activity
/// is its newest message's time (or its creation), so it sorts among the others by when
/// it was used, not by when it was imported.
pub async fn store_conversation(
    pool: &SqlitePool,
    conversation: &ImportedConversation,
) -> Result<Stored, sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let channel = ChannelKind::WebChat.as_str();
    // Its own key, then where a my-claw export's channel conversation came from.
    let origin = conversation.origin.as_ref().map(|(channel, key)| (channel.as_str(), key));
    for (channel, key) in std::iter::once((channel, &conversation.key)).chain(origin) {
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM conversations WHERE channel = ?1 AND external_key = ?2",
        )
        .bind(channel)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = existing {
            return Ok(Stored::AlreadyThere(ConversationId(id)));
        }
    }
    let updated_at = conversation
        .messages
        .iter()
        .map(|m| m.created_at)
        .max()
        .unwrap_or(conversation.created_at)
        .max(conversation.created_at);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO conversations (channel, external_key, title, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         RETURNING id",
    )
    .bind(channel)
    .bind(&conversation.key)
    .bind(&conversation.title)
    .bind(conversation.created_at)
    .bind(updated_at)
    .fetch_one(&mut *tx)
    .await?;
    for message in &conversation.messages {
        sqlx::query(
            "INSERT INTO messages (conversation_id, role, content, tier, provider, model, status,
                                   created_at, tool_rounds, host, left_machine)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(id)
        .bind(message.role.as_str())
        .bind(&message.content)
        .bind(&message.tier)
        .bind(&message.provider)
        .bind(&message.model)
        .bind(message.status)
        .bind(message.created_at)
        .bind(&message.tool_rounds)
        .bind(&message.host)
        .bind(message.left_machine)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Stored::Created(ConversationId(id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{connect, memory, search};

    fn message(role: Role, content: &str, at: i64) -> ImportedMessage {
        ImportedMessage {
            role,
            content: content.into(),
            created_at: at,
            tier: None,
            provider: (role == Role::Assistant).then(|| "chatgpt".into()),
            model: None,
            status: "complete",
            tool_rounds: None,
            host: None,
            left_machine: role == Role::Assistant,
        }
    }

    #[tokio::test]
    async fn a_conversation_is_stored_once_with_its_times_and_is_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let pool = connect(&url).await.unwrap();
        let imported = ImportedConversation {
            key: "import:chatgpt:abc".into(),
            origin: None,
            title: Some("Sourdough".into()),
            created_at: 1_700_000_000_000,
            messages: vec![
                message(Role::User, "How long should sourdough proof?", 1_700_000_000_000),
                message(Role::Assistant, "Usually 4 to 12 hours.", 1_700_000_005_000),
            ],
        };
        let Stored::Created(id) = store_conversation(&pool, &imported).await.unwrap() else {
            panic!("not created");
        };
        assert_eq!(store_conversation(&pool, &imported).await.unwrap(), Stored::AlreadyThere(id));
        let stored = memory::get_conversation(&pool, id).await.unwrap().unwrap();
        assert_eq!(stored.channel, ChannelKind::WebChat);
        assert_eq!(stored.title.as_deref(), Some("Sourdough"));
        assert_eq!(stored.created_at, 1_700_000_000_000);
        assert_eq!(stored.updated_at, 1_700_000_005_000, "last used, not imported");
        let messages = memory::history(&pool, id, 10).await.unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].content, "Usually 4 to 12 hours.");
        let hits = search::search_messages(&pool, "sourdough", 10).await.unwrap();
        assert_eq!(hits.len(), 1, "imported text is indexed for search");
    }
}
