//! A hybrid decoder: embeddings, residual blocks `x + mixer(norm(x))` whose mixer is a
//! Mamba2 SSM, a DeltaNet, attention or an MLP in the order the config gives, a final norm
//! and the LM head. It loads and saves transformers' `Mamba2ForCausalLM` (every layer
//! Mamba2) and `NemotronHForCausalLM` (`layers_block_type` or `hybrid_override_pattern`),
//! whose tensors share the `backbone.*` naming, and ember's `nemotron_flash` configs
//! (DeltaNet, Gated DeltaNet, Mamba2, attention with RoPE and SwiGLU FFN layers, optional
//! meta tokens and weight normalisation), written in the same naming. A Gated DeltaNet layer
//! keeps transformers' `Qwen3NextGatedDeltaNet` tensors (`in_proj_qkvz`, `in_proj_ba`,
//! `conv1d`, `dt_bias`, `A_log`, `norm`, `out_proj`) under its `mixer.` prefix: Nemotron-Flash
//! searched over it, but its released configs name only `deltanet|m2|a|f`.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use serde_json::Value;

use super::delta_net::{DeltaDims, DeltaNet, DeltaState, GatedDeltaNet};
use super::mamba2::{Mamba2Dims, Mamba2Mixer, Mamba2State};
use super::nvidia_flash::{self, Slot};
use super::{Documents, RecurrentState};
use crate::hf::{self, SaveOptions};
use crate::layers::attention::{Attention, AttnContext, AttnDims, CacheSlot, KvCache};
use crate::layers::linear::Linear;
use crate::layers::mlp::SwiGlu;
use crate::layers::rms_norm::RmsNorm;
use crate::layers::rope;
use crate::weights::{export, param, Init, RandomInit, WeightSink, WeightSource};

/// What a layer mixes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Mamba2,
    Attention,
    /// NemotronH's relu² MLP.
    Mlp,
    DeltaNet,
    GatedDeltaNet,
    /// A SwiGLU feed-forward layer (Nemotron-Flash's F).
    Ffn,
}

impl LayerKind {
    /// Nemotron-Flash's names: `deltanet` (D), `m2`, `a`, `f`; and `gated_deltanet` (GDN).
    pub fn parse_flash(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "deltanet" | "d" => Some(Self::DeltaNet),
            "gated_deltanet" | "gdn" => Some(Self::GatedDeltaNet),
            "m2" | "mamba2" => Some(Self::Mamba2),
            "a" | "attention" => Some(Self::Attention),
            "f" | "ffn" => Some(Self::Ffn),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HybridConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: Vec<LayerKind>,
    pub eps: f64,
    pub mamba: Mamba2Dims,
    pub attn: AttnDims,
    pub intermediate_size: usize,
    pub mlp_bias: bool,
    pub delta: DeltaDims,
    /// Gated DeltaNet layers: `delta`, with `linear_num_key_heads` key heads shared by
    /// groups of the `linear_num_value_heads` value heads.
    pub gated_delta: DeltaDims,
    /// RoPE on attention layers (Nemotron-Flash); NemotronH's attention has none.
    pub rope_theta: Option<f64>,
    /// Learnable tokens prepended to every sequence (Nemotron-Flash's meta tokens).
    pub memory_tokens: usize,
    /// Re-normalise reading rows and writing columns after every optimizer step.
    pub weight_normalization: bool,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    /// The config.json it came from, written back on save.
    pub source: Value,
    /// The checkpoint's tensor names.
    pub layout: Layout,
    /// Divide the logits by the norm of each LM-head row (NVIDIA's Nemotron-Flash).
    pub logit_norm: bool,
    /// Per-head RMSNorm of attention's queries and keys before RoPE, with this eps.
    pub qk_norm: Option<f64>,
}

/// How a checkpoint names the stack's tensors.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// `backbone.embeddings`, `backbone.layers.N.{norm,mixer}`, `backbone.norm_f`: transformers'
    /// Mamba2 and NemotronH, and ember's own `nemotron_flash`.
    Backbone,
    /// NVIDIA's released Nemotron-Flash (`model.*`), one slot per block.
    Nvidia(Vec<Slot>),
}

impl HybridConfig {
    fn embeddings_key(&self) -> &'static str {
        match self.layout {
            Layout::Backbone => "backbone.embeddings.weight",
            Layout::Nvidia(_) => "model.embed_tokens.weight",
        }
    }

    fn memory_key(&self) -> &'static str {
        match self.layout {
            Layout::Backbone => "backbone.memory_tokens",
            Layout::Nvidia(_) => "model.memory_tokens",
        }
    }

    fn final_norm_key(&self) -> &'static str {
        match self.layout {
            Layout::Backbone => "backbone.norm_f.weight",
            Layout::Nvidia(_) => "model.final_layernorm.weight",
        }
    }

    /// The names of block `i`'s norm weight and its mixer's prefix.
    fn block_keys(&self, i: usize) -> (String, String) {
        match &self.layout {
            Layout::Backbone => {
                let p = format!("backbone.layers.{i}");
                (format!("{p}.norm.weight"), format!("{p}.mixer"))
            }
            Layout::Nvidia(slots) => nvidia_flash::block_keys(slots[i], self.layers[i]),
        }
    }
}

