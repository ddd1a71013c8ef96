//! Constrained decoding through the real engine: tool calls of the real SmolLM2 at
//! temperature 1 always parse and match the tool's schema (`tool_choice` naming a function,
//! `required`), `response_format` JSON likewise, a schema the grammar engine refuses is a
//! clear error before any token, a request without constraint decodes exactly as before, and
//! the real Qwen3 vocabulary (`<tool_call>` one token) through the token env and the tiny
//! Qwen3 GGUF.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue, VersionedMagic};
use serde_json::{json, Value};

use my_claw::domain::{ChatTurn, Role};
use my_claw::llm::engine::constraint::{Constraint, TokenEnv};
use my_claw::llm::engine::model::KvType;
use my_claw::llm::engine::tokenizer::GgufTokenizer;
use my_claw::llm::engine::{vocab, EngineConfig, EngineHandle, RequestOptions};
use my_claw::llm::{
    Chunk, FinishReason, GenerationParams, LlmError, LlmRequest, ResponseFormat, ToolChoice,
    ToolSpec, ToolUse,
};

use crate::util;

fn engine_config(path: std::path::PathBuf) -> EngineConfig {
    EngineConfig {
        model_path: path,
        n_ctx: 2048,
        queue_capacity: 16,
        parallel: 4,
        kv_cache_sequences: 4,
        kv_cache_max_bytes: 1 << 30,
        kv_type: KvType::F16,
        device: my_claw::llm::engine::device::ComputeDevice::Kernels,
    }
}

fn weather_tool() -> ToolSpec {
    ToolSpec {
        name: "get_weather".to_string(),
        description: "The weather forecast for a city.".to_string(),
        parameters: json!({
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14}
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": false
        }),
    }
}

fn reminder_tool() -> ToolSpec {
    ToolSpec {
        name: "reminders_create".to_string(),
        description: "Set a reminder.".to_string(),
        parameters: json!({
            "type": "object",
            "properties": {
                "text": {"type": "string", "maxLength": 40},
                "in_minutes": {"type": "integer", "minimum": 1, "maximum": 1440}
            },
            "required": ["text", "in_minutes"],
            "additionalProperties": false
        }),
    }
}

fn hot(seed: u64, max_tokens: u32) -> GenerationParams {
    GenerationParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: Some(seed),
        ..GenerationParams::greedy(max_tokens)
    }
}

/// Text, tool calls and finish of a whole answer.
async fn run(
    engine: &EngineHandle,
    question: &str,
    params: GenerationParams,
    tools: ToolUse,
) -> Result<(String, Vec<(String, Value)>, FinishReason), LlmError> {
    let request = LlmRequest { messages: vec![ChatTurn::new(Role::User, question)], params, tools };
    let mut stream = engine.submit_with(request, RequestOptions::default())?;
    let mut text = String::new();
    let mut calls = Vec::new();
    while let Some(item) = stream.recv().await {
        if std::env::var_os("DEBUG_CHUNKS").is_some() {
            eprintln!("CHUNK {item:?}");
        }
        match item? {
            Chunk::Text(piece) => text.push_str(&piece),
            Chunk::ToolCall(call) => {
                let arguments: Value = serde_json::from_str(&call.arguments)
                    .unwrap_or_else(|err| panic!("arguments {:?}: {err}", call.arguments));
                calls.push((call.name, arguments));
            }
            Chunk::Notice { .. } | Chunk::Accepted { .. } => {}
            Chunk::Done { finish, .. } => return Ok((text, calls, finish)),
        }
    }
    panic!("the stream ended without Done");
}

