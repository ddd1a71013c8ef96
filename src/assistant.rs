//! The one use-case every channel goes through: take the conversation's turn (one answer at
//! a time per conversation, in arrival order), build the prompt (persona + the history
//! window, which moves in steps so the model's KV state is reused), route it to a model,
//! store the user message once the model accepted it (or, for the WebChat's regenerate and
//! edit, change the end of the history then), stream the answer (a WebChat answer's text so
//! far is saved about once a second as a draft, off the token path, so a crash keeps it),
//! store it with its privacy ledger (nothing when it was stopped before writing anything),
//! and prepare the next window's prefix in idle time. An answer is an agent
//! loop (issue 15): when the model calls tools, the calls run through the `ToolRegistry`
//! and the model is asked again with their results, at most `AgentConfig::max_steps` rounds,
//! all inside the one turn; the rounds are stored with the answer. It knows conversations,
//! models and tools, and nothing of wire formats or HTTP.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::correction::{claims_reminder, CORRECTION_NOTICE_KIND, REMINDER_CORRECTION};
use crate::db::drafts::{self, Draft};
use crate::db::memory::{self, MessageStatus, NewMessage};
use crate::db::message_edits::{self, EditError};
use crate::domain::{
    ChannelKind, ChatTurn, ConversationId, Inbound, MessageId, Role, ToolCall, ToolResult,
    ToolRound,
};
use crate::error::{Error, Result};
use crate::live::{LiveAnswers, Reader};
use crate::llm::router::{Routed, Router, Tier};
use crate::llm::{
    Chunk, ChunkStream, FinishReason, GenerationParams, LlmError, LlmRequest, ToolChoice, ToolUse,
    Usage,
};
use crate::tools::{error_result, new_call_id, ToolContext, ToolError, ToolRegistry};

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
    Meta {
        conversation_id: ConversationId,
        tier: Tier,
        provider: String,
        model: String,
        /// The host of a network provider (privacy ledger); `None` in-process.
        host: Option<String>,
        /// Whether this answer is produced outside the machine.
        leaves_machine: bool,
        /// The stored user message this answer is written for: the one just stored, or the
        /// one a regenerate answers again or an edit changed. `None` when the turn answers
        /// the conversation as it stands (cron recovery, the channel queue).
        user_message_id: Option<MessageId>,
    },
    /// A piece of answer text.
    Token(String),
    /// Something to tell the user that is not answer text (fallback, history trimmed, the
    /// `correction` of an answer that claims a reminder no call created).
    Notice { kind: String, message: String },
    /// The model called a tool; the text streamed since the last round (or the start) was
    /// written before this call. The call runs next.
    ToolCall { call: ToolCall },
    /// The result of a call, with the tool's name; the model is then asked again.
    ToolResult { name: String, result: ToolResult },
    /// The answer is complete and stored, or stopped (`finish` is `Cancelled`). A stop
    /// before the answer wrote any text or ran any tool stores nothing (no empty message:
    /// the question stays unanswered, to send again or regenerate): `message_id` is `None`.
    Done { message_id: Option<MessageId>, usage: Usage, finish: FinishReason, total_ms: u64 },
    /// The turn failed; text produced before the failure is stored as `partial`.
    Error { message: String, partial_message_id: Option<MessageId> },
}

/// A conversation changed (for pages that show it live).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationEvent {
    pub conversation_id: ConversationId,
    pub change: Change,
}

/// What happened to a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A message was stored in it.
    Stored { message_id: MessageId, role: Role },
    /// It was renamed.
    Renamed,
    /// It was deleted.
    Deleted,
}

/// A change to the end of a WebChat conversation (its message actions), made by
/// `Assistant::revise` inside the conversation's turn and only once the model accepted the
/// new prompt: a refused request changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revision {
    /// Answer the last user message again; the answer after it is replaced. `expected`, when
    /// given, must be the conversation's last message (see `LastExchange::check_regenerate`).
    Regenerate { expected: Option<MessageId> },
    /// The last user message gets `text` and its answer is replaced by one to the new text.
    /// `expected`, when given, must be that user message.
    Edit { text: String, expected: Option<MessageId> },
}

/// Why `Assistant::revise` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RevisionError {
    /// Another answer holds the conversation's turn (or waits for it). Waiting would change
    /// the history under that answer, or answer twice: the caller is told at once instead.
    #[error("an answer is being written in this conversation; stop it or wait for it")]
    Busy,
    /// No user message to answer, or the client's `expected` message is no longer last.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// Refused like any turn: the conversation is gone, the model is busy, the prompt does
    /// not fit.
    #[error(transparent)]
    Turn(#[from] Error),
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

/// The agent side of an assistant: the tools a turn may call and the most rounds of calls
/// one answer makes before it must answer in plain text.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Empty: no tools are offered and every answer is one model call.
    pub tools: ToolRegistry,
    /// `AGENT_MAX_STEPS`: rounds with tools, then one last call without them.
    pub max_steps: usize,
}

pub const DEFAULT_AGENT_MAX_STEPS: usize = 5;

/// The most calls one round runs. A model can ask for hundreds in one reply (a remote one
/// asked for 300, each a reminder); those past this get an error result the model reads.
pub const MAX_CALLS_PER_ROUND: usize = 16;

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { tools: ToolRegistry::new(), max_steps: DEFAULT_AGENT_MAX_STEPS }
    }
}

/// The tool whose successful call makes a reminder claim true (see `crate::correction`).
const REMINDER_CREATE_TOOL: &str = "reminders_create";

/// The notice kind a request gets while an earlier answer in its conversation runs.
pub const BUSY_NOTICE_KIND: &str = "busy";
const BUSY_NOTICE: &str = "waiting for the previous answer in this conversation";

/// The failure kept with an answer a shutdown cut short (the page shows it after a reload).
pub const SHUTDOWN_REASON: &str =
    "my-claw stopped while writing this answer (a restart or shutdown); the part shown is saved";
/// A collected reply's error when its answer was stopped before it wrote anything.
pub const STOPPED_BEFORE_ANY_TEXT: &str = "the answer was stopped before it wrote anything";

/// Events buffered between a running answer and a slow reader.
const EVENT_BUFFER: usize = 64;

/// How often `quiesce` repeats its stop while it waits for the conversation's turn.
const QUIESCE_STOP_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// How the history window moves along a conversation that never ends.
///
/// Messages are counted by their index in the conversation (0 is the first). The window of
/// a turn is the messages from `start` to the newest one. The start moves in jumps of
/// `step` messages: between jumps every turn's prompt begins with the previous turn's
/// prompt, so the engine reuses its KV state and prefills only what is new. The window holds
/// at least `min_messages` (`HISTORY_MESSAGES`; fewer only after trimming for the context)
/// and at most `min_messages + step - 1`. With `warm`, the prefix the next window starts
/// with is handed to the model in idle time after each turn, so a jump costs no prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowPolicy {
    pub min_messages: usize,
    /// 1 slides the window one message at a time (the prefix changes every turn).
    pub step: usize,
    /// Prepare the next window's prefix after each turn (`Provider::warm`).
    pub warm: bool,
}

impl WindowPolicy {
    /// The default: jumps of half the window, rounded up to an even number so that a window
    /// of alternating turns starts on a user message.
    pub fn stepping(history_messages: usize) -> WindowPolicy {
        let min_messages = history_messages.max(1);
        let half = min_messages.div_ceil(2);
        WindowPolicy { min_messages, step: (half + half % 2).max(2), warm: true }
    }

    /// The last `history_messages` messages, moving by one every message and never warmed:
    /// what the assistant did before stepping (kept for the benchmark's comparison).
    pub fn sliding(history_messages: usize) -> WindowPolicy {
        WindowPolicy { min_messages: history_messages.max(1), step: 1, warm: false }
    }

    /// Index of the first message in the window of a conversation of `n_messages` messages
    /// (the newest included), never before `floor` (where trimming for the context left
    /// it) and never past the newest message.
    pub fn start(&self, n_messages: usize, floor: usize) -> usize {
        let natural = match n_messages.checked_sub(self.min_messages) {
            Some(over) => over / self.step * self.step,
            None => 0,
        };
        natural.max(floor).min(n_messages.saturating_sub(1))
    }

    /// Where the window moves next from `start`: the first start after it that `start`
    /// gives as the conversation grows. That is one step on from a start on a step, and the
    /// next step boundary from a start that trimming left between two.
    pub fn next_start(&self, start: usize) -> usize {
        (start / self.step + 1) * self.step
    }

    /// The most messages a window holds.
    pub fn max_messages(&self) -> usize {
        self.min_messages + self.step - 1
    }
}

/// One turn at a time per conversation: each answer holds its conversation's turn from
/// before its prompt is read until its answer is stored.
type TurnSlots = Arc<Mutex<HashMap<ConversationId, Arc<tokio::sync::Mutex<()>>>>>;

/// Cheap to clone: the running answers share it.
#[derive(Clone)]
pub struct Assistant {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    router: Arc<Router>,
    config: AssistantConfig,
    window: WindowPolicy,
    agent: AgentConfig,
    /// The stop switch of the answer running in each conversation, with its turn number;
    /// the answer removes its own when it ends.
    running: Mutex<HashMap<ConversationId, Running>>,
    /// Conversations being quiesced for deletion: a message that waited for their turn
    /// is refused when it gets it, instead of starting an answer only to be stopped.
    closing: Arc<Mutex<HashSet<ConversationId>>>,
    turns: TurnSlots,
    /// Where trimming for the context moved each conversation's window start, so the next
    /// turns keep that start (and their KV reuse) instead of trimming again.
    floors: Mutex<HashMap<ConversationId, usize>>,
    events: broadcast::Sender<ConversationEvent>,
    next_turn: AtomicU64,
    /// Set by `shutting_down`: an answer stopped from now on was cut by the shutdown, and
    /// keeps that as its reason (the user did not stop it).
    shutting_down: AtomicBool,
    /// The answers being written now, for pages that follow them, whoever asked for them.
    live: LiveAnswers,
}

