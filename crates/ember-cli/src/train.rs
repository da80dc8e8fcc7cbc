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
    /// Check the recipe and every file it names, print what each stage would run, and
    /// stop without training.
    #[arg(long)]
    pub dry_run: bool,
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
    if a.recipe.dry_run {
        let lines = ember_train::dry_run::single(&a.recipe.recipe, &a.recipe.overrides)?;
        return report_dry_run(&a.recipe, &lines);
    }
    pretrain::train(&TrainArgs {
        recipe: a.recipe.recipe,
        overrides: a.recipe.overrides,
        device: a.recipe.device,
        resume: a.resume,
    })?;
    Ok(())
}

/// Prints a dry run's stage lines and its verdict.
pub fn report_dry_run(r: &RecipeArgs, lines: &[String]) -> Result<()> {
    for l in lines {
        println!("{l}");
    }
    println!(
        "{}: ok (dry run: {} stage{} checked, nothing trained)",
        r.recipe.display(),
        lines.len(),
        if lines.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