impl HybridConfig {
    /// Whether an HF `model_type` names a family this stack loads.
    pub fn is_hybrid_type(model_type: &str) -> bool {
        matches!(model_type, "nemotron_flash" | "mamba2" | "nemotron_h")
    }

    /// The keys a recipe's `[model]` may set for the hybrid architectures.
    pub const KNOWN_FIELDS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "layer_types",
        "pattern",
        "layers_block_type",
        "hybrid_override_pattern",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rms_norm_eps",
        "layer_norm_epsilon",
        "num_heads",
        "state_size",
        "mamba_num_heads",
        "mamba_head_dim",
        "ssm_state_size",
        "n_groups",
        "conv_kernel",
        "chunk_size",
        "mamba_chunk_size",
        "linear_num_heads",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_conv_kernel_dim",
        "linear_chunk_size",
        "num_memory_tokens",
        "weight_normalization",
        "tie_word_embeddings",
        "initializer_range",
        "max_position_embeddings",
        "mlp_hidden_act",
        "expand",
        // NVIDIA's released layout (`nvidia_flash`).
        "kq_norm",
        "rope",
        "rope_type",
        "orig_max_position_embeddings",
        "attn_hidden_size",
        "kq_head_dim",
        "v_head_dim",
        "mamba_d_state",
        "mamba_d_conv",
        "mamba_expand",
        "mamba2_headdim",
        "ffn_expand_ratio",
        "sliding_window",
    ];

    /// From a `mamba2`, `nemotron_h` or `nemotron_flash` config.json (ember's layout or
    /// NVIDIA's, [`nvidia_flash`]).
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let kind = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if kind == "nemotron_flash" && nvidia_flash::is_nvidia(v) {
            return nvidia_flash::config(v, origin);
        }
        let f = hf::Fields::new(v, origin);
        let uint = |k: &str, default: Option<usize>| f.usize(k, default);
        let num = |k: &str, default: f64| f.f64(k, default);
        let flag = |k: &str, default: bool| f.bool(k, default);
        let hidden = uint("hidden_size", None)?;
        let limit = |min: f64| {
            let l = v.get("time_step_limit").and_then(Value::as_array);
            let hi = l
                .and_then(|a| a.get(1))
                .and_then(hf::float_of)
                .unwrap_or(f64::INFINITY);
            (min, hi)
        };
        let (layers, mamba) = match kind {
            "mamba2" => {
                let n = uint("num_hidden_layers", None)?;
                let lo = v
                    .get("time_step_limit")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .and_then(hf::float_of)
                    .unwrap_or(0.0);
                let heads = uint("num_heads", None)?;
                let m = Mamba2Dims {
                    hidden,
                    heads,
                    head_dim: uint("head_dim", Some(64))?,
                    state: uint("state_size", Some(128))?,
                    groups: uint("n_groups", Some(1))?,
                    conv_kernel: uint("conv_kernel", Some(4))?,
                    chunk: uint("chunk_size", Some(256))?,
                    eps: num("layer_norm_epsilon", 1e-5),
                    dt_limit: limit(lo),
                    conv_bias: flag("use_conv_bias", true),
                    proj_bias: flag("use_bias", false),
                };
                (vec![LayerKind::Mamba2; n], m)
            }
            "nemotron_h" => {
                let layers = match (v.get("layers_block_type"), v.get("hybrid_override_pattern")) {
                    (Some(Value::Array(a)), _) => a
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("mamba" | "linear_attention") => Ok(LayerKind::Mamba2),
                            Some("attention" | "full_attention") => Ok(LayerKind::Attention),
                            Some("mlp") => Ok(LayerKind::Mlp),
                            _ => Err(anyhow!(
                                "{origin}: `layers_block_type` entry {t} is not supported (mamba, attention, mlp)"
                            )),
                        })
                        .collect::<Result<Vec<_>>>()?,
                    (_, Some(Value::String(p))) => p
                        .chars()
                        .map(|c| match c {
                            'M' => Ok(LayerKind::Mamba2),
                            '*' => Ok(LayerKind::Attention),
                            '-' => Ok(LayerKind::Mlp),
                            _ => Err(anyhow!(
                                "{origin}: `hybrid_override_pattern` letter {c:?} is not supported (M, *, -)"
                            )),
                        })
                        .collect::<Result<Vec<_>>>()?,
                    _ => bail!("{origin}: needs `layers_block_type` or `hybrid_override_pattern`"),
                };
                let m = Mamba2Dims {
                    hidden,
                    heads: uint("mamba_num_heads", None)?,
                    head_dim: uint("mamba_head_dim", Some(64))?,
                    state: uint("ssm_state_size", Some(128))?,
                    groups: uint("n_groups", Some(1))?,
                    conv_kernel: uint("conv_kernel", Some(4))?,
                    chunk: uint("chunk_size", Some(128))?,
                    eps: num("layer_norm_epsilon", 1e-5),
                    // transformers' NemotronH prefill clamps dt at time_step_min.
                    dt_limit: limit(num("time_step_min", 1e-3)),
                    conv_bias: flag("use_conv_bias", true),
                    proj_bias: flag("mamba_proj_bias", false),
                };
                if v.get("mlp_hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("relu2")
                    != "relu2"
                {
                    bail!("{origin}: `mlp_hidden_act` must be relu2");
                }
                (layers, m)
            }
            "nemotron_flash" => {
                let names: Vec<String> = match (v.get("layer_types"), v.get("pattern")) {
                    (Some(Value::Array(a)), _) => a
                        .iter()
                        .map(|t| t.as_str().unwrap_or("?").to_string())
                        .collect(),
                    (_, Some(Value::String(p))) => {
                        p.split_whitespace().map(str::to_string).collect()
                    }
                    _ => bail!("{origin}: needs `layer_types` (or a `pattern` such as \"D F M2 F A F\")"),
                };
                let layers = names
                    .iter()
                    .map(|n| {
                        LayerKind::parse_flash(n).ok_or_else(|| {
                            anyhow!("{origin}: layer type `{n}` is not one of deltanet (D), gated_deltanet (GDN), m2, a, f")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let m = Mamba2Dims {
                    hidden,
                    heads: uint("mamba_num_heads", Some(2 * hidden / 64))?,
                    head_dim: uint("mamba_head_dim", Some(64))?,
                    state: uint("ssm_state_size", Some(128))?,
                    groups: uint("n_groups", Some(1))?,
                    conv_kernel: uint("conv_kernel", Some(4))?,
                    chunk: uint("mamba_chunk_size", Some(128))?,
                    eps: num("rms_norm_eps", 1e-6),
                    dt_limit: (0.0, f64::INFINITY),
                    conv_bias: true,
                    proj_bias: false,
                };
                (layers, m)
            }
            other => bail!(
                "{origin}: model_type `{other}` is not a hybrid (mamba2, nemotron_h, nemotron_flash)"
            ),
        };
        if mamba.groups == 0 || !mamba.heads.is_multiple_of(mamba.groups) {
            bail!("{origin}: the Mamba2 heads must be a multiple of `n_groups`");
        }
        let heads = uint("num_attention_heads", Some(1))?.max(1);
        let attn = AttnDims {
            hidden,
            heads,
            kv_heads: uint("num_key_value_heads", Some(heads))?.max(1),
            head_dim: uint("head_dim", Some(hidden / heads))?,
        };
        let attn = if kind == "mamba2" {
            AttnDims {
                head_dim: hidden / heads,
                ..attn
            }
        } else {
            attn
        };
        let flash = kind == "nemotron_flash";
        let linear_heads = uint("linear_num_heads", Some(heads))?.max(1);
        let delta = DeltaDims {
            hidden,
            k_heads: linear_heads,
            v_heads: linear_heads,
            dk: uint("linear_key_head_dim", Some(hidden / linear_heads))?,
            dv: uint("linear_value_head_dim", Some(hidden / linear_heads))?,
            conv_kernel: uint("linear_conv_kernel_dim", Some(4))?,
            chunk: uint("linear_chunk_size", Some(64))?,
            eps: num("rms_norm_eps", 1e-6),
        };
        let gated_delta = DeltaDims {
            k_heads: uint("linear_num_key_heads", Some(linear_heads))?.max(1),
            v_heads: uint("linear_num_value_heads", Some(linear_heads))?.max(1),
            ..delta
        };
        if !gated_delta.v_heads.is_multiple_of(gated_delta.k_heads) {
            bail!(
                "{origin}: `linear_num_value_heads` must be a multiple of `linear_num_key_heads`"
            );
        }
        let eps = if flash {
            num("rms_norm_eps", 1e-6)
        } else {
            num("layer_norm_epsilon", 1e-5)
        };
        Ok(Self {
            vocab_size: uint("vocab_size", None)?,
            hidden_size: hidden,
            layers,
            eps,
            mamba,
            attn,
            intermediate_size: uint("intermediate_size", Some(4 * hidden))?,
            mlp_bias: flag("mlp_bias", false),
            delta,
            gated_delta,
            rope_theta: flash.then(|| num("rope_theta", 10_000.0)),
            memory_tokens: uint("num_memory_tokens", Some(0))?,
            weight_normalization: flag("weight_normalization", false),
            tie_word_embeddings: flag("tie_word_embeddings", flash),
            initializer_range: num("initializer_range", 0.02),
            source: v.clone(),
            layout: Layout::Backbone,
            logit_norm: false,
            qk_norm: None,
        })
    }
}

/// `y` `[batch, len, hidden]` with the rows' left padding (`keep` 0) zeroed. The padding
/// comes first, so a delta-rule layer's state and conv history stay zero through it (a zero
/// input adds nothing, and decaying a zero state leaves it zero).
fn zero_padding(y: Tensor<3>, keep: &Option<Tensor<2>>) -> Tensor<3> {
    match keep {
        Some(k) => {
            let [b, len, _] = y.dims();
            let dtype = y.dtype();
            y * k.clone().reshape([b, len, 1]).cast(dtype)
        }
        None => y,
    }
}

/// NemotronH's MLP: `down(relu(up(x))²)`.
#[derive(Module, Debug)]
pub struct Relu2Mlp {
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Relu2Mlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = relu(self.up_proj.forward(x));
        self.down_proj.forward(h.clone() * h)
    }
}

