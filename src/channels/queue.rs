//! The inbound queue worker: takes stored channel messages, runs them through the assistant,
//! and sends the answer back through their `Channel`. Different conversations are answered
//! at once (up to `QueueConfig::concurrency`), one conversation in arrival order. A busy
//! engine is a reason to wait, never to drop: the row is put back with a retry time and
//! the worker goes on with other conversations. It starts by recovering what a stopped
//! process left behind. An answer goes out part by part, each part recorded as the channel
//! accepts it. A send that fails for a reason that may heal (the channel's server down or
//! erring, the network, a rate limit), once the channel's own quick retries are spent, is
//! retried the same way: the answer is kept and its parts not yet sent go out later, never
//! dropped and never sent twice. Knows no HTTP server and no model details: it calls
//! `Assistant` and the `Channel` trait.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use tokio::task::JoinSet;

use crate::assistant::{Assistant, Reply};
use crate::channels::{
    redact, AnswerParts, Channel, ChannelError, Channels, Progress, QueuedInbound,
};
use crate::db::inbound::{self, QueueEntry, QueueStatus, StoredTurn};
use crate::db::memory::{self, MessageStatus, StoredMessage};
use crate::db::now_ms;
use crate::domain::{Inbound, MessageId};
use crate::error::Error;
use crate::llm::LlmError;
use crate::retry::Backoff;

/// Claims a stopped process may interrupt before the row is given up (a message that
/// crashes the process must not do so forever). Transient failures do not count.
pub const MAX_INTERRUPTED: i64 = 3;
/// How often the worker looks at the queue when nobody wakes it.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// The longest the first typing indicator may delay the answer.
const TYPING_FIRST_WAIT: Duration = Duration::from_secs(5);

/// Sent instead of an answer when the model failed.
pub const FAILURE_REPLY: &str =
    "Sorry, I could not produce an answer just now. Please try again in a moment.";
/// Sent for content the channel cannot read (images, voice notes).
pub const UNSUPPORTED_REPLY: &str =
    "Sorry, I can read text messages only for now. Please type your message.";
/// Sent for a message that arrived but could not be read at all (malformed).
pub const UNREADABLE_REPLY: &str =
    "Sorry, your last message reached me but I could not read it. Please send it again.";
/// Sent when a message can never be answered, however long we wait (it does not fit the
/// model even without any history).
pub const TOO_LARGE_REPLY: &str = "Sorry, this message is too long for me to answer, even on \
its own. Please send a shorter one.";

/// Sent when a message is given up because the process stopped `MAX_INTERRUPTED` times
/// while answering it (it may be what stops it, so it is not tried again).
pub const INTERRUPTED_REPLY: &str = "Sorry, something went wrong each time I tried to answer \
your last message, so I have given up on it. Please send it again, perhaps worded differently.";

/// The last line sent after the text of an answer the user stopped (the WebChat's Stop on a
/// channel conversation), so the person reading it knows it is cut, not complete. Only in what
/// is sent: the stored answer keeps the text as written (see `Ending`).
pub const STOPPED_MARK: &str = "— stopped before the end";
/// The last line sent after the text of an answer that failed while being written.
pub const FAILED_MARK: &str = "— this answer failed before the end";

/// The reply to a message longer than the channel's limit.
pub fn too_long_reply(n_chars: usize, limit: usize) -> String {
    format!(
        "Sorry, your message is {n_chars} characters long and I read at most {limit}. \
         Please send a shorter one (or split it)."
    )
}

/// How the worker runs. Production values are in `Default`; tests shorten the waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Conversations answered at once. The engine serves several sequences at once and
    /// queues the rest in order, so this only needs to be a little above its slots.
    pub concurrency: usize,
    /// Wait before another try after a transient failure (busy engine, locked database):
    /// doubled each time up to the cap, never given up for that reason alone.
    pub busy_backoff: Backoff,
    /// A message still unanswered after this long (transient failures all along) is given
    /// up with a reply that says so: past WhatsApp's 24-hour window a late answer could not
    /// be sent anyway.
    pub give_up_after: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            concurrency: 6,
            busy_backoff: Backoff { base: Duration::from_secs(2), cap: Duration::from_secs(120) },
            give_up_after: Duration::from_secs(23 * 3600),
        }
    }
}

