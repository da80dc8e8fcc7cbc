//! NVIDIA's released Nemotron-Flash checkpoints (`NemotronFlashForCausalLM`, the Hugging Face
//! remote code of `nvidia/Nemotron-Flash-*`), read and written by the same hybrid stack.
//!
//! Their config lists decoder layers (`layer_types`: `deltanet`, `m2`, `a`, `f`). A mixer
//! layer is `input_layernorm` and its mixer (`gla`: DeltaNet, `mamba`: Mamba2, `self_attn`),
//! followed, when `intermediate_size` > 0, by `pre_ffn_layernorm` and `ffn` in the same layer;
//! an `f` layer is `pre_ffn_layernorm` and `ffn` alone. So one layer is one or two of the
//! stack's blocks. Tensors live under `model.` (`embed_tokens`, `memory_tokens`, `layers.N`,
//! `final_layernorm`), and the logits are divided by the norm of each `lm_head` row.
//!
//! Shapes and numerics come from the config as the remote code reads it: DeltaNet has
//! `num_attention_heads` heads of hidden / heads, a 4-tap conv without bias and an output
//! norm with eps 1e-5; Mamba2 has `mamba_expand` · hidden inner width in heads of
//! `mamba2_headdim`, one B/C group, state `mamba_d_state`, and a gated norm with eps 1e-5
//! over the whole inner width; attention takes `kq_norm = "rms"` (eps 1e-6, per head, before
//! RoPE) and RoPE only with `rope = true` (`rope_type` "ntk" stretches the base); every FFN is
//! `ffn_expand_ratio` · hidden rounded down to a multiple of 128 wide when that is set, else
//! `intermediate_size`.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::delta_net::DeltaDims;
use super::mamba2::Mamba2Dims;
use super::stack::{HybridConfig, LayerKind, Layout};
use crate::hf;
use crate::layers::attention::AttnDims;

/// Where a block of the stack sits in NVIDIA's layout: its decoder layer, and whether it is
/// that layer's FFN (`pre_ffn_layernorm` and `ffn`) rather than its mixer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub layer: usize,
    pub ffn: bool,
}

/// Keys only NVIDIA's config has; any of them selects its layout.
const NVIDIA_KEYS: [&str; 7] = [
    "kq_norm",
    "mamba_d_state",
    "mamba2_headdim",
    "mamba_expand",
    "mamba_d_conv",
    "ffn_expand_ratio",
    "attn_hidden_size",
];

/// Keys of ember's own `nemotron_flash` layout, which NVIDIA's config spells otherwise.
const EMBER_KEYS: [&str; 11] = [
    "pattern",
    "linear_num_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_conv_kernel_dim",
    "mamba_num_heads",
    "mamba_head_dim",
    "ssm_state_size",
    "n_groups",
];

/// Whether `v` (a `nemotron_flash` config.json or recipe `[model]`) is in NVIDIA's layout.
pub fn is_nvidia(v: &Value) -> bool {
    let named = v
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == "NemotronFlashForCausalLM"));
    named || NVIDIA_KEYS.iter().any(|k| v.get(*k).is_some())
}

