//! The GRPO family's objective as small named pieces over one group of G responses to a
//! prompt: advantages (`grpo`, `dr_grpo`, `rloo`, `tempo`), aggregation weights (`token`,
//! `sequence`, `dr_grpo`, `balanced`) and the clipped surrogate with an optional k3 KL to a
//! reference model. The host computes advantages and weights (they are per-response
//! numbers); the surrogate runs on the device.
//!
//! Per token, ℓ_{i,t} = −min(ρ Â, clip(ρ, 1−ε_low, 1+ε_high) Â) + β·KL_k3, with
//! ρ = π_θ/π_rollout and KL_k3 = π_ref/π_θ − log(π_ref/π_θ) − 1; the loss is Σ w_{i,t} ℓ_{i,t}
//! with the aggregation's weights.

use std::collections::HashMap;

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::objectives::linear_ce::{chunk_rows, linear_logprobs};
use crate::trainer::{scalar, NextTokenModel};

/// Added to the group's standard deviation so a group with equal rewards gets zero
/// advantages rather than a division by zero (verl's value).
pub const STD_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageKind {
    /// (r − mean) / std over the group (std with Bessel's correction, as torch's).
    Grpo,
    /// r − mean, not scaled (Dr. GRPO).
    DrGrpo,
    /// r_i minus the mean of the other G − 1 rewards (RLOO).
    Rloo,
    /// GRPO plus a temporal-difference term at the tokens where the group's responses branch.
    Tempo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over every token of the group (DAPO).
    Token,
    /// Mean over tokens within a response, then over responses (GRPO).
    Sequence,
    /// Sum over tokens divided by G · max_len (Dr. GRPO).
    DrGrpo,
    /// Token means over the positive- and the negative-advantage responses separately,
    /// weighted |P|/G and |N|/G.
    Balanced,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// The group's standard deviation with Bessel's correction (0 for one response).
pub fn group_std(r: &[f64]) -> f64 {
    if r.len() < 2 {
        return 0.0;
    }
    let m = mean(r);
    (r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (r.len() - 1) as f64).sqrt()
}

pub fn grpo(r: &[f64]) -> Vec<f64> {
    let (m, s) = (mean(r), group_std(r));
    r.iter().map(|x| (x - m) / (s + STD_EPS)).collect()
}

pub fn dr_grpo(r: &[f64]) -> Vec<f64> {
    let m = mean(r);
    r.iter().map(|x| x - m).collect()
}

pub fn rloo(r: &[f64]) -> Vec<f64> {
    let g = r.len();
    if g < 2 {
        return vec![0.0; g];
    }
    let total: f64 = r.iter().sum();
    r.iter().map(|x| x - (total - x) / (g - 1) as f64).collect()
}

/// TEMPO's per-token advantages for responses `ids` with rewards `r`. The responses form a
/// prefix tree over token ids; a prefix's value V is the mean reward of the responses that
/// start with it. Token t of response i gets the GRPO advantage plus, where the responses
/// sharing its prefix continue with two or more different tokens (a branch), the
/// temporal-difference term V(prefix + token) − V(prefix), scaled by the same group
/// standard deviation as the GRPO term.
pub fn tempo(ids: &[Vec<u32>], r: &[f64]) -> Vec<Vec<f64>> {
    assert_eq!(ids.len(), r.len(), "one reward per response");
    let base = grpo(r);
    let scale = group_std(r) + STD_EPS;
    // Every prefix (by length and content) → (reward sum, responses, distinct next tokens).
    struct Node {
        sum: f64,
        n: usize,
        next: Vec<u32>,
    }
    let mut nodes: HashMap<&[u32], Node> = HashMap::new();
    for (seq, &reward) in ids.iter().zip(r) {
        for t in 0..=seq.len() {
            let node = nodes.entry(&seq[..t]).or_insert(Node {
                sum: 0.0,
                n: 0,
                next: Vec::new(),
            });
            node.sum += reward;
            node.n += 1;
            if let Some(&tok) = seq.get(t) {
                if !node.next.contains(&tok) {
                    node.next.push(tok);
                }
            }
        }
    }
    let value = |p: &[u32]| {
        let n = &nodes[p];
        n.sum / n.n as f64
    };
    ids.iter()
        .zip(&base)
        .map(|(seq, &a)| {
            (0..seq.len())
                .map(|t| {
                    let parent = &seq[..t];
                    if nodes[parent].next.len() >= 2 {
                        a + (value(&seq[..=t]) - value(parent)) / scale
                    } else {
                        a
                    }
                })
                .collect()
        })
        .collect()
}

/// Per-response advantages for the non-tree kinds (`tempo` needs the token ids: see
/// [`tempo`]).
pub fn advantages(kind: AdvantageKind, r: &[f64]) -> Vec<f64> {
    match kind {
        AdvantageKind::Grpo | AdvantageKind::Tempo => grpo(r),
        AdvantageKind::DrGrpo => dr_grpo(r),
        AdvantageKind::Rloo => rloo(r),
    }
}

/// The weight of each token of each response (`lengths[i]` tokens) in the group's loss:
/// the loss is Σ_i Σ_t w_i ℓ_{i,t}, so one weight per response. `adv` is each response's
/// (sequence-level) advantage, used by `balanced` to split the group; responses with zero
/// advantage carry no policy gradient and get no weight there. `max_len` is the generation
/// budget (`dr_grpo`).
pub fn aggregation_weights(
    kind: Aggregation,
    lengths: &[usize],
    adv: &[f64],
    max_len: usize,
) -> Vec<f64> {
    let g = lengths.len().max(1) as f64;
    match kind {
        Aggregation::Token => {
            let total = lengths.iter().sum::<usize>().max(1) as f64;
            vec![1.0 / total; lengths.len()]
        }
        Aggregation::Sequence => lengths
            .iter()
            .map(|&n| 1.0 / (g * n.max(1) as f64))
            .collect(),
        Aggregation::DrGrpo => vec![1.0 / (g * max_len.max(1) as f64); lengths.len()],
        Aggregation::Balanced => {
            let side = |positive: bool| {
                let members: Vec<usize> = (0..lengths.len())
                    .filter(|&i| if positive { adv[i] > 0.0 } else { adv[i] < 0.0 })
                    .collect();
                let tokens = members.iter().map(|&i| lengths[i]).sum::<usize>().max(1) as f64;
                (members.len() as f64 / g / tokens, members)
            };
            let mut w = vec![0.0; lengths.len()];
            for positive in [true, false] {
                let (weight, members) = side(positive);
                for i in members {
                    w[i] = weight;
                }
            }
            w
        }
    }
}

/// The clipped surrogate's pieces, all `[rows, tokens]`: the policy's log-probs of the
/// sampled tokens (with a graph), the rollout's, optionally the reference model's, the
/// advantages and the aggregation weights (zero on padding and prompt tokens).
pub struct Surrogate {
    pub logp: Tensor<2>,
    pub rollout_logp: Tensor<2>,
    pub ref_logp: Option<Tensor<2>>,
    pub advantages: Tensor<2>,
    pub weights: Tensor<2>,
}

/// What a loss evaluation measured, as weighted means over the trained tokens.
pub struct SurrogateStats {
    /// Fraction of tokens whose ratio was clipped (on the side that matters for the sign of
    /// the advantage).
    pub clip_fraction: Tensor<1>,
    pub kl: Tensor<1>,
}

/// Σ w ℓ with asymmetric clipping (`eps_low`, `eps_high`) and, when `beta > 0` and a
/// reference is given, the k3 KL penalty.
pub fn clipped_surrogate(
    s: Surrogate,
    eps_low: f64,
    eps_high: f64,
    beta: f64,
) -> (Tensor<1>, SurrogateStats) {
    let ratio = (s.logp.clone() - s.rollout_logp).exp();
    let unclipped = ratio.clone() * s.advantages.clone();
    let clipped = ratio.clone().clamp(1.0 - eps_low, 1.0 + eps_high) * s.advantages.clone();
    let objective = unclipped.clone().min_pair(clipped.clone());
    let was_clipped = clipped.lower(unclipped).float();
    let wsum = s.weights.clone().sum().clamp_min(1e-12);
    let mut per_token = objective.neg();
    let kl = match (&s.ref_logp, beta > 0.0) {
        (Some(r), true) => {
            let d = r.clone() - s.logp.clone();
            let k3 = d.clone().exp() - d - 1.0;
            per_token = per_token + k3.clone() * beta;
            (k3.detach() * s.weights.clone()).sum() / wsum.clone()
        }
        _ => Tensor::zeros([1], &s.weights.device()),
    };
    let loss = (per_token * s.weights.clone()).sum();
    let clip_fraction = (was_clipped * s.weights).sum() / wsum;
    (loss, SurrogateStats { clip_fraction, kl })
}

/// One sampled completion as the loss sees it.
#[derive(Debug, Clone)]
pub struct PolicyRow {
    /// The prompt, then the completion.
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// The sampler's log-prob of each completion token.
    pub rollout_logp: Vec<f32>,
    /// The reference model's, when there is a KL term.
    pub ref_logp: Option<Vec<f32>>,
    /// The advantage of each completion token.
    pub adv: Vec<f32>,
    /// Each completion token's weight in the step's loss (from the aggregation).
    pub weight: f32,
}

impl PolicyRow {
    pub fn completion_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// The surrogate's settings.
#[derive(Debug, Clone, Copy)]
pub struct SurrogateConfig {
    /// The sampling temperature: log-probs are recomputed under softmax(logits / T).
    pub temperature: f64,
    pub eps_low: f64,
    pub eps_high: f64,
    pub beta: f64,
}

/// What a loss evaluation measured, as sums over completion tokens (`clip` and `kl`
/// weighted by the aggregation weights, summed in `weight`), to be combined over
/// micro-batches.
#[derive(Debug, Default, Clone, Copy)]
pub struct LossSums {
    pub clip: f64,
    pub kl: f64,
    pub weight: f64,
    pub entropy: f64,
    /// Σ |log π_θ − log π_rollout|.
    pub logp_diff: f64,
    pub tokens: f64,
}

impl LossSums {
    pub fn add(&mut self, o: &LossSums) {
        self.clip += o.clip;
        self.kl += o.kl;
        self.weight += o.weight;
        self.entropy += o.entropy;
        self.logp_diff += o.logp_diff;
        self.tokens += o.tokens;
    }
}

/// Rows as tensors `[rows, L − 1]` (L the longest row): inputs and targets shifted by one,
/// right-padded; the rollout log-probs, advantages, weights and reference log-probs at the
/// positions that predict completion tokens, 0 elsewhere.
pub(crate) struct RowTensors {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub rollout: Tensor<2>,
    pub reference: Option<Tensor<2>>,
    pub adv: Tensor<2>,
    pub weight: Tensor<2>,
    /// 1 on completion positions.
    pub completion: Vec<f32>,
}

impl RowTensors {
    pub fn new(rows: &[PolicyRow], device: &Device) -> Self {
        let b = rows.len();
        let l = rows.iter().map(|r| r.ids.len()).max().unwrap_or(2) - 1;
        let mut inputs = vec![0i64; b * l];
        let mut targets = vec![0i64; b * l];
        let mut rollout = vec![0f32; b * l];
        let mut reference = vec![0f32; b * l];
        let mut adv = vec![0f32; b * l];
        let mut weight = vec![0f32; b * l];
        let mut completion = vec![0f32; b * l];
        for (r, row) in rows.iter().enumerate() {
            let o = r * l;
            for (j, w) in row.ids.windows(2).enumerate() {
                inputs[o + j] = w[0] as i64;
                targets[o + j] = w[1] as i64;
            }
            // Completion token j is predicted at position prompt_len − 1 + j.
            let start = o + row.prompt_len - 1;
            for j in 0..row.completion_len() {
                rollout[start + j] = row.rollout_logp[j];
                adv[start + j] = row.adv[j];
                weight[start + j] = row.weight;
                completion[start + j] = 1.0;
                if let Some(rl) = &row.ref_logp {
                    reference[start + j] = rl[j];
                }
            }
        }
        let f = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, l]), device);
        let i = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, l]), device);
        Self {
            inputs: i(inputs),
            targets: i(targets),
            rollout: f(rollout),
            reference: rows
                .iter()
                .all(|r| r.ref_logp.is_some())
                .then(|| f(reference)),
            adv: f(adv),
            weight: f(weight),
            completion,
        }
    }

    /// Σ over completion positions of `v` `[rows, L − 1]`.
    pub fn completion_sum(&self, v: Tensor<2>) -> f64 {
        v.into_data()
            .iter::<f32>()
            .zip(&self.completion)
            .map(|(x, m)| (x * m) as f64)
            .sum()
    }
}

