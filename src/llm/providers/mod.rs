//! Concrete providers: the local engine adapter, the OpenAI-compatible streaming client
//! (remote tiers), and Z.ai as a configuration of that client.

pub mod local;
pub mod openai_compat;
pub mod zai;
