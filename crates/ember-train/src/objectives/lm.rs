//! Causal language modelling: next-token cross-entropy.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor};
use ember_models::layers::to_dtype;

/// Mean next-token negative log-likelihood over `[batch, seq]` targets, computed in f32
/// whatever the compute dtype (as transformers upcasts logits before the loss). Positions
/// whose `weights` are 0 do not count.
pub fn cross_entropy(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    weights: Option<Tensor<2>>,
) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logp = log_softmax(to_dtype(logits, DType::F32).reshape([b * s, v]), 1);
    let nll = logp
        .gather(1, targets.reshape([b * s, 1]))
        .reshape([b * s])
        .neg();
    match weights {
        None => nll.mean(),
        Some(w) => {
            let w = w.reshape([b * s]);
            let denom = w.clone().sum().clamp_min(1.0);
            (nll * w).sum() / denom
        }
    }
}
