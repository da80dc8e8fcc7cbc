//! RLP as a pretraining objective (`objective = "rlp"`): on each batch of ordinary text,
//! at `positions_per_row` positions t of every row the model samples G thoughts
//! `<think>c</think>` after x_<t; each thought is rewarded by its information gain on the
//! next tokens over an EMA baseline that does not think ([`crate::objectives::rlp`]), and the
//! thought tokens alone are trained with the clipped surrogate, averaged within each
//! thought and then over thoughts. The EMA is saved in every checkpoint, so a resumed run
//! continues exactly.
//!
//! A position's context is its row up to t, or with `doc_masks = true` its document up to t
//! (the EMA then reads each document alone too): the thought and both scorers see the same
//! prefix.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Device, Tensor};
use ember_data::loader::Batch;
use ember_data::rng::mix64;
use ember_data::Tokenizer;
use ember_models::decode_graph::generate_auto;
use ember_models::generate::{GenerateOptions, Hooks, Sampling};
use ember_models::layers::to_dtype;
use serde_json::{json, Map, Value};

use crate::objectives::grpo::{
    completion_logprobs, policy_loss, LossSums, PolicyRow, SurrogateConfig,
};
use crate::objectives::rlp::{ema_update, information_gain, rlp_advantages};
use crate::pretrain::{batch_loss, DeviceBatch};
use crate::recipe::{PositionChoice, RlpSection};
use crate::stages::{Feed, Objective, Setup, StageModel, StageRun};
use crate::trainer::NextTokenModel;

const EMA_DIR: &str = "ema";

/// Checks `[rlp]`; returns it with ε_high resolved.
pub fn checked_section(s: &StageRun) -> Result<(RlpSection, f64)> {
    let origin = format!("{} [rlp]", s.path.display());
    let c = s
        .stage
        .rlp
        .clone()
        .ok_or_else(|| anyhow!("{origin}: objective = \"rlp\" needs an [rlp] section"))?;
    let bad = |key: &str, want: &str| anyhow!("{origin}: `{key}` must be {want}");
    if c.group_size < 2 {
        return Err(bad(
            "group_size",
            "at least 2 (advantages compare a position's thoughts)",
        ));
    }
    if c.positions_per_row == 0 || c.thought_tokens == 0 || c.next_tokens == 0 {
        return Err(bad(
            "positions_per_row`, `thought_tokens` and `next_tokens",
            "at least 1",
        ));
    }
    if c.next_tokens >= s.stage.data.seq_len {
        return Err(bad("next_tokens", "smaller than data.seq_len"));
    }
    if !(c.temperature > 0.0 && c.temperature.is_finite()) {
        return Err(bad("temperature", "positive"));
    }
    if !(0.0..1.0).contains(&c.ema_decay) {
        return Err(bad("ema_decay", "in [0, 1)"));
    }
    let eps_high = c.epsilon_high.unwrap_or(c.epsilon_low);
    if !((0.0..1.0).contains(&c.epsilon_low) && eps_high >= 0.0 && eps_high.is_finite()) {
        return Err(bad("epsilon_low` / `epsilon_high", "in [0, 1) and >= 0"));
    }
    if !(c.ntp_weight >= 0.0 && c.ntp_weight.is_finite()) {
        return Err(bad("ntp_weight", ">= 0"));
    }
    Ok((c, eps_high))
}

/// One sampled position of a micro-batch: the row's tokens up to t, the next tokens, and the
/// EMA's log-prob of them.
struct Position {
    context: Vec<u32>,
    next: Vec<u32>,
    baseline: f64,
}

pub struct Rlp<'f, M> {
    feed: &'f mut dyn Feed,
    cfg: RlpSection,
    surrogate: SurrogateConfig,
    accum: usize,
    rows_per_step: usize,
    device: Device,
    base: Device,
    dtype: DType,
    /// The no-thought baseline φ, and how many optimizer steps it has folded in.
    ema: Option<M>,
    ema_steps: u64,
    seed: u64,
    open: Vec<u32>,
    close: Vec<u32>,
    pad: u32,
    /// Tokens after which a new line starts (`line_start` positions): those whose text ends
    /// with a newline.
    line_ends: std::collections::HashSet<u32>,
    batches: Vec<Batch>,
    rows: Vec<Vec<PolicyRow>>,
    pending: Map<String, Value>,
    shown: String,
    sums: LossSums,
}

