//! The post-pretraining stages as a user runs them: curriculum CPT (phases, mixture shares,
//! re-warmed schedules, per-source validation, exact mid-phase resume) and SFT (chat data,
//! assistant-only loss, packing isolation, accuracy before and after, bad rows).

use std::path::{Path, PathBuf};

use burn::module::Module;
use ember_data::chat::{ChatTemplate, Conversation, Message, Role};
use ember_data::sft::{Batching, Example, LossAveraging, SftLoader};
use ember_data::Tokenizer;
use serde_json::Value;

use crate::cli::{assert_one_line_error, stderr};
use crate::common::*;
use crate::train::{checkpoints, ember_env, losses, tiny_model, tokens, train, TINY};

/// The tiny recipe's `[run]` and `[model]`, written to `out` (no `[data]`/`[train]`).
fn head(out: &Path) -> String {
    TINY.split("[data]")
        .next()
        .unwrap()
        .replace("OUT", out.to_str().unwrap())
}

fn write_recipe(name: &str, body: impl Fn(&Path) -> String) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let out = dir.join("runs");
    let path = dir.join("recipe.toml");
    std::fs::write(&path, body(&out)).unwrap();
    (path, out.join("tiny"))
}

const CPT: &str = r#"
[data]
seq_len = 32
val_fraction = 0.05
[data.datasets.a.generated]
task = "arithmetic"
count = 200
levels = [1]
[data.datasets.b.generated]
task = "arithmetic"
count = 200
levels = [3]
[data.datasets.c.generated]
task = "arithmetic"
count = 200
levels = [5]

[train]
batch_size = 8
lr = 1e-2
warmup_steps = 2
min_lr_ratio = 0.1
log_every = 1
eval_every = 5
eval_batches = 1
save_every = 5
keep_last = 2

[[phase]]
name = "p1"
steps = 13
mix = { a = 0.6, b = 0.3, c = 0.1 }

[[phase]]
name = "p2"
tokens = 1500               # 5.9 steps of 8 × 32 tokens: rounded up to 6
mix = { c = 0.5, a = 0.5 }  # a is the replay share
lr = 5e-3
warmup_steps = 2
"#;

fn cpt_recipe(name: &str) -> (PathBuf, PathBuf) {
    write_recipe(name, |out| format!("kind = \"cpt\"\n{}{CPT}", head(out)))
}

