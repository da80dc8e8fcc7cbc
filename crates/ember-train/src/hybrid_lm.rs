//! Hybrid decoders (`arch = "nemotron_flash"`, `"mamba2"` or `"nemotron_h"`) as a stage model:
//! they train in every decoder stage (pretraining with next-token loss or RLP, CPT, SFT,
//! RLVR, and OPD as the student) through the same loop, data and evaluators as Qwen3. A recurrent
//! state would carry across the documents of a packed row, so rows are read as whole
//! sequences: packed stages must set `doc_masks = false`, and SFT must pad one conversation
//! per row, which is exact since its padding comes after the conversation and carries no
//! loss (RL rows are padded the same way).

use std::path::Path;

use anyhow::{bail, Result};
use burn::tensor::{DType, Device};
use ember_data::sft::Batching;
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
        None => {
            let from = s.resume.as_ref().or(s.stage.train.init_from.as_ref());
            Ok(match from {
                Some(dir) if dir.join(hf::CONFIG).is_file() => {
                    let kind = hf::model_type(&hf::read_config(dir)?, dir)?;
                    ember_models::hybrid::stack::HybridConfig::is_hybrid_type(&kind)
                }
                _ => false,
            })
        }
    }
}

/// Refuses, in one line naming the key, what a hybrid cannot train on in `stage` of recipe
/// `path`.
pub fn check_section(stage: &StageSection, path: &Path) -> Result<()> {
    let (path, data) = (path.display(), &stage.data);
    if stage.objective == Some(TrainObjective::Mlm) {
        bail!("{path}: {}: {MLM_NEEDS_ENCODER}", stage.name);
    }
    let why = "a hybrid's recurrent layers read each row as one sequence";
    match stage.kind {
        StageKind::Sft if data.batching != Batching::Pad => {
            bail!("{path} [data]: batching must be \"pad\" for a hybrid model ({why})")
        }
        StageKind::Pretrain | StageKind::Cpt if data.doc_masks => {
            bail!("{path} [data]: doc_masks must be false for a hybrid model ({why})")
        }
        _ => Ok(()),
    }
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
        Ok(model.with_compute_dtype(dtype))
    }

    fn frozen(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(HybridLM::from_pretrained(dir, device)?.with_compute_dtype(dtype))
    }

    fn check_stage(s: &StageRun) -> Result<()> {
        check_section(&s.stage, s.path)
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
