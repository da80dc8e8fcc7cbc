//! The Nemotron-Flash-style stack (DeltaNet, Mamba2, attention with RoPE, SwiGLU FFN, meta
//! tokens, weight normalisation): cached decoding against recomputation, batched left-padded
//! generation against one prompt at a time, the captured decode step against the eager one,
//! HF-layout save and load, the normalisation after a step, `ember train` on a hybrid
//! recipe, each document of a packed row against itself alone, and a hybrid through
//! pretraining, phased CPT, packed SFT and RLVR in one pipeline.

use burn::tensor::{Int, Tensor, TensorData};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_models::hybrid::stack::{HybridConfig, HybridLM};

use crate::common::*;
use crate::qwen3_generate::graph_and_eager;
use crate::train::{assert_bad_recipes, losses, recipe_from, train};

pub(crate) fn flash_config(meta: usize, weight_norm: bool) -> HybridConfig {
    let v = serde_json::json!({
        "model_type": "nemotron_flash", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "pattern": "D F GDN F M2 F A F",
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "mamba_chunk_size": 4,
        "linear_num_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_chunk_size": 4, "linear_num_key_heads": 1, "linear_num_value_heads": 2,
        "num_memory_tokens": meta, "weight_normalization": weight_norm,
        "initializer_range": 0.2,
    });
    HybridConfig::from_value(&v, "test").unwrap()
}

fn ids(rows: &[Vec<i64>]) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), &device())
}

#[test]
fn flash_cached_decoding_equals_recomputation() {
    let dev = device();
    let model = HybridLM::random(flash_config(3, false), 5, &dev).unwrap();
    let rows: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..13).map(|j| (7 * j + 3 * r + 1) % 64).collect())
        .collect();
    let full = values(model.forward(ids(&rows), None).narrow(1, 10, 3));
    let mut cache = model.new_cache(2, 13, &dev);
    let prefix: Vec<Vec<i64>> = rows.iter().map(|r| r[..10].to_vec()).collect();
    let mut got = vec![model
        .forward(ids(&prefix), Some(&mut cache))
        .narrow(1, 9, 1)];
    for j in 10..12 {
        let col: Vec<Vec<i64>> = rows.iter().map(|r| vec![r[j]]).collect();
        got.push(model.forward(ids(&col), Some(&mut cache)));
    }
    // Logits at positions 9, 10, 11 predict tokens 10..12; compare with the full pass.
    let full9 = values(model.forward(ids(&rows), None).narrow(1, 9, 3));
    assert_close(
        "cached vs recomputed",
        &values(Tensor::cat(got, 1)),
        &full9,
        1e-4,
    );
    assert_eq!(full.len(), full9.len());
}

#[test]
fn flash_batched_left_padded_generation_equals_one_prompt_at_a_time() {
    let dev = device();
    let model = HybridLM::random(flash_config(3, false), 9, &dev).unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        (0..11).map(|j| (5 * j + 2) % 64).collect(),
        (0..4).map(|j| (3 * j + 1) % 64).collect(),
        (0..7).map(|j| (11 * j + 6) % 64).collect(),
    ];
    let opts = GenerateOptions {
        max_new_tokens: vec![6],
        eos_ids: vec![],
        pad_id: 0,
        sampling: Sampling::default(),
    };
    let batched = generate(&model, &prompts, &opts, &mut Hooks::default()).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = generate(
            &model,
            std::slice::from_ref(p),
            &opts,
            &mut Hooks::default(),
        )
        .unwrap();
        assert_eq!(got.tokens, alone[0].tokens, "prompt of {} tokens", p.len());
        for (a, b) in got.logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "log-probs {a} vs {b}");
        }
    }
}

