//! Batched generation with a KV cache: greedy, temperature, top-k and top-p sampling, all
//! seeded; EOS, stop checks and per-row token budgets; the log-prob of every sampled token.
//!
//! Prompts of different lengths are left-padded to one width so that every row writes its
//! keys at the same cache column; padding is masked out of attention and positions count
//! from each row's first real token, as transformers' `generate` does. When a row finishes
//! it is dropped from the batch (cache rows included), so finished rows cost nothing.
//!
//! The log-prob reported for a token is under the temperature-scaled distribution before
//! top-k/top-p truncation, log softmax(logits / T) (plain log softmax when greedy). That is
//! what a trainer recomputes for importance ratios in RL.

use anyhow::{bail, Result};
use burn::module::Module;
use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData};

use crate::layers::{logsumexp, to_dtype};
use crate::qwen3::{ForwardOptions, Qwen3, Qwen3Cache};
use crate::rng::Rng;

/// A model the engine can drive.
pub trait CausalLm {
    type Cache;
    fn device(&self) -> Device;
    fn vocab_size(&self) -> usize;
    /// An empty cache for `batch` rows of up to `max_len` positions; `key_pad` is
    /// `[batch, max_len]`, true on left padding (None when no row is padded).
    fn new_cache(
        &self,
        batch: usize,
        max_len: usize,
        key_pad: Option<Tensor<2, Bool>>,
    ) -> Self::Cache;
    /// Appends `ids` `[batch, seq]` at `positions` and returns the last position's logits.
    fn step(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        cache: &mut Self::Cache,
    ) -> Tensor<2>;
    /// Keeps only the batch rows `idx` of the cache.
    fn keep_rows(cache: &mut Self::Cache, idx: &Tensor<1, Int>);
}

impl CausalLm for Qwen3 {
    type Cache = Qwen3Cache;

    fn device(&self) -> Device {
        self.embed_tokens.val().device()
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn new_cache(
        &self,
        batch: usize,
        max_len: usize,
        key_pad: Option<Tensor<2, Bool>>,
    ) -> Qwen3Cache {
        let mut c = Qwen3::new_cache(self, batch, max_len, &CausalLm::device(self));
        c.key_pad = key_pad;
        c
    }

    fn step(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        cache: &mut Qwen3Cache,
    ) -> Tensor<2> {
        let opts = ForwardOptions {
            last_only: true,
            hidden_states: false,
        };
        let logits = self
            .forward_with(ids, positions, None, Some(cache), opts)
            .logits;
        let [b, _, v] = logits.dims();
        logits.reshape([b, v])
    }

    fn keep_rows(cache: &mut Qwen3Cache, idx: &Tensor<1, Int>) {
        cache.select_rows(idx);
    }
}

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// New-token budget per row; one value applies to every row.
    pub max_new_tokens: Vec<usize>,
    pub eos_ids: Vec<u32>,
    /// Id written into left padding (never attended to).
    pub pad_id: u32,
    pub sampling: Sampling,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Clone, Debug)]
pub struct Sequence {
    /// Generated tokens (the EOS token included when that is why it stopped).
    pub tokens: Vec<u32>,
    /// Log-prob of each generated token (see the module docs for which distribution).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Hooks called as tokens are produced: `on_token(row, token)` streams, and `stop(row,
/// generated)` returning true ends that row (stop strings are checked this way).
#[derive(Default)]
pub struct Hooks<'a> {
    pub on_token: Option<&'a mut dyn FnMut(usize, u32)>,
    pub stop: Option<&'a mut StopFn<'a>>,
}

/// `stop(row, generated_so_far)`: true ends the row.
pub type StopFn<'a> = dyn FnMut(usize, &[u32]) -> bool + 'a;

