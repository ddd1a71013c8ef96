//! Messaging channels (WhatsApp Cloud API, Nextcloud Talk bots): their wire types, signature
//! checks, outbound clients, and the durable inbound queue worker that hands their messages
//! to the assistant. A channel knows its wire format and nothing about models; it does not
//! know axum either (the webhooks in `gateway/webhooks.rs` call into it).

pub mod markup;
pub mod nextcloud;
pub mod queue;
pub mod split;
pub mod whatsapp;

use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use tokio::sync::Notify;

use crate::assistant::Assistant;
use crate::config::{NextcloudSettings, WhatsAppSettings};
use crate::domain::ChannelKind;
use nextcloud::Nextcloud;
use whatsapp::WhatsApp;

/// The configured channels, handed to the gateway (webhooks) and to the scheduler (proactive
/// messages). `Default` is "no channel configured", which is what most tests use.
#[derive(Clone, Default)]
pub struct Channels {
    pub whatsapp: Option<Arc<WhatsApp>>,
    pub nextcloud: Option<Arc<Nextcloud>>,
    /// Wakes the inbound queue worker when a webhook has stored new messages.
    pub queue: Arc<Notify>,
}

/// What a channel accepted: its ids for the message parts it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReceipt {
    pub channel: ChannelKind,
    /// WhatsApp: one `wamid` per part. Talk: one `referenceId` per part (Talk answers with
    /// no message id, so ours is the handle).
    pub external_ids: Vec<String>,
    /// True when WhatsApp's 24-hour window was closed and the approved template was sent.
    pub via_template: bool,
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
    #[error("whatsapp api error {code} (http {status}): {message}")]
    WhatsApp { status: u16, code: i64, message: String },
    #[error("nextcloud talk answered http {status}: {reason}")]
    Nextcloud { status: u16, reason: String },
    #[error("http request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

impl ChannelError {
    /// Whether trying again later may succeed: throughput and pair rate limits, server
    /// errors, network failures. Expired tokens and the closed window never heal by retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ChannelError::WhatsApp { status, code, .. } => {
                *status >= 500 || whatsapp::RETRYABLE_CODES.contains(code)
            }
            ChannelError::Nextcloud { status, .. } => *status >= 500,
            ChannelError::Transport(e) => !e.is_builder() && !e.is_decode(),
            _ => false,
        }
    }
}

/// How outbound sends are retried. Production values are in `Default`; tests shorten them.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub max_attempts: u32,
    /// Delay before the second try; doubled each time, up to `max_delay`.
    pub base_delay: Duration,
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
    /// The wait after failed try number `attempt` (1-based).
    pub fn delay(&self, attempt: u32, error: &ChannelError) -> Duration {
        let exponent = attempt.saturating_sub(1).min(16);
        let backoff = self.base_delay.saturating_mul(1 << exponent).min(self.max_delay);
        match error {
            ChannelError::WhatsApp { code: whatsapp::PAIR_RATE_LIMIT, .. } => {
                backoff.max(self.pair_rate_delay)
            }
            _ => backoff,
        }
    }
}

impl Channels {
    /// Builds the clients of the configured channels. `http` is the shared client from
    /// `app.rs` (timeouts, user agent).
    pub fn from_settings(
        whatsapp: Option<&WhatsAppSettings>,
        nextcloud: Option<&NextcloudSettings>,
        http: reqwest::Client,
        pool: SqlitePool,
    ) -> Self {
        Self {
            whatsapp: whatsapp
                .map(|s| Arc::new(WhatsApp::new(s.clone(), http.clone(), pool.clone()))),
            nextcloud: nextcloud.map(|s| Arc::new(Nextcloud::new(s.clone(), http.clone()))),
            queue: Arc::new(Notify::new()),
        }
    }

