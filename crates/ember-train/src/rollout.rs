//! Rollouts for RL: G sampled completions per prompt from the batched generation engine,
//! run on a non-autodiff copy of the policy (finished rows leave the batch, so they stop
//! costing compute), each kept with the sampler's per-token log-probs and scored by the
//! stage's reward.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use ember_data::prompts::PromptRow;
use ember_data::rewards::{ExactMatch, MathAnswer, OverlongPenalty, Reward, Sample, ThinkFormat};
use ember_data::Tokenizer;
use ember_models::decode_graph::{generate_auto, GraphDecode};
use ember_models::generate::{FinishReason, GenerateOptions, Hooks, Sampling};

use crate::recipe::{RewardKind, RewardSpec};

/// The stage's reward: a weighted sum of parts, each also reported on its own. The first
/// answer checker among them (`math_answer`, `exact_match`) decides accuracy.
pub struct Rewarder {
    parts: Vec<(f64, Box<dyn Reward>)>,
    verifier: Option<usize>,
}

impl Rewarder {
    /// From `[[rl.rewards]]` (`math_answer` on `answer` when there are none); `origin` names
    /// the recipe section in errors.
    pub fn new(specs: &[RewardSpec], max_new_tokens: usize, origin: &str) -> Result<Self> {
        let default = [RewardSpec {
            kind: RewardKind::MathAnswer,
            weight: 1.0,
            field: None,
            max_tokens: None,
            buffer: None,
        }];
        let specs = if specs.is_empty() {
            &default[..]
        } else {
            specs
        };
        let mut parts: Vec<(f64, Box<dyn Reward>)> = Vec::new();
        let mut verifier = None;
        for (i, r) in specs.iter().enumerate() {
            let at = format!("{origin} rewards[{i}]");
            if !r.weight.is_finite() {
                bail!("{at}: `weight` must be a finite number");
            }
            let field = r.field.clone().unwrap_or_else(|| "answer".into());
            let wants_field = matches!(r.kind, RewardKind::MathAnswer | RewardKind::ExactMatch);
            if !wants_field && r.field.is_some() {
                bail!("{at}: `field` is for math_answer and exact_match");
            }
            let is_overlong = r.kind == RewardKind::Overlong;
            if !is_overlong && (r.max_tokens.is_some() || r.buffer.is_some()) {
                bail!("{at}: `max_tokens` and `buffer` are for overlong");
            }
            let reward: Box<dyn Reward> = match r.kind {
                RewardKind::MathAnswer => Box::new(MathAnswer { field }),
                RewardKind::ExactMatch => Box::new(ExactMatch { field }),
                RewardKind::ThinkFormat => Box::new(ThinkFormat),
                RewardKind::Overlong => {
                    let max_tokens = r.max_tokens.unwrap_or(max_new_tokens);
                    let buffer = r.buffer.unwrap_or(max_tokens / 4);
                    if buffer == 0 || buffer > max_tokens {
                        bail!("{at}: `buffer` must be in 1..=max_tokens ({max_tokens})");
                    }
                    Box::new(OverlongPenalty { max_tokens, buffer })
                }
            };
            if wants_field && verifier.is_none() {
                verifier = Some(i);
            }
            parts.push((r.weight, reward));
        }
        Ok(Self { parts, verifier })
    }

    pub fn names(&self) -> Vec<String> {
        self.parts
            .iter()
            .map(|(_, r)| r.name().to_string())
            .collect()
    }

    /// The reward (None when any part skips the sample), each part's score, and whether the
    /// answer was right (when there is an answer checker).
    pub fn score(&self, s: &Sample) -> Scores {
        let parts: Vec<Option<f64>> = self.parts.iter().map(|(_, r)| r.score(s)).collect();
        let total = parts
            .iter()
            .zip(&self.parts)
            .map(|(v, (w, _))| v.map(|v| w * v))
            .sum();
        let correct = self.verifier.and_then(|i| parts[i]).map(|v| v >= 1.0);
        Scores {
            total,
            parts,
            correct,
        }
    }
}

