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

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

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
