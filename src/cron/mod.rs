//! Scheduled jobs that make the assistant write first. This module is the scheduler's
//! handle (create, edit, run now, the `/api/cron` trigger); `schedule.rs` parses
//! expressions and time zones and `describe.rs` puts them in words; `job.rs` says what a
//! valid job is; `scheduler.rs` sets tokio-cron-scheduler to start runs on time; `run.rs`
//! is what one run does. SQL lives in `db::cron` and HTTP in `gateway::cron`; this module touches
//! neither.
//!
//! Rules worth knowing:
//! - An expression has 5 fields (minute hour day-of-month month day-of-week), or 6 with a
//!   seconds field first, or is one of `@hourly @daily @midnight @weekly @monthly @yearly
//!   @annually`. When both day-of-month and day-of-week are restricted, a day must match
//!   both, unlike Vixie cron where either one is enough.
//! - An enabled job runs at most once a minute (`ShortestInterval`): a seconds field with
//!   several values (`*/5 * * * * *`) is refused, for prompt jobs (each run asks the model)
//!   and reminders alike (a message every few seconds is a flood), whether the job is
//!   enabled or not (none could ever run on it). One stored before the rule, or with a
//!   schedule or zone that cannot be read, is disabled at start, its last error saying why;
//!   it can then only be disabled (again) or deleted until an edit gives it a new schedule.
//!   An edit that enables a disabled job drops that reason: its last error becomes its last
//!   run's again.
//! - Every refusal of bad input names the request field it is about (`CronError::Invalid`).
//! - A one-shot schedule is `at YYYY-MM-DD HH:MM` (`:SS` allowed), a wall-clock time in the
//!   job's zone; an enabled one must be in the future when saved. After a delivered run a
//!   one-shot job deletes itself (its answer stays in the conversation); after a failed run
//!   it stays, disabled, with its error, so a lost reminder shows in the Schedules panel.
//! - A job's kind is `prompt` (the model answers the prompt) or `reminder` (the fixed text
//!   `⏰ Reminder: <prompt>` is stored and sent, no model involved). Reminders are made by
//!   the reminders tool (`create_reminder`) in the conversation that asked, at most
//!   `MAX_ACTIVE_REMINDERS` enabled at once; their channel and target never change.
//! - Each job runs in its own time zone: its `timezone`, else `CRON_TIMEZONE`, else
//!   `TIMEZONE`, else the system's. Each occurrence is computed in that zone when the one
//!   before it fires (or the job is saved), so DST changes move no run.
//! - Runs missed while the process was down (or more than a minute late) are not replayed:
//!   at start every job's next run is its next occurrence after the restart. One-shots are
//!   the exception: one whose time went by while the process was down (or asleep) runs
//!   late, once, since it has no later occurrence, unless it is more than `CRON_LATE_LIMIT`
//!   late (a day by default): then it is disabled with a failed run saying when it was
//!   due (a reminder days late is noise, and a prompt job's answer stale). A run that a
//!   stopped process left
//!   `running` is recorded as failed at the next start.
//! - A job never runs twice at the same time: a scheduled occurrence that finds its job
//!   still running is skipped, and "run now" is refused.
//! - `run_due` (the `/api/cron` trigger for an external crontab) runs each enabled job
//!   whose latest occurrence is at most `DUE_WINDOW` old and later than the job's last run
//!   and last edit, so a trigger and the in-process scheduler never both run one occurrence.

mod describe;
pub mod job;
mod run;
pub mod schedule;
mod scheduler;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use sqlx::SqlitePool;
use tokio::sync::watch;
use tokio_cron_scheduler::JobScheduler;

use crate::assistant::Assistant;
use crate::channels::Channels;
use crate::config::{CronSettings, Secret};
use crate::db::cron::{self as store, CronJob, CronJobId, CronRun, JobKind, JobSpec};
use crate::domain::{ChannelKind, ConversationId};
use crate::llm::router::Tier;

pub use run::reminder_text;

use job::JobChanges;
use schedule::{parse_timezone, system_timezone, Schedule};

/// Jobs answer from a local tier unless told otherwise, so scheduled work never reaches
/// the cloud by default.
pub const DEFAULT_TIER: Tier = Tier::Main;