// One per layer, in a Vec: the unused space of the smaller variants is a few hundred bytes
// a layer, and boxing would hide the modules from Burn's derive.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Mixer {
    Mamba2(Mamba2Mixer),
    Attention(Attention),
    Mlp(Relu2Mlp),
    DeltaNet(DeltaNet),
    GatedDeltaNet(GatedDeltaNet),
    Ffn(SwiGlu),
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm: RmsNorm,
    pub mixer: Mixer,
}

/// Per-layer decoding state.
#[derive(Debug)]
pub enum LayerState {
    Ssm(Mamba2State),
    Delta(DeltaState),
    Kv(KvCache),
    None,
}

/// The state a hybrid model decodes from: one entry per layer, and the tokens seen.
#[derive(Debug)]
pub struct HybridCache {
    pub layers: Vec<LayerState>,
    /// Positions written so far, meta tokens included.
    pub len: usize,
    /// `[batch, max_len]`, true at the left padding of the tokens, as generation gives it.
    pub pad: Option<Tensor<2, burn::tensor::Bool>>,
    /// Padding positions at the front of each row, read from `pad` at the first call.
    pub pad_counts: Option<Vec<usize>>,
    /// RoPE's inverse frequencies, uploaded once: a captured decode step may not transfer.
    pub rope_freq: Option<rope::RopeFreq>,
}

