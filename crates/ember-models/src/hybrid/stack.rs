//! A hybrid decoder: embeddings, residual blocks `x + mixer(norm(x))` whose mixer is a
//! Mamba2 SSM, attention or an MLP in the order the config gives, a final norm and the LM
//! head. It loads and saves transformers' `Mamba2ForCausalLM` (every layer Mamba2) and
//! `NemotronHForCausalLM` (`layers_block_type` or `hybrid_override_pattern`), whose tensors
//! share the `backbone.*` naming.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor};
use serde_json::Value;

use super::mamba2::{Mamba2Dims, Mamba2Mixer, Mamba2State};
use crate::hf::{self, Checkpoint, SaveOptions};
use crate::layers::attention::{Attention, AttnContext, AttnDims, KvCache};
use crate::layers::linear::Linear;
use crate::layers::rms_norm::RmsNorm;
use crate::weights::{export, param, Init, RandomInit, WeightSink, WeightSource};

/// What a layer mixes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Mamba2,
    Attention,
    Mlp,
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
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    /// The config.json it came from, written back on save.
    pub source: Value,
}

/// A float that config.json may spell `{"__float__": "Infinity"}`.
fn float_of(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| match v.get("__float__").and_then(Value::as_str) {
            Some("Infinity") => Some(f64::INFINITY),
            Some("-Infinity") => Some(f64::NEG_INFINITY),
            _ => None,
        })
}