/// How old an occurrence may be for `/api/cron` to still run it.
pub const DUE_WINDOW: Duration = Duration::from_secs(15 * 60);

const INTERRUPTED: &str = "interrupted: my-claw stopped during this run (it may or may not have \
                           been delivered: look in its conversation before running it again)";

/// Most reminders enabled at once, across conversations: a model looping on
/// `reminders_create` cannot fill the scheduler.
pub const MAX_ACTIVE_REMINDERS: i64 = 100;

/// A reminder asked in a conversation, as the reminders tool makes it. It writes back to
/// that conversation only: `channel` and `target` are the conversation's own.
#[derive(Debug, Clone)]
pub struct NewReminder {
    /// What to remind of; stored as the job's prompt.
    pub text: String,
    /// `at YYYY-MM-DD HH:MM[:SS]` or a cron expression.
    pub schedule: String,
    pub timezone: Tz,
    pub channel: ChannelKind,
    /// The conversation's key on its channel (a WebChat conversation id as text).
    pub target: String,
    pub conversation_id: ConversationId,
}

/// Errors of the scheduler's operations; the gateway maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// Bad input in the request field `field` (`schedule`, `timezone`, …), phrased for
    /// the person who typed it.
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    #[error("no scheduled job {}", .0 .0)]
    NotFound(CronJobId),
    #[error("job {} is already running", .0 .0)]
    Busy(CronJobId),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("scheduler: {0}")]
    Scheduler(String),
}

impl CronError {
    /// Bad input in the request field `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> CronError {
        CronError::Invalid { field, message: message.into() }
    }
}

/// The shortest interval between two runs of a job. Each run of a prompt job asks the
/// model, and a job that fires several times a minute (`*/5 * * * * *`) would keep the
/// local one busy, so enabled jobs run at most once a minute (see
/// `Schedule::check_once_a_minute`); reminders too, since a reminder every few seconds is a
/// flood of messages, not a reminder. `OneSecond` is for tests that watch a fake model's
/// jobs fire, so they take seconds instead of minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortestInterval {
    OneMinute,
    OneSecond,
}

impl ShortestInterval {
    /// Refuses `schedule` when it runs more often than this allows.
    pub(crate) fn check(self, schedule: &Schedule) -> Result<(), String> {
        match self {
            ShortestInterval::OneMinute => schedule.check_once_a_minute(),
            ShortestInterval::OneSecond => Ok(()),
        }
    }
}

/// What a job is in the API: the stored job with its effective zone, its schedule in
/// words and its next run.
#[derive(Debug, Clone)]
pub struct JobView {
    pub job: CronJob,
    pub timezone: Tz,
    /// The schedule in words, in the job's zone; the expression itself for a stored
    /// expression this version does not accept.
    pub description: String,
    /// `None` for a disabled job (or a schedule that no longer parses).
    pub next_run: Option<DateTime<Utc>>,
}

/// An expression checked in a zone: what the editor shows as the user types.
#[derive(Debug, Clone)]
pub struct Preview {
    pub timezone: Tz,
    pub description: String,
    pub next_runs: Vec<DateTime<Utc>>,
}

/// The running scheduler. Cheap to clone; every clone drives the same scheduler.
#[derive(Clone)]
pub struct CronHandle {
    inner: Arc<Inner>,
}

/// Starts the scheduler: marks runs a stopped process left `running` as failed, disables
/// (saying why) enabled jobs that cannot run (a schedule or zone that cannot be read, or
/// one that runs more than once a minute), then schedules every enabled
/// job from now (missed runs are not replayed).
pub async fn start(
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    settings: &CronSettings,
) -> Result<CronHandle, CronError> {
    start_with(pool, assistant, channels, settings, ShortestInterval::OneMinute).await
}

