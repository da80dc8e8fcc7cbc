//! A linear layer stored in HF's `[out, in]` layout, so checkpoints load and save without
//! transposes and a tied head can reuse the embedding matrix as is.

use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::gemm::matmul_nt;
use super::to_dtype;
use crate::weights::{export, param, Init, WeightSink, WeightSource};

#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn load(
        src: &mut dyn WeightSource,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        std: f64,
        device: &Device,
    ) -> Result<Self> {
        let weight = param(
            src,
            &format!("{prefix}.weight"),
            [d_out, d_in],
            Init::Normal(std),
            device,
        )?;
        let bias = if bias {
            Some(param(
                src,
                &format!("{prefix}.bias"),
                [d_out],
                Init::Zeros,
                device,
            )?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn save(&self, prefix: &str, out: &mut WeightSink) {
        export(out, &format!("{prefix}.weight"), &self.weight);
        if let Some(b) = &self.bias {
            export(out, &format!("{prefix}.bias"), b);
        }
    }

    /// `x @ Wᵀ + b` in the dtype of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// `x @ wᵀ + b` for `w` in `[out, in]` layout; flattens the leading dims into one GEMM.
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<D> {
    let dtype = x.dtype();
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = x.shape().num_elements() / d_in;
    let [d_out, _] = w.dims();
    let y = matmul_nt(x.reshape([rows, d_in]), to_dtype(w, dtype));
    let y = match b {
        Some(b) => y + to_dtype(b, dtype).unsqueeze::<2>(),
        None => y,
    };
    dims[D - 1] = d_out;
    y.reshape(dims)
}