impl HybridCache {
    /// Keeps batch rows `idx` (finished sequences leave the batch).
    pub fn select_rows(&mut self, idx: &Tensor<1, Int>) {
        for l in &mut self.layers {
            match l {
                LayerState::Ssm(s) | LayerState::Delta(s) => s.select_rows(idx),
                LayerState::Kv(kv) => kv.select_rows(idx),
                LayerState::None => {}
            }
        }
        self.pad = self.pad.take().map(|m| m.select(0, idx.clone()));
        if let Some(counts) = &mut self.pad_counts {
            let keep: Vec<i64> = idx
                .to_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap_or_default();
            *counts = keep.iter().map(|&i| counts[i as usize]).collect();
        }
    }

    /// The recurrent layers' states, in layer order.
    fn recurrent(&self) -> impl Iterator<Item = &RecurrentState> {
        self.layers.iter().filter_map(|l| match l {
            LayerState::Ssm(s) | LayerState::Delta(s) => Some(s),
            _ => None,
        })
    }

    fn recurrent_mut(&mut self) -> impl Iterator<Item = &mut RecurrentState> {
        self.layers.iter_mut().filter_map(|l| match l {
            LayerState::Ssm(s) | LayerState::Delta(s) => Some(s),
            _ => None,
        })
    }

    /// Reads each row's leading padding from `pad` (one host read, before the prefill).
    fn fix_layout(&mut self) {
        self.pad_counts = self.pad.as_ref().map(|p| {
            let [b, w] = p.dims();
            let v: Vec<bool> = p.to_data().iter::<bool>().collect();
            (0..b)
                .map(|r| v[r * w..(r + 1) * w].iter().take_while(|&&x| x).count())
                .collect()
        });
    }
}

/// Per-row gather indices `[b, width]` for rows whose leading padding is `counts`.
fn layout_index(
    counts: &[usize],
    meta: usize,
    s: usize,
    f: impl Fn(usize, usize) -> usize,
) -> Vec<i64> {
    counts
        .iter()
        .flat_map(|&np| (0..meta + s).map(move |j| (j, np)).collect::<Vec<_>>())
        .map(|(j, np)| f(j, np) as i64)
        .collect()
}

pub(super) fn index3(
    idx: Vec<i64>,
    b: usize,
    w: usize,
    h: usize,
    device: &Device,
) -> Tensor<3, Int> {
    Tensor::<2, Int>::from_data(TensorData::new(idx, [b, w]), device)
        .reshape([b, w, 1])
        .expand([b, w, h])
}

/// What one pass through the layers reads besides its input.
pub(super) struct Pass<'a> {
    pub rope: Option<&'a rope::RopeTables>,
    /// The cache position of the first input.
    pub start: usize,
    /// `[batch, len]`, 0 at left padding.
    pub keep: Option<Tensor<2>>,
    /// `[batch, start + len]`, true at left padding.
    pub pad: Option<Tensor<2, Bool>>,
    /// `[batch, len]` document ids of packed rows: neither attention nor a recurrent state
    /// crosses from one document into the next.
    pub segments: Option<Tensor<2, Int>>,
}

