//! `ember bench generate`: decode throughput on a model built from a config.json shape
//! (random weights) or loaded from a directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ember_models::burn::module::Module;
use ember_models::burn::tensor::Device;
use ember_models::decode_graph::{generate_graph, GraphDecode, GraphStats};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling, Sequence};
use ember_models::hybrid::stack::{HybridConfig, HybridLM};
use ember_models::qwen3::{Qwen3, Qwen3Config};
use ember_models::rng::Rng;

use crate::models::{self, AnyModel, RunFlags};

#[derive(clap::Subcommand)]
pub enum Command {
    /// New tokens per second of batched generation.
    Generate(GenArgs),
    /// Training tokens per second and MFU (forward, backward, clipping, AdamW).
    Train(crate::bench_train::Args),
    /// RL rollout tokens per second (G samples per prompt), and with --train one full RL
    /// step (rollout, then the clipped-surrogate update).
    Rollout(crate::bench_rl::Args),
    /// Encoder MLM training tokens per second (ModernBERT: forward, backward, AdamW).
    Encoder(crate::bench_encoder::Args),
    /// cuBLASLt GEMM (EMBER_GEMM=cublaslt) beside Burn's matmul: differences and TFLOP/s
    /// (CUDA builds).
    Gemm(crate::bench_gemm::Args),
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
    /// Decode through a step captured once and replayed as a graph (greedy), then compare
    /// its tokens with the eager engine's on the same prompts.
    #[arg(long)]
    graph: bool,
    /// With --graph: skip the comparison with the eager engine, which decodes eagerly and
    /// so takes as long as an eager run.
    #[arg(long, requires = "graph")]
    no_check: bool,
    /// Print every decode step's wall time (row 0's token arriving on the host), for each
    /// timed repetition: a step that compiles or tunes kernels stands out, and a repetition
    /// that is faster than the first shows what the first spent on shapes it had not seen.
    #[arg(long)]
    step_times: bool,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Generate(a) => bench_generate(a),
        Command::Train(a) => crate::bench_train::run(a),
        Command::Rollout(a) => crate::bench_rl::run(a),
        Command::Encoder(a) => crate::bench_encoder::run(a),
        Command::Gemm(a) => crate::bench_gemm::run(a),
    }
}

fn bench_generate(a: GenArgs) -> Result<()> {
    match (&a.model_config, &a.model) {
        (Some(cfg), None) => {
            let (v, origin) = config_json(cfg)?;
            let device = a.run.device()?;
            let dtype = a.run.dtype(&device)?;
            let kind = v.get("model_type").and_then(|k| k.as_str());
            eprintln!("building a model of this shape with random weights...");
            if kind.is_some_and(HybridConfig::is_hybrid_type) {
                let config = HybridConfig::from_value(&v, &origin)?;
                let vocab = config.vocab_size;
                let model = HybridLM::random(config, 0, &device)?.into_inference_dtype(dtype);
                let params = model.num_params();
                return bench_decoding(&a, &model, params, vocab, &device);
            }
            let config = Qwen3Config::from_value(&v, &origin)?;
            let (params, vocab) = (config.num_params(), config.vocab_size);
            let model = Qwen3::random(config, 0, &device)?.into_inference_dtype(dtype);
            bench_decoding(&a, &model, params, vocab, &device)
        }
        (None, Some(dir)) => match models::load_any(dir, &a.run)? {
            (AnyModel::Qwen3(m), device) => {
                let (params, vocab) = (m.config.num_params(), m.config.vocab_size);
                bench_decoding(&a, &*m, params, vocab, &device)
            }
            (AnyModel::Hybrid(m), device) => {
                let (params, vocab) = (m.num_params(), m.config.vocab_size);
                bench_decoding(&a, &*m, params, vocab, &device)
            }
            (AnyModel::ModernBert(_), _) => {
                bail!("{}: an encoder (modernbert) cannot generate", dir.display())
            }
        },
        _ => bail!("give --model-config FILE or --model DIR"),
    }
}

