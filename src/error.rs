//! Crate-level error for code that spans modules (the assistant use-case). Module
//! boundaries keep their own enums (`LlmError`, `ChannelError`, `sqlx::Error`); `anyhow`
//! is used only at the edges (`main`, `app`, `bench`, `chat`).

use crate::llm::LlmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
