//! When runs start: tokio-cron-scheduler fires them, one one-shot library job per enabled
//! job, set for that job's next occurrence. The occurrence is computed by `schedule.rs` in
//! the job's own zone, so daylight-saving changes need no special handling: the library
//! is never given a cron expression, because it would fix the zone's UTC offset when the
//! job is added and drift by an hour at the next DST change. When a one-shot fires it
//! starts the run (if the job is still the version it was set for) and sets the next one.
//! What one run does is `run.rs`'s.
//!
//! Every change to the set of library jobs (`sync`, and a firing) happens under
//! `Inner::turn`, the lock edits take: once an edit has returned, the one-shot of the job
//! as it was is gone from `Inner::registered`, and one that the library had already
//! fired finds itself replaced and starts nothing.
//!
//! Runs missed while the process was stopped are not replayed: at start each job is set
//! for its next occurrence after now.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio_cron_scheduler::job::job_data::Uuid as LibraryJobId;
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::cron::{lock, not_yet_run, plan, run, CronError, Inner};
use crate::db::cron::{self as store, CronJob, CronJobId};

/// How late after an occurrence a run still starts. Later than that (the machine was
/// suspended, the database was locked for minutes) the occurrence counts as missed, like
/// those missed while the process was down.
const FIRE_TOLERANCE: Duration = Duration::from_secs(60);

/// The library job standing for an enabled job's next occurrence.
pub(super) struct Registered {
    id: LibraryJobId,
    /// The job as it was when set: a firing whose row no longer matches it starts nothing.
    job: CronJob,
    occurrence: DateTime<Utc>,
}

/// Creates and starts the library's scheduler.
pub(super) async fn new_scheduler() -> Result<JobScheduler, CronError> {
    let scheduler = JobScheduler::new().await.map_err(library_error)?;
    scheduler.start().await.map_err(library_error)?;
    Ok(scheduler)
}

/// Stops the library's scheduler: after this no one-shot fires. The caller holds
/// `Inner::turn` and has set `Inner::stopped`, so a firing already under way starts
/// nothing either.
pub(super) async fn stop(inner: &Inner) {
    let registered: Vec<LibraryJobId> =
        lock(&inner.registered).drain().map(|(_, registered)| registered.id).collect();
    for id in registered {
        remove(&inner.scheduler, id).await;
    }
    let mut scheduler = inner.scheduler.clone();
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "cron scheduler did not shut down cleanly");
    }
}

/// Sets job `id`'s one-shot for its first occurrence after `after`, replacing the one it
/// had; with no job (deleted), a disabled one or one with no next occurrence, just removes
/// it. The caller holds `Inner::turn`.
pub(super) fn sync(
    inner: &Arc<Inner>,
    id: CronJobId,
    job: Option<CronJob>,
    after: DateTime<Utc>,
) -> BoxFuture<'_, ()> {
    // Boxed as `Send`: a firing calls this and this sets the next firing, a cycle in
    // which the compiler cannot infer `Send` by itself.
    Box::pin(async move {
        let old = lock(&inner.registered).remove(&id);
        // A one-shot whose time has come (it fired, or fires within the library's next
        // half-second check) is left to the library, which deletes it once it has recorded
        // the firing; removing it first made the library log "Could not get job metadata"
        // at ERROR. Out of `registered`, it starts nothing when it fires (`fire`).
        if let Some(old) = old.filter(|old| old.occurrence > Utc::now()) {
            remove(&inner.scheduler, old.id).await;
        }
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        if let Some(job) = job.filter(|job| job.enabled) {
            match plan(inner, &job) {
                Ok((schedule, timezone)) => {
                    if let Some(occurrence) = schedule.next_after(after, timezone) {
                        register(inner, job, occurrence).await;
                    }
                }
                // A row written around the API; logged at each start and edit until fixed.
                Err(reason) => tracing::warn!(job = id.0, %reason, "cron job not scheduled"),
            }
        }
        publish(inner);
    })
}

/// Publishes how far the scheduler has looked: every occurrence before the earliest one
/// still waiting to fire has been started or skipped (later jobs have none before it
/// that are to run). Never moves back, and never past now.
pub(super) fn publish(inner: &Inner) {
    let now = Utc::now();
    let waiting = lock(&inner.registered).values().map(|r| r.occurrence).min();
    let through = waiting.map_or(now, |next| now.min(next - chrono::Duration::milliseconds(1)));
    inner.checked.send_if_modified(|checked| {
        let moved = through > *checked;
        if moved {
            *checked = through;
        }
        moved
    });
}

