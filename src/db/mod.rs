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
pub mod sign_in;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

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

/// Options that create a file readable by our user only (mode 600, whatever the umask).
pub fn private_file_options() -> std::fs::OpenOptions {
    #[allow(unused_mut)]
    let mut options = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

/// Creates the database file with mode 600 if it does not exist yet, or narrows an existing
/// one to 600 (a database made by an older version under umask 022 was 644).
fn make_private(file: &Path) -> std::io::Result<()> {
    let mut options = private_file_options();
    options.write(true).create(true).truncate(false);
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

/// Free space the database's file system must have for the database to count as
/// writable: a turn's rows, their full-text entries and the checkpoint that copies them
/// into the database file, many times over.
pub const WRITE_HEADROOM_BYTES: u64 = 1 << 20;

/// How long the write probe waits for the database's write lock: a lock held longer (a
/// backup tool, `sqlite3` left in a transaction) is reported, not waited out, so health
/// answers within a monitor's timeout.
const PROBE_LOCK_WAIT: Duration = Duration::from_secs(1);

/// One write probe at a time in the process, with the database it probed, when it started
/// and what it found: a health call that arrived before a probe started takes that probe's
/// answer instead of running its own, so a crowd of callers costs one probe and one
/// connection, not a pool's worth.
static LAST_PROBE: tokio::sync::Mutex<Option<Probed>> = tokio::sync::Mutex::const_new(None);

/// The database a write probe looked at, when it started, and what it found.
type Probed = (PathBuf, Instant, Result<(), String>);

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
    let write_error = probe_write_once(pool).await.err();
    Ok(DbHealth { migration_version: version.unwrap_or(0), write_error })
}

/// `probe_write`, shared with the callers that were waiting for it (see `LAST_PROBE`).
async fn probe_write_once(pool: &SqlitePool) -> Result<(), String> {
    let arrived = Instant::now();
    let file = pool.connect_options().get_filename().to_path_buf();
    let mut last = LAST_PROBE.lock().await;
    if let Some((probed, started, found)) = last.as_ref() {
        if *probed == file && *started >= arrived {
            return found.clone();
        }
    }
    let started = Instant::now();
    let found = probe_write(pool).await;
    *last = Some((file, started, found.clone()));
    found
}

/// Whether the database can take a write now, leaving nothing behind; the error says why
/// not. Two probes, since neither sees everything:
/// - SQLite's side, on a connection of its own (the pool's stay free for the requests it
///   reports on), in a transaction that is rolled back (its pages never leave the page
///   cache): the write lock (waiting `PROBE_LOCK_WAIT`), a read-only file, and room for new
///   pages within SQLite's own limit (`max_page_count`).
/// - The file system's free space (`statvfs`): a full disk only shows when bytes are
///   written, which a rolled-back transaction never does.
async fn probe_write(pool: &SqlitePool) -> Result<(), String> {
    use sqlx::{ConnectOptions, Connection};
    let options = (*pool.connect_options()).clone().busy_timeout(PROBE_LOCK_WAIT);
    let sqlite = async {
        let mut conn = options.connect().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await?;
        let wrote = async {
            sqlx::query("CREATE TABLE _health_write_probe (bytes BLOB)").execute(&mut conn).await?;
            // About 17 pages: more than the one a table takes, so a database with a page
            // or two left in its free list does not pass for one that can take a turn.
            sqlx::query("INSERT INTO _health_write_probe VALUES (zeroblob(65536))")
                .execute(&mut conn)
                .await
        }
        .await;
        let rolled_back = sqlx::query("ROLLBACK").execute(&mut conn).await;
        let _ = conn.close().await;
        wrote?;
        rolled_back.map(|_| ())
    };
    if let Err(e) = sqlite.await {
        return Err(format!("the database cannot take a write: {e}"));
    }
    let file = options.get_filename().to_path_buf();
    // An in-memory database has no file and no disk.
    if !file.is_file() {
        return Ok(());
    }
    let dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    check_space(&dir, WRITE_HEADROOM_BYTES)
}

/// Whether the file system that holds `dir` has `needed` bytes free; the error says how
/// much it has.
fn check_space(dir: &Path, needed: u64) -> Result<(), String> {
    match free_space(dir) {
        Ok(free) if free >= needed => Ok(()),
        Ok(free) => Err(format!(
            "the disk that holds the database is full: {} KiB free in {}, under the {} KiB \
             a turn needs",
            free / 1024,
            dir.display(),
            needed / 1024
        )),
        Err(e) => Err(format!("the free space of {} cannot be read: {e}", dir.display())),
    }
}

/// Bytes an unprivileged process can still write on the file system that holds `dir`
/// (`statvfs`'s available blocks: the blocks reserved for root are not ours).
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
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

    /// A full disk cannot be made in a test: the free space is read for real (`statvfs`)
    /// and compared with what a turn needs, here more than any disk has, then one byte.
    /// Before, health said the database was fine while no write could land.
    #[tokio::test]
    async fn health_says_when_the_disk_has_no_room_for_a_turn() {
        let (dir, pool) = fresh_test_db().await;
        let free = free_space(dir.path()).expect("statvfs");
        assert!(free > 0, "{free}");
        assert_eq!(check_space(dir.path(), 1), Ok(()));
        let full = check_space(dir.path(), u64::MAX).unwrap_err();
        assert!(full.starts_with("the disk that holds the database is full: "), "{full}");
        assert!(full.contains(&dir.path().display().to_string()), "{full}");
        // A database that can take a write says so, and the probe leaves nothing behind.
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let before = listing();
        assert_eq!(health(&pool).await.unwrap().write_error, None);
        assert_eq!(listing(), before);
    }

    /// A write lock held by another process is reported after `PROBE_LOCK_WAIT` (1 s), not
    /// the pool's 5 s busy timeout, to a crowd of health calls at once (QA pass 11: each
    /// took 5 s and held a pool connection meanwhile).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_write_lock_is_reported_quickly_to_every_caller() {
        use sqlx::Connection;
        let (dir, pool) = fresh_test_db().await;
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut other).await.unwrap();
        let started = Instant::now();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { health(&pool).await.unwrap().write_error })
            })
            .collect();
        for call in calls {
            let error = call.await.unwrap().expect("the lock is seen");
            assert!(error.contains("database is locked"), "{error}");
        }
        // Well under the 5 s a probe through the pool waits.
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
        assert_eq!(health(&pool).await.unwrap().write_error, None);
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
