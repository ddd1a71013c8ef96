//! WhatsApp Cloud API: the webhook's wire types and signature check, turning a notification
//! into queue rows and delivery reports, and the Graph API client (send text with markup
//! and splitting, part by part from where an earlier try stopped, templates, mark-as-read
//! with typing indicator, retries). Knows nothing of axum or of models.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::SqlitePool;

use crate::channels::markup::markdown_to_whatsapp;
use crate::channels::split;
use crate::channels::{
    lenient, path_segment, redact, Channel, ChannelError, Contact as ChannelContact,
    DeliveryReceipt, Intake, Limits, Progress, QueuedInbound, RetryPolicy, SentPart,
};
use crate::config::WhatsAppSettings;
use crate::db::inbound::{self, QueueStatus};
use crate::db::now_ms;
use crate::domain::ChannelKind;

/// WhatsApp's limit for one text message body.
pub const MAX_TEXT_CHARS: usize = 4096;
/// Longer inbound messages get a short "too long" reply: a few thousand characters is
/// already minutes of prefill on a CPU, and WhatsApp users can send 65,536.
pub const MAX_INBOUND_CHARS: usize = 4_000;
/// Prefix of the `biz_opaque_callback_data` of an answer: the question's wamid follows.
pub const REPLY_TAG: &str = "my-claw:answer-to:";
/// How long one Graph API request may take before its answer is given up on (the message
/// may have been delivered then: see `ChannelError::DeliveryUnknown`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// WhatsApp shows the typing indicator for at most 25 s; it is renewed before that.
const TYPING_RENEWAL: Duration = Duration::from_secs(20);
/// The 24-hour customer service window.
pub const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;
/// Error codes worth retrying: throughput (130429), pair rate (131056), unknown and
/// service-unavailable (131000, 131016), app and WABA rate limits (4, 80007).
pub const RETRYABLE_CODES: &[i64] = &[130429, 131056, 131000, 131016, 4, 80007];
pub const PAIR_RATE_LIMIT: i64 = 131056;
pub const TOKEN_EXPIRED: i64 = 190;
pub const REENGAGEMENT: i64 = 131047;
/// How errors name the service (never with its URL, which holds the phone number id).
const GRAPH_API: &str = "the WhatsApp API";

/// Checks `X-Hub-Signature-256: sha256=<hex>` against HMAC-SHA256(app secret, raw body),
/// in constant time. The body must be the bytes exactly as received: Meta escapes
/// non-ASCII (`\u00e9`), so a re-serialised body would not match.
pub fn verify_signature(app_secret: &str, header: Option<&str>, body: &[u8]) -> bool {
    let Some(header) = header else {
        return false;
    };
    let Some(hex_digest) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time (and rejects a wrong length).
    mac.verify_slice(&expected).is_ok()
}

/// The header value Meta would send for `body` (used by tests and local tooling).
pub fn sign(app_secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).expect("HMAC accepts any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

// The notification envelope (`object`, `entry[].changes[].value`) is read member by
// member with `lenient` (see `WhatsApp::intakes`); these are the parts read with serde.

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub phone_number_id: Option<String>,
    #[serde(default)]
    pub display_phone_number: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Contact {
    #[serde(default)]
    pub wa_id: Option<String>,
    #[serde(default)]
    pub profile: Option<Profile>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    #[serde(default)]
    pub name: Option<String>,
}

/// One inbound message, as much of it as my-claw uses.
#[derive(Debug, Clone, Deserialize)]
pub struct IncomingMessage {
    pub from: String,
    pub id: String,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub text: Option<TextBody>,
    #[serde(default)]
    pub button: Option<ButtonReply>,
    #[serde(default)]
    pub interactive: Option<Interactive>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextBody {
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ButtonReply {
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Interactive {
    #[serde(default)]
    pub button_reply: Option<Choice>,
    #[serde(default)]
    pub list_reply: Option<Choice>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub title: Option<String>,
}

/// A delivery report of one of our messages (`value.statuses[]`).
#[derive(Debug, Clone, Deserialize)]
pub struct StatusReport {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub recipient_id: Option<String>,
    /// What we sent as `biz_opaque_callback_data` (see `REPLY_TAG`).
    #[serde(default)]
    pub biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    pub errors: Vec<GraphError>,
}

/// An error object, in status reports, in `value.errors[]` and in Graph API answers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GraphError {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub error_data: Option<ErrorData>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorData {
    #[serde(default)]
    pub details: Option<String>,
}

impl GraphError {
    /// `131047 Re-engagement message: Message failed to send because…`
    pub fn describe(&self) -> String {
        let mut text = match self.code {
            Some(code) => code.to_string(),
            None => "unknown".into(),
        };
        if let Some(title) = self.title.as_ref().or(self.message.as_ref()) {
            text.push(' ');
            text.push_str(title);
        }
        if let Some(details) = self.error_data.as_ref().and_then(|d| d.details.as_ref()) {
            text.push_str(": ");
            text.push_str(details);
        }
        text
    }
}

#[derive(Debug, Deserialize)]
struct GraphErrorEnvelope {
    error: GraphError,
}

#[derive(Debug, Deserialize)]
struct SendResponse {
    #[serde(default)]
    messages: Vec<SentMessage>,
}

#[derive(Debug, Deserialize)]
struct SentMessage {
    id: String,
}

/// What the queue stores for one inbound message: what the worker needs, already
/// classified, so that processing never re-parses Meta's envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    pub id: String,
    pub from: String,
    pub name: Option<String>,
    /// Meta's message type (`text`, `image`, `interactive`, …).
    pub kind: String,
    /// The text to answer; `None` for types my-claw cannot read.
    pub text: Option<String>,
    /// Why the message could not be read at all (see `QueuedInbound::unreadable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// How my-claw treats a message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handling {
    /// Text to answer (text, or the label of a tapped button or list item).
    Answer(String),
    /// Content my-claw cannot read yet: a polite reply says so.
    Unsupported,
    /// Not a message to answer (reactions, system notices, empty text).
    Ignore,
}

/// Classifies an inbound message.
pub fn handling(message: &IncomingMessage) -> Handling {
    let text = match message.kind.as_str() {
        "text" => message.text.as_ref().map(|t| t.body.clone()),
        "button" => message.button.as_ref().and_then(|b| b.text.clone()),
        "interactive" => message.interactive.as_ref().and_then(|i| {
            i.button_reply.as_ref().or(i.list_reply.as_ref()).and_then(|c| c.title.clone())
        }),
        "reaction" | "system" | "request_welcome" | "ephemeral" | "errors" => {
            return Handling::Ignore
        }
        _ => return Handling::Unsupported,
    };
    match text {
        Some(t) if !t.trim().is_empty() => Handling::Answer(t),
        _ => Handling::Ignore,
    }
}

/// The Graph API client and the channel's policy (allowed numbers, 24-hour window).
pub struct WhatsApp {
    settings: WhatsAppSettings,
    http: reqwest::Client,
    pool: SqlitePool,
    retry: RetryPolicy,
    request_timeout: Duration,
}

/// Shared between the messages endpoint's different bodies.
#[derive(Serialize)]
struct TextMessage<'a> {
    messaging_product: &'static str,
    recipient_type: &'static str,
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    text: TextContent<'a>,
    /// Echoed back by Meta in this message's status reports (see `REPLY_TAG`).
    #[serde(skip_serializing_if = "Option::is_none")]
    biz_opaque_callback_data: Option<&'a str>,
}

#[derive(Serialize)]
struct TextContent<'a> {
    preview_url: bool,
    body: &'a str,
}

