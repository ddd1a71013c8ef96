//! Conversation memory: conversations, messages and settings (the plan's helpers:
//! get-or-create conversation, add message, history, list, settings). Pure storage: no
//! prompt building and no model knowledge here.

use sqlx::SqlitePool;

use crate::db::{inbound, now_ms};
use crate::domain::{
    ChannelKind, ConversationId, MessageId, Role, ToolCall, ToolResult, ToolRound,
};

/// A stored conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: ConversationId,
    pub channel: ChannelKind,
    pub external_key: String,
    pub title: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A conversation with what the list view needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSummary {
    pub conversation: Conversation,
    pub message_count: i64,
    /// Whether any answer in it came from a provider that leaves the machine.
    pub left_machine: bool,
}

crate::domain::named_enum! {
    /// How complete a stored message is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MessageStatus {
        Complete = "complete",
        /// Stopped or failed after some text was generated; the text is kept.
        Partial = "partial",
        Error = "error",
    }
}

/// A message to store. `tier`, `provider`, `model`, `host` and `left_machine` form the
/// privacy ledger of answers.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub conversation_id: ConversationId,
    pub role: Role,
    pub content: String,
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub status: MessageStatus,
    pub external_id: Option<String>,
    /// The host of a network provider (`gpu-box:8000`, `api.z.ai`); `None` in-process.
    pub host: Option<String>,
    /// The answer was produced outside this machine (any host but loopback).
    pub left_machine: bool,
}