/// Generates continuations for every prompt. The model is run without an autodiff graph.
pub fn generate<M: CausalLm + Module>(
    model: &M,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
) -> Result<Vec<Sequence>> {
    opts.sampling.validate()?;
    let device = model.device();
    if device.is_autodiff() {
        // Building a graph that is never backpropagated leaks memory; run on a plain copy.
        return generate(&model.valid(), prompts, opts, hooks);
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    let batch = Batch::new(model.vocab_size(), prompts, opts, 1, &device)?;
    let b = prompts.len();
    let mut cache = model.new_cache(b, batch.max_len, batch.key_pad.clone());
    let mut logits = model.step(batch.ids.clone(), batch.positions.clone(), &mut cache);

    let mut out = empty_sequences(b);
    // Rows still generating, as indices into `prompts`, in cache-row order.
    let mut active: Vec<usize> = (0..b).filter(|&i| batch.budget(i) > 0).collect();
    if active.len() < b {
        let idx = rows_tensor(&active, &device);
        M::keep_rows(&mut cache, &idx);
        logits = logits.select(0, idx);
    }
    let mut sampler = Sampler::new(&opts.sampling);

    while !active.is_empty() {
        let (toks, lps) = sampler.sample(logits)?;
        let mut keep = Vec::with_capacity(active.len());
        for (r, &i) in active.iter().enumerate() {
            if record(
                &mut out[i],
                i,
                toks[r],
                lps[r],
                batch.budget(i),
                opts,
                hooks,
            ) {
                keep.push(r);
            }
        }
        if keep.is_empty() {
            break;
        }
        let next_ids: Vec<i64> = keep.iter().map(|&r| toks[r] as i64).collect();
        if keep.len() < active.len() {
            M::keep_rows(&mut cache, &rows_tensor(&keep, &device));
            active = keep.iter().map(|&r| active[r]).collect();
        }
        let n = active.len();
        let next_pos: Vec<i64> = active
            .iter()
            .map(|&i| (prompts[i].len() + out[i].tokens.len() - 1) as i64)
            .collect();
        logits = model.step(
            Tensor::from_data(TensorData::new(next_ids, [n, 1]), &device),
            Tensor::from_data(TensorData::new(next_pos, [n, 1]), &device),
            &mut cache,
        );
    }
    Ok(out)
}

/// Prompts checked and left-padded to one width, on the device.
pub(crate) struct Batch {
    /// `[batch, width]` ids, left padding filled with the pad id.
    pub ids: Tensor<2, Int>,
    /// `[batch, width]` positions, counted from each row's first real token.
    pub positions: Tensor<2, Int>,
    /// `[batch, max_len]`, true on left padding; None when no row is padded, which keeps
    /// attention on its unmasked path.
    pub key_pad: Option<Tensor<2, Bool>>,
    pub width: usize,
    /// Cache columns: the width plus the largest budget (at least `min_new`).
    pub max_len: usize,
    budgets: Vec<usize>,
}

impl Batch {
    pub fn new(
        vocab: usize,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        min_new: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = prompts.len();
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            bail!("prompt {i} is empty: generation needs at least one prompt token");
        }
        let budgets: Vec<usize> = match opts.max_new_tokens.as_slice() {
            [one] => vec![*one; b],
            many if many.len() == b => many.to_vec(),
            many => bail!("max_new_tokens has {} entries for {b} prompts", many.len()),
        };
        if let Some((i, t)) = prompts
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.iter().find(|&&t| t as usize >= vocab).map(|t| (i, *t)))
        {
            bail!("prompt {i} has token id {t}, outside the model's vocabulary of {vocab}");
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let max_new = budgets.iter().copied().max().unwrap_or(0);
        let max_len = width + max_new.max(min_new);

        let mut ids = Vec::with_capacity(b * width);
        let mut pos = Vec::with_capacity(b * width);
        let mut pad = Vec::with_capacity(b * max_len);
        for p in prompts {
            let n_pad = width - p.len();
            ids.extend(
                std::iter::repeat_n(opts.pad_id as i64, n_pad).chain(p.iter().map(|&t| t as i64)),
            );
            pos.extend((0..width).map(|j| j.saturating_sub(n_pad) as i64));
            pad.extend((0..max_len).map(|j| j < n_pad));
        }
        let key_pad = pad
            .iter()
            .any(|&p| p)
            .then(|| Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, max_len]), device));
        Ok(Self {
            ids: Tensor::from_data(TensorData::new(ids, [b, width]), device),
            positions: Tensor::from_data(TensorData::new(pos, [b, width]), device),
            key_pad,
            width,
            max_len,
            budgets,
        })
    }

    pub fn budget(&self, row: usize) -> usize {
        self.budgets[row]
    }
}

