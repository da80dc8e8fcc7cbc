//! The (gated) delta rule, shared by DeltaNet and Gated DeltaNet:
//!
//!   S_t = exp(g_t) · S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   o_t = S_t q_t
//!
//! (as `[dk, dv]` matrices, S ← S·exp(g) + k ⊗ β(v − Sᵀk)), with g = 0 for plain DeltaNet.
//! q and k arrive L2-normalised; q is scaled by dk^−½ here. Training and prefill use the
//! chunked form (the WY/UT representation): inside a chunk of T tokens the updates are
//! condensed through (I + A)⁻¹, A the strictly lower triangular matrix of decayed β k·k
//! products, computed as ∏ (I + (−A)^(2^j)) because A is nilpotent (log T matrix products,
//! no triangular solve); chunks then pass the state along. Decoding uses the recurrent form.
//! All in f32.

use burn::tensor::{Bool, Tensor};

use super::{segment_decay, Documents};

/// Inputs `[batch, heads, seq, ·]` (q, k: dk; v: dv), `beta` and `g` `[batch, heads, seq]`.
pub struct DeltaInputs {
    pub q: Tensor<4>,
    pub k: Tensor<4>,
    pub v: Tensor<4>,
    pub beta: Tensor<3>,
    /// Log decay per step (≤ 0); None for plain DeltaNet.
    pub g: Option<Tensor<3>>,
}

/// One token at a time from `state` `[batch, heads, dk, dv]`; returns `[b, h, seq, dv]`.
pub fn recurrent(x: DeltaInputs, state: &mut Tensor<4>) -> Tensor<4> {
    let [b, h, l, dk] = x.k.dims();
    let dv = x.v.dims()[3];
    let q = x.q.mul_scalar((dk as f64).powf(-0.5));
    let mut out = Vec::with_capacity(l);
    for t in 0..l {
        let at = |m: &Tensor<4>, d: usize| m.clone().narrow(2, t, 1).reshape([b, h, d]);
        let (qt, kt, vt) = (at(&q, dk), at(&x.k, dk), at(&x.v, dv));
        let bt = x.beta.clone().narrow(2, t, 1).reshape([b, h, 1]);
        let mut s = state.clone();
        if let Some(g) = &x.g {
            s = s * g.clone().narrow(2, t, 1).exp().reshape([b, h, 1, 1]);
        }
        let kv = (s.clone() * kt.clone().reshape([b, h, dk, 1]))
            .sum_dim(2)
            .reshape([b, h, dv]);
        let delta = (vt - kv) * bt;
        s = s + kt.reshape([b, h, dk, 1]) * delta.reshape([b, h, 1, dv]);
        out.push(
            (s.clone() * qt.reshape([b, h, dk, 1]))
                .sum_dim(2)
                .reshape([b, h, 1, dv]),
        );
        *state = s;
    }
    Tensor::cat(out, 2)
}