/// Times batched greedy decoding of `model` (`params` parameters, `vocab` tokens).
fn bench_decoding<M: GraphDecode>(
    a: &GenArgs,
    model: &M,
    params: usize,
    vocab: usize,
    device: &Device,
) -> Result<()> {
    let bytes_per_param = match a.run.dtype.as_str() {
        "f32" | "float32" => 4.0,
        _ => 2.0,
    };
    let mut rng = Rng::new(1);
    let vocab = vocab as u64;
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
        let run = |n: usize, steps: &mut Vec<Instant>| -> Result<(Vec<Sequence>, GraphStats)> {
            let mut stamp = |row: usize, _: u32| {
                if row == 0 {
                    steps.push(Instant::now());
                }
            };
            let mut hooks = Hooks::default();
            if a.step_times {
                hooks.on_token = Some(&mut stamp);
            }
            if a.graph {
                generate_graph(model, &prompts, &opts(n), &mut hooks)
            } else {
                let out = generate(model, &prompts, &opts(n), &mut hooks)?;
                Ok((out, GraphStats::default()))
            }
        };
        // Warm-up over the timed length: the key length grows every step, and on GPU
        // backends each new length bucket compiles and autotunes kernels (attention's
        // products above all), which would otherwise land inside the timed runs.
        let t0 = Instant::now();
        run(a.new_tokens, &mut vec![])?;
        let warmup = t0.elapsed().as_secs_f64();
        let mut best = f64::INFINITY;
        let (mut tokens, mut graph) = (vec![], GraphStats::default());
        for rep in 0..a.repeat.max(1) {
            let mut steps = vec![];
            let t0 = Instant::now();
            let (out, stats) = run(a.new_tokens, &mut steps)?;
            let secs = t0.elapsed().as_secs_f64();
            if a.step_times {
                print_step_times(b, rep, t0, &steps);
            }
            let n: usize = out.iter().map(|s| s.tokens.len()).sum();
            if n != b * a.new_tokens {
                bail!(
                    "benchmark produced {n} tokens, expected {}",
                    b * a.new_tokens
                );
            }
            if secs < best {
                (best, graph, tokens) = (secs, stats, out);
            }
        }
        let tps = (b * a.new_tokens) as f64 / best;
        let ms_step = best * 1e3 / a.new_tokens as f64;
        println!(
            "{b:>6} {:>8} {best:>10.3} {tps:>12.1} {ms_step:>10.2}",
            a.new_tokens
        );
        let engine = if a.graph { "ember-graph" } else { "ember" };
        let mut rec = serde_json::json!({"bench": "generate", "engine": engine, "batch": b,
            "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "seconds": best,
            "tokens_per_s": tps, "dtype": a.run.dtype, "device": format!("{device:?}"), "params": params,
            "warmup_s": warmup});
        println!("        warm-up run (compilation and autotuning included): {warmup:.2} s");
        if a.graph {
            // Each call captures its own step, so the time above pays for one capture; a
            // server would capture once and replay for every request.
            let replay = best - graph.capture_secs;
            let how = match graph.replayed {
                true => "replayed as a graph",
                false => "re-run each step: no graph replay on this device",
            };
            println!(
                "        {how}; capture {:.2} s of it; without the capture {:.1} tokens/s ({:.2} ms/step, prefill included)",
                graph.capture_secs,
                (b * a.new_tokens) as f64 / replay,
                replay * 1e3 / a.new_tokens as f64
            );
            rec["replayed"] = graph.replayed.into();
            rec["capture_s"] = graph.capture_secs.into();
            rec["tokens_per_s_without_capture"] = ((b * a.new_tokens) as f64 / replay).into();
        }
        if let Some(bw) = a.bandwidth_gbs {
            // At batch 1 each step must read every weight once: the bandwidth bound.
            let bound = bw * 1e9 / (params as f64 * bytes_per_param);
            let frac = (tps / b as f64) / bound;
            println!("        per-row {:.1} tokens/s = {:.1}% of the {bound:.0} tokens/s bandwidth bound", tps / b as f64, frac * 100.0);
            rec["bandwidth_fraction"] = frac.into();
        }
        if a.graph && !a.no_check {
            // The graph's tokens against the eager engine's on the same prompts: the
            // fraction of rows whose first tokens agree (bf16 near-ties may part them later).
            let n = a.new_tokens.min(16);
            let eager = generate(model, &prompts, &opts(n), &mut Hooks::default())?;
            let same = eager
                .iter()
                .zip(&tokens)
                .filter(|(e, g)| e.tokens[..] == g.tokens[..n])
                .count();
            let agree = same as f64 / b as f64;
            println!("        first {n} tokens equal to the eager engine's in {same} of {b} rows");
            rec["rows_agreeing_with_eager"] = agree.into();
        }
        if let Some(path) = &a.out {
            append_jsonl(path, &rec)?;
        }
    }
    Ok(())
}

