//! `ember eval`: held-out loss and perplexity of a model on a corpus (`--task lm`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use ember_data::cache::{build_or_reuse, CacheSpec};
use ember_data::loader::PackedLoader;
use ember_data::{Source, Tokenizer};
use ember_train::pretrain::{eval_loss, SPECIALS};

use crate::models::{self, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (HF layout, with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// lm: next-token loss and perplexity.
    #[arg(long, default_value = "lm")]
    task: String,
    /// Text, .jsonl or .parquet file or directory.
    #[arg(long)]
    data: PathBuf,
    /// The JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    field: String,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// At most this many batches.
    #[arg(long, default_value_t = 64)]
    max_batches: usize,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(a: Args) -> Result<()> {
    if a.task != "lm" {
        bail!("--task {}: unknown task (supported: lm)", a.task);
    }
    let source = Source::from_path(&a.data, &a.field);
    source.check()?;
    let tok = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let Some(eos) = tok.token_id(SPECIALS[0]) else {
        bail!(
            "{}: no `{}` token",
            a.model.join("tokenizer.json").display(),
            SPECIALS[0]
        );
    };
    let (model, device) = models::load(&a.model, &a.run)?;
    let dir = std::env::temp_dir().join(format!("ember-eval-{}", std::process::id()));
    let spec = CacheSpec {
        sources: std::slice::from_ref(&source),
        tokenizer: &tok,
        eos_id: eos,
        val_fraction: 0.0,
        seed: 0,
    };
    let cache = build_or_reuse(&spec, &dir, false)?;
    let loader = PackedLoader::open(
        &cache.train_file(),
        a.seq_len,
        a.batch,
        0,
        false,
        false,
        eos,
    )?;
    let batches = loader.eval_batches(a.max_batches)?;
    let loss = eval_loss(&model, &batches, &device)?;
    let _ = std::fs::remove_dir_all(&dir);
    let tokens = batches.len() * a.batch * a.seq_len;
    println!(
        "{}",
        serde_json::json!({"task": "lm", "loss": loss, "perplexity": loss.exp(), "tokens": tokens})
    );
    Ok(())
}
