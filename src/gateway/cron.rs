//! Scheduled jobs over HTTP: the jobs API behind the bearer token (`/api/cron/jobs…`, and
//! `/api/cron/describe`, the schedule in words for the editor) and the `X-Cron-Secret`
//! trigger for an external crontab (`/api/cron`). Rules, scheduling and runs are
//! `crate::cron`'s; this module only shapes the JSON and checks the secret.
//!
//! The handlers reach the scheduler through an `Extension<CronHandle>` that `attach` adds
//! around the whole router, so the gateway's `AppState` does not need to know about cron.

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::cron::job::JobChanges;
use crate::cron::{CronError, CronHandle, JobView};
use crate::db::cron::{CronJobId, CronRun};
use crate::gateway::error::{invalid_json, query_limit, ApiError, ApiJson, ApiPath, ApiQuery};
use crate::gateway::AppState;

/// The header that carries `CRON_SECRET`.
pub const SECRET_HEADER: &str = "x-cron-secret";

/// Most runs one history answer carries.
const MAX_RUNS: i64 = 200;
/// How many upcoming runs the description lists.
const PREVIEW_RUNS: usize = 3;
/// The text fields of `JobRequest`, as the JSON names them.
const TEXT_FIELDS: [&str; 8] =
    ["name", "schedule", "timezone", "prompt", "channel", "target", "tier", "kind"];

/// The jobs API; goes behind the bearer-token check.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/cron/jobs", get(list_jobs).post(create_job))
        .route("/api/cron/jobs/{id}", get(get_job).put(update_job).delete(delete_job))
        .route("/api/cron/jobs/{id}/run", post(run_job))
        .route("/api/cron/jobs/{id}/runs", get(list_runs))
        .route("/api/cron/describe", get(describe_schedule))
}

/// `GET|POST /api/cron`: public, guarded by `X-Cron-Secret` instead of the bearer token.
pub fn trigger_router() -> Router<AppState> {
    Router::new().route("/api/cron", get(trigger_due_jobs).post(trigger_due_jobs))
}

/// Makes the running scheduler available to the cron handlers of `router`.
pub fn attach(router: Router, cron: CronHandle) -> Router {
    router.layer(Extension(cron))
}

