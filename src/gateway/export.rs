//! Downloads of what the database holds: `GET /api/conversations/{id}/export?format=md|json`
//! (one conversation, as Markdown to read or JSON to process) and `GET /api/export` (every
//! conversation with its messages as one JSON document, streamed page by page so memory
//! stays bounded whatever the size). Reading is `db::export`'s business.

use std::fmt::Write as _;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::db::export::{self, ExportConversation, ExportMessage};
use crate::db::now_ms;
use crate::domain::ConversationId;
use crate::gateway::conversations::parse_id;
use crate::gateway::error::{ApiError, ApiPath, ApiQuery};
use crate::gateway::AppState;

/// Rows read per query: what an export holds in memory at once.
const PAGE: i64 = 200;
const FORMAT_VERSION: u32 = 1;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations/{id}/export", get(get_conversation_export))
        .route("/api/export", get(get_export_all))
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    #[serde(default)]
    format: Option<String>,
}

#[derive(Debug, Serialize)]
struct ConversationDocument<'a> {
    format: &'static str,
    version: u32,
    exported_at: i64,
    conversation: ConversationJson<'a>,
    messages: Vec<MessageJson<'a>>,
}

#[derive(Debug, Serialize)]
struct ConversationJson<'a> {
    id: i64,
    channel: &'a str,
    external_key: &'a str,
    title: Option<&'a str>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, Serialize)]
struct MessageJson<'a> {
    id: i64,
    role: &'a str,
    content: &'a str,
    tier: Option<&'a str>,
    provider: Option<&'a str>,
    model: Option<&'a str>,
    status: &'a str,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    created_at: i64,
    /// The answer's tool rounds as stored (`[]` when it used no tool): which tools ran,
    /// with what, and what they returned.
    tool_rounds: serde_json::Value,
    host: Option<&'a str>,
    left_machine: bool,
    /// Why an answer failed or was cut by a shutdown, as the messages API's `error`;
    /// absent when it completed or the user stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

