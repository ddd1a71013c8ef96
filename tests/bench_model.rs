//! `bench-model`: a Qwen3-4B Q4_K_M file cut to two layers, written by the same streaming
//! code as the command with the real Qwen3 vocabulary, checked tensor by tensor, opened and
//! run by the engine; and the real binary's errors.

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use my_claw::llm::engine::gguf;
use my_claw::llm::engine::gguf_write::ALIGNMENT;
use my_claw::llm::engine::model::{Logits, Model, ModelConfig};
use my_claw::llm::engine::synth::{self, QuantMix, Qwen3Shape, SynthSpec};
use my_claw::llm::engine::vocab;

use crate::util;

#[test]
fn reduced_qwen3_4b_matches_its_table_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen3-4b-q4_k_m-2-layers.gguf");
    let mut spec = SynthSpec::official_qwen3(Qwen3Shape::B4, QuantMix::Q4_K_M);
    spec.n_layer = 2;
    let tokenizer_metadata =
        vocab::qwen3_tokenizer_metadata(&util::qwen3_tokenizer_json()).expect("Qwen3 vocabulary");
    let size = synth::write_streaming(&path, &spec, &tokenizer_metadata, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a .part file is left");

    // Candle's reader: every tensor with its planned shape and type, in llama-quantize's
    // order, each at the previous one's end rounded up to the alignment.
    let content = Content::read(&mut File::open(&path).unwrap()).unwrap();
    let mut plan = synth::tensor_plan(&spec);
    plan.sort_by(|a, b| synth::llama_cpp_tensor_order(&a.entry.name, &b.entry.name));
    assert_eq!(content.tensor_infos.len(), 2 + 2 * 11);
    assert_eq!(plan[0].entry.name, "output_norm.weight");
    let mut offset = 0;
    for planned in &plan {
        let entry = &planned.entry;
        let info = &content.tensor_infos[&entry.name];
        assert_eq!(
            (info.shape.dims(), info.ggml_dtype, info.offset),
            (&entry.dims[..], entry.dtype, offset),
            "{}",
            entry.name
        );
        offset += entry.n_bytes().next_multiple_of(ALIGNMENT);
    }
    assert_eq!(content.tensor_data_offset + offset, size);
    // Tied embeddings: token_embd is the output, so Q6_K; layers 0 and 1 get Q6_K values
    // and FFN-down (the first eighth of 36 layers).
    let dtype = |name: &str| content.tensor_infos[name].ggml_dtype;
    assert!(!content.tensor_infos.contains_key("output.weight"));
    assert_eq!(dtype("token_embd.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.1.attn_v.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.1.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.1.ffn_up.weight"), GgmlDType::Q4K);
    assert_eq!(dtype("blk.1.attn_k_norm.weight"), GgmlDType::F32);

    let md = &content.metadata;
    let string = |key: &str| md[key].to_string().unwrap().clone();
    assert_eq!(string("general.architecture"), "qwen3");
    assert_eq!(string("general.name"), "Qwen3-4B (random weights, benchmark only)");
    assert!(md["my_claw.synthetic"].to_bool().unwrap());
    assert_eq!(md["general.file_type"].to_u32().unwrap(), 15);
    assert_eq!(md["general.quantization_version"].to_u32().unwrap(), 2);
    assert_eq!(md["qwen3.attention.key_length"].to_u32().unwrap(), 128);
    assert_eq!(md["qwen3.attention.value_length"].to_u32().unwrap(), 128);
    assert_eq!(md["qwen3.rope.freq_base"].to_f32().unwrap(), 1e6);
    assert!(!md.contains_key("general.alignment"));
    assert!(string("tokenizer.chat_template").contains("<|im_start|>"));
    let Value::Array(tokens) = &md["tokenizer.ggml.tokens"] else { panic!("tokens") };
    assert_eq!(tokens.len(), 151_936);

    // Our checks accept it and label it like the official file.
    // (Its label is Q6_K: with two layers left, the Q6_K embedding table outweighs the Q4_K
    // layers. The full files are labelled like the official ones; see synth's unit tests.)
    let mut file = gguf::open(&path).expect("open with the engine's checks");
    assert_eq!(file.file_size, size);
    let hp = file.hparams.clone();
    assert_eq!(
        (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff, hp.vocab_size),
        (2, 2560, 32, 8, 128, 9728, 151_936)
    );
    assert_eq!((hp.context_length, hp.rope_freq_base), (40_960, 1e6));

    // The engine loads it and gives finite, non-constant logits for a real prompt and for a
    // decode step after it.
    let tokenizer = file.tokenizer().expect("tokenizer from the file");
    let prompt = tokenizer.encode("<|im_start|>user\nHello there!<|im_end|>\n").unwrap();
    let model = {
        let config = ModelConfig::from_hparams(&hp, 256);
        let mut reader = BufReader::new(&mut file.file);
        Model::load(&file.content, &mut reader, config).expect("load")
    };
    let mut cache = model.new_cache(256);
    let prefill = model.forward(&prompt, &mut cache, Logits::All).unwrap();
    let rows = prefill.to_vec2::<f32>().unwrap();
    assert_eq!(rows.len(), prompt.len());
    let decode = model.forward(&[42], &mut cache, Logits::Last).unwrap();
    for row in rows.iter().chain(&decode.to_vec2::<f32>().unwrap()) {
        assert_eq!(row.len(), 151_936);
        assert!(row.iter().all(|v| v.is_finite()), "non-finite logits");
        let (min, max) =
            row.iter().fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        assert!(max - min > 1.0 && max.abs() < 100.0, "logits from {min} to {max}");
    }
}