/// `start`, with jobs allowed to run as often as `shortest_interval` says.
pub async fn start_with(
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    settings: &CronSettings,
    shortest_interval: ShortestInterval,
) -> Result<CronHandle, CronError> {
    let default_timezone = match &settings.timezone {
        Some(name) => {
            parse_timezone(name).map_err(|message| CronError::invalid("CRON_TIMEZONE", message))?
        }
        None => system_timezone(),
    };
    let interrupted = store::fail_interrupted_runs(&pool, INTERRUPTED).await?;
    if interrupted > 0 {
        tracing::warn!(runs = interrupted, "cron runs interrupted by the last stop marked failed");
    }
    let (checked, _) = watch::channel(DateTime::<Utc>::MIN_UTC);
    let (halting, _) = watch::channel(false);
    let scheduler = scheduler::new_scheduler().await?;
    let handle = CronHandle {
        inner: Arc::new(Inner {
            pool,
            assistant,
            channels,
            default_timezone,
            secret: settings.secret.clone(),
            running: Mutex::new(HashSet::new()),
            turn: tokio::sync::Mutex::new(()),
            scheduler,
            registered: Mutex::new(HashMap::new()),
            stopped: AtomicBool::new(false),
            delivery: settings.delivery,
            late_limit: settings.late_limit,
            shortest_interval,
            checked,
            halting,
        }),
    };
    let mut jobs = store::list_jobs(&handle.inner.pool).await?;
    {
        let _turn = handle.inner.turn.lock().await;
        // Stored before the shortest interval was a rule, or written around the API with a
        // schedule or zone this version cannot read: kept, disabled with the reason as its
        // last error, where the Schedules panel shows it.
        for job in jobs.iter_mut().filter(|job| job.enabled) {
            let Some(reason) = cannot_run(&handle.inner, job) else { continue };
            match store::disable_job_saying(&handle.inner.pool, job.id, &reason).await {
                Ok(Some(updated)) => {
                    tracing::warn!(job = job.id.0, %reason, "cron job disabled");
                    *job = updated;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job = job.id.0, error = %e, "unrunnable cron job not disabled")
                }
            }
        }
        // A one-shot whose only run was interrupted would stay enabled with no run left:
        // it ends as a failed run does, disabled with the reason, where the user sees it.
        // It is not run again: its message may already have left, and a channel message
        // whose delivery is unknown is never sent twice.
        for job in
            jobs.iter_mut().filter(|job| job.enabled && interrupted_one_shot(&handle.inner, job))
        {
            match store::disable_job(&handle.inner.pool, job).await {
                Ok(Some(updated)) => {
                    tracing::warn!(
                        job = job.id.0,
                        "one-shot job interrupted by the last stop: disabled"
                    );
                    *job = updated;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job = job.id.0, error = %e, "interrupted one-shot job not disabled")
                }
            }
        }
        // Occurrences before now are never run: missed runs are not replayed, except a
        // one-shot's, which would otherwise never run at all.
        let now = Utc::now();
        for job in jobs.iter().filter(|job| job.enabled) {
            if let Some(occurrence) = missed_one_shot(&handle.inner, job, now) {
                let late = (now - occurrence).to_std().unwrap_or_default();
                if late > handle.inner.late_limit {
                    tracing::warn!(
                        job = job.id.0,
                        late_s = late.as_secs(),
                        "one-shot job missed by more than CRON_LATE_LIMIT: disabled, not run"
                    );
                    if let Err(e) = give_up_missed(&handle.inner, job, occurrence, now).await {
                        tracing::error!(job = job.id.0, error = %e, "missed one-shot job not disabled");
                    }
                    continue;
                }
                tracing::warn!(
                    job = job.id.0,
                    late_s = (now - occurrence).num_seconds(),
                    "one-shot job missed while stopped: run late"
                );
                scheduler::start_run(&handle.inner, job.clone(), Some(occurrence)).await;
                continue;
            }
            scheduler::sync(&handle.inner, job.id, Some(job.clone()), now).await;
        }
        scheduler::publish(&handle.inner);
    }
    let enabled = jobs.iter().filter(|job| job.enabled).count();
    tracing::info!(timezone = %default_timezone, jobs = enabled, "scheduler started");
    Ok(handle)
}

impl CronHandle {
    /// The zone of jobs that name none.
    pub fn default_timezone(&self) -> Tz {
        self.inner.default_timezone
    }

