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
        /// The result of a tool call, fed back to the model (never stored as a message row:
        /// a turn's tool rounds are stored with its answer, see `ToolRound`).
        Tool = "tool",
    }
}

/// A tool call a model made: which tool, with which arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// Unique within a conversation (`call_…`); a `Tool` turn names the call it answers.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, exactly as the model wrote them (an object when valid).
    pub arguments: String,
}

/// What a tool call gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    /// The `ToolCall::id` it answers.
    pub call_id: String,
    /// The text the model reads (JSON for structured results).
    pub content: String,
    /// The call failed (unknown tool, invalid arguments, the tool's own error); `content`
    /// says why, and the model reads it like any result.
    pub is_error: bool,
}

/// One round of an agent turn: the text the model wrote before its calls, the calls, and
/// their results in the same order. A stored answer keeps its rounds, so later prompts
/// show the model its own tool use in its own format.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolRound {
    pub text: String,
    pub calls: Vec<ToolCall>,
    pub results: Vec<ToolResult>,
}

/// Whether a message has nothing to read: only whitespace, control characters (a lone NUL
/// is not a question) and the invisible format characters that render as nothing (zero-width
/// space and joiners, word joiner, byte order mark, soft hyphen).
pub fn is_blank(text: &str) -> bool {
    const INVISIBLE: [char; 7] =
        ['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{00AD}', '\u{180E}'];
    text.chars().all(|c| c.is_whitespace() || c.is_control() || INVISIBLE.contains(&c))
}

/// One turn of a conversation as the models see it.
///
/// - `Assistant` turns may carry `tool_calls` (then `content` is the text before them).
/// - `Tool` turns carry one call's result in `content`, and `tool_call_id` names the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: Role,
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
}

impl ChatTurn {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// An assistant turn that wrote `text` and then made `calls`.
    pub fn assistant_calls(text: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        Self { tool_calls: calls, ..Self::new(Role::Assistant, text) }
    }

    /// The result of call `call_id`.
    pub fn tool_result(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self { tool_call_id: Some(call_id.into()), ..Self::new(Role::Tool, content) }
    }

    /// The turns of a stored answer: each round's calls and results, then the final text.
    pub fn answer_with_rounds(rounds: &[ToolRound], answer: &str) -> Vec<ChatTurn> {
        let mut turns = Vec::with_capacity(rounds.len() * 2 + 1);
        for round in rounds {
            turns.push(ChatTurn::assistant_calls(round.text.clone(), round.calls.clone()));
            for result in &round.results {
                turns.push(ChatTurn::tool_result(result.call_id.clone(), result.content.clone()));
            }
        }
        turns.push(ChatTurn::new(Role::Assistant, answer));
        turns
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