/// Starts the worker. It first puts back in the queue what a stopped process was handling,
/// then answers pending messages as they come.
pub fn spawn_worker(
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    config: QueueConfig,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let worker = Arc::new(Worker { pool, assistant, channels, config });
        match inbound::recover(&worker.pool, MAX_INTERRUPTED).await {
            Ok(recovered) => {
                if recovered.requeued > 0 || !recovered.given_up.is_empty() {
                    tracing::info!(
                        requeued = recovered.requeued,
                        given_up = recovered.given_up.len(),
                        "inbound queue: recovered messages of the previous run"
                    );
                }
                // Told before anything else is claimed, so that the apology comes before
                // the answers to the later messages of the same conversation.
                for entry in recovered.given_up {
                    worker.tell_given_up(entry).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "inbound queue: recovery failed"),
        }
        // The user's texts are kept in the conversations, not in the queue: finished rows
        // keep only what deduplication and the operator need.
        let cutoff = now_ms() - inbound::FINISHED_PAYLOAD_KEEP_MS;
        match inbound::scrub_finished_payloads(&worker.pool, cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(rows = n, "inbound queue: dropped the text of old finished rows")
            }
            Err(e) => tracing::error!(error = %e, "inbound queue: cannot drop old texts"),
        }
        worker.run().await;
    })
}

struct Worker {
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
    config: QueueConfig,
}

/// The reason of an answer found in `sending` after a stop.
const STOPPED_WHILE_SENDING: &str = "the process stopped while this answer was being sent: it \
may or may not have reached the user, and is not sent again";

/// What became of telling the sender of a given-up message.
enum Telling {
    Done,
    /// Not told, and why.
    Impossible(String),
    /// Its answer had already left (or may have): the row's status and why.
    AnswerSent(QueueStatus, String),
}

/// How processing one row ended.
#[derive(Debug)]
enum Outcome {
    Done,
    Ignored(String),
    /// Refused as it came (too long); the user was told.
    Rejected(String),
    Failed(String),
    /// A permanent failure of the model (the message does not fit even alone): the user
    /// gets `reply`, then the row is failed.
    Refused {
        reason: String,
        reply: &'static str,
    },
    /// A transient failure: the row goes back to the queue with a retry time.
    Retry(String),
    /// The answer may or may not have reached the user (a stop while sending).
    DeliveryUnknown(String),
}

/// An answer ready to send.
struct Answer {
    message_id: Option<MessageId>,
    text: String,
    error: Option<String>,
    ending: Ending,
}

/// How an answer's text ended, which decides the line sent after it. Read from the stored
/// answer, on the first try and on every later one alike, so that the text sent (which the
/// recorded parts' ends point into) is the same each time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Complete (or no stored answer): sent as written.
    Complete,
    /// `partial` without a failure: the user stopped it (`STOPPED_MARK`).
    Stopped,
    /// `partial` with a failure: the model failed while writing it (`FAILED_MARK`).
    Failed,
}

impl Ending {
    fn of(message: &StoredMessage) -> Ending {
        match (message.status, &message.failure) {
            (MessageStatus::Partial, None) => Ending::Stopped,
            (MessageStatus::Partial, Some(_)) => Ending::Failed,
            _ => Ending::Complete,
        }
    }

    /// What is sent for `text`: as written, or with the mark as its last line (the split into
    /// parts keeps it in the last part, or a part of its own when the text fills one).
    fn sent_text(self, text: &str) -> Cow<'_, str> {
        let mark = match self {
            Ending::Complete => return Cow::Borrowed(text),
            Ending::Stopped => STOPPED_MARK,
            Ending::Failed => FAILED_MARK,
        };
        Cow::Owned(format!("{}\n\n{mark}", text.trim_end()))
    }
}

