//! WebChat answers that outlive their page. Each answer's events are relayed by a task of
//! its own, so the answer is written to its end and stored when the page that asked goes
//! away (a reload, a closed tab, a lost network); only Stop, or a shutdown, stops it. While
//! it runs, any page can follow it from its start: `GET /api/conversations/{id}/live`
//! replays what was sent so far, then the rest as it comes (`204` when nothing runs).
//! This module holds only the events of running answers; storing them is the assistant's
//! business, and the wire form of an event is `chat.rs`'s.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
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
use crate::gateway::conversations::parse_id;
use crate::gateway::error::{ApiError, ApiPath};
use crate::gateway::AppState;

/// Events buffered for a follower that reads slower than the answer is written; one that
/// falls further behind is told to reload.
const FOLLOWER_BUFFER: usize = 256;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/conversations/{id}/live", get(get_live))
}

/// The running WebChat answers, by conversation (one at a time each: the turn).
#[derive(Clone, Default)]
pub struct LiveAnswers(Arc<Mutex<HashMap<ConversationId, Live>>>);

/// One running answer: what was sent so far, and the channel of what comes next.
struct Live {
    seen: Vec<Event>,
    next: broadcast::Sender<Event>,
    /// Which relay owns the entry (a newer answer replaces a finished one's).
    relay: u64,
}

impl LiveAnswers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Live>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What a follower of `id`'s running answer replays, and its channel for the rest,
    /// taken together so that no event falls between them; `None` when nothing runs.
    fn follow(&self, id: ConversationId) -> Option<(Vec<Event>, broadcast::Receiver<Event>)> {
        let answers = self.lock();
        let live = answers.get(&id)?;
        Some((live.seen.clone(), live.next.subscribe()))
    }

    /// Records and passes on one event of relay `relay`'s answer in conversation `id`.
    fn publish(&self, id: ConversationId, relay: u64, event: &Event) {
        let mut answers = self.lock();
        if matches!(event, Event::Meta { .. }) {
            let (next, _) = broadcast::channel(FOLLOWER_BUFFER);
            answers.insert(id, Live { seen: Vec::new(), next, relay });
        }
        let Some(live) = answers.get_mut(&id).filter(|live| live.relay == relay) else {
            return;
        };
        live.seen.push(event.clone());
        let _ = live.next.send(event.clone());
        if matches!(event, Event::Done { .. } | Event::Error { .. }) {
            answers.remove(&id);
        }
    }

    /// Whether an answer is being written in conversation `id`.
    pub fn is_running(&self, id: ConversationId) -> bool {
        self.lock().contains_key(&id)
    }

    /// Forgets relay `relay`'s answer (it ended without a last event).
    fn end(&self, id: ConversationId, relay: u64) {
        let mut answers = self.lock();
        if answers.get(&id).is_some_and(|live| live.relay == relay) {
            answers.remove(&id);
        }
    }
}

/// Relays one answer's events (already forwarded by `chat::stop_on_shutdown`) to the page
/// that asked, through the returned receiver, and to followers. When the page goes away the
/// relay keeps reading, so the assistant writes the answer to its end and stores it.
pub fn relay(
    live: LiveAnswers,
    mut events: impl Stream<Item = Event> + Send + Unpin + 'static,
) -> mpsc::Receiver<Event> {
    static RELAYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let relay = RELAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut id = None;
        let mut page = Some(tx);
        while let Some(event) = futures::StreamExt::next(&mut events).await {
            if let Event::Meta { conversation_id, .. } = &event {
                id = Some(*conversation_id);
            }
            if let Some(id) = id {
                live.publish(id, relay, &event);
            }
            if let Some(tx) = &page {
                if tx.send(event).await.is_err() {
                    // The page left; the answer goes on for whoever follows it, and is stored.
                    page = None;
                }
            }
        }
        if let Some(id) = id {
            live.end(id, relay);
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
    let Some((seen, mut next)) = state.live.follow(id) else {
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

impl LiveAnswers {
    /// Waits, at most `limit`, until no WebChat answer runs: at shutdown, an answer whose
    /// page left is stopped through its relay and must be stored before the process exits
    /// (the server's graceful shutdown waits only for answers a page still reads).
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