/// The clipped surrogate of `rows` under `model` (with a graph), Σ w ℓ over their
/// completion tokens, and what it measured.
pub fn policy_loss<M: NextTokenModel>(
    model: &M,
    rows: &[PolicyRow],
    cfg: &SurrogateConfig,
) -> Result<(Tensor<1>, LossSums)> {
    let t = RowTensors::new(rows, &model.head_weight().device());
    let (logp, entropy) =
        model_logprobs(model, t.inputs.clone(), t.targets.clone(), cfg.temperature);
    let weight: f64 = rows
        .iter()
        .map(|r| r.weight as f64 * r.completion_len() as f64)
        .sum();
    let diff = (logp.clone().detach() - t.rollout.clone()).abs();
    let (loss, st) = clipped_surrogate(
        Surrogate {
            logp,
            rollout_logp: t.rollout.clone(),
            ref_logp: t.reference.clone(),
            advantages: t.adv.clone(),
            weights: t.weight.clone(),
        },
        cfg.eps_low,
        cfg.eps_high,
        cfg.beta,
    );
    let sums = LossSums {
        clip: scalar(st.clip_fraction)? * weight,
        kl: scalar(st.kl)? * weight,
        weight,
        entropy: t.completion_sum(entropy),
        logp_diff: t.completion_sum(diff),
        tokens: t.completion.iter().map(|&m| m as f64).sum(),
    };
    Ok((loss, sums))
}

