//! `ember eval`: held-out loss and perplexity of a model on a corpus (`--task lm`), or
//! generation-based accuracy on held-out problems of a verifiable task (`--task arithmetic`).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use ember_data::cache::{build_or_reuse, CacheSpec};
use ember_data::loader::PackedLoader;
use ember_data::{Source, Tokenizer};
use ember_train::evaluate::{accuracy, held_out};
use ember_train::pretrain::{eval_loss, SPECIALS};
use ember_train::recipe::PromptFormat;

use crate::models::{self, Decoder, RunFlags};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (HF layout, with tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// lm: next-token loss and perplexity on --data; or a task (arithmetic): accuracy of
    /// greedy answers to its held-out problems.
    #[arg(long, default_value = "lm")]
    task: String,
    /// Text, .jsonl or .parquet file or directory (--task lm).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Task levels, e.g. 1,2,3 (default: all).
    #[arg(long, value_delimiter = ',')]
    levels: Vec<u32>,
    /// Held-out problems to answer.
    #[arg(long, default_value_t = 64)]
    count: usize,
    /// Which held-out problems (the stages use the recipe's run.seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// chat (the chat template, for fine-tuned models) or text (as pretraining saw it).
    #[arg(long, default_value = "chat")]
    format: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Write every graded answer here (JSONL).
    #[arg(long)]
    answers: Option<PathBuf>,
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

fn task_accuracy(a: &Args) -> Result<()> {
    let format = match a.format.as_str() {
        "chat" => PromptFormat::Chat,
        "text" => PromptFormat::Text,
        other => bail!("--format {other}: expected chat or text"),
    };
    let problems = held_out(&a.task, a.seed, a.count, &a.levels)
        .map_err(|e| anyhow!("--task {}: {e:#} (or lm)", a.task))?;
    let tok = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let acc = match models::load_decoder(&a.model, &a.run)?.0 {
        Decoder::Qwen3(m) => accuracy(&*m, &tok, &problems, format, a.max_new_tokens, a.batch),
        Decoder::Hybrid(m) => accuracy(&*m, &tok, &problems, format, a.max_new_tokens, a.batch),
    }?;
    if let Some(p) = &a.answers {
        let body: String = acc
            .graded
            .iter()
            .map(|g| serde_json::to_string(g).expect("graded answers serialise") + "\n")
            .collect();
        ember_models::hf::write_atomic(p, body.as_bytes())?;
    }
    let levels: serde_json::Map<String, serde_json::Value> = acc
        .by_level
        .iter()
        .map(|(l, (c, n))| (l.to_string(), serde_json::json!({"correct": c, "total": n})))
        .collect();
    println!(
        "{}",
        serde_json::json!({"task": a.task, "accuracy": acc.value(), "correct": acc.correct, "total": acc.total, "by_level": levels})
    );
    Ok(())
}

pub fn run(a: Args) -> Result<()> {
    if a.task != "lm" {
        return task_accuracy(&a);
    }
    let Some(data) = &a.data else {
        bail!("--task lm needs --data FILE_OR_DIR");
    };
    let source = Source::from_path(data, &a.field);
    source.check()?;
    let tok = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let Some(eos) = tok.token_id(SPECIALS[0]) else {
        bail!(
            "{}: no `{}` token",
            a.model.join("tokenizer.json").display(),
            SPECIALS[0]
        );
    };
    let (model, device) = models::load_decoder(&a.model, &a.run)?;
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
    let loss = match model {
        Decoder::Qwen3(m) => eval_loss(&*m, &batches, &device),
        Decoder::Hybrid(m) => eval_loss(&*m, &batches, &device),
    }?;
    let _ = std::fs::remove_dir_all(&dir);
    let tokens = batches.len() * a.batch * a.seq_len;
    println!(
        "{}",
        serde_json::json!({"task": "lm", "loss": loss, "perplexity": loss.exp(), "tokens": tokens})
    );
    Ok(())
}
