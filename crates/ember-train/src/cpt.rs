//! Curriculum continued pretraining (`kind = "cpt"`): named datasets, each tokenized into its
//! own cache with its own validation split, and `[[phase]]`s that each set a token (or step)
//! budget, a mixture over the datasets (a replay share of general data among them) and an LR
//! schedule re-warmed from the phase's first step, as nanotron's `data_stages` do.
//!
//! Rows are drawn by the mixture's deficit rule (Megatron's blending order), which is
//! deterministic and keeps every source within one row of its share, so the realised token
//! counts that go to `metrics.jsonl` track the weights. A resume in the middle of a phase
//! restores the phase, the per-source cursors and row counts, and so the same next batch.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use ember_data::cache::{build_or_reuse, CacheSpec, TokenCache};
use ember_data::loader::{Batch, PackedLoader};
use ember_data::mixture::{MixtureLoader, MixtureState};
use ember_data::rng::fnv1a;
use serde_json::{json, Map, Value};

use crate::pretrain::{resolve_sources, resolve_tokenizer, val_batches};
use crate::recipe::{PromptFormat, StageSection, TrainSection};
use crate::schedule::{LrPlan, Schedule};
use crate::stages::{
    check_common, evaluators, run_loop, Feed, LoopSpec, Setup, StageModel, StageRun, Summary,
    Supervised,
};

/// One phase, resolved: its first step, length, weights per dataset and schedule.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub start: u64,
    pub steps: u64,
    pub weights: Vec<f64>,
    pub schedule: Schedule,
}

/// The optimizer steps of a cpt stage: the sum of its phases' budgets.
pub fn total_steps(stage: &StageSection, path: &Path) -> Result<u64> {
    let t = &stage.train;
    let tps = (t.batch_size * stage.data.seq_len * t.grad_accum) as u64;
    Ok(plan_phases(stage, path, tps.max(1))?
        .iter()
        .map(|p| p.steps)
        .sum())
}

/// The phases of a stage over its datasets (in name order), with token budgets turned into whole
/// optimizer steps of `tokens_per_step`.
pub fn plan_phases(stage: &StageSection, path: &Path, tokens_per_step: u64) -> Result<Vec<Phase>> {
    let names: Vec<String> = stage.data.datasets.keys().cloned().collect();
    let path = path.display();
    let t: &TrainSection = &stage.train;
    if stage.phase.is_empty() {
        bail!("{path}: a cpt stage needs at least one [[phase]]");
    }
    if t.steps != 0 {
        bail!("{path} [train]: `steps` is set by the cpt stage's [[phase]] budgets; remove it");
    }
    let mut start = 0;
    let mut out = Vec::new();
    for ph in &stage.phase {
        let at = format!("{path} [[phase]] `{}`", ph.name);
        let steps = match (ph.tokens, ph.steps) {
            (Some(tok), None) if tok > 0 => tok.div_ceil(tokens_per_step),
            (None, Some(n)) if n > 0 => n,
            (Some(_), Some(_)) => bail!("{at}: set `tokens` or `steps`, not both"),
            (None, None) => bail!("{at}: needs a budget, `tokens` or `steps`"),
            _ => bail!("{at}: the budget must be at least 1"),
        };
        if let Some(k) = ph.mix.keys().find(|k| !names.contains(k)) {
            bail!(
                "{at}: mix names `{k}`, which is not in [data.datasets] ({})",
                names.join(", ")
            );
        }
        let weights: Vec<f64> = names
            .iter()
            .map(|n| ph.mix.get(n).copied().unwrap_or(0.0))
            .collect();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            bail!("{at}: mix weights must be non-negative and not all 0");
        }
        let schedule = Schedule {
            kind: ph.schedule.unwrap_or(t.schedule),
            lr: ph.lr.unwrap_or(t.lr),
            warmup_steps: ph.warmup_steps.unwrap_or(t.warmup_steps),
            total_steps: steps,
            min_lr_ratio: ph.min_lr_ratio.unwrap_or(t.min_lr_ratio),
            decay_fraction: ph.decay_fraction.unwrap_or(t.decay_fraction),
        };
        if schedule.lr.is_nan() || schedule.lr <= 0.0 {
            bail!("{at}: `lr` must be positive");
        }
        out.push(Phase {
            name: ph.name.clone(),
            start,
            steps,
            weights,
            schedule,
        });
        start += steps;
    }
    Ok(out)
}

