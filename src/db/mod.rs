//! SQLite storage: the pool, its pragmas, the embedded migrations, a health probe, and
//! the file modes that keep the database private (600). Only `db/` contains SQL; callers
//! get plain structs back, never rows.

pub mod cron;
pub mod drafts;
pub mod export;
pub mod import;
pub mod inbound;
pub mod memory;
pub mod message_edits;
pub mod search;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    SqliteTransactionManager,
};
use sqlx::{SqlitePool, TransactionManager};

/// The migrations in `./migrations`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Opens (creating if needed) the database at `url` and applies pending migrations. Drafts
/// of answers are left alone: another process (a test, a tool) may open the database of a
/// server that is answering, and only the server, before it serves, knows that every draft
/// is a left-over (`drafts::recover`, called by `app::serve`).
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
        if file.metadata().is_ok_and(|m| m.len() > 0) {
            refuse_foreign(&file).await?;
        }
        make_private(&file).map_err(sqlx::Error::Io)?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .before_acquire(|conn, _| {
            Box::pin(async move {
                // SQLite ends a transaction by itself when a COMMIT meets a full disk or an
                // I/O error; sqlx still counts it open, its ROLLBACK fails, and the
                // connection would refuse every later BEGIN until a restart. sqlx's own
                // ping on release has run the rollback a dropped transaction queued, so a
                // connection still counted in a transaction here is closed, not handed out.
                Ok(SqliteTransactionManager::get_transaction_depth(conn) == 0)
            })
        })
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

/// Looks at an existing database file read-only before anything changes it (its mode, its
/// journal, our migrations): another application's SQLite file, or one written by a newer
/// my-claw, is refused with a line that says so, untouched.
async fn refuse_foreign(file: &Path) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let options = SqliteConnectOptions::new().filename(file).read_only(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&mut conn)
            .await?;
    let refusal = if tables.is_empty() {
        None
    } else if !tables.iter().any(|t| t == "_sqlx_migrations") {
        Some(format!(
            "{} is not a my-claw database (it has tables but no my-claw migrations): point \
             DATA_DIR or DATABASE_URL at my-claw's own file",
            file.display()
        ))
    } else {
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
                .fetch_one(&mut conn)
                .await?;
        let known = MIGRATOR.migrations.iter().map(|m| m.version).max().unwrap_or(0);
        newest.filter(|&newest| newest > known).map(|newest| {
            format!(
                "{} was written by a newer my-claw (migration {newest}; this one knows up to \
                 {known}): run that version, or restore a backup made by this one",
                file.display()
            )
        })
    };
    conn.close().await?;
    match refusal {
        Some(reason) => Err(sqlx::Error::Configuration(reason.into())),
        None => Ok(()),
    }
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
    /// Why the database cannot take a write now (a full disk, a read-only file, a write
    /// lock held elsewhere); `None` when it can.
    pub write_error: Option<String>,
}

/// Room a file beside the database must be able to take for the database to count as
/// writable: a turn's rows, their full-text entries and the checkpoint that copies them
/// into the database file, many times over.
pub const WRITE_HEADROOM_BYTES: usize = 1 << 20;

/// A real round trip: `SELECT 1` and the latest applied migration; then whether a write
/// would be taken (`probe_write`). An error means the database cannot even be read.
pub async fn health(pool: &SqlitePool) -> Result<DbHealth, sqlx::Error> {
    let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(pool).await?;
    if one != 1 {
        return Err(sqlx::Error::Protocol("SELECT 1 returned something else".into()));
    }
    let version: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(pool)
            .await?;
    let write_error = probe_write(pool).await.err();
    Ok(DbHealth { migration_version: version.unwrap_or(0), write_error })
}

