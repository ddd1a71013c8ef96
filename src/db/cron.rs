//! Scheduled jobs and their run history (`cron_jobs`, `cron_runs`). Pure storage: the
//! schedule is kept as text and never interpreted here; parsing, time zones and running
//! belong to `crate::cron`.

use sqlx::SqlitePool;

use crate::db::now_ms;
use crate::domain::{ChannelKind, ConversationId, MessageId};

/// Database id of a scheduled job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CronJobId(pub i64);

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct CronJob {
    pub id: CronJobId,
    pub name: String,
    /// The cron expression as the user wrote it (5 or 6 fields, or an `@nickname`).
    pub schedule: String,
    /// IANA time zone; `None` follows `CRON_TIMEZONE` or the system's.
    pub timezone: Option<String>,
    pub prompt: String,
    pub channel: ChannelKind,
    /// A WebChat conversation id, a WhatsApp number or a Nextcloud Talk room token.
    pub target: String,
    pub tier: Option<String>,
    pub enabled: bool,
    pub kind: JobKind,
    /// The conversation a reminder was asked in; `None` for prompt jobs.
    pub conversation_id: Option<ConversationId>,
    pub last_run_at: Option<i64>,
    pub last_outcome: Option<RunOutcome>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a job is made of; used to create it and to replace it after an edit.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub schedule: String,
    pub timezone: Option<String>,
    pub prompt: String,
    pub channel: ChannelKind,
    pub target: String,
    pub tier: Option<String>,
    pub enabled: bool,
    pub kind: JobKind,
    pub conversation_id: Option<ConversationId>,
}

impl From<&CronJob> for JobSpec {
    fn from(job: &CronJob) -> Self {
        JobSpec {
            name: job.name.clone(),
            schedule: job.schedule.clone(),
            timezone: job.timezone.clone(),
            prompt: job.prompt.clone(),
            channel: job.channel,
            target: job.target.clone(),
            tier: job.tier.clone(),
            enabled: job.enabled,
            kind: job.kind,
            conversation_id: job.conversation_id,
        }
    }
}

crate::domain::named_enum! {
    /// What a run does: answer the prompt with a model, or post a fixed reminder text.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum JobKind {
        Prompt = "prompt",
        Reminder = "reminder",
    }
}

crate::domain::named_enum! {
    /// How a run ended (or that it has not ended yet).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RunOutcome {
        Running = "running",
        Delivered = "delivered",
        Failed = "failed",
    }
}

/// One run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct CronRun {
    pub id: i64,
    pub job_id: CronJobId,
    pub started_at: i64,
    /// `None` while the run is in progress.
    pub duration_ms: Option<i64>,
    pub outcome: RunOutcome,
    /// Why the run failed, or a note on how it was delivered (a template instead of text).
    pub error: Option<String>,
    /// The stored answer, when the model produced one.
    pub message_id: Option<MessageId>,
}

