//! MLM pretraining: the masking proportions and the 80/10/10 split, the sparse head against
//! the dense one, StableAdamW against its formula, and the `objective = "mlm"` stage as a
//! user runs it.

use burn::tensor::{Int, Tensor, TensorData};
use ember_data::loader::Batch;
use ember_models::modernbert::ModernBert;
use ember_models::rng::Rng;
use ember_train::objectives::lm::cross_entropy;
use ember_train::objectives::mlm::{masked_hidden, mlm_loss, MaskSpec};
use ember_train::optim::{OptimConfig, Optimizer, OptimizerKind};
use serde_json::Value;

use crate::common::*;
use crate::train::{assert_bad_recipes, losses, recipe_from, train};

fn spec() -> MaskSpec {
    MaskSpec {
        prob: 0.3,
        mask_id: 3,
        random_fraction: 0.1,
        keep_fraction: 0.1,
        vocab: 100,
        specials: vec![0, 1, 2, 3],
    }
}

#[test]
fn masking_chooses_thirty_percent_and_splits_80_10_10() {
    let s = spec();
    let mut rng = Rng::new(1);
    // Every tenth token is special (a document separator).
    let tokens: Vec<u32> = (0..200_000u32)
        .map(|i| if i % 10 == 0 { 0 } else { 4 + i % 96 })
        .collect();
    let m = s.apply(&tokens, &mut Rng::new(5));
    let eligible = tokens.iter().filter(|&&t| t >= 4).count() as f64;
    let n = m.positions.len() as f64;
    assert!(
        (n / eligible - 0.3).abs() < 0.005,
        "chosen {}",
        n / eligible
    );
    assert!(
        (m.masked as f64 / n - 0.8).abs() < 0.01,
        "masked {}",
        m.masked as f64 / n
    );
    assert!((m.randomised as f64 / n - 0.1).abs() < 0.01);
    assert!((m.kept as f64 / n - 0.1).abs() < 0.01);
    assert_eq!(m.masked + m.randomised + m.kept, m.positions.len());
    let chosen: std::collections::HashSet<u32> = m.positions.iter().copied().collect();
    for (i, (&t, &x)) in tokens.iter().zip(&m.inputs).enumerate() {
        if t < 4 {
            assert!(
                !chosen.contains(&(i as u32)),
                "special token {i} was chosen"
            );
        }
        if !chosen.contains(&(i as u32)) {
            assert_eq!(t, x, "unchosen token {i} changed");
        } else {
            assert!(
                x == 3 || x >= 4,
                "a random replacement is never another special"
            );
        }
    }
    for (&p, &l) in m.positions.iter().zip(&m.labels) {
        assert_eq!(tokens[p as usize], l);
    }
    // At least one token is predicted, even in a row that draws none.
    let few = s.apply(&[0, 0, 9, 0], &mut rng);
    assert!(!few.positions.is_empty() && few.positions.iter().all(|&p| p == 2));
}

fn fixture_model() -> ModernBert {
    ModernBert::from_pretrained(&fixture_dir("modernbert"), &device()).unwrap()
}

#[test]
fn sparse_head_equals_the_dense_head_at_the_masked_positions() {
    let dev = device();
    let model = fixture_model();
    let (b, s) = (2, 16);
    let inputs: Vec<u32> = (0..(b * s) as u32).map(|i| 4 + (i * 7) % 90).collect();
    let batch = Batch {
        batch: b,
        seq_len: s,
        inputs: inputs.clone(),
        targets: inputs.clone(),
        positions: (0..b).flat_map(|_| 0..s as u32).collect(),
        segments: Some((0..b * s).map(|i| ((i % s) >= 9) as u32).collect()),
        weights: None,
    };
    let m = spec().apply(&inputs, &mut Rng::new(3));
    let n = m.positions.len();
    assert_eq!(masked_hidden(&model, &batch, &m, &dev).dims(), [n, 64]);
    let (sparse, _) = mlm_loss(&model, &batch, &m, &dev);
    // Dense: the head over every position, then the masked ones picked out.
    let int = |v: &[u32]| {
        let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), &dev)
    };
    let h = model.encode_packed(
        int(&m.inputs),
        int(&batch.positions),
        batch.segments.as_deref().map(int),
    );
    let all = model.mlm_logits(h).reshape([b * s, 96]);
    let at: Vec<i32> = m.positions.iter().map(|&p| p as i32).collect();
    let picked = all.select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(at, [n]), &dev),
    );
    let labels: Vec<i32> = m.labels.iter().map(|&x| x as i32).collect();
    let dense = cross_entropy(
        picked.unsqueeze::<3>(),
        Tensor::<2, Int>::from_data(TensorData::new(labels, [1, n]), &dev),
        None,
    );
    let (a, d) = (values(sparse)[0], values(dense)[0]);
    assert!(
        a.is_finite() && (a - d).abs() < 1e-5,
        "sparse {a} vs dense {d}"
    );
}

