//! Nextcloud Talk bots: the webhook's Activity Streams wire types and signature check,
//! turning a verified activity into queue rows, rendering rich-object messages, and the bot
//! API client that posts signed replies (part by part, from where an earlier try stopped).
//! Knows nothing of axum or of models.

use std::time::Duration;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use rand::distr::{Alphanumeric, SampleString};
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::channels::{
    lenient, parts_after, path_segment, redact, Channel, ChannelError, DeliveryReceipt, Intake,
    Limits, Progress, QueuedInbound, RetryPolicy, SentPart,
};
use crate::config::NextcloudSettings;
use crate::db::inbound::QueueStatus;
use crate::domain::ChannelKind;

/// Talk's default maximum message length (`spreed → config → chat → max-length`).
pub const MAX_MESSAGE_CHARS: usize = 32_000;
/// How long one bot API request may take before its answer is given up on (the message may
/// have been posted then: see `ChannelError::DeliveryUnknown`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How errors name the service (never with its URL, which holds the room token).
const TALK_API: &str = "the Nextcloud Talk bot API";
/// The limit of Talk before 16.0.1, used when a server answers 413 to a long part.
pub const LEGACY_MAX_MESSAGE_CHARS: usize = 1_000;

/// The shortest `X-Nextcloud-Talk-Random` accepted. Nextcloud always sends 64 characters,
/// and refuses a bot's own random under 32; a short or empty one adds nothing unpredictable
/// to the signed bytes, so a signature made once would be easier to replay or forge.
pub const MIN_RANDOM_CHARS: usize = 32;

