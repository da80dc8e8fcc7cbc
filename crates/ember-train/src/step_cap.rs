//! `EMBER_MAX_STEPS=N`: a smoke run of any recipe. Every stage stops after N optimizer
//! steps (a CPT phase after one), and generated data, generation budgets and evaluations
//! shrink to match,
//! so that a recipe, its files and every stage's code path are exercised end to end in
//! seconds. The book's tests run every tutorial command this way; users can do the same
//! before a long run.

use anyhow::{bail, Result};

use crate::recipe::{
    DistillSection, EvalSection, PhaseSection, Recipe, RlSection, RlpSection, TrainSection,
};

pub const ENV: &str = "EMBER_MAX_STEPS";

/// Generation budgets under a cap: enough tokens to reach an answer line's format, not to
/// solve anything.
const CAPPED_NEW_TOKENS: usize = 24;
const CAPPED_EVAL_PROBLEMS: usize = 4;
/// Generated documents under a cap: enough for a few batches and a validation split.
const CAPPED_GENERATED: u64 = 1000;

/// The cap that `EMBER_MAX_STEPS` asks for, if set.
pub fn from_env() -> Result<Option<u64>> {
    match std::env::var(ENV) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("{ENV}={v}: expected a whole number of steps, at least 1"),
        },
    }
}

/// Applies `EMBER_MAX_STEPS` to a loaded recipe, saying so once.
pub fn apply_env(recipe: &mut Recipe) -> Result<()> {
    if let Some(n) = from_env()? {
        eprintln!("{ENV}={n}: a smoke run, every stage capped at {n} steps");
        cap(recipe, n);
    }
    Ok(())
}

pub fn cap(r: &mut Recipe, n: u64) {
    let single = Parts {
        train: r.train.as_mut(),
        phase: &mut r.phase,
        eval: r.eval.as_mut(),
        rl: r.rl.as_mut(),
        distill: r.distill.as_mut(),
        rlp: r.rlp.as_mut(),
    };
    single.cap(n);
    for st in &mut r.stage {
        Parts {
            train: Some(&mut st.train),
            phase: &mut st.phase,
            eval: st.eval.as_mut(),
            rl: st.rl.as_mut(),
            distill: st.distill.as_mut(),
            rlp: st.rlp.as_mut(),
        }
        .cap(n);
    }
    let data = r
        .data
        .iter_mut()
        .chain(r.stage.iter_mut().map(|s| &mut s.data));
    for d in data {
        let datasets = d.datasets.values_mut().filter_map(|d| d.generated.as_mut());
        for g in d.generated.iter_mut().chain(datasets) {
            g.count = g.count.min(CAPPED_GENERATED);
        }
    }
    if let Some(g) = &mut r.generate {
        g.max_new_tokens = g.max_new_tokens.min(CAPPED_NEW_TOKENS);
    }
}

/// The settings of one stage that decide its length.
struct Parts<'a> {
    train: Option<&'a mut TrainSection>,
    phase: &'a mut [PhaseSection],
    eval: Option<&'a mut EvalSection>,
    rl: Option<&'a mut RlSection>,
    distill: Option<&'a mut DistillSection>,
    rlp: Option<&'a mut RlpSection>,
}

impl Parts<'_> {
    fn cap(self, n: u64) {
        if let Some(t) = self.train {
            if t.steps > 0 {
                t.steps = t.steps.min(n);
            }
            t.warmup_steps = t.warmup_steps.min(n);
            t.eval_batches = t.eval_batches.min(2);
        }
        // Each phase keeps its place in the curriculum, for one step.
        for p in self.phase.iter_mut() {
            p.tokens = None;
            p.steps = Some(1);
            p.warmup_steps = p.warmup_steps.map(|w| w.min(1));
        }
        if let Some(e) = self.eval {
            e.count = e.count.min(CAPPED_EVAL_PROBLEMS);
            e.max_new_tokens = e.max_new_tokens.min(CAPPED_NEW_TOKENS);
        }
        if let Some(rl) = self.rl {
            rl.max_new_tokens = rl.max_new_tokens.min(CAPPED_NEW_TOKENS);
            // An untrained model's groups are all flat; resampling them proves nothing.
            rl.max_sampling_rounds = 1;
            for r in &mut rl.rewards {
                r.max_tokens = r.max_tokens.map(|m| m.min(CAPPED_NEW_TOKENS));
                r.buffer = r.buffer.map(|b| b.min(CAPPED_NEW_TOKENS / 4));
            }
        }
        if let Some(d) = self.distill {
            d.max_new_tokens = d.max_new_tokens.min(CAPPED_NEW_TOKENS);
            d.bridge_steps = d.bridge_steps.min(n / 2);
        }
        if let Some(p) = self.rlp {
            p.thought_tokens = p.thought_tokens.min(CAPPED_NEW_TOKENS);
        }
    }
}
