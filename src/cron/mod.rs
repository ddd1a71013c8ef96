//! Scheduled jobs that make the assistant write first: the in-process scheduler
//! (tokio-cron-scheduler), the rules for cron expressions and time zones, and what one run
//! does (prompt → stored answer → delivery → recorded outcome). SQL lives in `db::cron`
//! and HTTP in `gateway::cron`; this module touches neither.
//!
//! Rules worth knowing:
//! - An expression has 5 fields (minute hour day-of-month month day-of-week), or 6 with a
//!   seconds field first, or is one of `@hourly @daily @midnight @weekly @monthly @yearly
//!   @annually`. tokio-cron-scheduler 0.15 (through croner) takes exactly 6 fields, so
//!   5-field expressions are given second `0`. When both day-of-month and day-of-week are
//!   restricted, a day must match both (the scheduler sets croner's `dom_and_dow`), unlike
//!   Vixie cron where either one is enough.
//! - Each job runs in its own time zone: its `timezone`, else `CRON_TIMEZONE`, else the
//!   system's. tokio-cron-scheduler computes a job's first run in the real zone but later
//!   runs with the UTC offset frozen when the job was added, so a job whose zone has
//!   changed offset (a DST switch) is added again within a minute, and a firing that is not
//!   an occurrence in the real zone is skipped.
//! - Runs missed while the process was down are not replayed. At start every job is
//!   scheduled from "now": its next run is its next occurrence after the restart. A run
//!   that a stopped process left `running` is recorded as failed at the next start.
//! - A job never runs twice at the same time: a scheduled firing that finds its job still
//!   running is skipped, and "run now" is refused.
//! - `run_due` (the `/api/cron` trigger for an external crontab) runs each enabled job
//!   whose latest occurrence is at most `DUE_WINDOW` old and later than the job's last run
//!   and last edit, so a trigger and the in-process scheduler never both run one occurrence.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use sqlx::SqlitePool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_cron_scheduler::job::job_data::{JobStoredData, Uuid as SchedulerJobId};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::assistant::Assistant;
use crate::channels::Channels;
use crate::config::{CronSettings, Secret};
use crate::db::cron::{self as store, CronJob, CronJobId, CronRun, JobSpec, RunOutcome};
use crate::db::memory;
use crate::db::now_ms;
use crate::domain::{ChannelKind, Inbound, MessageId};
use crate::llm::router::Tier;

/// Jobs answer from a local tier unless told otherwise, so scheduled work never reaches
/// the cloud by default.
pub const DEFAULT_TIER: Tier = Tier::Main;

/// How old an occurrence may be for `/api/cron` to still run it.
pub const DUE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// How late after an occurrence a scheduler firing still counts as that occurrence.
const FIRE_TOLERANCE: Duration = Duration::from_secs(60);

/// How often registrations are checked against the database and the zones' offsets.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(60);

const INTERRUPTED: &str = "interrupted: my-claw stopped during this run";

/// Runs kept in each job's history; older ones are deleted as new ones finish.
const KEEP_RUNS: i64 = 500;

const MAX_NAME_CHARS: usize = 100;
const MAX_PROMPT_CHARS: usize = 8000;

/// Errors of the scheduler's operations; the gateway maps them to status codes.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// Bad input, phrased for the person who typed it.
    #[error("{0}")]
    Invalid(String),
    #[error("no scheduled job {}", .0 .0)]
    NotFound(CronJobId),
    #[error("job {} is already running", .0 .0)]
    Busy(CronJobId),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("scheduler: {0}")]
    Scheduler(String),
}

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Six fields, seconds first: the form tokio-cron-scheduler takes.
    six_fields: String,
    /// The scheduler's own parse of it; croner's `Cron` comes out of it on demand.
    parsed: JobStoredData,
}

impl Schedule {
    /// Parses a 5- or 6-field expression or an `@nickname`; the error says what is wrong.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        let six_fields = to_six_fields(expression)?;
        match parse_six_fields(&six_fields) {
            Some(parsed) => Ok(Schedule { six_fields, parsed }),
            None => Err(explain_invalid(expression, &six_fields)),
        }
    }

    /// The expression as given to tokio-cron-scheduler.
    pub fn six_fields(&self) -> &str {
        &self.six_fields
    }

    /// The first occurrence strictly after `after`, in the zone `timezone`.
    pub fn next_after(&self, after: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        let cron = self.parsed.schedule()?;
        let local = whole_second(after).with_timezone(&timezone);
        cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The latest occurrence at or before `at`, in the zone `timezone`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        let cron = self.parsed.schedule()?;
        let local = whole_second(at).with_timezone(&timezone);
        cron.find_previous_occurrence(&local, true).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The next `count` occurrences after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, timezone: Tz, count: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(count);
        let mut cursor = after;
        while times.len() < count {
            match self.next_after(cursor, timezone) {
                Some(next) => {
                    times.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        times
    }
}

/// Parses an IANA zone name, with a message that says what to write instead.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        format!("unknown time zone `{name}`: use an IANA name such as Europe/Paris or UTC")
    })
}