/// Every job, oldest first.
pub async fn list_jobs(pool: &SqlitePool) -> Result<Vec<CronJob>, sqlx::Error> {
    let rows: Vec<JobRow> =
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM cron_jobs ORDER BY id"))
            .fetch_all(pool)
            .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub async fn get_job(pool: &SqlitePool, id: CronJobId) -> Result<Option<CronJob>, sqlx::Error> {
    let row: Option<JobRow> =
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM cron_jobs WHERE id = ?1"))
            .bind(id.0)
            .fetch_optional(pool)
            .await?;
    row.map(TryInto::try_into).transpose()
}

pub async fn insert_job(pool: &SqlitePool, spec: &JobSpec) -> Result<CronJob, sqlx::Error> {
    let now = now_ms();
    let row: JobRow = sqlx::query_as(&format!(
        "INSERT INTO cron_jobs (name, schedule, timezone, prompt, channel, target, tier, enabled,
                                created_at, updated_at, kind, conversation_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11)
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(&spec.name)
    .bind(&spec.schedule)
    .bind(&spec.timezone)
    .bind(&spec.prompt)
    .bind(spec.channel.as_str())
    .bind(&spec.target)
    .bind(&spec.tier)
    .bind(spec.enabled)
    .bind(now)
    .bind(spec.kind.as_str())
    .bind(spec.conversation_id.map(|c| c.0))
    .fetch_one(pool)
    .await?;
    row.try_into()
}

/// Disables `job`, its other fields as they are; `None` when it does not exist.
pub async fn disable_job(pool: &SqlitePool, job: &CronJob) -> Result<Option<CronJob>, sqlx::Error> {
    let spec = JobSpec { enabled: false, ..JobSpec::from(job) };
    update_job(pool, job.id, &spec).await
}

/// Disables an enabled job with `reason` as its last error, where the Schedules panel shows
/// it; `None` when the job does not exist or is already disabled.
pub async fn disable_job_saying(
    pool: &SqlitePool,
    id: CronJobId,
    reason: &str,
) -> Result<Option<CronJob>, sqlx::Error> {
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "UPDATE cron_jobs SET enabled = 0, last_error = ?2, updated_at = ?3
         WHERE id = ?1 AND enabled = 1
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(id.0)
    .bind(reason)
    .bind(now_ms())
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// Replaces the editable fields of a job; `None` when it does not exist. Enabling a
/// disabled job drops the reason it was disabled (`disable_job_saying`,
/// `detach_conversation`): its last error becomes its last run's again, none without runs.
pub async fn update_job(
    pool: &SqlitePool,
    id: CronJobId,
    spec: &JobSpec,
) -> Result<Option<CronJob>, sqlx::Error> {
    // SET expressions read the row as it was, so `enabled` here is the old value.
    let row: Option<JobRow> = sqlx::query_as(&format!(
        "UPDATE cron_jobs SET name = ?1, schedule = ?2, timezone = ?3, prompt = ?4, channel = ?5,
                              target = ?6, tier = ?7, enabled = ?8, updated_at = ?9,
                              kind = ?11, conversation_id = ?12,
                              last_error = CASE WHEN enabled = 0 AND ?8 THEN
                                  (SELECT error FROM cron_runs WHERE job_id = ?10
                                   ORDER BY id DESC LIMIT 1)
                                  ELSE last_error END
         WHERE id = ?10
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(&spec.name)
    .bind(&spec.schedule)
    .bind(&spec.timezone)
    .bind(&spec.prompt)
    .bind(spec.channel.as_str())
    .bind(&spec.target)
    .bind(&spec.tier)
    .bind(spec.enabled)
    .bind(now_ms())
    .bind(id.0)
    .bind(spec.kind.as_str())
    .bind(spec.conversation_id.map(|c| c.0))
    .fetch_optional(pool)
    .await?;
    row.map(TryInto::try_into).transpose()
}

/// How many reminders are enabled, in every conversation.
pub async fn count_active_reminders(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM cron_jobs WHERE kind = 'reminder' AND enabled = 1")
        .fetch_one(pool)
        .await
}

/// The reminders asked in a conversation, oldest first.
pub async fn list_reminders(
    pool: &SqlitePool,
    conversation_id: ConversationId,
) -> Result<Vec<CronJob>, sqlx::Error> {
    let rows: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM cron_jobs
         WHERE kind = 'reminder' AND conversation_id = ?1 ORDER BY id"
    ))
    .bind(conversation_id.0)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Takes the jobs off WebChat conversation `id` before it is deleted, in one transaction:
/// prompt jobs that write there are disabled with `reason` as their last error (they stay,
/// to be pointed elsewhere or deleted: a job that went on running would fail at every
/// occurrence), and reminders asked there are deleted. Returns the disabled jobs and the
/// deleted reminders' ids, for the scheduler.
pub async fn detach_conversation(
    pool: &SqlitePool,
    id: ConversationId,
    reason: &str,
) -> Result<(Vec<CronJob>, Vec<CronJobId>), sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    // A WebChat target is a conversation id as text; CAST also matches one typed with a
    // leading zero before targets were stored canonically.
    let disabled: Vec<JobRow> = sqlx::query_as(&format!(
        "UPDATE cron_jobs SET enabled = 0, last_error = ?2, updated_at = ?3
         WHERE kind = 'prompt' AND channel = 'webchat' AND CAST(target AS INTEGER) = ?1
         RETURNING {JOB_COLUMNS}"
    ))
    .bind(id.0)
    .bind(reason)
    .bind(now_ms())
    .fetch_all(&mut *tx)
    .await?;
    let deleted: Vec<i64> = sqlx::query_scalar(
        "DELETE FROM cron_jobs
         WHERE kind = 'reminder'
           AND (conversation_id = ?1 OR (channel = 'webchat' AND CAST(target AS INTEGER) = ?1))
         RETURNING id",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let disabled = disabled.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?;
    Ok((disabled, deleted.into_iter().map(CronJobId).collect()))
}

/// Deletes a job and (by cascade) its history; false when it did not exist.
pub async fn delete_job(pool: &SqlitePool, id: CronJobId) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM cron_jobs WHERE id = ?1").bind(id.0).execute(pool).await?;
    Ok(done.rows_affected() > 0)
}

/// Records the start of a run on the job and in the history, in one transaction, and
/// returns the run's id.
pub async fn start_run(
    pool: &SqlitePool,
    job_id: CronJobId,
    started_at: i64,
) -> Result<i64, sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO cron_runs (job_id, started_at, outcome) VALUES (?1, ?2, 'running')
         RETURNING id",
    )
    .bind(job_id.0)
    .bind(started_at)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE cron_jobs SET last_run_at = ?1, last_outcome = 'running', last_error = NULL
         WHERE id = ?2",
    )
    .bind(started_at)
    .bind(job_id.0)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(run_id)
}

