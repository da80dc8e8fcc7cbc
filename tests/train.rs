//! `ember train` as a user runs it: exact resume after a kill, atomic checkpoints, one-line
//! errors for bad input, and the pieces of the loop (schedules, optimizer, clipping,
//! accumulation, document masks) against hand computations.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use ember_models::qwen3::{Qwen3, Qwen3Config};
use ember_train::objectives::lm::cross_entropy;
use ember_train::optim::{grad_norm, OptimConfig, OptimizerKind};
use ember_train::schedule::{Schedule, ScheduleKind};
use serde_json::Value;

use crate::cli::{assert_one_line_error, stderr};
use crate::common::*;

pub(crate) const TINY: &str = r#"
[run]
name = "tiny"
seed = 3
out_dir = "OUT"

[model]
arch = "qwen3"
vocab_size = 259
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
max_position_embeddings = 128
tie_word_embeddings = true

[data]
tokenizer = "byte_level"
seq_len = 32
val_fraction = 0.05

[data.generated]
task = "arithmetic"
count = 300
levels = [1, 2, 3]

[train]
steps = 8
batch_size = 4
grad_accum = 2
lr = 1e-2
warmup_steps = 2
log_every = 1
eval_every = 4
eval_batches = 2
save_every = 3
keep_last = 2
"#;

/// Writes the tiny recipe (with `extra` appended) into a fresh directory.
pub(crate) fn recipe(name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let out = dir.join("runs");
    let text = TINY.replace("OUT", out.to_str().unwrap()) + extra;
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    (path, out.join("tiny"))
}

/// Writes `template` as a recipe in a fresh directory (`OUT` replaced by its runs folder,
/// then `edit` applied); returns the recipe and the run directory `runs/<name>`.
pub(crate) fn recipe_from(
    tag: &str,
    template: &str,
    name: &str,
    edit: impl Fn(String) -> String,
) -> (PathBuf, PathBuf) {
    let dir = temp_dir(tag);
    let out = dir.join("runs");
    let path = dir.join("recipe.toml");
    std::fs::write(&path, edit(template.replace("OUT", out.to_str().unwrap()))).unwrap();
    (path, out.join(name))
}

/// A recipe edit and the words its one-line error must contain.
pub(crate) type BadRecipe = (&'static str, fn(String) -> String, &'static [&'static str]);

/// Each edit of `template` makes `ember train` stop with one error line naming the key.
pub(crate) fn assert_bad_recipes(template: &str, name: &str, cases: &[BadRecipe]) {
    for (tag, edit, needles) in cases {
        let (path, _) = recipe_from(tag, template, name, edit);
        assert_one_line_error(&train(&path, &[], &[]), needles);
    }
}

pub(crate) fn ember_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .args(
            ["--device", "cpu"]
                .iter()
                .filter(|_| args[0] != "tokenizer"),
        )
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("ember runs")
}

pub(crate) fn train(recipe: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec!["train", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    ember_env(&args, env)
}

/// (step, loss, val_loss) for every record of a run's metrics.jsonl.
pub(crate) fn losses(run: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        // Records at step 0 hold evaluations before training, not a loss.
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v.get("val_loss").and_then(Value::as_f64),
            )
        })
        .collect()
}

