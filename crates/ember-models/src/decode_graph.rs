//! Decoding with a step whose shapes never change, captured once and replayed as a
//! graph (`burn::tensor::capture`): on CUDA one graph launch per token instead of the host
//! issuing hundreds of kernels, on wgpu a re-encoding of the recorded dispatches. Backends
//! without graphs (flex) re-run the step, with the same results.
//!
//! A replay re-runs the recorded kernels against the buffers they used when captured, so
//! the step keeps its state in device buffers that it updates in place:
//! - the next input ids, overwritten with the sampled ones (`slice_assign`);
//! - a step counter, from which each row's position and the cache column follow;
//! - the KV cache, written at that column (`select_assign`);
//! - a hybrid's recurrent states (Mamba2, DeltaNet), written back into their own buffers;
//! - when sampling, the uniform noise of the Gumbel argmax, drawn between replays.
//!
//! Attention reads every cache column and masks those not written yet, so no shape
//! depends on the step. Rows are never dropped: a finished row's later tokens are computed
//! and ignored. Each step reads one `[batch, 2]` tensor back, the sampled ids with their
//! log-probs.

use std::cell::RefCell;

use anyhow::Result;
use burn::module::Module;
use burn::tensor::{capture, Bool, DType, Int, Tensor, TensorData};

use crate::generate::{
    empty_sequences, pick_on_device, read_pairs, record, token_pairs, Batch, CausalLm,
    GenerateOptions, Hooks, Sampler, Sequence,
};
use crate::hybrid::RecurrentState;
use crate::layers::to_dtype;

/// How often `burn::tensor::capture` runs the step before replaying it: three warm-up runs
/// and the recorded one. Each advances the state, which is reset afterwards, and writes a
/// cache column past the prompt, so the cache needs that many columns at least.
const CAPTURE_RUNS: usize = 4;

/// Whether the engines that leave the choice to the environment (RL rollouts, RLP's thoughts,
/// the held-out task evaluations, `ember generate` without `--graph`) decode through a
/// captured step on `device`: `EMBER_DECODE=graph`
/// or `eager` decides; unset (`auto`) takes the graph on CUDA, where an H100 decoded the 0.6B
/// shape at 6.75 ms a token through it and at more than a second a token eagerly (2026-11-27),
/// and the eager engine elsewhere (the CPU backend only re-runs the step over the whole cache).
pub fn graph_on(device: &burn::tensor::Device) -> bool {
    #[derive(Clone, Copy)]
    enum Choice {
        Auto,
        Eager,
        Graph,
    }
    static CHOICE: std::sync::OnceLock<Choice> = std::sync::OnceLock::new();
    let choice = *CHOICE.get_or_init(|| match std::env::var("EMBER_DECODE").as_deref() {
        Ok("graph") => Choice::Graph,
        Ok("eager") => Choice::Eager,
        Ok("auto") | Err(_) => Choice::Auto,
        Ok(other) => {
            eprintln!(
                "warning: EMBER_DECODE={other} is not `auto`, `graph` or `eager`; using auto"
            );
            Choice::Auto
        }
    });
    match choice {
        Choice::Graph => true,
        Choice::Eager => false,
        Choice::Auto => crate::device::is_cuda(device),
    }
}

/// Generation by the engine [`graph_on`] picks for the model's device.
pub fn generate_auto<M: GraphDecode>(
    model: &M,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
) -> Result<Vec<Sequence>> {
    if graph_on(&model.device()) {
        Ok(generate_graph(model, prompts, opts, hooks)?.0)
    } else {
        crate::generate::generate(model, prompts, opts, hooks)
    }
}