/// Checks `X-Nextcloud-Talk-Signature` = hex HMAC-SHA256(secret, random ‖ raw body), in
/// constant time, with a random of at least `MIN_RANDOM_CHARS`. Upper- and lowercase hex
/// are both accepted (Nextcloud's own verifier lowercases). The body must be the bytes as
/// received: PHP escapes `/` and non-ASCII.
pub fn verify_signature(secret: &str, random: &str, signature: &str, body: &[u8]) -> bool {
    if random.chars().count() < MIN_RANDOM_CHARS {
        return false;
    }
    let Ok(expected) = hex::decode(signature.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(random.as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Lowercase hex HMAC-SHA256(secret, random ‖ message): the incoming webhook signature
/// (message = raw body) and the outgoing one (message = the `message` text, not the JSON).
pub fn sign(secret: &str, random: &str, message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key");
    mac.update(random.as_bytes());
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// An Activity Streams 2.0 webhook payload. Only what my-claw uses; unknown fields and
/// unknown activity types are accepted and ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Activity {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub actor: Option<Actor>,
    #[serde(default)]
    pub object: Option<Object>,
    #[serde(default)]
    pub target: Option<Target>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Actor {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// `users/<uid>`, `guests/<hash>`, `bots/bot-<sha1>`, …
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Object {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The message id (digits) for a `Note`; the room token for `Join`/`Leave`.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// A JSON string `{message, parameters}` to decode a second time.
    #[serde(default)]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    /// The conversation token, needed to reply.
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// The decoded `object.content` of a chat message.
#[derive(Debug, Clone, Deserialize)]
struct RichMessage {
    #[serde(default)]
    message: String,
    /// An object of rich objects; PHP encodes an empty one as `[]`, hence `Value`.
    #[serde(default)]
    parameters: serde_json::Value,
}

/// What the queue stores for one Talk message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// Talk message id (digits), for `replyTo`.
    pub message_id: String,
    /// Room token.
    pub token: String,
    pub actor_id: String,
    pub actor_name: Option<String>,
    /// The rendered text.
    pub text: String,
}

/// Parses a webhook body (after the signature was checked). The error never quotes the
/// body.
pub fn parse_activity(body: &[u8]) -> Result<Activity, ChannelError> {
    serde_json::from_slice(body).map_err(|e| {
        ChannelError::BadPayload(format!("not an activity: {}", lenient::describe_json_error(&e)))
    })
}

/// Decodes `object.content` and renders its `{placeholders}` from the rich-object
/// parameters: mentions become `@name`, files and other objects their name. Content that is
/// not the expected JSON is used as it is.
pub fn render_content(content: &str) -> String {
    let Ok(rich) = serde_json::from_str::<RichMessage>(content) else {
        return content.to_string();
    };
    let params = rich.parameters.as_object();
    let mut out = String::with_capacity(rich.message.len());
    let mut rest = rich.message.as_str();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let key = &after[..close];
        match params.and_then(|p| p.get(key)) {
            Some(object) => out.push_str(&render_object(key, object)),
            None => {
                out.push('{');
                out.push_str(key);
                out.push('}');
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

fn render_object(key: &str, object: &serde_json::Value) -> String {
    let kind = object.get("type").and_then(|t| t.as_str()).unwrap_or_default();
    let name = object
        .get("name")
        .and_then(|n| n.as_str())
        .or_else(|| object.get("id").and_then(|i| i.as_str()))
        .unwrap_or(key);
    let is_mention = key.starts_with("mention-")
        || matches!(
            kind,
            "user" | "guest" | "call" | "user-group" | "group" | "email" | "circle" | "team"
        );
    if is_mention {
        format!("@{name}")
    } else {
        name.to_string()
    }
}

/// The Talk bot client.
pub struct Nextcloud {
    settings: NextcloudSettings,
    http: reqwest::Client,
    retry: RetryPolicy,
    request_timeout: Duration,
}

#[derive(Serialize)]
struct BotMessage<'a> {
    message: &'a str,
    #[serde(rename = "replyTo", skip_serializing_if = "Option::is_none")]
    reply_to: Option<i64>,
    #[serde(rename = "referenceId")]
    reference_id: &'a str,
}

impl Nextcloud {
    pub fn new(settings: NextcloudSettings, http: reqwest::Client) -> Self {
        Self { settings, http, retry: RetryPolicy::default(), request_timeout: REQUEST_TIMEOUT }
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

    pub fn log_configuration(&self) {
        tracing::info!(
            restricted = self.settings.allowed_users.is_some(),
            "nextcloud talk channel enabled"
        );
    }

    /// Whether `actor_id` (`users/alice`) may talk to the assistant; everyone when
    /// `NEXTCLOUD_ALLOWED_USERS` is unset.
    pub fn is_allowed(&self, actor_id: &str) -> bool {
        match &self.settings.allowed_users {
            None => true,
            Some(users) => users.iter().any(|u| u == actor_id),
        }
    }

    /// What a verified activity carries, to store. `random` is the request's
    /// `X-Nextcloud-Talk-Random`, unique per delivery: it keys the rows of events that have
    /// no message id (`Join`/`Leave`).
    pub fn intakes(&self, activity: &Activity, random: &str) -> Vec<Intake> {
        match activity.kind.as_str() {
            "Create" => self.message_intake(activity).into_iter().collect(),
            "Join" | "Leave" => {
                // Recorded as `done` rows: they need no answer, and the row is the trace of
                // when the bot was added to or removed from a conversation.
                let room = activity.object.as_ref().and_then(|o| o.id.clone()).unwrap_or_default();
                let name = activity.object.as_ref().and_then(|o| o.name.clone());
                tracing::info!(event = ?activity.kind, room = %redact(&room), "nextcloud: bot membership changed");
                let payload =
                    serde_json::json!({"type": activity.kind, "token": room, "name": name})
                        .to_string();
                let note = if activity.kind == "Join" {
                    "bot enabled in the conversation"
                } else {
                    "bot removed from the conversation"
                };
                vec![Intake::Row {
                    external_id: format!("{}:{}", activity.kind.to_ascii_lowercase(), random),
                    conversation_key: None,
                    payload,
                    status: QueueStatus::Done,
                    note: Some(note.into()),
                    contact: None,
                }]
            }
            other => {
                tracing::debug!(kind = ?other, "nextcloud: ignoring an activity");
                Vec::new()
            }
        }
    }

    fn message_intake(&self, activity: &Activity) -> Option<Intake> {
        let (Some(actor), Some(object), Some(target)) =
            (&activity.actor, &activity.object, &activity.target)
        else {
            tracing::warn!("nextcloud: Create without actor, object or target, ignored");
            return None;
        };
        if actor.id.starts_with("bots/") {
            // Talk does not send bots' messages to bots, but a loop between two bots must
            // never start here.
            tracing::debug!("nextcloud: ignoring a message from a bot");
            return None;
        }
        let Some(message_id) = object.id.clone().filter(|id| !id.is_empty()) else {
            tracing::warn!("nextcloud: message without id, ignored");
            return None;
        };
        if !self.is_allowed(&actor.id) {
            tracing::warn!(actor = %redact(&actor.id), "nextcloud: actor not in NEXTCLOUD_ALLOWED_USERS, ignored");
            return Some(Intake::Row {
                external_id: message_id,
                conversation_key: None,
                payload: "{}".into(),
                status: QueueStatus::Ignored,
                note: Some("actor not in NEXTCLOUD_ALLOWED_USERS".into()),
                contact: None,
            });
        }
        let text = render_content(object.content.as_deref().unwrap_or_default());
        let queued = QueuedMessage {
            message_id: message_id.clone(),
            token: target.id.clone(),
            actor_id: actor.id.clone(),
            actor_name: actor.name.clone(),
            text: text.clone(),
        };
        let payload = serde_json::to_string(&queued).unwrap_or_else(|_| "{}".into());
        let (status, note) = if text.trim().is_empty() {
            (QueueStatus::Ignored, Some("empty message".into()))
        } else {
            (QueueStatus::Pending, None)
        };
        Some(Intake::Row {
            external_id: message_id,
            conversation_key: Some(target.id.clone()),
            payload,
            status,
            note,
            contact: None,
        })
    }

    /// Posts `text` to the room `token`, split into parts Talk accepts, the first one as a
    /// reply to `reply_to`. Returns the `referenceId` of each part.
    pub async fn send_message(
        &self,
        token: &str,
        text: &str,
        reply_to: Option<i64>,
    ) -> Result<Vec<String>, ChannelError> {
        self.send_parts(token, text, reply_to, Progress::unrecorded()).await
    }

    /// `send_message` for the parts of `text` that follow `progress`, each recorded in
    /// `progress.log` once Talk accepted it, before the next is sent. Only the message's
    /// first part replies to `reply_to`: a part after one sent by an earlier try does not.
    pub async fn send_parts(
        &self,
        token: &str,
        text: &str,
        reply_to: Option<i64>,
        progress: Progress<'_>,
    ) -> Result<Vec<String>, ChannelError> {
        let parts = parts_after(text, progress.sent_through, MAX_MESSAGE_CHARS)?;
        if parts.is_empty() && progress.at_start() {
            return Err(ChannelError::Invalid("refusing to send an empty message".into()));
        }
        let mut references = Vec::with_capacity(parts.len());
        for (i, (part, end)) in parts.iter().enumerate() {
            let reply_to = if i == 0 && progress.at_start() { reply_to } else { None };
            match self.post_part(token, part, reply_to).await {
                Ok(reference) => {
                    progress
                        .log
                        .record(&SentPart { external_id: reference.clone(), end: *end })
                        .await?;
                    references.push(reference);
                }
                Err(ChannelError::Nextcloud { status: 413, .. })
                    if part.chars().count() > LEGACY_MAX_MESSAGE_CHARS =>
                {
                    // The server's limit is lower than the current default (old Talk or a
                    // custom setting): send the part again in smaller pieces. Each piece is
                    // recorded with where it ends in `text`, so a later try goes on after the
                    // last piece sent, whatever size it then cuts at.
                    tracing::warn!(
                        "nextcloud: message too long for this server, splitting to 1000 characters"
                    );
                    let start = end - part.len();
                    let pieces = parts_after(part, 0, LEGACY_MAX_MESSAGE_CHARS)?;
                    for (j, (piece, piece_end)) in pieces.iter().enumerate() {
                        let reply_to = if j == 0 { reply_to } else { None };
                        let reference = self.post_part(token, piece, reply_to).await?;
                        let sent =
                            SentPart { external_id: reference.clone(), end: start + piece_end };
                        progress.log.record(&sent).await?;
                        references.push(reference);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(room = %redact(token), parts = references.len(), resumed = !progress.at_start(), "nextcloud: message sent");
        Ok(references)
    }

    /// Posts one part, as a reply to `reply_to` when there is one. Talk answers 400 to a
    /// `replyTo` that names no message of the room: the question expired (a room with
    /// message expiration) or its history was cleared while the answer was written or
    /// waited out an outage. The answer is then posted without the reply link, once, rather
    /// than lost: the other reasons for a 400 (an empty message, bad signature headers)
    /// cannot hold for what this client sends.
    async fn post_part(
        &self,
        token: &str,
        message: &str,
        reply_to: Option<i64>,
    ) -> Result<String, ChannelError> {
        match self.post_with_retry(token, message, reply_to).await {
            Err(ChannelError::Nextcloud { status: 400, .. }) if reply_to.is_some() => {
                tracing::warn!(
                    room = %redact(token),
                    "nextcloud: the message answered is gone (expired or history cleared), \
                     sending the answer without replying to it"
                );
                self.post_with_retry(token, message, None).await
            }
            other => other,
        }
    }

    async fn post_with_retry(
        &self,
        token: &str,
        message: &str,
        reply_to: Option<i64>,
    ) -> Result<String, ChannelError> {
        crate::retry::run(
            "nextcloud: send",
            self.retry.max_attempts,
            self.retry.backoff(),
            || self.post_once(token, message, reply_to),
            |e| self.retry.verdict(e),
        )
        .await
    }

    /// One signed POST to the bot API. A fresh random and reference id per try. The room
    /// token comes from a webhook: it is written as one path segment, whatever it holds.
    async fn post_once(
        &self,
        token: &str,
        message: &str,
        reply_to: Option<i64>,
    ) -> Result<String, ChannelError> {
        let url = format!(
            "{}/ocs/v2.php/apps/spreed/api/v1/bot/{}/message",
            self.settings.url,
            path_segment(token)?
        );
        // The thread-local generator is not `Send`: use it in this statement only.
        let random = Alphanumeric.sample_string(&mut rand::rng(), 64);
        let reference_id = hex::encode(rand::random::<[u8; 32]>());
        let signature = sign(self.settings.bot_secret.expose(), &random, message.as_bytes());
        let body = BotMessage { message, reply_to, reference_id: &reference_id };
        let response = self
            .http
            .post(url)
            .header("OCS-APIRequest", "true")
            .header(reqwest::header::ACCEPT, "application/json")
            .header("X-Nextcloud-Talk-Bot-Random", &random)
            .header("X-Nextcloud-Talk-Bot-Signature", &signature)
            .timeout(self.request_timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| ChannelError::from_request(TALK_API, self.request_timeout, e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(reference_id);
        }
        let retry_after = crate::retry::retry_after_header(response.headers());
        Err(ChannelError::Nextcloud {
            status,
            reason: explain_status(status).to_string(),
            retry_after,
        })
    }
}

impl Channel for Nextcloud {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Nextcloud
    }

    fn limits(&self) -> Limits {
        Limits { max_inbound_chars: MAX_MESSAGE_CHARS, max_outbound_chars: MAX_MESSAGE_CHARS }
    }

    fn log_configuration(&self) {
        Nextcloud::log_configuration(self)
    }

    fn is_allowed(&self, sender: &str) -> bool {
        Nextcloud::is_allowed(self, sender)
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match (header("x-nextcloud-talk-random"), header("x-nextcloud-talk-signature")) {
            (Some(random), Some(signature)) => {
                verify_signature(self.settings.bot_secret.expose(), random, signature, body)
            }
            _ => false,
        }
    }

    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<Vec<Intake>, ChannelError> {
        let random = headers
            .get("x-nextcloud-talk-random")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Ok(self.intakes(&parse_activity(body)?, random))
    }

    fn parse_queued(&self, payload: &str) -> Result<QueuedInbound, ChannelError> {
        let message: QueuedMessage = serde_json::from_str(payload).map_err(|e| {
            ChannelError::BadPayload(format!(
                "queued talk message: {}",
                lenient::describe_json_error(&e)
            ))
        })?;
        Ok(QueuedInbound {
            external_id: message.message_id,
            conversation_key: message.token,
            sender_id: message.actor_id,
            sender_name: message.actor_name,
            text: Some(message.text),
            unreadable: None,
        })
    }

    fn reply<'a>(
        &'a self,
        message: &'a QueuedInbound,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Vec<String>, ChannelError>> {
        let reply_to = message.external_id.parse::<i64>().ok();
        Box::pin(self.send_parts(&message.conversation_key, text, reply_to, progress))
    }

    fn deliver<'a>(
        &'a self,
        target: &'a str,
        text: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<DeliveryReceipt, ChannelError>> {
        Box::pin(async move {
            let external_ids = self.send_parts(target, text, None, progress).await?;
            Ok(DeliveryReceipt {
                channel: ChannelKind::Nextcloud,
                external_ids,
                via_template: false,
            })
        })
    }
}

/// What a bot API status means for the operator (from Talk's BotController).
pub fn explain_status(status: u16) -> &'static str {
    match status {
        400 => "rejected: empty message, invalid replyTo or bad signature headers",
        401 => {
            "bot not accepted: NEXTCLOUD_BOT_SECRET does not match, or the bot is not enabled \
             in this conversation with the response feature (occ talk:bot:setup)"
        }
        404 => "conversation not found (the room was deleted or the token is wrong)",
        413 => "message too long for this server",
        429 => {
            "throttled by Nextcloud's brute-force protection after failed attempts; \
             check NEXTCLOUD_BOT_SECRET, then wait"
        }
        500..=599 => "server error",
        _ => "unexpected status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const RANDOM: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn protocol_vectors() {
        let incoming = "f8a338bae8bec17f11d33e710399653974bfbf79f920d4af341961d867932070";
        assert_eq!(sign(SECRET, RANDOM, b"{\"type\":\"Create\"}"), incoming);
        assert!(verify_signature(SECRET, RANDOM, incoming, b"{\"type\":\"Create\"}"));
        assert!(verify_signature(
            SECRET,
            RANDOM,
            &incoming.to_uppercase(),
            b"{\"type\":\"Create\"}"
        ));
        assert_eq!(
            sign(SECRET, RANDOM, "Bonjour 👋".as_bytes()),
            "a84642a1195a7d18abf1a72321e7151b2c609860432dee46285065a87ff7d610"
        );
        assert_eq!(
            sign(SECRET, RANDOM, "👍".as_bytes()),
            "ebfabdc69501e5bb5bbfe5d70d1ed66b36649445d485027fc4478b02e0a4f40c"
        );
        assert_eq!(
            sign(SECRET, RANDOM, b"n3xtc10ud"),
            "72efeba5558f0971ca2120103a9bf927d5498186c70eeb1c5f85f869885b6fbf"
        );
    }

    #[test]
    fn bad_signatures_are_rejected() {
        let body = b"{\"type\":\"Create\"}";
        let good = sign(SECRET, RANDOM, body);
        assert!(!verify_signature(SECRET, RANDOM, "", body));
        assert!(!verify_signature(SECRET, RANDOM, "not hex", body));
        assert!(!verify_signature(SECRET, RANDOM, &good[..62], body));
        assert!(!verify_signature(SECRET, &RANDOM[1..], &good, body));
        // Correctly signed, but with a random shorter than Nextcloud's floor.
        for random in ["", "x", &RANDOM[..31]] {
            let signature = sign(SECRET, random, body);
            assert!(!verify_signature(SECRET, random, &signature, body), "{random:?}");
        }
        let signature = sign(SECRET, &RANDOM[..32], body);
        assert!(verify_signature(SECRET, &RANDOM[..32], &signature, body));
        assert!(!verify_signature(&SECRET[1..], RANDOM, &good, body));
        assert!(!verify_signature(SECRET, RANDOM, &good, b"{\"type\":\"Create\"} "));
    }

    #[test]
    fn php_escaped_body_must_be_checked_raw() {
        let raw = include_bytes!("../../tests/data/nextcloud_create.json");
        let signature = sign(SECRET, RANDOM, raw);
        assert!(verify_signature(SECRET, RANDOM, &signature, raw));
        let value: serde_json::Value = serde_json::from_slice(raw).unwrap();
        let reserialised = serde_json::to_vec(&value).unwrap();
        assert!(!verify_signature(SECRET, RANDOM, &signature, &reserialised));
    }

    #[test]
    fn content_rendering() {
        let check = |content: &str, expected: &str| assert_eq!(render_content(content), expected);
        check(
            r#"{"message":"hi {mention-call1} !","parameters":{"mention-call1":{"type":"call","id":"n3xtc10ud","name":"world","call-type":"group"}}}"#,
            "hi @world !",
        );
        check(
            r#"{"message":"{mention-user1} look at {file}","parameters":{"mention-user1":{"type":"user","id":"ada","name":"Ada Lovelace"},"file":{"type":"file","id":"42","name":"notes.md"}}}"#,
            "@Ada Lovelace look at notes.md",
        );
        check(r#"{"message":"plain {unknown} {x","parameters":[]}"#, "plain {unknown} {x");
        check(r#"{"message":"caf\u00e9 5\/6","parameters":[]}"#, "café 5/6");
        check("not json", "not json");
    }

    #[test]
    fn sample_payloads_parse() {
        let create =
            parse_activity(include_bytes!("../../tests/data/nextcloud_create.json")).unwrap();
        assert_eq!(create.kind, "Create");
        assert_eq!(create.actor.as_ref().unwrap().id, "users/ada-lovelace");
        assert_eq!(create.target.as_ref().unwrap().id, "n3xtc10ud");
        let text = render_content(create.object.as_ref().unwrap().content.as_deref().unwrap());
        assert_eq!(text, "hi @world, café at 5/6 ? see notes.md");
        let join = parse_activity(include_bytes!("../../tests/data/nextcloud_join.json")).unwrap();
        assert_eq!(join.kind, "Join");
        assert!(join.target.is_none());
    }
}
