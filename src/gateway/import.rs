//! `POST /api/import`: conversations from an export file become WebChat conversations, to
//! read, search and go on with. Three formats, told apart by their shape: my-claw's own
//! (`my-claw.export` from "Export all", `my-claw.conversation` from one conversation's
//! export), Open WebUI's chat export (a JSON array of chats), and ChatGPT's
//! `conversations.json` (a JSON array of conversations with a `mapping` tree).
//!
//! Owns reading those formats: which messages count (user and assistant text; system
//! prompts, tool traffic, hidden and empty messages are left out), and the branch of an
//! edited conversation that is kept (the one shown last, as each application shows it).
//! Storing is `db::import`'s: one transaction per conversation, keyed by the source's id,
//! so a file imported twice adds nothing the second time.

use std::collections::HashSet;
use std::fmt;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use serde_json::Value;

use crate::db::import::{self, ImportedConversation, ImportedMessage, Stored};
use crate::db::now_ms;
use crate::domain::Role;
use crate::gateway::error::{ApiError, ApiJson};
use crate::gateway::AppState;

/// The largest file accepted: "Export all" of about 45,000 conversations, or ChatGPT's
/// export of as many. The file is read whole; its conversations are read one at a time
/// from it (never the whole document as a JSON tree, which takes ten times its size), and
/// one import runs at a time.
pub const IMPORT_MAX_BYTES: usize = 256 * 1024 * 1024;
/// Titles are cut to this many characters (the API's own limit for a rename).
const MAX_TITLE_CHARS: usize = 200;
/// Conversations listed back in the answer (the count covers all).
const LISTED: usize = 100;
/// A time later than this far ahead of now is not a time the file can mean.
const FUTURE_SLACK_MS: i64 = 24 * 3600 * 1000;

/// One import at a time: a second one while a file is being read is refused (409), so two
/// large files never sit in memory together.
static ONE_IMPORT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub fn router() -> Router<AppState> {
    // The body is read by the handler, with its own limit, once it holds the import's turn.
    Router::new().route("/api/import", post(post_import).layer(DefaultBodyLimit::disable()))
}

#[derive(Debug, Serialize)]
struct ImportSummary {
    /// `my-claw`, `open-webui` or `chatgpt`.
    format: &'static str,
    imported: usize,
    /// Conversations imported before (same source and id): left as they are.
    already_there: usize,
    messages: usize,
    /// Conversations of the file with no message to keep (only system or empty ones).
    empty: usize,
    /// Items of the file's list that are not conversations of its format (wrong types,
    /// missing ids): skipped, and counted so that nothing vanishes without a word.
    unreadable: usize,
    /// The first conversations imported, to open one.
    conversations: Vec<ImportedJson>,
}

#[derive(Debug, Serialize)]
struct ImportedJson {
    id: i64,
    title: Option<String>,
}

async fn post_import(
    State(state): State<AppState>,
    body: Body,
) -> Result<ApiJson<ImportSummary>, ApiError> {
    let _turn = ONE_IMPORT.try_acquire().map_err(|_| {
        ApiError::Conflict("another import is running: try again when it has finished".into())
    })?;
    let body = read_body(body).await?;
    let document = read_document(&body)?;
    drop(body);
    let Document { format, conversations, unreadable } = document;
    let mut summary = ImportSummary {
        format,
        imported: 0,
        already_there: 0,
        messages: 0,
        empty: 0,
        unreadable,
        conversations: Vec::new(),
    };
    for conversation in conversations {
        if conversation.messages.is_empty() {
            summary.empty += 1;
            continue;
        }
        match import::store_conversation(&state.pool, &conversation).await? {
            Stored::Created(id) => {
                summary.imported += 1;
                summary.messages += conversation.messages.len();
                if summary.conversations.len() < LISTED {
                    summary
                        .conversations
                        .push(ImportedJson { id: id.0, title: conversation.title });
                }
            }
            Stored::AlreadyThere(_) => summary.already_there += 1,
        }
    }
    tracing::info!(
        format,
        imported = summary.imported,
        already_there = summary.already_there,
        messages = summary.messages,
        unreadable = summary.unreadable,
        "conversations imported"
    );
    Ok(ApiJson(summary))
}

