//! Data for Ember: tokenizers now; sources, packing, mixtures, chat templates and tasks as
//! the pipeline stages land.

pub mod tokenizer;

pub use tokenizer::{StreamDecoder, Tokenizer};
