//! Distillation losses between a student (with a graph) and a frozen teacher, over the
//! tokens of sampled completions:
//!
//! - `reverse_kl_sampled`: the per-token advantage A_t = log π_T(y_t) − log π_S(y_t) on the
//!   sampled tokens (Thinking Machines' on-policy distillation), trained with the
//!   importance-weighted (PPO-clipped) surrogate against the sampler's log-probs;
//! - `reverse_kl` KL(S‖T), `forward_kl` KL(T‖S) and GKD's generalized JSD_β over the whole
//!   vocabulary at every completion position.
//!
//! Token routing: given a mask of the completion tokens to distil, the others are trained
//! by the clipped surrogate on the rows' own (GRPO) advantages.
//!
//! Extrapolation λ: the sampled reward becomes λ(log π_T − log π_ref) − (log π_S − log π_ref);
//! the full-vocabulary losses target the normalised π_ref·(π_T/π_ref)^λ. λ = 1 is the teacher.

use anyhow::Result;
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use ember_models::layers::to_dtype;

use crate::objectives::grpo::{clipped_surrogate, PolicyRow, RowTensors, Surrogate};
use crate::recipe::DistillLossKind;
use crate::trainer::{scalar, NextTokenModel};

/// A divergence between two distributions given as log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// KL(teacher ‖ student).
    Forward,
    /// KL(student ‖ teacher).
    Reverse,
    /// β·KL(T‖M) + (1−β)·KL(S‖M) with M = βT + (1−β)S; β = 0 and β = 1 are taken as the
    /// forward and reverse KL, the limits of JSD_β/β and JSD_β/(1−β) (as TRL's GKD does).
    Jsd(f64),
}

/// Element-wise log(eᵃ + eᵇ), stable.
fn log_add_exp(a: Tensor<3>, b: Tensor<3>) -> Tensor<3> {
    let m = a.clone().max_pair(b.clone()).detach();
    ((a - m.clone()).exp() + (b - m.clone()).exp()).log() + m
}

/// Σ_v p_v (log p_v − log q_v) over the last axis.
fn kl(log_p: Tensor<3>, log_q: Tensor<3>) -> Tensor<2> {
    let [b, l, _] = log_p.dims();
    (log_p.clone().exp() * (log_p - log_q))
        .sum_dim(2)
        .reshape([b, l])
}

/// The divergence at every position of `[batch, len, vocab]` log-probs: the student's
/// (gradients flow through them) and the teacher's (constants). Returns `[batch, len]`.
pub fn divergence(student: Tensor<3>, teacher: Tensor<3>, d: Divergence) -> Tensor<2> {
    match d {
        Divergence::Forward | Divergence::Jsd(0.0) => kl(teacher, student),
        Divergence::Reverse | Divergence::Jsd(1.0) => kl(student, teacher),
        Divergence::Jsd(beta) => {
            let m = log_add_exp(
                teacher.clone() + beta.ln(),
                student.clone() + (1.0 - beta).ln(),
            );
            kl(teacher, m.clone()) * beta + kl(student, m) * (1.0 - beta)
        }
    }
}

/// The target distribution for extrapolation λ: log softmax(λ·log π_T + (1−λ)·log π_ref).
pub fn extrapolated(teacher: Tensor<3>, reference: Tensor<3>, lambda: f64) -> Tensor<3> {
    log_softmax(teacher * lambda + reference * (1.0 - lambda), 2)
}

/// The sampled tokens' advantage: λ(log π_T − log π_ref) − (log π_S − log π_ref), which is
/// log π_T − log π_S when λ = 1 (no reference needed then).
pub fn sampled_advantage(
    sampler: Tensor<2>,
    teacher: Tensor<2>,
    reference: Option<Tensor<2>>,
    lambda: f64,
) -> Tensor<2> {
    match reference {
        Some(r) if lambda != 1.0 => teacher * lambda + r * (1.0 - lambda) - sampler,
        _ => teacher - sampler,
    }
}

/// The distillation objective's settings.
#[derive(Debug, Clone, Copy)]
pub struct DistillConfig {
    pub loss: DistillLossKind,
    pub jsd_beta: f64,
    pub lambda: f64,
    /// Both models' logits are divided by it (the sampling temperature).
    pub temperature: f64,
    /// Clip range of the sampled loss's importance ratio.
    pub epsilon: f64,
}

impl DistillConfig {
    fn divergence(&self) -> Divergence {
        match self.loss {
            DistillLossKind::ForwardKl => Divergence::Forward,
            DistillLossKind::Jsd => Divergence::Jsd(self.jsd_beta),
            DistillLossKind::ReverseKl | DistillLossKind::ReverseKlSampled => Divergence::Reverse,
        }
    }
}

/// What a loss evaluation measured, as sums over completion tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct DistillSums {
    /// Σ KL(student ‖ target) over the whole vocabulary.
    pub kl: f64,
    /// Σ (log π_S(y) − log π_T(y)) on the sampled tokens.
    pub gap: f64,
    /// Σ weight·clipped (sampled loss only), and Σ weight.
    pub clip: f64,
    pub weight: f64,
    pub tokens: f64,
}

impl DistillSums {
    pub fn add(&mut self, o: &DistillSums) {
        self.kl += o.kl;
        self.gap += o.gap;
        self.clip += o.clip;
        self.weight += o.weight;
        self.tokens += o.tokens;
    }
}

