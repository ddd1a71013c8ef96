//! The durable inbound queue of channel messages (WhatsApp, Nextcloud Talk), the per-address
//! contact facts (last inbound time, for WhatsApp's 24-hour window) and the delivery state of
//! our outbound channel messages. Pure storage: no wire formats and no HTTP here.

use sqlx::{SqliteConnection, SqlitePool};

use crate::db::now_ms;
use crate::domain::{ChannelKind, ConversationId, MessageId};

crate::domain::named_enum! {
    /// Where a queued inbound message stands.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum QueueStatus {
        /// Stored, waiting for the worker.
        Pending = "pending",
        /// Claimed by the worker; a row left here by a crash goes back to `Pending` at start.
        Processing = "processing",
        /// Answered (or recorded, for events that need no answer).
        Done = "done",
        /// Given up; `last_error` says why (the user was told when they could be).
        Failed = "failed",
        /// Deliberately not answered (sender not allowed, reaction, …); `last_error` says why.
        Ignored = "ignored",
        /// Refused as it came: unreadable in a batch, or longer than the channel's limit (the
        /// user was told); `last_error` says why.
        Rejected = "rejected",
        /// The process stopped while the answer was being sent: it may or may not have reached
        /// the user, and it is not sent again (a duplicate is worse than asking again).
        DeliveryUnknown = "delivery_unknown",
    }
}

/// A row to add to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInbound<'a> {
    pub channel: ChannelKind,
    /// The channel's id of the message (wamid, Talk message id): the deduplication key.
    pub external_id: &'a str,
    /// What the worker needs to process it (JSON written by the channel adapter).
    pub payload: &'a str,
    pub status: QueueStatus,
    /// Why a row is stored as `Ignored` or `Done` right away.
    pub note: Option<&'a str>,
}

/// A contact seen on an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactSeen<'a> {
    pub channel: ChannelKind,
    pub address: &'a str,
    pub display_name: Option<&'a str>,
    /// When the user wrote, Unix milliseconds.
    pub at_ms: i64,
}

/// A stored queue row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: i64,
    pub channel: ChannelKind,
    pub external_id: String,
    pub payload: String,
    pub status: QueueStatus,
    pub attempts: i64,
    /// Claims that ended in a transient failure (see `retry_later`).
    pub retries: i64,
    pub last_error: Option<String>,
    pub received_at: i64,
    pub processed_at: Option<i64>,
    pub conversation_key: Option<String>,
    pub next_attempt_at: Option<i64>,
}

/// How many rows are in each state that matters to an operator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for their first try.
    pub pending: i64,
    /// Waiting for another try after a transient failure (busy engine).
    pub retrying: i64,
    pub processing: i64,
    pub failed: i64,
    pub rejected: i64,
    pub delivery_unknown: i64,
}

/// A user message already stored for an inbound external id, and what followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTurn {
    pub conversation_id: ConversationId,
    pub user_message_id: MessageId,
    /// The first assistant message after it, if the answer was already produced.
    pub answer: Option<StoredAnswer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub message_id: MessageId,
    pub content: String,
    pub status: String,
    pub delivery_status: Option<String>,
}

/// Adds a row that belongs to no conversation (events, ignored or rejected messages), and
/// records its sender as a contact. See `enqueue_message`.
pub async fn enqueue(
    pool: &SqlitePool,
    item: &NewInbound<'_>,
    contact: Option<&ContactSeen<'_>>,
) -> Result<bool, sqlx::Error> {
    enqueue_message(pool, item, None, contact).await
}

