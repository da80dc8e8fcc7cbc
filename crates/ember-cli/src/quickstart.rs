//! `ember quickstart`: the newcomer's first run. It pretrains the quickstart recipe's tiny
//! Qwen3 on generated arithmetic with worked steps (no download), compares the final loss
//! with the unigram entropy of the data (what a model that ignores context would reach),
//! then loads the checkpoint back from disk and generates from it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ember_data::{StreamDecoder, Tokenizer};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_train::pretrain::{self, unigram_entropy, TrainArgs};
use ember_train::recipe::Recipe;

use crate::models::{self, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Recipe file.
    #[arg(default_value = "recipes/quickstart.toml")]
    recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> Result<()> {
    let recipe = Recipe::load_with(&a.recipe, &a.overrides)?;
    let Some(gen) = recipe.generate.clone() else {
        bail!("{}: section [generate] is missing", a.recipe.display());
    };
    // Check the whole recipe before deleting the previous run.
    if recipe.model.is_some() {
        recipe.model_spec(&a.recipe)?;
    }
    pretrain::sections(&recipe, &a.recipe)?;
    let run_dir = recipe.run_dir();
    // The quickstart always starts fresh; `ember train` refuses to overwrite a run.
    if run_dir.exists() {
        eprintln!(
            "removing the previous quickstart run in {}",
            run_dir.display()
        );
        std::fs::remove_dir_all(&run_dir)?;
    }
    let summary = pretrain::train(&TrainArgs {
        recipe: a.recipe.clone(),
        overrides: a.overrides.clone(),
        device: a.run.device.clone(),
        resume: None,
    })?;
    let h = unigram_entropy(&summary.train_file)?;
    eprintln!(
        "final train loss {:.3} nats/token{}; unigram entropy of the training tokens {h:.3} nats/token",
        summary.final_loss,
        summary
            .val_loss
            .map(|v| format!(", validation loss {v:.3}"))
            .unwrap_or_default()
    );

    let (model, _) = models::load(&summary.run_dir, &a.run)?;
    let tok = Tokenizer::from_file(&summary.run_dir.join("tokenizer.json"))?;
    let eos = model.config.eos_ids();
    let prompt = tok.encode(&gen.prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: vec![gen.max_new_tokens],
        eos_ids: eos.clone(),
        pad_id: eos.first().copied().unwrap_or(0),
        sampling: Sampling {
            temperature: gen.temperature,
            top_k: gen.top_k,
            top_p: gen.top_p,
            seed: recipe.run.seed,
        },
    };
    let mut stream = StreamDecoder::new(&tok, true);
    let mut out = std::io::stdout();
    eprintln!("sampling from {}:", summary.run_dir.display());
    print!("{}", gen.prompt);
    let mut on_token = |_: usize, id: u32| {
        if let Ok(Some(p)) = stream.push(id) {
            let _ = write!(out, "{p}");
            let _ = out.flush();
        }
    };
    let t1 = Instant::now();
    let seqs = generate(
        &model,
        &[prompt],
        &opts,
        &mut Hooks {
            on_token: Some(&mut on_token),
            stop: None,
        },
    )?;
    let secs = t1.elapsed().as_secs_f64();
    println!();
    let n = seqs[0].tokens.len();
    eprintln!(
        "generated {n} tokens in {secs:.2} s ({:.1} tokens/s)",
        n as f64 / secs
    );
    Ok(())
}