/// The whole file, refused as soon as it is over `IMPORT_MAX_BYTES`.
async fn read_body(body: Body) -> Result<Vec<u8>, ApiError> {
    let mut file = Vec::new();
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the file could not be read: {e}")))?;
        if file.len() + chunk.len() > IMPORT_MAX_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the file is larger than {} MiB, the most an import takes",
                IMPORT_MAX_BYTES / (1024 * 1024)
            )));
        }
        file.extend_from_slice(&chunk);
    }
    Ok(file)
}

/// What a file holds: its format and conversations, oldest message first in each.
#[derive(Debug)]
struct Document {
    format: &'static str,
    conversations: Vec<ImportedConversation>,
    /// Items of its list that were not conversations of its format.
    unreadable: usize,
}

/// Reads `body`, told apart by its shape. A list (ChatGPT, Open WebUI) and a my-claw
/// export's `conversations` are read item by item: each conversation becomes a JSON tree
/// only while it is converted.
fn read_document(body: &[u8]) -> Result<Document, ApiError> {
    let mut reading = Reading::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = de::Deserializer::deserialize_any(&mut deserializer, TopLevel(&mut reading))
        .and_then(|()| deserializer.end());
    if let Err(e) = read {
        return Err(match reading.refused.take() {
            Some(refused) => refused,
            None if e.is_data() => unrecognized(&e.to_string()),
            None => ApiError::BadParam {
                param: "file",
                message: format!("the file is not JSON (line {}, column {})", e.line(), e.column()),
            },
        });
    }
    reading.finish()
}

/// What the visitors gather while the file is read.
#[derive(Default)]
struct Reading {
    /// A list's format, from its first item; `my-claw` for an object.
    format: Option<&'static str>,
    conversations: Vec<ImportedConversation>,
    unreadable: usize,
    /// An object's `format`, and its parts, seen in any order.
    object_format: Option<String>,
    listed: bool,
    one: Option<Value>,
    one_messages: Option<Value>,
    /// Why the file was refused while being read (the visitors' error says only "stop").
    refused: Option<ApiError>,
}

impl Reading {
    fn item(&mut self, item: Value) -> Result<(), ApiError> {
        let format = match self.format {
            Some(format) => format,
            None if item.get("mapping").is_some() => *self.format.insert("chatgpt"),
            None if item.get("chat").is_some() => *self.format.insert("open-webui"),
            None => {
                return Err(unrecognized(
                    "a JSON list whose items are neither ChatGPT's nor Open WebUI's",
                ))
            }
        };
        let conversation = match format {
            "chatgpt" => chatgpt_conversation(&item),
            _ => open_webui_conversation(&item),
        };
        self.keep(conversation);
        Ok(())
    }

    fn keep(&mut self, conversation: Option<ImportedConversation>) {
        match conversation {
            Some(conversation) => self.conversations.push(conversation),
            None => self.unreadable += 1,
        }
    }

    fn finish(mut self) -> Result<Document, ApiError> {
        let format = match (self.format, self.object_format.as_deref()) {
            (Some(format), _) => format,
            (None, Some("my-claw.export")) if self.listed => "my-claw",
            (None, Some("my-claw.export")) => {
                return Err(unrecognized("a my-claw export without its `conversations` list"))
            }
            (None, Some("my-claw.conversation")) => {
                let mut conversation = self.one.take().ok_or_else(|| {
                    unrecognized("a my-claw conversation export without its `conversation`")
                })?;
                // One conversation's export keeps its messages beside it.
                if let (Some(fields), Some(messages)) =
                    (conversation.as_object_mut(), self.one_messages.take())
                {
                    fields.insert("messages".into(), messages);
                }
                self.conversations.clear();
                self.unreadable = 0;
                let conversation = my_claw_conversation(&conversation);
                self.keep(conversation);
                "my-claw"
            }
            (None, Some(_)) => {
                return Err(unrecognized("a JSON object that is not a my-claw export"))
            }
            // A list with no item.
            (None, None) => "empty",
        };
        Ok(Document { format, conversations: self.conversations, unreadable: self.unreadable })
    }
}

