//! One-time sign-in codes (migration 0012): issuing one (a row holding the SHA-256 digest
//! of the code and its expiry, never the code) and spending one, once, atomically. The
//! server and `my-claw sign-in-link` share them through the database file, so making a code
//! takes the right to write that file (mode 600 in a private data directory), not a token
//! sent over the network. Pure storage: who may issue, and what a spent code opens, is the
//! gateway's business.

use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

use crate::config::Secret;
use crate::db::now_ms;

/// Codes alive at once; issuing one more deletes the oldest (and says so, see
/// [`Issued::cancelled`]). Bounds what an endless stream of (authenticated) issue requests
/// can leave in the database.
pub const MAX_LIVE_CODES: i64 = 16;

/// A new code, and what making it cost.
#[derive(Debug)]
pub struct Issued {
    pub code: Secret,
    /// Live codes (neither spent nor expired) deleted to keep `MAX_LIVE_CODES`: the links
    /// that carried them now fail as "already used or has expired", which is not what
    /// happened, so whoever made this one is told. Expired codes deleted on the way are not
    /// counted. A deleted code is not remembered: redeeming it looks like a wrong code.
    pub cancelled: u64,
}

/// A new code (see [`issue_counted`]), for callers that do not say what it cancelled.
pub async fn issue(pool: &SqlitePool, lifetime: Duration) -> Result<Secret, sqlx::Error> {
    Ok(issue_counted(pool, lifetime).await?.code)
}

/// A new code: 128 random bits as 32 hex characters, redeemable for `lifetime`. Its digest
/// goes in with its expiry (Unix milliseconds), in the transaction that deletes the expired
/// codes and the oldest live ones beyond `MAX_LIVE_CODES`, which it counts.
pub async fn issue_counted(pool: &SqlitePool, lifetime: Duration) -> Result<Issued, sqlx::Error> {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let code = Secret::new(hex::encode(bytes));
    let now = now_ms();
    let expires_at = now.saturating_add(i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX));
    let mut tx = crate::db::begin_write(pool).await?;
    sqlx::query("DELETE FROM sign_in_codes WHERE expires_at <= ?1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO sign_in_codes (digest, expires_at) VALUES (?1, ?2)")
        .bind(digest(code.expose()))
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    // `id` is the rowid: each new row takes one above the largest, so the largest ids are
    // the newest codes. The expired ones are gone already: what this deletes was live.
    let cancelled = sqlx::query(
        "DELETE FROM sign_in_codes
         WHERE id NOT IN (SELECT id FROM sign_in_codes ORDER BY id DESC LIMIT ?1)",
    )
    .bind(MAX_LIVE_CODES)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(Issued { code, cancelled })
}

/// Whether `given` is a live code; a code that matches is spent. One `DELETE` decides, so of
/// any number of concurrent redeems (in this process or another) exactly one gets `true`.
/// The lookup is by the digest of `given`: how long it takes says something about the
/// digest at most, and a digest does not lead back to a code.
pub async fn redeem(pool: &SqlitePool, given: &str) -> Result<bool, sqlx::Error> {
    let spent = sqlx::query("DELETE FROM sign_in_codes WHERE digest = ?1 AND expires_at > ?2")
        .bind(digest(given))
        .bind(now_ms())
        .execute(pool)
        .await?;
    Ok(spent.rows_affected() == 1)
}

