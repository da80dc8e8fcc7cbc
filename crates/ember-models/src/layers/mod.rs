//! Building blocks shared by the model files.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cublaslt;
pub mod custom_grad;
pub mod flash;
pub mod gemm;
pub mod linear;
pub mod mlp;
pub mod rms_norm;
pub mod rope;

use burn::tensor::{DType, Tensor};

/// Casts only when needed, so f32 runs pay nothing for the mixed-precision plumbing.
pub fn to_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `value` written into `buffer`'s own storage (same shape). A captured graph keeps reading
/// and writing the buffers it was recorded with, so the state it carries across replays is
/// updated this way rather than replaced.
pub fn write_into<const D: usize, K: burn::tensor::kind::Basic>(
    buffer: Tensor<D, K>,
    value: Tensor<D, K>,
) -> Tensor<D, K> {
    let ranges = buffer.dims().map(|d| 0..d);
    buffer.slice_assign(ranges, value)
}

/// `[rows, 1]` log-sum-exp of each row of `x` `[rows, n]`, shifted by the row maximum.
pub fn logsumexp(x: Tensor<2>) -> Tensor<2> {
    let m = x.clone().max_dim(1);
    (x - m.clone()).exp().sum_dim(1).log() + m
}

/// Stores every float parameter in a dtype (inference in bf16 without casting f32 masters
/// in each op).
pub struct CastParams(pub burn::tensor::DType);

impl burn::module::ModuleMapper for CastParams {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<D>> {
        let dtype = self.0;
        param.map(|t| to_dtype(t, dtype))
    }
}
