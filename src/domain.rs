//! Plain domain types shared by every layer: chat turns, inbound messages, ids.
//! Nothing here knows a wire format; these types are deliberately not `Serialize`.

use std::fmt;

/// Defines a fieldless enum whose variants each have one stored or wire name, with
/// `as_str` and `parse` generated from that one table, so the two directions cannot drift
/// apart (they were written by hand, twice per enum, before).
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// The variant's stored or wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant named `text`, if any.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use named_enum;

crate::domain::named_enum! {
    /// Who said a turn of a conversation.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum Role {
        System = "system",
        User = "user",
        Assistant = "assistant",
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

crate::domain::named_enum! {
    /// Where a message came from or goes to.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ChannelKind {
        WebChat = "webchat",
        WhatsApp = "whatsapp",
        Nextcloud = "nextcloud",
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
