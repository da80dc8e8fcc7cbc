//! Recipes, stages and (as the pipeline issues land) the trainer loop.

pub mod recipe;
