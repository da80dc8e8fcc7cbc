//! RMSNorm as HF computes it: normalise in f32, cast back, then scale by the weight.

use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor};

use super::custom_grad::{self, TensorBackward};
use super::to_dtype;
use crate::weights::{export, param, Init, WeightSink, WeightSource};

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        src: &mut dyn WeightSource,
        name: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: param(src, name, [dim], Init::Ones, device)?,
            eps,
        })
    }

    pub fn save(&self, name: &str, out: &mut WeightSink) {
        export(out, name, &self.weight);
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let w = self.scale(x.dtype());
        self.forward_scaled(x, w)
    }

    /// The weight in `dtype`, shaped to broadcast over a rank-`D` input.
    pub fn scale<const D: usize>(&self, dtype: DType) -> Tensor<D> {
        to_dtype(self.weight.val(), dtype).unsqueeze::<D>()
    }

    /// The norm with its weight already shaped by [`Self::scale`]. With a graph, this is one
    /// node with its own backward (two reductions and a few element-wise products), not the
    /// dozen-odd operations autodiff records for the forward's square, mean, square root,
    /// reciprocal, casts and broadcast products.
    pub fn forward_scaled<const D: usize>(&self, x: Tensor<D>, w: Tensor<D>) -> Tensor<D> {
        let eps = self.eps;
        custom_grad::apply(RmsNormBackward, [x, w], |[x, w]| {
            let dtype = x.dtype();
            let x32 = to_dtype(x.clone(), DType::F32);
            let inv_rms = (x32.clone().square().mean_dim(D - 1) + eps).sqrt().recip();
            let normed = to_dtype(x32 * inv_rms.clone(), dtype);
            (normed * w.clone(), (x, w, inv_rms))
        })
    }
}

/// `y = cast(x·r)·w` with `r = (mean(x²) + ε)^-½` per row. In f32, with `g = dy·w`:
/// `dx = r·g − r³·x·mean(g·x)` and `dw = Σ_rows dy·x·r`.
#[derive(Debug)]
struct RmsNormBackward;

impl<const D: usize> TensorBackward<2, D, D> for RmsNormBackward {
    /// The input, the shaped weight, and `r` in f32 (`[.., 1]`).
    type State = (Tensor<D>, Tensor<D>, Tensor<D>);

    fn backward(&self, (x, w, inv_rms): Self::State, dy: Tensor<D>) -> [Tensor<D>; 2] {
        let (x_dtype, w_dtype) = (x.dtype(), w.dtype());
        let w_dims = w.dims();
        let d = x.dims()[D - 1];
        let x32 = to_dtype(x, DType::F32);
        let dy32 = to_dtype(dy, DType::F32);
        // One chain per reduction, each depending on the one before: burn-fusion splits
        // independent chains into blocks, and past five it gives up on the whole segment.
        let g = dy32.clone() * to_dtype(w, DType::F32);
        let dot = (g.clone() * x32.clone()).mean_dim(D - 1);
        let coef = dot * inv_rms.clone() * inv_rms.clone() * inv_rms.clone();
        let dx = g * inv_rms.clone() - x32.clone() * coef;
        let dw = (dy32 * x32 * inv_rms)
            .reshape([-1, d as i64])
            .sum_dim(0)
            .reshape(w_dims);
        [to_dtype(dx, x_dtype), to_dtype(dw, w_dtype)]
    }
}
