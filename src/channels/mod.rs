//! Messaging channels (WhatsApp Cloud API, Nextcloud Talk bots): the `Channel` trait and the
//! registry of configured channels, their wire types, signature checks and outbound clients,
//! the progress of a message sent in several parts (each part recorded as the service
//! accepts it, so a later try sends only what did not go out), and the durable inbound queue
//! worker that hands their messages to the assistant. A channel knows its wire format and
//! nothing about models; it does not know axum either (the webhooks in `gateway/webhooks.rs`
//! call into it).

pub mod lenient;
pub mod markup;
pub mod nextcloud;
pub mod queue;
pub mod split;
pub mod whatsapp;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use sqlx::SqlitePool;
use tokio::sync::Notify;

use crate::channels::split::split_message;
use crate::db::inbound::{self, ContactSeen, EarlyReport, NewInbound, QueueStatus};
use crate::db::memory;
use crate::domain::{ChannelKind, MessageId};
use crate::retry::{Backoff, Verdict};

/// A messaging channel: its wire format (webhook verification and parsing), its policy
/// (who may write, how long a message may be) and its outbound client. WhatsApp and Talk
/// implement it; the webhooks, the queue worker and the scheduler use only this trait, and
/// `app.rs` is the one place that names the implementations.
pub trait Channel: Send + Sync {
    fn kind(&self) -> ChannelKind;

    /// Message sizes this channel accepts and sends.
    fn limits(&self) -> Limits;

    /// Says at start what will happen to incoming messages (never logs secrets).
    fn log_configuration(&self);

    /// Whether `sender` (a phone number, a Talk actor id) may talk to the assistant.
    fn is_allowed(&self, sender: &str) -> bool;

    /// A subscription handshake (WhatsApp's `GET ?hub.mode=subscribe…`): the body to answer
    /// with, or `Err` to refuse. Channels without one refuse.
    fn handshake(&self, params: &HashMap<String, String>) -> Result<String, ChannelError> {
        let _ = params;
        Err(ChannelError::NotDeliverable(self.kind()))
    }

    /// Checks the webhook's signature over the raw body, in constant time.
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> bool;

    /// Turns a verified webhook body into what to store. A body that is not this channel's
    /// payload at all is `BadPayload`; one bad message in a batch is a `Rejected` row, not
    /// an error, so that the good ones are kept and the batch is acknowledged.
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<Vec<Intake>, ChannelError>;

    /// Reads back a queue row's payload written by `parse`.
    fn parse_queued(&self, payload: &str) -> Result<QueuedInbound, ChannelError>;

    /// Read receipt, and with `typing` a typing indicator, while the answer is produced.
    /// Best effort; channels without them do nothing.
    fn acknowledge<'a>(
        &'a self,
        message: &'a QueuedInbound,
        typing: bool,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        let _ = (message, typing);
        Box::pin(async { Ok(()) })
    }

    /// How often the typing indicator must be sent again while the model works, if the
    /// channel has one.
    fn typing_renewal(&self) -> Option<Duration> {
        None
    }

    /// Answers `message` in its conversation, split as the channel requires: the parts that
    /// follow `progress.sent_through`, one at a time, each handed to `progress.log` once the
    /// service accepted it and before the next is sent. A part that fails stops the rest.
    /// Returns the channel's id of each part this call sent.
    fn reply<'a>(
        &'a self,
        message: &'a QueuedInbound,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, ChannelError>>;

    /// Sends a message the assistant writes by itself (cron jobs) to `target` (a phone
    /// number, a room token), from `progress` on as `reply` does.
    fn deliver<'a>(
        &'a self,
        target: &'a str,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>>;

    /// Whether a free-form message can reach `address` now (WhatsApp's 24-hour window).
    fn window_open<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<bool, ChannelError>> {
        let _ = address;
        Box::pin(async { Ok(true) })
    }

    /// Whether `deliver` to `address` could go out now, in some form (WhatsApp: inside the
    /// window, or through the approved template); the error `deliver` would end with when
    /// not. Asked before a model writes what nobody could receive.
    fn check_deliverable<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        let _ = address;
        Box::pin(async { Ok(()) })
    }
}