/// Calls written as text (`<tool_call>\n{json}\n</tool_call>`, as the engine emits them
/// until the stream parser turns them into `Chunk::ToolCall`), plus what is left.
fn calls_in_text(text: &str) -> (Vec<(String, Value)>, String) {
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut tail = text;
    while let Some(start) = tail.find("<tool_call>") {
        rest.push_str(&tail[..start]);
        let after = &tail[start + "<tool_call>".len()..];
        let end = after.find("</tool_call>").unwrap_or_else(|| panic!("unclosed call: {text:?}"));
        let body = &after[..end];
        assert!(body.starts_with('\n') && body.ends_with('\n'), "layout: {text:?}");
        let call: Value = serde_json::from_str(body.trim())
            .unwrap_or_else(|err| panic!("call JSON {body:?}: {err}"));
        let object = call.as_object().expect("a call is an object");
        assert_eq!(object.len(), 2, "{call}");
        calls.push((
            object["name"].as_str().expect("name").to_string(),
            object["arguments"].clone(),
        ));
        tail = &after[end + "</tool_call>".len()..];
    }
    rest.push_str(tail);
    (calls, rest)
}

fn all_calls(text: &str, mut streamed: Vec<(String, Value)>) -> Vec<(String, Value)> {
    let (mut in_text, rest) = calls_in_text(text);
    assert!(rest.trim().is_empty(), "nothing but calls: {text:?}");
    streamed.append(&mut in_text);
    streamed
}

fn check_weather(arguments: &Value) {
    let object = arguments.as_object().expect("arguments are an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["city", "days", "unit"], "{arguments}");
    assert!(object["city"].as_str().is_some_and(|c| c.chars().count() <= 24), "{arguments}");
    assert!(matches!(object["unit"].as_str(), Some("celsius" | "fahrenheit")), "{arguments}");
    let days = object["days"].as_i64().expect("days is an integer");
    assert!((1..=14).contains(&days), "{arguments}");
}

fn check_reminder(arguments: &Value) {
    let object = arguments.as_object().expect("arguments are an object");
    assert_eq!(object.len(), 2, "{arguments}");
    assert!(object["text"].as_str().is_some_and(|t| t.chars().count() <= 40), "{arguments}");
    let minutes = object["in_minutes"].as_i64().expect("in_minutes is an integer");
    assert!((1..=1440).contains(&minutes), "{arguments}");
}

#[tokio::test]
async fn smollm2_named_function_calls_match_the_schema_10_of_10_at_temperature_1() {
    let engine = EngineHandle::spawn(engine_config(util::smollm2_path())).await.unwrap();
    let tools = ToolUse {
        choice: ToolChoice::Function("get_weather".to_string()),
        parallel: false,
        ..ToolUse::offer(vec![reminder_tool(), weather_tool()])
    };
    for seed in 1..=10 {
        let question = "What will the weather be in Lyon this week?";
        let (text, streamed, finish) =
            run(&engine, question, hot(seed, 160), tools.clone()).await.unwrap();
        assert_ne!(finish, FinishReason::Length, "seed {seed}: {text:?}");
        let calls = all_calls(&text, streamed);
        assert_eq!(calls.len(), 1, "seed {seed}: {text:?}");
        assert_eq!(calls[0].0, "get_weather");
        check_weather(&calls[0].1);
    }
}

#[tokio::test]
async fn smollm2_required_calls_one_of_two_tools_10_of_10_at_temperature_1() {
    let engine = EngineHandle::spawn(engine_config(util::smollm2_path())).await.unwrap();
    let tools = ToolUse {
        choice: ToolChoice::Required,
        parallel: false,
        ..ToolUse::offer(vec![weather_tool(), reminder_tool()])
    };
    let mut names = Vec::new();
    for seed in 1..=10 {
        let question = "Remind me to call the plumber in an hour.";
        let (text, streamed, finish) =
            run(&engine, question, hot(seed, 160), tools.clone()).await.unwrap();
        assert_ne!(finish, FinishReason::Length, "seed {seed}: {text:?}");
        let calls = all_calls(&text, streamed);
        assert_eq!(calls.len(), 1, "seed {seed}: {text:?}");
        match calls[0].0.as_str() {
            "get_weather" => check_weather(&calls[0].1),
            "reminders_create" => check_reminder(&calls[0].1),
            other => panic!("unknown tool {other}"),
        }
        names.push(calls[0].0.clone());
    }
    eprintln!("required, two tools, 10 seeds: {names:?}");
}

#[tokio::test]
async fn smollm2_response_format_json_schema_and_object_at_temperature_1() {
    let engine = EngineHandle::spawn(engine_config(util::smollm2_path())).await.unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "mood": {"enum": ["happy", "sad", "neutral"]}
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": false
    });
    let format = ResponseFormat::JsonSchema { name: "person".to_string(), schema };
    let tools = ToolUse { response_format: format, ..ToolUse::default() };
    for seed in 1..=5 {
        let question = "Describe a person as JSON.";
        let (text, calls, finish) =
            run(&engine, question, hot(seed, 120), tools.clone()).await.unwrap();
        assert!(calls.is_empty());
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("seed {seed}: {text:?}: {err}"));
        let object = value.as_object().expect("an object");
        assert_eq!(object.len(), 3, "{value}");
        assert!(object["name"].as_str().is_some_and(|n| n.chars().count() <= 30), "{value}");
        assert!(object["age"].as_u64().is_some_and(|a| a <= 150), "{value}");
        assert!(matches!(object["mood"].as_str(), Some("happy" | "sad" | "neutral")), "{value}");
    }
    let tools = ToolUse { response_format: ResponseFormat::JsonObject, ..ToolUse::default() };
    let mut parsed = 0;
    for seed in 1..=3 {
        let question = "Give me a JSON object with your name.";
        let (text, _, finish) =
            run(&engine, question, hot(seed, 200), tools.clone()).await.unwrap();
        // Any object is allowed, so only the length limit can cut one short.
        if finish == FinishReason::Length {
            assert!(text.starts_with('{'), "seed {seed}: {text:?}");
            continue;
        }
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("seed {seed}: {text:?}: {err}"));
        assert!(value.is_object(), "{value}");
        parsed += 1;
    }
    assert!(parsed >= 2, "most JSON objects finish within 200 tokens");
}