#[derive(Serialize)]
struct ReadReceipt<'a> {
    messaging_product: &'static str,
    status: &'static str,
    message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    typing_indicator: Option<TypingIndicator>,
}

#[derive(Serialize)]
struct TypingIndicator {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    messaging_product: &'static str,
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    template: Template<'a>,
}

#[derive(Serialize)]
struct Template<'a> {
    name: &'a str,
    language: Language<'a>,
    components: Vec<Component>,
}

#[derive(Serialize)]
struct Language<'a> {
    code: &'a str,
}

#[derive(Serialize)]
struct Component {
    #[serde(rename = "type")]
    kind: &'static str,
    parameters: Vec<Parameter>,
}

#[derive(Serialize)]
struct Parameter {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
}

impl WhatsApp {
    pub fn new(settings: WhatsAppSettings, http: reqwest::Client, pool: SqlitePool) -> Self {
        Self {
            settings,
            http,
            pool,
            retry: RetryPolicy::default(),
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// Replaces the retry policy (tests use short delays).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Replaces `REQUEST_TIMEOUT` (tests wait less).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Says at start what will happen to incoming messages.
    pub fn log_configuration(&self) {
        if self.settings.allowed_numbers.is_empty() {
            tracing::warn!(
                "whatsapp: WHATSAPP_ALLOWED_NUMBERS is empty, every incoming message will be \
                 ignored; set it to your own number"
            );
        } else {
            tracing::info!(
                allowed = self.settings.allowed_numbers.len(),
                template = self.settings.template_name.is_some(),
                "whatsapp channel enabled"
            );
        }
    }

    /// Whether `number` may talk to the assistant. Numbers are compared on their digits
    /// only, so `+33 6 12…` in the setting matches Meta's `33612…`.
    pub fn is_allowed(&self, number: &str) -> bool {
        let wanted = digits(number);
        !wanted.is_empty() && self.settings.allowed_numbers.iter().any(|n| digits(n) == wanted)
    }

    /// Turns a verified notification into what to store: each message a queue row (its
    /// sender's number is the conversation; strangers' messages are kept without their
    /// content), each delivery report an update of our sent message. Every part is read on
    /// its own: an unreadable message (a lone surrogate, a deep nest, a wrong type) becomes a
    /// `rejected` row and its neighbours are kept, so Meta has no reason to redeliver the
    /// batch.
    pub fn intakes(&self, body: &[u8]) -> Result<Vec<Intake>, ChannelError> {
        let top = lenient::object_members(body)
            .map_err(|e| ChannelError::BadPayload(format!("not a notification: {e}")))?;
        let get = |key: &str| top.iter().find(|(k, _)| k.as_deref() == Some(key)).map(|m| m.1);
        let object = get("object").and_then(|v| serde_json::from_slice::<String>(v).ok());
        if object.as_deref() != Some("whatsapp_business_account") {
            tracing::info!(object = ?object, "whatsapp: ignoring a notification for another object");
            return Ok(Vec::new());
        }
        let mut intakes = Vec::new();
        let entries = match get("entry") {
            Some(raw) => lenient::array_items(raw)
                .map_err(|e| ChannelError::BadPayload(format!("entry: {e}")))?,
            None => Vec::new(),
        };
        for entry in entries {
            let changes = lenient::member(entry, "changes").map(lenient::array_items);
            let changes = match changes {
                Some(Ok(changes)) => changes,
                None => Vec::new(),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "whatsapp: unreadable changes of an entry, skipped");
                    continue;
                }
            };
            for change in changes {
                self.change_intakes(change, &mut intakes);
            }
        }
        Ok(intakes)
    }