/// Message sizes, in characters (Unicode scalar values, as both services count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longer inbound messages get a short "too long" reply instead of hours of engine time.
    pub max_inbound_chars: usize,
    /// Outbound text is split into parts of at most this size.
    pub max_outbound_chars: usize,
}

/// One thing a webhook delivery carries, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// A queue row: a message to answer (`Pending`), or the trace of one that needs no
    /// answer (`Ignored`, `Done`, `Rejected`, with a note saying why).
    Row {
        /// The channel's message id (the deduplication key).
        external_id: String,
        /// Rows of one conversation are answered in order.
        conversation_key: Option<String>,
        /// What `parse_queued` reads back.
        payload: String,
        status: QueueStatus,
        note: Option<String>,
        contact: Option<Contact>,
    },
    /// A delivery report of one of our outbound messages. `in_reply_to`: the inbound
    /// message our message answered, when the channel echoes it back (WhatsApp's
    /// `biz_opaque_callback_data`), which finds an answer whose id was never recorded.
    Delivery {
        external_id: String,
        status: String,
        error: Option<String>,
        in_reply_to: Option<String>,
    },
}

/// The sender of an inbound message, as the channel saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub address: String,
    pub display_name: Option<String>,
    /// When they wrote, Unix milliseconds.
    pub at_ms: i64,
}

/// A stored inbound message, as the queue worker needs it, whatever its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedInbound {
    /// The channel's message id (wamid, Talk message id).
    pub external_id: String,
    /// The conversation: the sender's number (WhatsApp), the room token (Talk).
    pub conversation_key: String,
    /// Who wrote, for the allow-list: a number, a Talk actor id.
    pub sender_id: String,
    pub sender_name: Option<String>,
    /// The text to answer; `None` for content the channel cannot read (images, voice).
    pub text: Option<String>,
    /// Why the message could not be read at all (a malformed message from an allowed
    /// sender): it gets a reply saying so and is recorded as rejected with this reason.
    pub unreadable: Option<String>,
}

/// What a webhook delivery produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// New messages waiting for the worker.
    pub queued: usize,
    /// Redeliveries of messages already stored.
    pub duplicates: usize,
    /// Rows stored without an answer (sender not allowed, reactions, membership events).
    pub ignored: usize,
    /// Messages of the batch that could not be read, stored as `rejected`.
    pub rejected: usize,
    /// Delivery reports applied.
    pub statuses: usize,
}

/// The configured channels, handed to the gateway (webhooks), to the queue worker and to
/// the scheduler (proactive messages). A registry by kind: one slot per kind that can have
/// a client. `Default` is "no channel configured", which is what most tests use.
#[derive(Clone, Default)]
pub struct Channels {
    // The slots stay public so that existing struct literals (`Channels { whatsapp:
    // Some(..), ..Channels::default() }`) and `whatsapp.is_some()` checks keep compiling;
    // new code goes through `Channels::new`, `get` and `is_configured`.
    pub whatsapp: Option<Arc<dyn Channel>>,
    pub nextcloud: Option<Arc<dyn Channel>>,
    /// Wakes the inbound queue worker when a webhook has stored new messages.
    pub queue: Arc<Notify>,
    /// The answers this process is sending now (see `SendsInFlight`).
    pub sending: SendsInFlight,
}

/// The answers this process is sending now: from just before the queue marks one `sending`
/// until it has recorded how the send ended (`mark_sent`, `mark_send_retry`,
/// `mark_undelivered`, `mark_delivery_unknown`). A `sending` answer not in it was left by a
/// stopped process (or a send that panicked or was dropped): only such an answer may be
/// found by `inbound::confirm_reply_delivery`. A report of an answer in it is kept until its
/// part's id is recorded, like any report that overtakes the answer to the send; confirming
/// it would move the answer out of `sending` while its later parts may still fail, and the
/// queue would then take it for sent. In memory on purpose: a stopped process's sends are
/// exactly those no set holds.
#[derive(Clone, Default)]
pub struct SendsInFlight(Arc<std::sync::Mutex<HashMap<MessageId, usize>>>);

