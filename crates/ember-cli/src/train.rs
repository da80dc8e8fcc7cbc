//! `ember train RECIPE`: runs a recipe's training stage.

use std::path::PathBuf;

use anyhow::Result;
use ember_train::pretrain::{self, TrainArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Recipe file (TOML).
    recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// auto, cpu, vulkan, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Continue a run: its directory (newest checkpoint) or one checkpoint directory.
    #[arg(long)]
    resume: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    pretrain::train(&TrainArgs {
        recipe: a.recipe,
        overrides: a.overrides,
        device: a.device,
        resume: a.resume,
    })?;
    Ok(())
}
