//! ModernBERT (transformers `ModernBertForMaskedLM`): a pre-norm bidirectional encoder with
//! a fused `Wqkv`, no biases, GeGLU MLPs, global attention every
//! `global_attn_every_n_layers`-th layer and sliding-window attention (|i − j| ≤
//! `local_attention / 2`) elsewhere, RoPE with a theta per layer kind, and a tied MLM head
//! (dense → GELU → LayerNorm → embeddingsᵀ + bias).
//!
//! Attention follows transformers' eager path: scores in f32 plus an additive mask whose
//! masked entries are f32::MIN, a finite value, so a padded query whose whole window is
//! padding averages every key uniformly instead of producing NaN.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use serde_json::Value;

use crate::hf::{self, Checkpoint};
use crate::layers::linear::{linear, Linear};
use crate::layers::rope;
use crate::layers::to_dtype;
use crate::weights::{param, Init, WeightSource};

#[derive(Debug, Clone, PartialEq)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub norm_eps: f64,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub classifier_bias: bool,
    pub decoder_bias: bool,
    /// True where layer i attends globally.
    pub global_layers: Vec<bool>,
    /// The total local window: a local layer sees |i − j| ≤ local_attention / 2.
    pub local_attention: usize,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    pub initializer_range: f64,
    pub pad_token_id: u32,
}

