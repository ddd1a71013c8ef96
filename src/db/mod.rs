//! SQLite storage: the pool, its pragmas, the embedded migrations and a health probe.
//! Only `db/` contains SQL; callers get plain structs back, never rows.

pub mod cron;
pub mod export;
pub mod inbound;
pub mod memory;
pub mod message_edits;
pub mod search;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

/// The migrations in `./migrations`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens (creating if needed) the database at `url` and applies pending migrations.
///
/// WAL lets the WebChat read while a webhook writes; `synchronous = NORMAL` under WAL keeps
/// every committed transaction across a process crash (`kill -9`), and only risks the
/// last commits on a power loss, which is the usual trade-off for a single-user server.
pub async fn connect(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// What `/api/health` reports about the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbHealth {
    pub migration_version: i64,
}

/// A real round trip: `SELECT 1` and the latest applied migration.
pub async fn health(pool: &SqlitePool) -> Result<DbHealth, sqlx::Error> {
    let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(pool).await?;
    if one != 1 {
        return Err(sqlx::Error::Protocol("SELECT 1 returned something else".into()));
    }
    let version: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(pool)
            .await?;
    Ok(DbHealth { migration_version: version.unwrap_or(0) })
}

/// Runs SQLite's own consistency check; `"ok"` when the file is sound.
pub async fn integrity_check(pool: &SqlitePool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("PRAGMA integrity_check").fetch_one(pool).await
}

/// Current time as Unix milliseconds, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A fresh database file with migrations applied, for unit tests of the query modules.
#[cfg(test)]
pub(crate) async fn fresh_test_db() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let pool = connect(&url).await.expect("open db");
    (dir, pool)
}