impl<'f, M: StageModel> Rlp<'f, M> {
    pub fn new(
        feed: &'f mut dyn Feed,
        s: &StageRun,
        setup: &Setup<M>,
        tok: &Tokenizer,
        eos: u32,
    ) -> Result<Self> {
        let (cfg, eps_high) = checked_section(s)?;
        let open = tok.encode("<think>")?;
        let close = tok.encode("</think>")?;
        if open.is_empty() || close.is_empty() {
            bail!(
                "{} [rlp]: the tokenizer cannot write <think> and </think>",
                s.path.display()
            );
        }
        let mut line_ends = std::collections::HashSet::new();
        if cfg.positions == PositionChoice::LineStart {
            for id in 0..tok.vocab_size() as u32 {
                if tok.decode(&[id], false)?.ends_with('\n') {
                    line_ends.insert(id);
                }
            }
        }
        Ok(Self {
            feed,
            line_ends,
            surrogate: SurrogateConfig {
                temperature: cfg.temperature as f64,
                eps_low: cfg.epsilon_low,
                eps_high,
                beta: 0.0,
            },
            cfg,
            accum: s.stage.train.grad_accum,
            rows_per_step: s.stage.train.grad_accum * s.stage.train.batch_size,
            device: setup.train_dev.clone(),
            base: setup.base.clone(),
            dtype: setup.dtype,
            ema: Some(setup.model.valid()),
            ema_steps: 0,
            seed: s.recipe.run.seed,
            open,
            close,
            pad: eos,
            batches: Vec::new(),
            rows: Vec::new(),
            pending: Map::new(),
            shown: String::new(),
            sums: LossSums::default(),
        })
    }

    fn ema(&self) -> &M {
        self.ema.as_ref().expect("the EMA is present between steps")
    }

    /// The positions t of `row` (1 ≤ t ≤ seq_len − k + 1) to think before.
    fn choose(
        &self,
        row: &[u32],
        entropy: &[f32],
        step: u64,
        micro: usize,
        r: usize,
    ) -> Vec<usize> {
        let k = self.cfg.next_tokens;
        let last = entropy.len() + 1 - k;
        // A thought before a document separator, or before a new document, has nothing to
        // explain.
        let mut candidates: Vec<usize> = (1..=last)
            .filter(|&t| row[t] != self.pad && row[t - 1] != self.pad)
            .collect();
        if self.cfg.positions == PositionChoice::LineStart {
            candidates.retain(|&t| self.line_ends.contains(&row[t - 1]));
        }
        let p = self.cfg.positions_per_row.min(candidates.len());
        match self.cfg.positions {
            PositionChoice::Entropy => {
                // t is predicted at index t − 1; highest entropy first, earliest on ties.
                candidates.sort_by(|a, b| entropy[b - 1].total_cmp(&entropy[a - 1]).then(a.cmp(b)));
            }
            PositionChoice::Random | PositionChoice::LineStart => {
                let mut state =
                    mix64(self.seed ^ mix64(step ^ ((micro as u64) << 40) ^ ((r as u64) << 20)));
                for i in 0..p {
                    state = mix64(state);
                    let j = i + (state % (candidates.len() - i) as u64) as usize;
                    candidates.swap(i, j);
                }
            }
        }
        candidates.truncate(p);
        candidates
    }