impl SendsInFlight {
    /// Holds `answer` as being sent until the guard is dropped, however the send ends (a
    /// return, an error, a panic, a dropped future).
    pub fn begin(&self, answer: MessageId) -> SendInFlight {
        *self.lock().entry(answer).or_insert(0) += 1;
        SendInFlight { sends: self.clone(), answer }
    }

    /// Whether a send of `answer` is in flight in this process.
    pub fn contains(&self, answer: MessageId) -> bool {
        self.lock().contains_key(&answer)
    }

    /// The map, also after a panic elsewhere while it was held (a counter cannot be left
    /// half-written).
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, usize>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One send held in `SendsInFlight`; dropping it ends the hold.
#[must_use = "the answer counts as being sent only while the guard lives"]
pub struct SendInFlight {
    sends: SendsInFlight,
    answer: MessageId,
}

impl Drop for SendInFlight {
    fn drop(&mut self) {
        let mut map = self.sends.lock();
        if let Some(n) = map.get_mut(&self.answer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.answer);
            }
        }
    }
}

/// What a channel accepted: its ids for the message parts it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReceipt {
    pub channel: ChannelKind,
    /// WhatsApp: one `wamid` per part. Talk: one `referenceId` per part (Talk answers with
    /// no message id, so ours is the handle). Only the parts this call sent: those sent by
    /// an earlier try are in its `PartLog`.
    pub external_ids: Vec<String>,
    /// True when WhatsApp's 24-hour window was closed and the approved template was sent.
    pub via_template: bool,
}

/// A part of an outbound message that the service accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentPart {
    /// The channel's id of the part (WhatsApp: its wamid; Talk: our `referenceId`).
    pub external_id: String,
    /// Where the part ends in the text as the channel sends it (a byte offset in its
    /// rendering: WhatsApp's markup, Talk's text as it is). What follows is still to send;
    /// only the channel that wrote it reads it, as `Progress::sent_through`.
    pub end: usize,
}

/// Where the parts of one outbound message are recorded as the service accepts them.
pub trait PartLog: Send + Sync {
    /// Records `part`; awaited before the next part is sent, so that a stop or a failure
    /// after any part leaves a record of exactly what went out. An error stops the message
    /// there: the part is out but not recorded, so the error must be one that nothing sends
    /// again (`ChannelError::DeliveryUnknown`).
    fn record<'a>(&'a self, part: &'a SentPart) -> BoxFuture<'a, Result<(), ChannelError>>;
}

/// How far an outbound message has gone out, and where its next parts are recorded.
#[derive(Clone, Copy)]
pub struct Progress<'a> {
    /// The `end` of the last part already sent; 0 when none was. Only what follows it is
    /// sent, so a part never goes out twice even when the split would now cut elsewhere.
    pub sent_through: usize,
    pub log: &'a dyn PartLog,
}

impl Progress<'static> {
    /// A message sent from its start with nothing recorded per part: the short notices the
    /// queue sends in place of an answer (they fit one part, and are not stored messages).
    pub fn unrecorded() -> Progress<'static> {
        Progress { sent_through: 0, log: &Unrecorded }
    }
}

impl Progress<'_> {
    /// Whether nothing of the message went out yet: only then does its first part carry what
    /// opens a message (Talk's `replyTo`).
    pub fn at_start(&self) -> bool {
        self.sent_through == 0
    }
}

/// The `PartLog` of `Progress::unrecorded`.
struct Unrecorded;

impl PartLog for Unrecorded {
    fn record<'a>(&'a self, _part: &'a SentPart) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async { Ok(()) })
    }
}

/// The parts of a stored answer (the queue's answers, cron's messages) that went out, read
/// from `message_parts`, and the `PartLog` that records each next part there, committed
/// before the channel sends the one after it.
pub struct AnswerParts {
    pool: SqlitePool,
    message_id: MessageId,
    sent_through: usize,
}

