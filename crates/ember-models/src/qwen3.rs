//! Qwen3 dense decoder, matching `transformers.Qwen3ForCausalLM`.
//!
//! GQA with a `head_dim` independent of `hidden_size / num_attention_heads`, RMSNorm on
//! q and k per head before rotate-half RoPE, SwiGLU MLP, pre-norm residual blocks, and a
//! head that is either its own matrix or the embedding (`tie_word_embeddings`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{Bool, DType, Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::hf::{self, SaveOptions};
use crate::layers::attention::{Attention, AttnContext, AttnDims, CacheSlot, KvCache};
use crate::layers::linear::{linear, Linear};
use crate::layers::mlp::SwiGlu;
use crate::layers::rms_norm::RmsNorm;
use crate::layers::{rope, to_dtype};
use crate::weights::{export, param, Init, RandomInit, WeightSink, WeightSource};

fn default_eps() -> f64 {
    1e-6
}
fn default_std() -> f64 {
    0.02
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    40960
}

/// HF's `Qwen3Config`, field for field. Unknown fields are kept and written back on save.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Hub checkpoints (transformers 4.x) spell θ here...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// ...transformers 5 spells it `rope_parameters.rope_theta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_std")]
    pub initializer_range: f64,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Qwen3Config {
    /// Parses and validates a config.json value; `origin` names the file in errors.
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let ty = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("<missing>");
        if ty != "qwen3" {
            bail!("{origin}: field `model_type` is `{ty}`, expected `qwen3`");
        }
        let c: Self = serde_json::from_value(v.clone())
            .with_context(|| format!("{origin}: invalid Qwen3 config"))?;
        c.validate(origin)?;
        Ok(c)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ] {
            if v == 0 {
                bail!("{origin}: field `{field}` must be positive");
            }
        }
        if self.head_dim == Some(0) {
            bail!("{origin}: field `head_dim` must be positive");
        }
        if self.hidden_act != "silu" {
            bail!(
                "{origin}: field `hidden_act` is `{}`; Qwen3 uses `silu`",
                self.hidden_act
            );
        }
        if self.use_sliding_window {
            bail!("{origin}: field `use_sliding_window` = true is not supported yet");
        }
        for (field, rope) in [
            ("rope_scaling", &self.rope_scaling),
            ("rope_parameters", &self.rope_parameters),
        ] {
            if let Some(t) = rope
                .as_ref()
                .and_then(|r| r.get("rope_type"))
                .and_then(Value::as_str)
            {
                if t != "default" {
                    bail!("{origin}: field `{field}.rope_type` = `{t}` is not supported (only `default`)");
                }
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "{origin}: field `num_key_value_heads` ({}) must divide `num_attention_heads` ({})",
                self.kv_heads(),
                self.num_attention_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "{origin}: field `head_dim` ({}) must be even for RoPE",
                self.head_dim()
            );
        }
        Ok(())
    }

    /// Every config.json field this struct understands (recipes reject anything else).
    pub fn known_fields() -> Vec<String> {
        let full = serde_json::json!({"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 1,
            "rope_theta": 1.0, "rope_parameters": {}, "rope_scaling": {}, "eos_token_id": 0});
        let c: Self = serde_json::from_value(full).expect("complete config parses");
        let mut v: Vec<String> = serde_json::to_value(c)
            .expect("serialises")
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        v.push("model_type".into());
        v
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// End-of-sequence ids (config.json allows one id or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        }
    }

    /// Parameter count, tied head counted once.
    pub fn num_params(&self) -> usize {
        let (h, i, v, d) = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.head_dim(),
        );
        let attn = h * d * (2 * self.num_attention_heads + 2 * self.kv_heads()) + 2 * d;
        let layer = attn + 3 * h * i + 2 * h;
        v * h
            + self.num_hidden_layers * layer
            + h
            + if self.tie_word_embeddings { 0 } else { v * h }
    }

    pub fn to_value(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let obj = v.as_object_mut().expect("object");
        obj.insert("model_type".into(), "qwen3".into());
        obj.insert(
            "architectures".into(),
            serde_json::json!(["Qwen3ForCausalLM"]),
        );
        obj.insert("head_dim".into(), self.head_dim().into());
        obj.insert("num_key_value_heads".into(), self.kv_heads().into());
        v
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: SwiGlu,
}

