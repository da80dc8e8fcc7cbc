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
use ember_models::layers::custom_grad::{self, TensorBackward};
use ember_models::layers::gemm::product;
use ember_models::layers::{logsumexp, to_dtype};

/// Logit elements per chunk: 128 MiB of f32 logits, and about as much again for their
/// softmax and gradient.
const CHUNK_ELEMENTS: usize = 1 << 25;

/// Logit elements per chunk on CUDA: 1 GiB of f32 logits. With Qwen3's 151,936 words the
/// smaller chunk has 220 rows, so the head's three GEMMs per chunk have a 220-long side:
/// `dH = dZ · W` then fills 16 output tiles of an H100's 132 SMs, `dW = dZᵀ · H` sums over
/// 220 tokens, and the f32 `dW` is read and written once per chunk, 38 times a 4 × 2048
/// step. At 1,766 rows there are five chunks.
const CHUNK_ELEMENTS_CUDA: usize = 1 << 28;

/// Rows per chunk for a vocabulary on `device`: `EMBER_CE_CHUNK_ROWS` when set, else as many
/// as make a chunk's logits hold `CHUNK_ELEMENTS` (`CHUNK_ELEMENTS_CUDA` on CUDA).
pub fn chunk_rows(vocab: usize, device: &burn::tensor::Device) -> usize {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let fixed = *ROWS.get_or_init(|| ember_models::device::count_env("EMBER_CE_CHUNK_ROWS"));
    let elements = match ember_models::device::is_cuda(device) {
        true => CHUNK_ELEMENTS_CUDA,
        false => CHUNK_ELEMENTS,
    };
    fixed.unwrap_or((elements / vocab.max(1)).max(1))
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
    // The scratch tensors below belong off the graph (only the surrogate joins it), so they
    // are made on the inner device and pay no autodiff dispatch.
    let device = hidden.device().inner();
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
        let logits = to_dtype(product(hc.clone(), w.clone(), false, true), DType::F32);
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
            d_hidden.push(product(g.clone(), w.clone(), false, false));
            let dw = to_dtype(product(g, hc, true, false), DType::F32);
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

/// Each token's log-prob of its target under `softmax(hidden @ headᵀ / temperature)`,
/// `[tokens]` in f32 with a graph when the inputs have one, and the entropy of that
/// distribution at each token, without one; the policy-gradient losses' inputs. Chunked
/// like [`linear_cross_entropy`], but with a backward of its own ([`LogprobBackward`]), since
/// the gradient those losses send back to each log-prob is only known in the backward pass.
/// Equal to [`super::lm::token_logprobs`] of the full logits.
pub fn linear_logprobs(
    hidden: Tensor<2>,
    head: Tensor<2>,
    targets: Tensor<1, Int>,
    temperature: f64,
    chunk_rows: usize,
) -> (Tensor<1>, Tensor<1>) {
    let op = LogprobBackward {
        temperature: if temperature > 0.0 { temperature } else { 1.0 },
        chunk_rows: chunk_rows.max(1),
    };
    let targets = targets.inner();
    let mut entropy = None;
    let logp = custom_grad::apply(op.clone(), [hidden, head], |[h, w]| {
        let (mut logps, mut lses, mut ents) = (Vec::new(), Vec::new(), Vec::new());
        for (start, len) in op.chunks(h.dims()[0]) {
            let z = op.scaled_logits(&h, &w, start, len);
            let lse = logsumexp(z.clone());
            let t = targets.clone().narrow(0, start, len).reshape([len, 1]);
            logps.push((z.clone().gather(1, t) - lse.clone()).reshape([len]));
            let p = (z.clone() - lse.clone()).exp();
            ents.push((lse.clone() - (p * z).sum_dim(1)).reshape([len]));
            lses.push(lse);
        }
        entropy = Some(Tensor::cat(ents, 0));
        let lse = Tensor::cat(lses, 0);
        (Tensor::cat(logps, 0), (h, w, targets.clone(), lse))
    });
    (logp, entropy.expect("the forward ran"))
}

/// The head's backward for [`linear_logprobs`]: with `g` the gradient of each log-prob and
/// `z` the scaled logits, d logp/dz = onehot − softmax(z), recomputed chunk by chunk.
#[derive(Clone, Debug)]
struct LogprobBackward {
    temperature: f64,
    chunk_rows: usize,
}

impl LogprobBackward {
    fn chunks(&self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.chunk_rows;
        (0..n).step_by(step).map(move |s| (s, step.min(n - s)))
    }

    /// Rows `start..start + len` of `hidden @ headᵀ / temperature`, in f32.
    fn scaled_logits(&self, h: &Tensor<2>, w: &Tensor<2>, start: usize, len: usize) -> Tensor<2> {
        let hc = h.clone().narrow(0, start, len);
        let w = to_dtype(w.clone(), hc.dtype());
        let z = to_dtype(product(hc, w, false, true), DType::F32);
        if self.temperature != 1.0 {
            z / self.temperature
        } else {
            z
        }
    }
}

impl TensorBackward<2, 2, 1> for LogprobBackward {
    /// hidden, head, targets, and each token's log-sum-exp of its scaled logits.
    type State = (Tensor<2>, Tensor<2>, Tensor<1, Int>, Tensor<2>);

    fn backward(&self, (h, w, targets, lse): Self::State, g: Tensor<1>) -> [Tensor<2>; 2] {
        let dtype = h.dtype();
        let wc = to_dtype(w.clone(), dtype);
        let mut d_hidden = Vec::new();
        let mut d_head: Option<Tensor<2>> = None;
        for (start, len) in self.chunks(h.dims()[0]) {
            let z = self.scaled_logits(&h, &w, start, len);
            let p = (z - lse.clone().narrow(0, start, len)).exp();
            let gc = to_dtype(g.clone(), DType::F32)
                .narrow(0, start, len)
                .reshape([len, 1])
                / self.temperature;
            let t = targets.clone().narrow(0, start, len).reshape([len, 1]);
            let dz = (p * gc.clone().neg()).scatter(1, t, gc, IndexingUpdateOp::Add);
            let dz = to_dtype(dz, dtype);
            d_hidden.push(product(dz.clone(), wc.clone(), false, false));
            let hc = h.clone().narrow(0, start, len);
            let dw = to_dtype(product(dz, hc, true, false), DType::F32);
            d_head = Some(match d_head {
                Some(acc) => acc + dw,
                None => dw,
            });
        }
        let d_head = d_head.unwrap_or_else(|| Tensor::zeros(w.dims(), &w.device()));
        [Tensor::cat(d_hidden, 0), to_dtype(d_head, w.dtype())]
    }
}
