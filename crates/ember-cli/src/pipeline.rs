//! `ember pipeline RECIPE`: runs a recipe's stages in order.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Recipe file with [[stage]] entries.
    recipe: PathBuf,
    /// Override a recipe key, e.g. --set run.out_dir=/tmp/runs (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// auto, cpu, vulkan, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    ember_train::pipeline::run(&a.recipe, &a.overrides, &a.device)?;
    Ok(())
}
