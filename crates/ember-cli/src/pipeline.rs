//! `ember pipeline RECIPE`: runs a recipe's [[stage]]s in order.

use anyhow::Result;

use crate::train::{report_dry_run, RecipeArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Stop after this stage (the stages before it run first, or are skipped when complete).
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    /// Stages to run at once where they do not depend on each other (a student's chain
    /// beside the main model's). Their results are the same as one at a time.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

pub fn run(a: Args) -> Result<()> {
    let r = a.recipe;
    let until = a.until.as_deref();
    if r.dry_run {
        let lines = ember_train::dry_run::stages(&r.recipe, &r.overrides, until)?;
        return report_dry_run(&r, &lines);
    }
    ember_train::pipeline::run(&r.recipe, &r.overrides, &r.device, until, a.jobs)?;
    Ok(())
}
