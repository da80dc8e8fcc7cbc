//! Grouped-query self-attention with QK-norm, rotate-half RoPE and a preallocated KV cache.

use anyhow::Result;
use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, IndexingUpdateOp, Int, Tensor};

use super::flash;
use super::linear::{linear_fused, Linear};
use super::rms_norm::RmsNorm;
use super::rope::{self, RopeTables};
use crate::weights::{WeightSink, WeightSource};

/// One layer's cache, `[batch, kv_heads, max_len, head_dim]`, written in place with
/// `slice_assign`. The `Option` lets the forward pass own the tensors while it writes, so
/// the write does not copy the whole buffer.
#[derive(Debug)]
pub struct KvCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    pub fn new(
        batch: usize,
        kv_heads: usize,
        max_len: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        let z = || Tensor::<4>::zeros([batch, kv_heads, max_len, head_dim], (device, dtype));
        Self {
            kv: Some((z(), z())),
        }
    }

    pub fn max_len(&self) -> usize {
        self.kv.as_ref().map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    /// Writes `k`, `v` `[b, kv_heads, s, d]` at position `start` and returns every key and
    /// value up to the end of them.
    pub fn append(&mut self, k: Tensor<4>, v: Tensor<4>, start: usize) -> (Tensor<4>, Tensor<4>) {
        let [b, hkv, s, d] = k.dims();
        let (ck, cv) = self.kv.take().expect("cache in use");
        let end = start + s;
        let ck = ck.slice_assign([0..b, 0..hkv, start..end, 0..d], k);
        let cv = cv.slice_assign([0..b, 0..hkv, start..end, 0..d], v);
        let keys = (
            ck.clone().slice([0..b, 0..hkv, 0..end, 0..d]),
            cv.clone().slice([0..b, 0..hkv, 0..end, 0..d]),
        );
        self.kv = Some((ck, cv));
        keys
    }

    /// Writes one token's `k`, `v` `[b, kv_heads, 1, d]` at the column `col` (`[1]`, on the
    /// device) in place, and returns the whole cache: the shapes do not depend on the column,
    /// so a captured graph can replay the write (see `decode_graph`).
    pub fn write_at(
        &mut self,
        k: Tensor<4>,
        v: Tensor<4>,
        col: Tensor<1, Int>,
    ) -> (Tensor<4>, Tensor<4>) {
        let (ck, cv) = self.kv.take().expect("cache in use");
        let ck = ck.select_assign(2, col.clone(), k, IndexingUpdateOp::Assign);
        let cv = cv.select_assign(2, col, v, IndexingUpdateOp::Assign);
        self.kv = Some((ck.clone(), cv.clone()));
        (ck, cv)
    }

    /// Keeps only the batch rows `idx`, so finished sequences stop costing compute.
    pub fn select_rows(&mut self, idx: &Tensor<1, burn::tensor::Int>) {
        let (k, v) = self.kv.take().expect("cache in use");
        self.kv = Some((k.select(0, idx.clone()), v.select(0, idx.clone())));
    }
}

/// Shape parameters of one attention block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's per-head QK-norm; NemotronH's attention has none.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Where a forward pass writes its keys into the cache.
#[derive(Clone, Debug)]
pub enum CacheSlot {
    /// From this column on; attention then reads the columns up to the end of the write.
    At(usize),
    /// One token per row at the column held by this `[1]` device tensor; attention reads
    /// every column, and the caller masks the unwritten ones with `key_pad`.
    Device(Box<Tensor<1, Int>>),
}

/// What a forward pass attends over besides its own tokens.
pub struct AttnContext<'a> {
    /// Cache and where this call's keys are written.
    pub cache: Option<(&'a mut KvCache, CacheSlot)>,
    /// `[batch, keys]`, true where the key is padding and must be ignored.
    pub key_pad: Option<Tensor<2, Bool>>,
    /// `[batch, seq]` document id per token of packed rows: queries see only keys of their
    /// own document (on top of the causal mask).
    pub segments: Option<Tensor<2, Int>>,
    /// Train with Burn's dense attention instead of the blocked one.
    pub dense: bool,
    /// The blocked attention's masks, shared by the layers of one forward pass.
    pub masks: flash::MaskCache,
}

/// Key block of the training attention (`flash`): its transient scores are
/// `batch × heads × seq × FLASH_BLOCK` in f32.
pub const FLASH_BLOCK: usize = 512;

/// The training attention's key block: `EMBER_FLASH_BLOCK` when set (for A/B runs: larger
/// blocks mean fewer, larger matmuls and more transient memory), else [`FLASH_BLOCK`].
pub fn flash_block() -> usize {
    static BLOCK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BLOCK.get_or_init(|| crate::device::count_env("EMBER_FLASH_BLOCK").unwrap_or(FLASH_BLOCK))
}