#[tokio::test]
async fn a_schema_the_grammar_engine_refuses_is_an_invalid_request_before_any_token() {
    let engine = EngineHandle::spawn(engine_config(util::smollm2_path())).await.unwrap();
    let bad_schema = ResponseFormat::JsonSchema {
        name: "bad".to_string(),
        schema: json!({"type": "object", "properties": {"x": {"type": "nonsense"}}}),
    };
    let mut bad_tool = weather_tool();
    bad_tool.parameters = json!({"type": "object",
        "properties": {"d": {"$ref": "#/$defs/missing"}}, "required": ["d"]});
    let cases = [
        ToolUse { response_format: bad_schema, ..ToolUse::default() },
        ToolUse { choice: ToolChoice::Function("nope".into()), ..ToolUse::offer(vec![]) },
        ToolUse { choice: ToolChoice::Required, ..ToolUse::offer(vec![]) },
        ToolUse { choice: ToolChoice::Required, ..ToolUse::offer(vec![bad_tool]) },
    ];
    for tools in cases {
        let request = LlmRequest {
            tools,
            ..LlmRequest::new(vec![ChatTurn::new(Role::User, "Hi")], hot(1, 8))
        };
        let err = match engine.submit(request) {
            Err(err) => err,
            Ok(mut stream) => match stream.recv().await {
                Some(Err(err)) => err,
                other => panic!("expected an error first, got {other:?}"),
            },
        };
        assert!(matches!(err, LlmError::InvalidRequest(_)), "{err:?}");
        eprintln!("{err}");
    }
    // The engine still serves the next request.
    let (text, _, _) =
        run(&engine, "Hi", GenerationParams::greedy(4), ToolUse::default()).await.unwrap();
    assert!(!text.is_empty());
}