    fn change_intakes(&self, change: &[u8], intakes: &mut Vec<Intake>) {
        let field =
            lenient::member(change, "field").and_then(|v| serde_json::from_slice::<String>(v).ok());
        if field.as_deref().is_some_and(|f| f != "messages") {
            tracing::debug!(field = ?field, "whatsapp: ignoring a change");
            return;
        }
        let Some(value) = lenient::member(change, "value") else { return };
        let part = |key: &str| lenient::member(value, key);
        let metadata: Option<Metadata> =
            part("metadata").and_then(|v| serde_json::from_slice(v).ok());
        let number_id = metadata.as_ref().and_then(|m| m.phone_number_id.as_deref());
        if number_id.is_some_and(|id| id != self.settings.phone_number_id) {
            // Another number of the same Meta app: not ours to answer (we would answer
            // from the wrong number).
            tracing::info!("whatsapp: ignoring a change for another phone number id");
            return;
        }
        let items = |key: &str| -> Vec<&[u8]> {
            part(key).and_then(|v| lenient::array_items(v).ok()).unwrap_or_default()
        };
        // Contacts only give display names: an unreadable one costs a name, nothing more.
        let contacts: Vec<Contact> =
            items("contacts").into_iter().filter_map(|c| serde_json::from_slice(c).ok()).collect();
        for raw in items("errors") {
            match serde_json::from_slice::<GraphError>(raw) {
                Ok(error) => {
                    tracing::warn!(error = ?error.describe(), "whatsapp: error notification")
                }
                Err(e) => tracing::warn!(
                    error = %lenient::describe_json_error(&e),
                    "whatsapp: unreadable error notification"
                ),
            }
        }
        for raw in items("statuses") {
            match serde_json::from_slice::<StatusReport>(raw) {
                Ok(status) => intakes.push(status_intake(&status)),
                Err(e) => tracing::warn!(
                    error = %lenient::describe_json_error(&e),
                    "whatsapp: unreadable status report, skipped"
                ),
            }
        }
        for raw in items("messages") {
            intakes.push(self.message_intake(raw, &contacts));
        }
    }

    fn message_intake(&self, raw: &[u8], contacts: &[Contact]) -> Intake {
        let message: IncomingMessage = match serde_json::from_slice(raw) {
            Ok(m) => m,
            Err(e) => {
                return self.unreadable_intake(raw, contacts, &lenient::describe_json_error(&e))
            }
        };
        if message.id.trim().is_empty() {
            // The id is the deduplication key: an empty one would make every later message
            // without an id look like a redelivery of this one, and be dropped unseen.
            return self.unreadable_intake(raw, contacts, "message without an id");
        }
        let name = contact_name(contacts, &message.from);
        if !self.is_allowed(&message.from) {
            // Recorded without its content: the row only says that it came and why it was
            // not answered (my-claw is single-user; strangers' messages are not kept).
            tracing::warn!(from = %redact(&message.from), "whatsapp: message from a number not in WHATSAPP_ALLOWED_NUMBERS, ignored");
            return Intake::Row {
                external_id: message.id,
                conversation_key: None,
                payload: "{}".into(),
                status: QueueStatus::Ignored,
                note: Some("sender not in WHATSAPP_ALLOWED_NUMBERS".into()),
                contact: None,
            };
        }
        let handling = handling(&message);
        let queued = QueuedMessage {
            id: message.id.clone(),
            from: message.from.clone(),
            name: name.clone(),
            kind: message.kind.clone(),
            text: match &handling {
                Handling::Answer(t) => Some(t.clone()),
                _ => None,
            },
            unreadable: None,
        };
        let payload = serde_json::to_string(&queued).unwrap_or_else(|_| "{}".into());
        let (status, note) = match handling {
            Handling::Ignore => (QueueStatus::Ignored, Some("not a message to answer".into())),
            _ => (QueueStatus::Pending, None),
        };
        let at_ms = message
            .timestamp
            .as_deref()
            .and_then(|t| t.parse::<i64>().ok())
            .map(|secs| secs.saturating_mul(1000))
            .filter(|ms| *ms > 0 && *ms <= now_ms() + 60_000)
            .unwrap_or_else(now_ms);
        Intake::Row {
            external_id: message.id,
            conversation_key: Some(message.from.clone()),
            payload,
            status,
            note,
            contact: Some(ChannelContact { address: message.from, display_name: name, at_ms }),
        }
    }