    /// `CRON_SECRET`; the `/api/cron` trigger is off when there is none.
    pub fn trigger_secret(&self) -> Option<&Secret> {
        self.inner.secret.as_ref()
    }

    /// How far the scheduler has looked, updated when a job's next run is set (at start,
    /// at each edit and each time a run fires): every occurrence at or before this instant
    /// has had its run started (its history row written) or been skipped. It never passes
    /// the earliest run still waiting to fire, nor the time it was published. Before start
    /// has set the jobs it is `DateTime::MIN_UTC`. Lets tests wait for the scheduler
    /// instead of sleeping.
    pub fn checked_through(&self) -> watch::Receiver<DateTime<Utc>> {
        self.inner.checked.subscribe()
    }

    pub async fn list(&self) -> Result<Vec<JobView>, CronError> {
        let jobs = store::list_jobs(&self.inner.pool).await?;
        let now = Utc::now();
        Ok(jobs.into_iter().map(|job| self.view(job, now)).collect())
    }

    pub async fn get(&self, id: CronJobId) -> Result<JobView, CronError> {
        let job = self.load(id).await?;
        Ok(self.view(job, Utc::now()))
    }

    /// Creates a job; it is scheduled before this returns.
    pub async fn create(&self, changes: JobChanges) -> Result<JobView, CronError> {
        let inner = &self.inner;
        let spec =
            job::validate(&inner.pool, &inner.channels, changes, None, inner.rules()).await?;
        let _turn = inner.turn.lock().await;
        let job = store::insert_job(&inner.pool, &spec).await?;
        scheduler::sync(inner, job.id, Some(job.clone()), Utc::now()).await;
        Ok(self.view(job, Utc::now()))
    }

    /// Applies a partial edit; the new schedule (or state) holds before this returns.
    pub async fn update(&self, id: CronJobId, changes: JobChanges) -> Result<JobView, CronError> {
        let inner = &self.inner;
        let current = JobSpec::from(&self.load(id).await?);
        let was_enabled = current.enabled;
        let spec =
            job::validate(&inner.pool, &inner.channels, changes, Some(current), inner.rules())
                .await?;
        let _turn = inner.turn.lock().await;
        if spec.kind == JobKind::Reminder && spec.enabled && !was_enabled {
            check_reminder_room(inner).await?;
        }
        let job =
            store::update_job(&inner.pool, id, &spec).await?.ok_or(CronError::NotFound(id))?;
        scheduler::sync(inner, id, Some(job.clone()), Utc::now()).await;
        Ok(self.view(job, Utc::now()))
    }

    /// Creates a reminder in the conversation that asked for it; scheduled before this
    /// returns. Refused beyond `MAX_ACTIVE_REMINDERS`, for a time in the past, or for a
    /// conversation its channel cannot reach.
    pub async fn create_reminder(&self, reminder: NewReminder) -> Result<JobView, CronError> {
        let inner = &self.inner;
        let spec = JobSpec {
            name: String::new(),
            schedule: reminder.schedule,
            timezone: Some(reminder.timezone.name().to_string()),
            prompt: reminder.text,
            channel: reminder.channel,
            target: reminder.target,
            tier: None,
            enabled: true,
            kind: JobKind::Reminder,
            conversation_id: Some(reminder.conversation_id),
        };
        let spec = job::validate_new(&inner.pool, &inner.channels, spec, inner.rules()).await?;
        // Counted under the turn, so two creations at once cannot both take the last place.
        let _turn = inner.turn.lock().await;
        check_reminder_room(inner).await?;
        let job = store::insert_job(&inner.pool, &spec).await?;
        scheduler::sync(inner, job.id, Some(job.clone()), Utc::now()).await;
        Ok(self.view(job, Utc::now()))
    }

    /// The enabled reminders asked in a conversation, oldest first.
    pub async fn reminders(
        &self,
        conversation_id: ConversationId,
    ) -> Result<Vec<JobView>, CronError> {
        let jobs = store::list_reminders(&self.inner.pool, conversation_id).await?;
        let now = Utc::now();
        Ok(jobs.into_iter().filter(|job| job.enabled).map(|job| self.view(job, now)).collect())
    }

