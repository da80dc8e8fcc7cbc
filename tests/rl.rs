//! The GRPO family's pieces against hand-computed numbers: advantages (grpo, dr_grpo, rloo,
//! tempo on a tree with known branch values), aggregation weights (token, sequence,
//! dr_grpo, balanced) and the clipped surrogate with the k3 KL; then the rlvr stage as a
//! user runs it (the reward rises, every metric is logged, resume is exact, bad recipes
//! are one-line errors).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use ember_train::objectives::grpo::*;
use serde_json::Value;

use crate::cli::{assert_one_line_error, stderr};
use crate::common::*;
use crate::stages::records;
use crate::train::{losses, train, TINY};

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

// ---- The rlvr stage, run as a user runs it ----

/// A prompt file: rows whose reference answer is the empty string, so that a completion
/// scores 1 under `exact_match` when it is blank (an end token or whitespace) and 0
/// otherwise; a random model sometimes writes one, which gives groups a learnable signal.
/// Prompt lengths differ so rows are padded differently.
fn blank_prompts(dir: &Path) -> PathBuf {
    let f = dir.join("prompts.jsonl");
    let rows: String = (0..12)
        .map(|i| {
            let prompt = format!("Say nothing{}.", " at all".repeat(i % 4));
            format!("{{\"prompt\": \"{prompt}\", \"answer\": \"\", \"id\": {i}}}\n")
        })
        .collect();
    std::fs::write(&f, rows).unwrap();
    f
}