pub(crate) fn empty_sequences(n: usize) -> Vec<Sequence> {
    (0..n)
        .map(|_| Sequence {
            tokens: vec![],
            logprobs: vec![],
            finish: FinishReason::Length,
        })
        .collect()
}

/// Appends row `row`'s new token to `seq`, calls the hooks, and says whether the row goes
/// on (no EOS, no stop, budget left).
pub(crate) fn record(
    seq: &mut Sequence,
    row: usize,
    tok: u32,
    lp: f32,
    budget: usize,
    opts: &GenerateOptions,
    hooks: &mut Hooks,
) -> bool {
    seq.tokens.push(tok);
    seq.logprobs.push(lp);
    if let Some(f) = hooks.on_token.as_mut() {
        f(row, tok);
    }
    if opts.eos_ids.contains(&tok) {
        seq.finish = FinishReason::Eos;
    } else if hooks.stop.as_mut().is_some_and(|f| f(row, &seq.tokens)) {
        seq.finish = FinishReason::Stop;
    } else {
        return seq.tokens.len() < budget;
    }
    false
}

fn rows_tensor(rows: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(v, [rows.len()]), device)
}

/// Bisection steps of the nucleus floor (`nucleus_floor`) over a log-probability range of
/// `NUCLEUS_RANGE`: 24 halvings of 30 nats resolve 1.8e-6 nats, about the spacing of f32
/// log-probs near −10, so only near-ties at the cut can fall on the other side of it.
const NUCLEUS_STEPS: usize = 24;
/// Tokens this far (in nats) below the most likely one hold at most `vocab·e^-30` of the
/// mass (1.4e-8 for Qwen3's 151,936), so the nucleus floor is searched above it.
const NUCLEUS_RANGE: f64 = 30.0;

pub(crate) struct Sampler {
    cfg: Sampling,
    rng: Rng,
}

impl Sampler {
    pub(crate) fn new(cfg: &Sampling) -> Self {
        Self {
            cfg: cfg.clone(),
            rng: Rng::new(cfg.seed),
        }
    }

    /// Uniform noise in (0, 1] drawn on the device (pure temperature sampling's Gumbel noise
    /// never leaves it). The device has one generator per process, so each draw re-seeds it
    /// from this sampler's own stream under a lock: two generations running at once (tests,
    /// a library user's threads) then each get their seed's samples, whatever the
    /// interleaving.
    pub(crate) fn uniform(&mut self, shape: [usize; 2], device: &Device) -> Tensor<2> {
        static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner());
        device.seed(self.rng.next_u64());
        Tensor::<2>::random(shape, Distribution::Uniform(1e-20, 1.0), device)
    }

    /// The shape of the uniform noise [`pick_on_device`] takes for `rows` × `vocab`
    /// logits: none when greedy, one per candidate otherwise.
    pub(crate) fn noise_shape(&self, rows: usize, vocab: usize) -> Option<[usize; 2]> {
        match (self.cfg.temperature, self.cfg.top_k) {
            (0.0, _) => None,
            (_, 0) => Some([rows, vocab]),
            (_, k) => Some([rows, k.min(vocab)]),
        }
    }

    /// Samples one token per row of `logits` `[rows, vocab]`; returns tokens and log-probs.
    /// The only read from the device is the sampled ids with their log-probs.
    pub(crate) fn sample(&mut self, logits: Tensor<2>) -> Result<(Vec<u32>, Vec<f32>)> {
        let logits = to_dtype(logits, DType::F32);
        let [rows, vocab] = logits.dims();
        let u = self
            .noise_shape(rows, vocab)
            .map(|shape| self.uniform(shape, &logits.device()));
        let (tok, lp) = pick_on_device(&self.cfg, logits, u);
        Ok(read_tokens(tok, lp))
    }
}