/// Whether the database can take a write now, leaving nothing behind; the error says why
/// not. Two probes, since neither sees everything:
/// - SQLite's side, in a transaction that is rolled back (its pages never leave the page
///   cache): the write lock (waiting up to the busy timeout), a read-only file, and room for
///   new pages within SQLite's own limit (`max_page_count`).
/// - The disk's side (`probe_space`): a full file system only shows when bytes are written,
///   which a rolled-back transaction never does, so a file beside the database must take
///   `WRITE_HEADROOM_BYTES`.
async fn probe_write(pool: &SqlitePool) -> Result<(), String> {
    let sqlite = async {
        let mut tx = begin_write(pool).await?;
        // `persistent(false)`: the table exists only inside this transaction, so the
        // statements are not kept in the connection's cache.
        sqlx::query("CREATE TABLE _health_write_probe (bytes BLOB)")
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        // About 17 pages: more than the one a table takes, so a database with a page or two
        // left in its free list does not pass for one that can take a turn.
        sqlx::query("INSERT INTO _health_write_probe VALUES (zeroblob(65536))")
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        tx.rollback().await
    };
    if let Err(e) = sqlite.await {
        return Err(format!("the database cannot take a write: {e}"));
    }
    let file = pool.connect_options().get_filename().to_path_buf();
    // An in-memory database has no file and no disk.
    if !file.is_file() {
        return Ok(());
    }
    let dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let probed = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || probe_space(&dir, WRITE_HEADROOM_BYTES)).await
    };
    match probed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "the disk that holds the database cannot take {} KiB more in {} ({e})",
            WRITE_HEADROOM_BYTES / 1024,
            dir.display()
        )),
        Err(join) => Err(format!("the disk probe failed: {join}")),
    }
}