#[derive(Module, Debug)]
pub struct HybridLM {
    pub embeddings: Param<Tensor<2>>,
    /// `[memory_tokens, hidden]` when the config asks for meta tokens.
    pub memory: Option<Param<Tensor<2>>>,
    pub layers: Vec<Block>,
    pub norm_f: RmsNorm,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: HybridConfig,
    /// Activations run in this dtype (the scans in f32); parameters keep their own.
    #[module(skip)]
    pub compute_dtype: DType,
    /// Train with Burn's dense attention (O(seq²) memory) instead of the blocked one, to
    /// compare the two.
    #[module(skip)]
    pub dense_attention: bool,
    /// RoPE's inverse frequencies kept on the device (see `Qwen3::rope_freq`).
    #[module(skip)]
    pub rope_freq: Option<rope::RopeFreq>,
}

impl HybridLM {
    /// Keeps RoPE's inverse frequencies on the device, as a captured training step wants.
    pub fn with_device_rope(mut self) -> Self {
        let device = self.embeddings.val().device();
        let c = &self.config;
        self.rope_freq = c
            .rope_theta
            .map(|theta| rope::freq_tensor(theta, c.attn.head_dim, &device));
        self
    }

    pub fn load(config: HybridConfig, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, std) = (c.hidden_size, c.initializer_range);
        let embeddings = param(
            src,
            c.embeddings_key(),
            [c.vocab_size, h],
            Init::Normal(std),
            device,
        )?;
        let layers = c
            .layers
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let (norm, p) = c.block_keys(i);
                let mixer = match kind {
                    LayerKind::Mamba2 => {
                        Mixer::Mamba2(Mamba2Mixer::load(src, &p, c.mamba, std, device)?)
                    }
                    LayerKind::Attention => Mixer::Attention(Attention::load_plain(
                        src, &p, c.attn, c.qk_norm, std, device,
                    )?),
                    LayerKind::DeltaNet => {
                        Mixer::DeltaNet(DeltaNet::load(src, &p, c.delta, std, device)?)
                    }
                    LayerKind::GatedDeltaNet => Mixer::GatedDeltaNet(GatedDeltaNet::load(
                        src,
                        &p,
                        c.gated_delta,
                        std,
                        device,
                    )?),
                    LayerKind::Ffn => {
                        Mixer::Ffn(SwiGlu::load(src, &p, h, c.intermediate_size, std, device)?)
                    }
                    LayerKind::Mlp => Mixer::Mlp(Relu2Mlp {
                        up_proj: Linear::load(
                            src,
                            &format!("{p}.up_proj"),
                            h,
                            c.intermediate_size,
                            c.mlp_bias,
                            std,
                            device,
                        )?,
                        down_proj: Linear::load(
                            src,
                            &format!("{p}.down_proj"),
                            c.intermediate_size,
                            h,
                            c.mlp_bias,
                            std,
                            device,
                        )?,
                    }),
                };
                Ok(Block {
                    norm: RmsNorm::load(src, &norm, h, c.eps, device)?,
                    mixer,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let memory = (c.memory_tokens > 0)
            .then(|| {
                param(
                    src,
                    c.memory_key(),
                    [c.memory_tokens, h],
                    Init::Normal(std),
                    device,
                )
            })
            .transpose()?;
        let norm_f = RmsNorm::load(src, c.final_norm_key(), h, c.eps, device)?;
        let lm_head = (!c.tie_word_embeddings)
            .then(|| Linear::load(src, "lm_head", h, c.vocab_size, false, std, device))
            .transpose()?;
        Ok(Self {
            embeddings,
            memory,
            layers,
            norm_f,
            lm_head,
            config,
            compute_dtype: DType::F32,
            rope_freq: None,
            dense_attention: false,
        })
    }

    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// For inference: parameters stored in `dtype` as well.
    pub fn into_inference_dtype(self, dtype: DType) -> Self {
        self.map(&mut crate::layers::CastParams(dtype))
            .with_compute_dtype(dtype)
    }

    /// End-of-text ids from the config (`eos_token_id`, a number or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match self.config.source.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn random(config: HybridConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::load(config, &mut RandomInit::new(seed), device)
    }

    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        hf::load_dir(
            dir,
            HybridConfig::from_value,
            |c, ckpt| Self::load(c, ckpt, device),
            &["lm_head.weight"],
        )
    }

    pub fn weights(&self) -> WeightSink {
        let mut out = Vec::new();
        let c = &self.config;
        export(&mut out, c.embeddings_key(), &self.embeddings);
        if let Some(m) = &self.memory {
            export(&mut out, c.memory_key(), m);
        }
        for (i, b) in self.layers.iter().enumerate() {
            let (norm, p) = c.block_keys(i);
            b.norm.save(&norm, &mut out);
            match &b.mixer {
                Mixer::Mamba2(m) => m.save(&p, &mut out),
                Mixer::Attention(a) => a.save(&p, &mut out),
                Mixer::Mlp(m) => {
                    m.up_proj.save(&format!("{p}.up_proj"), &mut out);
                    m.down_proj.save(&format!("{p}.down_proj"), &mut out);
                }
                Mixer::DeltaNet(d) => d.save(&p, &mut out),
                Mixer::GatedDeltaNet(d) => d.save(&p, &mut out),
                Mixer::Ffn(f) => f.save(&p, &mut out),
            }
        }
        self.norm_f.save(c.final_norm_key(), &mut out);
        if let Some(h) = &self.lm_head {
            h.save("lm_head", &mut out);
        }
        out
    }

    pub fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        hf::save(dir, &self.config.source, self.weights(), opts)
    }

    /// An empty decoding state for `batch` rows of up to `max_len` tokens (meta tokens
    /// excluded: they are added here).
    pub fn new_cache(&self, batch: usize, max_len: usize, device: &Device) -> HybridCache {
        let c = &self.config;
        let layers = c
            .layers
            .iter()
            .map(|k| match k {
                LayerKind::Mamba2 => LayerState::Ssm(c.mamba.zero_state(batch, device)),
                LayerKind::DeltaNet => LayerState::Delta(c.delta.zero_state(batch, device)),
                LayerKind::GatedDeltaNet => {
                    LayerState::Delta(c.gated_delta.zero_state(batch, device))
                }
                LayerKind::Attention => LayerState::Kv(KvCache::new(
                    batch,
                    c.attn.kv_heads,
                    max_len + c.memory_tokens,
                    c.attn.head_dim,
                    self.embeddings.val().dtype(),
                    device,
                )),
                LayerKind::Mlp | LayerKind::Ffn => LayerState::None,
            })
            .collect();
        HybridCache {
            layers,
            len: 0,
            pad: None,
            pad_counts: None,
            rope_freq: c
                .rope_theta
                .map(|theta| rope::freq_tensor(theta, c.attn.head_dim, device)),
        }
    }

    /// Every layer's input and the final norm's output (transformers' `hidden_states`), at
    /// the tokens' positions (meta tokens, when the model has them, are prepended to a fresh
    /// sequence and left out of the outputs).
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        cache: Option<&mut HybridCache>,
    ) -> Vec<Tensor<3>> {
        self.hidden_states_at(input_ids, cache)
    }

    /// As [`HybridLM::hidden_states`]; a cache made for left-padded rows (`pad`) lays each
    /// row out as [padding | meta tokens | tokens], so that padding comes before everything a
    /// row's recurrent layers see and its positions count from its first meta token.
    pub fn hidden_states_at(
        &self,
        input_ids: Tensor<2, Int>,
        mut cache: Option<&mut HybridCache>,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let c = &self.config;
        let h = c.hidden_size;
        let device = input_ids.device();
        let mut x = self.embed(input_ids);
        let start = cache.as_ref().map_or(0, |c| c.len);
        if start == 0 {
            if let Some(c) = cache.as_deref_mut() {
                c.fix_layout();
            }
        }
        let counts = cache.as_ref().and_then(|c| c.pad_counts.clone());
        let padded = counts.as_ref().is_some_and(|v| v.iter().any(|&n| n > 0));
        // Meta tokens open every sequence: after its padding, before its first token.
        let meta = match &self.memory {
            Some(m) if start == 0 => {
                let n = c.memory_tokens;
                let m = crate::layers::to_dtype(m.val(), self.compute_dtype);
                x = Tensor::cat(vec![m.reshape([1, n, h]).expand([b, n, h]), x], 1);
                if let (true, Some(counts)) = (padded, &counts) {
                    let idx = layout_index(counts, n, s, |j, np| {
                        if j < np {
                            n + j
                        } else if j < np + n {
                            j - np
                        } else {
                            j
                        }
                    });
                    x = x.gather(1, index3(idx, b, n + s, h, &device));
                }
                n
            }
            _ => 0,
        };
        let len = x.dims()[1];
        let rope_t = c.rope_theta.map(|theta| {
            let pos = match &counts {
                Some(counts) => {
                    let pos: Vec<i64> = (0..b)
                        .flat_map(|r| {
                            let np = counts[r];
                            (start..start + len).map(move |j| j.saturating_sub(np) as i64)
                        })
                        .collect();
                    Tensor::<2, Int>::from_data(TensorData::new(pos, [b, len]), &device)
                }
                // Without padding every row counts from `start`: made on the device, since a
                // captured training step's recording may not upload.
                None => Tensor::<1, Int>::arange(start as i64..(start + len) as i64, &device)
                    .reshape([1, len])
                    .expand([b, len]),
            };
            self.rope_at(theta, pos)
        });
        // Left padding over the cache's positions so far, and this call's share of it.
        let pad = counts.as_ref().filter(|_| padded).map(|v| {
            let m: Vec<bool> = v
                .iter()
                .flat_map(|&np| (0..start + len).map(move |j| j < np))
                .collect();
            Tensor::<2, burn::tensor::Bool>::from_data(
                TensorData::new(m, [b, start + len]),
                &device,
            )
        });
        let keep = pad
            .as_ref()
            .map(|p| p.clone().narrow(1, start, len).bool_not().float());
        let pass = Pass {
            rope: rope_t.as_ref(),
            start,
            keep,
            pad,
            segments: None,
        };
        let mut out = self.blocks(x, &pass, cache.as_deref_mut());
        if let Some(c) = cache {
            c.len += len;
        }
        let last = out.len() - 1;
        out[last] = self.norm_f.forward(out[last].clone());
        if meta > 0 {
            out = match (&counts, padded) {
                // Back to the tokens' own layout: [padding | tokens].
                (Some(counts), true) => {
                    let idx = layout_index(counts, 0, s, |t, np| if t < np { t } else { t + meta });
                    out.into_iter()
                        .map(|t| t.gather(1, index3(idx.clone(), b, s, h, &device)))
                        .collect()
                }
                _ => out.into_iter().map(|t| t.narrow(1, meta, s)).collect(),
            };
        }
        out
    }

    /// The tokens' embeddings `[batch, seq, hidden]` in the compute dtype.
    pub(super) fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = ids.dims();
        let x = self.embeddings.val().select(0, ids.reshape([b * s]));
        crate::layers::to_dtype(
            x.reshape([b, s, self.config.hidden_size]),
            self.compute_dtype,
        )
    }

    /// RoPE's tables at `positions`, in the compute dtype as the attention's q and k (the
    /// angles stay f32).
    pub(super) fn rope_at(&self, theta: f64, positions: Tensor<2, Int>) -> rope::RopeTables {
        match &self.rope_freq {
            Some(f) => rope::tables_with(f, positions, self.compute_dtype),
            None => {
                let device = positions.device();
                let d = self.config.attn.head_dim;
                rope::tables(theta, d, positions, self.compute_dtype, &device)
            }
        }
    }

    /// Every layer's input and the last layer's output (before the final norm), from `x`
    /// `[batch, len, hidden]`.
    pub(super) fn blocks(
        &self,
        mut x: Tensor<3>,
        pass: &Pass,
        mut cache: Option<&mut HybridCache>,
    ) -> Vec<Tensor<3>> {
        let docs = pass.segments.clone().map(Documents::new);
        let keep = &pass.keep;
        let mut out = vec![x.clone()];
        for (i, block) in self.layers.iter().enumerate() {
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let y = block.norm.forward(x.clone());
            let y = match (&block.mixer, state) {
                (Mixer::Mamba2(m), Some(LayerState::Ssm(st))) => {
                    m.forward_masked(y, Some(st), keep.clone(), docs.as_ref())
                }
                (Mixer::Mamba2(m), _) => m.forward_masked(y, None, None, docs.as_ref()),
                (Mixer::DeltaNet(m), Some(LayerState::Delta(st))) => {
                    m.forward(zero_padding(y, keep), Some(st), docs.as_ref())
                }
                (Mixer::DeltaNet(m), _) => m.forward(y, None, docs.as_ref()),
                (Mixer::GatedDeltaNet(m), Some(LayerState::Delta(st))) => {
                    m.forward(zero_padding(y, keep), Some(st), docs.as_ref())
                }
                (Mixer::GatedDeltaNet(m), _) => m.forward(y, None, docs.as_ref()),
                (Mixer::Attention(a), state) => {
                    let cache = match state {
                        Some(LayerState::Kv(kv)) => Some((kv, CacheSlot::At(pass.start))),
                        _ => None,
                    };
                    let mut ctx = AttnContext {
                        cache,
                        key_pad: pass.pad.clone(),
                        segments: pass.segments.clone(),
                        dense: self.dense_attention,
                        masks: Default::default(),
                    };
                    a.forward(y, pass.rope, &mut ctx)
                }
                (Mixer::Mlp(m), _) => m.forward(y),
                (Mixer::Ffn(f), _) => f.forward(y),
            };
            x = x + y;
            out.push(x.clone());
        }
        out
    }

    /// Training FLOPs per token at sequence length `seq`: 6 × (the layers' parameters plus
    /// the head's hidden × vocab, counted even when tied) plus 12 · heads · head_dim · seq per
    /// attention layer. The scans' own work (O(chunk) per token in Mamba2 and DeltaNet
    /// layers) is not counted, so MFU from this is a lower bound.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let layers: usize = self.layers.iter().map(|b| b.num_params()).sum();
        let c = &self.config;
        let attn = c
            .layers
            .iter()
            .filter(|k| **k == LayerKind::Attention)
            .count();
        let head = c.vocab_size * c.hidden_size;
        6.0 * (layers + head) as f64
            + 12.0 * (attn * c.attn.heads * c.attn.head_dim) as f64 * seq as f64
    }

    /// Logits `[batch, seq, vocab]`; with a cache, the tokens continue it.
    pub fn forward(&self, input_ids: Tensor<2, Int>, cache: Option<&mut HybridCache>) -> Tensor<3> {
        let h = self.final_hidden(input_ids, cache);
        crate::layers::linear::linear(h, self.head_weight(), None)
    }

    /// The final norm's output `[batch, seq, hidden]`, for losses that apply the head
    /// themselves.
    pub fn final_hidden(
        &self,
        input_ids: Tensor<2, Int>,
        cache: Option<&mut HybridCache>,
    ) -> Tensor<3> {
        self.hidden_states(input_ids, cache)
            .pop()
            .expect("at least the embeddings")
    }

    /// The head's matrix, `[vocab, hidden]`: the embedding when tied.
    /// With `logit_norm`, every row divided by its norm, so that the logits are too.
    pub fn head_weight(&self) -> Tensor<2> {
        let w = match &self.lm_head {
            Some(h) => h.weight.val(),
            None => self.embeddings.val(),
        };
        if self.config.logit_norm {
            let norms = w.clone().square().sum_dim(1).sqrt();
            w / norms
        } else {
            w
        }
    }
}

