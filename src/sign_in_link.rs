//! `my-claw sign-in-link`: asks the running server for a one-time sign-in code and prints
//! the link that carries it, for a server started under systemd (whose start prints no
//! link) or a second device. The token is read where the server reads it (`WEBCHAT_TOKEN`,
//! else `DATA_DIR/webchat_token`) and sent only to the server's loopback-or-configured
//! address; the link never holds it.
//!
//! Owns this command's request and its error texts; must not create or change anything in
//! the data directory.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{Secret, Settings};

#[derive(Debug, thiserror::Error)]
pub enum SignInLinkError {
    #[error(
        "no WebChat token: WEBCHAT_TOKEN is not set and {0} holds none (start my-claw \
         once to create it)"
    )]
    NoToken(String),
    #[error("no my-claw answers at http://{0}/ (is it running with this BIND and DATA_DIR?): {1}")]
    NotRunning(String, String),
    #[error(
        "the server at http://{0}/ refused this token (it runs with another WEBCHAT_TOKEN or \
         data directory)"
    )]
    Refused(String),
    #[error("the server at http://{0}/ answered {1}")]
    Unexpected(String, String),
}

#[derive(Deserialize)]
struct Issued {
    code: String,
    expires_in_seconds: u64,
}

/// The link and how many minutes it works.
pub async fn run(settings: &Settings) -> Result<(String, u64), SignInLinkError> {
    let token = token(settings)?;
    let host = if settings.bind.ip().is_unspecified() {
        format!("127.0.0.1:{}", settings.bind.port())
    } else {
        settings.bind.to_string()
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| SignInLinkError::NotRunning(host.clone(), e.to_string()))?;
    let response = client
        .post(format!("http://{host}/api/sign-in/codes"))
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|e| SignInLinkError::NotRunning(host.clone(), e.without_url().to_string()))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Err(SignInLinkError::Refused(host));
    }
    if !status.is_success() {
        return Err(SignInLinkError::Unexpected(host, format!("HTTP {status}")));
    }
    let issued: Issued = response.json().await.map_err(|e| {
        SignInLinkError::Unexpected(host.clone(), format!("an unreadable body ({e})"))
    })?;
    Ok((crate::app::sign_in_url(&host, &issued.code), issued.expires_in_seconds / 60))
}

fn token(settings: &Settings) -> Result<Secret, SignInLinkError> {
    if let Some(token) = &settings.webchat_token {
        return Ok(token.clone());
    }
    let path = settings.data_dir.join("webchat_token");
    saved_token(&path).ok_or_else(|| SignInLinkError::NoToken(path.display().to_string()))
}

/// The token saved in `path`, when it holds one (16+ characters once trimmed).
pub fn saved_token(path: &Path) -> Option<Secret> {
    let saved = std::fs::read_to_string(path).ok()?;
    let saved = saved.trim();
    (saved.len() >= 16).then(|| Secret::new(saved))
}