/// Checks that a file in `dir` can grow by `bytes`: writes them to a new file that is
/// removed before the first byte is written, so its space goes back when it closes and a
/// crash midway leaves at most an empty `.space-probe` (truncated and removed by the next
/// probe). Nothing is synced: the file system reserves the room at `write` (ext4, XFS,
/// tmpfs), and nothing reaches the disk. Copy-on-write file systems (btrfs, ZFS) may only
/// find a full disk at write-back, which this does not wait for.
fn probe_space(dir: &Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".space-probe");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path)?;
    match std::fs::remove_file(&path) {
        // A probe running beside this one removed it first.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n])?;
        left -= n;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use sqlx::migrate::Migrator;

    use super::*;
    use crate::db::memory::{self, NewMessage};
    use crate::domain::{ConversationId, Role};

    /// Another application's SQLite file, or one from a newer my-claw, is refused before
    /// anything changes it (its mode, its journal, our migrations table). Before, a failed
    /// start on another app's file left our migrations table in it, WAL on and mode 600.
    #[tokio::test]
    async fn a_foreign_or_newer_database_is_refused_untouched() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("other.db");
        {
            let options = SqliteConnectOptions::new().filename(&foreign).create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.unwrap();
            sqlx::query("CREATE TABLE notes (body TEXT)").execute(&pool).await.unwrap();
            pool.close().await;
        }
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = std::fs::read(&foreign).unwrap();
        let err = connect(&format!("sqlite://{}", foreign.display())).await.unwrap_err();
        assert!(err.to_string().contains("is not a my-claw database"), "{err}");
        assert_eq!(std::fs::read(&foreign).unwrap(), before, "the file is untouched");
        let mode = std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);

        let (dir, pool) = fresh_test_db().await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let err = connect(&url).await.unwrap_err().to_string();
        assert!(err.contains("written by a newer my-claw (migration 9999"), "{err}");
        // Our own database opens again and again.
        let (dir, pool) = fresh_test_db().await;
        pool.close().await;
        connect(&format!("sqlite://{}", dir.path().join("t.db").display())).await.unwrap();
    }

    /// When SQLite ends a transaction by itself (a COMMIT that meets a full disk, or an I/O
    /// error, rolls it back) sqlx still counts it open: its own ROLLBACK then fails, and
    /// that connection refused every later `BEGIN` ("non-zero transaction depth") until a
    /// restart, so with space back most writes still failed (QA pass 10). The state is made
    /// here the way SQLite makes it, by a ROLLBACK sqlx does not see.
    #[tokio::test]
    async fn a_transaction_sqlite_ended_by_itself_leaves_the_pool_usable() {
        let (_dir, pool) = fresh_test_db().await;
        let conversation = memory::create_webchat_conversation(&pool, None).await.unwrap();
        for _ in 0..3 {
            let mut tx = begin_write(&pool).await.unwrap();
            sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
            let err = tx.commit().await.expect_err("no transaction is active");
            assert!(err.to_string().contains("no transaction is active"), "{err}");
        }
        for n in 0..20 {
            memory::add_message(
                &pool,
                &NewMessage::plain(conversation.id, Role::User, format!("after {n}")),
            )
            .await
            .unwrap_or_else(|e| panic!("write {n} after the failed one: {e}"));
        }
    }

    /// A full disk cannot be made in a test, so a file size limit stands in for it: the
    /// health probe runs in a child (this test binary again) under `ulimit -f` (256 or
    /// 512 KiB: `sh` counts 512- or 1024-byte blocks), with SIGXFSZ ignored so a write past
    /// the limit fails (EFBIG) as one on a full disk does (ENOSPC) instead of killing it.
    /// Reading the database, and SQLite's rolled-back probe, need no room; before, health
    /// said the database was fine while no write could land.
    #[tokio::test]
    async fn health_says_when_no_file_beside_the_database_can_grow() {
        const CHILD: &str = "MY_CLAW_TEST_FSIZE_LIMITED_DB";
        if let Some(url) = std::env::var_os(CHILD) {
            let pool = connect(url.to_str().unwrap()).await.expect("open under the limit");
            let health = health(&pool).await.expect("reads need no room");
            let error = health.write_error.expect("the probe sees the limit");
            println!("write_error: {error}");
            return;
        }
        let (dir, pool) = fresh_test_db().await;
        let health = health(&pool).await.unwrap();
        assert_eq!(health.write_error, None, "without a limit the database takes writes");
        pool.close().await;
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let before = listing();

        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let test_name = "db::tests::health_says_when_no_file_beside_the_database_can_grow";
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 512 && exec \"$0\" \"$@\"")
            .arg(std::env::current_exe().unwrap())
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, &url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        // The harness prints the test's name on the same line first.
        let line = stdout.lines().find(|l| l.contains("write_error: ")).unwrap_or_default();
        assert!(line.contains("the disk that holds the database cannot take 1024 KiB"), "{line}");
        assert!(line.contains("File too large"), "{line}");
        // The probe left nothing beside the database (SQLite's side files come and go
        // with its connections).
        let sqlite_files = |names: Vec<String>| -> Vec<String> {
            names.into_iter().filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm")).collect()
        };
        assert_eq!(sqlite_files(listing()), sqlite_files(before));
    }

    /// Deleting the newest conversation or message does not free its id for the next one.
    #[tokio::test]
    async fn deleted_ids_are_never_given_out_again() {
        let (_dir, pool) = fresh_test_db().await;
        let first = memory::create_webchat_conversation(&pool, Some("a")).await.unwrap();
        let newest = memory::create_webchat_conversation(&pool, Some("b")).await.unwrap();
        let m1 = memory::add_message(&pool, &NewMessage::plain(first.id, Role::User, "x"))
            .await
            .unwrap();
        let m2 = memory::add_message(&pool, &NewMessage::plain(newest.id, Role::User, "y"))
            .await
            .unwrap();
        assert!(memory::delete_conversation(&pool, newest.id).await.unwrap());
        let next = memory::create_webchat_conversation(&pool, Some("c")).await.unwrap();
        assert!(next.id.0 > newest.id.0, "conversation id {} given out again", next.id.0);
        let m3 = memory::add_message(&pool, &NewMessage::plain(first.id, Role::User, "z"))
            .await
            .unwrap();
        assert!(m1.0 < m2.0 && m2.0 < m3.0, "message ids {m1:?} {m2:?} {m3:?}");
    }

    /// A database of the version before 0007, with rows in every table of the rebuilt
    /// chain, comes through the rebuild whole: the same rows and ids, the references and
    /// their cascades, the full-text index, and the ids a job still names kept out of use.
    #[tokio::test]
    async fn the_autoincrement_rebuild_keeps_every_row_and_reference() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        let before = Migrator {
            migrations: Cow::Owned(
                MIGRATOR.migrations.iter().filter(|m| m.version < 7).cloned().collect(),
            ),
            ..Migrator::DEFAULT
        };
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true);
        let old = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        before.run(&old).await.unwrap();
        for statement in [
            "INSERT INTO conversations VALUES (1, 'webchat', 'w1', 'one', 1, 1),
                                              (2, 'webchat', 'w2', 'two', 1, 1),
                                              (5, 'whatsapp', '336', NULL, 1, 1)",
            "INSERT INTO messages (id, conversation_id, role, content, created_at, external_id,
                                   delivery_status, tool_rounds, host, left_machine)
             VALUES (1, 1, 'user', 'un café crème', 1, NULL, NULL, NULL, NULL, 0),
                    (2, 1, 'assistant', 'voilà', 2, NULL, NULL, '[]', 'api.z.ai', 1),
                    (7, 2, 'user', 'zebra crossing', 3, NULL, NULL, NULL, NULL, 0),
                    (9, 5, 'assistant', 'sent', 4, 'wamid.X', 'read', NULL, NULL, 0)",
            // A job still aimed at conversation 12, deleted before the migration.
            "INSERT INTO cron_jobs (id, name, schedule, prompt, channel, target, created_at,
                                    updated_at)
             VALUES (3, 'daily', '@daily', 'p', 'webchat', '12', 1, 1)",
            "INSERT INTO cron_jobs (id, name, schedule, prompt, channel, target, created_at,
                                    updated_at, kind, conversation_id)
             VALUES (4, '', '@daily', 'plumber', 'webchat', '1', 1, 1, 'reminder', 1)",
            "INSERT INTO cron_runs VALUES (6, 3, 1, 5, 'delivered', NULL, 2)",
        ] {
            sqlx::query(statement).execute(&old).await.unwrap();
        }
        old.close().await;

        let pool = connect(&url).await.expect("migrate to the newest version");
        let schema: String =
            sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'conversations'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(schema.contains("AUTOINCREMENT"), "{schema}");
        assert_eq!(integrity_check(&pool).await.unwrap(), "ok");
        let broken: Vec<(String, i64)> =
            sqlx::query_as("SELECT \"table\", rowid FROM pragma_foreign_key_check")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(broken.is_empty(), "{broken:?}");
        let leftovers: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE '%_old'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(leftovers, 0);

        // Every row, with its id and columns.
        let ids = |table: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM {table} ORDER BY id"))
                    .fetch_all(&pool)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(ids("conversations").await, [1, 2, 5]);
        assert_eq!(ids("messages").await, [1, 2, 7, 9]);
        assert_eq!(ids("cron_jobs").await, [3, 4]);
        let answer =
            memory::get_message(&pool, crate::domain::MessageId(2)).await.unwrap().unwrap();
        assert_eq!((answer.host.as_deref(), answer.left_machine), (Some("api.z.ai"), true));
        let sent = memory::get_message(&pool, crate::domain::MessageId(9)).await.unwrap().unwrap();
        assert_eq!(sent.delivery_status.as_deref(), Some("read"));
        let run: Option<i64> = sqlx::query_scalar("SELECT message_id FROM cron_runs WHERE id = 6")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(run, Some(2), "the run lost its answer");

        // The full-text index still finds the old messages, and indexes new ones.
        let hits = search::search_messages(&pool, "cafe", 10).await.unwrap();
        assert_eq!(hits.iter().map(|h| h.message_id).collect::<Vec<_>>(), [1]);
        let new = NewMessage::plain(ConversationId(2), Role::User, "another zebra");
        let new_id = memory::add_message(&pool, &new).await.unwrap();
        assert_eq!(new_id.0, 10);
        let hits = search::search_messages(&pool, "zebra", 10).await.unwrap();
        assert_eq!(hits.len(), 2);

        // The cascades hold on the new tables: conversation 1 takes its messages and its
        // reminder along, and the run only loses its link to the answer.
        assert!(memory::delete_conversation(&pool, ConversationId(1)).await.unwrap());
        assert_eq!(ids("messages").await, [7, 9, 10]);
        assert_eq!(ids("cron_jobs").await, [3]);
        let run: Option<i64> = sqlx::query_scalar("SELECT message_id FROM cron_runs WHERE id = 6")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(run, None);
        assert!(search::search_messages(&pool, "cafe", 10).await.unwrap().is_empty());

        // The next conversation takes neither a deleted id nor the one the job names.
        let next = memory::create_webchat_conversation(&pool, None).await.unwrap();
        assert_eq!(next.id.0, 13);
    }
}