/// The newest migration applied to the database behind `pool`, opened without migrating
/// (`sign-in-link` writes a code only into a database of its own version); `None` when the
/// file holds no my-claw migrations.
pub async fn schema_version(pool: &SqlitePool) -> Result<Option<i64>, sqlx::Error> {
    let tracked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_one(pool)
    .await?;
    if tracked == 0 {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
        .fetch_one(pool)
        .await
}

fn digest(code: &str) -> Vec<u8> {
    Sha256::digest(code.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fresh_test_db as fresh;

    const LIFETIME: Duration = Duration::from_secs(600);

    async fn live_codes(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM sign_in_codes").fetch_one(pool).await.unwrap()
    }

    #[tokio::test]
    async fn a_code_signs_in_once() {
        let (_dir, pool) = fresh().await;
        let first = issue(&pool, LIFETIME).await.unwrap();
        let second = issue(&pool, LIFETIME).await.unwrap();
        assert_eq!(first.expose().len(), 32);
        assert!(first.expose().bytes().all(|b| b.is_ascii_hexdigit()), "{}", first.expose());
        assert_ne!(first.expose(), second.expose());
        assert!(!redeem(&pool, "0123456789abcdef0123456789abcdef").await.unwrap());
        assert!(!redeem(&pool, "").await.unwrap());
        assert!(redeem(&pool, first.expose()).await.unwrap());
        assert!(!redeem(&pool, first.expose()).await.unwrap(), "spent");
        assert!(redeem(&pool, second.expose()).await.unwrap(), "the other code is still live");
        assert_eq!(live_codes(&pool).await, 0);
    }

    /// The file holds the digest and the expiry, never the code: a copy of the database
    /// (a backup, a stolen disk image) holds nothing that signs in.
    #[tokio::test]
    async fn the_database_holds_the_digest_never_the_code() {
        let (dir, pool) = fresh().await;
        let before = crate::db::now_ms();
        let code = issue(&pool, LIFETIME).await.unwrap();
        let (stored, expires_at): (Vec<u8>, i64) =
            sqlx::query_as("SELECT digest, expires_at FROM sign_in_codes")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, Sha256::digest(code.expose().as_bytes()).to_vec());
        let lifetime_ms = LIFETIME.as_millis() as i64;
        assert!(expires_at >= before + lifetime_ms, "{expires_at} {before}");
        assert!(expires_at <= crate::db::now_ms() + lifetime_ms, "{expires_at}");
        pool.close().await;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(code.expose()), "the code is in the database files");
        }
    }

    #[tokio::test]
    async fn expired_codes_and_the_oldest_beyond_the_bound_are_deleted() {
        let (_dir, pool) = fresh().await;
        let expired = issue(&pool, Duration::ZERO).await.unwrap();
        assert!(!redeem(&pool, expired.expose()).await.unwrap(), "expired");
        let old = issue(&pool, LIFETIME).await.unwrap();
        sqlx::query("UPDATE sign_in_codes SET expires_at = ?1")
            .bind(crate::db::now_ms() - 1)
            .execute(&pool)
            .await
            .unwrap();
        assert!(!redeem(&pool, old.expose()).await.unwrap(), "expired");

        let issued: Vec<Secret> = {
            let mut issued = Vec::new();
            for _ in 0..=MAX_LIVE_CODES {
                issued.push(issue(&pool, LIFETIME).await.unwrap());
            }
            issued
        };
        // The two expired rows went with the first issue, the oldest live one with the last.
        assert_eq!(live_codes(&pool).await, MAX_LIVE_CODES);
        assert!(!redeem(&pool, issued[0].expose()).await.unwrap(), "the oldest went");
        assert!(redeem(&pool, issued[1].expose()).await.unwrap());
        assert!(redeem(&pool, issued[MAX_LIVE_CODES as usize].expose()).await.unwrap());
    }

    /// The code that makes room is counted, so the one who made the new link can be told
    /// that an older one stopped working; expired codes deleted on the way are not.
    #[tokio::test]
    async fn issuing_beyond_the_bound_counts_the_live_code_it_cancelled() {
        let (_dir, pool) = fresh().await;
        issue(&pool, Duration::ZERO).await.unwrap();
        let mut issued = Vec::new();
        for _ in 0..MAX_LIVE_CODES {
            let made = issue_counted(&pool, LIFETIME).await.unwrap();
            assert_eq!(made.cancelled, 0, "only an expired code went");
            issued.push(made.code);
        }
        let made = issue_counted(&pool, LIFETIME).await.unwrap();
        assert_eq!(made.cancelled, 1);
        assert!(!redeem(&pool, issued[0].expose()).await.unwrap(), "the oldest went");
        assert!(redeem(&pool, issued[1].expose()).await.unwrap());
        // A spent code leaves room: the next one cancels nothing.
        assert_eq!(issue_counted(&pool, LIFETIME).await.unwrap().cancelled, 0);
    }

    /// Many redeems of one code at once, through two pools as two processes would: one
    /// signs in, every other is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_redeems_of_one_code_sign_in_once() {
        let (dir, pool) = fresh().await;
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let other = crate::db::connect(&url).await.unwrap();
        for round in 0..5 {
            let code = issue(&pool, LIFETIME).await.unwrap();
            let redeems: Vec<_> = (0..16)
                .map(|i| {
                    let pool = if i % 2 == 0 { pool.clone() } else { other.clone() };
                    let code = code.expose().to_string();
                    tokio::spawn(async move { redeem(&pool, &code).await.unwrap() })
                })
                .collect();
            let mut signed_in = 0;
            for redeem in redeems {
                signed_in += usize::from(redeem.await.unwrap());
            }
            assert_eq!(signed_in, 1, "round {round}");
        }
    }

    #[tokio::test]
    async fn schema_version_names_the_newest_migration_or_none() {
        let (dir, pool) = fresh().await;
        let newest = crate::db::MIGRATOR.iter().map(|m| m.version).max();
        assert_eq!(schema_version(&pool).await.unwrap(), newest);
        let empty = format!("sqlite://{}?mode=rwc", dir.path().join("empty.db").display());
        let empty = SqlitePool::connect(&empty).await.unwrap();
        assert_eq!(schema_version(&empty).await.unwrap(), None);
    }
}
