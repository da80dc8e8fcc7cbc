//! Supervised fine-tuning (`kind = "sft"`): chat data rendered with the Qwen3 chat template
//! (from the tokenizer's special tokens), loss on assistant tokens only, conversations
//! packed with per-conversation attention or padded one per row, the loss averaged per token
//! or per conversation. A seeded share of conversations is held out for validation loss, and
//! an `[eval]` section adds generation-based accuracy on a verifiable task.

use anyhow::{anyhow, bail, Result};
use ember_data::chat::{ChatSource, ChatTemplate};
use ember_data::rng::mix64;
use ember_data::sft::{render_all, Batching, Example, SftLoader};
use ember_data::tasks::{self, Split};
use ember_data::Tokenizer;
use serde_json::json;

use crate::pretrain::{resolve_tokenizer, write_if_changed};
use crate::recipe::{DataSection, PromptFormat};
use crate::stages::{
    check_common, evaluators, run_loop, CursorFeed, LoopSpec, Setup, StageModel, StageRun, Summary,
    Supervised,
};

/// The stage's chat sources: `[[data.chat]]` plus, with `[data.generated]`, the task's
/// training problems as prompt/response pairs written to `data/generated-chat-<task>.jsonl`.
pub fn chat_sources(s: &StageRun) -> Result<Vec<ChatSource>> {
    let data = &s.stage.data;
    let mut out = data.chat.clone();
    if let Some(g) = &data.generated {
        let task = tasks::task(&g.task)
            .map_err(|e| anyhow!("{} [data.generated]: {e:#}", s.path.display()))?;
        let file = s
            .run_dir
            .join("data")
            .join(format!("generated-chat-{}.jsonl", g.task));
        let body: String = tasks::problems(
            task.as_ref(),
            s.recipe.run.seed,
            g.count,
            &g.levels,
            Split::Train,
        )
        .map(|p| {
            let (prompt, response) = p.chat();
            json!({ "prompt": prompt, "response": response }).to_string() + "\n"
        })
        .collect();
        write_if_changed(&file, body.as_bytes())?;
        let mut src = ChatSource::new(file);
        src.prompt_field = Some("prompt".into());
        src.response_field = Some("response".into());
        out.push(src);
    }
    if out.is_empty() {
        bail!(
            "{} [data]: an sft stage needs [[data.chat]] sources or [data.generated]",
            s.path.display()
        );
    }
    Ok(out)
}

/// Every conversation rendered, split into training and held-out examples by a seeded hash
/// of its position.
fn examples(
    s: &StageRun,
    tok: &Tokenizer,
    sources: &[ChatSource],
) -> Result<(Vec<Example>, Vec<Example>)> {
    let template = ChatTemplate::new(tok)?;
    let data = &s.stage.data;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    let mut index = 0u64;
    for src in sources {
        let (ex, skipped) = render_all(src, tok, &template)?;
        if skipped > 0 {
            eprintln!(
                "{}: skipped {skipped} malformed rows (on_error = \"skip\")",
                src.path.display()
            );
        }
        for e in ex {
            let u = (mix64(s.recipe.run.seed ^ mix64(index)) >> 11) as f64 / (1u64 << 53) as f64;
            index += 1;
            if u < data.val_fraction {
                val.push(e);
            } else {
                train.push(e);
            }
        }
    }
    if train.is_empty() {
        bail!(
            "{} [data]: no training conversations (all {index} held out or none read)",
            s.path.display()
        );
    }
    let long = train
        .iter()
        .filter(|e| e.ids.len() > data.seq_len + 1)
        .count();
    if long > 0 {
        eprintln!(
            "note: {long} of {} conversations are longer than seq_len {} + 1 and are truncated",
            train.len(),
            data.seq_len
        );
    }
    Ok((train, val))
}

fn loader(
    ex: Vec<Example>,
    data: &DataSection,
    batch: usize,
    seed: u64,
    pad: u32,
) -> Result<SftLoader> {
    SftLoader::new(
        ex,
        data.seq_len,
        batch,
        seed,
        data.batching,
        data.loss_averaging,
        pad,
    )
}

/// An SFT stage, on a model of family `M` (Qwen3 or a hybrid).
pub fn run<M: StageModel>(s: &StageRun) -> Result<Summary> {
    let path = s.path;
    check_common(&s.stage, path)?;
    let (data, tcfg) = (&s.stage.data, &s.stage.train);
    if !data.sources.is_empty() || !data.datasets.is_empty() {
        bail!(
            "{} [data]: an sft stage reads [[data.chat]] or [data.generated], not `sources` or `datasets`",
            path.display()
        );
    }
    if data.bpe_vocab_size.is_some() {
        bail!(
            "{} [data]: `bpe_vocab_size` is for pretraining; an sft stage uses the checkpoint's tokenizer or `tokenizer`",
            path.display()
        );
    }
    let mut setup = Setup::<M>::new(s)?;
    let sources = chat_sources(s)?;
    let (tok, eos) = resolve_tokenizer(data, &[], path, setup.tokenizer_from.as_deref(), &[])?;
    setup.adopt_tokenizer(&tok, eos, path)?;
    let (train, val) = examples(s, &tok, &sources)?;
    let seed = s.recipe.run.seed;
    let data_line = format!(
        "{} conversations ({} held out), {}",
        train.len(),
        val.len(),
        match data.batching {
            Batching::Pack => "packed",
            Batching::Pad => "padded",
        }
    );
    let feed_loader = loader(train, data, tcfg.batch_size, seed, eos)?;
    let mut sets = Vec::new();
    if !val.is_empty() {
        let mut v = loader(val, data, tcfg.batch_size, seed, eos)?;
        let mut batches = Vec::new();
        // One pass over the held-out conversations at most, always the same batches.
        while batches.len() < tcfg.eval_batches.max(1)
            && v.cursor().epoch == 0
            && (v.cursor().index as usize) < v.len()
        {
            batches.push(v.next_batch());
        }
        sets.push((String::new(), batches));
    }
    let mut evaluators = evaluators(s, &setup, sets, &tok, PromptFormat::Chat)?;
    let mut feed = CursorFeed(feed_loader);
    let mut objective = Supervised::new(&mut feed, s, &setup.train_dev);
    run_loop(
        setup,
        LoopSpec::single(s, &tok, data_line),
        &mut objective,
        &mut evaluators,
    )
}