/// `model`'s log-probs at temperature `t`, `[batch, len, vocab]` in f32.
fn log_probs<M: NextTokenModel>(model: &M, inputs: Tensor<2, Int>, t: f64) -> Tensor<3> {
    let z = to_dtype(model.logits(inputs), DType::F32);
    log_softmax(if t != 1.0 { z / t } else { z }, 2)
}

/// A frozen model's log-probs of `inputs`, computed on its own device and moved to `to`'s.
/// Both are one physical device, with and without autodiff, so nothing leaves it: the
/// `[batch, len, vocab]` log-probs are gigabytes at a real vocabulary.
fn frozen_log_probs<M: NextTokenModel>(
    model: &M,
    inputs: &Tensor<2, Int>,
    t: f64,
    to: &Tensor<2>,
) -> Tensor<3> {
    let device = model.head_weight().device();
    let x = inputs.clone().to_device(&device);
    log_probs(model, x, t).to_device(&to.device())
}

/// The picked tokens' entries of `[batch, len, vocab]` log-probs: `[batch, len]`.
fn pick(lp: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, l, v] = lp.dims();
    lp.reshape([b * l, v])
        .gather(1, targets.reshape([b * l, 1]))
        .reshape([b, l])
}

/// Which completion tokens each row distils (1) and which it trains on the reward through
/// the rows' GRPO advantages (0): `[rows, L − 1]` like [`RowTensors`]; every completion token
/// distils when `routes` is `None`.
fn route_masks(
    rows: &[PolicyRow],
    routes: Option<&[Vec<f32>]>,
    t: &RowTensors,
) -> (Tensor<2>, Tensor<2>) {
    let device = t.weight.device();
    let l = t.weight.dims()[1];
    let mut distil = t.completion.clone();
    if let Some(routes) = routes {
        distil.iter_mut().for_each(|m| *m = 0.0);
        for (r, (row, route)) in rows.iter().zip(routes).enumerate() {
            let start = r * l + row.prompt_len - 1;
            distil[start..start + route.len()].copy_from_slice(route);
        }
    }
    let reward: Vec<f32> = t
        .completion
        .iter()
        .zip(&distil)
        .map(|(c, d)| c - d)
        .collect();
    let f = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [rows.len(), l]), &device);
    (f(distil), f(reward))
}

/// The loss of `rows` (Σ weight·ℓ over completion tokens, with a graph through `student`)
/// against `teacher`, with `reference` for extrapolation, and what it measured. With
/// `routes` (per row, 1 for each completion token to distil), the other tokens are trained
/// by the clipped surrogate on the rows' own advantages (GRPO) instead.
pub fn distill_loss<S: NextTokenModel, T: NextTokenModel>(
    student: &S,
    teacher: &T,
    reference: Option<&S>,
    rows: &[PolicyRow],
    routes: Option<&[Vec<f32>]>,
    cfg: &DistillConfig,
) -> Result<(Tensor<1>, DistillSums)> {
    let device = student.head_weight().device();
    let t = RowTensors::new(rows, &device);
    let (distil, reward) = route_masks(rows, routes, &t);
    let temp = cfg.temperature;
    let teacher_lp = frozen_log_probs(teacher, &t.inputs, temp, &t.weight);
    let reference_lp = reference
        .filter(|_| cfg.lambda != 1.0)
        .map(|r| frozen_log_probs(r, &t.inputs, temp, &t.weight));
    let student_lp = log_probs(student, t.inputs.clone(), temp);
    let target = match &reference_lp {
        Some(r) => extrapolated(teacher_lp.clone(), r.clone(), cfg.lambda),
        None => teacher_lp.clone(),
    };
    let student_tok = pick(student_lp.clone(), t.targets.clone());
    let teacher_tok = pick(teacher_lp, t.targets.clone());
    let kl_full = divergence(
        student_lp.clone().detach(),
        target.clone(),
        Divergence::Reverse,
    );
    let weight: f64 = rows
        .iter()
        .map(|r| r.weight as f64 * r.completion_len() as f64)
        .sum();
    let mut sums = DistillSums {
        kl: t.completion_sum(kl_full),
        gap: t.completion_sum(student_tok.clone().detach() - teacher_tok.clone()),
        weight,
        tokens: t.completion.iter().map(|&m| m as f64).sum(),
        clip: 0.0,
    };
    let surrogate = |advantages: Tensor<2>, weights: Tensor<2>| {
        clipped_surrogate(
            Surrogate {
                logp: student_tok.clone(),
                rollout_logp: t.rollout.clone(),
                ref_logp: None,
                advantages,
                weights,
            },
            cfg.epsilon,
            cfg.epsilon,
            0.0,
        )
    };
    let loss = match cfg.loss {
        DistillLossKind::ReverseKlSampled => {
            // One surrogate: the distillation advantage on routed tokens, GRPO's elsewhere.
            let reference_tok = reference_lp.map(|r| pick(r, t.targets.clone()));
            let distil_adv =
                sampled_advantage(t.rollout.clone(), teacher_tok, reference_tok, cfg.lambda);
            let adv = distil_adv * distil + t.adv.clone() * reward;
            let (loss, st) = surrogate(adv, t.weight.clone());
            sums.clip = scalar(st.clip_fraction)? * weight;
            loss
        }
        _ => {
            let d = divergence(student_lp, target, cfg.divergence());
            let loss = (d * t.weight.clone() * distil).sum();
            if routes.is_some() {
                let (rl, st) = surrogate(t.adv.clone(), t.weight.clone() * reward);
                sums.clip = scalar(st.clip_fraction)? * weight;
                loss + rl
            } else {
                loss
            }
        }
    };
    Ok((loss, sums))
}
