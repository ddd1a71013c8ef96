//! Integration tests, compiled as one binary (one link, one run). Each module owns one
//! area; shared helpers live in `util`.

mod util;

mod agent;
mod architecture;
mod bench_model;
mod browser;
mod candle_device;
mod channels;
mod cloud_fallback;
mod constraint;
mod conversations;
mod cron;
mod cuda_emulated;
mod engine;
mod engine_tokenizer;
mod foundation;
mod gateway;
mod openai_stop;
mod openai_tools;
mod reminders;
mod remote;
mod router;
mod webchat_api;
