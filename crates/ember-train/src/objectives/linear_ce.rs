//! Next-token cross-entropy fused with the LM head and chunked over tokens, so that the
//! `[tokens, vocab]` logits (5 GB in f32 for Qwen3's 151,936 words × 8k tokens) and their
//! softmax and gradient never exist whole: at most `chunk_rows × vocab` of them at a time.
//!
//! Burn's autodiff would keep every chunk's logits for its backward pass, so the head's
//! backward is done here, during the forward: each chunk's softmax gives its gradient
//! `(softmax − onehot) · weight / denom` at once, which is multiplied into the gradients of
//! the hidden states and of the head's matrix and then dropped (the design of Liger-Kernel's
//! fused linear cross-entropy). Those two gradients reach the graph through a surrogate,
//! `Σ hidden·dH + Σ W·dW`, whose value is cancelled and whose gradient is exactly theirs.
//! The returned loss may therefore be scaled and added to other terms, but not transformed
//! non-linearly before `backward()`, which every objective here respects.

use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor};
use ember_models::layers::to_dtype;

/// Logit elements per chunk: 128 MiB of f32 logits, and about as much again for their
/// softmax and gradient.
const CHUNK_ELEMENTS: usize = 1 << 25;

/// Rows per chunk for a vocabulary, such that a chunk's logits hold `CHUNK_ELEMENTS`.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Mean cross-entropy of `targets` (`[tokens]`) under `hidden @ headᵀ` (`hidden`
/// `[tokens, dim]` in the compute dtype, `head` `[vocab, dim]`), weighted per token when
/// `weights` are given (tokens of weight 0 do not count), with softmax in f32. Equal to
/// [`super::lm::cross_entropy`] of the full logits, in value and gradients.
pub fn linear_cross_entropy(
    hidden: Tensor<2>,
    head: Tensor<2>,
    targets: Tensor<1, Int>,
    weights: Option<Tensor<1>>,
    chunk_rows: usize,
) -> Tensor<1> {
    let [n, _] = hidden.dims();
    let dtype = hidden.dtype();
    let device = hidden.device();
    let tracked = hidden.is_tracked() || head.is_tracked();
    // Everything below runs off the graph; only the surrogate at the end joins it.
    let h = hidden.clone().inner();
    let w = to_dtype(head.clone().inner(), dtype);
    // Each token's share of the loss: weight / Σ weights (or 1 / n).
    let scale = match weights {
        Some(wt) => {
            let wt = wt.inner();
            let denom = wt.clone().sum().clamp_min(1.0);
            wt / denom.unsqueeze::<1>()
        }
        None => Tensor::<1>::full([n], 1.0 / n as f64, &device),
    };
    let targets = targets.inner();

    let mut loss = Tensor::<1>::zeros([1], &device);
    let mut d_hidden = Vec::new();
    let mut d_head: Option<Tensor<2>> = None;
    let step = chunk_rows.max(1);
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        let hc = h.clone().narrow(0, start, len);
        let tc = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let sc = scale.clone().narrow(0, start, len).reshape([len, 1]);
        let logits = to_dtype(hc.clone().matmul(w.clone().transpose()), DType::F32);
        let max = logits.clone().max_dim(1);
        let shifted = logits - max;
        let sum_exp = shifted.clone().exp().sum_dim(1);
        let lse = sum_exp.clone().log();
        let nll = lse.clone() - shifted.clone().gather(1, tc.clone());
        loss = loss + (nll * sc.clone()).sum();
        if tracked {
            let p = (shifted - lse).exp();
            let g = (p * sc.clone()).scatter(1, tc, sc.neg(), IndexingUpdateOp::Add);
            let g = to_dtype(g, dtype);
            d_hidden.push(g.clone().matmul(w.clone()));
            let dw = to_dtype(g.transpose().matmul(hc), DType::F32);
            d_head = Some(match d_head {
                Some(acc) => acc + dw,
                None => dw,
            });
        }
    }
    let Some(d_head) = d_head.filter(|_| tracked) else {
        return loss;
    };
    let d_hidden = Tensor::cat(d_hidden, 0);
    let surrogate = (to_dtype(hidden, DType::F32) * to_dtype(d_hidden, DType::F32)).sum()
        + (to_dtype(head, DType::F32) * d_head).sum();
    surrogate.clone() - surrogate.detach() + loss
}
