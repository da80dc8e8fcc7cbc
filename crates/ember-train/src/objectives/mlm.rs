//! Masked language modelling: which tokens to predict and what the encoder sees there, and
//! the loss computed only at those positions (the sparse head: the MLM head and the
//! vocabulary projection never run on the unmasked majority).

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_data::loader::Batch;
use ember_models::modernbert::ModernBert;
use ember_models::rng::Rng;

use crate::objectives::lm::cross_entropy;

/// How tokens are chosen and corrupted.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    /// The chance that a non-special token is predicted.
    pub prob: f64,
    pub mask_id: u32,
    /// Of the chosen tokens, the fraction replaced by a random non-special token, and the
    /// fraction left as they are; the rest become `mask_id`.
    pub random_fraction: f64,
    pub keep_fraction: f64,
    /// Random replacements are drawn from `0..vocab` minus `specials`.
    pub vocab: usize,
    /// Never chosen, never drawn (sorted).
    pub specials: Vec<u32>,
}

/// A batch's encoder inputs after masking, and what the loss predicts.
#[derive(Debug, Clone, Default)]
pub struct Masked {
    pub inputs: Vec<u32>,
    /// Flat indices (row-major over `[batch, seq]`) of the predicted tokens.
    pub positions: Vec<u32>,
    /// The original tokens there.
    pub labels: Vec<u32>,
    /// How many chosen tokens became the mask token, a random token, or stayed.
    pub masked: usize,
    pub randomised: usize,
    pub kept: usize,
}

impl MaskSpec {
    fn special(&self, t: u32) -> bool {
        self.specials.binary_search(&t).is_ok()
    }

    /// Masks `tokens`: each non-special token is chosen with probability `prob` (at least
    /// one is, so the loss is defined), then corrupted 80/10/10 (by default).
    pub fn apply(&self, tokens: &[u32], rng: &mut Rng) -> Masked {
        let mut out = Masked {
            inputs: tokens.to_vec(),
            ..Default::default()
        };
        for (i, &t) in tokens.iter().enumerate() {
            if !self.special(t) && rng.uniform() < self.prob {
                out.positions.push(i as u32);
            }
        }
        if out.positions.is_empty() {
            if let Some(i) = tokens.iter().position(|&t| !self.special(t)) {
                out.positions.push(i as u32);
            }
        }
        for &p in &out.positions {
            let t = tokens[p as usize];
            out.labels.push(t);
            let u = rng.uniform();
            if u < self.keep_fraction {
                out.kept += 1;
            } else if u < self.keep_fraction + self.random_fraction {
                out.inputs[p as usize] = self.random_token(rng);
                out.randomised += 1;
            } else {
                out.inputs[p as usize] = self.mask_id;
                out.masked += 1;
            }
        }
        out
    }

    fn random_token(&self, rng: &mut Rng) -> u32 {
        loop {
            let t = (rng.next_u64() % self.vocab as u64) as u32;
            if !self.special(t) {
                return t;
            }
        }
    }
}

/// The rng of micro-batch `micro` of step `step`: masking depends only on the seed and the
/// position in the run, so a resumed run masks exactly as the uninterrupted one.
pub fn step_rng(seed: u64, step: u64, micro: usize) -> Rng {
    Rng::new(seed ^ 0x6d6c_6d00 ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (micro as u64) << 48)
}

/// The encoder's hidden states at the masked positions only, `[n, hidden]`.
pub fn masked_hidden(model: &ModernBert, batch: &Batch, m: &Masked, device: &Device) -> Tensor<2> {
    let (b, s) = (batch.batch, batch.seq_len);
    let int = |v: &[u32], shape: Vec<usize>| {
        let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, shape), device)
    };
    let h = model.encode_packed(
        int(&m.inputs, vec![b, s]),
        int(&batch.positions, vec![b, s]),
        batch.segments.as_ref().map(|g| int(g, vec![b, s])),
    );
    let n = m.positions.len();
    let at: Vec<i32> = m.positions.iter().map(|&p| p as i32).collect();
    h.reshape([b * s, model.config.hidden_size]).select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(at, [n]), device),
    )
}

/// Mean cross-entropy of the masked tokens, and the `[n]` predicted ids (argmax), computed
/// with the head on the masked positions only.
pub fn mlm_loss(
    model: &ModernBert,
    batch: &Batch,
    m: &Masked,
    device: &Device,
) -> (Tensor<1>, Tensor<1, Int>) {
    let h = masked_hidden(model, batch, m, device);
    let n = m.labels.len();
    let logits = model.mlm_logits(h.unsqueeze::<3>());
    let predicted = logits.clone().argmax(2).reshape([n]);
    let labels: Vec<i32> = m.labels.iter().map(|&x| x as i32).collect();
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [1, n]), device);
    (cross_entropy(logits, labels, None), predicted)
}
