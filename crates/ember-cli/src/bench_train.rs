//! `ember bench train`: training throughput on random tokens with a model of a given shape,
//! through the same optimisation step the trainer uses. Also times the phases (forward,
//! forward+backward, full step) so a shortfall can be located.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_models::hybrid::stack::{HybridConfig, HybridLM};
use ember_models::qwen3::{Qwen3, Qwen3Config};
use ember_models::rng::Rng;
use ember_train::objectives::linear_ce::{chunk_rows, linear_cross_entropy};
use ember_train::objectives::lm::cross_entropy;
use ember_train::optim::{OptimConfig, Optimizer};
use ember_train::pretrain::{device_batch_loss, parse_dtype, DeviceBatch};
use ember_train::schedule::Schedule;
use ember_train::trainer::{scalar, HostTimeline, NextTokenModel, TrainModel, Trainer};

use crate::bench::{append_jsonl, config_json, timed_steps, Timed, TimedArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    t: TimedArgs,
    /// A config.json, or a built-in shape name (qwen3-0.6b).
    #[arg(long)]
    model_config: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    #[arg(long)]
    grad_checkpointing: bool,
    /// Also time forward-only and forward+backward, to split the step.
    #[arg(long)]
    phases: bool,
    /// Compute the loss from the full `[tokens, vocab]` logits, as before the fused
    /// chunked head + cross-entropy that training uses (for comparison).
    #[arg(long)]
    unfused_ce: bool,
    /// Train with Burn's dense attention (O(seq²) memory) instead of the blocked attention
    /// with its own backward (for comparison).
    #[arg(long)]
    dense_attention: bool,
    /// After the eager steps, go on training through a captured step (forward, backward,
    /// clip and AdamW recorded once and replayed as one graph; `ember_train::captured`) and
    /// time that too: the difference is the host's share of an eager step. Qwen3 shapes.
    #[arg(long)]
    graph: bool,
}

fn random_batch(
    rng: &mut Rng,
    b: usize,
    s: usize,
    vocab: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let v: Vec<i32> = (0..b * (s + 1))
        .map(|_| (rng.next_u64() % vocab as u64) as i32)
        .collect();
    let t = Tensor::<2, Int>::from_data(TensorData::new(v, [b, s + 1]), device);
    (t.clone().narrow(1, 0, s), t.narrow(1, 1, s))
}