impl DecoderLayer {
    fn load(
        src: &mut dyn WeightSource,
        c: &Qwen3Config,
        i: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let dims = AttnDims {
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: c.head_dim(),
        };
        let (eps, std) = (c.rms_norm_eps, c.initializer_range);
        Ok(Self {
            input_layernorm: RmsNorm::load(
                src,
                &format!("{p}.input_layernorm.weight"),
                c.hidden_size,
                eps,
                device,
            )?,
            self_attn: Attention::load(
                src,
                &format!("{p}.self_attn"),
                dims,
                c.attention_bias,
                eps,
                std,
                device,
            )?,
            post_attention_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm.weight"),
                c.hidden_size,
                eps,
                device,
            )?,
            mlp: SwiGlu::load(
                src,
                &format!("{p}.mlp"),
                c.hidden_size,
                c.intermediate_size,
                std,
                device,
            )?,
        })
    }

    fn save(&self, i: usize, out: &mut WeightSink) {
        let p = format!("model.layers.{i}");
        self.input_layernorm
            .save(&format!("{p}.input_layernorm.weight"), out);
        self.self_attn.save(&format!("{p}.self_attn"), out);
        self.post_attention_layernorm
            .save(&format!("{p}.post_attention_layernorm.weight"), out);
        self.mlp.save(&format!("{p}.mlp"), out);
    }

    fn forward(
        &self,
        x: Tensor<3>,
        [w_in, w_post]: [Tensor<3>; 2],
        rope_t: &rope::RopeTables,
        ctx: &mut AttnContext,
    ) -> Tensor<3> {
        let x = x.clone()
            + self.self_attn.forward(
                self.input_layernorm.forward_scaled(x, w_in),
                Some(rope_t),
                ctx,
            );
        x.clone()
            + self
                .mlp
                .forward(self.post_attention_layernorm.forward_scaled(x, w_post))
    }
}

#[derive(Module, Debug)]
pub struct Qwen3 {
    pub embed_tokens: Param<Tensor<2>>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: Qwen3Config,
    /// Activations and matmuls run in this dtype; parameters stay in their own (f32 for
    /// training), and are cast inside the ops.
    #[module(skip)]
    pub compute_dtype: DType,
    /// Train with Burn's dense attention (O(seq²) memory) instead of the blocked one, to
    /// compare the two.
    #[module(skip)]
    pub dense_attention: bool,
    /// RoPE's inverse frequencies, kept on the device for a captured training step, which
    /// may not transfer from the host; None uploads them at each forward pass.
    #[module(skip)]
    pub rope_freq: Option<rope::RopeFreq>,
}

/// Per-layer KV caches plus the padding mask of the batch they hold.
#[derive(Debug)]
pub struct Qwen3Cache {
    pub layers: Vec<KvCache>,
    /// `[batch, max_len]`, true where the key is left padding.
    pub key_pad: Option<Tensor<2, Bool>>,
    /// Positions filled so far.
    pub len: usize,
    /// RoPE's inverse frequencies, uploaded once: a captured decode step may not transfer.
    pub rope_freq: rope::RopeFreq,
}

impl Qwen3Cache {
    pub fn max_len(&self) -> usize {
        self.layers.first().map(KvCache::max_len).unwrap_or(0)
    }

    pub fn select_rows(&mut self, idx: &Tensor<1, Int>) {
        for l in &mut self.layers {
            l.select_rows(idx);
        }
        self.key_pad = self.key_pad.take().map(|m| m.select(0, idx.clone()));
    }
}

/// What a forward pass should return besides the logits.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardOptions {
    pub hidden_states: bool,
    /// Compute the head only for the last position (prefill for generation).
    pub last_only: bool,
}

pub struct ForwardOutput {
    /// `[batch, seq, vocab]` (or `[batch, 1, vocab]` with `last_only`).
    pub logits: Tensor<3>,
    /// The embeddings, each layer's output, and the final norm's output, as transformers
    /// returns them (`num_hidden_layers + 1` tensors, the last one after the norm).
    pub hidden_states: Vec<Tensor<3>>,
}

impl Qwen3 {
    pub fn load(config: Qwen3Config, src: &mut dyn WeightSource, device: &Device) -> Result<Self> {
        let c = &config;
        let embed_tokens = param(
            src,
            "model.embed_tokens.weight",
            [c.vocab_size, c.hidden_size],
            Init::Normal(c.initializer_range),
            device,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(src, c, i, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(
            src,
            "model.norm.weight",
            c.hidden_size,
            c.rms_norm_eps,
            device,
        )?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(
                src,
                "lm_head",
                c.hidden_size,
                c.vocab_size,
                false,
                c.initializer_range,
                device,
            )?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
            compute_dtype: DType::F32,
            dense_attention: false,
            rope_freq: None,
        })
    }