/// The chunked form with chunks of `chunk` tokens, from and into `state`. With `docs` (the
/// documents of packed rows), every decay across a document boundary is zero.
pub fn chunked(
    x: DeltaInputs,
    chunk: usize,
    state: &mut Tensor<4>,
    docs: Option<&Documents>,
) -> Tensor<4> {
    let [b, h, l, dk] = x.k.dims();
    let dv = x.v.dims()[3];
    let t = chunk.max(1);
    let c = l.div_ceil(t);
    let pad = c * t - l;
    let device = x.k.device();
    let pad4 = |m: Tensor<4>| {
        if pad == 0 {
            m
        } else {
            let d = m.dims()[3];
            Tensor::cat(vec![m, Tensor::zeros([b, h, pad, d], &device)], 2)
        }
    };
    let pad3 = |m: Tensor<3>| {
        if pad == 0 {
            m
        } else {
            Tensor::cat(vec![m, Tensor::zeros([b, h, pad], &device)], 2)
        }
    };
    let q = pad4(x.q.mul_scalar((dk as f64).powf(-0.5)));
    let k = pad4(x.k);
    let v = pad4(x.v);
    let beta = pad3(x.beta);
    let g = pad3(x.g.unwrap_or_else(|| Tensor::zeros([b, h, l], &device)));
    let chunks = |m: Tensor<4>, d: usize| m.reshape([b, h, c, t, d]);
    let bcol = beta.reshape([b, h, c, t, 1]);
    let (q, k, v) = (chunks(q, dk), chunks(k, dk), chunks(v, dv));
    let (k_beta, v_beta) = (k.clone() * bcol.clone(), v * bcol);
    let cum = g.reshape([b, h, c, t]).cumsum(3);
    let masks = docs.map(|d| d.chunks(t));
    let cut = |decay: Tensor<5>, mask: Option<Tensor<4>>| match mask {
        Some(m) => decay * m.unsqueeze_dim::<5>(1),
        None => decay,
    };
    // [b, h, c, t, t], zero above the diagonal
    let decay = cut(
        segment_decay(cum.clone()),
        masks.as_ref().map(|m| m.within.clone()),
    );
    let strict = Tensor::<2, Bool>::tril_mask([t, t], -1, &device)
        .reshape([1, 1, 1, t, t])
        .expand([b, h, c, t, t]);
    let a =
        (k_beta.clone().matmul(k.clone().swap_dims(3, 4)) * decay.clone()).mask_fill(strict, 0.0);
    let inv = unit_lower_inverse(a);
    let exp_cum = cut(
        cum.clone().exp().reshape([b, h, c, t, 1]),
        masks
            .as_ref()
            .map(|m| m.from_start.clone().reshape([b, c, t, 1])),
    );
    let u = inv.clone().matmul(v_beta);
    let w = inv.matmul(k_beta * exp_cum.clone());
    let intra = q.clone().matmul(k.clone().swap_dims(3, 4)) * decay;
    let last = cum.clone().narrow(3, t - 1, 1); // [b, h, c, 1]
    let q = q * exp_cum;
    let k = k * cut(
        (last.clone() - cum).exp().reshape([b, h, c, t, 1]),
        masks
            .as_ref()
            .map(|m| m.to_end.clone().reshape([b, c, t, 1])),
    );
    let chunk_decay = cut(
        last.exp().reshape([b, h, c, 1, 1]),
        masks.map(|m| m.through.reshape([b, c, 1, 1])),
    )
    .reshape([b, h, c, 1]);
    let at = |m: &Tensor<5>, i: usize, d: usize| m.clone().narrow(2, i, 1).reshape([b, h, t, d]);
    let mut out = Vec::with_capacity(c);
    let mut s = state.clone();
    for i in 0..c {
        let v_new = at(&u, i, dv) - at(&w, i, dk).matmul(s.clone());
        let intra_i = intra.clone().narrow(2, i, 1).reshape([b, h, t, t]);
        out.push(at(&q, i, dk).matmul(s.clone()) + intra_i.matmul(v_new.clone()));
        let di = chunk_decay.clone().narrow(2, i, 1).reshape([b, h, 1, 1]);
        s = s * di + at(&k, i, dk).swap_dims(2, 3).matmul(v_new);
    }
    *state = s;
    Tensor::cat(out, 2).narrow(2, 0, l)
}

/// (I + A)⁻¹ for strictly lower triangular `a` `[.., t, t]`: with N = −A nilpotent,
/// (I − N)⁻¹ … here (I + A)⁻¹ = Σ_j Nʲ = ∏_j (I + N^(2^j)), a product of ⌈log₂ t⌉ factors.
fn unit_lower_inverse(a: Tensor<5>) -> Tensor<5> {
    let [b0, b1, b2, t, _] = a.dims();
    let eye = Tensor::<2>::eye(t, &a.device())
        .reshape([1, 1, 1, t, t])
        .expand([b0, b1, b2, t, t]);
    let mut power = a.neg();
    let mut inv = eye.clone() + power.clone();
    let mut span = 2;
    while span < t {
        power = power.clone().matmul(power);
        inv = inv.clone() + inv.matmul(power.clone());
        span *= 2;
    }
    inv
}
