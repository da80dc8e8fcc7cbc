//! RMSNorm as HF computes it: normalise in f32, cast back, then scale by the weight.

use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor};

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

    pub fn scale<const D: usize>(&self, dtype: DType) -> Tensor<D> {
        to_dtype(self.weight.val(), dtype).unsqueeze::<D>()
    }

    pub fn forward_scaled<const D: usize>(&self, x: Tensor<D>, w: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x32 = to_dtype(x, DType::F32);
        let inv_rms = (x32.clone().square().mean_dim(D - 1) + self.eps)
            .sqrt()
            .recip();
        let normed = to_dtype(x32 * inv_rms, dtype);
        normed * w
    }
}