    /// A message of a batch that does not parse (or has no id). When its sender can still be
    /// read and is allowed, it is queued to be told (the person would otherwise wait for an
    /// answer that never comes), keyed on its wamid or, without one, on a digest of its
    /// bytes; otherwise it is stored as rejected, without content.
    fn unreadable_intake(&self, raw: &[u8], contacts: &[Contact], reason: &str) -> Intake {
        let string = |key: &str| {
            lenient::member(raw, key)
                .and_then(|v| serde_json::from_slice::<String>(v).ok())
                .filter(|s| !s.trim().is_empty())
        };
        let Some(from) = string("from") else {
            return rejected_intake(raw, reason);
        };
        if !self.is_allowed(&from) {
            return rejected_intake(raw, reason);
        }
        tracing::warn!(reason = ?reason, "whatsapp: an unreadable message from an allowed number, the sender is told");
        let id = string("id").unwrap_or_else(|| digest_key("no-id", raw));
        let queued = QueuedMessage {
            id: id.clone(),
            from: from.clone(),
            name: contact_name(contacts, &from),
            kind: string("type").unwrap_or_default(),
            text: None,
            unreadable: Some(format!("unreadable message: {reason}")),
        };
        Intake::Row {
            external_id: id,
            conversation_key: Some(from.clone()),
            payload: serde_json::to_string(&queued).unwrap_or_else(|_| "{}".into()),
            status: QueueStatus::Pending,
            note: None,
            // It was written now: it opens the 24-hour window like any message.
            contact: Some(ChannelContact {
                display_name: contact_name(contacts, &from),
                address: from,
                at_ms: now_ms(),
            }),
        }
    }

    /// When `number` last wrote (Unix milliseconds), if ever.
    pub async fn last_inbound_at(&self, number: &str) -> Result<Option<i64>, ChannelError> {
        Ok(inbound::last_inbound_at(&self.pool, ChannelKind::WhatsApp, &digits(number)).await?)
    }

    /// Whether the 24-hour customer service window is open for `number`.
    pub async fn window_open(&self, number: &str) -> Result<bool, ChannelError> {
        Ok(in_window(self.last_inbound_at(number).await?))
    }

    /// How a proactive message can reach `to` now, from one read of when they last wrote:
    /// free-form inside the 24-hour window, else through the approved template when one is
    /// configured, else the `OutsideWindow` error, which says how long ago that was.
    async fn proactive_route(&self, to: &str) -> Result<Route, ChannelError> {
        // The allow-list is who the assistant talks with, now: a job made for a number that
        // left it sends nothing (jobs are checked when made, the list may change since).
        if !self.is_allowed(to) {
            return Err(ChannelError::NotAllowed);
        }
        let last = self.last_inbound_at(to).await?;
        if in_window(last) {
            return Ok(Route::FreeForm);
        }
        if self.settings.template_name.is_some() {
            return Ok(Route::Template);
        }
        let detail = match last {
            Some(at) => format!("the user last wrote {} hours ago", (now_ms() - at) / 3_600_000),
            None => "the user never wrote to this number".into(),
        };
        Err(ChannelError::OutsideWindow {
            detail: format!("{detail}; set WHATSAPP_TEMPLATE_NAME to reach them"),
        })
    }

    /// Whether a proactive message can reach `to` now: an allowed number, inside the 24-hour
    /// window or with an approved template configured; else the error `deliver` would return.
    pub async fn check_deliverable(&self, to: &str) -> Result<(), ChannelError> {
        self.proactive_route(to).await.map(|_| ())
    }

    /// Sends a proactive message, the parts that follow `progress`: free-form inside the
    /// 24-hour window, else the approved template with the text as its one body parameter,
    /// else `OutsideWindow`. A message whose first parts went out free-form is not finished
    /// through the template (its parameter would repeat them): `OutsideWindow` then.
    pub async fn deliver(
        &self,
        to: &str,
        text: &str,
        progress: Progress<'_>,
    ) -> Result<DeliveryReceipt, ChannelError> {
        let (external_ids, via_template) = match self.proactive_route(to).await? {
            Route::FreeForm => (self.send_text_tagged(to, text, None, progress).await?, false),
            Route::Template if progress.at_start() => {
                let id = self.send_template(to, text).await?;
                // The template carries the whole text: nothing of it is left to send.
                let end = markdown_to_whatsapp(text).len();
                progress.log.record(&SentPart { external_id: id.clone(), end }).await?;
                (vec![id], true)
            }
            Route::Template => {
                return Err(ChannelError::OutsideWindow {
                    detail: "the window closed after the first parts of this message were \
                             sent; the rest waits in the conversation"
                        .into(),
                })
            }
        };
        Ok(DeliveryReceipt { channel: ChannelKind::WhatsApp, external_ids, via_template })
    }

    /// Sends `markdown` to `to` as WhatsApp text: converted to WhatsApp markup and split
    /// into messages of at most 4096 characters. Returns the wamid of each part. A part that
    /// fails stops the rest (sending later parts alone would not make sense).
    pub async fn send_text(&self, to: &str, markdown: &str) -> Result<Vec<String>, ChannelError> {
        self.send_text_tagged(to, markdown, None, Progress::unrecorded()).await
    }

    /// `send_text` for the answer to the inbound message `question` (its wamid), the parts
    /// that follow `progress`: every part carries `REPLY_TAG` + that wamid, which Meta echoes
    /// in the parts' status reports. If the process stops after Meta accepted a part but
    /// before we recorded it, its first status report still finds the answer (see
    /// `inbound::confirm_reply_delivery`).
    pub async fn send_reply(
        &self,
        to: &str,
        markdown: &str,
        question: &str,
        progress: Progress<'_>,
    ) -> Result<Vec<String>, ChannelError> {
        let tag = format!("{REPLY_TAG}{question}");
        // Meta takes at most 512 bytes; a wamid is far shorter, but never send a bad request.
        let tag = (tag.len() <= 512).then_some(tag);
        self.send_text_tagged(to, markdown, tag.as_deref(), progress).await
    }

