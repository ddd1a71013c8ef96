//! `my-claw bench-model`: writes a GGUF with the tensor table, quantization mix and metadata
//! of an official Qwen3 file, random weights and the real Qwen3 vocabulary, so `--bench` can
//! measure the product's real sizes where the real weights cannot be had. The file is for
//! throughput only, never for answers. Terminal output only; `llm::engine::synth` makes it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::llm::engine::synth::{self, QuantMix, Qwen3Shape, SynthSpec, WriteProgress};
use crate::llm::engine::vocab;
use crate::llm::pool::human_bytes;

/// Options of `my-claw bench-model`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchModelArgs {
    /// The official Qwen3 file to imitate: qwen3-4b, qwen3-8b or qwen3-14b.
    #[arg(long, value_parser = parse_shape, required_unless_present_any = ["tiny", "tiny_llama"])]
    pub shape: Option<Qwen3Shape>,
    /// Its quantization: q4_k_m or q8_0.
    #[arg(long, value_parser = parse_quant, required_unless_present_any = ["tiny", "tiny_llama"])]
    pub quant: Option<QuantMix>,
    /// Write the test suite's 2-layer Qwen3 instead (several quantization types, the real
    /// vocabulary): small, for checking a device (`device-check`), not for speed.
    #[arg(long, conflicts_with_all = ["shape", "quant", "tiny_llama"])]
    pub tiny: bool,
    /// Write a 2-layer Llama instead (as `--tiny`): checks a device's Llama path.
    #[arg(long, conflicts_with_all = ["shape", "quant"])]
    pub tiny_llama: bool,
    /// The GGUF file to write (written beside it as FILE.part, then renamed).
    #[arg(long)]
    pub out: PathBuf,
    /// The Qwen3 tokenizer.json whose vocabulary goes into the file; a tokenizer_config.json
    /// beside it adds the chat template (scripts/fetch-assets.sh fetches both).
    #[arg(long, default_value = "tests/assets/qwen3/tokenizer.json")]
    pub tokenizer: PathBuf,
}

/// Writes the file, with a progress line on stderr and its size and time on stdout.
pub fn run(args: &BenchModelArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let out = args.out.as_path();
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!("output directory {} does not exist", dir.display());
    }
    if out.is_dir() {
        bail!("{} is a directory; --out names the file to write", out.display());
    }
    let tokenizer_metadata = vocab::qwen3_tokenizer_metadata(&args.tokenizer).context(
        "the file needs the real Qwen3 vocabulary: run scripts/fetch-assets.sh or pass --tokenizer",
    )?;

    let size = match (args.shape, args.quant) {
        (Some(shape), Some(quant)) if !args.tiny && !args.tiny_llama => {
            let spec = SynthSpec::official_qwen3(shape, quant);
            eprintln!(
                "writing {} {} (random weights, for benchmarks only) to {}",
                shape.label(),
                quant.label(),
                out.display()
            );
            let mut line = ProgressLine { last_draw: None };
            let size =
                synth::write_streaming(out, &spec, &tokenizer_metadata, &mut |p| line.draw(p))
                    .with_context(|| format!("writing {}", out.display()))?;
            eprintln!();
            size
        }
        _ => {
            // Small enough to build in memory, where candle quantizes every type it uses
            // (the streaming writer generates only the official files' types).
            let part = out.with_extension("part");
            let spec = match args.tiny_llama {
                true => SynthSpec::tiny_llama(),
                false => SynthSpec::tiny_qwen3(),
            };
            synth::write_model(&part, &spec, &tokenizer_metadata)
                .with_context(|| format!("writing {}", part.display()))?;
            std::fs::rename(&part, out).with_context(|| format!("writing {}", out.display()))?;
            std::fs::metadata(out)?.len()
        }
    };
    println!(
        "wrote {}: {} ({size} bytes) in {:.1} s",
        out.display(),
        human_bytes(size),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn parse_shape(s: &str) -> Result<Qwen3Shape, String> {
    Qwen3Shape::parse(s).ok_or_else(|| {
        let known: Vec<&str> = Qwen3Shape::ALL.iter().map(|shape| shape.label()).collect();
        format!("unknown shape `{s}` (known: {})", known.join(", "))
    })
}

fn parse_quant(s: &str) -> Result<QuantMix, String> {
    QuantMix::parse(s).ok_or_else(|| {
        let known: Vec<&str> = QuantMix::ALL.iter().map(|quant| quant.label()).collect();
        format!("unknown quantization `{s}` (known: {})", known.join(", "))
    })
}

/// One stderr line redrawn at most every 200 ms, and once more when the last tensor is done.
struct ProgressLine {
    last_draw: Option<Instant>,
}

impl ProgressLine {
    fn draw(&mut self, progress: &WriteProgress) {
        let done = progress.tensors_done == progress.tensors_total;
        if !done && self.last_draw.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r  {}/{} tensors  {} / {}   ",
            progress.tensors_done,
            progress.tensors_total,
            human_bytes(progress.bytes_done),
            human_bytes(progress.bytes_total)
        );
        let _ = err.flush();
    }
}
