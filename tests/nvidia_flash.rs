//! NVIDIA's released Nemotron-Flash layout (`NemotronFlashForCausalLM`): a checkpoint written
//! by NVIDIA's remote code (run on CPU by `tests/fixtures/gen_nvidia_flash.py`) loads and
//! gives its hidden states and logits; a config in NVIDIA's keys builds the hybrid stack,
//! saves and loads NVIDIA's tensor names and shapes, divides the logits by the head rows'
//! norms, decodes as it recomputes, and trains from a recipe. Bad configs are one-line
//! errors.

use burn::tensor::{Int, Tensor, TensorData};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_models::hybrid::stack::{HybridConfig, HybridLM, Layout};
use serde_json::{json, Value};

use crate::common::*;
use crate::qwen3_generate::graph_and_eager;
use crate::stages::records;
use crate::train::{recipe_from, train};

/// A tiny model in NVIDIA's keys: 64 wide, D F M2 F A F as six decoder layers, 2 meta tokens.
fn nvidia() -> Value {
    json!({
        "model_type": "nemotron_flash", "architectures": ["NemotronFlashForCausalLM"],
        "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 6,
        "layer_types": ["deltanet", "f", "m2", "f", "a", "f"],
        "intermediate_size": 0, "ffn_expand_ratio": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "attn_hidden_size": -1, "kq_head_dim": -1, "v_head_dim": -1,
        "kq_norm": "rms", "rope": true, "rope_theta": 10000.0,
        "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba2_headdim": 16,
        "num_memory_tokens": 2, "tie_word_embeddings": true, "rms_norm_eps": 1e-6,
        "mamba_chunk_size": 4, "linear_chunk_size": 4, "initializer_range": 0.2,
    })
}

fn build(v: &Value) -> HybridLM {
    HybridLM::random(HybridConfig::from_value(v, "test").unwrap(), 5, &device()).unwrap()
}

fn ids(rows: &[Vec<i64>]) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [b, s]), &device())
}