struct Running {
    turn: u64,
    stop: oneshot::Sender<()>,
    /// Resolves (its sender dropped) once the answer is stored and its turn released.
    ended: oneshot::Receiver<()>,
}

/// Where a turn lands: a stored conversation, or one created only once the model accepted
/// the request (so a refused request leaves nothing behind).
#[derive(Debug, Clone)]
enum Target {
    Existing(ConversationId),
    NewWebChat { title: String },
    NewChannel { channel: ChannelKind, key: String, title: String },
}

/// The user message of a turn, stored once the model has accepted the prompt.
#[derive(Debug, Clone)]
struct UserMessage {
    text: String,
    external_id: Option<String>,
}

/// What a caller does when its conversation is answering another message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Return the event stream at once with a `busy` notice, and start when it is free.
    Notify,
    /// Wait before returning (callers that collect one reply and want its errors typed).
    Inline,
}

/// A prompt the model accepted: its stream, and what the answer needs to go on. Dropping it
/// stops the engine.
struct Accepted {
    routed: Routed,
    /// The tier asked for (the router may have fallen back to another).
    tier: Tier,
    system: ChatTurn,
    window: Vec<(usize, ChatTurn)>,
    params: GenerationParams,
    /// Messages in the conversation once this turn's user message is in.
    n_messages: usize,
    /// Where the window starts, and where it started before trimming for the context.
    start: usize,
    floor: usize,
    /// Messages trimmed for the context.
    trimmed: usize,
}

/// The conversation an answer is written in, and its turn, held until the answer is stored.
struct Answering {
    conversation_id: ConversationId,
    /// Which answers are saved as drafts while written (see `launch`).
    channel: ChannelKind,
    guard: TurnGuard,
}

enum TurnStart {
    Started,
    /// A new conversation was created by someone else at the same moment and is busy.
    Raced(ConversationId),
}

impl Assistant {
    /// An assistant without tools (see `with_agent`).
    pub fn new(pool: SqlitePool, router: Arc<Router>, config: AssistantConfig) -> Self {
        Self::with_agent(pool, router, config, AgentConfig::default())
    }

    /// An assistant whose turns may call `agent.tools` (what the server builds).
    pub fn with_agent(
        pool: SqlitePool,
        router: Arc<Router>,
        config: AssistantConfig,
        agent: AgentConfig,
    ) -> Self {
        let window = WindowPolicy::stepping(config.history_messages);
        Self::build(pool, router, config, window, agent)
    }

    /// `new` with another window policy (the conversation benchmark compares them).
    pub fn with_window(
        pool: SqlitePool,
        router: Arc<Router>,
        config: AssistantConfig,
        window: WindowPolicy,
    ) -> Self {
        Self::build(pool, router, config, window, AgentConfig::default())
    }

    fn build(
        pool: SqlitePool,
        router: Arc<Router>,
        config: AssistantConfig,
        window: WindowPolicy,
        agent: AgentConfig,
    ) -> Self {
        let agent = AgentConfig { max_steps: agent.max_steps.max(1), ..agent };
        let (events, _) = broadcast::channel(256);
        Assistant {
            inner: Arc::new(Inner {
                pool,
                router,
                config,
                window,
                agent,
                running: Mutex::new(HashMap::new()),
                closing: Arc::default(),
                turns: Arc::default(),
                floors: Mutex::new(HashMap::new()),
                events,
                next_turn: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                live: LiveAnswers::default(),
            }),
        }
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.inner.router
    }

    /// The answers being written now (every path publishes there: the WebChat's relay, and
    /// `collect` for the others), for pages that follow them.
    pub fn live(&self) -> &LiveAnswers {
        &self.inner.live
    }

    pub fn window(&self) -> WindowPolicy {
        self.inner.window
    }

    /// The tools the assistant's turns may call.
    pub fn tools(&self) -> &ToolRegistry {
        &self.inner.agent.tools
    }

    /// What a request offers: the registry's tools with `choice`, or nothing when the
    /// registry is empty.
    fn tool_use(&self, choice: ToolChoice) -> ToolUse {
        if self.inner.agent.tools.is_empty() {
            return ToolUse::default();
        }
        ToolUse { choice, ..ToolUse::offer(self.inner.agent.tools.specs()) }
    }

    /// Live notifications of stored messages, for open WebChat pages.
    pub fn subscribe(&self) -> broadcast::Receiver<ConversationEvent> {
        self.inner.events.subscribe()
    }

    /// The persona from settings, or the default one.
    pub async fn persona(&self) -> Result<Persona> {
        let pool = &self.inner.pool;
        let name = memory::setting_get(pool, PERSONA_NAME_KEY).await?;
        let prompt = memory::setting_get(pool, SYSTEM_PROMPT_KEY).await?;
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
        memory::setting_set(&self.inner.pool, PERSONA_NAME_KEY, persona.name.trim()).await?;
        memory::setting_set(&self.inner.pool, SYSTEM_PROMPT_KEY, &persona.system_prompt).await?;
        Ok(())
    }

    /// Answers an inbound message. Events arrive on the returned receiver; dropping it (the
    /// client left) or calling `stop` ends the generation in the engine, and whatever text
    /// was produced is stored as `partial` (nothing, when it had produced none).
    ///
    /// Nothing is stored and no conversation is created until the model has accepted the
    /// prompt: a refused request (`Err`) leaves no trace. When the conversation is answering
    /// another message, the receiver comes back at once with a `busy` notice and the turn
    /// starts when that answer is stored; a refusal then arrives as an `Error` event.
    pub async fn start(
        &self,
        inbound: Inbound,
        tier: Option<Tier>,
    ) -> Result<mpsc::Receiver<Event>> {
        let (target, user) = self.prepare(&inbound).await?;
        self.begin(target, Some(user), tier, Waiting::Notify).await
    }

