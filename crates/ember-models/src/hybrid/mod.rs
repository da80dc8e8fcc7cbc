//! Hybrid decoders (Nemotron-Flash, NemotronH, Mamba2): residual blocks whose mixer is a
//! Mamba2 SSM, a DeltaNet, attention or an MLP, in an order a config gives.

pub mod delta_net;
pub mod delta_rule;
pub mod documents;
pub mod mamba2;
pub mod nvidia_flash;
mod packed;
pub mod qwen3_next;
pub mod stack;
pub mod weight_norm;

use burn::tensor::activation::silu;
use burn::tensor::{Bool, DType, Device, Int, Tensor};

use crate::layers::to_dtype;
pub use documents::Documents;

/// exp of the segment sums of a cumulative sum over the last axis: out[.., i, j] =
/// exp(cum_i − cum_j) for j ≤ i and 0 above the diagonal. `[.., k]` → `[.., k, k]`.
pub fn segment_decay(cum: Tensor<4>) -> Tensor<5> {
    let [a, b, c, k] = cum.dims();
    let rows = cum.clone().reshape([a, b, c, k, 1]);
    let cols = cum.reshape([a, b, c, 1, k]);
    let upper = Tensor::<2, Bool>::tril_mask([k, k], 0, &rows.device())
        .reshape([1, 1, 1, k, k])
        .expand([a, b, c, k, k]);
    (rows - cols).mask_fill(upper, f32::NEG_INFINITY).exp()
}

/// A causal depthwise conv over `[batch, seq, channels]` that continues `history` (the last
/// `kernel − 1` inputs, `[batch, kernel − 1, channels]`, updated in place), then SiLU; in
/// f32. `weight` is `[channels, kernel]`. With `docs`, no tap reaches into an earlier
/// document of a packed row.
pub fn causal_conv_silu(
    history: &mut Tensor<3>,
    x: Tensor<3>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    docs: Option<&Documents>,
) -> Tensor<3> {
    let [_, l, ch] = x.dims();
    let k = weight.dims()[1];
    let full = Tensor::cat(vec![history.clone(), to_dtype(x, DType::F32)], 1);
    *history = full.clone().narrow(1, l, k - 1);
    let w = to_dtype(weight, DType::F32);
    let tap = |j: usize| {
        let t = full.clone().narrow(1, j, l) * w.clone().narrow(1, j, 1).reshape([1, 1, ch]);
        match docs {
            // Tap j reads the input k − 1 − j steps back.
            Some(d) if j + 1 < k => t * d.reaches_back(k - 1 - j),
            _ => t,
        }
    };
    let mut out = tap(0);
    for j in 1..k {
        out = out + tap(j);
    }
    if let Some(b) = bias {
        out = out + to_dtype(b, DType::F32).reshape([1, 1, ch]);
    }
    silu(out)
}

/// x / sqrt(Σx² + 1e-6) over the last axis (FLA's and transformers' l2norm).
pub fn l2_normalize<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let n = x.clone().square().sum_dim(D - 1).add_scalar(1e-6).sqrt();
    x / n
}

/// `[b, l, groups, d]` → `[b, l, groups·per, d]`: each group repeated for `per` consecutive heads.
pub fn repeat_heads(x: Tensor<4>, per: usize) -> Tensor<4> {
    if per == 1 {
        return x;
    }
    let [b, l, g, d] = x.dims();
    x.reshape([b, l, g, 1, d])
        .expand([b, l, g, per, d])
        .reshape([b, l, g * per, d])
}

/// A recurrent layer's decoding state: the conv history `[batch, kernel − 1, channels]` and
/// its per-head state matrix `[batch, heads, a, b]` (Mamba2: head_dim × state; DeltaNet:
/// dk × dv), in f32.
#[derive(Debug, Clone)]
pub struct RecurrentState {
    pub conv: Tensor<3>,
    pub state: Tensor<4>,
}

impl RecurrentState {
    pub fn zeros(
        batch: usize,
        kernel: usize,
        channels: usize,
        heads: [usize; 3],
        device: &Device,
    ) -> Self {
        let [h, a, b] = heads;
        Self {
            conv: Tensor::zeros([batch, kernel - 1, channels], device),
            state: Tensor::zeros([batch, h, a, b], device),
        }
    }

    /// Keeps batch rows `idx` (finished sequences leave the batch).
    pub fn select_rows(&mut self, idx: &Tensor<1, Int>) {
        self.conv = self.conv.clone().select(0, idx.clone());
        self.state = self.state.clone().select(0, idx.clone());
    }

    /// A copy in buffers of its own, to put back later with [`Self::restore`].
    pub fn snapshot(&self) -> Self {
        Self {
            conv: self.conv.clone().add_scalar(0.0),
            state: self.state.clone().add_scalar(0.0),
        }
    }

    /// Writes `saved` into this state's own buffers.
    pub fn restore(&mut self, saved: Self) {
        self.conv
            .inplace(|c| crate::layers::write_into(c, saved.conv));
        self.state
            .inplace(|s| crate::layers::write_into(s, saved.state));
    }

    /// Runs `f`, which advances the state, and writes the advanced state back into the
    /// buffers it had before: a captured decode step replays against the buffers it was
    /// recorded with, so its state must stay in them.
    pub fn advance_in_place<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let mut advanced = self.clone();
        let out = f(&mut advanced);
        self.restore(advanced);
        out
    }
}

/// A depthwise conv weight stored as transformers does, `[channels, 1, kernel]`, held as
/// `[channels, kernel]`.
pub fn conv_param(
    src: &mut dyn crate::weights::WeightSource,
    name: &str,
    channels: usize,
    kernel: usize,
    device: &Device,
) -> anyhow::Result<burn::module::Param<Tensor<2>>> {
    crate::weights::param_as(
        src,
        name,
        &[channels, 1, kernel],
        [channels, kernel],
        crate::weights::Init::Normal((kernel as f64).powf(-0.5)),
        device,
    )
}

/// Writes a [`conv_param`] back as `[channels, 1, kernel]`.
pub fn export_conv(
    out: &mut crate::weights::WeightSink,
    name: &str,
    p: &burn::module::Param<Tensor<2>>,
) {
    let [c, k] = p.dims();
    crate::weights::export_as(out, name, p, &[c, 1, k]);
}