/// The system's zone: `TZ`, else `/etc/timezone`, else the target of `/etc/localtime`,
/// else UTC.
pub fn system_timezone() -> Tz {
    let from_env = std::env::var("TZ").ok().map(|tz| tz.trim_start_matches(':').to_string());
    let from_file = || std::fs::read_to_string("/etc/timezone").ok();
    let from_link = || {
        let target = std::fs::read_link("/etc/localtime").ok()?;
        let target = target.to_string_lossy().into_owned();
        target.split_once("zoneinfo/").map(|(_, name)| name.to_string())
    };
    [from_env, from_file(), from_link()]
        .into_iter()
        .flatten()
        .find_map(|name| name.trim().parse::<Tz>().ok())
        .unwrap_or(Tz::UTC)
}

/// What a job is in the API: the stored job with its effective zone and next run.
#[derive(Debug, Clone)]
pub struct JobView {
    pub job: CronJob,
    pub timezone: Tz,
    /// `None` for a disabled job (or a schedule that no longer parses).
    pub next_run: Option<DateTime<Utc>>,
}

/// A create or a partial edit. `None` leaves a field as it is (or, on create, uses its
/// default); `Some(None)` in `timezone`/`tier` resets the field to its default.
#[derive(Debug, Clone, Default)]
pub struct JobChanges {
    pub name: Option<String>,
    pub schedule: Option<String>,
    pub timezone: Option<Option<String>>,
    pub prompt: Option<String>,
    pub channel: Option<String>,
    pub target: Option<String>,
    pub tier: Option<Option<String>>,
    pub enabled: Option<bool>,
}

/// The running scheduler. Cheap to clone; every clone drives the same scheduler.
#[derive(Clone)]
pub struct CronHandle {
    inner: Arc<Inner>,
}