impl crate::decode_graph::GraphDecode for HybridLM {
    /// One token per row through every layer: attention writes its keys at the column `col`
    /// and reads the whole cache under `key_mask`; the recurrent layers advance their states
    /// in their own buffers.
    fn decode_step(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        col: Tensor<1, Int>,
        key_mask: Tensor<2, Bool>,
        cache: &mut HybridCache,
    ) -> Tensor<2> {
        let [b, _] = ids.dims();
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let x = self.embeddings.val().select(0, ids.reshape([b]));
        let mut x = crate::layers::to_dtype(x.reshape([b, 1, h]), self.compute_dtype);
        let rope_t = cache
            .rope_freq
            .as_ref()
            .map(|f| rope::tables_with(f, positions, self.compute_dtype));
        for (block, state) in self.layers.iter().zip(&mut cache.layers) {
            let y = block.norm.forward(x.clone());
            let y = match (&block.mixer, state) {
                (Mixer::Mamba2(m), LayerState::Ssm(st)) => {
                    st.advance_in_place(|st| m.forward_masked(y, Some(st), None, None))
                }
                (Mixer::DeltaNet(m), LayerState::Delta(st)) => {
                    st.advance_in_place(|st| m.forward(y, Some(st), None))
                }
                (Mixer::GatedDeltaNet(m), LayerState::Delta(st)) => {
                    st.advance_in_place(|st| m.forward(y, Some(st), None))
                }
                (Mixer::Attention(a), LayerState::Kv(kv)) => {
                    let mut ctx = AttnContext {
                        cache: Some((kv, CacheSlot::Device(Box::new(col.clone())))),
                        key_pad: Some(key_mask.clone()),
                        segments: None,
                        dense: false,
                        masks: Default::default(),
                    };
                    a.forward(y, rope_t.as_ref(), &mut ctx)
                }
                (Mixer::Mlp(m), _) => m.forward(y),
                (Mixer::Ffn(f), _) => f.forward(y),
                (_, _) => unreachable!("a hybrid cache has one state per layer, of its kind"),
            };
            x = x + y;
        }
        let x = self.norm_f.forward(x);
        crate::layers::linear::linear(x, self.head_weight(), None).reshape([b, vocab])
    }

