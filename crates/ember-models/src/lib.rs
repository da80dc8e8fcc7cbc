//! Ember's model zoo: backend-generic definitions that match HF transformers numerically,
//! HF checkpoint interop, and the batched generation engine.

pub mod decode_graph;
pub mod device;
pub mod generate;
pub mod hf;
pub mod hybrid;
pub mod layers;
pub mod modernbert;
pub mod qwen3;
pub mod rng;
pub mod weights;

pub use burn;
