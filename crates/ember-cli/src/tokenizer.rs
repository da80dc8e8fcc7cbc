//! `ember tokenizer train`: a byte-level BPE trained on text, JSONL or Parquet.

use std::path::PathBuf;

use anyhow::{bail, Result};
use ember_data::{train_bpe, Source};
use ember_train::pretrain::SPECIALS;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train a byte-level BPE tokenizer (GPT-2/Qwen style) and write tokenizer.json.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Input files or directories (repeatable). The format comes from the extension:
    /// .jsonl, .parquet, anything else is plain text (one document per file).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    #[arg(long)]
    vocab_size: usize,
    /// The JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    field: String,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    min_frequency: u64,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(c: Command) -> Result<()> {
    let Command::Train(a) = c;
    let sources: Vec<Source> = a
        .input
        .iter()
        .map(|p| Source::from_path(p, &a.field))
        .collect();
    for s in &sources {
        s.check()?;
    }
    if a.out.is_dir() {
        bail!(
            "--out {}: is a directory; give the tokenizer.json path",
            a.out.display()
        );
    }
    let tok = train_bpe(&sources, a.vocab_size, &SPECIALS, a.min_frequency)?;
    tok.save(&a.out)?;
    eprintln!("wrote {} ({} tokens)", a.out.display(), tok.vocab_size());
    Ok(())
}