pub fn run(a: Args) -> Result<()> {
    let (v, origin) = config_json(&a.model_config)?;
    let base = ember_models::device::select(&a.t.device)?;
    let dtype = parse_dtype(&a.t.dtype, &base, "--dtype")?;
    let mut dev = base.clone().autodiff();
    if a.grad_checkpointing {
        dev = dev.gradient_checkpointing();
    }
    let kind = v
        .get("model_type")
        .and_then(|k| k.as_str())
        .unwrap_or("qwen3");
    let hybrid = HybridConfig::is_hybrid_type(kind);
    if hybrid && (a.phases || a.graph) {
        bail!("--phases and --graph: only for qwen3 shapes");
    }
    if a.graph && ember_models::layers::gemm::on_cublaslt(&base) {
        // The recording would run Burn's matmul on shapes the warm-up steps never tuned,
        // and tuning cannot run inside a recording.
        bail!("--graph: unset EMBER_GEMM=cublaslt (cuBLASLt's stream is not recorded in a graph)");
    }
    let mut rng = Rng::new(0);
    let schedule = Schedule::constant(3e-4);
    let optim = || Optimizer::new(OptimConfig::default());
    let (r, params, mut extra) = if hybrid {
        let config = HybridConfig::from_value(&v, &origin)?;
        let vocab = config.vocab_size;
        let mut model = HybridLM::random(config, 0, &dev)?.with_compute_dtype(dtype);
        model.dense_attention = a.dense_attention;
        let trainer = Trainer::new(model, optim(), schedule, 1.0);
        let (r, trainer, host) = timed_train(&a, &base, &dev, trainer, vocab, &mut rng)?;
        (r, trainer.model().param_count(), host)
    } else {
        let config = Qwen3Config::from_value(&v, &origin)?;
        let vocab = config.vocab_size;
        let mut model = Qwen3::random(config, 0, &dev)?.with_compute_dtype(dtype);
        model.dense_attention = a.dense_attention;
        let trainer = Trainer::new(model, optim(), schedule, 1.0);
        let (r, trainer, mut split) = timed_train(&a, &base, &dev, trainer, vocab, &mut rng)?;
        if a.phases {
            split.extend(phases(
                &a,
                trainer.model(),
                &mut rng,
                &base,
                &dev,
                r.step_ms,
            )?);
        }
        let params = trainer.model().param_count();
        if a.graph {
            split.extend(timed_graph(&a, trainer, vocab, &mut rng, r.step_ms)?);
        }
        (r, params, split)
    };
    let peak_rss = peak_rss_gb();
    if let Some(gb) = peak_rss {
        println!("peak resident memory of the process: {gb:.2} GB");
    }
    let mut rec = serde_json::json!({"bench": "train", "engine": "ember", "model_type": kind,
        "batch": a.batch, "seq": a.seq, "dtype": a.t.dtype, "device": format!("{base:?}"),
        "tokens_per_s": r.tokens_per_s, "step_ms": r.step_ms, "mfu": r.mfu,
        "loss_first": r.loss_first, "loss_last": r.loss_last, "params": params,
        "grad_checkpointing": a.grad_checkpointing, "peak_rss_gb": peak_rss,
        "fused_ce": !a.unfused_ce, "dense_attention": a.dense_attention});
    for (k, v) in extra.drain(..) {
        rec[k] = v.into();
    }
    if let Some(p) = &a.t.out {
        append_jsonl(p, &rec)?;
    }
    Ok(())
}