/// Starts the scheduler: marks runs a stopped process left `running` as failed, then
/// schedules every enabled job from now (missed runs are not replayed).
pub async fn start(
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    settings: &CronSettings,
) -> Result<CronHandle, CronError> {
    let default_timezone = match &settings.timezone {
        Some(name) => parse_timezone(name).map_err(CronError::Invalid)?,
        None => system_timezone(),
    };
    let interrupted = store::fail_interrupted_runs(&pool, INTERRUPTED).await?;
    if interrupted > 0 {
        tracing::warn!(runs = interrupted, "cron runs interrupted by the last stop marked failed");
    }
    let scheduler = JobScheduler::new().await.map_err(scheduler_error)?;
    scheduler.start().await.map_err(scheduler_error)?;
    let handle = CronHandle {
        inner: Arc::new(Inner {
            pool,
            assistant,
            channels,
            default_timezone,
            secret: settings.secret.clone(),
            scheduler,
            registered: tokio::sync::Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            resync: Arc::new(Notify::new()),
            maintenance: Mutex::new(None),
        }),
    };
    let scheduled = handle.reconcile_all().await?;
    let task = tokio::spawn(maintain(Arc::downgrade(&handle.inner), handle.inner.resync.clone()));
    *lock(&handle.inner.maintenance) = Some(task);
    tracing::info!(timezone = %default_timezone, jobs = scheduled, "scheduler started");
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
        let spec = self.validate(changes, None).await?;
        let job = store::insert_job(&self.inner.pool, &spec).await?;
        self.sync(job.id).await?;
        Ok(self.view(job, Utc::now()))
    }

    /// Applies a partial edit; the new schedule (or state) holds before this returns.
    pub async fn update(&self, id: CronJobId, changes: JobChanges) -> Result<JobView, CronError> {
        let current = self.load(id).await?;
        let spec = self.validate(changes, Some(&current)).await?;
        let job =
            store::update_job(&self.inner.pool, id, &spec).await?.ok_or(CronError::NotFound(id))?;
        self.sync(id).await?;
        Ok(self.view(job, Utc::now()))
    }

    /// Deletes a job and its history. A run in progress finishes but is not recorded.
    pub async fn delete(&self, id: CronJobId) -> Result<(), CronError> {
        if !store::delete_job(&self.inner.pool, id).await? {
            return Err(CronError::NotFound(id));
        }
        self.sync(id).await
    }

    /// The last `limit` runs of a job, newest first.
    pub async fn runs(&self, id: CronJobId, limit: i64) -> Result<Vec<CronRun>, CronError> {
        self.load(id).await?;
        Ok(store::list_runs(&self.inner.pool, id, limit).await?)
    }

    /// Runs a job now, whatever its schedule or state, and returns the finished run.
    pub async fn run_now(&self, id: CronJobId) -> Result<CronRun, CronError> {
        let job = self.load(id).await?;
        let guard = self.claim(id).ok_or(CronError::Busy(id))?;
        let handle = self.clone();
        // Spawned so that a client that leaves does not cancel the run half-way.
        match tokio::spawn(async move { handle.execute(job, guard).await }).await {
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
            let Ok((schedule, timezone)) = self.plan(&job) else {
                continue;
            };
            let Some(occurrence) = schedule.latest_at_or_before(now, timezone) else {
                continue;
            };
            if now - occurrence > chrono_duration(DUE_WINDOW) || !not_yet_run(&job, occurrence) {
                continue;
            }
            let Some(guard) = self.claim(job.id) else {
                continue;
            };
            started.push(job.id);
            let handle = self.clone();
            tokio::spawn(async move {
                if let Err(e) = handle.execute(job, guard).await {
                    tracing::error!(error = %e, "triggered cron run could not be recorded");
                }
            });
        }
        Ok(started)
    }

    /// Checks an expression in a zone (the job's or the default) and returns the zone and
    /// the next `count` runs, for the editor's preview.
    pub fn preview(
        &self,
        expression: &str,
        timezone: Option<&str>,
        count: usize,
    ) -> Result<(Tz, Vec<DateTime<Utc>>), CronError> {
        let timezone = match timezone.map(str::trim).filter(|tz| !tz.is_empty()) {
            Some(name) => parse_timezone(name).map_err(CronError::Invalid)?,
            None => self.inner.default_timezone,
        };
        let schedule = checked_schedule(expression).map_err(CronError::Invalid)?;
        Ok((timezone, schedule.upcoming(Utc::now(), timezone, count)))
    }

    /// Stops firing jobs. Runs in progress go on until the runtime stops; the next start
    /// records any left unfinished as failed.
    pub async fn shutdown(&self) {
        if let Some(task) = lock(&self.inner.maintenance).take() {
            task.abort();
        }
        let mut scheduler = self.inner.scheduler.clone();
        if let Err(e) = scheduler.shutdown().await {
            tracing::warn!(error = ?e, "scheduler did not shut down cleanly");
        }
    }

    async fn load(&self, id: CronJobId) -> Result<CronJob, CronError> {
        store::get_job(&self.inner.pool, id).await?.ok_or(CronError::NotFound(id))
    }

    fn view(&self, job: CronJob, now: DateTime<Utc>) -> JobView {
        let timezone = self.timezone_of(&job);
        let next_run = if job.enabled {
            Schedule::parse(&job.schedule).ok().and_then(|s| s.next_after(now, timezone))
        } else {
            None
        };
        JobView { job, timezone, next_run }
    }

    fn timezone_of(&self, job: &CronJob) -> Tz {
        job.timezone
            .as_deref()
            .and_then(|name| parse_timezone(name).ok())
            .unwrap_or(self.inner.default_timezone)
    }

    /// The schedule and zone a stored job runs on; an error for rows written around the
    /// API with an expression or zone this version does not accept.
    fn plan(&self, job: &CronJob) -> Result<(Schedule, Tz), String> {
        let schedule = Schedule::parse(&job.schedule)?;
        let timezone = match &job.timezone {
            Some(name) => parse_timezone(name)?,
            None => self.inner.default_timezone,
        };
        Ok((schedule, timezone))
    }

    /// Merges `changes` into `current` (or the defaults) and checks every field.
    async fn validate(
        &self,
        changes: JobChanges,
        current: Option<&CronJob>,
    ) -> Result<JobSpec, CronError> {
        let base = current.map(JobSpec::from);
        let spec = merge_changes(changes, base).map_err(CronError::Invalid)?;
        let spec = check_spec(spec).map_err(CronError::Invalid)?;
        if spec.channel == ChannelKind::WebChat {
            self.check_webchat_target(&spec.target).await?;
        }
        Ok(spec)
    }

    async fn check_webchat_target(&self, target: &str) -> Result<(), CronError> {
        let missing = || {
            CronError::Invalid(format!(
                "target `{target}`: no WebChat conversation has this id (open the conversation \
                 in the WebChat and use its id)"
            ))
        };
        let id = target.parse::<i64>().map_err(|_| missing())?;
        let conversation =
            memory::get_conversation(&self.inner.pool, crate::domain::ConversationId(id)).await?;
        match conversation {
            Some(c) if c.channel == ChannelKind::WebChat => Ok(()),
            _ => Err(missing()),
        }
    }

    /// Marks a job as running; `None` when it already is.
    fn claim(&self, id: CronJobId) -> Option<RunGuard> {
        let mut running = lock(&self.inner.running);
        if !running.insert(id) {
            return None;
        }
        Some(RunGuard { inner: self.inner.clone(), id })
    }

    /// Makes the scheduler's registration of one job match the database.
    async fn sync(&self, id: CronJobId) -> Result<(), CronError> {
        let job = store::get_job(&self.inner.pool, id).await?;
        let mut registered = self.inner.registered.lock().await;
        self.reconcile(&mut registered, id, job.as_ref()).await;
        Ok(())
    }

    /// Makes every registration match the database; returns how many jobs are scheduled.
    async fn reconcile_all(&self) -> Result<usize, CronError> {
        let jobs = store::list_jobs(&self.inner.pool).await?;
        let mut registered = self.inner.registered.lock().await;
        let gone: Vec<CronJobId> = registered
            .keys()
            .filter(|id| !jobs.iter().any(|job| job.id == **id))
            .copied()
            .collect();
        for id in gone {
            self.reconcile(&mut registered, id, None).await;
        }
        for job in &jobs {
            self.reconcile(&mut registered, job.id, Some(job)).await;
        }
        Ok(registered.len())
    }

    async fn reconcile(
        &self,
        registered: &mut HashMap<CronJobId, Registration>,
        id: CronJobId,
        job: Option<&CronJob>,
    ) {
        let wanted = match job.filter(|job| job.enabled).map(|job| self.plan(job)) {
            Some(Ok((schedule, timezone))) => Some(Registration::wanted(schedule, timezone)),
            Some(Err(reason)) => {
                tracing::warn!(job = id.0, %reason, "cron job not scheduled");
                None
            }
            None => None,
        };
        if let (Some(wanted), Some(current)) = (&wanted, registered.get(&id)) {
            if wanted.same_as(current) {
                return;
            }
        }
        if let Some(old) = registered.remove(&id) {
            if let Err(e) = self.inner.scheduler.remove(&old.scheduler_id.into()).await {
                tracing::warn!(job = id.0, error = ?e, "could not unschedule a cron job");
            }
        }
        let Some(mut wanted) = wanted else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let added = Job::new_async_tz(wanted.six_fields.as_str(), wanted.timezone, move |_, _| {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(inner) = weak.upgrade() {
                    CronHandle { inner }.on_fire(id).await;
                }
            })
        });
        let added = match added {
            Ok(job) => self.inner.scheduler.add(job).await,
            Err(e) => Err(e),
        };
        match added {
            Ok(scheduler_id) => {
                wanted.scheduler_id = scheduler_id.into();
                registered.insert(id, wanted);
            }
            Err(e) => tracing::error!(job = id.0, error = ?e, "could not schedule a cron job"),
        }
    }

    /// A scheduler firing: runs the job when this is one of its occurrences in its real
    /// zone that has not run yet.
    async fn on_fire(&self, id: CronJobId) {
        let job = match store::get_job(&self.inner.pool, id).await {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(job = id.0, error = %e, "cron job could not be read");
                return;
            }
        };
        let Some(job) = job.filter(|job| job.enabled) else {
            // Deleted or disabled behind the scheduler's back: catch it up.
            self.inner.resync.notify_one();
            return;
        };
        let Ok((schedule, timezone)) = self.plan(&job) else {
            return;
        };
        let now = Utc::now();
        let occurrence = schedule.latest_at_or_before(now, timezone);
        let Some(occurrence) = occurrence.filter(|o| now - *o <= chrono_duration(FIRE_TOLERANCE))
        else {
            // Not an occurrence: the registration is stale (its zone changed offset).
            self.inner.resync.notify_one();
            return;
        };
        if !not_yet_run(&job, occurrence) {
            return;
        }
        let Some(guard) = self.claim(id) else {
            tracing::warn!(job = id.0, "cron job still running from its last occurrence: skipped");
            return;
        };
        if let Err(e) = self.execute(job, guard).await {
            tracing::error!(job = id.0, error = %e, "cron run could not be recorded");
        }
    }

    /// One run: records its start, asks the assistant, delivers, records the outcome.
    async fn execute(&self, job: CronJob, guard: RunGuard) -> Result<CronRun, CronError> {
        let started_at = now_ms();
        let clock = Instant::now();
        let run_id = store::start_run(&self.inner.pool, job.id, started_at).await?;
        let result = self.answer_and_deliver(&job).await;
        let duration_ms = clock.elapsed().as_millis() as i64;
        let (outcome, error, message_id) = match result {
            Ok(delivered) => (RunOutcome::Delivered, delivered.note, Some(delivered.message_id)),
            Err(failure) => (RunOutcome::Failed, Some(failure.reason), failure.message_id),
        };
        match &error {
            Some(reason) if outcome == RunOutcome::Failed => {
                tracing::warn!(job = job.id.0, duration_ms, %reason, "cron run failed")
            }
            _ => tracing::info!(job = job.id.0, duration_ms, "cron run delivered"),
        }
        store::finish_run(
            &self.inner.pool,
            run_id,
            duration_ms,
            outcome,
            error.as_deref(),
            message_id,
        )
        .await?;
        drop(guard);
        if let Err(e) = store::prune_runs(&self.inner.pool, job.id, KEEP_RUNS).await {
            tracing::warn!(job = job.id.0, error = %e, "old cron runs not pruned");
        }
        Ok(CronRun {
            id: run_id,
            job_id: job.id,
            started_at,
            duration_ms: Some(duration_ms),
            outcome,
            error,
            message_id,
        })
    }

    async fn answer_and_deliver(&self, job: &CronJob) -> Result<Delivered, Failure> {
        let tier = job.tier.as_deref().and_then(Tier::parse).unwrap_or(DEFAULT_TIER);
        // An answer nobody can receive is not worth the model's time.
        let configured = match job.channel {
            ChannelKind::WebChat => true,
            ChannelKind::WhatsApp => self.inner.channels.whatsapp.is_some(),
            ChannelKind::Nextcloud => self.inner.channels.nextcloud.is_some(),
        };
        if !configured {
            let reason = format!("{} is not configured, so nothing was asked or sent", job.channel);
            return Err(Failure::new(reason, None));
        }
        // The same path as a message the user sends: the prompt is stored in the target
        // conversation, answered with its history and the persona, and both messages are
        // announced to open WebChat pages. The prefix tells the reader (and the model)
        // that nobody typed this turn.
        let inbound = Inbound {
            channel: job.channel,
            conversation_key: job.target.clone(),
            sender: "cron".into(),
            text: format!("[scheduled: {}] {}", job.name, job.prompt),
            external_id: None,
        };
        let reply = match self.inner.assistant.reply(inbound, Some(tier)).await {
            Ok(reply) => reply,
            Err(e) => {
                return Err(Failure::new(format!("the assistant could not answer: {e}"), None))
            }
        };
        if let Some(error) = reply.error {
            return Err(Failure::new(format!("the model failed: {error}"), reply.message_id));
        }
        let Some(message_id) = reply.message_id else {
            return Err(Failure::new("the answer could not be stored".into(), None));
        };
        if job.channel == ChannelKind::WebChat {
            // For the WebChat, storing the answer is the delivery: open pages hear of it
            // through the assistant's events.
            return Ok(Delivered { message_id, note: None });
        }
        let receipt = match self.inner.channels.deliver(job.channel, &job.target, &reply.text).await
        {
            Ok(receipt) => receipt,
            Err(e) => {
                let reason = format!("{} refused the message: {e}", job.channel);
                return Err(Failure::new(reason, Some(message_id)));
            }
        };
        // With the channel's id on the message, its status webhooks (delivered, read,
        // failed) land on the stored answer.
        if let Some(external_id) = receipt.external_ids.first() {
            let stored = memory::set_message_external_id(
                &self.inner.pool,
                message_id,
                external_id,
                Some("sent"),
            )
            .await;
            if let Err(e) = stored {
                tracing::warn!(job = job.id.0, error = %e, "delivery id not stored");
            }
        }
        let note = receipt.via_template.then(|| {
            "outside WhatsApp's 24-hour window: the approved template was sent instead; the \
             answer waits in the conversation"
                .to_string()
        });
        Ok(Delivered { message_id, note })
    }
}