/// The file's top level: a list of conversations, or a my-claw export object.
struct TopLevel<'a>(&'a mut Reading);

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list of conversations or a my-claw export")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            if let Err(refused) = self.0.item(item) {
                self.0.refused = Some(refused);
                return Err(de::Error::custom("refused"));
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut is_object = false;
        while let Some(key) = map.next_key::<String>()? {
            is_object = true;
            match key.as_str() {
                "format" => {
                    self.0.object_format = map.next_value::<Value>()?.as_str().map(Into::into)
                }
                "conversations" => {
                    map.next_value_seed(MyClawList(self.0))?;
                    self.0.listed = true;
                }
                "conversation" => self.0.one = Some(map.next_value()?),
                "messages" => self.0.one_messages = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !is_object || self.0.object_format.is_none() {
            self.0.refused = Some(unrecognized("a JSON object that is not a my-claw export"));
            return Err(de::Error::custom("refused"));
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.refuse()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.refuse()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.refuse()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.refuse()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.refuse()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.refuse()
    }
}

impl TopLevel<'_> {
    fn refuse<E: de::Error>(self) -> Result<(), E> {
        self.0.refused = Some(unrecognized("JSON that is neither an object nor a list"));
        Err(E::custom("refused"))
    }
}

/// A my-claw export's `conversations`, one at a time.
struct MyClawList<'a>(&'a mut Reading);

impl<'de> DeserializeSeed<'de> for MyClawList<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for MyClawList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            let conversation = my_claw_conversation(&item);
            self.0.keep(conversation);
        }
        Ok(())
    }
}

fn unrecognized(what: &str) -> ApiError {
    ApiError::BadParam {
        param: "file",
        message: format!(
            "unrecognized file ({what}): expected a my-claw export, an Open WebUI chat export \
             or ChatGPT's conversations.json"
        ),
    }
}

/// A conversation of a my-claw export: every field as exported. A WebChat conversation
/// keeps its key, so one imported back where it came from is recognised; one of another
/// channel becomes a WebChat conversation keyed by its channel and key.
fn my_claw_conversation(value: &Value) -> Option<ImportedConversation> {
    let channel = value.get("channel")?.as_str()?;
    let key = value.get("external_key")?.as_str()?;
    let (key, origin) = if channel == "webchat" {
        (key.to_string(), None)
    } else {
        (format!("import:{channel}:{key}"), Some((channel.to_string(), key.to_string())))
    };
    let messages = value
        .get("messages")?
        .as_array()?
        .iter()
        .filter_map(|m| {
            let role = chat_role(m.get("role")?.as_str()?)?;
            let content = m.get("content")?.as_str()?;
            let status = match m.get("status").and_then(Value::as_str) {
                Some("partial") => "partial",
                Some("error") => "error",
                _ => "complete",
            };
            let text = |field: &str| m.get(field).and_then(Value::as_str).map(str::to_string);
            let rounds =
                m.get("tool_rounds").filter(|r| r.as_array().is_some_and(|r| !r.is_empty()));
            let host = text("host");
            Some(ImportedMessage {
                role,
                content: content.to_string(),
                created_at: m
                    .get("created_at")
                    .and_then(Value::as_i64)
                    .and_then(plausible_ms)
                    .unwrap_or(i64::MIN),
                tier: text("tier"),
                provider: text("provider"),
                model: text("model"),
                status,
                tool_rounds: rounds.map(Value::to_string),
                left_machine: left_machine(role, host.as_deref(), m.get("left_machine")),
                host,
            })
        })
        .collect();
    let created_at = value.get("created_at").and_then(Value::as_i64).and_then(plausible_ms);
    Some(ImportedConversation {
        key,
        origin,
        title: value.get("title").and_then(Value::as_str).and_then(title),
        created_at: created_at.unwrap_or_else(now_ms),
        messages: fill_times(messages, created_at),
    })
}