pub(crate) fn records(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn cpt_phases_switch_track_their_mixtures_and_resume_mid_phase_exactly() {
    let (p, run) = cpt_recipe("cpt-full");
    let o = train(&p, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&run);
    assert_eq!(recs.len(), 19, "13 + 6 steps");
    for r in &recs {
        let step = r["step"].as_u64().unwrap();
        let want = if step <= 13 { "p1" } else { "p2" };
        assert_eq!(r["phase"], want, "step {step}");
    }
    // Realised shares at the end of each phase, within 1% of the weights; tokens add up.
    let share = |r: &Value, s: &str| r[format!("phase_share/{s}")].as_f64().unwrap();
    let toks = |r: &Value, s: &str| r[format!("phase_tokens/{s}")].as_u64().unwrap();
    let (end1, end2) = (&recs[12], &recs[18]);
    for (s, w) in [("a", 0.6), ("b", 0.3), ("c", 0.1)] {
        assert!(close(share(end1, s), w, 0.01), "p1 {s}: {end1}");
    }
    assert_eq!(
        toks(end1, "a") + toks(end1, "b") + toks(end1, "c"),
        13 * 8 * 32
    );
    for (s, w) in [("a", 0.5), ("b", 0.0), ("c", 0.5)] {
        assert!(close(share(end2, s), w, 0.01), "p2 {s}: {end2}");
    }
    assert_eq!(
        toks(end2, "a") + toks(end2, "c"),
        6 * 8 * 32,
        "p2 counts restart"
    );
    // Each phase warms up from its own first step, then decays to its floor.
    let lr = |i: usize| recs[i]["lr"].as_f64().unwrap();
    assert!(close(lr(0), 1e-2 / 2.0, 1e-12) && close(lr(1), 1e-2, 1e-12));
    assert!((3..13).all(|i| lr(i) < lr(i - 1)), "p1 decays");
    assert!(
        lr(12) > 1e-3 && lr(12) < 1.3e-3,
        "p1 ends near its floor: {}",
        lr(12)
    );
    assert!(close(lr(13), 5e-3 / 2.0, 1e-12), "p2 re-warms: {}", lr(13));
    assert!(close(lr(14), 5e-3, 1e-12) && (16..19).all(|i| lr(i) < lr(i - 1)));
    assert!(
        lr(18) > 5e-4 && lr(18) < 1.25e-3,
        "p2 ends near its floor: {}",
        lr(18)
    );
    // Per-source validation loss, and the overall mean of them.
    let ev = &recs[4];
    let per: Vec<f64> = ["a", "b", "c"]
        .iter()
        .map(|s| ev[format!("val_loss/{s}")].as_f64().unwrap())
        .collect();
    assert!(close(
        ev["val_loss"].as_f64().unwrap(),
        per.iter().sum::<f64>() / 3.0,
        1e-9
    ));
    assert!(
        per[0] < per[2],
        "level 1 is easier than level 5 after training mostly on it: {per:?}"
    );
    let text = stderr(&o);
    let line = format!(
        "phase `p1` done: a {} tokens ({:.1}%, weight 60.0%)",
        toks(end1, "a"),
        100.0 * share(end1, "a")
    );
    assert!(text.contains(&line), "{line} not in {text}");

    // Killed at step 12: the newest checkpoint is step 10, in the middle of phase p1; the
    // resumed run crosses into p2 and matches the uninterrupted one loss for loss.
    let (cut, cut_run) = cpt_recipe("cpt-cut");
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:12")]);
    assert!(!o.status.success(), "the fault did not fire");
    assert_eq!(checkpoints(&cut_run), ["step-00000005", "step-00000010"]);
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&cut_run), losses(&run));
    assert_eq!(records(&cut_run).len(), recs.len());
    for (a, b) in records(&cut_run).iter().zip(&recs) {
        for k in [
            "phase",
            "phase_tokens/a",
            "phase_tokens/b",
            "phase_tokens/c",
            "lr",
        ] {
            assert_eq!(a[k], b[k], "{k} at step {}", a["step"]);
        }
    }
}

#[test]
fn cpt_recipe_mistakes_are_one_line_errors() {
    let bad = |name: &str, from: &str, to: &str, needles: &[&str]| {
        let (p, _) = cpt_recipe(name);
        let text = std::fs::read_to_string(&p).unwrap().replacen(from, to, 1);
        std::fs::write(&p, text).unwrap();
        assert_one_line_error(&train(&p, &[], &[]), needles);
    };
    bad(
        "cpt-bad-mix",
        "c = 0.5, a = 0.5",
        "c = 0.5, z = 0.5",
        &["p2", "`z`", "a, b, c"],
    );
    bad(
        "cpt-no-budget",
        "steps = 13\n",
        "",
        &["p1", "`tokens` or `steps`"],
    );
    bad(
        "cpt-steps",
        "batch_size = 8\n",
        "batch_size = 8\nsteps = 10\n",
        &["steps", "phase"],
    );
}

const SFT_TRAIN: &str = r#"
[train]
steps = 6
batch_size = 4
lr = 5e-3
log_every = 1
eval_every = 3
eval_batches = 2
save_every = 3

[eval]
task = "arithmetic"
levels = [1]
count = 6
max_new_tokens = 12
batch_size = 4
"#;

