//! Rotary position embedding in HF's rotate-half layout (the first half of each head is
//! paired with the second half), not Burn's interleaved `RotaryEncoding`.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Per-position `cos` and signed `sin`, shaped `[batch, 1, seq, head_dim]` to broadcast over
/// heads, and the permutation that swaps a head's halves.
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Tensor<4>,
    /// `[-sin, sin]` over the two halves: rotate-half's negation is folded in here.
    pub sin: Tensor<4>,
    swap: Tensor<1, Int>,
}

/// What the tables are computed from, uploaded once: the inverse frequencies `[head_dim / 2]`
/// and the half-swapping permutation `[head_dim]`.
#[derive(Clone, Debug)]
pub struct RopeFreq {
    freq: Tensor<1>,
    swap: Tensor<1, Int>,
}

/// Inverse frequencies `1 / θ^(2i/d)`, computed in f32 as transformers does.
pub fn inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
        .collect()
}

/// Tables for `positions` `[batch, seq]`, in `dtype` (the angles themselves are f32).
pub fn tables(
    theta: f64,
    head_dim: usize,
    positions: Tensor<2, Int>,
    dtype: DType,
    device: &Device,
) -> RopeTables {
    tables_with(&freq_tensor(theta, head_dim, device), positions, dtype)
}

/// The inverse frequencies and the half swap, on the device.
pub fn freq_tensor(theta: f64, head_dim: usize, device: &Device) -> RopeFreq {
    let half = head_dim / 2;
    let swap: Vec<i64> = (0..head_dim)
        .map(|i| ((i + half) % head_dim) as i64)
        .collect();
    RopeFreq {
        freq: Tensor::<1>::from_data(TensorData::new(inv_freq(theta, head_dim), [half]), device),
        swap: Tensor::<1, Int>::from_data(TensorData::new(swap, [head_dim]), device),
    }
}

/// [`tables`] from frequencies already on the device: no host transfer, as a captured
/// graph's step needs.
pub fn tables_with(f: &RopeFreq, positions: Tensor<2, Int>, dtype: DType) -> RopeTables {
    let [b, s] = positions.dims();
    let half = f.freq.dims()[0];
    let angles = positions.float().reshape([b, s, 1]) * f.freq.clone().reshape([1, 1, half]);
    // Both halves of a head share the angles; `sin` carries rotate-half's sign.
    let table = |lo: Tensor<3>, hi: Tensor<3>| {
        super::to_dtype(Tensor::cat(vec![lo, hi], 2), dtype).reshape([b, 1, s, 2 * half])
    };
    let (sin, cos) = (angles.clone().sin(), angles.cos());
    RopeTables {
        cos: table(cos.clone(), cos),
        sin: table(sin.clone().neg(), sin),
        swap: f.swap.clone(),
    }
}

/// `x·cos + rotate_half(x)·sin`, for `x` `[batch, heads, seq, head_dim]`. The halves are
/// swapped with a `select` rather than sliced and concatenated: burn-fusion fuses a select
/// into the element-wise chain, while slices break it, and in decoding (where the rotated
/// keys are then written into the cache) they made it fall back to running the layer unfused.
pub fn apply(x: Tensor<4>, t: &RopeTables) -> Tensor<4> {
    let swapped = x.clone().select(3, t.swap.clone());
    x * t.cos.clone() + swapped * t.sin.clone()
}
