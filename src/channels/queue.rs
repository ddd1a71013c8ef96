//! The inbound queue worker: one tokio task that takes stored channel messages in arrival
//! order, runs them through the assistant, and sends the answer back on their channel. It
//! starts by recovering what a stopped process left behind. Knows no HTTP server and no
//! model details: it calls `Assistant` and the channel clients.

use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;

use crate::assistant::{Assistant, Reply};
use crate::channels::{nextcloud, redact, whatsapp, ChannelError, Channels};
use crate::db::inbound::{self, QueueEntry, QueueStatus};
use crate::db::memory;
use crate::domain::{ChannelKind, Inbound, MessageId};
use crate::error::Error;
use crate::llm::LlmError;

/// Tries per message before it is marked failed (a crash during processing counts).
pub const MAX_ATTEMPTS: i64 = 3;
/// How often the worker looks at the queue when nobody wakes it.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// WhatsApp shows the typing indicator for at most 25 s; it is renewed before that.
const TYPING_RENEWAL: Duration = Duration::from_secs(20);
/// The longest the first typing indicator may delay the answer.
const TYPING_FIRST_WAIT: Duration = Duration::from_secs(5);

/// Sent instead of an answer when the model failed.
pub const FAILURE_REPLY: &str =
    "Sorry, I could not produce an answer just now. Please try again in a moment.";

/// Starts the worker. It first puts back in the queue what a stopped process was handling,
/// then processes pending messages one at a time (the local engine answers one sequence at
/// a time anyway, and per-conversation order is kept).
pub fn spawn_worker(
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        match inbound::recover(&pool, MAX_ATTEMPTS).await {
            Ok((0, 0)) => {}
            Ok((requeued, given_up)) => {
                tracing::info!(
                    requeued,
                    given_up,
                    "inbound queue: recovered messages of the previous run"
                )
            }
            Err(e) => tracing::error!(error = %e, "inbound queue: recovery failed"),
        }
        let worker = Worker { pool, assistant, channels };
        worker.run().await;
    })
}

struct Worker {
    pool: SqlitePool,
    assistant: Arc<Assistant>,
    channels: Channels,
}

/// How processing one row ended.
#[derive(Debug)]
enum Outcome {
    Done,
    Ignored(String),
    Failed(String),
    /// A transient failure: the row goes back to the queue (until `MAX_ATTEMPTS`).
    Retry(String),
}

/// An answer ready to send, and whether it was already sent by a previous run.
struct Answer {
    message_id: Option<MessageId>,
    text: String,
    error: Option<String>,
    already_sent: bool,
}