/// Every tensor name and shape of a saved checkpoint.
fn tensors(dir: &std::path::Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out: Vec<(String, Vec<usize>)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().unwrap();
            (
                k.clone(),
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The remote code's own checkpoints and their outputs over 2 × 40 tokens: every layer's
/// input and the final norm's output at the tokens' positions (the reference also lists the
/// memory positions first), and the logits. `nvidia_flash`: DeltaNet, Mamba2, attention with
/// QK-norm and RoPE, SwiGLU `f` layers, 2 memory tokens, tied head. `nvidia_flash_ffn`: an
/// FFN inside every mixer layer, NTK-scaled RoPE, GQA 4:1, 3 memory tokens, untied head.
#[test]
fn nvidia_checkpoints_match_the_remote_code() {
    for name in ["nvidia_flash", "nvidia_flash_ffn"] {
        let fx = load_fixtures(name);
        let dev = device();
        let model = HybridLM::from_pretrained(&fixture_dir(name), &dev).unwrap();
        let ids = fx["input_ids"].ids(&dev);
        let [b, s] = ids.dims();
        let layers = fx
            .keys()
            .filter(|k| k.starts_with("hidden_states."))
            .count();
        // NVIDIA lists each decoder layer's input; a layer with its own FFN is two blocks.
        let blocks: Vec<usize> = match &model.config.layout {
            Layout::Nvidia(slots) => (0..slots.len())
                .filter(|&i| i == 0 || slots[i].layer != slots[i - 1].layer)
                .chain([slots.len()])
                .collect(),
            Layout::Backbone => unreachable!("{name} is in NVIDIA's layout"),
        };
        assert_eq!(blocks.len(), layers, "{name}");
        let hidden = model.hidden_states(ids.clone(), None);
        for (i, &block) in blocks.iter().enumerate() {
            let theirs = &fx[&format!("hidden_states.{i}")];
            let (m, width) = (theirs.shape[1] - s, theirs.shape[2]);
            let tokens: Vec<f64> = theirs
                .values
                .chunks(theirs.shape[1] * width)
                .flat_map(|row| row[m * width..].to_vec())
                .collect();
            assert_eq!(tokens.len(), b * s * width);
            let what = format!("{name} hidden_states.{i}");
            assert_close(&what, &values(hidden[block].clone()), &tokens, 1e-4);
        }
        let logits = values(model.forward(ids, None));
        assert_close_reported(
            &format!("{name} logits"),
            &logits,
            &fx["logits"].values,
            1e-4,
        );
    }
}

#[test]
fn an_nvidia_config_saves_and_loads_nvidias_tensor_names_and_shapes() {
    let model = build(&nvidia());
    let dir = temp_dir("nvidia-flash-save");
    model
        .save_pretrained(&dir, &ember_models::hf::SaveOptions::default())
        .unwrap();
    // NVIDIA's modules: DeltaNet (`gla`, 4 heads of 16, convs of 4 taps without bias),
    // Mamba2 (inner 128 in 8 heads of 16, one group of state 8: in_proj to z, x, B, C, dt),
    // attention with QK-norm (4 heads of 16, 2 KV heads), SwiGLU FFNs of 2 · 64 = 128.
    let l = |i: usize, rest: &str| format!("model.layers.{i}.{rest}");
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![64, 64]),
        ("model.memory_tokens".into(), vec![2, 64]),
        ("model.final_layernorm.weight".into(), vec![64]),
        (l(0, "input_layernorm.weight"), vec![64]),
        (l(0, "gla.q_proj.weight"), vec![64, 64]),
        (l(0, "gla.k_proj.weight"), vec![64, 64]),
        (l(0, "gla.v_proj.weight"), vec![64, 64]),
        (l(0, "gla.b_proj.weight"), vec![4, 64]),
        (l(0, "gla.q_conv1d.weight"), vec![64, 1, 4]),
        (l(0, "gla.k_conv1d.weight"), vec![64, 1, 4]),
        (l(0, "gla.v_conv1d.weight"), vec![64, 1, 4]),
        (l(0, "gla.o_norm.weight"), vec![16]),
        (l(0, "gla.o_proj.weight"), vec![64, 64]),
        (l(2, "input_layernorm.weight"), vec![64]),
        (l(2, "mamba.in_proj.weight"), vec![2 * 128 + 2 * 8 + 8, 64]),
        (l(2, "mamba.conv1d.weight"), vec![128 + 2 * 8, 1, 4]),
        (l(2, "mamba.conv1d.bias"), vec![128 + 2 * 8]),
        (l(2, "mamba.dt_bias"), vec![8]),
        (l(2, "mamba.A_log"), vec![8]),
        (l(2, "mamba.D"), vec![8]),
        (l(2, "mamba.norm.weight"), vec![128]),
        (l(2, "mamba.out_proj.weight"), vec![64, 128]),
        (l(4, "input_layernorm.weight"), vec![64]),
        (l(4, "self_attn.q_proj.weight"), vec![64, 64]),
        (l(4, "self_attn.k_proj.weight"), vec![32, 64]),
        (l(4, "self_attn.v_proj.weight"), vec![32, 64]),
        (l(4, "self_attn.o_proj.weight"), vec![64, 64]),
        (l(4, "self_attn.q_norm.weight"), vec![16]),
        (l(4, "self_attn.k_norm.weight"), vec![16]),
    ];
    for i in [1, 3, 5] {
        want.push((l(i, "pre_ffn_layernorm.weight"), vec![64]));
        want.push((l(i, "ffn.gate_proj.weight"), vec![128, 64]));
        want.push((l(i, "ffn.up_proj.weight"), vec![128, 64]));
        want.push((l(i, "ffn.down_proj.weight"), vec![64, 128]));
    }
    want.sort();
    assert_eq!(tensors(&dir), want);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], json!(["NemotronFlashForCausalLM"]));
    assert_eq!(config["layer_types"], nvidia()["layer_types"]);

    let again = HybridLM::from_pretrained(&dir, &device()).unwrap();
    let rows = vec![(0..11).map(|j| (j * 5 + 1) % 64).collect::<Vec<i64>>()];
    let logits = values(model.forward(ids(&rows), None));
    assert_eq!(values(again.forward(ids(&rows), None)), logits);

    // The logits are the final hidden states against unit-norm head rows.
    let hidden = model.final_hidden(ids(&rows), None);
    let w = model.embeddings.val();
    let raw = values(ember_models::layers::linear::linear(
        hidden.clone(),
        w.clone(),
        None,
    ));
    let norms = values(w.square().sum_dim(1).sqrt());
    let by_hand: Vec<f64> = raw
        .iter()
        .enumerate()
        .map(|(i, x)| x / norms[i % 64])
        .collect();
    assert_close("logits over head-row norms", &logits, &by_hand, 1e-5);
    assert!(
        max_abs_diff(&logits, &raw) > 1e-2,
        "the head rows already had unit norm"
    );
}

