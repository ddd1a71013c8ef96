//! SQLite storage: the pool, its pragmas, the embedded migrations, a health probe, and the
//! file modes that keep the database private (600). Only `db/` contains SQL; callers get
//! plain structs back, never rows.

pub mod cron;
pub mod export;
pub mod inbound;
pub mod memory;
pub mod message_edits;
pub mod search;

use std::path::Path;
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
///
/// The database holds every conversation and phone number, so its file is made private
/// (mode 600) before SQLite opens it, whatever the umask. SQLite gives the `-wal` and `-shm`
/// files it creates the mode of the database file (`findCreateFileMode` in its unix VFS), and
/// ones left by an older version with wider modes are tightened after the open.
pub async fn connect(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let file = options.get_filename().to_path_buf();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    let on_disk = !in_memory && !file.as_os_str().is_empty();
    if on_disk {
        make_private(&file).map_err(sqlx::Error::Io)?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    if on_disk {
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut side = file.clone().into_os_string();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            if side.exists() {
                set_private_mode(&side, 0o600).map_err(sqlx::Error::Io)?;
            }
        }
    }
    Ok(pool)
}

/// Starts a transaction that writes. `BEGIN IMMEDIATE` takes the write lock at once, waiting
/// for it under the busy timeout; a plain (deferred) `BEGIN` takes a read snapshot first and,
/// when another connection commits before the first write, SQLite answers "database is
/// locked" at once without waiting (the busy handler cannot help a stale snapshot). Every
/// transaction that writes starts here.
pub async fn begin_write(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Creates the database file with mode 600 if it does not exist yet, or narrows an existing
/// one to 600 (a database made by an older version under umask 022 was 644).
fn make_private(file: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(file) {
        Ok(_) => set_private_mode(file, 0o600),
        // A missing parent directory: let SQLite report it in its own words.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets `mode` on `path` (unix only; elsewhere the platform's defaults stand).
pub fn set_private_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = (path, mode);
        Ok(())
    }
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