pub struct Scores {
    pub total: Option<f64>,
    pub parts: Vec<Option<f64>>,
    pub correct: Option<bool>,
}

/// One sampled completion and its score.
pub struct Scored {
    pub tokens: Vec<u32>,
    /// The sampler's log-prob of each token (under the temperature-scaled distribution).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
    pub scores: Scores,
}

/// The G completions of one prompt.
pub struct Group {
    /// Index of the prompt in the stage's prompt list.
    pub prompt: usize,
    pub samples: Vec<Scored>,
}

impl Group {
    /// The rewards of the samples that have one.
    pub fn rewards(&self) -> Vec<f64> {
        self.samples.iter().filter_map(|s| s.scores.total).collect()
    }

    /// Whether every sample with a reward got the same one (no learning signal).
    pub fn zero_variance(&self) -> bool {
        let r = self.rewards();
        r.windows(2).all(|w| w[0] == w[1])
    }
}

/// How to sample a rollout batch.
pub struct RolloutSpec {
    pub group_size: usize,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Completions generated at once (0: all).
    pub rollout_batch: usize,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
}

impl RolloutSpec {
    /// What one step samples, for the start-of-run line.
    pub fn shape(&self, prompts: usize) -> String {
        format!(
            "{prompts} prompts × {} completions of up to {} tokens",
            self.group_size, self.max_new_tokens
        )
    }
}

/// What sampling a batch cost.
#[derive(Default, Clone, Copy)]
pub struct RolloutCost {
    pub new_tokens: u64,
    pub seconds: f64,
}

/// Samples `group_size` completions for each of `prompts` (token ids, with the rows they
/// came from) and scores them. `seed` makes the batch reproducible.
pub fn sample_groups<M: GraphDecode>(
    model: &M,
    tok: &Tokenizer,
    rewarder: &Rewarder,
    prompts: &[(usize, &[u32], &PromptRow)],
    spec: &RolloutSpec,
    seed: u64,
) -> Result<(Vec<Group>, RolloutCost)> {
    let t = Instant::now();
    let g = spec.group_size;
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|(_, ids, _)| std::iter::repeat_n(ids.to_vec(), g))
        .collect();
    let chunk = if spec.rollout_batch == 0 {
        rows.len().max(1)
    } else {
        spec.rollout_batch
    };
    let model = model.valid();
    let mut seqs = Vec::with_capacity(rows.len());
    for (c, part) in rows.chunks(chunk).enumerate() {
        let mut sampling = spec.sampling.clone();
        sampling.seed = ember_data::rng::mix64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9));
        let opts = GenerateOptions {
            max_new_tokens: vec![spec.max_new_tokens],
            eos_ids: spec.eos_ids.clone(),
            pad_id: spec.pad_id,
            sampling,
        };
        seqs.extend(generate_auto(&model, part, &opts, &mut Hooks::default())?);
    }
    let cost = RolloutCost {
        new_tokens: seqs.iter().map(|s| s.tokens.len() as u64).sum(),
        seconds: t.elapsed().as_secs_f64(),
    };
    let mut seqs = seqs.into_iter();
    let mut groups = Vec::with_capacity(prompts.len());
    for (index, _, row) in prompts {
        let mut samples = Vec::with_capacity(g);
        for seq in seqs.by_ref().take(g) {
            let completion = tok.decode(&seq.tokens, true)?;
            let scores = rewarder.score(&Sample {
                prompt: row.text(),
                completion: &completion,
                completion_tokens: seq.tokens.len(),
                fields: &row.fields,
            });
            samples.push(Scored {
                tokens: seq.tokens,
                logprobs: seq.logprobs,
                finish: seq.finish,
                scores,
            });
        }
        groups.push(Group {
            prompt: *index,
            samples,
        });
    }
    Ok((groups, cost))
}

/// A recipe path for error messages about an RL stage's section.
pub fn rl_origin(path: &Path) -> String {
    format!("{} [rl]", path.display())
}