/// Records how a run ended, on the run and on its job.
pub async fn finish_run(
    pool: &SqlitePool,
    run_id: i64,
    duration_ms: i64,
    outcome: RunOutcome,
    error: Option<&str>,
    message_id: Option<MessageId>,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    let job_id: Option<i64> = sqlx::query_scalar(
        // The message may have gone with its conversation during the run: the run then
        // names none (a reference to it would fail the whole update, leaving the run
        // `running` for good).
        "UPDATE cron_runs SET duration_ms = ?1, outcome = ?2, error = ?3,
                              message_id = (SELECT id FROM messages WHERE id = ?4)
         WHERE id = ?5
         RETURNING job_id",
    )
    .bind(duration_ms)
    .bind(outcome.as_str())
    .bind(error)
    .bind(message_id.map(|m| m.0))
    .bind(run_id)
    .fetch_optional(&mut *tx)
    .await?;
    // The job may have been deleted during the run; then there is nothing left to update.
    if let Some(job_id) = job_id {
        sqlx::query("UPDATE cron_jobs SET last_outcome = ?1, last_error = ?2 WHERE id = ?3")
            .bind(outcome.as_str())
            .bind(error)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn get_run(pool: &SqlitePool, run_id: i64) -> Result<Option<CronRun>, sqlx::Error> {
    let row: Option<RunRow> =
        sqlx::query_as(&format!("SELECT {RUN_COLUMNS} FROM cron_runs WHERE id = ?1"))
            .bind(run_id)
            .fetch_optional(pool)
            .await?;
    row.map(TryInto::try_into).transpose()
}

/// The last `limit` runs of a job, newest first.
pub async fn list_runs(
    pool: &SqlitePool,
    job_id: CronJobId,
    limit: i64,
) -> Result<Vec<CronRun>, sqlx::Error> {
    let rows: Vec<RunRow> = sqlx::query_as(&format!(
        "SELECT {RUN_COLUMNS} FROM cron_runs WHERE job_id = ?1 ORDER BY id DESC LIMIT ?2"
    ))
    .bind(job_id.0)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Deletes all but the newest `keep` runs of a job, so a job that fires every few seconds
/// does not grow its history without bound. Returns how many were deleted.
pub async fn prune_runs(
    pool: &SqlitePool,
    job_id: CronJobId,
    keep: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM cron_runs WHERE job_id = ?1 AND id <= (
             SELECT id FROM cron_runs WHERE job_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )
    .bind(job_id.0)
    .bind(keep)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records, before a run's message leaves on its channel, that it is being sent: the stored
/// message becomes `sending` and the run names it, in one transaction. A stop during the send
/// then leaves a `running` run with a `sending` message, which `fail_interrupted_runs` marks
/// `unknown`: it may have reached the user, and it is never sent again.
pub async fn mark_run_sending(
    pool: &SqlitePool,
    run_id: i64,
    message_id: MessageId,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    sqlx::query("UPDATE messages SET delivery_status = 'sending' WHERE id = ?1")
        .bind(message_id.0)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE cron_runs SET message_id = ?1 WHERE id = ?2")
        .bind(message_id.0)
        .bind(run_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The delivery error of a message that a stop caught while it was being sent.
const STOPPED_WHILE_SENDING: &str = "my-claw stopped while this message was being sent: it may \
or may not have reached the user, and is not sent again";

/// Marks runs left `running` by a process that stopped mid-run as failed, with `reason`, and
/// the message such a run was sending (`mark_run_sending`) as `unknown`. Called once at
/// start, before the scheduler runs anything (no send of a run is in flight then); returns
/// how many runs there were.
pub async fn fail_interrupted_runs(pool: &SqlitePool, reason: &str) -> Result<u64, sqlx::Error> {
    let mut tx = crate::db::begin_write(pool).await?;
    sqlx::query(
        "UPDATE messages SET delivery_status = 'unknown', delivery_error = ?1
         WHERE delivery_status = 'sending'
           AND id IN (SELECT message_id FROM cron_runs WHERE outcome = 'running')",
    )
    .bind(STOPPED_WHILE_SENDING)
    .execute(&mut *tx)
    .await?;
    let done = sqlx::query(
        "UPDATE cron_runs SET outcome = 'failed', error = ?1 WHERE outcome = 'running'",
    )
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE cron_jobs SET last_outcome = 'failed', last_error = ?1
         WHERE last_outcome = 'running'",
    )
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}

const JOB_COLUMNS: &str = "id, name, schedule, timezone, prompt, channel, target, tier, enabled, \
                           kind, conversation_id, last_run_at, last_outcome, last_error, \
                           created_at, updated_at";

const RUN_COLUMNS: &str = "id, job_id, started_at, duration_ms, outcome, error, message_id";

#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    name: String,
    schedule: String,
    timezone: Option<String>,
    prompt: String,
    channel: String,
    target: String,
    tier: Option<String>,
    enabled: bool,
    kind: String,
    conversation_id: Option<i64>,
    last_run_at: Option<i64>,
    last_outcome: Option<String>,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<JobRow> for CronJob {
    type Error = sqlx::Error;
    fn try_from(row: JobRow) -> Result<Self, Self::Error> {
        let channel = ChannelKind::parse(&row.channel).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown channel `{}` in cron_jobs", row.channel).into())
        })?;
        let kind = JobKind::parse(&row.kind).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown job kind `{}` in cron_jobs", row.kind).into())
        })?;
        Ok(CronJob {
            id: CronJobId(row.id),
            name: row.name,
            schedule: row.schedule,
            timezone: row.timezone,
            prompt: row.prompt,
            channel,
            target: row.target,
            tier: row.tier,
            enabled: row.enabled,
            kind,
            conversation_id: row.conversation_id.map(ConversationId),
            last_run_at: row.last_run_at,
            // An outcome this version does not know reads as none rather than failing the list.
            last_outcome: row.last_outcome.as_deref().and_then(RunOutcome::parse),
            last_error: row.last_error,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: i64,
    job_id: i64,
    started_at: i64,
    duration_ms: Option<i64>,
    outcome: String,
    error: Option<String>,
    message_id: Option<i64>,
}

impl TryFrom<RunRow> for CronRun {
    type Error = sqlx::Error;
    fn try_from(row: RunRow) -> Result<Self, Self::Error> {
        let outcome = RunOutcome::parse(&row.outcome).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown outcome `{}` in cron_runs", row.outcome).into())
        })?;
        Ok(CronRun {
            id: row.id,
            job_id: CronJobId(row.job_id),
            started_at: row.started_at,
            duration_ms: row.duration_ms,
            outcome,
            error: row.error,
            message_id: row.message_id.map(MessageId),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::fresh_test_db as fresh;
    use crate::db::memory::{self, NewMessage};
    use crate::domain::Role;

    /// A run whose message went with its conversation (deleted during the run) still ends:
    /// it names no message. Before, the reference failed the update, the run stayed
    /// `running` for good and "Run now" answered 500 (QA pass 10).
    #[tokio::test]
    async fn a_run_whose_message_was_deleted_meanwhile_still_ends() {
        let (_dir, pool) = fresh().await;
        let conv = memory::create_webchat_conversation(&pool, None).await.unwrap();
        let spec = JobSpec {
            name: "digest".into(),
            schedule: "0 8 * * *".into(),
            timezone: None,
            prompt: "the news".into(),
            channel: ChannelKind::WebChat,
            target: conv.id.0.to_string(),
            tier: None,
            enabled: true,
            kind: JobKind::Prompt,
            conversation_id: None,
        };
        let job = insert_job(&pool, &spec).await.unwrap();
        let run = start_run(&pool, job.id, now_ms()).await.unwrap();
        let message = NewMessage::plain(conv.id, Role::Assistant, "an answer");
        let message = memory::add_message(&pool, &message).await.unwrap();
        assert!(memory::delete_conversation(&pool, conv.id).await.unwrap());
        finish_run(&pool, run, 5, RunOutcome::Failed, Some("deleted meanwhile"), Some(message))
            .await
            .expect("the run ends");
        let ended = get_run(&pool, run).await.unwrap().unwrap();
        assert_eq!((ended.outcome, ended.message_id), (RunOutcome::Failed, None));
        let job = get_job(&pool, job.id).await.unwrap().unwrap();
        assert_eq!(job.last_error.as_deref(), Some("deleted meanwhile"));
    }

    /// Enabling a disabled job drops the reason it was disabled, and only then: its last
    /// error becomes its last run's (none without runs). Before, "disabled at start: …"
    /// stayed on a job the user had fixed and enabled (QA pass on the shortest interval).
    #[tokio::test]
    async fn enabling_a_job_drops_the_reason_it_was_disabled() {
        let (_dir, pool) = fresh().await;
        let spec = JobSpec {
            name: "digest".into(),
            schedule: "0 8 * * *".into(),
            timezone: None,
            prompt: "the news".into(),
            channel: ChannelKind::Nextcloud,
            target: "room1".into(),
            tier: None,
            enabled: true,
            kind: JobKind::Prompt,
            conversation_id: None,
        };
        let error_of = |id: CronJobId| {
            let pool = pool.clone();
            async move { get_job(&pool, id).await.unwrap().unwrap().last_error }
        };
        let never_run = insert_job(&pool, &spec).await.unwrap();
        let ran = insert_job(&pool, &spec).await.unwrap();
        let run = start_run(&pool, ran.id, now_ms()).await.unwrap();
        finish_run(&pool, run, 5, RunOutcome::Failed, Some("channel down"), None).await.unwrap();
        for job in [never_run.id, ran.id] {
            disable_job_saying(&pool, job, "disabled at start: why").await.unwrap().unwrap();
            // Edited while disabled: the reason stays.
            let renamed = JobSpec { name: "renamed".into(), enabled: false, ..spec.clone() };
            update_job(&pool, job, &renamed).await.unwrap().unwrap();
            assert_eq!(error_of(job).await.as_deref(), Some("disabled at start: why"));
        }
        update_job(&pool, never_run.id, &spec).await.unwrap().unwrap();
        assert_eq!(error_of(never_run.id).await, None);
        update_job(&pool, ran.id, &spec).await.unwrap().unwrap();
        assert_eq!(error_of(ran.id).await.as_deref(), Some("channel down"));
    }

    /// A stop while a run's message was being sent: at the next start the run is failed and
    /// its message `unknown` (never sent again); a message another path is sending is not
    /// the run's to touch.
    #[tokio::test]
    async fn a_stop_during_a_runs_send_leaves_its_message_unknown() {
        let (_dir, pool) = fresh().await;
        let spec = JobSpec {
            name: "briefing".into(),
            schedule: "0 8 * * *".into(),
            timezone: None,
            prompt: "the news".into(),
            channel: ChannelKind::WhatsApp,
            target: "16505551234".into(),
            tier: None,
            enabled: true,
            kind: JobKind::Prompt,
            conversation_id: None,
        };
        let job = insert_job(&pool, &spec).await.unwrap();
        let conv = memory::get_or_create_conversation(&pool, ChannelKind::WhatsApp, "1", None)
            .await
            .unwrap();
        let add = || {
            let pool = pool.clone();
            async move {
                let message = NewMessage::plain(conv.id, Role::Assistant, "an answer");
                memory::add_message(&pool, &message).await.unwrap()
            }
        };
        let (message, elsewhere) = (add().await, add().await);
        let run = start_run(&pool, job.id, now_ms()).await.unwrap();
        mark_run_sending(&pool, run, message).await.unwrap();
        crate::db::inbound::mark_sending(&pool, elsewhere).await.unwrap();
        let status = |id: MessageId| {
            let pool = pool.clone();
            async move {
                let m = memory::get_message(&pool, id).await.unwrap().unwrap();
                (m.delivery_status, m.delivery_error)
            }
        };
        assert_eq!(status(message).await.0.as_deref(), Some("sending"));

        assert_eq!(fail_interrupted_runs(&pool, "interrupted").await.unwrap(), 1);
        let (state, error) = status(message).await;
        assert_eq!(state.as_deref(), Some("unknown"));
        assert!(error.unwrap().contains("not sent again"));
        assert_eq!(status(elsewhere).await.0.as_deref(), Some("sending"));
        let run = get_run(&pool, run).await.unwrap().unwrap();
        assert_eq!((run.outcome, run.message_id), (RunOutcome::Failed, Some(message)));
    }
}