impl AnswerParts {
    /// What of the answer `message_id` went out already.
    pub async fn load(pool: &SqlitePool, message_id: MessageId) -> Result<Self, sqlx::Error> {
        let parts = memory::message_parts(pool, message_id).await?;
        let sent_through = match parts.last() {
            None => 0,
            // A last part recorded without its end (by `memory::set_message_parts`, for an
            // answer sent whole) gives no place from which going on surely repeats nothing:
            // `usize::MAX` is past the end of any text, which a channel refuses (see
            // `parts_after`).
            Some(part) => {
                part.sent_through.and_then(|end| usize::try_from(end).ok()).unwrap_or(usize::MAX)
            }
        };
        Ok(AnswerParts { pool: pool.clone(), message_id, sent_through })
    }

    /// Sending that goes on after the recorded parts and records the next ones.
    pub fn progress(&self) -> Progress<'_> {
        Progress { sent_through: self.sent_through, log: self }
    }
}

impl PartLog for AnswerParts {
    fn record<'a>(&'a self, part: &'a SentPart) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(async move {
            let end = i64::try_from(part.end).unwrap_or(i64::MAX);
            memory::record_message_part(&self.pool, self.message_id, &part.external_id, end)
                .await
                .map_err(|e| ChannelError::DeliveryUnknown {
                    what: format!(
                        "a part was accepted by the channel but could not be recorded \
                         (database: {e})"
                    ),
                })
        })
    }
}

/// The parts of `text` that follow byte `from` (the end of the last part sent, 0 for all of
/// it), cut at `max_chars` as `split::split_message` cuts, each with the byte offset in `text`
/// where it ends. The split is greedy from the start of what remains, so cutting what follows
/// a sent part gives the parts that cutting the whole text gave after it; and whatever the
/// cut, nothing before `from` is sent again. An offset outside `text` (or inside a character)
/// means the record does not belong to this text: refused, rather than guessing.
pub fn parts_after(
    text: &str,
    from: usize,
    max_chars: usize,
) -> Result<Vec<(String, usize)>, ChannelError> {
    let misplaced = || {
        ChannelError::Invalid(
            "the record of the parts already sent does not fit this text: not sending the rest"
                .into(),
        )
    };
    let rest = text.get(from..).ok_or_else(misplaced)?;
    let mut cursor = 0;
    let mut parts = Vec::new();
    for part in split_message(rest, max_chars) {
        // `split_message` only trims whitespace around its cuts: each part is the text that
        // follows the previous one, after the whitespace, so its first occurrence is it.
        let start = rest[cursor..].find(part.as_str()).ok_or_else(misplaced)? + cursor;
        cursor = start + part.len();
        parts.push((part, from + cursor));
    }
    Ok(parts)
}

/// Why a channel could not deliver. Callers can match: `OutsideWindow` means "send a
/// template or wait for the user", `TokenExpired` means "an operator must act".
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0} is not configured")]
    NotConfigured(ChannelKind),
    #[error("{0} has no outbound delivery (its messages are only stored)")]
    NotDeliverable(ChannelKind),
    #[error(
        "whatsapp access token expired or invalid (code {code}): {message}; \
         renew WHATSAPP_ACCESS_TOKEN (not retried)"
    )]
    TokenExpired { code: i64, message: String },
    #[error(
        "outside whatsapp's 24-hour customer service window (code 131047): {detail}; \
         only an approved template can reach this user (not retried)"
    )]
    OutsideWindow { detail: String },
    /// A proactive message (a job, a reminder) to a number the assistant no longer talks
    /// with: it was removed from the allow-list after the job was made.
    #[error("this number is not in WHATSAPP_ALLOWED_NUMBERS (any more): nothing is sent to it (not retried)")]
    NotAllowed,
    #[error("whatsapp api error {code} (http {status}): {message}")]
    WhatsApp {
        status: u16,
        code: i64,
        message: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("nextcloud talk answered http {status}: {reason}")]
    Nextcloud { status: u16, reason: String, retry_after: Option<Duration> },
    /// The request never reached the service (the connection could not be made), or could
    /// not be built: nothing was delivered, so trying again is safe.
    #[error("http request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// The request may have reached the service but its answer never came (a timeout, a
    /// connection broken after the request was written): the message may have been
    /// delivered. Never retried, since a second send could be a duplicate; the queue marks
    /// the answer's delivery `unknown`. `what` says what happened, without personal data.
    #[error("{what}; the message may have been delivered, not resending")]
    DeliveryUnknown { what: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A signed webhook body that is not this channel's payload. The text never quotes the
    /// input (see `lenient::describe_json_error`).
    #[error("unreadable payload: {0}")]
    BadPayload(String),
    #[error("{0}")]
    Invalid(String),
}

