//! The projections' GEMM, `x · wᵀ` for a weight in HF's `[out, in]` layout, with its own
//! backward, so that one switch can send all three products of a linear layer (the
//! forward, `dx = dy · w` and `dw = dyᵀ · x`) to a faster kernel.
//!
//! On CUDA, `EMBER_GEMM=cublaslt` routes them, and [`product`]'s callers, to cuBLASLt (see
//! `super::cublaslt`).
//! Everywhere else, and by default, they are Burn's `matmul`, whose autodiff computes the
//! same two products.

use burn::tensor::Tensor;

/// Whether the projections' GEMMs on `device` go to cuBLASLt (`EMBER_GEMM=cublaslt` on a
/// CUDA device of a CUDA build).
pub fn on_cublaslt(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "cuda")]
    return super::cublaslt::enabled_on(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        false
    }
}

/// `[m, k] · [n, k]ᵀ → [m, n]`.
pub fn matmul_nt(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    #[cfg(feature = "cuda")]
    if super::cublaslt::enabled_on(&x.device()) {
        return matmul_nt_lt(x, w);
    }
    x.matmul(w.transpose())
}

/// `op(a) · op(b)` off the graph (`op` transposes when its flag is set), on cuBLASLt
/// wherever [`matmul_nt`] is: for ops with a backward of their own, such as the fused LM
/// head and loss.
pub fn product(a: Tensor<2>, b: Tensor<2>, ta: bool, tb: bool) -> Tensor<2> {
    #[cfg(feature = "cuda")]
    if super::cublaslt::enabled_on(&a.device()) {
        return super::cublaslt::gemm(a, b, ta, tb);
    }
    product_on_burn(a, b, ta, tb)
}

/// [`product`] on Burn's matmul, whatever `EMBER_GEMM` says.
pub fn product_on_burn(a: Tensor<2>, b: Tensor<2>, ta: bool, tb: bool) -> Tensor<2> {
    let a = if ta { a.transpose() } else { a };
    let b = if tb { b.transpose() } else { b };
    a.matmul(b)
}

/// [`matmul_nt`] on cuBLASLt whatever `EMBER_GEMM` says (CUDA tensors only).
#[cfg(feature = "cuda")]
pub fn matmul_nt_lt(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    super::custom_grad::apply(LtBackward, [x, w], |[x, w]| {
        let y = super::cublaslt::gemm(x.clone(), w.clone(), false, true);
        (y, (x, w))
    })
}

#[cfg(feature = "cuda")]
#[derive(Debug)]
struct LtBackward;

#[cfg(feature = "cuda")]
impl super::custom_grad::TensorBackward<2, 2, 2> for LtBackward {
    type State = (Tensor<2>, Tensor<2>);

    fn backward(&self, (x, w): Self::State, dy: Tensor<2>) -> [Tensor<2>; 2] {
        use super::cublaslt::gemm;
        // dx = dy · w  ([m, n] · [n, k]); dw = dyᵀ · x  ([n, m] · [m, k]).
        [gemm(dy.clone(), w, false, false), gemm(dy, x, true, false)]
    }
}