/// The captured decode step (`decode_graph`) of hybrids with and without meta tokens, over
/// left-padded prompts of three lengths, against the eager engine: the same tokens and
/// endings, log-probs within 1e-4, greedily under per-row budgets and with seeded sampling.
/// Returns whether the step replayed as a graph (flex re-runs it; wgpu records one), which
/// is only right if every recurrent state and KV column is written in its own buffer.
pub(crate) fn check_hybrid_graph_decode(dev: &burn::tensor::Device) -> bool {
    let prompts: Vec<Vec<u32>> = vec![
        (0..9).map(|j| (5 * j + 2) % 64).collect(),
        (0..3).map(|j| (3 * j + 1) % 64).collect(),
        (0..6).map(|j| (11 * j + 6) % 64).collect(),
    ];
    let mut replayed = true;
    for meta in [3, 0] {
        let model = HybridLM::random(flash_config(meta, false), 9, dev).unwrap();
        let mut both = |max_new_tokens: Vec<usize>, sampling: Sampling| {
            let o = GenerateOptions {
                max_new_tokens,
                eos_ids: vec![],
                pad_id: 0,
                sampling,
            };
            let (graph, replayed_here) =
                graph_and_eager(&model, &prompts, &o, &format!("meta {meta}"));
            replayed &= replayed_here;
            graph
        };
        let greedy = both(vec![7, 2, 5], Sampling::default());
        assert_eq!(greedy[1].tokens.len(), 2);
        let sampling = Sampling {
            temperature: 1.2,
            top_k: 0,
            top_p: 0.9,
            seed: 3,
        };
        let sampled = both(vec![7], sampling);
        assert_ne!(
            sampled[0].tokens[..5],
            greedy[0].tokens[..5],
            "meta {meta}: sampled greedily"
        );
    }
    replayed
}

#[test]
fn hybrid_graph_decoding_matches_the_eager_engine() {
    check_hybrid_graph_decode(&device());
}

#[test]
fn flash_saves_what_it_loads() {
    let dev = device();
    let model = HybridLM::random(flash_config(2, false), 3, &dev).unwrap();
    let dir = temp_dir("flash-save");
    model
        .save_pretrained(&dir, &ember_models::hf::SaveOptions::default())
        .unwrap();
    let again = HybridLM::from_pretrained(&dir, &dev).unwrap();
    assert_eq!(again.config.layers, model.config.layers);
    let rows = vec![(0..9).map(|j| j * 5 % 64).collect::<Vec<i64>>()];
    assert_eq!(
        values(model.forward(ids(&rows), None)),
        values(again.forward(ids(&rows), None))
    );
}