fn sft_recipe(name: &str, chat_file: &Path, on_error: &str) -> (PathBuf, PathBuf) {
    let chat = chat_file.to_str().unwrap().to_string();
    write_recipe(name, move |out| {
        format!(
            "kind = \"sft\"\n{}\n[data]\nseq_len = 64\nval_fraction = 0.1\nbatching = \"pack\"\n\
             loss_averaging = \"per_sequence\"\n[[data.chat]]\npath = \"{chat}\"\non_error = \"{on_error}\"\n\
             [data.generated]\ntask = \"arithmetic\"\ncount = 60\nlevels = [1]\n{SFT_TRAIN}",
            head(out)
        )
    })
}

fn chat_file(name: &str, bad_row: Option<&str>) -> PathBuf {
    let dir = temp_dir(name);
    let f = dir.join("chat.jsonl");
    let mut rows = vec![
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4"}]}"#.to_string(),
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 3 - 1?"}, {"role": "assistant", "content": "3 - 1 = 2\nAnswer: 2"}]}"#.to_string(),
    ];
    if let Some(b) = bad_row {
        rows.push(b.to_string());
    }
    rows.push(r#"{"messages": [{"role": "user", "content": "What is 5 + 1?"}, {"role": "assistant", "content": "Answer: 6"}]}"#.to_string());
    std::fs::write(&f, rows.join("\n") + "\n").unwrap();
    f
}

#[test]
fn sft_stage_trains_evaluates_before_and_after_and_resumes_exactly() {
    let chat = chat_file("sft-data", None);
    let (p, run) = sft_recipe("sft-full", &chat, "fail");
    let o = train(&p, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&run);
    // Accuracy before the first step and after the last, plus every eval step.
    assert_eq!(recs[0]["step"], 0);
    assert!(recs[0].get("loss").is_none() && recs[0]["accuracy"].is_f64());
    let acc_steps: Vec<u64> = recs
        .iter()
        .filter(|r| r["accuracy"].is_f64())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(acc_steps, [0, 6]);
    assert!(recs.iter().any(|r| r["val_loss"].is_f64()));
    let answers = run.join("eval/arithmetic-step-00000006.jsonl");
    let graded: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(graded.len(), 6);
    let correct = graded.iter().filter(|g| g["correct"] == true).count() as f64;
    assert!(close(
        recs.last().unwrap()["accuracy"].as_f64().unwrap(),
        correct / 6.0,
        1e-12
    ));
    assert!(run.join("model.safetensors").is_file());
    // The tokenizer's chat tokens, not fixed ids, drive the template: the published
    // tokenizer still has them.
    let tok = Tokenizer::from_file(&run.join("tokenizer.json")).unwrap();
    ChatTemplate::new(&tok).unwrap();

    // `ember eval --task` grades the same held-out problems from the command line.
    let o = ember_env(
        &[
            "eval",
            "--model",
            run.to_str().unwrap(),
            "--task",
            "arithmetic",
            "--levels",
            "1",
            "--count",
            "6",
            "--seed",
            "3",
            "--max-new-tokens",
            "12",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total"], 6);
    assert_eq!(v["correct"].as_f64().unwrap(), correct);

    // Kill after step 4; the checkpoint at 3 resumes to the same losses.
    let (cut, cut_run) = sft_recipe("sft-cut", &chat, "fail");
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:4")]);
    assert!(!o.status.success());
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&cut_run), losses(&run));
}

#[test]
fn malformed_chat_rows_name_file_and_row_and_fail_or_skip() {
    let bad = r#"{"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "x"}]}"#;
    let chat = chat_file("sft-bad-role", Some(bad));
    let (p, _) = sft_recipe("sft-bad-fail", &chat, "fail");
    let needle = format!("{}:3", chat.display());
    assert_one_line_error(&train(&p, &[], &[]), &[&needle, "narrator"]);
    let missing = r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}"#;
    let chat2 = chat_file("sft-bad-content-data", Some(missing));
    let (p, _) = sft_recipe("sft-bad-content", &chat2, "fail");
    let needle = format!("{}:3", chat2.display());
    assert_one_line_error(&train(&p, &[], &[]), &[&needle, "content"]);
    let (p, run) = sft_recipe("sft-bad-skip", &chat, "skip");
    let o = train(&p, &["--set", "train.steps=1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipped 1 malformed rows"),
        "{}",
        stderr(&o)
    );
    assert!(run.join("model.safetensors").is_file());
}

