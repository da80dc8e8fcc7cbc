//! Rotary position embedding in HF's rotate-half layout (the first half of each head is
//! paired with the second half), not Burn's interleaved `RotaryEncoding`.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Per-position `cos` and `sin`, shaped `[batch, 1, seq, head_dim]` to broadcast over heads.
#[derive(Clone, Debug)]
pub struct RopeTables {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
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
    tables_with(freq_tensor(theta, head_dim, device), positions, dtype)
}

/// The inverse frequencies on the device, `[head_dim / 2]`.
pub fn freq_tensor(theta: f64, head_dim: usize, device: &Device) -> Tensor<1> {
    Tensor::<1>::from_data(
        TensorData::new(inv_freq(theta, head_dim), [head_dim / 2]),
        device,
    )
}

/// [`tables`] from frequencies already on the device: no host transfer, as a captured
/// graph's step needs.
pub fn tables_with(freq: Tensor<1>, positions: Tensor<2, Int>, dtype: DType) -> RopeTables {
    let [b, s] = positions.dims();
    let half = freq.dims()[0];
    let angles = positions.float().reshape([b, s, 1]) * freq.reshape([1, 1, half]);
    let angles = Tensor::cat(vec![angles.clone(), angles], 2).reshape([b, 1, s, 2 * half]);
    RopeTables {
        cos: super::to_dtype(angles.clone().cos(), dtype),
        sin: super::to_dtype(angles.sin(), dtype),
    }
}

/// `x·cos + rotate_half(x)·sin`, for `x` `[batch, heads, seq, head_dim]`.
pub fn apply(x: Tensor<4>, t: &RopeTables) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * t.cos.clone() + rotated * t.sin.clone()
}
