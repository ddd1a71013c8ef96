//! Plain domain types shared by every layer: chat turns, inbound messages, ids.
//! Nothing here knows a wire format; these types are deliberately not `Serialize`.

use std::fmt;

/// Who said a turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One turn of a conversation as the models see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
}

impl ChatTurn {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }
}

/// Where a message came from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    WebChat,
    WhatsApp,
    Nextcloud,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::WebChat => "webchat",
            ChannelKind::WhatsApp => "whatsapp",
            ChannelKind::Nextcloud => "nextcloud",
        }
    }

    pub fn parse(s: &str) -> Option<ChannelKind> {
        match s {
            "webchat" => Some(ChannelKind::WebChat),
            "whatsapp" => Some(ChannelKind::WhatsApp),
            "nextcloud" => Some(ChannelKind::Nextcloud),
            _ => None,
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Database id of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(pub i64);

/// Database id of a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub i64);

/// Every way a message arrives becomes this, and goes through `assistant::Assistant`.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: ChannelKind,
    /// The channel's own key for the conversation: a phone number, a Talk room token, or
    /// for the WebChat the conversation id as text.
    pub conversation_key: String,
    pub sender: String,
    pub text: String,
    /// The channel's id for the message (wamid, Talk message id), if it has one.
    pub external_id: Option<String>,
}
