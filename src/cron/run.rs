//! One run of a job: its row in the history, the prompt answered by the assistant in the
//! target conversation (or, for a reminder, its fixed text stored there), the delivery on
//! the job's channel (marked `sending` before it leaves, each part recorded as it goes out,
//! offered again from the first part that did not), the recorded outcome, and a one-shot
//! job's end (deleted once delivered, disabled when it failed). Whether and when to run is
//! decided elsewhere (`scheduler.rs`, `CronHandle`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::channels::{AnswerParts, ChannelError, DeliveryReceipt};
use crate::cron::{lock, plan, scheduler, CronError, Inner, DEFAULT_TIER};
use crate::db::cron::{self as store, CronJob, CronJobId, CronRun, JobKind, RunOutcome};
use crate::db::now_ms;
use crate::db::{inbound, memory};
use crate::domain::{ChannelKind, ConversationId, Inbound, MessageId};
use crate::llm::router::Tier;

/// Runs kept in each job's history; older ones are deleted as new ones finish.
const KEEP_RUNS: i64 = 500;

/// A run whose start is recorded (its history row says `running`) and whose job is locked
/// until it finishes.
pub(super) struct StartedRun {
    inner: Arc<Inner>,
    job: CronJob,
    run_id: i64,
    started_at: i64,
    clock: Instant,
    /// The occurrence a one-shot runs for when it runs late (the process was stopped or
    /// asleep at its time): a reminder then says when it was due.
    late_for: Option<DateTime<Utc>>,
    /// Released when the run ends, however it ends.
    _guard: RunGuard,
}

/// Locks the job and records the start of its run; `Busy` when a run of it is in progress.
/// The row is written before this returns, so whoever started the run can tell that it
/// did (the scheduler's `checked_through` relies on it).
pub(super) async fn begin(inner: &Arc<Inner>, job: CronJob) -> Result<StartedRun, CronError> {
    let guard = RunGuard::claim(inner, job.id).ok_or(CronError::Busy(job.id))?;
    let started_at = now_ms();
    let run_id = store::start_run(&inner.pool, job.id, started_at).await?;
    Ok(StartedRun {
        inner: inner.clone(),
        job,
        run_id,
        started_at,
        clock: Instant::now(),
        late_for: None,
        _guard: guard,
    })
}

impl StartedRun {
    /// Marks the run as that of occurrence `due`, which went by unrun.
    pub(super) fn late_for(self, due: Option<DateTime<Utc>>) -> StartedRun {
        StartedRun { late_for: due, ..self }
    }