struct Inner {
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    default_timezone: Tz,
    secret: Option<Secret>,
    scheduler: JobScheduler,
    /// What tokio-cron-scheduler holds for each enabled job. Async lock: changes to one
    /// job are applied one at a time, across awaits on the scheduler.
    registered: tokio::sync::Mutex<HashMap<CronJobId, Registration>>,
    /// Jobs with a run in progress: the per-job lock.
    running: Mutex<HashSet<CronJobId>>,
    /// Asks the maintenance task for a full reconcile now. Firings ask through it rather
    /// than reconciling themselves, which would make a registration's future contain
    /// itself.
    resync: Arc<Notify>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
}

/// One job as registered with tokio-cron-scheduler.
#[derive(Debug, Clone)]
struct Registration {
    scheduler_id: SchedulerJobId,
    six_fields: String,
    timezone: Tz,
    /// The zone's UTC offset when the job was added, which the scheduler keeps using.
    utc_offset_seconds: i32,
}

impl Registration {
    fn wanted(schedule: Schedule, timezone: Tz) -> Registration {
        Registration {
            scheduler_id: SchedulerJobId { id1: 0, id2: 0 },
            six_fields: schedule.six_fields,
            timezone,
            utc_offset_seconds: current_offset(timezone),
        }
    }

    fn same_as(&self, other: &Registration) -> bool {
        self.six_fields == other.six_fields
            && self.timezone == other.timezone
            && self.utc_offset_seconds == other.utc_offset_seconds
    }
}

