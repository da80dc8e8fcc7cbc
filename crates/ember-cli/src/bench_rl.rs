//! `ember bench rollout`: what RL costs on a model shape with random weights. It samples
//! `--group` completions for each of `--prompts` random prompts through the rollout path
//! (the generation engine on a non-autodiff copy of the policy, every row forced to
//! `--new-tokens`: no end token), and with `--train` then times one RL update on them: the
//! clipped-surrogate forward and backward over every completion, the global clip and AdamW,
//! through the trainer's own step.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ember_models::burn::module::Module;
use ember_models::decode_graph::{self, generate_auto};
use ember_models::generate::{GenerateOptions, Hooks, Sampling};
use ember_models::qwen3::Qwen3;
use ember_models::rng::Rng;
use ember_train::objectives::grpo::{policy_loss, PolicyRow, SurrogateConfig};
use ember_train::optim::{OptimConfig, Optimizer};
use ember_train::schedule::Schedule;
use ember_train::trainer::Trainer;

use crate::bench::{append_jsonl, model_config};
use crate::models::RunFlags;

#[derive(clap::Args)]
pub struct Args {
    /// A config.json, or a built-in shape name (qwen3-0.6b).
    #[arg(long)]
    model_config: PathBuf,
    #[arg(long, default_value_t = 64)]
    prompts: usize,
    /// Completions per prompt (G).
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 512)]
    new_tokens: usize,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Completions generated at once (0: all).
    #[arg(long, default_value_t = 0)]
    rollout_batch: usize,
    /// Also time one RL update on the rollout (a full RL step).
    #[arg(long)]
    train: bool,
    /// Micro-batches the update's backward pass is split into.
    #[arg(long, default_value_t = 8)]
    micro: usize,
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> Result<()> {
    if a.prompts == 0 || a.group == 0 || a.new_tokens == 0 || a.prompt_len == 0 {
        bail!("--prompts, --group, --new-tokens and --prompt-len must be at least 1");
    }
    let config = model_config(&a.model_config)?;
    let base = a.run.device()?;
    let dtype = a.run.dtype(&base)?;
    let vocab = config.vocab_size;
    let params = config.num_params();
    // The policy trains with f32 parameters and computes in `dtype`, as a stage does.
    let device = if a.train {
        base.clone().autodiff()
    } else {
        base.clone()
    };
    let model = Qwen3::random(config, 0, &device)?.with_compute_dtype(dtype);
    let mut rng = Rng::new(1);
    let prompts: Vec<Vec<u32>> = (0..a.prompts)
        .map(|_| {
            (0..a.prompt_len)
                .map(|_| (rng.next_u64() % vocab as u64) as u32)
                .collect()
        })
        .collect();
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), a.group))
        .collect();
    println!(
        "device: {base:?}  dtype: {}  params: {:.1}M  {} prompts × {} samples, {} prompt + {} new tokens, T = {}",
        a.run.dtype,
        params as f64 / 1e6,
        a.prompts,
        a.group,
        a.prompt_len,
        a.new_tokens,
        a.temperature
    );
    let opts = |new: usize, seed: u64| GenerateOptions {
        max_new_tokens: vec![new],
        eos_ids: vec![],
        pad_id: 0,
        sampling: Sampling {
            temperature: a.temperature,
            top_k: 0,
            top_p: 1.0,
            seed,
        },
    };
    let policy = model.valid();
    let chunk = if a.rollout_batch == 0 {
        rows.len()
    } else {
        a.rollout_batch
    };
    // Warm-up: kernel compilation, autotuning and the allocator, on the timed calls' shapes.
    // The graph engine's step has the whole length's cache in it, so the warm-up asks for
    // every new token and a hook stops each row after two.
    let mut two = |_: usize, toks: &[u32]| toks.len() >= 2;
    let mut hooks = Hooks {
        on_token: None,
        stop: Some(&mut two),
    };
    generate_auto(
        &policy,
        &rows[..chunk.min(rows.len())],
        &opts(a.new_tokens, 0),
        &mut hooks,
    )?;
    let t = Instant::now();
    let mut seqs = Vec::with_capacity(rows.len());
    for (i, part) in rows.chunks(chunk).enumerate() {
        seqs.extend(generate_auto(
            &policy,
            part,
            &opts(a.new_tokens, 7 + i as u64),
            &mut Hooks::default(),
        )?);
    }
    let rollout_s = t.elapsed().as_secs_f64();
    drop(policy);
    let new_tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
    let rollout_tps = new_tokens as f64 / rollout_s;
    println!(
        "rollout: {} completions, {new_tokens} new tokens in {rollout_s:.2} s: {rollout_tps:.0} tokens/s",
        seqs.len()
    );
    let mut rec = serde_json::json!({"bench": "rollout", "engine": "ember", "prompts": a.prompts,
        "group": a.group, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "dtype": a.run.dtype, "device": format!("{base:?}"), "params": params,
        "rollout_s": rollout_s, "rollout_tokens_per_s": rollout_tps,
        "decode": if decode_graph::graph_on(&base) { "graph" } else { "eager" }});
    if a.train {
        // Half of each group above the mean, half below; token-level aggregation.
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let policy_rows: Vec<PolicyRow> = rows
            .iter()
            .zip(&seqs)
            .enumerate()
            .map(|(i, (p, s))| PolicyRow {
                ids: p.iter().chain(&s.tokens).copied().collect(),
                prompt_len: p.len(),
                rollout_logp: s.logprobs.clone(),
                ref_logp: None,
                adv: vec![if i % 2 == 0 { 1.0 } else { -1.0 }; s.tokens.len()],
                weight: 1.0 / total as f32,
            })
            .collect();
        let cfg = SurrogateConfig {
            temperature: a.temperature as f64,
            eps_low: 0.2,
            eps_high: 0.28,
            beta: 0.0,
        };
        let schedule = Schedule::constant(1e-6);
        let mut trainer =
            Trainer::new(model, Optimizer::new(OptimConfig::default()), schedule, 1.0);
        let micro = a.micro.clamp(1, policy_rows.len());
        let n = policy_rows.len();
        let update = |trainer: &mut Trainer<_>| {
            trainer.train_step(micro, |m, i| {
                let part = &policy_rows[i * n / micro..(i + 1) * n / micro];
                Ok(policy_loss(m, part, &cfg)?.0 * micro as f64)
            })
        };
        // An RL stage repeats this update every step, so its steady cost is what counts: the
        // first one, untimed, compiles and tunes the kernels for these shapes.
        let t = Instant::now();
        update(&mut trainer)?;
        println!(
            "update warm-up (compilation and autotuning included): {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let stats = update(&mut trainer)?;
        let train_s = t.elapsed().as_secs_f64();
        let trained: usize = policy_rows.iter().map(|r| r.ids.len()).sum();
        println!(
            "update: {trained} tokens forward+backward in {micro} micro-batches, clip, AdamW: {train_s:.2} s ({:.0} tokens/s; loss {:.2e})",
            trained as f64 / train_s,
            stats.loss
        );
        println!(
            "RL step: {:.2} s ({:.0}% rollout)",
            rollout_s + train_s,
            100.0 * rollout_s / (rollout_s + train_s)
        );
        rec["train_s"] = train_s.into();
        rec["step_s"] = (rollout_s + train_s).into();
        rec["micro"] = micro.into();
    }
    if let Some(out) = &a.out {
        append_jsonl(out, &rec)?;
    }
    Ok(())
}