    /// Sends the parts of `markdown` (in WhatsApp markup) that follow `progress`, each
    /// recorded in `progress.log` once Meta accepted it, before the next is sent.
    async fn send_text_tagged(
        &self,
        to: &str,
        markdown: &str,
        tag: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<Vec<String>, ChannelError> {
        let text = markdown_to_whatsapp(markdown);
        // A code block cut between two messages is closed and opened again around the cut.
        let parts = split::parts_after_keeping_code(&text, progress.sent_through, MAX_TEXT_CHARS)?;
        if parts.is_empty() && progress.at_start() {
            return Err(ChannelError::Invalid("refusing to send an empty message".into()));
        }
        let mut ids = Vec::with_capacity(parts.len());
        for (part, end) in parts {
            let body = TextMessage {
                messaging_product: "whatsapp",
                recipient_type: "individual",
                to,
                kind: "text",
                text: TextContent { preview_url: false, body: &part },
                biz_opaque_callback_data: tag,
            };
            let id = self.post_message(&body).await?;
            progress.log.record(&SentPart { external_id: id.clone(), end }).await?;
            ids.push(id);
        }
        tracing::info!(to = %redact(to), parts = ids.len(), resumed = !progress.at_start(), "whatsapp: message sent");
        Ok(ids)
    }

    /// Sends the approved template `WHATSAPP_TEMPLATE_NAME` (`name` or `name:language`,
    /// language `en_US` by default) with `text` as its `{{1}}` body parameter. Template
    /// parameters may not hold new lines or long space runs, and are kept short.
    pub async fn send_template(&self, to: &str, text: &str) -> Result<String, ChannelError> {
        let Some(setting) = &self.settings.template_name else {
            return Err(ChannelError::Invalid("WHATSAPP_TEMPLATE_NAME is not set".into()));
        };
        let (name, language) = match setting.split_once(':') {
            Some((name, language)) => (name, language),
            None => (setting.as_str(), "en_US"),
        };
        let flat = markdown_to_whatsapp(text).split_whitespace().collect::<Vec<_>>().join(" ");
        let mut parameter: String = flat.chars().take(1000).collect();
        if flat.chars().count() > 1000 {
            parameter.push('…');
        }
        let body = TemplateMessage {
            messaging_product: "whatsapp",
            to,
            kind: "template",
            template: Template {
                name,
                language: Language { code: language },
                components: vec![Component {
                    kind: "body",
                    parameters: vec![Parameter { kind: "text", text: parameter }],
                }],
            },
        };
        let id = self.post_message(&body).await?;
        tracing::info!(to = %redact(to), template = name, "whatsapp: template sent");
        Ok(id)
    }

    /// Marks `wamid` read and, with `typing`, shows the typing indicator (for at most 25 s
    /// or until we answer). Best effort: not retried.
    pub async fn mark_read(&self, wamid: &str, typing: bool) -> Result<(), ChannelError> {
        let body = ReadReceipt {
            messaging_product: "whatsapp",
            status: "read",
            message_id: wamid,
            typing_indicator: typing.then_some(TypingIndicator { kind: "text" }),
        };
        self.post_once(&body).await.map(|_| ())
    }

    /// Posts to `/{phone_number_id}/messages`, retrying transient failures with backoff
    /// (and the server's `Retry-After`), and returns the new message's wamid.
    async fn post_message<T: Serialize>(&self, body: &T) -> Result<String, ChannelError> {
        let response = crate::retry::run(
            "whatsapp: send",
            self.retry.max_attempts,
            self.retry.backoff(),
            || self.post_once(body),
            |e| self.retry.verdict(e),
        )
        .await?;
        let parsed: SendResponse = serde_json::from_str(&response).map_err(|e| {
            ChannelError::Invalid(format!(
                "whatsapp: unreadable send answer: {}",
                lenient::describe_json_error(&e)
            ))
        })?;
        match parsed.messages.into_iter().next() {
            Some(m) => Ok(m.id),
            None => Err(ChannelError::Invalid("whatsapp: send answer has no message id".into())),
        }
    }

    /// One POST; the body text on success, a classified error otherwise. The phone number
    /// id is written as one path segment whatever it holds.
    async fn post_once<T: Serialize>(&self, body: &T) -> Result<String, ChannelError> {
        let url = format!(
            "{}/{}/messages",
            self.settings.api_base,
            path_segment(&self.settings.phone_number_id)?
        );
        let response = self
            .http
            .post(url)
            .bearer_auth(self.settings.access_token.expose())
            .timeout(self.request_timeout)
            .json(body)
            .send()
            .await
            .map_err(|e| ChannelError::from_request(GRAPH_API, self.request_timeout, e))?;
        let status = response.status();
        let retry_after = crate::retry::retry_after_header(response.headers());
        let text = match response.text().await {
            Ok(text) => text,
            // Accepted, but the answer (with the new wamid) was lost on the way: delivered,
            // as far as Meta is concerned, so it must not be sent again.
            Err(e) if status.is_success() => {
                return Err(ChannelError::from_request(GRAPH_API, self.request_timeout, e))
            }
            // Refused: what the refusal said is lost, its status is enough to decide.
            Err(_) => String::new(),
        };
        if status.is_success() {
            return Ok(text);
        }
        Err(classify_error(status.as_u16(), &text, retry_after))
    }
}

impl Channel for WhatsApp {
    fn kind(&self) -> ChannelKind {
        ChannelKind::WhatsApp
    }

