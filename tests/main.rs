//! Ember's integration tests, one binary (Burn links slowly; one test binary keeps CI short).

#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "cuda"))]
mod backends;
mod book;
mod cli;
mod common;
mod data;
mod distill;
mod fused;
mod hf_interop;
mod hybrid;
mod hybrid_parity;
mod mlm;
mod modernbert_parity;
mod nvidia_flash;
mod qwen3_generate;
mod qwen3_parity;
mod rl;
mod stages;
mod tasks;
mod tokenizer;
mod train;