/// The random blocks keep activations finite and logits of unit-ish spread through 40
/// layers (the 14B depth and Q4_K_M layer mix, at a width small enough for a test).
#[test]
fn forty_random_layers_keep_logits_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.gguf");
    let spec = SynthSpec {
        n_embd: 256,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 768,
        vocab_size: 1000,
        ..SynthSpec::official_qwen3(Qwen3Shape::B14, QuantMix::Q4_K_M)
    };
    assert_eq!(spec.n_layer, 40);
    synth::write_streaming(&path, &spec, &[], &mut |_| {}).unwrap();
    let mut file = gguf::open(&path).expect("open");
    let config = ModelConfig::from_hparams(&file.hparams.clone(), 64);
    let model = {
        let mut reader = BufReader::new(&mut file.file);
        Model::load(&file.content, &mut reader, config).expect("load")
    };
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 % 1000) as u32).collect();
    let logits = model.forward(&tokens, &mut model.new_cache(64), Logits::All).unwrap();
    for row in logits.to_vec2::<f32>().unwrap() {
        assert!(row.iter().all(|v| v.is_finite()), "non-finite logits");
        let mean = row.iter().sum::<f32>() / row.len() as f32;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / row.len() as f32;
        assert!((0.3..3.0).contains(&var.sqrt()), "logit spread {}", var.sqrt());
    }
}

#[test]
fn binary_rejects_an_unknown_shape() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["bench-model", "--shape", "qwen3-7b", "--quant", "q4_k_m", "--out", "x.gguf"];
    let out = util::run_binary(&args, &[], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown shape `qwen3-7b` (known: qwen3-4b, qwen3-8b, qwen3-14b)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn binary_reports_a_missing_output_directory_and_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere").join("x.gguf");
    let args = ["bench-model", "--shape", "qwen3-4b", "--quant", "q8_0", "--out"];
    let out =
        util::run_binary(&[&args[..], &[missing.to_str().unwrap()]].concat(), &[], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected =
        format!("output directory {} does not exist", dir.path().join("nowhere").display());
    assert!(stderr.contains(&expected), "{stderr}");

    // Run from a directory without the fetched assets, the default vocabulary is missing.
    let out = util::run_binary(&[&args[..], &["x.gguf"]].concat(), &[], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run scripts/fetch-assets.sh or pass --tokenizer"), "{stderr}");
    assert!(!dir.path().join("x.gguf").exists() && !dir.path().join("x.gguf.part").exists());
}