    /// Regenerates or edits the end of a WebChat conversation and streams the new answer. The
    /// history changes inside the conversation's turn and only once the model accepted the
    /// new prompt, in one write transaction that checks the exchange is still the one the
    /// prompt was built from: a refused request (`Err`) leaves it as it was. While another
    /// answer holds the turn this does not wait: `RevisionError::Busy`.
    ///
    /// A regenerate's prompt is the stored messages up to the last user message: the
    /// conversation as the replaced answer saw it, so its prefix is in the model's cache. An
    /// edit's is the messages before it, then the new text. A reminder posted after the last
    /// user message is in neither (it came after the question) and stays stored.
    pub async fn revise(
        &self,
        conversation_id: ConversationId,
        revision: Revision,
        tier: Option<Tier>,
    ) -> std::result::Result<mpsc::Receiver<Event>, RevisionError> {
        let received = Instant::now();
        let Some(guard) = self.try_turn(conversation_id) else {
            return Err(RevisionError::Busy);
        };
        let pool = &self.inner.pool;
        let Some(conversation) =
            memory::get_conversation(pool, conversation_id).await.map_err(Error::from)?
        else {
            return Err(Error::NotFound(format!(
                "conversation {} does not exist",
                conversation_id.0
            ))
            .into());
        };
        // Read and checked under the turn, before the model is asked: a page that is behind
        // gets its 409 without waiting for a prompt it would throw away.
        let exchange = message_edits::last_exchange(pool, conversation_id).await?;
        let n_before = exchange.n_before as usize;
        let (n_stored, user_text) = match &revision {
            Revision::Regenerate { expected } => {
                exchange.check_regenerate(*expected)?;
                (n_before + 1, None)
            }
            Revision::Edit { text, .. } if crate::domain::is_blank(text) => {
                return Err(Error::Invalid("message is empty".into()).into());
            }
            Revision::Edit { text, expected } => {
                exchange.check_edit(*expected)?;
                (n_before, Some(text.as_str()))
            }
        };
        let tier = tier.unwrap_or_else(|| self.inner.router.default_tier());
        let accepted = self.ask(Some(conversation_id), n_stored, user_text, tier).await?;

        // The model accepted the prompt: the old answer goes now (a failure here drops
        // `accepted`, which stops the engine), and what its tool calls did goes with it (a
        // reminder it set), or the new answer setting it again would leave two. Read before
        // the delete; the turn is held and the delete checks nothing changed since.
        let replaced =
            message_edits::answer_rounds_after(pool, conversation_id, exchange.user_message_id)
                .await
                .map_err(Error::from)?;
        let answered = match &revision {
            Revision::Regenerate { expected } => {
                message_edits::drop_last_answer(pool, conversation_id, &exchange, *expected)
                    .await?;
                exchange.user_message_id
            }
            // The edited message has a new id (see `replace_last_user_message`).
            Revision::Edit { text, expected } => {
                message_edits::replace_last_user_message(
                    pool,
                    conversation_id,
                    &exchange,
                    text,
                    *expected,
                )
                .await?
            }
        };
        if !replaced.is_empty() {
            if let Some(context) = tool_context_of(pool, conversation_id).await {
                let undone = self.inner.agent.tools.undo(&context, &replaced).await;
                tracing::debug!(
                    conversation = conversation_id.0,
                    undone,
                    "replaced answer's tool calls undone"
                );
            }
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let answering = Answering { conversation_id, channel: conversation.channel, guard };
        self.launch(accepted, answering, Some(answered), received, &tx).await;
        Ok(rx)
    }

    /// The process is shutting down: answers stopped from now on are stored with
    /// `SHUTDOWN_REASON` as their failure, so a reloaded page does not say the user stopped
    /// them. Called by whoever stops answers for the shutdown, before stopping them.
    pub fn shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Stops the running answer of a conversation; false when none runs. Messages waiting
    /// for their turn are not affected: the next one starts once the stopped answer is
    /// stored.
    pub fn stop(&self, conversation_id: ConversationId) -> bool {
        self.signal_stop(conversation_id).is_some_and(|(stopped, _)| stopped)
    }

    /// Presses the stop switch of the conversation's running answer, if one runs: whether
    /// it was taken, and what resolves once that answer is stored.
    fn signal_stop(
        &self,
        conversation_id: ConversationId,
    ) -> Option<(bool, oneshot::Receiver<()>)> {
        let running = lock(&self.inner.running).remove(&conversation_id)?;
        Some((running.stop.send(()).is_ok(), running.ended))
    }

    /// `stop`, then waits (at most `limit`) until the stopped answer is stored and its turn
    /// released: what the page does next (regenerate, edit, a new message) then finds the
    /// conversation at rest instead of a 409 for an answer still being written.
    pub async fn stop_and_wait(&self, conversation_id: ConversationId, limit: Duration) -> bool {
        let Some((stopped, ended)) = self.signal_stop(conversation_id) else { return false };
        let _ = tokio::time::timeout(limit, ended).await;
        stopped
    }

    /// Stops the conversation's running answer, waits until it is stored, and holds the
    /// conversation's turn until the returned hold is dropped, so nothing is being answered
    /// in it meanwhile. For deleting a conversation: without it, an answer stopped a moment
    /// before the delete would try to store into a conversation that is gone. A message that
    /// waited for its turn before the hold gets it first and is stopped in turn once its
    /// answer starts; those waiting after the hold find the conversation as the holder left
    /// it (deleted: a not-found error).
    pub async fn quiesce(&self, conversation_id: ConversationId) -> ConversationHold {
        lock(&self.inner.closing).insert(conversation_id);
        let closing = Closing { conversation_id, set: self.inner.closing.clone() };
        let slot = self.turn_slot(conversation_id);
        let mut owned = std::pin::pin!(slot.lock_owned());
        let owned = loop {
            self.stop(conversation_id);
            tokio::select! {
                owned = &mut owned => break owned,
                // An answer that had not registered its stop switch yet (still being
                // prefilled) gets stopped on a later pass.
                _ = tokio::time::sleep(QUIESCE_STOP_EVERY) => {}
            }
        };
        ConversationHold { _guard: self.turn_guard(conversation_id, owned), _closing: closing }
    }

    /// Tells open pages that a conversation was deleted.
    pub fn announce_deleted(&self, conversation_id: ConversationId) {
        let _ =
            self.inner.events.send(ConversationEvent { conversation_id, change: Change::Deleted });
    }

    /// Tells open pages that a conversation was renamed.
    pub fn announce_renamed(&self, conversation_id: ConversationId) {
        let _ =
            self.inner.events.send(ConversationEvent { conversation_id, change: Change::Renamed });
    }

    /// Runs a whole turn and collects the answer, for channels that send one message. It
    /// waits its turn when the conversation is busy.
    pub async fn reply(&self, inbound: Inbound, tier: Option<Tier>) -> Result<Reply> {
        let (target, user) = self.prepare(&inbound).await?;
        let rx = self.begin(target, Some(user), tier, Waiting::Inline).await?;
        // The turn always sends `Meta` first, which carries the conversation id.
        Ok(collect(self.live(), ConversationId(0), rx).await)
    }

    /// Answers an existing conversation and collects the result (cron jobs, the channel
    /// queue's recovery), waiting its turn.
    pub async fn answer_collect(
        &self,
        conversation_id: ConversationId,
        tier: Option<Tier>,
    ) -> Result<Reply> {
        let target = Target::Existing(conversation_id);
        let rx = self.begin(target, None, tier, Waiting::Inline).await?;
        Ok(collect(self.live(), conversation_id, rx).await)
    }

    /// Prepares the prompts of the `conversations` most recently active conversations in idle
    /// time, after a restart, so their next turn does not prefill the whole window. Returns
    /// how many were handed to the model. Errors of single conversations are logged.
    pub async fn warm_recent(&self, conversations: usize) -> Result<usize> {
        if !self.inner.window.warm || conversations == 0 {
            return Ok(0);
        }
        let pool = &self.inner.pool;
        let system = ChatTurn::new(Role::System, self.persona().await?.system_turn());
        let params = self.params();
        let mut warmed = 0;
        for summary in memory::list_conversations(pool, conversations as i64).await? {
            let id = summary.conversation.id;
            let n_stored = memory::message_count(pool, id).await? as usize;
            if n_stored == 0 {
                continue;
            }
            // The next turn adds one message; its window is what to prepare.
            let mut start = self.inner.window.start(n_stored + 1, self.floor(id));
            let stored = memory::messages_from(pool, id, start as i64, n_stored as i64).await?;
            let tier = stored
                .iter()
                .rev()
                .find_map(|m| m.tier.as_deref().and_then(Tier::from_name))
                .unwrap_or_else(|| self.inner.router.default_tier());
            let mut window = prompt_turns(start, stored);
            let tools = self.tool_use(ToolChoice::Auto);
            while !window.is_empty() {
                let request = build_request(&system, &window, &params, &tools);
                match self.inner.router.warm(tier, request).await {
                    Ok(()) => {
                        warmed += 1;
                        break;
                    }
                    Err(LlmError::ContextOverflow { .. }) if message_span(&window) > 1 => {
                        // Trim as a turn would, and remember it so the turn starts there.
                        start = Self::trimmed_start(&window);
                        window.retain(|(index, _)| *index >= start);
                        lock(&self.inner.floors).insert(id, start);
                    }
                    Err(err) => {
                        tracing::warn!(conversation = id.0, error = %err, "warming after a restart failed");
                        break;
                    }
                }
            }
        }
        Ok(warmed)
    }

    /// How many answers hold or wait for a conversation's turn (0 when it is idle).
    pub fn turns_queued(&self, conversation_id: ConversationId) -> usize {
        lock(&self.inner.turns)
            .get(&conversation_id)
            .map_or(0, |slot| Arc::strong_count(slot).saturating_sub(1))
    }

    /// Where the window of a conversation of `n_messages` starts now (for tests and tools).
    pub fn window_start(&self, conversation_id: ConversationId, n_messages: usize) -> usize {
        self.inner.window.start(n_messages, self.floor(conversation_id))
    }

    fn params(&self) -> GenerationParams {
        GenerationParams::qwen3_non_thinking(self.inner.config.reply_max_tokens)
    }

    fn floor(&self, conversation_id: ConversationId) -> usize {
        lock(&self.inner.floors).get(&conversation_id).copied().unwrap_or(0)
    }

    /// Validates an inbound message and finds its conversation without creating one.
    async fn prepare(&self, inbound: &Inbound) -> Result<(Target, UserMessage)> {
        let text = inbound.text.trim();
        if crate::domain::is_blank(text) {
            return Err(Error::Invalid("message is empty".into()));
        }
        let pool = &self.inner.pool;
        let target = if inbound.channel == ChannelKind::WebChat {
            // WebChat keys are conversation ids chosen by the page; anything else is new.
            match inbound.conversation_key.parse::<i64>() {
                Ok(id) => match memory::get_conversation(pool, ConversationId(id)).await? {
                    Some(c) if c.channel == ChannelKind::WebChat => Target::Existing(c.id),
                    _ => return Err(Error::NotFound(format!("conversation {id} does not exist"))),
                },
                Err(_) => Target::NewWebChat { title: title_from(text) },
            }
        } else {
            let key = inbound.conversation_key.as_str();
            match memory::find_conversation(pool, inbound.channel, key).await? {
                Some(c) => Target::Existing(c.id),
                None => Target::NewChannel {
                    channel: inbound.channel,
                    key: key.to_string(),
                    title: format!("{} {}", inbound.channel, inbound.sender),
                },
            }
        };
        let user = UserMessage { text: text.to_string(), external_id: inbound.external_id.clone() };
        Ok((target, user))
    }

    /// Takes the conversation's turn (waiting as `waiting` says) and starts the answer.
    async fn begin(
        &self,
        target: Target,
        user: Option<UserMessage>,
        tier: Option<Tier>,
        waiting: Waiting,
    ) -> Result<mpsc::Receiver<Event>> {
        // The answer's clock (`ttft_ms`, `total_ms`) starts here, with the request, so it
        // counts what the person waits for: the conversation's turn, loading the model,
        // the engine's queue, prefill, every model call and tool round.
        let received = Instant::now();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let mut target = target;
        let mut guard = None;
        if let Target::Existing(id) = target {
            let slot = self.turn_slot(id);
            match slot.clone().try_lock_owned() {
                Ok(owned) => guard = Some(self.turn_guard(id, owned)),
                Err(_) if waiting == Waiting::Inline => {
                    guard = Some(self.turn_guard(id, slot.lock_owned().await));
                }
                Err(_) => {
                    let _ = tx
                        .send(Event::Notice {
                            kind: BUSY_NOTICE_KIND.into(),
                            message: BUSY_NOTICE.into(),
                        })
                        .await;
                    let this = self.clone();
                    tokio::spawn(async move {
                        // A caller that drops the receiver while waiting withdraws its
                        // message: nothing of it is stored, as for a refused request. (The
                        // WebChat's relay never does: its answers outlive the page.)
                        let owned = tokio::select! {
                            owned = slot.lock_owned() => owned,
                            _ = tx.closed() => return,
                        };
                        let guard = this.turn_guard(id, owned);
                        let started =
                            this.run_turn(target, user, tier, Some(guard), received, &tx).await;
                        let message = match started {
                            Ok(TurnStart::Started) => return,
                            Ok(TurnStart::Raced(_)) => "the conversation is busy".to_string(),
                            Err(err) => err.to_string(),
                        };
                        let _ = tx.send(Event::Error { message, partial_message_id: None }).await;
                    });
                    return Ok(rx);
                }
            }
        }
        loop {
            let turn =
                self.run_turn(target.clone(), user.clone(), tier, guard.take(), received, &tx);
            match turn.await? {
                TurnStart::Started => return Ok(rx),
                TurnStart::Raced(id) => {
                    // Rare: two first messages of a new channel conversation at once. Wait
                    // for the other one's answer, then answer with it in the history.
                    let slot = self.turn_slot(id);
                    guard = Some(self.turn_guard(id, slot.lock_owned().await));
                    target = Target::Existing(id);
                }
            }
        }
    }

    /// Builds the prompt, asks the router, and only once the model accepted it creates the
    /// conversation (when new), stores the user message and starts streaming. Holds the
    /// conversation's turn from here until the answer is stored.
    async fn run_turn(
        &self,
        target: Target,
        user: Option<UserMessage>,
        tier: Option<Tier>,
        guard: Option<TurnGuard>,
        received: Instant,
        tx: &mpsc::Sender<Event>,
    ) -> Result<TurnStart> {
        let inner = &self.inner;
        let pool = &inner.pool;
        let tier = tier.unwrap_or_else(|| inner.router.default_tier());
        let (existing, channel) = match &target {
            Target::Existing(id) => {
                // It may have been deleted, or be being deleted, while this request waited
                // for its turn.
                let closing = lock(&inner.closing).contains(id);
                let conversation = match memory::get_conversation(pool, *id).await? {
                    Some(conversation) if !closing => conversation,
                    _ => return Err(Error::NotFound(format!("conversation {} was deleted", id.0))),
                };
                (Some(*id), conversation.channel)
            }
            Target::NewWebChat { .. } => (None, ChannelKind::WebChat),
            Target::NewChannel { channel, .. } => (None, *channel),
        };
        let n_stored = match existing {
            Some(id) => memory::message_count(pool, id).await? as usize,
            None => 0,
        };
        let user_text = user.as_ref().map(|u| u.text.as_str());
        let accepted = self.ask(existing, n_stored, user_text, tier).await?;

        // The model accepted the prompt: from here the turn is recorded.
        let mut user = user;
        let mut user_message_id = None;
        let conversation_id = match target {
            Target::Existing(id) => id,
            // A new conversation and its first message are stored together, so a write
            // refused between them (a full disk) leaves no empty conversation. Its id is
            // new: its turn is free.
            Target::NewWebChat { title } => match user.take() {
                Some(first) => {
                    let mut message = NewMessage::plain(ConversationId(0), Role::User, first.text);
                    message.external_id = first.external_id;
                    let (conversation, user_id) =
                        memory::create_webchat_conversation_with(pool, Some(&title), &message)
                            .await?;
                    user_message_id = Some(user_id);
                    conversation.id
                }
                None => memory::create_webchat_conversation(pool, Some(&title)).await?.id,
            },
            Target::NewChannel { channel, key, title } => {
                memory::get_or_create_conversation(pool, channel, &key, Some(&title)).await?.id
            }
        };
        let guard = match guard {
            Some(guard) => guard,
            None => match self.try_turn(conversation_id) {
                Some(guard) => guard,
                // Dropping `accepted` here stops the engine.
                None => return Ok(TurnStart::Raced(conversation_id)),
            },
        };
        if let Some(user) = user {
            let mut message = NewMessage::plain(conversation_id, Role::User, user.text);
            message.external_id = user.external_id;
            user_message_id = Some(memory::add_message(pool, &message).await?);
        }
        if let Some(user_id) = user_message_id {
            let _ = inner.events.send(ConversationEvent {
                conversation_id,
                change: Change::Stored { message_id: user_id, role: Role::User },
            });
        }
        let answering = Answering { conversation_id, channel, guard };
        self.launch(accepted, answering, user_message_id, received, tx).await;
        Ok(TurnStart::Started)
    }

    /// Builds the prompt of a turn and asks the router, trimming the window in steps on a
    /// context overflow. The prompt is the first `n_stored` stored messages of `existing`
    /// (through the window), then `user_text` as the user turn when given. Nothing is
    /// stored: the caller records the turn once this returns the accepted prompt, and
    /// dropping it stops the engine.
    async fn ask(
        &self,
        existing: Option<ConversationId>,
        n_stored: usize,
        user_text: Option<&str>,
        tier: Tier,
    ) -> Result<Accepted> {
        let inner = &self.inner;
        let persona = self.persona().await?;
        let n_messages = n_stored + usize::from(user_text.is_some());
        let floor = existing.map_or(0, |id| self.floor(id));
        let mut start = inner.window.start(n_messages, floor);
        let mut window = match existing {
            Some(id) if start < n_stored => {
                let stored =
                    memory::messages_from(&inner.pool, id, start as i64, (n_stored - start) as i64)
                        .await?;
                prompt_turns(start, stored)
            }
            _ => Vec::new(),
        };
        if let Some(text) = user_text {
            window.push((n_messages - 1, ChatTurn::new(Role::User, text.to_string())));
        }
        if window.is_empty() {
            return Err(Error::Invalid("the conversation has no message to answer".into()));
        }

        // The system prompt is never cut: when the model says the prompt does not fit, the
        // window start jumps forward a step at a time (the newest message always stays),
        // and the new start is kept for the next turns.
        let system = ChatTurn::new(Role::System, persona.system_turn());
        let params = self.params();
        let mut trimmed = 0usize;
        let tools = self.tool_use(ToolChoice::Auto);
        let routed = loop {
            let request = build_request(&system, &window, &params, &tools);
            match inner.router.stream(tier, request).await {
                Ok(routed) => break routed,
                Err(LlmError::ContextOverflow { .. }) if message_span(&window) > 1 => {
                    start = Self::trimmed_start(&window);
                    let before = message_span(&window);
                    window.retain(|(index, _)| *index >= start);
                    trimmed += before - message_span(&window);
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Accepted { routed, tier, system, window, params, n_messages, start, floor, trimmed })
    }

    /// Starts the answer to an accepted prompt in a conversation whose turn `answering`
    /// holds: `Meta` (naming `user_message_id`, the stored user message it answers), the
    /// notices, then the streaming answer in its own task.
    async fn launch(
        &self,
        accepted: Accepted,
        answering: Answering,
        user_message_id: Option<MessageId>,
        received: Instant,
        tx: &mpsc::Sender<Event>,
    ) {
        let Answering { conversation_id, channel, guard } = answering;
        let inner = &self.inner;
        let Accepted { routed, tier, system, window, params, n_messages, start, floor, trimmed } =
            accepted;
        if start > floor {
            lock(&inner.floors).insert(conversation_id, start);
        }
        let turn = inner.next_turn.fetch_add(1, Ordering::Relaxed);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel();
        // Registered before `Meta` goes out, so a stop sent on `Meta` finds it.
        let running = Running { turn, stop: stop_tx, ended: ended_rx };
        lock(&inner.running).insert(conversation_id, running);
        let _ = tx
            .send(Event::Meta {
                conversation_id,
                tier: routed.tier,
                provider: routed.info.provider.clone(),
                model: routed.info.model.clone(),
                // Main may answer a prompt that a failed cloud call had already sent.
                host: routed.host(),
                leaves_machine: routed.leaves_machine(),
                user_message_id,
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

        // The next window's start; its prefix is what to prepare once this answer is stored.
        // Before the conversation reaches that point there is nothing yet.
        let next_start = inner.window.next_start(start);
        let warm = (inner.window.warm && next_start <= n_messages).then(|| WarmPlan {
            tier,
            system: system.clone(),
            prefix: window
                .iter()
                .filter(|(index, _)| *index >= next_start)
                .map(|(_, turn)| turn.clone())
                .collect(),
            params: params.clone(),
        });
        let mut run = Generation {
            assistant: self.clone(),
            conversation_id,
            turn,
            guard,
            tier: routed.tier,
            provider: routed.info.provider.clone(),
            model: routed.info.model.clone(),
            host: routed.host(),
            leaves_machine: routed.leaves_machine(),
            warm,
            system,
            window,
            params,
            floor: start,
            received,
            ended: ended_tx,
            drafts: None,
        };
        // Only a WebChat answer is saved as it is written. A channel's message that a stop
        // interrupts is answered again by the inbound queue after the restart (it finds its
        // stored question and answers it): a recovered draft there would be taken for its
        // answer and sent cut short, or sit beside the new one.
        if channel == ChannelKind::WebChat {
            let first = run.draft(Vec::new());
            run.drafts = Some(DraftSaver::start(inner.pool.clone(), first));
        }
        tokio::spawn(run.drive(routed.stream, tx.clone(), stop_rx));
    }

    /// The window start after one trimming step: the older half of the window's messages
    /// goes (an even number when it can, so the window still starts on the same side of the
    /// conversation), never the newest message. Halving keeps the number of re-prefills
    /// logarithmic in how far the prompt is over, and the start stays there afterwards. An
    /// answer with tool rounds is several turns of one message: it stays or goes whole.
    fn trimmed_start(window: &[(usize, ChatTurn)]) -> usize {
        let mut indices: Vec<usize> = window.iter().map(|(index, _)| *index).collect();
        indices.dedup();
        let cut = (indices.len() / 2) & !1;
        let cut = cut.clamp(1, indices.len().saturating_sub(1).max(1));
        indices.get(cut).copied().unwrap_or(0)
    }

    fn turn_slot(&self, conversation_id: ConversationId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.turns).entry(conversation_id).or_default().clone()
    }

    fn try_turn(&self, conversation_id: ConversationId) -> Option<TurnGuard> {
        let owned = self.turn_slot(conversation_id).try_lock_owned().ok()?;
        Some(self.turn_guard(conversation_id, owned))
    }

    fn turn_guard(
        &self,
        conversation_id: ConversationId,
        owned: tokio::sync::OwnedMutexGuard<()>,
    ) -> TurnGuard {
        TurnGuard { conversation_id, owned: Some(owned), slots: self.inner.turns.clone() }
    }

    /// Removes the stop switch of `turn` if it is still registered (a stop may have taken it).
    fn finish_running(&self, conversation_id: ConversationId, turn: u64) {
        let mut running = lock(&self.inner.running);
        if running.get(&conversation_id).is_some_and(|r| r.turn == turn) {
            running.remove(&conversation_id);
        }
    }
}

/// A conversation's turn held by `Assistant::quiesce`: no answer runs in it until dropped.
pub struct ConversationHold {
    _guard: TurnGuard,
    _closing: Closing,
}

/// A conversation's mark in `Inner::closing`, removed when dropped.
struct Closing {
    conversation_id: ConversationId,
    set: Arc<Mutex<HashSet<ConversationId>>>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.conversation_id);
    }
}

/// A conversation's turn, held by one answer. Dropping it lets the next waiting message
/// start, and forgets the conversation's slot when nobody waits for it.
struct TurnGuard {
    conversation_id: ConversationId,
    owned: Option<tokio::sync::OwnedMutexGuard<()>>,
    slots: TurnSlots,
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        self.owned.take();
        // Waiters clone the slot under this same lock, so a count of one (the map's) means
        // nobody holds or waits for it.
        if slots.get(&self.conversation_id).is_some_and(|slot| Arc::strong_count(slot) == 1) {
            slots.remove(&self.conversation_id);
        }
    }
}

/// What to hand to `Router::warm` once an answer is stored: the next window's prefix.
struct WarmPlan {
    tier: Tier,
    system: ChatTurn,
    /// The turns of this prompt from the next window's start on (the answer is added).
    prefix: Vec<ChatTurn>,
    params: GenerationParams,
}

/// The turns a prompt holds from stored messages starting at index `start`: failed answers
/// are shown to the user but are not part of what the model saw, and system notes are not
/// turns. An answer with tool rounds becomes its calls, their results and its text, as the
/// model produced them (so the next prompt starts with what the last one held). Each turn
/// keeps its message's conversation index.
fn prompt_turns(start: usize, stored: Vec<memory::StoredMessage>) -> Vec<(usize, ChatTurn)> {
    stored
        .into_iter()
        .enumerate()
        .filter(|(_, m)| m.status != MessageStatus::Error && m.role != Role::System)
        .flat_map(|(offset, m)| {
            let index = start + offset;
            let turns = if m.role == Role::Assistant && !m.tool_rounds.is_empty() {
                ChatTurn::answer_with_rounds(&m.tool_rounds, &m.content)
            } else {
                vec![ChatTurn::new(m.role, m.content)]
            };
            turns.into_iter().map(move |turn| (index, turn))
        })
        .collect()
}

/// How many messages a window's turns come from.
fn message_span(window: &[(usize, ChatTurn)]) -> usize {
    let mut indices: Vec<usize> = window.iter().map(|(index, _)| *index).collect();
    indices.dedup();
    indices.len()
}

fn build_request(
    system: &ChatTurn,
    window: &[(usize, ChatTurn)],
    params: &GenerationParams,
    tools: &ToolUse,
) -> LlmRequest {
    let mut messages = Vec::with_capacity(window.len() + 1);
    messages.push(system.clone());
    messages.extend(window.iter().map(|(_, turn)| turn.clone()));
    LlmRequest { messages, params: params.clone(), tools: tools.clone() }
}

/// The turns of this answer's rounds so far, as the model's next request continues with.
fn round_turns(rounds: &[ToolRound]) -> Vec<ChatTurn> {
    let mut turns = ChatTurn::answer_with_rounds(rounds, "");
    // `answer_with_rounds` ends with the final answer, which does not exist yet.
    turns.pop();
    turns
}

/// Whether a round created a reminder: a `reminders_create` call whose result is no error.
fn created_a_reminder(rounds: &[ToolRound]) -> bool {
    rounds.iter().any(|round| {
        round.calls.iter().any(|call| {
            call.name == REMINDER_CREATE_TOOL
                && round.results.iter().any(|r| r.call_id == call.id && !r.is_error)
        })
    })
}

// --- messages written without a model (issue 15, reminders) -------------------------------

impl Assistant {
    /// Stores `text` as the assistant's message in an existing conversation and announces
    /// it to open pages, in the conversation's turn (after any answer running there), with
    /// no model involved: a reminder firing. Returns the stored message.
    pub async fn post(&self, conversation_id: ConversationId, text: &str) -> Result<MessageId> {
        let slot = self.turn_slot(conversation_id);
        let _guard = self.turn_guard(conversation_id, slot.lock_owned().await);
        let pool = &self.inner.pool;
        if memory::get_conversation(pool, conversation_id).await?.is_none() {
            return Err(Error::NotFound(format!(
                "conversation {} does not exist",
                conversation_id.0
            )));
        }
        let message = NewMessage::plain(conversation_id, Role::Assistant, text);
        let message_id = memory::add_message(pool, &message).await?;
        let _ = self.inner.events.send(ConversationEvent {
            conversation_id,
            change: Change::Stored { message_id, role: Role::Assistant },
        });
        Ok(message_id)
    }
}

/// Locks a std mutex, carrying on after a panic elsewhere (the maps stay consistent: every
/// update is a single insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a turn's events into the reply a channel or a job sends, publishing each to `live`
/// as it comes, so a page can follow the answer while it is written.
async fn collect(
    live: &LiveAnswers,
    conversation_id: ConversationId,
    mut rx: mpsc::Receiver<Event>,
) -> Reply {
    let mut publisher = live.publisher(Reader::Collector);
    let mut reply = Reply {
        conversation_id,
        message_id: None,
        text: String::new(),
        notices: Vec::new(),
        error: None,
    };
    while let Some(event) = rx.recv().await {
        publisher.publish(&event);
        match event {
            Event::Meta { conversation_id, .. } => reply.conversation_id = conversation_id,
            Event::Token(t) => reply.text.push_str(&t),
            // Channels send the final text only: what came before a round of calls was the
            // model thinking aloud on its way to the answer.
            Event::ToolCall { .. } => reply.text.clear(),
            Event::ToolResult { .. } => {}
            Event::Notice { kind, message } => {
                if kind == CORRECTION_NOTICE_KIND {
                    // The stored answer carries it too (see `Generation::drive`).
                    reply.text.push_str("\n\n");
                    reply.text.push_str(&message);
                }
                reply.notices.push((kind, message));
            }
            Event::Done { message_id: Some(message_id), .. } => reply.message_id = Some(message_id),
            // Stopped before it wrote anything: there is no answer to send.
            Event::Done { message_id: None, .. } => {
                reply.error = Some(STOPPED_BEFORE_ANY_TEXT.into());
            }
            Event::Error { message, partial_message_id } => {
                reply.error = Some(message);
                reply.message_id = partial_message_id;
            }
        }
    }
    reply
}

/// One running answer: forwards chunks to the caller, stores the result, gives the turn
/// back and prepares the next window.
struct Generation {
    assistant: Assistant,
    conversation_id: ConversationId,
    turn: u64,
    guard: TurnGuard,
    tier: Tier,
    provider: String,
    model: String,
    /// Whether any model call of this answer left the machine (the ledger keeps that one).
    host: Option<String>,
    leaves_machine: bool,
    warm: Option<WarmPlan>,
    /// The prompt the answer started from, for the model calls after each round of tools.
    system: ChatTurn,
    window: Vec<(usize, ChatTurn)>,
    params: GenerationParams,
    /// Where the window starts (trimming during the rounds moves it, like a turn's).
    floor: usize,
    /// When the request reached the assistant: the start of `ttft_ms` and `total_ms`.
    received: Instant,
    /// Dropped once the answer is stored and the turn released (see `Running::ended`).
    ended: oneshot::Sender<()>,
    /// Saves the answer's text as it is written (WebChat answers only; see `launch`).
    drafts: Option<DraftSaver>,
}

/// How often the text of an answer being written is saved at most: a process killed
/// mid-answer loses about this much of it.
const DRAFT_EVERY: Duration = Duration::from_secs(1);

/// Saves an answer's text so far while it streams (`db::drafts`), off the token path: a
/// token only arms a timer (when it is not armed yet); when it fires, `DRAFT_EVERY` after
/// the last save, the text is handed to a task of its own that writes the newest snapshot
/// it has. One copy of the text a second, and a slow disk makes the writer skip snapshots,
/// never delays a token; text written just before the model pauses is saved all the same.
struct DraftSaver {
    latest: watch::Sender<Option<Draft>>,
    writer: tokio::task::JoinHandle<()>,
    /// What each snapshot holds besides the text: the ledger and the rounds so far.
    template: Draft,
    saved_at: tokio::time::Instant,
    /// Fires `DRAFT_EVERY` after the last save; armed once text came after it.
    flush: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl DraftSaver {
    /// Starts the writer with `first` (the answer before its first text: a process that
    /// stops before any leaves the question marked unanswered rather than silent).
    fn start(pool: SqlitePool, first: Draft) -> DraftSaver {
        let (latest, snapshots) = watch::channel(Some(first.clone()));
        let writer = tokio::spawn(write_drafts(pool, snapshots));
        let saved_at = tokio::time::Instant::now();
        DraftSaver {
            latest,
            writer,
            template: first,
            saved_at,
            flush: Box::pin(tokio::time::sleep_until(saved_at + DRAFT_EVERY)),
            armed: false,
        }
    }

    /// The answer's text grew: it is saved when the flush fires.
    fn text_grew(&mut self) {
        if !self.armed {
            self.flush.as_mut().reset(self.saved_at + DRAFT_EVERY);
            self.armed = true;
        }
    }

    /// Hands `text` (and the template) to the writer now.
    fn save(&mut self, text: &str) {
        self.saved_at = tokio::time::Instant::now();
        self.armed = false;
        let draft = Draft { content: text.to_string(), ..self.template.clone() };
        self.latest.send_replace(Some(draft));
    }

    /// Stops saving, and returns once no write is under way: the finished answer is stored
    /// (and the draft removed) only after the last write, which could otherwise save the
    /// draft again after it.
    async fn finish(self) {
        self.latest.send_replace(None);
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "the draft writer ended abnormally");
        }
    }
}