    /// Deletes reminder `id` if it was asked in `conversation_id` (and is a reminder);
    /// `NotFound` otherwise, so no conversation learns of another's jobs.
    pub async fn cancel_reminder(
        &self,
        conversation_id: ConversationId,
        id: CronJobId,
    ) -> Result<CronJob, CronError> {
        let job = self.load(id).await?;
        if job.kind != JobKind::Reminder || job.conversation_id != Some(conversation_id) {
            return Err(CronError::NotFound(id));
        }
        self.delete(id).await?;
        Ok(job)
    }

    /// Called before WebChat conversation `id` is deleted: the prompt jobs that write there
    /// are disabled, saying why, and the reminders asked there deleted, all unscheduled
    /// before this returns. Without it a job would keep a dangling target, failing at each
    /// occurrence.
    pub async fn detach_conversation(&self, id: ConversationId) -> Result<(), CronError> {
        let inner = &self.inner;
        let _turn = inner.turn.lock().await;
        let reason = format!("its WebChat conversation {} was deleted", id.0);
        let (disabled, deleted) = store::detach_conversation(&inner.pool, id, &reason).await?;
        let now = Utc::now();
        for job in disabled {
            tracing::info!(job = job.id.0, "cron job disabled: its conversation was deleted");
            scheduler::sync(inner, job.id, Some(job), now).await;
        }
        for job in deleted {
            scheduler::sync(inner, job, None, now).await;
        }
        Ok(())
    }

    /// Deletes a job and its history. A run in progress finishes but is not recorded.
    pub async fn delete(&self, id: CronJobId) -> Result<(), CronError> {
        let _turn = self.inner.turn.lock().await;
        if !store::delete_job(&self.inner.pool, id).await? {
            return Err(CronError::NotFound(id));
        }
        scheduler::sync(&self.inner, id, None, Utc::now()).await;
        Ok(())
    }

    /// The last `limit` runs of a job, newest first.
    pub async fn runs(&self, id: CronJobId, limit: i64) -> Result<Vec<CronRun>, CronError> {
        self.load(id).await?;
        Ok(store::list_runs(&self.inner.pool, id, limit).await?)
    }

    /// Runs a job now, whatever its schedule or state, and returns the finished run.
    pub async fn run_now(&self, id: CronJobId) -> Result<CronRun, CronError> {
        let job = self.load(id).await?;
        let started = run::begin(&self.inner, job).await?;
        // Spawned so that a client that leaves does not cancel the run half-way.
        match tokio::spawn(started.finish()).await {
            Ok(result) => result,
            Err(e) => Err(CronError::Scheduler(format!("the run stopped: {e}"))),
        }
    }

    /// Starts the runs of every job that is due (see the module comment) and returns
    /// their ids; the runs go on in the background and land in each job's history.
    pub async fn run_due(&self) -> Result<Vec<CronJobId>, CronError> {
        let now = Utc::now();
        let jobs = store::list_jobs(&self.inner.pool).await?;
        let mut started = Vec::new();
        for job in jobs.into_iter().filter(|job| job.enabled) {
            let Ok((schedule, timezone)) = plan(&self.inner, &job) else {
                continue;
            };
            let Some(occurrence) = schedule.latest_at_or_before(now, timezone) else {
                continue;
            };
            let age = (now - occurrence).to_std().unwrap_or_default();
            if age > DUE_WINDOW || !not_yet_run(&job, occurrence) {
                continue;
            }
            let id = job.id;
            let run = match run::begin(&self.inner, job).await {
                Ok(run) => run,
                Err(CronError::Busy(_)) => continue,
                Err(e) => return Err(e),
            };
            started.push(id);
            tokio::spawn(async move {
                if let Err(e) = run.finish().await {
                    tracing::error!(job = id.0, error = %e, "triggered cron run could not be recorded");
                }
            });
        }
        Ok(started)
    }

