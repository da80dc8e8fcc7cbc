//! `ember quickstart`: the newcomer's first run. It builds the recipe's model, saves it as an
//! HF checkpoint with a byte-level tokenizer, loads it back from disk and generates.
//! (Until the pretraining stage lands the weights are random, so the text is noise; the
//! run proves the build, the checkpoint format and the generation path end to end.)

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ember_data::{StreamDecoder, Tokenizer};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_models::hf::SaveOptions;
use ember_models::qwen3::Qwen3;
use ember_train::recipe::{ModelSpec, Recipe};

use crate::models::{self, RunFlags};

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

#[derive(clap::Args)]
pub struct Args {
    /// Recipe file.
    #[arg(default_value = "recipes/quickstart.toml")]
    recipe: PathBuf,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> Result<()> {
    let recipe = Recipe::load(&a.recipe)?;
    let ModelSpec::Qwen3(config) = recipe.model_spec(&a.recipe)?;
    let Some(gen) = recipe.generate.clone() else {
        bail!("{}: section [generate] is missing", a.recipe.display());
    };
    let tok = Tokenizer::byte_level(&SPECIALS)?;
    if tok.vocab_size() > config.vocab_size {
        bail!(
            "{} [model]: vocab_size {} is smaller than the byte-level tokenizer's {} tokens",
            a.recipe.display(),
            config.vocab_size,
            tok.vocab_size()
        );
    }
    let device = a.run.device()?;
    let dir = recipe.run_dir().join("init");
    let t0 = Instant::now();
    let mut config = config;
    let eos = tok.token_id(SPECIALS[0]).expect("special token present");
    config.eos_token_id = Some(eos.into());
    let model = Qwen3::random(config, recipe.run.seed, &device)?;
    eprintln!(
        "built qwen3 with {:.2}M parameters on {device:?} in {:.1} s",
        model.config.num_params() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    model.save_pretrained(&dir, &SaveOptions::default())?;
    tok.save(&dir.join("tokenizer.json"))?;
    eprintln!("saved HF checkpoint to {}", dir.display());

    let (model, _) = models::load(&dir, &a.run)?;
    let prompt = tok.encode(&gen.prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: vec![gen.max_new_tokens],
        eos_ids: vec![eos],
        pad_id: eos,
        sampling: Sampling {
            temperature: gen.temperature,
            top_k: gen.top_k,
            top_p: gen.top_p,
            seed: recipe.run.seed,
        },
    };
    let mut stream = StreamDecoder::new(&tok, true);
    let mut out = std::io::stdout();
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
    let mean_lp = seqs[0].logprobs.iter().sum::<f32>() / n.max(1) as f32;
    eprintln!(
        "generated {n} tokens in {secs:.2} s ({:.1} tokens/s), mean log-prob {mean_lp:.3}",
        n as f64 / secs
    );
    Ok(())
}