    /// Asks the assistant, delivers, and records the outcome.
    pub(super) async fn finish(self) -> Result<CronRun, CronError> {
        let StartedRun { inner, job, run_id, started_at, clock, late_for, _guard: guard } = self;
        let result = answer_and_deliver(&inner, &job, run_id, late_for).await;
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
        store::finish_run(&inner.pool, run_id, duration_ms, outcome, error.as_deref(), message_id)
            .await?;
        // The job is free again before old history is pruned.
        drop(guard);
        if let Err(e) = store::prune_runs(&inner.pool, job.id, KEEP_RUNS).await {
            tracing::warn!(job = job.id.0, error = %e, "old cron runs not pruned");
        }
        if plan(&inner, &job).is_ok_and(|(schedule, _)| schedule.is_once()) {
            end_one_shot(&inner, &job, outcome).await;
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
}

/// The per-job lock: a job with a run in progress is in `Inner::running`.
struct RunGuard {
    inner: Arc<Inner>,
    id: CronJobId,
}

impl RunGuard {
    fn claim(inner: &Arc<Inner>, id: CronJobId) -> Option<RunGuard> {
        if !lock(&inner.running).insert(id) {
            return None;
        }
        Some(RunGuard { inner: inner.clone(), id })
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        lock(&self.inner.running).remove(&self.id);
    }
}

/// A one-shot job has had its run: deleted once delivered (its message stays in the
/// conversation), disabled when the run failed, so the failure stays in the Schedules panel
/// and the job off the active reminders.
async fn end_one_shot(inner: &Arc<Inner>, job: &CronJob, outcome: RunOutcome) {
    let _turn = inner.turn.lock().await;
    // Edited during the run (a new time, say): the edit is the job now, not this run's.
    match store::get_job(&inner.pool, job.id).await {
        Ok(Some(current)) if current.updated_at == job.updated_at => {}
        Ok(_) => return,
        Err(e) => {
            tracing::error!(job = job.id.0, error = %e, "one-shot job not ended after its run");
            return;
        }
    }
    let ended = if outcome == RunOutcome::Delivered {
        store::delete_job(&inner.pool, job.id).await.map(|_| None)
    } else {
        store::disable_job(&inner.pool, job).await
    };
    match ended {
        Ok(current) => scheduler::sync(inner, job.id, current, Utc::now()).await,
        Err(e) => {
            tracing::error!(job = job.id.0, error = %e, "one-shot job not ended after its run")
        }
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

async fn answer_and_deliver(
    inner: &Inner,
    job: &CronJob,
    run_id: i64,
    late_for: Option<DateTime<Utc>>,
) -> Result<Delivered, Failure> {
    let tier = job.tier.as_deref().and_then(Tier::from_name).unwrap_or(DEFAULT_TIER);
    // Targets are checked when a job is saved, but the configuration may have changed
    // since: an answer nobody can receive is not worth the model's time.
    if !inner.channels.is_configured(job.channel) {
        let reason = format!("{} is not configured, so nothing was asked or sent", job.channel);
        return Err(Failure::new(reason, None));
    }
    // Nor is an answer that could not leave now (WhatsApp's closed window, no template):
    // minutes of a large model on the CPU for nothing at every run. (A reminder costs no
    // model: its text is still stored in the conversation, and its delivery fails.)
    if job.kind == JobKind::Prompt && job.channel != ChannelKind::WebChat {
        if let Err(e) = inner.channels.check_deliverable(job.channel, &job.target).await {
            let reason = format!("{} cannot deliver now, so nothing was asked: {e}", job.channel);
            return Err(Failure::new(reason, None));
        }
    }
    let (message_id, text) = match job.kind {
        JobKind::Prompt => answer(inner, job, tier).await?,
        JobKind::Reminder => post_reminder(inner, job, late_for).await?,
    };
    if job.channel == ChannelKind::WebChat {
        // For the WebChat, storing the answer is the delivery: open pages hear of it
        // through the assistant's events. A conversation deleted during the run took the
        // message with it: nothing was delivered.
        return match memory::get_message(&inner.pool, message_id).await {
            Ok(Some(_)) => Ok(Delivered { message_id, note: None }),
            Ok(None) => Err(Failure::new(
                "the conversation was deleted while this run was writing into it".into(),
                None,
            )),
            Err(e) => Err(Failure::new(format!("database: {e}"), None)),
        };
    }
    // The state is written before the message leaves, as the channel queue does: a stop
    // during the send leaves `sending` on a `running` run, which the next start marks
    // `unknown` (`store::fail_interrupted_runs`), so the message is never sent twice.
    if let Err(e) = store::mark_run_sending(&inner.pool, run_id, message_id).await {
        return Err(Failure::new(format!("database: {e}"), Some(message_id)));
    }
    let receipt = match deliver_patiently(inner, job, message_id, &text).await {
        Ok(receipt) => receipt,
        Err(e @ ChannelError::DeliveryUnknown { .. }) => {
            // It may have arrived: never sent again (nor the parts after it), and said as
            // unknown, as a channel answer whose delivery is unknown is.
            let reason = format!("{}: {e}", job.channel);
            if let Err(e) = inbound::mark_delivery_unknown(&inner.pool, message_id, &reason).await {
                tracing::warn!(job = job.id.0, error = %e, "unknown delivery not recorded");
            }
            return Err(Failure::new(reason, Some(message_id)));
        }
        Err(e) => {
            let verb = if e.is_retryable() { "could not take" } else { "refused" };
            let reason = format!("{} {verb} the message: {e}", job.channel);
            // The stored answer says it never left, as a channel answer that failed does.
            if let Err(e) = inbound::mark_undelivered(&inner.pool, message_id, &reason).await {
                tracing::warn!(job = job.id.0, error = %e, "failed delivery not recorded");
            }
            return Err(Failure::new(reason, Some(message_id)));
        }
    };
    // Each part's id went on the message as it left (its status webhooks land there); all
    // of them went out now.
    if let Err(e) = inbound::mark_sent(&inner.pool, message_id).await {
        tracing::warn!(job = job.id.0, error = %e, "delivery not recorded");
    }
    let note = receipt.via_template.then(|| {
        "outside WhatsApp's 24-hour window: the approved template was sent instead; the answer \
         waits in the conversation"
            .to_string()
    });
    Ok(Delivered { message_id, note })
}

/// Delivers `text`, the stored message `message_id`, offering what did not go out again
/// while the channel fails in a way that may heal (see `DeliveryPatience`): each part is
/// recorded as the channel accepts it, and each try starts after the last recorded part, so
/// no part is sent twice. The run holds its job meanwhile, so an occurrence that comes during
/// the outage is skipped, not doubled.
async fn deliver_patiently(
    inner: &Inner,
    job: &CronJob,
    message_id: MessageId,
    text: &str,
) -> Result<DeliveryReceipt, ChannelError> {
    let patience = inner.delivery;
    let started = Instant::now();
    let mut wait = patience.first_wait;
    loop {
        let parts = AnswerParts::load(&inner.pool, message_id).await?;
        match inner.channels.deliver(job.channel, &job.target, text, parts.progress()).await {
            Err(e) if e.is_retryable() && !inner.stopped.load(Ordering::SeqCst) => {
                let pause = e.retry_after().unwrap_or(wait).min(patience.max_wait);
                if started.elapsed() + pause > patience.give_up_after {
                    return Err(e);
                }
                tracing::warn!(
                    job = job.id.0,
                    channel = %job.channel,
                    error = %e,
                    wait_s = pause.as_secs_f32(),
                    "delivery failed; offering it again"
                );
                tokio::time::sleep(pause).await;
                wait = (wait * 2).min(patience.max_wait);
            }
            other => return other,
        }
    }
}

/// The prompt answered by the model in the target conversation: the stored answer and its
/// text.
async fn answer(inner: &Inner, job: &CronJob, tier: Tier) -> Result<(MessageId, String), Failure> {
    // The same path as a message the user sends: the prompt is stored in the target
    // conversation, answered with its history and the persona, and both messages are
    // announced to open WebChat pages. The prefix tells the reader (and the model) that
    // nobody typed this turn.
    let inbound = Inbound {
        channel: job.channel,
        conversation_key: job.target.clone(),
        sender: "cron".into(),
        text: format!("[scheduled: {}] {}", job.name, job.prompt),
        external_id: None,
    };
    // The conversation is known before the answer starts, so that a shutdown can stop it.
    let conversation = match job.channel {
        ChannelKind::WebChat => job.target.parse::<i64>().ok().map(ConversationId),
        channel => memory::get_or_create_conversation(&inner.pool, channel, &job.target, None)
            .await
            .ok()
            .map(|c| c.id),
    };
    let mut halting = inner.halting.subscribe();
    let asked = inner.assistant.reply(inbound, Some(tier));
    tokio::pin!(asked);
    let (reply, halted) = tokio::select! {
        reply = &mut asked => (reply, false),
        // (The watch's guard is dropped at once: it must not live across the wait below.)
        _ = async {
            if halting.wait_for(|halting| *halting).await.is_err() {
                std::future::pending::<()>().await;
            }
        } => {
            if let Some(conversation) = conversation {
                inner.assistant.stop(conversation);
            }
            // The stopped answer is stored (cut short) before the reply comes back.
            (asked.await, true)
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => return Err(Failure::new(format!("the assistant could not answer: {e}"), None)),
    };
    if halted {
        let reason = "stopped: my-claw was shutting down; the answer was cut short and not sent";
        return Err(Failure::new(reason.into(), reply.message_id));
    }
    if let Some(error) = reply.error {
        return Err(Failure::new(format!("the model failed: {error}"), reply.message_id));
    }
    let Some(message_id) = reply.message_id else {
        return Err(Failure::new("the answer could not be stored".into(), None));
    };
    Ok((message_id, reply.text))
}

/// A reminder's fixed text, stored as the assistant's message in the conversation it was
/// asked in and announced to open pages: no model is asked, so it fires even when no model
/// can answer.
async fn post_reminder(
    inner: &Inner,
    job: &CronJob,
    late_for: Option<DateTime<Utc>>,
) -> Result<(MessageId, String), Failure> {
    let mut text = reminder_text(&job.prompt);
    // A reminder that comes late says so, with the time it was for, in its own zone.
    if let Some(due) = late_for {
        let zone = plan(inner, job).map_or(inner.default_timezone, |(_, zone)| zone);
        let local = due.with_timezone(&zone);
        text.push_str(&format!(
            "\n\n(Sent late: it was due {}, while my-claw was not running.)",
            local.format("%A %-d %B at %H:%M")
        ));
    }
    let conversation = match job.conversation_id {
        Some(id) => Some(id),
        // A reminder row written around the API: its channel and target say where.
        None => match job.channel {
            ChannelKind::WebChat => job.target.parse::<i64>().ok().map(ConversationId),
            channel => memory::find_conversation(&inner.pool, channel, &job.target)
                .await
                .map_err(|e| Failure::new(format!("database: {e}"), None))?
                .map(|c| c.id),
        },
    };
    let Some(conversation) = conversation else {
        return Err(Failure::new("the reminder's conversation no longer exists".into(), None));
    };
    match inner.assistant.post(conversation, &text).await {
        Ok(message_id) => Ok((message_id, text)),
        Err(e) => Err(Failure::new(format!("the reminder could not be stored: {e}"), None)),
    }
}

/// What a reminder says when it fires. Its text is made plain again (`job::plain_text`): a
/// row stored before API edits were held to that rule, or written around the API, may hold
/// characters that would make a phone show it reordered.
pub fn reminder_text(what: &str) -> String {
    format!("⏰ Reminder: {}", super::job::plain_text(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reminder_is_sent_without_control_or_reordering_characters() {
        assert_eq!(reminder_text(" tea "), "⏰ Reminder: tea");
        assert_eq!(
            reminder_text("call \u{202e}4321\u{202c}\u{0} now\r\nthen\trest"),
            "⏰ Reminder: call 4321 now\nthen\trest"
        );
    }
}