    /// The meta tokens, which the prefill puts after a row's padding (`hidden_states_at`).
    fn prefix_tokens(&self) -> usize {
        self.memory
            .as_ref()
            .map_or(0, |_| self.config.memory_tokens)
    }

    fn save_state(cache: &HybridCache) -> Vec<RecurrentState> {
        cache.recurrent().map(|s| s.snapshot()).collect()
    }

    fn restore_state(cache: &mut HybridCache, saved: Vec<RecurrentState>) {
        for (s, saved) in cache.recurrent_mut().zip(saved) {
            s.restore(saved);
        }
    }
}

impl crate::generate::CausalLm for HybridLM {
    type Cache = HybridCache;

    fn device(&self) -> Device {
        self.embeddings.val().device()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn new_cache(
        &self,
        batch: usize,
        max_len: usize,
        key_pad: Option<Tensor<2, burn::tensor::Bool>>,
    ) -> HybridCache {
        let mut c = HybridLM::new_cache(self, batch, max_len, &self.embeddings.val().device());
        c.pad = key_pad;
        c
    }

    fn step(
        &self,
        ids: Tensor<2, Int>,
        _positions: Tensor<2, Int>,
        cache: &mut HybridCache,
    ) -> Tensor<2> {
        let h = self
            .hidden_states_at(ids, Some(cache))
            .pop()
            .expect("at least the embeddings");
        let [b, s, _] = h.dims();
        let last = h.narrow(1, s - 1, 1);
        let logits = crate::layers::linear::linear(last, self.head_weight(), None);
        logits.reshape([b, self.config.vocab_size])
    }

    fn keep_rows(cache: &mut HybridCache, idx: &Tensor<1, Int>) {
        cache.select_rows(idx);
    }
}
