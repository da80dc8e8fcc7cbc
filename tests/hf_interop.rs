//! Checkpoint round trips and the error messages for bad checkpoints.

use std::fs;

use ember_models::hf::{SaveDtype, SaveOptions};
use ember_models::qwen3::Qwen3;

use crate::common::*;

fn logits_of(dir: &std::path::Path) -> Vec<f64> {
    let dev = device();
    let fx = load_fixtures("qwen3");
    let model = Qwen3::from_pretrained(dir, &dev).unwrap();
    values(model.forward(fx["input_ids"].ids(&dev)))
}

#[test]
fn save_round_trip_reproduces_logits_single_and_sharded() {
    let dev = device();
    let reference = logits_of(&fixture_dir("qwen3"));
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &dev).unwrap();
    let dir = temp_dir("roundtrip");
    model
        .save_pretrained(&dir, &SaveOptions::default())
        .unwrap();
    assert!(dir.join("model.safetensors").exists());
    assert_eq!(
        logits_of(&dir),
        reference,
        "single-file round trip changed the logits"
    );

    // Re-saving into the same directory as shards replaces the single file.
    let sharded = SaveOptions {
        dtype: SaveDtype::F32,
        max_shard_bytes: Some(100_000),
    };
    model.save_pretrained(&dir, &sharded).unwrap();
    assert!(dir.join("model.safetensors.index.json").exists());
    assert!(
        !dir.join("model.safetensors").exists(),
        "stale single file left beside shards"
    );
    let shards = fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert!(shards > 1, "expected several shards, got {shards}");
    assert_eq!(
        logits_of(&dir),
        reference,
        "sharded round trip changed the logits"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tied_checkpoint_saves_without_lm_head() {
    let dev = device();
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3_tied"), &dev).unwrap();
    assert!(model.lm_head.is_none());
    let names: Vec<String> = model.weights().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
    // Same tensor set as transformers wrote.
    let bytes = fs::read(fixture_dir("qwen3_tied").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut theirs: Vec<String> = st.names().into_iter().map(String::from).collect();
    let mut ours = names;
    theirs.sort();
    ours.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn bf16_save_is_loadable_and_close() {
    let dev = device();
    let reference = logits_of(&fixture_dir("qwen3"));
    let model = Qwen3::from_pretrained(&fixture_dir("qwen3"), &dev).unwrap();
    let dir = temp_dir("bf16");
    model
        .save_pretrained(
            &dir,
            &SaveOptions {
                dtype: SaveDtype::Bf16,
                max_shard_bytes: None,
            },
        )
        .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let ours = logits_of(&dir);
    let d = max_abs_diff(&ours, &reference);
    // bf16 weights carry ~3 significant digits; logits here are O(1).
    assert!(d > 0.0 && d < 0.05, "bf16 weights changed logits by {d}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Copies the fixture and lets a test damage it.
fn damaged(tag: &str, edit: impl FnOnce(&std::path::Path)) -> std::path::PathBuf {
    let dir = temp_dir(tag);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        fs::copy(fixture_dir("qwen3").join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    format!("{:#}", Qwen3::from_pretrained(dir, &device()).unwrap_err())
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(p, v.to_string()).unwrap();
}

#[test]
fn bad_checkpoints_name_the_field_or_tensor() {
    let d = damaged("shape", |d| {
        edit_config(d, |v| v["intermediate_size"] = 96.into())
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[128, 64]")
            && e.contains("[96, 64]"),
        "{e}"
    );

    let d = damaged("type", |d| {
        edit_config(d, |v| v["model_type"] = "llama".into())
    });
    let e = load_err(&d);
    assert!(
        e.contains("model_type") && e.contains("llama") && e.contains("config.json"),
        "{e}"
    );

    let d = damaged("missing", |d| {
        edit_config(d, |v| v["num_hidden_layers"] = 3.into())
    });
    let e = load_err(&d);
    assert!(e.contains("missing tensor `model.layers.2."), "{e}");

    let d = damaged("extra", |d| {
        edit_config(d, |v| v["num_hidden_layers"] = 1.into())
    });
    let e = load_err(&d);
    assert!(e.contains("unexpected tensor `model.layers.1."), "{e}");

    let d = damaged("field", |d| {
        edit_config(d, |v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        })
    });
    let e = load_err(&d);
    assert!(e.contains("hidden_size"), "{e}");

    let d = damaged("corrupt", |d| {
        fs::write(
            d.join("model.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
        )
        .unwrap()
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    let d = damaged("noweights", |d| {
        fs::remove_file(d.join("model.safetensors")).unwrap()
    });
    let e = load_err(&d);
    assert!(e.contains("neither model.safetensors nor"), "{e}");
}
