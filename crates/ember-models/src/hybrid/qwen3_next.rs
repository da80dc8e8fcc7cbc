//! transformers' `Qwen3NextForCausalLM` with dense MLPs (MoE off): Gated DeltaNet layers
//! and gated attention (q_proj yields [q | gate] per head, output × sigmoid(gate), QK-norm,
//! partial RoPE), each followed by a SwiGLU MLP, with RMSNorms that scale by (1 + w). The
//! parity reference for Gated DeltaNet.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Int, Tensor};
use serde_json::Value;

use super::delta_net::{DeltaDims, DeltaState, GatedDeltaNet};
use crate::hf;
use crate::layers::attention::{repeat_kv, KvCache};
use crate::layers::linear::{linear, Linear};
use crate::layers::mlp::SwiGlu;
use crate::layers::rope::{self, RopeTables};
use crate::layers::to_dtype;
use crate::weights::{param, Init, WeightSource};

#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3NextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// True for a full-attention layer, false for Gated DeltaNet.
    pub attention_layers: Vec<bool>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub eps: f64,
    pub delta: DeltaDims,
    pub tie_word_embeddings: bool,
}

impl Qwen3NextConfig {
    pub fn from_value(v: &Value, origin: &str) -> Result<Self> {
        let f = hf::Fields::new(v, origin);
        let uint = |k: &str, default: Option<usize>| f.usize(k, default);
        let num = |k: &str, default: f64| f.f64(k, default);
        let layers = uint("num_hidden_layers", None)?;
        let types = v
            .get("layer_types")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{origin}: `layer_types` is missing"))?;
        if types.len() != layers {
            bail!(
                "{origin}: `layer_types` has {} entries for {layers} layers",
                types.len()
            );
        }
        let attention_layers = types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(true),
                Some("linear_attention") => Ok(false),
                _ => Err(anyhow!("{origin}: unknown layer type {t} in `layer_types`")),
            })
            .collect::<Result<Vec<_>>>()?;
        let experts = uint("num_experts", Some(0))?;
        let dense: Vec<u64> = v
            .get("mlp_only_layers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if experts > 0 && (0..layers as u64).any(|i| !dense.contains(&i)) {
            bail!("{origin}: MoE layers are not supported (list every layer in `mlp_only_layers`)");
        }
        let hidden = uint("hidden_size", None)?;
        let heads = uint("num_attention_heads", None)?;
        let head_dim = uint("head_dim", Some(hidden / heads.max(1)))?;
        let rope = v.get("rope_parameters");
        let factor = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or_else(|| num("partial_rotary_factor", 0.25));
        let eps = num("rms_norm_eps", 1e-6);
        Ok(Self {
            vocab_size: uint("vocab_size", None)?,
            hidden_size: hidden,
            intermediate_size: uint("intermediate_size", None)?,
            attention_layers,
            heads,
            kv_heads: uint("num_key_value_heads", Some(heads))?,
            head_dim,
            rotary_dim: (head_dim as f64 * factor) as usize,
            rope_theta: rope
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or_else(|| num("rope_theta", 10_000.0)),
            eps,
            delta: DeltaDims {
                hidden,
                k_heads: uint("linear_num_key_heads", None)?,
                v_heads: uint("linear_num_value_heads", None)?,
                dk: uint("linear_key_head_dim", None)?,
                dv: uint("linear_value_head_dim", None)?,
                conv_kernel: uint("linear_conv_kernel_dim", Some(4))?,
                chunk: 64,
                eps,
            },
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

/// RMSNorm scaling by (1 + w), w starting at zero.
#[derive(Module, Debug)]
pub struct OffsetRmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl OffsetRmsNorm {
    fn load(
        src: &mut dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: param(src, name, [dim], Init::Zeros, device)?,
            eps,
        })
    }

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = to_dtype(x, DType::F32);
        let inv = (x.clone().square().mean_dim(D - 1) + self.eps)
            .sqrt()
            .recip();
        let w = to_dtype(self.weight.val(), DType::F32)
            .add_scalar(1.0)
            .unsqueeze::<D>();
        to_dtype(x * inv * w, dtype)
    }
}

