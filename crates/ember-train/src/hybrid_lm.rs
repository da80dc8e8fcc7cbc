//! Hybrid decoders (`arch = "nemotron_flash"`, `"mamba2"` or `"nemotron_h"`) as a stage model:
//! they train in every decoder stage (pretraining with next-token loss or RLP, CPT, SFT,
//! RLVR, and OPD as student or teacher) through the same loop, data and evaluators as Qwen3. Packed
//! rows (`doc_masks`, packed SFT) read each document as if alone: the recurrent layers' states
//! and convolutions stop at document boundaries, as attention does (`HybridLM::packed_hidden`).

use std::path::Path;

use anyhow::{bail, Result};
use burn::tensor::{DType, Device};
use ember_models::hf;
use ember_models::hybrid::stack::HybridLM;
use serde_json::json;

use crate::recipe::{ModelSpec, StageKind, StageSection, TrainObjective};
use crate::stages::{load_matching, stage_model_spec, StageModel, StageRun, MLM_NEEDS_ENCODER};

/// Whether the stage trains a hybrid: its `[model]` says so, or the checkpoint it starts
/// from is one.
pub fn is_hybrid(s: &StageRun) -> Result<bool> {
    match stage_model_spec(s)? {
        Some(spec) => Ok(matches!(spec, ModelSpec::Hybrid(_))),
        None => match s.resume.as_ref().or(s.stage.train.init_from.as_ref()) {
            Some(dir) => dir_is_hybrid(dir),
            None => Ok(false),
        },
    }
}

/// Whether checkpoint or HF directory `dir` holds a hybrid (false when it has no
/// config.json: loading it as a Qwen3 then says what is missing).
pub fn dir_is_hybrid(dir: &Path) -> Result<bool> {
    if !dir.join(hf::CONFIG).is_file() {
        return Ok(false);
    }
    let kind = hf::model_type(&hf::read_config(dir)?, dir)?;
    Ok(ember_models::hybrid::stack::HybridConfig::is_hybrid_type(
        &kind,
    ))
}

/// Refuses, in one line naming the key, what a hybrid with `meta` meta tokens (when known)
/// cannot train on in `stage` of recipe `path`.
pub fn check_section(stage: &StageSection, path: &Path, meta: Option<usize>) -> Result<()> {
    if stage.objective == Some(TrainObjective::Mlm) {
        bail!("{}: {}: {MLM_NEEDS_ENCODER}", path.display(), stage.name);
    }
    match meta {
        Some(n) => check_capture(stage, path, n),
        None => Ok(()),
    }
}

/// A captured step replays one layout, but a model with meta tokens gives every document of
/// a row its own, so rows of several documents change layout from batch to batch.
fn check_capture(stage: &StageSection, path: &Path, meta: usize) -> Result<()> {
    let documents = match stage.kind {
        StageKind::Sft => true,
        StageKind::Pretrain | StageKind::Cpt => stage.data.doc_masks,
        _ => false,
    };
    if stage.train.captured_step && meta > 0 && documents {
        bail!(
            "{} [train]: `captured_step` cannot train a hybrid with meta tokens on rows of \
             several documents (SFT, or doc_masks = true): each document gets its own meta \
             tokens, so the layout changes from batch to batch",
            path.display()
        );
    }
    Ok(())
}

impl StageModel for HybridLM {
    fn build(s: &StageRun, from: Option<&Path>, device: &Device, dtype: DType) -> Result<Self> {
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
        if model.config.weight_normalization && s.stage.train.optim().weight_decay != 0.0 {
            bail!(
                "{}: [train] weight_decay must be 0 with weight_normalization (the weights stay on the unit sphere)",
                path.display()
            );
        }
        check_capture(&s.stage, path, model.config.memory_tokens)?;
        Ok(model.with_compute_dtype(dtype))
    }

    fn frozen(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(HybridLM::from_pretrained(dir, device)?.with_compute_dtype(dtype))
    }

    /// The meta tokens are known once the model is built: `build` checks the captured step.
    fn check_stage(s: &StageRun) -> Result<()> {
        check_section(&s.stage, s.path, None)
    }

    fn set_eos(&mut self, eos_id: u32) {
        if let Some(c) = self.config.source.as_object_mut() {
            c.insert("eos_token_id".into(), json!(eos_id));
        }
    }

    fn describe(&self) -> Option<String> {
        let kinds: Vec<String> = self
            .config
            .layers
            .iter()
            .map(|k| format!("{k:?}"))
            .collect();
        Some(format!("layers {}", kinds.join(" ")))
    }
}