    fn limits(&self) -> Limits {
        Limits { max_inbound_chars: MAX_INBOUND_CHARS, max_outbound_chars: MAX_TEXT_CHARS }
    }

    fn log_configuration(&self) {
        WhatsApp::log_configuration(self)
    }

    fn is_allowed(&self, sender: &str) -> bool {
        WhatsApp::is_allowed(self, sender)
    }

    /// Meta's subscription handshake: the challenge, when the mode is `subscribe` and the
    /// verify token matches (compared in constant time).
    fn handshake(&self, params: &HashMap<String, String>) -> Result<String, ChannelError> {
        let mode = params.get("hub.mode").map(String::as_str);
        let token = params.get("hub.verify_token").map(String::as_str).unwrap_or_default();
        match (mode, params.get("hub.challenge")) {
            (Some("subscribe"), Some(challenge)) if self.settings.verify_token.matches(token) => {
                Ok(challenge.clone())
            }
            _ => Err(ChannelError::Invalid("wrong mode or verify token".into())),
        }
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let signature = headers.get("x-hub-signature-256").and_then(|v| v.to_str().ok());
        verify_signature(self.settings.app_secret.expose(), signature, body)
    }

    fn parse(&self, _headers: &HeaderMap, body: &[u8]) -> Result<Vec<Intake>, ChannelError> {
        self.intakes(body)
    }

    fn parse_queued(&self, payload: &str) -> Result<QueuedInbound, ChannelError> {
        let message: QueuedMessage = serde_json::from_str(payload).map_err(|e| {
            ChannelError::BadPayload(format!(
                "queued whatsapp message: {}",
                lenient::describe_json_error(&e)
            ))
        })?;
        Ok(QueuedInbound {
            external_id: message.id,
            conversation_key: message.from.clone(),
            sender_id: message.from,
            sender_name: message.name,
            text: message.text,
            unreadable: message.unreadable,
        })
    }

    fn acknowledge<'a>(
        &'a self,
        message: &'a QueuedInbound,
        typing: bool,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(self.mark_read(&message.external_id, typing))
    }

    fn typing_renewal(&self) -> Option<Duration> {
        Some(TYPING_RENEWAL)
    }

    fn reply<'a>(
        &'a self,
        message: &'a QueuedInbound,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, ChannelError>> {
        Box::pin(self.send_reply(&message.conversation_key, text, &message.external_id, progress))
    }

    fn deliver<'a>(
        &'a self,
        target: &'a str,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(WhatsApp::deliver(self, target, text, progress))
    }

    fn window_open<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<bool, ChannelError>> {
        Box::pin(WhatsApp::window_open(self, address))
    }

    fn check_deliverable<'a>(
        &'a self,
        address: &'a str,
    ) -> BoxFuture<'a, Result<(), ChannelError>> {
        Box::pin(WhatsApp::check_deliverable(self, address))
    }
}

/// How a proactive message goes out (`WhatsApp::proactive_route`).
enum Route {
    FreeForm,
    Template,
}

/// Whether a user who last wrote at `last` (Unix ms) is inside the 24-hour window.
fn in_window(last: Option<i64>) -> bool {
    last.is_some_and(|at| now_ms() - at < WINDOW_MS)
}

/// Turns a Graph API error answer into a `ChannelError`, keyed on `error.code` as Meta
/// advises (HTTP statuses are not specific).
pub fn classify_error(status: u16, body: &str, retry_after: Option<Duration>) -> ChannelError {
    let error = serde_json::from_str::<GraphErrorEnvelope>(body).map(|e| e.error).ok();
    let Some(error) = error else {
        let snippet: String = body.chars().take(200).collect();
        return ChannelError::WhatsApp { status, code: 0, message: snippet, retry_after };
    };
    let code = error.code.unwrap_or(0);
    let message = error.describe();
    match code {
        TOKEN_EXPIRED => ChannelError::TokenExpired { code, message },
        REENGAGEMENT => ChannelError::OutsideWindow { detail: message },
        _ => ChannelError::WhatsApp { status, code, message, retry_after },
    }
}

/// A delivery report as an update of our sent message.
fn status_intake(status: &StatusReport) -> Intake {
    let error = (status.status == "failed").then(|| {
        let described: Vec<String> = status.errors.iter().map(GraphError::describe).collect();
        if described.is_empty() {
            "failed (no error given)".to_string()
        } else {
            described.join("; ")
        }
    });
    if let Some(error) = &error {
        tracing::warn!(to = %redact(status.recipient_id.as_deref().unwrap_or("")), error = ?error, "whatsapp: message not delivered");
    }
    let in_reply_to = status
        .biz_opaque_callback_data
        .as_deref()
        .and_then(|data| data.strip_prefix(REPLY_TAG))
        .map(str::to_string);
    Intake::Delivery {
        external_id: status.id.clone(),
        status: status.status.clone(),
        error,
        in_reply_to,
    }
}

/// A message of a batch that cannot be read: recorded as `rejected`, without its content.
/// Its wamid keys the row when it can be read, so a redelivery is recognised; otherwise a
/// digest of its bytes does.
fn rejected_intake(raw: &[u8], reason: &str) -> Intake {
    let id = lenient::member(raw, "id")
        .and_then(|v| serde_json::from_slice::<String>(v).ok())
        .filter(|id| !id.trim().is_empty())
        .unwrap_or_else(|| digest_key("rejected", raw));
    tracing::warn!(reason = ?reason, "whatsapp: rejected an unreadable message of a batch");
    Intake::Row {
        external_id: id,
        conversation_key: None,
        payload: "{}".into(),
        status: QueueStatus::Rejected,
        note: Some(format!("unreadable message: {reason}")),
        contact: None,
    }
}

