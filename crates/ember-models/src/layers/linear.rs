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
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = x.shape().num_elements() / d_in;
    let y = matmul_nt(x.reshape([rows, d_in]), to_dtype(w, dtype));
    with_bias(y, b, dims)
}

/// `[rows, out]` products plus the bias, in their own dtype, shaped as the input `dims` with
/// `out` features.
fn with_bias<const D: usize>(
    y: Tensor<2>,
    b: Option<Tensor<1>>,
    mut dims: [usize; D],
) -> Tensor<D> {
    dims[D - 1] = y.dims()[1];
    let dtype = y.dtype();
    let y = match b {
        Some(b) => y + to_dtype(b, dtype).unsqueeze::<2>(),
        None => y,
    };
    y.reshape(dims)
}

/// Rows (tokens) from which [`linear_fused`] runs one GEMM for several layers.
pub const FUSE_MIN_ROWS: usize = 256;

/// `x @ Wᵢᵀ + bᵢ` for layers that read the same input, as one GEMM over their weights
/// stacked, split back into one output per layer.
///
/// Why: on an H100, Burn's bf16 matmul ran `[8192, 1024] · [n, 1024]ᵀ` at 21 TFLOP/s for
/// n = 1,024 and 29 for n = 2,048, but at 134 for n = 3,072, and the weight gradients alike
/// (`benches/README.md`, the cuBLASLt table). Qwen3-0.6B's q, k and v projections are those
/// narrow shapes; stacked they make one 4,096-wide GEMM, and the backward one `dy · W` where
/// autodiff summed three. Under [`FUSE_MIN_ROWS`] rows (decoding) each product reads its
/// weights once either way, and the stacking would copy them at every call, so the layers
/// run one by one.
pub fn linear_fused<const D: usize>(x: Tensor<D>, layers: &[&Linear]) -> Vec<Tensor<D>> {
    let d_in = x.dims()[D - 1];
    let rows = x.shape().num_elements() / d_in.max(1);
    if layers.len() < 2 || rows < FUSE_MIN_ROWS {
        return layers.iter().map(|l| l.forward(x.clone())).collect();
    }
    let (dtype, dims) = (x.dtype(), x.dims());
    let weights: Vec<Tensor<2>> = layers
        .iter()
        .map(|l| to_dtype(l.weight.val(), dtype))
        .collect();
    let outs: Vec<usize> = weights.iter().map(|w| w.dims()[0]).collect();
    let y = matmul_nt(x.reshape([rows, d_in]), Tensor::cat(weights, 0));
    let mut start = 0;
    layers
        .iter()
        .zip(outs)
        .map(|(l, d_out)| {
            let part = y.clone().slice([0..rows, start..start + d_out]);
            start += d_out;
            with_bias(part, l.bias.as_ref().map(|b| b.val()), dims)
        })
        .collect()
}