#[tokio::test]
async fn a_request_without_constraint_decodes_exactly_as_before() {
    let engine = EngineHandle::spawn(engine_config(util::smollm2_path())).await.unwrap();
    let question = "Name three colours.";
    let plain = run(&engine, question, GenerationParams::greedy(40), ToolUse::default());
    let (plain, _, _) = plain.await.unwrap();
    // Tools under `none` are not offered: no constraint, the same tokens.
    let none = ToolUse { choice: ToolChoice::None, ..ToolUse::offer(vec![weather_tool()]) };
    assert!(!Constraint::needed(&none));
    assert!(!Constraint::needed(&ToolUse::default()));
    let (with_none, _, _) =
        run(&engine, question, GenerationParams::greedy(40), none).await.unwrap();
    assert_eq!(plain, with_none);
    // And the same as the model's own greedy decoding without the engine's sampler hook.
    let mut file = my_claw::llm::engine::gguf::open(&util::smollm2_path()).unwrap();
    let tokenizer = file.tokenizer().unwrap();
    let format = my_claw::llm::engine::template::ChatFormat::for_arch(file.hparams.arch);
    let prompt = my_claw::llm::engine::template::render(
        format,
        &[ChatTurn::new(Role::User, question)],
        &[],
        false,
    );
    let prompt = tokenizer.encode(&prompt).unwrap();
    let hp = file.hparams.clone();
    let mut config = my_claw::llm::engine::model::ModelConfig::from_hparams(&hp, 1024);
    config.kv_type = KvType::F16;
    let mut reader = std::io::BufReader::new(&mut file.file);
    let model =
        my_claw::llm::engine::model::Model::load(&file.content, &mut reader, config).expect("load");
    let mut cache = model.new_cache(1024);
    let mut next = prompt;
    let mut ids = Vec::new();
    let mut logits = Vec::new();
    for _ in 0..40 {
        model
            .forward_into(&next, &mut cache, my_claw::llm::engine::model::Logits::Last, &mut logits)
            .unwrap();
        let token = my_claw::llm::engine::sampling::argmax(&logits);
        if tokenizer.is_stop(token) {
            break;
        }
        ids.push(token);
        next = vec![token];
    }
    assert_eq!(plain, tokenizer.decode(&ids).unwrap());
}

/// Our tokenizer over the real Qwen3 vocabulary, built from the GGUF metadata our
/// converter writes (no file needed for the vocabulary alone).
fn qwen3_tokenizer() -> GgufTokenizer {
    let metadata = vocab::qwen3_tokenizer_metadata(&util::qwen3_tokenizer_json()).unwrap();
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata.into_iter().collect::<HashMap<String, GgufValue>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    GgufTokenizer::from_gguf(&content).unwrap()
}

fn allowed(constraint: &mut Constraint, vocab: usize) -> Vec<bool> {
    let mut logits = vec![0.0f32; vocab];
    constraint.mask(&mut logits).unwrap();
    logits.iter().map(|l| l.is_finite()).collect()
}

#[test]
fn qwen3_vocabulary_tool_call_is_one_token_and_the_mask_follows_the_grammar() {
    let tokenizer = qwen3_tokenizer();
    let env = Arc::new(TokenEnv::new(&tokenizer).expect("token env"));
    eprintln!("Qwen3 token env built in {:.0} ms", env.build_ms());
    let open = tokenizer.encode("<tool_call>").unwrap();
    assert_eq!(open, [151657], "`<tool_call>` is one token");
    assert_eq!(env.tool_call_token(), Some(151657));
    let close = tokenizer.encode("</tool_call>").unwrap();
    assert_eq!(close, [151658]);
    let vocab = env.vocab_size();
    assert_eq!(vocab, vocab::QWEN3_VOCAB_SIZE);

    let mut constraint =
        Constraint::for_request(&ToolUse::offer(vec![weather_tool()]), false, &env)
            .unwrap()
            .expect("tools constrain");
    let id = |text: &str| {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), 1, "{text:?} is one token: {ids:?}");
        ids[0]
    };
    let (newline, brace, hello) = (id("\n"), id("{"), id("Hello"));
    // Free text: prose and the opening tag are both allowed.
    let free = allowed(&mut constraint, vocab);
    assert!(free[hello as usize] && free[151657] && !constraint.in_grammar());
    constraint.commit(hello).unwrap();
    constraint.commit(151657).unwrap();
    assert!(constraint.in_grammar());
    let after_open = allowed(&mut constraint, vocab);
    assert!(after_open[newline as usize], "newline after <tool_call>");
    assert!(!after_open[hello as usize] && !after_open[brace as usize]);
    assert!(!after_open[tokenizer.stop_ids()[0] as usize], "no end of turn inside a call");
    constraint.commit(newline).unwrap();
    let after_newline = allowed(&mut constraint, vocab);
    assert!(after_newline[brace as usize] && !after_newline[hello as usize]);
    // The whole canonical call is accepted token by token; the close is the special token.
    let call = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\", \"unit\": \
                \"celsius\", \"days\": 3}}\n</tool_call>";
    for token in tokenizer.encode(call).unwrap() {
        assert!(allowed(&mut constraint, vocab)[token as usize], "token {token} of {call:?}");
        constraint.commit(token).unwrap();
    }
    assert!(!constraint.in_grammar(), "free again after the call (parallel)");
    assert!(allowed(&mut constraint, vocab)[hello as usize]);
}