    /// A randomly initialised model (normal(0, initializer_range) matrices, unit norms).
    pub fn random(config: Qwen3Config, seed: u64, device: &Device) -> Result<Self> {
        Self::load(config, &mut RandomInit::new(seed), device)
    }

    /// Loads an HF directory (config.json + safetensors, sharded or not).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        // Tied checkpoints sometimes carry a copy of the embedding as lm_head.weight.
        hf::load_dir(
            dir,
            Qwen3Config::from_value,
            |c, ckpt| Self::load(c, ckpt, device),
            &["lm_head.weight"],
        )
    }

    pub fn weights(&self) -> WeightSink {
        let mut out = Vec::new();
        export(&mut out, "model.embed_tokens.weight", &self.embed_tokens);
        for (i, l) in self.layers.iter().enumerate() {
            l.save(i, &mut out);
        }
        self.norm.save("model.norm.weight", &mut out);
        if let Some(h) = &self.lm_head {
            h.save("lm_head", &mut out);
        }
        out
    }

    pub fn save_pretrained(&self, dir: &Path, opts: &SaveOptions) -> Result<()> {
        hf::save(dir, &self.config.to_value(), self.weights(), opts)
    }

    /// Sets the dtype activations run in (f32, or bf16/f16 on devices that support them).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    pub fn new_cache(&self, batch: usize, max_len: usize, device: &Device) -> Qwen3Cache {
        let c = &self.config;
        Qwen3Cache {
            layers: (0..c.num_hidden_layers)
                .map(|_| {
                    KvCache::new(
                        batch,
                        c.kv_heads(),
                        max_len,
                        c.head_dim(),
                        self.compute_dtype,
                        device,
                    )
                })
                .collect(),
            key_pad: None,
            len: 0,
            rope_freq: rope::freq_tensor(c.rope_theta(), c.head_dim(), device),
        }
    }

    /// Plain causal forward over `[batch, seq]` ids at positions `0..seq`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let pos = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        self.forward_with(input_ids, pos, None, None, ForwardOptions::default())
            .logits
    }

    /// The general forward: explicit positions, an optional padding mask over the keys
    /// (`[batch, keys]`, true = pad), and an optional cache to append to.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        key_pad: Option<Tensor<2, Bool>>,
        cache: Option<&mut Qwen3Cache>,
        opts: ForwardOptions,
    ) -> ForwardOutput {
        let cache = cache.map(|c| {
            let at = c.len;
            (c, CacheSlot::At(at))
        });
        let (x, hidden_states) = self.body(input_ids, positions, key_pad, None, cache, opts);
        ForwardOutput {
            logits: self.head(x),
            hidden_states,
        }
    }

    /// The training forward over packed rows: `segments` (`[batch, seq]`, a document id
    /// per token) keeps attention inside each document, as flash-attn's varlen packing does;
    /// `positions` should then restart at each document.
    pub fn forward_packed(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        self.head(self.forward_packed_hidden(input_ids, positions, segments))
    }

    /// [`Self::forward_packed`] without the head: the final norm's output `[batch, seq,
    /// hidden]`, for losses that apply the head themselves chunk by chunk.
    pub fn forward_packed_hidden(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        segments: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let (x, _) = self.body(
            input_ids,
            positions,
            None,
            segments,
            None,
            ForwardOptions::default(),
        );
        x
    }

    /// Keeps RoPE's inverse frequencies on the device (`rope_freq`), so a forward pass without
    /// a cache transfers nothing from the host, as a captured step needs.
    pub fn with_device_rope(mut self) -> Self {
        let device = self.embed_tokens.val().device();
        let c = &self.config;
        self.rope_freq = Some(rope::freq_tensor(c.rope_theta(), c.head_dim(), &device));
        self
    }

    /// The head's matrix, `[vocab, hidden]`: the embedding when tied.
    pub fn head_weight(&self) -> Tensor<2> {
        match &self.lm_head {
            Some(h) => h.weight.val(),
            None => self.embed_tokens.val(),
        }
    }

    /// Logits of final hidden states.
    pub fn head(&self, x: Tensor<3>) -> Tensor<3> {
        linear(x, self.head_weight(), None)
    }

    /// Everything but the head: the final norm's output (only the last position's with
    /// `last_only`) and the hidden states `opts` asks for.
    fn body(
        &self,
        input_ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        key_pad: Option<Tensor<2, Bool>>,
        segments: Option<Tensor<2, Int>>,
        cache: Option<(&mut Qwen3Cache, CacheSlot)>,
        opts: ForwardOptions,
    ) -> (Tensor<3>, Vec<Tensor<3>>) {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let c = &self.config;
        let dtype = self.compute_dtype;
        let x = self
            .embed_tokens
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, c.hidden_size]);
        let mut x = to_dtype(x, dtype);
        let freq = match (&cache, &self.rope_freq) {
            (Some((cache, _)), _) => cache.rope_freq.clone(),
            (None, Some(f)) => f.clone(),
            (None, None) => rope::freq_tensor(c.rope_theta(), c.head_dim(), &device),
        };
        let rope_t = rope::tables_with(&freq, positions, dtype);
        let scales = self.norm_scales(dtype);

        let mut hidden = Vec::new();
        match cache {
            Some((cache, slot)) => {
                let key_pad = key_pad.or_else(|| cache.key_pad.clone());
                let layers = self.layers.iter().zip(cache.layers.iter_mut());
                for ((layer, kv), scales) in layers.zip(scales) {
                    if opts.hidden_states {
                        hidden.push(x.clone());
                    }
                    let mut ctx = AttnContext {
                        cache: Some((kv, slot.clone())),
                        key_pad: key_pad.clone(),
                        segments: segments.clone(),
                        dense: self.dense_attention,
                        masks: Default::default(),
                    };
                    x = layer.forward(x, scales, &rope_t, &mut ctx);
                }
                if let CacheSlot::At(start) = slot {
                    cache.len = start + s;
                }
            }
            None => {
                let mut ctx = AttnContext {
                    cache: None,
                    key_pad,
                    segments,
                    dense: self.dense_attention,
                    masks: Default::default(),
                };
                for (layer, scales) in self.layers.iter().zip(scales) {
                    if opts.hidden_states {
                        hidden.push(x.clone());
                    }
                    x = layer.forward(x, scales, &rope_t, &mut ctx);
                }
            }
        }
        let mut x = self.norm.forward(x);
        if opts.hidden_states {
            hidden.push(x.clone());
        }
        if opts.last_only && s > 1 {
            x = x.narrow(1, s - 1, 1);
        }
        (x, hidden)
    }
}