impl ChannelError {
    /// Whether trying again later may succeed: throughput and pair rate limits, server
    /// errors, network failures. Expired tokens and the closed window never heal by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            // A 429 without a Graph error code (a body that is not Meta's envelope: a proxy's
            // or an edge's refusal) is a rate limit by its status alone; with a code, the
            // code decides (131048, the spam limit, is not retried).
            ChannelError::WhatsApp { status, code, .. } => {
                *status >= 500
                    || whatsapp::RETRYABLE_CODES.contains(code)
                    || (*status == 429 && *code == 0)
            }
            ChannelError::Nextcloud { status, .. } => *status >= 500,
            ChannelError::Transport(e) => !e.is_builder() && !e.is_decode(),
            _ => false,
        }
    }

    /// Sorts a failed outbound request by whether the service may have received it. Only a
    /// failed connection (or a request that could not be built) proves that nothing left:
    /// that one is a `Transport` error, safe to retry. Anything later (no answer within
    /// `timeout`, a connection dropped after the request was written, an unreadable answer)
    /// is `DeliveryUnknown`. `service` names the API in the text ("the WhatsApp API").
    pub fn from_request(service: &str, timeout: Duration, error: reqwest::Error) -> ChannelError {
        let error = error.without_url();
        if error.is_connect() || error.is_builder() {
            return ChannelError::Transport(error);
        }
        let what = if error.is_timeout() {
            format!("no answer from {service} within {} s", timeout.as_secs_f32())
        } else {
            format!("the connection to {service} failed after the request was sent ({error})")
        };
        ChannelError::DeliveryUnknown { what }
    }

    /// The wait the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ChannelError::WhatsApp { retry_after, .. }
            | ChannelError::Nextcloud { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How outbound sends are retried (through `crate::retry`). Production values are in
/// `Default`; tests shorten them.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub max_attempts: u32,
    /// Delay before the second try; doubled each time, up to `max_delay`.
    pub base_delay: Duration,
    /// The longest wait between tries, ours or one a server asks for.
    pub max_delay: Duration,
    /// WhatsApp's pair rate limit allows about one message per 6 s to the same user.
    pub pair_rate_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            pair_rate_delay: Duration::from_secs(6),
        }
    }
}

impl RetryPolicy {
    pub fn backoff(&self) -> Backoff {
        Backoff { base: self.base_delay, cap: self.max_delay }
    }

    /// Whether and when to try a failed send again.
    pub fn verdict(&self, error: &ChannelError) -> Verdict {
        if !error.is_retryable() {
            return Verdict::Stop;
        }
        let pair_rate =
            matches!(error, ChannelError::WhatsApp { code: whatsapp::PAIR_RATE_LIMIT, .. })
                .then_some(self.pair_rate_delay);
        let at_least = match (error.retry_after(), pair_rate) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Verdict::Retry { at_least }
    }

    /// The wait after failed try number `attempt` (1-based), as `crate::retry::run` waits.
    pub fn delay(&self, attempt: u32, error: &ChannelError) -> Duration {
        let at_least = match self.verdict(error) {
            Verdict::Retry { at_least } => at_least,
            Verdict::Stop => None,
        };
        crate::retry::wait_before_retry(self.backoff(), attempt, at_least).unwrap_or(self.max_delay)
    }
}

