//! `my-claw device-check`: does a model give the same answer on a candle device (the GPU)
//! as on our own CPU kernels? Loads the file twice, runs the same greedy decode on both,
//! then feeds the CPU's tokens to the device model too, so the logits can be compared at
//! every position without one early difference changing everything after it. The tests
//! run the same comparison on candle's CPU device (`compare`); `scripts/gpu-check.sh` runs
//! it on CUDA. Owns no model code.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::domain::{ChatTurn, Role};
use crate::llm::engine::candle_model::CandleModel;
use crate::llm::engine::device::ComputeDevice;
use crate::llm::engine::gguf;
use crate::llm::engine::model::{KvType, Logits, Model, ModelConfig};
use crate::llm::engine::sampling::argmax;
use crate::llm::engine::template::{self, ChatFormat};

/// Options of `my-claw device-check`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceCheckArgs {
    /// GGUF model file to check.
    #[arg(long)]
    pub model: PathBuf,
    /// Greedy tokens generated on each device.
    #[arg(long, default_value_t = 24)]
    pub tokens: usize,
    /// The user message of the prompt.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// KV storage on both sides: `f16` (production) or `f32`.
    #[arg(long, default_value = "f16")]
    pub kv_type: String,
}

pub const DEFAULT_PROMPT: &str = "What is the capital of France?";

/// What the two forward passes gave.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub model: String,
    pub kv_type: &'static str,
    pub device: String,
    pub device_name: String,
    /// How the device ran decode steps: `fused` kernels or candle's `ops`.
    pub decode_path: &'static str,
    pub prompt_tokens: usize,
    /// Greedy tokens on our CPU kernels and on the device.
    pub cpu_tokens: Vec<u32>,
    pub device_tokens: Vec<u32>,
    pub same_tokens: bool,
    /// Over every position of the CPU's greedy sequence (prompt end and each new token):
    /// the largest absolute difference between the two logits vectors, and that over the
    /// spread (max − min) of the CPU logits at the same position.
    pub max_abs_logit_diff: f32,
    pub max_rel_logit_diff: f32,
    /// Positions where the device's top token differs from the CPU's.
    pub top1_disagreements: usize,
    /// Of those, the ones the numbers cannot explain: the CPU's top token led the second by
    /// more than twice the largest logit difference at that position. Always 0 unless one
    /// forward pass is wrong.
    pub unexplained_disagreements: usize,
}

/// `my-claw device-check`: prints the comparison as JSON; fails when the greedy tokens
/// differ.
pub fn run(args: &DeviceCheckArgs, device: &ComputeDevice) -> anyhow::Result<()> {
    let device = match device {
        ComputeDevice::Candle(_) => device.clone(),
        // On a machine without a GPU, check candle's CPU device (what the tests do).
        ComputeDevice::Kernels => ComputeDevice::Candle(candle_core::Device::Cpu),
    };
    let Some(kv_type) = KvType::from_setting(&args.kv_type) else {
        anyhow::bail!("--kv-type {}: must be f16 or f32", args.kv_type)
    };
    let result = compare(&args.model, &device, &args.prompt, args.tokens, kv_type)?;
    println!("{}", result.to_json());
    if !result.same_tokens || result.unexplained_disagreements > 0 {
        anyhow::bail!(
            "{}: the greedy tokens differ between the CPU and {}",
            result.model,
            result.device
        );
    }
    Ok(())
}