#[test]
fn weight_normalization_leaves_unit_rows_and_columns_after_a_step() {
    use ember_train::optim::{OptimConfig, Optimizer};
    use ember_train::schedule::Schedule;
    use ember_train::trainer::Trainer;
    let dev = device().autodiff();
    let model = ember_models::hybrid::weight_norm::normalize(
        HybridLM::random(flash_config(0, true), 1, &dev).unwrap(),
    );
    let optim = OptimConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, Optimizer::new(optim), Schedule::constant(1e-2), 0.0);
    let x =
        Tensor::<2, Int>::from_data(TensorData::new((0..16).collect::<Vec<i64>>(), [2, 8]), &dev);
    let embed_before = values(trainer.model().embeddings.val());
    trainer
        .train_step(1, |m, _| {
            Ok(m.forward(x.clone(), None).powi_scalar(2).mean())
        })
        .unwrap();
    let m = trainer.model();
    let norms = |w: Tensor<2>, axis: usize| values(w.square().sum_dim(axis).sqrt());
    use ember_models::hybrid::stack::Mixer;
    let mut checked = 0;
    for block in &m.layers {
        match &block.mixer {
            Mixer::DeltaNet(d) => {
                for n in norms(d.q_proj.weight.val(), 1) {
                    assert!((n - 1.0).abs() < 1e-4, "q_proj row norm {n}");
                }
                for n in norms(d.o_proj.weight.val(), 0) {
                    assert!((n - 1.0).abs() < 1e-4, "o_proj column norm {n}");
                }
                checked += 1;
            }
            Mixer::Ffn(f) => {
                for n in norms(f.up_proj.weight.val(), 1) {
                    assert!((n - 1.0).abs() < 1e-4, "up_proj row norm {n}");
                }
                for n in norms(f.down_proj.weight.val(), 0) {
                    assert!((n - 1.0).abs() < 1e-4, "down_proj column norm {n}");
                }
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(checked >= 2);
    // The step moved the embeddings, which are not normalised.
    let after = values(m.embeddings.val());
    assert_ne!(after, embed_before);
    let row = norms(m.embeddings.val(), 1);
    assert!(row.iter().any(|n| (n - 1.0).abs() > 0.05));
}

const FLASH: &str = r#"
[run]
name = "flash"
seed = 4
out_dir = "OUT"

[model]
arch = "nemotron_flash"
vocab_size = 259
hidden_size = 32
intermediate_size = 64
pattern = "D F GDN F M2 F A F"
linear_num_key_heads = 1
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 8
mamba_num_heads = 4
mamba_head_dim = 16
ssm_state_size = 8
mamba_chunk_size = 8
linear_num_heads = 2
linear_key_head_dim = 16
linear_value_head_dim = 16
linear_chunk_size = 8
num_memory_tokens = 4
weight_normalization = true

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
steps = 30
batch_size = 8
lr = 1e-2
weight_decay = 0.0
warmup_steps = 3
log_every = 5
eval_every = 15
eval_batches = 2
save_every = 10
"#;

pub(crate) fn flash_recipe(
    tag: &str,
    edit: impl Fn(String) -> String,
) -> (std::path::PathBuf, std::path::PathBuf) {
    recipe_from(tag, FLASH, "flash", edit)
}

#[test]
fn flash_pretraining_lowers_the_loss_and_resumes_exactly() {
    let (path, run) = flash_recipe("flash-train", |s| s);
    let o = train(&path, &[], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = losses(&run);
    let vals: Vec<f64> = l.iter().filter_map(|r| r.2).collect();
    assert_eq!(vals.len(), 2);
    let first: f64 = l[..3].iter().map(|r| r.1).sum::<f64>() / 3.0;
    assert!(first > 4.0, "starts near ln(259): {first}");
    assert!(
        vals[1] < first - 1.5,
        "val loss {vals:?} against a start of {first}"
    );
    let model = HybridLM::from_pretrained(&run, &device()).unwrap();
    assert_eq!(model.config.memory_tokens, 4);

    let (cut, cut_run) = flash_recipe("flash-cut", |s| s);
    let o = train(&cut, &[], &[("EMBER_FAULT", "abort-after-step:15")]);
    assert!(!o.status.success(), "the fault did not fire");
    let o = train(&cut, &["--resume", cut_run.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(losses(&cut_run), l, "resumed hybrid run diverged");
}

#[test]
fn flash_recipe_mistakes_are_one_line_errors() {
    assert_bad_recipes(
        FLASH,
        "flash",
        &[
            (
                "flash-docmask-captured",
                |s| s.replace("[train]\n", "[train]\ncaptured_step = true\n"),
                &["captured_step", "meta tokens", "doc_masks"],
            ),
            (
                "flash-decay",
                |s| s.replace("weight_decay = 0.0", "weight_decay = 0.1"),
                &["weight_decay", "weight_normalization"],
            ),
            (
                "flash-layer",
                |s| s.replace("D F GDN F M2 F A F", "D F M3 F"),
                &["M3"],
            ),
            (
                "flash-gdn-heads",
                |s| s.replace("linear_num_key_heads = 1", "linear_num_key_heads = 3"),
                &["linear_num_value_heads", "linear_num_key_heads"],
            ),
            (
                "flash-mlm",
                |s| format!("objective = \"mlm\"\n{s}"),
                &["mlm", "modernbert"],
            ),
        ],
    );
}

/// After FLASH's pretraining: a CPT stage over two phases, a packed SFT stage with a task
/// evaluation and an RLVR stage with a KL to the SFT model, each starting from the stage
/// before it.
const FLASH_LATER_STAGES: &str = r#"
[[stage]]
name = "cpt"
kind = "cpt"
[stage.data]
seq_len = 32
val_fraction = 0.1
doc_masks = true
[stage.data.datasets.easy.generated]
task = "arithmetic"
count = 200
levels = [1]
[stage.data.datasets.hard.generated]
task = "arithmetic"
count = 300
levels = [3]
[stage.train]
batch_size = 8
lr = 5e-3
weight_decay = 0.0
warmup_steps = 2
log_every = 1
eval_every = 6
eval_batches = 1
save_every = 6
[[stage.phase]]
name = "easy-first"
steps = 6
mix = { easy = 0.75, hard = 0.25 }
[[stage.phase]]
name = "hard-first"
steps = 6
mix = { easy = 0.25, hard = 0.75 }

[[stage]]
name = "sft"
kind = "sft"
[stage.data]
seq_len = 64
val_fraction = 0.1
batching = "pack"
[stage.data.generated]
task = "arithmetic"
count = 200
levels = [1]
[stage.train]
steps = 20
batch_size = 8
lr = 5e-3
weight_decay = 0.0
warmup_steps = 2
log_every = 1
eval_every = 10
eval_batches = 2
save_every = 10
[stage.eval]
task = "arithmetic"
count = 8
levels = [1]
every = 10
max_new_tokens = 8
batch_size = 8

[[stage]]
name = "rlvr"
kind = "rlvr"
[stage.data]
seq_len = 64
[stage.data.generated]
task = "arithmetic"
count = 100
levels = [1]
[stage.train]
steps = 3
batch_size = 4
lr = 1e-3
schedule = "constant"
warmup_steps = 0
weight_decay = 0.0
log_every = 1
save_every = 3
[stage.rl]
group_size = 4
max_new_tokens = 8
temperature = 1.0
beta = 0.05
dynamic_sampling = false
[[stage.rl.rewards]]
kind = "math_answer"
"#;

/// FLASH's pretraining as the first `[[stage]]` of a pipeline, then FLASH_LATER_STAGES.
fn flash_pipeline(s: String) -> String {
    let (head, rest) = s.split_once("[data]").unwrap();
    let (data, train) = rest.split_once("[train]").unwrap();
    let data = data.replace("[data.generated]", "[stage.data.generated]");
    format!(
        "{head}[[stage]]\nname = \"pre\"\nkind = \"pretrain\"\n[stage.data]{data}[stage.train]{train}{FLASH_LATER_STAGES}"
    )
}

fn metric(records: &[serde_json::Value], key: &str) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?)))
        .collect()
}

#[test]
fn a_hybrid_pretrains_continues_in_phases_fine_tunes_and_learns_from_rewards_in_one_pipeline() {
    let (path, _) = flash_recipe("flash-pipeline", flash_pipeline);
    let root = path.parent().unwrap().join("runs").join("flash");
    let o = crate::train::ember_env(&["pipeline", path.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pre_val = metric(&crate::stages::records(&root.join("pre")), "val_loss");

    // CPT starts where pretraining ended, and both phases train.
    let cpt = crate::stages::records(&root.join("cpt"));
    let cpt_loss = metric(&cpt, "loss");
    assert_eq!(cpt_loss.len(), 12);
    let phases: Vec<&str> = cpt.iter().filter_map(|r| r["phase"].as_str()).collect();
    assert_eq!(phases.first(), Some(&"easy-first"));
    assert_eq!(phases.last(), Some(&"hard-first"));
    let first_cpt = cpt_loss[0].1;
    assert!(
        first_cpt < pre_val[0].1,
        "CPT's first loss {first_cpt} should start below the untrained model's {pre_val:?}"
    );

    // SFT: held-out loss falls; the task is scored before the first step and after the last.
    let sft = crate::stages::records(&root.join("sft"));
    let sft_val = metric(&sft, "val_loss");
    assert_eq!(sft_val.iter().map(|v| v.0).collect::<Vec<_>>(), [10, 20]);
    let sft_loss = metric(&sft, "loss");
    assert!(
        sft_val[1].1 < sft_val[0].1 && sft_loss[19].1 < sft_loss[0].1 - 0.3,
        "SFT losses {sft_loss:?}, held out {sft_val:?}"
    );
    let acc = metric(&sft, "accuracy");
    assert_eq!(acc.iter().map(|a| a.0).collect::<Vec<_>>(), [0, 10, 20]);
    assert!(root
        .join("sft/eval/arithmetic-step-00000020.jsonl")
        .is_file());

    // The result is a hybrid checkpoint that knows its end-of-text token.
    let model = HybridLM::from_pretrained(&root.join("sft"), &device()).unwrap();
    assert_eq!(model.config.memory_tokens, 4);
    assert_eq!(model.eos_ids(), [256]);
    let report = std::fs::read_to_string(root.join("report.md")).unwrap();
    assert_eq!(report.matches("| trained |").count(), 4, "{report}");

    // RLVR samples through the decoding cache (left-padded prompts, recurrent states) and
    // trains on right-padded rows through the chunked forms: with one update per rollout
    // the two must give the same log-probs. The KL to the SFT model starts at zero.
    let rl = crate::stages::records(&root.join("rlvr"));
    assert_eq!(rl.len(), 3, "{rl:?}");
    for r in &rl {
        assert!(r["reward"].is_number(), "{r}");
        let diff = r["rollout/logprob_diff"].as_f64().unwrap();
        assert!(
            diff < 1e-4,
            "log-probs differ from the sampler's by {diff}: {r}"
        );
    }
    assert!(rl[0]["kl"].as_f64().unwrap().abs() < 1e-6, "{}", rl[0]);
    assert!(rl[2]["kl"].as_f64().unwrap() > 0.0, "{}", rl[2]);
    let rl_model = HybridLM::from_pretrained(&root.join("rlvr"), &device()).unwrap();
    assert_eq!(rl_model.eos_ids(), [256]);

    // `ember eval` on the saved model answers the stage's last evaluation word for word.
    let answers = root.join("answers.jsonl");
    let sft_dir = root.join("sft");
    let o = crate::train::ember_env(
        &[
            "eval",
            "--model",
            sft_dir.to_str().unwrap(),
            "--task",
            "arithmetic",
            "--seed",
            "4",
            "--count",
            "8",
            "--levels",
            "1",
            "--max-new-tokens",
            "8",
            "--answers",
            answers.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let completions = |f: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["completion"].to_string()
            })
            .collect()
    };
    let staged = completions(&root.join("sft/eval/arithmetic-step-00000020.jsonl"));
    assert_eq!(staged.len(), 8);
    assert_eq!(completions(&answers), staged);
    // The answers tell the models apart: the CPT model's, before SFT, were different.
    assert_ne!(
        completions(&root.join("sft/eval/arithmetic-step-00000000.jsonl")),
        staged
    );
}

/// A hybrid trains on padded SFT rows as if each conversation were alone: the padding
/// follows it, and nothing in the stack (meta tokens, chunked scans, convolutions) lets a
/// later token reach an earlier position.
#[test]
fn a_hybrid_reads_a_right_padded_row_as_its_conversation_alone() {
    use ember_train::trainer::NextTokenModel;
    let dev = device();
    let model = HybridLM::random(flash_config(3, false), 7, &dev).unwrap();
    let lens = [10usize, 6];
    let width = 16;
    let convs: Vec<Vec<i64>> = lens
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            (0..n as i64)
                .map(|j| (5 * j + 11 * r as i64 + 2) % 64)
                .collect()
        })
        .collect();
    let padded: Vec<Vec<i64>> = convs
        .iter()
        .map(|c| {
            let mut row = c.clone();
            row.resize(width, 63);
            row
        })
        .collect();
    let positions = ids(&vec![(0..width as i64).collect::<Vec<_>>(); 2]);
    let logits = model.packed_logits(ids(&padded), positions, None);
    for (r, conv) in convs.iter().enumerate() {
        let n = conv.len();
        let alone = model.packed_logits(
            ids(std::slice::from_ref(conv)),
            ids(&[(0..n as i64).collect()]),
            None,
        );
        let got = logits.clone().narrow(0, r, 1).narrow(1, 0, n);
        assert_close(
            &format!("row {r} padded vs alone"),
            &values(got),
            &values(alone),
            1e-5,
        );
    }
}

