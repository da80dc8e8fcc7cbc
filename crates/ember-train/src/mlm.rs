//! The MLM pretraining stage (`objective = "mlm"`, `arch = "modernbert"`): packed documents
//! (attention kept inside each document when `doc_masks`), masked per micro-batch from the
//! run's seed and the step, loss on the masked positions only, and a validation loss on
//! fixed masked batches.

use anyhow::{anyhow, bail, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use ember_data::loader::Batch;
use ember_models::hf;
use ember_models::modernbert::ModernBert;
use serde_json::{json, Map, Value};

use crate::objectives::mlm::{mlm_loss, step_rng, MaskSpec, Masked};
use crate::pretrain::{packed_data, prepare_data};
use crate::recipe::{MlmSection, ModelSpec};
use crate::stages::{
    check_common, check_vocab, load_matching, periodic_due, run_loop, stage_model_spec, CursorFeed,
    Evaluator, Feed, LoopSpec, Objective, Setup, StageRun, Summary,
};
use crate::trainer::scalar;

/// The stage's `[mlm]` (defaults when absent), checked.
fn checked_section(s: &StageRun) -> Result<MlmSection> {
    let c = s.stage.mlm.clone().unwrap_or_else(|| {
        toml::from_str::<MlmSection>("").expect("every [mlm] key has a default")
    });
    let at = |k: &str| format!("{} [mlm]: `{k}`", s.path.display());
    if !(c.mask_prob > 0.0 && c.mask_prob < 1.0) {
        bail!("{} must be in (0, 1)", at("mask_prob"));
    }
    for (k, v) in [
        ("random_fraction", c.random_fraction),
        ("keep_fraction", c.keep_fraction),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{} must be in [0, 1]", at(k));
        }
    }
    if c.random_fraction + c.keep_fraction > 1.0 {
        bail!(
            "{} + `keep_fraction` must be at most 1",
            at("random_fraction")
        );
    }
    if c.mask_token.is_empty() {
        bail!("{} must not be empty", at("mask_token"));
    }
    Ok(c)
}

/// The encoder: from the checkpoint being resumed or `init_from` (checked against
/// `[model]` when there is one), else new from `[model]`.
fn build_encoder(
    s: &StageRun,
    from: Option<&std::path::Path>,
    device: &Device,
) -> Result<ModernBert> {
    let path = s.path;
    let spec = match stage_model_spec(s)? {
        Some(ModelSpec::ModernBert(c)) => Some(c),
        Some(ModelSpec::Qwen3(_) | ModelSpec::Hybrid(_)) => bail!(
            "{} [model]: objective = \"mlm\" trains an encoder: set arch = \"modernbert\"",
            path.display()
        ),
        None => None,
    };
    match (from, spec) {
        (Some(dir), Some(config)) => load_matching(
            dir,
            path,
            |ckpt| ModernBert::load(config, ckpt, device),
            &["decoder.weight"],
        ),
        (Some(dir), None) => {
            let kind = hf::model_type(&hf::read_config(dir)?, dir)?;
            if kind != "modernbert" {
                bail!(
                    "{}: field `model_type` is `{kind}`; objective = \"mlm\" needs a modernbert checkpoint",
                    dir.join(hf::CONFIG).display()
                );
            }
            ModernBert::from_pretrained(dir, device)
        }
        (None, Some(config)) => ModernBert::random(config, s.recipe.run.seed, device),
        (None, None) => bail!(
            "{}: needs a [model] section (arch = \"modernbert\") or train.init_from",
            path.display()
        ),
    }
}