/// The stack's config for NVIDIA's layout.
pub fn config(v: &Value, origin: &str) -> Result<HybridConfig> {
    if let Some(k) = EMBER_KEYS.iter().find(|k| v.get(**k).is_some()) {
        let theirs = NVIDIA_KEYS.iter().find(|k| v.get(**k).is_some());
        bail!(
            "{origin}: `{k}` belongs to ember's own nemotron_flash layout, not NVIDIA's{}; \
             NVIDIA's takes `layer_types` and sizes every mixer from num_attention_heads, \
             mamba_expand, mamba2_headdim and mamba_d_state",
            theirs
                .map(|t| format!(" (which `{t}` selects)"))
                .unwrap_or_default()
        );
    }
    let f = hf::Fields::new(v, origin);
    let uint = |k: &str, default: Option<usize>| f.usize(k, default);
    let hidden = uint("hidden_size", None)?;
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    // -1 means "unset" in NVIDIA's config.
    let positive = |k: &str| {
        v.get(k)
            .and_then(Value::as_i64)
            .filter(|&n| n > 0)
            .map(|n| n as usize)
    };

    let names: Vec<&str> = match v.get("layer_types") {
        Some(Value::Array(a)) => a.iter().map(|t| t.as_str().unwrap_or("?")).collect(),
        _ => bail!("{origin}: NVIDIA's nemotron_flash layout needs `layer_types`"),
    };
    let n = uint("num_hidden_layers", Some(names.len()))?;
    if n != names.len() {
        bail!(
            "{origin}: `num_hidden_layers` is {n} but `layer_types` lists {} layers",
            names.len()
        );
    }
    let inner_ffn = uint("intermediate_size", Some(0))?;
    let ffn_width = match v.get("ffn_expand_ratio").and_then(hf::float_of) {
        Some(r) => (r * hidden as f64) as usize / 128 * 128,
        None => inner_ffn,
    };
    let ffn_kind = match text("mlp_hidden_act").unwrap_or("silu") {
        "silu" => LayerKind::Ffn,
        "relu2" => LayerKind::Mlp,
        other => bail!("{origin}: `mlp_hidden_act` {other:?} is not silu or relu2"),
    };
    let mut layers = Vec::new();
    let mut slots = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mixer = match *name {
            "deltanet" => Some(LayerKind::DeltaNet),
            "m" | "m2" => Some(LayerKind::Mamba2),
            "a" => Some(LayerKind::Attention),
            "f" => None,
            other => {
                bail!("{origin}: `layer_types` entry {other:?} is not one of deltanet, m2, a, f")
            }
        };
        if let Some(kind) = mixer {
            layers.push(kind);
            slots.push(Slot {
                layer: i,
                ffn: false,
            });
        }
        if mixer.is_none() || inner_ffn > 0 {
            layers.push(ffn_kind);
            slots.push(Slot {
                layer: i,
                ffn: true,
            });
        }
    }
    if layers.contains(&ffn_kind) && ffn_width == 0 {
        bail!("{origin}: the FFN layers need `intermediate_size` or `ffn_expand_ratio` (their width is 0)");
    }

    let heads = uint("num_attention_heads", None)?.max(1);
    let attn_width = positive("attn_hidden_size").unwrap_or(hidden);
    if attn_width != hidden {
        bail!("{origin}: `attn_hidden_size` {attn_width} other than hidden_size {hidden} is not supported");
    }
    let head_dim = match (positive("kq_head_dim"), positive("v_head_dim")) {
        (None, None) => attn_width / heads,
        (Some(a), Some(b)) if a == b => a,
        (Some(a), None) | (None, Some(a)) if a == attn_width / heads => a,
        _ => bail!(
            "{origin}: `kq_head_dim` and `v_head_dim` differ; only one head size is supported"
        ),
    };
    let attn = AttnDims {
        hidden,
        heads,
        kv_heads: uint("num_key_value_heads", Some(heads))?.max(1),
        head_dim,
    };
    let qk_norm = match text("kq_norm") {
        Some("rms") => true,
        Some("none") | None => false,
        Some(other) => bail!("{origin}: `kq_norm` {other:?} is not \"rms\" or \"none\""),
    };
    if v.get("sliding_window").is_some_and(|w| !w.is_null())
        && text("attn_implementation_new").or(text("attn_implementation")) != Some("fused_mha")
    {
        bail!("{origin}: `sliding_window` is not supported (only fused_mha, which ignores it)");
    }
    let rope_theta = if f.bool("rope", false) {
        let base = f.f64("rope_theta", 10_000.0);
        Some(match text("rope_type") {
            None | Some("default") => base,
            Some("ntk") => {
                let max = f.f64("max_position_embeddings", 262_144.0);
                let orig = v
                    .get("orig_max_position_embeddings")
                    .and_then(hf::float_of)
                    .ok_or_else(|| {
                        anyhow!("{origin}: rope_type \"ntk\" needs `orig_max_position_embeddings`")
                    })?;
                let d = head_dim as f64;
                base * (2.0 * max / orig - 1.0).powf(d / (d - 2.0))
            }
            Some(other) => bail!("{origin}: `rope_type` {other:?} is not supported (default, ntk)"),
        })
    } else {
        None
    };

    let expand = uint("mamba_expand", Some(2))?;
    let mamba_head_dim = uint("mamba2_headdim", Some(64))?;
    let inner = expand * hidden;
    // The remote code asserts a multiple of 8 Mamba2 heads; a model it cannot build is refused.
    if mamba_head_dim == 0 || !inner.is_multiple_of(8 * mamba_head_dim) {
        bail!(
            "{origin}: `mamba_expand` · hidden_size ({inner}) must make a multiple of 8 heads of \
             `mamba2_headdim` ({mamba_head_dim}), as NVIDIA's code requires"
        );
    }
    let mamba = Mamba2Dims {
        hidden,
        heads: inner / mamba_head_dim,
        head_dim: mamba_head_dim,
        state: uint("mamba_d_state", Some(16))?,
        groups: 1,
        conv_kernel: uint("mamba_d_conv", Some(4))?,
        chunk: uint("mamba_chunk_size", Some(256))?,
        eps: 1e-5,
        dt_limit: (0.0, f64::INFINITY),
        conv_bias: true,
        proj_bias: false,
    };
    if layers.contains(&LayerKind::DeltaNet) && !hidden.is_multiple_of(heads) {
        bail!("{origin}: DeltaNet splits hidden_size into `num_attention_heads` heads; {hidden} is not a multiple of {heads}");
    }
    let delta = DeltaDims {
        hidden,
        k_heads: heads,
        v_heads: heads,
        dk: hidden / heads,
        dv: hidden / heads,
        conv_kernel: 4,
        chunk: uint("linear_chunk_size", Some(64))?,
        eps: 1e-5,
    };
    let eps = f.f64("rms_norm_eps", 1e-6);
    let tied = f.bool("tie_word_embeddings", false);
    let memory_tokens = uint("num_memory_tokens", Some(0))?;
    // The saved config states every value read here: NVIDIA's config class has other defaults
    // for several (intermediate_size 14336, num_key_value_heads 8, kq_norm unset is an error).
    let mut source = v.clone();
    if let Some(o) = source.as_object_mut() {
        let kv = attn.kv_heads;
        for (k, value) in [
            ("architectures", json!(["NemotronFlashForCausalLM"])),
            (
                "auto_map",
                json!({
                    "AutoConfig": "configuration_nemotron_flash.NemotronFlashConfig",
                    "AutoModelForCausalLM": "modeling_nemotron_flash.NemotronFlashForCausalLM",
                }),
            ),
            ("num_hidden_layers", json!(n)),
            ("intermediate_size", json!(inner_ffn)),
            ("num_key_value_heads", json!(kv)),
            ("kq_norm", json!(if qk_norm { "rms" } else { "none" })),
            ("rope", json!(rope_theta.is_some())),
            ("mamba_d_state", json!(mamba.state)),
            ("mamba_d_conv", json!(mamba.conv_kernel)),
            ("mamba_expand", json!(expand)),
            ("mamba2_headdim", json!(mamba_head_dim)),
            ("rms_norm_eps", json!(eps)),
            ("tie_word_embeddings", json!(tied)),
            ("num_memory_tokens", json!(memory_tokens)),
            (
                "mlp_hidden_act",
                json!(text("mlp_hidden_act").unwrap_or("silu")),
            ),
        ] {
            o.entry(k).or_insert(value);
        }
    }
    Ok(HybridConfig {
        vocab_size: uint("vocab_size", None)?,
        hidden_size: hidden,
        layers,
        eps,
        mamba,
        attn,
        intermediate_size: ffn_width,
        mlp_bias: false,
        delta,
        gated_delta: delta,
        rope_theta,
        memory_tokens,
        weight_normalization: f.bool("weight_normalization", false),
        tie_word_embeddings: tied,
        initializer_range: f.f64("initializer_range", 0.02),
        source,
        layout: Layout::Nvidia(slots),
        logit_norm: true,
        qk_norm: qk_norm.then_some(1e-6),
    })
}

/// The names of the norm and the mixer of a block of `kind` at `slot`.
pub fn block_keys(slot: Slot, kind: LayerKind) -> (String, String) {
    let p = format!("model.layers.{}", slot.layer);
    if slot.ffn {
        return (format!("{p}.pre_ffn_layernorm.weight"), format!("{p}.ffn"));
    }
    let mixer = match kind {
        LayerKind::DeltaNet => "gla",
        LayerKind::Mamba2 => "mamba",
        _ => "self_attn",
    };
    (
        format!("{p}.input_layernorm.weight"),
        format!("{p}.{mixer}"),
    )
}
