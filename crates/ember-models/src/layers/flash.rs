//! Memory-efficient attention for training: a forward over key blocks with an online softmax
//! that keeps only the output and each row's log-sum-exp, and its own backward that
//! recomputes each block's probabilities from them (FlashAttention's algorithm, run as
//! tensor ops so every backend has it). Memory is `O(seq × block)` per layer instead of the
//! `O(seq²)` score, softmax and mask tensors that Burn's autodiff keeps for its attention.
//!
//! Masks are described, never materialised whole: causal, a symmetric sliding window,
//! document ids for packed rows, and key padding. Each block's part is built once per forward
//! pass and shared by its layers. With GQA, the query heads that share a KV head are grouped
//! and the KV head broadcasts over its group in the matmuls: the keys and values are never
//! copied per head, and their gradients are summed over the group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::{Bool, DType, Int, Tensor};

use super::custom_grad::{self, TensorBackward};
use super::to_dtype;

/// Which keys each query may see, besides every key in its block.
#[derive(Clone, Debug, Default)]
pub struct MaskSpec {
    /// Key position ≤ query position.
    pub causal: bool,
    /// |query position − key position| ≤ this (ModernBERT's local layers: half the window).
    pub window: Option<usize>,
    /// `[batch, seq]` document id per token: queries see keys of their own document only.
    pub segments: Option<Tensor<2, Int>>,
    /// `[batch, keys]`, true where the key is padding.
    pub key_pad: Option<Tensor<2, Bool>>,
    /// The block masks built so far. Every layer of a forward pass sees the same masks, and
    /// each backward rebuilds its layer's, so sharing them (clones of a spec share this)
    /// saves a few kernel launches per block, layer and pass.
    pub cache: MaskCache,
}

/// Block masks by `(batch, rows, keys)`, shared between clones.
#[derive(Clone, Debug, Default)]
pub struct MaskCache(Arc<Mutex<HashMap<BlockKey, Option<Tensor<4, Bool>>>>>);

type BlockKey = (usize, (usize, usize), (usize, usize));

impl MaskSpec {
    fn inner(&self) -> Self {
        Self {
            causal: self.causal,
            window: self.window,
            segments: self.segments.clone().map(|t| t.inner()),
            key_pad: self.key_pad.clone().map(|t| t.inner()),
            cache: self.cache.clone(),
        }
    }

    /// The query rows that can see any key of `k0..k1` (out of `s` queries at positions
    /// equal to the keys').
    fn rows(&self, k0: usize, k1: usize, s: usize) -> (usize, usize) {
        let lo = match (self.causal, self.window) {
            (true, _) => k0,
            (false, Some(w)) => k0.saturating_sub(w),
            (false, None) => 0,
        };
        let hi = match self.window {
            Some(w) => (k1 + w).min(s),
            None => s,
        };
        (lo.min(s), hi)
    }

    /// `[b, 1, rows, keys]`, true where query `r0 + i` must not see key `k0 + j`; built once
    /// per spec and block (`cache`).
    fn blocked(
        &self,
        b: usize,
        rows: (usize, usize),
        keys: (usize, usize),
        device: &burn::tensor::Device,
    ) -> Option<Tensor<4, Bool>> {
        let mut cache = self.cache.0.lock().expect("mask cache poisoned");
        cache
            .entry((b, rows, keys))
            .or_insert_with(|| self.build_blocked(b, rows, keys, device))
            .clone()
    }

    fn build_blocked(
        &self,
        b: usize,
        (r0, r1): (usize, usize),
        (k0, k1): (usize, usize),
        device: &burn::tensor::Device,
    ) -> Option<Tensor<4, Bool>> {
        let (nr, nk) = (r1 - r0, k1 - k0);
        let mut out: Option<Tensor<4, Bool>> = None;
        let mut add = |m: Tensor<4, Bool>| {
            out = Some(match out.take() {
                Some(o) => o.bool_or(m),
                None => m,
            })
        };
        if self.causal || self.window.is_some() {
            let qi = Tensor::<1, Int>::arange(r0 as i64..r1 as i64, device).reshape([1, 1, nr, 1]);
            let kj = Tensor::<1, Int>::arange(k0 as i64..k1 as i64, device).reshape([1, 1, 1, nk]);
            let delta = qi.expand([1, 1, nr, nk]) - kj.expand([1, 1, nr, nk]);
            if self.causal {
                add(delta.clone().lower_elem(0).expand([b, 1, nr, nk]));
            }
            if let Some(w) = self.window {
                add(delta.abs().greater_elem(w as i64).expand([b, 1, nr, nk]));
            }
        }
        if let Some(seg) = &self.segments {
            let sq = seg
                .clone()
                .narrow(1, r0, nr)
                .reshape([b, 1, nr, 1])
                .expand([b, 1, nr, nk]);
            let sk = seg
                .clone()
                .narrow(1, k0, nk)
                .reshape([b, 1, 1, nk])
                .expand([b, 1, nr, nk]);
            add(sq.not_equal(sk));
        }
        if let Some(pad) = &self.key_pad {
            add(pad
                .clone()
                .narrow(1, k0, nk)
                .reshape([b, 1, 1, nk])
                .expand([b, 1, nr, nk]));
        }
        out
    }
}