async fn register(inner: &Arc<Inner>, job: CronJob, occurrence: DateTime<Utc>) {
    let id = job.id;
    // The library counts whole seconds from when the job is added and checks twice a
    // second; rounding up keeps it from firing a second early, and `fire` waits out any
    // remainder.
    let wait = (occurrence - Utc::now()).to_std().unwrap_or_default();
    let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
    let weak = Arc::downgrade(inner);
    let one_shot = Job::new_one_shot_async(wait, move |library_id, _scheduler| {
        Box::pin(fire(weak.clone(), id, library_id.into(), occurrence))
    });
    let added = match one_shot {
        Ok(one_shot) => inner.scheduler.add(one_shot).await,
        Err(e) => Err(e),
    };
    match added {
        Ok(library_id) => {
            let registered = Registered { id: library_id.into(), job, occurrence };
            lock(&inner.registered).insert(id, registered);
        }
        // Until the next edit or start; nothing else would set it again.
        Err(e) => tracing::error!(job = id.0, error = %e, "cron job could not be scheduled"),
    }
}

/// A one-shot fired: starts the run of `occurrence` if the one-shot is still the job's,
/// then sets the next one.
async fn fire(
    inner: Weak<Inner>,
    id: CronJobId,
    library_id: LibraryJobId,
    occurrence: DateTime<Utc>,
) {
    let early = (occurrence - Utc::now()).to_std().unwrap_or_default();
    if !early.is_zero() {
        tokio::time::sleep(early).await;
    }
    let Some(inner) = inner.upgrade() else {
        return;
    };
    let _turn = inner.turn.lock().await;
    if inner.stopped.load(Ordering::SeqCst) {
        return;
    }
    let set_for = match lock(&inner.registered).get(&id) {
        Some(registered) if registered.id == library_id => registered.job.clone(),
        // Replaced or removed by an edit since the library fired it.
        _ => return,
    };
    let now = Utc::now();
    let job = match store::get_job(&inner.pool, id).await {
        Ok(job) => job,
        Err(e) => {
            tracing::warn!(job = id.0, error = %e, "cron job could not be read: occurrence missed");
            sync(&inner, id, Some(set_for), now.max(occurrence)).await;
            return;
        }
    };
    let Some(job) = job else {
        sync(&inner, id, None, now).await;
        return;
    };
    // A row changed around the API since the one-shot was set: set it again from the row.
    let same =
        job.enabled && job.updated_at == set_for.updated_at && job.schedule == set_for.schedule;
    if same {
        let late = (now - occurrence).to_std().unwrap_or_default();
        // A one-shot has no later occurrence: late, it still runs.
        let once = plan(&inner, &job).is_ok_and(|(schedule, _)| schedule.is_once());
        if late > FIRE_TOLERANCE && !once {
            tracing::warn!(job = id.0, late_s = late.as_secs(), "cron occurrence missed");
        } else if not_yet_run(&job, occurrence) {
            // A one-shot past its tolerance (the machine slept) says it is late.
            let late_for = (late > FIRE_TOLERANCE).then_some(occurrence);
            start_run(&inner, job.clone(), late_for).await;
        }
    }
    sync(&inner, id, Some(job), now.max(occurrence)).await;
}

/// Starts one run: its row is written before this returns, the rest goes on in the
/// background.
pub(super) async fn start_run(inner: &Arc<Inner>, job: CronJob, late_for: Option<DateTime<Utc>>) {
    let id = job.id;
    match run::begin(inner, job).await {
        Ok(started) => {
            let started = started.late_for(late_for);
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

async fn remove(scheduler: &JobScheduler, id: LibraryJobId) {
    // A one-shot that has fired is gone from the library already.
    if let Err(e) = scheduler.remove(&id.into()).await {
        tracing::debug!(error = %e, "cron one-shot not removed");
    }
}

fn library_error(e: tokio_cron_scheduler::JobSchedulerError) -> CronError {
    CronError::Scheduler(e.to_string())
}
