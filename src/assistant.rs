//! The one use-case every channel goes through: store the inbound message, build the prompt
//! (persona + the last `HISTORY_MESSAGES` messages), route it to a model, stream the answer,
//! store it with its privacy ledger. It knows conversations and models, and nothing of wire
//! formats or HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sqlx::SqlitePool;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::db::memory::{self, MessageStatus, NewMessage};
use crate::domain::{ChannelKind, ChatTurn, ConversationId, Inbound, MessageId, Role};
use crate::error::{Error, Result};
use crate::llm::router::{Router, Tier};
use crate::llm::{Chunk, FinishReason, GenerationParams, LlmError, LlmRequest, Usage};

/// Settings keys of the persona.
pub const PERSONA_NAME_KEY: &str = "persona_name";
pub const SYSTEM_PROMPT_KEY: &str = "system_prompt";

pub const DEFAULT_PERSONA_NAME: &str = "Claw";
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are {name}, a private personal assistant running on \
your user's own machine. Be concise, accurate and warm; say plainly when you do not know \
something.";

/// The persona injected as the system turn of every call, on every channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persona {
    pub name: String,
    pub system_prompt: String,
}

impl Persona {
    /// The system turn: the prompt with `{name}` replaced by the persona name.
    pub fn system_turn(&self) -> String {
        self.system_prompt.replace("{name}", &self.name)
    }
}

/// What the caller of `Assistant::start` receives while an answer is produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Sent first: who answers.
    Meta { conversation_id: ConversationId, tier: Tier, provider: String, model: String },
    /// A piece of answer text.
    Token(String),
    /// Something to tell the user that is not answer text (fallback, history trimmed).
    Notice { kind: String, message: String },
    /// The answer is complete and stored.
    Done { message_id: MessageId, usage: Usage, finish: FinishReason, total_ms: u64 },
    /// The turn failed; text produced before the failure is stored as `partial`.
    Error { message: String, partial_message_id: Option<MessageId> },
}

/// A stored message was added to a conversation (for pages that show it live).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationEvent {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub role: Role,
}

/// A complete answer, for channels that send one message rather than a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub conversation_id: ConversationId,
    pub message_id: Option<MessageId>,
    pub text: String,
    pub notices: Vec<(String, String)>,
    /// `None` when the turn succeeded.
    pub error: Option<String>,
}

/// Settings the assistant needs, handed over by `app.rs`.
#[derive(Debug, Clone)]
pub struct AssistantConfig {
    pub history_messages: usize,
    pub reply_max_tokens: u32,
}

pub struct Assistant {
    pool: SqlitePool,
    router: Arc<Router>,
    config: AssistantConfig,
    /// Stop switches of running generations, by conversation.
    running: Mutex<HashMap<ConversationId, oneshot::Sender<()>>>,
    events: broadcast::Sender<ConversationEvent>,
}

