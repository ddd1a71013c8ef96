//! WebChat answers that outlive their page, and the endpoint that follows any running
//! answer. Each WebChat answer's events are relayed by a task of its own, so the answer is
//! written to its end and stored when the page that asked goes away (a reload, a closed tab,
//! a lost network); only Stop, or a shutdown, stops it. While an answer runs, whoever asked
//! for it (a page, a scheduled job, a channel message), any page can follow it from its
//! start: `GET /api/conversations/{id}/live` replays what was sent so far, then the rest as
//! it comes (`204` when nothing runs). The running answers are the assistant's registry
//! (`crate::live`); this module only relays a page's answer into it and reads it over HTTP.
//! Storing answers is the assistant's business, and the wire form of an event is
//! `chat.rs`'s.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::Stream;
use tokio::sync::{broadcast, mpsc};

use crate::assistant::Event;
use crate::domain::ConversationId;
use crate::gateway::chat::{chat_event, sse_event, ChatEvent};
use crate::gateway::conversations::{not_found, parse_id};
use crate::gateway::error::{ApiError, ApiPath};
use crate::gateway::AppState;
use crate::live::{LiveAnswers, Reader};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/conversations/{id}/live", get(get_live))
}

/// Relays one answer's events (already forwarded by `chat::stop_on_shutdown`) to the page
/// that asked, through the returned receiver, and to followers (`live`). When the page goes
/// away the relay keeps reading, so the assistant writes the answer to its end and stores
/// it.
pub fn relay(
    live: &LiveAnswers,
    mut events: impl Stream<Item = Event> + Send + Unpin + 'static,
) -> mpsc::Receiver<Event> {
    // Dropped with the task: an answer that ends without a last event leaves no entry.
    let mut publisher = live.publisher(Reader::Page);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut page = Some(tx);
        while let Some(event) = futures::StreamExt::next(&mut events).await {
            publisher.publish(&event);
            if let Some(tx) = &page {
                if tx.send(event).await.is_err() {
                    // The page left; the answer goes on for whoever follows it, and is stored.
                    page = None;
                }
            }
        }
    });
    rx
}

/// `GET /api/conversations/{id}/live`: the running answer of conversation `id` from its
/// start (its `meta`, the text so far as one `token`, the notices and tool events), then
/// as it is written, until its `done` or `error`; `204 No Content` when none runs.
async fn get_live(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = ConversationId(parse_id(&id)?);
    let Some((seen, mut next)) = state.assistant.live().follow(id) else {
        // Nothing runs there: 204, unless there is no such conversation at all.
        if crate::db::memory::get_conversation(&state.pool, id).await?.is_none() {
            return Err(not_found(id.0));
        }
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let (tx, rx) = mpsc::channel::<ChatEvent>(64);
    tokio::spawn(async move {
        for event in coalesce(seen) {
            if tx.send(chat_event(event)).await.is_err() {
                return;
            }
        }
        loop {
            let event = match next.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let message = "this page fell behind the answer; reload the conversation";
                    let error = Event::Error { message: message.into(), partial_message_id: None };
                    let _ = tx.send(chat_event(error)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let last = matches!(event, Event::Done { .. } | Event::Error { .. });
            if tx.send(chat_event(event)).await.is_err() || last {
                return;
            }
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |e| {
        Ok::<SseEvent, Infallible>(sse_event(&e))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The events sent so far with each run of text pieces joined into one, so a follower that
/// comes late gets the text at once instead of token by token.
fn coalesce(seen: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(seen.len());
    for event in seen {
        match (out.last_mut(), event) {
            (Some(Event::Token(text)), Event::Token(more)) => text.push_str(&more),
            (_, event) => out.push(event),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_follower_gets_the_text_so_far_in_one_piece() {
        let events = vec![
            Event::Token("Hel".into()),
            Event::Token("lo".into()),
            Event::Notice { kind: "k".into(), message: "m".into() },
            Event::Token(" you".into()),
        ];
        let joined = coalesce(events);
        assert_eq!(
            joined,
            vec![
                Event::Token("Hello".into()),
                Event::Notice { kind: "k".into(), message: "m".into() },
                Event::Token(" you".into()),
            ]
        );
    }
}