/// Adds a message of `conversation_key` to the queue, and records its sender as a contact,
/// in one transaction. Returns false when the message was already queued (a redelivery):
/// nothing changes then.
pub async fn enqueue_message(
    pool: &SqlitePool,
    item: &NewInbound<'_>,
    conversation_key: Option<&str>,
    contact: Option<&ContactSeen<'_>>,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let finished = !matches!(item.status, QueueStatus::Pending | QueueStatus::Processing);
    let mut tx = crate::db::begin_write(pool).await?;
    let done = sqlx::query(
        "INSERT INTO inbound_queue (channel, external_id, payload, status, last_error,
                                    received_at, processed_at, conversation_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (channel, external_id) DO NOTHING",
    )
    .bind(item.channel.as_str())
    .bind(item.external_id)
    .bind(item.payload)
    .bind(item.status.as_str())
    .bind(item.note)
    .bind(now)
    .bind(finished.then_some(now))
    .bind(conversation_key)
    .execute(&mut *tx)
    .await?;
    let inserted = done.rows_affected() == 1;
    if inserted {
        if let Some(contact) = contact {
            // MAX keeps the window anchored on the newest message even when an older one
            // arrives late (Meta does not order its deliveries).
            sqlx::query(
                "INSERT INTO contacts (channel, address, display_name, last_inbound_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (channel, address) DO UPDATE SET
                     display_name = COALESCE(excluded.display_name, contacts.display_name),
                     last_inbound_at = MAX(COALESCE(contacts.last_inbound_at, 0),
                                           excluded.last_inbound_at)",
            )
            .bind(contact.channel.as_str())
            .bind(contact.address)
            .bind(contact.display_name)
            .bind(contact.at_ms)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Claims the oldest row that is due (pending, its retry time reached) and whose
/// conversation has no earlier unfinished row, so that one conversation is answered in
/// order while others go ahead. One statement, so a row is never claimed twice. Counts the
/// attempt.
pub async fn claim_next(pool: &SqlitePool) -> Result<Option<QueueEntry>, sqlx::Error> {
    let row: Option<QueueRow> = sqlx::query_as(&format!(
        "UPDATE inbound_queue SET status = 'processing', attempts = attempts + 1
         WHERE id = (
             SELECT q.id FROM inbound_queue q
             WHERE q.status = 'pending' AND COALESCE(q.next_attempt_at, 0) <= ?1
               AND NOT EXISTS (
                   SELECT 1 FROM inbound_queue e
                   WHERE e.channel = q.channel AND e.conversation_key = q.conversation_key
                     AND e.id < q.id AND e.status IN ('pending', 'processing'))
             ORDER BY q.id LIMIT 1)
         RETURNING {QUEUE_COLUMNS}"
    ))
    .bind(now_ms())
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// When the next row waiting for a retry becomes due (Unix milliseconds), if any.
pub async fn next_retry_at(pool: &SqlitePool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT MIN(next_attempt_at) FROM inbound_queue
         WHERE status = 'pending' AND next_attempt_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await
}

/// Counts the rows by state, for `/api/health`.
pub async fn counts(pool: &SqlitePool) -> Result<QueueCounts, sqlx::Error> {
    let rows: Vec<(String, bool, i64)> = sqlx::query_as(
        "SELECT status, retries > 0, COUNT(*) FROM inbound_queue
         WHERE status IN ('pending', 'processing', 'failed', 'rejected', 'delivery_unknown')
         GROUP BY status, retries > 0",
    )
    .fetch_all(pool)
    .await?;
    let mut counts = QueueCounts::default();
    for (status, retried, n) in rows {
        match (status.as_str(), retried) {
            ("pending", false) => counts.pending += n,
            ("pending", true) => counts.retrying += n,
            ("processing", _) => counts.processing += n,
            ("failed", _) => counts.failed += n,
            ("rejected", _) => counts.rejected += n,
            _ => counts.delivery_unknown += n,
        }
    }
    Ok(counts)
}

/// Records the outcome of a claimed row.
pub async fn finish(
    pool: &SqlitePool,
    id: i64,
    status: QueueStatus,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbound_queue SET status = ?1, last_error = ?2, processed_at = ?3 WHERE id = ?4",
    )
    .bind(status.as_str())
    .bind(error)
    .bind(now_ms())
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Puts a claimed row back in the queue after a transient failure, not to be claimed
/// before `next_attempt_at`, keeping the reason.
pub async fn retry_later(
    pool: &SqlitePool,
    id: i64,
    error: &str,
    next_attempt_at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbound_queue SET status = 'pending', last_error = ?1, next_attempt_at = ?2,
                                  retries = retries + 1
         WHERE id = ?3",
    )
    .bind(error)
    .bind(next_attempt_at)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// What crash recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Rows put back to `pending`.
    pub requeued: u64,
    /// Rows marked `failed` after too many interruptions, as they are now: the worker tells
    /// their senders (their payload says who).
    pub given_up: Vec<QueueEntry>,
}

/// Crash recovery, run once at start before the worker claims anything: rows left in
/// `processing` by a stopped process go back to `pending`, except those whose handling a
/// stop has already interrupted `max_interrupted` times, which are marked failed so that a
/// message that crashes the process cannot do so forever. Claims that ended in a transient
/// failure (`retries`) do not count.
pub async fn recover(pool: &SqlitePool, max_interrupted: i64) -> Result<Recovered, sqlx::Error> {
    let given_up: Vec<QueueRow> = sqlx::query_as(&format!(
        "UPDATE inbound_queue SET status = 'failed', processed_at = ?1,
             last_error = 'gave up: the process stopped while handling it '
                          || (attempts - retries) || ' times'
         WHERE status = 'processing' AND attempts - retries >= ?2
         RETURNING {QUEUE_COLUMNS}"
    ))
    .bind(now_ms())
    .bind(max_interrupted)
    .fetch_all(pool)
    .await?;
    let requeued =
        sqlx::query("UPDATE inbound_queue SET status = 'pending' WHERE status = 'processing'")
            .execute(pool)
            .await?
            .rows_affected();
    let given_up = given_up.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?;
    Ok(Recovered { requeued, given_up })
}

/// The states a row never leaves again (but for `delivery_unknown` → `done` when a late
/// status report confirms the answer, which reads the messages, not the payload).
const FINISHED: &str = "('done', 'failed', 'ignored', 'rejected', 'delivery_unknown')";

/// How long a finished row keeps its payload (the user's text) before
/// `scrub_finished_payloads` drops it at start.
pub const FINISHED_PAYLOAD_KEEP_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// Drops the user's text from the finished queue rows of one conversation, for when that
/// conversation is deleted: `channel` and `conversation_key` as the conversation has them
/// (`conversations.channel` and `conversations.external_key`: the WhatsApp number, the
/// Talk room token). Callable before or after the conversation itself is deleted. The
/// payload becomes `{}`; the channel's message id stays, so a redelivery of one of those
/// messages is still recognised and not answered again, and so do the state and reason.
/// Rows still waiting or being answered are left whole: they have yet to be answered.
/// Returns how many rows were scrubbed.
pub async fn forget_conversation_payloads(
    pool: &SqlitePool,
    channel: ChannelKind,
    conversation_key: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!(
        "UPDATE inbound_queue SET payload = '{{}}'
         WHERE channel = ?1 AND conversation_key = ?2 AND status IN {FINISHED}
           AND payload <> '{{}}'"
    ))
    .bind(channel.as_str())
    .bind(conversation_key)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Drops the user's text from every queue row finished before `finished_before` (Unix
/// milliseconds), as `forget_conversation_payloads` does for one conversation: the queue
/// is not an archive of messages (the conversation is, and the user can delete it). Run at
/// start with `now - FINISHED_PAYLOAD_KEEP_MS`. Returns how many rows were scrubbed.
pub async fn scrub_finished_payloads(
    pool: &SqlitePool,
    finished_before: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!(
        "UPDATE inbound_queue SET payload = '{{}}'
         WHERE status IN {FINISHED} AND COALESCE(processed_at, received_at) < ?1
           AND payload <> '{{}}'"
    ))
    .bind(finished_before)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// One queue row by its channel id.
pub async fn get(
    pool: &SqlitePool,
    channel: ChannelKind,
    external_id: &str,
) -> Result<Option<QueueEntry>, sqlx::Error> {
    let row: Option<QueueRow> = sqlx::query_as(&format!(
        "SELECT {QUEUE_COLUMNS} FROM inbound_queue WHERE channel = ?1 AND external_id = ?2"
    ))
    .bind(channel.as_str())
    .bind(external_id)
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// Every queue row, oldest first (inspection and tests).
pub async fn list(pool: &SqlitePool) -> Result<Vec<QueueEntry>, sqlx::Error> {
    let rows: Vec<QueueRow> =
        sqlx::query_as(&format!("SELECT {QUEUE_COLUMNS} FROM inbound_queue ORDER BY id"))
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// When the user at `address` last wrote on `channel` (Unix milliseconds), if ever.
pub async fn last_inbound_at(
    pool: &SqlitePool,
    channel: ChannelKind,
    address: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let at: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT last_inbound_at FROM contacts WHERE channel = ?1 AND address = ?2",
    )
    .bind(channel.as_str())
    .bind(address)
    .fetch_optional(pool)
    .await?;
    Ok(at.flatten())
}

/// Records a delivery report of one of our outbound messages, found by its channel id or by
/// the id of any of its parts (`message_parts`). Reports arrive unordered and repeated, so
/// the state only moves forward (`sent` < `delivered` < `read`/`played`; for an answer in
/// parts, the furthest any part reached), and `failed` (of any part) always wins and keeps
/// its error. An answer whose parts are still going out (`sending`) or waiting for another
/// try (no state, see `mark_send_retry`) is not moved by the report of a part that went out:
/// it becomes `sent` only once all its parts did (`mark_sent`), and the queue's next try must
/// not take it for delivered. Returns false when no message has that id (yet: see
/// `keep_early_delivery`).
pub async fn record_delivery(
    pool: &SqlitePool,
    external_id: &str,
    status: &str,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    record_delivery_in(&mut conn, external_id, status, error).await
}

/// What `keep_early_delivery` did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyReport {
    /// Kept until its id is recorded.
    Kept,
    /// Its id was recorded meanwhile: recorded as `record_delivery` does.
    Recorded,
}

/// How long a report for an id not recorded yet is kept (see `keep_early_delivery`).
pub const EARLY_DELIVERY_KEEP_MS: i64 = 24 * 60 * 60 * 1000;

/// At most this many reports for ids not recorded yet are kept: signed webhooks only come
/// from Meta, but nothing a webhook sends may grow the database without bound.
pub const EARLY_DELIVERY_MAX_ROWS: i64 = 10_000;

/// Keeps a delivery report that `record_delivery` (and `confirm_reply_delivery`) found no
/// message for: Meta can report on a part before the answer to our send request is back and
/// its id recorded. Applied when the id is (`memory::record_message_part`,
/// `memory::set_message_parts`, `confirm_reply_delivery`), in the transaction that records
/// it. One write transaction: an id recorded since `record_delivery` looked gets the report
/// now, as `record_delivery` would have, so no report falls between the two. Reports older
/// than `EARLY_DELIVERY_KEEP_MS` are dropped here, and beyond `EARLY_DELIVERY_MAX_ROWS` the
/// oldest (`failed` ones last). Only the id, the state and the error are kept.
pub async fn keep_early_delivery(
    pool: &SqlitePool,
    external_id: &str,
    status: &str,
    error: Option<&str>,
) -> Result<EarlyReport, sqlx::Error> {
    let now = now_ms();
    let mut tx = crate::db::begin_write(pool).await?;
    if record_delivery_in(&mut tx, external_id, status, error).await? {
        tx.commit().await?;
        return Ok(EarlyReport::Recorded);
    }
    sqlx::query("DELETE FROM early_deliveries WHERE received_at < ?1")
        .bind(now - EARLY_DELIVERY_KEEP_MS)
        .execute(&mut *tx)
        .await?;
    // Meta repeats its reports: one row per id and state is enough (the first error kept).
    sqlx::query(
        "INSERT INTO early_deliveries (external_id, status, error, received_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (external_id, status) DO NOTHING",
    )
    .bind(external_id)
    .bind(status)
    .bind(error)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let kept: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM early_deliveries").fetch_one(&mut *tx).await?;
    if kept > EARLY_DELIVERY_MAX_ROWS {
        sqlx::query(
            "DELETE FROM early_deliveries WHERE id IN (
                 SELECT id FROM early_deliveries ORDER BY status = 'failed', id LIMIT ?1)",
        )
        .bind(kept - EARLY_DELIVERY_MAX_ROWS)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(EarlyReport::Kept)
}

/// Applies the reports `keep_early_delivery` kept for `external_id`, which the caller has
/// just recorded as an id of the message `message_id` (a part, or the message itself), inside
/// the caller's write transaction, and drops them. The rules are `record_delivery`'s, the
/// same SQL: forward only, `failed` wins with its error. A report that may not move the
/// answer because it is still going out (`sending`, or no state while a part waits for
/// another try) is remembered on the part (`message_parts.reported_status`, the furthest
/// one), and `mark_sent` applies it once every part went out: an answer is not `delivered`
/// while parts of it are still to send, and not left `sent` when Meta said more. Returns the
/// errors of the `failed` reports applied, for `log_applied_failures` once committed.
pub(crate) async fn apply_early_deliveries(
    conn: &mut SqliteConnection,
    message_id: MessageId,
    external_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let reports: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "DELETE FROM early_deliveries WHERE external_id = ?1 RETURNING status, error, received_at",
    )
    .bind(external_id)
    .fetch_all(&mut *conn)
    .await?;
    let oldest = now_ms() - EARLY_DELIVERY_KEEP_MS;
    let mut failures = Vec::new();
    for (status, error, received_at) in reports {
        if received_at < oldest {
            continue;
        }
        let moved = sqlx::query(&format!(
            "UPDATE messages SET delivery_status = ?1,
                                 delivery_error = COALESCE(?2, delivery_error)
             WHERE id = ?3 AND role = 'assistant' AND {}",
            moves_forward()
        ))
        .bind(&status)
        .bind(&error)
        .bind(message_id.0)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            > 0;
        if moved && status == "failed" {
            failures.push(error.unwrap_or_else(|| "failed (no error given)".into()));
        } else if !moved {
            // Held back only because the answer is still going out: kept on the part, the
            // furthest state, for `mark_sent`.
            sqlx::query(&format!(
                "UPDATE message_parts SET reported_status = ?1
                 WHERE external_id = ?2 AND message_id = ?3
                   AND {} > {}
                   AND (SELECT COALESCE(delivery_status, 'sending') FROM messages
                        WHERE id = ?3 AND role = 'assistant') = 'sending'",
                rank("?1"),
                rank("reported_status"),
            ))
            .bind(&status)
            .bind(external_id)
            .bind(message_id.0)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(failures)
}

/// Logs the `failed` reports `apply_early_deliveries` applied, once they are committed, as the
/// channel logs a `failed` report that finds its message at once.
pub(crate) fn log_applied_failures(failures: &[String]) {
    for error in failures {
        tracing::warn!(error = ?error, "message not delivered (reported before its id was recorded)");
    }
}

/// `record_delivery` on `conn` (a pool's connection, or a caller's transaction).
async fn record_delivery_in(
    conn: &mut SqliteConnection,
    external_id: &str,
    status: &str,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(&format!(
        "UPDATE messages SET delivery_status = ?1,
                             delivery_error = COALESCE(?2, delivery_error)
         WHERE id IN (SELECT id FROM messages WHERE external_id = ?3
                      UNION SELECT message_id FROM message_parts WHERE external_id = ?3)
           AND role = 'assistant' AND {}",
        moves_forward()
    ))
    .bind(status)
    .bind(error)
    .bind(external_id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() > 0 {
        return Ok(true);
    }
    let known: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM messages WHERE external_id = ?1
         UNION SELECT message_id FROM message_parts WHERE external_id = ?1 LIMIT 1",
    )
    .bind(external_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(known.is_some())
}

/// Whether the report of state `?1` moves a message's `delivery_status` (see
/// `record_delivery`), as SQL: `failed` always; another state only forward, and not while
/// the answer is still going out (`sending`, or no state) nor once it `failed`.
fn moves_forward() -> String {
    format!(
        "(?1 = 'failed' OR COALESCE(delivery_status, 'sending') NOT IN ('sending', 'failed') \
         AND {} > {})",
        rank("?1"),
        rank("delivery_status")
    )
}

/// The place of the delivery state `expr` (SQL) in `sent` < `delivered` < `read` < `played`;
/// 0 for any other (none, `sending`, `unknown`, `failed`).
fn rank(expr: &str) -> String {
    format!(
        "(CASE {expr} WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 WHEN 'read' THEN 3 \
         WHEN 'played' THEN 4 ELSE 0 END)"
    )
}

/// Marks an answer as not delivered, with the reason (sending failed before the channel
/// accepted it, so there is no channel id to find it by).
pub async fn mark_undelivered(
    pool: &SqlitePool,
    message_id: MessageId,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET delivery_status = 'failed', delivery_error = ?1 WHERE id = ?2",
    )
    .bind(error)
    .bind(message_id.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// An answer whose send failed for a reason that may heal (a server error, a network
/// failure, a rate limit): back from `sending` to not sent, with the error kept, so that the
/// queue's next try of its message sends it instead of taking it for delivered. The parts
/// that went out stay recorded (`memory::record_message_part`): that try sends only the ones
/// after them. An answer a `failed` report reached meanwhile stays failed.
pub async fn mark_send_retry(
    pool: &SqlitePool,
    message_id: MessageId,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET delivery_status = NULL, delivery_error = ?1
         WHERE id = ?2 AND delivery_status = 'sending'",
    )
    .bind(error)
    .bind(message_id.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// An answer all of whose parts the channel accepted: `sending` becomes `sent`, or the
/// furthest state a report gave one of its parts before the part's id was recorded
/// (`apply_early_deliveries`), and the error earlier tries recorded (`mark_send_retry`) no
/// longer describes it. An answer a `failed` report reached while it was being sent stays
/// failed, with that report's error.
pub async fn mark_sent(pool: &SqlitePool, message_id: MessageId) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE messages SET delivery_error = NULL, delivery_status = COALESCE(
             (SELECT reported_status FROM message_parts
              WHERE message_id = ?1 AND {} > 0 ORDER BY {} DESC LIMIT 1),
             'sent')
         WHERE id = ?1 AND delivery_status = 'sending'",
        rank("reported_status"),
        rank("reported_status"),
    ))
    .bind(message_id.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records that an answer is about to leave, before the channel is called: if the process
/// stops before the channel's answer is recorded, the next run finds `sending` and does
/// not send it again (see `mark_delivery_unknown`). It stays `sending` while its parts go
/// out, until `mark_sent`, `mark_send_retry`, `mark_delivery_unknown` or `mark_undelivered`.
/// Only an answer without a state moves: one that a `failed` report of an earlier part
/// reached while it waited stays failed (the parts sent after it change nothing).
pub async fn mark_sending(pool: &SqlitePool, message_id: MessageId) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET delivery_status = 'sending' WHERE id = ?1 AND delivery_status IS NULL",
    )
    .bind(message_id.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// An answer left in `sending` by a stopped process: it may or may not have reached the
/// user. Recorded as `unknown`, with the reason, so the page and the operator can see it.
pub async fn mark_delivery_unknown(
    pool: &SqlitePool,
    message_id: MessageId,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET delivery_status = 'unknown', delivery_error = ?1
         WHERE id = ?2 AND delivery_status = 'sending'",
    )
    .bind(reason)
    .bind(message_id.0)
    .execute(pool)
    .await?;
    Ok(())
}

/// A status report for one of our answers whose channel id was never recorded (the process
/// stopped between the channel accepting it and our record): found through the inbound
/// message it answered. Only an answer left `sending` or `unknown` is updated; its queue
/// row leaves `delivery_unknown` for `done`. Returns whether an answer was updated.
///
/// `being_sent` says whether a send of this process owns an answer now: such an answer's
/// `sending` is not left by a stop, and it is not touched (`false`: the caller keeps the
/// report until the part's id is recorded). Moving it would let a later part's failure that
/// may heal find it no longer `sending`, and the queue take it for sent with parts unsent.
/// It is asked once the write lock is held: a send marks its answer in flight before
/// `mark_sending` writes, and records its end before it leaves the set, so a `sending`
/// this update can see is either owned by a send the set still holds or left by none.
pub async fn confirm_reply_delivery(
    pool: &SqlitePool,
    channel: ChannelKind,
    question_external_id: &str,
    external_id: &str,
    status: &str,
    error: Option<&str>,
    being_sent: impl Fn(MessageId) -> bool,
) -> Result<bool, sqlx::Error> {
    let Some(StoredTurn { answer: Some(answer), .. }) =
        stored_turn(pool, channel, question_external_id).await?
    else {
        return Ok(false);
    };
    let mut tx = crate::db::begin_write(pool).await?;
    if being_sent(answer.message_id) {
        tx.rollback().await?;
        return Ok(false);
    }
    let updated = sqlx::query(
        "UPDATE messages SET external_id = ?1, delivery_status = ?2,
                             delivery_error = ?3
         WHERE id = ?4 AND delivery_status IN ('sending', 'unknown')",
    )
    .bind(external_id)
    .bind(status)
    .bind(error)
    .bind(answer.message_id.0)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    let mut failures = Vec::new();
    if updated {
        // Its id is recorded now: earlier reports of it that found nothing apply.
        failures = apply_early_deliveries(&mut tx, answer.message_id, external_id).await?;
        sqlx::query(
            "UPDATE inbound_queue SET status = 'done',
                 last_error = 'delivery confirmed afterwards by the channel''s status report'
             WHERE channel = ?1 AND external_id = ?2 AND status = 'delivery_unknown'",
        )
        .bind(channel.as_str())
        .bind(question_external_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    log_applied_failures(&failures);
    Ok(updated)
}

/// The user turn already stored for an inbound message (the process stopped while answering
/// it), and the answer that followed it if there is one, so that a retry neither stores the
/// question twice nor generates a second answer.
pub async fn stored_turn(
    pool: &SqlitePool,
    channel: ChannelKind,
    external_id: &str,
) -> Result<Option<StoredTurn>, sqlx::Error> {
    let user: Option<(i64, i64)> = sqlx::query_as(
        "SELECT m.id, m.conversation_id FROM messages m
         JOIN conversations c ON c.id = m.conversation_id
         WHERE c.channel = ?1 AND m.external_id = ?2 AND m.role = 'user'
         ORDER BY m.id LIMIT 1",
    )
    .bind(channel.as_str())
    .bind(external_id)
    .fetch_optional(pool)
    .await?;
    let Some((user_id, conversation_id)) = user else {
        return Ok(None);
    };
    // Its answer is the model's (a tier is set: a reminder or job post has none, and one may
    // fire between the question and its answer), written before the next question (the
    // turn lock keeps the two in order).
    let answer: Option<(i64, String, String, Option<String>)> = sqlx::query_as(
        "SELECT id, content, status, delivery_status FROM messages
         WHERE conversation_id = ?1 AND id > ?2 AND role = 'assistant' AND tier IS NOT NULL
           AND id < COALESCE((SELECT MIN(id) FROM messages
                              WHERE conversation_id = ?1 AND id > ?2 AND role = 'user'),
                             9223372036854775807)
         ORDER BY id LIMIT 1",
    )
    .bind(conversation_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    Ok(Some(StoredTurn {
        conversation_id: ConversationId(conversation_id),
        user_message_id: MessageId(user_id),
        answer: answer.map(|(id, content, status, delivery_status)| StoredAnswer {
            message_id: MessageId(id),
            content,
            status,
            delivery_status,
        }),
    }))
}

const QUEUE_COLUMNS: &str = "id, channel, external_id, payload, status, attempts, retries, \
     last_error, received_at, processed_at, conversation_key, next_attempt_at";

#[derive(sqlx::FromRow)]
struct QueueRow {
    id: i64,
    channel: String,
    external_id: String,
    payload: String,
    status: String,
    attempts: i64,
    retries: i64,
    last_error: Option<String>,
    received_at: i64,
    processed_at: Option<i64>,
    conversation_key: Option<String>,
    next_attempt_at: Option<i64>,
}

impl TryFrom<QueueRow> for QueueEntry {
    type Error = sqlx::Error;
    fn try_from(row: QueueRow) -> Result<Self, Self::Error> {
        let channel = ChannelKind::parse(&row.channel).ok_or_else(|| {
            sqlx::Error::Decode(
                format!("unknown channel `{}` in inbound_queue", row.channel).into(),
            )
        })?;
        let status = QueueStatus::parse(&row.status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown status `{}` in inbound_queue", row.status).into())
        })?;
        Ok(QueueEntry {
            id: row.id,
            channel,
            external_id: row.external_id,
            payload: row.payload,
            status,
            attempts: row.attempts,
            retries: row.retries,
            last_error: row.last_error,
            received_at: row.received_at,
            processed_at: row.processed_at,
            conversation_key: row.conversation_key,
            next_attempt_at: row.next_attempt_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::memory::{self, NewMessage};
    use crate::domain::Role;

    use crate::db::fresh_test_db as fresh;

    fn item<'a>(id: &'a str, status: QueueStatus) -> NewInbound<'a> {
        NewInbound {
            channel: ChannelKind::WhatsApp,
            external_id: id,
            payload: "{}",
            status,
            note: None,
        }
    }

    #[tokio::test]
    async fn enqueue_is_deduplicated_per_channel() {
        let (_dir, pool) = fresh().await;
        assert!(enqueue(&pool, &item("wamid.1", QueueStatus::Pending), None).await.unwrap());
        assert!(!enqueue(&pool, &item("wamid.1", QueueStatus::Pending), None).await.unwrap());
        let mut other = item("wamid.1", QueueStatus::Pending);
        other.channel = ChannelKind::Nextcloud;
        assert!(enqueue(&pool, &other, None).await.unwrap());
        assert_eq!(list(&pool).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn claim_finish_and_recover() {
        let (_dir, pool) = fresh().await;
        enqueue(&pool, &item("a", QueueStatus::Pending), None).await.unwrap();
        enqueue(&pool, &item("b", QueueStatus::Pending), None).await.unwrap();
        enqueue(&pool, &item("c", QueueStatus::Ignored), None).await.unwrap();
        let a = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!((a.external_id.as_str(), a.attempts), ("a", 1));
        let b = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!(b.external_id, "b");
        assert!(claim_next(&pool).await.unwrap().is_none());
        finish(&pool, a.id, QueueStatus::Done, None).await.unwrap();
        // `b` is left in `processing`, as after a crash.
        assert_eq!(recover(&pool, 3).await.unwrap(), Recovered { requeued: 1, given_up: vec![] });
        let b = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!((b.external_id.as_str(), b.attempts), ("b", 2));
        recover(&pool, 3).await.unwrap();
        claim_next(&pool).await.unwrap().unwrap();
        let recovered = recover(&pool, 3).await.unwrap();
        assert_eq!(recovered.requeued, 0);
        let given_up: Vec<_> = recovered.given_up.iter().map(|r| r.external_id.as_str()).collect();
        assert_eq!(given_up, ["b"]);
        let b = get(&pool, ChannelKind::WhatsApp, "b").await.unwrap().unwrap();
        assert_eq!(b.status, QueueStatus::Failed);
        assert!(b.last_error.unwrap().contains("3 times"));
        let a = get(&pool, ChannelKind::WhatsApp, "a").await.unwrap().unwrap();
        assert_eq!(a.status, QueueStatus::Done);
        assert!(a.processed_at.is_some());
    }

    #[tokio::test]
    async fn one_conversation_in_order_others_go_ahead_and_retries_wait() {
        let (_dir, pool) = fresh().await;
        let add = |id: &'static str, conversation: &'static str| {
            let pool = pool.clone();
            async move {
                enqueue_message(&pool, &item(id, QueueStatus::Pending), Some(conversation), None)
                    .await
                    .unwrap()
            }
        };
        add("a1", "A").await;
        add("a2", "A").await;
        add("b1", "B").await;
        let a1 = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!(a1.conversation_key.as_deref(), Some("A"));
        // a2 waits for a1; b1 goes ahead.
        let b1 = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!(b1.external_id, "b1");
        assert!(claim_next(&pool).await.unwrap().is_none());
        // a1 is put back for later: a2 still waits behind it, and nothing is due yet.
        let later = now_ms() + 60_000;
        retry_later(&pool, a1.id, "the engine queue is full", later).await.unwrap();
        assert!(claim_next(&pool).await.unwrap().is_none());
        assert_eq!(next_retry_at(&pool).await.unwrap(), Some(later));
        let counts = counts(&pool).await.unwrap();
        assert_eq!((counts.pending, counts.retrying, counts.processing), (1, 1, 1));
        // Due now: claimed again, before a2.
        retry_later(&pool, a1.id, "busy", now_ms() - 1).await.unwrap();
        let again = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!((again.external_id.as_str(), again.attempts, again.retries), ("a1", 2, 2));
        finish(&pool, again.id, QueueStatus::Done, None).await.unwrap();
        assert_eq!(claim_next(&pool).await.unwrap().unwrap().external_id, "a2");
        // Rows without a conversation (older rows) never wait for one another.
        enqueue(&pool, &item("x1", QueueStatus::Pending), None).await.unwrap();
        enqueue(&pool, &item("x2", QueueStatus::Pending), None).await.unwrap();
        assert_eq!(claim_next(&pool).await.unwrap().unwrap().external_id, "x1");
        assert_eq!(claim_next(&pool).await.unwrap().unwrap().external_id, "x2");
    }

    #[tokio::test]
    async fn finished_rows_lose_their_text_and_keep_their_id() {
        let (_dir, pool) = fresh().await;
        let add = |id: &'static str, key: &'static str, status: QueueStatus| {
            let pool = pool.clone();
            async move {
                let row = NewInbound { payload: r#"{"text":"secret"}"#, ..item(id, status) };
                enqueue_message(&pool, &row, Some(key), None).await.unwrap()
            }
        };
        add("a-done", "A", QueueStatus::Pending).await;
        add("a-ignored", "A", QueueStatus::Ignored).await;
        add("a-waiting", "A", QueueStatus::Pending).await;
        add("b-done", "B", QueueStatus::Pending).await;
        // `a-waiting` waits behind `a-done`, so `b-done` is the second row claimed.
        let a = claim_next(&pool).await.unwrap().unwrap();
        let b = claim_next(&pool).await.unwrap().unwrap();
        assert_eq!((a.external_id.as_str(), b.external_id.as_str()), ("a-done", "b-done"));
        finish(&pool, a.id, QueueStatus::Done, None).await.unwrap();
        finish(&pool, b.id, QueueStatus::Done, None).await.unwrap();

        assert_eq!(
            forget_conversation_payloads(&pool, ChannelKind::Nextcloud, "A").await.unwrap(),
            0
        );
        assert_eq!(
            forget_conversation_payloads(&pool, ChannelKind::WhatsApp, "A").await.unwrap(),
            2
        );
        let payload = |id: &'static str| {
            let pool = pool.clone();
            async move { get(&pool, ChannelKind::WhatsApp, id).await.unwrap().unwrap().payload }
        };
        assert_eq!(payload("a-done").await, "{}");
        assert_eq!(payload("a-ignored").await, "{}");
        assert_eq!(payload("a-waiting").await, r#"{"text":"secret"}"#, "still to answer");
        assert_eq!(payload("b-done").await, r#"{"text":"secret"}"#, "another conversation");
        // The id still deduplicates a redelivery.
        assert!(!enqueue(&pool, &item("a-done", QueueStatus::Pending), None).await.unwrap());

        // Rows finished before the cutoff lose their text; newer ones keep it for now.
        assert_eq!(scrub_finished_payloads(&pool, now_ms() - 60_000).await.unwrap(), 0);
        assert_eq!(scrub_finished_payloads(&pool, now_ms() + 1).await.unwrap(), 1);
        assert_eq!(payload("b-done").await, "{}");
        assert_eq!(payload("a-waiting").await, r#"{"text":"secret"}"#);
    }

    #[tokio::test]
    async fn transient_retries_do_not_count_as_interruptions() {
        let (_dir, pool) = fresh().await;
        enqueue(&pool, &item("r", QueueStatus::Pending), None).await.unwrap();
        for _ in 0..5 {
            let row = claim_next(&pool).await.unwrap().unwrap();
            retry_later(&pool, row.id, "busy", 0).await.unwrap();
        }
        // Claimed a sixth time and interrupted by a stop: one interruption, requeued.
        claim_next(&pool).await.unwrap().unwrap();
        assert_eq!(recover(&pool, 3).await.unwrap(), Recovered { requeued: 1, given_up: vec![] });
        let row = get(&pool, ChannelKind::WhatsApp, "r").await.unwrap().unwrap();
        assert_eq!((row.status, row.attempts, row.retries), (QueueStatus::Pending, 6, 5));
    }

    #[tokio::test]
    async fn sending_becomes_unknown_and_counts_show_it() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let id = memory::add_message(&pool, &NewMessage::plain(conv.id, Role::Assistant, "a"))
            .await
            .unwrap();
        mark_sending(&pool, id).await.unwrap();
        let m = memory::get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!(m.delivery_status.as_deref(), Some("sending"));
        mark_delivery_unknown(&pool, id, "stopped while sending").await.unwrap();
        let m = memory::get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!(m.delivery_status.as_deref(), Some("unknown"));
        assert_eq!(m.delivery_error.as_deref(), Some("stopped while sending"));
        // A later status report from the channel still moves it forward.
        memory::set_message_parts(&pool, id, &["wamid.S".into()], Some("unknown")).await.unwrap();
        assert!(record_delivery(&pool, "wamid.S", "delivered", None).await.unwrap());
        enqueue(&pool, &item("f", QueueStatus::Rejected), None).await.unwrap();
        let counts = counts(&pool).await.unwrap();
        assert_eq!(counts, QueueCounts { rejected: 1, ..QueueCounts::default() });
    }

    #[tokio::test]
    async fn contacts_keep_the_newest_inbound_time() {
        let (_dir, pool) = fresh().await;
        let seen = |at_ms| ContactSeen {
            channel: ChannelKind::WhatsApp,
            address: "336",
            display_name: Some("Ada"),
            at_ms,
        };
        enqueue(&pool, &item("1", QueueStatus::Pending), Some(&seen(2000))).await.unwrap();
        enqueue(&pool, &item("2", QueueStatus::Pending), Some(&seen(1000))).await.unwrap();
        let at = last_inbound_at(&pool, ChannelKind::WhatsApp, "336").await.unwrap();
        assert_eq!(at, Some(2000));
        assert_eq!(last_inbound_at(&pool, ChannelKind::WhatsApp, "999").await.unwrap(), None);
    }

    #[tokio::test]
    async fn delivery_state_only_moves_forward_and_failed_wins() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let id = memory::add_message(&pool, &NewMessage::plain(conv.id, Role::Assistant, "a"))
            .await
            .unwrap();
        memory::set_message_parts(&pool, id, &["wamid.X".into()], Some("sent")).await.unwrap();
        let state = |pool: SqlitePool| async move {
            let m = memory::get_message(&pool, id).await.unwrap().unwrap();
            (m.delivery_status, m.delivery_error)
        };
        assert!(record_delivery(&pool, "wamid.X", "read", None).await.unwrap());
        assert!(record_delivery(&pool, "wamid.X", "delivered", None).await.unwrap());
        assert_eq!(state(pool.clone()).await.0.as_deref(), Some("read"));
        record_delivery(&pool, "wamid.X", "failed", Some("131047 Re-engagement message"))
            .await
            .unwrap();
        record_delivery(&pool, "wamid.X", "read", None).await.unwrap();
        let (status, error) = state(pool.clone()).await;
        assert_eq!(status.as_deref(), Some("failed"));
        assert_eq!(error.as_deref(), Some("131047 Re-engagement message"));
        assert!(!record_delivery(&pool, "wamid.unknown", "read", None).await.unwrap());
    }

    /// An answer sent in parts: a report of any part reaches it, a later part's failure
    /// marks it failed, and the parts go with the answer.
    #[tokio::test]
    async fn reports_of_every_part_reach_the_answer() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let add = |text: &'static str| {
            let pool = pool.clone();
            async move {
                let message = NewMessage::plain(conv.id, Role::Assistant, text);
                memory::add_message(&pool, &message).await.unwrap()
            }
        };
        let (long, short) = (add("a long answer").await, add("short").await);
        let parts: Vec<String> = ["wamid.P1", "wamid.P2", "wamid.P3"].map(String::from).into();
        memory::set_message_parts(&pool, long, &parts, Some("sent")).await.unwrap();
        memory::set_message_parts(&pool, short, &["wamid.S1".to_string()], Some("sent"))
            .await
            .unwrap();
        let state = |id: MessageId| {
            let pool = pool.clone();
            async move {
                let m = memory::get_message(&pool, id).await.unwrap().unwrap();
                (m.external_id, m.delivery_status, m.delivery_error)
            }
        };
        assert_eq!(state(long).await.0.as_deref(), Some("wamid.P1"));
        assert!(record_delivery(&pool, "wamid.P3", "delivered", None).await.unwrap());
        assert_eq!(state(long).await.1.as_deref(), Some("delivered"));
        assert!(record_delivery(&pool, "wamid.P2", "failed", Some("131026 undeliverable"))
            .await
            .unwrap());
        assert!(record_delivery(&pool, "wamid.P1", "read", None).await.unwrap());
        let (_, status, error) = state(long).await;
        assert_eq!(status.as_deref(), Some("failed"));
        assert_eq!(error.as_deref(), Some("131026 undeliverable"));
        assert_eq!(state(short).await.1.as_deref(), Some("sent"), "another answer changed");
        assert!(memory::delete_conversation(&pool, conv.id).await.unwrap());
        assert!(!record_delivery(&pool, "wamid.P2", "read", None).await.unwrap());
    }

    /// An answer sent part by part: each part is numbered as it is recorded and the first
    /// one's id goes on the message; while parts are still going out or waiting for another
    /// try, a report of a part that went out does not make the answer look delivered (but
    /// `failed` wins); it is `sent` once the last part is, and reports then move it.
    #[tokio::test]
    async fn an_answer_in_parts_is_sent_only_once_every_part_went_out() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let add = || {
            let pool = pool.clone();
            async move {
                let message = NewMessage::plain(conv.id, Role::Assistant, "a long answer");
                memory::add_message(&pool, &message).await.unwrap()
            }
        };
        let state = |id: MessageId| {
            let pool = pool.clone();
            async move {
                let m = memory::get_message(&pool, id).await.unwrap().unwrap();
                (m.external_id, m.delivery_status, m.delivery_error)
            }
        };
        let id = add().await;
        mark_sending(&pool, id).await.unwrap();
        memory::record_message_part(&pool, id, "wamid.A0", 4000).await.unwrap();
        assert_eq!(state(id).await.0.as_deref(), Some("wamid.A0"));
        assert!(record_delivery(&pool, "wamid.A0", "delivered", None).await.unwrap());
        assert_eq!(state(id).await.1.as_deref(), Some("sending"), "delivered while sending");
        // The second part's outage: back to not sent, the first part still recorded.
        mark_send_retry(&pool, id, "http 503").await.unwrap();
        assert!(record_delivery(&pool, "wamid.A0", "read", None).await.unwrap());
        assert_eq!(state(id).await.1, None, "delivered while a part waits for another try");
        // The next try: the second and third parts, numbered after the first.
        mark_sending(&pool, id).await.unwrap();
        memory::record_message_part(&pool, id, "wamid.A1", 8000).await.unwrap();
        memory::record_message_part(&pool, id, "wamid.A2", 9500).await.unwrap();
        mark_sent(&pool, id).await.unwrap();
        assert_eq!(state(id).await, (Some("wamid.A0".into()), Some("sent".into()), None));
        let parts = memory::message_parts(&pool, id).await.unwrap();
        let parts: Vec<(i64, &str, Option<i64>)> =
            parts.iter().map(|p| (p.index, p.external_id.as_str(), p.sent_through)).collect();
        assert_eq!(
            parts,
            [(0, "wamid.A0", Some(4000)), (1, "wamid.A1", Some(8000)), (2, "wamid.A2", Some(9500))]
        );
        assert!(record_delivery(&pool, "wamid.A2", "delivered", None).await.unwrap());
        assert_eq!(state(id).await.1.as_deref(), Some("delivered"));

        // A part reported failed while the rest waits: failed it stays, whatever follows.
        let other = add().await;
        mark_sending(&pool, other).await.unwrap();
        memory::record_message_part(&pool, other, "wamid.B0", 4000).await.unwrap();
        mark_send_retry(&pool, other, "http 503").await.unwrap();
        assert!(record_delivery(&pool, "wamid.B0", "failed", Some("131026")).await.unwrap());
        mark_sending(&pool, other).await.unwrap();
        let failed = (Some("wamid.B0".into()), Some("failed".into()), Some("131026".into()));
        assert_eq!(state(other).await, failed);
        // Reported failed during a send: neither the end of the send nor a retry hides it.
        let third = add().await;
        mark_sending(&pool, third).await.unwrap();
        memory::record_message_part(&pool, third, "wamid.C0", 4000).await.unwrap();
        assert!(record_delivery(&pool, "wamid.C0", "failed", Some("131026")).await.unwrap());
        mark_send_retry(&pool, third, "http 503").await.unwrap();
        mark_sent(&pool, third).await.unwrap();
        assert_eq!(state(third).await.1.as_deref(), Some("failed"));
    }

    #[tokio::test]
    async fn stored_turn_finds_the_question_and_its_answer() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        assert!(stored_turn(&pool, ChannelKind::WhatsApp, "wamid.Q").await.unwrap().is_none());
        let mut question = NewMessage::plain(conv.id, Role::User, "q");
        question.external_id = Some("wamid.Q".into());
        let qid = memory::add_message(&pool, &question).await.unwrap();
        let turn = stored_turn(&pool, ChannelKind::WhatsApp, "wamid.Q").await.unwrap().unwrap();
        assert_eq!((turn.user_message_id, turn.answer.clone()), (qid, None));
        // A reminder fired before the answer was written: it is not the answer.
        let reminder = NewMessage::plain(conv.id, Role::Assistant, "Reminder: call Ada");
        memory::add_message(&pool, &reminder).await.unwrap();
        let turn = stored_turn(&pool, ChannelKind::WhatsApp, "wamid.Q").await.unwrap().unwrap();
        assert_eq!(turn.answer, None);
        let answer = NewMessage {
            tier: Some("fast".into()),
            ..NewMessage::plain(conv.id, Role::Assistant, "a")
        };
        let aid = memory::add_message(&pool, &answer).await.unwrap();
        let turn = stored_turn(&pool, ChannelKind::WhatsApp, "wamid.Q").await.unwrap().unwrap();
        let answer = turn.answer.unwrap();
        assert_eq!((answer.message_id, answer.content.as_str()), (aid, "a"));
        assert_eq!(answer.delivery_status, None);
        assert!(stored_turn(&pool, ChannelKind::Nextcloud, "wamid.Q").await.unwrap().is_none());

        // A question left unanswered (a stop), then another answered: the later answer is
        // not the first question's.
        let mut lost = NewMessage::plain(conv.id, Role::User, "lost");
        lost.external_id = Some("wamid.LOST".into());
        memory::add_message(&pool, &lost).await.unwrap();
        let mut next = NewMessage::plain(conv.id, Role::User, "next");
        next.external_id = Some("wamid.NEXT".into());
        memory::add_message(&pool, &next).await.unwrap();
        let next_answer = NewMessage {
            tier: Some("fast".into()),
            ..NewMessage::plain(conv.id, Role::Assistant, "b")
        };
        let bid = memory::add_message(&pool, &next_answer).await.unwrap();
        let turn = stored_turn(&pool, ChannelKind::WhatsApp, "wamid.LOST").await.unwrap().unwrap();
        assert_eq!(turn.answer, None);
        let turn = stored_turn(&pool, ChannelKind::WhatsApp, "wamid.NEXT").await.unwrap().unwrap();
        assert_eq!(turn.answer.map(|a| a.message_id), Some(bid));
    }

    /// The reports kept for ids not recorded yet: (id, state, error), oldest first.
    async fn early_rows(pool: &SqlitePool) -> Vec<(String, String, Option<String>)> {
        sqlx::query_as("SELECT external_id, status, error FROM early_deliveries ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// A new answer in a WhatsApp conversation, not sent yet.
    async fn answer_to_send(pool: &SqlitePool) -> MessageId {
        let conv = memory::get_or_create_conversation(pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let message = NewMessage::plain(conv.id, Role::Assistant, "a long answer");
        memory::add_message(pool, &message).await.unwrap()
    }

    /// The delivery state of the message `id` and its error.
    async fn delivery(pool: &SqlitePool, id: MessageId) -> (Option<String>, Option<String>) {
        let m = memory::get_message(pool, id).await.unwrap().unwrap();
        (m.delivery_status, m.delivery_error)
    }

    /// Meta reports a part `failed` before the answer to our send request is back: the report
    /// waits, and the answer is failed, with the report's error, once the part is recorded;
    /// the end of the send does not hide it. Before, the report found nothing and was
    /// dropped, and the answer showed `sent`. The same for ids recorded all at once.
    #[tokio::test]
    async fn a_failed_report_before_its_part_is_recorded_fails_the_answer() {
        let (_dir, pool) = fresh().await;
        let id = answer_to_send(&pool).await;
        mark_sending(&pool, id).await.unwrap();
        let error = Some("131026 Message undeliverable");
        assert!(!record_delivery(&pool, "wamid.E0", "failed", error).await.unwrap());
        let kept = keep_early_delivery(&pool, "wamid.E0", "failed", error).await.unwrap();
        assert_eq!(kept, EarlyReport::Kept);
        // Repeated by Meta: kept once.
        keep_early_delivery(&pool, "wamid.E0", "failed", error).await.unwrap();
        keep_early_delivery(&pool, "wamid.E0", "sent", None).await.unwrap();
        assert_eq!(early_rows(&pool).await.len(), 2);
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("sending"));

        memory::record_message_part(&pool, id, "wamid.E0", 4000).await.unwrap();
        let failed = (Some("failed".to_string()), Some("131026 Message undeliverable".into()));
        assert_eq!(delivery(&pool, id).await, failed);
        assert_eq!(early_rows(&pool).await, [], "applied reports are dropped");
        memory::record_message_part(&pool, id, "wamid.E1", 8000).await.unwrap();
        mark_sent(&pool, id).await.unwrap();
        assert_eq!(delivery(&pool, id).await, failed);
        // A report that comes once the id is recorded finds it, even through this path (the
        // id recorded between `record_delivery` and `keep_early_delivery`).
        let late = keep_early_delivery(&pool, "wamid.E1", "read", None).await.unwrap();
        assert_eq!(late, EarlyReport::Recorded);
        assert_eq!(delivery(&pool, id).await, failed);
        assert_eq!(early_rows(&pool).await, []);

        // Ids recorded all at once.
        let whole = answer_to_send(&pool).await;
        keep_early_delivery(&pool, "wamid.W1", "failed", None).await.unwrap();
        let parts = ["wamid.W0".to_string(), "wamid.W1".to_string()];
        memory::set_message_parts(&pool, whole, &parts, Some("sent")).await.unwrap();
        assert_eq!(delivery(&pool, whole).await.0.as_deref(), Some("failed"));
        assert_eq!(early_rows(&pool).await, []);
    }

    /// A part reported `delivered` (and `sent`) before it was recorded: the answer does not
    /// look delivered while parts of it are still going out or wait for another try, and is
    /// `delivered` (not merely `sent`) once the last part went out; reports then move it as
    /// usual. Deleting its conversation leaves no kept report behind.
    #[tokio::test]
    async fn a_delivered_report_before_its_part_is_recorded_counts_once_every_part_is_out() {
        let (_dir, pool) = fresh().await;
        let id = answer_to_send(&pool).await;
        mark_sending(&pool, id).await.unwrap();
        for status in ["delivered", "sent"] {
            assert!(!record_delivery(&pool, "wamid.D0", status, None).await.unwrap());
            keep_early_delivery(&pool, "wamid.D0", status, None).await.unwrap();
        }
        memory::record_message_part(&pool, id, "wamid.D0", 4000).await.unwrap();
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("sending"));
        assert_eq!(early_rows(&pool).await, []);
        // The second part's outage: not sent, and not delivered either.
        mark_send_retry(&pool, id, "http 503").await.unwrap();
        assert_eq!(delivery(&pool, id).await.0, None);
        // The next try: the second part reported `sent` early, the third recorded as usual.
        mark_sending(&pool, id).await.unwrap();
        keep_early_delivery(&pool, "wamid.D1", "sent", None).await.unwrap();
        memory::record_message_part(&pool, id, "wamid.D1", 8000).await.unwrap();
        memory::record_message_part(&pool, id, "wamid.D2", 9500).await.unwrap();
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("sending"));
        mark_sent(&pool, id).await.unwrap();
        assert_eq!(delivery(&pool, id).await, (Some("delivered".into()), None));
        assert!(record_delivery(&pool, "wamid.D2", "sent", None).await.unwrap());
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("delivered"), "moved back");
        assert!(record_delivery(&pool, "wamid.D2", "read", None).await.unwrap());
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("read"));

        // Without early reports an answer is `sent` once its parts are out, as before.
        let plain = answer_to_send(&pool).await;
        mark_sending(&pool, plain).await.unwrap();
        memory::record_message_part(&pool, plain, "wamid.N0", 10).await.unwrap();
        mark_sent(&pool, plain).await.unwrap();
        assert_eq!(delivery(&pool, plain).await, (Some("sent".into()), None));

        let conv = memory::get_message(&pool, id).await.unwrap().unwrap().conversation_id;
        assert!(memory::delete_conversation(&pool, conv).await.unwrap());
        assert_eq!(early_rows(&pool).await, []);
        let parts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_parts")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(parts, 0, "the parts (and what they remembered) went with the answer");
    }

    /// Kept reports hold no text nor number, are dropped after a day (and not applied once
    /// that old), and are bounded in number: the oldest go first, `failed` ones last.
    #[tokio::test]
    async fn early_reports_are_dropped_after_a_day_and_bounded() {
        let (_dir, pool) = fresh().await;
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('early_deliveries')")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(columns, ["id", "external_id", "status", "error", "received_at"]);

        let age = |external_id: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query("UPDATE early_deliveries SET received_at = ?1 WHERE external_id = ?2")
                    .bind(now_ms() - EARLY_DELIVERY_KEEP_MS - 1000)
                    .bind(external_id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        keep_early_delivery(&pool, "wamid.OLD", "failed", Some("131026")).await.unwrap();
        age("wamid.OLD").await;
        keep_early_delivery(&pool, "wamid.NEW", "delivered", None).await.unwrap();
        let ids: Vec<String> = early_rows(&pool).await.into_iter().map(|r| r.0).collect();
        assert_eq!(ids, ["wamid.NEW"]);
        // One past its day but not purged yet (no report came since) is not applied.
        age("wamid.NEW").await;
        let id = answer_to_send(&pool).await;
        memory::set_message_parts(&pool, id, &["wamid.NEW".into()], Some("sent")).await.unwrap();
        assert_eq!(delivery(&pool, id).await.0.as_deref(), Some("sent"));
        assert_eq!(early_rows(&pool).await, []);

        // At the bound, the oldest `failed` report first.
        sqlx::query(
            "INSERT INTO early_deliveries (external_id, status, received_at)
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             SELECT 'wamid.F' || i, CASE i WHEN 1 THEN 'failed' ELSE 'delivered' END, ?2
             FROM n",
        )
        .bind(EARLY_DELIVERY_MAX_ROWS)
        .bind(now_ms())
        .execute(&pool)
        .await
        .unwrap();
        keep_early_delivery(&pool, "wamid.X", "read", None).await.unwrap();
        let ids: Vec<String> = early_rows(&pool).await.into_iter().map(|r| r.0).collect();
        assert_eq!(ids.len() as i64, EARLY_DELIVERY_MAX_ROWS);
        assert_eq!(&ids[..3], ["wamid.F1", "wamid.F3", "wamid.F4"], "not the oldest dropped");
        assert_eq!(ids.last().map(String::as_str), Some("wamid.X"));
        // Only `failed` ones left: the oldest of them goes.
        sqlx::query("UPDATE early_deliveries SET status = 'failed'").execute(&pool).await.unwrap();
        keep_early_delivery(&pool, "wamid.Y", "failed", None).await.unwrap();
        let ids: Vec<String> = early_rows(&pool).await.into_iter().map(|r| r.0).collect();
        assert_eq!(ids.len() as i64, EARLY_DELIVERY_MAX_ROWS);
        assert_eq!((ids[0].as_str(), ids.last().unwrap().as_str()), ("wamid.F3", "wamid.Y"));
    }

    /// A tagged report of an answer a live send owns does not touch it (the report waits
    /// for the part's id); the same report of an answer a stopped process left confirms it.
    #[tokio::test]
    async fn confirm_reply_delivery_leaves_an_answer_being_sent_alone() {
        let (_dir, pool) = fresh().await;
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let mut question = NewMessage::plain(conv.id, Role::User, "q");
        question.external_id = Some("wamid.Q".into());
        memory::add_message(&pool, &question).await.unwrap();
        let answer = NewMessage {
            tier: Some("fast".into()),
            ..NewMessage::plain(conv.id, Role::Assistant, "a")
        };
        let id = memory::add_message(&pool, &answer).await.unwrap();
        mark_sending(&pool, id).await.unwrap();
        let confirm = |being_sent: bool| {
            confirm_reply_delivery(
                &pool,
                ChannelKind::WhatsApp,
                "wamid.Q",
                "wamid.P0",
                "delivered",
                None,
                move |answer| being_sent && answer == id,
            )
        };
        assert!(!confirm(true).await.unwrap(), "an answer being sent was confirmed");
        let m = memory::get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!((m.delivery_status.as_deref(), m.external_id), (Some("sending"), None));
        assert!(confirm(false).await.unwrap());
        let m = memory::get_message(&pool, id).await.unwrap().unwrap();
        assert_eq!(m.delivery_status.as_deref(), Some("delivered"));
        assert_eq!(m.external_id.as_deref(), Some("wamid.P0"));
    }
}