#[test]
fn packed_sft_rows_give_each_conversation_the_logits_it_has_alone() {
    let tok = Tokenizer::byte_level(&ember_train::pretrain::SPECIALS).unwrap();
    let template = ChatTemplate::new(&tok).unwrap();
    let convs = [
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "1+1?"),
            Message::new(Role::Assistant, "2"),
        ],
        vec![
            Message::new(Role::User, "Name a colour."),
            Message::new(Role::Assistant, "Red."),
        ],
    ];
    let examples: Vec<Example> = convs
        .iter()
        .map(|m| {
            let (ids, mask) = template
                .render(&tok, &Conversation::new(m.clone()))
                .unwrap();
            Example { ids, mask }
        })
        .collect();
    let total: usize = examples.iter().map(|e| e.ids.len()).sum();
    let mut loader = SftLoader::new(
        examples.clone(),
        total + 8,
        1,
        0,
        Batching::Pack,
        LossAveraging::PerToken,
        0,
    )
    .unwrap();
    let b = loader.next_batch();
    let seg = b.segments.clone().unwrap();
    assert!(
        seg.contains(&0) && seg.contains(&1),
        "both packed in one row: {seg:?}"
    );
    let dev = device();
    let model = tiny_model(5).valid();
    let row = |v: &[u32]| tokens(&[v.iter().map(|&x| x as i32).collect()], &dev);
    let packed = model.forward_packed(row(&b.inputs), row(&b.positions), Some(row(&seg)));
    for s in 0..2u32 {
        let idx: Vec<usize> = (0..seg.len()).filter(|&i| seg[i] == s).collect();
        let ids: Vec<u32> = idx.iter().map(|&i| b.inputs[i]).collect();
        let alone = model.forward(row(&ids));
        let start = idx[0];
        let got = values(packed.clone().narrow(1, start, idx.len()));
        let diff = max_abs_diff(&got, &values(alone));
        assert!(diff < 1e-5, "conversation {s} sees its neighbour: {diff}");
        // Loss weights: on assistant tokens (and their <|im_end|>) only.
        let e = examples
            .iter()
            .find(|e| e.ids[..ids.len()] == ids[..])
            .unwrap();
        for (k, &i) in idx.iter().enumerate() {
            // The last token's target is outside its conversation: never trained.
            let trained = e.mask.get(k + 1) == Some(&1);
            assert_eq!(
                b.weights.as_ref().unwrap()[i] > 0.0,
                trained,
                "target {k} of conversation {s}"
            );
        }
    }
}

/// `ember train RECIPE --set kv ...`.
fn train_with(recipe: &Path, sets: &[String]) -> std::process::Output {
    let args: Vec<&str> = sets.iter().flat_map(|kv| ["--set", kv.as_str()]).collect();
    train(recipe, &args, &[])
}