pub(crate) fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn kill_and_resume_reproduces_every_loss_exactly() {
    let (full, full_run) = recipe("train-full", "");
    let o = train(&full, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = losses(&full_run);
    assert_eq!(reference.len(), 8);
    assert!(
        reference[7].1 < reference[0].1,
        "loss did not fall: {reference:?}"
    );
    assert!(full_run.join("curves.svg").is_file());
    assert!(full_run.join("model.safetensors").is_file());
    assert_eq!(checkpoints(&full_run), ["step-00000006", "step-00000008"]);

    // The same run through a captured step (two micro-batches a step, a warm-up, evaluations
    // and checkpoints between replays) takes the same steps: its capture trains nothing.
    let (cap, cap_run) = recipe("train-captured", "");
    let o = train(&cap, &["--set", "train.captured_step=true"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("captured the training step"),
        "{}",
        stderr(&o)
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    let captured = losses(&cap_run);
    assert_eq!(captured.len(), reference.len());
    for (got, want) in captured.iter().zip(&reference) {
        let val = match (got.2, want.2) {
            (Some(a), Some(b)) => close(a, b),
            (a, b) => a == b,
        };
        assert!(
            got.0 == want.0 && close(got.1, want.1) && val,
            "captured {got:?} vs eager {want:?}"
        );
    }
    assert_eq!(checkpoints(&cap_run), checkpoints(&full_run));
    // Killed and resumed, it captures again from the checkpoint and takes the same steps.
    let (cut, cut_run) = recipe("train-captured-cut", "");
    let on = ["--set", "train.captured_step=true"];
    let o = train(&cut, &on, &[("EMBER_FAULT", "abort-after-step:5")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(
        &cut,
        &[&on[..], &["--resume", cut_run.to_str().unwrap()]].concat(),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        losses(&cut_run),
        captured,
        "the resumed captured run diverged"
    );

    // Killed after step 5: the newest checkpoint is step 3, so steps 4 and 5 are redone.
    let (cut, cut_run) = recipe("train-cut", "");
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:5")]);
    assert!(!o.status.success(), "the fault did not fire");
    assert_eq!(checkpoints(&cut_run), ["step-00000003"]);
    // A plain restart refuses to overwrite the run.
    assert_one_line_error(&train(&cut, &[], &[]), &["--resume"]);
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    assert_eq!(
        losses(&cut_run),
        reference,
        "resumed run diverged from the uninterrupted one"
    );
    let a = std::fs::read(full_run.join("model.safetensors")).unwrap();
    let b = std::fs::read(cut_run.join("model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after resume");

    // Resuming a finished run has nothing to do and reports the run's own final loss.
    let o = train(&full, &["--resume", full_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = format!("final train loss {:.4}", reference[7].1);
    assert!(
        stderr(&o).contains(&want),
        "wanted {want:?}: {}",
        stderr(&o)
    );
}

#[test]
fn a_kill_while_checkpointing_leaves_no_partial_checkpoint() {
    let (path, run) = recipe("train-ckpt-kill", "");
    let o = train(&path, &[], &[("EMBER_FAULT", "abort-in-checkpoint:6")]);
    assert!(!o.status.success());
    // Step 6 was being written: only the complete step-3 checkpoint is visible.
    assert_eq!(checkpoints(&run), [".tmp-step-00000006", "step-00000003"]);
    let o = train(&path, &["--resume", run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step-00000003"), "{}", stderr(&o));
    assert_eq!(checkpoints(&run), ["step-00000006", "step-00000008"]);
    // The resumed model loads for generation.
    let g = ember_env(
        &[
            "generate",
            "--model",
            run.to_str().unwrap(),
            "--prompt",
            "What is 2 + 3?",
            "--max-new-tokens",
            "8",
        ],
        &[],
    );
    assert!(g.status.success(), "{}", stderr(&g));
}

/// Bad input: exit 2, one line naming the file (and key), and no checkpoint written.
fn assert_rejected(path: &Path, run: &Path, extra: &[&str], needles: &[&str]) {
    let o = train(path, extra, &[]);
    assert_one_line_error(&o, needles);
    assert!(checkpoints(run).is_empty(), "a checkpoint was written");
}

#[test]
fn malformed_recipes_fail_with_one_line_and_exit_2() {
    let (p, run) = recipe("train-bad-key", "warmup_step = 3\n");
    assert_rejected(&p, &run, &[], &["recipe.toml:", "warmup_step"]);

    let (p, run) = recipe("train-bad-type", "");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("steps = 8", "steps = \"eight\"");
    std::fs::write(&p, text).unwrap();
    assert_rejected(&p, &run, &[], &["recipe.toml:", "invalid type"]);

    let (p, run) = recipe("train-bad-set", "");
    assert_rejected(
        &p,
        &run,
        &["--set", "train.lr=fast"],
        &["--set train.lr=fast", "invalid type"],
    );
    assert_rejected(&p, &run, &["--set", "train.nope=1"], &["nope"]);
    assert_rejected(
        &p,
        &run,
        &[
            "--set",
            "train.captured_step=true",
            "--set",
            "objective=\"rlp\"",
        ],
        &[
            "recipe.toml [train]: `captured_step`",
            "pretrain stage with objective = \"rlp\"",
        ],
    );
}

#[test]
fn missing_and_corrupt_data_fail_with_one_line_and_exit_2() {
    let extra = "\n[[data.sources]]\nformat = \"jsonl\"\npath = \"MISSING.jsonl\"\n";
    let (p, run) = recipe("train-missing-data", extra);
    let text = std::fs::read_to_string(&p).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("MISSING.jsonl"))
        .unwrap()
        + 1;
    let at = format!("recipe.toml:{line}: data.sources[0].path");
    assert_rejected(&p, &run, &[], &[&at, "MISSING.jsonl"]);

    // A Parquet file cut in half.
    let dir = temp_dir("train-truncated-parquet");
    let file = dir.join("corpus.parquet");
    {
        use std::sync::Arc;
        let col: arrow_array::ArrayRef = Arc::new(arrow_array::StringArray::from(
            (0..500)
                .map(|i| format!("document number {i}"))
                .collect::<Vec<_>>(),
        ));
        let batch = arrow_array::RecordBatch::try_from_iter([("text", col)]).unwrap();
        let f = std::fs::File::create(&file).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let extra = format!(
        "\n[[data.sources]]\nformat = \"parquet\"\npath = \"{}\"\n",
        file.display()
    );
    let (p, run) = recipe("train-truncated", &extra);
    assert_rejected(
        &p,
        &run,
        &[],
        &["data.sources[0].path", "corpus.parquet", "Parquet"],
    );
}

#[test]
fn a_checkpoint_of_the_wrong_shape_is_rejected() {
    // A checkpoint with hidden_size 48, offered to a recipe that says 32.
    let dir = temp_dir("train-wrong-shape");
    let mut v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("qwen3").join("config.json")).unwrap(),
    )
    .unwrap();
    v["hidden_size"] = 48.into();
    v["vocab_size"] = 259.into();
    let config = Qwen3Config::from_value(&v, "test").unwrap();
    let ckpt = dir.join("other");
    Qwen3::random(config, 0, &device())
        .unwrap()
        .save_pretrained(&ckpt, &Default::default())
        .unwrap();
    let extra = format!("init_from = \"{}\"\n", ckpt.display());
    let (p, run) = recipe("train-wrong-shape-run", &extra);
    assert_rejected(
        &p,
        &run,
        &[],
        &["model.embed_tokens.weight", "shape", "does not match"],
    );
}

#[test]
fn schedules_warm_up_then_decay_to_their_floor() {
    let s = |kind| Schedule {
        kind,
        lr: 1.0,
        warmup_steps: 10,
        total_steps: 110,
        min_lr_ratio: 0.1,
        decay_fraction: 0.2,
    };
    let cos = s(ScheduleKind::Cosine);
    assert!((cos.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((cos.lr_at(9) - 1.0).abs() < 1e-12);
    assert!(
        (cos.lr_at(60) - 0.55).abs() < 1e-12,
        "half-way is the mean of peak and floor"
    );
    assert!((cos.lr_at(110) - 0.1).abs() < 1e-12);
    let wsd = s(ScheduleKind::Wsd);
    assert_eq!(wsd.lr_at(87), 1.0, "stable until the last 20%");
    assert!(wsd.lr_at(89) < 1.0 && wsd.lr_at(89) > 0.9);
    assert!((wsd.lr_at(109) - 0.1).abs() < 1e-12);
}

pub(crate) fn tiny_model(seed: u64) -> Qwen3 {
    let mut v: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("qwen3").join("config.json")).unwrap(),
    )
    .unwrap();
    v["num_hidden_layers"] = 1.into();
    let config = Qwen3Config::from_value(&v, "test").unwrap();
    Qwen3::random(config, seed, &device().autodiff()).unwrap()
}

pub(crate) fn tokens(rows: &[Vec<i32>], dev: &burn::tensor::Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), dev)
}

fn weights(m: &Qwen3) -> Vec<(String, Vec<f32>)> {
    m.weights()
        .into_iter()
        .map(|(k, d)| (k, d.try_to_vec::<f32>().unwrap()))
        .collect()
}

#[test]
fn adamw_step_matches_the_formula_and_skips_decay_on_norms() {
    use ember_train::optim::Optimizer;
    let dev = device().autodiff();
    let model = tiny_model(1);
    let before = weights(&model);
    let x = tokens(&[vec![1, 5, 9, 2, 7, 3]], &dev);
    let y = tokens(&[vec![5, 9, 2, 7, 3, 4]], &dev);
    let g = cross_entropy(model.forward(x), y, None).backward();
    let grads = burn::optim::GradientsParams::from_grads(g, &model);
    let gq: Vec<f32> = grads
        .get::<2>(model.layers[0].self_attn.q_proj.weight.id)
        .unwrap()
        .into_data()
        .try_to_vec()
        .unwrap();
    let cfg = OptimConfig::default();
    let (lr, scale) = (1e-2, 0.5);
    let mut opt = Optimizer::new(cfg.clone());
    let after = weights(&opt.step(model, grads, lr, scale));
    let find =
        |w: &[(String, Vec<f32>)], k: &str| w.iter().find(|(n, _)| n == k).unwrap().1.clone();
    // First AdamW step: m̂ = g, v̂ = g², so the update is lr·g/(|g|+eps) plus decay.
    let k = "model.layers.0.self_attn.q_proj.weight";
    let (p0, p1) = (find(&before, k), find(&after, k));
    for i in 0..p0.len() {
        let g = (gq[i] * scale as f32) as f64;
        let want = p0[i] as f64 * (1.0 - lr * cfg.weight_decay) - lr * g / (g.abs() + cfg.eps);
        assert!(
            (p1[i] as f64 - want).abs() < 1e-6,
            "element {i}: {} vs {want}",
            p1[i]
        );
    }
    // Norm weights start at 1 and take no decay: |Δ| ≤ lr, and exactly lr·sign(g) here.
    let n0 = find(&before, "model.norm.weight");
    let n1 = find(&after, "model.norm.weight");
    assert!(n0
        .iter()
        .zip(&n1)
        .all(|(a, b)| (a - b).abs() <= 1e-2 + 1e-6));
    assert!(n0.iter().zip(&n1).any(|(a, b)| (a - b).abs() > 5e-3));
}

#[test]
fn global_norm_and_accumulation_match_a_single_large_batch() {
    use ember_train::optim::Optimizer;
    use ember_train::trainer::Trainer;
    let dev = device().autodiff();
    let rows = [vec![1, 5, 9, 2, 7, 3, 8], vec![4, 4, 6, 1, 2, 9, 5]];
    let batch = |r: &[Vec<i32>]| {
        let x: Vec<Vec<i32>> = r.iter().map(|v| v[..6].to_vec()).collect();
        let y: Vec<Vec<i32>> = r.iter().map(|v| v[1..].to_vec()).collect();
        (tokens(&x, &dev), tokens(&y, &dev))
    };
    let schedule = Schedule {
        kind: ScheduleKind::Constant,
        lr: 1e-2,
        warmup_steps: 0,
        total_steps: 1,
        min_lr_ratio: 1.0,
        decay_fraction: 0.0,
    };
    let muon = OptimConfig {
        optimizer: OptimizerKind::Muon,
        ..Default::default()
    };
    for cfg in [OptimConfig::default(), muon] {
        // The global norm is the norm of all gradients together.
        let m = tiny_model(2);
        let (x, y) = batch(&rows);
        let g = cross_entropy(m.forward(x), y, None).backward();
        let grads = burn::optim::GradientsParams::from_grads(g, &m);
        let norm = grad_norm(&m, &grads).unwrap();
        let mut sq = 0.0;
        m.visit(&mut SumSquares {
            grads: &grads,
            total: &mut sq,
        });
        assert!(
            (norm - sq.sqrt()).abs() < 1e-4 * norm,
            "{norm} vs {}",
            sq.sqrt()
        );

        // One batch of two rows == two accumulated micro-batches of one row.
        let mut one = Trainer::new(tiny_model(2), Optimizer::new(cfg.clone()), schedule, 0.05);
        let s1 = one
            .train_step(1, |m, _| {
                let (x, y) = batch(&rows);
                Ok(cross_entropy(m.forward(x), y, None))
            })
            .unwrap();
        let mut two = Trainer::new(tiny_model(2), Optimizer::new(cfg.clone()), schedule, 0.05);
        let s2 = two
            .train_step(2, |m, i| {
                let (x, y) = batch(&rows[i..i + 1]);
                Ok(cross_entropy(m.forward(x), y, None))
            })
            .unwrap();
        assert!(
            (s1.loss - s2.loss).abs() < 1e-5,
            "{} vs {}",
            s1.loss,
            s2.loss
        );
        assert!((s1.grad_norm - s2.grad_norm).abs() < 1e-4 * s1.grad_norm);
        assert!(s1.grad_norm > 0.05, "clipping must be active for this test");
        let (a, b) = (weights(one.model()), weights(two.model()));
        for ((k, va), (_, vb)) in a.iter().zip(&b) {
            let d = va
                .iter()
                .zip(vb)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 2e-5, "{cfg:?} {k}: accumulated update differs by {d}");
        }
    }
}

struct SumSquares<'a> {
    grads: &'a burn::optim::GradientsParams,
    total: &'a mut f64,
}

impl burn::module::ModuleVisitor for SumSquares<'_> {
    fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(p.id) {
            let v: Vec<f32> = g.into_data().try_to_vec().unwrap();
            *self.total += v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        }
    }
}

#[test]
fn document_masks_make_packed_rows_equal_separate_documents() {
    let dev = device();
    let model = tiny_model(4).valid();
    let (a, b) = (vec![3, 8, 1, 0], vec![7, 2, 9, 4, 6]);
    let packed = tokens(&[[a.clone(), b.clone()].concat()], &dev);
    let pos = tokens(&[vec![0, 1, 2, 3, 0, 1, 2, 3, 4]], &dev);
    let seg = tokens(&[vec![0, 0, 0, 0, 1, 1, 1, 1, 1]], &dev);
    let out = model.forward_packed(packed, pos, Some(seg));
    let alone = model.forward(tokens(std::slice::from_ref(&b), &dev));
    let diff = max_abs_diff(&values(out.clone().narrow(1, 4, 5)), &values(alone.clone()));
    assert!(diff < 1e-5, "masked packing leaks across documents: {diff}");
    // Without masks the second document does see the first.
    let unmasked = model.forward(tokens(&[[a, b].concat()], &dev));
    let leak = max_abs_diff(&values(unmasked.narrow(1, 4, 5)), &values(alone));
    assert!(leak > 1e-3, "the test cannot tell masked from unmasked");
}

#[test]
fn every_shipped_recipe_parses_and_validates() {
    use ember_train::recipe::Recipe;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut files = Vec::new();
    for dir in ["pretrain", "sft"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    assert!(files.len() >= 3);
    for f in files {
        let r = Recipe::load(&f).unwrap_or_else(|e| panic!("{e:#}"));
        r.model_spec(&f).unwrap_or_else(|e| panic!("{e:#}"));
        let st = r.single_stage(&f).unwrap_or_else(|e| panic!("{e:#}"));
        ember_train::stages::check_common(&st, &f).unwrap_or_else(|e| panic!("{e:#}"));
    }
    let mut pipelines = vec![root.join("quickstart.toml")];
    for e in std::fs::read_dir(root.join("pipeline")).unwrap() {
        pipelines.push(e.unwrap().path());
    }
    for f in pipelines {
        let r = Recipe::load(&f).unwrap_or_else(|e| panic!("{e:#}"));
        r.model_spec(&f).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(r.stage.len() >= 2, "{}", f.display());
        ember_train::pipeline::check(&r, &f).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn a_diverging_run_stops_with_exit_1_and_keeps_its_last_good_checkpoint() {
    // Eagerly, and through a captured step, which finds the divergence after its update.
    for (tag, captured) in [("train-nan", "false"), ("train-nan-captured", "true")] {
        let (p, run) = recipe(tag, "");
        // An absurd learning rate blows the weights up until the loss is no longer finite.
        let set = format!("train.captured_step={captured}");
        let args = ["--set", "train.lr=1e30", "--set", "train.save_every=1"];
        let o = train(&p, &[&args[..], &["--set", &set]].concat(), &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        let last = e.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: training diverged") && last.contains("last good checkpoint"),
            "{e}"
        );
        let applied = if captured == "true" {
            "applied in memory, not saved"
        } else {
            "not applied"
        };
        assert!(last.contains(applied), "{last}");
        assert!(!e.contains("panicked"), "{e}");
        let kept = checkpoints(&run);
        assert!(
            !kept.is_empty() && kept.iter().all(|c| c.starts_with("step-")),
            "{kept:?}"
        );
        let newest = run.join("checkpoints").join(kept.last().unwrap());
        assert!(last.contains(newest.to_str().unwrap()), "{last}");
        // Every kept checkpoint was written before the bad step: its weights are finite.
        let w = std::fs::read(newest.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&w).unwrap();
        for (name, t) in st.tensors() {
            let finite = t
                .data()
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
            assert!(finite, "{name} holds non-finite values");
        }
    }
}

#[test]
fn tokenizer_training_and_eval_work_from_the_command_line() {
    let (p, run) = recipe("train-eval", "");
    assert!(train(&p, &[], &[]).status.success());
    let data = run.join("data/generated-arithmetic.jsonl");
    let o = ember_env(
        &[
            "eval",
            "--model",
            run.to_str().unwrap(),
            "--task",
            "lm",
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "32",
            "--batch",
            "4",
            "--max-batches",
            "4",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    let final_train = losses(&run).last().unwrap().1;
    assert!(
        loss.is_finite() && (loss - final_train).abs() < 0.5,
        "eval {loss} vs train {final_train}"
    );
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());

    let out = run.join("bpe.json");
    let o = ember_env(
        &[
            "tokenizer",
            "train",
            "--input",
            data.to_str().unwrap(),
            "--vocab-size",
            "400",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tok = ember_data::Tokenizer::from_file(&out).unwrap();
    assert_eq!(tok.vocab_size(), 400);
    let text = "What is 12 + 30?\nAnswer: 42";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    assert!(
        tok.encode(text).unwrap().len() < text.len(),
        "BPE merged nothing"
    );
}

#[test]
fn weighted_cross_entropy_averages_only_the_weighted_targets() {
    use burn::tensor::Distribution;
    let dev = device();
    let logits = Tensor::<3>::random([1, 4, 11], Distribution::Normal(0.0, 2.0), &dev);
    let targets = tokens(&[vec![3, 7, 1, 9]], &dev);
    let w = Tensor::<2>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0, 0.0], [1, 4]), &dev);
    let weighted = values(cross_entropy(logits.clone(), targets.clone(), Some(w)))[0];
    let middle = values(cross_entropy(
        logits.clone().narrow(1, 1, 2),
        targets.clone().narrow(1, 1, 2),
        None,
    ))[0];
    assert!((weighted - middle).abs() < 1e-6, "{weighted} vs {middle}");
    let all = values(cross_entropy(logits, targets, None))[0];
    assert!(
        (all - middle).abs() > 1e-4,
        "the test cannot tell weighted from unweighted"
    );
}

/// The tiny recipe's [run] and [model], then two stages: pretraining on level 1, then on
/// level 3 from the first stage's output.
fn pipeline_recipe(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let out = dir.join("runs");
    let head = TINY
        .split("[data]")
        .next()
        .unwrap()
        .replace("OUT", out.to_str().unwrap());
    let stage = |name: &str, level: u32, steps: u32| {
        format!(
            "\n[[stage]]\nname = \"{name}\"\nkind = \"pretrain\"\n[stage.data]\nseq_len = 32\nval_fraction = 0.05\n\
             [stage.data.generated]\ntask = \"arithmetic\"\ncount = 200\nlevels = [{level}]\n\
             [stage.train]\nsteps = {steps}\nbatch_size = 4\nlr = 1e-2\nlog_every = 1\nsave_every = 2\n"
        )
    };
    let text = head + &stage("easy", 1, 6) + &stage("hard", 3, 4);
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    (path, out.join("tiny"))
}

#[test]
fn a_pipeline_chains_stages_skips_finished_ones_and_resumes_partial_ones() {
    let (p, root) = pipeline_recipe("pipeline");
    let run = |env: &[(&str, &str)]| ember_env(&["pipeline", p.to_str().unwrap()], env);
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (easy, hard) = (losses(&root.join("easy")), losses(&root.join("hard")));
    assert_eq!((easy.len(), hard.len()), (6, 4));
    // The second stage starts from the first one's weights, not from scratch.
    assert!(
        hard[0].1 < easy[0].1 - 0.5,
        "hard started at {} vs easy's first {}",
        hard[0].1,
        easy[0].1
    );
    let report = std::fs::read_to_string(root.join("report.md")).unwrap();
    assert!(
        report.contains("| easy | pretrain | 6 |") && report.contains("| hard | pretrain | 4 |"),
        "{report}"
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), report);

    // Run again: both stages are complete and nothing is retrained.
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("complete, skipping").count(),
        2,
        "{}",
        stderr(&o)
    );
    assert_eq!(losses(&root.join("hard")), hard);

    // Kill the second stage part-way in a fresh run: the rerun resumes it and matches.
    let (p2, root2) = pipeline_recipe("pipeline-cut");
    let o = ember_env(
        &["pipeline", p2.to_str().unwrap()],
        &[("EMBER_FAULT", "abort-after-step:3")],
    );
    assert!(!o.status.success());
    // The fault fires in the first stage that reaches step 3: "easy".
    let o = ember_env(&["pipeline", p2.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stage 1 (easy): resuming"),
        "{}",
        stderr(&o)
    );
    assert_eq!(losses(&root2.join("easy")), easy);
    assert_eq!(losses(&root2.join("hard")), hard);
}

#[test]
fn independent_stages_run_side_by_side_with_the_same_results() {
    // "solo" has a model of its own and "hard" continues "easy", so with two jobs "solo"
    // trains beside "easy"; every stage's losses must equal the one-at-a-time run's.
    let write = |tag: &str| {
        let (path, root) = pipeline_recipe(tag);
        let mut text = std::fs::read_to_string(&path).unwrap();
        let hard = text.find("\n[[stage]]\nname = \"hard\"").unwrap();
        let solo = "\n[[stage]]\nname = \"solo\"\nkind = \"pretrain\"\n[stage.model]\narch = \"qwen3\"\n\
            vocab_size = 259\nhidden_size = 16\nintermediate_size = 32\nnum_hidden_layers = 1\n\
            num_attention_heads = 1\nnum_key_value_heads = 1\nhead_dim = 16\nmax_position_embeddings = 128\n\
            tie_word_embeddings = true\n[stage.data]\nseq_len = 32\nval_fraction = 0.05\n\
            [stage.data.generated]\ntask = \"arithmetic\"\ncount = 200\nlevels = [2]\n\
            [stage.train]\nsteps = 5\nbatch_size = 4\nlr = 1e-2\nlog_every = 1\n";
        text.insert_str(hard, solo);
        // The file ends in hard's [stage.train].
        let text = text + "init_from = \"easy\"\n";
        std::fs::write(&path, text).unwrap();
        (path, root)
    };
    let (p1, root1) = write("pipeline-jobs1");
    let (p2, root2) = write("pipeline-jobs2");
    let o = ember_env(&["pipeline", p1.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ember_env(&["pipeline", p2.to_str().unwrap(), "--jobs", "2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    // Both first stages started before either finished.
    let first_done = err.find("done:").expect("a stage finished");
    assert!(
        err[..first_done].contains("stage 1 (easy): starting")
            && err[..first_done].contains("stage 2 (solo): starting"),
        "{err}"
    );
    for stage in ["easy", "solo", "hard"] {
        let (a, b) = (losses(&root1.join(stage)), losses(&root2.join(stage)));
        assert!(!a.is_empty());
        assert_eq!(a, b, "{stage}: losses differ between one and two jobs");
    }
    // "hard" started from "easy", not from "solo" (whose shape differs) nor from scratch.
    let (easy, hard) = (losses(&root2.join("easy")), losses(&root2.join("hard")));
    assert!(
        hard[0].1 < easy[0].1 - 0.5,
        "{} vs {}",
        hard[0].1,
        easy[0].1
    );
}

/// The captured training step (`ember_train::captured`) against the trainer's eager step on
/// `dev`, from the same initial weights, over three steps of two micro-batches each, with a
/// clip that binds: the same losses and gradient norms (the capture trains nothing), and an
/// evaluation of the captured model between steps (it is lent back to the trainer between
/// replays) that equals the eager model's. Within 1e-4 relative: the captured step forms
/// AdamW's bias corrections and the clip factor on the device in f32, the eager one on the
/// host. Each of AdamW, Muon and StableAdamW. Returns whether the step replayed as a graph
/// (flex has none and re-runs it).
pub(crate) fn check_captured_training(dev: &burn::tensor::Device) -> bool {
    let ad = dev.clone().autodiff();
    let model = || {
        let mut v: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir("qwen3").join("config.json")).unwrap(),
        )
        .unwrap();
        v["num_hidden_layers"] = 2.into();
        let config = Qwen3Config::from_value(&v, "test").unwrap();
        Qwen3::random(config, 3, &ad).unwrap()
    };
    let vocab = model().config.vocab_size;
    [
        OptimizerKind::Adamw,
        OptimizerKind::Muon,
        OptimizerKind::Stableadamw,
    ]
    .into_iter()
    .all(|kind| check_captured(&model, &ad, vocab, kind))
}

/// [`check_captured_training`] for the model `model` makes on the autodiff device `ad` (of
/// `vocab` tokens), trained with `kind`.
pub(crate) fn check_captured<M: ember_train::trainer::NextTokenModel>(
    model: &dyn Fn() -> M,
    ad: &burn::tensor::Device,
    vocab: usize,
    kind: OptimizerKind,
) -> bool {
    use ember_train::optim::Optimizer;
    use ember_train::pretrain::{device_batch_loss, DeviceBatch};
    use ember_train::trainer::{scalar, Trainer};
    let vocab = vocab as i32;
    let batch = |k: i32| {
        let row = |r: i32| {
            (0..9)
                .map(|i| (i * 31 + r * 7 + k * 13) % vocab)
                .collect::<Vec<_>>()
        };
        let rows = [row(0), row(1)];
        let x: Vec<Vec<i32>> = rows.iter().map(|r| r[..8].to_vec()).collect();
        let y: Vec<Vec<i32>> = rows.iter().map(|r| r[1..].to_vec()).collect();
        let positions = vec![(0..8).collect::<Vec<i32>>(); 2];
        DeviceBatch {
            inputs: tokens(&x, ad),
            targets: tokens(&y, ad),
            positions: tokens(&positions, ad),
            segments: None,
            weights: None,
        }
    };
    let (lr, clip) = (1e-2, 0.5);
    let trainer = || {
        let config = OptimConfig {
            optimizer: kind,
            ..Default::default()
        };
        Trainer::new(
            model(),
            Optimizer::new(config),
            Schedule::constant(lr),
            clip,
        )
    };
    let (mut eager, mut captured) = (trainer(), trainer());
    let held_out = batch(99);
    let eval = |m: &M| scalar(device_batch_loss(&m.valid(), &held_out)).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    for step in 0..3 {
        let micro = [batch(2 * step), batch(2 * step + 1)];
        let want = eager
            .train_step(2, |m, i| Ok(device_batch_loss(m, &micro[i])))
            .unwrap();
        assert!(want.grad_norm > clip, "the clip should bind: {want:?}");
        let got = captured
            .train_captured(micro.to_vec(), || {
                Box::new(|m: &M, b: &DeviceBatch| device_batch_loss(m, b))
            })
            .unwrap();
        assert!(
            close(got.loss, want.loss) && close(got.grad_norm, want.grad_norm),
            "{kind:?} step {step}: captured loss {} and norm {} vs eager {} and {}",
            got.loss,
            got.grad_norm,
            want.loss,
            want.grad_norm
        );
        let (a, b) = (eval(captured.model()), eval(eager.model()));
        assert!(
            close(a, b),
            "{kind:?} after step {step}: held-out loss {a} vs eager {b}"
        );
    }
    assert_eq!((captured.step, captured.optimizer.steps), (3, 3));
    captured.replays_graph()
}

#[test]
fn a_captured_training_step_trains_as_the_eager_one() {
    check_captured_training(&device());
}