impl Worker {
    async fn run(self: Arc<Self>) {
        let mut running = JoinSet::new();
        loop {
            // Fill the free slots with rows that are due. The claim skips conversations
            // that have an earlier row still in the queue, which keeps each in order.
            let mut claim_failed = false;
            while running.len() < self.config.concurrency.max(1) {
                match inbound::claim_next(&self.pool).await {
                    Ok(Some(entry)) => {
                        let worker = self.clone();
                        running.spawn(async move { worker.handle(entry).await });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "inbound queue: cannot read the queue");
                        claim_failed = true;
                        break;
                    }
                }
            }
            let wait = if claim_failed { Duration::from_secs(5) } else { self.next_wake().await };
            // `notify_one` keeps a permit when nobody waits, so a wake-up sent between the
            // last claim and this wait is not lost.
            tokio::select! {
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = self.channels.queue.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// How long to sleep when nothing more can be claimed: until the next retry is due, at
    /// most `IDLE_POLL`.
    async fn next_wake(&self) -> Duration {
        match inbound::next_retry_at(&self.pool).await {
            Ok(Some(at)) => {
                let in_ms = (at - now_ms()).clamp(0, IDLE_POLL.as_millis() as i64);
                // Never spin: a row due now but blocked by its conversation waits for that
                // conversation's task, whose end wakes the loop anyway.
                Duration::from_millis(in_ms as u64).max(Duration::from_millis(50))
            }
            _ => IDLE_POLL,
        }
    }

    async fn handle(&self, entry: QueueEntry) {
        let outcome = self.process(&entry).await;
        let channel = entry.channel.as_str();
        let queue_id = entry.id;
        let (status, reason) = match outcome {
            Outcome::Done => {
                tracing::info!(channel, queue_id, "inbound message answered");
                (QueueStatus::Done, None)
            }
            Outcome::Ignored(reason) => {
                tracing::info!(channel, queue_id, reason = ?reason, "inbound message ignored");
                (QueueStatus::Ignored, Some(reason))
            }
            Outcome::Rejected(reason) => {
                tracing::warn!(channel, queue_id, reason = ?reason, "inbound message rejected");
                (QueueStatus::Rejected, Some(reason))
            }
            Outcome::Failed(reason) | Outcome::Refused { reason, .. } => {
                tracing::warn!(channel, queue_id, reason = ?reason, "inbound message failed");
                (QueueStatus::Failed, Some(reason))
            }
            Outcome::DeliveryUnknown(reason) => {
                tracing::warn!(channel, queue_id, reason = ?reason, "inbound message: delivery unknown");
                (QueueStatus::DeliveryUnknown, Some(reason))
            }
            Outcome::Retry(reason) => {
                let retries = u32::try_from(entry.retries + 1).unwrap_or(u32::MAX);
                let wait = self.config.busy_backoff.delay(retries);
                tracing::info!(channel, queue_id, retries, ?wait, reason = ?reason, "inbound message waits for another try");
                let at = now_ms() + wait.as_millis() as i64;
                if let Err(e) = inbound::retry_later(&self.pool, entry.id, &reason, at).await {
                    tracing::error!(queue_id, error = %e, "inbound queue: cannot record the retry");
                }
                return;
            }
        };
        if let Err(e) = inbound::finish(&self.pool, entry.id, status, reason.as_deref()).await {
            tracing::error!(queue_id, error = %e, "inbound queue: cannot record the outcome");
        }
    }

    /// A message given up by `inbound::recover` after `MAX_INTERRUPTED` stops: its sender is
    /// told when they can be (allowed, inside WhatsApp's window), and the row's reason says
    /// whether they were. An answer already on its way is never followed by an apology.
    async fn tell_given_up(&self, entry: QueueEntry) {
        let reason = entry.last_error.clone().unwrap_or_else(|| "gave up".into());
        let (status, reason) = match self.tell_interrupted(&entry).await {
            Telling::Done => (QueueStatus::Failed, format!("{reason} (the user was told)")),
            Telling::Impossible(why) => {
                (QueueStatus::Failed, format!("{reason}; the user was not told: {why}"))
            }
            Telling::AnswerSent(status, note) => (status, format!("{reason}; {note}")),
        };
        // Never the text or the sender: the row's id finds them for whoever may look.
        tracing::warn!(
            channel = entry.channel.as_str(),
            queue_id = entry.id,
            status = status.as_str(),
            reason = ?reason,
            "inbound message given up: the process stopped {MAX_INTERRUPTED} times while handling it"
        );
        if let Err(e) = inbound::finish(&self.pool, entry.id, status, Some(&reason)).await {
            tracing::error!(queue_id = entry.id, error = %e, "inbound queue: cannot record the outcome");
        }
    }

    async fn tell_interrupted(&self, entry: &QueueEntry) -> Telling {
        let Some(channel) = self.channels.get(entry.channel).cloned() else {
            return Telling::Impossible(format!("{} is not configured any more", entry.channel));
        };
        let message = match channel.parse_queued(&entry.payload) {
            Ok(m) => m,
            Err(e) => return Telling::Impossible(e.to_string()),
        };
        if !channel.is_allowed(&message.sender_id) {
            return Telling::Impossible("sender not allowed any more".into());
        }
        // A stop after the answer was produced: its delivery decides, not the apology.
        match inbound::stored_turn(&self.pool, entry.channel, &message.external_id).await {
            Ok(Some(StoredTurn { answer: Some(answer), .. })) => {
                match answer.delivery_status.as_deref() {
                    None => {}
                    Some("sending") | Some("unknown") => {
                        if let Err(e) = inbound::mark_delivery_unknown(
                            &self.pool,
                            answer.message_id,
                            STOPPED_WHILE_SENDING,
                        )
                        .await
                        {
                            return Telling::Impossible(format!("database: {e}"));
                        }
                        return Telling::AnswerSent(
                            QueueStatus::DeliveryUnknown,
                            STOPPED_WHILE_SENDING.into(),
                        );
                    }
                    Some(_) => {
                        return Telling::AnswerSent(
                            QueueStatus::Done,
                            "its answer had been sent".into(),
                        )
                    }
                }
            }
            Ok(_) => {}
            Err(e) => return Telling::Impossible(format!("database: {e}")),
        }
        match channel.window_open(&message.conversation_key).await {
            Ok(true) => {}
            Ok(false) => {
                return Telling::Impossible("outside the channel's window for replies".into())
            }
            Err(e) => return Telling::Impossible(e.to_string()),
        }
        match channel.reply(&message, INTERRUPTED_REPLY, Progress::unrecorded()).await {
            Ok(_) => Telling::Done,
            Err(e) => Telling::Impossible(format!("telling the user failed: {e}")),
        }
    }

    async fn process(&self, entry: &QueueEntry) -> Outcome {
        let Some(channel) = self.channels.get(entry.channel).cloned() else {
            return Outcome::Failed(format!("{} is not configured any more", entry.channel));
        };
        let message = match channel.parse_queued(&entry.payload) {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if !channel.is_allowed(&message.sender_id) {
            // The allow-list changed since the message was stored (a restart in between).
            return Outcome::Ignored("sender not allowed any more".into());
        }
        if let Some(reason) = message.unreadable.clone() {
            // Arrived but unreadable: the person is told, and the row says why.
            return match channel.reply(&message, UNREADABLE_REPLY, Progress::unrecorded()).await {
                Ok(_) => Outcome::Rejected(reason),
                Err(e) if e.is_retryable() => send_failure(e),
                Err(e) => Outcome::Failed(format!("{reason}; telling the user failed: {e}")),
            };
        }
        let Some(text) = message.text.clone() else {
            // Not text: say politely what works, and mark it read.
            if let Err(e) = channel.acknowledge(&message, false).await {
                tracing::debug!(error = ?e.to_string(), "read receipt failed");
            }
            return match channel.reply(&message, UNSUPPORTED_REPLY, Progress::unrecorded()).await {
                Ok(_) => Outcome::Done,
                Err(e) => send_failure(e),
            };
        };
        let limit = channel.limits().max_inbound_chars;
        let n_chars = text.chars().count();
        if n_chars > limit {
            // Hours of engine time for one message would hold every other conversation:
            // the user is told, and the row keeps the message.
            let reason = format!("message too long: {n_chars} characters, the limit is {limit}");
            let reply = too_long_reply(n_chars, limit);
            return match channel.reply(&message, &reply, Progress::unrecorded()).await {
                Ok(_) => Outcome::Rejected(reason),
                Err(e) if e.is_retryable() => send_failure(e),
                Err(e) => Outcome::Failed(format!("{reason}; telling the user failed: {e}")),
            };
        }
        let waited = Duration::from_millis((now_ms() - entry.received_at).max(0) as u64);
        if entry.retries > 0 && waited > self.config.give_up_after {
            let reason = format!(
                "gave up after {} tries over {} hours: {}",
                entry.retries,
                waited.as_secs() / 3600,
                entry.last_error.as_deref().unwrap_or("the engine stayed busy")
            );
            return self
                .fail_with_reply(channel.as_ref(), &message, FAILURE_REPLY, reason, false)
                .await;
        }

        // What a previous run left: the question, maybe its answer (see `answer`).
        let stored =
            match inbound::stored_turn(&self.pool, entry.channel, &message.external_id).await {
                Ok(stored) => stored,
                Err(e) => return Outcome::Retry(format!("database: {e}")),
            };
        // Read receipt and typing indicator while the model works. The first one is sent
        // before generating (briefly bounded), so that it cannot arrive after a fast answer
        // and show "typing" again; it is renewed while the model works, and stopped (task
        // aborted) as soon as the answer is there. An answer a previous run produced needs
        // no model, and may never be sent at all (`sending`): no "typing" for it.
        let generates = !matches!(&stored, Some(StoredTurn { answer: Some(_), .. }));
        let typing = if generates {
            let first =
                tokio::time::timeout(TYPING_FIRST_WAIT, channel.acknowledge(&message, true));
            if !matches!(first.await, Ok(Ok(()))) {
                tracing::debug!(channel = %entry.channel, "typing indicator failed or timed out");
            }
            channel.typing_renewal().map(|every| {
                let channel = channel.clone();
                let message = message.clone();
                AbortOnDrop(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(every).await;
                        if let Err(e) = channel.acknowledge(&message, true).await {
                            tracing::debug!(error = ?e.to_string(), "typing indicator failed");
                        }
                    }
                }))
            })
        } else {
            None
        };
        let inbound = Inbound {
            channel: entry.channel,
            conversation_key: message.conversation_key.clone(),
            sender: message.sender_name.clone().unwrap_or_else(|| message.sender_id.clone()),
            text,
            external_id: Some(message.external_id.clone()),
        };
        let answer = self.answer(inbound, stored).await;
        drop(typing);
        let answer = match answer {
            Ok(Some(a)) => a,
            Ok(None) => return Outcome::Done,
            Err(outcome) => {
                return self.tell_permanent_failure(channel.as_ref(), &message, outcome).await
            }
        };
        let text = if answer.text.trim().is_empty() {
            Cow::Borrowed(FAILURE_REPLY)
        } else {
            answer.ending.sent_text(&answer.text)
        };
        // The state is written before the answer leaves: if the process stops before the
        // channel's answer is recorded, the next run finds `sending` and does not send it
        // a second time (see `answer`). Each part is recorded as the channel accepts it, so
        // a try after a failure that may heal sends only the parts that did not go out.
        // From before `sending` is written until how the send ended is recorded, the answer
        // is held in flight, so that a status report overtaking the send's answer is kept
        // for its part's id rather than taken for a stopped process's (`SendsInFlight`).
        let (parts, in_flight) = match answer.message_id {
            Some(id) => {
                let parts = match AnswerParts::load(&self.pool, id).await {
                    Ok(parts) => parts,
                    Err(e) => return Outcome::Retry(format!("database: {e}")),
                };
                let in_flight = self.channels.sending.begin(id);
                if let Err(e) = inbound::mark_sending(&self.pool, id).await {
                    return Outcome::Retry(format!("database: {e}"));
                }
                (Some(parts), Some(in_flight))
            }
            None => (None, None),
        };
        let progress = match &parts {
            Some(parts) => parts.progress(),
            None => Progress::unrecorded(),
        };
        let outcome = match channel.reply(&message, &text, progress).await {
            Ok(_) => {
                self.record_sent(answer.message_id).await;
                tracing::info!(channel = %entry.channel, to = %redact(&message.conversation_key), "answered");
                match answer.error {
                    Some(e) => Outcome::Failed(format!("the model failed: {e}")),
                    None => Outcome::Done,
                }
            }
            Err(e) => {
                self.record_unsent(answer.message_id, &e).await;
                send_failure(e)
            }
        };
        drop(in_flight);
        outcome
    }

