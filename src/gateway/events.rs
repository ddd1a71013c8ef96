//! `GET /api/events`: a Server-Sent Events stream of messages stored in any conversation
//! (cron jobs, other channels, other tabs) and of conversations renamed or deleted, so an open WebChat
//! page updates without a reload. It carries ids only; the page fetches the messages through the history API.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::stream::Stream;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;

use crate::assistant::Change;
use crate::gateway::chat::sse_event;
use crate::gateway::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/events", get(get_events))
}

/// One `data:` object of the events stream, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// Sent once when the stream opens, so the client knows it is live.
    Ready,
    /// A message was stored.
    Message { conversation_id: i64, message_id: i64, role: &'static str },
    /// A conversation was renamed (its new title is in the conversations API).
    Renamed { conversation_id: i64 },
    /// A conversation was deleted (in another tab, through the API).
    Deleted { conversation_id: i64 },
    /// Events were missed (the client was too slow): reload what is shown.
    Resync,
}

async fn get_events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut updates = state.assistant.subscribe();
    let stream = async_stream(move |tx| async move {
        if tx.send(sse_event(&LiveEvent::Ready)).await.is_err() {
            return;
        }
        // The graceful shutdown waits for open responses, and this one never ends by
        // itself: end it when the process is asked to stop.
        let shutdown = shutdown_requested();
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                _ = &mut shutdown => return,
                _ = tx.closed() => return,
                received = updates.recv() => match received {
                    Ok(update) => match update.change {
                        Change::Stored { message_id, role } => LiveEvent::Message {
                            conversation_id: update.conversation_id.0,
                            message_id: message_id.0,
                            role: role.as_str(),
                        },
                        Change::Renamed => {
                            LiveEvent::Renamed { conversation_id: update.conversation_id.0 }
                        }
                        Change::Deleted => {
                            LiveEvent::Deleted { conversation_id: update.conversation_id.0 }
                        }
                    },
                    Err(RecvError::Lagged(_)) => LiveEvent::Resync,
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(sse_event(&event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A stream fed by a task: the task ends when the client goes (the receiver is dropped).
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<SseEvent, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<SseEvent>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

/// Resolves on SIGINT or SIGTERM. Every registered listener is notified, so this does not
/// take the signal away from the server's own shutdown handler.
pub async fn shutdown_requested() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