impl Channels {
    /// The registry of `list` (built in `app.rs`). A later client of the same kind replaces
    /// an earlier one.
    pub fn new(list: Vec<Arc<dyn Channel>>) -> Self {
        let mut channels = Channels::default();
        for channel in list {
            match channel.kind() {
                ChannelKind::WhatsApp => channels.whatsapp = Some(channel),
                ChannelKind::Nextcloud => channels.nextcloud = Some(channel),
                // The WebChat is served by the gateway, not through this registry.
                ChannelKind::WebChat => {}
            }
        }
        channels
    }

    /// The client of `kind`, when that channel is configured.
    pub fn get(&self, kind: ChannelKind) -> Option<&Arc<dyn Channel>> {
        match kind {
            ChannelKind::WhatsApp => self.whatsapp.as_ref(),
            ChannelKind::Nextcloud => self.nextcloud.as_ref(),
            ChannelKind::WebChat => None,
        }
    }

    /// Whether a message can be sent on `kind`: the WebChat always (storing is delivering
    /// there), the others when configured.
    pub fn is_configured(&self, kind: ChannelKind) -> bool {
        kind == ChannelKind::WebChat || self.get(kind).is_some()
    }

    /// Every configured channel.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Channel>> {
        self.whatsapp.iter().chain(self.nextcloud.iter())
    }

    /// Logs each channel's configuration, then starts the inbound queue worker (which first
    /// recovers messages left unfinished by a previous run). The one call `app.rs` makes
    /// after `new`.
    pub fn start(&self, pool: SqlitePool, assistant: Arc<crate::assistant::Assistant>) {
        for channel in self.all() {
            channel.log_configuration();
        }
        // Without any channel there is nothing to answer with; rows left by an earlier
        // configuration stay pending until a channel is configured again.
        if self.all().next().is_some() {
            queue::spawn_worker(pool, assistant, self.clone(), queue::QueueConfig::default());
        }
    }

    /// Tells the queue worker that new messages are waiting.
    pub fn wake_worker(&self) {
        self.queue.notify_one();
    }

    /// Stores what `parse` produced: queue rows (deduplicated on the channel's message id)
    /// with their senders' contact facts, and delivery reports. Returns once all of it is
    /// committed, so a webhook answers 200 only for what is durable.
    pub async fn store(
        &self,
        pool: &SqlitePool,
        kind: ChannelKind,
        intakes: &[Intake],
    ) -> Result<Accepted, sqlx::Error> {
        let mut accepted = Accepted::default();
        for intake in intakes {
            match intake {
                Intake::Row { external_id, conversation_key, payload, status, note, contact } => {
                    let row = NewInbound {
                        channel: kind,
                        external_id,
                        payload,
                        status: *status,
                        note: note.as_deref(),
                    };
                    let seen = contact.as_ref().map(|c| ContactSeen {
                        channel: kind,
                        address: &c.address,
                        display_name: c.display_name.as_deref(),
                        at_ms: c.at_ms,
                    });
                    let inserted = inbound::enqueue_message(
                        pool,
                        &row,
                        conversation_key.as_deref(),
                        seen.as_ref(),
                    )
                    .await?;
                    match (inserted, status) {
                        (false, _) => {
                            tracing::info!(channel = %kind, "duplicate delivery of a stored message, acknowledged");
                            accepted.duplicates += 1;
                        }
                        (true, QueueStatus::Pending) => accepted.queued += 1,
                        (true, QueueStatus::Rejected) => accepted.rejected += 1,
                        (true, _) => accepted.ignored += 1,
                    }
                }
                Intake::Delivery { external_id, status, error, in_reply_to } => {
                    let mut known =
                        inbound::record_delivery(pool, external_id, status, error.as_deref())
                            .await?;
                    if let (false, Some(question)) = (known, in_reply_to) {
                        // Only an answer no send of ours owns: one being sent now is found
                        // through its part's id once that is recorded (kept below till then).
                        known = inbound::confirm_reply_delivery(
                            pool,
                            kind,
                            question,
                            external_id,
                            status,
                            error.as_deref(),
                            |answer| self.sending.contains(answer),
                        )
                        .await?;
                        if known {
                            tracing::info!(channel = %kind, status = ?status, "delivery of an answer confirmed by the channel after a stop");
                        }
                    }
                    if !known {
                        // Meta may report on a message before the answer to our send request
                        // is back and its id recorded: the report waits for the id.
                        let early = inbound::keep_early_delivery(
                            pool,
                            external_id,
                            status,
                            error.as_deref(),
                        )
                        .await?;
                        if early == EarlyReport::Kept {
                            tracing::debug!(channel = %kind, status = ?status, "status for a message not recorded (yet): kept until its id is");
                        }
                    }
                    accepted.statuses += 1;
                }
            }
        }
        if accepted.queued > 0 {
            self.wake_worker();
        }
        Ok(accepted)
    }

    /// Sends a message the assistant writes by itself (cron jobs), the parts that follow
    /// `progress` (see `Channel::deliver`). `target` is a phone number for WhatsApp and a
    /// room token for Talk. On WhatsApp, outside the 24-hour window the approved template
    /// (`WHATSAPP_TEMPLATE_NAME`) is sent instead, or `OutsideWindow` is returned when there
    /// is none.
    pub async fn deliver(
        &self,
        channel: ChannelKind,
        target: &str,
        text: &str,
        progress: Progress<'_>,
    ) -> Result<DeliveryReceipt, ChannelError> {
        if channel == ChannelKind::WebChat {
            return Err(ChannelError::NotDeliverable(channel));
        }
        let client = self.get(channel).ok_or(ChannelError::NotConfigured(channel))?;
        client.deliver(target, text, progress).await
    }

    /// Whether `deliver` to `target` on `channel` could go out now (see
    /// `Channel::check_deliverable`).
    pub async fn check_deliverable(
        &self,
        channel: ChannelKind,
        target: &str,
    ) -> Result<(), ChannelError> {
        match self.get(channel) {
            Some(client) => client.check_deliverable(target).await,
            None => Err(ChannelError::NotConfigured(channel)),
        }
    }

    /// Whether a free-form message can reach `address` on `channel` now. False when the
    /// channel is not configured.
    pub async fn window_open(
        &self,
        channel: ChannelKind,
        address: &str,
    ) -> Result<bool, ChannelError> {
        match self.get(channel) {
            Some(client) => client.window_open(address).await,
            None => Ok(false),
        }
    }

    /// Whether a free-form WhatsApp message can reach `number` now (the user wrote within
    /// the last 24 hours). False when WhatsApp is not configured.
    pub async fn whatsapp_window_open(&self, number: &str) -> Result<bool, ChannelError> {
        self.window_open(ChannelKind::WhatsApp, number).await
    }
}

