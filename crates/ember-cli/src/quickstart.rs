//! `ember quickstart`: the newcomer's first run, the quickstart recipe's pipeline on generated
//! arithmetic with worked steps (no download): pretraining, curriculum CPT from easy to hard
//! problems, SFT in the chat format, RLVR; then a smaller student pretrained, trained with
//! RLP and distilled on-policy from the RLVR model. It compares the pretraining loss with the
//! unigram entropy of the data (what a model that ignores context would reach), prints the
//! stage table with the task accuracy before and after each fine-tuning stage (and the
//! teacher's), RLP's information gain, then loads the last fine-tuned model of the main line
//! back from disk and answers the recipe's prompt.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use ember_data::chat::{ChatTemplate, Conversation, Message, Role};
use ember_data::{StreamDecoder, Tokenizer};
use ember_models::generate::{generate, GenerateOptions, Hooks, Sampling};
use ember_train::pipeline;
use ember_train::pretrain::unigram_entropy;
use ember_train::recipe::{Recipe, StageKind};

use crate::models::{self, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Recipe file.
    #[arg(default_value = "recipes/quickstart.toml")]
    recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// cpu (the default: a model this small runs fastest there), auto, vulkan, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Stages to run at once where they do not depend on each other: the student's
    /// pretraining and RLP beside the main model's stages. Results are the same as with 1.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
}

pub fn run(a: Args) -> Result<()> {
    let flags = RunFlags {
        device: a.device.clone(),
        dtype: "f32".into(),
    };
    let recipe = Recipe::load_with(&a.recipe, &a.overrides)?;
    let Some(gen) = recipe.generate.clone() else {
        bail!("{}: section [generate] is missing", a.recipe.display());
    };
    // Check the whole recipe before deleting the previous run.
    if recipe.model.is_some() {
        recipe.model_spec(&a.recipe)?;
    }
    pipeline::check(&recipe, &a.recipe)?;
    let run_dir = recipe.run_dir();
    // The quickstart always starts fresh; `ember pipeline` continues an existing run.
    if run_dir.exists() {
        eprintln!(
            "removing the previous quickstart run in {}",
            run_dir.display()
        );
        std::fs::remove_dir_all(&run_dir)?;
    }
    let rows = pipeline::run(&a.recipe, &a.overrides, &a.device, None, a.jobs)?;
    if let Some(pre) = rows
        .iter()
        .filter(|r| r.kind == StageKind::Pretrain)
        .find_map(|r| r.summary.clone())
    {
        if let Some(file) = &pre.train_file {
            let h = unigram_entropy(file)?;
            eprintln!(
                "pretraining: final train loss {:.3} nats/token{}; unigram entropy of the training tokens {h:.3} nats/token",
                pre.final_loss,
                pre.val_loss
                    .map(|v| format!(", validation loss {v:.3}"))
                    .unwrap_or_default()
            );
        }
    }
    for r in &rows {
        if let (Some(b), Some(f)) = (r.accuracy_before, r.accuracy_after) {
            let teacher = r
                .teacher_accuracy
                .map(|t| format!(" (teacher {:.1}%)", 100.0 * t))
                .unwrap_or_default();
            eprintln!(
                "{}: held-out task accuracy {:.1}% before, {:.1}% after{teacher}",
                r.name,
                100.0 * b,
                100.0 * f
            );
        }
        if let Some((first, last)) = r.reward {
            eprintln!(
                "{}: mean reward {first:.3} over the first tenth of the steps, {last:.3} over the last (each step's problems are new to the model)",
                r.name
            );
        }
        if let Some((first, last)) = r.info_gain {
            eprintln!(
                "{}: mean information gain {first:.3} nats over the first tenth of the steps, {last:.3} over the last",
                r.name
            );
        }
    }
    // The answer comes from the last fine-tuned stage of the main model (not a student).
    let last = rows
        .iter()
        .rev()
        .find(|r| matches!(r.kind, StageKind::Sft | StageKind::Rlvr))
        .or(rows.last())
        .expect("a checked pipeline has stages");
    let final_dir = run_dir.join(&last.name);
    let chat = matches!(last.kind, StageKind::Sft | StageKind::Rlvr);

    let (model, _) = models::load(&final_dir, &flags)?;
    let tok = Tokenizer::from_file(&final_dir.join("tokenizer.json"))?;
    let mut eos = model.config.eos_ids();
    // The fine-tuned model answers a chat turn and ends it with <|im_end|>.
    let prompt = if chat {
        let template = ChatTemplate::new(&tok)?;
        eos.push(template.im_end());
        let conv = Conversation::new(vec![Message::new(Role::User, gen.prompt.trim())]);
        template.prompt(&tok, &conv)?
    } else {
        tok.encode(&gen.prompt)?
    };
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
    eprintln!("sampling from {}:", final_dir.display());
    println!("{}", gen.prompt.trim_end());
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
