//! `ember train RECIPE`: runs a recipe's training stage.

use std::path::PathBuf;

use anyhow::Result;
use ember_train::pretrain::{self, TrainArgs};

/// A recipe, its overrides and the device: what `train` and `pipeline` both take.
#[derive(clap::Args)]
pub struct RecipeArgs {
    /// Recipe file (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// auto, cpu, vulkan, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Continue a run: its directory (newest checkpoint) or one checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    pretrain::train(&TrainArgs {
        recipe: a.recipe.recipe,
        overrides: a.recipe.overrides,
        device: a.recipe.device,
        resume: a.resume,
    })?;
    Ok(())
}
