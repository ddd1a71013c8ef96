//! The WebChat page: `static/` files embedded in the binary (so it runs from any directory
//! with no build step) and served without authentication; the page itself asks for the
//! token and sends it on every API call.

use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::gateway::AppState;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const CHAT_JS: &str = include_str!("../../static/chat.js");
const CHAT_CSS: &str = include_str!("../../static/chat.css");
const CRON_JS: &str = include_str!("../../static/cron.js");
const FAVICON_SVG: &str = include_str!("../../static/favicon.svg");
/// markdown-it 14.1.0, pinned and checked by `scripts/vendor-web.sh` (licences beside it).
const MARKDOWN_IT_JS: &str = include_str!("../../static/vendor/markdown-it.min.js");

/// What the page may load and talk to: only this origin, no inline script, no framing.
/// Model output is rendered as DOM nodes built from markdown-it's tokens by `chat.js`;
/// this policy is the second wall.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(get_index))
        .route("/index.html", get(get_index))
        .route("/chat.js", get(get_chat_js))
        .route("/chat.css", get(get_chat_css))
        .route("/cron.js", get(get_cron_js))
        .route("/vendor/markdown-it.min.js", get(get_markdown_it_js))
        .route("/favicon.svg", get(get_favicon))
        .route("/favicon.ico", get(get_favicon))
}

async fn get_index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn get_chat_js() -> Response {
    asset("text/javascript; charset=utf-8", CHAT_JS)
}

async fn get_chat_css() -> Response {
    asset("text/css; charset=utf-8", CHAT_CSS)
}

async fn get_cron_js() -> Response {
    asset("text/javascript; charset=utf-8", CRON_JS)
}

async fn get_markdown_it_js() -> Response {
    asset("text/javascript; charset=utf-8", MARKDOWN_IT_JS)
}

async fn get_favicon() -> Response {
    asset("image/svg+xml", FAVICON_SVG)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        // The files change with the binary; revalidating is cheap on loopback.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // The sign-in link carries the token in its query string: never send it onwards.
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (
            HeaderName::from_static("permissions-policy"),
            HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
        ),
    ];
    (headers, body).into_response()
}