/// A causal LM whose decoding step can be captured: one token per row, with the positions,
/// the cache column and the attention's key mask given as device tensors, so that no shape
/// and no host value depends on the step.
pub trait GraphDecode: CausalLm + Module {
    /// Logits `[batch, vocab]` of the tokens `ids` `[batch, 1]` at `positions` `[batch, 1]`,
    /// written into the cache at column `col` `[1]`; attention ignores the columns where
    /// `key_mask` `[batch, columns]` is true.
    fn decode_step(
        &self,
        ids: Tensor<2, Int>,
        positions: Tensor<2, Int>,
        col: Tensor<1, Int>,
        key_mask: Tensor<2, Bool>,
        cache: &mut Self::Cache,
    ) -> Tensor<2>;

    /// Tokens the prefill puts in the cache ahead of every row's prompt, after its left
    /// padding (a hybrid's meta tokens): positions count from the first of them, and their
    /// columns are never padding.
    fn prefix_tokens(&self) -> usize {
        0
    }

    /// Copies of the state a step advances for good (recurrent layers' states; the KV
    /// cache's columns are rewritten at the same places, so it needs none).
    fn save_state(_cache: &Self::Cache) -> Vec<RecurrentState> {
        vec![]
    }

    /// Writes [`Self::save_state`]'s copies back into the cache's own buffers.
    fn restore_state(_cache: &mut Self::Cache, _saved: Vec<RecurrentState>) {}
}

/// What the captured step reads and overwrites.
struct State<C> {
    /// `[batch, 1]`: the tokens the step feeds in.
    ids: Tensor<2, Int>,
    /// `[1]`: steps taken since the prefill.
    step: Tensor<1, Int>,
    /// Uniform noise for sampling (`Sampler::noise_shape`); None when greedy.
    noise: Option<Tensor<2>>,
    cache: C,
}

/// How a graph decode went.
#[derive(Clone, Copy, Debug, Default)]
pub struct GraphStats {
    /// Whether the step replayed as a recorded graph; false where the backend has none
    /// and the step simply re-ran.
    pub replayed: bool,
    /// Seconds spent capturing: the warm-up runs of the step and the recording.
    pub capture_secs: f64,
}

