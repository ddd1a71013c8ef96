//! The scheduling loop: one task that sleeps until the next occurrence of any enabled job,
//! then starts the runs that are due. Occurrences are computed in each job's own zone at
//! each wake, so daylight-saving changes need no special handling, and the jobs are read
//! from the database at each wake, so there is no registration to keep in step with it.
//! What one run does is `run.rs`'s; the rules for when a job is due are here.
//!
//! It replaced tokio-cron-scheduler, which fired with the UTC offset a zone had when the
//! job was added (so every job was re-added after a DST change by a maintenance loop), took
//! only six fields, and kept its own copy of every job.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Notify};

use crate::cron::{not_yet_run, plan, run, CronError, Inner};
use crate::db::cron::{self as store, CronJob};

/// Longest sleep between two looks at the jobs, also when no job is due sooner. Sleeps
/// run on the monotonic clock; waking at least this often bounds how far a change of the
/// wall clock (NTP, suspend) can shift a run.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// How late after an occurrence a run still starts. Later than that (the machine was
/// suspended, the database was locked for minutes) the occurrence counts as missed, like
/// those missed while the process was down.
const FIRE_TOLERANCE: Duration = Duration::from_secs(60);

/// Wait before looking again when the jobs could not be read.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Starts the loop. It ends when the last `CronHandle` is dropped or the task is aborted.
/// `wake` makes it look again now (a job was created, edited or deleted); `checked` is
/// where it publishes how far it has looked.
pub(super) fn spawn(
    inner: Weak<Inner>,
    wake: Arc<Notify>,
    checked: watch::Sender<DateTime<Utc>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Occurrences before the start are never run: missed runs are not replayed.
        let mut cursor = Utc::now();
        loop {
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let sleep = match look(&strong, cursor).await {
                Ok((now, next)) => {
                    cursor = now;
                    checked.send_replace(now);
                    next.map_or(MAX_SLEEP, |next| {
                        (next - now).to_std().unwrap_or_default().min(MAX_SLEEP)
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cron jobs could not be read; trying again");
                    RETRY_AFTER_ERROR
                }
            };
            // Not held while sleeping, so that dropping the last handle ends the loop.
            drop(strong);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = wake.notified() => {}
            }
        }
    })
}

/// Starts the runs of every enabled job with an occurrence in `(cursor, now]`, and returns
/// `now` and the next occurrence of any enabled job after it.
async fn look(
    inner: &Arc<Inner>,
    cursor: DateTime<Utc>,
) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>), CronError> {
    let _turn = inner.turn.lock().await;
    let jobs = store::list_jobs(&inner.pool).await?;
    let now = Utc::now();
    let mut next_wake: Option<DateTime<Utc>> = None;
    for job in jobs.into_iter().filter(|job| job.enabled) {
        let (schedule, timezone) = match plan(inner, &job) {
            Ok(plan) => plan,
            Err(reason) => {
                // A row written around the API; logged at each look until it is fixed.
                tracing::warn!(job = job.id.0, %reason, "cron job not scheduled");
                continue;
            }
        };
        if let Some(next) = schedule.next_after(now, timezone) {
            next_wake = Some(next_wake.map_or(next, |wake| wake.min(next)));
        }
        let Some(occurrence) = schedule.latest_at_or_before(now, timezone) else {
            continue;
        };
        if occurrence <= cursor {
            continue;
        }
        let late = (now - occurrence).to_std().unwrap_or_default();
        if late > FIRE_TOLERANCE {
            tracing::warn!(job = job.id.0, late_s = late.as_secs(), "cron occurrence missed");
            continue;
        }
        if not_yet_run(&job, occurrence) {
            start(inner, job).await;
        }
    }
    Ok((now, next_wake))
}

/// Starts one run: its row is written before this returns, the rest goes on in the
/// background.
async fn start(inner: &Arc<Inner>, job: CronJob) {
    let id = job.id;
    match run::begin(inner, job).await {
        Ok(started) => {
            tokio::spawn(async move {
                if let Err(e) = started.finish().await {
                    tracing::error!(job = id.0, error = %e, "cron run could not be recorded");
                }
            });
        }
        Err(CronError::Busy(_)) => {
            tracing::warn!(job = id.0, "cron job still running from its last occurrence: skipped")
        }
        Err(e) => tracing::error!(job = id.0, error = %e, "cron run could not start"),
    }
}