/// `[b, s, s]`, true where a query and a key lie in different documents.
pub fn document_block(seg: Tensor<2, Int>) -> Tensor<3, Bool> {
    let [b, s] = seg.dims();
    let q = seg.clone().reshape([b, s, 1]).expand([b, s, s]);
    let k = seg.reshape([b, 1, s]).expand([b, s, s]);
    q.not_equal(k)
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: AttnDims,
        bias: bool,
        eps: f64,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        Ok(Self {
            q_proj: Linear::load(
                src,
                &format!("{prefix}.q_proj"),
                d.hidden,
                q,
                bias,
                std,
                device,
            )?,
            k_proj: Linear::load(
                src,
                &format!("{prefix}.k_proj"),
                d.hidden,
                kv,
                bias,
                std,
                device,
            )?,
            v_proj: Linear::load(
                src,
                &format!("{prefix}.v_proj"),
                d.hidden,
                kv,
                bias,
                std,
                device,
            )?,
            o_proj: Linear::load(
                src,
                &format!("{prefix}.o_proj"),
                q,
                d.hidden,
                bias,
                std,
                device,
            )?,
            q_norm: Some(RmsNorm::load(
                src,
                &format!("{prefix}.q_norm.weight"),
                d.head_dim,
                eps,
                device,
            )?),
            k_norm: Some(RmsNorm::load(
                src,
                &format!("{prefix}.k_norm.weight"),
                d.head_dim,
                eps,
                device,
            )?),
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
        })
    }

    /// Attention without biases (NemotronH, Nemotron-Flash), with a per-head QK-norm of eps
    /// `qk_norm` when given.
    pub fn load_plain(
        src: &mut dyn WeightSource,
        prefix: &str,
        d: AttnDims,
        qk_norm: Option<f64>,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
        let lin = |src: &mut dyn WeightSource, name: &str, i: usize, o: usize| {
            Linear::load(src, &format!("{prefix}.{name}"), i, o, false, std, device)
        };
        let head_norm = |src: &mut dyn WeightSource, name: &str| {
            qk_norm
                .map(|eps| {
                    let key = format!("{prefix}.{name}.weight");
                    RmsNorm::load(src, &key, d.head_dim, eps, device)
                })
                .transpose()
        };
        Ok(Self {
            q_proj: lin(src, "q_proj", d.hidden, q)?,
            k_proj: lin(src, "k_proj", d.hidden, kv)?,
            v_proj: lin(src, "v_proj", d.hidden, kv)?,
            o_proj: lin(src, "o_proj", q, d.hidden)?,
            q_norm: head_norm(src, "q_norm")?,
            k_norm: head_norm(src, "k_norm")?,
            heads: d.heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
        })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        self.q_proj.save(&format!("{prefix}.q_proj"), out);
        self.k_proj.save(&format!("{prefix}.k_proj"), out);
        self.v_proj.save(&format!("{prefix}.v_proj"), out);
        self.o_proj.save(&format!("{prefix}.o_proj"), out);
        if let Some(n) = &self.q_norm {
            n.save(&format!("{prefix}.q_norm.weight"), out);
        }
        if let Some(n) = &self.k_norm {
            n.save(&format!("{prefix}.k_norm.weight"), out);
        }
    }

    /// Causal self-attention over `[b, s, hidden]`; `rope_t: None` for layers without
    /// position encoding (NemotronH's, which take positions from their SSM layers).
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope_t: Option<&RopeTables>,
        ctx: &mut AttnContext,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (h, hkv, d) = (self.heads, self.kv_heads, self.head_dim);
        // QK-norm acts per head on the last dim, before RoPE.
        let norm = |n: &Option<RmsNorm>, t: Tensor<4>| match n {
            Some(n) => n.forward(t),
            None => t,
        };
        let [q, k, v]: [Tensor<3>; 3] =
            linear_fused(x, &[&self.q_proj, &self.k_proj, &self.v_proj])
                .try_into()
                .expect("three projections");
        let q = norm(&self.q_norm, q.reshape([b, s, h, d]));
        let k = norm(&self.k_norm, k.reshape([b, s, hkv, d]));
        let v = v.reshape([b, s, hkv, d]);
        let rotate = |x: Tensor<4>| match rope_t {
            Some(t) => rope::apply(x.swap_dims(1, 2), t),
            None => x.swap_dims(1, 2),
        };
        let k = rotate(k);
        let v = v.swap_dims(1, 2);
        let (k, v) = match ctx.cache.as_mut() {
            Some((cache, CacheSlot::At(start))) => cache.append(k, v, *start),
            Some((cache, CacheSlot::Device(col))) => cache.write_at(k, v, (**col).clone()),
            None => (k, v),
        };
        let q = rotate(q);
        let t = k.dims()[2];
        let n_rep = h / hkv;
        let pad = ctx.key_pad.as_ref().map(|m| m.clone().slice([0..b, 0..t]));

        let training = q.is_tracked() || k.is_tracked();
        let out = if training && ctx.cache.is_none() && !ctx.dense {
            // Training: blocked attention with its own backward, memory linear in length.
            let spec = flash::MaskSpec {
                causal: true,
                window: None,
                segments: ctx.segments.clone(),
                key_pad: pad,
                cache: ctx.masks.clone(),
            };
            flash::attention(q, k, v, &spec, flash_block())
        } else if s == 1 {
            // One query per row: fold the query heads that share a KV head into the query
            // length, so GQA needs no copy of the cache and no causal mask.
            let q = q.reshape([b, hkv, n_rep, d]);
            let mask = pad.map(|m| m.reshape([b, 1, 1, t]).expand([b, hkv, n_rep, t]));
            attention(q, k, v, mask, None, AttentionModuleOptions::default()).reshape([b, h, 1, d])
        } else {
            let k = repeat_kv(k, n_rep);
            let v = repeat_kv(v, n_rep);
            let pad = pad.map(|m| m.reshape([b, 1, 1, t]).expand([b, 1, s, t]));
            let block = ctx
                .segments
                .clone()
                .map(|g| document_block(g).reshape([b, 1, s, t]));
            let mask = match (pad, block) {
                (Some(p), Some(k)) => Some(p.bool_or(k)),
                (p, k) => p.or(k),
            }
            .map(|m| m.expand([b, h, s, t]));
            let opts = AttentionModuleOptions {
                is_causal: true,
                ..Default::default()
            };
            attention(q, k, v, mask, None, opts)
        };
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h * d]))
    }
}

/// `[b, kv_heads, t, d]` → `[b, kv_heads·n_rep, t, d]`, each KV head repeated for its group.
pub fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, hkv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, hkv, n_rep, t, d])
        .reshape([b, hkv * n_rep, t, d])
}
