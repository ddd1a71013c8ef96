//! `GET/PUT /api/settings/persona`: the persona name and system prompt injected in every
//! call on every channel. Storage and defaults belong to `Assistant`; this is the wire form.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

use crate::assistant::{Persona, DEFAULT_PERSONA_NAME, DEFAULT_SYSTEM_PROMPT};
use crate::gateway::error::{ApiError, ApiJson};
use crate::gateway::AppState;

/// Longest accepted persona name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Longest accepted system prompt, in characters (about 2,000 tokens). It goes into every
/// call on every channel, so a huge one would leave no room for the conversation.
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 8_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/settings/persona", get(get_persona).put(put_persona))
}

#[derive(Debug, Serialize)]
pub struct PersonaJson {
    pub persona_name: String,
    pub system_prompt: String,
    /// The built-in values, so that the page can offer "reset to default".
    pub default_persona_name: &'static str,
    pub default_system_prompt: &'static str,
}

#[derive(Debug, Deserialize)]
pub struct PersonaUpdate {
    pub persona_name: String,
    /// An empty prompt means "use the default one".
    pub system_prompt: String,
}

async fn get_persona(State(state): State<AppState>) -> Result<ApiJson<PersonaJson>, ApiError> {
    let persona = state.assistant.persona().await?;
    Ok(ApiJson(persona_json(persona)))
}

async fn put_persona(
    State(state): State<AppState>,
    ApiJson(update): ApiJson<PersonaUpdate>,
) -> Result<ApiJson<PersonaJson>, ApiError> {
    let name = update.persona_name.trim();
    // Nor only control or invisible characters: the model would be given no name.
    if crate::domain::is_blank(name) {
        let message = "persona_name must not be empty".to_string();
        return Err(ApiError::BadParam { param: "persona_name", message });
    }
    if name.chars().count() > MAX_NAME_CHARS {
        let message = format!("persona_name is longer than {MAX_NAME_CHARS} characters");
        return Err(ApiError::BadParam { param: "persona_name", message });
    }
    let prompt_chars = update.system_prompt.chars().count();
    if prompt_chars > MAX_SYSTEM_PROMPT_CHARS {
        let message = format!(
            "system_prompt is {prompt_chars} characters long; the limit is \
             {MAX_SYSTEM_PROMPT_CHARS}"
        );
        return Err(ApiError::BadParam { param: "system_prompt", message });
    }
    let persona = Persona { name: name.to_string(), system_prompt: update.system_prompt };
    state.assistant.set_persona(&persona).await?;
    // Read it back so the answer shows what every next call will really use.
    let stored = state.assistant.persona().await?;
    Ok(ApiJson(persona_json(stored)))
}

fn persona_json(persona: Persona) -> PersonaJson {
    PersonaJson {
        persona_name: persona.name,
        system_prompt: persona.system_prompt,
        default_persona_name: DEFAULT_PERSONA_NAME,
        default_system_prompt: DEFAULT_SYSTEM_PROMPT,
    }
}
