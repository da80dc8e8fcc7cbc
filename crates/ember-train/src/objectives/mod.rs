//! Losses. Each objective adds only its loss over a batch; the loop is shared.

pub mod grpo;
pub mod lm;
