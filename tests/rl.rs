//! The GRPO family's pieces against hand-computed numbers: advantages (grpo, dr_grpo, rloo,
//! tempo on a tree with known branch values), aggregation weights (token, sequence,
//! dr_grpo, balanced) and the clipped surrogate with the k3 KL.

use burn::tensor::{Tensor, TensorData};
use ember_train::objectives::grpo::*;

use crate::common::*;

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

#[test]
fn group_advantages_match_hand_computation() {
    let r = [1.0, 0.0, 1.0, 0.0];
    // mean 0.5; unbiased std sqrt(1/3) = 0.57735
    close(&grpo(&r), &[0.866025, -0.866025, 0.866025, -0.866025], 1e-5);
    close(&dr_grpo(&r), &[0.5, -0.5, 0.5, -0.5], 1e-12);
    // r_i minus the mean of the other three: 1 - 1/3, 0 - 2/3
    close(
        &rloo(&r),
        &[2.0 / 3.0, -2.0 / 3.0, 2.0 / 3.0, -2.0 / 3.0],
        1e-12,
    );
    // A group with equal rewards carries no signal.
    close(&grpo(&[3.0, 3.0, 3.0]), &[0.0, 0.0, 0.0], 1e-12);
    close(&rloo(&[2.0]), &[0.0], 0.0);
    close(
        &grpo(&[1.0, 0.0, 0.0]),
        &[1.154700, -0.577350, -0.577350],
        1e-5,
    );
}

#[test]
fn tempo_adds_branch_values_only_where_the_tree_branches() {
    // Root → 5 (responses 0, 1, 2) | 4 (3); [5] → 6 (0, 1) | 9 (2); [5,6] → 7 (0) | 8 (1).
    let ids = vec![vec![5, 6, 7], vec![5, 6, 8], vec![5, 9], vec![4]];
    let r = [1.0, 0.0, 1.0, 0.0];
    // V(root) = 1/2, V([5]) = 2/3, V([4]) = 0, V([5,6]) = 1/2, V([5,9]) = 1, V([5,6,7]) = 1,
    // V([5,6,8]) = 0; the TD terms are divided by the group std sqrt(1/3).
    let a = 0.866025;
    let s = (1.0f64 / 3.0).sqrt();
    let want = [
        vec![a + (1.0 / 6.0) / s, a - (1.0 / 6.0) / s, a + 0.5 / s],
        vec![-a + (1.0 / 6.0) / s, -a - (1.0 / 6.0) / s, -a - 0.5 / s],
        vec![a + (1.0 / 6.0) / s, a + (1.0 / 3.0) / s],
        vec![-a - 0.5 / s],
    ];
    let got = tempo(&ids, &r);
    for (g, w) in got.iter().zip(&want) {
        close(g, w, 1e-5);
    }
    assert!((got[0][0] - 1.154701).abs() < 1e-5 && (got[3][0] + 1.732051).abs() < 1e-5);
    // Without branches (all responses share their tokens) tempo is plain GRPO.
    let same = tempo(&[vec![1, 2], vec![1, 2, 3]], &[1.0, 0.0]);
    // mean 1/2, std sqrt(1/2): ±(1/2)/sqrt(1/2) = ±1/sqrt(2)
    let h = std::f64::consts::FRAC_1_SQRT_2;
    close(&same[0], &[h, h], 1e-5);
    // [1,2] ends where [1,2,3] goes on: one continuation, no branch at t = 2.
    close(&same[1], &[-h, -h, -h], 1e-5);
}