#[test]
fn champ_sft_recipe_runs_with_the_real_qwen3_tokenizer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = root.join("data/downloads/qwen3/tokenizer.json");
    let champ = root.join("data/downloads/champ/sft.jsonl");
    if !tok.is_file() || !champ.is_file() {
        assert!(
            std::env::var("EMBER_REQUIRE_DATA").is_err(),
            "EMBER_REQUIRE_DATA is set but data/fetch qwen3-tokenizer / champ has not run"
        );
        eprintln!("skipped: run data/fetch qwen3-tokenizer and data/fetch champ");
        return;
    }
    let out = temp_dir("champ-sft");
    let recipe = root.join("recipes/sft/champ-qwen3.toml");
    let o = train_with(
        &recipe,
        &[
            format!("run.out_dir={}", out.display()),
            "train.steps=2".into(),
            "data.seq_len=256".into(),
            "train.batch_size=1".into(),
            "train.eval_batches=1".into(),
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    // All 270 problems read, a tenth held out for validation.
    let words: Vec<&str> = e.split_whitespace().collect();
    let (train_n, held) = words
        .windows(3)
        .find(|w| w[1] == "conversations" && w[2].starts_with('('))
        .map(|w| {
            let n: usize = w[0].parse().unwrap();
            let h: usize = w[2].trim_start_matches('(').parse().unwrap();
            (n, h)
        })
        .unwrap_or_else(|| panic!("no conversation count in {e}"));
    assert_eq!(train_n + held, 270, "{e}");
    assert!(held > 10 && held < 45, "about a tenth held out: {held}");
    let run = out.join("champ-sft");
    let recs = records(&run);
    assert_eq!(losses(&run).len(), 2);
    assert!(recs
        .iter()
        .all(|r| r["loss"].as_f64().is_none_or(f64::is_finite)));
    assert!(recs.last().unwrap()["val_loss"].is_f64());
    let saved = Tokenizer::from_file(&run.join("tokenizer.json")).unwrap();
    let real = Tokenizer::from_file(&tok).unwrap();
    assert_eq!(saved.vocab_size(), real.vocab_size());
    let probe = "The answer is \\boxed{239}.";
    assert_eq!(saved.encode(probe).unwrap(), real.encode(probe).unwrap());

    // GRPO from that checkpoint with the math verifier, for two short steps.
    let recipe = root.join("recipes/rlvr/champ-qwen3.toml");
    let o = train_with(
        &recipe,
        &[
            format!("run.out_dir={}", out.display()),
            format!("train.init_from={}", run.display()),
            "train.steps=2".into(),
            "train.batch_size=2".into(),
            "train.grad_accum=2".into(),
            "rl.group_size=2".into(),
            "rl.max_new_tokens=8".into(),
            "rl.rewards.1.max_tokens=8".into(),
            "rl.rewards.1.buffer=4".into(),
        ],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("prompts × 2 samples"), "{e}");
    let recs = records(&out.join("champ-rlvr"));
    assert_eq!(recs.len(), 2);
    for r in &recs {
        // Eight tokens cannot reach an answer: the verifier scores 0, the length penalty < 0.
        assert_eq!(r["reward/math_answer"].as_f64(), Some(0.0), "{r}");
        assert!(r["reward/overlong_penalty"].as_f64().unwrap() <= 0.0, "{r}");
        assert_eq!(r["rollout_accuracy"].as_f64(), Some(0.0), "{r}");
        assert!(r["completions/max_length"].as_u64().unwrap() <= 8);
    }
}

#[test]
fn cpt_starts_from_a_checkpoint_that_transformers_wrote() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
    let (p, run) = write_recipe("cpt-from-hf", |out| {
        format!(
            "kind = \"cpt\"\n[run]\nname = \"tiny\"\nseed = 1\nout_dir = {:?}\n\
             [data]\nseq_len = 32\n[data.datasets.a.generated]\ntask = \"arithmetic\"\ncount = 100\n\
             [train]\nbatch_size = 4\nlr = 1e-3\nlog_every = 1\ninit_from = {:?}\n\
             [[phase]]\nname = \"only\"\nsteps = 3\nmix = {{ a = 1.0 }}\n",
            out.display().to_string(),
            fixture.display().to_string()
        )
    });
    let o = train(&p, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&run).len(), 3);
    // The checkpoint's own tokenizer (with its specials) came along, and the weights kept
    // the checkpoint's shapes.
    let tok = Tokenizer::from_file(&run.join("tokenizer.json")).unwrap();
    let theirs = Tokenizer::from_file(&fixture.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), theirs.vocab_size());
    let cfg = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    for k in ["vocab_size", "hidden_size", "num_hidden_layers", "head_dim"] {
        assert_eq!(cfg(&run)[k], cfg(&fixture)[k], "{k}");
    }
}