/// A job as the API shows it. Times are Unix milliseconds, like the rest of the API.
#[derive(Debug, Serialize)]
pub struct JobJson {
    pub id: i64,
    pub name: String,
    pub schedule: String,
    /// The job's own zone; `null` follows `CRON_TIMEZONE`, else `TIMEZONE` (else the
    /// system's).
    pub timezone: Option<String>,
    /// The zone the job actually runs in.
    pub effective_timezone: String,
    /// The schedule in words, in the effective zone ("every day at 08:00 Europe/Paris").
    pub description: String,
    pub prompt: String,
    /// `webchat`, `whatsapp` or `nextcloud`.
    pub channel: &'static str,
    pub target: String,
    pub tier: Option<String>,
    pub enabled: bool,
    /// `prompt` (the model answers the prompt at each run) or `reminder` (the prompt is a
    /// reminder's text, posted as is in the conversation that asked for it).
    pub kind: &'static str,
    /// The conversation a reminder was asked in; `null` for prompt jobs.
    pub conversation_id: Option<i64>,
    /// `null` when the job is disabled.
    pub next_run: Option<i64>,
    pub last_run: Option<i64>,
    /// `running`, `delivered` or `failed`; `null` before the first run.
    pub last_outcome: Option<&'static str>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Serialize)]
pub struct RunJson {
    pub id: i64,
    pub job_id: i64,
    pub started_at: i64,
    /// `null` while the run is in progress.
    pub duration_ms: Option<i64>,
    pub outcome: &'static str,
    /// Why it failed, or how it was delivered when that is worth telling.
    pub error: Option<String>,
    /// The stored answer, in the target conversation.
    pub message_id: Option<i64>,
}

#[derive(Debug, Serialize)]
struct JobList {
    jobs: Vec<JobJson>,
    /// The zone of jobs with `timezone: null`.
    default_timezone: String,
}

#[derive(Debug, Serialize)]
struct RunList {
    runs: Vec<RunJson>,
}

/// A create or a partial edit: absent fields are left as they are. Fields the API only
/// shows (`id`, `next_run`, …) are ignored, so a client may send back a whole job.
/// Read through `job_request`, so that a field of the wrong type is refused by its name.
#[derive(Debug, Deserialize)]
struct JobRequest {
    name: Option<String>,
    schedule: Option<String>,
    /// `null` resets to the default zone.
    #[serde(default, deserialize_with = "present")]
    timezone: Option<Option<String>>,
    prompt: Option<String>,
    channel: Option<String>,
    target: Option<String>,
    /// `null` resets to the default tier.
    #[serde(default, deserialize_with = "present")]
    tier: Option<Option<String>>,
    enabled: Option<bool>,
    /// Shown, and checked when sent: it must be the job's own (`prompt` on create).
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RunsQuery {
    /// Kept as text so that a bad value gets a refusal naming it.
    limit: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DescribeQuery {
    /// Optional here so that a missing one gets a refusal naming it.
    expression: Option<String>,
    /// An IANA zone; the default zone when absent or empty.
    timezone: Option<String>,
}

#[derive(Debug, Serialize)]
struct DescriptionJson {
    /// The expression in words, with the zone when the zone matters.
    description: String,
    timezone: String,
    next_runs: Vec<i64>,
}

#[derive(Debug, Serialize)]
struct TriggerJson {
    /// Ids of the jobs that were due and started; their outcomes land in their histories.
    started: Vec<i64>,
}

type Scheduler = Option<Extension<CronHandle>>;

async fn list_jobs(cron: Scheduler) -> Result<ApiJson<JobList>, ApiError> {
    let cron = running(cron)?;
    let jobs = cron.list().await?.into_iter().map(job_json).collect();
    Ok(ApiJson(JobList { jobs, default_timezone: cron.default_timezone().name().to_string() }))
}

async fn create_job(
    cron: Scheduler,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, ApiJson<JobJson>), ApiError> {
    let request = job_request(body)?;
    let view = running(cron)?.create(request.into()).await?;
    Ok((StatusCode::CREATED, ApiJson(job_json(view))))
}

async fn get_job(
    cron: Scheduler,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<JobJson>, ApiError> {
    let view = running(cron)?.get(parse_id(&id)?).await?;
    Ok(ApiJson(job_json(view)))
}

async fn update_job(
    cron: Scheduler,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<ApiJson<JobJson>, ApiError> {
    let request = job_request(body)?;
    let view = running(cron)?.update(parse_id(&id)?, request.into()).await?;
    Ok(ApiJson(job_json(view)))
}

async fn delete_job(cron: Scheduler, ApiPath(id): ApiPath<String>) -> Result<StatusCode, ApiError> {
    running(cron)?.delete(parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs the job now and answers when the run has finished.
async fn run_job(
    cron: Scheduler,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<RunJson>, ApiError> {
    let run = running(cron)?.run_now(parse_id(&id)?).await?;
    Ok(ApiJson(run_json(run)))
}

async fn list_runs(
    cron: Scheduler,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<RunsQuery>,
) -> Result<ApiJson<RunList>, ApiError> {
    let limit = query_limit(query.limit.as_deref(), 50, MAX_RUNS)?;
    let runs = running(cron)?.runs(parse_id(&id)?, limit).await?;
    Ok(ApiJson(RunList { runs: runs.into_iter().map(run_json).collect() }))
}

/// Checks an expression, says it in words and lists its next runs, for the editor (which
/// calls it as the user types, so the page has no describer of its own).
async fn describe_schedule(
    cron: Scheduler,
    ApiQuery(query): ApiQuery<DescribeQuery>,
) -> Result<ApiJson<DescriptionJson>, ApiError> {
    let Some(expression) = query.expression else {
        let message = "`expression` is required: the schedule to describe".to_string();
        return Err(ApiError::BadParam { param: "expression", message });
    };
    let preview = running(cron)?.preview(&expression, query.timezone.as_deref(), PREVIEW_RUNS)?;
    Ok(ApiJson(DescriptionJson {
        description: preview.description,
        timezone: preview.timezone.name().to_string(),
        next_runs: preview.next_runs.iter().map(DateTime::<Utc>::timestamp_millis).collect(),
    }))
}

/// Runs the jobs that are due, for an external crontab. Off (404) without `CRON_SECRET`;
/// 401 and nothing runs when the header is missing or wrong.
async fn trigger_due_jobs(
    cron: Scheduler,
    headers: HeaderMap,
) -> Result<ApiJson<TriggerJson>, ApiError> {
    let trigger_off =
        || ApiError::NotFound("the cron trigger is off: set CRON_SECRET to use it".into());
    let Some(Extension(cron)) = cron else {
        return Err(trigger_off());
    };
    let Some(secret) = cron.trigger_secret() else {
        return Err(trigger_off());
    };
    let given = headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if given.is_empty() || !secret.matches(given) {
        let message = format!("missing or wrong {SECRET_HEADER} header");
        return Err(ApiError::WrongSecret(message));
    }
    match cron.run_due().await {
        Ok(started) => {
            Ok(ApiJson(TriggerJson { started: started.iter().map(|id| id.0).collect() }))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads a create or an edit from its JSON body; a field of the wrong type is refused naming
/// it (serde's own message names none).
fn job_request(body: Value) -> Result<JobRequest, ApiError> {
    let Value::Object(fields) = &body else {
        return Err(ApiError::BadRequest("invalid JSON body: expected a JSON object".into()));
    };
    for field in TEXT_FIELDS.into_iter().chain(["enabled"]) {
        let Some(value) = fields.get(field).filter(|value| !value.is_null()) else { continue };
        let (fits, expected) = match field {
            "enabled" => (value.is_boolean(), "true or false"),
            _ => (value.is_string(), "a string"),
        };
        if !fits {
            let message = format!("`{field}` must be {expected}");
            return Err(ApiError::BadParam { param: field, message });
        }
    }
    serde_path_to_error::deserialize(body).map_err(|e| invalid_json(&e))
}

fn running(cron: Scheduler) -> Result<CronHandle, ApiError> {
    match cron {
        Some(Extension(cron)) => Ok(cron),
        None => Err(ApiError::Unavailable("the scheduler is not running".into())),
    }
}

fn parse_id(text: &str) -> Result<CronJobId, ApiError> {
    match text.parse::<i64>() {
        Ok(id) => Ok(CronJobId(id)),
        Err(_) => {
            let shown: String = text.chars().take(32).collect();
            Err(ApiError::BadRequest(format!("`{shown}` is not a job id")))
        }
    }
}

fn job_json(view: JobView) -> JobJson {
    let job = view.job;
    JobJson {
        id: job.id.0,
        name: job.name,
        schedule: job.schedule,
        timezone: job.timezone,
        effective_timezone: view.timezone.name().to_string(),
        description: view.description,
        prompt: job.prompt,
        channel: job.channel.as_str(),
        target: job.target,
        tier: job.tier,
        enabled: job.enabled,
        kind: job.kind.as_str(),
        conversation_id: job.conversation_id.map(|c| c.0),
        next_run: view.next_run.map(|t| t.timestamp_millis()),
        last_run: job.last_run_at,
        last_outcome: job.last_outcome.map(|o| o.as_str()),
        last_error: job.last_error,
        created_at: job.created_at,
        updated_at: job.updated_at,
    }
}

fn run_json(run: CronRun) -> RunJson {
    RunJson {
        id: run.id,
        job_id: run.job_id.0,
        started_at: run.started_at,
        duration_ms: run.duration_ms,
        outcome: run.outcome.as_str(),
        error: run.error,
        message_id: run.message_id.map(|m| m.0),
    }
}

impl From<JobRequest> for JobChanges {
    fn from(r: JobRequest) -> Self {
        JobChanges {
            name: r.name,
            schedule: r.schedule,
            timezone: r.timezone,
            prompt: r.prompt,
            channel: r.channel,
            target: r.target,
            tier: r.tier,
            enabled: r.enabled,
            kind: r.kind,
        }
    }
}

/// Tells "absent" (`None`, through `#[serde(default)]`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl From<CronError> for ApiError {
    fn from(e: CronError) -> Self {
        match e {
            CronError::Invalid { field, message } => ApiError::BadParam { param: field, message },
            CronError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CronError::Busy(_) => ApiError::Conflict(e.to_string()),
            CronError::Db(e) => e.into(),
            CronError::Scheduler(cause) => ApiError::Internal(cause),
        }
    }
}