#[test]
fn aggregation_weights_match_hand_computation() {
    let lengths = [2, 4, 3];
    let adv = [1.0, -1.0, 0.0];
    close(
        &aggregation_weights(Aggregation::Token, &lengths, &adv, 8),
        &[1.0 / 9.0; 3],
        1e-12,
    );
    close(
        &aggregation_weights(Aggregation::Sequence, &lengths, &adv, 8),
        &[1.0 / 6.0, 1.0 / 12.0, 1.0 / 9.0],
        1e-12,
    );
    close(
        &aggregation_weights(Aggregation::DrGrpo, &lengths, &adv, 8),
        &[1.0 / 24.0; 3],
        1e-12,
    );
    // P = {0}: (1/3) / 2 tokens; N = {1}: (1/3) / 4 tokens; the zero-advantage response: 0.
    close(
        &aggregation_weights(Aggregation::Balanced, &lengths, &adv, 8),
        &[1.0 / 6.0, 1.0 / 12.0, 0.0],
        1e-12,
    );
    // Two positives of 1 and 3 tokens share (2/4) / 4 tokens; two negatives of 2 and 6
    // tokens share (2/4) / 8: each side's long and short responses weigh the same per token.
    close(
        &aggregation_weights(
            Aggregation::Balanced,
            &[1, 3, 2, 6],
            &[0.5, 0.2, -0.1, -0.9],
            8,
        ),
        &[0.125, 0.125, 0.0625, 0.0625],
        1e-12,
    );
}

#[test]
fn clipped_surrogate_matches_hand_computation() {
    let dev = device();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 4]), &dev);
    let ln = |x: f32| x.ln();
    // Ratios 1.5, 0.5, 1.1, 1.0 against the rollout; advantages +1, +1, -1, +1; the last
    // token is padding (weight 0).
    let logp = t(vec![ln(1.5), ln(0.5), ln(1.1), 0.0]);
    let s = Surrogate {
        logp: logp.clone(),
        rollout_logp: t(vec![0.0; 4]),
        ref_logp: Some(t(vec![0.0; 4])),
        advantages: t(vec![1.0, 1.0, -1.0, 1.0]),
        weights: t(vec![0.25, 0.25, 0.5, 0.0]),
    };
    // min(ρA, clip(ρ, 0.8, 1.28)A): 1.28 (clipped), 0.5, -1.1 (unclipped: ρ inside), 1.0.
    // Loss without KL: -(0.25·1.28 + 0.25·0.5 + 0.5·(-1.1)) = 0.105.
    let (loss, stats) = clipped_surrogate(
        Surrogate {
            logp: s.logp.clone(),
            rollout_logp: s.rollout_logp.clone(),
            ref_logp: None,
            advantages: s.advantages.clone(),
            weights: s.weights.clone(),
        },
        0.2,
        0.28,
        0.0,
    );
    assert!((values(loss)[0] - 0.105).abs() < 1e-5);
    assert!((values(stats.clip_fraction)[0] - 0.25).abs() < 1e-6);
    assert!(values(stats.kl)[0].abs() < 1e-12);
    // k3 with a reference at log-prob 0: e^{-x} + x - 1 at x = ln ρ.
    let k3 = |r: f64| 1.0 / r + r.ln() - 1.0;
    let kl = 0.25 * k3(1.5) + 0.25 * k3(0.5) + 0.5 * k3(1.1);
    let (loss, stats) = clipped_surrogate(s, 0.2, 0.28, 0.1);
    assert!((values(loss)[0] - (0.105 + 0.1 * kl)).abs() < 1e-5);
    assert!((values(stats.kl)[0] - kl).abs() < 1e-5);
}

#[test]
fn clipped_tokens_pass_no_gradient() {
    let dev = device().autodiff();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 3]), &dev);
    let logp = t(vec![1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln()]).require_grad();
    let (loss, _) = clipped_surrogate(
        Surrogate {
            logp: logp.clone(),
            rollout_logp: t(vec![0.0; 3]),
            ref_logp: None,
            advantages: t(vec![1.0, 1.0, -1.0]),
            weights: t(vec![0.25, 0.25, 0.5]),
        },
        0.2,
        0.28,
        0.0,
    );
    let grads = loss.backward();
    let g = logp.grad(&grads).expect("logp has a gradient");
    // d(-w ρ A)/d log ρ = -w A ρ where unclipped; 0 where the clip binds (ratio 1.5 > 1.28).
    close(&values(g), &[0.0, -0.25 * 0.5, 0.5 * 1.1], 1e-6);
}