/// A chat of Open WebUI's export: `{id, title, created_at, chat: {history: {messages,
/// currentId}, messages}}`, times in seconds. The branch shown last is the one from
/// `currentId` up its `parentId`s; without a history, the `messages` list as it is.
fn open_webui_conversation(value: &Value) -> Option<ImportedConversation> {
    let chat = value.get("chat")?;
    let id = value.get("id").or_else(|| chat.get("id")).and_then(id_text)?;
    let history = chat.get("history");
    let nodes = history.and_then(|h| h.get("messages")).and_then(Value::as_object);
    let current = history.and_then(|h| h.get("currentId")).and_then(Value::as_str);
    let branch: Vec<&Value> = match (nodes, current) {
        (Some(nodes), Some(current)) => {
            let mut branch = Vec::new();
            let mut next = Some(current);
            // A node seen before ends the walk: a cycle in a damaged file neither loops
            // forever nor repeats a message.
            let mut seen = HashSet::new();
            while let Some(id) = next.filter(|id| seen.insert(*id)) {
                let Some(node) = nodes.get(id) else { break };
                branch.push(node);
                next = node.get("parentId").and_then(Value::as_str);
            }
            branch.reverse();
            branch
        }
        _ => chat.get("messages").and_then(Value::as_array)?.iter().collect(),
    };
    let created_at = seconds_to_ms(value.get("created_at").or_else(|| chat.get("timestamp")));
    let messages = branch
        .into_iter()
        .filter_map(|m| {
            let role = chat_role(m.get("role")?.as_str()?)?;
            let content = m.get("content")?.as_str()?.trim();
            if content.is_empty() {
                return None;
            }
            let model = m.get("model").and_then(Value::as_str).map(str::to_string);
            Some(foreign_message(
                role,
                content,
                seconds_to_ms(m.get("timestamp")),
                "open-webui",
                model,
                false,
            ))
        })
        .collect();
    Some(ImportedConversation {
        key: format!("import:open-webui:{id}"),
        origin: None,
        title: value
            .get("title")
            .or_else(|| chat.get("title"))
            .and_then(Value::as_str)
            .and_then(title),
        created_at: created_at.unwrap_or_else(now_ms),
        messages: fill_times(messages, created_at),
    })
}

/// A conversation of ChatGPT's `conversations.json`: `{id, title, create_time, mapping:
/// {node: {message, parent}}, current_node}`, times in seconds. The branch shown last is
/// the one from `current_node` up its parents. Messages hidden from the conversation
/// (system context, tool traffic) and parts that are not text (images) are left out.
fn chatgpt_conversation(value: &Value) -> Option<ImportedConversation> {
    let mapping = value.get("mapping")?.as_object()?;
    let id = value.get("conversation_id").or_else(|| value.get("id")).and_then(id_text)?;
    let mut branch = Vec::new();
    let mut next = value.get("current_node").and_then(Value::as_str);
    let mut seen = HashSet::new();
    while let Some(node_id) = next.filter(|id| seen.insert(*id)) {
        let Some(node) = mapping.get(node_id) else { break };
        branch.push(node);
        next = node.get("parent").and_then(Value::as_str);
    }
    branch.reverse();
    let created_at = seconds_to_ms(value.get("create_time"));
    let messages = branch
        .into_iter()
        .filter_map(|node| {
            let message = node.get("message")?;
            let role = chat_role(message.get("author")?.get("role")?.as_str()?)?;
            let metadata = message.get("metadata");
            if metadata
                .and_then(|m| m.get("is_visually_hidden_from_conversation"))
                .and_then(Value::as_bool)
                == Some(true)
            {
                return None;
            }
            let content = message.get("content")?;
            let kind = content.get("content_type").and_then(Value::as_str);
            if !matches!(kind, Some("text") | Some("multimodal_text") | None) {
                return None;
            }
            let text: Vec<&str> = content
                .get("parts")?
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .filter(|p| !p.trim().is_empty())
                .collect();
            if text.is_empty() {
                return None;
            }
            let model = metadata
                .and_then(|m| m.get("model_slug"))
                .and_then(Value::as_str)
                .map(str::to_string);
            let at = seconds_to_ms(message.get("create_time"));
            Some(foreign_message(role, text.join("\n\n").trim(), at, "chatgpt", model, true))
        })
        .collect();
    Some(ImportedConversation {
        key: format!("import:chatgpt:{id}"),
        origin: None,
        title: value.get("title").and_then(Value::as_str).and_then(title),
        created_at: created_at.unwrap_or_else(now_ms),
        messages: fill_times(messages, created_at),
    })
}