    /// Samples and scores the thoughts of micro-batch `b`; returns its training rows and
    /// what it measured.
    fn thoughts(
        &self,
        model: &M,
        b: &Batch,
        step: u64,
        micro: usize,
        m: &mut Measured,
    ) -> Result<Vec<PolicyRow>> {
        let Baseline {
            logp: lp,
            entropy,
            ce,
        } = baseline(self.ema(), b, &self.base);
        m.forward_tokens += b.batch * b.seq_len;
        if self.cfg.ntp_weight > 0.0 {
            m.train_tokens += b.batch * b.seq_len;
        }
        m.ema_ce += ce;
        m.batches += 1;
        let k = self.cfg.next_tokens;
        let mut positions = Vec::new();
        for r in 0..b.batch {
            let row: Vec<u32> = b.inputs[r * b.seq_len..(r + 1) * b.seq_len]
                .iter()
                .copied()
                .chain(std::iter::once(b.targets[(r + 1) * b.seq_len - 1]))
                .collect();
            for t in self.choose(&row, &entropy[r], step, micro, r) {
                m.entropy += entropy[r][t - 1] as f64;
                // The scored tokens stop at the end of the document.
                let n = row[t..t + k].iter().take_while(|&&x| x != self.pad).count();
                positions.push(Position {
                    context: row[context_start(b, r, t)..t].to_vec(),
                    next: row[t..t + n].to_vec(),
                    baseline: lp[r][t - 1..t - 1 + n].iter().map(|&x| x as f64).sum(),
                });
            }
        }
        let g = self.cfg.group_size;
        let prompts: Vec<Vec<u32>> = positions
            .iter()
            .flat_map(|p| std::iter::repeat_n([&p.context[..], &self.open[..]].concat(), g))
            .collect();
        let single_close = (self.close.len() == 1).then(|| self.close[0]);
        let opts = GenerateOptions {
            max_new_tokens: vec![self.cfg.thought_tokens],
            eos_ids: single_close.into_iter().collect(),
            pad_id: self.pad,
            sampling: Sampling {
                temperature: self.cfg.temperature,
                top_k: 0,
                top_p: 1.0,
                seed: mix64(
                    self.seed ^ mix64(step.wrapping_mul(0x1_0000) + micro as u64) ^ 0x524C_5000,
                ),
            },
        };
        let close = self.close.clone();
        let mut stop = move |_row: usize, so_far: &[u32]| so_far.ends_with(&close);
        let mut hooks = Hooks {
            on_token: None,
            stop: (single_close.is_none()).then_some(&mut stop as &mut _),
        };
        let t0 = std::time::Instant::now();
        let theta = model.valid();
        let seqs = generate_auto(&theta, &prompts, &opts, &mut hooks)?;
        m.rollout_s += t0.elapsed().as_secs_f64();
        // Score each thought: log p_θ(next | context, <think>c</think>).
        let mut scoring = Vec::with_capacity(seqs.len());
        for (i, seq) in seqs.iter().enumerate() {
            let p = &positions[i / g];
            let thought = seq
                .tokens
                .strip_suffix(&self.close[..])
                .unwrap_or(&seq.tokens);
            let ids: Vec<u32> =
                [&p.context[..], &self.open, thought, &self.close, &p.next].concat();
            let n = p.next.len();
            scoring.push(PolicyRow {
                prompt_len: ids.len() - n,
                ids,
                rollout_logp: vec![0.0; n],
                ref_logp: None,
                adv: vec![0.0; n],
                weight: 0.0,
            });
        }
        let scored = completion_logprobs(&theta, &scoring, 1.0);
        m.forward_tokens += prompts.iter().map(Vec::len).sum::<usize>()
            + seqs.iter().map(|s| s.tokens.len()).sum::<usize>()
            + scoring.iter().map(|r| r.ids.len()).sum::<usize>();
        let mut rows = Vec::new();
        for (pi, p) in positions.iter().enumerate() {
            let with: Vec<f64> = scored[pi * g..(pi + 1) * g]
                .iter()
                .map(|v| v.iter().map(|&x| x as f64).sum())
                .collect();
            let gain = information_gain(&with, p.baseline);
            let adv = rlp_advantages(&gain);
            m.gains.extend(&gain);
            for (j, a) in adv.into_iter().enumerate() {
                let seq = &seqs[pi * g + j];
                m.lengths.push(seq.tokens.len());
                if seq.tokens.is_empty() {
                    continue;
                }
                let prompt = [&p.context[..], &self.open[..]].concat();
                rows.push(PolicyRow {
                    prompt_len: prompt.len(),
                    ids: [prompt, seq.tokens.clone()].concat(),
                    rollout_logp: seq.logprobs.clone(),
                    ref_logp: None,
                    adv: vec![a as f32; seq.tokens.len()],
                    weight: 0.0,
                });
            }
        }
        m.train_tokens += rows.iter().map(|r| r.ids.len()).sum::<usize>();
        // Mean over each thought's tokens, then over the micro-batch's thoughts.
        let n = rows.len().max(1) as f32;
        for r in &mut rows {
            r.weight = 1.0 / (r.completion_len() as f32 * n);
        }
        Ok(rows)
    }
}