/// A packed row reads every document as if it were alone: attention, RoPE positions, the
/// recurrent layers' states and convolutions, and (with meta tokens) its own meta tokens.
/// Every mixer kind is there (DeltaNet, Gated DeltaNet, Mamba2, attention, FFN). Documents
/// end inside chunks and across them (the scans' chunks are 4 tokens), and the two
/// rows hold different numbers of documents (so with meta tokens their layouts differ).
#[test]
fn a_hybrid_reads_each_document_of_a_packed_row_as_if_alone() {
    use ember_train::trainer::NextTokenModel;
    let dev = device();
    let docs: [&[usize]; 2] = [&[5, 1, 7, 3], &[9, 7]];
    let width = 16;
    let mut rows = vec![];
    let (mut positions, mut segments) = (vec![], vec![]);
    for (r, lens) in docs.iter().enumerate() {
        let (mut row, mut pos, mut seg) = (vec![], vec![], vec![]);
        for (d, &n) in lens.iter().enumerate() {
            let doc: Vec<i64> = (0..n as i64)
                .map(|j| (7 * j + 13 * d as i64 + 5 * r as i64 + 1) % 64)
                .collect();
            row.extend(doc);
            pos.extend(0..n as i64);
            seg.extend(std::iter::repeat_n(d as i64, n));
        }
        assert_eq!(row.len(), width);
        rows.push(row);
        positions.push(pos);
        segments.push(seg);
    }
    for meta in [0, 3] {
        let model = HybridLM::random(flash_config(meta, false), 7, &dev).unwrap();
        let packed = model.packed_logits(ids(&rows), ids(&positions), Some(ids(&segments)));
        let whole = model.packed_logits(ids(&rows), ids(&positions), None);
        for (r, lens) in docs.iter().enumerate() {
            let mut at = 0;
            for (d, &n) in lens.iter().enumerate() {
                let doc = rows[r][at..at + n].to_vec();
                let alone = model.packed_logits(ids(&[doc]), ids(&[(0..n as i64).collect()]), None);
                let got = packed.clone().narrow(0, r, 1).narrow(1, at, n);
                let what = format!("meta {meta}, row {r}, document {d}");
                // Float noise: the same document gets different chunk and attention-block
                // alignments alone and in the row. The first document of a row, which
                // neither reads nor is read differently, already differs by up to 8e-6
                // through the 8 layers; a missed boundary differs by 0.18 or more.
                assert_close(&what, &values(got), &values(alone.clone()), 4e-5);
                // Without the documents every later one would read its predecessors.
                if d > 0 {
                    let read = values(whole.clone().narrow(0, r, 1).narrow(1, at, n));
                    let gap = max_abs_diff(&read, &values(alone));
                    assert!(
                        gap > 1e-2,
                        "{what}: the whole row reads it as alone too ({gap})"
                    );
                }
                at += n;
            }
        }
    }
}

