//! Pretraining a hybrid decoder (`arch = "nemotron_flash"`, `"mamba2"` or `"nemotron_h"`):
//! the pretraining stage's packed data and next-token loss, on a [`HybridLM`]. Rows are read
//! as whole sequences: a recurrent state would carry across documents, so `doc_masks` is
//! refused rather than silently ignored.

use std::path::Path;

use anyhow::{bail, Result};
use burn::tensor::Device;
use ember_models::hf;
use ember_models::hybrid::stack::HybridLM;

use crate::pretrain::{packed_data, prepare_data, val_sets};
use crate::recipe::{ModelSpec, TrainObjective};
use crate::stages::{
    check_vocab, load_matching, run_loop, stage_model_spec, CursorFeed, Evaluator, LoopSpec, Setup,
    StageRun, Summary, Supervised, ValLoss,
};

const HYBRIDS: [&str; 3] = ["nemotron_flash", "mamba2", "nemotron_h"];

/// Whether the stage trains a hybrid: its `[model]` says so, or the checkpoint it starts
/// from is one.
pub fn is_hybrid(s: &StageRun) -> Result<bool> {
    match stage_model_spec(s)? {
        Some(spec) => Ok(matches!(spec, ModelSpec::Hybrid(_))),
        None => {
            let from = s.resume.as_ref().or(s.stage.train.init_from.as_ref());
            Ok(match from {
                Some(dir) if dir.join(hf::CONFIG).is_file() => {
                    let kind = hf::model_type(&hf::read_config(dir)?, dir)?;
                    HYBRIDS.contains(&kind.as_str())
                }
                _ => false,
            })
        }
    }
}

fn build(s: &StageRun, from: Option<&Path>, device: &Device) -> Result<HybridLM> {
    let path = s.path;
    let spec = match stage_model_spec(s)? {
        Some(ModelSpec::Hybrid(c)) => Some(c),
        Some(_) => bail!("{}: [model] is not a hybrid", path.display()),
        None => None,
    };
    let model = match (from, spec) {
        (Some(dir), Some(config)) => load_matching(
            dir,
            path,
            |ckpt| HybridLM::load(config, ckpt, device),
            &["lm_head.weight"],
        )?,
        (Some(dir), None) => HybridLM::from_pretrained(dir, device)?,
        (None, Some(config)) => {
            let norm = config.weight_normalization;
            let m = HybridLM::random(config, s.recipe.run.seed, device)?;
            // Weight-normalised training starts on the sphere it stays on.
            if norm {
                ember_models::hybrid::weight_norm::normalize(m)
            } else {
                m
            }
        }
        (None, None) => bail!(
            "{}: needs a [model] section or train.init_from",
            path.display()
        ),
    };
    Ok(model)
}

/// A pretraining stage on a hybrid decoder.
pub fn run(s: &StageRun) -> Result<Summary> {
    let (recipe, path) = (s.recipe, s.path);
    let (data, tcfg) = (&s.stage.data, &s.stage.train);
    let at = |what: &str| format!("{}: {what}", path.display());
    if data.doc_masks {
        bail!(
            "{} (a hybrid's recurrent layers read each row as one sequence)",
            at("[data] doc_masks must be false for a hybrid model")
        );
    }
    if s.stage.objective.is_some_and(|o| o != TrainObjective::Ntp) {
        bail!(
            "{}",
            at("a hybrid model trains with objective = \"ntp\" only")
        );
    }
    if s.stage.eval.is_some() {
        bail!(
            "{}",
            at("[eval] (generation-based) is not available for hybrid models yet")
        );
    }
    let setup: Setup<HybridLM> = Setup::build(s, |from, device, dtype| {
        Ok(build(s, from, device)?.with_compute_dtype(dtype))
    })?;
    if setup.model.config.weight_normalization && tcfg.weight_decay.unwrap_or(0.1) != 0.0 {
        bail!(
            "{}",
            at("[train] weight_decay must be 0 with weight_normalization (the weights stay on the unit sphere)")
        );
    }
    let prepared = prepare_data(
        data,
        path,
        recipe.run.seed,
        &s.run_dir,
        setup.tokenizer_from.as_deref(),
        &[],
    )?;
    check_vocab(setup.model.config.vocab_size, &prepared.tokenizer, path)?;
    let (loader, val) = packed_data(&prepared, data, tcfg, recipe.run.seed)?;
    let sets = val_sets(val);
    let mut evaluators: Vec<Box<dyn Evaluator<HybridLM>>> =
        ValLoss::boxed(sets, tcfg.eval_every, &setup.base)
            .into_iter()
            .collect();
    let kinds: Vec<String> = setup
        .model
        .config
        .layers
        .iter()
        .map(|k| format!("{k:?}"))
        .collect();
    let data_line = format!(
        "{} train tokens ({} val), layers {}",
        prepared.cache.train_tokens,
        prepared.cache.val_tokens,
        kinds.join(" ")
    );
    let mut feed = CursorFeed(loader);
    let mut objective = Supervised::new(&mut feed, s, &setup.train_dev);
    run_loop(
        setup,
        LoopSpec {
            train_file: Some(prepared.cache.train_file()),
            ..LoopSpec::single(s, &prepared.tokenizer, data_line)
        },
        &mut objective,
        &mut evaluators,
    )
}
