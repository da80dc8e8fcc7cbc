//! `ember pipeline RECIPE`: runs a recipe's [[stage]]s in order.

use anyhow::Result;

use crate::train::RecipeArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
}

pub fn run(a: Args) -> Result<()> {
    let r = a.recipe;
    ember_train::pipeline::run(&r.recipe, &r.overrides, &r.device)?;
    Ok(())
}