#[test]
fn stable_adamw_scales_a_spiking_tensor_down() {
    let dev = device().autodiff();
    let model = ModernBert::from_pretrained(&fixture_dir("modernbert"), &dev).unwrap();
    let cfg = OptimConfig {
        optimizer: OptimizerKind::Stableadamw,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.01,
        ..Default::default()
    };
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(vec![5i32, 9, 11, 20, 7, 3], [1, 6]), &dev);
    let mask = Tensor::<2, Int>::ones([1, 6], &dev);
    let grads_of = |m: &ModernBert| {
        let loss = m.forward(ids.clone(), mask.clone()).powi_scalar(2).mean();
        burn::optim::GradientsParams::from_grads(loss.backward(), m)
    };
    let read = |m: &ModernBert| -> Vec<f64> {
        m.layers[1]
            .wo
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .map(f64::from)
            .collect()
    };
    let mut opt = Optimizer::new(cfg.clone());
    let lr = 1e-3;
    // Step 1 at scale 1, step 2 with gradients 50× larger: a spike.
    let g1 = grads_of(&model);
    let first: Vec<f64> = g1
        .get::<2>(model.layers[1].wo.weight.id)
        .unwrap()
        .into_data()
        .iter::<f32>()
        .map(f64::from)
        .collect();
    let model = opt.step(model, g1, lr, 1.0);
    let p1 = read(&model);
    let g2 = grads_of(&model);
    let second: Vec<f64> = g2
        .get::<2>(model.layers[1].wo.weight.id)
        .unwrap()
        .into_data()
        .iter::<f32>()
        .map(|x| 50.0 * f64::from(x))
        .collect();
    let model = opt.step(model, g2, lr, 50.0);
    let p2 = read(&model);
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let m: Vec<f64> = first
        .iter()
        .zip(&second)
        .map(|(a, g)| b1 * (1.0 - b1) * a + (1.0 - b1) * g)
        .collect();
    let v: Vec<f64> = first
        .iter()
        .zip(&second)
        .map(|(a, g)| b2 * (1.0 - b2) * a * a + (1.0 - b2) * g * g)
        .collect();
    let v_hat: Vec<f64> = v.iter().map(|v| v / (1.0 - b2 * b2)).collect();
    let rms = (second
        .iter()
        .zip(&v_hat)
        .map(|(g, v)| g * g / v.max(cfg.eps * cfg.eps))
        .sum::<f64>()
        / second.len() as f64)
        .sqrt();
    assert!(rms > 1.2, "the spike must trigger the scaling (rms {rms})");
    let lr_t = lr / rms.max(1.0);
    for i in 0..p1.len() {
        let upd = (m[i] / (1.0 - b1 * b1)) / (v_hat[i].sqrt() + cfg.eps);
        let want = p1[i] * (1.0 - lr_t * cfg.weight_decay) - lr_t * upd;
        assert!(
            (p2[i] - want).abs() < 1e-6,
            "element {i}: {} vs {want}",
            p2[i]
        );
    }
}

const MLM: &str = r#"
objective = "mlm"

[run]
name = "mlm"
seed = 2
out_dir = "OUT"

[model]
arch = "modernbert"
vocab_size = 264
hidden_size = 32
intermediate_size = 48
num_hidden_layers = 3
num_attention_heads = 2
global_attn_every_n_layers = 2
local_attention = 8

[mlm]
mask_prob = 0.3

[data]
tokenizer = "byte_level"
seq_len = 32
val_fraction = 0.05
doc_masks = true

[data.generated]
task = "arithmetic"
count = 300
levels = [1, 2]

[train]
steps = 40
batch_size = 8
lr = 3e-3
optimizer = "stableadamw"
beta2 = 0.98
eps = 1e-6
weight_decay = 1e-5
schedule = "wsd"
warmup_steps = 4
log_every = 5
eval_every = 20
eval_batches = 2
save_every = 20
"#;

fn mlm_recipe(
    tag: &str,
    edit: impl Fn(String) -> String,
) -> (std::path::PathBuf, std::path::PathBuf) {
    recipe_from(tag, MLM, "mlm", edit)
}

#[test]
fn mlm_stage_trains_an_encoder_that_transformers_names_load() {
    let (path, run) = mlm_recipe("mlm-stage", |s| s);
    let o = train(&path, &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = losses(&run);
    let vals: Vec<f64> = l.iter().filter_map(|r| r.2).collect();
    assert_eq!(vals.len(), 2);
    assert!(vals[1] < vals[0] - 0.5, "val MLM loss must fall: {vals:?}");
    let first: f64 = l[..5].iter().map(|r| r.1).sum::<f64>() / 5.0;
    assert!(
        first > 5.0,
        "an untrained encoder starts near ln(264): {first}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let rec: Value = serde_json::from_str(metrics.lines().nth(2).unwrap()).unwrap();
    let frac = rec["mlm/predicted_fraction"].as_f64().unwrap();
    assert!(frac > 0.15 && frac < 0.35, "predicted fraction {frac}");
    assert!(metrics.contains("val_mlm_accuracy"));
    // The published model is a transformers ModernBERT with the mask token in its tokenizer.
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "modernbert");
    assert_eq!(config["architectures"][0], "ModernBertForMaskedLM");
    let tok = ember_data::Tokenizer::from_file(&run.join("tokenizer.json")).unwrap();
    assert!(tok.token_id("<|mask|>").is_some());
    ModernBert::from_pretrained(&run, &device()).unwrap();

    // Killed after step 25 (newest checkpoint: 20), then resumed: the same masks, losses
    // and final weights as the uninterrupted run.
    let (cut, cut_run) = mlm_recipe("mlm-cut", |s| s);
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:25")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&cut_run), l, "resumed MLM run diverged");
    let a = std::fs::read(run.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut_run.join("model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after resume");
}

#[test]
fn mlm_stage_rejects_bad_settings_in_one_line() {
    assert_bad_recipes(
        MLM,
        "mlm",
        &[
            (
                "mlm-bad-prob",
                |s| s.replace("mask_prob = 0.3", "mask_prob = 1.5"),
                &["[mlm]", "mask_prob"],
            ),
            (
                "mlm-bad-arch",
                |s| {
                    s.replace("arch = \"modernbert\"", "arch = \"qwen3\"")
                        .replace("global_attn_every_n_layers = 2\nlocal_attention = 8\n", "")
                },
                &["arch = \"modernbert\""],
            ),
            (
                "mlm-bad-key",
                |s| s.replace("local_attention = 8", "local_window = 8"),
                &["[model]", "local_window"],
            ),
        ],
    );
}