/// With `intermediate_size` > 0 each mixer layer carries its own FFN (`pre_ffn_layernorm`,
/// `ffn`), an untied head is saved as `lm_head`, and `kq_norm = "none"` has no QK-norm.
#[test]
fn nvidia_mixer_layers_carry_their_own_ffn() {
    let mut v = nvidia();
    for (k, x) in [
        ("layer_types", json!(["deltanet", "m2", "a"])),
        ("num_hidden_layers", json!(3)),
        ("intermediate_size", json!(96)),
        ("tie_word_embeddings", json!(false)),
        ("kq_norm", json!("none")),
    ] {
        v[k] = x;
    }
    v.as_object_mut().unwrap().remove("ffn_expand_ratio");
    let model = build(&v);
    assert_eq!(model.layers.len(), 6);
    let dir = temp_dir("nvidia-flash-inner-ffn");
    model
        .save_pretrained(&dir, &ember_models::hf::SaveOptions::default())
        .unwrap();
    let names: Vec<String> = tensors(&dir).into_iter().map(|(n, _)| n).collect();
    for i in 0..3 {
        for part in [
            "input_layernorm",
            "pre_ffn_layernorm",
            "ffn.up_proj",
            "ffn.down_proj",
        ] {
            let key = format!("model.layers.{i}.{part}.weight");
            assert!(names.contains(&key), "{key} missing from {names:?}");
        }
    }
    assert!(names.contains(&"lm_head.weight".to_string()));
    assert!(!names.iter().any(|n| n.contains("q_norm")), "{names:?}");
    let again = HybridLM::from_pretrained(&dir, &device()).unwrap();
    let rows = vec![(0..7).map(|j| (j * 3 + 2) % 64).collect::<Vec<i64>>()];
    assert_eq!(
        values(again.forward(ids(&rows), None)),
        values(model.forward(ids(&rows), None))
    );
}

/// Cached decoding, left-padded batches and the captured decode step work on NVIDIA's
/// layout as on ember's (QK-norm, RoPE from the first meta token, normalised logits).
#[test]
fn an_nvidia_model_decodes_as_it_recomputes() {
    let model = build(&nvidia());
    let prompts: Vec<Vec<u32>> = vec![
        (0..9).map(|j| (5 * j + 2) % 64).collect(),
        (0..4).map(|j| (3 * j + 1) % 64).collect(),
    ];
    let opts = GenerateOptions {
        max_new_tokens: vec![5],
        eos_ids: vec![],
        pad_id: 0,
        sampling: Sampling::default(),
    };
    let batched = generate(&model, &prompts, &opts, &mut Hooks::default()).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        // Greedy continuation = argmax of the full recomputation at every step.
        let mut seq: Vec<i64> = p.iter().map(|&t| t as i64).collect();
        for (&tok, &lp) in got.tokens.iter().zip(&got.logprobs) {
            let logits = model.forward(ids(&[seq.clone()]), None);
            let last = values(logits.narrow(1, seq.len() - 1, 1));
            let best = (0..last.len())
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap();
            assert_eq!(tok as usize, best, "prompt of {} tokens", p.len());
            let lse = last
                .iter()
                .map(|x| (x - last[best]).exp())
                .sum::<f64>()
                .ln()
                + last[best];
            assert!((lp as f64 - (last[best] - lse)).abs() < 1e-4, "{lp}");
            seq.push(tok as i64);
        }
    }
    graph_and_eager(&model, &prompts, &opts, "nvidia layout");
}