/// Batches from the mixture of the current phase.
pub struct MixtureFeed {
    mix: MixtureLoader,
    phases: Vec<Phase>,
    current: usize,
    seq_len: usize,
}

impl MixtureFeed {
    pub fn new(mix: MixtureLoader, phases: Vec<Phase>, seq_len: usize) -> Result<Self> {
        let mut mix = mix;
        mix.set_weights(&phases[0].weights)?;
        Ok(Self {
            mix,
            phases,
            current: 0,
            seq_len,
        })
    }

    fn phase_of(&self, step: u64) -> usize {
        self.phases
            .iter()
            .rposition(|p| p.start <= step)
            .unwrap_or(0)
    }

    /// `name 51200 tokens (70.0%, weight 70.0%), ...` for the current phase.
    fn shares(&self) -> String {
        let rows = self.mix.rows();
        let total = rows.iter().sum::<u64>().max(1) as f64;
        let wsum: f64 = self.phases[self.current].weights.iter().sum();
        self.mix
            .names()
            .iter()
            .zip(rows)
            .zip(&self.phases[self.current].weights)
            .map(|((n, r), w)| {
                format!(
                    "{n} {} tokens ({:.1}%, weight {:.1}%)",
                    r * self.seq_len as u64,
                    100.0 * *r as f64 / total,
                    100.0 * w / wsum
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Feed for MixtureFeed {
    fn next_batch(&mut self, step: u64) -> Result<Batch> {
        let p = self.phase_of(step);
        if p != self.current {
            eprintln!(
                "phase `{}` done: {}",
                self.phases[self.current].name,
                self.shares()
            );
            self.current = p;
            self.mix.set_weights(&self.phases[p].weights)?;
            eprintln!(
                "phase `{}`: steps {}..{}",
                self.phases[p].name,
                self.phases[p].start + 1,
                self.phases[p].start + self.phases[p].steps
            );
        }
        Ok(self.mix.next_batch()?.0)
    }

    fn state(&self) -> Value {
        json!({ "phase": self.current, "mixture": self.mix.state() })
    }

    fn restore(&mut self, state: &Value, _step: u64) -> Result<()> {
        let phase = state["phase"]
            .as_u64()
            .ok_or_else(|| anyhow!("cursor: no `phase` (not a cpt checkpoint?)"))?
            as usize;
        if phase >= self.phases.len() {
            bail!(
                "cursor: phase {phase}, but the recipe has {} phases",
                self.phases.len()
            );
        }
        let mixture: MixtureState = serde_json::from_value(state["mixture"].clone())
            .map_err(|e| anyhow!("cursor: mixture: {e}"))?;
        self.current = phase;
        // New weights reset the row counts, which the saved state then restores.
        self.mix.set_weights(&self.phases[phase].weights)?;
        self.mix.restore(&mixture)
    }

    fn annotate(&self, record: &mut Map<String, Value>) {
        record.insert("phase".into(), json!(self.phases[self.current].name));
        let rows = self.mix.rows();
        let total = rows.iter().sum::<u64>().max(1) as f64;
        for (n, r) in self.mix.names().iter().zip(rows) {
            record.insert(format!("phase_tokens/{n}"), json!(r * self.seq_len as u64));
            record.insert(format!("phase_share/{n}"), json!(*r as f64 / total));
        }
    }
}

/// A CPT stage, on a model of family `M` (Qwen3 or a hybrid).
pub fn run<M: StageModel>(s: &StageRun) -> Result<Summary> {
    let (recipe, path) = (s.recipe, s.path);
    check_common(&s.stage, path)?;
    let (data, tcfg) = (&s.stage.data, &s.stage.train);
    if data.datasets.is_empty() {
        bail!(
            "{} [data]: a cpt stage draws from named [data.datasets.<name>]",
            path.display()
        );
    }
    if !data.sources.is_empty() || data.generated.is_some() || !data.chat.is_empty() {
        bail!(
            "{} [data]: a cpt stage reads [data.datasets.<name>], not `sources`, `generated` or `chat`",
            path.display()
        );
    }
    let tokens_per_step = (tcfg.batch_size * data.seq_len * tcfg.grad_accum) as u64;
    let phases = plan_phases(&s.stage, path, tokens_per_step)?;
    let total_steps = phases.iter().map(|p| p.steps).sum();

    let mut setup = Setup::<M>::new(s)?;
    let data_dir = s.run_dir.join("data");
    let mut per_dataset = Vec::new();
    for (name, d) in &data.datasets {
        let srcs = resolve_sources(
            &d.sources,
            d.generated.as_ref(),
            path,
            recipe.run.seed ^ fnv1a(name),
            &data_dir,
            &format!("data.datasets.{name}"),
            name,
        )?;
        per_dataset.push((name.clone(), srcs));
    }
    let all: Vec<_> = per_dataset.iter().flat_map(|(_, v)| v.clone()).collect();
    let (tok, eos) = resolve_tokenizer(data, &all, path, setup.tokenizer_from.as_deref(), &[])?;
    setup.adopt_tokenizer(&tok, eos, path)?;
    let mut caches: Vec<(String, TokenCache)> = Vec::new();
    for (name, srcs) in &per_dataset {
        let spec = CacheSpec {
            sources: srcs,
            tokenizer: &tok,
            eos_id: eos,
            val_fraction: data.val_fraction,
            seed: recipe.run.seed,
        };
        let cache = build_or_reuse(&spec, &data_dir.join(format!("tokens-{name}")), true)?;
        caches.push((name.clone(), cache));
    }
    let mut loaders = Vec::new();
    let mut sets = Vec::new();
    for (name, c) in &caches {
        let l = PackedLoader::open(
            &c.train_file(),
            data.seq_len,
            1,
            recipe.run.seed ^ fnv1a(name),
            data.shuffle,
            data.doc_masks,
            eos,
        )
        .map_err(|e| anyhow!("{} [data.datasets.{name}]: {e:#}", path.display()))?;
        loaders.push((name.clone(), l));
        let v = val_batches(&c.val_file(), data, tcfg, recipe.run.seed, eos);
        if !v.is_empty() {
            sets.push((name.clone(), v));
        }
    }
    let mix = MixtureLoader::new(loaders, &phases[0].weights, tcfg.batch_size)?;
    let plan = LrPlan::phased(phases.iter().map(|p| (p.steps, p.schedule)));
    let data_line = format!(
        "datasets {}, phases {}",
        caches
            .iter()
            .map(|(n, c)| format!("{n} ({} train tokens)", c.train_tokens))
            .collect::<Vec<_>>()
            .join(", "),
        phases
            .iter()
            .map(|p| format!("{} ({} steps)", p.name, p.steps))
            .collect::<Vec<_>>()
            .join(" → ")
    );
    let mut feed = MixtureFeed::new(mix, phases, data.seq_len)?;
    let mut evaluators = evaluators(s, &setup, sets, &tok, PromptFormat::Text)?;
    let mut objective = Supervised::new(&mut feed, s, &setup.train_dev);
    let summary = run_loop(
        setup,
        LoopSpec {
            run: s,
            total_steps,
            schedule: plan,
            tokenizer: &tok,
            data_line,
            train_file: None,
        },
        &mut objective,
        &mut evaluators,
    )?;
    eprintln!(
        "phase `{}` done: {}",
        feed.phases[feed.current].name,
        feed.shares()
    );
    Ok(summary)
}