/// The one way personal ids (phone numbers, Talk actor ids, room tokens) appear in logs
/// and stored reasons: `…` and their last four characters, each kept only when it is an
/// ASCII letter or digit (anything else shows as `_`), so that the value can neither be
/// recovered nor forge a log line.
pub fn redact(value: &str) -> String {
    let n = value.chars().count();
    if n <= 4 {
        return "…".into();
    }
    let tail: String = value
        .chars()
        .skip(n - 4)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("…{tail}")
}

/// Writes `id` as one URL path segment: every byte outside RFC 3986's unreserved set is
/// percent-encoded, so `/`, `?`, `#` and `%` cannot leave the segment. `.` and `..` (and
/// empty ids) are refused: URL parsers resolve them, encoded or not.
pub fn path_segment(id: &str) -> Result<String, ChannelError> {
    if id.is_empty() || id == "." || id == ".." {
        return Err(ChannelError::Invalid(format!(
            "refusing {:?} as a URL path segment",
            redact(id)
        )));
    }
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wa(status: u16, code: i64) -> ChannelError {
        ChannelError::WhatsApp { status, code, message: String::new(), retry_after: None }
    }

    #[test]
    fn retry_delays_double_and_respect_the_pair_rate_limit_and_retry_after() {
        let policy = RetryPolicy::default();
        let server = wa(500, 1);
        assert_eq!(policy.delay(1, &server), Duration::from_secs(1));
        assert_eq!(policy.delay(3, &server), Duration::from_secs(4));
        assert_eq!(policy.delay(30, &server), Duration::from_secs(30));
        assert_eq!(policy.delay(1, &wa(400, 131056)), Duration::from_secs(6));
        let asked = ChannelError::Nextcloud {
            status: 503,
            reason: String::new(),
            retry_after: Some(Duration::from_secs(9)),
        };
        assert_eq!(
            policy.verdict(&asked),
            Verdict::Retry { at_least: Some(Duration::from_secs(9)) }
        );
        assert_eq!(policy.delay(1, &asked), Duration::from_secs(9));
        assert_eq!(policy.verdict(&wa(400, 131026)), Verdict::Stop);
    }

    #[test]
    fn retryable_errors() {
        assert!(wa(400, 130429).is_retryable());
        assert!(wa(400, 131056).is_retryable());
        assert!(wa(503, 0).is_retryable());
        assert!(!wa(400, 131026).is_retryable());
        assert!(wa(429, 0).is_retryable(), "a 429 without a Graph error code");
        assert!(!wa(429, 131048).is_retryable(), "the spam limit says stop");
        assert!(!wa(400, 0).is_retryable());
        assert!(!ChannelError::TokenExpired { code: 190, message: String::new() }.is_retryable());
        assert!(!ChannelError::OutsideWindow { detail: String::new() }.is_retryable());
        let nc =
            |status| ChannelError::Nextcloud { status, reason: String::new(), retry_after: None };
        assert!(nc(502).is_retryable());
        assert!(!nc(401).is_retryable());
    }

    /// Going on after any part sent gives the parts that came after it in the whole split,
    /// and each part's end points just past its text; nothing before the offset comes back.
    #[test]
    fn parts_after_a_sent_part_are_the_rest_of_the_split() {
        let text = "  Première phrase, assez longue. Deuxième phrase ici.\n\nUn paragraphe \
                    encore, avec é et 👋 dedans. Fin  ";
        let whole = split_message(text, 30);
        assert!(whole.len() >= 4, "{whole:?}");
        let all = parts_after(text, 0, 30).unwrap();
        assert_eq!(all.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), whole);
        for (k, (part, end)) in all.iter().enumerate() {
            assert_eq!(&text[end - part.len()..*end], part);
            let rest = parts_after(text, *end, 30).unwrap();
            assert_eq!(rest, all[k + 1..], "after part {k}");
        }
        // An offset that is not in this text, or inside a character, is refused.
        let emoji = text.find('👋').unwrap();
        for bad in [text.len() + 1, emoji + 1, usize::MAX] {
            assert!(matches!(parts_after(text, bad, 30), Err(ChannelError::Invalid(_))), "{bad}");
        }
        assert_eq!(parts_after(text, text.len(), 30).unwrap(), []);
    }

    #[test]
    fn redact_keeps_only_a_safe_tail() {
        assert_eq!(redact("16505551234"), "…1234");
        assert_eq!(redact("users/alice"), "…lice");
        assert_eq!(redact("abc"), "…");
        assert_eq!(redact("users/x\nINFO forged"), "…rged");
        assert_eq!(redact("users/mallory\n\r\u{1b}"), "…y___");
    }

    #[test]
    fn ids_stay_inside_one_path_segment() {
        assert_eq!(path_segment("n3xtc10ud").unwrap(), "n3xtc10ud");
        assert_eq!(path_segment("106540352242922").unwrap(), "106540352242922");
        assert_eq!(path_segment("../../../../evil?x=").unwrap(), "..%2F..%2F..%2F..%2Fevil%3Fx%3D");
        assert_eq!(path_segment("a b#c%2e").unwrap(), "a%20b%23c%252e");
        assert_eq!(path_segment("é").unwrap(), "%C3%A9");
        for bad in ["", ".", ".."] {
            assert!(path_segment(bad).is_err(), "{bad:?}");
        }
    }
}
