//! my-claw: a self-hosted, single-user personal assistant in one binary.
//! Modules are listed in reading order: configuration and domain first, then storage,
//! models, the assistant use-case, and the edges (HTTP gateway, channels, cron, bench).

/// Wiring: builds every component from the config and runs the server.
pub mod app;
/// The one use-case: an inbound message becomes a stored, answered conversation turn.
pub mod assistant;
/// `my-claw backup FILE`: a consistent, private copy of the database while it runs.
pub mod backup;
/// `my-claw --bench`: throughput on this machine, same engine path as the server.
pub mod bench;
/// `my-claw bench-conversation`: time to first token along one long conversation.
pub mod bench_conversation;
/// `my-claw bench-model`: a Qwen3-shaped GGUF with random weights, for benchmarks.
pub mod bench_model;
/// Outbound channel clients (WhatsApp, Nextcloud Talk) and their wire types.
pub mod channels;
/// `my-claw chat`: a terminal REPL on the local engine.
pub mod chat;
/// Command line and environment configuration, validated once at start.
pub mod config;
/// The agent loop's check of answers that claim a reminder no tool call created.
pub mod correction;
/// Scheduled jobs that make the assistant write first.
pub mod cron;
/// SQLite pool, migrations and the memory queries.
pub mod db;
/// `my-claw device-check`: the same greedy tokens on the GPU as on our CPU kernels?
pub mod device_check;
/// Plain domain types shared by every layer (no wire formats).
pub mod domain;
/// Crate-level error type for the edges.
pub mod error;
/// The HTTP gateway: API, WebChat, webhooks, health.
pub mod gateway;
/// The answers being written now, which any page can follow from their start.
pub mod live;
/// Models: the provider trait, the in-process engine, the cloud client and the router.
pub mod llm;
/// `my-claw models pull|list`: download and list model files.
pub mod models;
/// Backoff with a cap and server-given delays, for every retried call.
pub mod retry;
/// `my-claw sign-in-link`: a one-time sign-in link, its code written into the database.
pub mod sign_in_link;
/// Tools the assistant can call during a turn, and their registry.
pub mod tools;