/// Releases the per-job lock when the run ends, however it ends.
struct RunGuard {
    inner: Arc<Inner>,
    id: CronJobId,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        lock(&self.inner.running).remove(&self.id);
    }
}

struct Delivered {
    message_id: MessageId,
    /// How it was delivered when that is worth telling (a template instead of the text).
    note: Option<String>,
}

struct Failure {
    reason: String,
    message_id: Option<MessageId>,
}

impl Failure {
    fn new(reason: String, message_id: Option<MessageId>) -> Failure {
        Failure { reason, message_id }
    }
}

/// Every minute, and when a firing asks: re-adds jobs whose zone changed offset and
/// repairs any drift between the scheduler and the database. Ends when the scheduler is
/// dropped.
async fn maintain(inner: Weak<Inner>, resync: Arc<Notify>) {
    let mut ticks = tokio::time::interval(MAINTENANCE_PERIOD);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = resync.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = (CronHandle { inner }).reconcile_all().await {
            tracing::warn!(error = %e, "cron maintenance failed");
        }
    }
}

/// Whether `occurrence` is later than the job's last run and its last edit.
fn not_yet_run(job: &CronJob, occurrence: DateTime<Utc>) -> bool {
    let since = job.last_run_at.unwrap_or(i64::MIN).max(job.updated_at);
    occurrence.timestamp_millis() > since
}