/// An MLM pretraining stage.
pub fn run(s: &StageRun) -> Result<Summary> {
    let (recipe, path) = (s.recipe, s.path);
    check_common(&s.stage, path)?;
    let cfg = checked_section(s)?;
    let (data, tcfg) = (&s.stage.data, &s.stage.train);
    let mut setup: Setup<ModernBert> = Setup::build(s, |from, device, dtype| {
        Ok(build_encoder(s, from, device)?.with_compute_dtype(dtype))
    })?;
    let prepared = prepare_data(
        data,
        path,
        recipe.run.seed,
        &s.run_dir,
        setup.tokenizer_from.as_deref(),
        &[cfg.mask_token.as_str()],
    )?;
    let tok = &prepared.tokenizer;
    check_vocab(setup.model.config.vocab_size, tok, path)?;
    setup.model.config.set_separator(prepared.eos_id);
    let mask_id = tok.token_id(&cfg.mask_token).ok_or_else(|| {
        anyhow!(
            "{} [mlm]: `mask_token` {:?} is not in the tokenizer",
            path.display(),
            cfg.mask_token
        )
    })?;
    let spec = MaskSpec {
        prob: cfg.mask_prob,
        mask_id,
        random_fraction: cfg.random_fraction,
        keep_fraction: cfg.keep_fraction,
        vocab: tok.vocab_size(),
        specials: tok.special_ids(),
    };
    let (loader, val) = packed_data(&prepared, data, tcfg, recipe.run.seed)?;
    let mut evaluators: Vec<Box<dyn Evaluator<ModernBert>>> = Vec::new();
    if !val.is_empty() {
        // Fixed masks: the same positions are predicted at every evaluation.
        let mut rng = step_rng(recipe.run.seed, u64::MAX, 0);
        let sets = val
            .into_iter()
            .map(|b| {
                let m = spec.apply(&b.inputs, &mut rng);
                (b, m)
            })
            .collect();
        evaluators.push(Box::new(MlmVal {
            sets,
            every: tcfg.eval_every,
            device: setup.base.clone(),
        }));
    }
    let data_line = format!(
        "{} train tokens ({} val), {:.0}% masked",
        prepared.cache.train_tokens,
        prepared.cache.val_tokens,
        100.0 * cfg.mask_prob
    );
    let mut feed = CursorFeed(loader);
    let mut objective = Mlm {
        feed: &mut feed,
        spec,
        seed: recipe.run.seed,
        accum: tcfg.grad_accum,
        device: setup.train_dev.clone(),
        batches: Vec::new(),
    };
    run_loop(
        setup,
        LoopSpec {
            train_file: Some(prepared.cache.train_file()),
            ..LoopSpec::single(s, tok, data_line)
        },
        &mut objective,
        &mut evaluators,
    )
}

/// Masked-token loss on a feed's packed batches.
struct Mlm<'f> {
    feed: &'f mut dyn Feed,
    spec: MaskSpec,
    seed: u64,
    accum: usize,
    device: Device,
    batches: Vec<(Batch, Masked)>,
}

impl Objective<ModernBert> for Mlm<'_> {
    fn prepare(&mut self, _model: &ModernBert, step: u64) -> Result<(usize, u64)> {
        self.batches = (0..self.accum)
            .map(|i| {
                let b = self.feed.next_batch(step)?;
                let m = self
                    .spec
                    .apply(&b.inputs, &mut step_rng(self.seed, step, i));
                Ok((b, m))
            })
            .collect::<Result<Vec<_>>>()?;
        let tokens = self
            .batches
            .iter()
            .map(|(b, _)| (b.batch * b.seq_len) as u64);
        Ok((self.accum, tokens.sum()))
    }

    fn loss(&mut self, model: &ModernBert, i: usize) -> Result<Tensor<1>> {
        let (b, m) = &self.batches[i];
        Ok(mlm_loss(model, b, m, &self.device).0)
    }

    fn annotate(&mut self, record: &mut Map<String, Value>) -> String {
        self.feed.annotate(record);
        let (n, total) = self.batches.iter().fold((0, 0), |(n, t), (b, m)| {
            (n + m.positions.len(), t + b.batch * b.seq_len)
        });
        record.insert("mlm/predicted_tokens".into(), json!(n));
        record.insert(
            "mlm/predicted_fraction".into(),
            json!(n as f64 / total.max(1) as f64),
        );
        String::new()
    }

    fn state(&self) -> Value {
        self.feed.state()
    }

    fn restore(&mut self, state: &Value, step: u64) -> Result<()> {
        self.feed.restore(state, step)
    }
}

/// MLM loss and masked-token accuracy on fixed, fixed-masked validation batches.
struct MlmVal {
    sets: Vec<(Batch, Masked)>,
    every: u64,
    device: Device,
}

impl Evaluator<ModernBert> for MlmVal {
    fn due(&self, step: u64, last: bool) -> bool {
        periodic_due(self.every, step, last)
    }

    fn evaluate(&mut self, model: &ModernBert, _step: u64) -> Result<(Map<String, Value>, String)> {
        let model = model.valid();
        let (mut loss, mut right, mut n) = (0.0, 0usize, 0usize);
        for (b, m) in &self.sets {
            let (l, predicted) = mlm_loss(&model, b, m, &self.device);
            loss += scalar(l)? * m.labels.len() as f64;
            let p: Vec<i64> = predicted
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap_or_default();
            right += p
                .iter()
                .zip(&m.labels)
                .filter(|(p, l)| **p == **l as i64)
                .count();
            n += m.labels.len();
        }
        let (loss, acc) = (loss / n.max(1) as f64, right as f64 / n.max(1) as f64);
        let mut out = Map::new();
        out.insert("val_loss".into(), json!(loss));
        out.insert("val_ppl".into(), json!(loss.exp()));
        out.insert("val_mlm_accuracy".into(), json!(acc));
        Ok((
            out,
            format!(
                "val MLM loss {loss:.4} (ppl {:.2}), masked-token accuracy {:.1}% of {n}",
                loss.exp(),
                100.0 * acc
            ),
        ))
    }
}