/// `t` with its query rows `r0..r1` (dim 3) replaced by `rows`; all of them is `rows` itself,
/// which saves the copy (the first key block of causal attention covers every row).
fn put_rows(t: Tensor<5>, (r0, r1): (usize, usize), rows: Tensor<5>) -> Tensor<5> {
    let [b, hkv, g, s, d] = t.dims();
    if (r0, r1) == (0, s) {
        rows
    } else {
        t.slice_assign([0..b, 0..hkv, 0..g, r0..r1, 0..d], rows)
    }
}

/// `[b, heads, s, x]` → `[b, kv_heads, group, s, x]`: the query heads that share a KV head
/// side by side. Splitting a dimension is a view, so no copy is made.
fn grouped(x: Tensor<4>, kv_heads: usize) -> Tensor<5> {
    let [b, h, s, d] = x.dims();
    x.reshape([b, kv_heads, h / kv_heads, s, d])
}

/// The inverse of [`grouped`].
fn ungrouped(x: Tensor<5>) -> Tensor<4> {
    let [b, hkv, g, s, d] = x.dims();
    x.reshape([b, hkv * g, s, d])
}

/// `[b, kv_heads, t, d]` → `[b, kv_heads, 1, t, d]`: a KV head broadcasts over its query
/// group in the matmuls, so the keys and values are not repeated for each query head.
fn shared(x: Tensor<4>) -> Tensor<5> {
    x.unsqueeze_dim(2)
}

/// A block's `[b, 1, rows, keys]` mask over every head of every group.
fn over_heads(bl: Tensor<4, Bool>, hkv: usize, g: usize) -> Tensor<5, Bool> {
    let [b, _, nr, nk] = bl.dims();
    bl.reshape([b, 1, 1, nr, nk]).expand([b, hkv, g, nr, nk])
}

/// Scores of query rows against one key block, in f32, masked entries at −∞-like values
/// (their probabilities are zeroed separately, so a fully masked row stays finite).
fn scores(q: Tensor<5>, k: Tensor<5>, scale: f64) -> Tensor<5> {
    to_dtype(q.matmul(k.swap_dims(3, 4)), DType::F32) * scale
}

/// The forward pass on tensors without autodiff: the output in `q`'s dtype and the
/// log-sum-exp of every query row, `[b, h, s, 1]` in f32.
pub fn forward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &MaskSpec,
    block: usize,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, s, d] = q.dims();
    let [_, hkv, t, _] = k.dims();
    let g = h / hkv;
    let device = q.device();
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    let mut m = Tensor::<5>::full([b, hkv, g, s, 1], -1e30, &device);
    let mut l = Tensor::<5>::zeros([b, hkv, g, s, 1], &device);
    let mut acc = Tensor::<5>::zeros([b, hkv, g, s, d], &device);
    let (q, k, v) = (grouped(q, hkv), shared(k), shared(v));
    for k0 in (0..t).step_by(block) {
        let k1 = (k0 + block).min(t);
        let (r0, r1) = mask.rows(k0, k1, s);
        if r0 >= r1 {
            continue;
        }
        let (nr, nk) = (r1 - r0, k1 - k0);
        let kb = k.clone().narrow(3, k0, nk);
        let vb = v.clone().narrow(3, k0, nk);
        let sc = scores(q.clone().narrow(3, r0, nr), kb, scale);
        let blocked = mask
            .blocked(b, (r0, r1), (k0, k1), &device)
            .map(|bl| over_heads(bl, hkv, g));
        let sc = match &blocked {
            Some(bl) => sc.mask_fill(bl.clone(), -1e30),
            None => sc,
        };
        let m_old = m.clone().narrow(3, r0, nr);
        let m_new = m_old.clone().max_pair(sc.clone().max_dim(4));
        let p = (sc - m_new.clone()).exp();
        let p = match blocked {
            Some(bl) => p.mask_fill(bl, 0.0),
            None => p,
        };
        let alpha = (m_old - m_new.clone()).exp();
        let l_new = l.clone().narrow(3, r0, nr) * alpha.clone() + p.clone().sum_dim(4);
        let pv = to_dtype(to_dtype(p, vb.dtype()).matmul(vb), DType::F32);
        let acc_new = acc.clone().narrow(3, r0, nr) * alpha + pv;
        m = put_rows(m, (r0, r1), m_new);
        l = put_rows(l, (r0, r1), l_new);
        acc = put_rows(acc, (r0, r1), acc_new);
    }
    // A row that sees no key gets output 0 and log-sum-exp +∞-like, so its backward is 0.
    let seen = l.clone().greater_elem(0.0);
    let out = acc / l.clone().clamp_min(1e-30);
    let lse = (m + l.clamp_min(1e-30).log()).mask_fill(seen.bool_not(), 1e30);
    (ungrouped(to_dtype(out, dtype)), ungrouped(lse))
}

