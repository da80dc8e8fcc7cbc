//! SFT batches: chat conversations rendered with the chat template, then packed into rows
//! (or padded one per row) with a loss weight per target token.
//!
//! Packing keeps whole conversations: a row takes conversations in order while they fit, each
//! with its own segment id (so attention stays inside it) and positions from 0. A
//! conversation longer than a row is truncated. Weights are 0 on prompt tokens, template glue
//! and padding; on trained tokens they are 1 (`per_token`: the loss is the mean over trained
//! tokens) or 1/(trained tokens in its conversation) (`per_sequence`: each conversation counts
//! the same, however long its answer).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatSource, ChatTemplate};
use crate::loader::{Batch, Cursor};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// One rendered conversation: token ids and, per token, whether the loss trains on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// Several conversations per row, isolated by segment masks.
    #[default]
    Pack,
    /// One conversation per row, right-padded.
    Pad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAveraging {
    #[default]
    PerToken,
    PerSequence,
}

/// Renders every conversation of `src` (SFT sets fit in memory once tokenized). Returns the
/// examples and how many malformed rows were skipped.
pub fn render_all(
    src: &ChatSource,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<(Vec<Example>, u64)> {
    let (convs, stats) = src.conversations_with_stats()?;
    let mut out = Vec::new();
    for c in convs {
        let (ids, mask) = template.render(tok, &c?)?;
        out.push(Example { ids, mask });
    }
    Ok((out, stats.skipped()))
}

pub struct SftLoader {
    examples: Vec<Example>,
    seq_len: usize,
    batch: usize,
    seed: u64,
    batching: Batching,
    averaging: LossAveraging,
    pad_id: u32,
    cursor: Cursor,
    order: Vec<usize>,
}

impl SftLoader {
    pub fn new(
        examples: Vec<Example>,
        seq_len: usize,
        batch: usize,
        seed: u64,
        batching: Batching,
        averaging: LossAveraging,
        pad_id: u32,
    ) -> Result<Self> {
        if examples.is_empty() {
            bail!("SFT data: no conversations");
        }
        if seq_len == 0 || batch == 0 {
            bail!("SFT data: seq_len and batch must be at least 1");
        }
        let mut l = Self {
            examples,
            seq_len,
            batch,
            seed,
            batching,
            averaging,
            pad_id,
            cursor: Cursor { epoch: 0, index: 0 },
            order: Vec::new(),
        };
        l.order = l.permutation(0);
        Ok(l)
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn set_cursor(&mut self, c: Cursor) -> Result<()> {
        if c.index as usize > self.examples.len() {
            bail!(
                "SFT cursor {} is past the {} conversations",
                c.index,
                self.examples.len()
            );
        }
        self.order = self.permutation(c.epoch);
        self.cursor = c;
        Ok(())
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        let mut rng = Rng::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5f7);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        order
    }

    /// The next conversation in this epoch's order (moving to the next epoch at the end).
    fn next_example(&mut self) -> &Example {
        if self.cursor.index as usize >= self.order.len() {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.order = self.permutation(self.cursor.epoch);
        }
        let e = &self.examples[self.order[self.cursor.index as usize]];
        self.cursor.index += 1;
        e
    }

    fn peek_len(&self) -> usize {
        let i = self.cursor.index as usize;
        if i < self.order.len() {
            self.examples[self.order[i]].ids.len()
        } else {
            // The next epoch starts with an unknown example: treat it as not fitting.
            usize::MAX
        }
    }

    /// The next `[batch, seq_len]` batch with segments, positions and loss weights.
    pub fn next_batch(&mut self) -> Batch {
        let (s, width) = (self.seq_len, self.seq_len + 1);
        let mut rows = Vec::with_capacity(self.batch);
        for _ in 0..self.batch {
            let mut row = Row::new(width, self.pad_id);
            loop {
                let e = self.next_example().clone();
                row.push(&e, self.averaging);
                let fits = row.len.saturating_add(self.peek_len()) <= width;
                if self.batching == Batching::Pad || !fits {
                    break;
                }
            }
            rows.push(row.into_batch(s));
        }
        Batch::concat(&rows)
    }
}

/// A row being filled: `seq_len + 1` tokens, so inputs and targets both have `seq_len`.
struct Row {
    ids: Vec<u32>,
    weight: Vec<f32>,
    segment: Vec<u32>,
    position: Vec<u32>,
    len: usize,
    segments: u32,
}

impl Row {
    fn new(width: usize, pad: u32) -> Self {
        Self {
            ids: vec![pad; width],
            weight: vec![0.0; width],
            segment: vec![u32::MAX; width],
            position: vec![0; width],
            len: 0,
            segments: 0,
        }
    }

    fn push(&mut self, e: &Example, averaging: LossAveraging) {
        let n = e.ids.len().min(self.ids.len() - self.len);
        let trained = e.mask[..n].iter().filter(|&&m| m == 1).count().max(1);
        let w = match averaging {
            LossAveraging::PerToken => 1.0,
            LossAveraging::PerSequence => 1.0 / trained as f32,
        };
        for i in 0..n {
            let at = self.len + i;
            self.ids[at] = e.ids[i];
            self.weight[at] = if e.mask[i] == 1 { w } else { 0.0 };
            self.segment[at] = self.segments;
            self.position[at] = i as u32;
        }
        self.len += n;
        self.segments += 1;
    }

    fn into_batch(self, s: usize) -> Batch {
        // Padding gets a segment of its own, so no real token attends to it.
        let pad_seg = self.segments;
        let segment: Vec<u32> = self.segment[..s]
            .iter()
            .map(|&g| if g == u32::MAX { pad_seg } else { g })
            .collect();
        // Target t is token t+1: it is trained when that token is, and is in the same
        // conversation as token t (the first token of the next one is never a target).
        let weights = (0..s)
            .map(|t| {
                if self.segment[t + 1] == self.segment[t] {
                    self.weight[t + 1]
                } else {
                    0.0
                }
            })
            .collect();
        Batch {
            batch: 1,
            seq_len: s,
            inputs: self.ids[..s].to_vec(),
            targets: self.ids[1..].to_vec(),
            positions: self.position[..s].to_vec(),
            segments: Some(segment),
            weights: Some(weights),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], mask: &[u8]) -> Example {
        Example {
            ids: ids.to_vec(),
            mask: mask.to_vec(),
        }
    }

    fn loader(batching: Batching, averaging: LossAveraging) -> SftLoader {
        let examples = vec![
            ex(&[10, 11, 12, 13], &[0, 0, 1, 1]),
            ex(&[20, 21, 22], &[0, 1, 1]),
            ex(&[30, 31, 32, 33, 34, 35], &[0, 0, 0, 1, 1, 1]),
        ];
        SftLoader::new(examples, 8, 1, 3, batching, averaging, 0).unwrap()
    }

    #[test]
    fn packed_rows_isolate_conversations_and_train_only_masked_targets() {
        let mut l = loader(Batching::Pack, LossAveraging::PerToken);
        for _ in 0..6 {
            let b = l.next_batch();
            let seg = b.segments.as_ref().unwrap();
            let w = b.weights.as_ref().unwrap();
            for t in 0..b.seq_len {
                // A target is trained only inside a conversation and only on a masked token.
                if w[t] > 0.0 {
                    assert_eq!(
                        b.targets[t] / 10,
                        b.inputs[t] / 10,
                        "target crosses a conversation: {b:?}"
                    );
                    // Trained targets are exactly the masked tokens: 12, 13, 21, 22, 33, 34, 35.
                    assert!(
                        [12, 13, 21, 22, 33, 34, 35].contains(&b.targets[t]),
                        "{b:?}"
                    );
                }
                // Positions restart with each conversation.
                if t > 0 && seg[t] != seg[t - 1] {
                    assert_eq!(b.positions[t], 0);
                }
            }
        }
    }

    #[test]
    fn every_trained_token_is_seen_once_per_epoch() {
        for batching in [Batching::Pack, Batching::Pad] {
            let mut l = loader(batching, LossAveraging::PerToken);
            let mut trained = Vec::new();
            loop {
                let b = l.next_batch();
                let w = b.weights.unwrap();
                trained.extend((0..b.seq_len).filter(|&t| w[t] > 0.0).map(|t| b.targets[t]));
                // A row never spans two epochs, so the epoch ends exactly here.
                if l.cursor().index as usize == l.len() {
                    break;
                }
            }
            assert_eq!(l.cursor().epoch, 0);
            trained.sort();
            assert_eq!(trained, [12, 13, 21, 22, 33, 34, 35], "{batching:?}");
        }
    }

    #[test]
    fn per_sequence_weights_sum_to_one_per_conversation() {
        let mut l = loader(Batching::Pad, LossAveraging::PerSequence);
        for _ in 0..3 {
            let b = l.next_batch();
            let total: f32 = b.weights.unwrap().iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{total}");
        }
    }

    #[test]
    fn a_saved_cursor_resumes_with_the_same_batches() {
        let mut a = loader(Batching::Pack, LossAveraging::PerToken);
        let reference: Vec<Batch> = (0..7).map(|_| a.next_batch()).collect();
        let mut b = loader(Batching::Pack, LossAveraging::PerToken);
        for r in &reference[..3] {
            assert_eq!(&b.next_batch(), r);
        }
        let mut c = loader(Batching::Pack, LossAveraging::PerToken);
        c.set_cursor(b.cursor()).unwrap();
        for r in &reference[3..] {
            assert_eq!(&c.next_batch(), r);
        }
    }
}