fn rl_recipe(name: &str, train: &str, rl: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let prompts = blank_prompts(&dir);
    let head = TINY
        .split("[data]")
        .next()
        .unwrap()
        .replace("OUT", dir.join("runs").to_str().unwrap());
    let text = format!(
        "kind = \"rlvr\"\n{head}\n[data]\nseq_len = 64\n[[data.prompts]]\npath = \"{}\"\n\n[train]\n{train}\n[rl]\n{rl}\n[[rl.rewards]]\nkind = \"exact_match\"\nfield = \"answer\"\n",
        prompts.display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    (path, dir.join("runs/tiny"))
}

pub(crate) fn mean_of(recs: &[Value], key: &str) -> f64 {
    let v: Vec<f64> = recs.iter().filter_map(|r| r[key].as_f64()).collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn rlvr_stage_raises_the_reward_and_logs_every_metric() {
    let (p, run) = rl_recipe(
        "rlvr-learns",
        "steps = 20\nbatch_size = 4\nlr = 1e-2\nschedule = \"constant\"\nlog_every = 1\nsave_every = 0",
        "group_size = 8\nmax_new_tokens = 1\naggregation = \"balanced\"\nepsilon_high = 0.28\n\
         dynamic_sampling = true\nmax_sampling_rounds = 3",
    );
    let o = train(&p, &[], &[]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("12 prompts × 8 samples"), "{e}");
    let recs = records(&run);
    assert_eq!(recs.len(), 20);
    for r in &recs {
        for key in [
            "reward",
            "reward_std",
            "rollout_accuracy",
            "reward/exact_match",
            "frac_reward_zero_std",
            "clip_ratio",
            "entropy",
            "completions/mean_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "rollout/rounds",
            "rollout/groups",
            "rollout_tokens_per_s",
            "time/rollout_s",
            "time/train_s",
            "loss",
            "grad_norm",
        ] {
            assert!(r[key].is_number(), "{key} missing from {r}");
        }
        // One update per rollout: the trainer recomputes exactly the sampler's log-probs.
        let diff = r["rollout/logprob_diff"].as_f64().unwrap();
        assert!(diff < 1e-4, "log-probs differ from the sampler's by {diff}");
        assert_eq!(r["clip_ratio"].as_f64().unwrap(), 0.0);
        assert!(r.get("kl").is_none(), "no reference model at beta = 0");
        assert_eq!(r["completions/max_length"], 1);
        assert!(r["rollout/rounds"].as_u64().unwrap() <= 3);
    }
    // The reward here is the fraction of blank answers; RL makes them the rule.
    let (first, last) = (
        mean_of(&recs[..4], "reward"),
        mean_of(&recs[16..], "reward"),
    );
    assert!(
        last > first + 0.15,
        "reward did not rise: {first:.3} -> {last:.3}"
    );
    for f in ["model.safetensors", "rewards.svg", "curves.svg"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn rlvr_resumes_exactly_with_kl_tempo_and_two_updates_per_rollout() {
    let train_sec =
        "steps = 6\nbatch_size = 2\ngrad_accum = 2\nlr = 5e-3\nlog_every = 1\nsave_every = 2";
    let rl = "group_size = 4\nmax_new_tokens = 6\ntemperature = 1.3\ntop_p = 0.95\n\
              advantage = \"tempo\"\naggregation = \"sequence\"\nbeta = 0.1\nupdates_per_rollout = 2";
    let (full, full_run) = rl_recipe("rlvr-full", train_sec, rl);
    let o = train(&full, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&full_run);
    assert_eq!(recs.len(), 6);
    for (i, r) in recs.iter().enumerate() {
        let kl = r["kl"].as_f64().unwrap();
        assert!(kl >= 0.0 && kl.is_finite(), "{r}");
        // Rollouts are sampled at steps 1, 3, 5 (records of the first update of each).
        assert_eq!(r["reward"].is_number(), i % 2 == 0, "{r}");
        assert!(r["completions/max_length"].as_u64().is_none_or(|n| n <= 6));
        if i % 2 == 0 {
            assert!(r["rollout/logprob_diff"].as_f64().unwrap() < 1e-4, "{r}");
        }
    }
    assert!(
        recs[0]["kl"].as_f64().unwrap() < 1e-9,
        "policy = reference at step 1"
    );
    assert!(recs[5]["kl"].as_f64().unwrap() > 0.0);

    let (cut, cut_run) = rl_recipe("rlvr-cut", train_sec, rl);
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:3")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&cut_run), losses(&full_run));
}

#[test]
fn rlvr_recipe_mistakes_are_one_line_errors() {
    let ok_train = "steps = 2\nbatch_size = 2\nlr = 1e-3";
    let ok_rl = "group_size = 4\nmax_new_tokens = 4";
    let run = |train_sec: &str, rl: &str| {
        let (p, _) = rl_recipe("rlvr-bad", train_sec, rl);
        (train(&p, &[], &[]), p)
    };
    let (o, p) = run(ok_train, "group_size = 1\nmax_new_tokens = 4");
    assert_one_line_error(&o, &[p.to_str().unwrap(), "[rl]", "`group_size`"]);
    let (o, _) = run(ok_train, "group_size = 4\ntemperature = 0.0");
    assert_one_line_error(&o, &["[rl]", "`temperature`"]);
    let (o, _) = run(ok_train, "group_size = 4\nadvantage = \"ppo\"");
    assert_one_line_error(&o, &["recipe.toml:", "ppo"]);
    let (o, _) = run(
        ok_train,
        &format!("{ok_rl}\n[[rl.rewards]]\nkind = \"overlong\"\nfield = \"x\""),
    );
    assert_one_line_error(&o, &["rewards[0]", "`field`"]);
    let (o, _) = run(
        "steps = 2\nbatch_size = 2\ngrad_accum = 9\nlr = 1e-3",
        ok_rl,
    );
    assert_one_line_error(&o, &["[train]", "`grad_accum`"]);

    // No [rl] section, and an [rl] section on another kind.
    let (p, _) = rl_recipe("rlvr-no-rl", ok_train, ok_rl);
    let text = std::fs::read_to_string(&p).unwrap();
    let cut = text.split("[rl]").next().unwrap().to_string();
    std::fs::write(&p, &cut).unwrap();
    assert_one_line_error(&train(&p, &[], &[]), &["needs an [rl] section"]);
    std::fs::write(&p, text.replace("kind = \"rlvr\"", "kind = \"sft\"")).unwrap();
    assert_one_line_error(
        &train(&p, &[], &[]),
        &["[rl] section belongs to kind = \"rlvr\""],
    );

    // A prompt row without its prompt names the file and line.
    let (p, _) = rl_recipe("rlvr-bad-row", ok_train, ok_rl);
    let prompts = p.with_file_name("prompts.jsonl");
    let mut rows = std::fs::read_to_string(&prompts).unwrap();
    rows.insert_str(
        0,
        "{\"question\": \"where is the prompt\", \"answer\": \"\"}\n",
    );
    std::fs::write(&prompts, rows).unwrap();
    assert_one_line_error(
        &train(&p, &[], &[]),
        &[&format!("{}:1", prompts.display()), "missing `prompt`"],
    );
}
