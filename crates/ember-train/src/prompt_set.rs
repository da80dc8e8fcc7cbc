//! The prompts of the sampling stages (RLVR, OPD): read from `[[data.prompts]]` or a
//! generated task, encoded as the model is asked them, and drawn in a seeded order that a
//! checkpoint's cursor reproduces.

use anyhow::{anyhow, bail, Result};
use ember_data::loader::Cursor;
use ember_data::prompts::PromptRow;
use ember_data::rng::mix64;
use ember_data::tasks::{self, Split};
use ember_data::Tokenizer;

use crate::evaluate::Prompter;
use crate::pretrain::resolve_tokenizer;
use crate::recipe::PromptFormat;
use crate::stages::{Setup, StageModel, StageRun};

/// A sampling stage reads prompts, not documents or conversations.
pub fn check_prompt_data(s: &StageRun) -> Result<()> {
    let (data, kind) = (&s.stage.data, s.stage.kind.name());
    if !data.sources.is_empty() || !data.datasets.is_empty() || !data.chat.is_empty() {
        bail!(
            "{} [data]: a {kind} stage reads [[data.prompts]] or [data.generated], not `sources`, `datasets` or `chat`",
            s.path.display()
        );
    }
    if data.bpe_vocab_size.is_some() {
        bail!(
            "{} [data]: `bpe_vocab_size` is for pretraining; a {kind} stage uses the checkpoint's tokenizer or `tokenizer`",
            s.path.display()
        );
    }
    Ok(())
}

/// The stage's tokenizer (checked against the model) and its prompts as the model is asked
/// them, prompts longer than `seq_len` left out.
pub fn stage_prompts<M: StageModel>(
    s: &StageRun,
    setup: &mut Setup<M>,
    format: PromptFormat,
) -> Result<(Tokenizer, Encoded)> {
    let (data, path) = (&s.stage.data, s.path);
    let rows = prompt_rows(s)?;
    let (tok, eos) = resolve_tokenizer(data, &[], path, setup.tokenizer_from.as_deref(), &[])?;
    setup.adopt_tokenizer(&tok, eos, path)?;
    let encoded = encode_prompts(rows, &tok, format, data.seq_len)?;
    if encoded.too_long > 0 {
        eprintln!(
            "note: {} prompts are longer than seq_len {} tokens and are left out",
            encoded.too_long, data.seq_len
        );
    }
    if encoded.prompts.is_empty() {
        bail!(
            "{} [data]: every prompt is longer than seq_len {}",
            path.display(),
            data.seq_len
        );
    }
    Ok((tok, encoded))
}

/// The stage's prompts: `[[data.prompts]]` rows, then `[data.generated]` problems (from the
/// training side of the task's split, a stream apart from SFT's).
fn prompt_rows(s: &StageRun) -> Result<Vec<PromptRow>> {
    let data = &s.stage.data;
    let mut rows = Vec::new();
    for src in &data.prompts {
        let (r, skipped) = src
            .read_all()
            .map_err(|e| anyhow!("{} [[data.prompts]]: {e:#}", s.path.display()))?;
        if skipped > 0 {
            eprintln!(
                "{}: skipped {skipped} malformed rows (on_error = \"skip\")",
                src.path.display()
            );
        }
        rows.extend(r);
    }
    if let Some(g) = &data.generated {
        let task = tasks::task(&g.task)
            .map_err(|e| anyhow!("{} [data.generated]: {e:#}", s.path.display()))?;
        let seed = s.recipe.run.seed ^ 0x524C_5652;
        rows.extend(
            tasks::problems(task.as_ref(), seed, g.count, &g.levels, Split::Train)
                .map(|p| PromptRow::from_problem(&p)),
        );
    }
    if rows.is_empty() {
        bail!(
            "{} [data]: a {} stage needs [[data.prompts]] rows or [data.generated]",
            s.path.display(),
            s.stage.kind.name()
        );
    }
    Ok(rows)
}

/// The prompts as the model is asked them.
pub struct Encoded {
    /// Each kept row with its token ids.
    pub prompts: Vec<(PromptRow, Vec<u32>)>,
    /// The ids that end a completion.
    pub eos: Vec<u32>,
    /// Rows left out for being longer than `seq_len`.
    pub too_long: usize,
}

/// Token ids of each prompt as the model is asked it; prompts longer than `max_len` are
/// left out.
fn encode_prompts(
    rows: Vec<PromptRow>,
    tok: &Tokenizer,
    format: PromptFormat,
    max_len: usize,
) -> Result<Encoded> {
    let prompter = Prompter::new(tok, format)?;
    let mut kept = Vec::with_capacity(rows.len());
    let mut long = 0;
    for row in rows {
        let ids = prompter.encode(tok, &row.conversation)?;
        if ids.len() > max_len {
            long += 1;
        } else {
            kept.push((row, ids));
        }
    }
    Ok(Encoded {
        prompts: kept,
        eos: prompter.eos().to_vec(),
        too_long: long,
    })
}

/// The order prompts are drawn in: a seeded shuffle per epoch.
pub struct PromptOrder {
    n: usize,
    seed: u64,
    pub cursor: Cursor,
    perm: Vec<usize>,
}

impl PromptOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut o = Self {
            n,
            seed,
            cursor: Cursor { epoch: 0, index: 0 },
            perm: Vec::new(),
        };
        o.perm = o.permutation(0);
        o
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n).collect();
        let mut state = mix64(self.seed ^ mix64(epoch ^ 0x5250_524D));
        for i in (1..order.len()).rev() {
            state = mix64(state);
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        order
    }

    pub fn draw(&mut self) -> usize {
        if self.cursor.index as usize >= self.n {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.perm = self.permutation(self.cursor.epoch);
        }
        let i = self.perm[self.cursor.index as usize];
        self.cursor.index += 1;
        i
    }

    /// The position to save in a checkpoint.
    pub fn state(&self) -> serde_json::Value {
        serde_json::json!(self.cursor)
    }

    /// Continues from a saved [`PromptOrder::state`].
    pub fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        let c: Cursor = serde_json::from_value(state.clone())
            .map_err(|e| anyhow!("cursor: {e} (a checkpoint of another stage kind?)"))?;
        self.set(c)
    }

    pub fn set(&mut self, c: Cursor) -> Result<()> {
        if c.index as usize > self.n {
            bail!("prompt cursor {} is past the {} prompts", c.index, self.n);
        }
        self.perm = self.permutation(c.epoch);
        self.cursor = c;
        Ok(())
    }
}