impl Assistant {
    pub fn new(pool: SqlitePool, router: Arc<Router>, config: AssistantConfig) -> Self {
        let (events, _) = broadcast::channel(256);
        Self { pool, router, config, running: Mutex::new(HashMap::new()), events }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Live notifications of stored messages, for open WebChat pages.
    pub fn subscribe(&self) -> broadcast::Receiver<ConversationEvent> {
        self.events.subscribe()
    }

    /// The persona from settings, or the default one.
    pub async fn persona(&self) -> Result<Persona> {
        let name = memory::setting_get(&self.pool, PERSONA_NAME_KEY).await?;
        let prompt = memory::setting_get(&self.pool, SYSTEM_PROMPT_KEY).await?;
        Ok(Persona {
            name: name
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_PERSONA_NAME.into()),
            system_prompt: prompt
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.into()),
        })
    }

    pub async fn set_persona(&self, persona: &Persona) -> Result<()> {
        if persona.name.trim().is_empty() {
            return Err(Error::Invalid("persona_name must not be empty".into()));
        }
        memory::setting_set(&self.pool, PERSONA_NAME_KEY, persona.name.trim()).await?;
        memory::setting_set(&self.pool, SYSTEM_PROMPT_KEY, &persona.system_prompt).await?;
        Ok(())
    }

    /// Finds or creates the conversation an inbound message belongs to.
    pub async fn conversation_for(&self, inbound: &Inbound) -> Result<ConversationId> {
        if inbound.channel == ChannelKind::WebChat {
            // WebChat keys are conversation ids chosen by the page; anything else is new.
            if let Ok(id) = inbound.conversation_key.parse::<i64>() {
                return match memory::get_conversation(&self.pool, ConversationId(id)).await? {
                    Some(c) if c.channel == ChannelKind::WebChat => Ok(c.id),
                    _ => Err(Error::NotFound(format!("conversation {id}"))),
                };
            }
            let title = title_from(&inbound.text);
            return Ok(memory::create_webchat_conversation(&self.pool, Some(&title)).await?.id);
        }
        let title = format!("{} {}", inbound.channel, inbound.sender);
        let conv = memory::get_or_create_conversation(
            &self.pool,
            inbound.channel,
            &inbound.conversation_key,
            Some(&title),
        )
        .await?;
        Ok(conv.id)
    }

    /// Stores the inbound message and starts answering it. Events arrive on the returned
    /// receiver; dropping it (the client left) or calling `stop` ends the generation in the
    /// engine, and whatever text was produced is stored as `partial`.
    pub async fn start(
        &self,
        inbound: Inbound,
        tier: Option<Tier>,
    ) -> Result<mpsc::Receiver<Event>> {
        let text = inbound.text.trim();
        if text.is_empty() {
            return Err(Error::Invalid("message is empty".into()));
        }
        let conversation_id = self.conversation_for(&inbound).await?;
        let mut user = NewMessage::plain(conversation_id, Role::User, text);
        user.external_id = inbound.external_id.clone();
        let user_id = memory::add_message(&self.pool, &user).await?;
        let _ = self.events.send(ConversationEvent {
            conversation_id,
            message_id: user_id,
            role: Role::User,
        });
        self.answer(conversation_id, tier).await
    }

    /// Answers the conversation as it stands (its last message is the prompt). Used by
    /// `start` and by cron jobs, which store their prompt themselves.
    pub async fn answer(
        &self,
        conversation_id: ConversationId,
        tier: Option<Tier>,
    ) -> Result<mpsc::Receiver<Event>> {
        let tier = tier.unwrap_or_else(|| self.router.default_tier());
        let persona = self.persona().await?;
        let history =
            memory::history(&self.pool, conversation_id, self.config.history_messages as i64)
                .await?;
        let mut turns: Vec<ChatTurn> = history
            .into_iter()
            // Failed answers are shown to the user but are not part of what the model saw.
            .filter(|m| m.status != MessageStatus::Error && m.role != Role::System)
            .map(|m| ChatTurn::new(m.role, m.content))
            .collect();
        let params = GenerationParams::qwen3_non_thinking(self.config.reply_max_tokens);

        // The system prompt is never cut: when the engine says the prompt does not fit, the
        // oldest turns go first, and the caller is told.
        let mut trimmed = 0usize;
        let routed = loop {
            let mut messages = Vec::with_capacity(turns.len() + 1);
            messages.push(ChatTurn::new(Role::System, persona.system_turn()));
            messages.extend(turns.iter().cloned());
            let request = LlmRequest { messages, params: params.clone() };
            match self.router.stream(tier, request).await {
                Ok(routed) => break routed,
                Err(LlmError::ContextOverflow { .. }) if turns.len() > 1 => {
                    turns.remove(0);
                    trimmed += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };

        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel();
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(conversation_id, stop_tx);
        let _ = tx
            .send(Event::Meta {
                conversation_id,
                tier: routed.tier,
                provider: routed.info.provider.clone(),
                model: routed.info.model.clone(),
            })
            .await;
        if trimmed > 0 {
            let _ = tx
                .send(Event::Notice {
                    kind: "history_trimmed".into(),
                    message: format!(
                        "history trimmed: the {trimmed} oldest message(s) did not fit the model's context"
                    ),
                })
                .await;
        }
        for (kind, message) in &routed.notices {
            let _ = tx.send(Event::Notice { kind: kind.clone(), message: message.clone() }).await;
        }

        let run = Generation {
            pool: self.pool.clone(),
            events: self.events.clone(),
            conversation_id,
            tier: routed.tier,
            provider: routed.info.provider.clone(),
            model: routed.info.model.clone(),
        };
        tokio::spawn(run.drive(routed.stream, tx, stop_rx));
        Ok(rx)
    }

    /// Stops the running generation of a conversation; false when none runs.
    pub fn stop(&self, conversation_id: ConversationId) -> bool {
        let sender =
            self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&conversation_id);
        match sender {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }

    /// Runs a whole turn and collects the answer, for channels that send one message.
    pub async fn reply(&self, inbound: Inbound, tier: Option<Tier>) -> Result<Reply> {
        let rx = self.start(inbound, tier).await?;
        // `start` always sends `Meta` first, which carries the conversation id.
        Ok(collect(ConversationId(0), rx).await)
    }

    /// Answers an existing conversation and collects the result (cron jobs).
    pub async fn answer_collect(
        &self,
        conversation_id: ConversationId,
        tier: Option<Tier>,
    ) -> Result<Reply> {
        let rx = self.answer(conversation_id, tier).await?;
        Ok(collect(conversation_id, rx).await)
    }
}

async fn collect(conversation_id: ConversationId, mut rx: mpsc::Receiver<Event>) -> Reply {
    let mut reply = Reply {
        conversation_id,
        message_id: None,
        text: String::new(),
        notices: Vec::new(),
        error: None,
    };
    while let Some(event) = rx.recv().await {
        match event {
            Event::Meta { conversation_id, .. } => reply.conversation_id = conversation_id,
            Event::Token(t) => reply.text.push_str(&t),
            Event::Notice { kind, message } => reply.notices.push((kind, message)),
            Event::Done { message_id, .. } => reply.message_id = Some(message_id),
            Event::Error { message, partial_message_id } => {
                reply.error = Some(message);
                reply.message_id = partial_message_id;
            }
        }
    }
    reply
}

/// One running answer: forwards chunks to the caller and stores the result.
struct Generation {
    pool: SqlitePool,
    events: broadcast::Sender<ConversationEvent>,
    conversation_id: ConversationId,
    tier: Tier,
    provider: String,
    model: String,
}

impl Generation {
    async fn drive(
        self,
        mut stream: crate::llm::ChunkStream,
        tx: mpsc::Sender<Event>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let started = Instant::now();
        let mut text = String::new();
        let outcome: std::result::Result<(Usage, FinishReason), String> = loop {
            let next = tokio::select! {
                chunk = stream.recv() => chunk,
                _ = &mut stop => break Ok((Usage::default(), FinishReason::Cancelled)),
            };
            match next {
                Some(Ok(Chunk::Text(t))) => {
                    text.push_str(&t);
                    if tx.send(Event::Token(t)).await.is_err() {
                        // The client left: dropping the stream stops the engine.
                        break Ok((Usage::default(), FinishReason::Cancelled));
                    }
                }
                Some(Ok(Chunk::Notice { kind, message })) => {
                    let _ = tx.send(Event::Notice { kind, message }).await;
                }
                Some(Ok(Chunk::Done { usage, finish })) => break Ok((usage, finish)),
                Some(Err(e)) => break Err(e.to_string()),
                None => break Err("the model stream ended unexpectedly".into()),
            }
        };
        // Dropping the stream here (before storing) releases the engine at once.
        drop(stream);

        let (status, usage, finish, error) = match outcome {
            Ok((usage, FinishReason::Cancelled)) => {
                (MessageStatus::Partial, usage, FinishReason::Cancelled, None)
            }
            Ok((usage, finish)) => (MessageStatus::Complete, usage, finish, None),
            Err(e) if text.is_empty() => {
                (MessageStatus::Error, Usage::default(), FinishReason::Stop, Some(e))
            }
            Err(e) => (MessageStatus::Partial, Usage::default(), FinishReason::Stop, Some(e)),
        };
        let content = if status == MessageStatus::Error {
            format!("(no answer: {})", error.as_deref().unwrap_or("unknown error"))
        } else {
            text
        };
        let message = NewMessage {
            conversation_id: self.conversation_id,
            role: Role::Assistant,
            content,
            tier: Some(self.tier.as_str().to_string()),
            provider: Some(self.provider.clone()),
            model: Some(self.model.clone()),
            prompt_tokens: Some(usage.prompt_tokens as i64),
            completion_tokens: Some(usage.completion_tokens as i64),
            status,
            external_id: None,
        };
        let stored = memory::add_message(&self.pool, &message).await;
        let message_id = match stored {
            Ok(id) => {
                let _ = self.events.send(ConversationEvent {
                    conversation_id: self.conversation_id,
                    message_id: id,
                    role: Role::Assistant,
                });
                Some(id)
            }
            Err(e) => {
                tracing::error!(conversation = self.conversation_id.0, error = %e, "storing the answer failed");
                None
            }
        };
        let event = match (error, message_id) {
            (None, Some(message_id)) => Event::Done {
                message_id,
                usage,
                finish,
                total_ms: started.elapsed().as_millis() as u64,
            },
            (None, None) => Event::Error {
                message: "the answer could not be stored".into(),
                partial_message_id: None,
            },
            (Some(message), partial_message_id) => Event::Error {
                message,
                partial_message_id: partial_message_id.filter(|_| status == MessageStatus::Partial),
            },
        };
        let _ = tx.send(event).await;
    }
}

/// A short conversation title from its first message.
fn title_from(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    let mut title: String = line.chars().take(60).collect();
    if line.chars().count() > 60 {
        title.push('…');
    }
    title
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persona_system_turn_substitutes_the_name() {
        let p = Persona { name: "Pince".into(), system_prompt: DEFAULT_SYSTEM_PROMPT.into() };
        assert!(p.system_turn().starts_with("You are Pince, a private personal assistant"));
    }

    #[test]
    fn titles_are_short_first_lines() {
        assert_eq!(title_from("Hello\nworld"), "Hello");
        let long = "é".repeat(100);
        assert_eq!(title_from(&long).chars().count(), 61);
    }
}