/// The backward pass: gradients of `q`, `k`, `v` (in their dtypes) given the output
/// gradient `dout`, recomputing each key block's probabilities from the saved log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    out: Tensor<4>,
    lse: Tensor<4>,
    dout: Tensor<4>,
    mask: &MaskSpec,
    block: usize,
) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let [b, h, s, d] = q.dims();
    let [_, hkv, t, _] = k.dims();
    let g = h / hkv;
    let device = q.device();
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    let dout = grouped(to_dtype(dout, dtype), hkv);
    let delta =
        (to_dtype(dout.clone(), DType::F32) * to_dtype(grouped(out, hkv), DType::F32)).sum_dim(4);
    let (q, lse) = (grouped(q, hkv), grouped(lse, hkv));
    let mut dq = Tensor::<5>::zeros([b, hkv, g, s, d], &device);
    let (mut dks, mut dvs) = (Vec::new(), Vec::new());
    let (k_dtype, v_dtype) = (k.dtype(), v.dtype());
    let (k, v) = (shared(k), shared(v));
    // The query heads of a group add their gradients into their shared KV head.
    let group_sum = |x: Tensor<5>, to: DType| {
        let [b, hkv, g, nk, d] = x.dims();
        let x = to_dtype(x, DType::F32);
        let x = if g > 1 { x.sum_dim(2) } else { x };
        to_dtype(x.reshape([b, hkv, nk, d]), to)
    };
    for k0 in (0..t).step_by(block) {
        let k1 = (k0 + block).min(t);
        let nk = k1 - k0;
        let (r0, r1) = mask.rows(k0, k1, s);
        if r0 >= r1 {
            dks.push(Tensor::<4>::zeros([b, hkv, nk, d], (&device, k_dtype)));
            dvs.push(Tensor::<4>::zeros([b, hkv, nk, d], (&device, v_dtype)));
            continue;
        }
        let nr = r1 - r0;
        let kb = k.clone().narrow(3, k0, nk);
        let vb = v.clone().narrow(3, k0, nk);
        let qr = q.clone().narrow(3, r0, nr);
        let dor = dout.clone().narrow(3, r0, nr);
        let p = (scores(qr.clone(), kb.clone(), scale) - lse.clone().narrow(3, r0, nr)).exp();
        let p = match mask.blocked(b, (r0, r1), (k0, k1), &device) {
            Some(bl) => p.mask_fill(over_heads(bl, hkv, g), 0.0),
            None => p,
        };
        let dv = to_dtype(p.clone(), dtype)
            .swap_dims(3, 4)
            .matmul(dor.clone());
        let dp = to_dtype(dor.matmul(vb.swap_dims(3, 4)), DType::F32);
        let ds = to_dtype(p * (dp - delta.clone().narrow(3, r0, nr)) * scale, dtype);
        let dq_r = dq.clone().narrow(3, r0, nr) + to_dtype(ds.clone().matmul(kb), DType::F32);
        dq = put_rows(dq, (r0, r1), dq_r);
        let dk = ds.swap_dims(3, 4).matmul(qr);
        dks.push(group_sum(dk, k_dtype));
        dvs.push(group_sum(dv, v_dtype));
    }
    (
        ungrouped(to_dtype(dq, dtype)),
        Tensor::cat(dks, 2),
        Tensor::cat(dvs, 2),
    )
}

#[derive(Debug)]
struct FlashBackward {
    block: usize,
}

impl TensorBackward<3, 4, 4> for FlashBackward {
    /// q, k, v, the output and its log-sum-exp, the mask.
    type State = (
        Tensor<4>,
        Tensor<4>,
        Tensor<4>,
        Tensor<4>,
        Tensor<4>,
        MaskSpec,
    );

    fn backward(&self, state: Self::State, dout: Tensor<4>) -> [Tensor<4>; 3] {
        let (q, k, v, out, lse, mask) = state;
        let (dq, dk, dv) = backward(q, k, v, out, lse, dout, &mask, self.block);
        [dq, dk, dv]
    }
}

/// Attention `softmax(q·kᵀ/√d + mask)·v` over `q` `[b, heads, s, d]` and `k`, `v`
/// `[b, kv_heads, s, d]` (keys at the queries' positions), in key blocks of `block`. With
/// autodiff, its backward is the blocked one above; without, it is the blocked forward.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &MaskSpec,
    block: usize,
) -> Tensor<4> {
    let block = block.max(1);
    let mask = mask.inner();
    custom_grad::apply(FlashBackward { block }, [q, k, v], |[q, k, v]| {
        let (out, lse) = forward(q.clone(), k.clone(), v.clone(), &mask, block);
        (out.clone(), (q, k, v, out, lse, mask.clone()))
    })
}