    /// Produces the answer to `inbound`, or finds it when a previous run already stored the
    /// question (and maybe the answer) before it stopped: the question is never stored twice
    /// and an answer is never generated twice. `Ok(None)`: it was already sent.
    /// `stored` is what `inbound::stored_turn` found for it.
    async fn answer(
        &self,
        inbound: Inbound,
        stored: Option<StoredTurn>,
    ) -> Result<Option<Answer>, Outcome> {
        let reply = match stored {
            Some(turn) => match turn.answer {
                Some(answer) => {
                    return match answer.delivery_status.as_deref() {
                        None if answer.status == "error" => Ok(Some(Answer {
                            message_id: Some(answer.message_id),
                            error: Some(answer.content),
                            text: String::new(),
                            ending: Ending::Complete,
                        })),
                        None => {
                            let (ending, failure) = self.ending(answer.message_id).await?;
                            Ok(Some(Answer {
                                message_id: Some(answer.message_id),
                                error: failure,
                                text: answer.content,
                                ending,
                            }))
                        }
                        Some("sending") => {
                            if let Err(e) = inbound::mark_delivery_unknown(
                                &self.pool,
                                answer.message_id,
                                STOPPED_WHILE_SENDING,
                            )
                            .await
                            {
                                return Err(Outcome::Retry(format!("database: {e}")));
                            }
                            Err(Outcome::DeliveryUnknown(STOPPED_WHILE_SENDING.into()))
                        }
                        // Failed while its next parts waited (the report of a part that went
                        // out): the rest would not reach the user either.
                        Some("failed") => Err(Outcome::Failed(
                            "the answer was reported not delivered (its delivery error says \
                             why): nothing more of it is sent"
                                .into(),
                        )),
                        Some(_) => Ok(None),
                    };
                }
                None => self.assistant.answer_collect(turn.conversation_id, None).await,
            },
            None => self.assistant.reply(inbound, None).await,
        };
        match reply {
            Ok(Reply { message_id, text, error, .. }) => {
                let ending = match message_id {
                    Some(id) => self.ending(id).await?.0,
                    None => Ending::Complete,
                };
                Ok(Some(Answer { message_id, text, error, ending }))
            }
            Err(e) if is_transient(&e) => Err(Outcome::Retry(e.to_string())),
            Err(e @ Error::Llm(LlmError::ContextOverflow { .. })) => {
                Err(Outcome::Refused { reason: e.to_string(), reply: TOO_LARGE_REPLY })
            }
            Err(e) => Err(Outcome::Refused { reason: e.to_string(), reply: FAILURE_REPLY }),
        }
    }