/// Log-probs of `targets` `[rows, len]` after `inputs` under `model` at `temperature`
/// (with a graph when the model has one) and the entropies, through the fused head: the
/// `[rows, len, vocab]` logits never exist whole.
fn model_logprobs<M: NextTokenModel>(
    model: &M,
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    temperature: f64,
) -> (Tensor<2>, Tensor<2>) {
    let [b, s] = inputs.dims();
    let pos = Tensor::<1, Int>::arange(0..s as i64, &inputs.device())
        .reshape([1, s])
        .expand([b, s]);
    let hidden = model.packed_hidden(inputs, pos, None);
    let dim = hidden.dims()[2];
    let head = model.head_weight();
    let rows = chunk_rows(head.dims()[0], &head.device());
    let (logp, entropy) = linear_logprobs(
        hidden.reshape([b * s, dim]),
        head,
        targets.reshape([b * s]),
        temperature,
        rows,
    );
    (logp.reshape([b, s]), entropy.reshape([b, s]))
}

/// Each row's completion log-probs under `model` at `temperature`, without a graph (the
/// reference model's pass).
pub fn completion_logprobs<M: NextTokenModel>(
    model: &M,
    rows: &[PolicyRow],
    temperature: f64,
) -> Vec<Vec<f32>> {
    let t = RowTensors::new(rows, &model.head_weight().device());
    let (logp, _) = model_logprobs(model, t.inputs, t.targets, temperature);
    let [_, l] = logp.dims();
    let v: Vec<f32> = logp.into_data().iter::<f32>().collect();
    rows.iter()
        .enumerate()
        .map(|(r, row)| {
            let start = r * l + row.prompt_len - 1;
            v[start..start + row.completion_len()].to_vec()
        })
        .collect()
}