#[derive(Module, Debug)]
pub struct GatedAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: OffsetRmsNorm,
    pub k_norm: OffsetRmsNorm,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
}

impl GatedAttention {
    fn load(
        src: &mut dyn WeightSource,
        p: &str,
        c: &Qwen3NextConfig,
        device: &Device,
    ) -> Result<Self> {
        let (h, d, std) = (c.hidden_size, c.head_dim, 0.02);
        let lin = |src: &mut dyn WeightSource, n: &str, i: usize, o: usize| {
            Linear::load(src, &format!("{p}.{n}"), i, o, false, std, device)
        };
        Ok(Self {
            q_proj: lin(src, "q_proj", h, 2 * c.heads * d)?,
            k_proj: lin(src, "k_proj", h, c.kv_heads * d)?,
            v_proj: lin(src, "v_proj", h, c.kv_heads * d)?,
            o_proj: lin(src, "o_proj", c.heads * d, h)?,
            q_norm: OffsetRmsNorm::load(src, &format!("{p}.q_norm.weight"), d, c.eps, device)?,
            k_norm: OffsetRmsNorm::load(src, &format!("{p}.k_norm.weight"), d, c.eps, device)?,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: d,
            rotary_dim: c.rotary_dim,
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope_t: &RopeTables,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, hkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let qg = self.q_proj.forward(x.clone()).reshape([b, s, h, 2 * d]);
        let q = qg.clone().narrow(3, 0, d);
        let gate = qg.narrow(3, d, d).reshape([b, s, h * d]);
        let q = self.q_norm.forward(q).swap_dims(1, 2);
        let k = self
            .k_norm
            .forward(self.k_proj.forward(x.clone()).reshape([b, s, hkv, d]))
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, hkv, d])
            .swap_dims(1, 2);
        let partial = |t: Tensor<4>| {
            let rd = self.rotary_dim;
            let rot = rope::apply(t.clone().narrow(3, 0, rd), rope_t);
            Tensor::cat(vec![rot, t.narrow(3, rd, d - rd)], 3)
        };
        let (q, k) = (partial(q), partial(k));
        let (k, v) = match cache {
            Some((c, start)) => c.append(k, v, start),
            None => (k, v),
        };
        let n_rep = h / hkv;
        let opts = AttentionModuleOptions {
            is_causal: s > 1,
            ..Default::default()
        };
        let out = attention(
            q,
            repeat_kv(k, n_rep),
            repeat_kv(v, n_rep),
            None,
            None,
            opts,
        );
        let out = out.swap_dims(1, 2).reshape([b, s, h * d]) * sigmoid(gate);
        self.o_proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub enum TokenMixer {
    Delta(GatedDeltaNet),
    Attention(GatedAttention),
}

#[derive(Module, Debug)]
pub struct Layer {
    pub input_layernorm: OffsetRmsNorm,
    pub mixer: TokenMixer,
    pub post_attention_layernorm: OffsetRmsNorm,
    pub mlp: SwiGlu,
}

/// Decoding state per layer.
#[derive(Debug)]
pub enum NextState {
    Delta(DeltaState),
    Kv(KvCache),
}

#[derive(Debug)]
pub struct Qwen3NextCache {
    pub layers: Vec<NextState>,
    pub len: usize,
}

#[derive(Module, Debug)]
pub struct Qwen3Next {
    pub embed_tokens: Param<Tensor<2>>,
    pub layers: Vec<Layer>,
    pub norm: OffsetRmsNorm,
    pub lm_head: Option<Linear>,
    #[module(skip)]
    pub config: Qwen3NextConfig,
}

impl Qwen3Next {
    pub fn load(
        config: Qwen3NextConfig,
        src: &mut dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let embed_tokens = param(
            src,
            "model.embed_tokens.weight",
            [c.vocab_size, h],
            Init::Normal(0.02),
            device,
        )?;
        let layers = c
            .attention_layers
            .iter()
            .enumerate()
            .map(|(i, &attn)| {
                let p = format!("model.layers.{i}");
                let mixer = if attn {
                    TokenMixer::Attention(GatedAttention::load(
                        src,
                        &format!("{p}.self_attn"),
                        c,
                        device,
                    )?)
                } else {
                    TokenMixer::Delta(GatedDeltaNet::load(
                        src,
                        &format!("{p}.linear_attn"),
                        c.delta,
                        0.02,
                        device,
                    )?)
                };
                Ok(Layer {
                    input_layernorm: OffsetRmsNorm::load(
                        src,
                        &format!("{p}.input_layernorm.weight"),
                        h,
                        c.eps,
                        device,
                    )?,
                    mixer,
                    post_attention_layernorm: OffsetRmsNorm::load(
                        src,
                        &format!("{p}.post_attention_layernorm.weight"),
                        h,
                        c.eps,
                        device,
                    )?,
                    mlp: SwiGlu::load(
                        src,
                        &format!("{p}.mlp"),
                        h,
                        c.intermediate_size,
                        0.02,
                        device,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = OffsetRmsNorm::load(src, "model.norm.weight", h, c.eps, device)?;
        let lm_head = (!c.tie_word_embeddings)
            .then(|| Linear::load(src, "lm_head", h, c.vocab_size, false, 0.02, device))
            .transpose()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config,
        })
    }

    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        hf::load_dir(
            dir,
            Qwen3NextConfig::from_value,
            |c, ckpt| Self::load(c, ckpt, device),
            &["lm_head.weight"],
        )
    }

    pub fn new_cache(&self, batch: usize, max_len: usize, device: &Device) -> Qwen3NextCache {
        let c = &self.config;
        let layers = c
            .attention_layers
            .iter()
            .map(|&attn| {
                if attn {
                    NextState::Kv(KvCache::new(
                        batch,
                        c.kv_heads,
                        max_len,
                        c.head_dim,
                        DType::F32,
                        device,
                    ))
                } else {
                    NextState::Delta(c.delta.zero_state(batch, device))
                }
            })
            .collect();
        Qwen3NextCache { layers, len: 0 }
    }

    /// The embeddings, each layer's output and the final norm's output (the last entry).
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        mut cache: Option<&mut Qwen3NextCache>,
    ) -> Vec<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let c = &self.config;
        let mut x = self
            .embed_tokens
            .val()
            .select(0, input_ids.reshape([b * s]))
            .reshape([b, s, c.hidden_size]);
        let start = cache.as_ref().map_or(0, |c| c.len);
        let pos = Tensor::<1, Int>::arange(start as i64..(start + s) as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let rope_t = rope::tables(c.rope_theta, c.rotary_dim, pos, x.dtype(), &device);
        let mut out = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            let state = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let y = layer.input_layernorm.forward(x.clone());
            let y = match (&layer.mixer, state) {
                (TokenMixer::Delta(m), Some(NextState::Delta(st))) => m.forward(y, Some(st), None),
                (TokenMixer::Delta(m), _) => m.forward(y, None, None),
                (TokenMixer::Attention(a), Some(NextState::Kv(kv))) => {
                    a.forward(y, &rope_t, Some((kv, start)))
                }
                (TokenMixer::Attention(a), _) => a.forward(y, &rope_t, None),
            };
            x = x + y;
            x = x.clone() + layer.mlp.forward(layer.post_attention_layernorm.forward(x));
            out.push(x.clone());
        }
        if let Some(c) = cache {
            c.len += s;
        }
        let last = out.len() - 1;
        out[last] = self.norm.forward(x);
        out
    }

    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        cache: Option<&mut Qwen3NextCache>,
    ) -> Tensor<3> {
        let h = self
            .hidden_states(input_ids, cache)
            .pop()
            .expect("at least the embeddings");
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => linear(h, self.embed_tokens.val(), None),
        }
    }
}
