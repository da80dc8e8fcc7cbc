//! `ember bench encoder`: MLM training throughput of a ModernBERT shape (random weights,
//! random tokens, 30% predicted through the sparse head), through the trainer's own step:
//! forward, backward, global-norm clipping, AdamW.

use std::path::PathBuf;

use anyhow::Result;
use ember_data::loader::Batch;
use ember_models::modernbert::{ModernBert, ModernBertConfig};
use ember_models::rng::Rng;
use ember_train::objectives::mlm::{mlm_loss, MaskSpec, Masked};
use ember_train::optim::{OptimConfig, Optimizer};
use ember_train::pretrain::parse_dtype;
use ember_train::schedule::Schedule;
use ember_train::trainer::{TrainModel, Trainer};

use crate::bench::{append_jsonl, config_json, timed_steps, TimedArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    t: TimedArgs,
    /// A ModernBERT config.json, or the built-in shape name `modernbert-base`.
    #[arg(long, default_value = "modernbert-base")]
    model_config: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 1024)]
    seq: usize,
    /// Fraction of tokens predicted.
    #[arg(long, default_value_t = 0.3)]
    mask_prob: f64,
}

pub fn run(a: Args) -> Result<()> {
    let (v, origin) = config_json(&a.model_config)?;
    let config = ModernBertConfig::from_value(&v, &origin)?;
    let base = ember_models::device::select(&a.t.device)?;
    let dtype = parse_dtype(&a.t.dtype, &base, "--dtype")?;
    let dev = base.clone().autodiff();
    let vocab = config.vocab_size;
    let model = ModernBert::random(config, 0, &dev)?.with_compute_dtype(dtype);
    let (flops, params) = (model.flops_per_token(a.seq), model.param_count());
    let schedule = Schedule::constant(3e-4);
    let optim = OptimConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, Optimizer::new(optim), schedule, 1.0);
    let spec = MaskSpec {
        prob: a.mask_prob,
        mask_id: vocab as u32 - 1,
        random_fraction: 0.1,
        keep_fraction: 0.1,
        vocab,
        specials: vec![vocab as u32 - 1],
    };
    let mut rng = Rng::new(0);
    let r = timed_steps(&a.t, &base, (a.batch, a.seq), (params, flops), &mut || {
        let (batch, masked) = random_batch(&mut rng, &a, &spec);
        Ok(trainer
            .train_step(1, |m, _| Ok(mlm_loss(m, &batch, &masked, &dev).0))?
            .loss)
    })?;
    if let Some(p) = &a.t.out {
        let rec = serde_json::json!({"bench": "encoder", "engine": "ember", "batch": a.batch,
            "seq": a.seq, "dtype": a.t.dtype, "device": format!("{base:?}"),
            "tokens_per_s": r.tokens_per_s, "step_ms": r.step_ms, "mfu": r.mfu,
            "loss_first": r.loss_first, "loss_last": r.loss_last,
            "params": params, "flops_per_token": flops});
        append_jsonl(p, &rec)?;
    }
    Ok(())
}

/// Random tokens (never the mask id), masked as the MLM stage masks them.
fn random_batch(rng: &mut Rng, a: &Args, spec: &MaskSpec) -> (Batch, Masked) {
    let n = a.batch * a.seq;
    let inputs: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % (spec.vocab as u64 - 1)) as u32)
        .collect();
    let masked = spec.apply(&inputs, rng);
    let batch = Batch {
        batch: a.batch,
        seq_len: a.seq,
        targets: inputs.clone(),
        inputs,
        positions: (0..a.batch).flat_map(|_| 0..a.seq as u32).collect(),
        segments: None,
        weights: None,
    };
    (batch, masked)
}