    /// `from_settings`, then starts the inbound queue worker (which first recovers messages
    /// left pending by a previous run). The one call `app.rs` makes.
    pub fn start(
        whatsapp: Option<&WhatsAppSettings>,
        nextcloud: Option<&NextcloudSettings>,
        http: reqwest::Client,
        pool: SqlitePool,
        assistant: Arc<Assistant>,
    ) -> Self {
        let channels = Self::from_settings(whatsapp, nextcloud, http, pool.clone());
        if let Some(wa) = &channels.whatsapp {
            wa.log_configuration();
        }
        if let Some(nc) = &channels.nextcloud {
            nc.log_configuration();
        }
        // Without any channel there is nothing to answer with; rows left by an earlier
        // configuration stay pending until a channel is configured again.
        if channels.whatsapp.is_some() || channels.nextcloud.is_some() {
            queue::spawn_worker(pool, assistant, channels.clone());
        }
        channels
    }

    /// Tells the queue worker that new messages are waiting.
    pub fn wake_worker(&self) {
        self.queue.notify_one();
    }

    /// Sends a message the assistant writes by itself (cron jobs). `target` is a phone
    /// number for WhatsApp and a room token for Talk. On WhatsApp, outside the 24-hour
    /// window the approved template (`WHATSAPP_TEMPLATE_NAME`) is sent instead, or
    /// `OutsideWindow` is returned when there is none.
    pub async fn deliver(
        &self,
        channel: ChannelKind,
        target: &str,
        text: &str,
    ) -> Result<DeliveryReceipt, ChannelError> {
        match channel {
            ChannelKind::WhatsApp => {
                let wa = self.whatsapp.as_ref().ok_or(ChannelError::NotConfigured(channel))?;
                wa.deliver(target, text).await
            }
            ChannelKind::Nextcloud => {
                let nc = self.nextcloud.as_ref().ok_or(ChannelError::NotConfigured(channel))?;
                let external_ids = nc.send_message(target, text, None).await?;
                Ok(DeliveryReceipt { channel, external_ids, via_template: false })
            }
            ChannelKind::WebChat => Err(ChannelError::NotDeliverable(channel)),
        }
    }

    /// Whether a free-form WhatsApp message can reach `number` now (the user wrote within
    /// the last 24 hours). False when WhatsApp is not configured.
    pub async fn whatsapp_window_open(&self, number: &str) -> Result<bool, ChannelError> {
        match &self.whatsapp {
            Some(wa) => wa.window_open(number).await,
            None => Ok(false),
        }
    }
}

/// The last four characters of an address or id, for logs: phone numbers and room tokens
/// are personal data and capabilities, so logs never carry them whole.
pub fn redact(value: &str) -> String {
    let n = value.chars().count();
    if n <= 4 {
        return "…".into();
    }
    let tail: String = value.chars().skip(n - 4).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_and_respect_the_pair_rate_limit() {
        let policy = RetryPolicy::default();
        let server = ChannelError::WhatsApp { status: 500, code: 1, message: String::new() };
        assert_eq!(policy.delay(1, &server), Duration::from_secs(1));
        assert_eq!(policy.delay(3, &server), Duration::from_secs(4));
        assert_eq!(policy.delay(30, &server), Duration::from_secs(30));
        let pair = ChannelError::WhatsApp { status: 400, code: 131056, message: String::new() };
        assert_eq!(policy.delay(1, &pair), Duration::from_secs(6));
    }

    #[test]
    fn retryable_errors() {
        let wa = |status, code| ChannelError::WhatsApp { status, code, message: String::new() };
        assert!(wa(400, 130429).is_retryable());
        assert!(wa(400, 131056).is_retryable());
        assert!(wa(503, 0).is_retryable());
        assert!(!wa(400, 131026).is_retryable());
        assert!(!ChannelError::TokenExpired { code: 190, message: String::new() }.is_retryable());
        assert!(!ChannelError::OutsideWindow { detail: String::new() }.is_retryable());
        let nc = |status| ChannelError::Nextcloud { status, reason: String::new() };
        assert!(nc(502).is_retryable());
        assert!(!nc(401).is_retryable());
    }

    #[test]
    fn redact_keeps_only_the_tail() {
        assert_eq!(redact("16505551234"), "…1234");
        assert_eq!(redact("abc"), "…");
    }
}