    /// Checks an expression in a zone (the given one or the default) and says it in
    /// words with its next `count` runs, for the editor.
    pub fn preview(
        &self,
        expression: &str,
        timezone: Option<&str>,
        count: usize,
    ) -> Result<Preview, CronError> {
        let timezone = match timezone.map(str::trim).filter(|tz| !tz.is_empty()) {
            Some(name) => {
                parse_timezone(name).map_err(|message| CronError::invalid("timezone", message))?
            }
            None => self.inner.default_timezone,
        };
        // What an enabled job may be: the editor says it as the schedule is typed.
        let schedule = Schedule::parse_upcoming(expression, timezone)
            .and_then(|schedule| self.inner.shortest_interval.check(&schedule).map(|_| schedule))
            .map_err(|message| CronError::invalid("expression", message))?;
        Ok(Preview {
            timezone,
            description: schedule.describe(timezone),
            next_runs: schedule.upcoming(Utc::now(), timezone, count),
        })
    }

    /// The process is shutting down: a run whose model is answering stops that answer and
    /// ends failed, saying so, and sends nothing (a cut answer is not worth a message); its
    /// cut text stays in a WebChat conversation. Without it a run held the graceful
    /// shutdown as long as its answer took (minutes on a CPU). Nothing else changes until
    /// `shutdown`.
    pub fn halt(&self) {
        self.inner.halting.send_replace(true);
    }

    /// Stops starting runs. Runs in progress go on until the runtime stops; the next
    /// start records any left unfinished as failed.
    pub async fn shutdown(&self) {
        // Under the turn, so a firing under way has started its run or will start none:
        // nothing starts after this returns.
        let _turn = self.inner.turn.lock().await;
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        scheduler::stop(&self.inner).await;
    }

    async fn load(&self, id: CronJobId) -> Result<CronJob, CronError> {
        store::get_job(&self.inner.pool, id).await?.ok_or(CronError::NotFound(id))
    }

    fn view(&self, job: CronJob, now: DateTime<Utc>) -> JobView {
        match plan(&self.inner, &job) {
            Ok((schedule, timezone)) => {
                let next_run = if job.enabled { schedule.next_after(now, timezone) } else { None };
                let description = schedule.describe(timezone);
                JobView { job, timezone, description, next_run }
            }
            Err(_) => {
                let timezone = self.inner.default_timezone;
                let description = job.schedule.clone();
                JobView { job, timezone, description, next_run: None }
            }
        }
    }
}

struct Inner {
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    default_timezone: Tz,
    secret: Option<Secret>,
    /// Jobs with a run in progress: the per-job lock (see `run::RunGuard`).
    running: Mutex<HashSet<CronJobId>>,
    /// Edits and firings take turns, so that once an edit has returned no run starts from
    /// the job as it was (a disabled job never starts one more run).
    turn: tokio::sync::Mutex<()>,
    /// Fires the runs: one one-shot per enabled job, for its next occurrence.
    scheduler: JobScheduler,
    /// Each enabled job's one-shot in `scheduler`; changed only under `turn`.
    registered: Mutex<HashMap<CronJobId, scheduler::Registered>>,
    /// Set by `shutdown`, under `turn`: nothing is set or started after it.
    stopped: AtomicBool,
    /// How a message is offered again to a failing channel (see `run::deliver_patiently`).
    delivery: crate::config::DeliveryPatience,
    /// How late a missed one-shot may still run at start (`CRON_LATE_LIMIT`).
    late_limit: Duration,
    /// How often an enabled job may run.
    shortest_interval: ShortestInterval,
    /// See `CronHandle::checked_through`.
    checked: watch::Sender<DateTime<Utc>>,
    /// Set by `halt` (the process is shutting down): runs in progress stop their answer.
    halting: watch::Sender<bool>,
}

impl Inner {
    /// What `job::validate` checks a job against.
    fn rules(&self) -> job::Rules {
        job::Rules {
            default_timezone: self.default_timezone,
            shortest_interval: self.shortest_interval,
        }
    }
}