/// Resolves when `drafts` has text to save and its flush is due; never without a saver.
async fn draft_due(drafts: Option<&mut DraftSaver>) {
    match drafts {
        Some(drafts) if drafts.armed => drafts.flush.as_mut().await,
        _ => std::future::pending().await,
    }
}

/// The task of a `DraftSaver`: writes the newest snapshot until it is told to stop (`None`).
async fn write_drafts(pool: SqlitePool, mut snapshots: watch::Receiver<Option<Draft>>) {
    loop {
        let Some(draft) = snapshots.borrow_and_update().clone() else { return };
        if let Err(e) = drafts::save(&pool, &draft).await {
            // The answer goes on; only its crash insurance is late (or the conversation was
            // deleted under it, which stops the answer anyway).
            tracing::warn!(conversation = draft.conversation_id.0, error = %e, "saving the answer being written failed");
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// How one model call of an answer ended.
enum StepEnd {
    Finished(Usage, FinishReason),
    /// The stop switch, or the client left.
    Cancelled,
    Failed(String),
}

/// What one model call produced.
struct Step {
    text: String,
    calls: Vec<ToolCall>,
    /// Text pieces received (see `drive`).
    n_pieces: u32,
    /// When the first of them arrived.
    first_text: Option<Instant>,
    /// The prompt's size, as the local engine said when it took the call (0 otherwise).
    prompt_tokens: u32,
    /// When the local engine took the call (`Chunk::Accepted`).
    accepted: Option<Instant>,
    end: StepEnd,
}

impl Step {
    /// The prefill and decode time of a call that did not finish, which the engine never
    /// reports (its `Done` is not sent to a stream that went away): on the stream's clock,
    /// from the engine taking the call to its first text, and from there to `ended`. Zero
    /// for what is unknown (a remote server, which says nothing before its text).
    fn unfinished_times(&self, ended: Instant) -> (u64, u64) {
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis() as u64;
        match (self.accepted, self.first_text) {
            (Some(accepted), Some(first)) => (ms(accepted, first), ms(first, ended)),
            (Some(accepted), None) => (ms(accepted, ended), 0),
            (None, Some(first)) => (0, ms(first, ended)),
            (None, None) => (0, 0),
        }
    }

    /// What is known of a call that did not finish, ended now: its text pieces (the local
    /// engine sends one per generated token that has text, so a lower bound of its
    /// completion), its prompt's size when the local engine said it on taking the call, and
    /// its times (`unfinished_times`).
    fn unfinished_usage(&self) -> Usage {
        let (prefill_ms, decode_ms) = self.unfinished_times(Instant::now());
        Usage {
            completion_tokens: self.n_pieces,
            prompt_tokens: self.prompt_tokens,
            prefill_ms,
            decode_ms,
            ..Usage::default()
        }
    }
}

/// Resolves when the stop switch is pressed; never when it is dropped unpressed (the
/// assistant going away): only the stop endpoint or a leaving client stops an answer.
async fn stop_pressed(stop: &mut oneshot::Receiver<()>, open: &mut bool) {
    if *open {
        if (&mut *stop).await.is_ok() {
            return;
        }
        *open = false;
    }
    std::future::pending::<()>().await
}

impl Generation {
    async fn drive(
        mut self,
        stream: ChunkStream,
        tx: mpsc::Sender<Event>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut stop_open = true;
        // What is known of the model call that did not finish (`Step::unfinished_usage`).
        let mut unfinished = Usage::default();
        // When the first text arrived, and when the first model call ended: the time to
        // first token, on the same clock as the total (`received`).
        let mut first_text: Option<Instant> = None;
        let mut first_call_end: Option<Instant> = None;
        let mut total = Usage::default();
        let mut rounds: Vec<ToolRound> = Vec::new();
        let mut context: Option<Option<ToolContext>> = None;
        let mut stream = stream;
        // Whether the request being answered offered tools (the last one never does).
        let mut offering = !self.assistant.inner.agent.tools.is_empty();
        let (text, outcome): (String, std::result::Result<(Usage, FinishReason), String>) = loop {
            let step =
                read_step(&mut stream, &tx, &mut stop, &mut stop_open, self.drafts.as_mut()).await;
            // Dropping the stream here (before running tools or storing) releases the engine.
            drop(stream);
            first_text = first_text.or(step.first_text);
            first_call_end.get_or_insert_with(Instant::now);
            if !matches!(step.end, StepEnd::Finished(..)) {
                unfinished = step.unfinished_usage();
            }
            let (usage, finish) = match step.end {
                StepEnd::Cancelled => {
                    break (step.text, Ok((Usage::default(), FinishReason::Cancelled)));
                }
                StepEnd::Failed(e) => break (step.text, Err(e)),
                StepEnd::Finished(usage, finish) => (usage, finish),
            };
            add_usage(&mut total, &usage);
            if step.calls.is_empty() || !offering {
                if !step.calls.is_empty() {
                    tracing::debug!(
                        conversation = self.conversation_id.0,
                        calls = step.calls.len(),
                        "tool calls after the last round ignored"
                    );
                }
                // An answer never ends before it says something: a last call with no text is
                // a failure, stored as one (partial when rounds ran), never an empty answer.
                if step.text.trim().is_empty() {
                    let reason = if step.calls.is_empty() && finish == FinishReason::Length {
                        "the model reached its length limit before writing anything".to_string()
                    } else if step.calls.is_empty() {
                        "the model ended its answer without writing anything".to_string()
                    } else if rounds.is_empty() {
                        "the model called tools, but none are enabled (TOOLS)".to_string()
                    } else {
                        format!(
                            "the model kept calling tools after its last allowed step \
                             (AGENT_MAX_STEPS = {})",
                            self.assistant.inner.agent.max_steps
                        )
                    };
                    break (String::new(), Err(reason));
                }
                let finish =
                    if finish == FinishReason::ToolCalls { FinishReason::Stop } else { finish };
                break (step.text, Ok((total.clone(), finish)));
            }

            // A round: run the calls in order, then ask the model again with their results.
            if context.is_none() {
                context = Some(self.tool_context().await);
            }
            let ctx = context.as_ref().and_then(Option::as_ref);
            let (round, cancelled) =
                self.run_calls(step.text, step.calls, ctx, &tx, &mut stop, &mut stop_open).await;
            rounds.push(round);
            if cancelled {
                break (String::new(), Ok((Usage::default(), FinishReason::Cancelled)));
            }
            // The round is part of the answer now: saved at once, with no text after it yet.
            self.update_draft(&rounds);
            if let Some(drafts) = self.drafts.as_mut() {
                drafts.save("");
            }
            let choice = if rounds.len() >= self.assistant.inner.agent.max_steps {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            };
            offering = choice != ToolChoice::None;
            match self.next_stream(&rounds, choice, &tx, &mut stop, &mut stop_open).await {
                Ok(next) => {
                    stream = next;
                    // The router may have fallen back to another model for this call.
                    self.update_draft(&rounds);
                }
                Err(StepEnd::Failed(e)) => break (String::new(), Err(e)),
                Err(_) => break (String::new(), Ok((Usage::default(), FinishReason::Cancelled))),
            }
        };
        // An answer cut short reports what is known: the model calls that finished (their
        // prompt, prefill and decode), plus the text pieces of the one that did not, its
        // prompt's size when the local engine said it (a remote server says it only at the
        // end, so a first call stopped there leaves it unknown: 0) and its times as the
        // stream saw them (`Step::unfinished_usage`).
        let cut_short = Usage {
            completion_tokens: total.completion_tokens + unfinished.completion_tokens,
            prompt_tokens: if unfinished.prompt_tokens > 0 {
                unfinished.prompt_tokens
            } else {
                total.prompt_tokens
            },
            prefill_ms: total.prefill_ms + unfinished.prefill_ms,
            decode_ms: total.decode_ms + unfinished.decode_ms,
            ..total.clone()
        };

        // No snapshot may be written after the answer is stored (it would come back after the
        // next restart as a second answer): the saver ends here, before the store.
        let had_draft = match self.drafts.take() {
            Some(drafts) => {
                drafts.finish().await;
                true
            }
            None => false,
        };
        // Stopped before it wrote a word or ran a tool (waiting in the engine's queue, behind
        // a model load, in its prefill): nothing to keep, and an empty message would be an
        // empty bubble and an empty turn in every later prompt. The question stays as the
        // last message, unanswered, as after a failed send: the page can send it again or
        // regenerate.
        let nothing_written = matches!(outcome, Ok((_, FinishReason::Cancelled)))
            && text.trim().is_empty()
            && rounds.is_empty();
        let (status, mut usage, finish, error) = match outcome {
            Ok((_, FinishReason::Cancelled)) => {
                (MessageStatus::Partial, cut_short, FinishReason::Cancelled, None)
            }
            Ok((usage, finish)) => (MessageStatus::Complete, usage, finish, None),
            // Calls already ran (a reminder may exist): the answer keeps them, as partial.
            Err(e) if text.is_empty() && rounds.is_empty() => {
                (MessageStatus::Error, Usage::default(), FinishReason::Stop, Some(e))
            }
            Err(e) => (MessageStatus::Partial, cut_short, FinishReason::Stop, Some(e)),
        };
        // The engine times a call from when it got it; the answer's time to first token is
        // on the answer's clock, so that it is never more than `total_ms`. An answer without
        // text counts, as the engine does, until its first model call ended.
        usage.ttft_ms = first_text
            .or(first_call_end)
            .map_or(0, |at| at.duration_since(self.received).as_millis() as u64);
        let mut content = if status == MessageStatus::Error {
            memory::no_answer_text(error.as_deref().unwrap_or("unknown error"))
        } else {
            text
        };
        // An answer that says a reminder was set when no call created one gets a correction,
        // shown now and kept in the stored text that channels send.
        if status != MessageStatus::Error
            && claims_reminder(&content)
            && !created_a_reminder(&rounds)
        {
            content.push_str("\n\n");
            content.push_str(REMINDER_CORRECTION);
            let _ = tx
                .send(Event::Notice {
                    kind: CORRECTION_NOTICE_KIND.into(),
                    message: REMINDER_CORRECTION.into(),
                })
                .await;
        }
        let message = NewMessage {
            conversation_id: self.conversation_id,
            role: Role::Assistant,
            content,
            tier: Some(self.tier.as_str().to_string()),
            provider: Some(self.provider.clone()),
            model: Some(self.model.clone()),
            // An answer cut short in its first model call never learned its prompt's size:
            // unknown, not zero.
            prompt_tokens: (status == MessageStatus::Complete || usage.prompt_tokens > 0)
                .then_some(i64::from(usage.prompt_tokens)),
            completion_tokens: Some(i64::from(usage.completion_tokens)),
            status,
            external_id: None,
            host: self.host.clone(),
            left_machine: self.leaves_machine,
        };
        let inner = &self.assistant.inner;
        let stored = if nothing_written {
            if had_draft {
                if let Err(e) = drafts::discard(&inner.pool, self.conversation_id).await {
                    // Left, it would become an answer that says the server stopped.
                    tracing::error!(conversation = self.conversation_id.0, error = %e, "removing the stopped answer's draft failed");
                }
            }
            Ok(None)
        } else {
            // A stop is the user's, unless the process was shutting down.
            let failure = error.as_deref().or_else(|| {
                (finish == FinishReason::Cancelled && inner.shutting_down.load(Ordering::SeqCst))
                    .then_some(SHUTDOWN_REASON)
            });
            memory::add_answer(&inner.pool, &message, &rounds, failure).await.map(Some)
        };
        let message_id = match stored {
            Ok(None) => None,
            Ok(Some(id)) => {
                let _ = inner.events.send(ConversationEvent {
                    conversation_id: self.conversation_id,
                    change: Change::Stored { message_id: id, role: Role::Assistant },
                });
                Some(id)
            }
            Err(e) => {
                tracing::error!(conversation = self.conversation_id.0, error = %e, "storing the answer failed");
                None
            }
        };
        // The turn ends once the answer is stored: the next message of this conversation
        // sees it in its history.
        self.assistant.finish_running(self.conversation_id, self.turn);
        drop(self.guard);
        drop(self.ended);
        let event = match (error, message_id) {
            (Some(message), partial_message_id) => Event::Error {
                message,
                partial_message_id: partial_message_id.filter(|_| status == MessageStatus::Partial),
            },
            (None, None) if !nothing_written => Event::Error {
                message: "the answer could not be stored".into(),
                partial_message_id: None,
            },
            (None, message_id) => Event::Done {
                message_id,
                usage,
                finish,
                total_ms: self.received.elapsed().as_millis() as u64,
            },
        };
        let _ = tx.send(event).await;

        // The next window's prefix goes to the model before the caller's stream closes, so
        // the prepared state is requested before the next turn can be.
        let warming = match (self.warm, message_id) {
            (Some(plan), Some(_)) => {
                let mut prefix = plan.prefix;
                // A failed answer is not part of the next prompts (see `prompt_turns`).
                if status != MessageStatus::Error {
                    prefix.extend(ChatTurn::answer_with_rounds(&rounds, &message.content));
                }
                let mut messages = Vec::with_capacity(prefix.len() + 1);
                messages.push(plan.system);
                messages.extend(prefix);
                let tools = self.assistant.tool_use(ToolChoice::Auto);
                let request = LlmRequest { messages, params: plan.params, tools };
                Some(inner.router.warm(plan.tier, request))
            }
            _ => None,
        };
        drop(tx);
        if let Some(warming) = warming {
            if let Err(err) = warming.await {
                tracing::debug!(conversation = self.conversation_id.0, error = %err, "warming the next window failed");
            }
        }
    }

    /// The answer so far as a draft with no text: its rounds and its ledger as it stands.
    fn draft(&self, tool_rounds: Vec<ToolRound>) -> Draft {
        Draft {
            conversation_id: self.conversation_id,
            content: String::new(),
            tool_rounds,
            tier: Some(self.tier.as_str().to_string()),
            provider: Some(self.provider.clone()),
            model: Some(self.model.clone()),
            host: self.host.clone(),
            left_machine: self.leaves_machine,
            started_at: crate::db::now_ms(),
        }
    }

    /// What the next draft snapshots hold besides the text: `rounds` and the ledger now (a
    /// fallback may have changed who answers).
    fn update_draft(&mut self, rounds: &[ToolRound]) {
        let Some(started_at) = self.drafts.as_ref().map(|d| d.template.started_at) else {
            return;
        };
        let template = Draft { started_at, ..self.draft(rounds.to_vec()) };
        if let Some(drafts) = self.drafts.as_mut() {
            drafts.template = template;
        }
    }

    /// Who a tool call runs for: `None` when the conversation is gone (deleted while
    /// answering), and every call then gets an error result.
    async fn tool_context(&self) -> Option<ToolContext> {
        tool_context_of(&self.assistant.inner.pool, self.conversation_id).await
    }

    /// Runs one round's calls in order (at most `MAX_CALLS_PER_ROUND` of them), telling the
    /// caller of each call and result. Returns
    /// the round (with the results of the calls that ran) and whether the answer was
    /// stopped meanwhile.
    async fn run_calls(
        &self,
        text: String,
        calls: Vec<ToolCall>,
        context: Option<&ToolContext>,
        tx: &mpsc::Sender<Event>,
        stop: &mut oneshot::Receiver<()>,
        stop_open: &mut bool,
    ) -> (ToolRound, bool) {
        // Longer ids are replaced like missing ones (OpenAI's are 29 characters, vLLM's 46).
        const MAX_CALL_ID_CHARS: usize = 100;
        let tools = &self.assistant.inner.agent.tools;
        let mut round = ToolRound { text, calls: Vec::new(), results: Vec::new() };
        for (index, call) in calls.into_iter().enumerate() {
            // What the answer keeps of a call (stored, streamed, in later prompts) is bounded:
            // oversized arguments are cut, and the registry does not run such a call.
            let mut kept = crate::tools::kept_call(&call);
            // Results name their call: every call needs an id, unique in the answer.
            if kept.id.is_empty()
                || kept.id.chars().nth(MAX_CALL_ID_CHARS).is_some()
                || round.calls.iter().any(|c| c.id == kept.id)
            {
                kept.id = new_call_id();
            }
            round.calls.push(kept.clone());
            if tx.send(Event::ToolCall { call: kept.clone() }).await.is_err() {
                return (round, true);
            }
            let result = match context {
                // Answered, not run: the model reads why and can ask again next round.
                _ if index >= MAX_CALLS_PER_ROUND => error_result(
                    &kept.id,
                    &ToolError::Failed(format!(
                        "not run: at most {MAX_CALLS_PER_ROUND} calls are run in one round; \
                         make the others in the next one"
                    )),
                ),
                Some(context) => {
                    let call = ToolCall { id: kept.id.clone(), ..call };
                    tokio::select! {
                        result = tools.call(context, &call) => result,
                        _ = stop_pressed(stop, stop_open) => return (round, true),
                    }
                }
                None => error_result(
                    &kept.id,
                    &ToolError::Failed("the conversation no longer exists".into()),
                ),
            };
            round.results.push(result.clone());
            let event = Event::ToolResult { name: kept.name.clone(), result };
            if tx.send(event).await.is_err() {
                return (round, true);
            }
        }
        (round, false)
    }

    /// Asks the model again with the rounds so far, on the tier the turn asked for (the
    /// router's fallback applies to each call). A prompt over the context trims the window
    /// like a turn does; `Err(Cancelled)` when the answer is stopped while waiting.
    async fn next_stream(
        &mut self,
        rounds: &[ToolRound],
        choice: ToolChoice,
        tx: &mpsc::Sender<Event>,
        stop: &mut oneshot::Receiver<()>,
        stop_open: &mut bool,
    ) -> std::result::Result<ChunkStream, StepEnd> {
        let assistant = self.assistant.clone();
        let inner = &assistant.inner;
        let tools = assistant.tool_use(choice);
        let tail = round_turns(rounds);
        let mut trimmed = 0usize;
        let routed: Routed = loop {
            let mut request = build_request(&self.system, &self.window, &self.params, &tools);
            request.messages.extend(tail.iter().cloned());
            let asked = tokio::select! {
                asked = inner.router.stream(self.tier, request) => asked,
                _ = stop_pressed(stop, stop_open) => return Err(StepEnd::Cancelled),
                _ = tx.closed() => return Err(StepEnd::Cancelled),
            };
            match asked {
                Ok(routed) => break routed,
                Err(LlmError::ContextOverflow { .. }) if message_span(&self.window) > 1 => {
                    let start = Assistant::trimmed_start(&self.window);
                    let before = message_span(&self.window);
                    self.window.retain(|(index, _)| *index >= start);
                    trimmed += before - message_span(&self.window);
                    if start > self.floor {
                        self.floor = start;
                        lock(&inner.floors).insert(self.conversation_id, start);
                    }
                    // The prepared next window was planned from the old start.
                    self.warm = None;
                }
                Err(e) => return Err(StepEnd::Failed(e.to_string())),
            }
        };
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
        // The ledger names who answered; a call that left the machine (its answer, or only
        // its prompt before a fallback) is never hidden by a later local one.
        if routed.leaves_machine() || !self.leaves_machine {
            self.provider = routed.info.provider.clone();
            self.model = routed.info.model.clone();
            self.host = routed.host();
            self.leaves_machine = routed.leaves_machine();
        }
        Ok(routed.stream)
    }
}

/// Reads one model call to its end: text goes to the caller as it comes (and to `drafts`,
/// which saves it at most every `DRAFT_EVERY`), tool calls are collected for the round.
async fn read_step(
    stream: &mut ChunkStream,
    tx: &mpsc::Sender<Event>,
    stop: &mut oneshot::Receiver<()>,
    stop_open: &mut bool,
    mut drafts: Option<&mut DraftSaver>,
) -> Step {
    let mut step = Step {
        text: String::new(),
        calls: Vec::new(),
        n_pieces: 0,
        first_text: None,
        prompt_tokens: 0,
        accepted: None,
        end: StepEnd::Cancelled,
    };
    step.end = loop {
        let next = tokio::select! {
            chunk = stream.recv() => chunk,
            _ = stop_pressed(stop, stop_open) => {
                // A stop that came while the engine's word that it took the call was already
                // waiting here (a busy machine polls late, and `select!` picks at random
                // among ready branches) still learns the prompt's size from it.
                while let Ok(chunk) = stream.try_recv() {
                    if let Ok(Chunk::Accepted { prompt_tokens }) = chunk {
                        step.prompt_tokens = prompt_tokens;
                        step.accepted.get_or_insert_with(Instant::now);
                    }
                }
                break StepEnd::Cancelled;
            }
            () = draft_due(drafts.as_deref_mut()) => {
                if let Some(drafts) = drafts.as_deref_mut() {
                    drafts.save(&step.text);
                }
                continue;
            }
        };
        match next {
            Some(Ok(Chunk::Text(t))) => {
                step.text.push_str(&t);
                step.n_pieces += 1;
                step.first_text.get_or_insert_with(Instant::now);
                if tx.send(Event::Token(t)).await.is_err() {
                    // The client left: dropping the stream stops the engine.
                    break StepEnd::Cancelled;
                }
                if let Some(drafts) = drafts.as_deref_mut() {
                    drafts.text_grew();
                }
            }
            Some(Ok(Chunk::Notice { kind, message })) => {
                let _ = tx.send(Event::Notice { kind, message }).await;
            }
            Some(Ok(Chunk::ToolCall(call))) => step.calls.push(call),
            Some(Ok(Chunk::Accepted { prompt_tokens })) => {
                step.prompt_tokens = prompt_tokens;
                step.accepted = Some(Instant::now());
            }
            Some(Ok(Chunk::Done { usage, finish })) => break StepEnd::Finished(usage, finish),
            Some(Err(e)) => break StepEnd::Failed(e.to_string()),
            None => break StepEnd::Failed("the model stream ended unexpectedly".into()),
        }
    };
    step
}

/// Who a tool call in conversation `id` runs for, read from the conversation row: `None`
/// when it is gone or cannot be read.
async fn tool_context_of(pool: &SqlitePool, id: ConversationId) -> Option<ToolContext> {
    match memory::get_conversation(pool, id).await {
        Ok(Some(c)) => Some(ToolContext {
            conversation_id: c.id,
            channel: c.channel,
            // WebChat conversations are addressed by their id (as cron targets are).
            conversation_key: if c.channel == ChannelKind::WebChat {
                c.id.0.to_string()
            } else {
                c.external_key
            },
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(conversation = id.0, error = %e, "cannot read the conversation for a tool call");
            None
        }
    }
}

/// Adds one model call's accounting to the answer's: tokens generated and time spent add
/// up; the prompt is the last call's (the longest). The time to first token is the
/// answer's own (see `drive`), not a call's.
fn add_usage(total: &mut Usage, step: &Usage) {
    total.prompt_tokens = step.prompt_tokens;
    total.cached_tokens = step.cached_tokens;
    total.completion_tokens += step.completion_tokens;
    total.prefill_ms += step.prefill_ms;
    total.decode_ms += step.decode_ms;
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

    /// A stop and the engine's `Accepted` both ready when the step is first polled: the
    /// stop wins (`select!` may pick either), and the prompt's size is still learned. Run
    /// many times, as one pick is a coin toss.
    #[tokio::test]
    async fn a_stop_that_races_the_engines_accepted_still_learns_the_prompts_size() {
        for _ in 0..32 {
            let (chunks, mut stream) = mpsc::channel(4);
            chunks.send(Ok(Chunk::Accepted { prompt_tokens: 3_500 })).await.unwrap();
            let (pressed, mut stop) = oneshot::channel();
            pressed.send(()).unwrap();
            let (tx, _rx) = mpsc::channel(4);
            let mut stop_open = true;
            let step = read_step(&mut stream, &tx, &mut stop, &mut stop_open, None).await;
            assert!(matches!(step.end, StepEnd::Cancelled | StepEnd::Failed(_)));
            assert_eq!(step.prompt_tokens, 3_500);
            assert!(step.accepted.is_some());
        }
    }

    #[test]
    fn persona_system_turn_substitutes_the_name() {
        let p = Persona { name: "Pince".into(), system_prompt: DEFAULT_SYSTEM_PROMPT.into() };
        assert!(p.system_turn().starts_with("You are Pince, a private personal assistant"));
    }

    /// Every window start for conversations of 1..=200 messages, with no trimming.
    fn starts(policy: WindowPolicy) -> Vec<usize> {
        (1..=200).map(|n| policy.start(n, 0)).collect()
    }

    #[test]
    fn stepping_window_sizes_stay_within_bounds() {
        for history in [1, 2, 4, 6, 7, 20, 21] {
            let policy = WindowPolicy::stepping(history);
            assert!(policy.step >= 2 && policy.step.is_multiple_of(2), "{policy:?}");
            for (n, start) in (1..=200).zip(starts(policy)) {
                let size = n - start;
                assert!(size >= history.min(n), "n={n} {policy:?}: {size} messages");
                assert!(size <= policy.max_messages(), "n={n} {policy:?}: {size} messages");
                // Steps land on even indices: user messages in an alternating conversation.
                assert_eq!(start % 2, 0, "n={n} {policy:?}");
            }
        }
    }

    #[test]
    fn stepping_window_start_is_monotone_and_moves_in_steps() {
        let policy = WindowPolicy::stepping(20);
        assert_eq!((policy.step, policy.max_messages()), (10, 29));
        let starts = starts(policy);
        let mut moves = 0;
        for pair in starts.windows(2) {
            assert!(pair[1] >= pair[0], "never moves back: {pair:?}");
            if pair[1] != pair[0] {
                assert_eq!(pair[1] - pair[0], policy.step, "moves by whole steps");
                moves += 1;
            }
        }
        // 200 messages: the window stepped at 30, 40, … 200.
        assert_eq!(moves, 18);
        // Deterministic: the same count gives the same start (a restart computes it again).
        assert_eq!(starts, self::starts(WindowPolicy::stepping(20)));
        assert_eq!(policy.start(29, 0), 0);
        assert_eq!(policy.start(30, 0), 10);
        assert_eq!(policy.start(39, 0), 10);
    }

    #[test]
    fn the_prepared_start_is_where_the_window_moves_next_also_after_trimming() {
        let policy = WindowPolicy::stepping(6);
        // From each start, on a step or left between steps by trimming (the floor), the
        // first different start the conversation reaches is the one prepared.
        for floor in 0..30 {
            let reached = (floor + 1..200)
                .map(|n| policy.start(n, floor))
                .find(|&start| start != floor && start > 0)
                .expect("the window moves");
            assert_eq!(policy.next_start(floor), reached, "from {floor}");
        }
    }

    #[test]
    fn sliding_window_is_the_last_n_messages() {
        let policy = WindowPolicy::sliding(20);
        for n in 1..=200 {
            assert_eq!(n - policy.start(n, 0), n.min(20), "n={n}");
        }
    }

    #[test]
    fn a_trimming_floor_holds_the_start_and_keeps_the_newest_message() {
        let policy = WindowPolicy::stepping(20);
        // Trimmed to start at 12: the start stays there until the natural start passes it.
        assert_eq!(policy.start(25, 12), 12);
        assert_eq!(policy.start(33, 12), 12);
        assert_eq!(policy.start(40, 12), 20);
        // Never past the newest message, whatever the floor.
        assert_eq!(policy.start(5, 40), 4);
        assert_eq!(policy.start(0, 0), 0);
    }

    #[test]
    fn titles_are_short_first_lines() {
        assert_eq!(title_from("Hello\nworld"), "Hello");
        let long = "é".repeat(100);
        assert_eq!(title_from(&long).chars().count(), 61);
    }
}
