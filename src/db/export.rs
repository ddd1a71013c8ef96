//! Reading everything out: conversations and their messages page by page (keyset paging,
//! so an export of any size holds one page in memory), and a consistent copy of the whole
//! database file (`VACUUM INTO`) for backups. Read-only towards the live data.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqlitePool};

use crate::domain::ConversationId;

/// A conversation as exported: every stored field.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExportConversation {
    pub id: i64,
    pub channel: String,
    /// The channel's key: a phone number, a Talk room token, a WebChat id.
    pub external_key: String,
    pub title: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A message as exported: its text and its privacy ledger.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ExportMessage {
    pub id: i64,
    pub role: String,
    pub content: String,
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub status: String,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub created_at: i64,
    /// The tool calls made for this answer and their results (the privacy ledger of tool
    /// use): the `tool_rounds` JSON text of migration 0004, `None` when it used none.
    pub tool_rounds: Option<String>,
    /// The machine that wrote an answer over the network (`gpu-box:8000`, `api.z.ai`).
    pub host: Option<String>,
    /// Whether the answer was written on another machine (the privacy ledger).
    pub left_machine: bool,
    /// Why an answer failed or was cut by a shutdown (migration 0009); `None` when it
    /// completed or the user stopped it.
    pub failure: Option<String>,
}

/// What a backup copy holds, checked on the copy itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub integrity: String,
    pub conversations: i64,
    pub messages: i64,
}

pub async fn get_conversation(
    pool: &SqlitePool,
    id: ConversationId,
) -> Result<Option<ExportConversation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, channel, external_key, title, created_at, updated_at
         FROM conversations WHERE id = ?1",
    )
    .bind(id.0)
    .fetch_optional(pool)
    .await
}

/// Up to `limit` conversations with an id above `after_id`, by id.
pub async fn conversations_after(
    pool: &SqlitePool,
    after_id: i64,
    limit: i64,
) -> Result<Vec<ExportConversation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, channel, external_key, title, created_at, updated_at
         FROM conversations WHERE id > ?1 ORDER BY id LIMIT ?2",
    )
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Up to `limit` messages of a conversation with an id above `after_id`, oldest first.
pub async fn messages_after(
    pool: &SqlitePool,
    conversation_id: ConversationId,
    after_id: i64,
    limit: i64,
) -> Result<Vec<ExportMessage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, role, content, tier, provider, model, status, prompt_tokens,
                completion_tokens, created_at, tool_rounds, host, left_machine, failure
         FROM messages WHERE conversation_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
    )
    .bind(conversation_id.0)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Writes a consistent copy of the database into `target`, which must not exist or be an
/// empty file (the caller creates it with private permissions first). `VACUUM INTO` reads
/// one snapshot, so writers carry on meanwhile and the copy holds every transaction
/// committed before it started.
pub async fn vacuum_into(pool: &SqlitePool, target: &Path) -> Result<(), sqlx::Error> {
    let target = target
        .to_str()
        .ok_or_else(|| sqlx::Error::Configuration("the backup path is not valid UTF-8".into()))?;
    sqlx::query("VACUUM INTO ?1").bind(target).execute(pool).await?;
    Ok(())
}

/// Opens an existing database for reading out, without creating it or running migrations
/// (a backup must never change the file it copies).
pub async fn open_existing(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(false)
        .busy_timeout(std::time::Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await
}

/// The file a `sqlite:` URL names.
pub fn database_file(url: &str) -> Result<PathBuf, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str(url)?.get_filename().to_path_buf())
}

/// Checks a copy: SQLite's integrity check and what it holds.
pub async fn check_copy(path: &Path) -> Result<BackupSummary, sqlx::Error> {
    // Immutable: no lock files and no `-shm` beside the copy, whose mode we set.
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true)
        .connect()
        .await?;
    let integrity: String =
        sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut conn).await?;
    let conversations: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM conversations").fetch_one(&mut conn).await?;
    let messages: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM messages").fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(BackupSummary { integrity, conversations, messages })
}