#[test]
fn qwen3_forced_call_starts_with_the_special_token_and_ends_the_turn() {
    let tokenizer = qwen3_tokenizer();
    let env = Arc::new(TokenEnv::new(&tokenizer).unwrap());
    let vocab = env.vocab_size();
    let tools = ToolUse {
        choice: ToolChoice::Function("get_weather".into()),
        parallel: false,
        ..ToolUse::offer(vec![weather_tool()])
    };
    let mut constraint = Constraint::for_request(&tools, false, &env).unwrap().unwrap();
    let first = allowed(&mut constraint, vocab);
    let allowed_ids: Vec<usize> = (0..vocab).filter(|&i| first[i]).collect();
    assert_eq!(allowed_ids, [151657], "only <tool_call> first");
    let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Ö\", \
                \"unit\": \"fahrenheit\", \"days\": 14}}\n</tool_call>";
    for token in tokenizer.encode(text).unwrap() {
        assert!(allowed(&mut constraint, vocab)[token as usize], "token {token}");
        constraint.commit(token).unwrap();
    }
    let end = allowed(&mut constraint, vocab);
    let ends: Vec<u32> = (0..vocab as u32).filter(|&i| end[i as usize]).collect();
    let mut stops = tokenizer.stop_ids().to_vec();
    stops.sort_unstable();
    assert_eq!(ends, stops, "only end of turn after the call");
    // A token the mask forbids is refused, never followed silently.
    let hello = tokenizer.encode("Hello").unwrap()[0];
    assert!(constraint.commit(hello).is_err());

    // Thinking on: the think block comes first, free, then the call.
    let mut thinking = Constraint::for_request(&tools, true, &env).unwrap().unwrap();
    let think = "<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n";
    for token in tokenizer.encode(think).unwrap() {
        assert!(allowed(&mut thinking, vocab)[token as usize], "token {token} of {think:?}");
        thinking.commit(token).unwrap();
    }
}

#[tokio::test]
async fn tiny_qwen3_random_weights_still_write_valid_calls() {
    // Random weights know nothing of JSON: every byte of the call is the grammar's doing.
    let engine =
        EngineHandle::spawn(engine_config(crate::engine::tiny_qwen3_path())).await.unwrap();
    let tools = ToolUse {
        choice: ToolChoice::Required,
        parallel: false,
        ..ToolUse::offer(vec![weather_tool(), reminder_tool()])
    };
    for seed in 1..=3 {
        let (text, streamed, finish) =
            run(&engine, "Weather?", hot(seed, 200), tools.clone()).await.unwrap();
        if finish == FinishReason::Length {
            // A 24-character string can take many random tokens: only a prefix is checked.
            assert!(text.starts_with("<tool_call>\n{\"name\": \""), "{text:?}");
            continue;
        }
        let calls = all_calls(&text, streamed);
        assert_eq!(calls.len(), 1, "{text:?}");
        match calls[0].0.as_str() {
            "get_weather" => check_weather(&calls[0].1),
            _ => check_reminder(&calls[0].1),
        }
    }
}