impl Qwen3 {
    /// Every layer's two RMSNorm scales, shaped to broadcast over `[batch, seq, hidden]`,
    /// made before the layers run. Made inside each norm, the weight's reshape lands in the
    /// fusion segment of the residual add before it, and burn-fusion then leaves the norm's
    /// products as two unfused kernels; made beforehand, each norm fuses into one kernel.
    /// Hence a collected `Vec`: a lazy iterator would make them inside the loop again.
    fn norm_scales(&self, dtype: DType) -> Vec<[Tensor<3>; 2]> {
        self.layers
            .iter()
            .map(|l| {
                [
                    l.input_layernorm.scale(dtype),
                    l.post_attention_layernorm.scale(dtype),
                ]
            })
            .collect()
    }

    /// For inference: store the parameters in `dtype` too, so that no forward pass pays for
    /// casting f32 masters (training keeps f32 parameters and casts inside the ops).
    pub fn into_inference_dtype(self, dtype: DType) -> Self {
        self.map(&mut crate::layers::CastParams(dtype))
            .with_compute_dtype(dtype)
    }
}

impl crate::decode_graph::GraphDecode for Qwen3 {
    /// Attention reads every cache column but those `key_mask` marks: left padding and the
    /// columns not written yet.
    fn decode_step(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        col: Tensor<1, Int>,
        key_mask: Tensor<2, Bool>,
        cache: &mut Qwen3Cache,
    ) -> Tensor<2> {
        let slot = Some((cache, CacheSlot::Device(Box::new(col))));
        let opts = ForwardOptions::default();
        let (x, _) = self.body(ids, positions, Some(key_mask), None, slot, opts);
        let logits = self.head(x);
        let [b, _, v] = logits.dims();
        logits.reshape([b, v])
    }
}