/// Fills a draft from `changes` over `base` (an edit) or the defaults (a create).
fn merge_changes(changes: JobChanges, base: Option<JobSpec>) -> Result<JobSpec, String> {
    let required = |field: &str, what: &str| format!("`{field}` is required: {what}");
    let creating = base.is_none();
    let base = base.unwrap_or(JobSpec {
        name: String::new(),
        schedule: String::new(),
        timezone: None,
        prompt: String::new(),
        channel: ChannelKind::WebChat,
        target: String::new(),
        tier: None,
        enabled: true,
    });
    let channel = match changes.channel {
        Some(name) => ChannelKind::parse(name.trim()).ok_or_else(|| {
            format!("unknown channel `{name}`: use webchat, whatsapp or nextcloud")
        })?,
        None if creating => {
            return Err(required("channel", "webchat, whatsapp or nextcloud"));
        }
        None => base.channel,
    };
    let spec = JobSpec {
        name: changes.name.unwrap_or(base.name),
        schedule: changes.schedule.unwrap_or(base.schedule),
        timezone: changes.timezone.unwrap_or(base.timezone),
        prompt: changes.prompt.unwrap_or(base.prompt),
        channel,
        target: changes.target.unwrap_or(base.target),
        tier: changes.tier.unwrap_or(base.tier),
        enabled: changes.enabled.unwrap_or(base.enabled),
    };
    if spec.schedule.trim().is_empty() {
        return Err(required("schedule", "a cron expression such as `0 8 * * *`"));
    }
    if spec.prompt.trim().is_empty() {
        return Err(required("prompt", "what the assistant is asked at each run"));
    }
    if spec.target.trim().is_empty() {
        return Err(required(
            "target",
            "the WebChat conversation id, the WhatsApp number or the Nextcloud Talk room token",
        ));
    }
    Ok(spec)
}

/// Checks and normalises every field of a merged draft (all but WebChat targets, which
/// need the database).
fn check_spec(spec: JobSpec) -> Result<JobSpec, String> {
    let schedule = spec.schedule.split_whitespace().collect::<Vec<_>>().join(" ");
    checked_schedule(&schedule)?;
    let timezone = match spec.timezone.as_deref().map(str::trim).filter(|tz| !tz.is_empty()) {
        Some(name) => Some(parse_timezone(name)?.name().to_string()),
        None => None,
    };
    let tier = match spec.tier.as_deref().map(str::trim).filter(|tier| !tier.is_empty()) {
        Some(name) => Tier::parse(name).ok_or_else(|| {
            format!("unknown tier `{name}`: use fast, smart, main, code or reason")
        })?,
        None => DEFAULT_TIER,
    };
    let prompt = spec.prompt.trim().to_string();
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(format!("`prompt` is longer than {MAX_PROMPT_CHARS} characters"));
    }
    let mut name = spec.name.trim().to_string();
    if name.is_empty() {
        // A job without a name is called by the start of what it asks.
        name = prompt.chars().take(40).collect();
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("`name` is longer than {MAX_NAME_CHARS} characters"));
    }
    let target = check_target(spec.channel, spec.target.trim())?;
    Ok(JobSpec {
        name,
        schedule,
        timezone,
        prompt,
        channel: spec.channel,
        target,
        tier: Some(tier.as_str().to_string()),
        enabled: spec.enabled,
    })
}

