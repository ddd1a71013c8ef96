//! Micro-benchmarks of the per-turn CPU work outside the model: rendering a 20-message
//! conversation with the Qwen3 template and tokenizing it with the tokenizer built from the
//! SmolLM2 GGUF's metadata. Run with `cargo bench --bench prompt`; prints medians.
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (scripts/fetch-assets.sh).

mod common;

use common::median_of;
use std::hint::black_box;

use my_claw::domain::{ChatTurn, Role};
use my_claw::llm::engine::{gguf, template};

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = gguf::open(&path).expect("open the SmolLM2 GGUF (run scripts/fetch-assets.sh)");
    let tokenizer = model.tokenizer().expect("tokenizer from GGUF metadata");

    let mut turns = vec![ChatTurn::new(Role::System, "You are Claw, a private assistant.")];
    for i in 0..20 {
        let role = if i % 2 == 0 { Role::User } else { Role::Assistant };
        turns.push(ChatTurn::new(
            role,
            format!("Message {i}: l'été dernier, j'ai lu 3 livres 📚 et écrit du code `fn main() {{}}`."),
        ));
    }

    let render = median_of(200, || {
        black_box(template::render(template::ChatFormat::Qwen3, black_box(&turns), &[], false));
    });
    let prompt = template::render(template::ChatFormat::Qwen3, &turns, &[], false);
    let mut n_tokens = 0;
    let encode = median_of(50, || {
        n_tokens = tokenizer.encode(black_box(&prompt)).expect("encode").len();
    });
    let ids = tokenizer.encode(&prompt).expect("encode");
    let decode = median_of(50, || {
        let mut decoder = tokenizer.stream_decoder();
        for &id in &ids {
            black_box(decoder.push(id).expect("decode"));
        }
        black_box(decoder.finish());
    });
    println!("prompt of 21 turns, {} bytes, {n_tokens} tokens", prompt.len());
    println!("render (Qwen3 template)  median {:>10.1} µs", render.as_secs_f64() * 1e6);
    println!("encode                   median {:>10.1} µs", encode.as_secs_f64() * 1e6);
    println!("stream-decode all tokens median {:>10.1} µs", decode.as_secs_f64() * 1e6);
}
