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

/// The log-prob of each target token under softmax(logits / `temperature`), `[batch, seq]`
/// with a graph, and the entropy of that distribution at each position, without one. In f32
/// whatever the compute dtype. RL recomputes sampled tokens' log-probs this way, at the
/// temperature they were sampled with, so the ratio to the sampler's log-probs starts at 1.
pub fn token_logprobs(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    temperature: f64,
) -> (Tensor<2>, Tensor<2>) {
    let [b, s, v] = logits.dims();
    let z = to_dtype(logits, DType::F32).reshape([b * s, v]);
    let z = if temperature > 0.0 && temperature != 1.0 {
        z / temperature
    } else {
        z
    };
    let logp = log_softmax(z, 1);
    let lp = logp.clone().detach();
    let entropy = (lp.clone().exp() * lp).sum_dim(1).neg().reshape([b, s]);
    let picked = logp.gather(1, targets.reshape([b * s, 1])).reshape([b, s]);
    (picked, entropy)
}