/// A message written in another application. `left_machine`: whether its answers were
/// written by a service elsewhere (ChatGPT's always were; Open WebUI's may have been a
/// local model, and its export does not say).
fn foreign_message(
    role: Role,
    content: &str,
    created_at: Option<i64>,
    source: &str,
    model: Option<String>,
    left_machine: bool,
) -> ImportedMessage {
    let answer = role == Role::Assistant;
    ImportedMessage {
        role,
        content: content.to_string(),
        // Filled in by `fill_times` when the file has none.
        created_at: created_at.unwrap_or(i64::MIN),
        tier: None,
        provider: answer.then(|| source.to_string()),
        model: model.filter(|_| answer),
        status: "complete",
        tool_rounds: None,
        host: None,
        left_machine: answer && left_machine,
    }
}

/// Messages without a time get the one before them (or the conversation's), so the
/// conversation's last activity is never the time of the import.
fn fill_times(mut messages: Vec<ImportedMessage>, start: Option<i64>) -> Vec<ImportedMessage> {
    let mut last = start.unwrap_or_else(now_ms);
    for message in &mut messages {
        if message.created_at == i64::MIN {
            message.created_at = last;
        }
        last = message.created_at;
    }
    messages
}

/// The privacy ledger of an exported message: an answer from a host that is not this
/// machine's loopback left the machine whatever the file says, and one whose file does not
/// say (or says it in another type) is counted as having left it.
fn left_machine(role: Role, host: Option<&str>, said: Option<&Value>) -> bool {
    let remote = host.is_some_and(|h| !crate::llm::providers::openai_compat::is_loopback_host(h));
    match said.and_then(Value::as_bool) {
        Some(said) => said || remote,
        None => role == Role::Assistant,
    }
}

/// User and assistant turns; everything else (system prompts, tools) is not a message of
/// the conversation as its reader saw it.
fn chat_role(role: &str) -> Option<Role> {
    match role {
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        _ => None,
    }
}

/// An id as text, whether the file wrote it as a string or a number.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Seconds since the epoch (an integer or a fraction) as milliseconds, when plausible.
fn seconds_to_ms(value: Option<&Value>) -> Option<i64> {
    let seconds = value?.as_f64()?;
    // `as` saturates: 1e300 becomes i64::MAX, which `plausible_ms` refuses.
    seconds.is_finite().then_some((seconds * 1000.0) as i64).and_then(plausible_ms)
}

/// Milliseconds since the epoch that a file can mean: after 1970 and not later than a day
/// from now. Anything else (a corrupted field, seconds taken for milliseconds) would pin
/// its conversation to the top or bottom of the list for good.
fn plausible_ms(ms: i64) -> Option<i64> {
    (ms > 0 && ms <= now_ms().saturating_add(FUTURE_SLACK_MS)).then_some(ms)
}

