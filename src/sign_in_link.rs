//! `my-claw sign-in-link`: writes a one-time sign-in code into the database and prints the
//! link that carries it, for a server started under systemd (whose start prints no link) or
//! a second device. Whoever may write the database (mode 600 in a private data directory)
//! may make a code: nothing goes over the network and the token is neither read nor sent,
//! so whatever listens on `BIND` learns nothing; the link never holds the token.
//!
//! Owns this command's checks and error texts. It writes one row (`db::sign_in::issue`) into
//! an existing database of its own version, and must not create, migrate or otherwise change
//! anything in the data directory.

use std::path::{Path, PathBuf};

use crate::config::Settings;
use crate::db::sign_in::Issued;
use crate::gateway::sign_in::CODE_LIFETIME;

#[derive(Debug, thiserror::Error)]
pub enum SignInLinkError {
    #[error(
        "there is no database at {0}: start my-claw once (with this DATA_DIR or \
         DATABASE_URL), then run sign-in-link again"
    )]
    NoDatabase(PathBuf),
    /// Anything but "not found" when looking for the file (a data directory of another
    /// user, mode 700: permission denied): starting my-claw would not help.
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: std::io::Error },
    // The causes are part of the one line, not `source`s: the exit message prints an error's
    // chain, which would say each of them twice.
    #[error("cannot open the database {url}: {reason}")]
    Open { url: String, reason: sqlx::Error },
    #[error(
        "{0} is not a my-claw database (it has no my-claw migrations): point DATA_DIR or \
         DATABASE_URL at my-claw's own file"
    )]
    NotMyClaw(PathBuf),
    #[error(
        "{file} is at migration {found} and this my-claw needs {needed}: start (or restart) \
         my-claw with this version once, which upgrades it, then run sign-in-link again"
    )]
    Older { file: PathBuf, found: i64, needed: i64 },
    #[error(
        "{file} was written by a newer my-claw (migration {found}; this one knows up to \
         {known}): run that version's sign-in-link"
    )]
    Newer { file: PathBuf, found: i64, known: i64 },
    #[error("cannot tell whether my-claw is serving from {path}: {reason}")]
    Lock { path: PathBuf, reason: std::io::Error },
    #[error("cannot write the sign-in code into {file}: {reason}")]
    Issue { file: PathBuf, reason: sqlx::Error },
}

/// What the command made: the link, and whether a server is there to take it.
#[derive(Debug)]
pub struct SignInLink {
    pub link: String,
    /// Whether a `my-claw serve` holds the database now (its lock, `my-claw.db.lock`).
    pub server_running: bool,
    /// Older links that stopped working to make room for this one (see
    /// `db::sign_in::MAX_LIVE_CODES`).
    pub cancelled: u64,
    database: PathBuf,
}

impl SignInLink {
    /// The line for the person who asked: how long the link works, and whether it needs a
    /// server started first; and, on a line of its own, whether it cancelled an older link.
    pub fn note(&self) -> String {
        match cancelled_note(self.cancelled) {
            Some(cancelled) => format!("{}\n{cancelled}", self.lifetime_note()),
            None => self.lifetime_note(),
        }
    }

    fn lifetime_note(&self) -> String {
        let minutes = CODE_LIFETIME.as_secs() / 60;
        if self.server_running {
            format!("(it signs one browser in, once, within {minutes} minutes)")
        } else {
            format!(
                "(no my-claw is serving from {} now: the link signs one browser in, once, if \
                 my-claw is started within {minutes} minutes)",
                self.database.display()
            )
        }
    }
}

/// The line that says a new code cancelled `cancelled` live ones, `None` when it cancelled
/// none. Without it, an older link's "already used or has expired" would be untrue.
pub fn cancelled_note(cancelled: u64) -> Option<String> {
    let bound = crate::db::sign_in::MAX_LIVE_CODES;
    match cancelled {
        0 => None,
        1 => Some(format!("(this cancelled the oldest unused link: at most {bound} work at once)")),
        n => Some(format!(
            "(this cancelled the {n} oldest unused links: at most {bound} work at once)"
        )),
    }
}