    /// How the stored answer `id` ended, and its failure.
    async fn ending(&self, id: MessageId) -> Result<(Ending, Option<String>), Outcome> {
        match memory::get_message(&self.pool, id).await {
            Ok(Some(message)) => Ok((Ending::of(&message), message.failure)),
            // Deleted meanwhile (the conversation too): sent as it was collected.
            Ok(None) => Ok((Ending::Complete, None)),
            Err(e) => Err(Outcome::Retry(format!("database: {e}"))),
        }
    }

    /// A permanent failure gets a short reply that says so; other outcomes pass through.
    /// When that reply meets an outage of the channel (its servers erring, a rate limit),
    /// the message goes back to the queue like an answer would, so the user is told once
    /// the channel is back (the model refuses the message again at once) rather than never:
    /// nothing was stored for it, so nothing is repeated.
    async fn tell_permanent_failure(
        &self,
        channel: &dyn Channel,
        message: &QueuedInbound,
        outcome: Outcome,
    ) -> Outcome {
        match outcome {
            Outcome::Refused { reason, reply } => {
                self.fail_with_reply(channel, message, reply, reason, true).await
            }
            other => other,
        }
    }

    /// Tells the user `text` and fails the message for `reason`; with `retry_outage`, an
    /// error of the channel that may heal puts the message back in the queue instead.
    async fn fail_with_reply(
        &self,
        channel: &dyn Channel,
        message: &QueuedInbound,
        text: &str,
        reason: String,
        retry_outage: bool,
    ) -> Outcome {
        match channel.reply(message, text, Progress::unrecorded()).await {
            Ok(_) => Outcome::Failed(format!("{reason} (the user was told)")),
            Err(e) if retry_outage && e.is_retryable() => {
                Outcome::Retry(format!("{reason}; telling the user failed, to be tried again: {e}"))
            }
            Err(e) => Outcome::Failed(format!("{reason}; telling the user failed: {e}")),
        }
    }

