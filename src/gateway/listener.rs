//! The accept loop of the HTTP server: HTTP/1.1 connections with a header read timeout that
//! is also the idle limit of a kept-alive connection, limits on the request's address and
//! headers answered in the JSON error shape, a deadline for each request body, and a
//! graceful shutdown. It knows sockets and hyper, not routes (those are `gateway::router`).
//!
//! `axum::serve` exposes none of these limits: without them a client that opens connections
//! and sends nothing, or one byte of a large body, holds them for as long as it likes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONNECTION;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::gateway::error::ApiError;

/// The longest path and query a request may have, in bytes (nginx's default line limit).
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most request headers, and the most bytes of them (names and values), a request may
/// have. hyper reads up to `HYPER_MAX_HEADERS` headers in its read buffer (about 400 KiB by
/// default) and answers a request beyond those with an empty 431 (or 414 for an address
/// over 64 KiB); below them these limits answer in the JSON error shape.
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
const HYPER_MAX_HEADERS: usize = 2 * MAX_HEADERS;

/// How long a client may take, per connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// To send a request's headers, counted from when the connection opens or its previous
    /// answer ends: a connection idle for this long is closed.
    pub header_timeout: Duration,
    /// To send a request's whole body, counted from when its headers arrived.
    pub body_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (each connection closes after its current answer) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let app = app
        .layer(middleware::from_fn_with_state(limits.body_timeout, limit_body_time))
        .layer(middleware::from_fn(limit_head));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning, as
                    // `axum::serve` does.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Tokens are written as they come: do not hold small writes back.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_headers(HYPER_MAX_HEADERS);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = closing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = outcome {
                // Timeouts and clients that go away land here; nothing to answer.
                tracing::debug!(error = %e, "connection ended");
            }
        });
        // Reap finished connections so the set stays small on a long-running server.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Middleware: a request over the address and header limits gets a 414 or 431 in the JSON
/// error shape, before any route sees it (hyper's own answers to those have no body).
async fn limit_head(request: Request, next: Next) -> Response {
    let uri = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri > MAX_URI_BYTES {
        return ApiError::UriTooLong(MAX_URI_BYTES).into_response();
    }
    let headers = request.headers();
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!(
            "the request has {} headers of {bytes} bytes: at most {MAX_HEADERS} headers and \
             {MAX_HEADER_BYTES} bytes are read",
            headers.len()
        ))
        .into_response();
    }
    next.run(request).await
}

/// Middleware: the request body must arrive whole within `limit` of the headers. A late
/// body ends in an error for the handler reading it, and the answer becomes a 408 that
/// closes the connection, whatever the handler made of the error.
async fn limit_body_time(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let deadline = tokio::time::Instant::now() + limit;
    let flag = timed_out.clone();
    let data = body.into_data_stream();
    let timed = futures::stream::unfold(Some(data), move |data| {
        let flag = flag.clone();
        async move {
            let mut data = data?;
            match tokio::time::timeout_at(deadline, data.next()).await {
                Ok(Some(item)) => Some((item, Some(data))),
                Ok(None) => None,
                Err(_) => {
                    flag.store(true, Ordering::SeqCst);
                    Some((Err(axum::Error::new(BodyTimedOut)), None))
                }
            }
        }
    });
    let response = next.run(Request::from_parts(parts, Body::from_stream(timed))).await;
    if timed_out.load(Ordering::SeqCst) {
        let mut response = ApiError::RequestTimeout.into_response();
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    response
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;