/// The target in the form its channel uses for conversation keys.
fn check_target(channel: ChannelKind, target: &str) -> Result<String, String> {
    match channel {
        ChannelKind::WebChat => Ok(target.to_string()),
        ChannelKind::WhatsApp => {
            // WhatsApp ids are the number's digits, without `+` or separators.
            let digits: String = target
                .chars()
                .filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'))
                .collect();
            if (6..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
                Ok(digits)
            } else {
                Err(format!(
                    "target `{target}`: not a WhatsApp number (international format, e.g. \
                     +33612345678)"
                ))
            }
        }
        ChannelKind::Nextcloud => {
            if target.len() <= 64 && target.chars().all(|c| c.is_ascii_alphanumeric()) {
                Ok(target.to_string())
            } else {
                Err(format!(
                    "target `{target}`: not a Nextcloud Talk room token (letters and digits, \
                     the end of the room's link)"
                ))
            }
        }
    }
}

/// Parses an expression and makes sure it ever happens (`0 0 30 2 *` never does).
fn checked_schedule(expression: &str) -> Result<Schedule, String> {
    let schedule = Schedule::parse(expression)?;
    if schedule.next_after(Utc::now(), Tz::UTC).is_none() {
        return Err(format!("cron expression `{}` never happens", expression.trim()));
    }
    Ok(schedule)
}

fn to_six_fields(expression: &str) -> Result<String, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    match fields.as_slice() {
        [] => Err("the schedule is empty: write a cron expression such as `0 8 * * *` (every \
                   day at 08:00)"
            .into()),
        [nickname] if nickname.starts_with('@') => {
            let six = match nickname.to_ascii_lowercase().as_str() {
                "@yearly" | "@annually" => "0 0 0 1 1 *",
                "@monthly" => "0 0 0 1 * *",
                "@weekly" => "0 0 0 * * 0",
                "@daily" | "@midnight" => "0 0 0 * * *",
                "@hourly" => "0 0 * * * *",
                _ => {
                    return Err(format!(
                        "unknown schedule `{nickname}`: use @hourly, @daily, @weekly, @monthly, \
                         @yearly or a cron expression"
                    ))
                }
            };
            Ok(six.to_string())
        }
        [_, _, _, _, _] => Ok(format!("0 {}", fields.join(" "))),
        [_, _, _, _, _, _] => Ok(fields.join(" ")),
        _ => Err(format!(
            "cron expression `{}` has {} fields: write 5 (minute hour day-of-month month \
             day-of-week) or 6 (a seconds field first)",
            expression.trim(),
            fields.len()
        )),
    }
}

/// tokio-cron-scheduler's own parse; `None` when it rejects the expression.
fn parse_six_fields(six_fields: &str) -> Option<JobStoredData> {
    let mut job = Job::new_tz(six_fields, Utc, |_, _| {}).ok()?;
    job.job_data().ok()
}

/// Finds the first field the parser rejects on its own, to say which one is wrong.
fn explain_invalid(expression: &str, six_fields: &str) -> String {
    const FIELDS: [(&str, &str); 6] = [
        ("second", "0-59"),
        ("minute", "0-59"),
        ("hour", "0-23"),
        ("day-of-month", "1-31, L or W"),
        ("month", "1-12 or JAN-DEC"),
        ("day-of-week", "0-7 or SUN-SAT, where 0 and 7 are Sunday"),
    ];
    let fields: Vec<&str> = six_fields.split(' ').collect();
    for (index, value) in fields.iter().enumerate() {
        let mut probe = ["*"; 6];
        probe[index] = value;
        if parse_six_fields(&probe.join(" ")).is_none() {
            let (name, allowed) = FIELDS[index];
            return format!(
                "invalid cron expression `{}`: the {name} field `{value}` is not valid ({allowed})",
                expression.trim()
            );
        }
    }
    format!("invalid cron expression `{}`", expression.trim())
}

/// croner carries sub-second parts into the times it finds; occurrences are whole seconds.
fn whole_second(time: DateTime<Utc>) -> DateTime<Utc> {
    time.with_nanosecond(0).unwrap_or(time)
}

fn current_offset(timezone: Tz) -> i32 {
    timezone.offset_from_utc_datetime(&Utc::now().naive_utc()).fix().local_minus_utc()
}

fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

fn scheduler_error(e: tokio_cron_scheduler::JobSchedulerError) -> CronError {
    CronError::Scheduler(format!("{e:?}"))
}