/// Generation through a captured decode step; the same contract as
/// [`crate::generate::generate`] (EOS, stop hooks, per-row budgets, log-probs, seeded
/// sampling with a temperature, top-k and top-p). While no row has finished, the samples
/// equal the eager engine's for the same seed: both draw the same noise in the same order.
pub fn generate_graph<M: GraphDecode>(
    model: &M,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
) -> Result<(Vec<Sequence>, GraphStats)> {
    opts.sampling.validate()?;
    let mut sampler = Sampler::new(&opts.sampling);
    let device = model.device();
    if device.is_autodiff() {
        return generate_graph(&model.valid(), prompts, opts, hooks);
    }
    if prompts.is_empty() {
        return Ok((vec![], GraphStats::default()));
    }
    let b = prompts.len();
    let batch = Batch::new(model.vocab_size(), prompts, opts, CAPTURE_RUNS, &device)?;
    let mut cache = CausalLm::new_cache(model, b, batch.max_len, batch.key_pad.clone());
    let logits = model.step(batch.ids.clone(), batch.positions.clone(), &mut cache);
    let [_, vocab] = logits.dims();
    let (toks, lps) = sampler.sample(logits)?;

    let mut out = empty_sequences(b);
    // Rows still generating; a row with no budget takes no token at all.
    let mut live: Vec<bool> = (0..b)
        .map(|i| {
            let n = batch.budget(i);
            n > 0 && record(&mut out[i], i, toks[i], lps[i], n, opts, hooks)
        })
        .collect();
    if !live.contains(&true) {
        return Ok((out, GraphStats::default()));
    }

    let first: Vec<i64> = toks.iter().map(|&t| t as i64).collect();
    let first = Tensor::<2, Int>::from_data(TensorData::new(first, [b, 1]), &device);
    let zero = Tensor::<1, Int>::zeros([1], &device);
    // Constants the step combines with the counter, made before the capture: a recording
    // may launch kernels but not transfer from the host.
    // Each row's cache holds [padding | prefix | prompt], so the first new token goes to
    // column `prefix + width`, at position `prefix + prompt length`.
    let prefix = model.prefix_tokens();
    let width = prefix + batch.max_len;
    let pos0: Vec<i64> = prompts.iter().map(|p| (prefix + p.len()) as i64).collect();
    let pos0 = Tensor::<2, Int>::from_data(TensorData::new(pos0, [b, 1]), &device);
    let col0 = vec![(prefix + batch.width) as i64];
    let col0 = Tensor::<1, Int>::from_data(TensorData::new(col0, [1]), &device);
    let columns = Tensor::<1, Int>::arange(0..width as i64, &device).reshape([1, width]);
    // Padding sits at the front of a row, so the prefix's columns extend the mask unset.
    let pad = batch.key_pad.clone().map(|p| match prefix {
        0 => p,
        _ => {
            let none = Tensor::<2, Int>::zeros([b, prefix], &device).bool();
            Tensor::cat(vec![p, none], 1)
        }
    });
    // The capture's runs advance recurrent states for good; they are put back afterwards.
    let saved = M::save_state(&cache);
    // Sampling's uniform noise is drawn between replays into a buffer the step reads: a
    // draw inside the graph would replay the same seed.
    let noise_shape = sampler.noise_shape(b, vocab);
    let state = RefCell::new(State {
        ids: first.clone(),
        step: zero.clone(),
        noise: noise_shape.map(|s| Tensor::<2>::full(s, 0.5, &device)),
        cache,
    });

    let step = || {
        let mut st = state.borrow_mut();
        let st = &mut *st;
        // Every clone of a state tensor is consumed before the tensor is overwritten: a live
        // one would make the write copy to a new buffer, which the replays would not read.
        let t = st.step.clone();
        let col = col0.clone() + t.clone();
        let positions = pos0.clone() + t.reshape([1, 1]);
        let unwritten = columns
            .clone()
            .greater(col.clone().reshape([1, 1]).expand([1, width]))
            .expand([b, width]);
        let key_mask: Tensor<2, Bool> = match &pad {
            Some(p) => p.clone().bool_or(unwritten),
            None => unwritten,
        };
        let logits = model.decode_step(st.ids.clone(), positions, col, key_mask, &mut st.cache);
        let noise = st.noise.clone();
        let (tok, lp) = pick_on_device(&opts.sampling, to_dtype(logits, DType::F32), noise);
        st.ids
            .inplace(|ids| ids.slice_assign([0..b, 0..1], tok.clone()));
        st.step.inplace(|s| {
            let next = s.clone() + 1;
            s.slice_assign(0..1, next)
        });
        token_pairs(tok, lp)
    };
    let t0 = std::time::Instant::now();
    let mut graph = capture(&device, step);
    {
        // Back to the state after the prefill, in the same buffers.
        let mut st = state.borrow_mut();
        st.ids.inplace(|ids| ids.slice_assign([0..b, 0..1], first));
        st.step.inplace(|s| s.slice_assign(0..1, zero));
        M::restore_state(&mut st.cache, saved);
    }
    let stats = GraphStats {
        replayed: graph.is_hardware(),
        capture_secs: t0.elapsed().as_secs_f64(),
    };

    while live.contains(&true) {
        // Safety: every buffer the step touched lives in `state`, in the constants above or
        // in `model`, all of which outlive `graph`; each replay's output is read (a wait for
        // the device) before the next refresh or replay, and everything runs on this
        // thread's stream.
        if let (Some(n), Some(shape)) = (state.borrow_mut().noise.as_mut(), noise_shape) {
            let fresh = sampler.uniform(shape, &device);
            n.inplace(|n| n.slice_assign([0..shape[0], 0..shape[1]], fresh));
        }
        let (toks, lps) = read_pairs(unsafe { graph.replay() }.clone());
        for (i, l) in live.iter_mut().enumerate().filter(|(_, l)| **l) {
            *l = record(
                &mut out[i],
                i,
                toks[i],
                lps[i],
                batch.budget(i),
                opts,
                hooks,
            );
        }
    }
    drop(graph);
    Ok((out, stats))
}