/// Why a stored job cannot run as it is, as the last error it is disabled with at start: its
/// schedule or zone cannot be read, or it runs more often than `Inner::shortest_interval`
/// allows. `None` for a job that can run.
fn cannot_run(inner: &Inner, job: &CronJob) -> Option<String> {
    let fix = |field: &str| format!("change its {field}, then enable it");
    let schedule = match Schedule::parse(&job.schedule) {
        Ok(schedule) => schedule,
        Err(e) => {
            let shown: String = job.schedule.chars().take(64).collect();
            return Some(format!(
                "disabled at start: its schedule `{shown}` cannot be read: {e}; {}",
                fix("schedule")
            ));
        }
    };
    if let Some(Err(e)) = job.timezone.as_deref().map(parse_timezone) {
        return Some(format!(
            "disabled at start: its time zone cannot be read: {e}; {}",
            fix("time zone")
        ));
    }
    let refused = inner.shortest_interval.check(&schedule).err()?;
    Some(format!("disabled at start: {refused}; {}", fix("schedule")))
}

/// The schedule and zone a stored job runs on; an error for rows written around the API
/// with an expression or zone this version does not accept.
fn plan(inner: &Inner, job: &CronJob) -> Result<(Schedule, Tz), String> {
    let schedule = Schedule::parse(&job.schedule)?;
    let timezone = match &job.timezone {
        Some(name) => parse_timezone(name)?,
        None => inner.default_timezone,
    };
    Ok((schedule, timezone))
}

/// Refuses a new enabled reminder when `MAX_ACTIVE_REMINDERS` are enabled. The caller
/// holds `Inner::turn`.
async fn check_reminder_room(inner: &Inner) -> Result<(), CronError> {
    if store::count_active_reminders(&inner.pool).await? >= MAX_ACTIVE_REMINDERS {
        return Err(CronError::invalid(
            "enabled",
            format!(
                "there are already {MAX_ACTIVE_REMINDERS} active reminders, the most this \
                 assistant keeps: cancel one (or delete it in the Schedules panel) before adding \
                 another"
            ),
        ));
    }
    Ok(())
}

/// The time of an enabled one-shot job that went by without its run (the process was
/// stopped or asleep then); `None` for anything else.
fn missed_one_shot(inner: &Inner, job: &CronJob, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let (schedule, timezone) = plan(inner, job).ok()?;
    let at = schedule.once_at(timezone)?;
    (job.enabled && at <= now && not_yet_run(job, at)).then_some(at)
}

/// Ends a one-shot missed by more than the late limit as a failed run does: a run recorded
/// as failed with the reason (the job's last error, shown in Schedules), then disabled.
/// Written in that order so that a stop in between leaves a `running` run, which the next
/// start turns into an interrupted one-shot, disabled as well.
async fn give_up_missed(
    inner: &Inner,
    job: &CronJob,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let zone = plan(inner, job).map_or(inner.default_timezone, |(_, zone)| zone);
    let late = if inner.late_limit.is_zero() {
        "missed jobs are not run late (CRON_LATE_LIMIT=0)".to_string()
    } else {
        format!("it is more than {} late (CRON_LATE_LIMIT)", describe_duration(inner.late_limit))
    };
    let reason = format!(
        "missed: it was due {} ({zone}) while my-claw was not running, and {late}; not run",
        due.with_timezone(&zone).format("%A %-d %B at %H:%M"),
    );
    let run = store::start_run(&inner.pool, job.id, now.timestamp_millis()).await?;
    store::finish_run(&inner.pool, run, 0, store::RunOutcome::Failed, Some(&reason), None).await?;
    store::disable_job(&inner.pool, job).await?;
    Ok(())
}

/// `24h`, `90m`, `45s`, `0s`: a duration as the settings spell it.
fn describe_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => "0s".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Whether `job` is a one-shot whose run the last stop interrupted.
fn interrupted_one_shot(inner: &Inner, job: &CronJob) -> bool {
    job.last_error.as_deref() == Some(INTERRUPTED)
        && plan(inner, job).is_ok_and(|(schedule, _)| schedule.is_once())
}

/// Whether `occurrence` is later than the job's last run and its last edit.
fn not_yet_run(job: &CronJob, occurrence: DateTime<Utc>) -> bool {
    let since = job.last_run_at.unwrap_or(i64::MIN).max(job.updated_at);
    occurrence.timestamp_millis() > since
}

/// Locks a std mutex, taking over one poisoned by a panic elsewhere (what it guards stays
/// consistent: each update is a single insert, remove or take).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
