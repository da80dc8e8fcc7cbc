//! Building blocks shared by the model files.

pub mod attention;
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