impl HybridConfig {
    /// From a `mamba2` or `nemotron_h` config.json.
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let kind = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let uint = |k: &str, default: Option<usize>| -> Result<usize> {
            match v.get(k) {
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("{origin}: `{k}` must be a non-negative integer")),
                None => default.ok_or_else(|| anyhow!("{origin}: `{k}` is missing")),
            }
        };
        let num = |k: &str, default: f64| v.get(k).and_then(float_of).unwrap_or(default);
        let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
        let hidden = uint("hidden_size", None)?;
        let limit = |min: f64| {
            let l = v.get("time_step_limit").and_then(Value::as_array);
            let hi = l
                .and_then(|a| a.get(1))
                .and_then(float_of)
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
                    .and_then(float_of)
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
            other => bail!("{origin}: model_type `{other}` is not a hybrid (mamba2, nemotron_h)"),
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
        Ok(Self {
            vocab_size: uint("vocab_size", None)?,
            hidden_size: hidden,
            layers,
            eps: num("layer_norm_epsilon", 1e-5),
            mamba,
            attn,
            intermediate_size: uint("intermediate_size", Some(4 * hidden))?,
            mlp_bias: flag("mlp_bias", false),
            tie_word_embeddings: flag("tie_word_embeddings", false),
            initializer_range: num("initializer_range", 0.02),
            source: v.clone(),
        })
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

#[derive(Module, Debug)]
pub enum Mixer {
    Mamba2(Mamba2Mixer),
    Attention(Attention),
    Mlp(Relu2Mlp),
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
    Kv(KvCache),
    None,
}

/// The state a hybrid model decodes from: one entry per layer, and the tokens seen.
#[derive(Debug)]
pub struct HybridCache {
    pub layers: Vec<LayerState>,
    pub len: usize,
}

#[derive(Module, Debug)]
pub struct HybridLM {
    pub embeddings: Param<Tensor<2>>,
    pub layers: Vec<Block>,
    pub norm_f: RmsNorm,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: HybridConfig,
}

impl HybridLM {
    pub fn load(config: HybridConfig, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, std) = (c.hidden_size, c.initializer_range);
        let embeddings = param(
            src,
            "backbone.embeddings.weight",
            [c.vocab_size, h],
            Init::Normal(std),
            device,
        )?;
        let layers = c
            .layers
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let p = format!("backbone.layers.{i}");
                let mixer = match kind {
                    LayerKind::Mamba2 => Mixer::Mamba2(Mamba2Mixer::load(
                        src,
                        &format!("{p}.mixer"),
                        c.mamba,
                        std,
                        device,
                    )?),
                    LayerKind::Attention => Mixer::Attention(Attention::load_plain(
                        src,
                        &format!("{p}.mixer"),
                        c.attn,
                        std,
                        device,
                    )?),
                    LayerKind::Mlp => Mixer::Mlp(Relu2Mlp {
                        up_proj: Linear::load(
                            src,
                            &format!("{p}.mixer.up_proj"),
                            h,
                            c.intermediate_size,
                            c.mlp_bias,
                            std,
                            device,
                        )?,
                        down_proj: Linear::load(
                            src,
                            &format!("{p}.mixer.down_proj"),
                            c.intermediate_size,
                            h,
                            c.mlp_bias,
                            std,
                            device,
                        )?,
                    }),
                };
                Ok(Block {
                    norm: RmsNorm::load(src, &format!("{p}.norm.weight"), h, c.eps, device)?,
                    mixer,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::load(src, "backbone.norm_f.weight", h, c.eps, device)?;
        let lm_head = (!c.tie_word_embeddings)
            .then(|| Linear::load(src, "lm_head", h, c.vocab_size, false, std, device))
            .transpose()?;
        Ok(Self {
            embeddings,
            layers,
            norm_f,
            lm_head,
            config,
        })
    }

    pub fn random(config: HybridConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::load(config, &mut RandomInit::new(seed), device)
    }

    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        let v = hf::read_config(dir)?;
        let config = HybridConfig::from_value(&v, &dir.join(hf::CONFIG).display().to_string())?;
        let mut ckpt = Checkpoint::open(dir)?;
        let model = Self::load(config, &mut ckpt, device)?;
        ckpt.finish(&["lm_head.weight"])?;
        Ok(model)
    }

    pub fn weights(&self) -> WeightSink {
        let mut out = Vec::new();
        export(&mut out, "backbone.embeddings.weight", &self.embeddings);
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("backbone.layers.{i}");
            b.norm.save(&format!("{p}.norm.weight"), &mut out);
            match &b.mixer {
                Mixer::Mamba2(m) => m.save(&format!("{p}.mixer"), &mut out),
                Mixer::Attention(a) => a.save(&format!("{p}.mixer"), &mut out),
                Mixer::Mlp(m) => {
                    m.up_proj.save(&format!("{p}.mixer.up_proj"), &mut out);
                    m.down_proj.save(&format!("{p}.mixer.down_proj"), &mut out);
                }
            }
        }
        self.norm_f.save("backbone.norm_f.weight", &mut out);
        if let Some(h) = &self.lm_head {
            h.save("lm_head", &mut out);
        }
        out
    }

    pub fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        hf::save(dir, &self.config.source, self.weights(), opts)
    }

    /// An empty decoding state for `batch` rows of up to `max_len` tokens.
    pub fn new_cache(&self, batch: usize, max_len: usize, device: &Device) -> HybridCache {
        let c = &self.config;
        let layers = c
            .layers
            .iter()
            .map(|k| match k {
                LayerKind::Mamba2 => LayerState::Ssm(Mamba2State::zeros(&c.mamba, batch, device)),
                LayerKind::Attention => LayerState::Kv(KvCache::new(
                    batch,
                    c.attn.kv_heads,
                    max_len,
                    c.attn.head_dim,
                    self.embeddings.val().dtype(),
                    device,
                )),
                LayerKind::Mlp => LayerState::None,
            })
            .collect();
        HybridCache { layers, len: 0 }
    }

    /// Every layer's input and the final norm's output (transformers' `hidden_states`).
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        mut cache: Option<&mut HybridCache>,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let h = self.config.hidden_size;
        let mut x = self
            .embeddings
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, h]);
        let start = cache.as_ref().map_or(0, |c| c.len);
        let mut out = vec![x.clone()];
        for (i, block) in self.layers.iter().enumerate() {
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let y = block.norm.forward(x.clone());
            let y = match (&block.mixer, state) {
                (Mixer::Mamba2(m), Some(LayerState::Ssm(st))) => m.forward(y, Some(st)),
                (Mixer::Mamba2(m), _) => m.forward(y, None),
                (Mixer::Attention(a), state) => {
                    let cache = match state {
                        Some(LayerState::Kv(kv)) => Some((kv, start)),
                        _ => None,
                    };
                    let mut ctx = AttnContext {
                        cache,
                        key_pad: None,
                        block: None,
                    };
                    a.forward(y, None, &mut ctx)
                }
                (Mixer::Mlp(m), _) => m.forward(y),
            };
            x = x + y;
            out.push(x.clone());
        }
        if let Some(c) = cache {
            c.len += s;
        }
        let last = out.len() - 1;
        out[last] = self.norm_f.forward(x);
        out
    }

    /// Logits `[batch, seq, vocab]`; with a cache, the tokens continue it.
    pub fn forward(&self, input_ids: Tensor<2, Int>, cache: Option<&mut HybridCache>) -> Tensor<3> {
        let h = self
            .hidden_states(input_ids, cache)
            .pop()
            .expect("at least the embeddings");
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => crate::layers::linear::linear(h, self.embeddings.val(), None),
        }
    }
}