/// Sampling all on the device, with shapes that do not depend on the logits (so a
/// captured decode step can replay it): the argmax when greedy, else the Gumbel argmax
/// with the uniform noise `u` (`Sampler::noise_shape`) over the whole vocabulary, or over the
/// top-k candidates, inside the nucleus when `top_p < 1`. Returns the ids and their
/// log-probs, `[rows, 1]` each.
pub(crate) fn pick_on_device(
    cfg: &Sampling,
    logits: Tensor<2>,
    u: Option<Tensor<2>>,
) -> (Tensor<2, Int>, Tensor<2>) {
    let Some(u) = u else {
        return greedy(logits);
    };
    let z = logits / cfg.temperature as f64;
    let lse = logsumexp(z.clone());
    let top_p = cfg.top_p;
    if cfg.top_k == 0 {
        // Gumbel-max: argmax(z + G) is an exact sample from softmax(z), and from the
        // nucleus when everything below its floor is cut first.
        let mut scores = z.clone() - u.log().neg().log();
        if top_p < 1.0 {
            let lp = z.clone() - lse.clone();
            let floor = nucleus_floor(lp.clone(), top_p).expand(lp.dims());
            scores = scores.mask_fill(lp.lower(floor), f32::NEG_INFINITY);
        }
        let tok = scores.argmax(1);
        let lp = z.gather(1, tok.clone()) - lse;
        return (tok, lp);
    }
    // Top-p after top-k, on the candidates' renormalised distribution, as transformers
    // applies them.
    let k = u.dims()[1];
    let (vals, idx) = z.topk_with_indices(k, 1);
    let norm = logsumexp(vals.clone());
    let (tok, lp) = pick(vals, idx, norm, top_p, u);
    (tok, lp - lse)
}

/// Each row's nucleus floor, `[rows, 1]`: the highest log-probability `f` such that the
/// tokens with log-prob `≥ f` hold at least `top_p` of the mass, found by bisection on the
/// device (`NUCLEUS_STEPS` masked sums), so no sort and no read. Keeping the tokens at or
/// above it keeps the shortest prefix of the sorted distribution that reaches `top_p`,
/// which is transformers' cut, ties at the cut aside.
fn nucleus_floor(lp: Tensor<2>, top_p: f32) -> Tensor<2> {
    let dims = lp.dims();
    let p = lp.clone().exp();
    let mut hi = lp.clone().max_dim(1);
    let mut lo = hi.clone() - NUCLEUS_RANGE;
    for _ in 0..NUCLEUS_STEPS {
        let mid = (lo.clone() + hi.clone()) * 0.5;
        let mass = p
            .clone()
            .mask_fill(lp.clone().lower(mid.clone().expand(dims)), 0.0)
            .sum_dim(1);
        let enough = mass.greater_equal_elem(top_p);
        lo = lo.mask_where(enough.clone(), mid.clone());
        hi = mid.mask_where(enough, hi);
    }
    lo
}

/// The argmax of each row of f32 `logits` `[rows, vocab]` and its log-prob, `[rows, 1]` each.
pub(crate) fn greedy(logits: Tensor<2>) -> (Tensor<2, Int>, Tensor<2>) {
    let tok = logits.clone().argmax(1);
    let lp = logits.clone().gather(1, tok.clone()) - logsumexp(logits);
    (tok, lp)
}