    /// Records that every part of an answer went out (each part's id was recorded as it
    /// went): `sent`, without the error of earlier tries that failed.
    async fn record_sent(&self, message_id: Option<MessageId>) {
        let Some(message_id) = message_id else { return };
        if let Err(e) = inbound::mark_sent(&self.pool, message_id).await {
            tracing::error!(error = %e, "cannot record the delivery of an answer");
        }
    }

    /// Records a failed send of an answer: failed for good, `unknown` when it may have
    /// reached the user (never sent again, nor any part after it), or (an error that may
    /// heal) back to not sent, for the message's next try to send the parts that did not go
    /// out.
    async fn record_unsent(&self, message_id: Option<MessageId>, error: &ChannelError) {
        let Some(message_id) = message_id else { return };
        let reason = error.to_string();
        let recorded = if matches!(error, ChannelError::DeliveryUnknown { .. }) {
            inbound::mark_delivery_unknown(&self.pool, message_id, &reason).await
        } else if error.is_retryable() {
            inbound::mark_send_retry(&self.pool, message_id, &reason).await
        } else {
            inbound::mark_undelivered(&self.pool, message_id, &reason).await
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, "cannot record the failed delivery of an answer");
        }
    }
}

/// A failed send, after the channel's own quick retries: an error that may heal puts the
/// message back in the queue (with the busy engine's backoff, given up only after
/// `QueueConfig::give_up_after`); a send that may have reached the user (no answer from
/// the service) is never repeated, so a duplicate cannot happen; any other is the row's
/// final reason.
fn send_failure(error: ChannelError) -> Outcome {
    if let ChannelError::DeliveryUnknown { .. } = error {
        return Outcome::DeliveryUnknown(format!("sending the answer: {error}"));
    }
    let reason = format!("sending the answer failed: {error}");
    if error.is_retryable() {
        Outcome::Retry(reason)
    } else {
        Outcome::Failed(reason)
    }
}

/// Errors worth another try later: a busy, loading or restarting engine, a cloud limit, a
/// locked database. A prompt that does not fit even alone, a bad model file or a bad
/// request never heal by waiting.
fn is_transient(error: &Error) -> bool {
    match error {
        Error::Db(_) => true,
        Error::Llm(e) => matches!(
            e,
            LlmError::QueueFull
                | LlmError::EngineStopped
                | LlmError::Unavailable(_)
                | LlmError::Timeout(_)
                | LlmError::Cloud { retryable: true, .. }
        ),
        _ => false,
    }
}

/// Aborts a background task when dropped (the typing indicator loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
