//! `GET /api/models`: the tiers the page can pick, who answers each one and whether it can
//! answer now (for a remote tier, its server's health); plus the model and Z.ai parts of
//! `/api/health`. Policy and state live in
//! `llm::router`; this module only turns its plain status into JSON.

use std::time::SystemTime;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::gateway::error::ApiJson;
use crate::gateway::AppState;
use crate::llm::router::{RemoteStatus, TierState, TierStatus, ZaiStatus};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/models", get(get_models))
}

#[derive(Debug, Serialize)]
pub struct ModelsResponse {
    pub default_tier: &'static str,
    pub tiers: Vec<TierJson>,
}

#[derive(Debug, Serialize)]
pub struct TierJson {
    pub tier: &'static str,
    /// The configured value, e.g. `qwen3:8b`, a `.gguf` path or `zai:glm-4.7`.
    pub configured: String,
    /// `present`, `loading`, `loaded`, `load_failed`, `missing`, `configured`,
    /// `falling_back` or `ready`.
    pub state: &'static str,
    /// Whether a request on this tier can be answered now.
    pub available: bool,
    /// Who answers (after stand-ins and fallback): `local` or `zai`.
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Whether an answer on this tier leaves the machine.
    pub leaves_machine: bool,
    /// Set when another tier answers this one (`main` for a cloud tier without Z.ai).
    pub fallback_to: Option<&'static str>,
    pub file: Option<String>,
    pub stand_in_for: Option<String>,
    pub pull_command: Option<String>,
    pub detail: String,
    /// Set for a tier on an OpenAI-compatible server.
    pub remote: Option<RemoteJson>,
    /// Set for a loaded local model: its device (`cpu`, `cuda:0`), the device's name and
    /// the memory its weights and kept KV state hold.
    pub device: Option<DeviceJson>,
}

/// Where a loaded local model runs and the memory it holds.
#[derive(Debug, Serialize)]
pub struct DeviceJson {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub device_name: String,
    pub weights_bytes: u64,
    /// KV state kept for the next turns of conversations.
    pub kv_kept_bytes: u64,
    /// A GPU's memory in use now (all processes) and its size; `null` on the CPU.
    pub device_memory_used_bytes: Option<u64>,
    pub device_memory_total_bytes: Option<u64>,
}

fn device_json(device: crate::llm::DeviceUse) -> DeviceJson {
    DeviceJson {
        device: device.device,
        device_name: device.device_name,
        weights_bytes: device.weights_bytes,
        kv_kept_bytes: device.kv_kept_bytes,
        device_memory_used_bytes: device.device_memory_used_bytes,
        device_memory_total_bytes: device.device_memory_total_bytes,
    }
}

/// A remote tier's server as last seen (checked in the background, never at start-up).
#[derive(Debug, Serialize)]
pub struct RemoteJson {
    pub base_url: Option<String>,
    /// The host recorded in the ledger, e.g. `gpu-box:8000`.
    pub host: Option<String>,
    pub model: String,
    /// False only for a server on loopback.
    pub leaves_machine: bool,
    /// Whether the server answered the last check or call; null before any.
    pub reachable: Option<bool>,
    /// Whether its `/v1/models` lists the model; null when not known.
    pub model_listed: Option<bool>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub last_error_at: Option<u64>,
    pub last_success_at: Option<u64>,
    pub checked_at: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ZaiJson {
    pub configured: bool,
    pub base_url: String,
    pub fallback_active: bool,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub last_error_at: Option<u64>,
    pub last_success_at: Option<u64>,
}

async fn get_models(State(state): State<AppState>) -> ApiJson<ModelsResponse> {
    let router = state.assistant.router();
    let tiers = router.status().await.into_iter().map(tier_json).collect();
    ApiJson(ModelsResponse { default_tier: router.default_tier().as_str(), tiers })
}

/// Every tier's status as JSON (an array), for `/api/health`.
pub async fn tiers_json(state: &AppState) -> Value {
    let tiers: Vec<TierJson> =
        state.assistant.router().status().await.into_iter().map(tier_json).collect();
    serde_json::to_value(tiers).unwrap_or(Value::Null)
}

/// Z.ai's configuration and recent health as JSON, for `/api/health`.
pub fn zai_json(state: &AppState) -> Value {
    serde_json::to_value(zai(state.assistant.router().zai_status())).unwrap_or(Value::Null)
}

fn tier_json(status: TierStatus) -> TierJson {
    let available = status.answered_by.is_some() && status.state != TierState::Missing;
    let fallback_to = (status.state == TierState::CloudFallback).then_some("main");
    let (provider, model, leaves_machine) = match status.answered_by {
        Some(info) => (Some(info.provider), Some(info.model), info.leaves_machine),
        None => (None, None, false),
    };
    TierJson {
        tier: status.tier.as_str(),
        configured: status.configured,
        state: status.state.as_str(),
        available,
        provider,
        model,
        leaves_machine,
        fallback_to,
        file: status.file.map(|p| p.display().to_string()),
        stand_in_for: status.stand_in_for,
        pull_command: status.pull_command,
        detail: status.detail,
        remote: status.remote.map(remote_json),
        device: status.device.map(device_json),
    }
}

fn remote_json(status: RemoteStatus) -> RemoteJson {
    let (last_error, last_error_at) = match status.last_error {
        Some((message, at)) => (Some(message), unix_ms(at)),
        None => (None, None),
    };
    RemoteJson {
        base_url: status.base_url,
        host: status.host,
        model: status.model,
        leaves_machine: status.leaves_machine,
        reachable: status.reachable,
        model_listed: status.model_listed,
        last_error,
        last_error_at,
        last_success_at: status.last_success.and_then(unix_ms),
        checked_at: status.checked_at.and_then(unix_ms),
    }
}

fn zai(status: ZaiStatus) -> ZaiJson {
    let (last_error, last_error_at) = match status.last_error {
        Some((message, at)) => (Some(message), unix_ms(at)),
        None => (None, None),
    };
    ZaiJson {
        configured: status.configured,
        base_url: status.base_url,
        fallback_active: status.fallback_active,
        reason: status.reason,
        last_error,
        last_error_at,
        last_success_at: status.last_success.and_then(unix_ms),
    }
}

fn unix_ms(at: SystemTime) -> Option<u64> {
    at.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64)
}