/// The key of a message without a usable wamid: `prefix:` and a digest of its bytes, so that
/// a redelivery of the same message is recognised and two different ones are not confused.
fn digest_key(prefix: &str, raw: &[u8]) -> String {
    use sha2::Digest;
    format!("{prefix}:{}", hex::encode(&Sha256::digest(raw)[..16]))
}

/// The display name Meta sent for `from` (or the batch's only contact).
fn contact_name(contacts: &[Contact], from: &str) -> Option<String> {
    contacts
        .iter()
        .find(|c| c.wa_id.as_deref() == Some(from))
        .or(contacts.first())
        .and_then(|c| c.profile.as_ref())
        .and_then(|p| p.name.clone())
}

fn digits(number: &str) -> String {
    number.chars().filter(char::is_ascii_digit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_vectors() {
        let check = |secret: &str, body: &[u8], expected: &str| {
            assert_eq!(sign(secret, body), expected);
            assert!(verify_signature(secret, Some(expected), body));
        };
        check(
            "secret",
            b"test",
            "sha256=0329a06b62cd16b33eb6792be8c60b158d89a2ee3a876fce9a881ebb488c0914",
        );
        check(
            "secret",
            b"{\"a\":1}",
            "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494",
        );
    }

    #[test]
    fn bad_signatures_are_rejected() {
        let good = "sha256=0329a06b62cd16b33eb6792be8c60b158d89a2ee3a876fce9a881ebb488c0914";
        assert!(!verify_signature("secret", None, b"test"));
        assert!(!verify_signature("secret", Some(""), b"test"));
        assert!(!verify_signature("secret", Some(&good[7..]), b"test"), "missing prefix");
        assert!(!verify_signature("secret", Some("sha256=zz"), b"test"));
        assert!(!verify_signature("secret", Some(&good[..good.len() - 2]), b"test"));
        assert!(!verify_signature("other", Some(good), b"test"));
        assert!(!verify_signature("secret", Some(good), b"test "));
        // Hex case does not matter.
        assert!(verify_signature(
            "secret",
            Some(&good.to_uppercase().replace("SHA256=", "sha256=")),
            b"test"
        ));
    }

    #[test]
    fn raw_body_passes_and_reserialised_body_fails() {
        let raw = "{\"text\":{\"body\":\"caf\\u00e9\"}}".as_bytes();
        let header = sign("s3cret", raw);
        assert!(verify_signature("s3cret", Some(&header), raw));
        let value: serde_json::Value = serde_json::from_slice(raw).unwrap();
        let reserialised = serde_json::to_vec(&value).unwrap();
        assert_ne!(reserialised, raw);
        assert!(!verify_signature("s3cret", Some(&header), &reserialised));
    }

    fn message(json: &str) -> IncomingMessage {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn message_handling() {
        let check = |json: &str, expected: Handling| assert_eq!(handling(&message(json)), expected);
        check(
            r#"{"from":"1","id":"w","type":"text","text":{"body":"hi"}}"#,
            Handling::Answer("hi".into()),
        );
        check(r#"{"from":"1","id":"w","type":"text","text":{"body":"  "}}"#, Handling::Ignore);
        check(r#"{"from":"1","id":"w","type":"image","image":{"id":"9"}}"#, Handling::Unsupported);
        check(
            r#"{"from":"1","id":"w","type":"audio","audio":{"voice":true}}"#,
            Handling::Unsupported,
        );
        check(r#"{"from":"1","id":"w","type":"unsupported"}"#, Handling::Unsupported);
        check(
            r#"{"from":"1","id":"w","type":"reaction","reaction":{"emoji":"😮"}}"#,
            Handling::Ignore,
        );
        check(
            r#"{"from":"1","id":"w","type":"interactive","interactive":{"type":"button_reply","button_reply":{"id":"x","title":"Yes"}}}"#,
            Handling::Answer("Yes".into()),
        );
        check(
            r#"{"from":"1","id":"w","type":"button","button":{"payload":"p","text":"Stop"}}"#,
            Handling::Answer("Stop".into()),
        );
    }

    #[test]
    fn graph_errors_are_classified_by_code() {
        let body = |code: i64| {
            format!(
                r#"{{"error":{{"message":"(#{code}) x","type":"OAuthException","code":{code},"error_data":{{"messaging_product":"whatsapp","details":"why"}},"fbtrace_id":"A"}}}}"#
            )
        };
        assert!(matches!(
            classify_error(401, &body(190), None),
            ChannelError::TokenExpired { code: 190, .. }
        ));
        match classify_error(400, &body(131047), None) {
            ChannelError::OutsideWindow { detail } => {
                assert!(detail.contains("131047") && detail.contains("why"))
            }
            other => panic!("unexpected {other:?}"),
        }
        let throttled = classify_error(400, &body(130429), Some(Duration::from_secs(3)));
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
        assert!(throttled.is_retryable());
        let gateway = classify_error(502, "<html>bad gateway</html>", None);
        assert!(gateway.is_retryable());
        assert!(!classify_error(400, &body(131026), None).is_retryable());
    }

    fn client(allowed: &[&str]) -> WhatsApp {
        let settings = WhatsAppSettings {
            verify_token: crate::config::Secret::new("v"),
            app_secret: crate::config::Secret::new("s"),
            access_token: crate::config::Secret::new("t"),
            phone_number_id: "106540352242922".into(),
            api_base: "http://127.0.0.1:9".into(),
            allowed_numbers: allowed.iter().map(|n| n.to_string()).collect(),
            template_name: None,
        };
        let pool = SqlitePool::connect_lazy("sqlite::memory:").expect("lazy pool");
        WhatsApp::new(settings, reqwest::Client::new(), pool)
    }

    fn rows(intakes: &[Intake]) -> Vec<(String, QueueStatus, Option<String>)> {
        intakes
            .iter()
            .filter_map(|i| match i {
                Intake::Row { external_id, status, conversation_key, .. } => {
                    Some((external_id.clone(), *status, conversation_key.clone()))
                }
                Intake::Delivery { .. } => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn meta_sample_parses() {
        let body = include_bytes!("../../tests/data/whatsapp_text.json");
        let intakes = client(&["16505551234"]).intakes(body).unwrap();
        let Intake::Row { payload, status, contact, conversation_key, .. } = &intakes[0] else {
            panic!("{intakes:?}")
        };
        assert_eq!(*status, QueueStatus::Pending);
        assert_eq!(conversation_key.as_deref(), Some("16505551234"));
        assert_eq!(contact.as_ref().unwrap().at_ms, 1_749_416_383_000);
        let queued: QueuedMessage = serde_json::from_str(payload).unwrap();
        assert_eq!(queued.text.as_deref(), Some("Does it come in another color? Café"));
        assert_eq!(queued.name.as_deref(), Some("Shéena Nelson"));
    }

    #[tokio::test]
    async fn one_bad_message_does_not_spoil_its_batch() {
        let good = |id: &str| {
            format!(
                r#"{{"from":"16505551234","id":"{id}","timestamp":"1749416383","type":"text","text":{{"body":"hi"}}}}"#
            )
        };
        let surrogate = r#"{"from":"16505551234","id":"wamid.SURR","type":"text","text":{"body":"bad \ud800 here"}}"#;
        let deep = format!(
            r#"{{"from":"16505551234","id":"wamid.DEEP","type":"text","text":{{"body":"x"}},"extra":{}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        let wrong_type =
            r#"{"from":33612345678,"id":"wamid.TYPE","type":"text","text":{"body":"x"}}"#;
        let no_id = r#"{"from":16505551234,"type":"text"}"#;
        let body = format!(
            r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"phone_number_id":"106540352242922"}},"contacts":[{{"wa_id":"16505551234","profile":{{"name":"\ud800"}}}}],"messages":[{},{},{},{},{},{}],"statuses":[{{"id":"wamid.OUT","status":"read"}},{{"id":7}}]}}}}]}}]}}"#,
            good("wamid.A"),
            surrogate,
            deep,
            wrong_type,
            no_id,
            good("wamid.B")
        );
        let intakes = client(&["16505551234"]).intakes(body.as_bytes()).unwrap();
        let rows = rows(&intakes);
        let key = Some("16505551234".to_string());
        assert_eq!(rows.len(), 6, "{rows:?}");
        assert_eq!(rows[0], ("wamid.A".into(), QueueStatus::Pending, key.clone()));
        // Unreadable, but its sender is readable and allowed: queued to be told so (the
        // worker records it as rejected once the reply is sent), without its content.
        assert_eq!(rows[1], ("wamid.SURR".into(), QueueStatus::Pending, key.clone()));
        let payload = intakes
            .iter()
            .find_map(|i| match i {
                Intake::Row { external_id, payload, .. } if external_id == "wamid.SURR" => {
                    Some(payload)
                }
                _ => None,
            })
            .expect("the unreadable message's row");
        let queued: QueuedMessage = serde_json::from_str(payload).unwrap();
        assert_eq!(queued.text, None);
        assert!(queued.unreadable.as_deref().unwrap().starts_with("unreadable message"));
        assert!(!payload.contains("here"), "{payload}");
        // A deep nest in a field my-claw does not read costs nothing: skipped, not parsed.
        assert_eq!(rows[2], ("wamid.DEEP".into(), QueueStatus::Pending, key.clone()));
        assert_eq!(rows[3], ("wamid.TYPE".into(), QueueStatus::Rejected, None));
        assert!(rows[4].0.starts_with("rejected:") && rows[4].1 == QueueStatus::Rejected);
        assert_eq!(rows[5], ("wamid.B".into(), QueueStatus::Pending, key));
        for intake in &intakes {
            if let Intake::Row {
                note: Some(note), status: QueueStatus::Rejected, payload, ..
            } = intake
            {
                assert!(!note.contains("33612345678") && !note.contains("16505551234"), "{note}");
                assert_eq!(payload, "{}");
            }
        }
        let deliveries = intakes.iter().filter(|i| matches!(i, Intake::Delivery { .. })).count();
        assert_eq!(deliveries, 1, "the unreadable status is skipped, the good one kept");
        // The same batch again gives the same keys (a redelivery is recognised).
        let again = client(&["16505551234"]).intakes(body.as_bytes()).unwrap();
        assert_eq!(self::rows(&again), rows);
        // Not JSON at all is still an error for the whole body.
        assert!(matches!(client(&[]).intakes(b"{not json"), Err(ChannelError::BadPayload(_))));
    }
}