impl NewMessage {
    /// A complete message with no ledger fields (user turns, system notes).
    pub fn plain(conversation_id: ConversationId, role: Role, content: impl Into<String>) -> Self {
        Self {
            conversation_id,
            role,
            content: content.into(),
            tier: None,
            provider: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            status: MessageStatus::Complete,
            external_id: None,
            host: None,
            left_machine: false,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub role: Role,
    pub content: String,
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub status: MessageStatus,
    pub external_id: Option<String>,
    pub delivery_status: Option<String>,
    pub delivery_error: Option<String>,
    pub created_at: i64,
    /// The tool rounds of an answer, oldest first (empty for every other message).
    pub tool_rounds: Vec<ToolRound>,
    /// The host that produced an answer (`None` in-process; see `NewMessage::host`).
    pub host: Option<String>,
    /// The answer was produced outside this machine.
    pub left_machine: bool,
    /// Why the answer failed (`None` when it completed or was stopped).
    pub failure: Option<String>,
}

/// Finds the conversation of `(channel, external_key)` or creates it.
pub async fn get_or_create_conversation(
    pool: &SqlitePool,
    channel: ChannelKind,
    external_key: &str,
    title: Option<&str>,
) -> Result<Conversation, sqlx::Error> {
    upsert_conversation(pool, channel, external_key, title, now_ms()).await
}

/// `get_or_create_conversation` on `executor` (a pool, or a caller's transaction), with
/// `now` as a new conversation's times.
async fn upsert_conversation<'e>(
    executor: impl sqlx::SqliteExecutor<'e>,
    channel: ChannelKind,
    external_key: &str,
    title: Option<&str>,
    now: i64,
) -> Result<Conversation, sqlx::Error> {
    // The no-op update makes RETURNING yield the existing row on conflict, in one statement.
    let row: ConversationRow = sqlx::query_as(
        "INSERT INTO conversations (channel, external_key, title, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (channel, external_key) DO UPDATE SET channel = excluded.channel
         RETURNING id, channel, external_key, title, created_at, updated_at",
    )
    .bind(channel.as_str())
    .bind(external_key)
    .bind(title)
    .bind(now)
    .fetch_one(executor)
    .await?;
    row.try_into()
}

/// A fresh random key for a new WebChat conversation.
fn new_webchat_key() -> String {
    format!("wc-{:016x}", rand::random::<u64>())
}

/// The conversation of `(channel, external_key)`, if it exists (nothing is created).
pub async fn find_conversation(
    pool: &SqlitePool,
    channel: ChannelKind,
    external_key: &str,
) -> Result<Option<Conversation>, sqlx::Error> {
    let row: Option<ConversationRow> = sqlx::query_as(
        "SELECT id, channel, external_key, title, created_at, updated_at
         FROM conversations WHERE channel = ?1 AND external_key = ?2",
    )
    .bind(channel.as_str())
    .bind(external_key)
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// Creates a new WebChat conversation with a fresh random key.
pub async fn create_webchat_conversation(
    pool: &SqlitePool,
    title: Option<&str>,
) -> Result<Conversation, sqlx::Error> {
    get_or_create_conversation(pool, ChannelKind::WebChat, &new_webchat_key(), title).await
}

/// `create_webchat_conversation` with `first` (its conversation id is replaced) as its
/// first message, in one transaction: a write refused halfway (a full disk) leaves no
/// empty conversation behind.
pub async fn create_webchat_conversation_with(
    pool: &SqlitePool,
    title: Option<&str>,
    first: &NewMessage,
) -> Result<(Conversation, MessageId), sqlx::Error> {
    let now = now_ms();
    let mut tx = crate::db::begin_write(pool).await?;
    let conversation =
        upsert_conversation(&mut *tx, ChannelKind::WebChat, &new_webchat_key(), title, now).await?;
    let first = NewMessage { conversation_id: conversation.id, ..first.clone() };
    let id = insert_message(&mut tx, &first, &[], None, now).await?;
    tx.commit().await?;
    Ok((conversation, id))
}

pub async fn get_conversation(
    pool: &SqlitePool,
    id: ConversationId,
) -> Result<Option<Conversation>, sqlx::Error> {
    let row: Option<ConversationRow> = sqlx::query_as(
        "SELECT id, channel, external_key, title, created_at, updated_at
         FROM conversations WHERE id = ?1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// Conversations, most recently active first.
pub async fn list_conversations(
    pool: &SqlitePool,
    limit: i64,
) -> Result<Vec<ConversationSummary>, sqlx::Error> {
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT c.id, c.channel, c.external_key, c.title, c.created_at, c.updated_at,
                (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count,
                EXISTS (SELECT 1 FROM messages m
                        WHERE m.conversation_id = c.id AND m.left_machine = 1) AS left_machine
         FROM conversations c
         ORDER BY c.updated_at DESC, c.id DESC
         LIMIT ?1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(ConversationSummary {
                message_count: row.message_count,
                left_machine: row.left_machine,
                conversation: ConversationRow {
                    id: row.id,
                    channel: row.channel,
                    external_key: row.external_key,
                    title: row.title,
                    created_at: row.created_at,
                    updated_at: row.updated_at,
                }
                .try_into()?,
            })
        })
        .collect()
}

/// Renames a conversation; false when it does not exist.
pub async fn rename_conversation(
    pool: &SqlitePool,
    id: ConversationId,
    title: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE conversations SET title = ?1, updated_at = ?2 WHERE id = ?3")
        .bind(title)
        .bind(now_ms())
        .bind(id.0)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes a conversation and its messages; false when it does not exist.
pub async fn delete_conversation(
    pool: &SqlitePool,
    id: ConversationId,
) -> Result<bool, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM conversations WHERE id = ?1").bind(id.0).execute(pool).await?;
    Ok(done.rows_affected() == 1)
}

/// Stores a message and bumps its conversation's activity time, in one transaction.
pub async fn add_message(pool: &SqlitePool, msg: &NewMessage) -> Result<MessageId, sqlx::Error> {
    add_message_with_rounds(pool, msg, &[]).await
}

/// `add_message` for an answer with the tool rounds that produced it (stored in the same
/// row: one answer is one message, whatever tools it used).
pub async fn add_message_with_rounds(
    pool: &SqlitePool,
    msg: &NewMessage,
    rounds: &[ToolRound],
) -> Result<MessageId, sqlx::Error> {
    add_answer(pool, msg, rounds, None).await
}

/// `add_message_with_rounds` for an answer that may have failed: `failure` says why. An
/// assistant message ends the answer being written in its conversation: its draft (see
/// `db::drafts`) goes in the same transaction, so a crash never leaves both.
pub async fn add_answer(
    pool: &SqlitePool,
    msg: &NewMessage,
    rounds: &[ToolRound],
    failure: Option<&str>,
) -> Result<MessageId, sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let id = insert_message(&mut tx, msg, rounds, failure, now_ms()).await?;
    if msg.role == Role::Assistant {
        crate::db::drafts::discard_in(&mut tx, msg.conversation_id).await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// The stored text of an answer that produced none: what the page shows for it (the model
/// never sees it: `error` answers are left out of prompts).
pub fn no_answer_text(reason: &str) -> String {
    format!("(no answer: {reason})")
}

/// Inserts a message written at `created_at` and bumps its conversation's activity time to
/// it, inside the caller's write transaction.
pub(crate) async fn insert_message(
    conn: &mut sqlx::SqliteConnection,
    msg: &NewMessage,
    rounds: &[ToolRound],
    failure: Option<&str>,
    created_at: i64,
) -> Result<MessageId, sqlx::Error> {
    let rounds_json = rounds_to_json(rounds);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO messages (conversation_id, role, content, tier, provider, model,
                               prompt_tokens, completion_tokens, status, external_id, created_at,
                               tool_rounds, host, left_machine, failure)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
         RETURNING id",
    )
    .bind(msg.conversation_id.0)
    .bind(msg.role.as_str())
    .bind(&msg.content)
    .bind(&msg.tier)
    .bind(&msg.provider)
    .bind(&msg.model)
    .bind(msg.prompt_tokens)
    .bind(msg.completion_tokens)
    .bind(msg.status.as_str())
    .bind(&msg.external_id)
    .bind(created_at)
    .bind(rounds_json)
    .bind(&msg.host)
    .bind(msg.left_machine)
    .bind(failure)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("UPDATE conversations SET updated_at = ?1 WHERE id = ?2")
        .bind(created_at)
        .bind(msg.conversation_id.0)
        .execute(&mut *conn)
        .await?;
    Ok(MessageId(id))
}

/// The `tool_rounds` column's JSON text (see migration 0004), `None` when there are none.
pub fn rounds_to_json(rounds: &[ToolRound]) -> Option<String> {
    if rounds.is_empty() {
        return None;
    }
    let value: Vec<serde_json::Value> = rounds
        .iter()
        .map(|round| {
            serde_json::json!({
                "text": round.text,
                "calls": round.calls.iter().map(|c| serde_json::json!({
                    "id": c.id, "name": c.name, "arguments": c.arguments,
                })).collect::<Vec<_>>(),
                "results": round.results.iter().map(|r| serde_json::json!({
                    "call_id": r.call_id, "content": r.content, "is_error": r.is_error,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Some(serde_json::Value::Array(value).to_string())
}

/// Parses the `tool_rounds` column. A value that does not parse (written by hand, or by a
/// future version) reads as no rounds, logged: the answer's text is still shown and used.
pub fn rounds_from_json(text: Option<&str>) -> Vec<ToolRound> {
    let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
        return Vec::new();
    };
    match serde_json::from_str::<Vec<RoundJson>>(text) {
        Ok(rounds) => rounds
            .into_iter()
            .map(|r| ToolRound {
                text: r.text,
                calls: r
                    .calls
                    .into_iter()
                    .map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments })
                    .collect(),
                results: r
                    .results
                    .into_iter()
                    .map(|r| ToolResult {
                        call_id: r.call_id,
                        content: r.content,
                        is_error: r.is_error,
                    })
                    .collect(),
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable tool rounds in a stored message; ignored");
            Vec::new()
        }
    }
}

#[derive(serde::Deserialize)]
struct RoundJson {
    #[serde(default)]
    text: String,
    #[serde(default)]
    calls: Vec<CallJson>,
    #[serde(default)]
    results: Vec<ResultJson>,
}

#[derive(serde::Deserialize)]
struct CallJson {
    id: String,
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(serde::Deserialize)]
struct ResultJson {
    call_id: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    is_error: bool,
}

/// The last `limit` messages of a conversation, oldest first.
pub async fn history(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    limit: i64,
) -> Result<Vec<StoredMessage>, sqlx::Error> {
    let mut rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1
         ORDER BY id DESC LIMIT ?2"
    ))
    .bind(conversation_id.0)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.reverse();
    rows.into_iter().map(TryInto::try_into).collect()
}

/// How many messages a conversation holds (every role and status): the index the next
/// message will have, which the history window's arithmetic counts in.
pub async fn message_count(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE conversation_id = ?1")
        .bind(conversation_id.0)
        .fetch_one(pool)
        .await
}

/// The messages of a conversation from index `offset` on (0 is its first message), oldest
/// first, at most `limit` of them.
pub async fn messages_from(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    offset: i64,
    limit: i64,
) -> Result<Vec<StoredMessage>, sqlx::Error> {
    let rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ?1
         ORDER BY id LIMIT ?2 OFFSET ?3"
    ))
    .bind(conversation_id.0)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub async fn get_message(
    pool: &SqlitePool,
    id: MessageId,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    let row: Option<MessageRow> =
        sqlx::query_as(&format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"))
            .bind(id.0)
            .fetch_optional(pool)
            .await?;
    row.map(TryInto::try_into).transpose()
}

/// Records the delivery state of one of our outbound messages, found by its channel id.
/// Returns false when no message has that id.
pub async fn set_delivery_status(
    pool: &SqlitePool,
    external_id: &str,
    status: &str,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE messages SET delivery_status = ?1, delivery_error = COALESCE(?2, delivery_error)
         WHERE external_id = ?3",
    )
    .bind(status)
    .bind(error)
    .bind(external_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Records the channel ids of a stored message that went out all at once (`external_ids`, in
/// order: one, or one per part of an answer sent in several) and its delivery state, in one
/// transaction: the first id on the message, and every part's in `message_parts` (numbered
/// after any already there, with no end), where delivery reports of every part find their
/// answer; reports of them that came before (`inbound::keep_early_delivery`) apply then. An
/// answer sent part by part records each part as it goes out instead (`record_message_part`).
pub async fn set_message_parts(
    pool: &SqlitePool,
    id: MessageId,
    external_ids: &[String],
    delivery_status: Option<&str>,
) -> Result<(), sqlx::Error> {
    let Some(first) = external_ids.first() else { return Ok(()) };
    let mut tx = crate::db::begin_write(pool).await?;
    sqlx::query("UPDATE messages SET external_id = ?1, delivery_status = ?2 WHERE id = ?3")
        .bind(first)
        .bind(delivery_status)
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    let mut failures = Vec::new();
    for part in external_ids {
        sqlx::query(&format!(
            "INSERT OR IGNORE INTO message_parts (external_id, message_id, part)
             VALUES (?1, ?2, {NEXT_PART})"
        ))
        .bind(part)
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
        // Reports that came before the id was recorded (see `inbound::keep_early_delivery`).
        failures.extend(inbound::apply_early_deliveries(&mut tx, id, part).await?);
    }
    tx.commit().await?;
    inbound::log_applied_failures(&failures);
    Ok(())
}

/// One part of an answer that its channel accepted, as `message_parts` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePart {
    /// 0 for the first part of the answer.
    pub index: i64,
    /// The channel's id of the part (a wamid, a Talk reference id).
    pub external_id: String,
    /// Where the part ends in the text as its channel sent it (a byte offset, which only that
    /// channel reads); `None` for parts recorded all at once by `set_message_parts`.
    pub sent_through: Option<i64>,
}

/// The next part number of the answer bound as `?2`.
const NEXT_PART: &str =
    "(SELECT COALESCE(MAX(part) + 1, 0) FROM message_parts WHERE message_id = ?2)";

/// Records one part of the answer `id` as soon as its channel accepted it, before the next part
/// is sent, as the answer's next part; the first part's id also goes on the message. Committed
/// when this returns, so that a stop or a failure after any part leaves a record of exactly the
/// parts that went out, and a later try sends only what follows `sent_through`. The delivery
/// state is left alone (the answer is `sent` only once every part went out), but for the
/// reports Meta sent about the part before its id came back to us, applied in the same
/// transaction (`inbound::apply_early_deliveries`: a `failed` one marks the answer failed).
pub async fn record_message_part(
    pool: &SqlitePool,
    id: MessageId,
    external_id: &str,
    sent_through: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let index: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO message_parts (external_id, message_id, part, sent_through)
         VALUES (?1, ?2, {NEXT_PART}, ?3)
         RETURNING part"
    ))
    .bind(external_id)
    .bind(id.0)
    .bind(sent_through)
    .fetch_one(&mut *tx)
    .await?;
    if index == 0 {
        sqlx::query("UPDATE messages SET external_id = ?1 WHERE id = ?2")
            .bind(external_id)
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
    }
    // Meta may have reported on the part before its id came back to us: those reports
    // apply now (see `inbound::keep_early_delivery`).
    let failures = inbound::apply_early_deliveries(&mut tx, id, external_id).await?;
    tx.commit().await?;
    inbound::log_applied_failures(&failures);
    Ok(())
}

/// The recorded parts of the answer `id`, first part first.
pub async fn message_parts(
    pool: &SqlitePool,
    id: MessageId,
) -> Result<Vec<MessagePart>, sqlx::Error> {
    let rows: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT part, external_id, sent_through FROM message_parts
         WHERE message_id = ?1 ORDER BY part",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(index, external_id, sent_through)| MessagePart { index, external_id, sent_through })
        .collect())
}

pub async fn setting_get(pool: &SqlitePool, key: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT value FROM settings WHERE key = ?1")
        .bind(key)
        .fetch_optional(pool)
        .await
}

pub async fn setting_set(pool: &SqlitePool, key: &str, value: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO settings (key, value, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )
    .bind(key)
    .bind(value)
    .bind(now_ms())
    .execute(pool)
    .await?;
    Ok(())
}

const MESSAGE_COLUMNS: &str = "id, conversation_id, role, content, tier, provider, model, \
     prompt_tokens, completion_tokens, status, external_id, delivery_status, delivery_error, created_at, \
     tool_rounds, host, left_machine, failure";

#[derive(sqlx::FromRow)]
struct ConversationRow {
    id: i64,
    channel: String,
    external_key: String,
    title: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<ConversationRow> for Conversation {
    type Error = sqlx::Error;
    fn try_from(row: ConversationRow) -> Result<Self, Self::Error> {
        let channel = ChannelKind::parse(&row.channel).ok_or_else(|| {
            sqlx::Error::Decode(
                format!("unknown channel `{}` in conversations", row.channel).into(),
            )
        })?;
        Ok(Conversation {
            id: ConversationId(row.id),
            channel,
            external_key: row.external_key,
            title: row.title,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: i64,
    channel: String,
    external_key: String,
    title: Option<String>,
    created_at: i64,
    updated_at: i64,
    message_count: i64,
    left_machine: bool,
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    id: i64,
    conversation_id: i64,
    role: String,
    content: String,
    tier: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    status: String,
    external_id: Option<String>,
    delivery_status: Option<String>,
    delivery_error: Option<String>,
    created_at: i64,
    tool_rounds: Option<String>,
    host: Option<String>,
    left_machine: bool,
    failure: Option<String>,
}

impl TryFrom<MessageRow> for StoredMessage {
    type Error = sqlx::Error;
    fn try_from(row: MessageRow) -> Result<Self, Self::Error> {
        let role = Role::parse(&row.role).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown role `{}` in messages", row.role).into())
        })?;
        Ok(StoredMessage {
            id: MessageId(row.id),
            conversation_id: ConversationId(row.conversation_id),
            role,
            content: row.content,
            tier: row.tier,
            provider: row.provider,
            model: row.model,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            status: MessageStatus::parse(&row.status).unwrap_or(MessageStatus::Complete),
            external_id: row.external_id,
            delivery_status: row.delivery_status,
            delivery_error: row.delivery_error,
            created_at: row.created_at,
            tool_rounds: rounds_from_json(row.tool_rounds.as_deref()),
            host: row.host,
            left_machine: row.left_machine,
            failure: row.failure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::db::fresh_test_db as fresh;

    #[tokio::test]
    async fn get_or_create_is_idempotent_per_channel_and_key() {
        let (_dir, pool) = fresh().await;
        let a =
            get_or_create_conversation(&pool, ChannelKind::WhatsApp, "336", None).await.unwrap();
        let b = get_or_create_conversation(&pool, ChannelKind::WhatsApp, "336", Some("x"))
            .await
            .unwrap();
        let c =
            get_or_create_conversation(&pool, ChannelKind::Nextcloud, "336", None).await.unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_eq!(c.channel, ChannelKind::Nextcloud);
        // The title given on a later call does not overwrite the stored one.
        assert_eq!(b.title, None);
    }

    #[tokio::test]
    async fn history_is_the_last_n_in_chronological_order() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, Some("t")).await.unwrap();
        for i in 0..25 {
            let role = if i % 2 == 0 { Role::User } else { Role::Assistant };
            add_message(&pool, &NewMessage::plain(conv.id, role, format!("m{i}"))).await.unwrap();
        }
        let hist = history(&pool, conv.id, 20).await.unwrap();
        let contents: Vec<&str> = hist.iter().map(|m| m.content.as_str()).collect();
        let expected: Vec<String> = (5..25).map(|i| format!("m{i}")).collect();
        assert_eq!(contents, expected);
        assert_eq!(hist[0].role, Role::Assistant);
    }

    #[tokio::test]
    async fn messages_are_counted_and_read_from_an_index() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, Some("t")).await.unwrap();
        let other = create_webchat_conversation(&pool, Some("o")).await.unwrap();
        for i in 0..7 {
            add_message(&pool, &NewMessage::plain(conv.id, Role::User, format!("m{i}")))
                .await
                .unwrap();
            add_message(&pool, &NewMessage::plain(other.id, Role::User, "x")).await.unwrap();
        }
        assert_eq!(message_count(&pool, conv.id).await.unwrap(), 7);
        let from = messages_from(&pool, conv.id, 3, 3).await.unwrap();
        let contents: Vec<&str> = from.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["m3", "m4", "m5"]);
        assert!(messages_from(&pool, conv.id, 7, 10).await.unwrap().is_empty());

        let found = find_conversation(&pool, ChannelKind::WebChat, &conv.external_key).await;
        assert_eq!(found.unwrap().map(|c| c.id), Some(conv.id));
        let missing = find_conversation(&pool, ChannelKind::WhatsApp, &conv.external_key).await;
        assert_eq!(missing.unwrap(), None);
    }

    #[tokio::test]
    async fn ledger_marks_conversations_that_left_the_machine() {
        let (_dir, pool) = fresh().await;
        let local = create_webchat_conversation(&pool, Some("local")).await.unwrap();
        let cloud = create_webchat_conversation(&pool, Some("cloud")).await.unwrap();
        let mut answer = NewMessage::plain(local.id, Role::Assistant, "hi");
        answer.provider = Some("local".into());
        add_message(&pool, &answer).await.unwrap();
        // A remote server on loopback stays on the machine; its host is still recorded.
        answer.provider = Some("openai".into());
        answer.host = Some("127.0.0.1:8000".into());
        let id = add_message(&pool, &answer).await.unwrap();
        let stored = get_message(&pool, id).await.unwrap().expect("stored");
        assert_eq!(stored.host.as_deref(), Some("127.0.0.1:8000"));
        assert!(!stored.left_machine);
        answer.conversation_id = cloud.id;
        answer.provider = Some("zai".into());
        answer.host = Some("api.z.ai".into());
        answer.left_machine = true;
        add_message(&pool, &answer).await.unwrap();
        let list = list_conversations(&pool, 10).await.unwrap();
        assert_eq!(list.len(), 2);
        // Most recently active first.
        assert_eq!(list[0].conversation.id, cloud.id);
        assert!(list[0].left_machine);
        assert!(!list[1].left_machine);
        assert_eq!(list[1].message_count, 2);
    }

    #[tokio::test]
    async fn rename_and_delete_cascade() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        add_message(&pool, &NewMessage::plain(conv.id, Role::User, "x")).await.unwrap();
        assert!(rename_conversation(&pool, conv.id, "Renamed").await.unwrap());
        let got = get_conversation(&pool, conv.id).await.unwrap().unwrap();
        assert_eq!(got.title.as_deref(), Some("Renamed"));
        assert!(delete_conversation(&pool, conv.id).await.unwrap());
        assert!(get_conversation(&pool, conv.id).await.unwrap().is_none());
        assert!(history(&pool, conv.id, 10).await.unwrap().is_empty());
        assert!(!delete_conversation(&pool, conv.id).await.unwrap());
    }

    #[tokio::test]
    async fn settings_round_trip_and_overwrite() {
        let (_dir, pool) = fresh().await;
        assert_eq!(setting_get(&pool, "persona_name").await.unwrap(), None);
        setting_set(&pool, "persona_name", "Claw").await.unwrap();
        setting_set(&pool, "persona_name", "Pince").await.unwrap();
        assert_eq!(setting_get(&pool, "persona_name").await.unwrap().as_deref(), Some("Pince"));
    }

    #[tokio::test]
    async fn delivery_status_is_recorded_by_external_id() {
        let (_dir, pool) = fresh().await;
        let conv =
            get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None).await.unwrap();
        let id =
            add_message(&pool, &NewMessage::plain(conv.id, Role::Assistant, "a")).await.unwrap();
        set_message_parts(&pool, id, &["wamid.X".into()], Some("sent")).await.unwrap();
        assert!(set_delivery_status(&pool, "wamid.X", "failed", Some("131047: re-engagement"))
            .await
            .unwrap());
        assert!(!set_delivery_status(&pool, "wamid.unknown", "read", None).await.unwrap());
        let msg = get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!(msg.delivery_status.as_deref(), Some("failed"));
        assert_eq!(msg.delivery_error.as_deref(), Some("131047: re-engagement"));
    }

    #[tokio::test]
    async fn an_answer_keeps_its_tool_rounds_in_one_row() {
        let (_dir, pool) = fresh().await;
        let conv = create_webchat_conversation(&pool, None).await.unwrap();
        add_message(&pool, &NewMessage::plain(conv.id, Role::User, "what time is it?"))
            .await
            .unwrap();
        let rounds = vec![ToolRound {
            text: "Let me look.".into(),
            calls: vec![ToolCall {
                id: "call_1".into(),
                name: "current_time".into(),
                arguments: r#"{"zone":"Europe/Paris"}"#.into(),
            }],
            results: vec![ToolResult {
                call_id: "call_1".into(),
                content: "{\"error\":\"no \\\"zone\\\"\"}".into(),
                is_error: true,
            }],
        }];
        let answer = NewMessage::plain(conv.id, Role::Assistant, "It is nine.");
        let id = add_message_with_rounds(&pool, &answer, &rounds).await.unwrap();
        let stored = get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!(stored.tool_rounds, rounds);
        assert_eq!(stored.content, "It is nine.");
        // One answer, one row: the rounds do not count as messages.
        assert_eq!(message_count(&pool, conv.id).await.unwrap(), 2);
        let user = &history(&pool, conv.id, 10).await.unwrap()[0];
        assert!(user.tool_rounds.is_empty());
        // A column that does not parse reads as no rounds rather than failing the read.
        assert!(rounds_from_json(Some("not json")).is_empty());
        assert!(rounds_from_json(None).is_empty());
    }

    #[tokio::test]
    async fn health_reports_the_migration_version() {
        let (_dir, pool) = fresh().await;
        let health = crate::db::health(&pool).await.unwrap();
        assert_eq!(
            Some(health.migration_version),
            crate::db::MIGRATOR.iter().map(|m| m.version).max()
        );
        assert_eq!(crate::db::integrity_check(&pool).await.unwrap(), "ok");
    }
}