/// Writes a new code into the existing database and returns the link that carries it.
pub async fn run(settings: &Settings) -> Result<SignInLink, SignInLinkError> {
    let url = &settings.database_url;
    let database = crate::db::export::database_file(url)
        .map_err(|reason| SignInLinkError::Open { url: url.clone(), reason })?;
    // Checked before anything is opened, so a mistyped DATA_DIR leaves nothing behind.
    check_database(&database)?;
    let server_running = serving(&database)?;
    let pool = crate::db::export::open_existing(url)
        .await
        .map_err(|reason| SignInLinkError::Open { url: url.clone(), reason })?;
    let issued = issue_if_current(&pool, &database).await;
    pool.close().await;
    let issued = issued?;
    let host = if settings.bind.ip().is_unspecified() {
        format!("127.0.0.1:{}", settings.bind.port())
    } else {
        settings.bind.to_string()
    };
    let link = crate::app::sign_in_url(&host, issued.code.expose());
    Ok(SignInLink { link, server_running, cancelled: issued.cancelled, database })
}

/// Whether `database` is a file to open: missing (a mistyped DATA_DIR, or my-claw never
/// started) is told apart from unreadable (permission denied on the data directory, a path
/// through a regular file), whose cause is said as it is.
fn check_database(database: &Path) -> Result<(), SignInLinkError> {
    match std::fs::metadata(database) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(SignInLinkError::NoDatabase(database.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(SignInLinkError::NoDatabase(database.to_path_buf()))
        }
        Err(reason) => Err(SignInLinkError::Unreadable { path: database.to_path_buf(), reason }),
    }
}

/// A new code, in a database whose schema is this binary's. The command never migrates: a
/// server of an older version may be serving from the file, and changing its schema under it
/// is `serve`'s decision (at its start) alone; and a link is of use only once a server of
/// this version runs, whose start upgrades the file anyway.
async fn issue_if_current(
    pool: &sqlx::SqlitePool,
    database: &Path,
) -> Result<Issued, SignInLinkError> {
    let file = database.to_path_buf();
    let found = crate::db::sign_in::schema_version(pool)
        .await
        .map_err(|reason| SignInLinkError::Issue { file: file.clone(), reason })?;
    let known = crate::db::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    match found {
        None => return Err(SignInLinkError::NotMyClaw(file)),
        Some(found) if found < known => {
            return Err(SignInLinkError::Older { file, found, needed: known })
        }
        Some(found) if found > known => return Err(SignInLinkError::Newer { file, found, known }),
        Some(_) => {}
    }
    crate::db::sign_in::issue_counted(pool, CODE_LIFETIME)
        .await
        .map_err(|reason| SignInLinkError::Issue { file, reason })
}

/// Whether a server holds `database`: `serve` keeps an exclusive lock on the file beside it
/// (`my-claw.db.lock`, see `app::lock_database`) as long as it runs. The probe takes a
/// shared lock and lets go at once; it never creates the lock file.
fn serving(database: &Path) -> Result<bool, SignInLinkError> {
    let mut path = database.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        // No server has ever run on this file since the lock came in: none runs now.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(reason) => return Err(SignInLinkError::Lock { path, reason }),
    };
    match file.try_lock_shared() {
        // Dropping the file lets go of the lock.
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(reason)) => Err(SignInLinkError::Lock { path, reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only "not found" means there is no database: anything else (permission denied for a
    /// user who cannot read DATA_DIR, which root cannot reproduce; here a path through a
    /// regular file, ENOTDIR) is said with its cause.
    #[test]
    fn an_unreadable_database_path_is_not_a_missing_database() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("my-claw.db");
        assert!(matches!(check_database(&missing), Err(SignInLinkError::NoDatabase(_))));
        let not_a_dir = dir.path().join("a-file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let through_a_file = not_a_dir.join("my-claw.db");
        let refused = check_database(&through_a_file).unwrap_err();
        assert!(matches!(refused, SignInLinkError::Unreadable { .. }), "{refused:?}");
        let message = refused.to_string();
        assert!(message.starts_with(&format!("cannot read {}: ", through_a_file.display())));
        assert!(!message.contains("start my-claw"), "{message}");
        assert!(check_database(&not_a_dir).is_ok());
    }

    #[test]
    fn the_note_says_when_an_older_link_was_cancelled() {
        let made = |cancelled| SignInLink {
            link: String::new(),
            server_running: true,
            cancelled,
            database: PathBuf::new(),
        };
        assert_eq!(made(0).note(), "(it signs one browser in, once, within 10 minutes)");
        assert_eq!(
            made(1).note(),
            "(it signs one browser in, once, within 10 minutes)\n(this cancelled the oldest \
             unused link: at most 16 work at once)"
        );
    }
}
