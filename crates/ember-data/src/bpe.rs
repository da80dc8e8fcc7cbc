//! Training a byte-level BPE tokenizer (as GPT-2's and Qwen's) on documents streamed from
//! data sources.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::sources::Source;
use crate::tokenizer::Tokenizer;

/// Trains a byte-level BPE with `vocab_size` entries in all: `specials` first (ids
/// `0..specials.len()`), then the 256 byte tokens, then merges learned from the documents
/// of `inputs` (pairs seen fewer than `min_frequency` times are not merged).
pub fn train_bpe(
    inputs: &[Source],
    vocab_size: usize,
    specials: &[&str],
    min_frequency: u64,
) -> Result<Tokenizer> {
    let floor = 256 + specials.len();
    if vocab_size <= floor {
        bail!(
            "BPE vocab_size {vocab_size} must exceed 256 byte tokens + {} special tokens = {floor}",
            specials.len()
        );
    }
    if inputs.is_empty() {
        bail!("BPE training needs at least one data source");
    }
    let mut seen = HashSet::new();
    for s in specials {
        if s.is_empty() || !seen.insert(*s) {
            bail!("BPE special tokens must be non-empty and distinct (got {s:?} twice or empty)");
        }
    }
    for s in inputs {
        s.check()?;
    }

    let byte_level = ByteLevel::new(false, true, true);
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(byte_level));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);

    // Streams the documents; the first error stops the stream and is reported after.
    let error: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let mut sources = inputs.iter();
    let mut current: Option<crate::sources::Documents> = None;
    let err = error.clone();
    let docs = std::iter::from_fn(move || loop {
        if let Some(it) = &mut current {
            match it.next() {
                Some(Ok(d)) => return Some(d),
                Some(Err(e)) => {
                    *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    return None;
                }
                None => current = None,
            }
        }
        let s = sources.next()?;
        match s.documents() {
            Ok(it) => current = Some(it),
            Err(e) => {
                *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return None;
            }
        }
    });
    let trained = tok.train(&mut trainer, docs).map(|_| ());
    if let Some(e) = error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    trained.map_err(|e| anyhow!("BPE training failed ({e})"))?;
    Ok(Tokenizer::from_inner(tok, "<trained byte-level BPE>"))
}
