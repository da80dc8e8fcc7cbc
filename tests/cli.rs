//! The `ember` binary as a user runs it: outputs against transformers, and one-line errors.

use std::path::Path;
use std::process::{Command, Output};

use safetensors::SafeTensors;

use crate::common::*;

pub fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .args(
            ["--device", "cpu"]
                .iter()
                .filter(|_| !args.contains(&"--device")),
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("ember runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Bad input is exactly one `error:` line and exit code 2, with no panic or backtrace.
pub fn assert_one_line_error(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {e}");
    assert_eq!(
        e.trim_end().lines().count(),
        1,
        "expected one line, got: {e}"
    );
    assert!(e.starts_with("error: ") && !e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

/// `ember forward` on a fixture model directory: the logits' shape and values.
fn forward_cli(model: &str, rows: &[Vec<u32>], mask: &[Vec<u32>]) -> (Vec<usize>, Vec<f64>) {
    let dir = temp_dir(&format!("cli-forward-{model}"));
    let input = serde_json::json!({"input_ids": rows, "attention_mask": mask});
    std::fs::write(dir.join("in.json"), input.to_string()).unwrap();
    let out = dir.join("out.safetensors");
    let o = ember(&[
        "forward",
        "--model",
        &format!("tests/fixtures/{model}"),
        "--input",
        dir.join("in.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    let shape = t.shape().to_vec();
    std::fs::remove_dir_all(dir).unwrap();
    (shape, values)
}

#[test]
fn forward_matches_transformers_logits() {
    let fx = load_fixtures("qwen3");
    let rows = fx["padded.input_ids"].rows();
    let mask = fx["padded.attention_mask"].rows();
    let (shape, ours) = forward_cli("qwen3", &rows, &mask);
    assert_eq!(shape, fx["padded.logits"].shape);
    let v = shape[2];
    let keep: Vec<usize> = (0..mask.len() * mask[0].len())
        .filter(|&i| mask[i / mask[0].len()][i % mask[0].len()] == 1)
        .collect();
    let pick = |x: &[f64]| {
        keep.iter()
            .flat_map(|&i| x[i * v..(i + 1) * v].to_vec())
            .collect::<Vec<_>>()
    };
    assert_close(
        "ember forward",
        &pick(&ours),
        &pick(&fx["padded.logits"].values),
        1e-4,
    );
}

#[test]
fn forward_gives_an_encoders_mlm_logits() {
    let fx = load_fixtures("modernbert");
    let (rows, mask) = (fx["input_ids"].rows(), fx["attention_mask"].rows());
    let (shape, ours) = forward_cli("modernbert", &rows, &mask);
    assert_eq!(shape, fx["logits"].shape);
    // Every position, the padded ones too, as transformers computes them.
    assert_close(
        "ember forward (modernbert)",
        &ours,
        &fx["logits"].values,
        1e-4,
    );
}

#[test]
fn generate_greedy_matches_transformers_generate() {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("qwen3_tied").join("generate.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<&str> = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // The engine the device picks (eager on the CPU), the decode step captured as a graph,
    // and the eager engine asked for by name.
    for graph in [None, Some("--graph"), Some("--eager")] {
        let mut args = vec![
            "generate",
            "--model",
            "tests/fixtures/qwen3_tied",
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend(graph);
        let o = ember(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (r, line) in lines.iter().enumerate() {
            assert_eq!(
                line["prompt_ids"], g["prompt_ids"][r],
                "tokenisation of prompt {r}"
            );
            assert_eq!(
                line["tokens"], g["new_ids"][r],
                "greedy tokens of prompt {r} ({graph:?})"
            );
        }
    }
    let o = ember(&[
        "generate",
        "--model",
        "tests/fixtures/qwen3_tied",
        "--prompt-ids",
        "1,2",
        "--graph",
        "--eager",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--eager"), "{}", stderr(&o));
    // Streaming a single prompt prints the decoded text.
    let o = ember(&[
        "generate",
        "--model",
        "tests/fixtures/qwen3_tied",
        "--prompt",
        prompts[0],
        "--max-new-tokens",
        "12",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end_matches('\n'),
        g["text"][0].as_str().unwrap().replace("<|endoftext|>", "")
    );
}

#[test]
fn quickstart_recipe_runs_and_writes_an_hf_checkpoint() {
    let dir = temp_dir("cli-quickstart");
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml"),
    )
    .unwrap();
    let recipe = recipe.replace(
        "out_dir = \"runs\"",
        &format!("out_dir = {:?}", dir.display().to_string()),
    );
    let path = dir.join("q.toml");
    std::fs::write(&path, recipe).unwrap();
    // A short run of every stage (`stage.N.` overrides): the full quickstart is CI's job.
    let sets = [
        "stage.0.train.steps=6",
        "stage.0.train.eval_every=3",
        "stage.0.data.generated.count=300",
        "stage.0.data.seq_len=64",
        "stage.1.data.seq_len=64",
        "stage.1.data.datasets.general.generated.count=200",
        "stage.1.data.datasets.hard.generated.count=200",
        "stage.1.phase.0.tokens=2048",
        "stage.1.phase.1.tokens=1024",
        "stage.2.train.steps=3",
        "stage.2.data.generated.count=200",
        "stage.2.data.seq_len=128",
        "stage.2.eval.count=4",
        "stage.2.eval.every=0",
        "stage.2.eval.max_new_tokens=16",
        "stage.3.train.steps=2",
        "stage.3.train.batch_size=2",
        "stage.3.rl.group_size=2",
        "stage.3.rl.max_new_tokens=8",
        "stage.3.data.generated.count=20",
        "stage.3.eval.count=4",
        "stage.3.eval.every=0",
        "stage.3.eval.max_new_tokens=16",
        "stage.4.train.steps=4",
        "stage.4.data.generated.count=300",
        "stage.4.data.seq_len=64",
        "stage.5.train.steps=2",
        "stage.5.train.batch_size=2",
        "stage.5.data.generated.count=100",
        "stage.5.data.seq_len=64",
        "stage.5.rlp.group_size=2",
        "stage.5.rlp.thought_tokens=8",
        "stage.6.train.steps=2",
        "stage.6.train.batch_size=2",
        "stage.6.data.generated.count=20",
        "stage.6.distill.bridge_steps=1",
        "stage.6.distill.max_new_tokens=8",
        "stage.6.eval.count=4",
        "stage.6.eval.every=0",
        "stage.6.eval.max_new_tokens=16",
        "generate.max_new_tokens=24",
    ];
    let mut args = vec!["quickstart", path.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let o = ember(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.join("quickstart");
    for stage in [
        "pretrain",
        "cpt",
        "sft",
        "rlvr",
        "student",
        "student-rlp",
        "opd",
    ] {
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "metrics.jsonl",
            "curves.svg",
        ] {
            assert!(run.join(stage).join(f).exists(), "{stage}/{f} missing");
        }
    }
    // 16 rows of 64 tokens a step: the token budgets are 2 and 1 steps.
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("| cpt | cpt | 3 |"), "{report}");
    let rl_row = report
        .lines()
        .find(|l| l.starts_with("| rlvr | rlvr | 2 |"))
        .unwrap_or_else(|| panic!("no rlvr row in {report}"));
    assert!(rl_row.contains(" → "), "no reward first → last: {rl_row}");
    let rlp_row = report
        .lines()
        .find(|l| l.starts_with("| student-rlp | pretrain | 2 |"))
        .unwrap_or_else(|| panic!("no student-rlp row in {report}"));
    assert!(rlp_row.contains(" → "), "no information gain: {rlp_row}");
    let opd_row = report
        .lines()
        .find(|l| l.starts_with("| opd | opd | 2 |"))
        .unwrap_or_else(|| panic!("no opd row in {report}"));
    // Accuracy before, after, and the teacher's: three percentages.
    assert_eq!(opd_row.matches('%').count(), 3, "{opd_row}");
    // stdout: the report, then the prompt and the fine-tuned model's answer.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with(&report), "{out}");
    assert!(
        out[report.len()..].starts_with("What is 27 + 45?\n"),
        "{out}"
    );
    let e = stderr(&o);
    assert!(
        e.contains("unigram entropy")
            && e.contains("held-out task accuracy")
            && e.contains("(teacher ")
            && e.contains("mean information gain")
            && e.contains("generated "),
        "{e}"
    );
    // A list index that does not exist is a one-line error.
    assert_one_line_error(
        &ember(&[
            "quickstart",
            path.to_str().unwrap(),
            "--set",
            "stage.9.train.steps=1",
        ]),
        &["stage.9", "`9`"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// `ember forward` on the untied fixture with `json` as its input file; output `dir/o.st`.
fn forward_json(dir: &Path, json: &str) -> Output {
    std::fs::write(dir.join("in.json"), json).unwrap();
    let (input, out) = (dir.join("in.json"), dir.join("o.st"));
    ember(&[
        "forward",
        "--model",
        "tests/fixtures/qwen3",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

#[test]
fn bad_input_is_one_clear_line() {
    let dir = temp_dir("cli-errors");
    let o = ember(&[
        "generate",
        "--model",
        "/no/such/model",
        "--prompt-ids",
        "1,2",
        "--json",
    ]);
    assert_one_line_error(&o, &["/no/such/model"]);

    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml"),
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        recipe.replace("hidden_size = 128", "hiden_size = 128"),
    )
    .unwrap();
    let o = ember(&["quickstart", bad.to_str().unwrap()]);
    assert_one_line_error(&o, &["bad.toml:", "hiden_size"]);
    std::fs::write(&bad, recipe.replace("seed = 0", "sed = 0")).unwrap();
    let o = ember(&["quickstart", bad.to_str().unwrap()]);
    assert_one_line_error(&o, &["bad.toml:", "sed"]);

    let o = forward_json(&dir, r#"{"input_ids": [[1, 2], [3]]}"#);
    assert_one_line_error(&o, &["in.json", "input_ids", "row 1"]);
    let o = forward_json(&dir, r#"{"input_ids": [[1, 99999]]}"#);
    assert_one_line_error(&o, &["99999", "vocabulary"]);
    assert!(
        !dir.join("o.st").exists(),
        "no output may be left by a failed run"
    );

    // A tokenizer with more tokens than the model can embed is a mismatched pair.
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir("qwen3").join(f), small.join(f)).unwrap();
    }
    let o = ember(&[
        "generate",
        "--model",
        small.to_str().unwrap(),
        "--prompt",
        "hi",
        "--tokenizer",
        "runs/none.json",
    ]);
    assert_one_line_error(&o, &["runs/none.json", "not found"]);

    if !cfg!(feature = "cuda") {
        let o = ember(&[
            "generate",
            "--model",
            "tests/fixtures/qwen3",
            "--prompt",
            "hi",
            "--device",
            "cuda",
        ]);
        assert_one_line_error(&o, &["--device cuda", "without the `cuda` feature"]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
