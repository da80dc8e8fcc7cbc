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
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use serde_json::{json, Value};

use crate::hf::{self, SaveOptions};
use crate::layers::attention::{document_block, flash_block};
use crate::layers::flash;
use crate::layers::linear::{linear, Linear};
use crate::layers::rope;
use crate::layers::to_dtype;
use crate::weights::{export, param, Init, RandomInit, WeightSink, WeightSource};

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
    pub max_position_embeddings: usize,
    /// The rest of the config.json it came from (special token ids, dropout, ...), written
    /// back unchanged on save.
    pub extra: serde_json::Map<String, Value>,
}

impl ModernBertConfig {
    /// The config.json keys a recipe's `[model]` may set for this architecture.
    pub const KNOWN_FIELDS: &'static [&'static str] = &[
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "norm_eps",
        "norm_bias",
        "attention_bias",
        "mlp_bias",
        "classifier_bias",
        "decoder_bias",
        "layer_types",
        "global_attn_every_n_layers",
        "local_attention",
        "global_rope_theta",
        "local_rope_theta",
        "initializer_range",
        "pad_token_id",
        "max_position_embeddings",
        "tie_word_embeddings",
    ];

    /// From an HF `config.json` (`layer_types`, or `global_attn_every_n_layers`; RoPE thetas
    /// from `rope_parameters` or the older `global_rope_theta` / `local_rope_theta`).
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let f = hf::Fields::new(v, origin);
        let usize_of = |k: &str, default: Option<usize>| f.usize(k, default);
        let bool_of = |k: &str, default: bool| f.bool(k, default);
        let f64_of = |k: &str, default: f64| f.f64(k, default);
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
            max_position_embeddings: usize_of("max_position_embeddings", Some(8192))?,
            extra: v.as_object().cloned().unwrap_or_default(),
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

    /// Records a tokenizer's document separator as the config's cls/sep/bos/eos and padding
    /// id, so transformers' checks and pipelines see ids inside the vocabulary.
    pub fn set_separator(&mut self, id: u32) {
        self.pad_token_id = id;
        for k in [
            "bos_token_id",
            "eos_token_id",
            "cls_token_id",
            "sep_token_id",
        ] {
            self.extra.insert(k.into(), id.into());
        }
    }

    /// As transformers' config.json (its current names, with the older RoPE keys too).
    pub fn to_value(&self) -> Value {
        let mut v = self.extra.clone();
        v.remove("global_attn_every_n_layers");
        let types: Vec<&str> = self
            .global_layers
            .iter()
            .map(|&g| {
                if g {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        let fields = json!({
            "model_type": "modernbert",
            "architectures": ["ModernBertForMaskedLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "norm_eps": self.norm_eps,
            "norm_bias": self.norm_bias,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "classifier_bias": self.classifier_bias,
            "decoder_bias": self.decoder_bias,
            "hidden_activation": "gelu",
            "classifier_activation": "gelu",
            "layer_types": types,
            "local_attention": self.local_attention,
            "global_rope_theta": self.global_rope_theta,
            "local_rope_theta": self.local_rope_theta,
            "rope_parameters": {
                "full_attention": {"rope_theta": self.global_rope_theta, "rope_type": "default"},
                "sliding_attention": {"rope_theta": self.local_rope_theta, "rope_type": "default"},
            },
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": true,
        });
        v.extend(fields.as_object().expect("an object").clone());
        Value::Object(v)
    }

    pub fn num_params(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let norm = if self.norm_bias { 2 * h } else { h };
        let layer = 4 * h * h + 3 * h * i + 2 * norm;
        v * h + self.num_hidden_layers * layer - norm // layer 0 has no attention norm
            + norm // embedding norm
            + norm // final norm
            + h * h + norm // head
            + if self.decoder_bias { v } else { 0 }
    }

    /// Training FLOPs per token at sequence length `seq`: 6 × the matmul parameters plus
    /// attention (12 · layers · hidden · seq, as for a decoder without the causal halving).
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        let (h, i) = (self.hidden_size as f64, self.intermediate_size as f64);
        let matmul = self.num_hidden_layers as f64 * (4.0 * h * h + 3.0 * h * i)
            + h * h
            + self.vocab_size as f64 * h;
        6.0 * matmul + 12.0 * self.num_hidden_layers as f64 * h * seq as f64
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

    fn save(&self, prefix: &str, out: &mut WeightSink) {
        export(out, &format!("{prefix}.weight"), &self.weight);
        if let Some(b) = &self.bias {
            export(out, &format!("{prefix}.bias"), b);
        }
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
        mask: &LayerMask,
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
        let attn = match mask {
            LayerMask::Additive(mask) => {
                let scores = q.matmul(k.swap_dims(2, 3)) * (d as f64).powf(-0.5) + mask.clone();
                softmax(scores, 3).matmul(v)
            }
            LayerMask::Blocked(spec) => flash::attention(q, k, v, spec, flash_block()),
        };
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

/// How a layer's attention is masked: a dense additive mask (inference, parity with
/// transformers' eager path), or a described one for the blocked training attention.
// Two of these exist per forward pass, so their size does not matter.
#[allow(clippy::large_enum_variant)]
enum LayerMask {
    Additive(Tensor<4>),
    Blocked(flash::MaskSpec),
}

/// Which keys each query sees, for every layer.
enum Visibility {
    /// `[batch, queries, keys]`, true where visible.
    Dense(Tensor<3, Bool>),
    /// Packed rows: every key of the query's document (`None`: the whole row).
    Documents(Option<Tensor<2, Int>>),
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
    /// Activations and matmuls run in this dtype; parameters keep their own.
    #[module(skip)]
    pub compute_dtype: DType,
    /// Train with Burn's dense attention (O(seq²) memory) instead of the blocked one, to
    /// compare the two.
    #[module(skip)]
    pub dense_attention: bool,
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
            compute_dtype: DType::F32,
            dense_attention: false,
        })
    }

    /// A freshly initialised model (normal(0, initializer_range) matrices, unit norms).
    pub fn random(config: ModernBertConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::load(config, &mut RandomInit::new(seed), device)
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

    /// Every parameter under its transformers name (the tied decoder weight is not stored).
    pub fn weights(&self) -> WeightSink {
        let mut out = Vec::new();
        export(
            &mut out,
            "model.embeddings.tok_embeddings.weight",
            &self.tok_embeddings,
        );
        self.embed_norm.save("model.embeddings.norm", &mut out);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            if let Some(n) = &l.attn_norm {
                n.save(&format!("{p}.attn_norm"), &mut out);
            }
            l.wqkv.save(&format!("{p}.attn.Wqkv"), &mut out);
            l.wo.save(&format!("{p}.attn.Wo"), &mut out);
            l.mlp_norm.save(&format!("{p}.mlp_norm"), &mut out);
            l.wi.save(&format!("{p}.mlp.Wi"), &mut out);
            l.mlp_wo.save(&format!("{p}.mlp.Wo"), &mut out);
        }
        self.final_norm.save("model.final_norm", &mut out);
        self.head_dense.save("head.dense", &mut out);
        self.head_norm.save("head.norm", &mut out);
        if let Some(b) = &self.decoder_bias {
            export(&mut out, "decoder.bias", b);
        }
        out
    }

    /// Writes an HF directory that transformers' `ModernBertForMaskedLM` loads.
    pub fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        hf::save(dir, &self.config.to_value(), self.weights(), opts)
    }

    /// Loads an HF directory (config.json + safetensors).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        // The tied decoder's weight is the embedding matrix.
        hf::load_dir(
            dir,
            ModernBertConfig::from_value,
            |c, ckpt| Self::load(c, ckpt, device),
            &["decoder.weight"],
        )
    }

    /// The additive masks `[batch, 1, seq, seq]` of the global and the local layers from
    /// where a query may see a key: 0 there, f32::MIN elsewhere; a local layer also needs
    /// |i − j| ≤ `local_attention / 2`.
    fn masks(&self, visible: Tensor<3, Bool>) -> (Tensor<4>, Tensor<4>) {
        let [b, s, _] = visible.dims();
        let device = visible.device();
        let idx = Tensor::<1, Int>::arange(0..s as i64, &device);
        let dist = (idx.clone().reshape([s, 1]) - idx.reshape([1, s])).abs();
        let half = (self.config.local_attention / 2) as i64;
        let window = dist
            .lower_equal_elem(half)
            .reshape([1, s, s])
            .expand([b, s, s]);
        let local = visible.clone().bool_and(window);
        let additive = |v: Tensor<3, Bool>| {
            Tensor::<3>::zeros([b, s, s], &device)
                .mask_fill(v.bool_not(), f32::MIN)
                .unsqueeze_dim::<4>(1)
        };
        (additive(visible), additive(local))
    }

    /// The global and the local layers' masks. Training (`tracked`) on packed rows uses the
    /// blocked attention, whose masks are described rather than built.
    fn layer_masks(
        &self,
        visible: Visibility,
        tracked: bool,
        [b, s]: [usize; 2],
    ) -> (LayerMask, LayerMask) {
        let visible = match visible {
            Visibility::Documents(segments) if tracked && !self.dense_attention => {
                let spec = |window| flash::MaskSpec {
                    causal: false,
                    window,
                    segments: segments.clone(),
                    key_pad: None,
                    cache: Default::default(),
                };
                let half = self.config.local_attention / 2;
                return (
                    LayerMask::Blocked(spec(None)),
                    LayerMask::Blocked(spec(Some(half))),
                );
            }
            Visibility::Documents(Some(seg)) => document_block(seg).bool_not(),
            Visibility::Documents(None) => {
                Tensor::<3, Bool>::full([b, s, s], true, &self.tok_embeddings.val().device())
            }
            Visibility::Dense(v) => v,
        };
        let (global, local) = self.masks(visible);
        (LayerMask::Additive(global), LayerMask::Additive(local))
    }

    /// Every layer's input and the final norm's output (the last entry), as transformers'
    /// `hidden_states`, for a padded batch: every query sees the valid keys, as in
    /// transformers' eager path.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let visible = attention_mask
            .equal_elem(0)
            .bool_not()
            .reshape([b, 1, s])
            .expand([b, s, s]);
        let pos = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        self.layers_out(input_ids, pos, Visibility::Dense(visible))
    }

    fn layers_out(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        visible: Visibility,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let c = &self.config;
        let x = self
            .tok_embeddings
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, c.hidden_size]);
        let mut x = self.embed_norm.forward(to_dtype(x, self.compute_dtype));
        let (global_mask, local_mask) = self.layer_masks(visible, x.is_tracked(), [b, s]);
        let d = c.head_dim();
        let global_rope = rope::tables(
            c.global_rope_theta,
            d,
            positions.clone(),
            DType::F32,
            &device,
        );
        let local_rope = rope::tables(c.local_rope_theta, d, positions, DType::F32, &device);
        let mut out = vec![x.clone()];
        for layer in &self.layers {
            let (t, m) = if layer.global {
                (&global_rope, &global_mask)
            } else {
                (&local_rope, &local_mask)
            };
            x = layer.forward(x, c.num_attention_heads, t, m);
            out.push(x.clone());
        }
        let last = out.len() - 1;
        out[last] = self.final_norm.forward(x);
        out
    }

    /// Final hidden states `[rows, seq, hidden]` of packed rows: `segments` (when given)
    /// numbers the documents of a row, and a token sees only its own document; `positions`
    /// restart at each document. The training path.
    pub fn encode_packed(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let visible = Visibility::Documents(segments);
        self.layers_out(input_ids, positions, visible)
            .pop()
            .expect("at least the embeddings")
    }

    /// MLM logits `[valid tokens, vocab]` of a padded batch, computed without the padding:
    /// the valid tokens of all rows are packed, first fit, into rows no longer than the
    /// longest sequence, each sequence its own document. Equals [`ModernBert::forward`] at
    /// the valid positions, in row-major order.
    pub fn forward_unpadded(
        &self,
        input_ids: &[Vec<i64>],
        attention_mask: &[Vec<i64>],
    ) -> Tensor<2> {
        let device = self.tok_embeddings.val().device();
        let seqs: Vec<Vec<i64>> = input_ids
            .iter()
            .zip(attention_mask)
            .map(|(ids, m)| {
                ids.iter()
                    .zip(m)
                    .filter(|(_, &m)| m != 0)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect();
        let width = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // First fit: row r holds the sequences placed in it, in order.
        let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, q) in seqs.iter().enumerate().filter(|(_, q)| !q.is_empty()) {
            match rows.iter_mut().find(|(used, _)| used + q.len() <= width) {
                Some((used, members)) => {
                    *used += q.len();
                    members.push(i);
                }
                None => rows.push((q.len(), vec![i])),
            }
        }
        let r = rows.len().max(1);
        let (mut ids, mut pos, mut seg) = (
            vec![0i64; r * width],
            vec![0i64; r * width],
            vec![-1i64; r * width],
        );
        // Where each sequence's tokens landed (flat index), in input order.
        let mut place = vec![Vec::new(); seqs.len()];
        for (row, (_, members)) in rows.iter().enumerate() {
            let mut at = row * width;
            for (doc, &i) in members.iter().enumerate() {
                for (p, &t) in seqs[i].iter().enumerate() {
                    ids[at] = t;
                    pos[at] = p as i64;
                    seg[at] = doc as i64;
                    place[i].push(at as i64);
                    at += 1;
                }
            }
        }
        let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [r, width]), &device);
        let h = self.encode_packed(t(ids), t(pos), Some(t(seg)));
        let order: Vec<i64> = place.into_iter().flatten().collect();
        let n = order.len();
        let h = h.reshape([r * width, self.config.hidden_size]).select(
            0,
            Tensor::<1, Int>::from_data(TensorData::new(order, [n]), &device),
        );
        self.mlm_logits(h.unsqueeze::<3>()).squeeze_dim(0)
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