async fn get_conversation_export(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let id = ConversationId(parse_id(&id)?);
    let markdown = match query.format.as_deref().map(str::trim) {
        None | Some("") | Some("json") => false,
        Some("md") | Some("markdown") => true,
        Some(other) => {
            return Err(ApiError::BadParam {
                param: "format",
                message: format!("unknown export format `{other}`: expected md or json"),
            });
        }
    };
    let Some(conversation) = export::get_conversation(&state.pool, id).await? else {
        return Err(ApiError::NotFound(format!("conversation {} does not exist", id.0)));
    };
    let mut messages = Vec::new();
    let mut after = 0;
    loop {
        let page = export::messages_after(&state.pool, id, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        messages.extend(page);
    }
    let stem = file_stem(&conversation);
    if markdown {
        let body = conversation_markdown(&conversation, &messages);
        return Ok(download(body, "text/markdown; charset=utf-8", &format!("{stem}.md")));
    }
    let document = ConversationDocument {
        format: "my-claw.conversation",
        version: FORMAT_VERSION,
        exported_at: now_ms(),
        conversation: conversation_json(&conversation),
        messages: messages.iter().map(message_json).collect(),
    };
    let body = serde_json::to_string_pretty(&document)
        .map_err(|e| ApiError::Internal(format!("export serialization: {e}")))?;
    Ok(download(body, "application/json", &format!("{stem}.json")))
}

/// Every conversation, streamed: the document is written piece by piece from pages of
/// rows, so neither side holds the whole database in memory.
async fn get_export_all(State(state): State<AppState>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(8);
    let pool = state.pool.clone();
    tokio::spawn(async move {
        match write_export(&pool, &tx).await {
            Ok(()) => {}
            // A download cancelled by its reader is not a failure of ours.
            Err(ExportError::Gone) => tracing::debug!("export cancelled by the client"),
            Err(e) => {
                // The client sees a truncated (invalid) document, not a silent success.
                tracing::error!(cause = %e, "export failed");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    let name = format!("my-claw-export-{}.json", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let mut response = Body::from_stream(ReceiverStream::new(rx)).into_response();
    set_download_headers(&mut response, "application/json", &name);
    response
}

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the client left")]
    Gone,
}

async fn write_export(
    pool: &sqlx::SqlitePool,
    tx: &mpsc::Sender<Result<String, std::io::Error>>,
) -> Result<(), ExportError> {
    let send = |text: String| async move { tx.send(Ok(text)).await.map_err(|_| ExportError::Gone) };
    send(format!(
        "{{\"format\":\"my-claw.export\",\"version\":{FORMAT_VERSION},\"exported_at\":{},\"conversations\":[",
        now_ms()
    ))
    .await?;
    let mut after_conversation = 0;
    let mut first_conversation = true;
    loop {
        let conversations = export::conversations_after(pool, after_conversation, PAGE).await?;
        let Some(last) = conversations.last() else { break };
        after_conversation = last.id;
        for conversation in &conversations {
            // The conversation's fields, then its messages in pages.
            let head = serde_json::to_string(&conversation_json(conversation))?;
            let head = head.strip_suffix('}').unwrap_or(&head);
            let comma = if first_conversation { "" } else { "," };
            first_conversation = false;
            send(format!("{comma}{head},\"messages\":[")).await?;
            let mut after_message = 0;
            let mut first_message = true;
            loop {
                let page = export::messages_after(
                    pool,
                    ConversationId(conversation.id),
                    after_message,
                    PAGE,
                )
                .await?;
                let Some(last) = page.last() else { break };
                after_message = last.id;
                let mut chunk = String::new();
                for message in &page {
                    if !first_message {
                        chunk.push(',');
                    }
                    first_message = false;
                    chunk.push_str(&serde_json::to_string(&message_json(message))?);
                }
                send(chunk).await?;
            }
            send("]}".to_string()).await?;
        }
    }
    send("]}\n".to_string()).await?;
    Ok(())
}

fn conversation_json(c: &ExportConversation) -> ConversationJson<'_> {
    ConversationJson {
        id: c.id,
        channel: &c.channel,
        external_key: &c.external_key,
        title: c.title.as_deref(),
        created_at: c.created_at,
        updated_at: c.updated_at,
    }
}

fn message_json(m: &ExportMessage) -> MessageJson<'_> {
    MessageJson {
        id: m.id,
        role: &m.role,
        content: &m.content,
        tier: m.tier.as_deref(),
        provider: m.provider.as_deref(),
        model: m.model.as_deref(),
        status: &m.status,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
        created_at: m.created_at,
        host: m.host.as_deref(),
        left_machine: m.left_machine,
        error: m.failure.as_deref(),
        tool_rounds: m
            .tool_rounds
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or_else(|| serde_json::Value::Array(Vec::new())),
    }
}

/// A readable transcript: the title, where it came from, then each message under a line
/// saying who wrote it and when. Message text is Markdown already and is kept as is.
fn conversation_markdown(c: &ExportConversation, messages: &[ExportMessage]) -> String {
    let mut out = String::new();
    let title = c.title.as_deref().unwrap_or("Conversation");
    let _ = writeln!(out, "# {}\n", title.replace('\n', " "));
    let _ = writeln!(out, "- Channel: {}", c.channel);
    let _ = writeln!(out, "- Conversation: {}", c.id);
    let _ = writeln!(out, "- Started: {}", format_time(c.created_at));
    let _ = writeln!(out, "- Exported: {}", format_time(now_ms()));
    let _ = writeln!(out, "- Messages: {}", messages.len());
    for m in messages {
        let who = match m.role.as_str() {
            "user" => "You".to_string(),
            "assistant" => {
                let by: Vec<&str> =
                    [m.tier.as_deref(), m.model.as_deref()].into_iter().flatten().collect();
                // What the privacy ledger recorded: a server on loopback is this machine.
                let place = match (m.provider.as_deref(), m.left_machine, m.host.as_deref()) {
                    (None, ..) => String::new(),
                    // Written here by the fallback, after a cloud or remote call that had
                    // been sent the prompt failed (the in-process engine has no host).
                    (Some("local"), _, Some(host)) => {
                        format!(", on this machine after the prompt was sent to {host}")
                    }
                    (Some("local"), true, None) => {
                        ", on this machine after the prompt was sent outside it".to_string()
                    }
                    (Some(_), true, Some(host)) => format!(", outside this machine ({host})"),
                    (Some(_), true, None) => ", outside this machine".to_string(),
                    (Some(_), false, Some(host)) => format!(", on this machine ({host})"),
                    (Some(_), false, None) => ", on this machine".to_string(),
                };
                if by.is_empty() {
                    "Assistant".to_string()
                } else {
                    format!("Assistant ({}{place})", by.join(" · "))
                }
            }
            other => other.to_string(),
        };
        // "Stopped" only when the user stopped it: a failure, or a shutdown's cut, says why.
        let status = match (m.status.as_str(), m.failure.as_deref()) {
            ("partial", None) => " · stopped before the end".to_string(),
            ("partial", Some(why)) => format!(" · cut short: {}", why.replace('\n', " ")),
            // Its text is `memory::no_answer_text`, which says why.
            ("error", _) => " · failed".to_string(),
            _ => String::new(),
        };
        let _ = write!(out, "\n---\n\n**{who}** · {}{status}\n\n", format_time(m.created_at));
        for round in crate::db::memory::rounds_from_json(m.tool_rounds.as_deref()) {
            for call in &round.calls {
                let result = round.results.iter().find(|r| r.call_id == call.id);
                let outcome = match result {
                    Some(r) if r.is_error => format!(" → error: {}", r.content),
                    Some(r) => format!(" → {}", r.content),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "> used `{}` with `{}`{}",
                    call.name,
                    call.arguments.replace('\n', " "),
                    outcome.replace('\n', " ")
                );
            }
        }
        if m.tool_rounds.is_some() {
            out.push('\n');
        }
        out.push_str(m.content.trim_end());
        out.push('\n');
    }
    out
}

fn format_time(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M UTC").to_string(),
        None => ms.to_string(),
    }
}

/// `my-claw-<id>-<title in lowercase ASCII words>`: readable, and safe in a header.
fn file_stem(c: &ExportConversation) -> String {
    let mut slug = String::new();
    for ch in c.title.as_deref().unwrap_or("").chars() {
        if ch.is_ascii_alphanumeric() {
            slug.push(ch.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= 40 {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        format!("my-claw-{}", c.id)
    } else {
        format!("my-claw-{}-{slug}", c.id)
    }
}

fn download(body: String, content_type: &'static str, file_name: &str) -> Response {
    let mut response = body.into_response();
    set_download_headers(&mut response, content_type, file_name);
    response
}

fn set_download_headers(response: &mut Response, content_type: &'static str, file_name: &str) {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // File names are built from ASCII letters, digits and dashes only.
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(title: Option<&str>) -> ExportConversation {
        ExportConversation {
            id: 7,
            channel: "webchat".into(),
            external_key: "7".into(),
            title: title.map(Into::into),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn file_names_are_readable_and_header_safe() {
        assert_eq!(
            file_stem(&conversation(Some("Trip to Lyon: the plan!"))),
            "my-claw-7-trip-to-lyon-the-plan"
        );
        assert_eq!(file_stem(&conversation(Some("\"; rm -rf / é"))), "my-claw-7-rm-rf");
        assert_eq!(file_stem(&conversation(Some("日本語"))), "my-claw-7");
        assert_eq!(file_stem(&conversation(None)), "my-claw-7");
    }
}