/// A config that leaves keys out saves every value it was read with, since NVIDIA's config
/// class has other defaults for several of them.
#[test]
fn an_nvidia_config_saves_every_value_it_was_read_with() {
    let v = json!({
        "model_type": "nemotron_flash", "vocab_size": 64, "hidden_size": 64,
        "layer_types": ["m2", "f", "a", "f"], "intermediate_size": 0, "ffn_expand_ratio": 2,
        "num_attention_heads": 4, "mamba2_headdim": 16,
    });
    let dir = temp_dir("nvidia-flash-defaults");
    build(&v)
        .save_pretrained(&dir, &ember_models::hf::SaveOptions::default())
        .unwrap();
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    for (k, want) in [
        ("architectures", json!(["NemotronFlashForCausalLM"])),
        ("num_hidden_layers", json!(4)),
        ("intermediate_size", json!(0)),
        ("num_key_value_heads", json!(4)),
        ("kq_norm", json!("none")),
        ("rope", json!(false)),
        ("mamba_d_state", json!(16)),
        ("mamba_d_conv", json!(4)),
        ("mamba_expand", json!(2)),
        ("mamba2_headdim", json!(16)),
        ("rms_norm_eps", json!(1e-6)),
        ("tie_word_embeddings", json!(false)),
        ("num_memory_tokens", json!(0)),
        ("mlp_hidden_act", json!("silu")),
    ] {
        assert_eq!(saved[k], want, "{k} in {saved}");
    }
    assert!(
        saved["auto_map"]["AutoModelForCausalLM"].is_string(),
        "{saved}"
    );
}

#[test]
fn nvidia_config_mistakes_are_one_line_errors() {
    let cases: [(&str, Value, &[&str]); 8] = [
        (
            "pattern",
            json!("D F"),
            &["`pattern`", "ember's own", "`kq_norm`"],
        ),
        (
            "num_hidden_layers",
            json!(5),
            &["num_hidden_layers", "6 layers"],
        ),
        ("kq_norm", json!("layer"), &["`kq_norm`", "layer"]),
        (
            "rope_type",
            json!("dynamic_ntk"),
            &["`rope_type`", "dynamic_ntk"],
        ),
        ("sliding_window", json!(16), &["`sliding_window`"]),
        ("attn_hidden_size", json!(32), &["`attn_hidden_size`"]),
        (
            "mamba2_headdim",
            json!(32),
            &["`mamba2_headdim`", "multiple of 8 heads"],
        ),
        (
            "layer_types",
            json!(["deltanet", "x", "m2", "f", "a", "f"]),
            &["`layer_types`", "\"x\""],
        ),
    ];
    for (key, value, words) in cases {
        let mut v = nvidia();
        v[key] = value;
        let e = format!(
            "{:#}",
            HybridConfig::from_value(&v, "cfg.json").unwrap_err()
        );
        assert!(!e.contains('\n'), "{key}: {e}");
        assert!(e.starts_with("cfg.json: "), "{key}: {e}");
        for w in words {
            assert!(e.contains(w), "{key}: {e:?} lacks {w:?}");
        }
    }
}

/// A recipe whose `[model]` is in NVIDIA's keys pretrains, and its run directory holds a
/// checkpoint in NVIDIA's layout.
#[test]
fn a_recipe_in_nvidias_keys_trains_and_saves_nvidias_layout() {
    const RECIPE: &str = r#"
[run]
name = "nv"
seed = 2
out_dir = "OUT"

[model]
arch = "nemotron_flash"
vocab_size = 259
hidden_size = 64
layer_types = ["deltanet", "f", "m2", "f", "a", "f"]
intermediate_size = 0
ffn_expand_ratio = 2
num_attention_heads = 4
num_key_value_heads = 2
kq_norm = "none"
rope = true
mamba_d_state = 8
mamba2_headdim = 16
mamba_chunk_size = 8
linear_chunk_size = 8
num_memory_tokens = 2
tie_word_embeddings = true

[data]
tokenizer = "byte_level"
seq_len = 32
doc_masks = true

[data.generated]
task = "arithmetic"
count = 200
levels = [1]

[train]
steps = 12
batch_size = 8
lr = 1e-2
warmup_steps = 2
log_every = 1
save_every = 0
"#;
    let (path, run) = recipe_from("nvidia-flash-recipe", RECIPE, "nv", |s| s);
    let o = train(&path, &[], &[]);
    assert!(o.status.success(), "{}", crate::cli::stderr(&o));
    let losses: Vec<f64> = records(&run)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert!(losses[11] < 0.8 * losses[0], "{losses:?}");
    let names: Vec<String> = tensors(&run).into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| n.starts_with("model.")), "{names:?}");
    let again = HybridLM::from_pretrained(&run, &device()).unwrap();
    assert_eq!(again.config.layers.len(), 6);
}
