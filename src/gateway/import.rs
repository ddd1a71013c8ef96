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

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::db::import::{self, ImportedConversation, ImportedMessage, Stored};
use crate::db::now_ms;
use crate::domain::Role;
use crate::gateway::error::{ApiError, ApiJson};
use crate::gateway::AppState;

/// The largest file accepted: about 30,000 conversations of ChatGPT's export.
pub const IMPORT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Titles are cut to this many characters (the API's own limit for a rename).
const MAX_TITLE_CHARS: usize = 200;
/// Conversations listed back in the answer (the count covers all).
const LISTED: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/import", post(post_import).layer(DefaultBodyLimit::max(IMPORT_MAX_BYTES)))
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
    body: Result<Bytes, BytesRejection>,
) -> Result<ApiJson<ImportSummary>, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "the file is larger than {} MiB, the most an import takes",
                IMPORT_MAX_BYTES / (1024 * 1024)
            ))
        } else {
            ApiError::BadRequest(format!("the file could not be read: {e}"))
        }
    })?;
    let document: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadParam {
        param: "file",
        message: format!("the file is not JSON (line {}, column {})", e.line(), e.column()),
    })?;
    drop(body);
    let (format, conversations) = read_document(&document)?;
    drop(document);
    let mut summary = ImportSummary {
        format,
        imported: 0,
        already_there: 0,
        messages: 0,
        empty: 0,
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
        "conversations imported"
    );
    Ok(ApiJson(summary))
}

/// The format of `document` and its conversations, oldest message first in each.
fn read_document(document: &Value) -> Result<(&'static str, Vec<ImportedConversation>), ApiError> {
    match document {
        Value::Object(object) => match object.get("format").and_then(Value::as_str) {
            Some("my-claw.export") => {
                let list =
                    object.get("conversations").and_then(Value::as_array).ok_or_else(|| {
                        unrecognized("a my-claw export without its `conversations` list")
                    })?;
                Ok(("my-claw", list.iter().filter_map(my_claw_conversation).collect()))
            }
            Some("my-claw.conversation") => {
                let mut conversation = object.get("conversation").cloned().ok_or_else(|| {
                    unrecognized("a my-claw conversation export without its `conversation`")
                })?;
                // One conversation's export keeps its messages beside it.
                if let (Some(fields), Some(messages)) =
                    (conversation.as_object_mut(), object.get("messages"))
                {
                    fields.insert("messages".into(), messages.clone());
                }
                Ok(("my-claw", my_claw_conversation(&conversation).into_iter().collect()))
            }
            _ => Err(unrecognized("a JSON object that is not a my-claw export")),
        },
        Value::Array(items) => {
            let Some(first) = items.first() else {
                return Ok(("empty", Vec::new()));
            };
            if first.get("mapping").is_some() {
                Ok(("chatgpt", items.iter().filter_map(chatgpt_conversation).collect()))
            } else if first.get("chat").is_some() {
                Ok(("open-webui", items.iter().filter_map(open_webui_conversation).collect()))
            } else {
                Err(unrecognized("a JSON list whose items are neither ChatGPT's nor Open WebUI's"))
            }
        }
        _ => Err(unrecognized("JSON that is neither an object nor a list")),
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
            Some(ImportedMessage {
                role,
                content: content.to_string(),
                created_at: m.get("created_at").and_then(Value::as_i64).unwrap_or_else(now_ms),
                tier: text("tier"),
                provider: text("provider"),
                model: text("model"),
                status,
                tool_rounds: rounds.map(Value::to_string),
                host: text("host"),
                left_machine: m.get("left_machine").and_then(Value::as_bool).unwrap_or(false),
            })
        })
        .collect();
    Some(ImportedConversation {
        key,
        origin,
        title: value.get("title").and_then(Value::as_str).and_then(title),
        created_at: value.get("created_at").and_then(Value::as_i64).unwrap_or_else(now_ms),
        messages,
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
            // Bounded by the node count: a cycle in a damaged file cannot loop forever.
            while let Some(id) = next.filter(|_| branch.len() <= nodes.len()) {
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
    while let Some(node_id) = next.filter(|_| branch.len() <= mapping.len()) {
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

/// Seconds since the epoch (an integer or a fraction) as milliseconds.
fn seconds_to_ms(value: Option<&Value>) -> Option<i64> {
    let seconds = value?.as_f64()?;
    (seconds.is_finite() && seconds > 0.0).then_some((seconds * 1000.0) as i64)
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
        let (format, conversations) = read_document(&document).unwrap();
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
        let (format, conversations) = read_document(&document).unwrap();
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
        let (format, conversations) = read_document(&all).unwrap();
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
        let (_, conversations) = read_document(&one).unwrap();
        assert_eq!(contents(&conversations[0]), [(Role::User, "Only")]);
    }

    #[test]
    fn other_json_is_refused_saying_what_is_expected() {
        for document in
            [json!({"a": 1}), json!([{"x": 1}]), json!("text"), json!({"format": "my-claw.export"})]
        {
            let err = read_document(&document).unwrap_err().to_string();
            assert!(err.starts_with("unrecognized file ("), "{err}");
            assert!(err.contains("ChatGPT's conversations.json"), "{err}");
        }
        assert_eq!(read_document(&json!([])).unwrap().1.len(), 0);
    }
}
