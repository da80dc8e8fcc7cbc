//! Recipes, stages and the trainer loop.

pub mod captured;
pub mod checkpoint;
pub mod cpt;
pub mod dry_run;
pub mod evaluate;
pub mod hybrid_lm;
pub mod metrics;
pub mod mlm;
pub mod objectives;
pub mod opd;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod pretrain;
pub mod prompt_set;
pub mod recipe;
pub mod rlp;
pub mod rlvr;
pub mod rollout;
pub mod schedule;
pub mod sft;
pub mod stages;
pub mod step_cap;
pub mod tensors_io;
pub mod trainer;