/// Run `prompt` greedily for `n_tokens` on our kernels and on `device`'s candle forward
/// pass, both keeping keys and values as `kv_type` (f16 in production; with it the device
/// also multiplies queries, keys and attention weights in f16).
pub fn compare(
    path: &Path,
    device: &ComputeDevice,
    prompt: &str,
    n_tokens: usize,
    kv_type: KvType,
) -> anyhow::Result<Comparison> {
    let ComputeDevice::Candle(candle_device) = device else {
        anyhow::bail!("the comparison needs a candle device")
    };
    let mut file = gguf::open(path)?;
    let tokenizer = file.tokenizer()?;
    let hp = file.hparams.clone();
    let rendered = template::render(
        ChatFormat::for_arch(hp.arch),
        &[ChatTurn::new(Role::User, prompt.to_string())],
        &[],
        false,
    );
    let prompt_ids = tokenizer.encode(&rendered).context("tokenizing the prompt")?;
    let n_ctx = prompt_ids.len() + n_tokens + 1;
    let mut config = ModelConfig::from_hparams(&hp, n_ctx);
    config.kv_type = kv_type;
    let ours = {
        let mut reader = std::io::BufReader::new(&mut file.file);
        Model::load(&file.content, &mut reader, config.clone()).context("loading on the CPU")?
    };
    let theirs = {
        let mut reader = std::io::BufReader::new(&mut file.file);
        CandleModel::load(&file.content, &mut reader, config, candle_device)
            .context("loading on the device")?
    };

    // Greedy on each side, then the CPU's sequence fed to the device (forced), so the
    // logits can be compared position by position.
    let mut cache = ours.new_cache(n_ctx);
    let (cpu_tokens, cpu_logits) = decode(&prompt_ids, n_tokens, None, |tokens| {
        Ok(ours.forward(tokens, &mut cache, Logits::Last)?.flatten_all()?.to_vec1()?)
    })?;
    let mut cache = theirs.new_cache(n_ctx);
    let (device_tokens, _) = decode(&prompt_ids, n_tokens, None, |tokens| {
        Ok(theirs.forward(tokens, &mut cache, Logits::Last)?.flatten_all()?.to_vec1()?)
    })?;
    let mut cache = theirs.new_cache(n_ctx);
    let (_, device_logits) = decode(&prompt_ids, n_tokens, Some(&cpu_tokens), |tokens| {
        Ok(theirs.forward(tokens, &mut cache, Logits::Last)?.flatten_all()?.to_vec1()?)
    })?;
    let (mut max_abs, mut max_rel, mut disagreements, mut unexplained) = (0f32, 0f32, 0, 0);
    for (cpu, dev) in cpu_logits.iter().zip(&device_logits) {
        let spread = cpu.iter().copied().fold(f32::MIN, f32::max)
            - cpu.iter().copied().fold(f32::MAX, f32::min);
        let diff = cpu.iter().zip(dev).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        max_abs = max_abs.max(diff);
        max_rel = max_rel.max(diff / spread.max(f32::EPSILON));
        let best = argmax(cpu);
        if best != argmax(dev) {
            disagreements += 1;
            let second = cpu
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != best as usize)
                .map(|(_, &v)| v)
                .fold(f32::MIN, f32::max);
            if cpu[best as usize] - second > 2.0 * diff {
                unexplained += 1;
            }
        }
    }
    let info = device.info();
    Ok(Comparison {
        model: file.name.clone(),
        kv_type: kv_type.as_str(),
        device: info.id,
        device_name: info.name,
        decode_path: theirs.decode_path(),
        prompt_tokens: prompt_ids.len(),
        same_tokens: cpu_tokens == device_tokens,
        cpu_tokens,
        device_tokens,
        max_abs_logit_diff: max_abs,
        max_rel_logit_diff: max_rel,
        top1_disagreements: disagreements,
        unexplained_disagreements: unexplained,
    })
}

impl Comparison {
    /// One JSON line, as `device-check` prints it (and `scripts/gpu-check.sh` reads it).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "model": self.model,
            "kv_type": self.kv_type,
            "device": self.device,
            "device_name": self.device_name,
            "decode_path": self.decode_path,
            "prompt_tokens": self.prompt_tokens,
            "cpu_tokens": self.cpu_tokens,
            "device_tokens": self.device_tokens,
            "same_tokens": self.same_tokens,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "max_rel_logit_diff": self.max_rel_logit_diff,
            "top1_disagreements": self.top1_disagreements,
            "unexplained_disagreements": self.unexplained_disagreements,
        })
    }
}

/// `n_tokens` tokens after `prompt` through `step` (which runs tokens and returns the last
/// logits): greedy, or the `forced` tokens when given. Returns the tokens and the logits
/// each was chosen from.
fn decode(
    prompt: &[u32],
    n_tokens: usize,
    forced: Option<&[u32]>,
    mut step: impl FnMut(&[u32]) -> anyhow::Result<Vec<f32>>,
) -> anyhow::Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let mut logits = vec![step(prompt)?];
    let mut tokens = Vec::with_capacity(n_tokens);
    while tokens.len() < n_tokens {
        let last = logits.last().expect("the prompt's logits");
        let next = forced.map_or_else(|| argmax(last), |forced| forced[tokens.len()]);
        tokens.push(next);
        if tokens.len() < n_tokens {
            logits.push(step(&[next])?);
        }
    }
    Ok((tokens, logits))
}