/// The EMA's log-prob of every target of a batch and its predictive entropy there, both
/// `[rows][seq_len]`, and its mean next-token loss.
pub struct Baseline {
    pub logp: Vec<Vec<f32>>,
    pub entropy: Vec<Vec<f32>>,
    pub ce: f64,
}

/// The no-thought model `ema`'s view of batch `b` on `device`: each document alone when the
/// batch has segments (`doc_masks`), as next-token training reads it.
pub fn baseline<M: NextTokenModel>(ema: &M, b: &Batch, device: &Device) -> Baseline {
    let (n, s) = (b.batch, b.seq_len);
    let d = DeviceBatch::new(b, device);
    let logits = to_dtype(
        ema.packed_logits(d.inputs, d.positions, d.segments),
        DType::F32,
    );
    let v = logits.dims()[2];
    let lp = log_softmax(logits.reshape([n * s, v]), 1);
    let picked = lp.clone().gather(1, d.targets.reshape([n * s, 1]));
    let entropy = (lp.clone().exp() * lp).sum_dim(1).neg();
    let rows = |t: Tensor<2>| -> Vec<Vec<f32>> {
        let v: Vec<f32> = t.into_data().iter::<f32>().collect();
        v.chunks(s).map(<[f32]>::to_vec).collect()
    };
    let picked = rows(picked);
    let ce = -picked.iter().flatten().map(|&x| x as f64).sum::<f64>() / (n * s) as f64;
    Baseline {
        logp: picked,
        entropy: rows(entropy),
        ce,
    }
}

/// Where the context of a thought before token `t` (1-based: after inputs `..t`) of row `r`
/// starts: at the row's start, or with segments at the start of the document that token
/// `t - 1` belongs to (positions restart there).
pub fn context_start(b: &Batch, r: usize, t: usize) -> usize {
    match b.segments {
        Some(_) => t - 1 - b.positions[r * b.seq_len + t - 1] as usize,
        None => 0,
    }
}

/// What a step's thoughts measured.
#[derive(Default)]
struct Measured {
    /// Tokens run forward without a graph (EMA, rollouts, scoring) and with one (training).
    forward_tokens: usize,
    train_tokens: usize,
    gains: Vec<f64>,
    lengths: Vec<usize>,
    ema_ce: f64,
    entropy: f64,
    batches: usize,
    rollout_s: f64,
}