/// Samples one candidate per row from `vals` (logits sorted descending, `[rows, k]`, with
/// their vocabulary ids `idx`) after the nucleus cut, on the device: keeps the shortest
/// prefix whose probability (`exp(vals - log_norm)`) reaches `top_p`, then takes the Gumbel
/// argmax with the uniform noise `u`. Returns the ids and their logits, `[rows, 1]` each.
fn pick(
    vals: Tensor<2>,
    idx: Tensor<2, Int>,
    log_norm: Tensor<2>,
    top_p: f32,
    u: Tensor<2>,
) -> (Tensor<2, Int>, Tensor<2>) {
    let mut scores = vals.clone() - u.log().neg().log();
    if top_p < 1.0 {
        let p = (vals.clone() - log_norm).exp();
        // A candidate stays while the mass before it is short of top_p: the first always does.
        let before = p.clone().cumsum(1) - p;
        scores = scores.mask_fill(before.greater_equal_elem(top_p), f32::NEG_INFINITY);
    }
    let j = scores.argmax(1);
    (idx.gather(1, j.clone()), vals.gather(1, j))
}

/// Sampled ids and their log-probs (`[rows, 1]` each), read in one transfer: the decode
/// step's only wait for the device. Ids travel as f32, exact below 2²⁴.
fn read_tokens(tok: Tensor<2, Int>, lp: Tensor<2>) -> (Vec<u32>, Vec<f32>) {
    read_pairs(token_pairs(tok, lp))
}

/// `[rows, 2]`: each row's sampled id (as f32) and its log-prob.
pub(crate) fn token_pairs(tok: Tensor<2, Int>, lp: Tensor<2>) -> Tensor<2> {
    Tensor::cat(vec![tok.float(), lp], 1)
}

