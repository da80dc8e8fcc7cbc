//! `ember bench generate`: decode throughput on a model built from a config.json shape
//! (random weights) or loaded from a directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_models::qwen3::{Qwen3, Qwen3Config};
use ember_models::rng::Rng;

use crate::models::{self, RunFlags};

#[derive(clap::Subcommand)]
pub enum Command {
    /// New tokens per second of batched generation.
    Generate(GenArgs),
    /// Training tokens per second and MFU (forward, backward, clipping, AdamW).
    Train(crate::bench_train::Args),
    /// RL rollout tokens per second (G samples per prompt), and with --train one full RL
    /// step (rollout, then the clipped-surrogate update).
    Rollout(crate::bench_rl::Args),
}

#[derive(clap::Args)]
pub struct GenArgs {
    /// A config.json giving the model shape; weights are random (seeded).
    #[arg(long, conflicts_with = "model")]
    model_config: Option<PathBuf>,
    /// Or a model directory to load.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, default_value = "1,32", value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Timed repetitions per batch size (the best is reported).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Peak memory bandwidth in GB/s, to report the fraction of the batch-1 bound reached.
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
    /// Append one JSON line per batch size here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Generate(a) => bench_generate(a),
        Command::Train(a) => crate::bench_train::run(a),
        Command::Rollout(a) => crate::bench_rl::run(a),
    }
}

fn bench_generate(a: GenArgs) -> Result<()> {
    let (model, device) = match (&a.model_config, &a.model) {
        (Some(cfg), None) => {
            let config = model_config(cfg)?;
            let device = a.run.device()?;
            let dtype = a.run.dtype(&device)?;
            eprintln!(
                "building random {:.0}M-parameter model...",
                config.num_params() as f64 / 1e6
            );
            (
                Qwen3::random(config, 0, &device)?.into_inference_dtype(dtype),
                device,
            )
        }
        (None, Some(dir)) => models::load(dir, &a.run)?,
        _ => bail!("give --model-config FILE or --model DIR"),
    };
    let params = model.config.num_params();
    let bytes_per_param = match a.run.dtype.as_str() {
        "f32" | "float32" => 4.0,
        _ => 2.0,
    };
    let mut rng = Rng::new(1);
    let vocab = model.config.vocab_size as u64;
    let opts = |n: usize| GenerateOptions {
        max_new_tokens: vec![n],
        eos_ids: vec![], // every row runs to the full length
        pad_id: 0,
        sampling: Sampling::default(),
    };
    println!(
        "device: {:?}  dtype: {}  params: {:.1}M",
        device,
        a.run.dtype,
        params as f64 / 1e6
    );
    println!(
        "{:>6} {:>8} {:>10} {:>12} {:>10}",
        "batch", "new_tok", "seconds", "tokens/s", "ms/step"
    );
    for &b in &a.batch {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..a.prompt_len)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect()
            })
            .collect();
        // Warm-up: compiles kernels and fills allocator pools on GPU backends.
        generate(&model, &prompts, &opts(4), &mut Hooks::default())?;
        let mut best = f64::INFINITY;
        for _ in 0..a.repeat.max(1) {
            let t0 = Instant::now();
            let out = generate(&model, &prompts, &opts(a.new_tokens), &mut Hooks::default())?;
            let secs = t0.elapsed().as_secs_f64();
            let n: usize = out.iter().map(|s| s.tokens.len()).sum();
            if n != b * a.new_tokens {
                bail!(
                    "benchmark produced {n} tokens, expected {}",
                    b * a.new_tokens
                );
            }
            best = best.min(secs);
        }
        let tps = (b * a.new_tokens) as f64 / best;
        let ms_step = best * 1e3 / a.new_tokens as f64;
        println!(
            "{b:>6} {:>8} {best:>10.3} {tps:>12.1} {ms_step:>10.2}",
            a.new_tokens
        );
        let mut rec = serde_json::json!({"bench": "generate", "engine": "ember", "batch": b,
            "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "seconds": best,
            "tokens_per_s": tps, "dtype": a.run.dtype, "device": format!("{device:?}"), "params": params});
        if let Some(bw) = a.bandwidth_gbs {
            // At batch 1 each step must read every weight once: the bandwidth bound.
            let bound = bw * 1e9 / (params as f64 * bytes_per_param);
            let frac = (tps / b as f64) / bound;
            println!("        per-row {:.1} tokens/s = {:.1}% of the {bound:.0} tokens/s bandwidth bound", tps / b as f64, frac * 100.0);
            rec["bandwidth_fraction"] = frac.into();
        }
        if let Some(path) = &a.out {
            append_jsonl(path, &rec)?;
        }
    }
    Ok(())
}

/// Appends one JSON record to a results file.
pub fn append_jsonl(path: &std::path::Path, rec: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{rec}").with_context(|| format!("{}: cannot write", path.display()))
}

/// A model shape: a config.json path, or the name of one shipped in `benches/configs/`
/// (built into the binary, so it runs where the source tree is not).
pub fn model_config(spec: &std::path::Path) -> Result<Qwen3Config> {
    const BUILTIN: [(&str, &str); 1] = [(
        "qwen3-0.6b",
        include_str!("../../../benches/configs/qwen3-0.6b.json"),
    )];
    let (text, origin) = match BUILTIN
        .iter()
        .find(|(n, _)| std::path::Path::new(n) == spec)
    {
        Some((n, t)) if !spec.exists() => (t.to_string(), format!("built-in config {n}")),
        _ => (
            std::fs::read_to_string(spec)
                .with_context(|| format!("{}: cannot read", spec.display()))?,
            spec.display().to_string(),
        ),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| anyhow!("{origin}: {e}"))?;
    Qwen3Config::from_value(&v, &origin)
}