/// A title as stored: trimmed, at most `MAX_TITLE_CHARS`, none when blank.
fn title(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(MAX_TITLE_CHARS).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(document: &Value) -> Result<Document, ApiError> {
        read_document(document.to_string().as_bytes())
    }

    fn contents(conversation: &ImportedConversation) -> Vec<(Role, &str)> {
        conversation.messages.iter().map(|m| (m.role, m.content.as_str())).collect()
    }

    #[test]
    fn chatgpt_keeps_the_branch_shown_last_and_only_visible_text() {
        let document = json!([{
            "title": "Bread",
            "create_time": 1_700_000_000.5,
            "id": "c1",
            "current_node": "a2",
            "mapping": {
                "root": {"message": null, "parent": null},
                "sys": {"parent": "root", "message": {"author": {"role": "system"},
                    "content": {"content_type": "text", "parts": [""]},
                    "metadata": {"is_visually_hidden_from_conversation": true}}},
                "u1": {"parent": "sys", "message": {"author": {"role": "user"}, "create_time": 1_700_000_001.0,
                    "content": {"content_type": "text", "parts": ["How long to proof?"]}}},
                "a1": {"parent": "u1", "message": {"author": {"role": "assistant"},
                    "content": {"content_type": "text", "parts": ["An older answer"]}}},
                "a2": {"parent": "u1", "message": {"author": {"role": "assistant"}, "create_time": 1_700_000_009.0,
                    "content": {"content_type": "multimodal_text", "parts": [{"asset_pointer": "file"}, "4 to 12 hours."]},
                    "metadata": {"model_slug": "gpt-4o"}}},
                "t1": {"parent": "a2", "message": {"author": {"role": "tool"},
                    "content": {"content_type": "text", "parts": ["tool output"]}}}
            }
        }]);
        let Document { format, conversations, .. } = read(&document).unwrap();
        assert_eq!(format, "chatgpt");
        let c = &conversations[0];
        assert_eq!(c.key, "import:chatgpt:c1");
        assert_eq!(c.title.as_deref(), Some("Bread"));
        assert_eq!(c.created_at, 1_700_000_000_500);
        assert_eq!(
            contents(c),
            [(Role::User, "How long to proof?"), (Role::Assistant, "4 to 12 hours.")]
        );
        let answer = &c.messages[1];
        assert_eq!(answer.created_at, 1_700_000_009_000);
        assert_eq!(answer.model.as_deref(), Some("gpt-4o"));
        assert_eq!(answer.provider.as_deref(), Some("chatgpt"));
        assert!(answer.left_machine);
        assert!(!c.messages[0].left_machine && c.messages[0].provider.is_none());
    }

    #[test]
    fn open_webui_follows_current_id_and_falls_back_to_the_message_list() {
        let document = json!([
            {"id": "w1", "title": "Trip", "created_at": 1_700_000_000, "chat": {
                "history": {"currentId": "m3", "messages": {
                    "m1": {"id": "m1", "parentId": null, "role": "user", "content": "Plan Lisbon", "timestamp": 1_700_000_001},
                    "m2": {"id": "m2", "parentId": "m1", "role": "assistant", "content": "Day 1: Alfama", "model": "llama3"},
                    "m3": {"id": "m3", "parentId": "m2", "role": "user", "content": "And day 2?", "timestamp": 1_700_000_050},
                    "mx": {"id": "mx", "parentId": "m1", "role": "assistant", "content": "A regenerated one"}
                }}}},
            {"id": 7, "title": "  ", "chat": {"messages": [
                {"role": "system", "content": "You are helpful"},
                {"role": "user", "content": "Hi"}]}}
        ]);
        let Document { format, conversations, .. } = read(&document).unwrap();
        assert_eq!(format, "open-webui");
        let trip = &conversations[0];
        assert_eq!(trip.key, "import:open-webui:w1");
        assert_eq!(
            contents(trip),
            [
                (Role::User, "Plan Lisbon"),
                (Role::Assistant, "Day 1: Alfama"),
                (Role::User, "And day 2?")
            ]
        );
        // A message without a time takes the one before it.
        assert_eq!(trip.messages[1].created_at, 1_700_000_001_000);
        assert_eq!(trip.messages[1].model.as_deref(), Some("llama3"));
        assert!(!trip.messages[1].left_machine, "the export does not say");
        let second = &conversations[1];
        assert_eq!(second.key, "import:open-webui:7");
        assert_eq!(second.title, None);
        assert_eq!(contents(second), [(Role::User, "Hi")]);
    }

    #[test]
    fn my_claw_exports_round_trip_with_their_ledger() {
        let message = json!({"id": 5, "role": "assistant", "content": "Hello", "tier": "main",
            "provider": "local", "model": "qwen3-14b", "status": "partial", "created_at": 1_700_000_000_000_i64,
            "tool_rounds": [{"calls": []}], "host": null, "left_machine": false});
        let all = json!({"format": "my-claw.export", "version": 1, "conversations": [
            {"id": 1, "channel": "webchat", "external_key": "wc-00ff", "title": "Hi", "created_at": 1, "updated_at": 2,
             "messages": [{"id": 4, "role": "user", "content": "Hi", "created_at": 1}, message]},
            {"id": 2, "channel": "whatsapp", "external_key": "33612345678", "title": null, "created_at": 1, "updated_at": 2,
             "messages": [{"id": 6, "role": "system", "content": "note", "created_at": 1}]}
        ]});
        let Document { format, conversations, .. } = read(&all).unwrap();
        assert_eq!(format, "my-claw");
        assert_eq!(conversations[0].key, "wc-00ff", "found again where it came from");
        let answer = &conversations[0].messages[1];
        assert_eq!(
            (answer.tier.as_deref(), answer.model.as_deref(), answer.status),
            (Some("main"), Some("qwen3-14b"), "partial")
        );
        assert_eq!(answer.tool_rounds.as_deref(), Some(r#"[{"calls":[]}]"#));
        assert_eq!(conversations[1].key, "import:whatsapp:33612345678");
        assert!(conversations[1].messages.is_empty(), "system notes are not turns");

        let one = json!({"format": "my-claw.conversation", "version": 1,
            "conversation": {"id": 1, "channel": "webchat", "external_key": "wc-01", "title": "One", "created_at": 1, "updated_at": 1},
            "messages": [{"role": "user", "content": "Only", "created_at": 3}]});
        let conversations = read(&one).unwrap().conversations;
        assert_eq!(contents(&conversations[0]), [(Role::User, "Only")]);
    }

    /// QA pass 11: a cycle in a damaged file's parent links ends the walk without repeating
    /// a message; times no file can mean (far future, negative) are not kept; items that are
    /// not conversations are counted; an answer from a remote host left the machine.
    #[test]
    fn damaged_files_import_what_they_can_and_say_what_they_skipped() {
        let node = |parent: &str, role: &str, text: &str| {
            json!({"parent": parent, "message": {"author": {"role": role},
                "content": {"content_type": "text", "parts": [text]}}})
        };
        let cycle = json!([
            {"id": "c", "current_node": "a", "create_time": 1e300,
             "mapping": {"a": node("b", "user", "cycle A"), "b": node("a", "assistant", "cycle B")}},
            {"id": "s", "current_node": "x", "create_time": -5,
             "mapping": {"x": node("x", "user", "my own parent")}},
            0,
            {"mapping": {}},
        ]);
        let Document { conversations, unreadable, .. } = read(&cycle).unwrap();
        assert_eq!(
            contents(&conversations[0]),
            [(Role::Assistant, "cycle B"), (Role::User, "cycle A")]
        );
        assert_eq!(contents(&conversations[1]), [(Role::User, "my own parent")]);
        let now = now_ms();
        for c in &conversations {
            assert!((now - 60_000..=now + 60_000).contains(&c.created_at), "{}", c.created_at);
        }
        assert_eq!(unreadable, 2, "a number and a conversation without an id");

        let webui =
            json!([{"chat": 5}, {"chat": {}, "id": "z"}, {"chat": {"messages": "no"}, "id": "q"}]);
        let Document { format, conversations, unreadable } = read(&webui).unwrap();
        assert_eq!((format, conversations.len(), unreadable), ("open-webui", 0, 3));

        let message = |host: Value, left: Value| json!({"role": "assistant", "content": "x", "created_at": i64::MAX, "host": host, "left_machine": left});
        let export = json!({"format": "my-claw.export", "conversations": [
            {"channel": "webchat", "external_key": "k", "created_at": 1_700_000_000_000_i64, "messages": [
                message(json!("evil.example:443"), json!(false)),
                message(json!("127.0.0.1:8080"), json!(false)),
                message(Value::Null, json!("yes")),
                {"role": "user", "content": "q", "created_at": 1_700_000_000_500_i64}]},
            "not a conversation"]});
        let Document { conversations, unreadable, .. } = read(&export).unwrap();
        assert_eq!(unreadable, 1);
        let left: Vec<bool> = conversations[0].messages.iter().map(|m| m.left_machine).collect();
        assert_eq!(left, [true, false, true, false]);
        let times: Vec<i64> = conversations[0].messages.iter().map(|m| m.created_at).collect();
        assert_eq!(
            times,
            [1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_000, 1_700_000_000_500]
        );

        // The shape is checked where it is read: a list that is not one says so.
        let err = read(&json!({"format": "my-claw.export", "conversations": "x"}))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("unrecognized file (") && err.contains("list"), "{err}");
        let err = read_document(br#"[{"mapping": {}"#).unwrap_err().to_string();
        assert!(err.starts_with("the file is not JSON (line 1"), "{err}");
    }

    #[test]
    fn other_json_is_refused_saying_what_is_expected() {
        for document in
            [json!({"a": 1}), json!([{"x": 1}]), json!("text"), json!({"format": "my-claw.export"})]
        {
            let err = read(&document).unwrap_err().to_string();
            assert!(err.starts_with("unrecognized file ("), "{err}");
            assert!(err.contains("ChatGPT's conversations.json"), "{err}");
        }
        assert_eq!(read(&json!([])).unwrap().conversations.len(), 0);
    }
}