/// Reads [`token_pairs`] back in one transfer.
pub(crate) fn read_pairs(pairs: Tensor<2>) -> (Vec<u32>, Vec<f32>) {
    floats(pairs).chunks(2).map(|p| (p[0] as u32, p[1])).unzip()
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(&Sampling {
            temperature: 1.0,
            top_k,
            top_p,
            seed,
        })
    }

    /// `rows` copies of one row of logits.
    fn rows(logits: &[f32], rows: usize) -> Tensor<2> {
        let data: Vec<f32> = (0..rows).flat_map(|_| logits.iter().copied()).collect();
        Tensor::<1>::from_floats(data.as_slice(), &Device::flex()).reshape([rows, logits.len()])
    }

    /// Draws one candidate for each of `n` rows of `probs` (already sorted) through [`pick`].
    fn draws(probs: &[f32], log_norm: f32, top_p: f32, n: usize) -> Vec<u32> {
        let logs: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let ids: Vec<i64> = (0..probs.len() as i64).collect();
        let dev = Device::flex();
        let idx = Tensor::<1, Int>::from_ints(ids.as_slice(), &dev)
            .reshape([1, probs.len()])
            .repeat_dim(0, n);
        let u = sampler(0, top_p, 3).uniform([n, probs.len()], &dev);
        let norm = Tensor::<2>::full([n, 1], log_norm, &dev);
        let (tok, lp) = pick(rows(&logs, n), idx, norm, top_p, u);
        let (tok, lp) = read_tokens(tok, lp);
        for (t, l) in tok.iter().zip(&lp) {
            assert!(
                (l - logs[*t as usize]).abs() < 1e-6,
                "logit of the wrong candidate"
            );
        }
        tok
    }

    #[test]
    fn nucleus_keeps_smallest_prefix_reaching_top_p() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two only, renormalised.
        let tok = draws(&[0.5, 0.3, 0.2], 0.0, 0.7, 4000);
        assert!(!tok.contains(&2), "token outside the nucleus was sampled");
        let frac = tok.iter().filter(|&&t| t == 0).count() as f64 / 4000.0;
        assert!(
            (frac - 0.625).abs() < 0.03,
            "renormalised 0.5/0.8 expected, got {frac}"
        );
    }

    #[test]
    fn nucleus_without_top_k_uses_true_probabilities() {
        // Candidates hold 0.5 and 0.3 of the mass; the other 0.2 lies outside them. With
        // the true normaliser (log 1), top_p 0.6 needs both; renormalised (0.625, 0.375) it
        // keeps only the first.
        let seen = |norm: f32| {
            let mut t = draws(&[0.5, 0.3], norm, 0.6, 500);
            t.sort();
            t.dedup();
            t
        };
        assert_eq!(seen(0.0), [0, 1], "both candidates are in the nucleus");
        assert_eq!(seen(0.8f32.ln()), [0]);
    }

    #[test]
    fn nucleus_floor_keeps_the_sorted_prefix_reaching_top_p() {
        // Peaked, flat, two-level and long-tailed rows; the cut checked against a sort.
        let rows: Vec<Vec<f32>> = vec![
            vec![4.0, 1.0, 0.5, 0.0, -1.0, -3.0],
            vec![0.0; 6],
            vec![2.0, 2.0, 2.0, -1.0, -1.0, -1.0],
            (0..6).map(|i| -(i as f32) * 0.37).collect(),
        ];
        let dev = Device::flex();
        for top_p in [0.1f32, 0.5, 0.8, 0.9, 0.99] {
            let data: Vec<f32> = rows.concat();
            let z = Tensor::<1>::from_floats(data.as_slice(), &dev).reshape([rows.len(), 6]);
            let lp = z.clone() - logsumexp(z);
            let floor: Vec<f32> = floats(nucleus_floor(lp.clone(), top_p));
            let lp: Vec<f32> = floats(lp);
            for (r, row) in lp.chunks(6).enumerate() {
                let mut sorted = row.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                // The shortest sorted prefix reaching top_p; all of its last value's ties.
                let (mut mass, mut last) = (0.0f32, sorted[0]);
                for &v in &sorted {
                    last = v;
                    mass += v.exp();
                    if mass >= top_p {
                        break;
                    }
                }
                for (j, &v) in row.iter().enumerate() {
                    let kept = v >= floor[r];
                    let want = v >= last - 1e-6;
                    assert_eq!(
                        kept, want,
                        "top_p {top_p} row {r} token {j}: {v} vs floor {}",
                        floor[r]
                    );
                }
            }
        }
    }

    #[test]
    fn top_p_reaches_past_any_candidate_count() {
        // 1000 slowly falling logits: the 0.9 nucleus holds most of the vocabulary.
        let vocab = 1000;
        let logits: Vec<f32> = (0..vocab).map(|i| -(i as f32) * 1e-3).collect();
        let w: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let total: f64 = w.iter().sum();
        let (mut acc, mut cut) = (0.0, vocab);
        for (i, x) in w.iter().enumerate() {
            if acc >= 0.9 * total {
                cut = i;
                break;
            }
            acc += x;
        }
        let mut s = sampler(0, 0.9, 7);
        let (tok, lp) = s.sample(rows(&logits, 2000)).unwrap();
        assert!(
            tok.iter().all(|&t| (t as usize) < cut),
            "outside the nucleus"
        );
        let far = tok.iter().filter(|&&t| t >= 256).count() as f64 / 2000.0;
        let want = w[256..cut].iter().sum::<f64>() / w[..cut].iter().sum::<f64>();
        assert!(
            (far - want).abs() < 0.04,
            "{far} of draws past the first 256 tokens, want {want}"
        );
        let lse = total.ln() as f32;
        for (t, l) in tok.iter().zip(&lp) {
            assert!((l - (logits[*t as usize] - lse)).abs() < 1e-4);
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..10).map(|i| -(i as f32) * 0.3).collect();
        let run = |k, p| sampler(k, p, 9).sample(rows(&logits, 50)).unwrap().0;
        for (k, p) in [(10, 1.0), (0, 0.9), (4, 0.8)] {
            let a = run(k, p);
            assert_eq!(a, run(k, p));
            assert!(
                a.iter().any(|&t| t != a[0]),
                "sampling at T=1 should not be constant"
            );
        }
    }
}