impl ModernBertConfig {
    /// From an HF `config.json` (`layer_types`, or `global_attn_every_n_layers`; RoPE thetas
    /// from `rope_parameters` or the older `global_rope_theta` / `local_rope_theta`).
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let usize_of = |k: &str, default: Option<usize>| -> Result<usize> {
            match v.get(k) {
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("{origin}: `{k}` must be a non-negative integer")),
                None => default.ok_or_else(|| anyhow!("{origin}: `{k}` is missing")),
            }
        };
        let bool_of = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
        let f64_of = |k: &str, default: f64| v.get(k).and_then(Value::as_f64).unwrap_or(default);
        let layers = usize_of("num_hidden_layers", None)?;
        let global_layers = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != layers {
                    bail!(
                        "{origin}: `layer_types` has {} entries for {layers} layers",
                        types.len()
                    );
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(true),
                        Some("sliding_attention") => Ok(false),
                        _ => Err(anyhow!("{origin}: unknown layer type {t} in `layer_types`")),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => {
                let every = usize_of("global_attn_every_n_layers", Some(3))?.max(1);
                (0..layers).map(|i| i % every == 0).collect()
            }
        };
        let theta = |kind: &str, legacy: &str, default: f64| {
            v.pointer(&format!("/rope_parameters/{kind}/rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or_else(|| f64_of(legacy, default))
        };
        let c = Self {
            vocab_size: usize_of("vocab_size", None)?,
            hidden_size: usize_of("hidden_size", None)?,
            intermediate_size: usize_of("intermediate_size", None)?,
            num_hidden_layers: layers,
            num_attention_heads: usize_of("num_attention_heads", None)?,
            norm_eps: f64_of("norm_eps", 1e-5),
            norm_bias: bool_of("norm_bias", false),
            attention_bias: bool_of("attention_bias", false),
            mlp_bias: bool_of("mlp_bias", false),
            classifier_bias: bool_of("classifier_bias", false),
            decoder_bias: bool_of("decoder_bias", true),
            global_layers,
            local_attention: usize_of("local_attention", Some(128))?,
            global_rope_theta: theta("full_attention", "global_rope_theta", 160_000.0),
            local_rope_theta: theta("sliding_attention", "local_rope_theta", 10_000.0),
            initializer_range: f64_of("initializer_range", 0.02),
            pad_token_id: usize_of("pad_token_id", Some(0))? as u32,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "{origin}: `hidden_size` {} is not a multiple of `num_attention_heads` {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        if !bool_of("tie_word_embeddings", true) {
            bail!("{origin}: untied MLM decoders are not supported (tie_word_embeddings = false)");
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// LayerNorm over the last dimension, in f32, with an optional bias.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub eps: f64,
}

impl LayerNorm {
    fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        c: &ModernBertConfig,
        device: &Device,
    ) -> Result<Self> {
        let n = c.hidden_size;
        let bias = if c.norm_bias {
            Some(param(
                src,
                &format!("{prefix}.bias"),
                [n],
                Init::Zeros,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            weight: param(src, &format!("{prefix}.weight"), [n], Init::Ones, device)?,
            bias,
            eps: c.norm_eps,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let x = to_dtype(x, DType::F32);
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        let y = centred / (var + self.eps).sqrt();
        let y = y * self.weight.val().unsqueeze::<3>();
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<3>(),
            None => y,
        };
        to_dtype(y, dtype)
    }
}

#[derive(Module, Debug)]
pub struct EncoderLayer {
    /// None for layer 0, whose attention norm is the identity.
    pub attn_norm: Option<LayerNorm>,
    pub wqkv: Linear,
    pub wo: Linear,
    pub mlp_norm: LayerNorm,
    pub wi: Linear,
    pub mlp_wo: Linear,
    pub global: bool,
}

impl EncoderLayer {
    fn load(
        src: &mut dyn WeightSource,
        c: &ModernBertConfig,
        i: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, std) = (c.hidden_size, c.initializer_range);
        Ok(Self {
            attn_norm: (i > 0)
                .then(|| LayerNorm::load(src, &format!("{p}.attn_norm"), c, device))
                .transpose()?,
            wqkv: Linear::load(
                src,
                &format!("{p}.attn.Wqkv"),
                h,
                3 * h,
                c.attention_bias,
                std,
                device,
            )?,
            wo: Linear::load(
                src,
                &format!("{p}.attn.Wo"),
                h,
                h,
                c.attention_bias,
                std,
                device,
            )?,
            mlp_norm: LayerNorm::load(src, &format!("{p}.mlp_norm"), c, device)?,
            wi: Linear::load(
                src,
                &format!("{p}.mlp.Wi"),
                h,
                2 * c.intermediate_size,
                c.mlp_bias,
                std,
                device,
            )?,
            mlp_wo: Linear::load(
                src,
                &format!("{p}.mlp.Wo"),
                c.intermediate_size,
                h,
                c.mlp_bias,
                std,
                device,
            )?,
            global: c.global_layers[i],
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        heads: usize,
        rope_t: &rope::RopeTables,
        mask: Tensor<4>,
    ) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let d = h / heads;
        let normed = match &self.attn_norm {
            Some(n) => n.forward(x.clone()),
            None => x.clone(),
        };
        // [b, s, 3, heads, d] → q, k, v as [b, heads, s, d].
        let qkv = self.wqkv.forward(normed).reshape([b, s, 3, heads, d]);
        let part = |j: usize| {
            qkv.clone()
                .narrow(2, j, 1)
                .reshape([b, s, heads, d])
                .swap_dims(1, 2)
        };
        let dtype = x.dtype();
        let q = rope::apply(to_dtype(part(0), DType::F32), rope_t);
        let k = rope::apply(to_dtype(part(1), DType::F32), rope_t);
        let v = to_dtype(part(2), DType::F32);
        let scores = q.matmul(k.swap_dims(2, 3)) * (d as f64).powf(-0.5) + mask;
        let attn = softmax(scores, 3).matmul(v);
        let attn = to_dtype(attn.swap_dims(1, 2).reshape([b, s, h]), dtype);
        let x = x + self.wo.forward(attn);
        let hidden = self.wi.forward(self.mlp_norm.forward(x.clone()));
        let inter = hidden.dims()[2] / 2;
        let (input, gate) = (
            hidden.clone().narrow(2, 0, inter),
            hidden.narrow(2, inter, inter),
        );
        x.clone() + self.mlp_wo.forward(gelu(input) * gate)
    }
}

#[derive(Module, Debug)]
pub struct ModernBert {
    pub tok_embeddings: Param<Tensor<2>>,
    pub embed_norm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
    pub final_norm: LayerNorm,
    pub head_dense: Linear,
    pub head_norm: LayerNorm,
    pub decoder_bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub config: ModernBertConfig,
}

impl ModernBert {
    pub fn load(
        config: ModernBertConfig,
        src: &mut dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let std = c.initializer_range;
        let tok_embeddings = param(
            src,
            "model.embeddings.tok_embeddings.weight",
            [c.vocab_size, c.hidden_size],
            Init::Normal(std),
            device,
        )?;
        let embed_norm = LayerNorm::load(src, "model.embeddings.norm", c, device)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(src, c, i, device))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(src, "model.final_norm", c, device)?;
        let head_dense = Linear::load(
            src,
            "head.dense",
            c.hidden_size,
            c.hidden_size,
            c.classifier_bias,
            std,
            device,
        )?;
        let head_norm = LayerNorm::load(src, "head.norm", c, device)?;
        let decoder_bias = c
            .decoder_bias
            .then(|| param(src, "decoder.bias", [c.vocab_size], Init::Zeros, device))
            .transpose()?;
        Ok(Self {
            tok_embeddings,
            embed_norm,
            layers,
            final_norm,
            head_dense,
            head_norm,
            decoder_bias,
            config,
        })
    }

    /// Loads an HF directory (config.json + safetensors).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        let v = hf::read_config(dir)?;
        let origin = dir.join(hf::CONFIG).display().to_string();
        let config = ModernBertConfig::from_value(&v, &origin)?;
        let mut ckpt = Checkpoint::open(dir)?;
        let model = Self::load(config, &mut ckpt, device)?;
        // The tied decoder's weight is the embedding matrix.
        ckpt.finish(&["decoder.weight"])?;
        Ok(model)
    }

    /// The additive masks `[batch, 1, seq, seq]` of the global and the local layers: 0 where
    /// a query may see a key, f32::MIN elsewhere (padded keys; outside the local window).
    fn masks(&self, attention_mask: &Tensor<2, Int>) -> (Tensor<4>, Tensor<4>) {
        let [b, s] = attention_mask.dims();
        let device = attention_mask.device();
        let valid: Vec<i64> = attention_mask
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .expect("an integer mask");
        let half = self.config.local_attention / 2;
        let mut global = vec![f32::MIN; b * s * s];
        let mut local = vec![f32::MIN; b * s * s];
        for r in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if valid[r * s + j] == 0 {
                        continue;
                    }
                    let at = (r * s + i) * s + j;
                    global[at] = 0.0;
                    if i.abs_diff(j) <= half {
                        local[at] = 0.0;
                    }
                }
            }
        }
        let t = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, 1, s, s]), &device);
        (t(global), t(local))
    }

    /// Every layer's input and the final norm's output, as transformers' `hidden_states`
    /// (the last entry is after the final norm).
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let c = &self.config;
        let x = self
            .tok_embeddings
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, c.hidden_size]);
        let mut x = self.embed_norm.forward(x);
        let (global_mask, local_mask) = self.masks(&attention_mask);
        let pos = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let d = c.head_dim();
        let global_rope = rope::tables(c.global_rope_theta, d, pos.clone(), DType::F32, &device);
        let local_rope = rope::tables(c.local_rope_theta, d, pos, DType::F32, &device);
        let mut out = vec![x.clone()];
        for layer in &self.layers {
            let (t, m) = if layer.global {
                (&global_rope, global_mask.clone())
            } else {
                (&local_rope, local_mask.clone())
            };
            x = layer.forward(x, c.num_attention_heads, t, m);
            out.push(x.clone());
        }
        let last = out.len() - 1;
        out[last] = self.final_norm.forward(x);
        out
    }

    /// MLM logits `[batch, seq, vocab]` at every position.
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Tensor<3> {
        let h = self
            .hidden_states(input_ids, attention_mask)
            .pop()
            .expect("at least the embeddings");
        self.mlm_logits(h)
    }

    /// The MLM head over final hidden states `[.., hidden]`.
    pub fn mlm_logits(&self, h: Tensor<3>) -> Tensor<3> {
        let h = self.head_norm.forward(gelu(self.head_dense.forward(h)));
        linear(
            h,
            self.tok_embeddings.val(),
            self.decoder_bias.as_ref().map(|b| b.val()),
        )
    }
}