/// A Nemotron-Flash hybrid (memory tokens, every mixer, weight normalisation after each
/// step) through a captured step against the eager trainer on `dev`; whether it replayed.
pub(crate) fn check_captured_hybrid(dev: &burn::tensor::Device) -> bool {
    let ad = dev.clone().autodiff();
    let model = || {
        ember_models::hybrid::weight_norm::normalize(
            HybridLM::random(flash_config(2, true), 1, &ad).unwrap(),
        )
    };
    crate::train::check_captured(&model, &ad, 64, ember_train::optim::OptimizerKind::Adamw)
}

#[test]
fn a_captured_step_trains_a_hybrid_as_the_eager_one() {
    check_captured_hybrid(&device());
}

/// From 256 rows DeltaNet runs q, k and v as one GEMM over their stacked weights; rows are
/// independent, so two rows together (320 rows: stacked) equal each alone (160: separate).
#[test]
fn deltanet_stacks_its_projections_without_changing_its_output() {
    use ember_models::hybrid::stack::Mixer;
    let dev = device();
    let model = HybridLM::random(flash_config(0, false), 4, &dev).unwrap();
    let Mixer::DeltaNet(net) = &model.layers[0].mixer else {
        panic!("layer 0 of flash_config is a DeltaNet")
    };
    let x = Tensor::<3>::random(
        [2, 160, 32],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &dev,
    );
    let both = values(net.forward(x.clone(), None, None));
    let alone: Vec<f64> = (0..2)
        .flat_map(|r| values(net.forward(x.clone().narrow(0, r, 1), None, None)))
        .collect();
    assert_close("stacked vs separate projections", &both, &alone, 1e-5);
}