/// One line per repetition: the milliseconds from the start to the first token (prefill
/// included), then between consecutive tokens.
fn print_step_times(batch: usize, rep: usize, t0: Instant, steps: &[Instant]) {
    let ms: Vec<String> = std::iter::once(t0)
        .chain(steps.iter().copied())
        .zip(steps)
        .map(|(a, b)| format!("{:.1}", (*b - a).as_secs_f64() * 1e3))
        .collect();
    println!(
        "        batch {batch}, repetition {}: ms per step: {}",
        rep + 1,
        ms.join(" ")
    );
}

/// Flags every training benchmark shares.
#[derive(clap::Args)]
pub struct TimedArgs {
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (kernel compilation, autotuning, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype (parameters and optimizer state stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Dense peak TFLOP/s of the device for MFU (default: 989 for CUDA bf16, the H100 SXM).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Append a JSON line with the results here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What a timed training benchmark measured.
pub struct Timed {
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub mfu: Option<f64>,
    /// The first step's loss: the first warm-up step's, or the first timed one's without
    /// warm-up.
    pub loss_first: f64,
    pub loss_last: f64,
}

/// Runs `warmup` untimed steps (the first one's time, compilation included, is reported),
/// then `steps` timed ones of `tokens_per_step` tokens; prints tokens/s, ms/step and MFU
/// against `peak_tflops` (default: 989 for CUDA bf16, the H100 SXM).
pub fn timed_steps(
    t: &TimedArgs,
    device: &Device,
    (batch, seq): (usize, usize),
    (params, flops_per_token): (usize, f64),
    step: &mut dyn FnMut() -> Result<f64>,
) -> Result<Timed> {
    let (warmup, steps, tokens_per_step) = (t.warmup, t.steps, batch * seq);
    let peak = peak_tflops(t.peak_tflops, device, &t.dtype);
    println!(
        "device: {device:?}  dtype: {}  params: {:.1}M  batch {batch} x seq {seq}  flops/token {flops_per_token:.3e}",
        t.dtype,
        params as f64 / 1e6,
    );
    let t0 = std::time::Instant::now();
    let mut first = f64::NAN;
    for i in 0..warmup {
        let l = step()?;
        if i == 0 {
            first = l;
            eprintln!(
                "first step (includes compilation): {:.2} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let t = std::time::Instant::now();
    let mut last = f64::NAN;
    for i in 0..steps {
        last = step()?;
        if warmup == 0 && i == 0 {
            first = last;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let tps = (tokens_per_step * steps) as f64 / secs;
    let step_ms = secs * 1e3 / steps as f64;
    let mfu = peak.map(|p| tps * flops_per_token / (p * 1e12));
    println!(
        "ember: {tps:.0} tokens/s, {step_ms:.1} ms/step{}  (loss {first:.3} -> {last:.3})",
        mfu.map(|m| format!(", MFU {:.1}%", 100.0 * m))
            .unwrap_or_default()
    );
    Ok(Timed {
        tokens_per_s: tps,
        step_ms,
        mfu,
        loss_first: first,
        loss_last: last,
    })
}

/// The device's dense peak TFLOP/s for MFU: given, or the H100's bf16 peak on CUDA bf16.
fn peak_tflops(given: Option<f64>, device: &Device, dtype: &str) -> Option<f64> {
    given.or_else(|| {
        (format!("{device:?}").to_lowercase().contains("cuda") && dtype == "bf16").then_some(989.0)
    })
}

/// Appends one JSON record to a results file, with the GEMM path ember's figures came from
/// (`EMBER_GEMM`), so that runs of one binary with and without cuBLASLt stay apart.
pub fn append_jsonl(path: &std::path::Path, rec: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut rec = rec.clone();
    if let Some(o) = rec.as_object_mut() {
        let gemm = std::env::var("EMBER_GEMM").unwrap_or_else(|_| "burn".into());
        o.insert("gemm".into(), gemm.into());
    }
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
    let (v, origin) = config_json(spec)?;
    Qwen3Config::from_value(&v, &origin)
}

/// A config.json's contents and a name for errors: a file, or a built-in shape's name.
pub fn config_json(spec: &std::path::Path) -> Result<(serde_json::Value, String)> {
    const BUILTIN: [(&str, &str); 2] = [
        (
            "qwen3-0.6b",
            include_str!("../../../benches/configs/qwen3-0.6b.json"),
        ),
        (
            "modernbert-base",
            include_str!("../../../benches/configs/modernbert-base.json"),
        ),
    ];
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
    Ok((v, origin))
}