/// Locks a std mutex, taking over one poisoned by a panic elsewhere (the sets it guards
/// stay consistent: each update is a single insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn check_next(expression: &str, timezone: &str, after: &str, expected: &str) {
        let schedule = Schedule::parse(expression).unwrap();
        let tz = parse_timezone(timezone).unwrap();
        let next = schedule.next_after(utc(after), tz).unwrap();
        assert_eq!(next, utc(expected), "{expression} in {timezone} after {after}");
    }

    fn check_invalid(expression: &str, expected_part: &str) {
        let err = checked_schedule(expression).unwrap_err();
        assert!(err.contains(expected_part), "{expression}: {err}");
    }

    #[test]
    fn five_and_six_field_expressions() {
        assert_eq!(Schedule::parse("0 8 * * *").unwrap().six_fields(), "0 0 8 * * *");
        assert_eq!(Schedule::parse(" */2  * * * * * ").unwrap().six_fields(), "*/2 * * * * *");
        assert_eq!(Schedule::parse("@daily").unwrap().six_fields(), "0 0 0 * * *");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:01Z", "2026-01-01T10:00:02Z");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:02.5Z", "2026-01-01T10:00:04Z");
        check_next("30 7 * * 1-5", "UTC", "2026-01-02T08:00:00Z", "2026-01-05T07:30:00Z");
    }

    #[test]
    fn time_zones_follow_daylight_saving() {
        // Paris is UTC+1 in winter and UTC+2 in summer (from 2026-03-29).
        check_next("0 8 * * *", "Europe/Paris", "2026-01-10T12:00:00Z", "2026-01-11T07:00:00Z");
        check_next("0 8 * * *", "Europe/Paris", "2026-03-28T12:00:00Z", "2026-03-29T06:00:00Z");
        check_next("0 8 * * *", "America/New_York", "2026-06-01T00:00:00Z", "2026-06-01T12:00:00Z");
    }

    #[test]
    fn latest_occurrence_is_inclusive() {
        let schedule = Schedule::parse("0 8 * * *").unwrap();
        let at = utc("2026-01-10T08:00:00Z");
        assert_eq!(schedule.latest_at_or_before(at, Tz::UTC), Some(at));
        let later = utc("2026-01-10T09:30:12.345Z");
        assert_eq!(schedule.latest_at_or_before(later, Tz::UTC), Some(at));
    }

    #[test]
    fn invalid_expressions_say_what_is_wrong() {
        check_invalid("", "empty");
        check_invalid("* * *", "has 3 fields");
        check_invalid("1 2 3 4 5 6 7", "has 7 fields");
        check_invalid("0 25 * * *", "hour field `25`");
        check_invalid("61 * * * *", "minute field `61`");
        check_invalid("0 8 * * MOON", "day-of-week field");
        check_invalid("0 0 30 2 *", "never happens");
        check_invalid("@often", "unknown schedule");
    }

    #[test]
    fn time_zone_names() {
        assert_eq!(parse_timezone("Europe/Paris").unwrap(), Tz::Europe__Paris);
        assert!(parse_timezone("Mars/Olympus").unwrap_err().contains("unknown time zone"));
    }

    fn changes(channel: &str, target: &str) -> JobChanges {
        JobChanges {
            schedule: Some("0 8 * * *".into()),
            prompt: Some("  Weather today?  ".into()),
            channel: Some(channel.into()),
            target: Some(target.into()),
            ..JobChanges::default()
        }
    }

    #[test]
    fn drafts_get_defaults_and_normalised_fields() {
        let spec =
            check_spec(merge_changes(changes("whatsapp", "+33 6 12-34-56-78"), None).unwrap())
                .unwrap();
        assert_eq!(spec.target, "33612345678");
        assert_eq!(spec.tier.as_deref(), Some("main"));
        assert_eq!(spec.name, "Weather today?");
        assert!(spec.enabled);
        assert_eq!(spec.timezone, None);
    }

    #[test]
    fn bad_drafts_are_refused_with_a_reason() {
        let fail = |c: JobChanges| match merge_changes(c, None) {
            Ok(spec) => check_spec(spec).unwrap_err(),
            Err(e) => e,
        };
        assert!(fail(changes("telegram", "x")).contains("unknown channel"));
        assert!(fail(changes("webchat", " ")).contains("`target` is required"));
        assert!(fail(changes("whatsapp", "call me")).contains("not a WhatsApp number"));
        let mut c = changes("nextcloud", "abc123");
        c.tier = Some(Some("huge".into()));
        assert!(fail(c).contains("unknown tier"));
        let mut c = changes("nextcloud", "abc123");
        c.timezone = Some(Some("Paris".into()));
        assert!(fail(c).contains("unknown time zone"));
    }

    #[test]
    fn edits_keep_what_they_do_not_name() {
        let base = check_spec(merge_changes(changes("nextcloud", "room1"), None).unwrap()).unwrap();
        let edit = JobChanges { enabled: Some(false), ..JobChanges::default() };
        let edited = check_spec(merge_changes(edit, Some(base.clone())).unwrap()).unwrap();
        assert_eq!(edited, JobSpec { enabled: false, ..base.clone() });
        let reset = JobChanges { tier: Some(None), ..JobChanges::default() };
        let mut cloud = base.clone();
        cloud.tier = Some("code".into());
        let edited = check_spec(merge_changes(reset, Some(cloud)).unwrap()).unwrap();
        assert_eq!(edited.tier.as_deref(), Some("main"));
    }
}