/// Named figures for the JSON record.
type Fields = Vec<(&'static str, f64)>;

/// Timed next-token training steps on random tokens; gives the trainer back, with the
/// timed steps' mean host timeline (printed, and as JSON fields).
fn timed_train<M: NextTokenModel>(
    a: &Args,
    base: &Device,
    dev: &Device,
    mut trainer: Trainer<M>,
    vocab: usize,
    rng: &mut Rng,
) -> Result<(Timed, Trainer<M>, Fields)> {
    let flops = trainer.model().flops_per_token(a.seq);
    let params = trainer.model().param_count();
    let mut timelines: Vec<HostTimeline> = Vec::new();
    let r = timed_steps(&a.t, base, (a.batch, a.seq), (params, flops), &mut || {
        let (x, y) = random_batch(rng, a.batch, a.seq, vocab, dev);
        let pos = Tensor::<1, Int>::arange(0..a.seq as i64, dev)
            .reshape([1, a.seq])
            .expand([a.batch, a.seq]);
        let stats = trainer.train_step(1, |m, _| {
            if a.unfused_ce {
                return Ok(cross_entropy(
                    m.packed_logits(x.clone(), pos.clone(), None),
                    y.clone(),
                    None,
                ));
            }
            let hidden = m.packed_hidden(x.clone(), pos.clone(), None);
            let dim = hidden.dims()[2];
            let n = a.batch * a.seq;
            Ok(linear_cross_entropy(
                hidden.reshape([n, dim]),
                m.head_weight(),
                y.clone().reshape([n]),
                None,
                chunk_rows(vocab, dev),
            ))
        })?;
        timelines.push(stats.host);
        Ok(stats.loss)
    })?;
    let timed = &timelines[timelines.len().saturating_sub(a.t.steps)..];
    let mean = |f: fn(&HostTimeline) -> f64| {
        1e3 * timed.iter().map(f).sum::<f64>() / timed.len().max(1) as f64
    };
    let (issue, loss_wait, norm_wait, update) = (
        mean(|h| h.issue),
        mean(|h| h.loss_wait),
        mean(|h| h.norm_wait),
        mean(|h| h.update),
    );
    println!(
        "host timeline (ms per timed step): issue forward+backward {issue:.1}, wait for the loss \
         {loss_wait:.1}, gradient norm {norm_wait:.1}, issue the update {update:.1}"
    );
    let host = vec![
        ("host_issue_ms", issue),
        ("host_loss_wait_ms", loss_wait),
        ("host_norm_ms", norm_wait),
        ("host_update_ms", update),
    ];
    Ok((r, trainer, host))
}

/// Goes on training the trainer's model and optimizer state through a captured step (the
/// same loss as the eager steps) and times its replays, each on a new random batch;
/// `eager_ms` is the eager step's time, for the ratio.
fn timed_graph(
    a: &Args,
    mut trainer: Trainer<Qwen3>,
    vocab: usize,
    rng: &mut Rng,
    eager_ms: f64,
) -> Result<Fields> {
    let dev = trainer.model().embed_tokens.val().device();
    let (b, s) = (a.batch, a.seq);
    let pos = Tensor::<1, Int>::arange(0..s as i64, &dev)
        .reshape([1, s])
        .expand([b, s]);
    let mut step = |rng: &mut Rng| {
        let (inputs, targets) = random_batch(rng, b, s, vocab, &dev);
        let batch = DeviceBatch {
            inputs,
            targets,
            positions: pos.clone(),
            segments: None,
            weights: None,
        };
        // The loss is taken by the first call, which captures the step.
        trainer.train_captured(vec![batch], || {
            Box::new(|m: &Qwen3, b: &DeviceBatch| device_batch_loss(m, b))
        })
    };
    step(rng)?;
    let t = Instant::now();
    let mut last = step(rng)?;
    for _ in 1..a.t.steps {
        last = step(rng)?;
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / a.t.steps.max(1) as f64;
    let tps = (b * s) as f64 / (step_ms / 1e3);
    let capture_secs = trainer.capture_secs().unwrap_or(f64::NAN);
    let replayed = trainer.replays_graph();
    println!(
        "captured step: capture {capture_secs:.2} s (warm-up runs and the recording), replayed as a graph: {replayed}"
    );
    println!(
        "ember, captured step: {tps:.0} tokens/s, {step_ms:.1} ms/step (loss {:.3}), {:.2}x the eager step",
        last.loss,
        eager_ms / step_ms
    );
    Ok(vec![
        ("graph_tokens_per_s", tps),
        ("graph_step_ms", step_ms),
        ("graph_capture_s", capture_secs),
        ("graph_replayed", replayed as u8 as f64),
    ])
}

/// The process's peak resident set (Linux `VmHWM`), in GB.
fn peak_rss_gb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1e6)
}

