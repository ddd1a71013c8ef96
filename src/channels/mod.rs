//! Outbound channel clients (WhatsApp Graph API, Nextcloud Talk bot API) and their wire
//! types. A channel knows its wire format (parse, verify, send) and nothing about models.

/// The configured channels, handed to the gateway and the scheduler.
#[derive(Clone, Default)]
pub struct Channels {}
