//! `my-claw backup FILE`: a consistent copy of the database while the server keeps running
//! (`VACUUM INTO` reads one snapshot), written into a new file that only its owner can read,
//! then checked (`PRAGMA integrity_check`) before it is reported. The copy is written as
//! `FILE.part` and given its name only once checked, so a backup interrupted by a signal or a
//! crash never leaves a broken file under the name a restore would use. It never overwrites
//! a file and never changes the database it copies; restoring is a documented manual step.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::db::export::{self, BackupSummary};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The file to write; it must not exist yet (a backup never overwrites anything).
    pub file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} already exists: choose a new file name (a backup never overwrites)")]
    Exists(PathBuf),
    // The causes are part of the one line, not `source`s: the exit message prints an error's
    // chain, which would say each of them twice.
    #[error("cannot create {path}: {reason}")]
    Create { path: PathBuf, reason: io::Error },
    #[error(
        "there is no database at {0}: run the backup with the server's DATA_DIR or DATABASE_URL"
    )]
    NoDatabase(PathBuf),
    #[error("cannot open the database {url}: {reason}")]
    Open { url: String, reason: sqlx::Error },
    #[error("copying the database failed: {0}")]
    Copy(sqlx::Error),
    #[error("the copy in {path} failed its check: {detail}")]
    Check { path: PathBuf, detail: String },
    #[error(
        "{0} exists: a backup to that name was interrupted; delete it and run the backup again"
    )]
    Interrupted(PathBuf),
    #[error("cannot name the checked copy {path}: {reason}")]
    Rename { path: PathBuf, reason: io::Error },
}

/// Writes the backup and returns what the copy holds.
pub async fn run(args: &BackupArgs, database_url: &str) -> Result<BackupSummary, BackupError> {
    let target = &args.file;
    if target.exists() {
        return Err(BackupError::Exists(target.clone()));
    }
    // Checked before anything is created, so a wrong DATA_DIR leaves no empty file behind.
    let database = export::database_file(database_url)
        .map_err(|reason| BackupError::Open { url: database_url.to_string(), reason })?;
    if !database.exists() {
        return Err(BackupError::NoDatabase(database));
    }
    let part = part_file(target);
    // Created empty with mode 600 before any data goes in, so there is no moment where the
    // copy is readable by others whatever the umask. `VACUUM INTO` accepts an empty file.
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(&part).map_err(|reason| {
        if reason.kind() == io::ErrorKind::AlreadyExists {
            BackupError::Interrupted(part.clone())
        } else {
            BackupError::Create { path: target.clone(), reason }
        }
    })?;
    let done = match copy_and_check(&part, database_url).await {
        // A hard link names the checked copy without replacing a file made meanwhile.
        Ok(summary) => std::fs::hard_link(&part, target)
            .map(|()| summary)
            .map_err(|reason| BackupError::Rename { path: target.clone(), reason }),
        Err(e) => Err(e),
    };
    // A half-written copy must not be mistaken for a backup; a named one needs no second name.
    let _ = std::fs::remove_file(&part);
    done
}

/// `FILE.part`: where the copy is written until it has been checked.
fn part_file(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_os_string();
    name.push(".part");
    PathBuf::from(name)
}

async fn copy_and_check(target: &Path, database_url: &str) -> Result<BackupSummary, BackupError> {
    let pool = export::open_existing(database_url)
        .await
        .map_err(|reason| BackupError::Open { url: database_url.to_string(), reason })?;
    let copied = export::vacuum_into(&pool, target).await;
    pool.close().await;
    copied.map_err(BackupError::Copy)?;
    let summary = export::check_copy(target)
        .await
        .map_err(|e| BackupError::Check { path: target.to_path_buf(), detail: e.to_string() })?;
    if summary.integrity != "ok" {
        return Err(BackupError::Check {
            path: target.to_path_buf(),
            detail: format!("integrity_check: {}", summary.integrity),
        });
    }
    // On disk before we say it is done.
    if let Ok(file) = std::fs::File::open(target) {
        let _ = file.sync_all();
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::db::memory::{self, NewMessage};
    use crate::domain::Role;

    #[tokio::test]
    async fn backup_is_private_complete_and_never_overwrites() {
        let (dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        for n in 0..50 {
            let message = NewMessage::plain(conv, Role::User, format!("message {n}"));
            memory::add_message(&pool, &message).await.unwrap();
        }
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let args = BackupArgs { file: dir.path().join("copy.db") };
        let summary = run(&args, &url).await.expect("backup");
        assert_eq!(
            summary,
            BackupSummary { integrity: "ok".into(), conversations: 1, messages: 50 }
        );
        let mode = std::fs::metadata(&args.file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = run(&args, &url).await;
        assert!(matches!(again, Err(BackupError::Exists(_))), "{again:?}");
        // The refused second run left the first copy as it was.
        assert_eq!(export::check_copy(&args.file).await.unwrap().messages, 50);

        let missing = BackupArgs { file: dir.path().join("other.db") };
        let url = format!("sqlite://{}", dir.path().join("nope.db").display());
        let refused = run(&missing, &url).await;
        assert!(matches!(&refused, Err(BackupError::NoDatabase(p)) if p.ends_with("nope.db")));
        assert!(!missing.file.exists(), "no half-made backup is left behind");
        // Each cause is said once in the line the command prints (`{:#}` walks the chain).
        let into_missing_dir = BackupArgs { file: dir.path().join("no-such-dir/copy.db") };
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let line =
            format!("{:#}", anyhow::Error::new(run(&into_missing_dir, &url).await.unwrap_err()));
        assert_eq!(line.matches("No such file or directory").count(), 1, "{line}");
        assert!(line.starts_with("cannot create "), "{line}");
    }

    /// The copy is written under `FILE.part` and named `FILE` only once checked: a backup
    /// killed midway (its `.part` left behind, as here) never leaves a broken file under the
    /// name a restore would use, and the next run says what to do.
    #[tokio::test]
    async fn an_interrupted_backup_leaves_nothing_under_the_final_name() {
        let (dir, pool) = crate::db::fresh_test_db().await;
        let conv = memory::create_webchat_conversation(&pool, Some("t")).await.unwrap().id;
        memory::add_message(&pool, &NewMessage::plain(conv, Role::User, "kept")).await.unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let args = BackupArgs { file: dir.path().join("copy.db") };
        run(&args, &url).await.expect("backup");
        assert!(!part_file(&args.file).exists(), "the .part is gone once named");

        // A run killed while copying: its half-written .part is all that is left.
        let killed = BackupArgs { file: dir.path().join("killed.db") };
        std::fs::write(part_file(&killed.file), b"SQLite format 3\0 half").unwrap();
        let refused = run(&killed, &url).await;
        assert!(
            matches!(&refused, Err(BackupError::Interrupted(p)) if p.ends_with("killed.db.part"))
        );
        assert!(refused.unwrap_err().to_string().contains("delete it and run the backup again"));
        assert!(!killed.file.exists(), "nothing under the final name");
        std::fs::remove_file(part_file(&killed.file)).unwrap();
        assert_eq!(run(&killed, &url).await.expect("backup after cleaning up").messages, 1);
    }
}