impl<M: StageModel> Objective<M> for Rlp<'_, M> {
    fn prepare(&mut self, model: &M, step: u64) -> Result<(usize, u64)> {
        if self.ema_steps + 1 == step {
            let ema = self.ema.take().expect("the EMA is present between steps");
            self.ema = Some(ema_update(ema, model, self.cfg.ema_decay));
            self.ema_steps = step;
        } else if self.ema_steps != step {
            bail!(
                "the EMA has folded in {} steps, but this is step {step}",
                self.ema_steps
            );
        }
        self.batches = (0..self.accum)
            .map(|_| self.feed.next_batch(step))
            .collect::<Result<Vec<_>>>()?;
        let mut m = Measured::default();
        let mut rows = Vec::with_capacity(self.accum);
        for (i, b) in self.batches.iter().enumerate() {
            rows.push(self.thoughts(model, b, step, i, &mut m)?);
        }
        self.rows = rows;
        let n = m.gains.len().max(1) as f64;
        let gain = m.gains.iter().sum::<f64>() / n;
        let std = (m.gains.iter().map(|x| (x - gain).powi(2)).sum::<f64>() / n).sqrt();
        let len = m.lengths.iter().sum::<usize>() as f64 / m.lengths.len().max(1) as f64;
        let ema_ce = m.ema_ce / m.batches.max(1) as f64;
        let mut rec = Map::new();
        rec.insert("info_gain".into(), json!(gain));
        rec.insert("info_gain_std".into(), json!(std));
        rec.insert("thought/mean_length".into(), json!(len));
        rec.insert("ema_ce".into(), json!(ema_ce));
        rec.insert(
            "rlp/position_entropy".into(),
            json!(m.entropy / (m.gains.len() / self.cfg.group_size).max(1) as f64),
        );
        rec.insert("time/rollout_s".into(), json!(m.rollout_s));
        // 2N per token run forward, 6N per token trained (attention not counted): what the
        // same compute buys in next-token training.
        let n = model.param_count() as f64;
        rec.insert(
            "rlp/flops".into(),
            json!(2.0 * n * m.forward_tokens as f64 + 6.0 * n * m.train_tokens as f64),
        );
        self.pending = rec;
        self.shown = format!("gain {gain:+.4} think {len:.0} ema ce {ema_ce:.3} | ");
        self.sums = LossSums::default();
        let tokens = self.batches.iter().map(|b| (b.batch * b.seq_len) as u64);
        Ok((self.accum, tokens.sum()))
    }

    fn loss(&mut self, model: &M, i: usize) -> Result<Tensor<1>> {
        let (mut loss, sums) = if self.rows[i].is_empty() {
            (Tensor::zeros([1], &self.device), LossSums::default())
        } else {
            policy_loss(model, &self.rows[i], &self.surrogate)?
        };
        self.sums.add(&sums);
        if self.cfg.ntp_weight > 0.0 {
            loss = loss + batch_loss(model, &self.batches[i], &self.device) * self.cfg.ntp_weight;
        }
        Ok(loss)
    }

    fn annotate(&mut self, record: &mut Map<String, Value>) -> String {
        record.extend(std::mem::take(&mut self.pending));
        self.feed.annotate(record);
        let st = &self.sums;
        record.insert("clip_ratio".into(), json!(st.clip / st.weight.max(1e-12)));
        record.insert("entropy".into(), json!(st.entropy / st.tokens.max(1.0)));
        self.shown.clone()
    }

    fn state(&self) -> Value {
        json!({ "feed": self.feed.state(), "ema_steps": self.ema_steps })
    }

    fn restore(&mut self, state: &Value, step: u64) -> Result<()> {
        let steps = state["ema_steps"]
            .as_u64()
            .ok_or_else(|| anyhow!("no `ema_steps`: not a checkpoint of an rlp stage"))?;
        self.ema_steps = steps;
        self.feed.restore(&state["feed"], step)
    }

    fn save_files(&self, dir: &Path) -> Result<()> {
        self.ema().save_hf(&dir.join(EMA_DIR))
    }

    fn load_files(&mut self, dir: &Path) -> Result<()> {
        let d = dir.join(EMA_DIR);
        let ema = M::frozen(&d, &self.base, self.dtype)
            .map_err(|e| anyhow!("{}: the RLP baseline (EMA) model: {e:#}", d.display()))?;
        self.ema = Some(ema);
        Ok(())
    }

    fn counts_flops(&self) -> bool {
        false
    }

    fn step_shape(&self) -> Option<String> {
        let c = &self.cfg;
        Some(format!(
            "{} rows × {} positions × {} thoughts of up to {} tokens",
            self.rows_per_step, c.positions_per_row, c.group_size, c.thought_tokens
        ))
    }
}