impl Worker {
    async fn run(&self) {
        loop {
            match inbound::claim_next(&self.pool).await {
                Ok(Some(entry)) => self.handle(entry).await,
                Ok(None) => {
                    // `notify_one` keeps a permit when nobody waits, so a wake-up sent
                    // between the empty claim and this wait is not lost.
                    tokio::select! {
                        _ = self.channels.queue.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "inbound queue: cannot read the queue");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    async fn handle(&self, entry: QueueEntry) {
        let outcome = match entry.channel {
            ChannelKind::WhatsApp => self.process_whatsapp(&entry).await,
            ChannelKind::Nextcloud => self.process_nextcloud(&entry).await,
            ChannelKind::WebChat => Outcome::Failed("webchat messages are not queued".into()),
        };
        let channel = entry.channel.as_str();
        let result = match outcome {
            Outcome::Done => {
                tracing::info!(channel, queue_id = entry.id, "inbound message answered");
                inbound::finish(&self.pool, entry.id, QueueStatus::Done, None).await
            }
            Outcome::Ignored(reason) => {
                tracing::info!(channel, queue_id = entry.id, %reason, "inbound message ignored");
                inbound::finish(&self.pool, entry.id, QueueStatus::Ignored, Some(&reason)).await
            }
            Outcome::Failed(reason) => {
                tracing::warn!(channel, queue_id = entry.id, %reason, "inbound message failed");
                inbound::finish(&self.pool, entry.id, QueueStatus::Failed, Some(&reason)).await
            }
            Outcome::Retry(reason) if entry.attempts < MAX_ATTEMPTS => {
                tracing::warn!(channel, queue_id = entry.id, attempt = entry.attempts, %reason, "inbound message will be retried");
                let released = inbound::release(&self.pool, entry.id, &reason).await;
                // Give the busy resource (engine queue, database) time before the next claim.
                tokio::time::sleep(Duration::from_secs(2 * entry.attempts.max(1) as u64)).await;
                released
            }
            Outcome::Retry(reason) => {
                let reason = format!("gave up after {} attempts: {reason}", entry.attempts);
                tracing::warn!(channel, queue_id = entry.id, %reason, "inbound message failed");
                inbound::finish(&self.pool, entry.id, QueueStatus::Failed, Some(&reason)).await
            }
        };
        if let Err(e) = result {
            tracing::error!(queue_id = entry.id, error = %e, "inbound queue: cannot record the outcome");
        }
    }

    async fn process_whatsapp(&self, entry: &QueueEntry) -> Outcome {
        let Some(wa) = self.channels.whatsapp.clone() else {
            return Outcome::Failed("whatsapp is not configured any more".into());
        };
        let message: whatsapp::QueuedMessage = match serde_json::from_str(&entry.payload) {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(format!("unreadable queued payload: {e}")),
        };
        if !wa.is_allowed(&message.from) {
            // The allow-list changed since the message was stored (a restart in between).
            return Outcome::Ignored("sender not in WHATSAPP_ALLOWED_NUMBERS any more".into());
        }
        let Some(text) = message.text.clone() else {
            // Not text: say politely what works, and mark it read.
            if let Err(e) = wa.mark_read(&message.id, false).await {
                tracing::debug!(error = %e, "whatsapp: mark as read failed");
            }
            return match wa.send_text(&message.from, whatsapp::UNSUPPORTED_REPLY).await {
                Ok(_) => Outcome::Done,
                Err(e) => send_failure(e),
            };
        };

        // Read receipt and typing indicator while the model works. The first one is sent
        // before generating (briefly bounded), so that it cannot arrive after a fast answer
        // and show "typing" again; it is renewed before WhatsApp drops it, and stopped (task
        // aborted) as soon as the answer is there.
        let first = tokio::time::timeout(TYPING_FIRST_WAIT, wa.mark_read(&message.id, true)).await;
        if !matches!(first, Ok(Ok(()))) {
            tracing::debug!("whatsapp: typing indicator failed or timed out");
        }
        let typing = {
            let wa = wa.clone();
            let wamid = message.id.clone();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(TYPING_RENEWAL).await;
                    if let Err(e) = wa.mark_read(&wamid, true).await {
                        tracing::debug!(error = %e, "whatsapp: typing indicator failed");
                    }
                }
            }))
        };
        let inbound = Inbound {
            channel: ChannelKind::WhatsApp,
            conversation_key: message.from.clone(),
            sender: message.name.clone().unwrap_or_else(|| message.from.clone()),
            text,
            external_id: Some(message.id.clone()),
        };
        let answer = self.answer(inbound).await;
        drop(typing);
        let answer = match answer {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        if answer.already_sent {
            return Outcome::Done;
        }
        let text = if answer.text.trim().is_empty() { FAILURE_REPLY } else { answer.text.as_str() };
        match wa.send_text(&message.from, text).await {
            Ok(ids) => {
                self.record_sent(answer.message_id, ids.first()).await;
                tracing::info!(to = %redact(&message.from), "whatsapp: answered");
                match answer.error {
                    Some(e) => Outcome::Failed(format!("the model failed: {e}")),
                    None => Outcome::Done,
                }
            }
            Err(e) => {
                self.record_unsent(answer.message_id, &e).await;
                send_failure(e)
            }
        }
    }

    async fn process_nextcloud(&self, entry: &QueueEntry) -> Outcome {
        let Some(nc) = self.channels.nextcloud.clone() else {
            return Outcome::Failed("nextcloud is not configured any more".into());
        };
        let message: nextcloud::QueuedMessage = match serde_json::from_str(&entry.payload) {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(format!("unreadable queued payload: {e}")),
        };
        if !nc.is_allowed(&message.actor_id) {
            return Outcome::Ignored("actor not in NEXTCLOUD_ALLOWED_USERS any more".into());
        }
        let inbound = Inbound {
            channel: ChannelKind::Nextcloud,
            conversation_key: message.token.clone(),
            sender: message.actor_name.clone().unwrap_or_else(|| message.actor_id.clone()),
            text: message.text.clone(),
            external_id: Some(message.message_id.clone()),
        };
        let answer = match self.answer(inbound).await {
            Ok(a) => a,
            Err(outcome) => return outcome,
        };
        if answer.already_sent {
            return Outcome::Done;
        }
        let text = if answer.text.trim().is_empty() { FAILURE_REPLY } else { answer.text.as_str() };
        let reply_to = message.message_id.parse::<i64>().ok();
        match nc.send_message(&message.token, text, reply_to).await {
            Ok(references) => {
                self.record_sent(answer.message_id, references.first()).await;
                match answer.error {
                    Some(e) => Outcome::Failed(format!("the model failed: {e}")),
                    None => Outcome::Done,
                }
            }
            Err(e) => {
                self.record_unsent(answer.message_id, &e).await;
                send_failure(e)
            }
        }
    }

    /// Produces the answer to `inbound`, or finds it when a previous run already stored the
    /// question (and maybe the answer) before it stopped: the question is never stored twice
    /// and an answer is never generated twice.
    async fn answer(&self, inbound: Inbound) -> Result<Answer, Outcome> {
        let external_id = inbound.external_id.clone().unwrap_or_default();
        let stored = inbound::stored_turn(&self.pool, inbound.channel, &external_id)
            .await
            .map_err(|e| Outcome::Retry(format!("database: {e}")))?;
        let reply = match stored {
            Some(turn) => match turn.answer {
                Some(answer) => {
                    return Ok(Answer {
                        already_sent: answer.delivery_status.is_some(),
                        message_id: Some(answer.message_id),
                        error: (answer.status == "error").then(|| answer.content.clone()),
                        text: if answer.status == "error" { String::new() } else { answer.content },
                    })
                }
                None => self.assistant.answer_collect(turn.conversation_id, None).await,
            },
            None => self.assistant.reply(inbound, None).await,
        };
        match reply {
            Ok(Reply { message_id, text, error, .. }) => {
                Ok(Answer { message_id, text, error, already_sent: false })
            }
            Err(e) if is_transient(&e) => Err(Outcome::Retry(e.to_string())),
            Err(e) => Err(Outcome::Failed(e.to_string())),
        }
    }

    async fn record_sent(&self, message_id: Option<MessageId>, external_id: Option<&String>) {
        let (Some(message_id), Some(external_id)) = (message_id, external_id) else {
            return;
        };
        if let Err(e) =
            memory::set_message_external_id(&self.pool, message_id, external_id, Some("sent")).await
        {
            tracing::error!(error = %e, "cannot record the delivery of an answer");
        }
    }

    async fn record_unsent(&self, message_id: Option<MessageId>, error: &ChannelError) {
        let Some(message_id) = message_id else { return };
        if let Err(e) = inbound::mark_undelivered(&self.pool, message_id, &error.to_string()).await
        {
            tracing::error!(error = %e, "cannot record the failed delivery of an answer");
        }
    }
}

/// Sending already retried transient errors; what is left is recorded as the reason.
fn send_failure(error: ChannelError) -> Outcome {
    Outcome::Failed(format!("sending the answer failed: {error}"))
}

/// Errors worth another try later: a busy or restarting engine, a locked database.
fn is_transient(error: &Error) -> bool {
    match error {
        Error::Db(_) => true,
        Error::Llm(e) => matches!(e, LlmError::QueueFull | LlmError::EngineStopped),
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
