//! Losses. Each objective adds only its loss over a batch; the loop is shared.

pub mod distill;
pub mod grpo;
pub mod linear_ce;
pub mod lm;
pub mod mlm;
pub mod rlp;