/// Times the step's parts: whole-model forward and forward+backward, then components in
/// isolation: a hidden-layer-sized GEMM (the matmul rate reached), one layer's attention
/// forward+backward (the autodiff path), and the head plus loss. Components timed alone run
/// without the rest of the graph around them, so they bound rather than split the step.
/// Returns (name, ms or rate).
fn phases(
    a: &Args,
    model: &Qwen3,
    rng: &mut Rng,
    base: &Device,
    dev: &Device,
    step_ms: f64,
) -> Result<Fields> {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::Distribution;
    let n = 3;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let t = Instant::now();
        for _ in 0..n {
            f()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    };
    let c = model.config.clone();
    let dtype = model.compute_dtype;
    let (b, s, vocab) = (a.batch, a.seq, c.vocab_size);
    let tokens = b * s;
    let (x, y) = random_batch(rng, b, s, vocab, base);
    let valid = burn::module::Module::valid(model);
    let fwd =
        time(&mut || scalar(cross_entropy(valid.forward(x.clone()), y.clone(), None)).map(drop))?;
    let (xa, ya) = random_batch(rng, b, s, vocab, dev);
    let fwd_bwd = time(&mut || {
        let g = cross_entropy(model.forward(xa.clone()), ya.clone(), None).backward();
        // Reading one gradient waits for the whole backward pass.
        if let Some(e) = model.embed_tokens.val().grad(&g) {
            scalar(e.sum())?;
        }
        Ok(())
    })?;

    let normal = Distribution::Normal(0.0, 1.0);
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    let xm = Tensor::<2>::random([tokens, h], normal, base).cast(dtype);
    let wm = Tensor::<2>::random([h, inter], normal, base).cast(dtype);
    let gemm = time(&mut || {
        scalar(
            xm.clone()
                .matmul(wm.clone())
                .sum()
                .cast(burn::tensor::DType::F32),
        )
        .map(drop)
    })?;
    let tflops = 2.0 * (tokens * h * inter) as f64 / (gemm * 1e-3) / 1e12;
    // Every linear layer of the blocks, forward and backward (6·N per token), at that rate;
    // the head is timed with the loss below.
    let linear_params = c.num_hidden_layers as f64
        * ((h * c.num_attention_heads * c.head_dim()) as f64 * 2.0
            + (h * c.kv_heads() * c.head_dim()) as f64 * 2.0
            + 3.0 * (h * inter) as f64);
    let matmul_est = 6.0 * linear_params * tokens as f64 / (tflops * 1e12) * 1e3;

    let (heads, hd) = (c.num_attention_heads, c.head_dim());
    let qkv = || {
        Tensor::<4>::random([b, heads, s, hd], normal, dev)
            .cast(dtype)
            .require_grad()
    };
    let (q, k, v) = (qkv(), qkv(), qkv());
    let opts = AttentionModuleOptions {
        is_causal: true,
        ..Default::default()
    };
    let attn_layer = time(&mut || {
        let o = attention(q.clone(), k.clone(), v.clone(), None, None, opts);
        let g = o.cast(burn::tensor::DType::F32).sum().backward();
        if let Some(gq) = q.grad(&g) {
            scalar(gq.cast(burn::tensor::DType::F32).sum())?;
        }
        Ok(())
    })?;
    let attn = attn_layer * c.num_hidden_layers as f64;

    let hid = Tensor::<3>::random([b, s, h], normal, dev)
        .cast(dtype)
        .require_grad();
    let emb = model.embed_tokens.val();
    let head = time(&mut || {
        let logits = ember_models::layers::linear::linear(hid.clone(), emb.clone(), None);
        let g = cross_entropy(logits, ya.clone(), None).backward();
        if let Some(gh) = hid.grad(&g) {
            scalar(gh.cast(burn::tensor::DType::F32).sum())?;
        }
        Ok(())
    })?;
    let optim = step_ms - fwd_bwd;
    println!("phases (ms per step): forward {fwd:.1}, forward+backward {fwd_bwd:.1}, optimizer+clip {optim:.1}");
    println!("components, each timed alone (they overlap, so they do not add up to the step):");
    println!(
        "  GEMM [{tokens}x{h}]·[{h}x{inter}]: {gemm:.2} ms = {:.0} GFLOP/s -> the blocks' linear layers fwd+bwd at that rate ~{matmul_est:.1}",
        tflops * 1e3
    );
    println!(
        "  attention fwd+bwd (autodiff path): {attn_layer:.1} per layer, {attn:.1} for {} layers",
        c.num_hidden_layers
    );
    println!("  head matmul + cross-entropy fwd+bwd: {head:.1}");
    Ok(vec![
        ("forward_ms", fwd),
        ("forward_backward_ms", fwd_bwd),
        ("optimizer_ms", optim),
        ("gemm_tflops", tflops),
        ("linear_fwd_bwd_est_ms", matmul_est),
        ("attention_fwd_bwd_ms", attn),
        ("head_loss_fwd_bwd_ms", head),
    ])
}
