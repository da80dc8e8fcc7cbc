//! Data for Ember: tokenizers now; sources, packing, mixtures, chat templates and tasks as
//! the pipeline stages land.

pub mod bpe;
pub mod cache;
pub mod chat;
pub mod loader;
pub mod mixture;
pub mod prompts;
pub mod rewards;
pub mod rng;
pub mod sft;
pub mod sources;
pub mod tasks;
pub mod tokenizer;

pub use bpe::train_bpe;
pub use cache::{build_or_reuse, CacheSpec, TokenCache};
pub use loader::{Batch, Cursor, PackedLoader};
pub use sources::{Source, TextSplit};
pub use tokenizer::{StreamDecoder, Tokenizer};
